"""The server under load: a spawned ``kefu serve`` or bare relay, and its CPU and RSS over a run.

- :class:`SpawnedServer` starts ``python -m kefu serve`` (this checkout's kefu) with a fresh
  data directory in a temporary folder, ports chosen by the OS, and a config sized for the run:
  ``ws.max_connections`` above the connections asked for, a token bucket that does not limit,
  enough agents (at most 100 conversations each, the protocol's ``max_chats`` limit), the bot
  on only for the ``bot`` scenario (with a generated knowledge base). It reads the ports from
  the ``kefu: ... listening`` lines and is stopped with SIGTERM (killed if it outlives
  :data:`STOP_TIMEOUT_S`); the folder is removed.
- :class:`SpawnedServer` with ``relay=True`` starts ``python -m loadtest.relay`` instead.
- :class:`SpawnedRedis` starts a ``redis-server`` for a cluster of spawned nodes (``--nodes``):
  a free loopback port, its own temporary folder, no persistence, ``--maxclients`` above what
  the nodes open; each node then gets ``cluster.redis_url`` in its config (every node the same
  generated config, each its own data directory). :func:`redis_info` reads ``INFO`` over a
  plain socket (used memory before and after the clients connect).
- :class:`ProcessSampler` reads ``/proc/PID/stat`` and ``/proc/PID/status`` every
  :data:`SAMPLE_INTERVAL_S` on a thread: CPU (% of one core) and RSS. At most
  :data:`MAX_SAMPLES` samples are kept; past that every other one is dropped and the interval
  doubles, so a long run keeps its whole span at a coarser grain.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
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
#: The end of a server's stderr kept in the report (warnings and errors: log_level warning).
LOG_TAIL_CHARS = 3000
SAMPLE_INTERVAL_S = 0.5
MAX_SAMPLES = 4096
#: The protocol's ``max_chats`` limit (``kefu.protocol.MAX_CHATS_LIMIT``).
MAX_CHATS = 100
#: redis-server's ``--maxclients`` for a spawned cluster (it raises its own open-files limit).
REDIS_MAXCLIENTS = 10_000

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
        cluster_url: str | None = None,
        agent_chats: list[int] | None = None,
        profile: str | None = None,
        cpus: set[int] | None = None,
        busy_poll_us: int = 0,
    ) -> None:
        """``agent_chats``: each agent's ``max_chats`` (default: the conversations spread
        evenly, at most :data:`MAX_CHATS`); ``cluster_url``: join the cluster of that Redis;
        ``profile``: the node writes a cProfile of its run there when it stops; ``cpus``: the
        process (every thread it starts) runs on those CPUs only; ``busy_poll_us``: the
        server's ``ws.busy_poll_us`` (the relay's ``--busy-poll-us``)."""
        self.dir = Path(tempfile.mkdtemp(prefix="kefu-loadtest-"))
        self.cluster_url = cluster_url
        self.agent_chats = agent_chats
        self.relay = relay
        self.busy_poll_us = busy_poll_us
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # run this checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for name in ("KEFU_DATA_DIR", "KEFU_REDIS_URL", "KEFU_API_KEY", "KEFU_ADMIN_TOKEN"):
            env.pop(name, None)
        if relay:
            cmd = [sys.executable, "-m", "loadtest.relay", "--port", "0"]
            cmd += ["--busy-poll-us", str(busy_poll_us)]
        else:
            cmd = self._kefu_command(connections, agent_tokens, conversations, bot)
            if profile:
                cmd += ["--profile", str(Path(profile).resolve())]
        self.command = cmd
        self._stderr = open(self.dir / "stderr.log", "wb")  # noqa: SIM115 (closed in stop)
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=pin,
        )
        self.pid = self.proc.pid
        self._terminated = False
        self.log_tail = ""
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
        chats = self.agent_chats or [per_agent] * len(tokens)
        cfg: dict[str, Any] = {
            "agents": [
                {"id": f"agent{i}", "name": f"Agent {i}", "token": t, "max_chats": chats[i]}
                for i, t in enumerate(tokens)
            ],
            "bot": {"enabled": bot},
            "ws": {
                "rate": {"per_second": 100_000.0, "burst": 100_000},
                "max_connections": max(10_000, connections + 1_000),
                "busy_poll_us": self.busy_poll_us,
            },
            # Conversations nobody takes (idle, bot handoffs) wait in the queue.
            "routing": {"max_queue": max(10_000, conversations + 1_000)},
            "log_level": "warning",
        }
        if self.cluster_url:
            cfg["cluster"] = {"redis_url": self.cluster_url}
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

    def terminate(self) -> None:
        """SIGTERM without waiting (the nodes of a cluster are stopped together, so that none
        outlives the others long enough to take them for dead)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True  # a second SIGTERM makes kefu skip its orderly stop
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM (unless :meth:`terminate` sent it), wait; the exit code (None when it had
        to be killed)."""
        code: int | None = None
        if self.proc.poll() is None:
            self.terminate()
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._stderr.close()
        self.log_tail = self.stderr()[-LOG_TAIL_CHARS:]
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpawnedRedis:
    """A ``redis-server`` on a free loopback port for a cluster of spawned nodes.

    Started without a config file, persistence or a password, in its own temporary folder
    (removed at :meth:`stop`); ``--maxclients`` well above what the nodes open (each node keeps
    a few connections: commands, its subscription, blocking reads). Stopped with SIGKILL at the
    end: nothing of it is worth keeping.
    """

    def __init__(self, maxclients: int = REDIS_MAXCLIENTS) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kefu-loadtest-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--protected-mode", "no",
                "--maxclients", str(maxclients),
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if redis_info(self.port, "server"):
                    return
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"redis-server did not answer on port {self.port}")

    def used_memory(self) -> int:
        """``INFO memory`` used_memory in bytes (0 when Redis does not answer)."""
        try:
            return int(redis_info(self.port, "memory").get("used_memory", 0))
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_info(port: int, section: str, timeout: float = 5.0) -> dict[str, str]:
    """``INFO section`` of the Redis on ``127.0.0.1:port`` as a dict (a RESP bulk string)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return {}
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        if not head.startswith(b"$"):
            return {}
        size = int(head[1:])
        while len(rest) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    out: dict[str, str] = {}
    for line in rest[:size].decode("utf-8", "replace").splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            out[k] = v
    return out


