"""kefu.routing: the agent pool, the waiting queue and the routing decisions.

Pure unit tests: time is a number passed in, effects are compared exactly. The behavioural
tests run over both router implementations (``router_impl``); the state machine at the end
drives routing and conversations together with random operations and checks the invariants
after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kefu.conversations import Conversations, TooManyConversations
from kefu.routing import (
    AgentPool,
    AgentUnavailable,
    Assign,
    Effect,
    NotAssigned,
    NotQueued,
    PositionChanged,
    Queue,
    QueueEntry,
    QueueFull,
    Requeue,
    Routing,
    RoutingError,
    Unassign,
    UnknownAgent,
    UnknownGroup,
    WaitingQueue,
)

AgentSpec = tuple[str, int, int, Iterable[str]]  # id, weight, max_chats, groups
MakeRouting = Callable[..., Routing]


@pytest.fixture
def make_routing(router_impl: ModuleType) -> MakeRouting:
    """A Routing whose agents are online and connected, over the implementation under test."""

    def make(
        agents: Iterable[AgentSpec], *, max_queue: int = 100, grace_ms: int = 60_000
    ) -> Routing:
        pool = AgentPool(grace_ms=grace_ms, router=router_impl.Router(max_agents=100))
        routing = Routing(pool, WaitingQueue(max_queue))
        for agent_id, weight, max_chats, groups in agents:
            pool.add(agent_id, agent_id.upper(), weight=weight, max_chats=max_chats, groups=groups)
            assert routing.agent_connected(agent_id) == []
            assert routing.agent_status(agent_id, "online") == []
        return routing

    return make


def reference_swrr(weights: dict[str, int], picks: int) -> list[str]:
    """nginx's smooth weighted round-robin, written out: the oracle for the pick order."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    out = []
    for _ in range(picks):
        for name in current:
            current[name] += weights[name]
        best = max(current, key=lambda name: current[name])  # ties: the first added
        current[best] -= total
        out.append(best)
    return out


def assigned(effects: list[Effect]) -> list[str]:
    return [e.agent_id for e in effects if isinstance(e, Assign)]


# ---------------------------------------------------------------------------------------------
# Round-robin, capacity and the queue


def test_weights_3_1_assign_in_swrr_order(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 3, 100, ()), ("b", 1, 100, ())])
    got = [assigned(routing.route(conv, now_ms=0))[0] for conv in range(1, 13)]
    assert reference_swrr({"a": 3, "b": 1}, 12) == ["a", "a", "b", "a"] * 3
    assert got == ["a", "a", "b", "a"] * 3


def test_full_agents_queue_with_positions_and_a_close_moves_everyone_up(
    make_routing: MakeRouting,
) -> None:
    routing = make_routing([("a", 1, 1, ())])
    assert routing.route(1, now_ms=0) == [Assign(1, "a")]
    assert routing.route(2, now_ms=1) == [Queue(2, 1)]
    assert routing.route(3, now_ms=2) == [Queue(3, 2)]
    assert routing.route(4, now_ms=3) == [Queue(4, 3)]
    assert routing.queue.oldest_wait_ms(10) == 9

    assert routing.release(1) == [Assign(2, "a"), PositionChanged(3, 1), PositionChanged(4, 2)]
    assert routing.assigned_to(2) == "a"
    assert routing.pool.load("a") == 1
    # A visitor who leaves the queue moves only those behind it.
    routing.route(5, now_ms=4)
    assert routing.release(4) == [PositionChanged(5, 2)]
    assert routing.release(5) == []
    assert routing.release(99) == []  # never routed: nothing to free
    assert [e.conv for e in routing.queue] == [3]


def test_group_queue_does_not_block_those_behind_it(make_routing: MakeRouting) -> None:
    routing = make_routing([("s", 1, 1, ["sales"]), ("g", 1, 1, ())])
    assert routing.route(1, now_ms=0, group="sales") == [Assign(1, "s", "sales")]
    assert routing.route(2, now_ms=0) == [Assign(2, "g")]
    assert routing.route(3, now_ms=1, group="sales") == [Queue(3, 1, "sales")]
    assert routing.route(4, now_ms=2) == [Queue(4, 2)]
    # g frees a slot: the sales conversation ahead cannot go to g, the one behind it can.
    assert routing.release(2) == [Assign(4, "g")]
    assert routing.queue.position(3) == 1
    assert routing.release(1) == [Assign(3, "s", "sales")]


