"""The REST front end to end: a real Node (data in tmp_path, ws port 0) and an HttpServer on
port 0, requests from aiohttp's client over loopback, agents on the WebSocket from the
``websockets`` library. Every test is bounded by a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kefu.config import AgentConfig, BotConfig, Config, HttpConfig, IdentityConfig, WsConfig
from kefu.errors import KefuError
from kefu.metrics import LOOP_LAG_INTERVAL_S
from kefu.node import Node
from kefu.protocol import ErrorBody
from kefu.web.http import MAX_BODY_BYTES, HttpServer
from kefu.web.openapi import OPERATIONS, openapi_document
from kefu.web.pages import PAGE_PATHS
from tests import aio

TIMEOUT = 20.0
RECV_TIMEOUT = 5.0
AGENT_TOKEN = "agent-token"
ADMIN_TOKEN = "admin-token"
API_KEY = "api-key"
IDENTITY_SECRET = "identity-secret"


def run(test: Callable[[], Awaitable[None]], timeout: float = TIMEOUT) -> None:
    aio.run(test, timeout)


def make_config(data_dir: Path, *, identity_required: bool = False) -> Config:
    return Config(
        data_dir=str(data_dir),
        http=HttpConfig(host="127.0.0.1", port=0),
        ws=WsConfig(host="127.0.0.1", port=0),
        admin_token=ADMIN_TOKEN,
        api_key=API_KEY,
        identity=IdentityConfig(secret=IDENTITY_SECRET, required=identity_required),
        agents=[AgentConfig(id="alice", name="Alice", token=AGENT_TOKEN, max_chats=5)],
        bot=BotConfig(enabled=False),
    )


class Harness:
    def __init__(self, node: Node, server: HttpServer, http: aiohttp.ClientSession) -> None:
        self.node = node
        self.server = server
        self.http = http
        self.server_port = server.port

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | io.BytesIO | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One request; answers (status, decoded JSON body or text, response)."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        async with self.http.request(method, path, data=data, headers=h) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(raw), resp
            return resp.status, raw.decode(), resp

    async def create(self, **body: Any) -> dict[str, Any]:
        status, answer, _ = await self.call("POST", "/v1/chat/create", body)
        assert status in (200, 201), answer
        assert isinstance(answer, dict)
        return answer

    async def send(self, session: dict[str, Any], text: str, cid: str | None = None) -> Any:
        body: dict[str, Any] = {"session_id": session["session_id"], "text": text}
        if cid is not None:
            body["client_msg_id"] = cid
        status, answer, _ = await self.call("POST", "/v1/chat/send", body, token=session["token"])
        assert status == 200, answer
        return answer


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, config: Config | None = None, **changes: Any
) -> AsyncIterator[Harness]:
    """A node and its REST front on a free port; ``config`` replaces :func:`make_config`'s."""
    if config is None:
        config = make_config(tmp_path, **changes)
    node = Node(config)
    await node.start()
    server = HttpServer(config, node)
    try:
        await server.start()
        timeout = aiohttp.ClientTimeout(total=RECV_TIMEOUT)
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession(base_url=base, timeout=timeout) as http:
            yield Harness(node, server, http)
    finally:
        await server.stop()
        await node.stop()


def assert_error(status: int, body: Any, want_status: int, code: str) -> str:
    """``body`` is exactly an ErrorBody with ``code``; returns its message."""
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    decoded = msgspec.convert(body, ErrorBody)
    assert decoded.error.code == code, body
    assert decoded.error.message
    return decoded.error.message


# -- WebSocket side -----------------------------------------------------------------------------


