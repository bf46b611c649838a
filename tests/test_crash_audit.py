"""Crash audit in CI: a few ``kill -9`` of a loaded ``kefu serve``, then the full audit.

The full run (20 kills) is ``python -m loadtest.crash`` (loadtest/README.md, "Crash audit");
here the same driver runs with 3 kills and a short tail, and its negative control with dedup
switched off (``KEFU_UNSAFE_NO_DEDUP=1``) must report duplicates, so the audit is known to see
them. The audit's own counting is checked on made-up histories first.

Power loss: with ``--power-loss`` the data directory is on ``loadtest.unsynced_fs``, a FUSE
layer that keeps file data in its daemon's memory until ``fsync``; each kill also kills the
daemon. ``durability: fsync`` must lose nothing acknowledged; ``durability: process`` (no
fsync) must lose acknowledged messages, which proves the layer drops what was not synced. These
need ``/dev/fuse``, root, libfuse2 (Debian package ``libfuse2``) and ``fusepy``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.crash import check_history
from tests.e2e.harness import REPO_ROOT

pytestmark = pytest.mark.slow  # starts and kills `kefu serve` processes

#: Whole driver run; generous, a slow machine must not fail a test (it normally takes 15 s).
RUN_TIMEOUT_S = 300


def crash_run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "loadtest.crash", *args, "--json", str(out)]
    # A session of its own: on a timeout the driver, its node and its file system daemon go.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        raise AssertionError(f"loadtest.crash did not end within {RUN_TIMEOUT_S} s") from None
    assert out.exists(), f"no report (exit {proc.returncode}):\n{stderr[-3000:]}"
    report: dict[str, Any] = json.loads(out.read_text())
    report["_returncode"] = proc.returncode
    report["_first_line"] = stdout.splitlines()[0] if stdout else ""
    if "diagnosis" in report:  # a run that did not drain: shown with a failing test's output
        print(json.dumps(report["diagnosis"], indent=1))
        print(stderr[-3000:])
    return report


def test_check_history_counts_each_fault() -> None:
    sent = {"a", "b", "c", "d"}
    clean = check_history([(1, "a"), (2, "b"), (3, "c")], {"a": 1, "b": 2, "c": 3}, sent)
    assert {k: clean[k] for k in ("lost", "duplicated", "gaps", "seq_mismatch", "phantoms")} == {
        "lost": 0,
        "duplicated": 0,
        "gaps": 0,
        "seq_mismatch": 0,
        "phantoms": 0,
    }
    lost = check_history([(1, "a"), (2, "c")], {"a": 1, "b": 2, "c": 2}, sent)
    assert lost["lost"] == 1 and lost["gaps"] == 0
    dup = check_history([(1, "a"), (2, "b"), (3, "a")], {"a": 1, "b": 2}, sent)
    assert dup["duplicated"] == 1 and dup["lost"] == 0
    gap = check_history([(1, "a"), (3, "b")], {"a": 1, "b": 3}, sent)
    assert gap["gaps"] == 1
    moved = check_history([(1, "b"), (2, "a")], {"a": 1, "b": 2}, sent)
    assert moved["seq_mismatch"] == 2
    phantom = check_history([(1, "a"), (2, "zz"), (3, None)], {"a": 1}, sent)
    assert phantom["phantoms"] == 2
    unacked = check_history([(1, "a"), (2, "d")], {"a": 1}, sent)
    assert unacked["stored_not_acked"] == 1


def test_kill_9_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """``durability: process`` (the default); fsync mode is audited under power loss below."""
    args = "--kills 3 --visitors 60 --rate 2000 --settle 1 --seed 7"
    r = crash_run(tmp_path, *args.split(" "))
    audit, clients = r["audit"], r["clients"]
    assert r["kills"] == 3
    assert r["unsafe_logged"] is False
    assert audit["acked_ids"] > 1_000, r
    assert audit["acked_agent_ids"] > 0, r  # both sides wrote into the conversations
    # the kills hit messages in flight: they were sent again after the restarts
    assert clients["resent"] > 0, r
    faults = ("lost", "duplicated", "gaps", "seq_mismatch", "phantoms", "unacked")
    assert {k: audit[k] for k in faults} == dict.fromkeys(faults, 0), r
    assert audit["stored"] == audit["acked_ids"], r  # everything stored was acked once
    assert (clients["live_dups"], clients["live_gaps"]) == (0, 0), r
    assert r["_first_line"] == "OK" and r["_returncode"] == 0, r


def test_negative_control_without_dedup_reports_duplicates(tmp_path: Path) -> None:
    """Dedup off: a retried message that was stored before its ack was lost is stored again,
    and the audit must say so (the run stops killing once such a retry happened)."""
    # Up to 60 kills: the run stops once a kill has caught a stored, unacked message. At 2,000
    # messages/s runs took 1, 1, 6 and 9 kills (2026-12-02); the faster node of session 22
    # acks sooner, and took 2-36. At 5,000/s its batches are larger and a kill catches one
    # sooner: 2, 2, 4, 4 and 21 kills.
    args = "--unsafe-no-dedup --kills 60 --visitors 60 --rate 5000 --min-up 0.3 --max-up 1.0"
    r = crash_run(tmp_path, *args.split(" "), "--settle", "0.5")
    audit = r["audit"]
    assert r["unsafe_logged"] is True, "the node did not log that dedup was off"
    assert r["clients"]["retried_stored"] > 0, r
    assert audit["duplicated"] >= r["clients"]["retried_stored"] > 0, r
    assert audit["lost"] == 0 and audit["gaps"] == 0, r
    assert r["_first_line"].startswith("NEGATIVE CONTROL OK"), r
    assert r["_returncode"] == 0


# -- power loss -------------------------------------------------------------------------------


def test_unsynced_fs_keeps_only_what_was_fsynced(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loadtest.unsynced_fs", str(backing), str(mnt)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline, "not mounted within 30 s"
            time.sleep(0.02)
        fd = os.open(mnt / "wal", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"synced|")
        os.fsync(fd)
        os.write(fd, b"not synced")
        os.pwrite(fd, b"S", 0)
        os.close(fd)
        assert (mnt / "wal").read_bytes() == b"Synced|not synced"  # reads see every write
        assert (backing / "wal").read_bytes() == b"synced|"
        fd = os.open(mnt / "cut", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 10_000)
        os.ftruncate(fd, 3)
        os.close(fd)
        assert (mnt / "cut").read_bytes() == b"xxx"
        synced = os.open(mnt / "cut", os.O_RDWR)
        os.fsync(synced)
        os.close(synced)
        assert (backing / "cut").read_bytes() == b"xxx"
    finally:
        daemon.send_signal(signal.SIGKILL)  # the power cut
        daemon.wait(30)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    assert (backing / "wal").read_bytes() == b"synced|"


@pytest.mark.parametrize("durability", ["fsync", "process"])
def test_power_loss(tmp_path: Path, durability: str) -> None:
    args = "--power-loss --kills 3 --visitors 60 --rate 2000 --settle 1 --seed 11 --durability"
    if durability == "process":  # one cut is enough: nothing of the run was ever synced
        args = args.replace("--kills 3", "--kills 1 --drain-timeout 3")
    r = crash_run(tmp_path, *args.split(" "), durability)
    audit = r["audit"]
    assert audit["acked_ids"] > 500, r
    if durability == "fsync":
        faults = ("lost", "duplicated", "gaps", "seq_mismatch", "phantoms", "unacked")
        assert {k: audit[k] for k in faults} == dict.fromkeys(faults, 0), r
        assert r["_first_line"] == "OK" and r["_returncode"] == 0, r
    else:  # acked after a write the kernel had, not the disk: the power cut takes it
        assert audit["lost"] > 0, r
        assert r["_returncode"] == 1 and "LOST" in r["_first_line"], r


def test_a_run_that_does_not_drain_reports_what_waits() -> None:
    """The diagnosis of a run whose clients still wait: a few of them, the node's store and
    connection figures from its ``/metrics``, and the end of its log."""
    from aiohttp import web

    from loadtest.crash import DIAGNOSIS_CLIENTS, _diagnose

    metrics = (
        "# HELP kefu_store_unacked_count x\n"
        "kefu_store_unacked_count 32\n"
        'kefu_store_batch_write_seconds_bucket{le="0.001"} 4\n'
        "kefu_ws_connections_open 22\n"
        "kefu_bot_answers_total 0\n"
    )

    class Waiting:
        def __init__(self, index: int) -> None:
            self.role, self.index, self.up = "agent", index, index % 2 == 0
            self.pending = {f"m{index}-{k}": ("c", "t") for k in range(5)}

    class Node:
        http_url = ""

        @staticmethod
        def log_tail() -> str:
            return "kefu: WARNING something"

    async def serve_metrics(_request: web.Request) -> web.Response:
        return web.Response(text=metrics)

    async def main() -> dict[str, Any]:
        app = web.Application()
        app.router.add_get("/metrics", serve_metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Node.http_url = f"http://127.0.0.1:{port}"
        try:
            return await _diagnose(Node(), [Waiting(i) for i in range(DIAGNOSIS_CLIENTS + 3)])
        finally:
            await runner.cleanup()

    d = asyncio.run(main())
    assert d["stuck_total"] == DIAGNOSIS_CLIENTS + 3
    assert len(d["stuck_clients"]) == DIAGNOSIS_CLIENTS
    first = d["stuck_clients"][0]
    assert (first["role"], first["up"], first["pending"]) == ("agent", True, 5)
    assert first["first_pending"] == ["m0-0", "m0-1", "m0-2"]
    assert d["metrics"] == {"kefu_store_unacked_count": "32", "kefu_ws_connections_open": "22"}
    assert d["log_tail"] == "kefu: WARNING something"
