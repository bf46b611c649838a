"""A conversation end to end against ``kefu serve``: REST create, WebSocket talk, routing by
weighted smooth round-robin, the waiting queue, transfers, manual accept, close, history.

Frame shapes are checked as PROTOCOL.md writes them; routing tests each get a fresh server, so
the round-robin starts from zero and no other test's conversations take capacity.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.conftest import Spawn
from tests.e2e.harness import FAST_RATE, WsClient, agent, config, recv_any, run

pytestmark = pytest.mark.slow  # starts `kefu serve` processes

CONV_ID = re.compile(r"^[0-9a-f]{16}$")


def swrr(weights: dict[str, int], picks: int) -> list[str]:
    """Reference smooth weighted round-robin (nginx): every candidate's current weight grows by
    its weight, the largest wins (ties: the one declared first) and loses the total."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    order: list[str] = []
    for _ in range(picks):
        for name, w in weights.items():
            current[name] += w
        best = max(current, key=lambda n: (current[n], -list(weights).index(n)))
        current[best] -= total
        order.append(best)
    return order


def test_swrr_reference() -> None:
    assert "".join(n[0] for n in swrr({"a": 5, "b": 1, "c": 1}, 7)) == "aabacaa"


def test_visitor_over_rest_and_agent_over_ws(spawn: Spawn) -> None:
    server = spawn(config([agent("alice")], ws={"rate": FAST_RATE}))

    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            created = await api.create_chat(name="Bob", metadata={"plan": "gold"})
            conv, token = created["session_id"], created["token"]
            assert CONV_ID.match(conv), created
            assert created["status"] == "assigned" and created["ws_url"] == server.ws_url
            visitor_id = created["visitor_id"]

            assigned = await alice.recv("assigned")
            assert assigned["conv"] == conv
            assert assigned["agent"] == {"id": "alice", "name": "Alice"}
            assert assigned["visitor"]["id"] == visitor_id
            assert assigned["visitor"]["name"] == "Bob"
            assert assigned.get("messages", []) == []

            visitor, welcome = await server.ws(token)
            assert welcome["role"] == "visitor" and welcome["id"] == visitor_id
            assert welcome["convs"] == [
                {"conv": conv, "epoch": 1, "top_seq": 0, "status": "assigned"}
            ]
            assert welcome["max_msg_bytes"] == 64 * 1024 and welcome["ping_interval_ms"] > 0

            # alternate sides; every ack carries the next seq, the other side gets the msg
            turns: list[tuple[WsClient, WsClient, str, dict[str, Any]]] = []
            vis_from = {"role": "visitor", "id": visitor_id}
            ali_from = {"role": "agent", "id": "alice", "name": "Alice"}
            for i in range(6):
                if i % 2 == 0:
                    turns.append((visitor, alice, f"v{i}", vis_from))
                else:
                    turns.append((alice, visitor, f"a{i}", ali_from))
            for seq, (sender, receiver, cid, who) in enumerate(turns, start=1):
                ack = await sender.say(conv, cid, f"text {cid}")
                assert ack == {
                    "type": "ack",
                    "conv": conv,
                    "client_msg_id": cid,
                    "seq": seq,
                    "ts": ack["ts"],
                    "dup": False,
                }
                assert isinstance(ack["ts"], int) and ack["ts"] > 1_600_000_000_000
                msg = await receiver.recv_match("msg", seq=seq)
                assert msg["conv"] == conv and msg["epoch"] == 1 and msg["text"] == f"text {cid}"
                assert msg["client_msg_id"] == cid and msg["ts"] == ack["ts"]
                assert {k: msg["from"][k] for k in who} == who
                assert isinstance(msg["id"], str) and msg["id"]

            # a visitor message over REST reaches the agent like one over WebSocket
            sent = await api.send(conv, token, "over rest", client_msg_id="r1")
            assert sent["seq"] == 7 and sent["status"] == "assigned" and sent["replies"] == []
            msg = await alice.recv_match("msg", seq=7)
            assert msg["text"] == "over rest" and msg["from"]["role"] == "visitor"

            # typing and read are relayed to the other side
            await visitor.send(type="typing", conv=conv)
            typing = await alice.recv("typing")
            assert typing["conv"] == conv and typing["from"]["id"] == visitor_id
            await alice.send(type="read", conv=conv, seq=7)
            read = await visitor.recv("read")
            assert (read["conv"], read["seq"], read["from"]["id"]) == (conv, 7, "alice")

            for side in (visitor, alice):
                await side.send(type="sync", conv=conv, after=0, limit=100)
                hist = await side.recv("history")
                assert [m["seq"] for m in hist["messages"]] == list(range(1, 8))
                assert hist["more"] is False and hist["epoch"] == 1
            await visitor.close()
            await alice.close()

    run(body)