async def recv(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (others skipped)."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
        frame: dict[str, Any] = json.loads(raw)
        if frame["type"] == kind:
            return frame


async def online_agent(node: Node, token: str = AGENT_TOKEN) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{node.ws_port}/ws")
    await ws.send(json.dumps({"type": "hello", "token": token}))
    welcome = await recv(ws, "welcome")
    assert welcome["role"] == "agent"
    await ws.send(json.dumps({"type": "status", "status": "online"}))
    assert (await recv(ws, "status"))["status"] == "online"
    return ws


# -- chat ---------------------------------------------------------------------------------------


def test_create_chat_and_identity(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            status, first, _ = await h.call("POST", "/v1/chat/create", {"user_id": "u1"})
            assert status == 201, first
            assert set(first) == {"session_id", "visitor_id", "token", "ws_url", "status"}
            assert re.fullmatch("[0-9a-f]{16}", first["session_id"])
            assert first["ws_url"] == h.node.public_config().ws_url
            assert first["ws_url"] == f"ws://127.0.0.1:{h.node.ws_port}/ws"
            assert first["status"] == "queued"  # no agent online, no bot
            status, again, _ = await h.call("POST", "/v1/chat/create", {"user_id": "u1"})
            assert status == 200
            assert again["session_id"] == first["session_id"]
            assert again["visitor_id"] == first["visitor_id"]
            status, other, _ = await h.call("POST", "/v1/chat/create", {})
            assert status == 201 and other["session_id"] != first["session_id"]

            bad = {"user_id": "u2", "user_hash": "0" * 64}
            status, answer, resp = await h.call("POST", "/v1/chat/create", bad)
            assert_error(status, answer, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            good = hmac.new(IDENTITY_SECRET.encode(), b"u2", hashlib.sha256).hexdigest()
            status, answer, _ = await h.call(
                "POST", "/v1/chat/create", {"user_id": "u2", "user_hash": good, "name": "Bo"}
            )
            assert status == 201, answer

    run(body)


def test_identity_required(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, identity_required=True) as h:
            status, answer, _ = await h.call("POST", "/v1/chat/create", {"user_id": "u1"})
            assert_error(status, answer, 401, "unauthorized")
            good = hmac.new(IDENTITY_SECRET.encode(), b"u1", hashlib.sha256).hexdigest()
            req = {"user_id": "u1", "user_hash": good}
            status, answer, _ = await h.call("POST", "/v1/chat/create", req)
            assert status == 201, answer

    run(body)


def test_send_reaches_agent_and_dedups(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            agent = await online_agent(h.node)
            session = await h.create(name="Bob")
            assert session["status"] == "assigned"
            conv = session["session_id"]
            assert (await recv(agent, "assigned"))["conv"] == conv

            answer = await h.send(session, "hello", "c1")
            assert answer == {"seq": 1, "status": "assigned", "replies": []}
            msg = await recv(agent, "msg")
            assert (msg["conv"], msg["seq"], msg["text"]) == (conv, 1, "hello")
            assert msg["from"]["role"] == "visitor" and msg["client_msg_id"] == "c1"

            # the API key acts as the session's visitor
            req = {"session_id": conv, "text": "from the back end"}
            status, answer, _ = await h.call("POST", "/v1/chat/send", req, token=API_KEY)
            assert status == 200 and answer["seq"] == 2, answer
            msg = await recv(agent, "msg")
            assert msg["seq"] == 2 and msg["from"]["id"] == session["visitor_id"]

            # a retry with the same client_msg_id: same seq, nothing stored twice
            again = await h.send(session, "hello", "c1")
            assert again["seq"] == 1
            status, page, _ = await h.call(
                "GET", f"/v1/chat/{conv}/messages", token=session["token"]
            )
            assert status == 200
            assert [(m["seq"], m["text"]) for m in page["messages"]] == [
                (1, "hello"),
                (2, "from the back end"),
            ]
            assert page["more"] is False and page["epoch"] == 1
            await agent.close()

    run(body)


def test_send_stream(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.create()
            req = {"session_id": session["session_id"], "text": "hi", "stream": True}
            status, text, resp = await h.call("POST", "/v1/chat/send", req, token=session["token"])
            assert status == 200
            assert resp.content_type == "text/event-stream"
            # no bot: no reply, so the stream is the `done` event alone
            event, data, rest = text.split("\n", 2)
            assert event == "event: done" and rest == "\n"
            assert json.loads(data.removeprefix("data: ")) == {
                "seq": 1,
                "status": "queued",
                "replies": [],
            }

    run(body)


def test_close_is_idempotent(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            agent = await online_agent(h.node)
            session = await h.create()
            conv = session["session_id"]
            await recv(agent, "assigned")
            for _ in range(2):
                status, answer, _ = await h.call(
                    "POST", "/v1/chat/close", {"session_id": conv}, token=session["token"]
                )
                assert status == 200
                assert answer == {"session_id": conv, "status": "closed"}
            closed = await recv(agent, "closed")
            assert closed["conv"] == conv and closed["by"] == "visitor"
            status, answer, _ = await h.call(
                "POST", "/v1/chat/send", {"session_id": conv, "text": "late"}, token=API_KEY
            )
            assert_error(status, answer, 409, "conversation_closed")
            # the API key closes too (already closed: still 200)
            status, answer, _ = await h.call(
                "POST", "/v1/chat/close", {"session_id": conv}, token=API_KEY
            )
            assert status == 200, answer
            await agent.close()

    run(body)


def test_history_paging(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.create()
            conv = session["session_id"]
            for i in range(5):
                assert (await h.send(session, f"m{i}"))["seq"] == i + 1

            async def page(query: str) -> tuple[list[int], bool]:
                status, answer, _ = await h.call(
                    "GET", f"/v1/chat/{conv}/messages{query}", token=session["token"]
                )
                assert status == 200, answer
                return [m["seq"] for m in answer["messages"]], answer["more"]

            assert await page("?limit=2") == ([1, 2], True)
            assert await page("?after=2&limit=2") == ([3, 4], True)
            assert await page("?after=4&limit=2") == ([5], False)
            assert await page("") == ([1, 2, 3, 4, 5], False)
            assert await page("?after=5") == ([], False)
            assert await page("?limit=500") == ([1, 2, 3, 4, 5], False)

            for query, name in [
                ("?limit=0", "limit"),
                ("?limit=501", "limit"),
                ("?limit=abc", "limit"),
                ("?limit=", "limit"),
                ("?limit=+5", "limit"),
                ("?limit=1&limit=2", "limit"),
                ("?after=-1", "after"),
                ("?after=1.5", "after"),
                ("?after=99999999999999999999", "after"),
            ]:
                status, answer, _ = await h.call(
                    "GET", f"/v1/chat/{conv}/messages{query}", token=session["token"]
                )
                message = assert_error(status, answer, 400, "invalid")
                assert f"`{name}`" in message, (query, message)

    run(body)


def test_chat_auth_rules(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            mine = await h.create()
            other = await h.create()
            conv = mine["session_id"]
            send = {"session_id": conv, "text": "hi"}
            close = {"session_id": conv}
            calls: list[tuple[str, str, Any]] = [
                ("POST", "/v1/chat/send", send),
                ("POST", "/v1/chat/close", close),
                ("GET", f"/v1/chat/{conv}/messages", None),
            ]
            for method, path, req in calls:
                status, answer, resp = await h.call(method, path, req)
                assert_error(status, answer, 401, "unauthorized")
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                basic = {"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}
                status, answer, _ = await h.call(method, path, req, headers=basic)
                assert_error(status, answer, 401, "unauthorized")
                # An agent may read a queued conversation's history (tests/test_http_workbench.py)
                # but not write into it over REST.
                # The admin may read any conversation's history but not write over REST.
                staff = () if method == "GET" else (AGENT_TOKEN, ADMIN_TOKEN)
                for token in (other["token"], "not-a-token", *staff):
                    status, answer, _ = await h.call(method, path, req, token=token)
                    assert_error(status, answer, 403, "forbidden")
            # nothing was written or closed by the refused calls
            status, page, _ = await h.call("GET", f"/v1/chat/{conv}/messages", token=API_KEY)
            assert status == 200 and page["messages"] == []
            assert (await h.send(mine, "still open"))["seq"] == 1
            # scheme case does not matter
            status, page, _ = await h.call(
                "GET",
                f"/v1/chat/{conv}/messages",
                headers={"Authorization": f"bearer {mine['token']}"},
            )
            assert status == 200 and len(page["messages"]) == 1
            # unknown sessions: 404 for the API key, 403 for a visitor token of another one
            for missing in ("0123456789abcdef", "not-a-session"):
                status, answer, _ = await h.call(
                    "GET", f"/v1/chat/{missing}/messages", token=API_KEY
                )
                assert_error(status, answer, 404, "not_found")
                status, answer, _ = await h.call(
                    "GET", f"/v1/chat/{missing}/messages", token=mine["token"]
                )
                assert_error(status, answer, 403, "forbidden")
            status, answer, _ = await h.call(
                "POST",
                "/v1/chat/send",
                {"session_id": "0123456789abcdef", "text": "x"},
                token=API_KEY,
            )
            assert_error(status, answer, 404, "not_found")

    run(body)


def test_admin_auth_and_close(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.create()
            conv = session["session_id"]
            calls: list[tuple[str, str, Any]] = [
                ("GET", "/v1/admin/agents", None),
                ("POST", "/v1/admin/agents", {"id": "bob", "name": "Bob"}),
                ("GET", "/v1/admin/agents/alice", None),
                ("PATCH", "/v1/admin/agents/alice", {"weight": 2}),
                ("DELETE", "/v1/admin/agents/alice", None),
                ("POST", f"/v1/admin/sessions/{conv}/close", None),
            ]
            for method, path, req in calls:
                status, answer, _ = await h.call(method, path, req)
                assert_error(status, answer, 401, "unauthorized")
                for token in (API_KEY, session["token"], AGENT_TOKEN, "nope"):
                    status, answer, _ = await h.call(method, path, req, token=token)
                    assert_error(status, answer, 403, "forbidden")
            status, agents, _ = await h.call("GET", "/v1/admin/agents", token=ADMIN_TOKEN)
            assert status == 200 and [a["id"] for a in agents["agents"]] == ["alice"]

            for _ in range(2):
                status, answer, _ = await h.call(
                    "POST", f"/v1/admin/sessions/{conv}/close", token=ADMIN_TOKEN
                )
                assert status == 200 and answer == {"session_id": conv, "status": "closed"}
            status, answer, _ = await h.call(
                "POST", "/v1/chat/send", {"session_id": conv, "text": "x"}, token=API_KEY
            )
            assert_error(status, answer, 409, "conversation_closed")
            for missing in ("0123456789abcdef", "nope"):
                status, answer, _ = await h.call(
                    "POST", f"/v1/admin/sessions/{missing}/close", token=ADMIN_TOKEN
                )
                assert_error(status, answer, 404, "not_found")

    run(body)


# -- errors -------------------------------------------------------------------------------------


def test_error_shapes(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            session = await h.create()
            token = session["token"]
            conv = session["session_id"]

            status, answer, _ = await h.call("GET", "/nope")
            assert_error(status, answer, 404, "not_found")
            status, answer, _ = await h.call("POST", "/v1/config", {})
            assert_error(status, answer, 405, "method_not_allowed")
            status, answer, resp = await h.call("GET", "/v1/chat/send", token=token)
            assert_error(status, answer, 405, "method_not_allowed")
            assert resp.headers["Allow"] == "POST"

            json_type = {"Content-Type": "application/json"}

            async def post(data: bytes | io.BytesIO, headers: dict[str, str]) -> tuple[int, Any]:
                status, answer, _ = await h.call(
                    "POST", "/v1/chat/send", token=token, data=data, headers=headers
                )
                return status, answer

            for raw in (b"{", b"", b"\xff\xfe", b'{"a": 1} x'):
                status, answer = await post(raw, json_type)
                assert_error(status, answer, 400, "bad_request")
            for raw in (b"[]", b"1", b'"text"', b"null"):
                status, answer = await post(raw, json_type)
                assert "object" in assert_error(status, answer, 400, "bad_request")
            status, answer = await post(msgspec.json.encode({"session_id": conv}), json_type)
            assert "`text`" in assert_error(status, answer, 400, "invalid")
            status, answer = await post(
                msgspec.json.encode({"session_id": conv, "text": 5}), json_type
            )
            assert "$.text" in assert_error(status, answer, 400, "invalid")
            status, answer = await post(
                msgspec.json.encode({"session_id": "XYZ", "text": "a"}), json_type
            )
            assert "session_id" in assert_error(status, answer, 400, "invalid")

            good = msgspec.json.encode({"session_id": conv, "text": "fits"})
            for content_type in ("text/plain", "application/x-www-form-urlencoded"):
                status, answer = await post(good, {"Content-Type": content_type})
                assert_error(status, answer, 415, "unsupported_media_type")
            status, answer = await post(good, {"Content-Type": "application/json; charset=latin-1"})
            assert_error(status, answer, 415, "unsupported_media_type")
            status, answer, _ = await h.call(
                "POST", "/v1/chat/send", token=token, data=good, headers={}
            )  # aiohttp sends bytes as application/octet-stream
            assert_error(status, answer, 415, "unsupported_media_type")
            status, answer = await post(good, {"Content-Type": "Application/JSON; charset=UTF-8"})
            assert status == 200 and answer["seq"] == 1, answer

            big = b'{"session_id": "' + conv.encode() + b'", "text": "' + b"a" * MAX_BODY_BYTES
            big += b'"}'
            status, answer = await post(io.BytesIO(big), json_type)  # with Content-Length
            assert_error(status, answer, 413, "payload_too_large")

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(MAX_BODY_BYTES // 65536 + 2):
                    yield b" " * 65536

            # no Content-Length (chunked): refused while reading
            async with h.http.post(
                "/v1/chat/send",
                data=chunks(),
                headers={**json_type, "Authorization": f"Bearer {token}"},
            ) as resp:
                assert_error(resp.status, await resp.json(), 413, "payload_too_large")
            # the connection pool still works, and nothing more was stored
            status, page, _ = await h.call("GET", f"/v1/chat/{conv}/messages", token=token)
            assert status == 200 and [m["seq"] for m in page["messages"]] == [1]

    run(body)


def test_unexpected_errors_are_500_without_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Strange(KefuError):
        code = "strange_code"

    async def body() -> None:
        async with serving(tmp_path) as h:

            def broken() -> Any:
                raise RuntimeError("secret detail")

            monkeypatch.setattr(h.node, "public_config", broken)
            with caplog.at_level(logging.ERROR, logger="kefu.http"):
                status, answer, _ = await h.call("GET", "/v1/config")
            assert_error(status, answer, 500, "internal")
            assert answer["error"]["message"] == "internal error"
            assert "secret detail" in caplog.text and "Traceback" in caplog.text

            def unmapped() -> Any:
                raise Strange("odd")

            monkeypatch.setattr(h.node, "list_agents", unmapped)
            status, answer, _ = await h.call("GET", "/v1/admin/agents", token=ADMIN_TOKEN)
            assert_error(status, answer, 500, "internal")
            assert "odd" not in json.dumps(answer)

    run(body)


# -- public endpoints ---------------------------------------------------------------------------


def store_gauge(families: dict[str, Any], name: str) -> float:
    return float(next(s.value for s in families[name].samples if s.name == name))


def test_config_healthz_metrics(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            status, config, _ = await h.call("GET", "/v1/config")
            assert status == 200
            assert config == msgspec.to_builtins(h.node.public_config())

            status, health, _ = await h.call("GET", "/healthz")
            assert status == 200 and health["status"] == "ok", health
            assert health["checks"]["store"] == "ok"

            session = await h.create()
            await h.send(session, "counted")
            async with h.http.get("/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                text = await resp.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}  # or raises
            messages = {
                s.labels["role"]: s.value
                for s in families["kefu_messages"].samples
                if s.name == "kefu_messages_total"
            }
            assert messages["visitor"] == 1
            # The loop's lag is sampled from the start; a collection forced here is timed.
            await asyncio.sleep(3 * LOOP_LAG_INTERVAL_S)
            gc.collect(1)
            async with h.http.get("/metrics") as resp:
                text = await resp.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            lag_count = next(
                s.value
                for s in families["kefu_event_loop_lag_seconds"].samples
                if s.name.endswith("_count")
            )
            assert lag_count >= 2
            assert store_gauge(families, "kefu_store_dedup_filter_active") == 1.0
            gc_counts = {
                s.labels["generation"]: s.value
                for s in families["kefu_gc_pause_seconds"].samples
                if s.name.endswith("_count")
            }
            assert set(gc_counts) == {"0", "1", "2"} and gc_counts["1"] >= 1

            h.node.store.close()  # what a failed write does too: the store takes no more
            status, health, _ = await h.call("GET", "/healthz")
            assert status == 503 and health["status"] == "unavailable", health
            assert health["checks"]["store"] == "unavailable"
            req = {"session_id": session["session_id"], "text": "lost?"}
            status, answer, resp = await h.call("POST", "/v1/chat/send", req, token=API_KEY)
            assert_error(status, answer, 503, "unavailable")
            assert resp.headers["Retry-After"] == "1"

    run(body)


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            status, doc, _ = await h.call("GET", "/openapi.json")
            assert status == 200
            assert doc == json.loads(json.dumps(openapi_document()))

            routes = {
                (r.method.lower(), r.resource.canonical)
                for r in h.server.app.router.routes()
                if r.resource is not None and r.resource.canonical not in PAGE_PATHS
            }
            documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
            assert routes == documented
            assert {(op.method, op.path) for op in OPERATIONS} == routes
            check_openapi_structure(doc)
            validate(doc)  # the OpenAPI 3.1 meta-schema, by openapi-spec-validator

    run(body)


_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def check_openapi_structure(doc: dict[str, Any]) -> None:
    """The parts of the OpenAPI 3.1 rules a client generator relies on."""
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"visitorToken", "apiKey", "adminToken", "agentToken", "agentSession"}
    for scheme in schemes.values():
        assert scheme == {"type": "http", "scheme": "bearer", "description": scheme["description"]}

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            out = [node["$ref"]] if "$ref" in node else []
            for value in node.values():
                out += refs(value)
            return out
        if isinstance(node, list):
            return [r for item in node for r in refs(item)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas

    operation_ids = set()
    for path, ops in doc["paths"].items():
        assert path.startswith("/")
        templated = set(re.findall(r"{(\w+)}", path))
        for method, op in ops.items():
            assert method in _METHODS
            assert op["operationId"] not in operation_ids
            operation_ids.add(op["operationId"])
            for requirement in op["security"]:
                assert set(requirement) <= set(schemes)
            params = op.get("parameters", [])
            assert {p["name"] for p in params if p["in"] == "path"} == templated
            for p in params:
                assert p["in"] in ("path", "query") and "schema" in p
                if p["in"] == "path":
                    assert p["required"] is True
            responses = op["responses"]
            assert responses and "500" in responses
            for code, response in responses.items():
                assert re.fullmatch("[1-5][0-9][0-9]", code) and response["description"]
                if int(code) >= 400 and path != "/healthz":
                    assert response["content"] == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                    }
            if op["security"]:
                assert {"401", "403"} <= set(responses)
            if "requestBody" in op:
                assert {"400", "413", "415"} <= set(responses)
                assert set(op["requestBody"]["content"]) == {"application/json"}


# -- admin --------------------------------------------------------------------------------------


def test_admin_agents_crud(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            admin = ADMIN_TOKEN
            new = {"id": "bob", "name": "Bob", "groups": ["sales"], "max_chats": 3}
            status, created, _ = await h.call("POST", "/v1/admin/agents", new, token=admin)
            assert status == 201, created
            assert created["id"] == "bob" and created["groups"] == ["sales"]
            assert created["max_chats"] == 3 and created["disabled"] is False
            assert created["token"]
            status, answer, _ = await h.call("POST", "/v1/admin/agents", new, token=admin)
            assert_error(status, answer, 409, "conflict")
            status, answer, _ = await h.call(
                "POST", "/v1/admin/agents", {"id": "-bad", "name": "X"}, token=admin
            )
            assert "$.id" in assert_error(status, answer, 400, "invalid")

            status, view, _ = await h.call("GET", "/v1/admin/agents/bob", token=admin)
            assert status == 200 and view == {k: v for k, v in created.items() if k != "token"}
            status, view, _ = await h.call(
                "PATCH", "/v1/admin/agents/bob", {"weight": 7, "max_chats": 1}, token=admin
            )
            assert status == 200 and (view["weight"], view["max_chats"]) == (7, 1), view
            status, answer, _ = await h.call(
                "PATCH", "/v1/admin/agents/bob", {"weight": 0}, token=admin
            )
            assert "$.weight" in assert_error(status, answer, 400, "invalid")
            status, listed, _ = await h.call("GET", "/v1/admin/agents", token=admin)
            assert sorted(a["id"] for a in listed["agents"]) == ["alice", "bob"]

            # the new agent logs in with its token and is given conversations
            bob = await online_agent(h.node, created["token"])
            session = await h.create()
            assert session["status"] == "assigned"
            assigned = await recv(bob, "assigned")
            assert assigned["conv"] == session["session_id"]
            assert assigned["agent"] == {"id": "bob", "name": "Bob"}
            await h.send(session, "for bob")
            assert (await recv(bob, "msg"))["text"] == "for bob"

            # agents of the config file belong to the file
            for method, req in (("PATCH", {"weight": 2}), ("DELETE", None)):
                status, answer, _ = await h.call(method, "/v1/admin/agents/alice", req, token=admin)
                assert "config file" in assert_error(status, answer, 409, "conflict")

            status, _, _ = await h.call("DELETE", "/v1/admin/agents/bob", token=admin)
            assert status == 204
            with pytest.raises(ConnectionClosed):
                await recv(bob, "never")
            assert bob.close_code == 1008
            for method, req in (("GET", None), ("PATCH", {"weight": 2}), ("DELETE", None)):
                status, answer, _ = await h.call(method, "/v1/admin/agents/bob", req, token=admin)
                assert_error(status, answer, 404, "unknown_agent")

    run(body)


def test_disabled_agent_is_logged_out(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            new = {"id": "carol", "name": "Carol"}
            status, created, _ = await h.call("POST", "/v1/admin/agents", new, token=ADMIN_TOKEN)
            assert status == 201
            carol = await online_agent(h.node, created["token"])
            status, view, _ = await h.call(
                "PATCH", "/v1/admin/agents/carol", {"disabled": True}, token=ADMIN_TOKEN
            )
            assert status == 200 and view["disabled"] is True
            with pytest.raises(ConnectionClosed):
                await recv(carol, "never")
            assert carol.close_code == 1008
            assert h.node.agent_of_token(created["token"]) is None

    run(body)


def test_stop_refuses_new_connections(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            port = h.server.port
            status, _, _ = await h.call("GET", "/healthz")
            assert status == 200
            await h.server.stop()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    run(body)


def test_stop_finishes_requests_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            entered = asyncio.Event()
            release = asyncio.Event()
            real = h.node.create_chat

            async def held(**kwargs: Any) -> Any:
                entered.set()
                await release.wait()
                return await real(**kwargs)

            monkeypatch.setattr(h.node, "create_chat", held)
            request = asyncio.create_task(h.call("POST", "/v1/chat/create", {}))
            await entered.wait()
            stopping = asyncio.create_task(h.server.stop())
            done, _ = await asyncio.wait({stopping}, timeout=0.1)
            assert not done  # stop waits for the request in flight
            release.set()
            status, answer, _ = await request
            assert status == 201, answer
            await stopping
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", h.server_port)

    run(body)


def test_stop_receives_the_body_of_a_request_in_flight(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            payload = b'{"name": "Ada"}'
            reader, writer = await asyncio.open_connection("127.0.0.1", h.server_port)
            writer.write(
                b"POST /v1/chat/create HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload) + payload[:5]
            )
            await writer.drain()
            # a round trip on another connection: by then the handler has the headers
            status, _, _ = await h.call("GET", "/healthz")
            assert status == 200 and h.server.in_flight == 1
            stopping = asyncio.create_task(h.server.stop())
            done, _ = await asyncio.wait({stopping}, timeout=0.1)
            assert not done
            with pytest.raises(OSError):  # the listener is closed already
                await asyncio.open_connection("127.0.0.1", h.server_port)
            writer.write(payload[5:])  # the rest of the body is still read
            answer = await asyncio.wait_for(reader.read(), RECV_TIMEOUT)
            head, _, created = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 201 "), answer
            assert b"\r\nConnection: close" in head
            assert json.loads(created)["status"] == "queued"
            await stopping
            writer.close()

    run(body)
