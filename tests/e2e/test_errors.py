"""Every row of PROTOCOL.md's "Errors and limits" table against ``kefu serve``, each followed by
the proof that the connection still works or, after a close, that the server takes a new one.

One server for the module, with small limits so each row is cheap to reach: a 1 KiB message
cap, a hello deadline of one second, a token bucket of 10 commands refilled at 1 a second, the
smallest outbound queue (64 KiB) and an Origin allow-list. No agent is online: conversations
wait in the queue, where the visitor may already write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from tests.e2e.harness import (
    RECV_TIMEOUT,
    Closed,
    ServerProcess,
    WsClient,
    agent,
    config,
    run,
    running,
)

pytestmark = pytest.mark.slow  # starts `kefu serve` processes

MAX_MSG_BYTES = 1024
HELLO_TIMEOUT_S = 1.0
BURST = 10
RATE_CLOSE_AFTER = 3
OUTBOUND_LIMIT = 64 * 1024
ALLOWED_ORIGIN = "https://shop.example.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = config(
        [agent("alice")],
        ws={
            "hello_timeout_s": HELLO_TIMEOUT_S,
            "max_msg_bytes": MAX_MSG_BYTES,
            "rate": {"per_second": 1.0, "burst": BURST},
            "rate_close_after": RATE_CLOSE_AFTER,
            "outbound_limit_bytes": OUTBOUND_LIMIT,
        },
        allowed_origins=[ALLOWED_ORIGIN],
        # A visitor's REST sends share its per-visitor bucket, ws.rate by default: the slow
        # consumer test pushes hundreds of them at once.
        limits={"per_visitor": {"per_second": 100_000.0, "burst": 100_000}},
    )
    with running(tmp_path_factory.mktemp("errors"), cfg) as server:
        yield server


async def visitor(server: ServerProcess) -> tuple[WsClient, str, str]:
    """A new conversation and its visitor's connection: ``(client, conv, token)``."""
    async with server.rest() as api:
        chat = await api.create_chat()
    client, welcome = await server.ws(chat["token"])
    assert welcome["convs"][0]["conv"] == chat["session_id"]
    await client.ping()  # drops the queued position the hello may bring
    return client, chat["session_id"], chat["token"]


async def still_serves(server: ServerProcess) -> None:
    """After a close: the server takes a new connection and answers it."""
    client, conv, _token = await visitor(server)
    assert (await client.say(conv, "alive", "still here"))["seq"] == 1
    await client.close()


def test_bad_frames_keep_the_connection(server: ServerProcess) -> None:
    async def body() -> None:
        client, conv, _token = await visitor(server)
        cases: list[tuple[str, str, str | None]] = [
            ("{not json", "bad_frame", None),
            ("[1, 2, 3]", "bad_frame", None),
            (json.dumps({"type": "no_such_type"}), "unknown_type", "no_such_type"),
            (json.dumps({"type": "send", "conv": conv, "client_msg_id": "m1"}), "invalid", "m1"),
        ]
        for raw, code, ref in cases:
            await client.send_raw(raw)
            err = await client.recv()
            assert err["type"] == "error" and err["code"] == code, (raw, err)
            assert isinstance(err["message"], str) and err["message"]
            if ref is not None:
                assert err.get("ref") == ref, (raw, err)
        # the same connection still works
        assert (await client.say(conv, "ok", "fine"))["seq"] == 1
        await client.close()

    run(body)


def test_forbidden_conversation_keeps_the_connection(server: ServerProcess) -> None:
    async def body() -> None:
        owner, conv, _ = await visitor(server)
        intruder, own_conv, _ = await visitor(server)
        await intruder.send(type="send", conv=conv, client_msg_id="x1", text="boo")
        err = await intruder.recv()
        assert (err["type"], err["code"], err.get("ref")) == ("error", "forbidden", "x1")
        await intruder.send(type="sync", conv=conv, after=0, limit=10)
        assert (await intruder.recv())["code"] == "forbidden"
        await intruder.send(type="status", status="online")  # agents only
        assert (await intruder.recv())["code"] == "forbidden"
        assert (await intruder.say(own_conv, "mine", "my own"))["seq"] == 1
        await owner.send(type="sync", conv=conv, after=0, limit=10)
        assert (await owner.recv("history"))["messages"] == []
        await owner.close()
        await intruder.close()

    run(body)


