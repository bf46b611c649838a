"""``kefu.v1.Chat`` against a real ``kefu serve`` with the generated client: every call, the
credentials, bad arguments, rate limits, History paging and Subscribe (live, resume, a
subscriber that goes away), and TLS.

The REST API is the reference: where both can answer, the gRPC answer must say the same.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from kefu.grpc.v1 import kefu_pb2 as pb
from kefu.grpc.v1 import kefu_pb2_grpc as pb_grpc
from tests import aio
from tests.grpc.conftest import (
    ADMIN_TOKEN,
    API_KEY,
    CALL_TIMEOUT,
    REPO_ROOT,
    VISITOR_BURST,
    GrpcNode,
    node_config,
)
from tests.test_serve import TEST_CERT, TEST_KEY

pytestmark = pytest.mark.slow

TEST_TIMEOUT = 60.0
FAQ_QUESTION = "运费多少"  # answered by the sample knowledge base's bot


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def _stub(node: GrpcNode) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(node.grpc_target) as channel:
        yield pb_grpc.ChatStub(channel)


def _run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, TEST_TIMEOUT)


async def _refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error a call ends with (fails the test when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


def _trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in exc.trailing_metadata() or ():
        if k == key:
            return str(v)
    return None


def _assert_refused(exc: grpc.aio.AioRpcError, status: grpc.StatusCode, code: str) -> None:
    assert (exc.code(), _trailer(exc, "kefu-error-code")) == (status, code), exc


async def _create(stub: Any, **fields: Any) -> Any:
    return await stub.Create(pb.CreateRequest(**fields), timeout=CALL_TIMEOUT)


async def _rest(
    node: GrpcNode, method: str, path: str, token: str | None, body: object = None
) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, node.http_url + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def _visitor_connections(node: GrpcNode) -> int:
    status, stats = await _rest(node, "GET", "/v1/admin/stats", ADMIN_TOKEN)
    assert status == 200, stats
    return int(stats["connections"]["visitor"])


async def _drain(stream: Any) -> None:
    """Read ``stream`` to its end (an error raises)."""
    while await asyncio.wait_for(stream.read(), CALL_TIMEOUT) is not grpc.aio.EOF:
        pass


async def _next(stream: Any) -> Any:
    event = await asyncio.wait_for(stream.read(), CALL_TIMEOUT)
    assert event is not grpc.aio.EOF, "the stream ended"
    return event


# -- the calls ----------------------------------------------------------------------------------


def test_create_send_history_close(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub, name="Ann", metadata={"plan": "gold"})
            assert chat.created and chat.status == "bot" and chat.ws_url.startswith("ws://")
            assert len(chat.session_id) >= 16 and chat.visitor_id and chat.token
            auth = _auth(chat.token)

            sent = await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text=FAQ_QUESTION, client_msg_id="c1"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            assert (sent.seq, sent.dup, sent.status) == (1, False, "bot")
            assert sent.ts > 0
            # The bot owns the conversation: its answer comes with the call.
            assert [r.sender.role for r in sent.replies] == ["bot"]
            reply = sent.replies[0]
            assert (reply.seq, reply.conv) == (2, chat.session_id)
            assert "99" in reply.text

            # A retry of the same client_msg_id: the same seq, nothing new.
            again = await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text=FAQ_QUESTION, client_msg_id="c1"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            assert (again.seq, again.dup, list(again.replies)) == (1, True, [])

            page = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            assert [(m.seq, m.sender.role) for m in page.messages] == [(1, "visitor"), (2, "bot")]
            assert page.messages[0].client_msg_id == "c1" and page.messages[0].text == FAQ_QUESTION
            assert not page.more and page.epoch >= 1
            # The same page as REST's.
            status, rest = await _rest(
                node, "GET", f"/v1/chat/{chat.session_id}/messages", chat.token
            )
            assert status == 200
            assert [(m["seq"], m["id"], m["text"]) for m in rest["messages"]] == [
                (m.seq, m.id, m.text) for m in page.messages
            ]
            assert rest["epoch"] == page.epoch

            closed = await stub.Close(
                pb.CloseRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            assert (closed.session_id, closed.status) == (chat.session_id, "closed")
            # Idempotent, as REST.
            await stub.Close(
                pb.CloseRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            exc = await _refused(
                stub.Send(
                    pb.SendRequest(session_id=chat.session_id, text="still there?"),
                    metadata=auth,
                    timeout=CALL_TIMEOUT,
                )
            )
            _assert_refused(exc, grpc.StatusCode.FAILED_PRECONDITION, "conversation_closed")
            status, rest_refusal = await _rest(
                node,
                "POST",
                "/v1/chat/send",
                chat.token,
                {"session_id": chat.session_id, "text": "still there?"},
            )
            assert (status, rest_refusal["error"]["code"]) == (409, "conversation_closed")

    _run(body)


def test_create_gives_a_users_open_session_back(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            first = await _create(stub, user_id="grpc-user-1")
            second = await _create(stub, user_id="grpc-user-1")
            assert first.created and not second.created
            assert second.session_id == first.session_id

    _run(body)


def test_the_api_key_acts_as_the_sessions_visitor(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub, metadata={}, **{})
            key = _auth(API_KEY)
            sent = await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text="hello"),
                metadata=key,
                timeout=CALL_TIMEOUT,
            )
            page = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id), metadata=key, timeout=CALL_TIMEOUT
            )
            assert page.messages[0].seq == sent.seq == 1
            assert page.messages[0].sender.id == chat.visitor_id
            # The admin token reads any conversation's history, as over REST.
            admin = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id),
                metadata=_auth(ADMIN_TOKEN),
                timeout=CALL_TIMEOUT,
            )
            assert [m.id for m in admin.messages] == [m.id for m in page.messages]

    _run(body)


# -- refusals -----------------------------------------------------------------------------------


def test_credentials_are_checked_as_over_rest(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            mine = await _create(stub)
            other = await _create(stub)
            send = pb.SendRequest(session_id=mine.session_id, text="hi")
            unauth = grpc.StatusCode.UNAUTHENTICATED
            for metadata in (
                (),
                (("authorization", "Basic abc"),),
                (("authorization", "Bearer "),),
            ):
                exc = await _refused(stub.Send(send, metadata=metadata, timeout=CALL_TIMEOUT))
                _assert_refused(exc, unauth, "unauthorized")
            for call in (
                stub.Close(pb.CloseRequest(session_id=mine.session_id), timeout=CALL_TIMEOUT),
                stub.History(pb.HistoryRequest(session_id=mine.session_id), timeout=CALL_TIMEOUT),
            ):
                _assert_refused(await _refused(call), unauth, "unauthorized")
            stream = stub.Subscribe(pb.SubscribeRequest(session_id=mine.session_id))
            _assert_refused(await _refused(stream.read()), unauth, "unauthorized")

            # A token that does not grant this session: PERMISSION_DENIED (REST's 403).
            denied = grpc.StatusCode.PERMISSION_DENIED
            for token in ("not-a-token", other.token):
                exc = await _refused(stub.Send(send, metadata=_auth(token), timeout=CALL_TIMEOUT))
                _assert_refused(exc, denied, "forbidden")
                stream = stub.Subscribe(
                    pb.SubscribeRequest(session_id=mine.session_id), metadata=_auth(token)
                )
                _assert_refused(await _refused(stream.read()), denied, "forbidden")
            # The API key on a session that does not exist: NOT_FOUND (REST's 404).
            missing = "0" * 32 if len(mine.session_id) == 32 else "0" * len(mine.session_id)
            exc = await _refused(
                stub.Send(
                    pb.SendRequest(session_id=missing, text="hi"),
                    metadata=_auth(API_KEY),
                    timeout=CALL_TIMEOUT,
                )
            )
            _assert_refused(exc, grpc.StatusCode.NOT_FOUND, "not_found")
            status, rest = await _rest(
                node, "POST", "/v1/chat/send", API_KEY, {"session_id": missing, "text": "hi"}
            )
            assert (status, rest["error"]["code"]) == (404, "not_found")
            stream = stub.Subscribe(
                pb.SubscribeRequest(session_id=missing), metadata=_auth(API_KEY)
            )
            _assert_refused(await _refused(stream.read()), grpc.StatusCode.NOT_FOUND, "not_found")

    _run(body)


def test_bad_arguments_are_invalid_argument(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            for request, field in (
                (pb.SendRequest(session_id=chat.session_id, text=""), "text"),
                (pb.SendRequest(session_id=chat.session_id, text="a\x00b"), "text"),
                (pb.SendRequest(session_id=chat.session_id, text="x" * 16_001), "text"),
                (pb.SendRequest(session_id="nope", text="hi"), "session_id"),
                (
                    pb.SendRequest(session_id=chat.session_id, text="hi", client_msg_id=""),
                    "client_msg_id",
                ),
            ):
                exc = await _refused(stub.Send(request, metadata=auth, timeout=CALL_TIMEOUT))
                _assert_refused(exc, invalid, "invalid")
                assert field in (exc.details() or ""), exc.details()
            for request in (
                pb.HistoryRequest(session_id=chat.session_id, limit=0),
                pb.HistoryRequest(session_id=chat.session_id, limit=501),
                pb.HistoryRequest(session_id=chat.session_id, after=2**63),
            ):
                exc = await _refused(stub.History(request, metadata=auth, timeout=CALL_TIMEOUT))
                _assert_refused(exc, invalid, "invalid")
            exc = await _refused(_create(stub, name="two\nlines"))
            _assert_refused(exc, invalid, "invalid")
            assert "name" in (exc.details() or "")
            exc = await _refused(
                stub.Subscribe(pb.SubscribeRequest(session_id="nope"), metadata=auth).read()
            )
            _assert_refused(exc, invalid, "invalid")
            # A user_hash that does not match: UNAUTHENTICATED, as REST's 401.
            exc = await _refused(_create(stub, user_id="u-1", user_hash="00" * 32))
            _assert_refused(exc, grpc.StatusCode.UNAUTHENTICATED, "unauthorized")
            # Nothing of this was stored.
            page = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            assert list(page.messages) == []

    _run(body)


def test_rate_limit_is_resource_exhausted_with_retry_info(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            refused = None
            sent = 0
            for i in range(VISITOR_BURST + 10):
                try:
                    await stub.Send(
                        pb.SendRequest(session_id=chat.session_id, text=f"message {i}"),
                        metadata=auth,
                        timeout=CALL_TIMEOUT,
                    )
                    sent += 1
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            assert refused is not None, f"{sent} sends, none refused"
            assert sent >= VISITOR_BURST - 1  # the burst, less what a bot turn may not refill
            _assert_refused(refused, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
            retry_ms = int(_trailer(refused, "retry-after-ms") or "0")
            assert 1000 <= retry_ms <= 60_000
            # The refused call stored nothing: the history ends with the last accepted message.
            page = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id, limit=500),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            visitor_texts = [m.text for m in page.messages if m.sender.role == "visitor"]
            assert visitor_texts == [f"message {i}" for i in range(sent)]

    _run(body)


# -- History paging -----------------------------------------------------------------------------


def test_history_pages_through_every_message_once(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            top = 0
            for i in range(7):
                sent = await stub.Send(
                    pb.SendRequest(session_id=chat.session_id, text=f"page {i}"),
                    metadata=auth,
                    timeout=CALL_TIMEOUT,
                )
                top = max([sent.seq, *(r.seq for r in sent.replies)])
            seqs: list[int] = []
            after, pages = 0, 0
            while True:
                page = await stub.History(
                    pb.HistoryRequest(session_id=chat.session_id, after=after, limit=3),
                    metadata=auth,
                    timeout=CALL_TIMEOUT,
                )
                pages += 1
                assert len(page.messages) <= 3
                seqs += [m.seq for m in page.messages]
                if not page.more:
                    break
                assert len(page.messages) == 3
                after = page.messages[-1].seq
            assert seqs == list(range(1, top + 1))
            assert pages == -(-top // 3) or (top % 3 == 0 and pages == top // 3 + 1)

    _run(body)


# -- Subscribe ----------------------------------------------------------------------------------


def test_subscribe_receives_live_messages_from_rest_and_grpc(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            stream = stub.Subscribe(pb.SubscribeRequest(session_id=chat.session_id), metadata=auth)
            first = await _next(stream)
            assert first.type == "subscribed" and first.WhichOneof("body") == "subscribed"
            assert (first.subscribed.conv, first.subscribed.top_seq) == (chat.session_id, 0)
            assert first.subscribed.status == "bot"

            status, _ = await _rest(
                node,
                "POST",
                "/v1/chat/send",
                API_KEY,
                {"session_id": chat.session_id, "text": FAQ_QUESTION, "client_msg_id": "r1"},
            )
            assert status == 200
            await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text=FAQ_QUESTION),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            msgs = []
            while len(msgs) < 4:  # each visitor message and the bot's answer to it
                event = await _next(stream)
                if event.type == "msg":
                    msgs.append(event.msg)
                else:
                    assert event.WhichOneof("body") == "frame_json"
                    assert json.loads(event.frame_json)["type"] == event.type
            assert [m.seq for m in msgs] == [1, 2, 3, 4]
            assert [(m.sender.role, m.text == FAQ_QUESTION) for m in msgs] == [
                ("visitor", True),
                ("bot", False),
                ("visitor", True),
                ("bot", False),
            ]
            assert msgs[0].client_msg_id == "r1"
            # The API key may subscribe too, as the session's visitor.
            observer = stub.Subscribe(
                pb.SubscribeRequest(session_id=chat.session_id), metadata=_auth(API_KEY)
            )
            assert (await _next(observer)).subscribed.top_seq == 4
            observer.cancel()
            stream.cancel()

    _run(body)


def test_subscribe_resume_gives_exactly_the_missing_messages(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            for i in range(4):
                await stub.Send(
                    pb.SendRequest(session_id=chat.session_id, text=f"before {i}"),
                    metadata=auth,
                    timeout=CALL_TIMEOUT,
                )
            page = await stub.History(
                pb.HistoryRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            top = page.messages[-1].seq
            assert top >= 4
            last = 2  # the subscriber had seq 1..2
            stream = stub.Subscribe(
                pb.SubscribeRequest(
                    session_id=chat.session_id,
                    resume=pb.ResumePoint(epoch=page.epoch, last_seq=last),
                ),
                metadata=auth,
            )
            assert (await _next(stream)).subscribed.top_seq == top
            replayed = []
            while True:
                event = await _next(stream)
                if event.type == "resumed":
                    resumed = event.resumed
                    break
                if event.type == "msg":
                    replayed.append(event.msg)
            assert [m.seq for m in replayed] == list(range(last + 1, top + 1))
            assert [m.id for m in replayed] == [m.id for m in page.messages[last:]]
            assert (resumed.recovered, resumed.from_seq, resumed.to_seq) == (True, last + 1, top)
            # Then live, each message once: the next one is top + 1.
            await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text="after"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            event = await _next(stream)
            while event.type != "msg":
                event = await _next(stream)
            assert (event.msg.seq, event.msg.text) == (top + 1, "after")
            stream.cancel()

            # Another epoch: not recovered (the client pages History), as on the WebSocket.
            stale = stub.Subscribe(
                pb.SubscribeRequest(
                    session_id=chat.session_id,
                    resume=pb.ResumePoint(epoch=page.epoch + 1, last_seq=1),
                ),
                metadata=auth,
            )
            await _next(stale)
            event = await _next(stale)
            assert event.type == "resumed" and not event.resumed.recovered
            stale.cancel()

    _run(body)


def test_a_subscriber_that_goes_away_is_unregistered(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            before = await _visitor_connections(node)
            streams = [
                stub.Subscribe(pb.SubscribeRequest(session_id=chat.session_id), metadata=auth)
                for _ in range(3)
            ]
            for stream in streams:
                await _next(stream)
            await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text="to three"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            for stream in streams:
                assert (await _next(stream)).msg.text == "to three"
            assert await _visitor_connections(node) == before + 3
            # Cancelled mid-stream (one with an event still unread).
            await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text="unread"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            for stream in streams:
                stream.cancel()
            for _ in range(200):
                if await _visitor_connections(node) == before:
                    break
                await asyncio.sleep(0.05)
            assert await _visitor_connections(node) == before
            # The server is as healthy as before: calls and new subscriptions work.
            fresh = stub.Subscribe(pb.SubscribeRequest(session_id=chat.session_id), metadata=auth)
            assert (await _next(fresh)).type == "subscribed"
            sent = await stub.Send(
                pb.SendRequest(session_id=chat.session_id, text="still here"),
                metadata=auth,
                timeout=CALL_TIMEOUT,
            )
            event = await _next(fresh)
            while event.type != "msg":
                event = await _next(fresh)
            assert event.msg.seq == sent.seq
            fresh.cancel()

    _run(body)


def test_a_client_that_vanishes_is_unregistered(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
        before = await _visitor_connections(node)
        # A whole channel closed under an open stream (the back end went away).
        channel = grpc.aio.insecure_channel(node.grpc_target)
        stream = pb_grpc.ChatStub(channel).Subscribe(
            pb.SubscribeRequest(session_id=chat.session_id), metadata=_auth(chat.token)
        )
        await _next(stream)
        assert await _visitor_connections(node) == before + 1
        await channel.close(grace=None)
        for _ in range(200):
            if await _visitor_connections(node) == before:
                break
            await asyncio.sleep(0.05)
        assert await _visitor_connections(node) == before

    _run(body)


def test_subscribe_ends_after_the_conversation_closes(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            stream = stub.Subscribe(pb.SubscribeRequest(session_id=chat.session_id), metadata=auth)
            await _next(stream)
            await stub.Close(
                pb.CloseRequest(session_id=chat.session_id), metadata=auth, timeout=CALL_TIMEOUT
            )
            event = await _next(stream)
            assert event.type == "closed"
            assert json.loads(event.frame_json)["conv"] == chat.session_id
            assert await asyncio.wait_for(stream.read(), CALL_TIMEOUT) is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK

    _run(body)


# -- TLS ---------------------------------------------------------------------------------------
#
# grpcio's client cannot be held to TLS 1.2, so the test speaks gRPC itself: HTTP/2 over a
# Python ssl socket (RFC 9113 frames; headers as HPACK literals, RFC 7541 section 6.2.2).


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _literal(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _raw_create(
    host: str, port: int, cafile: Path, max_version: ssl.TLSVersion
) -> tuple[str, bool]:
    """One ``Create`` call over HTTP/2 with TLS at most ``max_version``: the version
    negotiated, and whether an answer message (a DATA frame) came back."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.maximum_version = max_version
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=CALL_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        version = str(sock.version())
        headers = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "https"),
                (":path", "/kefu.v1.Chat/Create"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        message = b"\x00" + len(b"").to_bytes(4, "big")  # an empty CreateRequest
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0)  # SETTINGS
            + _frame(1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _frame(0, 0x1, 1, message)  # DATA, END_STREAM
        )
        got_data = False
        while True:
            head = _recv_exactly(sock, 9)
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            _recv_exactly(sock, length)
            if kind == 4 and not flags & 0x1:
                sock.sendall(_frame(4, 0x1, 0))  # SETTINGS ACK
            elif kind == 0 and stream == 1 and length > 0:
                got_data = True
            if (stream == 1 and flags & 0x1) or kind in (3, 7):  # END_STREAM, RST, GOAWAY
                return version, got_data


