"""The node's per-message path, in process: CPU per WebSocket ``send`` from decoded frame to
durable ack and delivery, with no sockets and no load generator on the same cores.

    python -m bench.bench_node [--json] [--quick] [--profile FILE] [--pair FILE]

A node (bot off, ``durability: process``, a fresh data directory) with C conversations, each
assigned to one of C/100 agents; every visitor and agent is a connection object that records
what the node sends it (the part of :class:`kefu.web.ws.Connection` the node uses). Each round
offers one ``send`` per visitor through ``Node.on_send_nowait`` (the WebSocket's path when a
connection has nothing else in hand), then runs the loop until every one is acked. The table
gives the node's CPU per message (``time.process_time``: the group commit, the RocksDB write,
the ack and the delivery included) and the messages per second of that CPU.

``--pair FILE`` compares two versions of the path in one process: see :func:`paired`.

A second case puts the node's WebSocket front before it: every visitor and agent is a real
:class:`kefu.web.ws.Connection` on a transport that only counts what it is given, each send
comes in as the bytes of a ``send`` frame (``Connection.on_ws_frame``: the rate limit, the
decoding, the fast path), and the acks and deliveries leave as bytes (the write coalescing of
``WsServer.flush_writes``). That is the whole Python of a message between picows and the
kernel: the load tests' CPU per message less the sockets' and the event loop's share.

The load tests (``python -m loadtest``) measure the same path with real sockets; this one
leaves the kernel's and the clients' share out, so a change to the Python of the path shows
in its numbers within a few percent. ``--profile FILE`` writes a cProfile of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import json
import runpy
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import uvloop

from bench._harness import Row
from kefu.app import tune_gc
from kefu.config import AgentConfig, BotConfig, Config, RateConfig, WsConfig
from kefu.hub import frame_tag
from kefu.node import Node
from kefu.protocol import Hello, Send, encode_json
from kefu.web.ws import Connection, WSMsgType

_IDS = itertools.count(1)


class _Conn:
    """A connection as the node sees one: counts the frames it is sent."""

    msgpack = False

    def __init__(self, remote: str) -> None:
        self.id = next(_IDS)
        self.remote = remote
        self.role: str | None = None
        self.principal: str | None = None
        self.received_ns = 0
        self.closing = False
        self.queued_bytes = 0
        self.frames: dict[str, int] = {}
        self.busy = False

    def send(self, frame: Any) -> bool:
        return self.send_encoded(encode_json(frame), frame_tag(frame))

    def send_encoded(self, data: bytes, kind: str) -> bool:
        self.frames[kind] = self.frames.get(kind, 0) + 1
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closing = True

    def frame_done(self) -> None:
        self.busy = False


_ACK: Final = b'"type":"ack"'
_MSG: Final = b'"type":"msg"'


class _Tally:
    """What every connection of a run was written."""

    def __init__(self) -> None:
        self.acks = 0
        self.msgs = 0
        self.writes = 0


class _Wire:
    """The part of picows' ``WSTransport`` (and of its underlying transport) a ``Connection``
    uses: counts the acks and messages written, one frame or a coalesced batch at a time."""

    def __init__(self, tally: _Tally) -> None:
        self.underlying_transport = self
        self.tally = tally
        self.conn: Connection | None = None
        self.close_handshake = None
        self.acks = 0
        self.msgs = 0

    def send(self, opcode: object, data: bytes) -> None:
        self.write(data)

    def write(self, data: bytes) -> None:
        acks, msgs = data.count(_ACK), data.count(_MSG)
        self.acks += acks
        self.msgs += msgs
        tally = self.tally
        tally.writes += 1
        tally.acks += acks
        tally.msgs += msgs

    def send_pong(self, data: bytes) -> None:
        pass

    def send_ping(self, data: bytes = b"") -> None:
        pass

    def send_close(self, code: object, reason: bytes) -> None:
        self.disconnect()  # the client goes at once

    def disconnect(self, graceful: bool = True) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            asyncio.get_running_loop().call_soon(conn.on_ws_disconnected, self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40_000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class _TextFrame:
    """A whole text frame as picows hands one to ``on_ws_frame``."""

    __slots__ = ("payload",)
    msg_type = WSMsgType.TEXT
    fin = True
    rsv1 = rsv2 = rsv3 = False

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def get_payload_as_bytes(self) -> bytes:
        return self.payload


async def _welcomed(node: Node, token: str, tally: _Tally) -> tuple[Connection, _Wire]:
    """A connection of the node's WebSocket front, through its hello."""
    assert node.ws is not None
    wire = _Wire(tally)
    conn = wire.conn = Connection(node.ws, next(_IDS), False)
    conn.on_ws_connected(wire)  # type: ignore[arg-type]
    conn.on_ws_frame(wire, _TextFrame(encode_json(Hello(token=token))))  # type: ignore[arg-type]
    for _ in range(10_000):
        if conn.role is not None:
            break
        await asyncio.sleep(0)
    else:
        raise RuntimeError("no welcome")
    await asyncio.sleep(0.01)  # on_ready's work (routing, resume) done
    return conn, wire


