"""The load harness counts right: a tiny ``chat`` and ``storm`` against a spawned node, and the
accounting and histogram on their own.

The end-to-end cases run ``python -m loadtest`` as a user would (a real ``kefu serve``, worker
processes, loopback only) at sizes that take seconds, and read the JSON report it writes: every
message sent was acknowledged and received, none twice, and the report has the fields the
README promises. They assert what the harness reports, not the node's speed.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.clients import Track
from loadtest.hist import LatencyHistogram
from loadtest.report import plot, verdict
from loadtest.runner import merge_reports
from loadtest.scenarios import cpu_per_message

REPO = Path(__file__).resolve().parent.parent
#: A hang guard only: these runs take a few seconds.
RUN_TIMEOUT_S = 240


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--procs", "1", "--report", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    reports = sorted(out.glob("*.json"))
    assert reports, f"no report written\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert len(reports) == 1
    assert reports[0].with_suffix(".txt").read_text(encoding="utf-8") in proc.stdout
    _check_png(reports[0].with_suffix(".png"))
    return proc, json.loads(reports[0].read_text(encoding="utf-8"))


def _check_png(path: Path) -> None:
    """The run's PNG (what it draws: ``test_the_png_draws_the_cdf_and_the_throughput``)."""
    assert path.is_file(), f"no PNG beside the report: {sorted(path.parent.iterdir())}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = _coloured(path).shape
    assert (width, height) == (1300, 500)  # figsize 13 x 5 at 100 dpi


def _coloured(path: Path) -> Any:
    """Which pixels of a PNG are coloured: a plotted line is; the axes, ticks and text (black,
    gray, white) are not."""
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[:, :, :3]
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 0.3


def _refused(args: list[str], message: str) -> None:
    """``python -m loadtest ARGS`` refuses its arguments: exit 2 with ``message``."""
    bad = subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def _check_header(report: dict[str, Any]) -> None:
    env = report["environment"]
    for key in ("host", "cpu", "cpus", "python", "packages", "commit", "command"):
        assert env[key], key
    assert env["packages"]["picows"] and env["packages"]["uvloop"]


def _check_accounting(acc: dict[str, int], sent_at_least: int) -> None:
    assert acc["sent_by_visitors"] >= sent_at_least
    assert acc["sent_by_visitors"] == acc["acked_to_visitors"] == acc["received_by_agents"]
    assert acc["sent_by_agents"] == acc["acked_to_agents"] == acc["received_by_visitors"]
    assert acc["sent_by_agents"] > 0  # --reply-every 2: agents answer
    assert acc["lost"] == acc["duplicated"] == acc["unacked"] == acc["refused"] == 0