# -- the process --------------------------------------------------------------------------------


def test_tls_and_the_command_line_port(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(TEST_CERT)
    key.write_text(TEST_KEY)
    cfg = node_config(tls={"cert": str(cert), "key": str(key)})
    del cfg["grpc"]
    server = GrpcNode(tmp_path / "tls", cfg, ["--grpc-port", "0"])
    try:
        server.wait_ready()
        scheme, host, port = server.urls["grpc"]
        assert scheme == "grpcs"

        async def body() -> None:
            credentials = grpc.ssl_channel_credentials(TEST_CERT.encode())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                stub = pb_grpc.ChatStub(channel)
                chat = await stub.Create(pb.CreateRequest(), timeout=CALL_TIMEOUT)
                assert chat.status == "bot"
                stream = stub.Subscribe(
                    pb.SubscribeRequest(session_id=chat.session_id), metadata=_auth(chat.token)
                )
                assert (await _next(stream)).type == "subscribed"
                # A graceful stop ends an open subscription with UNAVAILABLE (the WebSocket's
                # 1001) and still exits 0.
                assert await asyncio.to_thread(server.stop) == 0
                exc = await _refused(_drain(stream))
                _assert_refused(exc, grpc.StatusCode.UNAVAILABLE, "unavailable")
                assert _trailer(exc, "retry-after-ms") == "1000"

        # What an ordinary client negotiates: TLS 1.3.
        client = ssl.create_default_context(cafile=str(cert))
        client.set_alpn_protocols(["h2"])
        with (
            socket.create_connection((host, port), timeout=CALL_TIMEOUT) as sock,
            client.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.3"
        # The same call by hand: served over TLS 1.3, refused over 1.2.
        assert _raw_create(host, port, cert, ssl.TLSVersion.TLSv1_3) == ("TLSv1.3", True)
        assert _raw_create(host, port, cert, ssl.TLSVersion.TLSv1_2) == ("TLSv1.2", False)

        async def plain() -> None:
            # A plain-text client gets nowhere.
            async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                exc = await _refused(
                    pb_grpc.ChatStub(channel).Create(pb.CreateRequest(), timeout=CALL_TIMEOUT)
                )
                assert exc.code() == grpc.StatusCode.UNAVAILABLE

        _run(plain)
        _run(body)
    finally:
        server.kill()


def test_without_grpcio_a_configured_port_stops_the_start(tmp_path: Path) -> None:
    # A `grpc` package that cannot be imported stands for an installation without the extra.
    fake = tmp_path / "no-grpc" / "grpc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named grpc')\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kefu",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--http-port",
            "0",
            "--ws-port",
            "0",
            "--grpc-port",
            "0",
        ],
        env={"PYTHONPATH": f"{fake.parent}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "pip install kefu[grpc]" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_a_slow_subscriber_is_ended_with_resource_exhausted(tmp_path: Path) -> None:
    cfg = node_config(
        ws={"outbound_limit_bytes": 65_536},
        limits={"per_visitor": {"per_second": 100_000.0, "burst": 100_000}},
        bot={"enabled": False},
    )
    server = GrpcNode(tmp_path / "slow", cfg, [])
    try:
        server.wait_ready()

        async def body() -> None:
            async with _stub(server) as stub:
                chat = await _create(stub)
                before = await _visitor_connections(server)
                stream = stub.Subscribe(
                    pb.SubscribeRequest(session_id=chat.session_id), metadata=_auth(chat.token)
                )
                await _next(stream)  # then it reads nothing while messages pour in
                key = _auth(API_KEY)
                text = "x" * 16_000
                ended = None
                for _ in range(100):  # at most 100 x 20 x 16 KB = 32 MB
                    await asyncio.gather(
                        *(
                            stub.Send(
                                pb.SendRequest(session_id=chat.session_id, text=text),
                                metadata=key,
                                timeout=CALL_TIMEOUT,
                            )
                            for _ in range(20)
                        )
                    )
                    if await _visitor_connections(server) == before:
                        ended = True
                        break
                assert ended, "the subscriber that does not read was never ended"
                # What was delivered before the end is in order, then the refusal.
                seqs = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while True:
                        event = await _next(stream)
                        if event.type == "msg":
                            seqs.append(event.msg.seq)
                _assert_refused(info.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "slow_consumer")
                assert seqs == list(range(1, len(seqs) + 1))
                # The node goes on: a new subscriber gets where the conversation stands.
                fresh = stub.Subscribe(
                    pb.SubscribeRequest(session_id=chat.session_id), metadata=_auth(chat.token)
                )
                assert (await _next(fresh)).subscribed.top_seq > len(seqs)
                fresh.cancel()

        _run(body)
        assert server.stop() == 0
    finally:
        server.kill()


def test_a_grpc_port_in_use_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = node_config()
        del cfg["grpc"]
        server = GrpcNode(tmp_path / "taken", cfg, ["--grpc-port", str(port)])
        try:
            code = server.proc.wait(60)
        finally:
            server.kill()
    assert code == 1
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in server.stderr


def test_subscribers_count_under_the_visitors_connection_cap(node: GrpcNode) -> None:
    async def body() -> None:
        async with _stub(node) as stub:
            chat = await _create(stub)
            auth = _auth(chat.token)
            cap = 8  # limits.ws_connections_per_visitor's default
            streams = [
                stub.Subscribe(pb.SubscribeRequest(session_id=chat.session_id), metadata=auth)
                for _ in range(cap)
            ]
            for stream in streams:
                assert (await _next(stream)).type == "subscribed"
            one_more = stub.Subscribe(
                pb.SubscribeRequest(session_id=chat.session_id), metadata=auth
            )
            exc = await _refused(one_more.read())
            _assert_refused(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
            assert _trailer(exc, "retry-after-ms") == "1000"
            # A place freed is a place taken again.
            streams.pop().cancel()
            for _ in range(200):
                again = stub.Subscribe(
                    pb.SubscribeRequest(session_id=chat.session_id), metadata=auth
                )
                try:
                    first = await _next(again)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
                    continue
                assert first.type == "subscribed"
                streams.append(again)
                break
            assert len(streams) == cap
            for stream in streams:
                stream.cancel()

    _run(body)