def test_weighted_round_robin_order(spawn: Spawn) -> None:
    weights = {"alice": 3, "bob": 1}
    server = spawn(
        config(
            [agent(n, weight=w, max_chats=100) for n, w in weights.items()], ws={"rate": FAST_RATE}
        )
    )

    async def body() -> None:
        agents = [await server.agent(n) for n in weights]
        got: list[str] = []
        async with server.rest() as api:
            for _ in range(8):
                conv = (await api.create_chat())["session_id"]
                i, assigned = await recv_any(agents, "assigned")
                assert assigned["conv"] == conv
                assert assigned["agent"]["id"] == list(weights)[i]
                got.append(assigned["agent"]["id"])
        assert got == swrr(weights, 8)
        for a in agents:
            await a.close()

    run(body)


def test_queue_positions_close_and_reassign(spawn: Spawn) -> None:
    server = spawn(config([agent("alice", max_chats=2)], ws={"rate": FAST_RATE}))

    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chats = [await api.create_chat(name=f"v{i}") for i in range(5)]
        convs = [c["session_id"] for c in chats]
        assert [c["status"] for c in chats] == ["assigned"] * 2 + ["queued"] * 3
        for conv in convs[:2]:
            assert (await alice.recv("assigned"))["conv"] == conv
        visitors: list[WsClient] = []
        for i, chat in enumerate(chats):
            ws, welcome = await server.ws(chat["token"])
            assert welcome["convs"][0]["status"] == ("assigned" if i < 2 else "queued")
            await ws.ping()  # drops what the hello brought, so the next frames are news
            visitors.append(ws)

        # the visitor closes: both sides hear it, the head of the queue gets the slot
        await visitors[0].send(type="close", conv=convs[0])
        want = {"type": "closed", "conv": convs[0], "by": "visitor", "reason": "visitor"}
        assert await visitors[0].recv("closed") == want
        assert await alice.recv("closed") == want
        assert (await alice.recv("assigned"))["conv"] == convs[2]
        assigned = await visitors[2].recv("assigned")
        assert assigned["conv"] == convs[2] and assigned["agent"] == {
            "id": "alice",
            "name": "Alice",
        }
        assert await visitors[3].recv("queued") == {
            "type": "queued",
            "conv": convs[3],
            "position": 1,
        }
        assert await visitors[4].recv("queued") == {
            "type": "queued",
            "conv": convs[4],
            "position": 2,
        }

        # the agent closes: same for the next in line
        await alice.send(type="close", conv=convs[1])
        want = {"type": "closed", "conv": convs[1], "by": "agent", "reason": "agent"}
        assert await alice.recv("closed") == want
        assert await visitors[1].recv("closed") == want
        assert (await alice.recv("assigned"))["conv"] == convs[3]
        assert (await visitors[3].recv("assigned"))["conv"] == convs[3]
        assert await visitors[4].recv("queued") == {
            "type": "queued",
            "conv": convs[4],
            "position": 1,
        }

        # a closed conversation takes no message; closing again repeats the verdict
        await visitors[0].send(type="send", conv=convs[0], client_msg_id="late", text="x")
        err = await visitors[0].recv("error")
        assert err["code"] == "conversation_closed" and err["ref"] == "late"
        await visitors[0].send(type="close", conv=convs[0])
        assert (await visitors[0].recv("closed"))["by"] == "visitor"

        # close over REST (idempotent), heard by the agent
        async with server.rest() as api:
            for _ in range(2):
                status, out = await api.call(
                    "POST", "/v1/chat/close", {"session_id": convs[2]}, token=chats[2]["token"]
                )
                assert (status, out) == (200, {"session_id": convs[2], "status": "closed"})
        closed = await alice.recv("closed")
        assert (closed["conv"], closed["by"]) == (convs[2], "visitor")
        assert (await alice.recv("assigned"))["conv"] == convs[4]
        for ws in [*visitors, alice]:
            await ws.close()

    run(body)


def test_queued_visitor_learns_position_at_hello(spawn: Spawn) -> None:
    """``queued`` is sent when the conversation joins the queue, which for a chat created over
    REST is before any WebSocket exists: the position must come with the hello."""
    server = spawn(config([agent("alice", max_chats=1)], ws={"rate": FAST_RATE}))

    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chats = [await api.create_chat() for _ in range(4)]
        assert [c["status"] for c in chats] == ["assigned"] + ["queued"] * 3
        for pos, chat in enumerate(chats[1:], start=1):
            ws, _welcome = await server.ws(chat["token"])
            queued = await ws.recv("queued")
            assert queued == {"type": "queued", "conv": chat["session_id"], "position": pos}
            await ws.close()
        await alice.close()

    run(body)