def test_chat_accounts_for_every_message(tmp_path: Path) -> None:
    proc, report = _run(
        tmp_path,
        *["chat", "--visitors", "20", "--rate", "200", "--duration", "1.5", "--reply-every", "2"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith("OK: 0 lost, 0 duplicated")
    _check_header(report)
    res = report["result"]
    assert res["scenario"] == "chat"
    assert res["visitors"] == 20 and res["agents"] == 1
    assert res["connected"] == 21 and res["connect_failed"] == 0
    _check_accounting(res["accounting"], sent_at_least=200)
    v2a = res["latency"]["v2a"]
    assert v2a["count"] == res["accounting"]["received_by_agents"]
    assert 0 < v2a["p50_ms"] <= v2a["p90_ms"] <= v2a["p99_ms"] <= v2a["p99_9_ms"] <= v2a["max_ms"]
    assert res["delivered_per_s"] > 0
    assert res["server_cpu_rss"]["rss_max_bytes"] > 0
    cpu = res["server_cpu_rss"]["cpu_mean_pct"]
    assert res["server_cpu_us_per_msg"] == round(cpu * 1e4 / res["delivered_per_s"], 1)
    assert res["server_exit_code"] == 0  # stopped with SIGTERM, exited cleanly
    # The server's own view over the traffic, read from its /metrics.
    internal = res["server_internal"]
    acc = res["accounting"]
    received = internal["kefu_message_received_to_delivered_seconds"]["count"]
    assert received == acc["sent_by_visitors"] + acc["sent_by_agents"]  # both sides' sends
    assert internal["kefu_event_loop_lag_seconds"]["count"] >= 10  # 20 samples a second
    assert "pinned" not in res
    # The machine's own stalls over the traffic window, probed beside the run (unpinned).
    stalls = res["machine_stalls"]
    assert stalls["cpus"] == "any" and stalls["policy"] in ("fifo", "normal")
    assert 700 <= stalls["wakeups"] <= 1_500  # a 1 ms sleep at a time over 1.5 s
    assert stalls["late_over_5ms"] <= stalls["late_over_1ms"] <= stalls["wakeups"]
    gen = res["generator"]
    assert gen["gc_pauses"] >= 0 and gen["gc_pause_total_ms"] >= gen["gc_pause_max_ms"] >= 0


def test_a_rate_not_kept_up_with_says_so_first(tmp_path: Path) -> None:
    """Two visitors with one send in flight each cannot send 20,000 a second: the first line
    says the delivered rate fell short of the offered one, and how many sends were skipped."""
    proc, report = _run(
        tmp_path,
        *["chat", "--visitors", "2", "--rate", "20000", "--window", "1", "--duration", "1"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]  # short, nothing lost
    res = report["result"]
    skipped = res["generator"]["skipped_busy"]
    assert res["delivered_per_s"] < 0.95 * 20_000 and skipped > 0
    first = proc.stdout.splitlines()[0]
    assert first.startswith("OK: 0 lost, 0 duplicated")
    assert first.endswith(
        f"short of the 20,000/s offered ({skipped:,} sends skipped, their window full)"
    )


def test_pin_puts_the_server_and_the_load_generator_on_their_own_cpus(tmp_path: Path) -> None:
    import os

    cpus = sorted(os.sched_getaffinity(0))
    proc, report = _run(
        tmp_path,
        *["chat", "--visitors", "10", "--rate", "100", "--duration", "1", "--pin"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    pinned = report["result"]["pinned"]
    assert pinned["server"] == pinned["server_observed"] == cpus[:1]
    assert pinned["clients"] == cpus[1:]
    assert report["result"]["machine_stalls"]["cpus"] == cpus[:1]  # the probe beside the node
    assert "pinned" in proc.stdout
    # relay sets up twice in one process (kefu, then the relay): both pinned alike. Enough
    # traffic for the relay's CPU to show: at 100 msgs/s for 1 s it can read 0 % in the
    # kernel's 10 ms ticks, and the CPU per message is then unmeasured (None).
    proc, report = _run(
        tmp_path / "relay",
        *["relay", "--visitors", "20", "--rate", "1000", "--duration", "2", "--pin"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    res = report["result"]
    kcpu, rcpu = res["kefu"]["server_cpu_us_per_msg"], res["relay"]["server_cpu_us_per_msg"]
    assert kcpu > 0 and rcpu > 0
    assert res["cpu_per_msg_ratio_kefu_to_relay"] == round(kcpu / rcpu, 2)
    for side in ("kefu", "relay"):
        assert res[side]["machine_late_over_5ms"] is not None
        assert res[side]["machine_late_max_ms"] >= 0
    assert f"server CPU per message {kcpu} us vs {rcpu} us" in proc.stdout
    _refused(["chat", "--spawn", "--nodes", "2", "--pin"], "--pin needs --spawn, one node")


def test_storm_resumes_everyone_without_loss(tmp_path: Path) -> None:
    proc, report = _run(
        tmp_path,
        *["storm", "--visitors", "30", "--rate", "300", "--duration", "2", "--reply-every", "2"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    res = report["result"]
    storm = res["storm"]
    assert storm["clients"] == 31
    assert storm["reconnected"] == 31 and storm["failed"] == 0
    assert storm["all_resumed_s"] is not None and storm["all_resumed_s"] > 0
    assert res["not_recovered"] == 0 and res["resume_timed_out"] == 0
    _check_accounting(res["accounting"], sent_at_least=300)


def _worker_report(acked: dict[str, int], received: dict[str, int]) -> dict[str, Any]:
    empty = LatencyHistogram().to_wire()
    return {
        "sent": {"visitor": sum(acked.values())},
        "acked": {"visitor": sum(acked.values())},
        "recv": {"visitor": sum(received.values())},
        "acked_conv": {"visitor": acked},
        "recv_conv": {"visitor": received},
        "errors": {},
        "closes": {},
        **dict.fromkeys(
            (
                "acked_dup",
                "refused",
                "dups",
                "stray_acks",
                "resent",
                "track_overflow",
                "unacked",
                "skipped",
                "dropped",
                "window_delivered",
            ),
            0,
        ),
        "behind_max_ms": 0.0,
        "hist": dict.fromkeys(("ack", "v2a", "a2v", "bot", "connect", "ping"), empty),
        "sent_series": [0] * 3600,
        "delivered_series": [0] * 3600,
    }


def test_the_stall_probe_sees_a_stall_of_its_process() -> None:
    """The probe stopped for 80 ms (SIGSTOP, then SIGCONT), as a hypervisor would hold a
    virtual CPU: it reports one wake-up that late, and its sleeps before and after."""
    import os
    import signal
    import time

    from loadtest.stalls import StallProbe

    probe = StallProbe()
    probe.start(time.monotonic_ns(), 1.0)
    pid = probe._proc.pid  # type: ignore[union-attr]
    time.sleep(0.4)  # the interpreter started and the probe is sleeping
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.08)
    os.kill(pid, signal.SIGCONT)
    res = probe.result()
    assert "error" not in res, res
    assert res["late_max_ms"] >= 70 and res["late_over_5ms"] >= 1
    assert res["late_total_ms"] >= res["late_max_ms"]
    assert res["wakeups"] >= 300 and res["cpus"] == "any"
    # Started for a window that has not begun: it waits for it, and a run that stops before
    # the window ends gets no figures.
    later = StallProbe()
    later.start(time.monotonic_ns() + 5_000_000_000, 1.0)
    later.stop()
    assert later.result() == {"error": "not started"}


def test_a_worker_counts_its_garbage_collections_while_traffic_runs() -> None:
    """A collection in a load generator process delays its frames like a slow server would:
    the worker times those that happen while it sends, and only those."""
    import gc

    from loadtest.clients import Worker

    w = Worker({"wid": 0, "ws_url": "ws://127.0.0.1:9/ws"}, None)  # type: ignore[arg-type]
    try:
        gc.collect()  # no traffic: not counted
        assert w.gc_pauses == 0
        w.running = True
        gc.collect()
        gc.collect()
        assert w.gc_pauses == 2
        assert w.gc_pause_total_ms >= w.gc_pause_max_ms > 0
        report = w.report()
        assert report["gc_pauses"] == 2 and report["gc_pause_max_ms"] > 0
    finally:
        gc.callbacks.remove(w._on_gc)


def test_busy_polling_reaches_the_spawned_node_and_the_relay(tmp_path: Path) -> None:
    """``--busy-poll-us``: the spawned node's config has ``ws.busy_poll_us``; the relay polls
    for its window after a message, then stops."""
    import asyncio

    import yaml

    from loadtest.relay import Relay
    from loadtest.server import SpawnedServer

    server = SpawnedServer.__new__(SpawnedServer)  # the config alone, no process
    server.dir, server.cluster_url, server.agent_chats = tmp_path, None, None
    server.busy_poll_us = 750
    cmd = server._kefu_command(10, ["t0"], 10, False)
    config = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text(encoding="utf-8"))
    assert config["ws"]["busy_poll_us"] == 750

    async def relay_polls() -> tuple[bool, bool]:
        relay = Relay(busy_poll_us=20_000)
        relay.kick()
        await asyncio.sleep(0.005)
        during = relay._polling
        await asyncio.sleep(0.06)
        return during, relay._polling

    assert asyncio.run(relay_polls()) == (True, False)
    _refused(["chat", "--busy-poll-us", "-1"], "--busy-poll-us must be in 0..100000")


def test_the_png_draws_the_cdf_and_the_throughput(tmp_path: Path) -> None:
    """Left the latency CDF, right the throughput and the server's CPU: each panel draws its
    data (a report without the data draws far less there)."""
    hist = LatencyHistogram()
    for us in range(100, 20_000, 7):
        hist.record_ns(us * 1000)
    report = {
        "environment": {"cpu": "cpu", "cpus": 2, "python": "3", "packages": {}, "commit": "c" * 40},
        "result": {
            "scenario": "chat",
            "headline": "h",
            "series": {"sent/s": [9_000, 10_000, 9_500], "delivered/s": [8_900, 10_100, 9_400]},
            "server_samples": [[0.0, 40.0, 1], [1.0, 60.0, 1], [2.0, 50.0, 1]],
            "traffic_start_s": 0.0,
        },
    }
    empty = json.loads(json.dumps(report))
    empty["result"].update(series={}, server_samples=[])
    drawn = {}
    for name, rep, hists in (("full", report, {"v2a": hist}), ("empty", empty, {})):
        path = tmp_path / f"{name}.png"
        assert plot(rep, hists, path)
        drawn[name] = _coloured(path)
    half = drawn["full"].shape[1] // 2
    for side in (slice(None, half), slice(half, None)):
        full, bare = int(drawn["full"][:, side].sum()), int(drawn["empty"][:, side].sum())
        assert full > bare + 300, (full, bare)
    # What lands after the traffic window (a fraction of a second) is not drawn as a second.
    tail = json.loads(json.dumps(report))
    for values in tail["result"]["series"].values():
        values.append(22)
    for rep, name in ((report, "window"), (tail, "tail")):
        rep["result"]["duration_s"] = 3.0
        assert plot(rep, {"v2a": hist}, tmp_path / f"{name}.png")
    assert (_coloured(tmp_path / "window.png") == _coloured(tmp_path / "tail.png")).all()
    del tail["result"]["duration_s"]  # no window (ramp's steps): every second is drawn
    assert plot(tail, {"v2a": hist}, tmp_path / "all.png")
    assert (_coloured(tmp_path / "all.png") != _coloured(tmp_path / "tail.png")).any()


def test_cpu_per_message_is_the_mean_cpu_over_the_delivered_rate() -> None:
    # 97.7 % of a core for 21,321 messages a second: 45.8 us of CPU each.
    assert cpu_per_message({"cpu_mean_pct": 97.7}, 21_321.0) == 45.8
    assert cpu_per_message({"cpu_mean_pct": 150.0}, 50_000.0) == 30.0  # two cores' worth
    assert cpu_per_message({"samples": 0}, 21_321.0) is None  # no CPU samples
    assert cpu_per_message({"cpu_mean_pct": 97.7}, 0.0) is None  # nothing delivered


def test_loss_is_counted_per_conversation() -> None:
    # Conversation b lost one message and c got one it was never acked for: the totals match
    # (5 == 5), the per-conversation count does not.
    sender = _worker_report({"a": 2, "b": 2, "c": 1}, {})
    receiver = _worker_report({}, {"a": 2, "b": 1, "c": 2})
    merged, _h = merge_reports([sender, receiver])
    assert merged["lost_visitor_to_agent"] == 1
    assert merged["received_not_acked"] == 1
    ok, line = verdict({"accounting": {"lost": 1, "duplicated": 1}, "headline": "x"})
    assert not ok and line.startswith("LOSS: 1 lost, 1 duplicated")
    assert verdict({"accounting": {"lost": 0}, "headline": "x"}) == (
        True,
        "OK: 0 lost, 0 duplicated -- x",
    )


def test_track_sees_each_seq_once() -> None:
    t = Track(3)
    assert [t.see(s) for s in (4, 6, 6, 5, 4, 7)] == [True, True, False, True, False, True]
    assert t.contig == 7 and not t.ahead


@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 99.9])
def test_histogram_percentiles_within_one_percent(q: float) -> None:
    rng = random.Random(7)
    values_us = [int(rng.lognormvariate(7, 1.5)) + 1 for _ in range(50_000)]
    h = LatencyHistogram()
    for v in values_us:
        h.record_ns(v * 1000)
    exact = float(np.percentile(np.array(values_us), q, method="inverted_cdf")) / 1000
    got = h.percentile_ms(q)
    assert got is not None and abs(got - exact) <= 0.01 * exact + 0.001
    assert h.percentile_ms(100) == max(values_us) / 1000


def test_cluster_cross_placement_accounts_for_every_message(tmp_path: Path) -> None:
    # Two nodes on one spawned Redis; every visitor on the node that does not own its
    # conversation, every agent likewise: each message crosses nodes, none may be lost.
    proc, report = _run(
        tmp_path,
        *["chat", "--visitors", "20", "--rate", "100", "--duration", "2", "--reply-every", "2"],
        *["--nodes", "2", "--placement", "cross"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith("OK: 0 lost, 0 duplicated")
    assert "cluster: 2 nodes, placement cross" in proc.stdout
    res = report["result"]
    assert (res["nodes"], res["placement"]) == (2, "cross")
    assert res["agents"] == 2 and res["connected"] == 22 and res["connect_failed"] == 0
    assert res["create_status"] == {"assigned": 20}
    assert res["misplaced"] == 0  # each agent took the conversations of the other node
    assert res["connections_per_node"] == [11, 11]
    _check_accounting(res["accounting"], sent_at_least=100)
    assert [n["node"] for n in res["nodes_cpu_rss"]] == [0, 1]
    assert all(n["rss_max_bytes"] > 0 for n in res["nodes_cpu_rss"])
    memory = res["redis"]["used_memory_bytes"]
    assert 0 < memory["empty"] < memory["after_connect"]
    assert res["redis"]["rss_max_bytes"] > 0
    assert res["server_exit_code"] == [0, 0]


_METRICS_BEFORE = """\
# TYPE kefu_gc_pause_seconds histogram
kefu_gc_pause_seconds_bucket{generation="0",le="0.001"} 10
kefu_gc_pause_seconds_bucket{generation="0",le="0.005"} 10
kefu_gc_pause_seconds_bucket{generation="0",le="+Inf"} 10
kefu_gc_pause_seconds_sum{generation="0"} 0.002
kefu_gc_pause_seconds_count{generation="0"} 10
kefu_gc_pause_seconds_bucket{generation="2",le="0.001"} 0
kefu_gc_pause_seconds_bucket{generation="2",le="0.005"} 0
kefu_gc_pause_seconds_bucket{generation="2",le="+Inf"} 1
kefu_gc_pause_seconds_sum{generation="2"} 0.03
kefu_gc_pause_seconds_count{generation="2"} 1
# TYPE kefu_event_loop_lag_seconds histogram
kefu_event_loop_lag_seconds_bucket{le="0.001"} 5
kefu_event_loop_lag_seconds_bucket{le="0.005"} 5
kefu_event_loop_lag_seconds_bucket{le="+Inf"} 5
kefu_event_loop_lag_seconds_sum 0.001
kefu_event_loop_lag_seconds_count 5
kefu_other_seconds_count 7
"""


def _serve_metrics(bodies: list[str]) -> Any:
    """A /metrics endpoint answering ``bodies`` in turn, on a free loopback port."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.pop(0).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_server_histograms_are_scraped_and_differenced_with_label_sets_summed() -> None:
    from loadtest.server import histogram_delta, scrape_histograms

    after = (
        _METRICS_BEFORE.replace('generation="0",le="0.001"} 10', 'generation="0",le="0.001"} 30')
        .replace('generation="0",le="0.005"} 10', 'generation="0",le="0.005"} 30')
        .replace('generation="0",le="+Inf"} 10', 'generation="0",le="+Inf"} 30')
        .replace('_sum{generation="0"} 0.002', '_sum{generation="0"} 0.006')
        .replace('_count{generation="0"} 10', '_count{generation="0"} 30')
        .replace('le="+Inf"} 1\n', 'le="+Inf"} 2\n')
        .replace('_sum{generation="2"} 0.03', '_sum{generation="2"} 0.09')
        .replace('_count{generation="2"} 1', '_count{generation="2"} 2')
        .replace('lag_seconds_bucket{le="+Inf"} 5', 'lag_seconds_bucket{le="+Inf"} 9')
        .replace("lag_seconds_sum 0.001", "lag_seconds_sum 0.041")
        .replace("lag_seconds_count 5", "lag_seconds_count 9")
    )
    server = _serve_metrics([_METRICS_BEFORE, after])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        before_rows = scrape_histograms(url)
        after_rows = scrape_histograms(url)
    finally:
        server.shutdown()
    assert set(before_rows) == {"kefu_gc_pause_seconds", "kefu_event_loop_lag_seconds"}
    gc_before = before_rows["kefu_gc_pause_seconds"]
    assert gc_before["buckets"] == [(0.001, 10.0), (0.005, 10.0), (float("inf"), 11.0)]
    assert gc_before["count"] == 11 and gc_before["sum"] == pytest.approx(0.032)
    delta = histogram_delta(before_rows, after_rows)
    gc_delta = delta["kefu_gc_pause_seconds"]
    assert gc_delta["count"] == 21  # 20 young collections and one full one
    assert gc_delta["mean"] == pytest.approx((0.004 + 0.06) / 21)
    assert gc_delta["over_5ms"] == 1
    lag = delta["kefu_event_loop_lag_seconds"]
    assert lag["count"] == 4 and lag["over_5ms"] == 4 and lag["p50_le"] == float("inf")
    # A server that does not answer (a relay) gives nothing, not an error.
    assert scrape_histograms("http://127.0.0.1:9", timeout=2.0) == {}
