"""The gRPC front of a node that does not own the conversation (in-process nodes of one
cluster, a real redis-server, the generated ``grpc.aio`` client): ``Subscribe`` with the
visitor's token streams the owner's events, and resumes from ``(epoch, last_seq)`` with
exactly the missed messages; ``Send`` and ``History`` go to the owner."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import msgspec

from kefu.config import Config, GrpcConfig
from kefu.grpc.server import GrpcServer
from kefu.grpc.v1 import kefu_pb2 as pb
from kefu.grpc.v1 import kefu_pb2_grpc as pb_grpc
from kefu.node import Node
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_cross_node import (
    AGENT_TOKEN,
    node_config,
    online,
    recv,
    run,
    send,
    two_nodes,
)

CALL_S = 10.0


def grpc_config(data_dir: Path, url: str) -> Config:
    """A cluster node's config with the gRPC front on a port the OS picks."""
    return msgspec.structs.replace(
        node_config(data_dir, url), grpc=GrpcConfig(host="127.0.0.1", port=0)
    )


async def next_event(stream: Any, kind: str) -> Any:
    """The next event of ``kind`` on ``stream`` (others skipped), within CALL_S."""
    async with asyncio.timeout(CALL_S):
        while True:
            event = await stream.read()
            assert event is not grpc.aio.EOF, "the stream ended"
            if event.type == kind:
                return event


def test_subscribe_through_a_node_that_does_not_own_the_conversation(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body() -> None:
        async with two_nodes(tmp_path, redis_server.url, grpc_config) as (a, b):
            front = GrpcServer(b.config, b)
            await front.start()
            try:
                await chat(a, b, front.port)
            finally:
                await front.stop()

    run(body)


async def chat(a: Node, b: Node, port: int) -> None:
    agent = await online(a, AGENT_TOKEN)
    conv, _v, token, status, _c = await a.create_chat(name="v")  # a owns it
    assert status == "assigned"
    auth = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ChatStub(channel)
        stream = stub.Subscribe(pb.SubscribeRequest(session_id=conv), metadata=auth)
        first = await next_event(stream, "subscribed")
        assert (first.subscribed.conv, first.subscribed.status) == (conv, "assigned")
        epoch = first.subscribed.epoch

        # The agent (on a) writes; the subscriber on b gets it from the owner.
        await send(agent, type="send", conv=conv, client_msg_id="a1", text="from a")
        got = await next_event(stream, "msg")
        assert (got.msg.seq, got.msg.text) == (1, "from a")
        # A Send through b is stored by a, acked with a's seq, and streamed back.
        sent = await stub.Send(
            pb.SendRequest(session_id=conv, text="via b", client_msg_id="v1"),
            metadata=auth,
            timeout=CALL_S,
        )
        assert sent.seq == 2
        assert (await next_event(stream, "msg")).msg.text == "via b"
        assert (await recv(agent, "msg"))["text"] == "from a"
        stream.cancel()

        # Two messages while nobody subscribes; a resume through b gets exactly those.
        for i in (3, 4):
            await send(agent, type="send", conv=conv, client_msg_id=f"a{i}", text=f"m{i}")
            assert (await recv(agent, "ack"))["seq"] == i
        resume = pb.ResumePoint(epoch=epoch, last_seq=2)
        again = stub.Subscribe(pb.SubscribeRequest(session_id=conv, resume=resume), metadata=auth)
        await next_event(again, "subscribed")
        replayed = [(await next_event(again, "msg")).msg.seq for _ in range(2)]
        assert replayed == [3, 4]
        assert (await next_event(again, "resumed")).resumed.recovered
        history = await stub.History(
            pb.HistoryRequest(session_id=conv), metadata=auth, timeout=CALL_S
        )
        assert [m.seq for m in history.messages] == [1, 2, 3, 4]
        again.cancel()
    await agent.close()