def test_the_oldest_conversation_an_agent_can_take_goes_first(make_routing: MakeRouting) -> None:
    routing = make_routing([("s", 1, 1, ["sales"])])
    routing.route(1, now_ms=0)
    assert routing.route(2, now_ms=1) == [Queue(2, 1)]
    assert routing.route(3, now_ms=2, group="sales") == [Queue(3, 2, "sales")]
    assert routing.release(1) == [Assign(2, "s"), PositionChanged(3, 1)]


def test_queue_full_refuses_only_what_would_wait(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 1, ()), ("s", 1, 1, ["sales"])], max_queue=2)
    routing.route(1, now_ms=0, group="sales")
    routing.route(2, now_ms=0, group="sales")
    routing.route(3, now_ms=0, group="sales")
    assert len(routing.queue) == 2
    with pytest.raises(QueueFull) as caught:
        routing.route(4, now_ms=0, group="sales")
    assert caught.value.code == "queue_full"
    assert 4 not in routing
    assert routing.stats(0)["queue_full_total"] == 1
    # a is free and takes anyone: a full queue does not stop a conversation it can serve.
    assert routing.route(5, now_ms=0) == [Assign(5, "a")]
    assert routing.release(1) == [Assign(2, "s", "sales"), PositionChanged(3, 1)]
    assert routing.route(4, now_ms=0, group="sales") == [Queue(4, 2, "sales")]


def test_route_refuses_unknown_groups_and_twice_routed(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 1, ["sales"])])
    with pytest.raises(UnknownGroup):
        routing.route(1, now_ms=0, group="nobody")
    assert 1 not in routing
    routing.route(1, now_ms=0)
    with pytest.raises(ValueError, match="already routed"):
        routing.route(1, now_ms=0)


# ---------------------------------------------------------------------------------------------
# Transfer and accept


def test_transfer_to_an_agent(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ()), ("b", 1, 1, ())])
    routing.route(1, now_ms=0)  # a
    routing.route(2, now_ms=0)  # b
    with pytest.raises(AgentUnavailable):
        routing.transfer(1, "a", to_agent="b")  # b is full
    with pytest.raises(NotAssigned):
        routing.transfer(1, "b", to_agent="a")
    with pytest.raises(UnknownAgent):
        routing.transfer(1, "a", to_agent="zed")
    with pytest.raises(ValueError, match="exactly one"):
        routing.transfer(1, "a", to_agent="b", to_group="x")
    assert routing.assigned_to(1) == "a"
    assert (routing.pool.load("a"), routing.pool.load("b")) == (1, 1)

    routing.release(2)
    assert routing.transfer(1, "a", to_agent="b") == [Unassign(1, "a"), Assign(1, "b")]
    assert routing.conversations_of("a") == []
    assert routing.conversations_of("b") == [1]


def test_forced_transfer_passes_capacity_and_status_and_frees_the_sender(
    make_routing: MakeRouting,
) -> None:
    routing = make_routing([("a", 1, 1, ()), ("b", 1, 1, ())])
    routing.route(1, now_ms=0)  # a
    routing.route(2, now_ms=0)  # b
    routing.route(3, now_ms=0)  # queued
    # b is full: an admin's forced transfer overrides that, and a's freed slot takes 3.
    assert routing.transfer(1, "a", to_agent="b", force=True) == [
        Unassign(1, "a"),
        Assign(1, "b"),
        Assign(3, "a"),
    ]
    assert routing.pool.load("b") == 2
    assert routing.stats(0)["forced_total"] == 1
    # Never to an agent with no connection: nobody would see the conversation.
    routing.agent_disconnected("a", now_ms=0)
    with pytest.raises(AgentUnavailable, match="not connected"):
        routing.transfer(1, "b", to_agent="a", force=True)


