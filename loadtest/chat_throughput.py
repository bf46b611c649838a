"""Chat throughput end to end: visitors -> server -> agents, over real sockets.

    python -m loadtest.chat_throughput                      # spawns its own server
    python -m loadtest.chat_throughput --conversations 1000 --messages 20 --duration 20
    python -m loadtest.chat_throughput --json               # one JSON object on stdout
    python -m loadtest.chat_throughput --server http://127.0.0.1:8080 \\
        --agent-token TOKEN1 --agent-token TOKEN2 ...       # a server that is already running

What it does
------------
1. Without ``--server`` it starts ``python -m kefu serve`` on loopback, with a data directory in
   a temporary folder (removed at the end), the bot off, a token bucket that does not get in the
   way, and ``--agents`` agents (10 by default) whose ``max_chats`` together hold every
   conversation.
2. One **agent process** connects the agents (WebSocket, ``status online``).
3. The conversations are created over REST (``POST /v1/chat/create``); each is routed to an
   agent at once.
4. ``--processes`` **visitor processes** (2 by default) each connect their share of the
   visitors (one WebSocket per conversation) and say hello.
5. On a common start signal every visitor sends its messages one after the other, each after
   the ``ack`` of the previous one (closed loop: 1,000 visitors keep 1,000 messages in flight),
   until ``--messages`` are sent or ``--duration`` seconds have passed.

Measured
--------
- **delivered/s**: messages the agents received (the ``msg`` frames of visitor messages)
  divided by the time from the start signal to the last receipt. An ``ack`` means the message
  is stored (ack after persist), so this is the stored-and-delivered rate.
- **send -> agent**: from the visitor's send to the agent's receipt of the ``msg``. Both ends
  read ``CLOCK_MONOTONIC`` (``time.monotonic_ns``), which is one clock for every process of the
  machine; the send time travels in the message text.
- **send -> ack**: from the send to the ``ack`` on the visitor's connection.

The client side uses picows (the same WebSocket library as the server, Cython frame parsing)
and msgspec, in several processes, so that on a 2-core machine the clients are not what is
measured. Still, the clients and the server share the CPUs: on a small machine the figures are
a lower bound of what the server does alone.

Bounds: at most :data:`MAX_SAMPLES` latency samples per process (beyond that, counting goes on
and sampling stops), every wait has a deadline, every process is ended (joined, then
terminated), and the spawned server is stopped with SIGTERM (then killed if it lingers).
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import numpy as np
import uvloop
import yaml
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

#: Latency samples kept per process; counting goes on past it.
MAX_SAMPLES = 2_000_000
#: Connections opened at once while connecting (a burst of SYNs beyond the listen backlog
#: would only be retried).
CONNECT_CONCURRENCY = 64
READY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 60.0
#: After the last send, how long the agents may take to receive what is still in flight.
DRAIN_TIMEOUT_S = 30.0

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_HTTP_LINE = re.compile(r"^kefu: http listening on (http://\S+)\s*$")
_WS_LINE = re.compile(r"^kefu: ws listening on (ws://\S+)\s*$")


# ---------------------------------------------------------------------------------------------
# The server


class SpawnedServer:
    """``python -m kefu serve`` in a temporary directory, ports chosen by the OS."""

    def __init__(self, agents: int, conversations: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kefu-loadtest-"))
        per_agent = max(1, math.ceil(conversations / agents))
        self.tokens = [f"loadtest-agent-{i}-{os.urandom(8).hex()}" for i in range(agents)]
        cfg = {
            "agents": [
                {"id": f"agent{i}", "name": f"Agent {i}", "token": t, "max_chats": per_agent}
                for i, t in enumerate(self.tokens)
            ],
            "bot": {"enabled": False},
            "ws": {"rate": {"per_second": 100_000.0, "burst": 100_000}},
            "log_level": "warning",
        }
        config_path = self.dir / "kefu.yaml"
        config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # run this checkout's kefu
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for name in ("KEFU_DATA_DIR", "KEFU_REDIS_URL", "KEFU_API_KEY", "KEFU_ADMIN_TOKEN"):
            env.pop(name, None)
        cmd = [sys.executable, "-m", "kefu", "serve", "--config", str(config_path)]
        cmd += ["--data-dir", str(self.dir / "data"), "--http-port", "0", "--ws-port", "0"]
        self._stderr = open(self.dir / "stderr.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, env=env
        )
        self.http_url = ""
        self.ws_url = ""
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or not self.http_url or not self.ws_url:
            self.stop()
            raise SystemExit(f"kefu serve did not start:\n{self.stderr()}")

    def _drain(self, ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # drained to the end: a full pipe would block the server
            line = raw.decode("utf-8", "replace")
            if m := _HTTP_LINE.match(line):
                self.http_url = m[1]
            elif m := _WS_LINE.match(line):
                self.ws_url = m[1]
            elif line.strip() == "kefu: ready":
                ready.set()
        ready.set()

    def stderr(self) -> str:
        return (self.dir / "stderr.log").read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Clients (picows)


class _Client(WSListener):
    """One WebSocket: hello, then frames to ``on_frame``; ``welcome`` resolves ``ready``."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def send(self, frame: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, _encode(frame))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            msg = _decode(frame.get_payload_as_bytes())
            if not self.ready.done():
                self.ready.set_result(msg)
            else:
                self.on_frame(msg)
        elif frame.msg_type == WSMsgType.CLOSE:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"closed {frame.get_close_code()}"))
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected"))
        self.on_gone()

    def on_frame(self, msg: dict[str, Any]) -> None:
        pass

    def on_gone(self) -> None:
        pass


