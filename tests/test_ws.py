"""The WebSocket front (kefu.web.ws) end to end: a real server on a loopback port, clients from
the ``websockets`` library, and a raw client for frames no library would send."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kefu.config import RateConfig, WsConfig
from kefu.protocol import Ack, ClientFrame, Hello, Send, Welcome, decode_server_frame
from kefu.web.ws import AuthError, Connection, WsServer, raise_nofile_limit
from tests import aio

CONV = "0123456789abcdef"
TIMEOUT = 10.0


def run(test: Callable[[], Awaitable[None]], timeout: float = TIMEOUT) -> None:
    aio.run(test, timeout)


class StubHandler:
    """Accepts token "good" as visitor v1; answers `send` with `ack`; text "flood" floods."""

    def __init__(self) -> None:
        self.seq = 0
        self.closed: list[int] = []
        self.unwelcomed: list[int] = []
        self.flood_result: tuple[int, bool] | None = None
        self.max_queued = 0
        self.server: WsServer | None = None  # set by a test that calls the server back
        self.flushed: list[int] = []

    async def authenticate(self, conn: Connection, hello: Hello) -> Welcome:
        await asyncio.sleep(0.3 if hello.token == "slow" else 0)
        if hello.token not in ("good", "slow"):
            raise AuthError("bad token")
        return Welcome(role="visitor", id="v1", convs=[], ping_interval_ms=0, max_msg_bytes=0)

    async def on_ready(self, conn: Connection, hello: Hello) -> None:
        pass

    async def on_frame(self, conn: Connection, frame: ClientFrame) -> None:
        if isinstance(frame, Send):
            if frame.text == "boom":
                raise RuntimeError("handler bug")
            if frame.text == "flood":
                self._flood(conn)
                return
            if frame.text.startswith("burst "):
                self._burst(conn, int(frame.text.split()[1]))
                return
            if frame.text == "sizes":
                # One loop turn: frames of every header length (7-bit, 16-bit, 64-bit), then
                # more small ones, all collected into one write.
                for i, size in enumerate(SIZES):
                    conn.send(Send(conv=CONV, client_msg_id=str(i), text="z" * size))
                return
            if frame.text == "flush now" and self.server is not None:
                # Frames of this turn, then flush_writes: written before it returns.
                server = self.server
                for i, size in enumerate(SIZES):
                    conn.send(Send(conv=CONV, client_msg_id=str(i), text="z" * size))
                before = server.batches_written
                server.flush_writes()
                self.flushed.append(server.batches_written - before)
                await asyncio.sleep(0)  # the turn's end: nothing is left to write
                await asyncio.sleep(0)
                self.flushed.append(server.batches_written - before)
                return
            if frame.text == "sleep":
                await asyncio.sleep(0.3)
            self.seq += 1
            conn.send(
                Ack(
                    conv=frame.conv,
                    client_msg_id=frame.client_msg_id,
                    seq=self.seq,
                    ts=0,
                    dup=False,
                )
            )

    def _flood(self, conn: Connection) -> None:
        # Sends 16 KiB frames until the connection refuses one (at most 256 MiB).
        frame = Send(conv=CONV, client_msg_id="f", text="x" * 16_000)
        sent = 0
        while sent < 256 << 20 and conn.send(frame):
            sent += 16_000
            assert conn.queued_bytes <= 1 << 20
        self.flood_result = (sent, conn.closing)

    def _burst(self, conn: Connection, n: int) -> None:
        # A small kernel send buffer, so that the transport pauses early and frames wait in the
        # outbound queue (below its limit).
        sock = conn._transport.underlying_transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.max_queued = 0
        for i in range(n):
            assert conn.send(Send(conv=CONV, client_msg_id=str(i), text="y" * 16_000))
            self.max_queued = max(self.max_queued, conn.queued_bytes)

    def on_close(self, conn: Connection) -> None:
        self.closed.append(conn.id)

    def on_unwelcomed(self, conn: Connection) -> None:
        self.unwelcomed.append(conn.id)


@contextlib.asynccontextmanager
async def serving(
    origins: tuple[str, ...] = (), **overrides: Any
) -> AsyncIterator[tuple[WsServer, StubHandler, str]]:
    config = WsConfig(port=0, **overrides)
    handler = StubHandler()
    server = WsServer(config, handler, allowed_origins=origins, close_timeout_s=1.0)
    await server.start()
    try:
        yield server, handler, f"ws://127.0.0.1:{server.port}/ws"
    finally:
        await server.stop(timeout=2.0)


#: Text sizes around the frame-length encodings' edges (125/126, 65535/65536 bytes of payload
#: once the JSON wrapper is added), for the write-coalescing test.
SIZES = (0, 1, 60, 61, 62, 125, 126, 65_400, 65_470, 65_480, 70_000, 3, 3, 3)


def send_frame(text: str = "hi", cmid: str = "m1") -> str:
    return msgspec.json.encode(
        {"type": "send", "conv": CONV, "client_msg_id": cmid, "text": text}
    ).decode()


HELLO = '{"type":"hello","token":"good"}'


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), 2.0)
    out: dict[str, Any] = msgspec.json.decode(data)
    return out


async def hello(url: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(url, **kwargs)
    await ws.send(HELLO)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


async def close_code(ws: ClientConnection) -> int | None:
    """Reads until the connection closes; the code the server sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 3.0)
    return ws.close_code


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def assert_alive(url: str) -> None:
    """The server still completes a hello and answers a command."""
    ws = await hello(url)
    await ws.send(send_frame())
    assert (await recv_json(ws))["type"] == "ack"
    await ws.close()


