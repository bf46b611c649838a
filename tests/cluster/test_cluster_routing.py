"""kefu.cluster.routing against a real redis-server.

The local :class:`kefu.routing.Routing` is the oracle: the same random operations run on both
and every difference is a bug (effects, errors, positions, loads). Around it: the round-robin
sequence of the router, several nodes routing at once through their own Redis clients, the
grace, node loss, the bounds, and Redis going away and coming back.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from kefu._core import _router_py
from kefu.cluster.routing import ClusterRouting, ClusterUnavailable, Outcome
from kefu.routing import (
    AgentPool,
    AgentUnavailable,
    Assign,
    Effect,
    NotAssigned,
    NotQueued,
    PositionChanged,
    Queue,
    QueueFull,
    Requeue,
    Routing,
    Unassign,
    UnknownAgent,
    UnknownGroup,
    WaitingQueue,
)
from tests.aio import run
from tests.cluster.redis_server import RedisServer

Body = Callable[[ClusterRouting], Awaitable[None]]


def run_cluster(server: RedisServer, body: Body, timeout: float = 120.0, **options: Any) -> None:
    """Run ``body`` with a ClusterRouting over a fresh client of ``server``."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            await body(ClusterRouting(client, **options))
        finally:
            await client.aclose()

    run(main, timeout)


async def online(r: ClusterRouting, agent_id: str, node: str = "n1", **settings: Any) -> None:
    """An agent added, connected on ``node`` and online; nothing is queued yet."""
    assert (await r.upsert_agent(agent_id, **settings)).effects == []
    await r.agent_state(agent_id, node=node, status="online", connections=1)


def agents_of(effects: list[Effect]) -> list[str]:
    return [e.agent_id for e in effects if isinstance(e, Assign)]


# ---------------------------------------------------------------------------------------------
# The round-robin