async def _open(factory: Any, url: str, token: str, sem: asyncio.Semaphore) -> Any:
    async with sem:
        _transport, listener = await ws_connect(factory, url)
        client = cast("_Client", listener)
        client.send({"type": "hello", "token": token})
        welcome = await asyncio.wait_for(client.ready, CONNECT_TIMEOUT_S)
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"hello refused: {welcome}")
        return client


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class _Samples:
    """Latency samples in nanoseconds, at most :data:`MAX_SAMPLES`."""

    ns: array[int] = field(default_factory=lambda: array("q"))
    count: int = 0

    def add(self, value: int) -> None:
        self.count += 1
        if len(self.ns) < MAX_SAMPLES:
            self.ns.append(value)


def agents_process(ws_url: str, tokens: list[str], to_main: Any, from_main: Any) -> None:
    uvloop.run(_agents(ws_url, tokens, to_main, from_main))


async def _agents(ws_url: str, tokens: list[str], to_main: Any, from_main: Any) -> None:
    _raise_nofile()
    delivered = _Samples()
    last_ns = [0]
    enough = asyncio.Event()
    expected = [math.inf]

    class Agent(_Client):
        def __init__(self) -> None:
            super().__init__()
            self.online: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_frame(self, msg: dict[str, Any]) -> None:
            kind = msg.get("type")
            if kind == "status" and not self.online.done():
                self.online.set_result(None)
            elif kind == "msg" and msg["from"]["role"] == "visitor":
                now = time.monotonic_ns()
                delivered.add(now - int(msg["text"].split(" ", 2)[1]))
                last_ns[0] = now
                if delivered.count >= expected[0]:
                    enough.set()

    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    agents = await asyncio.gather(*(_open(Agent, ws_url, t, sem) for t in tokens))
    for a in agents:
        a.send({"type": "status", "status": "online"})
    await asyncio.wait_for(asyncio.gather(*(a.online for a in agents)), CONNECT_TIMEOUT_S)
    to_main.put(("agents_ready", len(agents)))
    loop = asyncio.get_running_loop()
    want = await loop.run_in_executor(None, from_main.get)  # total acked, once visitors end
    expected[0] = want
    if delivered.count < want:
        with contextlib.suppress(TimeoutError):  # the report says what did not arrive
            await asyncio.wait_for(enough.wait(), DRAIN_TIMEOUT_S)
    to_main.put(("agents_done", delivered.count, delivered.ns.tobytes(), last_ns[0]))
    for a in agents:
        if a.transport is not None:
            a.transport.send_close()
            a.transport.disconnect()