# ---------------------------------------------------------------------------------------------
# Raw client: hand-made frames, masked as a client must


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if n < 126:
        header = bytes([b0, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return header + key + masked


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, *, rcvbuf: int | None = None, path: str = "/ws") -> RawClient:
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.writer.write(ws_frame(opcode, payload, **kwargs))

    async def read_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def read_data(self) -> dict[str, Any]:
        """The next data frame, skipping control frames."""
        while True:
            op, payload = await asyncio.wait_for(self.read_frame(), 2.0)
            if op in (1, 2):
                out: dict[str, Any] = msgspec.json.decode(payload)
                return out
            assert op in (9, 10), op

    async def close_code(self, timeout: float = 3.0) -> int | None:
        """Reads until a close frame; its code (None: connection ended without one)."""

        async def until_close() -> int | None:
            while True:
                try:
                    op, payload = await self.read_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return None
                if op == 8:
                    return int.from_bytes(payload[:2], "big") if payload else 0

        try:
            return await asyncio.wait_for(until_close(), timeout)
        finally:
            self.writer.close()

    async def hello(self) -> None:
        self.send(1, HELLO.encode())
        assert (await self.read_data())["type"] == "welcome"


# ---------------------------------------------------------------------------------------------


def test_hello_welcome_ping_and_commands() -> None:
    async def t() -> None:
        async with serving(ping_interval_s=15.0) as (server, handler, url):
            ws = await connect(url)
            await ws.send(HELLO)
            welcome = await recv_json(ws)
            assert welcome == {
                "type": "welcome",
                "role": "visitor",
                "id": "v1",
                "convs": [],
                "ping_interval_ms": 15_000,
                "max_msg_bytes": 64 * 1024,
            }
            await ws.send('{"type":"ping"}')
            assert await recv_json(ws) == {"type": "pong"}
            await ws.send(send_frame(cmid="a"))
            ack = await recv_json(ws)
            assert ack["type"] == "ack" and ack["client_msg_id"] == "a"
            # WS-level ping answered with a pong
            pong = await ws.ping(b"abc")
            await asyncio.wait_for(pong, 2.0)
            # a second hello is refused, the connection stays
            await ws.send(HELLO)
            err = await recv_json(ws)
            assert (err["type"], err["code"]) == ("error", "invalid")
            # a handler failure is an `internal` error, the connection stays
            await ws.send(send_frame("boom"))
            assert (await recv_json(ws))["code"] == "internal"
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"
            await ws.close()
            await asyncio.sleep(0.05)
            assert handler.closed == [1]
            st = server.stats()
            assert st["frames_in"]["hello"] == 2 and st["frames_out"]["welcome"] == 1
            assert st["errors"] == {"invalid": 1, "internal": 1}

    run(t)


def test_pipelined_frames_after_hello_keep_order() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            ws = await connect(url)
            await ws.send(HELLO)
            for i in range(5):
                await ws.send(send_frame(cmid=f"m{i}"))
            await ws.send("not json")
            assert (await recv_json(ws))["type"] == "welcome"
            for i in range(5):
                assert (await recv_json(ws))["client_msg_id"] == f"m{i}"
            assert (await recv_json(ws))["code"] == "bad_frame"

    run(t)


def test_a_connection_gone_while_authenticating_is_unwelcomed_not_closed() -> None:
    """authenticate answered after the client left: the handler hears ``on_unwelcomed`` (to
    drop what it kept for ``on_ready``), and no ``on_close``."""

    async def body() -> None:
        async with serving() as (_server, handler, url):
            ws = await connect(url)
            await ws.send('{"type":"hello","token":"slow"}')
            await asyncio.sleep(0.1)  # authenticating (0.3 s) when the client leaves
            await ws.close()
            for _ in range(100):
                if handler.unwelcomed:
                    break
                await asyncio.sleep(0.01)
            assert len(handler.unwelcomed) == 1
            assert handler.closed == []
            ok = await hello(url)  # a welcomed one is not
            await ok.close()
            for _ in range(100):
                if handler.closed:
                    break
                await asyncio.sleep(0.01)
            assert len(handler.closed) == 1 and len(handler.unwelcomed) == 1

    run(body)


def test_hello_deadline_bad_token_and_frame_before_hello_close_1008() -> None:
    async def t() -> None:
        async with serving(hello_timeout_s=0.3) as (server, handler, url):
            ws = await connect(url)
            assert await close_code(ws) == 1008
            ws = await connect(url)
            await ws.send('{"type":"hello","token":"bad"}')
            assert await close_code(ws) == 1008
            for first in ('{"type":"ping"}', "not json", '{"type":"hello"}', send_frame()):
                ws = await connect(url)
                await ws.send(first)
                assert await close_code(ws) == 1008, first
            assert server.hello_timeouts == 1 and server.auth_failures == 1
            await assert_alive(url)
            assert handler.closed == [server.connections_total]  # only welcomed ones

    run(t)


def test_bad_frames_get_errors_and_connection_stays() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            ws = await hello(url)
            cases: list[tuple[str | bytes, str]] = [
                ("{not json", "bad_frame"),
                ("[1, 2]", "bad_frame"),
                ('"text"', "bad_frame"),
                ('{"no_type": 1}', "bad_frame"),
                ('{"type":"nope"}', "unknown_type"),
                ('{"type":"send","conv":"0123456789abcdef"}', "invalid"),
                (b'{"type":"ping"}', "bad_frame"),  # binary on a JSON connection
            ]
            for data, code in cases:
                await ws.send(data)
                err = await recv_json(ws)
                assert (err["type"], err["code"]) == ("error", code), (data, err)
            await ws.send('{"type":"nope","client_msg_id":"c7"}')
            assert (await recv_json(ws))["ref"] == "c7"
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"

    run(t)


def test_oversize_messages_close_1009() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            ws = await hello(url, max_size=None)
            await ws.send("x" * (64 * 1024 + 1))
            assert await close_code(ws) == 1009
            # fragments that pass the limit together (each alone is within it)
            ws = await hello(url)
            await ws.send(iter(["x" * 30_000, "x" * 30_000, "x" * 30_000]))
            assert await close_code(ws) == 1009
            # exactly at the limit is fine (not JSON: bad_frame, connection open)
            ws = await hello(url)
            await ws.send(iter(["x" * 32 * 1024, "x" * 32 * 1024]))
            assert (await recv_json(ws))["code"] == "bad_frame"
            await assert_alive(url)

    run(t)


def test_rate_limit_errors_then_4029() -> None:
    async def t() -> None:
        rate = RateConfig(per_second=1.0, burst=4)
        async with serving(rate=rate, rate_close_after=3) as (server, _, url):
            ws = await hello(url)  # the hello takes one token
            for _ in range(3):
                await ws.send('{"type":"ping"}')
                assert (await recv_json(ws))["type"] == "pong"
            for _ in range(2):
                await ws.send('{"type":"ping"}')
                err = await recv_json(ws)
                assert (err["type"], err["code"]) == ("error", "rate_limited")
            await ws.send('{"type":"ping"}')
            assert await close_code(ws) == 4029
            assert server.rate_limit_closes == 1
            await assert_alive(url)

    run(t)


def test_slow_consumer_closed_4008_others_unaffected() -> None:
    async def t() -> None:
        async with serving() as (server, handler, url):
            other = await hello(url)
            slow = await RawClient.open(url, rcvbuf=4096)
            await slow.hello()
            slow.send(1, send_frame("flood").encode())
            await until(lambda: handler.flood_result is not None)
            assert handler.flood_result is not None
            sent, closing = handler.flood_result
            assert closing and sent > 1 << 20  # the kernel and the transport took some first
            assert server.slow_consumer_closes == 1
            # the other client is answered promptly
            loop = asyncio.get_running_loop()
            started = loop.time()
            await other.send(send_frame())
            assert (await recv_json(other))["type"] == "ack"
            assert loop.time() - started < 0.5
            # once the slow client reads, it finds the close code after the frames sent before
            assert await slow.close_code(timeout=5.0) == 4008
            await until(lambda: server.stats()["closes_sent"].get(4008) == 1)
            await assert_alive(url)

    run(t)


def test_paused_transport_queues_then_drains_in_order() -> None:
    async def t() -> None:
        async with serving() as (server, handler, url):
            raw = await RawClient.open(url, rcvbuf=4096)
            await raw.hello()
            raw.send(1, send_frame("burst 40").encode())
            await until(lambda: handler.max_queued > 0)
            assert handler.max_queued < 1 << 20
            for i in range(40):  # reading resumes the transport: everything arrives, in order
                assert (await raw.read_data())["client_msg_id"] == str(i)
            assert server.slow_consumer_closes == 0
            raw.send(1, send_frame().encode())
            assert (await raw.read_data())["type"] == "ack"
            raw.writer.close()

    run(t)


def test_inbox_bound_refuses_like_the_rate_limit() -> None:
    async def t() -> None:
        rate = RateConfig(per_second=1000.0, burst=1000)
        async with serving(rate=rate, rate_close_after=100) as (_, _, url):
            ws = await hello(url)
            await ws.send(send_frame("sleep"))  # holds the handler while the inbox fills
            for _ in range(70):
                await ws.send('{"type":"ping"}')
            got = [await recv_json(ws) for _ in range(71)]
            kinds = [f.get("code", f["type"]) for f in got]
            assert kinds[:6] == ["rate_limited"] * 6  # refused at once, not queued
            assert kinds[6:] == ["ack"] + ["pong"] * 64
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"

    run(t)


def test_origin_allowlist_path_and_capacity() -> None:
    async def t() -> None:
        origins = ("https://shop.example.com",)
        async with serving(origins, max_connections=2) as (server, _, url):
            with pytest.raises(InvalidStatus) as info:
                await connect(url, origin="https://evil.example.com")  # type: ignore[arg-type]
            assert info.value.response.status_code == 403
            with pytest.raises(InvalidStatus) as info:
                await connect(url.replace("/ws", "/other"))
            assert info.value.response.status_code == 404
            a = await hello(url, origin="https://shop.example.com")
            b = await hello(url)  # no Origin header: allowed
            with pytest.raises(InvalidStatus) as info:
                await connect(url)
            assert info.value.response.status_code == 503
            await b.close()
            await until(lambda: server.connections < 2)
            await assert_alive(url)
            await a.close()
            assert server.refused == {"path": 1, "origin": 1, "capacity": 1}

    run(t)


def test_msgpack_subprotocol_round_trip() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            ws = await connect(url, subprotocols=["kefu.msgpack"])  # type: ignore[list-item]
            assert ws.subprotocol == "kefu.msgpack"
            await ws.send(msgspec.msgpack.encode({"type": "hello", "token": "good"}))
            welcome = decode_server_frame(await ws.recv(decode=False), msgpack=True)
            assert isinstance(welcome, Welcome) and welcome.role == "visitor"
            await ws.send(msgspec.msgpack.encode(Send(conv=CONV, client_msg_id="m", text="hé")))
            ack = decode_server_frame(await ws.recv(decode=False), msgpack=True)
            assert isinstance(ack, Ack) and ack.client_msg_id == "m"
            await ws.send(b"\xc1")  # never valid MessagePack
            err = msgspec.msgpack.decode(await ws.recv(decode=False))
            assert err["code"] == "bad_frame"
            await ws.send('{"type":"ping"}')  # text on a MessagePack connection
            assert msgspec.msgpack.decode(await ws.recv(decode=False))["code"] == "bad_frame"

    run(t)


def test_rfc6455_frame_rules() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            bad: list[tuple[str, list[bytes], int]] = [
                ("rsv1", [ws_frame(1, b"{}", rsv=4)], 1002),
                ("rsv3 on ping", [ws_frame(9, b"", rsv=1)], 1002),
                ("opcode 3", [ws_frame(3, b"")], 1002),
                ("opcode 0xB", [ws_frame(0xB, b"")], 1002),
                ("orphan continuation", [ws_frame(0, b"x")], 1002),
                ("data inside fragments", [ws_frame(1, b"a", fin=False), ws_frame(1, b"b")], 1002),
                ("fragmented ping", [ws_frame(9, b"", fin=False)], 1002),
                ("ping over 125", [ws_frame(9, b"x" * 126)], 1002),
                ("bad utf-8", [ws_frame(1, b'{"a":"\xff"}')], 1007),
                ("surrogate", [ws_frame(1, b"\xed\xa0\x80")], 1007),
                ("bad utf-8 in a fragment", [ws_frame(1, b"\xc3\x28", fin=False)], 1007),
            ]
            for name, frames, code in bad:
                raw = await RawClient.open(url)
                for f in frames:
                    raw.writer.write(f)
                assert await raw.close_code() == code, name
            # a ping inside a fragmented message, and a character split between fragments
            raw = await RawClient.open(url)
            await raw.hello()
            text = send_frame("h\u00e9llo").encode()
            cut = text.index(b"\xc3") + 1
            raw.send(1, text[:cut], fin=False)
            raw.send(9, b"p1")
            raw.send(0, text[cut:])
            assert await raw.read_frame() == (10, b"p1")
            assert (await raw.read_data())["type"] == "ack"
            raw.send(8, struct.pack("!H", 1000))
            assert await raw.close_code() == 1000
            await assert_alive(url)

    run(t)


def test_close_codes() -> None:
    async def t() -> None:
        async with serving() as (_, _, url):
            cases: list[tuple[bytes, int | None]] = [
                (b"", 1000),  # empty close: answered 1000, not 0
                (struct.pack("!H", 1000), 1000),
                (struct.pack("!H", 1001) + b"bye", 1001),
                (struct.pack("!H", 3000), 3000),
                (struct.pack("!H", 4999), 4999),
                (b"\x03", 1002),  # 1-byte payload
                (struct.pack("!H", 1000) + b"\xff", 1007),  # reason not UTF-8
            ]
            cases += [
                (struct.pack("!H", c), 1002)
                for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)
            ]
            for payload, expected in cases:
                raw = await RawClient.open(url)
                raw.send(8, payload)
                assert await raw.close_code() == expected, payload
            await assert_alive(url)

    run(t)