def test_transfer_to_a_group_skips_the_sender(make_routing: MakeRouting) -> None:
    # With these weights round-robin alone would pick a again: a: 3 - 4 + 3 = 2, b: 1 + 1 = 2.
    routing = make_routing([("a", 3, 5, ["sales"]), ("b", 1, 5, ["sales"]), ("c", 9, 5, ())])
    assert routing.route(1, now_ms=0, group="sales") == [Assign(1, "a", "sales")]
    assert routing.transfer(1, "a", to_group="sales") == [Unassign(1, "a"), Assign(1, "b", "sales")]
    assert routing.transfer(1, "b", to_group="sales") == [Unassign(1, "b"), Assign(1, "a", "sales")]
    with pytest.raises(UnknownGroup):
        routing.transfer(1, "a", to_group="vip")
    assert routing.assigned_to(1) == "a"


def test_transfer_to_a_full_group_queues_without_returning_to_the_sender(
    make_routing: MakeRouting,
) -> None:
    routing = make_routing([("a", 1, 1, ["sales"]), ("b", 1, 1, ["sales"])])
    routing.route(1, now_ms=0, group="sales")  # a
    routing.route(2, now_ms=0, group="sales")  # b
    assert routing.transfer(1, "a", to_group="sales") == [Unassign(1, "a"), Queue(1, 1, "sales")]
    # a's slot is free, but not for the conversation it handed on; a newer one may take it.
    assert routing.pool.load("a") == 0
    assert routing.route(3, now_ms=5) == [Assign(3, "a")]
    assert routing.release(2) == [Assign(1, "b", "sales")]


def test_transfer_to_a_group_refused_when_it_would_wait_in_a_full_queue(
    make_routing: MakeRouting,
) -> None:
    routing = make_routing([("a", 1, 1, ["sales"]), ("b", 1, 1, ["sales"])], max_queue=1)
    routing.route(1, now_ms=0, group="sales")  # a
    routing.route(2, now_ms=0, group="sales")  # b
    routing.route(3, now_ms=0, group="sales")  # queued: the queue is full
    with pytest.raises(QueueFull):
        routing.transfer(1, "a", to_group="sales")
    assert routing.assigned_to(1) == "a"
    assert [e.conv for e in routing.queue] == [3]


def test_the_sender_may_take_back_by_hand(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 1, ["sales"]), ("b", 1, 1, ["sales"])])
    routing.route(1, now_ms=0, group="sales")  # a
    routing.route(2, now_ms=0, group="sales")  # b
    routing.transfer(1, "a", to_group="sales")
    assert routing.accept(1, "a") == [Assign(1, "a", "sales")]


def test_accept_from_the_queue(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ()), ("b", 1, 1, ["sales"])])
    routing.route(1, now_ms=0, group="sales")  # b
    routing.route(2, now_ms=1, group="sales")
    routing.route(3, now_ms=2, group="sales")
    routing.route(4, now_ms=3, group="sales")
    assert [routing.queue.position(c) for c in (2, 3, 4)] == [1, 2, 3]
    # a is not in sales; routing never gives it these, but a person may take one.
    assert routing.accept(3, "a") == [Assign(3, "a", "sales"), PositionChanged(4, 2)]
    assert routing.accept(2, "a") == [Assign(2, "a", "sales"), PositionChanged(4, 1)]
    with pytest.raises(AgentUnavailable):  # a is full
        routing.accept(4, "a")
    with pytest.raises(NotQueued):
        routing.accept(1, "a")  # assigned, not queued
    with pytest.raises(NotQueued):
        routing.accept(77, "a")
    with pytest.raises(UnknownAgent):
        routing.accept(4, "zed")
    assert routing.queue.position(4) == 1
    assert routing.stats(0)["accepted_total"] == 2


# ---------------------------------------------------------------------------------------------
# Presence, grace and admin changes


