"""The node end to end: a real Node on a loopback port (ws port 0, data in tmp_path), clients
from the ``websockets`` library, every test bounded by a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from kefu.config import AgentConfig, BotConfig, Config, WsConfig
from kefu.node import Node
from kefu.store import parse_conv_id
from kefu.web.ws import NOWAIT_MAX
from tests import aio

TIMEOUT = 20.0
RECV_TIMEOUT = 5.0
AGENT_TOKEN = "agent-token"


def run(test: Callable[[], Awaitable[None]], timeout: float = TIMEOUT) -> None:
    aio.run(test, timeout)


def make_config(data_dir: Path) -> Config:
    return Config(
        data_dir=str(data_dir),
        ws=WsConfig(host="127.0.0.1", port=0),
        agents=[AgentConfig(id="alice", name="Alice", token=AGENT_TOKEN, max_chats=2)],
        bot=BotConfig(enabled=False),
    )


async def recv(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame (of type ``kind``, skipping others when given; ``presence`` frames,
    which agents get whenever an agent's load changes, are skipped unless asked for)."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
        frame: dict[str, Any] = json.loads(raw)
        if frame["type"] == kind or (kind is None and frame["type"] != "presence"):
            return frame


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def hello(
    node: Node, token: str, resume: list[dict[str, Any]] | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"ws://127.0.0.1:{node.ws_port}/ws")
    frame: dict[str, Any] = {"type": "hello", "token": token}
    if resume is not None:
        frame["resume"] = resume
    await send(ws, **frame)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    return ws, welcome


async def online_agent(node: Node) -> ClientConnection:
    ws, welcome = await hello(node, AGENT_TOKEN)
    assert welcome["role"] == "agent" and welcome["id"] == "alice"
    await send(ws, type="status", status="online")
    assert await recv(ws) == {"type": "status", "status": "online"}
    return ws


async def say(ws: ClientConnection, conv: str, cid: str, text: str) -> dict[str, Any]:
    await send(ws, type="send", conv=conv, client_msg_id=cid, text=text)
    return await recv(ws, "ack")


async def history(ws: ClientConnection, conv: str) -> dict[str, Any]:
    await send(ws, type="sync", conv=conv, after=0, limit=100)
    return await recv(ws, "history")


async def chat_with_agent(node: Node) -> tuple[ClientConnection, ClientConnection, str]:
    agent = await online_agent(node)
    conv, _visitor_id, token, status, created = await node.create_chat(name="Bob")
    assert created and status == "assigned"
    assigned = await recv(agent)
    assert assigned["type"] == "assigned" and assigned["conv"] == conv
    assert assigned["agent"] == {"id": "alice", "name": "Alice"}
    assert assigned["epoch"] == 1  # so a client with no message yet can resume it
    visitor, welcome = await hello(node, token)
    assert welcome["role"] == "visitor"
    assert welcome["convs"] == [{"conv": conv, "epoch": 1, "top_seq": 0, "status": "assigned"}]
    return agent, visitor, conv


class HeldAcks:
    """The store's answers to its writes held back: each batch is written to RocksDB, and its
    acks and deliveries wait until :meth:`release` (a write in that window, made on demand)."""

    def __init__(self, node: Node) -> None:
        self.writer = node.store.writer
        self._real = self.writer._ack
        self.batches: list[Any] = []
        self.writer._ack = self.batches.append  # type: ignore[method-assign]

    def written(self) -> int:
        """The writes held so far."""
        return sum(len(entries) for entries in self.batches)

    async def until(self, writes: int) -> int:
        """Waits (2 s at most) until ``writes`` writes are held; how many are."""
        for _ in range(200):
            if self.written() >= writes:
                break
            await asyncio.sleep(0.01)
        return self.written()

    def release(self) -> None:
        self.writer._ack = self._real  # type: ignore[method-assign]
        for entries in self.batches:
            self._real(entries)


def test_visitor_and_agent_talk(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            ack = await say(visitor, conv, "c1", "hello")
            assert (ack["seq"], ack["dup"], ack["conv"], ack["client_msg_id"]) == (
                1,
                False,
                conv,
                "c1",
            )
            msg = await recv(agent, "msg")
            assert msg["seq"] == 1 and msg["text"] == "hello" and msg["epoch"] == 1
            assert msg["from"]["role"] == "visitor" and msg["ts"] == ack["ts"]
            ack = await say(agent, conv, "a1", "hi, how can I help?")
            assert ack["seq"] == 2 and ack["dup"] is False
            assert (await recv(visitor, "msg"))["seq"] == 1  # every participant connection
            msg = await recv(visitor, "msg")
            assert msg["seq"] == 2 and msg["from"] == {
                "role": "agent",
                "id": "alice",
                "name": "Alice",
            }
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_a_conversations_kept_frames_share_its_id_and_its_visitors_sender(
    tmp_path: Path,
) -> None:
    """The frames kept for resume share the conversation's wire id and its visitor's sender
    (``Node._land``), made once; an agent's message has a sender of its own. On the wire each
    frame says who sent it all the same."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            for i in range(3):
                await say(visitor, conv, f"v{i}", f"question {i}")
            seen = [await recv(agent, "msg") for _ in range(3)]
            await say(agent, conv, "a0", "an answer")  # its ack comes before its msg
            seen.append(await recv(agent, "msg"))
            await say(visitor, conv, "v3", "thanks")
            seen.append(await recv(agent, "msg"))
            assert [m["seq"] for m in seen] == [1, 2, 3, 4, 5]
            state = node.conversations.get(parse_conv_id(conv))
            assert state is not None
            visitor_from = {"role": "visitor", "id": state.visitor_id, "name": "visitor"}
            assert [m["from"] for m in seen] == [visitor_from] * 3 + [
                {"role": "agent", "id": "alice", "name": "Alice"},
                visitor_from,
            ]
            ring = node.hub.rings.get(state.id)
            assert ring is not None
            kept = ring.to_list()
            assert [m.seq for m in kept] == [1, 2, 3, 4, 5]
            assert state.wire_id == conv
            assert all(m.conv is state.wire_id for m in kept)  # one string for all of them
            by_visitor = [m for m in kept if m.from_.role == "visitor"]
            assert len(by_visitor) == 4
            assert all(m.from_ is state.visitor_sender for m in by_visitor)
            (by_agent,) = [m for m in kept if m.from_.role == "agent"]
            assert (by_agent.from_.id, by_agent.from_.name) == ("alice", "Alice")
            assert by_agent.from_ is not state.visitor_sender
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_the_store_answer_writes_the_ack_and_delivery_at_once(tmp_path: Path) -> None:
    """The ack and the agent's ``msg`` leave from the group commit's answer (flush_writes),
    not from a callback of the loop's next turn."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            ws = node.ws
            assert ws is not None
            written: list[int] = []
            flush = ws.flush_writes

            def spy() -> None:
                before = ws.batches_written
                flush()
                written.append(ws.batches_written - before)

            ws.flush_writes = spy  # type: ignore[method-assign]
            ack = await say(visitor, conv, "c1", "hello")
            assert ack["seq"] == 1
            assert (await recv(agent, "msg"))["text"] == "hello"
            # The send's batch: the visitor's ack and the agent's msg, one write each (a
            # later batch of the node's own records writes nothing).
            assert written[0] == 2 and sum(written) == 2
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_duplicate_client_msg_id(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            first = await say(visitor, conv, "same", "once")
            again = await say(visitor, conv, "same", "once")
            assert first["dup"] is False and again["dup"] is True
            assert again["seq"] == first["seq"] == 1 and again["ts"] == first["ts"]
            hist = await history(visitor, conv)
            assert [m["seq"] for m in hist["messages"]] == [1] and hist["more"] is False
            assert (await say(visitor, conv, "other", "twice"))["seq"] == 2
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_resume_replays_missed_messages(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            assert (await say(visitor, conv, "v1", "first"))["seq"] == 1
            await visitor.close()
            for i in range(3):
                assert (await say(agent, conv, f"a{i}", f"reply {i}"))["seq"] == i + 2
            visitor, welcome = await hello(
                node, token_of(node, conv), [{"conv": conv, "epoch": 1, "last_seq": 1}]
            )
            assert welcome["convs"][0]["top_seq"] == 4
            got = [await recv(visitor) for _ in range(4)]
            assert [f["type"] for f in got] == ["msg", "msg", "msg", "resumed"]
            assert [f["seq"] for f in got[:3]] == [2, 3, 4]
            assert got[3] == {"type": "resumed", "conv": conv, "from_seq": 2, "to_seq": 4}
            # nothing missed: an empty range; a wrong epoch: not recovered
            again, _ = await hello(
                node,
                token_of(node, conv),
                [{"conv": conv, "epoch": 1, "last_seq": 4}],
            )
            assert await recv(again) == {
                "type": "resumed",
                "conv": conv,
                "from_seq": 5,
                "to_seq": 4,
            }
            other, _ = await hello(
                node, token_of(node, conv), [{"conv": conv, "epoch": 7, "last_seq": 1}]
            )
            assert await recv(other) == {"type": "resumed", "conv": conv, "recovered": False}
            # live delivery still reaches the resumed connection
            await say(agent, conv, "a9", "live")
            assert (await recv(visitor, "msg"))["seq"] == 5
            for ws in (agent, visitor, again, other):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def token_of(node: Node, conv: str) -> str:
    """A fresh visitor token for ``conv`` (what create_chat hands out)."""
    state = node.conversations.get(parse_conv_id(conv))
    assert state is not None
    return node.signer.issue("visitor", state.visitor_id, 3600, extra={"conv": conv})


def test_restart_continues_seq_and_history(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            await say(visitor, conv, "v1", "one")
            await say(agent, conv, "a1", "two")
            await say(visitor, conv, "v2", "three")
            token = token_of(node, conv)
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

        node = Node(make_config(tmp_path))
        await node.start()
        try:
            assert node.signer.verify(token, "visitor").extra["conv"] == conv  # secret kept
            agent = await online_agent(node)
            visitor, welcome = await hello(node, token)
            assert welcome["convs"] == [
                {"conv": conv, "epoch": 1, "top_seq": 3, "status": "assigned"}
            ]
            ack = await say(visitor, conv, "v3", "four")
            assert ack["seq"] == 4 and ack["dup"] is False
            assert (await recv(agent, "msg"))["seq"] == 4
            dup = await say(visitor, conv, "v2", "three")  # dedup survives the restart
            assert dup["seq"] == 3 and dup["dup"] is True
            hist = await history(visitor, conv)
            assert [m["text"] for m in hist["messages"]] == ["one", "two", "three", "four"]
            # resume after the restart: the ring is new, the store fills in
            late, _ = await hello(node, token, [{"conv": conv, "epoch": 1, "last_seq": 1}])
            got = [await recv(late) for _ in range(4)]
            assert [f.get("seq") for f in got[:3]] == [2, 3, 4]
            assert got[3] == {"type": "resumed", "conv": conv, "from_seq": 2, "to_seq": 4}
            await late.close()
            await agent.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_forbidden_conversation(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            other, _v, other_token, _s, _created = await node.create_chat()
            intruder, welcome = await hello(node, other_token)
            assert [c["conv"] for c in welcome["convs"]] == [other]
            await send(intruder, type="send", conv=conv, client_msg_id="x1", text="boo")
            assert (await recv(intruder))["type"] == "assigned"  # where it stands, after welcome
            err = await recv(intruder)
            assert err["type"] == "error" and err["code"] == "forbidden" and err["ref"] == "x1"
            await send(intruder, type="sync", conv=conv, after=0, limit=10)
            assert (await recv(intruder))["code"] == "forbidden"
            await send(intruder, type="status", status="online")
            assert (await recv(intruder))["code"] == "forbidden"
            ack = await say(intruder, other, "x2", "my own conversation")  # still works
            assert ack["seq"] == 1 and ack["dup"] is False
            assert (await history(visitor, conv))["messages"] == []
            assert (await recv(intruder, "msg"))["seq"] == 1
            await send(intruder, type="ping")
            assert (await recv(intruder))["type"] == "pong"
            for ws in (agent, visitor, intruder):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_bad_token_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            ws = await connect(f"ws://127.0.0.1:{node.ws_port}/ws")
            await send(ws, type="hello", token="not-a-token")
            await asyncio.wait_for(ws.wait_closed(), RECV_TIMEOUT)
            assert ws.close_code == 1008
        finally:
            await node.stop()

    run(body)


def test_close_and_queue(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent = await online_agent(node)
            convs = []
            for _ in range(3):  # max_chats 2: the third waits in line
                conv, _v, token, status, _created = await node.create_chat()
                convs.append((conv, token, status))
            assert [s for _c, _t, s in convs] == ["assigned", "assigned", "queued"]
            first_conv, first_token = convs[0][0], convs[0][1]
            third_conv, third_token = convs[2][0], convs[2][1]
            third, welcome = await hello(node, third_token)
            assert welcome["convs"][0]["status"] == "queued"
            first, _ = await hello(node, first_token)
            await send(first, type="close", conv=first_conv)
            closed = await recv(first, "closed")
            assert closed == {
                "type": "closed",
                "conv": first_conv,
                "by": "visitor",
                "reason": "visitor",
            }
            assert (await recv(agent, "closed"))["conv"] == first_conv
            # the freed slot goes to the queued conversation
            assigned = await recv(third, "assigned")
            assert assigned["conv"] == third_conv
            assert (await recv(agent, "assigned"))["conv"] == third_conv
            await send(first, type="send", conv=first_conv, client_msg_id="late", text="x")
            assert (await recv(first, "error"))["code"] == "conversation_closed"
            for ws in (agent, first, third):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_resume_during_a_write_delivers_the_message_once(tmp_path: Path) -> None:
    """A message whose batch is in RocksDB but whose write is not answered yet: a connection
    resuming in that window must get it once (live, after ``resumed``), not replayed from the
    store and then pushed again."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            assert (await say(visitor, conv, "m1", "first"))["seq"] == 1
            assert (await recv(agent, "msg"))["seq"] == 1
            # Hold the answers of the writes: the batch is written, its futures wait.
            held = HeldAcks(node)
            await send(visitor, type="send", conv=conv, client_msg_id="m2", text="second")
            assert await held.until(1) == 1, "the write of m2 was not attempted"
            stored, _ = node.store.history(node._session(conv).id, 1, 10)
            assert [m.seq for m in stored] == [2]  # in RocksDB already
            # No ring for the conversation (as after a restart, or evicted): the replay reads
            # the store, where m2 already is.
            node.hub.rings.clear()
            # A second agent connection resumes from seq 1 in that window.
            again, _ = await hello(
                node, AGENT_TOKEN, resume=[{"conv": conv, "epoch": 1, "last_seq": 1}]
            )
            resumed = await recv(again, "resumed")
            assert (resumed["from_seq"], resumed["to_seq"]) == (2, 1)  # nothing replayed yet
            held.release()
            got = await recv(again, "msg")
            assert (got["seq"], got["text"]) == (2, "second")
            assert (await recv(visitor, "ack"))["seq"] == 2  # m2's ack, held until now
            # Exactly once: the next frame of that connection is a later message.
            assert (await say(visitor, conv, "m3", "third"))["seq"] == 3
            assert (await recv(again, "msg"))["seq"] == 3
            assert node._inflight == {}
            for ws in (again, agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_sends_of_both_paths_in_one_batch_are_delivered_in_seq_order(tmp_path: Path) -> None:
    """A send over REST (awaited) and one over the WebSocket (taken without a task) answered by
    the same write: every participant gets them in seq order, whichever path took each."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            held = HeldAcks(node)
            rest = asyncio.create_task(node.send_message(conv, "over rest", "r1"))
            await held.until(1)
            await send(agent, type="send", conv=conv, client_msg_id="a1", text="over ws")
            assert await held.until(2) == 2, held.batches
            held.release()
            assert (await rest).seq == 1
            assert [(await recv(visitor, "msg"))["seq"] for _ in range(2)] == [1, 2]
            got = [await recv(agent) for _ in range(3)]
            assert [(f["type"], f["seq"]) for f in got] == [("msg", 1), ("ack", 2), ("msg", 2)]
            assert node._inflight == {}
            for ws in (agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_pipelined_sends_are_taken_together_and_what_follows_waits_for_them(
    tmp_path: Path,
) -> None:
    """Sends a client writes without waiting for their acks are all taken without a task (they
    are in the store's queue together), while a command after them (a repeated send, a ping)
    waits until every one is answered: the answers keep the order of the commands."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            held = HeldAcks(node)
            for i in (1, 2, 3):
                await send(visitor, type="send", conv=conv, client_msg_id=f"m{i}", text=f"t{i}")
            assert await held.until(3) == 3  # none of them waited for the answer to the one before
            await send(visitor, type="send", conv=conv, client_msg_id="m2", text="t2")
            await send(visitor, type="ping")
            with contextlib.suppress(TimeoutError):
                while True:  # the conversation's ``assigned`` may still come, nothing else
                    early = json.loads(await asyncio.wait_for(visitor.recv(), 0.3))
                    assert early["type"] == "assigned", f"answered before the sends: {early}"
            assert held.written() == 3  # the repeat was not written
            held.release()
            got = [
                json.loads(await asyncio.wait_for(visitor.recv(), RECV_TIMEOUT)) for _ in range(8)
            ]
            assert [(f["type"], f.get("seq"), f.get("dup")) for f in got] == [
                ("ack", 1, False),
                ("msg", 1, None),
                ("ack", 2, False),
                ("msg", 2, None),
                ("ack", 3, False),
                ("msg", 3, None),
                ("ack", 2, True),
                ("pong", None, None),
            ]
            assert [(await recv(agent, "msg"))["text"] for _ in range(3)] == ["t1", "t2", "t3"]
            assert (await say(visitor, conv, "m4", "t4"))["seq"] == 4  # exactly once each
            assert (await recv(agent, "msg"))["seq"] == 4
            assert node._inflight == {}
            for ws in (agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_a_connection_done_with_its_frames_holds_no_inbox(tmp_path: Path) -> None:
    """A connection keeps a deque for its waiting frames only while some wait (an empty one is
    760 bytes, which every connection that ever sent would otherwise hold): neither sends taken
    without a task nor frames that waited in the inbox leave one behind."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            assert node.ws is not None
            (conn,) = [c for c in node.ws._conns.values() if c.role == "visitor"]
            assert (await say(visitor, conv, "m1", "fast"))["seq"] == 1  # taken without a task
            assert (await recv(agent, "msg"))["seq"] == 1
            assert conn._inbox is None
            held = HeldAcks(node)
            await send(visitor, type="send", conv=conv, client_msg_id="m2", text="taken")
            assert await held.until(1) == 1
            await send(visitor, type="ping")  # waits in the inbox for the send's answer
            for _ in range(100):
                if conn._inbox:
                    break
                await asyncio.sleep(0.01)
            assert conn._inbox is not None and len(conn._inbox) == 1
            held.release()
            assert (await recv(visitor, "ack"))["seq"] == 2
            await recv(visitor, "pong")
            assert conn._inbox is None
            for ws in (agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_sends_past_the_nowait_bound_wait_in_the_inbox(tmp_path: Path) -> None:
    """At most ``NOWAIT_MAX`` sends of one connection are in the store's queue at once; the
    next wait in the connection's inbox and are stored, in order, once those are answered."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            held = HeldAcks(node)
            total = NOWAIT_MAX + 3
            for i in range(total):
                await send(visitor, type="send", conv=conv, client_msg_id=f"m{i}", text=f"{i}")
            await held.until(NOWAIT_MAX)
            await asyncio.sleep(0.2)  # time for any send past the bound to be written
            assert held.written() == NOWAIT_MAX
            held.release()
            acks = [await recv(visitor, "ack") for _ in range(total)]
            assert [a["seq"] for a in acks] == list(range(1, total + 1))
            assert [a["client_msg_id"] for a in acks] == [f"m{i}" for i in range(total)]
            texts = [(await recv(agent, "msg"))["text"] for _ in range(total)]
            assert texts == [str(i) for i in range(total)]
            assert node._inflight == {}
            for ws in (agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_a_send_that_cannot_be_written_is_answered_with_an_error(tmp_path: Path) -> None:
    """The store refuses the write of a WebSocket send (here: it failed earlier): the sender
    gets ``error`` with its ``client_msg_id``, nothing is delivered, the connection goes on."""

    async def body() -> None:
        node = Node(make_config(tmp_path))
        await node.start()
        try:
            agent, visitor, conv = await chat_with_agent(node)
            assert (await say(visitor, conv, "m1", "first"))["seq"] == 1
            assert (await recv(agent, "msg"))["seq"] == 1
            assert (await recv(visitor, "msg"))["seq"] == 1
            writer = node.store.writer
            real_write = writer._write_batch

            def broken(*args: Any) -> None:
                raise OSError("disk gone")

            writer._write_batch = broken  # type: ignore[method-assign]
            await send(visitor, type="send", conv=conv, client_msg_id="m2", text="lost")
            error = await recv(visitor)
            assert error["type"] == "error" and error["ref"] == "m2", error
            assert error["code"] == "unavailable", error
            await send(visitor, type="ping")
            assert (await recv(visitor))["type"] == "pong"
            writer._write_batch = real_write  # type: ignore[method-assign]
            assert node._inflight == {}
            for ws in (agent, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)
