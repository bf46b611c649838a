"""The coordinator: starts the worker processes, drives the scenario, adds up what they saw.

Connections are spread over ``--procs`` worker processes (more when needed: each keeps under
:data:`CONNS_PER_PROC` so that its open files stay under the hard limit, 20,000 on the machines
this was written for). Each worker connects from its own source address ``127.0.0.<2 + i>``
when the server is on 127.x: ephemeral ports are per source address, and one address runs out
past about 28,000 connections to one server port.

Every wait has a deadline; at the end every worker is told to close, joined, and terminated
if it lingers; a spawned server gets SIGTERM.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import sys
import time
from collections import defaultdict
from multiprocessing.connection import Connection, wait
from typing import Any
from urllib.parse import urlparse

from loadtest.clients import MAX_SERIES, worker_main
from loadtest.hist import LatencyHistogram
from loadtest.server import ProcessSampler

#: Connections one worker holds at most (its open files, with room for pipes and libraries).
CONNS_PER_PROC = 9_000
PROGRESS_INTERVAL_S = 1.0
DRAIN_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 10.0


def procs_needed(connections: int, asked: int) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per = min(CONNS_PER_PROC, max(100, hard - 500))
    return max(1, asked, math.ceil(connections / per))


def source_addresses(ws_url: str, count: int) -> list[str | None]:
    host = urlparse(ws_url).hostname or ""
    if not host.startswith("127."):
        return [None] * count
    return [f"127.0.0.{2 + i % 250}" for i in range(count)]


class Fleet:
    """The worker processes and their pipes; progress snapshots and the progress line."""

    def __init__(
        self, specs: list[dict[str, Any]], label: str, samplers: list[ProcessSampler]
    ) -> None:
        """``samplers``: the server processes (one per node) whose CPU and RSS the progress
        line adds up."""
        ctx = mp.get_context("spawn")
        self.label = label
        self.samplers = samplers
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        self.snaps: dict[int, dict[str, Any]] = {}
        self.stash: dict[tuple[int, str], tuple[Any, ...]] = {}  # replies that came early
        self._last_line = 0.0
        self._last_snap: tuple[float, int] | None = None
        self.t0 = time.monotonic()
        self._index: dict[int, int] = {}  # id(pipe) -> worker
        for spec in specs:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(spec, theirs), daemon=True)
            p.start()
            theirs.close()
            self._index[id(mine)] = len(self.pipes)
            self.pipes.append(mine)
            self.procs.append(p)

    def __len__(self) -> int:
        return len(self.pipes)

    def send(self, cmds: list[tuple[Any, ...]]) -> None:
        """Sends cmds[i] to worker i; the replies are collected later."""
        for pipe, cmd in zip(self.pipes, cmds, strict=True):
            pipe.send(cmd)

    def ask(self, cmds: list[tuple[Any, ...]], kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """Sends cmds[i] to worker i; waits for each one's reply of ``kind``."""
        self.send(cmds)
        return self.collect(kind, timeout)

    def ask_all(self, cmd: tuple[Any, ...], kind: str, timeout: float) -> list[tuple[Any, ...]]:
        return self.ask([cmd] * len(self.pipes), kind, timeout)

    def collect(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        replies: dict[int, tuple[Any, ...]] = {}
        for i in range(len(self.pipes)):
            if (i, kind) in self.stash:
                replies[i] = self.stash.pop((i, kind))
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"\n{self.label}: timed out waiting for '{kind}' from workers")
            waiting = [p for i, p in enumerate(self.pipes) if i not in replies]
            for pipe in wait(waiting, timeout=min(left, PROGRESS_INTERVAL_S)):
                i = self._index[id(pipe)]
                try:
                    msg = self.pipes[i].recv()
                except EOFError:
                    raise SystemExit(f"\n{self.label}: worker {i} died") from None
                if msg[0] == "progress":
                    self.snaps[msg[1]] = msg[2]
                elif msg[0] == kind:
                    replies[i] = msg[1:]
                else:  # the reply to a command still running (``run`` during a storm)
                    self.stash[(i, msg[0])] = msg[1:]
            self.progress()
        return [replies[i] for i in range(len(self.pipes))]

    def pump(self, seconds: float) -> None:
        """Keeps the progress line going for ``seconds`` (replies that come are stashed)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for pipe in wait(self.pipes, timeout=min(left, PROGRESS_INTERVAL_S)):
                i = self._index[id(pipe)]
                try:
                    msg = self.pipes[i].recv()
                except EOFError:
                    raise SystemExit(f"\n{self.label}: worker {i} died") from None
                if msg[0] == "progress":
                    self.snaps[msg[1]] = msg[2]
                else:
                    self.stash[(i, msg[0])] = msg[1:]
            self.progress()

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.snaps.values())

    def counts(self) -> dict[str, int]:
        for i, (snap,) in enumerate(self.ask_all(("counts",), "counts", 30)):
            self.snaps[i] = snap
        keys = self.snaps[0].keys() if self.snaps else ()
        return {k: self.total(k) for k in keys}

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_line < PROGRESS_INTERVAL_S:
            return
        self._last_line = now
        delivered = self.total("recv_visitor") + self.total("recv_bot")
        rate = 0.0
        if self._last_snap is not None and now > self._last_snap[0]:
            rate = (delivered - self._last_snap[1]) / (now - self._last_snap[0])
        self._last_snap = (now, delivered)
        server = ""
        last = [s.samples[-1] for s in self.samplers if s.samples]
        if last:
            cpu, rss = sum(x[1] for x in last), sum(x[2] for x in last)
            server = f" | server cpu {cpu:.0f}% rss {rss / 2**20:,.0f} MiB"
        line = (
            f"[{self.label} {now - self.t0:6.1f}s] conns {self.total('connected'):,}"
            f" sent {self.total('sent'):,} acked {self.total('acked'):,}"
            f" delivered {delivered:,} ({rate:,.0f}/s) pending {self.total('pending'):,}"
            f" errors {self.total('errors'):,}{server}"
        )
        end = "\r" if sys.stderr.isatty() else "\n"
        print(line.ljust(140)[:160], end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
            except OSError:
                continue
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
        if sys.stderr.isatty():
            print(file=sys.stderr)


def merge_reports(
    reports: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, LatencyHistogram]]:
    """Adds up the workers' reports; per-conversation accounting of loss and duplicates."""
    hists: dict[str, LatencyHistogram] = {}
    for r in reports:
        for name, wire in r["hist"].items():
            h = LatencyHistogram.from_wire(wire)
            hists.setdefault(name, LatencyHistogram()).merge(h)
    total: dict[str, Any] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    closes: dict[str, int] = defaultdict(int)
    acked_conv: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    recv_conv: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    up_per_node: list[int] = []  # connections up at the report, by the node they are on
    for r in reports:
        for k in (
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
        ):
            total[k] += r[k]
        total["retried_1013"] += r.get("retried_1013", 0)
        for i, k in enumerate(r.get("up_per_node", ())):
            while len(up_per_node) <= i:
                up_per_node.append(0)
            up_per_node[i] += k
        total["behind_max_ms"] = max(total["behind_max_ms"], r["behind_max_ms"])
        total["gc_pauses"] += r.get("gc_pauses", 0)
        total["gc_pause_total_ms"] += r.get("gc_pause_total_ms", 0.0)
        total["gc_pause_max_ms"] = max(total["gc_pause_max_ms"], r.get("gc_pause_max_ms", 0.0))
        for section in ("sent", "acked", "recv"):
            for role, n in r[section].items():
                total[f"{section}_{role}"] += n
        for k, n in r["errors"].items():
            errors[k] += n
        for k, n in r["closes"].items():
            closes[str(k)] += n
        for role, convs in r["acked_conv"].items():
            for c, n in convs.items():
                acked_conv[role][c] += n
        for role, convs in r["recv_conv"].items():
            for c, n in convs.items():
                recv_conv[role][c] += n
    lost = {"visitor": 0, "agent": 0}
    extra = 0
    for role in ("visitor", "agent"):
        got = recv_conv.get(role, {})  # keyed by the sender's role
        for c, n in acked_conv.get(role, {}).items():
            missing = n - got.get(c, 0)
            if missing > 0:
                lost[role] += missing
            elif missing < 0:
                extra -= missing
    series = {
        "sent/s": _trim([sum(r["sent_series"][i] for r in reports) for i in range(MAX_SERIES)]),
        "delivered/s": _trim(
            [sum(r["delivered_series"][i] for r in reports) for i in range(MAX_SERIES)]
        ),
    }
    merged = dict(total)
    merged["errors"] = dict(errors)
    merged["up_per_node"] = up_per_node
    merged["closes"] = dict(closes)
    merged["lost_visitor_to_agent"] = lost["visitor"]
    merged["lost_agent_to_visitor"] = lost["agent"]
    merged["received_not_acked"] = extra
    merged["series"] = series
    merged["acked_conv"] = acked_conv
    merged["recv_conv"] = recv_conv
    return merged, hists


def bot_lost(merged: dict[str, Any]) -> int:
    """Questions acknowledged but never answered by the bot, per conversation."""
    got = merged["recv_conv"].get("bot", {})
    return sum(
        max(0, n - got.get(c, 0)) for c, n in merged["acked_conv"].get("visitor", {}).items()
    )


def _trim(values: list[int]) -> list[int]:
    last = max((i for i, v in enumerate(values) if v), default=-1)
    return values[: last + 1]
