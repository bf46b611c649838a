"""Agents made through the admin API, on every node of a cluster (kefu.cluster.directory):
created, changed, rotated, logged out or removed on one node, the others follow at once; a
node that was away, and a Redis that lost its data, catch up (in-process nodes, a real
redis-server, clients from the ``websockets`` library)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kefu.node import Node
from kefu.protocol import AgentCreate, AgentTokenRequest, AgentUpdate
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_cross_node import (
    hello,
    online,
    recv,
    run,
    send,
    two_agents_config,
    two_nodes,
    until,
)

DAVE = "dave-token-0123456789"


async def knows(node: Node, agent_id: str, **fields: object) -> bool:
    if agent_id not in node.pool:
        return False
    view = node.get_agent(agent_id)
    return all(getattr(view, k) == v for k, v in fields.items())


async def made_on(a: Node, b: Node, **fields: object) -> None:
    """Agent "dave" created on ``a``, once ``b`` knows it."""
    await a.create_agent(AgentCreate(id="dave", name="Dave", max_chats=2, token=DAVE))

    async def b_knows() -> bool:
        return await knows(b, "dave", **fields)

    await until(b_knows)


async def refused(node: Node, token: str) -> tuple[int | None, str]:
    """The close code and reason of a ``hello`` with ``token`` that the node refuses."""
    ws = await connect(f"ws://127.0.0.1:{node.ws_port}/ws")
    await ws.send(json.dumps({"type": "hello", "token": token}))
    with pytest.raises(ConnectionClosed):
        await recv(ws, "welcome")
    return ws.close_code, ws.close_reason or ""


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        await recv(ws, "never")
    return ws.close_code, ws.close_reason or ""


def test_an_agent_made_on_one_node_works_on_every_node(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            await made_on(a, b, name="Dave", max_chats=2)
            # Its own token on b, and a session b gives out works on a.
            on_b, welcome = await hello(b, DAVE)
            assert welcome["role"] == "agent"
            session = b.agent_login(DAVE).token
            on_a, welcome = await hello(a, session)
            assert welcome["role"] == "agent"

            # A change made on b reaches a (and routing: disabled is requeued there).
            await b.update_agent("dave", AgentUpdate(name="David", max_chats=3))

            async def a_renamed() -> bool:
                return await knows(a, "dave", name="David", max_chats=3)

            await until(a_renamed)

            # Logging the session out on a closes its connection there and refuses it on b.
            await a.agent_logout(session)
            assert await closed_with(on_a) == (1008, "token revoked")

            async def b_refuses_session() -> bool:
                return b.agent_of_token(session) is None

            await until(b_refuses_session)
            assert (await refused(b, session))[0] == 1008
            # The agent's own token still works on b: its connection there stayed open.
            await send(on_b, type="ping")
            assert (await recv(on_b, "pong"))["type"] == "pong"

            # Rotated on a: the old token is refused on b and b's connection closed.
            rotated = await a.rotate_agent_token("dave", AgentTokenRequest(token=DAVE + "-new"))
            assert await closed_with(on_b) == (1008, "token revoked")
            assert (await refused(b, DAVE))[0] == 1008
            on_b, _ = await hello(b, rotated.token)

            # Disabled on a: closed on b. Removed on b: gone from a.
            await a.update_agent("dave", AgentUpdate(disabled=True))
            assert await closed_with(on_b) == (1008, "agent disabled")
            await b.delete_agent("dave")

            async def a_forgot() -> bool:
                return "dave" not in a.pool and a.agent_of_token(rotated.token) is None

            await until(a_forgot)
            assert a.store.get_agent("dave") is None

    run(body)


def test_an_agent_made_on_one_node_chats_from_another(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An agent made on a, online on b, gets a conversation of a and chats in it."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            await made_on(a, b)
            dave = await online(b, DAVE)
            conv, _v, token, status, _c = await a.create_chat(name="v")
            assert status == "assigned"
            assert (await recv(dave, "assigned"))["conv"] == conv
            visitor, _ = await hello(a, token)
            assigned = await recv(visitor, "assigned")
            assert (assigned["agent"]["id"], assigned["agent"]["name"]) == ("dave", "Dave")
            await send(dave, type="send", conv=conv, client_msg_id="d1", text="hi")
            assert (await recv(dave, "ack"))["seq"] == 1
            assert (await recv(visitor, "msg"))["text"] == "hi"
            for ws in (dave, visitor):
                await ws.close()

    run(body)


def test_a_node_that_was_away_and_a_redis_that_lost_its_data_catch_up(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            await a.create_agent(AgentCreate(id="dave", name="Dave", token=DAVE))
            await a.create_agent(AgentCreate(id="erin", name="Erin", token="erin-token-0123456"))
        # Both stopped. a changes and removes agents alone in the cluster; b, started later
        # with its old store, takes the changes at start.
        a = Node(two_agents_config(tmp_path / "a", redis_server.url))
        await a.start()
        try:
            await a.update_agent("dave", AgentUpdate(name="David"))
            await a.delete_agent("erin")
            b = Node(two_agents_config(tmp_path / "b", redis_server.url))
            await b.start()
            try:
                assert b.get_agent("dave").name == "David"
                assert "erin" not in b.pool
                assert b.store.get_agent("erin") is None

                # Redis loses everything (no persistence): each node writes back what it
                # holds when it syncs (at start and whenever Redis comes back).
                client = aioredis.from_url(redis_server.url)
                try:
                    await client.flushall()
                finally:
                    await client.aclose()
                await b.sync_agents()
                directory = b.directory
                assert directory is not None
                entry, _sessions = await directory.get("dave")
                assert entry is not None and entry.agent is not None
                assert entry.agent.name == "David"
                # And a new node learns it from there.
                c = Node(two_agents_config(tmp_path / "c", redis_server.url))
                await c.start()
                try:
                    ws, welcome = await hello(c, DAVE)
                    assert welcome["role"] == "agent"
                    await ws.close()
                finally:
                    await c.stop()
            finally:
                await b.stop()
        finally:
            await a.stop()

    run(body)


def test_agents_cannot_be_changed_while_redis_is_down(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Refused with cluster_unavailable and nothing changed: no node keeps a change the
    others never learn of."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, _b):
            redis_server.stop()

            async def a_sees_redis_down() -> bool:
                return a.member is not None and not a.member.link.up

            await until(a_sees_redis_down)
            with pytest.raises(Exception) as caught:
                await a.create_agent(AgentCreate(id="dave", name="Dave", token=DAVE))
            assert getattr(caught.value, "code", None) == "cluster_unavailable"
            assert "dave" not in a.pool
            redis_server.start()

    run(body)