def test_server_ping_without_pong_closes() -> None:
    async def t() -> None:
        async with serving(ping_interval_s=0.2, pong_timeout_s=0.2) as (server, _, url):
            ws = await hello(url)  # answers pings: stays open
            raw = await RawClient.open(url)
            await raw.hello()
            op, _ = await asyncio.wait_for(raw.read_frame(), 1.0)
            assert op == 9
            # never answers: closed with 1011 (or dropped) within the pong deadline
            assert await raw.close_code(timeout=1.0) in (1011, None)
            assert server.pong_timeouts == 1
            await asyncio.sleep(0.5)
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"

    run(t)


def test_server_pings_only_a_connection_it_has_not_heard_from() -> None:
    async def t() -> None:
        async with serving(ping_interval_s=0.25, pong_timeout_s=5.0) as (_server, _, url):
            raw = await RawClient.open(url)
            await raw.hello()
            # Talking every 0.1 s for 1.2 s: no ping, only the answers to what it sent.
            ops: list[int] = []
            for _ in range(12):
                raw.send(1, b'{"type":"ping"}')
                await asyncio.sleep(0.1)
            deadline = asyncio.get_running_loop().time() + 0.05
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    op, _ = await asyncio.wait_for(raw.read_frame(), left)
                except TimeoutError:
                    break
                ops.append(op)
            assert 9 not in ops and ops.count(1) >= 12  # text pongs, no WS ping
            # Silent: pinged within two intervals.
            op = 1
            while op == 1:
                op, _ = await asyncio.wait_for(raw.read_frame(), 1.0)
            assert op == 9

    run(t)


