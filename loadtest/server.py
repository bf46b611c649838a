"""The server under load: a spawned ``kefu serve`` or bare relay, and its CPU and RSS over a run.

- :class:`SpawnedServer` starts ``python -m kefu serve`` (this checkout's kefu) with a fresh
  data directory in a temporary folder, ports chosen by the OS, and a config sized for the run:
  ``ws.max_connections`` above the connections asked for, a token bucket that does not limit,
  enough agents (at most 100 conversations each, the protocol's ``max_chats`` limit), the bot
  on only for the ``bot`` scenario (with a generated knowledge base). It reads the ports from
  the ``kefu: ... listening`` lines and is stopped with SIGTERM (killed if it outlives
  :data:`STOP_TIMEOUT_S`); the folder is removed.
- :class:`SpawnedServer` with ``relay=True`` starts ``python -m loadtest.relay`` instead.
- :class:`ProcessSampler` reads ``/proc/PID/stat`` and ``/proc/PID/status`` every
  :data:`SAMPLE_INTERVAL_S` on a thread: CPU (% of one core) and RSS. At most
  :data:`MAX_SAMPLES` samples are kept; past that every other one is dropped and the interval
  doubles, so a long run keeps its whole span at a coarser grain.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 0.5
MAX_SAMPLES = 4096
#: The protocol's ``max_chats`` limit (``kefu.protocol.MAX_CHATS_LIMIT``).
MAX_CHATS = 100

_HTTP_LINE = re.compile(r"^(?:kefu|relay): http listening on (http://\S+)\s*$")
_WS_LINE = re.compile(r"^(?:kefu|relay): ws listening on (ws://\S+)\s*$")
_READY = ("kefu: ready", "relay: ready")


def agents_needed(conversations: int) -> int:
    """Fewest agents that hold ``conversations`` at :data:`MAX_CHATS` each."""
    return max(1, math.ceil(conversations / MAX_CHATS))


def kb_questions(count: int = 40) -> list[tuple[str, str]]:
    """(question, answer) pairs of the generated knowledge base, and what visitors ask."""
    return [
        (f"How long does delivery take to region {i} for parcel class {i % 7}?", f"Answer {i}.")
        for i in range(count)
    ]


class SpawnedServer:
    """A server process of this checkout, on loopback, ports chosen by the OS."""

    def __init__(
        self,
        *,
        connections: int,
        agent_tokens: list[str],
        conversations: int,
        bot: bool = False,
        relay: bool = False,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kefu-loadtest-"))
        self.relay = relay
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # run this checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for name in ("KEFU_DATA_DIR", "KEFU_REDIS_URL", "KEFU_API_KEY", "KEFU_ADMIN_TOKEN"):
            env.pop(name, None)
        if relay:
            cmd = [sys.executable, "-m", "loadtest.relay", "--port", "0"]
        else:
            cmd = self._kefu_command(connections, agent_tokens, conversations, bot)
        self.command = cmd
        self._stderr = open(self.dir / "stderr.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, env=env
        )
        self.pid = self.proc.pid
        self.http_url = ""
        self.ws_url = ""
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or not self.ws_url:
            self.stop()
            raise SystemExit(f"server did not start:\n{self.stderr()}")

    def _kefu_command(
        self, connections: int, tokens: list[str], conversations: int, bot: bool
    ) -> list[str]:
        per_agent = min(MAX_CHATS, max(1, math.ceil(conversations / max(1, len(tokens)))))
        cfg: dict[str, Any] = {
            "agents": [
                {"id": f"agent{i}", "name": f"Agent {i}", "token": t, "max_chats": per_agent}
                for i, t in enumerate(tokens)
            ],
            "bot": {"enabled": bot},
            "ws": {
                "rate": {"per_second": 100_000.0, "burst": 100_000},
                "max_connections": max(10_000, connections + 1_000),
            },
            # Conversations nobody takes (idle, bot handoffs) wait in the queue.
            "routing": {"max_queue": max(10_000, conversations + 1_000)},
            "log_level": "warning",
        }
        if bot:
            kb = {
                "entries": [
                    {"id": f"e{i}", "questions": [q], "answer": a}
                    for i, (q, a) in enumerate(kb_questions())
                ]
            }
            (self.dir / "kb.yaml").write_text(yaml.safe_dump(kb), encoding="utf-8")
            cfg["bot"]["kb"] = [str(self.dir / "kb.yaml")]
            cfg["bot"]["max_concurrency"] = 100_000
        config_path = self.dir / "kefu.yaml"
        config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        cmd = [sys.executable, "-m", "kefu", "serve", "--config", str(config_path)]
        return [*cmd, "--data-dir", str(self.dir / "data"), "--http-port", "0", "--ws-port", "0"]

    def _drain(self, ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # read to the end: a full pipe would block the server
            line = raw.decode("utf-8", "replace")
            if m := _HTTP_LINE.match(line):
                self.http_url = m[1]
            elif m := _WS_LINE.match(line):
                self.ws_url = m[1]
            elif line.strip() in _READY:
                ready.set()
        ready.set()

    def stderr(self) -> str:
        return (self.dir / "stderr.log").read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> int | None:
        """SIGTERM, wait; the exit code (None when it had to be killed)."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


def _clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def read_proc(pid: int) -> tuple[float, int] | None:
    """(CPU seconds so far, RSS bytes) of ``pid``, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _clock_ticks()  # utime + stime
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return cpu, rss


class ProcessSampler:
    """CPU and RSS of one process over time, sampled on a daemon thread."""

    def __init__(self, pid: int, t0_ns: int) -> None:
        self.pid = pid
        self.t0_ns = t0_ns
        self.samples: list[tuple[float, float, int]] = []  # (s since t0, cpu %, rss bytes)
        self._interval = SAMPLE_INTERVAL_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = read_proc(self.pid)
        last_t = time.monotonic_ns()
        while not self._stop.wait(self._interval) and last is not None:
            now = read_proc(self.pid)
            t = time.monotonic_ns()
            if now is None:
                return
            cpu_pct = 100.0 * (now[0] - last[0]) / max(1e-9, (t - last_t) / 1e9)
            self.samples.append(((t - self.t0_ns) / 1e9, round(cpu_pct, 1), now[1]))
            last, last_t = now, t
            if len(self.samples) >= MAX_SAMPLES:
                del self.samples[::2]
                self._interval *= 2

    def rss_now(self) -> int:
        got = read_proc(self.pid)
        return got[1] if got else 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self, since_s: float = 0.0) -> dict[str, Any]:
        """Peak and mean CPU, peak RSS, over the samples after ``since_s``."""
        rows = [s for s in self.samples if s[0] >= since_s] or self.samples
        if not rows:
            return {"samples": 0}
        cpus = [r[1] for r in rows]
        return {
            "samples": len(rows),
            "cpu_mean_pct": round(sum(cpus) / len(cpus), 1),
            "cpu_max_pct": max(cpus),
            "rss_max_bytes": max(r[2] for r in rows),
            "rss_last_bytes": rows[-1][2],
        }