def test_message_over_max_msg_bytes_closes_1009(server: ServerProcess) -> None:
    async def body() -> None:
        client, conv, _ = await visitor(server)
        frame = {"type": "send", "conv": conv, "client_msg_id": "big", "text": "x" * MAX_MSG_BYTES}
        await client.send_raw(json.dumps(frame))
        code, _reason = await client.closed()
        assert code == 1009
        await still_serves(server)

    run(body)


def test_no_hello_within_deadline_closes_1008(server: ServerProcess) -> None:
    async def body() -> None:
        client = await server.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, _reason = await client.closed()
        assert code == 1008
        assert loop.time() - started >= HELLO_TIMEOUT_S * 0.5
        await still_serves(server)

    run(body)


def test_first_frame_not_hello_closes_1008(server: ServerProcess) -> None:
    async def body() -> None:
        client = await server.connect()
        await client.send(type="ping")
        assert (await client.closed())[0] == 1008
        await still_serves(server)

    run(body)


def test_bad_token_closes_1008(server: ServerProcess) -> None:
    async def body() -> None:
        client = await server.connect()
        await client.send(type="hello", token="not-a-token-at-all")
        assert (await client.closed())[0] == 1008
        await still_serves(server)

    run(body)


def test_token_bucket_rate_limited_then_4029(server: ServerProcess) -> None:
    async def body() -> None:
        client, _conv, _ = await visitor(server)  # hello and one ping spent
        # The rest of the burst, one at a time: each is answered.
        for _ in range(BURST - 2):
            await client.send(type="ping")
            assert (await client.recv())["type"] == "pong"
        # Then a flood. Refusals are decided as frames are read, while accepted commands are
        # handled after: a close drops the ones not handled yet, so the flood comes after.
        with contextlib.suppress(ConnectionClosed):  # the close may come before the last
            for _ in range(RATE_CLOSE_AFTER + 5):
                await client.send(type="ping")
        frames: list[dict[str, Any]] = []
        with contextlib.suppress(Closed):
            while True:
                frames.append(await client.recv())
        kinds = [f["type"] if f["type"] != "error" else f["code"] for f in frames]
        # A slow run may have refilled a token (1 per second) for one more pong.
        pongs = kinds.count("pong")
        assert pongs <= 1, kinds
        assert kinds == ["pong"] * pongs + ["rate_limited"] * (RATE_CLOSE_AFTER - 1), kinds
        assert (await client.closed())[0] == 4029
        await still_serves(server)

    run(body)


def test_slow_consumer_closed_4008(server: ServerProcess) -> None:
    """A visitor that stops reading while its own messages are pushed back to it: once its
    outbound queue passes ``outbound_limit_bytes`` the server closes with 4008."""

    async def body() -> None:
        async with server.rest() as api:
            chat = await api.create_chat()
        conv, token = chat["session_id"], chat["token"]
        # A small receive buffer and a one-frame client queue: little room outside the server.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.ws_port))
        conn = await asyncio.wait_for(
            connect(server.ws_url, sock=sock, max_queue=1, ping_interval=None), RECV_TIMEOUT
        )
        await asyncio.wait_for(conn.send(json.dumps({"type": "hello", "token": token})), 5)
        assert json.loads(await asyncio.wait_for(conn.recv(), RECV_TIMEOUT))["type"] == "welcome"
        # From here the client reads nothing while 8 MiB of messages are pushed to it. The
        # kernel buffers on both sides hold a few MiB (about 2.5 MiB on a stock Linux
        # loopback, with tcp_wmem's 4 MiB ceiling); the rest must overflow the 64 KiB queue.
        text = "z" * 16_000
        async with server.rest() as api:
            for i in range(512):
                await api.send(conv, token, text, client_msg_id=f"s{i}")
        # now it reads again: everything queued before the close, then the close frame
        slow = WsClient(conn)
        code, reason = await slow.closed()
        assert code == 4008, (code, reason)
        await still_serves(server)

    run(body, timeout=120)


def test_origin_not_allowed_is_403(server: ServerProcess) -> None:
    async def body() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await asyncio.wait_for(
                connect(server.ws_url, origin=Origin("https://evil.example.com")), RECV_TIMEOUT
            )
        assert refused.value.response.status_code == 403
        async with server.rest() as api:
            chat = await api.create_chat()
        allowed, welcome = await server.ws(chat["token"], origin=ALLOWED_ORIGIN)
        assert welcome["role"] == "visitor"
        await allowed.ping()
        await allowed.close()

    run(body)