def _config(data: Path, agents: int) -> Config:
    return Config(
        data_dir=str(data),
        # As the load tests' node (loadtest/server.py): no per-connection rate limit to speak
        # of; and no heartbeat, which these clients would not answer.
        ws=WsConfig(
            host="127.0.0.1",
            port=0,
            rate=RateConfig(per_second=100_000.0, burst=100_000),
            ping_interval_s=3600.0,
        ),
        agents=[
            AgentConfig(id=f"a{i}", name=f"A{i}", token=f"agent-token-{i:04d}", max_chats=100)
            for i in range(agents)
        ],
        bot=BotConfig(enabled=False),
        durability="process",
    )


async def _measure_ws(
    conversations: int,
    rounds: int,
    profile: str | None,
    before_round: Callable[[int], object] | None = None,
) -> tuple[float, float, int, float, list[float]]:
    """CPU, wall time, sends and writes a send of the front case, and each round's CPU;
    ``before_round(r)`` runs before round ``r`` (``--pair``: install a variant)."""
    data = Path(tempfile.mkdtemp(prefix="kefu-bench-node-"))
    agents = max(1, -(-conversations // 100))
    node = Node(_config(data, agents))
    await node.start()
    tally = _Tally()
    try:
        agent_wires: list[_Wire] = []
        for i in range(agents):
            _, wire = await _welcomed(node, f"agent-token-{i:04d}", tally)
            agent_wires.append(wire)
            node.pool.set_status(f"a{i}", "online")
        visitors: list[tuple[Connection, _Wire, str]] = []
        for _ in range(conversations):
            conv, _visitor, token, _status, _created = await node.create_chat(name="v")
            conn, wire = await _welcomed(node, token, tally)
            visitors.append((conn, wire, conv))
        # Every frame's bytes made before the clock starts, as a client would have sent them.
        seq = itertools.count()
        frames = [
            [
                (
                    conn,
                    wire,
                    _TextFrame(
                        encode_json(
                            Send(
                                conv=conv,
                                client_msg_id=f"m{next(seq)}",
                                text="hello, is anyone there?",
                            )
                        )
                    ),
                )
                for conn, wire, conv in visitors
            ]
            for _ in range(rounds)
        ]
        acked = tally.acks
        writes = tally.writes
        tune_gc()  # as `kefu serve` does once started
        profiler = cProfile.Profile() if profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        per_round: list[float] = []
        for r, batch in enumerate(frames):
            if before_round is not None:
                before_round(r)
            round0 = time.process_time()
            for conn, wire, frame in batch:
                conn.on_ws_frame(wire, frame)  # type: ignore[arg-type]
            acked += len(batch)
            for _ in range(100_000):
                if tally.acks >= acked:
                    break
                await asyncio.sleep(0)
            per_round.append(time.process_time() - round0)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        sends = conversations * rounds
        acks = sum(w.acks for _, w, _ in visitors)
        delivered = sum(w.msgs for w in agent_wires)
        if acks != sends or delivered != sends:
            raise RuntimeError(f"{acks} acks, {delivered} deliveries, {sends} sends")
        return cpu, wall, sends, (tally.writes - writes) / sends, per_round
    finally:
        await node.stop()
        shutil.rmtree(data, ignore_errors=True)


async def _measure(
    conversations: int, rounds: int, profile: str | None
) -> tuple[float, float, int]:
    data = Path(tempfile.mkdtemp(prefix="kefu-bench-node-"))
    agents = max(1, -(-conversations // 100))
    config = _config(data, agents)
    node = Node(config)
    await node.start()
    try:
        agent_conns: list[_Conn] = []
        for i in range(agents):
            conn = _Conn("127.0.0.1")
            agent_conns.append(conn)
            token = f"agent-token-{i:04d}"
            await node.authenticate(conn, Hello(token=token))  # type: ignore[arg-type]
            conn.role, conn.principal = "agent", f"a{i}"
            await node.on_ready(conn, Hello(token=token))  # type: ignore[arg-type]
            node.pool.set_status(f"a{i}", "online")
        visitors: list[tuple[_Conn, str]] = []
        for _ in range(conversations):
            conv, visitor, token, _status, _created = await node.create_chat(name="v")
            conn = _Conn("127.0.0.1")
            await node.authenticate(conn, Hello(token=token))  # type: ignore[arg-type]
            conn.role, conn.principal = "visitor", visitor
            await node.on_ready(conn, Hello(token=token))  # type: ignore[arg-type]
            visitors.append((conn, conv))
        seq = itertools.count()
        tune_gc()  # as `kefu serve` does once started
        profiler = cProfile.Profile() if profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        for _ in range(rounds):
            for conn, conv in visitors:
                conn.busy = True
                conn.received_ns = time.perf_counter_ns()
                frame = Send(
                    conv=conv, client_msg_id=f"m{next(seq)}", text="hello, is anyone there?"
                )
                if not node.on_send_nowait(conn, frame):  # type: ignore[arg-type]
                    raise RuntimeError("the fast path refused a plain send")
            while any(conn.busy for conn, _ in visitors):
                await asyncio.sleep(0)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        acks = sum(conn.frames.get("ack", 0) for conn, _ in visitors)
        delivered = sum(conn.frames.get("msg", 0) for conn in agent_conns)
        if acks != conversations * rounds or delivered != acks:
            raise RuntimeError(
                f"{acks} acks, {delivered} deliveries, {conversations * rounds} sends"
            )
        return cpu, wall, acks
    finally:
        await node.stop()
        shutil.rmtree(data, ignore_errors=True)


def _rows(case: str, cpu: float, wall: float, messages: int, **extra: Any) -> list[Row]:
    """The two rows of a case: CPU per message, and messages per CPU second."""
    return [
        Row(case, "CPU per message", cpu / messages * 1e6, "µs", higher_is_better=False),
        Row(
            case,
            "messages per CPU second",
            messages / cpu,
            "msgs/s",
            extra={"wall_msgs_per_s": round(messages / wall), "messages": messages, **extra},
        ),
    ]


def run(quick: bool, profile: str | None = None, front: bool = True) -> list[Row]:
    """The node's path, then (``front``) the same behind its WebSocket front."""
    conversations, rounds = (1_000, 5) if quick else (2_000, 20)
    cpu, wall, messages = uvloop.run(_measure(conversations, rounds, profile))
    rows = _rows(
        f"node per-message path, {conversations:,} conversations (in process)",
        cpu,
        wall,
        messages,
    )
    if front:
        cpu, wall, messages, writes, _ = uvloop.run(
            _measure_ws(conversations, rounds, profile and f"{profile}.ws")
        )
        rows += _rows(
            f"node behind its WebSocket front, {conversations:,} conversations (in process)",
            cpu,
            wall,
            messages,
            writes_per_message=round(writes, 2),
        )
    return rows


def paired(path: str, conversations: int = 2_000, rounds: int = 40) -> dict[str, float]:
    """Two versions of the path alternated round by round in one process (``--pair FILE``).

    ``FILE`` defines ``VARIANTS``, two callables by name, each installing its version (say,
    ``lambda: setattr(kefu.node._Landing, "deliver", old_deliver)``). Separate processes on a
    virtual machine differ by more than a small change does; rounds alternated in one process
    share its drift, and the median of each pair's ratio (second over first) shows a few
    percent. Both versions must leave the node's state as the other expects: one that skips
    the recent-message rings every other round leaves a gap in each ring's seqs, and the other
    then pays a ring restart a message (a cost neither version has alone). Returns each
    variant's median CPU per message (µs) and that ratio."""
    variants = runpy.run_path(path)["VARIANTS"]
    names = list(variants)
    if len(names) != 2:
        raise ValueError(f"{path}: VARIANTS must name two versions, not {names}")
    rounds += rounds % 2  # whole pairs
    _, _, _, _, per_round = uvloop.run(
        _measure_ws(conversations, rounds, None, lambda r: variants[names[r % 2]]())
    )
    us = [cpu / conversations * 1e6 for cpu in per_round]
    first, second = us[0::2], us[1::2]
    return {
        names[0]: statistics.median(first),
        names[1]: statistics.median(second),
        "paired_median_ratio": statistics.median(b / a for a, b in zip(first, second, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_node", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--quick", action="store_true", help="a shorter run (smoke run)")
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the rounds (FILE.ws: the front's)"
    )
    parser.add_argument(
        "--pair",
        metavar="FILE",
        help="alternate the two versions FILE's VARIANTS install, round by round (paired)",
    )
    args = parser.parse_args(argv)
    if args.pair:
        got = paired(args.pair, *((200, 10) if args.quick else ()))
        print("  ".join(f"{k} {v:.3f}" for k, v in got.items()))
        return 0
    rows = run(quick=args.quick, profile=args.profile)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    for r in rows:
        extra = "  ".join(f"{k}={v}" for k, v in r.extra.items())
        print(f"{r.case}: {r.impl} {r.value:,.1f} {r.unit}  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
