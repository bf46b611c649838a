"""``GET /v1/admin/stats`` in a cluster (in-process nodes, a real redis-server): the figures
are summed over the nodes that answer, the queue is the cluster's one queue, a node that is
stopped or silent is listed ``up: false`` while the answer stays 200; a single node answers
without ``cluster``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from kefu.config import AgentConfig, BotConfig, ClusterConfig, Config, HttpConfig, WsConfig
from kefu.node import Node
from kefu.web.http import HttpServer
from tests import aio
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_cross_node import AGENT_TOKEN, hello, recv, send, two_nodes

ADMIN_TOKEN = "admin-token"
#: The nodes' request timeout: a silent node costs the answer this long, no more.
REQUEST_TIMEOUT_S = 0.5


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, 40.0)


def stats_config(data_dir: Path, url: str | None) -> Config:
    return Config(
        data_dir=str(data_dir),
        http=HttpConfig(host="127.0.0.1", port=0),
        ws=WsConfig(host="127.0.0.1", port=0),
        admin_token=ADMIN_TOKEN,
        agents=[AgentConfig(id="alice", name="Alice", token=AGENT_TOKEN, max_chats=5)],
        bot=BotConfig(enabled=False),
        cluster=ClusterConfig(
            redis_url=url,
            heartbeat_s=0.1,
            node_timeout_s=1.0,
            request_timeout_s=REQUEST_TIMEOUT_S,
        ),
    )


@contextlib.asynccontextmanager
async def rest(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    """``node``'s REST front on a free port, and a client of it with the admin token."""
    server = HttpServer(node.config, node)
    await server.start()
    try:
        async with aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{server.port}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=10.0),
        ) as http:
            yield http
    finally:
        await server.stop()


