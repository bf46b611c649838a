"""The node's agent work and timers, in-process: accept, transfer, presence, idle expiry with
a short TTL, agent grace, the admin's agent operations, the first start and the REST entry
points (:meth:`Node.send_message`, :meth:`Node.close_chat`, :meth:`Node.history`)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

import kefu.node
from kefu.config import AgentConfig, BotConfig, Config, RoutingConfig, WsConfig
from kefu.errors import KefuError
from kefu.node import DEMO_AGENT_ID, Node
from kefu.protocol import AgentCreate, AgentUpdate
from tests.test_node import hello, recv, run, say, send

ALICE, BOB = "alice-token", "bob-token"


def config(tmp_path: Path, **kw: Any) -> Config:
    base: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "ws": WsConfig(host="127.0.0.1", port=0),
        "agents": [
            AgentConfig(id="alice", name="Alice", token=ALICE, max_chats=1, groups=["sales"]),
            AgentConfig(id="bob", name="Bob", token=BOB, max_chats=1, groups=["support"]),
        ],
        "bot": BotConfig(enabled=False),
        "admin_token": "admin-secret",
    }
    base.update(kw)
    return Config(**base)


async def agent_online(node: Node, token: str) -> ClientConnection:
    ws, welcome = await hello(node, token)
    assert welcome["role"] == "agent"
    await send(ws, type="status", status="online")
    assert (await recv(ws, "status"))["status"] == "online"
    return ws


def test_accept_from_the_queue(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            # alice hands the conversation to the support group, where nobody is online: it
            # waits for the group with alice excluded from automatic routing, so her free
            # slot does not take it straight back; she may still accept it by hand.
            alice = await agent_online(node, ALICE)
            conv, _v, token, status, _ = await node.create_chat(name="Ann")
            assert status == "assigned"
            await recv(alice, "assigned")
            await send(alice, type="transfer", conv=conv, to_group="support")
            assert (await recv(alice, "transferred"))["to"] == "support"
            assert node.routing.assigned_to(int(conv, 16)) is None
            await send(alice, type="accept", conv=conv)
            assigned = await recv(alice, "assigned")
            assert assigned["conv"] == conv and assigned["visitor"]["name"] == "Ann"
            assert node.routing.assigned_to(int(conv, 16)) == "alice"
            # A second accept of a conversation no longer queued is refused.
            await send(alice, type="accept", conv=conv)
            err = await recv(alice, "error")
            assert err["code"] in ("invalid_state", "not_queued") and err["ref"] == "accept"
            # Visitors may not accept.
            visitor, _ = await hello(node, token)
            await send(visitor, type="accept", conv=conv)
            assert (await recv(visitor, "error"))["code"] == "forbidden"
            await visitor.close()
            await alice.close()
        finally:
            await node.stop()

    run(body)


def test_transfer_to_agent_and_group(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            alice = await agent_online(node, ALICE)
            conv, _v, token, status, _ = await node.create_chat()
            assert status == "assigned" and (await recv(alice, "assigned"))["conv"] == conv
            visitor, _ = await hello(node, token)
            await say(visitor, conv, "v1", "hello")
            # bob is not connected yet: agent_unavailable, alice keeps it.
            await send(alice, type="transfer", conv=conv, to_agent="bob")
            assert (await recv(alice, "error"))["code"] == "agent_unavailable"
            bob = await agent_online(node, BOB)
            await send(alice, type="transfer", conv=conv, to_agent="bob")
            assert await recv(alice, "transferred") == {
                "type": "transferred",
                "conv": conv,
                "to": "bob",
            }
            assigned = await recv(bob, "assigned")
            assert assigned["conv"] == conv and [m["text"] for m in assigned["messages"]] == [
                "hello"
            ]
            assert (await recv(visitor, "assigned"))["agent"]["id"] == "bob"
            # alice may no longer write; bob may.
            await send(alice, type="send", conv=conv, client_msg_id="a", text="x")
            assert (await recv(alice, "error"))["code"] == "forbidden"
            assert (await say(bob, conv, "b1", "bob here"))["seq"] == 2
            # To a group whose only member (alice) is free: she gets it back.
            await send(bob, type="transfer", conv=conv, to_group="sales")
            assert (await recv(bob, "transferred"))["to"] == "sales"
            assert (await recv(alice, "assigned"))["conv"] == conv
            # To a group with a free member: bob (support) gets it.
            await send(alice, type="transfer", conv=conv, to_group="support")
            assert (await recv(alice, "transferred"))["to"] == "support"
            assert (await recv(bob, "assigned"))["conv"] == conv
            await send(bob, type="transfer", conv=conv, to_group="nobody")
            assert (await recv(bob, "error"))["code"] == "unknown_group"
            # To a group whose only member is the sender: the conversation waits for the
            # group (the visitor is told its place).
            await send(bob, type="transfer", conv=conv, to_group="support")
            assert (await recv(bob, "transferred"))["to"] == "support"
            assert (await recv(visitor, "queued"))["position"] == 1
            assert node.routing.assigned_to(int(conv, 16)) is None
            for ws in (alice, bob, visitor):
                await ws.close()
        finally:
            await node.stop()

    run(body)


def test_presence_is_announced_to_agents(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            alice, _ = await hello(node, ALICE)
            seen = {(await recv(alice, "presence"))["agent"]["id"] for _ in range(2)}
            assert seen == {"alice", "bob"}  # every agent's presence after the welcome
            bob = await agent_online(node, BOB)
            while True:
                p = (await recv(alice, "presence"))["agent"]
                if p["id"] == "bob" and p["status"] == "online":
                    break
            conv, *_ = await node.create_chat()
            assert (await recv(bob, "assigned"))["conv"] == conv
            while True:
                p = (await recv(alice, "presence"))["agent"]
                if p["id"] == "bob" and p["active_chats"] == 1:
                    break
            await bob.close()
            while True:
                p = (await recv(alice, "presence"))["agent"]
                if p["id"] == "bob" and p["status"] == "offline":
                    break
            await alice.close()
        finally:
            await node.stop()

    run(body)


def test_idle_conversations_expire(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path), idle_ttl_ms=400)
        await node.start()
        try:
            alice = await agent_online(node, ALICE)
            conv, _v, token, _s, _ = await node.create_chat()
            await recv(alice, "assigned")
            queued_conv, _v2, _token2, status2, _ = await node.create_chat()
            assert status2 == "queued"  # alice holds one, her max
            visitor, _ = await hello(node, token)
            await say(visitor, conv, "v1", "hi")  # activity: the TTL starts again
            closed = await recv(visitor, "closed")
            assert closed == {"type": "closed", "conv": conv, "by": "expired", "reason": "expired"}
            assert (await recv(alice, "closed"))["conv"] == conv
            # Both expired (the queued one too); the store knows.
            for c in (conv, queued_conv):
                assert node.store.get_conversation(int(c, 16)).status == "closed"
            assert node.expired_total == 2
            await send(visitor, type="send", conv=conv, client_msg_id="late", text="x")
            assert (await recv(visitor, "error"))["code"] == "conversation_closed"
            await visitor.close()
            await alice.close()
        finally:
            await node.stop()

    run(body)


def test_agent_grace_requeues_conversations(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = config(tmp_path, routing=RoutingConfig(agent_grace_s=0.3))
        node = Node(cfg)
        await node.start()
        try:
            alice = await agent_online(node, ALICE)
            conv, _v, token, _s, _ = await node.create_chat()
            await recv(alice, "assigned")
            visitor, _ = await hello(node, token)
            await alice.close()
            # Within the grace a reconnect keeps the conversation...
            alice = await agent_online(node, ALICE)
            await asyncio.sleep(0.5)
            assert node.routing.assigned_to(int(conv, 16)) == "alice"
            # ...past it, the conversation goes back in line (and to bob when he comes).
            await alice.close()
            assert (await recv(visitor, "queued"))["position"] == 1
            bob, _ = await hello(node, BOB)
            await send(bob, type="status", status="online")  # assigned comes before the answer
            assert (await recv(bob, "assigned"))["conv"] == conv
            assert (await recv(visitor, "assigned"))["agent"]["id"] == "bob"
            await bob.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_rest_entry_points(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            alice = await agent_online(node, ALICE)
            conv, visitor_id, token, *_ = await node.create_chat()
            await recv(alice, "assigned")
            first = await node.send_message(conv, "over REST", "r1")
            again = await node.send_message(conv, "over REST", "r1")
            assert (first.seq, first.dup, again.seq, again.dup) == (1, False, 1, True)
            assert again.ts == first.ts and first.status == "assigned"
            msg = await recv(alice, "msg")
            assert (msg["seq"], msg["text"], msg["from"]["id"]) == (1, "over REST", visitor_id)
            no_id = await node.send_message(conv, "no id")
            assert no_id.seq == 2
            page = node.history(conv, 0, 1)
            assert [m.seq for m in page.messages] == [1] and page.more and page.epoch == 1
            page = node.history(conv, 1, 10)
            assert [m.seq for m in page.messages] == [2] and not page.more
            with pytest.raises(KefuError) as info:
                node.history(conv, 0, 10, role="visitor", principal="someone-else")
            assert info.value.code == "forbidden"
            with pytest.raises(KefuError) as info:
                await node.send_message("00000000000000ff", "x")
            assert info.value.code == "not_found"
            await node.close_chat(conv, by="admin")
            await node.close_chat(conv, by="admin")  # idempotent
            assert (await recv(alice, "closed"))["by"] == "admin"
            with pytest.raises(KefuError) as info:
                await node.send_message(conv, "late")
            assert info.value.code == "conversation_closed"
            assert node.visitor_of_token(token) == (visitor_id, conv)
            assert node.visitor_of_token(token + "x") is None
            assert node.is_admin("admin-secret") and not node.is_admin("admin-secret ")
            assert not node.is_api_key("anything")  # none configured
            await alice.close()
        finally:
            await node.stop()

    run(body)


def test_admin_agents(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            created = await node.create_agent(
                AgentCreate(id="carol", name="Carol", weight=2, max_chats=3, groups=["vip"])
            )
            assert created.token and created.active_chats == 0 and created.groups == ["vip"]
            with pytest.raises(KefuError) as info:
                await node.create_agent(AgentCreate(id="carol", name="Again"))
            assert info.value.code == "conflict"
            with pytest.raises(KefuError) as info:
                await node.update_agent("alice", AgentUpdate(weight=5))
            assert info.value.code == "conflict"  # declared in the config file
            carol = await agent_online(node, created.token)
            conv, *_ = await node.create_chat()
            assert (await recv(carol, "assigned"))["conv"] == conv
            view = await node.update_agent("carol", AgentUpdate(max_chats=7, groups=["a", "b"]))
            assert (view.max_chats, view.groups, view.active_chats) == (7, ["a", "b"], 1)
            # Disabling requeues at once and ends the agent's connections.
            view = await node.update_agent("carol", AgentUpdate(disabled=True))
            assert view.disabled and view.active_chats == 0
            assert node.routing.assigned_to(int(conv, 16)) is None
            await asyncio.wait_for(carol.wait_closed(), 5)
            assert carol.close_code == 1008
            assert node.agent_of_token(created.token) is None
            # Kept in the store: a restart knows carol (disabled), and not her token in clear.
            await node.stop()
            node = Node(config(tmp_path))
            await node.start()
            assert node.get_agent("carol").disabled
            raw = b"".join(v for _, v in node.store._db.items())  # type: ignore[attr-defined]
            assert created.token.encode() not in raw
            await node.delete_agent("carol")
            assert "carol" not in {a.id for a in node.list_agents().agents}
            with pytest.raises(KefuError) as info:
                node.get_agent("carol")
            assert info.value.code == "unknown_agent"
        finally:
            await node.stop()

    run(body)


def test_first_start_creates_admin_token_and_demo_agent(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = Config(data_dir=str(tmp_path), ws=WsConfig(host="127.0.0.1", port=0))
        node = Node(cfg)
        await node.start()
        try:
            boot = node.bootstrap
            assert boot is not None and boot.admin_token and boot.demo_agent_token
            assert boot.demo_agent_id == DEMO_AGENT_ID
            path = Path(boot.credentials_path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            text = path.read_text()
            assert boot.admin_token in text and boot.demo_agent_token in text
            assert node.is_admin(boot.admin_token)
            demo, welcome = await hello(node, boot.demo_agent_token)
            assert welcome["id"] == DEMO_AGENT_ID
            await demo.close()
        finally:
            await node.stop()
        again = Node(cfg)
        await again.start()
        try:
            assert again.bootstrap is None  # nothing new on a later start
            assert again.is_admin(boot.admin_token)
            assert again.agent_of_token(boot.demo_agent_token) == DEMO_AGENT_ID
        finally:
            await again.stop()

    run(body)


def test_metrics_follow_the_traffic(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = node.metrics_text().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            alice = await agent_online(node, ALICE)
            conv, _v, token, *_ = await node.create_chat()
            await recv(alice, "assigned")
            visitor, _ = await hello(node, token)
            for i in range(3):
                await say(visitor, conv, f"v{i}", "hi")
            await say(visitor, conv, "v0", "hi")  # a duplicate
            await say(alice, conv, "a0", "hello")
            got = samples(node)
            assert got[("kefu_messages_total", (("role", "visitor"),))] == 3
            assert got[("kefu_messages_total", (("role", "agent"),))] == 1
            assert got[("kefu_message_duplicates_total", ())] == 1
            assert got[("kefu_message_persist_seconds_count", ())] == 4
            # Every WS message is timed from its frame's read to storage and to delivery.
            for path in ("persisted", "delivered"):
                name = f"kefu_message_received_to_{path}_seconds"
                assert got[(f"{name}_count", ())] == 4
                assert 0 < got[(f"{name}_sum", ())] < 4 * 10.0
            assert (
                got[("kefu_message_received_to_delivered_seconds_sum", ())]
                >= got[("kefu_message_received_to_persisted_seconds_sum", ())]
            )
            assert got[("kefu_ws_write_batches_total", ())] >= 1
            # Group commit: batches observed, holding every message written.
            batches = got[("kefu_store_batch_messages_count", ())]
            assert 1 <= batches == got[("kefu_store_batch_write_seconds_count", ())]
            assert got[("kefu_store_batch_messages_sum", ())] >= 4
            assert got[("kefu_conversations_open_assigned", ())] == 1
            assert got[("kefu_routing_load", ())] == 1
            assert got[("kefu_hub_visitor_connections", ())] == 1
            assert got[("kefu_ws_frames_in_total", (("type", "send"),))] == 5
            assert got[("kefu_store_messages_written_total", ())] >= 4
            assert got[("kefu_healthy", ())] == 1
            assert got[("process_resident_memory_bytes", ())] > 0
            await alice.close()
            await visitor.close()
        finally:
            await node.stop()

    run(body)


def test_session_accounting(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            conv, *_ = await node.create_chat()  # queued: nobody is online
            other, *_ = await node.create_chat()
            before = node.session_stats(conv)
            for i in range(50):
                await node.send_message(conv, "字" * 1000, f"c{i}")
            after = node.session_stats(conv)
            assert after.cpu_seconds > before.cpu_seconds
            # 50 messages of 3,000 UTF-8 bytes each are held in the ring of recent messages.
            assert after.memory_bytes - before.memory_bytes >= 50 * 3000
            assert node.session_stats(other).memory_bytes < 2_000
            with pytest.raises(KefuError) as info:
                node.session_stats("00000000000000ff")
            assert info.value.code == "not_found"

            # The gauge (running totals) is the per-session figure summed over the open ones.
            def gauge() -> float:
                (family,) = [f for f in node._collect_sessions() if f.name.endswith("memory_bytes")]
                return family.samples[0][1]

            total = node.session_stats(conv).memory_bytes + node.session_stats(other).memory_bytes
            assert gauge() == total
            await node.close_chat(conv, by="admin")
            closed = node.session_stats(conv)
            assert closed.cpu_seconds >= after.cpu_seconds and closed.memory_bytes == 0
            assert gauge() == node.session_stats(other).memory_bytes
        finally:
            await node.stop()

    run(body)


def test_session_accounting_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ACCOUNTED conversations the least recently charged one leaves the accounting:
    its CPU time reads 0, the gauge stays at the bound, the drop is counted, and the total
    keeps what it was charged."""
    monkeypatch.setattr(kefu.node, "MAX_ACCOUNTED", 2)

    def families(node: Node) -> dict[str, float]:
        return {f.name: f.samples[0][1] for f in node._collect_sessions()}

    async def body() -> None:
        node = Node(config(tmp_path))
        await node.start()
        try:
            convs = [(await node.create_chat())[0] for _ in range(3)]
            for conv in convs[:2]:
                await node.send_message(conv, "hello", None)
            first = node.session_stats(convs[0]).cpu_seconds
            assert first > 0
            total = families(node)["kefu_session_cpu_seconds_total"]
            await node.send_message(convs[0], "again", None)  # 0 is now the most recent
            await node.send_message(convs[2], "hello", None)  # 1 goes
            got = families(node)
            assert node.session_stats(convs[1]).cpu_seconds == 0
            assert node.session_stats(convs[0]).cpu_seconds > first
            assert node.session_stats(convs[2]).cpu_seconds > 0
            assert got["kefu_session_cpu_accounted"] == 2
            assert got["kefu_session_cpu_dropped_total"] == 1
            assert got["kefu_session_cpu_seconds_total"] > total
        finally:
            await node.stop()

    run(body)