#: The server's own histograms a chat run reports (``/metrics``): where a message's time goes.
INTERNAL_HISTOGRAMS = (
    "kefu_message_received_to_persisted_seconds",
    "kefu_message_received_to_delivered_seconds",
    "kefu_store_batch_write_seconds",
    "kefu_store_batch_messages",
    # What keeps the loop from reading: how late it ran a due timer, and collections (the
    # generations summed).
    "kefu_event_loop_lag_seconds",
    "kefu_gc_pause_seconds",
)
_BUCKET_LINE = re.compile(r'^(\w+)_bucket\{(?:[^}]*,)?le="([^"]+)"[^}]*\} (\S+)$')
_SUM_LINE = re.compile(r"^(\w+)_(sum|count)(?:\{[^}]*\})? (\S+)$")


def scrape_histograms(
    http_url: str, names: tuple[str, ...] = INTERNAL_HISTOGRAMS, timeout: float = 10.0
) -> dict[str, dict[str, Any]]:
    """The named histograms of a kefu's ``/metrics`` as ``{name: {"buckets": [(le, cumulative
    count)], "sum": s, "count": n}}``, the series of a labelled one summed; empty when the
    server does not answer (a relay)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{http_url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return {}
    wanted = set(names)
    out: dict[str, dict[str, Any]] = {}
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        m = _BUCKET_LINE.match(line)
        if m and m.group(1) in wanted:
            out.setdefault(m.group(1), {"buckets": [], "sum": 0.0, "count": 0})
            by_le = buckets.setdefault(m.group(1), {})
            le = float(m.group(2))
            by_le[le] = by_le.get(le, 0.0) + float(m.group(3))
            continue
        m = _SUM_LINE.match(line)
        if m and m.group(1) in wanted:
            row = out.setdefault(m.group(1), {"buckets": [], "sum": 0.0, "count": 0})
            row[m.group(2)] += float(m.group(3))
    for name, by_le in buckets.items():
        out[name]["buckets"] = sorted(by_le.items())
    return out


def histogram_delta(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """What each histogram counted between two scrapes: count, mean, the bucket bound under
    which 50/99/99.9 % fell, and the share above 1 and 5 ms (seconds histograms)."""
    out: dict[str, dict[str, Any]] = {}
    for name, a in after.items():
        b = before.get(name, {"buckets": [], "sum": 0.0, "count": 0})
        was = dict(b["buckets"])
        buckets = [(le, c - was.get(le, 0.0)) for le, c in a["buckets"]]
        count = a["count"] - b["count"]
        if count <= 0:
            continue
        row: dict[str, Any] = {"count": int(count), "mean": (a["sum"] - b["sum"]) / count}
        for q in (0.5, 0.99, 0.999):
            row[f"p{q * 100:g}_le"] = next((le for le, c in buckets if c >= q * count), None)
        if name.endswith("_seconds"):
            for ms in (1, 5):
                under = max((c for le, c in buckets if le <= ms / 1000), default=0.0)
                row[f"over_{ms}ms"] = int(count - under)
        out[name] = row
    return out


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
