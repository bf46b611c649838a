"""Resume after a dropped connection, against ``kefu serve``: up to 300 missed messages are
replayed in order and closed by ``resumed {from_seq, to_seq}``; more is ``recovered: false``
and the client pages the REST history. Retries with one ``client_msg_id`` store one message.

The tests share one server: each works in a conversation of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import FAST_RATE, ServerProcess, agent, config, run, running

pytestmark = pytest.mark.slow  # starts `kefu serve` processes

RESUME_MAX = 300  # PROTOCOL.md: "more than 300 are missing" -> recovered: false


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = config([agent("alice", max_chats=100)], ws={"rate": FAST_RATE})
    with running(tmp_path_factory.mktemp("resume"), cfg) as server:
        yield server


@pytest.mark.parametrize("missed", [0, 1, 299, RESUME_MAX, RESUME_MAX + 1])
def test_resume_after_drop(server: ServerProcess, missed: int) -> None:
    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chat = await api.create_chat()
            conv, token = chat["session_id"], chat["token"]
            await alice.recv_match("assigned", conv=conv)
            visitor, _ = await server.ws(token)
            await alice.say(conv, "first", "first")
            assert (await visitor.recv("msg"))["seq"] == 1
            visitor.drop()  # the network goes; no close handshake

            acks = await alice.say_many(conv, "m", missed)
            assert sorted(a["seq"] for a in acks.values()) == list(range(2, missed + 2))
            top = missed + 1

            again, welcome = await server.ws(token, [{"conv": conv, "epoch": 1, "last_seq": 1}])
            assert welcome["convs"] == [
                {"conv": conv, "epoch": 1, "top_seq": top, "status": "assigned"}
            ]
            replayed, resumed = await again.replay(conv)
            if missed <= RESUME_MAX:
                assert [f["seq"] for f in replayed] == list(range(2, top + 1))
                assert [f["text"] for f in replayed] == [f"m {i}" for i in range(missed)]
                assert all(f["conv"] == conv and f["epoch"] == 1 for f in replayed)
                assert resumed == {"type": "resumed", "conv": conv, "from_seq": 2, "to_seq": top}
            else:
                assert replayed == []
                assert resumed == {"type": "resumed", "conv": conv, "recovered": False}
                # the client pages the REST history instead
                history = await api.full_history(conv, token)
                assert [m["seq"] for m in history] == list(range(1, top + 1))
            # nothing is sent twice: no msg after the resumed
            assert [f for f in await again.until_pong() if f["type"] == "msg"] == []

            # a second resume from the top: an empty range, no msg
            third, _ = await server.ws(token, [{"conv": conv, "epoch": 1, "last_seq": top}])
            replayed, resumed = await third.replay(conv)
            assert replayed == []
            assert resumed == {"type": "resumed", "conv": conv, "from_seq": top + 1, "to_seq": top}
            assert [f for f in await third.until_pong() if f["type"] == "msg"] == []

            # live delivery continues on the resumed connections
            assert (await alice.say(conv, "live", "live"))["seq"] == top + 1
            for ws in (again, third):
                msg = await ws.recv("msg")
                assert (msg["seq"], msg["text"]) == (top + 1, "live")
            for ws in (again, third, alice):
                await ws.close()

    run(body)


def test_resume_that_cannot_be_served(server: ServerProcess) -> None:
    """Another epoch or a position beyond the top: ``recovered: false``, never a guess."""

    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chat = await api.create_chat()
        conv, token = chat["session_id"], chat["token"]
        await alice.recv_match("assigned", conv=conv)
        await alice.say(conv, "a1", "one")
        for epoch, last_seq in ((2, 0), (1, 5)):
            ws, _ = await server.ws(token, [{"conv": conv, "epoch": epoch, "last_seq": last_seq}])
            replayed, resumed = await ws.replay(conv)
            assert replayed == []
            assert resumed == {"type": "resumed", "conv": conv, "recovered": False}
            await ws.ping()
            await ws.close()
        await alice.close()

    run(body)


def test_repeated_client_msg_id_is_one_message(server: ServerProcess) -> None:
    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chat = await api.create_chat()
            conv, token = chat["session_id"], chat["token"]
            await alice.recv_match("assigned", conv=conv)
            visitor, _ = await server.ws(token)
            first = await visitor.say(conv, "same", "once")
            assert (first["seq"], first["dup"]) == (1, False)
            again = await visitor.say(conv, "same", "once")
            assert again == {**first, "dup": True}
            # the same id with another text is still the same message
            assert (await visitor.say(conv, "same", "changed"))["seq"] == 1
            # over REST too
            assert (await api.send(conv, token, "once", client_msg_id="same"))["seq"] == 1
            assert (await api.send(conv, token, "rest", client_msg_id="r"))["seq"] == 2
            assert (await api.send(conv, token, "rest", client_msg_id="r"))["seq"] == 2
            # a new id after the retries takes the next seq: no seq was spent on them
            assert (await visitor.say(conv, "next", "next"))["seq"] == 3

            history = await api.full_history(conv, token)
            assert [(m["seq"], m["text"]) for m in history] == [
                (1, "once"),
                (2, "rest"),
                (3, "next"),
            ]
            # the agent saw each message once
            seen = [
                (await alice.recv_until(lambda f: f["type"] == "msg" and f["conv"] == conv))["seq"]
                for _ in range(3)
            ]
            assert seen == [1, 2, 3]
            await alice.send(type="ping")
            assert (await alice.recv_until(lambda f: f["type"] in ("msg", "pong")))[
                "type"
            ] == "pong"
            await visitor.close()
            await alice.close()

    run(body)