def visitors_process(
    ws_url: str,
    chats: list[tuple[str, str]],
    messages: int,
    duration: float,
    size: int,
    to_main: Any,
    go: Any,
) -> None:
    uvloop.run(_visitors(ws_url, chats, messages, duration, size, to_main, go))


async def _visitors(
    ws_url: str,
    chats: list[tuple[str, str]],
    messages: int,
    duration: float,
    size: int,
    to_main: Any,
    go: Any,
) -> None:
    _raise_nofile()
    acks = _Samples()
    errors = [0]
    padding = "x" * max(0, size)

    class Visitor(_Client):
        def __init__(self) -> None:
            super().__init__()
            self.pending: asyncio.Future[None] | None = None
            self.sent_ns = 0

        def on_frame(self, msg: dict[str, Any]) -> None:
            kind = msg.get("type")
            if kind == "ack" or kind == "error":
                if kind == "ack":
                    acks.add(time.monotonic_ns() - self.sent_ns)
                else:
                    errors[0] += 1
                if self.pending is not None and not self.pending.done():
                    self.pending.set_result(None)

        def on_gone(self) -> None:
            if self.pending is not None and not self.pending.done():
                self.pending.set_exception(ConnectionError("connection lost"))

    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    visitors = await asyncio.gather(*(_open(Visitor, ws_url, tok, sem) for _c, tok in chats))
    to_main.put(("visitors_ready", len(visitors)))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    end = time.monotonic() + duration

    async def talk(v: Visitor, conv: str) -> None:
        for i in range(messages):
            if time.monotonic() >= end:
                return
            v.pending = loop.create_future()
            v.sent_ns = time.monotonic_ns()
            v.send(
                {
                    "type": "send",
                    "conv": conv,
                    "client_msg_id": f"m{i}",
                    "text": f"lt {v.sent_ns} {padding}",
                }
            )
            await asyncio.wait_for(v.pending, DRAIN_TIMEOUT_S)

    results = await asyncio.gather(
        *(talk(v, conv) for v, (conv, _tok) in zip(visitors, chats, strict=True)),
        return_exceptions=True,
    )
    lost = sum(1 for r in results if isinstance(r, BaseException))
    to_main.put(("visitors_done", acks.count, acks.ns.tobytes(), errors[0], lost))
    for v in visitors:
        if v.transport is not None:
            v.transport.send_close()
            v.transport.disconnect()


# ---------------------------------------------------------------------------------------------
# The run


async def create_chats(http_url: str, count: int) -> list[tuple[str, str]]:
    sem = asyncio.Semaphore(32)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> tuple[str, str]:
            async with (
                sem,
                session.post(f"{http_url}/v1/chat/create", json={"name": f"load {i}"}) as resp,
            ):
                body = await resp.json()
                if resp.status not in (200, 201):
                    raise SystemExit(f"create failed: {resp.status} {body}")
                return body["session_id"], body["token"]

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def public_ws_url(http_url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{http_url}/v1/config") as resp,
    ):
        return str((await resp.json())["ws_url"])


def _wait(inbox: Any, kind: str, timeout: float) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"timed out waiting for {kind}")
        try:
            item: tuple[Any, ...] = inbox.get(timeout=left)
        except queue.Empty:
            continue
        if item[0] == kind:
            return item
        raise SystemExit(f"expected {kind}, got {item[0]}")