def test_swrr_5_1_1_gives_a_a_b_a_c_a_a(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        for agent_id, weight in (("a", 5), ("b", 1), ("c", 1)):
            await online(r, agent_id, weight=weight, max_chats=100)
        picked = []
        for conv in range(14):
            picked += agents_of((await r.route(conv, 0)).effects)
        assert picked == list("aabacaa") * 2

    run_cluster(redis_server, body)


def test_swrr_matches_the_router_with_groups_capacity_and_weight_changes(
    redis_server: RedisServer,
) -> None:
    """Random picks, releases and weight changes on both: the same agent every time."""
    specs = [("a", 5, 4, ["x"]), ("b", 1, 3, ["x", "y"]), ("c", 2, 2, ["y"]), ("d", 3, 5, [])]

    async def body(r: ClusterRouting) -> None:
        oracle = _router_py.Router(max_agents=10)
        for agent_id, weight, cap, groups in specs:
            oracle.add(agent_id, weight, cap, groups)
            await online(r, agent_id, weight=weight, max_chats=cap, groups=groups)
        rng = random.Random(7)
        held: dict[int, str] = {}
        conv = 0
        for _ in range(300):
            roll = rng.random()
            if roll < 0.55:
                group = rng.choice([None, "x", "y"])
                expected = oracle.pick(group)
                out = await r.route(conv, 0, group)
                if expected is None:  # nobody eligible: it waits; take it out again
                    assert [type(e) for e in out.effects] == [Queue]
                    await r.release(conv)
                else:
                    assert agents_of(out.effects) == [expected]
                    held[conv] = expected
                conv += 1
            elif roll < 0.95 and held:
                victim = rng.choice(sorted(held))
                oracle.release(held.pop(victim))
                assert (await r.release(victim)).effects == []
            else:
                agent_id, _, cap, groups = rng.choice(specs)
                weight = rng.randint(1, 6)
                oracle.update(agent_id, weight=weight)
                await r.upsert_agent(agent_id, weight=weight, max_chats=cap, groups=groups)
            snap = {a["id"]: a for a in (await r.snapshot())["agents"]}
            for agent_id, *_ in specs:
                info = oracle.info(agent_id)
                assert (snap[agent_id]["load"], snap[agent_id]["current_weight"]) == (
                    info.load,
                    info.current_weight,
                )

    run_cluster(redis_server, body)


def test_swrr_over_more_agents_than_one_batch(redis_server: RedisServer) -> None:
    """1,200 eligible agents (the script reads them 1,000 at a time), odd names included."""
    ids = [f"客服:{i} x/y" for i in range(1_200)]

    async def body(r: ClusterRouting) -> None:
        oracle = _router_py.Router(max_agents=2_000)
        for i, agent_id in enumerate(ids):
            weight = 1 + i % 7
            oracle.add(agent_id, weight, 2, ["售后"])
            await online(r, agent_id, weight=weight, max_chats=2, groups=["售后"])
        for conv in range(300):
            group = "售后" if conv % 2 else None
            assert agents_of((await r.route(conv, 0, group)).effects) == [oracle.pick(group)]

    run_cluster(redis_server, body, max_agents=2_000)


# ---------------------------------------------------------------------------------------------
# The local Routing as the oracle


class Differential:
    """Drives a local Routing and a ClusterRouting with the same operations, comparing all.

    Presence: each agent has connections on nodes n1 and n2; the local pool only knows their
    sum, which is what the cluster's grace and availability go by.
    """

    NODES = ("n1", "n2")
    GROUPS = ("x", "y")

    def __init__(self, r: ClusterRouting, rng: random.Random, max_queue: int, grace_ms: int):
        self.r = r
        self.rng = rng
        router: Any = _router_py.Router(max_agents=50)  # the twin: the same picks as the .so
        self.local = Routing(
            AgentPool(grace_ms=grace_ms, router=router),
            WaitingQueue(max_queue),
        )
        self.now = 1_000
        self.next_conv = 1
        self.conns: dict[str, dict[str, int]] = {}
        self.status: dict[str, str] = {}
        self.routed: set[int] = set()
        self.steps = 0

    async def both(self, local: Callable[[], list[Effect]], cluster: Awaitable[Outcome]) -> None:
        try:
            expected: list[Effect] | Exception = local()
        except Exception as exc:  # the same refusal is expected of the cluster
            expected = exc
        try:
            got: Outcome | Exception = await cluster
        except Exception as exc:
            got = exc
        if isinstance(expected, Exception) or isinstance(got, Exception):
            assert type(got) is type(expected), (self.steps, expected, got)
            return
        assert isinstance(got, Outcome)
        assert got.effects == [e for e in expected if not isinstance(e, PositionChanged)], (
            self.steps
        )
        for e in expected:
            if isinstance(e, PositionChanged):  # the contract: moved_from covers every move
                assert got.moved_from is not None and e.position >= got.moved_from, self.steps
        assert not got.more

    def agent(self) -> str:
        return self.rng.choice(["a", "b", "c", "d", "e"] * 4 + ["zz"])  # "zz" never exists

    async def start(self) -> None:
        """Every agent added, connected and online; then the random steps change it all."""
        for agent in "abcde":
            weight, cap = self.rng.randint(1, 4), self.rng.randint(1, 3)
            groups = [g for g in self.GROUPS if self.rng.random() < 0.5]
            self.local.pool.add(agent, agent, weight=weight, max_chats=cap, groups=groups)
            await self.r.upsert_agent(agent, weight=weight, max_chats=cap, groups=groups)
            self.conns[agent] = {"n1": 1, "n2": 0}
            self.status[agent] = "online"
            await self.both(
                lambda a=agent: self.local.agent_connected(a),  # type: ignore[misc]
                self.r.agent_state(agent, node="n1", status="offline", connections=1),
            )
            await self.both(
                lambda a=agent: self.local.agent_status(a, "online"),  # type: ignore[misc]
                self.r.agent_state(agent, node="n1", status="online", connections=1),
            )

    async def step(self) -> None:
        rng, r, local = self.rng, self.r, self.local
        self.steps += 1
        self.now += rng.randint(0, 400)
        roll = rng.randrange(100)
        agent = self.agent()
        if roll < 6:  # an admin's settings
            if agent == "zz":
                return
            weight, cap = rng.randint(1, 4), rng.choice([0, 1, 2, 3, 4])
            groups = [g for g in self.GROUPS if rng.random() < 0.5]
            disabled = rng.random() < 0.05
            if agent not in local.pool:
                local.pool.add(
                    agent, agent, weight=weight, max_chats=cap, groups=groups, disabled=disabled
                )
                self.conns[agent] = {n: 0 for n in self.NODES}
                self.status[agent] = "offline"
                out = await r.upsert_agent(
                    agent, weight=weight, max_chats=cap, groups=groups, disabled=disabled
                )
                assert out.effects == []
                return
            await self.both(
                lambda: local.update_agent(
                    agent, weight=weight, max_chats=cap, groups=groups, disabled=disabled
                ),
                r.upsert_agent(
                    agent, weight=weight, max_chats=cap, groups=groups, disabled=disabled
                ),
            )
        elif roll < 18:  # a connection more or less on one node
            if agent not in self.conns:
                return
            node = rng.choice(self.NODES)
            count = self.conns[agent][node]
            if count and rng.random() < 0.35:
                self.conns[agent][node] = count - 1
                now = self.now

                def gone() -> list[Effect]:
                    return local.agent_disconnected(agent, now)

                await self.both(
                    gone,
                    r.agent_state(
                        agent,
                        node=node,
                        status=self.status[agent],
                        connections=count - 1,
                        now_ms=now,
                    ),
                )
            else:
                self.conns[agent][node] = count + 1
                await self.both(
                    lambda: local.agent_connected(agent),
                    r.agent_state(
                        agent, node=node, status=self.status[agent], connections=count + 1
                    ),
                )
        elif roll < 24:  # the agent's status frame
            if agent not in self.conns:
                return
            status = rng.choice(["online"] * 4 + ["away", "offline"])
            chosen = rng.choice([None, 1, 2, 5])
            self.status[agent] = status
            node = rng.choice(self.NODES)
            await self.both(
                lambda: local.agent_status(agent, status, chosen),
                r.agent_state(
                    agent,
                    node=node,
                    status=status,
                    connections=self.conns[agent][node],
                    chosen_max_chats=chosen,
                ),
            )
        elif roll < 46:  # a new conversation
            conv = self.next_conv
            self.next_conv += 1
            group = rng.choice([None, None, None, "x", "y", "x", "y", "nobody"])
            now = self.now
            await self.both(lambda: local.route(conv, now, group), r.route(conv, now, group))
            if conv in local:
                self.routed.add(conv)
        elif roll < 66:  # a conversation ends
            if self.routed:
                conv = rng.choice(sorted(self.routed))
                self.routed.discard(conv)
                await self.both(lambda: local.release(conv), r.release(conv))
        elif roll < 74:  # manual accept
            conv = rng.choice(sorted(self.routed) or [0])
            await self.both(lambda: local.accept(conv, agent), r.accept(conv, agent))
        elif roll < 88:  # transfer
            held = sorted(c for c in self.routed if local.assigned_to(c) is not None)
            conv = rng.choice(held if held and rng.random() < 0.9 else sorted(self.routed) or [0])
            sender = local.assigned_to(conv) or agent
            if rng.random() < 0.5:
                force = rng.random() < 0.3
                await self.both(
                    lambda: local.transfer(conv, sender, to_agent=agent, force=force),
                    r.transfer(conv, sender, to_agent=agent, force=force),
                )
            else:
                group = rng.choice(["x", "y", "nobody"])
                await self.both(
                    lambda: local.transfer(conv, sender, to_group=group),
                    r.transfer(conv, sender, to_group=group),
                )
        elif roll < 95:  # grace runs out
            now = self.now
            await self.both(lambda: local.expire_agents(now), r.expire(now))
        elif roll < 98:
            await self.both(lambda: local.requeue_agent(agent), r.requeue_agent(agent))
        else:
            await self.both(lambda: local.remove_agent(agent), r.remove_agent(agent))
            self.conns.pop(agent, None)
            self.status.pop(agent, None)
        await self.compare()

    async def compare(self) -> None:
        local, r = self.local, self.r
        convs = sorted(self.routed)
        assert await r.positions(convs) == [local.queue.position(c) for c in convs], self.steps
        for conv in convs:
            assert await r.assigned_to(conv) == local.assigned_to(conv), (self.steps, conv)
        for agent in local.pool:
            assert await r.load(agent.id) == local.pool.load(agent.id), self.steps
            assert await r.conversations_of(agent.id) == local.conversations_of(agent.id)
        stats = await r.stats(self.now)
        expected = local.stats(self.now)
        for name in (
            "agents",
            "agents_available",
            "agents_in_grace",
            "capacity",
            "load",
            "queued",
            "queue_lanes",
            "queue_oldest_wait_ms",
            "assigned_total",
            "accepted_total",
            "transferred_total",
            "requeued_total",
            "forced_total",
        ):
            assert stats[name] == expected[name], (self.steps, name)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_decisions_as_the_local_routing(redis_server: RedisServer, seed: int) -> None:
    async def body(r: ClusterRouting) -> None:
        d = Differential(r, random.Random(seed), max_queue=6, grace_ms=1_500)
        await d.start()
        for _ in range(800):
            await d.step()
        # Everything ends and every agent goes: nothing is left behind in Redis but counters.
        for conv in sorted(d.routed):
            await r.release(conv)
        for agent in [a.id for a in d.local.pool]:
            await r.remove_agent(agent)
        for node in d.NODES:
            await r.drop_node(node)
        keys = sorted(
            k.decode() if isinstance(k, bytes) else k for k in await r.client.keys("kefu:*")
        )
        assert set(keys) <= {
            "kefu:route:ticket",
            "kefu:route:agent_seq",
            "kefu:route:assign_seq",
            "kefu:route:counters",
        }, keys

    run_cluster(redis_server, body, max_queue=6, grace_ms=1_500, timeout=240)


# ---------------------------------------------------------------------------------------------
# Several nodes at once


def test_three_nodes_route_concurrently_without_passing_any_capacity(
    redis_server: RedisServer,
) -> None:
    n_convs, caps = 300, {"a": 2, "b": 1, "c": 3, "d": 2, "e": 1}
    total_cap = sum(caps.values())

    async def main() -> None:
        clients = [redis.asyncio.Redis.from_url(redis_server.url) for _ in range(3)]
        nodes = [ClusterRouting(c, max_queue=1_000) for c in clients]
        try:
            for i, (agent_id, cap) in enumerate(caps.items()):
                await online(nodes[i % 3], agent_id, node=f"n{i % 3}", max_chats=cap)

            async def route(conv: int) -> Outcome:
                return await nodes[conv % 3].route(conv, conv)

            outcomes = await asyncio.gather(*(route(c) for c in range(n_convs)))
            told: dict[int, type] = {}
            for out in outcomes:
                for e in out.effects:
                    assert e.conv not in told  # one effect per conversation, exactly
                    told[e.conv] = type(e)
            assert sorted(told) == list(range(n_convs))
            assert sum(t is Assign for t in told.values()) == total_cap
            await check(nodes[0], caps, n_convs)

            # Releases from all nodes at once: each drain takes the oldest ticket.
            snap = await nodes[0].snapshot()
            waiting = [q["conv"] for q in snap["queue"]]
            while True:
                snap = await nodes[0].snapshot()
                held = [c for a in snap["agents"] for c in a["held"]]
                if not held:
                    break
                outs = await asyncio.gather(*(nodes[i % 3].release(c) for i, c in enumerate(held)))
                newly = sorted(e.conv for o in outs for e in o.effects if isinstance(e, Assign))
                expected = sorted(waiting[: len(held)])
                assert newly == expected  # oldest first, whichever node released
                waiting = waiting[len(held) :]
                await check(nodes[0], caps, None)
            assert waiting == []
            assert (await nodes[1].stats(0))["queued"] == 0
        finally:
            for c in clients:
                await c.aclose()

    run(main, 120)


async def check(r: ClusterRouting, caps: dict[str, int], n_convs: int | None) -> None:
    """No agent above its capacity; the queue sorted by ticket; nobody both held and queued."""
    snap = await r.snapshot()
    held: list[int] = []
    for agent in snap["agents"]:
        assert agent["load"] == len(agent["held"]) <= caps[agent["id"]]
        held += agent["held"]
    queued = [q["conv"] for q in snap["queue"]]
    tickets = [q["ticket"] for q in snap["queue"]]
    assert tickets == sorted(set(tickets))
    assert not set(held) & set(queued)
    if n_convs is not None:
        assert sorted(held + queued) == list(range(n_convs))
        assert await r.positions(queued) == list(range(1, len(queued) + 1))


# ---------------------------------------------------------------------------------------------
# Presence


def test_grace_then_expire_requeues_with_the_old_tickets(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await online(r, "a", max_chats=2)
        await r.upsert_agent("b", max_chats=0)
        await r.agent_state("b", node="n2", status="online", connections=1)
        assert agents_of((await r.route(1, 100)).effects) == ["a"]
        assert agents_of((await r.route(2, 100)).effects) == ["a"]
        assert (await r.route(3, 200)).effects == [Queue(3, 1)]
        # The last connection goes: no new conversations, the held ones are kept.
        await r.agent_state("a", node="n1", status="online", connections=0)
        assert (await r.disconnected("a", 1_000)).effects == []
        assert (await r.stats(1_000))["agents_in_grace"] == 1
        assert (await r.expire(60_999)).effects == []
        assert await r.conversations_of("a") == [1, 2]
        out = await r.expire(61_000)
        assert out.effects == [Requeue(1, "a"), Requeue(2, "a"), Queue(1, 1), Queue(2, 2)]
        assert out.moved_from is not None and out.moved_from <= 3  # conv 3 went from 1 to 3
        assert await r.positions([1, 2, 3]) == [1, 2, 3]
        assert (await r.stats(61_000))["queue_oldest_wait_ms"] == 60_900
        assert (await r.expire(70_000)).effects == []  # settled once
        # Capacity appears: the oldest tickets first.
        out = await r.upsert_agent("b", max_chats=2)
        assert out.effects == [Assign(1, "b"), Assign(2, "b")]
        assert out.moved_from == 1
        assert await r.position(3) == 1

    run_cluster(redis_server, body)


def test_a_connection_anywhere_ends_the_grace(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await online(r, "a")
        await r.route(1, 0)
        await r.agent_state("a", node="n1", status="online", connections=0, now_ms=0)
        assert (await r.stats(0))["agents_in_grace"] == 1
        await r.agent_state("a", node="n2", status="online", connections=1)
        assert (await r.stats(0))["agents_in_grace"] == 0
        assert (await r.expire(10**9)).effects == []
        assert await r.assigned_to(1) == "a"
        # Connections on two nodes: losing one of them starts nothing.
        await r.agent_state("a", node="n1", status="online", connections=2)
        await r.agent_state("a", node="n2", status="online", connections=0, now_ms=5)
        assert (await r.disconnected("a", 5)).effects == []
        assert (await r.stats(5))["agents_in_grace"] == 0
        assert agents_of((await r.route(2, 5)).effects) == ["a"]

    run_cluster(redis_server, body)


def test_drop_node_names_the_agents_left_without_connections(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await online(r, "a", node="n1")
        await r.agent_state("a", node="n2", status="online", connections=1)
        await online(r, "b", node="n1")
        await online(r, "c", node="n3")
        await r.route(1, 0)  # a
        await r.route(2, 0)  # b
        assert await r.drop_node("n1", now_ms=1_000) == ["b"]
        assert await r.drop_node("n1", now_ms=1_000) == []  # gone already
        snap = {a["id"]: a for a in (await r.snapshot())["agents"]}
        assert snap["a"]["connections"] == {"n2": 1} and snap["a"]["available"]
        assert snap["b"]["grace_deadline_ms"] == 61_000 and not snap["b"]["available"]
        picked = []
        for conv in range(3, 7):
            picked += agents_of((await r.route(conv, 1_000)).effects)
        assert set(picked) == {"a", "c"}
        out = await r.expire(61_000)
        assert out.effects[0] == Requeue(2, "b") and len(agents_of(out.effects)) == 1

    run_cluster(redis_server, body)


# ---------------------------------------------------------------------------------------------
# Transfers and manual accept


def test_transfer_refusals_change_nothing(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await online(r, "a", max_chats=1, groups=["x"])
        await online(r, "b", max_chats=1, groups=["x"])
        await r.upsert_agent("off", max_chats=5)
        await online(r, "away", max_chats=5)
        await r.agent_state("away", node="n1", status="away", connections=1)
        assert agents_of((await r.route(1, 0)).effects) == ["a"]
        assert agents_of((await r.route(2, 0)).effects) == ["b"]
        with pytest.raises(NotAssigned):
            await r.transfer(1, "b", to_agent="away")
        with pytest.raises(UnknownAgent):
            await r.transfer(1, "a", to_agent="nobody")
        with pytest.raises(AgentUnavailable):
            await r.transfer(1, "a", to_agent="a")
        with pytest.raises(AgentUnavailable):  # full
            await r.transfer(1, "a", to_agent="b")
        with pytest.raises(AgentUnavailable):  # away
            await r.transfer(1, "a", to_agent="away")
        with pytest.raises(AgentUnavailable):  # not connected: not even forced
            await r.transfer(1, "a", to_agent="off", force=True)
        with pytest.raises(UnknownGroup):
            await r.transfer(1, "a", to_group="nobody")
        with pytest.raises(ValueError):
            await r.transfer(1, "a", to_agent="b", to_group="x")
        assert await r.assigned_to(1) == "a" and await r.load("a") == 1
        # Forced: past the capacity of b and the status of "away".
        assert (await r.transfer(1, "a", to_agent="b", force=True)).effects == [
            Unassign(1, "a"),
            Assign(1, "b"),
        ]
        assert await r.load("b") == 2
        assert (await r.stats(0))["forced_total"] == 1
        assert agents_of((await r.route(3, 0)).effects) == ["a"]  # a's freed slot
        # To a group whose only other member is full: queued, and the sender's freed slot
        # does not take it straight back.
        await r.upsert_agent("b", max_chats=2, groups=["x"])
        out = await r.transfer(2, "b", to_group="x")
        assert out.effects == [Unassign(2, "b"), Queue(2, 1, "x")]
        snap = await r.snapshot()
        assert snap["queue"][0]["exclude"] == "b"
        assert await r.load("b") == 1
        # The sender may still take it back by hand; accept refusals first.
        with pytest.raises(NotQueued):
            await r.accept(1, "b")
        with pytest.raises(UnknownAgent):
            await r.accept(2, "nobody")
        with pytest.raises(AgentUnavailable):
            await r.accept(2, "off")
        with pytest.raises(AgentUnavailable):
            await r.accept(2, "a")  # full
        assert (await r.accept(2, "b")).effects == [Assign(2, "b", "x")]
        assert (await r.stats(0))["accepted_total"] == 1

    run_cluster(redis_server, body)


# ---------------------------------------------------------------------------------------------
# Bounds


def test_queue_full_and_unknown_group_refuse_and_change_nothing(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await r.upsert_agent("a", max_chats=1, groups=["x"])
        assert (await r.route(1, 0)).effects == [Queue(1, 1)]
        assert (await r.route(2, 0, "x")).effects == [Queue(2, 2, "x")]
        with pytest.raises(QueueFull):
            await r.route(3, 0)
        with pytest.raises(UnknownGroup):
            await r.route(3, 0, "nobody")
        with pytest.raises(ValueError):
            await r.route(1, 0)  # already routed
        stats = await r.stats(0)
        assert stats["queued"] == 2 and stats["queue_full_total"] == 1
        # A conversation that would be served at once passes a full queue.
        await r.agent_state("a", node="n1", status="online", connections=1)
        assert (await r.stats(0))["queued"] == 1
        await r.upsert_agent("a", max_chats=2, groups=["x"])
        assert (await r.stats(0))["queued"] == 0
        await r.upsert_agent("b", max_chats=1)
        await r.agent_state("b", node="n1", status="online", connections=1)
        assert (await r.route(3, 0)).effects == [Assign(3, "b")]
        # Requeues pass the bound: these visitors were being served already.
        assert (await r.route(4, 0)).effects == [Queue(4, 1)]
        assert (await r.route(5, 0)).effects == [Queue(5, 2)]
        await r.upsert_agent("a", max_chats=2, groups=["x"], disabled=True)
        assert (await r.stats(0))["queued"] == 4
        assert await r.positions([1, 2, 4, 5]) == [1, 2, 3, 4]

    run_cluster(redis_server, body, max_queue=2)


def test_drain_is_bounded_per_call(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await r.upsert_agent("a", max_chats=10)
        for conv in range(5):
            await r.route(conv, 0)
        out = await r.agent_state("a", node="n1", status="online", connections=1)
        assert agents_of(out.effects) == ["a", "a"] and out.more
        out = await r.drain()
        assert [e.conv for e in out.effects] == [2, 3] and out.more
        out = await r.drain()
        assert [e.conv for e in out.effects] == [4] and not out.more

    run_cluster(redis_server, body, drain_limit=2)


def test_max_agents_and_bad_input(redis_server: RedisServer) -> None:
    async def body(r: ClusterRouting) -> None:
        await r.upsert_agent("a")
        await r.upsert_agent("b")
        with pytest.raises(ValueError):
            await r.upsert_agent("c")
        await r.upsert_agent("b", weight=3)  # an update is not an addition
        bad: list[Callable[[], Awaitable[object]]] = [
            lambda: r.route(-1, 0),
            lambda: r.route(2**64, 0),
            lambda: r.route(True, 0),
            lambda: r.route(1, -5),
            lambda: r.route(1, 0, ""),
            lambda: r.route(1, 0, "a\0b"),
            lambda: r.route(1, 0, "x" * 129),
            lambda: r.upsert_agent("a", weight=0),
            lambda: r.upsert_agent("a", groups="sales"),
            lambda: r.upsert_agent("a", groups=[f"g{i}" for i in range(65)]),
            lambda: r.agent_state("a", node="n1", status="busy", connections=1),
            lambda: r.agent_state("a", node="n1", status="online", connections=-1),
            lambda: r.transfer(1, "a"),
        ]
        for call in bad:
            with pytest.raises((ValueError, TypeError)):
                await call()
        with pytest.raises(UnknownAgent):
            await r.agent_state("zz", node="n1", status="online", connections=1)
        with pytest.raises(UnknownAgent):
            await r.load("zz")
        assert (await r.stats(0))["queued"] == 0

    run_cluster(redis_server, body, max_agents=2)


# ---------------------------------------------------------------------------------------------
# Redis going away


def test_redis_restart_reloads_the_script_and_down_is_cluster_unavailable(
    redis_server: RedisServer,
) -> None:
    async def body(r: ClusterRouting) -> None:
        await online(r, "a")
        assert agents_of((await r.route(1, 0)).effects) == ["a"]
        redis_server.stop()
        for call in (
            lambda: r.route(2, 0),
            lambda: r.positions([1]),
            lambda: r.assigned_to(1),
            lambda: r.stats(0),
        ):
            with pytest.raises(ClusterUnavailable) as info:
                await call()
            assert info.value.code == "cluster_unavailable"
        redis_server.start()  # empty: no state, no script
        with pytest.raises(UnknownAgent):
            await r.agent_state("a", node="n1", status="online", connections=1)
        await online(r, "a")
        assert agents_of((await r.route(2, 0)).effects) == ["a"]
        assert await r.assigned_to(1) is None  # the state went with Redis

    run_cluster(redis_server, body)


def test_restore_gives_a_lost_conversation_back_to_its_agent_or_puts_it_in_line(
    redis_server: RedisServer,
) -> None:
    """kefu.routing.Routing.restore's rules, for conversations Redis lost: back to an enabled
    agent (over capacity, no effect, grace begun when not connected), else in line past the
    queue's bound; an unknown group dropped; an already routed conversation refused."""

    async def body(r: ClusterRouting) -> None:
        await online(r, "a", max_chats=1)
        await r.upsert_agent("off", max_chats=5)  # exists, never connected
        await r.upsert_agent("gone", max_chats=5, disabled=True)
        assert (await r.restore(1, 1_000, agent_id="a")).effects == []
        assert (await r.restore(2, 1_000, agent_id="a")).effects == []  # over capacity
        assert await r.assigned_to(1) == "a" and await r.assigned_to(2) == "a"
        assert await r.load("a") == 2
        assert (await r.restore(3, 1_000, agent_id="off")).effects == []
        assert await r.assigned_to(3) == "off"
        # "off" is not connected: its grace ran from the restore; past it, its chat is queued
        # (nobody can take it: "a" is over capacity).
        expired = await r.expire(1_000 + 60_001)
        assert expired.effects == [Requeue(3, "off"), Queue(3, 1, None)]
        # A disabled agent's conversation and an unknown group's go in line, the group
        # dropped, even past the queue's bound (max_queue=1 here).
        restored = await r.restore(4, 2_000, agent_id="gone", group="nobody")
        assert restored.effects == [Queue(4, 2, None)]
        assert await r.position(4) == 2
        with pytest.raises(ValueError):
            await r.restore(4, 2_000)
        # A queued conversation is served once room is made, in its turn.
        freed = await r.release(1)
        assert agents_of(freed.effects) == []  # "a" is still at 1 of 1
        freed = await r.release(2)
        assert agents_of(freed.effects) == ["a"]

    run_cluster(redis_server, body, max_queue=1, grace_ms=60_000)
