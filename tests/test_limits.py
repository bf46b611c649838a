"""Rate limits, connection caps, input refusals and the agent-token lifecycle, in process.

A real Node (data in tmp_path) with its HttpServer, on loopback with ``limits.exempt`` off so
that the per-address limits apply; other client addresses are 127.0.0.2 and up (Linux routes
all of 127.0.0.0/8 to lo). Rates are tiny (one token per 1,000 s) wherever a test must not see
a refill, so no test depends on timing. Every limit: below it allowed, past it refused with the
exact error shape and headers, the refused call leaves nothing behind, and the maps stay
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kefu.config import (
    AgentConfig,
    BotConfig,
    Config,
    HttpConfig,
    LimitsConfig,
    RateConfig,
    WsConfig,
    load_config,
)
from kefu.node import Node
from kefu.web.http import HttpServer
from kefu.web.ratelimit import (
    ConnectionCounts,
    KeyedBuckets,
    Limits,
    TokenBucket,
    retry_after_s,
    take_all,
)
from tests import aio

TIMEOUT = 30.0
RECV_TIMEOUT = 5.0
ADMIN = "admin-token"
API_KEY = "api-key"
AGENT_TOKEN = "agent-token"
SLOW = 0.001  # tokens per second: no refill within a test
FAST = RateConfig(per_second=100_000.0, burst=100_000)
NONE_EXEMPT = {"exempt": []}


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, TIMEOUT)


def rate(burst: int, per_second: float = SLOW) -> RateConfig:
    return RateConfig(per_second=per_second, burst=burst)


def make_config(data_dir: Path, ws: dict[str, Any] | None, limits: dict[str, Any]) -> Config:
    return Config(
        data_dir=str(data_dir),
        http=HttpConfig(host="127.0.0.1", port=0),
        ws=WsConfig(host="127.0.0.1", port=0, **(ws or {"rate": FAST})),
        admin_token=ADMIN,
        api_key=API_KEY,
        agents=[AgentConfig(id="alice", name="Alice", token=AGENT_TOKEN, max_chats=5)],
        bot=BotConfig(enabled=False),
        limits=LimitsConfig(**{**NONE_EXEMPT, **limits}),
    )


class Served:
    """A node with its REST server; REST and WS clients from any loopback address."""

    def __init__(self, node: Node, server: HttpServer, stack: contextlib.AsyncExitStack) -> None:
        self.node = node
        self.server = server
        self._stack = stack
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.node.ws_port}/ws"

    async def _session(self, ip: str) -> aiohttp.ClientSession:
        session = self._sessions.get(ip)
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(ip, 0))
            session = aiohttp.ClientSession(
                base_url=f"http://127.0.0.1:{self.server.port}",
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=RECV_TIMEOUT),
            )
            self._sessions[ip] = await self._stack.enter_async_context(session)
        return session

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        ip: str = "127.0.0.1",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        http = await self._session(ip)
        async with http.request(method, path, data=data, headers=h) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(raw), resp
            return resp.status, raw.decode(), resp

    async def create(self, ip: str = "127.0.0.1", **body: Any) -> dict[str, Any]:
        status, answer, _ = await self.call("POST", "/v1/chat/create", body, ip=ip)
        assert status in (200, 201), answer
        return dict(answer)

    async def send(
        self, chat: dict[str, Any], text: str, *, ip: str = "127.0.0.1", token: str | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        body = {"session_id": chat["session_id"], "text": text}
        return await self.call("POST", "/v1/chat/send", body, token=token or chat["token"], ip=ip)

    def stored(self, chat: dict[str, Any]) -> int:
        """Messages stored in the conversation."""
        page = self.node.history(chat["session_id"], 0, 500, role="visitor", principal=None)
        return len(page.messages)

    def open_conversations(self) -> int:
        return sum(self.node.conversations.counts().values())

    async def ws(self, token: str | None = None, *, ip: str = "127.0.0.1") -> ClientConnection:
        """A connection from ``ip``; with ``token``, after its welcome."""
        ws = await self._stack.enter_async_context(
            connect(self.ws_url, local_addr=(ip, 0), open_timeout=RECV_TIMEOUT)
        )
        if token is not None:
            await ws.send(json.dumps({"type": "hello", "token": token}))
            await recv(ws, "welcome")
        return ws


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, ws: dict[str, Any] | None = None, **limits: Any
) -> AsyncIterator[Served]:
    config = make_config(tmp_path, ws, limits)
    node = Node(config)
    await node.start()
    server = HttpServer(config, node)
    try:
        await server.start()
        async with contextlib.AsyncExitStack() as stack:
            yield Served(node, server, stack)
    finally:
        await server.stop()
        await node.stop()


async def recv(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of type ``kind`` (others skipped)."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
        if frame["type"] == kind:
            return frame


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Reads until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    rcvd = info.value.rcvd
    assert rcvd is not None, "no close frame from the server"
    return rcvd.code, rcvd.reason


def assert_error(status: int, body: Any, want_status: int, code: str) -> str:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


def assert_rate_limited(status: int, body: Any, resp: aiohttp.ClientResponse, wait: int) -> None:
    """429 ``rate_limited`` with ``Retry-After`` = ``wait`` whole seconds."""
    assert_error(status, body, 429, "rate_limited")
    assert resp.headers["Retry-After"] == str(wait)


# -- the buckets themselves ---------------------------------------------------------------------


def test_token_bucket_take_all_is_all_or_nothing() -> None:
    a = TokenBucket(1.0, 2, now=0.0)
    b = TokenBucket(1.0, 1, now=0.0)
    assert take_all((a, b, None), 0.0) == 0.0  # a: 1 left, b: 0 left
    wait = take_all((a, b), 0.0)
    assert wait == pytest.approx(1.0)  # b needs a second
    assert a.tokens == pytest.approx(1.0)  # a was not charged for the refused call
    assert take_all((a, b), 1.0) == 0.0
    assert a.tokens == pytest.approx(1.0) and b.tokens == pytest.approx(0.0)  # a refilled 1
    assert take_all((), 5.0) == 0.0
    slow = TokenBucket(0.25, 1, now=0.0)
    assert slow.take(0.0) and not slow.take(1.0)
    assert take_all((slow,), 1.0) == pytest.approx(3.0)
    assert retry_after_s(3.0) == 3 and retry_after_s(0.01) == 1 and retry_after_s(2.2) == 3


def test_keyed_buckets_are_bounded_lru() -> None:
    keyed = KeyedBuckets(1.0, 2, max_keys=100)
    for i in range(1_000):
        keyed.get(f"k{i}", 0.0).take(0.0)
    assert len(keyed) == 100
    assert keyed.evictions == 900
    assert "k899" not in keyed and "k900" in keyed
    keyed.get("k900", 0.0)  # the oldest kept one, now the newest
    keyed.get("fresh", 0.0)
    assert "k900" in keyed and "k901" not in keyed  # the oldest then went out
    assert len(keyed) == 100
    # A kept bucket keeps its state: it was charged once.
    assert keyed.get("k950", 0.0).tokens == pytest.approx(1.0)


def test_connection_counts_drop_keys_at_zero() -> None:
    counts = ConnectionCounts()
    assert counts.acquire("a", 2) and counts.acquire("a", 2)
    assert not counts.acquire("a", 2)
    assert counts.refused == 1 and counts.count("a") == 2
    counts.release("a")
    counts.release("a")
    assert len(counts) == 0
    counts.release("a")  # an extra release does not go negative
    assert counts.count("a") == 0 and len(counts) == 0


def test_client_ip_believes_only_trusted_proxies() -> None:
    limits = Limits.from_config(
        LimitsConfig(trusted_proxies=["10.0.0.0/8"], exempt=["192.168.0.0/16"]),
        RateConfig(),
    )
    assert limits.client_ip("203.0.113.9", "198.51.100.1") == "203.0.113.9"  # not a proxy
    assert limits.client_ip("10.1.1.1", "198.51.100.1") == "198.51.100.1"
    # The left part is the client's to invent: the right-most untrusted hop counts.
    assert limits.client_ip("10.1.1.1", "1.2.3.4, 198.51.100.1, 10.2.2.2") == "198.51.100.1"
    assert limits.client_ip("10.1.1.1", "10.2.2.2") == "10.1.1.1"  # all trusted
    assert limits.client_ip("10.1.1.1", "garbage, 198.51.100.1") == "198.51.100.1"
    assert limits.client_ip("10.1.1.1", "198.51.100.1, garbage") == "10.1.1.1"
    assert limits.client_ip("10.1.1.1", None) == "10.1.1.1"
    assert limits.is_exempt("192.168.4.4") and not limits.is_exempt("203.0.113.9")
    assert limits.is_exempt("::ffff:192.168.4.4")  # an IPv4-mapped IPv6 peer
    assert limits.ip_bucket("192.168.4.4", 0.0) is None
    assert limits.ip_bucket("203.0.113.9", 0.0) is not None


def test_limits_config_defaults_and_refusals(tmp_path: Path) -> None:
    limits = Config().limits
    assert limits.exempt == ["127.0.0.0/8", "::1/128"]
    assert limits.per_visitor is None  # ws.rate
    node_limits = Limits.from_config(limits, RateConfig(per_second=7.0, burst=9))
    assert (node_limits.visitor.per_second, node_limits.visitor.burst) == (7.0, 9)
    path = tmp_path / "kefu.yaml"
    for text, key in [
        ("limits: {exempt: [10.0.0.1/8]}", "limits.exempt[0]"),
        ("limits: {trusted_proxies: [nope]}", "limits.trusted_proxies[0]"),
        ("limits: {max_tracked: 10}", "limits.max_tracked"),
        ("limits: {ws_connections_per_ip: 0}", "limits.ws_connections_per_ip"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as info:
            load_config(path, env={})
        assert f"`{key}`" in str(info.value), str(info.value)


# -- REST ----------------------------------------------------------------------------------------


def test_create_is_limited_per_address(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, create_per_ip=rate(3)) as s:
            for _ in range(3):
                await s.create()
            before = s.open_conversations()
            status, answer, resp = await s.call("POST", "/v1/chat/create", {})
            assert_rate_limited(status, answer, resp, 1000)
            assert s.open_conversations() == before  # the refused call created nothing
            # A refused call is refused before its body is read: even a broken one is 429.
            status, answer, _ = await s.call("POST", "/v1/chat/create", data=b"{")
            assert_error(status, answer, 429, "rate_limited")
            # Another address has its own bucket; the API key is not limited per address.
            await s.create(ip="127.0.0.2")
            for _ in range(5):
                status, answer, _ = await s.call("POST", "/v1/chat/create", {}, token=API_KEY)
                assert status == 201, answer
            assert s.node.limits.refused["create_ip"] == 2
            assert len(s.node.limits.create_ip) == 2

    run(body)


def test_create_limit_refills(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, create_per_ip=rate(1, per_second=20.0)) as s:
            await s.create()
            status, answer, resp = await s.call("POST", "/v1/chat/create", {})
            assert_rate_limited(status, answer, resp, 1)  # 50 ms, rounded up to 1 s
            await asyncio.sleep(0.1)
            await s.create()

    run(body)


def test_exempt_addresses_are_not_limited_per_address(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(
            tmp_path, create_per_ip=rate(1), per_ip=rate(1), exempt=["127.0.0.3/32"]
        ) as s:
            chats = [await s.create(ip="127.0.0.3") for _ in range(4)]
            for chat in chats:
                status, answer, _ = await s.send(chat, "hi", ip="127.0.0.3")
                assert status == 200, answer
            assert len(s.node.limits.create_ip) == 0 and len(s.node.limits.ip) == 0

    run(body)


def test_send_is_limited_per_visitor(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, per_visitor=rate(3)) as s:
            chat, other = await s.create(), await s.create()
            for i in range(3):
                status, answer, _ = await s.send(chat, f"m{i}")
                assert status == 200, answer
            status, answer, resp = await s.send(chat, "one too many")
            assert_rate_limited(status, answer, resp, 1000)
            assert s.stored(chat) == 3  # nothing stored for the refused call
            # Another visitor of the same address is not affected.
            status, answer, _ = await s.send(other, "hello")
            assert status == 200, answer
            # The API key acting as the same visitor draws from the same bucket.
            status, answer, resp = await s.send(chat, "via key", token=API_KEY)
            assert_rate_limited(status, answer, resp, 1000)
            assert s.node.limits.refused["rest_visitor"] == 2
            assert s.stored(chat) == 3

    run(body)


def test_send_is_limited_per_address_and_charges_all_or_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, per_ip=rate(5), per_visitor=rate(2)) as s:
            a, b = await s.create(), await s.create()
            for i in range(2):
                assert (await s.send(a, f"a{i}"))[0] == 200
            status, answer, resp = await s.send(a, "a2")  # a's bucket is empty
            assert_rate_limited(status, answer, resp, 1000)
            # That refusal did not spend the address's token: b still gets 5 - 2 = 3 ...
            for i in range(2):
                assert (await s.send(b, f"b{i}"))[0] == 200
            c = await s.create()
            assert (await s.send(c, "c0"))[0] == 200
            # ... and the address is now empty for everyone, whatever their own bucket.
            status, answer, resp = await s.send(c, "c1")
            assert_rate_limited(status, answer, resp, 1000)
            assert s.node.limits.refused == {**s.node.limits.refused, "rest_ip": 1}
            # A forged token is charged to the address too (and then refused as forbidden).
            d = await s.create(ip="127.0.0.2")
            assert (await s.send(d, "d0", ip="127.0.0.2"))[0] == 200
            status, answer, _ = await s.send(d, "x", ip="127.0.0.2", token="forged")
            assert_error(status, answer, 403, "forbidden")
            # The API key is not limited per address, only per visitor (c has one token left).
            status, answer, _ = await s.send(c, "k1", token=API_KEY)
            assert status == 200, answer
            status, answer, resp = await s.send(c, "k2", token=API_KEY)
            assert_rate_limited(status, answer, resp, 1000)
            assert s.stored(a) == 2 and s.stored(c) == 2

    run(body)


def test_metrics_show_the_limits(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, create_per_ip=rate(1)) as s:
            await s.create()
            await s.call("POST", "/v1/chat/create", {})
            status, text, _ = await s.call("GET", "/metrics")
            assert status == 200
            assert 'kefu_limits_tracked{map="create_ip"} 1\n' in text
            assert 'kefu_limits_refused_total{limit="create_ip"} 1\n' in text
            assert 'kefu_limits_evictions_total{map="ip"} 0\n' in text

    run(body)


def test_trusted_proxy_forwarded_for(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, create_per_ip=rate(1), trusted_proxies=["127.0.0.1/32"]) as s:
            for client in ("198.51.100.1", "198.51.100.2"):
                fwd = {"X-Forwarded-For": f"6.6.6.6, {client}"}
                status, answer, _ = await s.call("POST", "/v1/chat/create", {}, headers=fwd)
                assert status == 201, answer
            fwd = {"X-Forwarded-For": "7.7.7.7, 198.51.100.1"}  # a new left part changes nothing
            status, answer, _ = await s.call("POST", "/v1/chat/create", {}, headers=fwd)
            assert_error(status, answer, 429, "rate_limited")
            # An untrusted peer's header is ignored: 127.0.0.2 is limited as itself.
            fwd = {"X-Forwarded-For": "198.51.100.3"}
            for want in (201, 429):
                status, _, _ = await s.call(
                    "POST", "/v1/chat/create", {}, headers=fwd, ip="127.0.0.2"
                )
                assert status == want
            assert "127.0.0.2" in s.node.limits.create_ip
            assert "198.51.100.3" not in s.node.limits.create_ip

    run(body)


# -- WebSocket -----------------------------------------------------------------------------------


def test_ws_commands_limited_per_visitor_across_connections(tmp_path: Path) -> None:
    async def body() -> None:
        ws_cfg = {"rate": FAST, "rate_close_after": 3}
        async with serving(tmp_path, ws=ws_cfg, per_visitor=rate(5)) as s:
            chat = await s.create()
            one, two = await s.ws(chat["token"]), await s.ws(chat["token"])
            for ws in (one, two, one):
                await ws.send(json.dumps({"type": "ping"}))
                await recv(ws, "pong")
            await two.send(json.dumps({"type": "ping"}))
            await recv(two, "pong")
            await one.send(json.dumps({"type": "ping"}))
            await recv(one, "pong")  # 5 pings: the visitor's bucket is empty
            send = {"type": "send", "conv": chat["session_id"], "client_msg_id": "c1", "text": "x"}
            await two.send(json.dumps(send))
            error = await recv(two, "error")
            assert error["code"] == "rate_limited"
            assert "visitor" in error["message"]
            assert s.stored(chat) == 0  # the refused send stored nothing
            await one.send(json.dumps({"type": "ping"}))
            assert (await recv(one, "error"))["code"] == "rate_limited"
            # Another visitor is not affected.
            other = await s.create()
            three = await s.ws(other["token"])
            await three.send(json.dumps({"type": "ping"}))
            await recv(three, "pong")
            # Refusals that go on close the connection with 4029.
            for _ in range(2):
                await two.send(json.dumps({"type": "ping"}))
            assert await closed_with(two) == (4029, "rate limited")
            assert s.node.limits.refused["ws_visitor"] == 4

    run(body)


def test_ws_commands_limited_per_address(tmp_path: Path) -> None:
    async def body() -> None:
        # 2 hellos and 2 pings fill the address's bucket of 4.
        async with serving(tmp_path, per_ip=rate(4)) as s:
            a, b, c = await s.create(), await s.create(), await s.create(ip="127.0.0.2")
            wa, wb = await s.ws(a["token"]), await s.ws(b["token"])
            for ws in (wa, wb):
                await ws.send(json.dumps({"type": "ping"}))
                await recv(ws, "pong")
            await wa.send(json.dumps({"type": "ping"}))
            error = await recv(wa, "error")
            assert error["code"] == "rate_limited" and "address" in error["message"]
            wc = await s.ws(c["token"], ip="127.0.0.2")
            await wc.send(json.dumps({"type": "ping"}))
            await recv(wc, "pong")
            # The same address's REST sends share the bucket.
            status, answer, resp = await s.send(b, "hi")
            assert_rate_limited(status, answer, resp, 1000)
            assert s.stored(b) == 0

    run(body)


def test_ws_refused_command_charges_no_bucket(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, per_ip=rate(6), per_visitor=rate(3)) as s:
            a, b = await s.create(), await s.create()
            wa = await s.ws(a["token"])  # the address: 1 of 6
            for _ in range(3):  # the address: 4 of 6; a: 3 of 3
                await wa.send(json.dumps({"type": "ping"}))
                await recv(wa, "pong")
            await wa.send(json.dumps({"type": "ping"}))
            error = await recv(wa, "error")  # refused by a's bucket, the address not charged
            assert error["code"] == "rate_limited" and "visitor" in error["message"]
            wb = await s.ws(b["token"])  # the address: 5 of 6
            await wb.send(json.dumps({"type": "ping"}))
            await recv(wb, "pong")  # 6 of 6: only possible if a's refusal cost nothing
            await wb.send(json.dumps({"type": "ping"}))
            error = await recv(wb, "error")
            assert error["code"] == "rate_limited" and "address" in error["message"]
            refused = s.node.limits.refused
            assert (refused["ws_visitor"], refused["ws_ip"]) == (1, 1)

    run(body)


def test_ws_connections_capped_per_address(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, ws_connections_per_ip=2) as s:
            first, second = await s.ws(), await s.ws()
            third = await s.ws()
            assert await closed_with(third) == (4029, "too many connections from this address")
            limits = s.node.limits
            assert limits.ip_connections.count("127.0.0.1") == 2
            other = await s.ws(ip="127.0.0.2")  # another address has its own count
            chat = await s.create()
            await other.send(json.dumps({"type": "hello", "token": chat["token"]}))
            await recv(other, "welcome")
            # A place frees when a connection closes.
            await first.close()
            await asyncio.wait_for(_until(lambda: limits.ip_connections.count("127.0.0.1") == 1), 5)
            fourth = await s.ws(chat["token"])
            await fourth.send(json.dumps({"type": "ping"}))
            await recv(fourth, "pong")
            for ws in (second, other, fourth):
                await ws.close()
            await asyncio.wait_for(_until(lambda: len(limits.ip_connections) == 0), 5)
            assert limits.ip_connections.refused == 1

    run(body)


def test_ws_connections_capped_per_visitor_and_agent(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, ws_connections_per_visitor=2, ws_connections_per_agent=1) as s:
            chat = await s.create()
            kept = [await s.ws(chat["token"]), await s.ws(chat["token"])]
            extra = await s.ws()
            await extra.send(json.dumps({"type": "hello", "token": chat["token"]}))
            assert await closed_with(extra) == (4029, "too many connections for this visitor")
            agent = await s.ws(AGENT_TOKEN)
            again = await s.ws()
            await again.send(json.dumps({"type": "hello", "token": AGENT_TOKEN}))
            assert await closed_with(again) == (4029, "too many connections for this agent")
            # The refused connection did not take the agent's place: the first one works.
            await agent.send(json.dumps({"type": "status", "status": "online"}))
            assert (await recv(agent, "status"))["status"] == "online"
            await kept[0].close()
            limits = s.node.limits
            await asyncio.wait_for(
                _until(
                    lambda: limits.principal_connections["visitor"].count(chat["visitor_id"]) == 1
                ),
                5,
            )
            await s.ws(chat["token"])  # a place is free again
            refused = sum(c.refused for c in limits.principal_connections.values())
            assert refused == 2

    run(body)


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


# -- input ---------------------------------------------------------------------------------------

CONTROL_TEXTS = [
    "a\u0000b",
    "a\u0007",
    "\u001b[31mred",
    "a\u007f",
    "a\u0085",
    "a\u009f",
    "a\ufffe",
    "\uffff",
]


def test_rest_refuses_control_characters(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as s:
            chat = await s.create()
            for text in CONTROL_TEXTS:
                status, answer, _ = await s.send(chat, text)
                message = assert_error(status, answer, 400, "invalid")
                assert "`$.text`" in message and "control characters" in message, message
            assert s.stored(chat) == 0
            status, answer, _ = await s.send(chat, "line 1\r\n\tline 2\n")
            assert status == 200, answer
            before = s.open_conversations()
            for body_, field in [
                ({"name": "Bob\nSmith"}, "`$.name`"),
                ({"name": "Bob\tSmith"}, "`$.name`"),
                ({"user_id": "u\u0085"}, "`$.user_id`"),
                ({"metadata": {"page": "a\u0000"}}, "`$.metadata[...]`"),
                ({"metadata": {"pa\nge": "a"}}, "`key` in `$.metadata`"),
            ]:
                status, answer, _ = await s.call("POST", "/v1/chat/create", body_)
                message = assert_error(status, answer, 400, "invalid")
                assert field in message, message
            assert s.open_conversations() == before
            ok = {"name": "李雷 😀", "metadata": {"address": "1 Main St\nSpringfield"}}
            status, answer, _ = await s.call("POST", "/v1/chat/create", ok)
            assert status == 201, answer
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents", {"id": "bob", "name": "B\u0000b"}, token=ADMIN
            )
            assert "`$.name`" in assert_error(status, answer, 400, "invalid")

    run(body)


def test_rest_refuses_bad_utf8_and_deep_json(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as s:
            chat = await s.create()
            sid = chat["session_id"].encode()
            for raw in [
                b'{"session_id":"' + sid + b'","text":"caf\xc3"}',  # cut in a character
                b'{"session_id":"' + sid + b'","text":"\xff\xfe"}',
                b'{"session_id":"' + sid + b'","text":"\xed\xa0\x80"}',  # an encoded surrogate
                b'{"session_id":"' + sid + b'","text":"\\ud800"}',  # a lone escaped surrogate
            ]:
                status, answer, _ = await s.call(
                    "POST", "/v1/chat/send", data=raw, token=chat["token"]
                )
                assert_error(status, answer, 400, "bad_request")
            assert s.stored(chat) == 0
            depth = 100_000
            nested = b"[" * depth + b"]" * depth
            for raw in [
                b'{"metadata": {"k": ' + nested + b"}}",
                b'{"unknown": ' + nested + b"}",
                b'{"unknown": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}",
            ]:
                status, answer, _ = await s.call("POST", "/v1/chat/create", data=raw)
                message = assert_error(status, answer, 400, "bad_request")
                assert "nested too deeply" in message
            # Over the body limit: 413 before any parsing.
            huge = b'{"unknown": "' + b"x" * (2 << 20) + b'"}'
            status, answer, _ = await s.call("POST", "/v1/chat/create", data=huge)
            assert_error(status, answer, 413, "payload_too_large")
            status, health, _ = await s.call("GET", "/healthz")
            assert status == 200 and health["status"] == "ok"

    run(body)


def test_ws_refuses_control_characters_and_deep_frames(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as s:
            chat = await s.create()
            conv = chat["session_id"]
            ws = await s.ws(chat["token"])
            for i, text in enumerate(CONTROL_TEXTS):
                frame = {"type": "send", "conv": conv, "client_msg_id": f"c{i}", "text": text}
                await ws.send(json.dumps(frame))
                error = await recv(ws, "error")
                assert error["code"] == "invalid" and error["ref"] == f"c{i}", error
                assert "`$.text`" in error["message"], error
            depth = 30_000  # within the 64 KiB frame limit
            await ws.send('{"type": "send", "x": ' + "[" * depth + "]" * depth + "}")
            error = await recv(ws, "error")
            assert error["code"] == "bad_frame" and "nested too deeply" in error["message"]
            # The connection is still usable and nothing was stored.
            good = {"type": "send", "conv": conv, "client_msg_id": "ok", "text": "fine\tthanks"}
            await ws.send(json.dumps(good))
            ack = await recv(ws, "ack")
            assert ack["seq"] == 1 and ack["client_msg_id"] == "ok"
            assert s.stored(chat) == 1

    run(body)


# -- agent tokens --------------------------------------------------------------------------------


async def _new_agent(s: Served, **extra: Any) -> dict[str, Any]:
    status, created, _ = await s.call(
        "POST", "/v1/admin/agents", {"id": "bob", "name": "Bob", **extra}, token=ADMIN
    )
    assert status == 201, created
    return dict(created)


def test_rotating_an_agent_token_revokes_the_old_one(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as s:
            created = await _new_agent(s)
            old = created["token"]
            assert "token_expires_ts" not in created
            live = await s.ws(old)
            status, rotated, _ = await s.call("POST", "/v1/admin/agents/bob/token", {}, token=ADMIN)
            assert status == 200, rotated
            assert set(rotated) == {"id", "token"} and rotated["id"] == "bob"
            new = rotated["token"]
            assert new != old
            assert await closed_with(live) == (1008, "token revoked")
            status, answer, _ = await s.call("GET", "/v1/agent/me", token=old)
            assert_error(status, answer, 403, "forbidden")
            status, me, _ = await s.call("GET", "/v1/agent/me", token=new)
            assert status == 200 and me["id"] == "bob"
            refused = await s.ws()
            await refused.send(json.dumps({"type": "hello", "token": old}))
            assert (await closed_with(refused))[0] == 1008
            await s.ws(new)
            # A chosen token; one that another agent holds is a conflict.
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/bob/token", {"token": "bob-2"}, token=ADMIN
            )
            assert status == 200 and answer["token"] == "bob-2"
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/bob/token", {"token": AGENT_TOKEN}, token=ADMIN
            )
            assert_error(status, answer, 409, "conflict")
            # The file's agents change in the file; unknown agents are 404; admin only.
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/alice/token", {}, token=ADMIN
            )
            assert_error(status, answer, 409, "conflict")
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/nobody/token", {}, token=ADMIN
            )
            assert_error(status, answer, 404, "unknown_agent")
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/bob/token", {}, token="bob-2"
            )
            assert_error(status, answer, 403, "forbidden")
            status, answer, _ = await s.call(
                "POST", "/v1/admin/agents/bob/token", {"token_ttl_days": 0}, token=ADMIN
            )
            assert "token_ttl_days" in assert_error(status, answer, 400, "invalid")
            assert s.node.agent_of_token("bob-2") == "bob"

        # The rotation is durable: after a restart the old tokens stay refused.
        async with serving(tmp_path) as s:
            assert s.node.agent_of_token("bob-2") == "bob"
            assert s.node.agent_of_token(old) is None and s.node.agent_of_token(new) is None

    run(body)


def test_agent_token_expiry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kefu.node as node_module

    async def body() -> None:
        async with serving(tmp_path) as s:
            now = node_module._now_ms()
            created = await _new_agent(s, token="bob-token", token_ttl_days=2)
            expires = created["token_expires_ts"]
            assert now + 2 * 86_400_000 <= expires <= node_module._now_ms() + 2 * 86_400_000
            status, view, _ = await s.call("GET", "/v1/admin/agents/bob", token=ADMIN)
            assert view["token_expires_ts"] == expires
            live = await s.ws("bob-token")
            assert (await s.call("GET", "/v1/agent/me", token="bob-token"))[0] == 200
            # Two days later (the node's clock moved on):
            later = expires + 1
            monkeypatch.setattr(node_module, "_now_ms", lambda: later)
            status, answer, _ = await s.call("GET", "/v1/agent/me", token="bob-token")
            assert_error(status, answer, 403, "forbidden")
            s.node.housekeeping(later)
            assert await closed_with(live) == (1008, "token expired")
            refused = await s.ws()
            await refused.send(json.dumps({"type": "hello", "token": "bob-token"}))
            assert (await closed_with(refused))[0] == 1008
            # A rotation gives a working token again (here without expiry).
            status, rotated, _ = await s.call(
                "POST", "/v1/admin/agents/bob/token", {"token": "bob-new"}, token=ADMIN
            )
            assert status == 200 and "token_expires_ts" not in rotated
            await s.ws("bob-new")
            monkeypatch.undo()
            status, carol, _ = await s.call(
                "POST",
                "/v1/admin/agents",
                {"id": "carol", "name": "Carol", "token_ttl_days": 1},
                token=ADMIN,
            )
            assert status == 201, carol

        async with serving(tmp_path) as s:  # expiries are stored with the agents
            status, view, _ = await s.call("GET", "/v1/admin/agents/bob", token=ADMIN)
            assert "token_expires_ts" not in view  # the rotation removed it
            status, view, _ = await s.call("GET", "/v1/admin/agents/carol", token=ADMIN)
            assert view["token_expires_ts"] == carol["token_expires_ts"]
            assert s.node.agent_of_token(carol["token"]) == "carol"
            monkeypatch.setattr(node_module, "_now_ms", lambda: carol["token_expires_ts"])
            assert s.node.agent_of_token(carol["token"]) is None

    run(body)


def test_shared_visitor_bucket_from_the_second_connection_by_default() -> None:
    """Default per_visitor (ws.rate): one connection has no shared bucket (its own bucket has
    the same rate); the second and later ones share one. Set apart: shared from the first."""
    rate = RateConfig(per_second=1.0, burst=5)
    limits = Limits.from_config(LimitsConfig(), rate)
    assert limits.connect_principal("visitor", "v1")
    assert limits.connection_visitor_bucket("v1", 0.0) is None
    assert len(limits.visitor) == 0  # nothing held for a visitor with one connection
    assert limits.connect_principal("visitor", "v1")
    second = limits.connection_visitor_bucket("v1", 0.0)
    assert second is not None and (second.per_second, second.burst) == (1.0, 5)
    assert limits.connect_principal("visitor", "v1")
    assert limits.connection_visitor_bucket("v1", 0.0) is second
    # A visitor that already has a shared bucket (REST sends) gets it on its first connection.
    limits.visitor_bucket("v2", 0.0)
    assert limits.connect_principal("visitor", "v2")
    assert limits.connection_visitor_bucket("v2", 0.0) is limits.visitor_bucket("v2", 0.0)

    explicit = Limits.from_config(
        LimitsConfig(per_visitor=RateConfig(per_second=2.0, burst=3)), rate
    )
    assert explicit.connect_principal("visitor", "v1")
    first = explicit.connection_visitor_bucket("v1", 0.0)
    assert first is not None and (first.per_second, first.burst) == (2.0, 3)
