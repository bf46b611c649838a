"""Restarts of ``kefu serve`` on the same data directory: a graceful stop (SIGTERM) and a
``kill -9`` while messages are being sent. Acknowledged means stored: after the restart every
acked message is in the history with its seq, nothing is there twice, seq goes on without a gap,
and a client that comes back with ``hello.resume`` gets what it missed.

Each test has its own server (and kills it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Spawn
from tests.e2e.harness import (
    FAST_RATE,
    RECV_TIMEOUT,
    Closed,
    WsClient,
    agent,
    config,
    run,
    token_of_agent,
)

pytestmark = pytest.mark.slow  # starts `kefu serve` processes

RESUME_MAX = 300


def test_graceful_restart_keeps_everything(spawn: Spawn) -> None:
    server = spawn(config([agent("alice")], ws={"rate": FAST_RATE}))
    state: dict[str, Any] = {}

    async def before() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chat = await api.create_chat(name="Vic")
        conv, token = chat["session_id"], chat["token"]
        state.update(conv=conv, token=token)
        await alice.recv("assigned")
        visitor, _ = await server.ws(token)
        await visitor.say_many(conv, "v", 10)
        await alice.say_many(conv, "a", 10)
        await visitor.recv_until(lambda f: f["type"] == "msg" and f["seq"] == 20)
        # the visitor's network goes; the stop below is what it misses nothing of
        visitor.drop()
        await alice.say_many(conv, "b", 5)
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
        code, _reason = await alice.closed()
        assert code == 1001, f"agent connection closed with {code}, expected 1001 (going away)"
        assert await asyncio.wait_for(stopping, RECV_TIMEOUT * 2) == 0, server.stderr()

    run(before)
    server.start()

    async def after() -> None:
        conv, token = state["conv"], state["token"]
        visitor, welcome = await server.ws(token, [{"conv": conv, "epoch": 1, "last_seq": 20}])
        assert welcome["convs"] == [{"conv": conv, "epoch": 1, "top_seq": 25, "status": "assigned"}]
        replayed = [await visitor.recv() for _ in range(5)]
        assert [(f["type"], f["seq"], f["text"]) for f in replayed] == [
            ("msg", 21 + i, f"b {i}") for i in range(5)
        ]
        assert await visitor.recv() == {
            "type": "resumed",
            "conv": conv,
            "from_seq": 21,
            "to_seq": 25,
        }
        alice = await server.agent("alice")
        assert (await alice.say(conv, "after", "after the restart"))["seq"] == 26
        # dedup survives the restart
        again = await visitor.say(conv, "v3", "v 3")
        assert (again["seq"], again["dup"]) == (4, True)
        async with server.rest() as api:
            history = await api.full_history(conv, token)
        assert [m["seq"] for m in history] == list(range(1, 27))
        texts = [f"v {i}" for i in range(10)] + [f"a {i}" for i in range(10)]
        texts += [f"b {i}" for i in range(5)] + ["after the restart"]
        assert [m["text"] for m in history] == texts
        await visitor.close()
        await alice.close()

    run(after)


class Pump:
    """Sends messages into one conversation, ``window`` unacknowledged at a time, until the
    connection dies; records what was sent and what was acked."""

    def __init__(self, client: WsClient, conv: str, prefix: str, window: int = 16) -> None:
        self.client = client
        self.conv = conv
        self.prefix = prefix
        self.window = window
        self.sent: dict[str, str] = {}  # client_msg_id -> text
        self.acked: dict[str, int] = {}  # client_msg_id -> seq

    async def run(self, acked_total: list[int], enough: asyncio.Event, limit: int) -> None:
        client = self.client
        with contextlib.suppress(Closed, ConnectionClosed, OSError):
            while len(self.sent) < limit:
                while len(self.sent) < limit and len(self.sent) - len(self.acked) < self.window:
                    cid = f"{self.prefix}{len(self.sent)}"
                    text = f"{self.prefix} message {len(self.sent)}"
                    self.sent[cid] = text
                    await client.send(type="send", conv=self.conv, client_msg_id=cid, text=text)
                frame = await client.recv()
                if frame["type"] == "ack":
                    assert frame["client_msg_id"] not in self.acked, frame
                    self.acked[frame["client_msg_id"]] = frame["seq"]
                    acked_total[0] += 1
                    if acked_total[0] >= 150:
                        enough.set()
                else:  # its own messages echoed, the state the hello brought
                    assert frame["type"] in ("msg", "assigned", "queued"), frame


def test_kill_9_while_sending_loses_nothing_acked(spawn: Spawn) -> None:
    server = spawn(config([agent("alice", max_chats=10)], ws={"rate": FAST_RATE}))
    chats: list[dict[str, Any]] = []
    pumps: list[Pump] = []
    agent_seen: dict[str, int] = {}

    async def before() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            for _ in range(3):
                chats.append(await api.create_chat())
        for chat in chats:
            await alice.recv_match("assigned", conv=chat["session_id"])
        for i, chat in enumerate(chats):
            ws, _ = await server.ws(chat["token"])
            pumps.append(Pump(ws, chat["session_id"], f"p{i}-"))

        async def watch() -> None:  # the agent's view: the last seq it got per conversation
            with contextlib.suppress(Closed):
                while True:
                    frame = await alice.recv()
                    if frame["type"] == "msg":
                        agent_seen[frame["conv"]] = frame["seq"]

        acked_total = [0]
        enough = asyncio.Event()
        watcher = asyncio.ensure_future(watch())
        tasks = [asyncio.ensure_future(p.run(acked_total, enough, 5_000)) for p in pumps]
        waiting = asyncio.ensure_future(enough.wait())
        await asyncio.wait(
            [waiting, *tasks], timeout=RECV_TIMEOUT * 3, return_when=asyncio.FIRST_COMPLETED
        )
        for t in tasks:  # a pump that failed says why
            if t.done():
                t.result()
        waiting.cancel()
        assert enough.is_set(), "the pumps did not get 150 acks"
        server.kill()  # in the middle of the traffic: no flush, no close frames
        await asyncio.wait_for(asyncio.gather(*tasks, watcher), RECV_TIMEOUT * 2)

    run(before)
    assert sum(len(p.acked) for p in pumps) >= 150
    server.start()

    async def after() -> None:
        alice_conv = chats[0]["session_id"]
        async with server.rest() as api:
            for chat, pump in zip(chats, pumps, strict=True):
                conv, token = chat["session_id"], chat["token"]
                history = await api.full_history(conv, token)
                seqs = [m["seq"] for m in history]
                assert seqs == list(range(1, len(history) + 1)), "seq has a gap or a repeat"
                cids = [m["client_msg_id"] for m in history]
                assert len(set(cids)) == len(cids), "a message is stored twice"
                stored = {m["client_msg_id"]: (m["seq"], m["text"]) for m in history}
                for cid, seq in pump.acked.items():
                    assert stored.get(cid) == (seq, pump.sent[cid]), f"acked {cid} lost"
                assert set(stored) <= set(pump.sent), "a message nobody sent"
                assert all(m["epoch"] == 1 for m in history)

                # the client retries what it never saw acked: stored ones are duplicates,
                # the others are new, and seq continues without a gap
                visitor, welcome = await server.ws(token)
                assert welcome["convs"][0]["top_seq"] == len(history)
                assert welcome["convs"][0]["epoch"] == 1
                top = len(history)
                for cid, text in pump.sent.items():
                    if cid in pump.acked:
                        continue
                    ack = await visitor.say(conv, cid, text)
                    if cid in stored:
                        assert (ack["seq"], ack["dup"]) == (stored[cid][0], True)
                    else:
                        top += 1
                        assert (ack["seq"], ack["dup"]) == (top, False)
                ack = await visitor.say(conv, "fresh", "after the crash")
                assert (ack["seq"], ack["dup"]) == (top + 1, False)
                history = await api.full_history(conv, token)
                assert [m["seq"] for m in history] == list(range(1, top + 2))
                assert len(history) == len(pump.sent) + 1
                await visitor.close()

            # the agent comes back with what it had seen and gets the rest
            seen = agent_seen.get(alice_conv, 0)
            top = len(pumps[0].sent) + 1
            alice, welcome = await server.ws(
                token_of_agent("alice"), [{"conv": alice_conv, "epoch": 1, "last_seq": seen}]
            )
            assert alice_conv in {c["conv"] for c in welcome["convs"]}
            if top - seen > RESUME_MAX:
                want = {"type": "resumed", "conv": alice_conv, "recovered": False}
                assert await alice.recv("resumed") == want
                return
            replayed = [await alice.recv() for _ in range(top - seen)]
            assert [(f["type"], f["seq"]) for f in replayed] == [
                ("msg", s) for s in range(seen + 1, top + 1)
            ]
            assert await alice.recv("resumed") == {
                "type": "resumed",
                "conv": alice_conv,
                "from_seq": seen + 1,
                "to_seq": top,
            }
            await alice.close()

    run(after)