def test_graceful_stop_closes_every_client_1001() -> None:
    async def t() -> None:
        config = WsConfig(port=0)
        handler = StubHandler()
        server = WsServer(config, handler, close_timeout_s=0.3)
        await server.start()
        url = f"ws://127.0.0.1:{server.port}/ws"
        clients = [await hello(url) for _ in range(3)]
        raw = await RawClient.open(url)  # not yet welcomed
        await server.stop(timeout=2.0)
        assert [await close_code(ws) for ws in clients] == [1001, 1001, 1001]
        assert await raw.close_code() == 1001
        assert server.connections == 0
        assert sorted(handler.closed) == [1, 2, 3]
        with pytest.raises(OSError):
            await connect(url, open_timeout=1.0)

    run(t)


def test_raise_nofile_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_nofile_limit() >= soft
    calls: list[tuple[int, int]] = []
    got = raise_nofile_limit(lambda _: (1024, 4096), lambda _, lim: calls.append(lim))
    assert got == 4096 and calls == [(4096, 4096)]

    def refuse(_: int, __: tuple[int, int]) -> None:
        raise ValueError("no")

    assert raise_nofile_limit(lambda _: (1024, resource.RLIM_INFINITY), refuse) == 1024


def test_flush_writes_writes_a_turns_frames_before_it_returns() -> None:
    async def body() -> None:
        async with serving(max_msg_bytes=256 << 10) as (server, handler, url):
            handler.server = server
            ws = await connect(url, max_size=1 << 20)
            await ws.send(HELLO)
            await asyncio.wait_for(ws.recv(), 2.0)
            await ws.send(send_frame("flush now"))
            got = [msgspec.json.decode(await asyncio.wait_for(ws.recv(), 2.0)) for _ in SIZES]
            assert [(g["client_msg_id"], len(g["text"])) for g in got] == [
                (str(i), n) for i, n in enumerate(SIZES)
            ]
            # One write for them all, made inside flush_writes; the end of the turn found
            # nothing more to write.
            assert handler.flushed == [1, 1]
            await ws.close()

    run(body)


