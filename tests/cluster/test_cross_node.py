"""A visitor and an agent on different nodes of one cluster (in-process nodes, a real
redis-server, clients from the ``websockets`` library): chat both ways, acks and seq from the
owner, dedup, history and resume through the node that does not own the conversation."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio
from websockets.asyncio.client import ClientConnection, connect

from kefu.config import AgentConfig, BotConfig, ClusterConfig, Config, WsConfig
from kefu.node import Node
from kefu.protocol import AgentCreate
from tests import aio
from tests.cluster.redis_server import RedisServer
from tests.test_serve import TEST_CERT, TEST_KEY

AGENT_TOKEN = "agent-token"


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, 40.0)


def node_config(data_dir: Path, url: str) -> Config:
    return Config(
        data_dir=str(data_dir),
        ws=WsConfig(host="127.0.0.1", port=0),
        agents=[AgentConfig(id="alice", name="Alice", token=AGENT_TOKEN, max_chats=5)],
        bot=BotConfig(enabled=False),
        cluster=ClusterConfig(redis_url=url, heartbeat_s=0.1, node_timeout_s=1.0),
    )


@contextlib.asynccontextmanager
async def two_nodes(
    tmp_path: Path, url: str, make: Callable[[Path, str], Config]
) -> AsyncIterator[tuple[Node, Node]]:
    """Nodes ``a`` and ``b`` of one cluster, in-process, stopped at the end."""
    a = Node(make(tmp_path / "a", url))
    await a.start()
    try:
        b = Node(make(tmp_path / "b", url))
        await b.start()
        try:
            yield a, b
        finally:
            await b.stop()
    finally:
        await a.stop()


async def recv(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5.0))
        if frame["type"] == kind or (kind is None and frame["type"] != "presence"):
            return frame


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def hello(node: Node, token: str, **extra: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"ws://127.0.0.1:{node.ws_port}/ws")
    await send(ws, type="hello", token=token, **extra)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


def test_visitor_on_one_node_agent_on_another(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, node_config) as (a, b):
            agent, _ = await hello(a, AGENT_TOKEN)
            await send(agent, type="status", status="online")
            assert (await recv(agent))["type"] == "status"
            conv, _visitor, token, status, _created = await a.create_chat(name="Bob")
            assert status == "assigned"
            assert (await recv(agent, "assigned"))["conv"] == conv

            # The visitor's WebSocket lands on b, which does not own the conversation.
            visitor, welcome = await hello(b, token)
            assert welcome["convs"] == [
                {"conv": conv, "epoch": 1, "top_seq": 0, "status": "assigned"}
            ]
            assigned = await recv(visitor, "assigned")
            assert assigned["agent"]["id"] == "alice"

            await send(visitor, type="send", conv=conv, client_msg_id="v1", text="hello from b")
            # Its ack and its own msg (as on one node; through another node the msg may come
            # first: it is fanned out before the owner's answer leaves).
            frames = {f["type"]: f for f in [await recv(visitor), await recv(visitor)]}
            assert (frames["ack"]["seq"], frames["ack"]["dup"]) == (1, False)
            assert frames["msg"]["seq"] == 1
            got = await recv(agent, "msg")
            assert (got["seq"], got["text"]) == (1, "hello from b")

            await send(agent, type="send", conv=conv, client_msg_id="a1", text="hi, from a")
            assert [(f["type"], f["seq"]) for f in [await recv(agent), await recv(agent)]] == [
                ("ack", 2),
                ("msg", 2),
            ]
            assert (await recv(visitor, "msg"))["seq"] == 2

            # A retry of v1 (its ack lost, say) is answered from the owner's dedup.
            await send(visitor, type="send", conv=conv, client_msg_id="v1", text="hello from b")
            ack = await recv(visitor, "ack")
            assert (ack["seq"], ack["dup"]) == (1, True)

            await send(visitor, type="sync", conv=conv, after=0, limit=10)
            history = await recv(visitor, "history")
            assert [m["seq"] for m in history["messages"]] == [1, 2]

            # The visitor drops; the agent writes on; the visitor resumes through b.
            await visitor.close()
            await send(agent, type="send", conv=conv, client_msg_id="a2", text="still there?")
            assert (await recv(agent, "ack"))["seq"] == 3
            assert (await recv(agent, "msg"))["seq"] == 3
            back, _ = await hello(b, token, resume=[{"conv": conv, "epoch": 1, "last_seq": 2}])
            replayed = await recv(back, "msg")
            assert (replayed["seq"], replayed["text"]) == (3, "still there?")
            resumed = await recv(back, "resumed")
            assert (resumed["from_seq"], resumed["to_seq"]) == (3, 3)
            # Live again after the replay, exactly once.
            await send(agent, type="send", conv=conv, client_msg_id="a3", text="good")
            assert (await recv(back, "msg"))["seq"] == 4
            assert (await recv(agent, "ack"))["seq"] == 4
            assert (await recv(agent, "msg"))["seq"] == 4
            await send(back, type="send", conv=conv, client_msg_id="v2", text="thanks")
            frames = {f["type"]: f for f in [await recv(back), await recv(back)]}
            assert frames["ack"]["seq"] == frames["msg"]["seq"] == 5
            assert (await recv(agent, "msg"))["seq"] == 5

            # Closing from b ends the conversation at its owner, for both sides.
            await send(back, type="close", conv=conv)
            closed = await recv(agent, "closed")
            assert closed["conv"] == conv and closed["by"] == "visitor"
            assert (await recv(back, "closed"))["conv"] == conv
            for ws in (agent, back):
                await ws.close()
            # b forwarded the visitor's commands and received a's frames; a sent them.
            b_metrics = metric_values(b.metrics_text().decode())
            a_metrics = metric_values(a.metrics_text().decode())
            assert b_metrics["kefu_cluster_forwarded_total"] >= 5
            assert b_metrics["kefu_cluster_pubsub_lag_events_total"] >= 5
            assert a_metrics["kefu_cluster_fan_out_total"] >= 5
            assert a_metrics["kefu_cluster_forwarded_total"] == 0

    run(body)


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def two_agents_config(data_dir: Path, url: str) -> Config:
    return Config(
        data_dir=str(data_dir),
        ws=WsConfig(host="127.0.0.1", port=0),
        agents=[
            AgentConfig(id="alice", name="Alice", token="alice-token", max_chats=2),
            AgentConfig(id="bob", name="Bob", token="bob-token", max_chats=2),
        ],
        bot=BotConfig(enabled=False),
        cluster=ClusterConfig(redis_url=url, heartbeat_s=0.1, node_timeout_s=1.0),
    )


async def online(node: Node, token: str) -> ClientConnection:
    ws, _ = await hello(node, token)
    await send(ws, type="status", status="online")
    assert (await recv(ws))["type"] == "status"
    return ws


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_routing_is_global(tmp_path: Path, redis_server: RedisServer) -> None:
    """Agents on either node get the conversations made on both, never above capacity; the
    queue is one queue; an agent chats in a conversation another node owns."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            alice = await online(b, "alice-token")  # on b
            bob = await online(a, "bob-token")  # on a
            assert a.member is not None
            routing = a.member.routing

            async def both_online() -> bool:
                stats = await routing.stats(0)
                return stats["agents_available"] == 2

            await until(both_online)
            # One after the other, so the round-robin order is known: alice, bob, alice, bob
            # (equal weights, ties to the agent added first).
            made = [
                await a.create_chat(name="v1"),
                await a.create_chat(name="v2"),
                await b.create_chat(name="v3"),
                await b.create_chat(name="v4"),
            ]
            assert [m[3] for m in made] == ["assigned"] * 4
            convs = [m[0] for m in made]
            assert await routing.load("alice") == 2 and await routing.load("bob") == 2
            got_alice = {(await recv(alice, "assigned"))["conv"] for _ in range(2)}
            got_bob = {(await recv(bob, "assigned"))["conv"] for _ in range(2)}
            assert got_alice | got_bob == set(convs) and not got_alice & got_bob

            # Both full: the next one waits in the one queue.
            fifth, _v, fifth_token, status, _c = await b.create_chat(name="v5")
            assert status == "queued"
            waiting, _ = await hello(a, fifth_token)  # its visitor on the other node
            assert (await recv(waiting, "queued"))["position"] == 1
            # The workbench's list, asked on either node: every conversation of hers wherever
            # it lives, and the cluster's queue.
            for node in (a, b):
                view = await node.agent_conversations_anywhere("alice")
                assert {c.session_id for c in view.conversations} == got_alice
                assert [(w.session_id, w.position) for w in view.queue] == [(fifth, 1)]

            assert got_alice == {convs[0], convs[2]} and got_bob == {convs[1], convs[3]}
            # Alice (on b) writes into v1, which a owns; its visitor, on a, reads it.
            conv, _vid, token, _s, _c = made[0]
            assert a.member.is_local(int(conv, 16))
            visitor, _ = await hello(a, token)
            await send(alice, type="send", conv=conv, client_msg_id="x1", text="hello")
            assert (await recv(alice, "ack"))["seq"] == 1
            assert (await recv(visitor, "msg"))["text"] == "hello"
            await send(visitor, type="send", conv=conv, client_msg_id="y1", text="hi")
            reply = await recv(alice, "msg")
            assert (reply["seq"], reply["text"]) == (2, "hi")
            await visitor.close()

            # Alice closes v1 (a's): her freed slot takes the waiting one, which b owns.
            first = convs[0]
            await send(alice, type="close", conv=first)
            assert (await recv(alice, "closed"))["conv"] == first
            assigned = await recv(alice, "assigned")
            assert assigned["conv"] == fifth
            got = await recv(waiting, "assigned")
            assert got["agent"]["id"] == "alice"
            assert await routing.load("alice") == 2
            for ws in (alice, bob, waiting):
                await ws.close()

    run(body)