def test_an_agent_not_online_gets_nothing_new(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 5, ())])
    routing.route(1, now_ms=0)
    for status in ("away", "offline"):
        assert routing.agent_status("a", status) == []
        assert routing.route(10 if status == "away" else 11, now_ms=0)[0] == Queue(
            10 if status == "away" else 11, 1 if status == "away" else 2
        )
        assert routing.assigned_to(1) == "a"  # it keeps what it holds
    assert routing.agent_status("a", "online") == [Assign(10, "a"), Assign(11, "a")]
    with pytest.raises(ValueError, match="status"):
        routing.agent_status("a", "busy")


def test_disconnect_then_grace_requeues_at_the_front(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ())], grace_ms=60_000)
    pool = routing.pool
    routing.route(1, now_ms=0)
    routing.route(2, now_ms=1)
    assert routing.route(3, now_ms=2) == [Queue(3, 1)]
    assert routing.route(4, now_ms=3) == [Queue(4, 2)]

    assert routing.agent_disconnected("a", now_ms=1_000) == []
    assert pool.next_grace_deadline() == 61_000
    assert routing.route(5, now_ms=1_001) == [Queue(5, 3)]  # no new ones to a lost agent
    assert pool.expired_agents(60_999) == []
    assert routing.expire_agents(60_999) == []
    assert pool.expired_agents(61_000) == ["a"]
    assert routing.expire_agents(61_000) == [
        Requeue(1, "a"),
        Requeue(2, "a"),
        Queue(1, 1),
        Queue(2, 2),
        PositionChanged(3, 3),
        PositionChanged(4, 4),
        PositionChanged(5, 5),
    ]
    assert pool.expired_agents(10**9) == []
    assert routing.conversations_of("a") == []
    assert pool.load("a") == 0
    assert routing.stats(61_000)["requeued_total"] == 2
    # a comes back: the first in line go to it.
    assert routing.agent_connected("a") == [
        Assign(1, "a"),
        Assign(2, "a"),
        PositionChanged(3, 1),
        PositionChanged(4, 2),
        PositionChanged(5, 3),
    ]


def test_reconnect_within_grace_keeps_everything(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ())], grace_ms=60_000)
    routing.route(1, now_ms=0)
    routing.agent_connected("a")  # a second tab
    routing.agent_disconnected("a", now_ms=10)
    assert routing.pool.get("a").available
    assert routing.route(2, now_ms=20) == [Assign(2, "a")]
    routing.agent_disconnected("a", now_ms=100)
    assert routing.route(3, now_ms=200) == [Queue(3, 1)]
    assert routing.agent_connected("a") == []  # full (2 of 2): 3 keeps waiting
    assert routing.pool.next_grace_deadline() is None
    assert routing.pool.expired_agents(10**9) == []
    assert routing.expire_agents(10**9) == []
    assert routing.conversations_of("a") == [1, 2]
    with pytest.raises(ValueError, match="no connection"):
        fresh = AgentPool()
        fresh.add("z", "Z")
        fresh.disconnected("z", now_ms=0)


def test_zero_grace_expires_at_once(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ())], grace_ms=0)
    routing.route(1, now_ms=0)
    routing.agent_disconnected("a", now_ms=5)
    assert routing.expire_agents(5) == [Requeue(1, "a"), Queue(1, 1)]


def test_disabled_agent_loses_its_conversations_and_gets_none(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 5, ()), ("b", 1, 1, ())])
    routing.route(1, now_ms=0)  # a
    routing.route(2, now_ms=0)  # b
    routing.route(3, now_ms=0)  # a
    assert routing.update_agent("a", disabled=True) == [
        Requeue(1, "a"),
        Requeue(3, "a"),
        Queue(1, 1),
        Queue(3, 2),
    ]
    assert not routing.pool.get("a").available
    assert routing.route(4, now_ms=0) == [Queue(4, 3)]
    with pytest.raises(AgentUnavailable):
        routing.accept(1, "a")
    assert routing.update_agent("a", disabled=False) == [
        Assign(1, "a"),
        Assign(3, "a"),
        Assign(4, "a"),
    ]


