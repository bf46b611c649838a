"""RFC 6455 conformance of the WebSocket front: the Autobahn test suite, driven by ``kosoku``.

Autobahn's fuzzing client expects an echo server, so the server under test is a real ``kefu
serve`` with ``ws.echo_path`` set: on that path kefu's own :class:`~kefu.web.ws.Connection`,
with the same RFC 6455 checks as the chat path, sends every message back. Every core case
(1.* to 10.*; 12.* and 13.* are permessage-deflate, which kefu does not negotiate) must end
``OK``, ``NON-STRICT`` or ``INFORMATIONAL``. The verdicts are pinned case by case: a case listed
in :data:`NOT_OK` may do better than its entry, never worse; every other case must be ``OK``.

The whole core suite runs here (about 15 s). The same run with Autobahn's HTML and JSON report,
against a server started by hand with the ``ws`` settings of :data:`SUITE_WS` (``echo_path:
/echo``, ``max_msg_bytes`` and ``outbound_limit_bytes`` 16 MiB, ``ping_interval_s: 3600``)::

    kosoku -i '1.*' -i '2.*' -i '3.*' -i '4.*' -i '5.*' -i '6.*' -i '7.*' -i '9.*' -i '10.*' \\
        -o reports/autobahn ws://127.0.0.1:8081/echo

(it exits with 1 because of case 7.1.2, a picows failure: :data:`PICOWS_FAILURES`).

The module also checks what the echo mode promises beyond the suite: it is off unless
configured, it never reaches the chat handler, and a peer that writes without reading holds a
bounded buffer on the server (the connection stops reading).
"""

from __future__ import annotations

import asyncio
import binascii
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kosoku
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from kefu.config import ConfigError, WsConfig, load_config
from kefu.protocol import ClientFrame, Hello, Welcome
from kefu.web.ws import TRANSPORT_HIGH_WATER, Connection, WsServer
from tests import aio
from tests.e2e.harness import ServerProcess, config, running

ECHO_PATH = "/echo"
#: Autobahn's largest core message is 16 MiB (cases 9.1.6, 9.2.6); the outbound limit must be
#: at least the message limit (a config rule).
SUITE_WS = {
    "echo_path": ECHO_PATH,
    "max_msg_bytes": 16 << 20,
    "outbound_limit_bytes": 16 << 20,
    # No heartbeat ping during a case: Autobahn counts every frame the server sends.
    "ping_interval_s": 3600.0,
}
CORE_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
#: Cases in the core selection (kosoku 0.1.0); fewer would mean cases silently not run.
CORE_CASE_COUNT = 301
SUITE_TIMEOUT = 240.0

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}
_RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1}

#: Cases that do not end OK/OK, with their verdict (behaviour, close behaviour) and why.
NOT_OK: dict[str, tuple[str, str, str]] = {
    # picows parses the frame after a data frame before it delivers the data frame, and a
    # reserved opcode there makes it send its close 1002 before the message that came first
    # reaches kefu, so the echo of that message is missing from what the client reads before
    # the close. Autobahn accepts that as NON-STRICT. It happens when both frames arrive in
    # one read, so these cases are OK or NON-STRICT from one run to the next.
    **{
        case: ("NON-STRICT", "OK", "picows: message before a bad opcode not delivered")
        for case in ("4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5")
    },
    # picows delivers a frame once it is complete, so invalid UTF-8 in the middle of one
    # unfragmented frame sent in slow pieces is found when the frame ends, not at once (a
    # fragmented message is checked fragment by fragment).
    "6.4.3": ("NON-STRICT", "OK", "picows: frames delivered whole, no fail-fast inside one"),
    "6.4.4": ("NON-STRICT", "OK", "picows: frames delivered whole, no fail-fast inside one"),
    # Behaviour the RFC leaves open: Autobahn only reports it.
    "7.1.6": ("INFORMATIONAL", "INFORMATIONAL", "a large message then close: unspecified"),
    "7.13.1": ("INFORMATIONAL", "INFORMATIONAL", "close code 5000: unspecified"),
    "7.13.2": ("INFORMATIONAL", "INFORMATIONAL", "close code 65535: unspecified"),
}

#: Cases that fail because of picows itself, each with the close reason picows sends (see the
#: README, "WebSocket conformance"). 7.1.2 sends two close frames at once: picows's parser
#: reads the second before it delivers the first, treats it as a protocol error and sends its
#: own close 1002 ahead of kefu's echo of the first (1000); nothing in a listener can stop it.
PICOWS_FAILURES: dict[str, str] = {
    "7.1.2": "Received CLOSE for the second time",
}