def _ms(ns: np.ndarray[Any, Any], q: float) -> float:
    return float(np.percentile(ns, q) / 1e6) if len(ns) else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.chat_throughput", description=__doc__)
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--messages", type=int, default=20, help="per visitor (default 20)")
    p.add_argument("--duration", type=float, default=30.0, help="sending stops after S seconds")
    p.add_argument("--size", type=int, default=64, help="padding characters per message")
    p.add_argument("--agents", type=int, default=10, help="agents of a spawned server")
    p.add_argument("--processes", type=int, default=2, help="visitor client processes")
    p.add_argument("--server", help="HTTP URL of a running server (default: spawn one)")
    p.add_argument("--agent-token", action="append", default=[], help="with --server")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.server and not args.agent_token:
        p.error("--server needs at least one --agent-token")
    for name in ("conversations", "messages", "processes", "agents"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")

    server: SpawnedServer | None = None
    if args.server:
        http_url = args.server.rstrip("/")
        tokens = list(args.agent_token)
        ws_url = uvloop.run(public_ws_url(http_url))
    else:
        server = SpawnedServer(args.agents, args.conversations)
        http_url, tokens, ws_url = server.http_url, server.tokens, server.ws_url
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    try:
        inbox, to_agents, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        agents = ctx.Process(
            target=agents_process, args=(ws_url, tokens, inbox, to_agents), daemon=True
        )
        agents.start()
        procs.append(agents)
        _wait(inbox, "agents_ready", CONNECT_TIMEOUT_S)

        t0 = time.monotonic()
        chats = uvloop.run(create_chats(http_url, args.conversations))
        create_s = time.monotonic() - t0
        n = args.processes
        for i in range(n):
            share = chats[i::n]
            proc = ctx.Process(
                target=visitors_process,
                args=(ws_url, share, args.messages, args.duration, args.size, inbox, go),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        for _ in range(n):
            _wait(inbox, "visitors_ready", CONNECT_TIMEOUT_S)

        go_ns = time.monotonic_ns()
        go.set()
        acked = 0
        errors = 0
        lost = 0
        ack_ns: list[np.ndarray[Any, Any]] = []
        for _ in range(n):
            _kind, count, raw, errs, gone = _wait(
                inbox, "visitors_done", args.duration + DRAIN_TIMEOUT_S * 2
            )
            acked += count
            errors += errs
            lost += gone
            ack_ns.append(np.frombuffer(raw, dtype=np.int64))
        to_agents.put(acked)
        _kind, delivered, raw, last_ns = _wait(inbox, "agents_done", DRAIN_TIMEOUT_S * 2)
        deliver_ns = np.frombuffer(raw, dtype=np.int64)
        acks_all = np.concatenate(ack_ns) if ack_ns else np.empty(0, dtype=np.int64)
        elapsed = max(1e-9, (last_ns - go_ns) / 1e9)
        result = {
            "conversations": args.conversations,
            "agents": len(tokens),
            "visitor_processes": n,
            "client": "picows + msgspec, multiprocessing",
            "messages_per_visitor": args.messages,
            "create_s": round(create_s, 3),
            "acked": acked,
            "delivered": delivered,
            "errors": errors,
            "lost_connections": lost,
            "elapsed_s": round(elapsed, 3),
            "delivered_per_s": round(delivered / elapsed, 1),
            "deliver_p50_ms": round(_ms(deliver_ns, 50), 3),
            "deliver_p99_ms": round(_ms(deliver_ns, 99), 3),
            "ack_p50_ms": round(_ms(acks_all, 50), 3),
            "ack_p99_ms": round(_ms(acks_all, 99), 3),
            "cpus": os.cpu_count(),
        }
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if server is not None:
            server.stop()

    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"kefu chat throughput: {result['conversations']} conversations, "
            f"{result['agents']} agents, {n} visitor processes ({result['client']}), "
            f"{os.cpu_count()} CPUs shared with the server"
        )
        print(f"conversations created over REST in {result['create_s']} s")
        rows = [
            ("acked / delivered", f"{acked} / {delivered}"),
            ("delivered msgs/s", f"{result['delivered_per_s']:,.0f}"),
            (
                "send -> agent p50 / p99",
                f"{result['deliver_p50_ms']} / {result['deliver_p99_ms']} ms",
            ),
            ("send -> ack   p50 / p99", f"{result['ack_p50_ms']} / {result['ack_p99_ms']} ms"),
            ("errors / lost connections", f"{errors} / {lost}"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    return 0 if delivered == acked and not errors and not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