def test_presence_is_cluster_wide(tmp_path: Path, redis_server: RedisServer) -> None:
    """An agent on one node sees the agents of the other node come online, and their load."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            alice = await online(a, "alice-token")

            async def presence_of(ws: ClientConnection, agent: str, **want: Any) -> None:
                while True:
                    frame = await recv(ws, "presence")
                    got = frame["agent"]
                    if got["id"] == agent and all(got[k] == v for k, v in want.items()):
                        return

            bob = await online(b, "bob-token")
            await presence_of(alice, "bob", status="online", active_chats=0)
            await a.create_chat(name="v")  # round robin: alice first
            conv2, *_ = await a.create_chat(name="w")  # then bob, on the other node
            assert (await recv(bob, "assigned"))["conv"] == conv2
            await presence_of(alice, "bob", status="online", active_chats=1)
            # A new connection of alice on b is told everyone's presence from Redis.
            again, _ = await hello(b, "alice-token")
            seen = {}
            while len(seen) < 2:
                frame = await recv(again, "presence")
                seen[frame["agent"]["id"]] = frame["agent"]
            assert seen["bob"]["status"] == "online" and seen["bob"]["active_chats"] == 1
            assert seen["alice"]["active_chats"] == 1
            await bob.close()
            await presence_of(alice, "bob", status="offline")
            for ws in (alice, again):
                await ws.close()

    run(body)


def test_an_agent_made_by_an_admin_on_one_node_serves_the_cluster(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An agent created through the admin API on node a (kept in a's store) joins the cluster's
    routing: it gets a conversation that b owns and chats in it, connected to a."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            await a.create_agent(
                AgentCreate(id="dave", name="Dave", max_chats=2, token="dave-token-0123456789")
            )
            dave = await online(a, "dave-token-0123456789")
            conv, _v, token, status, _c = await b.create_chat(name="v")
            assert status == "assigned"
            assert (await recv(dave, "assigned"))["conv"] == conv
            visitor, _ = await hello(b, token)
            assigned = await recv(visitor, "assigned")
            assert assigned["agent"]["id"] == "dave"
            await send(dave, type="send", conv=conv, client_msg_id="d1", text="hello")
            assert (await recv(dave, "ack"))["seq"] == 1
            got = await recv(visitor, "msg")
            assert (got["text"], got["from"]["id"]) == ("hello", "dave")
            await a.delete_agent("dave")
            assert await b.member.routing.assigned_to(int(conv, 16)) is None  # requeued
            for ws in (dave, visitor):
                await ws.close()

    run(body)


def test_a_redis_that_lost_its_data_gets_the_routing_back_from_the_nodes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis restarts empty: when the nodes announce themselves again, each conversation is
    back with the agent it had (no second ``assigned``), the queued one is in line again,
    and routing goes on from there."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, two_agents_config) as (a, b):
            alice = await online(b, "alice-token")  # max_chats 2
            convs = []
            for _ in range(3):
                conv, _v, _t, status, _c = await a.create_chat(name="v")
                convs.append((conv, status))
            assert [s for _, s in convs] == ["assigned", "assigned", "queued"]
            for conv, _ in convs[:2]:
                assert (await recv(alice, "assigned"))["conv"] == conv

            client = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                await client.flushall()
            finally:
                await client.aclose()
            # What a node does when its link comes back (kefu.cluster.member._reconnected).
            await b.announce()
            await a.announce()

            routing = a.member.routing
            ids = [int(conv, 16) for conv, _ in convs]
            assert [await routing.assigned_to(c) for c in ids[:2]] == ["alice", "alice"]
            assert await routing.load("alice") == 2
            assert await routing.position(ids[2]) == 1
            # No second "assigned" for the two she has; the third is hers once she has room.
            await a.close_chat(convs[0][0], by="visitor")
            got = await recv(alice, "assigned")
            assert got["conv"] == convs[2][0]
            await alice.close()

    run(body)


def test_nodes_reach_redis_over_tls(tmp_path: Path) -> None:
    """``rediss://`` (with the CA in ``ssl_ca_certs``): two nodes chat across a Redis that
    speaks TLS only."""
    cert, key = tmp_path / "redis.crt", tmp_path / "redis.key"
    cert.write_text(TEST_CERT)
    key.write_text(TEST_KEY)
    server = RedisServer(tmp_path / "redis", tls=(cert, key))
    server.start()

    async def body() -> None:
        async with two_nodes(tmp_path, server.url, node_config) as (a, b):
            assert a.health().checks.get("redis") == "ok"
            agent = await online(a, AGENT_TOKEN)
            conv, _v, token, status, _c = await a.create_chat(name="v")
            assert status == "assigned"
            assert (await recv(agent, "assigned"))["conv"] == conv
            visitor, _ = await hello(b, token)
            await send(visitor, type="send", conv=conv, client_msg_id="t1", text="over tls")
            assert (await recv(agent, "msg"))["text"] == "over tls"
            for ws in (agent, visitor):
                await ws.close()

    try:
        run(body)
    finally:
        server.stop()


def test_a_hello_without_resume_through_another_node_misses_nothing_after_its_welcome(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A message stored between the welcome (the owner's state as described) and the moment
    the node follows the owner still reaches the new connection, once, with no ``resumed``
    the client did not ask for; the same for an agent's remote conversations."""

    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, node_config) as (a, b):
            agent = await online(a, AGENT_TOKEN)
            conv, _v, token, status, _c = await a.create_chat(name="v")
            assert status == "assigned"
            member = b.member
            assert member is not None
            attach = member.attach
            sent = 0

            async def late_attach(*args: Any, **kwargs: Any) -> None:
                # The owner stores a message after the welcome, before b follows it.
                nonlocal sent
                sent += 1
                await send(agent, type="send", conv=conv, client_msg_id=f"gap{sent}", text="gap")
                assert (await recv(agent, "ack"))["seq"] == sent
                await attach(*args, **kwargs)

            member.attach = late_attach  # type: ignore[method-assign]
            visitor, welcome = await hello(b, token)
            assert welcome["convs"][0]["top_seq"] == 0
            frames = [await recv(visitor) for _ in range(2)]  # assigned, then the message
            kinds = [f["type"] for f in frames]
            assert sorted(kinds) == ["assigned", "msg"], frames
            got = next(f for f in frames if f["type"] == "msg")
            assert (got["seq"], got["text"]) == (1, "gap")
            # Live after that, and no stray "resumed".
            await send(agent, type="send", conv=conv, client_msg_id="live", text="live")
            nxt = await recv(visitor)
            assert (nxt["type"], nxt["seq"]) == ("msg", 2), nxt
            member.attach = attach  # type: ignore[method-assign]
            for ws in (agent, visitor):
                await ws.close()

    run(body)
