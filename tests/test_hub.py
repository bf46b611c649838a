"""The hub on its own, with stand-in connections: registration, encode-once fan-out, rings."""

from __future__ import annotations

from typing import Any, cast

import msgspec

from kefu.hub import Hub
from kefu.protocol import Msg, Sender, TypingRelay
from kefu.web.ws import Connection


class FakeConnection:
    def __init__(self, msgpack: bool = False) -> None:
        self.msgpack = msgpack
        self.got: list[tuple[bytes, str]] = []

    def send_encoded(self, data: bytes, kind: str) -> bool:
        self.got.append((data, kind))
        return True


def conn(msgpack: bool = False) -> Any:
    return cast(Connection, FakeConnection(msgpack))


def msg(seq: int) -> Msg:
    return Msg(
        conv="00000000000000aa",
        seq=seq,
        epoch=1,
        id=f"m{seq}",
        from_=Sender(role="visitor", id="v", name="visitor"),
        text=f"text {seq}",
        ts=seq,
    )


def test_register_and_unregister_track_first_and_last() -> None:
    hub = Hub()
    a1, a2 = conn(), conn()
    assert hub.register(a1, ("agent", "alice")) is True
    assert hub.register(a2, ("agent", "alice")) is False
    assert hub.key_of(a1) == ("agent", "alice")
    assert hub.unregister(a1) == (("agent", "alice"), False)
    assert hub.unregister(a1) is None  # twice: nothing
    assert hub.unregister(a2) == (("agent", "alice"), True)
    assert not hub.is_connected(("agent", "alice"))
    assert hub.stats()["principals"] == 0


def test_send_role_reaches_every_connection_of_the_role_through_churn() -> None:
    hub = Hub()
    frame = TypingRelay(conv="00000000000000aa", from_=Sender(role="agent", id="a", name="a"))
    visitors = [conn() for _ in range(50)]
    for i, v in enumerate(visitors):
        hub.register(v, ("visitor", f"v{i}"))
    alice1, alice2, bob, carol = conn(), conn(), conn(), conn()
    hub.register(alice1, ("agent", "alice"))
    hub.register(alice2, ("agent", "alice"))
    hub.register(bob, ("agent", "bob"))
    hub.register(carol, ("agent", "carol"))
    assert hub.register(bob, ("agent", "bob")) is False  # again: counted once
    hub.unregister(carol)
    hub.unregister(visitors[0])
    hub.send_role("agent", [frame, frame])
    assert [len(c.got) for c in (alice1, alice2, bob, carol)] == [2, 2, 2, 0]
    assert all(v.got == [] for v in visitors)
    stats = hub.stats()
    assert (stats["agent_connections"], stats["visitor_connections"]) == (3, 49)
    # a connection that re-registers as someone else leaves its first principal
    hub.register(alice2, ("agent", "dave"))
    assert hub.connections(("agent", "alice")) == [alice1]
    hub.unregister(alice1)
    hub.unregister(alice2)
    hub.unregister(bob)
    hub.send_role("agent", [frame])  # no agent left: nothing sent, nothing raised
    assert [len(c.got) for c in (alice1, alice2, bob)] == [2, 2, 2]
    assert hub.stats()["agent_connections"] == 0 and hub.stats()["principals"] == 49
    for v in visitors[1:]:
        hub.unregister(v)
    assert hub.stats() == Hub().stats()  # nothing kept for roles gone


def test_fan_out_encodes_once_per_encoding(monkeypatch: Any) -> None:
    import kefu.hub as hub_module

    calls = {"json": 0, "msgpack": 0}
    real_json, real_mp = hub_module.encode_json, hub_module.encode_msgpack

    def count_json(frame: object) -> bytes:
        calls["json"] += 1
        return real_json(frame)

    def count_mp(frame: object) -> bytes:
        calls["msgpack"] += 1
        return real_mp(frame)

    monkeypatch.setattr(hub_module, "encode_json", count_json)
    monkeypatch.setattr(hub_module, "encode_msgpack", count_mp)
    hub = Hub()
    tabs = [conn() for _ in range(3)]
    packed = conn(msgpack=True)
    for c in tabs:
        hub.register(c, ("visitor", "v"))
    hub.register(packed, ("agent", "alice"))
    other = conn()
    hub.register(other, ("agent", "bob"))
    frame = TypingRelay(conv="00000000000000aa", from_=Sender(role="visitor", id="v", name="v"))
    sent = hub.send([("visitor", "v"), ("agent", "alice"), ("agent", "nobody")], frame)
    assert sent == 4 and calls == {"json": 1, "msgpack": 1}
    for c in tabs:
        ((data, kind),) = c.got
        assert kind == "typing" and msgspec.json.decode(data)["from"]["id"] == "v"
    assert msgspec.msgpack.decode(packed.got[0][0])["type"] == "typing"
    assert other.got == []  # not a participant
    # skip leaves out the sender's own connections
    assert hub.send([("visitor", "v"), ("agent", "alice")], frame, skip=("visitor", "v")) == 1