@pytest.mark.parametrize("subprotocol", [None, "kefu.msgpack"])
def test_frames_of_one_turn_are_coalesced_and_arrive_whole_in_order(
    subprotocol: str | None,
) -> None:
    """Many frames sent to a connection in one loop turn go out in a few writes; the client
    (the ``websockets`` library, strict about framing) still reads each frame whole, in order."""

    async def body() -> None:
        async with serving(max_msg_bytes=256 << 10) as (server, _, url):
            kwargs: dict[str, Any] = {"max_size": 1 << 20}
            if subprotocol is not None:
                kwargs["subprotocols"] = [subprotocol]
            ws = await connect(url, **kwargs)
            await ws.send(
                HELLO if subprotocol is None else msgspec.msgpack.encode(msgspec.json.decode(HELLO))
            )
            await asyncio.wait_for(ws.recv(), 2.0)
            before = (server.batches_written, server.batched_frames)
            frame = msgspec.json.decode(send_frame("sizes"))
            await ws.send(
                send_frame("sizes") if subprotocol is None else msgspec.msgpack.encode(frame)
            )
            got = []
            for _ in SIZES:
                data = await asyncio.wait_for(ws.recv(), 2.0)
                decoded = (
                    msgspec.json.decode(data)
                    if subprotocol is None
                    else msgspec.msgpack.decode(data)
                )
                got.append((decoded["client_msg_id"], len(decoded["text"])))
            assert got == [(str(i), n) for i, n in enumerate(SIZES)]
            batches = server.batches_written - before[0]
            frames = server.batched_frames - before[1]
            assert frames == len(SIZES)
            assert batches < len(SIZES)  # coalesced, not one write per frame
            # The connection is still in order afterwards: a normal send gets its ack.
            await ws.send(
                send_frame("after", "m9")
                if subprotocol is None
                else msgspec.msgpack.encode(msgspec.json.decode(send_frame("after", "m9")))
            )
            data = await asyncio.wait_for(ws.recv(), 2.0)
            ack = msgspec.json.decode(data) if subprotocol is None else msgspec.msgpack.decode(data)
            assert ack["type"] == "ack" and ack["client_msg_id"] == "m9"
            await ws.close()

    run(body)


def test_busy_polling_runs_for_its_window_after_a_write_then_stops() -> None:
    """``ws.busy_poll_us``: after the server writes, its loop keeps polling without sleeping
    for that window (counted in ``busy_polls``), then sleeps again; off, it never does."""

    async def body() -> None:
        async with serving(busy_poll_us=50_000) as (server, _, url):
            ws = await hello(url)
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"
            during = server.stats()["busy_polls"]
            await asyncio.sleep(0.2)  # four windows: the last write's has passed
            after = server.busy_polls
            assert after > during > 0  # it polled through the window after the ack
            await asyncio.sleep(0.1)
            assert server.busy_polls == after  # and stopped: nothing was written since
            assert not server._busy_polling
            await ws.send(send_frame("again", "m2"))  # a new write opens a new window
            assert (await recv_json(ws))["type"] == "ack"
            await until(lambda: server.busy_polls > after)
            await ws.close()
        async with serving() as (server, _, url):
            ws = await hello(url)
            await ws.send(send_frame())
            assert (await recv_json(ws))["type"] == "ack"
            await asyncio.sleep(0.05)
            assert server.busy_polls == 0 and not server._busy_polling
            await ws.close()

    run(body)
