"""A visitor and an agent on different nodes of one cluster (in-process nodes, a real
redis-server, clients from the ``websockets`` library): chat both ways, acks and seq from the
owner, dedup, history and resume through the node that does not own the conversation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from kefu.config import AgentConfig, BotConfig, ClusterConfig, Config, WsConfig
from kefu.node import Node
from tests import aio
from tests.cluster.redis_server import RedisServer

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
        a = Node(node_config(tmp_path / "a", redis_server.url))
        b = Node(node_config(tmp_path / "b", redis_server.url))
        await a.start()
        await b.start()
        try:
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
        finally:
            await b.stop()
            await a.stop()

    run(body)