def test_send_pair_reaches_the_visitor_and_the_agent_encoded_once_each(monkeypatch: Any) -> None:
    """The per-message fan-out: every connection of the conversation's visitor and agent, the
    frame encoded once per encoding; nobody else; no agent, only the visitor; a connection that
    leaves the set while it is written to (a slow consumer's close) does not stop the rest."""
    import kefu.hub as hub_module

    calls = {"json": 0, "msgpack": 0}
    real_json, real_mp = hub_module.encode_json, hub_module.encode_msgpack
    monkeypatch.setattr(
        hub_module,
        "encode_json",
        lambda f: calls.__setitem__("json", calls["json"] + 1) or real_json(f),
    )
    monkeypatch.setattr(
        hub_module,
        "encode_msgpack",
        lambda f: calls.__setitem__("msgpack", calls["msgpack"] + 1) or real_mp(f),
    )
    hub = Hub()
    tabs = [conn() for _ in range(3)]
    for c in tabs:
        hub.register(c, ("visitor", "v"))
    packed, json_agent, bystander = conn(msgpack=True), conn(), conn()
    hub.register(packed, ("agent", "alice"))
    hub.register(json_agent, ("agent", "alice"))
    hub.register(bystander, ("agent", "bob"))

    class Leaving(FakeConnection):
        """Closes (leaves the hub) while it is written to."""

        def send_encoded(self, data: bytes, kind: str) -> bool:
            super().send_encoded(data, kind)
            hub.unregister(cast(Connection, self))
            return False

    leaving = Leaving()
    hub.register(cast(Connection, leaving), ("visitor", "v"))
    out = msg(7)
    hub.send_pair("v", "alice", out, "msg")
    assert calls == {"json": 1, "msgpack": 1}
    for c in [*tabs, json_agent, leaving]:
        ((data, kind),) = c.got
        assert kind == "msg" and msgspec.json.decode(data)["seq"] == 7
    ((data, kind),) = packed.got
    assert kind == "msg" and msgspec.msgpack.decode(data)["seq"] == 7
    assert bystander.got == []
    assert hub.connections(("visitor", "v")) and leaving not in hub.connections(("visitor", "v"))
    # A conversation without an agent: its visitor's connections only.
    hub.send_pair("v", None, msg(8), "msg")
    assert [len(c.got) for c in tabs] == [2, 2, 2] and len(json_agent.got) == 1


def test_rings_are_bounded_and_replay_contiguous_seqs() -> None:
    hub = Hub(max_rings=2, ring_capacity=4)
    store_reads: list[tuple[int, int]] = []

    def read_store(last: int, count: int) -> list[Msg]:
        store_reads.append((last, count))
        return [msg(s) for s in range(last + 1, last + 1 + count)]

    for s in range(1, 7):
        hub.remember(1, msg(s))
    # The ring holds 3..6: a client at 2 is served from it, one at 1 from the store.
    assert [m.seq for m in hub.missed(1, 2, 4, read_store)] == [3, 4, 5, 6]
    assert store_reads == []
    assert [m.seq for m in hub.missed(1, 1, 5, read_store)] == [2, 3, 4, 5, 6]
    assert store_reads == [(1, 5)]
    # A gap restarts the ring; an older seq (acks out of order) is not added.
    hub.remember(1, msg(9))
    hub.remember(1, msg(8))
    assert [m.seq for m in hub.missed(1, 8, 1, read_store)] == [9]
    # Past max_rings the least recently used conversation loses its ring.
    hub.remember(2, msg(1))
    hub.remember(3, msg(1))
    assert hub.stats()["rings"] == 2 and hub.stats()["rings_dropped_total"] == 1
    hub.missed(1, 0, 1, read_store)
    assert store_reads[-1] == (0, 1)  # conversation 1 was the one dropped


def test_ring_totals_follow_every_change_of_the_rings() -> None:
    """``rings_bytes`` (running totals) equals ``ring_bytes`` summed over the rings, through
    appends, evictions of full rings, gaps, late seqs, LRU drops and forgets."""
    import random

    rng = random.Random(5)
    hub = Hub(max_rings=6, ring_capacity=5)
    seqs: dict[int, int] = {}
    texts = ["hi", "字" * 7, "emoji 😀", "x" * 40, ""]
    for _ in range(3_000):
        conv = rng.randrange(10)
        op = rng.random()
        if op < 0.05:
            hub.forget(conv)
            continue
        seq = seqs.get(conv, 0) + (1 if op < 0.85 else rng.choice([0, -1, 2, 5]))
        seqs[conv] = max(seqs.get(conv, 0), seq)
        m = msg(max(seq, 1))
        m.text = rng.choice(texts)
        hub.remember(conv, m)
        walked = sum(hub.ring_bytes(c) for c in range(10))
        assert hub.rings_bytes() == walked
    stats = hub.stats()
    assert stats["ring_messages"] <= 6 * 5 and stats["rings"] <= 6
    for c in range(10):
        hub.forget(c)
    assert hub.rings_bytes() == 0 and hub.stats()["ring_text_bytes"] == 0