async def stats(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/v1/admin/stats") as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


def node_id(node: Node) -> str:
    assert node.member is not None
    return node.member.node_id


def by_id(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in answer["cluster"]["nodes"]}


async def said(node: Node, token: str, conv: str, text: str) -> Any:
    """A visitor of ``conv`` connected to ``node`` writes one message (acked by the owner)."""
    ws, _ = await hello(node, token)
    await send(ws, type="send", conv=conv, client_msg_id="m1", text=text)
    ack = await recv(ws, "ack")
    assert (ack["seq"], ack["dup"]) == (1, False)
    return ws


def test_figures_are_summed_over_the_nodes(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        async with (
            two_nodes(tmp_path, redis_server.url, stats_config) as (a, b),
            rest(a) as on_a,
            rest(b) as on_b,
        ):
            # Nobody online: every conversation waits in the cluster's one queue.
            a1, _, tok_a1, st_a1, _ = await a.create_chat(name="A1")
            a2, _, tok_a2, st_a2, _ = await a.create_chat(name="A2")
            b1, _, tok_b1, st_b1, _ = await b.create_chat(name="B1")
            assert (st_a1, st_a2, st_b1) == ("queued", "queued", "queued")
            # Visitors: one on a, two on b (one of them of a conversation a owns, so its
            # message is stored, and counted, by a); an agent, not online, on a.
            sockets = [
                await said(a, tok_a1, a1, "on a"),
                await said(b, tok_a2, a2, "through b"),
                await said(b, tok_b1, b1, "on b"),
            ]
            agent, _ = await hello(a, AGENT_TOKEN)
            sockets.append(agent)

            for http in (on_a, on_b):
                answer = await stats(http)
                assert answer["connections"] == {"visitor": 3, "agent": 1}
                assert answer["conversations"] == {
                    "open": 3,
                    "bot": 0,
                    "queued": 3,
                    "assigned": 0,
                }
                assert answer["queue_length"] == 3
                assert answer["messages_total"] == 3
                nodes = by_id(answer)
                assert set(nodes) == {node_id(a), node_id(b)}
                assert all(n["up"] and "error" not in n for n in nodes.values())
            # Each node's own share, as b lists them (a's answer came over the bus).
            assert answer["cluster"]["node"] == node_id(b)
            assert answer["cluster"]["nodes"][0]["id"] == node_id(b)  # the answering node first
            mine, theirs = nodes[node_id(b)], nodes[node_id(a)]
            assert mine["connections"] == {"visitor": 2, "agent": 0}
            assert theirs["connections"] == {"visitor": 1, "agent": 1}
            assert (mine["conversations"]["open"], theirs["conversations"]["open"]) == (1, 2)
            assert (mine["messages_total"], theirs["messages_total"]) == (1, 2)
            assert theirs["uptime_s"] > 0
            # What stays the answering node's own.
            assert answer["cache"] == {"hits": 0, "misses": 0, "hit_rate": 0.0}
            assert "version" in answer["kb"]
            for ws in sockets:
                await ws.close()

    run(body)


def test_a_silent_or_stopped_node_is_listed_down(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, stats_config) as (a, b), rest(a) as http:
            await a.create_chat(name="A1")
            await b.create_chat(name="B1")
            assert b.member is not None
            b_id = node_id(b)
            answer = await stats(http)
            assert answer["conversations"]["open"] == 2
            assert by_id(answer)[b_id]["up"] is True

            # b is alive (its heartbeat goes on) but does not answer: a waits no longer than
            # the request timeout, and answers with its own figures.
            never = asyncio.Event()

            async def silent(sender: str, body: Any) -> None:
                await never.wait()

            b.member.bus.on_request("stats", silent)
            started = asyncio.get_running_loop().time()
            answer = await stats(http)
            took = asyncio.get_running_loop().time() - started
            assert took < REQUEST_TIMEOUT_S + 2.0
            listed = by_id(answer)[b_id]
            assert listed["up"] is False and listed["error"], listed
            assert set(listed) == {"id", "up", "error"}
            assert answer["conversations"]["open"] == 1
            assert answer["conversations"]["queued"] == 1
            # The queue is the cluster's: b's queued conversation is still in it.
            assert answer["queue_length"] == 2
            assert by_id(answer)[node_id(a)]["up"] is True

            # b stops: it is still listed, as not alive, and not asked.
            await b.stop()
            answer = await stats(http)
            listed = by_id(answer)[b_id]
            assert listed["up"] is False and "alive" in listed["error"], listed
            assert answer["conversations"]["open"] == 1
            assert answer["queue_length"] == 2
            assert [n["id"] for n in answer["cluster"]["nodes"]] == [node_id(a), b_id]

    run(body)


def test_redis_away_answers_this_nodes_view(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, stats_config) as (a, b), rest(a) as http:
            await a.create_chat(name="A1")
            await b.create_chat(name="B1")
            redis_server.stop()
            try:
                answer = await stats(http)
            finally:
                redis_server.start()
            cluster = answer["cluster"]
            assert cluster["error"]
            assert cluster["nodes"][0] == {
                "id": node_id(a),
                "up": True,
                "connections": answer["connections"],
                "conversations": answer["conversations"],
                "messages_total": 0,
                "uptime_s": cluster["nodes"][0]["uptime_s"],
            }
            assert all(n["up"] is False for n in cluster["nodes"][1:])
            # Only a's conversation is known without Redis.
            assert answer["conversations"]["open"] == 1
            assert answer["queue_length"] == 1

    run(body)


def test_single_node_answers_without_cluster(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(stats_config(tmp_path / "solo", None))
        await node.start()
        try:
            async with rest(node) as http:
                await node.create_chat(name="Solo")
                answer = await stats(http)
        finally:
            await node.stop()
        assert "cluster" not in answer
        assert answer["conversations"]["open"] == 1
        assert answer["queue_length"] == 1
        assert set(answer) == {
            "connections",
            "conversations",
            "queue_length",
            "messages_total",
            "cache",
            "kb",
            "uptime_s",
        }

    run(body)
