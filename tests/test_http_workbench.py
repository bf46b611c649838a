"""The REST the web front uses beyond PROTOCOL.md's table: the agent workbench's endpoints
(``/v1/agent/...``), the admin page's live figures, and the pages themselves with their
security headers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from kefu.protocol import AdminStats, AgentConversations, AgentMe
from kefu.web.pages import STATIC_DIR, content_security_policy
from tests.test_http import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    API_KEY,
    assert_error,
    run,
    serving,
)

RECV = 5.0


def _text(frame: dict[str, Any]) -> str:
    """A JSON text frame (bytes would go out as a binary frame, which means MessagePack)."""
    return msgspec.json.encode(frame).decode()


async def _agent_online(ws_url: str) -> Any:
    ws = await connect(ws_url)
    await ws.send(_text({"type": "hello", "token": AGENT_TOKEN}))
    welcome = msgspec.json.decode(await asyncio.wait_for(ws.recv(), RECV))
    assert welcome["type"] == "welcome" and welcome["role"] == "agent"
    await ws.send(_text({"type": "status", "status": "online"}))
    return ws


async def _frame_of(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame = msgspec.json.decode(await asyncio.wait_for(ws.recv(), RECV))
        if frame["type"] == kind:
            return frame


def test_agent_me_and_quick_replies(tmp_path: Any) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            status, me, _ = await h.call("GET", "/v1/agent/me", token=AGENT_TOKEN)
            assert status == 200, me
            decoded = msgspec.convert(me, AgentMe)
            assert decoded.id == "alice" and decoded.name == "Alice"
            assert decoded.status == "offline"  # no connection yet
            assert decoded.quick_replies and all(q.title and q.text for q in decoded.quick_replies)
            for token in (ADMIN_TOKEN, API_KEY, "nope"):
                status, answer, _ = await h.call("GET", "/v1/agent/me", token=token)
                assert_error(status, answer, 403, "forbidden")
            status, answer, _ = await h.call("GET", "/v1/agent/me")
            assert_error(status, answer, 401, "unauthorized")

    run(body)


def test_agent_conversations_queue_then_mine_with_unread(tmp_path: Any) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            first = await h.create(name="Ann", metadata={"page": "/pricing", "lang": "zh"})
            second = await h.create()
            await h.send(first, "hello")
            # Alice is offline: both wait, in arrival order, with the visitor's profile.
            status, page, _ = await h.call("GET", "/v1/agent/conversations", token=AGENT_TOKEN)
            assert status == 200, page
            got = msgspec.convert(page, AgentConversations)
            assert got.conversations == []
            assert [(q.session_id, q.position) for q in got.queue] == [
                (first["session_id"], 1),
                (second["session_id"], 2),
            ]
            assert got.queue[0].visitor.name == "Ann"
            assert got.queue[0].visitor.metadata == {"page": "/pricing", "lang": "zh"}
            # An agent may read a queued conversation's history before taking it.
            status, hist, _ = await h.call(
                "GET", f"/v1/chat/{first['session_id']}/messages", token=AGENT_TOKEN
            )
            assert status == 200 and [m["text"] for m in hist["messages"]] == ["hello"]

            ws = await _agent_online(h.node.public_config().ws_url)
            try:
                await _frame_of(ws, "assigned")
                await _frame_of(ws, "assigned")
                await h.send(first, "are you there?")
                status, page, _ = await h.call("GET", "/v1/agent/conversations", token=AGENT_TOKEN)
                got = msgspec.convert(page, AgentConversations)
                assert got.queue == []
                mine = {c.session_id: c for c in got.conversations}
                assert set(mine) == {first["session_id"], second["session_id"]}
                c = mine[first["session_id"]]
                assert (c.status, c.top_seq, c.read_seq) == ("assigned", 2, 0)
                assert c.last_message is not None and c.last_message.text == "are you there?"
                # The read mark moves the unread count.
                await ws.send(_text({"type": "read", "conv": first["session_id"], "seq": 1}))
                for _ in range(50):
                    status, page, _ = await h.call(
                        "GET", "/v1/agent/conversations", token=AGENT_TOKEN
                    )
                    got = msgspec.convert(page, AgentConversations)
                    c = next(x for x in got.conversations if x.session_id == first["session_id"])
                    if c.read_seq == 1:
                        break
                    await asyncio.sleep(0.02)
                assert c.read_seq == 1
            finally:
                await ws.close()

    run(body)


def test_agent_session_stats_only_for_what_the_agent_may_see(tmp_path: Any) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            chat = await h.create()
            await h.send(chat, "hi")
            sid = chat["session_id"]
            status, stats, _ = await h.call(
                "GET", f"/v1/agent/sessions/{sid}/stats", token=AGENT_TOKEN
            )
            assert status == 200, stats
            assert stats["session_id"] == sid and stats["memory_bytes"] > 0
            status, answer, _ = await h.call(
                "GET", "/v1/agent/sessions/0123456789abcdef/stats", token=AGENT_TOKEN
            )
            assert_error(status, answer, 404, "not_found")
            status, answer, _ = await h.call(
                "GET", "/v1/agent/sessions/not-an-id/stats", token=AGENT_TOKEN
            )
            assert_error(status, answer, 404, "not_found")
            status, answer, _ = await h.call(
                "GET", f"/v1/agent/sessions/{sid}/stats", token=chat["token"]
            )
            assert_error(status, answer, 403, "forbidden")
            # Closed and never assigned to alice: no longer hers to see.
            await h.call("POST", "/v1/chat/close", {"session_id": sid}, token=chat["token"])
            status, answer, _ = await h.call(
                "GET", f"/v1/agent/sessions/{sid}/stats", token=AGENT_TOKEN
            )
            assert_error(status, answer, 403, "forbidden")
            status, answer, _ = await h.call("GET", f"/v1/chat/{sid}/messages", token=AGENT_TOKEN)
            assert_error(status, answer, 403, "forbidden")

    run(body)


def test_admin_stats_counts_what_happens(tmp_path: Any) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            status, before, _ = await h.call("GET", "/v1/admin/stats", token=ADMIN_TOKEN)
            assert status == 200, before
            s0 = msgspec.convert(before, AdminStats)
            assert s0.connections == {"visitor": 0, "agent": 0}
            assert s0.conversations["open"] == 0 and s0.messages_total == 0
            chat = await h.create()
            await h.send(chat, "one")
            await h.send(chat, "two")
            ws = await _agent_online(h.node.public_config().ws_url)
            try:
                await _frame_of(ws, "assigned")
                status, after, _ = await h.call("GET", "/v1/admin/stats", token=ADMIN_TOKEN)
                s1 = msgspec.convert(after, AdminStats)
                assert s1.connections["agent"] == 1
                assert s1.conversations["open"] == 1 and s1.conversations["assigned"] == 1
                assert s1.queue_length == 0
                assert s1.messages_total == 2
            finally:
                await ws.close()
            for token in (AGENT_TOKEN, API_KEY):
                status, answer, _ = await h.call("GET", "/v1/admin/stats", token=token)
                assert_error(status, answer, 403, "forbidden")

    run(body)


# ---------------------------------------------------------------------------------------------
# Pages


def test_csp_names_only_this_origin_and_the_ws_origin() -> None:
    csp = content_security_policy("wss://chat.example.com:8443/ws", "'none'")
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self' wss://chat.example.com:8443"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


@pytest.mark.parametrize(
    ("path", "ancestors"), [("/chat", "*"), ("/agent", "'none'"), ("/admin", "'none'")]
)
def test_pages_are_served_with_their_policy(tmp_path: Any, path: str, ancestors: str) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            resp = await h.http.get(path)
            text = await resp.text()
            assert resp.status == 200, text
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "<html" in text.lower()
            csp = resp.headers["Content-Security-Policy"]
            ws = h.node.public_config().ws_url.rsplit("/", 1)[0]
            assert f"connect-src 'self' {ws}" in csp
            assert f"frame-ancestors {ancestors}" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert ("X-Frame-Options" in resp.headers) == (ancestors == "'none'")
            # Revalidation: the same ETag gives a 304 with no body.
            etag = resp.headers["ETag"]
            again = await h.http.get(path, headers={"If-None-Match": etag})
            assert again.status == 304 and await again.read() == b""

    run(body)


def test_root_widget_and_static_files(tmp_path: Any) -> None:
    async def body() -> None:
        async with serving(tmp_path) as h:
            resp = await h.http.get("/", allow_redirects=False)
            assert resp.status == 302 and resp.headers["Location"] == "/chat"
            resp = await h.http.get("/widget.js")
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["Content-Type"].startswith("text/javascript")
            assert await resp.read() == (STATIC_DIR / "widget.js").read_bytes()
            for name in sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix == ".css"):
                resp = await h.http.get(f"/static/{name}")
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/css")
            # Only the files of the directory: nothing else of the file system, however named.
            for bad in (
                "/static/nope.js",
                "/static/..%2Fhttp.py",
                "/static/%2e%2e%2fpages.py",
                "/static/",
                "/static/.hidden",
            ):
                resp = await h.http.get(bad)
                body_ = await resp.json()
                assert resp.status == 404 and body_["error"]["code"] == "not_found", bad
            resp = await h.http.post("/chat")
            assert resp.status == 405

    run(body)