def test_capacity_raised_drains_the_queue(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 3, ())])
    assert routing.agent_status("a", "online", max_chats=1) == []
    assert routing.pool.get("a").capacity == 1
    routing.route(1, now_ms=0)
    routing.route(2, now_ms=0)
    routing.route(3, now_ms=0)
    routing.route(4, now_ms=0)
    # The agent raises its own limit: held to the admin's 3.
    assert routing.agent_status("a", "online", max_chats=10) == [
        Assign(2, "a"),
        Assign(3, "a"),
        PositionChanged(4, 1),
    ]
    assert routing.pool.get("a").capacity == 3
    assert routing.update_agent("a", max_chats=4) == [Assign(4, "a")]
    # Lowered below the load: nothing is taken away, nothing new comes.
    assert routing.update_agent("a", max_chats=1) == []
    assert routing.route(5, now_ms=0) == [Queue(5, 1)]
    assert routing.conversations_of("a") == [1, 2, 3, 4]


def test_groups_changed_by_an_admin_drain(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 2, ()), ("s", 1, 1, ["sales"])])
    routing.route(1, now_ms=0, group="sales")  # s
    assert routing.route(2, now_ms=0, group="sales") == [Queue(2, 1, "sales")]
    assert routing.update_agent("a", groups=["sales"]) == [Assign(2, "a", "sales")]


def test_remove_agent_requeues_then_forgets(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 1, ()), ("b", 1, 1, ())])
    routing.route(1, now_ms=0)  # a
    assert routing.remove_agent("a") == [Requeue(1, "a"), Assign(1, "b")]
    assert "a" not in routing.pool
    assert "a" not in routing.pool.router
    with pytest.raises(UnknownAgent):
        routing.remove_agent("a")


def test_restore_keeps_assignments_and_starts_the_grace(router_impl: ModuleType) -> None:
    pool = AgentPool(grace_ms=1_000, router=router_impl.Router())
    pool.add("a", "A", max_chats=1, groups=["sales"])
    pool.add("gone", "Gone", disabled=True)
    routing = Routing(pool, WaitingQueue(1))
    assert routing.restore(1, 500, agent_id="a", group="sales") == []
    assert routing.restore(2, 500, agent_id="a") == []  # over capacity: it was already there
    assert routing.restore(3, 500, agent_id="gone") == [Queue(3, 1)]
    assert routing.restore(4, 500, agent_id="nobody", group="vip") == [Queue(4, 2)]
    assert routing.group_of(4) is None  # vip has no member any more
    assert pool.load("a") == 2
    assert pool.expired_agents(1_500) == ["a"]
    # a came back in time: it keeps both and takes nothing new until it is below capacity.
    assert routing.agent_connected("a") == []
    assert routing.agent_status("a", "online") == []
    assert routing.conversations_of("a") == [1, 2]
    assert routing.release(1) == []
    assert routing.release(2) == [Assign(3, "a"), PositionChanged(4, 1)]


def test_pool_settings_are_validated_and_atomic(router_impl: ModuleType) -> None:
    pool = AgentPool(router=router_impl.Router(max_agents=2))
    pool.add("a", "A", weight=2, max_chats=3, groups=["x"])
    with pytest.raises(ValueError, match="already exists"):
        pool.add("a", "A")
    with pytest.raises((ValueError, TypeError)):
        pool.add("b", "B", weight=0)
    with pytest.raises(TypeError, match="single string"):
        pool.add("b", "B", groups="sales")
    assert "b" not in pool
    with pytest.raises((ValueError, TypeError)):
        pool.update("a", weight=3, max_chats=-1)
    info = pool.router.info("a")
    assert (info.weight, info.capacity, pool.get("a").weight) == (2, 3, 2)
    pool.add("b", "B")
    with pytest.raises(ValueError):
        pool.add("c", "C")  # max_agents
    assert pool.has_group("x")
    pool.update("a", groups=["y"], name="Alice")
    assert (pool.has_group("x"), pool.has_group("y"), pool.get("a").name) == (False, True, "Alice")
    with pytest.raises(UnknownAgent) as caught:
        pool.get("zed")
    assert caught.value.code == "unknown_agent"
    with pytest.raises(ValueError, match="empty"):
        AgentPool(router=pool.router)