@pytest.fixture(scope="module", autouse=True)
def _kosoku_confined() -> Iterator[None]:
    """kosoku readies the Autobahn cases by changing the interpreter: its case and shim
    directories go first on ``sys.path`` (with a ``pkg_resources`` shim that has only
    ``resource_filename``) and ``binascii.b2a_hex`` is wrapped. Those stay this module's: the
    tests after it in the same process see the interpreter as it was."""
    path = list(sys.path)
    modules = set(sys.modules)
    b2a_hex = binascii.b2a_hex
    root = str(Path(kosoku.__file__).resolve().parent)
    yield
    sys.path[:] = path
    binascii.b2a_hex = b2a_hex
    for name in set(sys.modules) - modules:
        where = getattr(sys.modules[name], "__file__", None) or ""
        if where.startswith((f"{root}/shim", f"{root}/cases")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(tmp_path_factory.mktemp("autobahn"), config([], ws=SUITE_WS)) as server:
        yield server


def _verdict(case: Any) -> tuple[str, str]:
    return case.behavior.value, case.behavior_close.value


def _describe(case: Any) -> str:
    return (
        f"{case.case_id} {_verdict(case)}: {case.result} / {case.result_close} "
        f"(remote close {case.remote_close_code} {case.remote_close_reason!r})"
    )


def test_autobahn_core_cases(echo_server: ServerProcess) -> None:
    """Every core case passes, with the verdict pinned above (or a better one)."""
    url = f"ws://127.0.0.1:{echo_server.ws_port}{ECHO_PATH}"
    results: list[Any] = []

    async def suite() -> None:
        try:
            results.extend(await kosoku.run_fuzzingclient(url, cases=CORE_CASES))
        except kosoku.FailureError as failure:
            results.extend(failure.results)

    aio.run(suite, SUITE_TIMEOUT)

    assert len(results) == CORE_CASE_COUNT
    assert len({case.case_id for case in results}) == CORE_CASE_COUNT
    problems: list[str] = []
    for case in results:
        behavior, close = _verdict(case)
        if case.case_id in PICOWS_FAILURES:
            reason = PICOWS_FAILURES[case.case_id]
            if not case.passed and reason not in (case.remote_close_reason or ""):
                problems.append(f"not the documented picows failure: {_describe(case)}")
            continue
        if behavior not in ACCEPTABLE or close not in ACCEPTABLE or not case.passed:
            problems.append(f"failed: {_describe(case)}")
            continue
        want = NOT_OK.get(case.case_id, ("OK", "OK", ""))
        if _RANK[behavior] > _RANK[want[0]] or _RANK[close] > _RANK[want[1]]:
            problems.append(f"worse than {want[:2]}: {_describe(case)}")
    assert not problems, "\n".join(problems)
    # The server survived the suite and still speaks the chat protocol on its chat path.
    assert echo_server.proc is not None and echo_server.proc.poll() is None
    assert "Traceback" not in echo_server.stderr()

    async def chat_still_works() -> None:
        async with echo_server.rest() as api:
            chat = await api.create_chat()
        client, welcome = await echo_server.ws(chat["token"])
        try:
            assert (welcome["role"], welcome["convs"][0]["conv"]) == ("visitor", chat["session_id"])
            await client.ping()
        finally:
            await client.close()

    aio.run(chat_still_works, 30.0)


# ---------------------------------------------------------------------------------------------
# The echo mode itself, on an in-process WsServer


class _NoChat:
    """A handler the echo path must never call."""

    def __init__(self) -> None:
        self.calls = 0

    async def authenticate(self, conn: Connection, hello: Hello) -> Welcome:
        self.calls += 1
        return Welcome(role="visitor", id="v1", convs=[], ping_interval_ms=0, max_msg_bytes=0)

    async def on_ready(self, conn: Connection, hello: Hello) -> None:
        self.calls += 1

    async def on_frame(self, conn: Connection, frame: ClientFrame) -> None:
        self.calls += 1

    def on_close(self, conn: Connection) -> None:
        self.calls += 1


def test_echo_path_is_off_by_default() -> None:
    async def body() -> None:
        server = WsServer(WsConfig(port=0), _NoChat(), close_timeout_s=1.0)
        await server.start()
        try:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{server.port}{ECHO_PATH}", open_timeout=10)
            assert refused.value.response.status_code == 404
            assert server.refused["path"] == 1
        finally:
            await server.stop(timeout=2.0)

    aio.run(body, 30.0)


def test_echo_path_must_not_be_the_chat_path(tmp_path: Path) -> None:
    path = tmp_path / "kefu.yaml"
    path.write_text("ws: {path: /ws, echo_path: /ws}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert "`ws.echo_path` is the chat path" in str(refused.value)
    path.write_text("ws: {echo_path: /echo}\n", encoding="utf-8")
    assert load_config(path, env={}).ws.echo_path == "/echo"
    assert load_config(None, env={}).ws.echo_path is None  # off by default


def test_echo_path_echoes_without_hello_and_never_reaches_the_chat_handler() -> None:
    async def body() -> None:
        handler = _NoChat()
        server = WsServer(WsConfig(port=0, echo_path=ECHO_PATH), handler, close_timeout_s=1.0)
        await server.start()
        try:
            url = f"ws://127.0.0.1:{server.port}{ECHO_PATH}"
            async with connect(url, open_timeout=10, subprotocols=["kefu.msgpack"]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol is None  # echo is opcode for opcode, not MessagePack
                hello = '{"type":"hello","token":"x"}'
                for message in (hello, b"\x00\xff binary", "文字" * 1000, ""):
                    await ws.send(message)
                    assert await asyncio.wait_for(ws.recv(), 10) == message
                # More messages than the chat path's token bucket allows (burst 60).
                for i in range(200):
                    await ws.send(str(i))
                assert [await asyncio.wait_for(ws.recv(), 10) for _ in range(200)] == [
                    str(i) for i in range(200)
                ]
            # The RFC 6455 checks stay: invalid UTF-8 in a text frame fails with 1007.
            reader, writer = await _raw_upgrade(server.port, ECHO_PATH)
            writer.write(_masked_frame(0x1, b"ok \xff"))
            close = await asyncio.wait_for(reader.readexactly(4), 10)
            assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 1007, close
            await asyncio.wait_for(reader.readexactly(close[1] - 2), 10)  # the reason
            assert await asyncio.wait_for(reader.read(), 10) == b""  # then the server closes TCP
            writer.close()
            assert handler.calls == 0
        finally:
            await server.stop(timeout=2.0)

    aio.run(body, 30.0)


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set, masked with a random key; RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = os.urandom(4)
    mask = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")
    return head + key + masked


async def _raw_upgrade(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)  # read nothing, hold little
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def test_echo_to_a_peer_that_does_not_read_is_bounded() -> None:
    """A peer that writes and never reads: the server stops reading once its write buffer is
    past the high water, so the peer's writes stall and the server holds at most the high
    water plus one message; once the peer reads, every message comes back, in order."""
    message = 256 << 10
    count = 192  # 48 MiB: more than every kernel buffer between the two sockets together

    async def body() -> None:
        server = WsServer(
            WsConfig(port=0, echo_path=ECHO_PATH, max_msg_bytes=message),
            _NoChat(),
            close_timeout_s=1.0,
        )
        await server.start()
        try:
            reader, writer = await _raw_upgrade(server.port, ECHO_PATH)
            (conn,) = server._conns.values()
            out = conn._transport.underlying_transport  # type: ignore[union-attr]
            payloads = [bytes([i % 251]) * message for i in range(count)]
            held = 0
            stalled_at = -1
            for i, payload in enumerate(payloads):
                writer.write(_masked_frame(0x2, payload))
                held = max(held, out.get_write_buffer_size())
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    stalled_at = i  # the server stopped reading: the point of the test
                    break
                held = max(held, out.get_write_buffer_size())
            assert stalled_at >= 0, "the server read everything while nobody read its echoes"
            assert held <= TRANSPORT_HIGH_WATER + message + 1024, held

            async def write_the_rest() -> None:
                for payload in payloads[stalled_at + 1 :]:
                    writer.write(_masked_frame(0x2, payload))
                    await writer.drain()

            # Now read: every echo comes back in order, and the stalled writes go through.
            rest = asyncio.ensure_future(write_the_rest())
            for i in range(count):
                header = await asyncio.wait_for(reader.readexactly(10), 10)
                assert header == bytes((0x82, 127)) + struct.pack("!Q", message), header
                assert await asyncio.wait_for(reader.readexactly(message), 10) == payloads[i], i
            await asyncio.wait_for(rest, 10)
            writer.close()
        finally:
            await server.stop(timeout=2.0)

    aio.run(body, 60.0)