def test_transfer_to_agent_and_group_then_accept(spawn: Spawn) -> None:
    cfg = config(
        [
            agent("alice", groups=["sales"]),
            agent("bob", groups=["sales"]),
            agent("carol", groups=["support"]),
            agent("dave", groups=["vip"]),  # never online: the vip group has nobody free
        ],
        ws={"rate": FAST_RATE},
    )
    server = spawn(cfg)

    async def body() -> None:
        names = ["alice", "bob", "carol"]
        agents = {n: await server.agent(n) for n in names}
        async with server.rest() as api:
            chat = await api.create_chat(name="Vic")
        conv, token = chat["session_id"], chat["token"]
        i, _ = await recv_any(list(agents.values()), "assigned")
        holder = names[i]
        visitor, _welcome = await server.ws(token)
        await visitor.ping()  # drops what the hello brought, so the next frames are news

        # to a named agent: transferred to the sender, assigned to the target and the visitor
        target = "carol" if holder != "carol" else "alice"
        await agents[holder].send(type="transfer", conv=conv, to_agent=target)
        assert await agents[holder].recv("transferred") == {
            "type": "transferred",
            "conv": conv,
            "to": target,
        }
        assigned = await agents[target].recv("assigned")
        assert assigned["conv"] == conv and assigned["agent"]["id"] == target
        assert (await visitor.recv("assigned"))["agent"]["id"] == target
        # the former holder may no longer write
        await agents[holder].send(type="send", conv=conv, client_msg_id="old", text="x")
        assert (await agents[holder].recv("error"))["code"] == "forbidden"
        holder = target

        # to a group: a member other than the sender takes it
        await agents[holder].send(type="transfer", conv=conv, to_group="sales")
        assert await agents[holder].recv("transferred") == {
            "type": "transferred",
            "conv": conv,
            "to": "sales",
        }
        members = [n for n in ("alice", "bob") if n != holder]
        i, assigned = await recv_any([agents[n] for n in members], "assigned")
        assert assigned["conv"] == conv
        holder = members[i]
        assert (await visitor.recv("assigned"))["agent"]["id"] == holder

        # to a group with nobody free: queued for it, the visitor learns its position
        await agents[holder].send(type="transfer", conv=conv, to_group="vip")
        assert (await agents[holder].recv("transferred"))["to"] == "vip"
        assert await visitor.recv("queued") == {"type": "queued", "conv": conv, "position": 1}

        # an agent with a free slot outside the group accepts it by hand
        await agents["carol"].send(type="accept", conv=conv)
        assigned = await agents["carol"].recv("assigned")
        assert assigned["conv"] == conv and assigned["agent"]["id"] == "carol"
        assert (await visitor.recv("assigned"))["agent"]["id"] == "carol"
        ack = await agents["carol"].say(conv, "c1", "carol here")
        assert ack["seq"] == 1
        # accepting what is no longer queued is refused, and nothing changes
        await agents["alice"].send(type="accept", conv=conv)
        err = await agents["alice"].recv("error")
        assert err["code"] in ("not_queued", "forbidden"), err
        await agents["alice"].ping()
        for ws in [*agents.values(), visitor]:
            await ws.close()

    run(body)


def test_history_paging_rest_and_sync(spawn: Spawn) -> None:
    server = spawn(config([agent("alice")], ws={"rate": FAST_RATE}))

    async def body() -> None:
        alice = await server.agent("alice")
        async with server.rest() as api:
            chat = await api.create_chat()
            conv, token = chat["session_id"], chat["token"]
            await alice.recv("assigned")
            for i in range(7):
                assert (await api.send(conv, token, f"m{i}", client_msg_id=f"m{i}"))["seq"] == i + 1

            pages = []
            for after, limit in ((0, 3), (3, 3), (6, 3), (4, 3), (7, 3), (0, 100)):
                page = await api.history(conv, token, after, limit)
                pages.append(([m["seq"] for m in page["messages"]], page["more"]))
                assert page["epoch"] == 1
            assert pages == [
                ([1, 2, 3], True),
                ([4, 5, 6], True),
                ([7], False),
                ([5, 6, 7], False),
                ([], False),
                (list(range(1, 8)), False),
            ]
            first = (await api.history(conv, token, 0, 1))["messages"][0]
            assert first["text"] == "m0" and first["from"]["role"] == "visitor"

            # the history of another session is not the visitor's to read
            other = await api.create_chat()
            status, out = await api.call(
                "GET", f"/v1/chat/{conv}/messages?after=0&limit=5", token=other["token"]
            )
            assert status == 403 and out["error"]["code"] == "forbidden", (status, out)
            status, out = await api.call("GET", f"/v1/chat/{conv}/messages")
            assert status == 401 and out["error"]["code"] == "unauthorized", (status, out)

        for after, limit, seqs, more in ((0, 3, [1, 2, 3], True), (6, 3, [7], False)):
            await alice.send(type="sync", conv=conv, after=after, limit=limit)
            hist = await alice.recv("history")
            assert hist["conv"] == conv and hist["epoch"] == 1
            assert ([m["seq"] for m in hist["messages"]], hist["more"]) == (seqs, more)
        await alice.close()

    run(body)