def test_stats_name_every_gauge(make_routing: MakeRouting) -> None:
    routing = make_routing([("a", 1, 1, ())])
    routing.route(1, now_ms=100)
    routing.route(2, now_ms=200)
    stats = routing.stats(1_200)
    assert stats["agents"] == 1
    assert stats["agents_available"] == 1
    assert (stats["capacity"], stats["load"], stats["queued"]) == (1, 1, 1)
    assert stats["queue_oldest_wait_ms"] == 1_000
    assert stats["assigned_total"] == 1


# ---------------------------------------------------------------------------------------------
# The waiting queue alone


def test_waiting_queue_positions_and_changes() -> None:
    queue = WaitingQueue(3)
    assert queue.push(10, None, 0) == 1
    assert queue.push(20, "sales", 5) == 2
    with pytest.raises(ValueError, match="already queued"):
        queue.push(10)
    assert queue.push(30, None, 7) == 3
    assert queue.full
    with pytest.raises(QueueFull):
        queue.push(40)
    assert queue.rejections == 1
    assert queue.push(40, force=True) == 4
    assert queue.pop_changes() == []
    assert queue.remove(20) == [(30, 2), (40, 3)]
    # An earlier ticket goes back to its place; those behind move down.
    assert queue.push(20, "sales", 5, order=2, force=True) == 2
    assert queue.pop_changes() == [(30, 3), (40, 4)]
    with pytest.raises(ValueError, match="ticket"):
        queue.push(50, order=2, force=True)
    # Several moves are reported once, with the final positions.
    queue.discard(10)
    queue.discard(30)
    assert queue.pop_changes() == [(20, 1), (40, 2)]
    assert [e.conv for e in queue] == [20, 40]
    assert {(e.group, e.conv) for e in queue.heads()} == {("sales", 20), (None, 40)}
    assert queue.oldest_wait_ms(9) == 4
    assert queue.position(10) is None
    with pytest.raises(NotQueued):
        queue.remove(10)
    with pytest.raises(ValueError):
        WaitingQueue(0)


# ---------------------------------------------------------------------------------------------
# Random interleavings


_AGENTS: tuple[AgentSpec, ...] = (
    ("a", 3, 2, ("sales",)),
    ("b", 1, 1, ("sales", "vip")),
    ("c", 2, 2, ()),
    ("d", 1, 1, ("vip",)),
)
_AGENT_IDS = [spec[0] for spec in _AGENTS]
_GROUPS = [None, "sales", "vip"]


class RoutingMachine(RuleBasedStateMachine):
    """Conversations and routing wired as the node wires them, driven at random."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = AgentPool(grace_ms=1_000)
        for agent_id, weight, max_chats, groups in _AGENTS:
            self.pool.add(agent_id, agent_id, weight=weight, max_chats=max_chats, groups=groups)
        self.routing = Routing(self.pool, WaitingQueue(5))
        self.convs = Conversations(max_open=25, idle_ttl_ms=10**9, bot_enabled=True)
        self.now = 0
        self.next_conv = 1
        self.told: dict[int, int] = {}  # the position each queued visitor was last told
        self.loads_before: dict[str, int] = {}
        self._orders: dict[int, int] = {}
        self._excluded: dict[int, str | None] = {}
        self._routed: set[int] = set()
        self.forced_to: str | None = None

    @initialize()
    def start(self) -> None:
        # Everyone starts at work, so that the steps go to the interesting interleavings.
        for agent_id in _AGENT_IDS:
            self.routing.agent_connected(agent_id)
            self.routing.agent_status(agent_id, "online")
        self._mark()

    # -- helpers -------------------------------------------------------------------------------

    def _mark(self) -> None:
        """What the checks of the next step compare with (called after every step)."""
        # Arrival tickets of the waiting conversations, as they were before the next step.
        self._orders = {e.conv: e.order for e in self.routing.queue}
        self._excluded = {e.conv: e.exclude for e in self.routing.queue}
        self._routed = {c.id for c in self.convs if c.id in self.routing}
        self.loads_before = {a: self.pool.load(a) for a in _AGENT_IDS if a in self.pool}
        self.forced_to = None

    def _snapshot(self) -> Any:
        router = self.pool.router
        return (
            sorted((c.id, self.routing.assigned_to(c.id)) for c in self.convs),
            [(e.conv, e.order, e.group, e.exclude) for e in self.routing.queue],
            [tuple(router.info(a)) for a in router.agents()],
        )

    def _apply(self, effects: list[Effect], *, manual: bool = False) -> None:
        """Apply like the node does, checking each effect against what visitors were told."""
        waiting = list(self.routing.queue)
        for effect in effects:
            if isinstance(effect, Assign) and not manual:
                self._check_oldest_first(effect, waiting)
            self.convs.apply(effect)
            if isinstance(effect, Queue):
                assert effect.conv not in self.told
                self.told[effect.conv] = effect.position
            elif isinstance(effect, PositionChanged):
                assert self.told[effect.conv] != effect.position, "a change that is none"
                self.told[effect.conv] = effect.position
            else:
                self.told.pop(effect.conv, None)

    def _check_oldest_first(self, effect: Assign, waiting: list[QueueEntry]) -> None:
        """Unless a person chose the agent, an agent that got a conversation must not have
        been able to take an older one that is still waiting."""
        excluded = self._excluded.get(effect.conv)
        assert excluded != effect.agent_id, f"{effect}: handed back to its sender"
        if effect.conv in self._orders:
            order: float = self._orders[effect.conv]
        elif effect.conv not in self._routed:
            order = float("inf")  # routed just now: the newest ticket
        else:
            return  # requeued or transferred: its ticket is not known here
        agent = self.pool.get(effect.agent_id)
        for older in waiting:
            if older.order < order and older.exclude != agent.id:
                assert older.group is not None and older.group not in agent.groups, (
                    f"{effect} while the older {older} waits"
                )

    def _try(self, operation: Callable[[], list[Effect]], *, manual: bool = False) -> None:
        before = self._snapshot()
        try:
            effects = operation()
        except RoutingError:
            assert self._snapshot() == before, "a refused operation changed something"
            return
        self._apply(effects, manual=manual)

    def _pick(self, index: int, status: str | None = None) -> int | None:
        found = sorted(c.id for c in self.convs if status is None or c.status == status)
        return found[index % len(found)] if found else None

    # -- rules ---------------------------------------------------------------------------------

    @rule(bot=st.booleans(), group=st.sampled_from(_GROUPS))
    def create(self, bot: bool, group: str | None) -> None:
        self.convs.bot_enabled = bot
        conv = self.next_conv
        self.next_conv += 1
        try:
            state, created = self.convs.create(f"v{conv}", None, self.now, conv)
        except TooManyConversations:
            return
        assert created
        if state.status == "queued":
            try:
                effects = self.routing.route(conv, self.now, group)
            except QueueFull:
                self.convs.discard(conv)
                return
            self._apply(effects)

    @rule(index=st.integers(0, 100), group=st.sampled_from(_GROUPS))
    def handoff(self, index: int, group: str | None) -> None:
        conv = self._pick(index, "bot")
        if conv is not None:
            self.convs.check(conv, "handoff")
            self._try(lambda: self.routing.route(conv, self.now, group))

    @rule(index=st.integers(0, 100), by=st.sampled_from(["visitor", "agent", "expired"]))
    def close(self, index: int, by: str) -> None:
        conv = self._pick(index)
        if conv is not None:
            assert len(self.convs.close(conv, by, by, self.now)) == 1
            self.told.pop(conv, None)  # out of line: nobody to tell
            self._apply(self.routing.release(conv))

    @rule(
        index=st.integers(0, 100),
        to_agent=st.sampled_from([*_AGENT_IDS, None]),
        to_group=st.sampled_from(["sales", "vip", "none"]),
        force=st.booleans(),
    )
    def transfer(self, index: int, to_agent: str | None, to_group: str, force: bool) -> None:
        conv = self._pick(index, "assigned")
        if conv is None:
            return
        sender = self.routing.assigned_to(conv)
        assert sender is not None
        if to_agent is not None:
            self.forced_to = to_agent if force else None
            self._try(
                lambda: self.routing.transfer(conv, sender, to_agent=to_agent, force=force),
                manual=True,
            )
            self.forced_to = to_agent if force else None
        else:
            self._excluded[conv] = sender  # routing must not hand it straight back
            self._try(lambda: self.routing.transfer(conv, sender, to_group=to_group))

    @rule(index=st.integers(0, 100), agent=st.sampled_from(_AGENT_IDS))
    def accept(self, index: int, agent: str) -> None:
        conv = self._pick(index, "queued")
        if conv is not None:
            self._try(lambda: self.routing.accept(conv, agent), manual=True)

    @rule(agent=st.sampled_from(_AGENT_IDS))
    def connect(self, agent: str) -> None:
        self._try(lambda: self.routing.agent_connected(agent))

    @rule(agent=st.sampled_from(_AGENT_IDS))
    def disconnect(self, agent: str) -> None:
        if self.pool.get(agent).connections:
            self._try(lambda: self.routing.agent_disconnected(agent, self.now))

    @rule(
        agent=st.sampled_from(_AGENT_IDS),
        status=st.sampled_from(["online", "online", "away", "offline"]),
        max_chats=st.none() | st.integers(0, 3),
    )
    def status(self, agent: str, status: str, max_chats: int | None) -> None:
        self._try(lambda: self.routing.agent_status(agent, status, max_chats))

    @rule(agent=st.sampled_from(_AGENT_IDS), max_chats=st.integers(0, 3))
    def admin_capacity(self, agent: str, max_chats: int) -> None:
        self._try(lambda: self.routing.update_agent(agent, max_chats=max_chats))

    @rule(agent=st.sampled_from(_AGENT_IDS), disabled=st.booleans())
    def admin_disable(self, agent: str, disabled: bool) -> None:
        self._try(lambda: self.routing.update_agent(agent, disabled=disabled))

    @rule(ms=st.integers(0, 1_500))
    def tick(self, ms: int) -> None:
        self.now += ms
        self._try(lambda: self.routing.expire_agents(self.now))

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def every_open_conversation_is_in_one_place(self) -> None:
        routed = 0
        for state in self.convs:
            queued = state.id in self.routing.queue
            agent = self.routing.assigned_to(state.id)
            if state.status == "bot":
                assert state.id not in self.routing
            elif state.status == "queued":
                assert queued and agent is None and state.agent_id is None
                routed += 1
            else:
                assert state.status == "assigned"
                assert not queued and agent is not None and agent == state.agent_id
                assert state.id in self.routing.conversations_of(agent)
                routed += 1
        held = sum(len(self.routing.conversations_of(a)) for a in _AGENT_IDS)
        assert routed == len(self.routing.queue) + held

    @invariant()
    def positions_are_1_to_n_in_arrival_order_as_told(self) -> None:
        entries = list(self.routing.queue)
        assert [e.order for e in entries] == sorted(e.order for e in entries)
        actual = {e.conv: i for i, e in enumerate(entries, 1)}
        assert {c: self.routing.queue.position(c) for c in actual} == actual
        assert self.told == actual

    @invariant()
    def loads_match_the_map_and_capacity_holds(self) -> None:
        router = self.pool.router
        for agent in self.pool:
            load = router.load(agent.id)
            assert load == len(self.routing.conversations_of(agent.id))
            info = router.info(agent.id)
            assert info.online == agent.available
            assert info.capacity == agent.capacity
            # Nobody gains a conversation past capacity, unless an admin forced it.
            if load > agent.capacity and agent.id != self.forced_to:
                assert load <= self.loads_before.get(agent.id, 0)
            # A lost agent keeps its conversations for the grace only; a present one has none.
            if load and not agent.connections:
                assert agent.grace_deadline_ms is not None
            if agent.connections:
                assert agent.grace_deadline_ms is None
        self._mark()

    @invariant()
    def nothing_waits_that_an_agent_could_take(self) -> None:
        for entry in self.routing.queue:
            for agent_id in _AGENT_IDS:
                if agent_id != entry.exclude:
                    assert not self.pool.can_take(agent_id, entry.group), (entry, agent_id)


TestRoutingMachine = RoutingMachine.TestCase
TestRoutingMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
