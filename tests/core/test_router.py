"""kefu._core.router: nginx's smooth weighted round-robin with capacity, online flag and groups.

Every behavioural test runs over both implementations (``router_impl``); the property tests
drive the twin, the compiled module and the small reference model below with the same random
operations and compare every result and every exception type.
"""

from __future__ import annotations

import gc
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@dataclass
class _RefAgent:
    id: str
    weight: int
    capacity: int
    groups: frozenset[str]
    online: bool
    load: int = 0
    current_weight: int = 0


@dataclass
class ReferenceRouter:
    """Textbook SWRR over a list kept in order of addition, with the validation of the spec.

    Deliberately naive (a linear search for everything) so that it is obviously right.
    """

    max_agents: int = 100_000
    agents: list[_RefAgent] = field(default_factory=list)

    def _find(self, agent_id: object) -> _RefAgent:
        if not isinstance(agent_id, str):
            raise TypeError(agent_id)
        for agent in self.agents:
            if agent.id == agent_id:
                return agent
        raise KeyError(agent_id)

    @staticmethod
    def _check_int(value: object, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        if not low <= value <= 1_000_000:
            raise ValueError(value)
        return value

    def add(
        self,
        agent_id: str,
        weight: int,
        capacity: int,
        groups: Iterable[str] = (),
        online: bool = True,
    ) -> None:
        if not isinstance(agent_id, str):
            raise TypeError(agent_id)
        if not agent_id:
            raise ValueError(agent_id)
        self._check_int(weight, 1)
        self._check_int(capacity, 0)
        if any(a.id == agent_id for a in self.agents) or len(self.agents) >= self.max_agents:
            raise ValueError(agent_id)
        self.agents.append(_RefAgent(agent_id, weight, capacity, frozenset(groups), online))

    def remove(self, agent_id: str) -> None:
        self.agents.remove(self._find(agent_id))

    def update(
        self,
        agent_id: str,
        *,
        weight: int | None = None,
        capacity: int | None = None,
        groups: Iterable[str] | None = None,
        online: bool | None = None,
    ) -> None:
        agent = self._find(agent_id)
        if weight is not None:
            self._check_int(weight, 1)
        if capacity is not None:
            self._check_int(capacity, 0)
        if weight is not None and weight != agent.weight:
            agent.weight, agent.current_weight = weight, 0
        if capacity is not None:
            agent.capacity = capacity
        if groups is not None:
            agent.groups = frozenset(groups)
        if online is not None:
            agent.online = online

    def set_online(self, agent_id: str, online: bool) -> None:
        self._find(agent_id).online = online

    def pick(self, group: str | None = None) -> str | None:
        candidates = [
            a
            for a in self.agents
            if a.online and a.load < a.capacity and (group is None or group in a.groups)
        ]
        if not candidates:
            return None
        for a in candidates:
            a.current_weight += a.weight
        best = max(candidates, key=lambda a: a.current_weight)  # the first of equals wins
        best.current_weight -= sum(a.weight for a in candidates)
        best.load += 1
        return best.id

    def acquire(self, agent_id: str, *, force: bool = False) -> bool:
        agent = self._find(agent_id)
        if force or (agent.online and agent.load < agent.capacity):
            agent.load += 1
            return True
        return False

    def release(self, agent_id: str) -> None:
        agent = self._find(agent_id)
        if agent.load == 0:
            raise ValueError(agent_id)
        agent.load -= 1

    def info(self, agent_id: str) -> tuple[object, ...]:
        a = self._find(agent_id)
        return (a.id, a.weight, a.capacity, a.load, a.online, a.groups, a.current_weight)

    def state(self) -> tuple[object, ...]:
        return (
            [a.id for a in self.agents],
            sorted({g for a in self.agents for g in a.groups}),
            sum(a.load for a in self.agents),
            sum(a.capacity for a in self.agents if a.online),
            sum(1 for a in self.agents if a.online and a.load < a.capacity),
        )


def _state(router: Any) -> tuple[object, ...]:
    return (
        router.agents(),
        router.groups(),
        router.total_load,
        router.total_capacity,
        router.eligible_count(),
    )


def _router(impl: ModuleType, weights: dict[str, int], capacity: int = 1_000_000) -> Any:
    router = impl.Router()
    for agent_id, weight in weights.items():
        router.add(agent_id, weight, capacity)
    return router


def _reference(weights: dict[str, int], capacity: int = 1_000_000) -> ReferenceRouter:
    ref = ReferenceRouter()
    for agent_id, weight in weights.items():
        ref.add(agent_id, weight, capacity)
    return ref


# --- the SWRR sequence -------------------------------------------------------------------------


def test_weights_5_1_1_give_nginx_sequence_for_many_cycles(router_impl: ModuleType) -> None:
    router = _router(router_impl, {"a": 5, "b": 1, "c": 1})
    picks = "".join(router.pick() for _ in range(7 * 6))
    assert picks == "aabacaa" * 6
    # After each full cycle every current weight is back to 0.
    assert [router.info(x).current_weight for x in "abc"] == [0, 0, 0]


def test_equal_weights_are_plain_round_robin(router_impl: ModuleType) -> None:
    router = _router(router_impl, {"a": 3, "b": 3, "c": 3, "d": 3})
    assert [router.pick() for _ in range(12)] == list("abcd" * 3)


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 3, "b": 2},
        {"a": 1, "b": 2, "c": 3, "d": 4},
        {"a": 7, "b": 3, "c": 1},
        {"a": 2, "b": 2, "c": 1},
        {"x": 1_000_000, "y": 1, "z": 999_999},
        {str(i): (i * 37) % 11 + 1 for i in range(40)},
    ],
)
def test_sequence_matches_reference_swrr(router_impl: ModuleType, weights: dict[str, int]) -> None:
    router, ref = _router(router_impl, weights), _reference(weights)
    n = 3 * sum(weights.values()) if sum(weights.values()) < 1000 else 500
    assert [router.pick() for _ in range(n)] == [ref.pick() for _ in range(n)]


def test_long_run_proportion_is_exact(router_impl: ModuleType) -> None:
    router = _router(router_impl, {"a": 5, "b": 1, "c": 1})
    counts = Counter(router.pick() for _ in range(7000))
    assert counts == {"a": 5000, "b": 1000, "c": 1000}
    assert router.total_load == 7000


def test_single_agent_router(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("solo", 4, 3)
    assert [router.pick() for _ in range(4)] == ["solo", "solo", "solo", None]
    assert router.info("solo").current_weight == 0
    router.release("solo")
    assert router.pick() == "solo"


def test_pick_returns_the_stored_id_object(router_impl: ModuleType) -> None:
    agent_id = "".join(["agent", "-", "7"])  # built at run time: not a constant shared by chance
    router = router_impl.Router()
    router.add(agent_id, 1, 10)
    assert router.pick() is agent_id
    assert router.agents()[0] is agent_id


# --- capacity and load ---------------------------------------------------------------------------


def test_picks_stop_at_capacity_and_resume_after_release(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 2)
    router.add("b", 1, 1)
    assert [router.pick() for _ in range(3)] == ["a", "b", "a"]
    assert router.pick() is None
    assert router.eligible_count() == 0
    assert (router.load("a"), router.load("b")) == (2, 1)
    router.release("b")
    assert router.eligible_count() == 1
    assert router.pick() == "b"
    assert router.pick() is None
    router.release("a")
    router.release("a")
    assert router.load("a") == 0
    assert router.pick() == "a"


def test_full_agent_keeps_its_current_weight(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 2, 1)
    router.add("b", 1, 100)
    assert router.pick() == "a"  # a: 2 - 3 = -1, b: 1
    assert router.info("a").current_weight == -1
    assert [router.pick() for _ in range(3)] == ["b", "b", "b"]  # a is full
    assert router.info("a").current_weight == -1
    router.release("a")
    # Only b moved meanwhile: alone eligible, it gained and lost 1 on each pick.
    assert router.info("b").current_weight == 1
    assert router.pick() == "b"  # a: -1 + 2 = 1, b: 1 + 1 = 2
    assert router.pick() == "a"


def test_zero_capacity_agent_takes_no_chats(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 5, 0)
    router.add("b", 1, 10)
    assert [router.pick() for _ in range(3)] == ["b", "b", "b"]
    assert router.eligible_count() == 1
    assert router.acquire("a") is False
    assert router.load("a") == 0
    assert router.acquire("a", force=True) is True
    assert router.load("a") == 1
    assert router.total_capacity == 10


def test_lowering_capacity_below_load_blocks_until_load_drops(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 3)
    assert [router.pick() for _ in range(3)] == ["a", "a", "a"]
    router.release("a")
    router.update("a", capacity=1)
    assert router.load("a") == 2
    assert router.pick() is None
    assert router.acquire("a") is False
    router.release("a")
    assert router.pick() is None  # load 1, capacity 1
    router.release("a")
    assert router.pick() == "a"


def test_acquire_takes_a_slot_without_touching_current_weights(router_impl: ModuleType) -> None:
    router = _router(router_impl, {"a": 5, "b": 1, "c": 1}, capacity=5)
    before = [router.info(x).current_weight for x in "abc"]
    assert router.acquire("b") is True
    assert router.load("b") == 1
    assert [router.info(x).current_weight for x in "abc"] == before
    assert router.total_load == 1
    # The round-robin sequence is exactly the one it would have been.
    assert "".join(router.pick() for _ in range(7)) == "aabacaa"


def test_acquire_respects_capacity_and_online_unless_forced(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1)
    assert router.acquire("a") is True
    assert router.acquire("a") is False
    assert router.acquire("a", force=True) is True
    assert router.load("a") == 2
    router.add("off", 1, 5, online=False)
    assert router.acquire("off") is False
    assert router.acquire("off", force=True) is True
    assert router.load("off") == 1
    assert router.total_load == 3


def test_release_at_zero_load_is_refused_and_changes_nothing(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1)
    with pytest.raises(ValueError, match="no chat to release"):
        router.release("a")
    assert router.load("a") == 0
    assert router.total_load == 0
    assert router.pick() == "a"


# --- online flag ---------------------------------------------------------------------------------


def test_offline_agents_are_skipped_and_keep_current_weight(router_impl: ModuleType) -> None:
    weights = {"a": 5, "b": 1, "c": 1}
    router, ref = _router(router_impl, weights), _reference(weights)
    for _ in range(3):
        assert router.pick() == ref.pick()
    frozen = router.info("a").current_weight
    router.set_online("a", False)
    ref.set_online("a", False)
    assert router.info("a").online is False
    picks = [router.pick() for _ in range(6)]
    assert "a" not in picks
    assert picks == [ref.pick() for _ in range(6)]
    assert router.info("a").current_weight == frozen
    router.set_online("a", True)
    ref.set_online("a", True)
    assert [router.pick() for _ in range(20)] == [ref.pick() for _ in range(20)]


def test_offline_agent_keeps_load_and_leaves_total_capacity(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 4)
    router.add("b", 1, 6)
    assert router.total_capacity == 10
    assert router.pick() == "a"
    router.set_online("a", False)
    assert router.total_capacity == 6
    assert router.total_load == 1
    assert router.load("a") == 1
    router.set_online("a", False)  # no change twice
    assert router.total_capacity == 6
    router.release("a")  # a chat of an offline agent can still end
    assert router.load("a") == 0
    router.update("a", online=True, capacity=2)
    assert router.total_capacity == 8
    router.add("c", 1, 100, online=False)
    assert router.total_capacity == 8
    assert router.eligible_count() == 2


# --- groups --------------------------------------------------------------------------------------


def test_pick_in_group_walks_only_its_members(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 5, 100, groups=["sales"])
    router.add("b", 1, 100, groups=["sales", "vip"])
    router.add("c", 1, 100, groups=["support"])
    router.add("d", 1, 100, groups={"sales"})
    assert router.groups() == ["sales", "support", "vip"]
    assert "".join(router.pick("sales") for _ in range(14)) == "aabadaa" * 2
    assert [router.pick("vip") for _ in range(3)] == ["b", "b", "b"]
    assert router.pick("support") == "c"
    assert router.pick("nobody") is None
    assert router.eligible_count("sales") == 3
    assert router.eligible_count("nobody") == 0
    assert router.info("b").groups == frozenset({"sales", "vip"})


def test_group_picks_match_reference_with_ties_after_removals(router_impl: ModuleType) -> None:
    # Removing early agents reorders the compiled module's slots; ties must still go to the
    # agent added earliest.
    router, ref = router_impl.Router(), ReferenceRouter()
    for i in range(12):
        for r in (router, ref):
            r.add(f"a{i}", 1 + i % 2, 100, groups=["g"] if i % 3 else ["g", "h"])
    for agent_id in ("a0", "a4", "a1"):
        router.remove(agent_id)
        ref.remove(agent_id)
    for group in ["g", "h", None, "g", "h"] * 8:
        assert router.pick(group) == ref.pick(group)
    assert router.agents() == [a.id for a in ref.agents]


def test_update_groups_moves_membership_and_drops_empty_groups(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 10, groups=["sales"])
    router.add("b", 1, 10, groups=["sales", "vip"])
    router.update("a", groups=["support"])
    assert router.groups() == ["sales", "support", "vip"]
    assert router.pick("sales") == "b"
    assert router.pick("support") == "a"
    router.update("b", groups=())
    assert router.groups() == ["support"]
    assert router.pick("sales") is None
    assert router.pick("vip") is None
    router.remove("a")
    assert router.groups() == []
    assert router.pick("support") is None


def test_groups_are_deduplicated(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 10, groups=("x", "x", "y"))
    assert router.info("a").groups == frozenset({"x", "y"})
    assert router.eligible_count("x") == 1


# --- add, remove, update -------------------------------------------------------------------------


def test_remove_during_operation_continues_like_reference(router_impl: ModuleType) -> None:
    weights = {"a": 4, "b": 3, "c": 2, "d": 1}
    router, ref = _router(router_impl, weights, capacity=50), _reference(weights, capacity=50)
    for _ in range(5):
        assert router.pick() == ref.pick()
    load_b = router.load("b")
    total = router.total_load
    router.remove("b")
    ref.remove("b")
    assert "b" not in router
    assert len(router) == 3
    assert router.total_load == total - load_b
    assert router.total_capacity == 150
    for _ in range(30):
        assert router.pick() == ref.pick()
    with pytest.raises(KeyError):
        router.load("b")
    # Added again, b comes last in the order of addition, with load 0.
    router.add("b", 3, 50)
    ref.add("b", 3, 50)
    assert router.agents() == ["a", "c", "d", "b"]
    assert router.load("b") == 0
    assert [router.pick() for _ in range(40)] == [ref.pick() for _ in range(40)]


def test_remove_every_agent_then_reuse(router_impl: ModuleType) -> None:
    router = router_impl.Router(max_agents=3)
    for agent_id in "abc":
        router.add(agent_id, 1, 5, groups=["g"])
    router.pick()
    for agent_id in "bca":
        router.remove(agent_id)
    assert len(router) == 0
    assert router.agents() == []
    assert router.groups() == []
    assert router.total_load == 0
    assert router.total_capacity == 0
    assert router.pick() is None
    assert router.pick("g") is None
    for agent_id in "xyz":
        router.add(agent_id, 1, 5, groups=["g"])
    assert [router.pick("g") for _ in range(3)] == ["x", "y", "z"]


def test_update_weight_resets_current_weight(router_impl: ModuleType) -> None:
    router = _router(router_impl, {"a": 5, "b": 1, "c": 1})
    assert router.pick() == "a"
    assert router.info("a").current_weight == -2
    router.update("a", weight=5)  # the same weight: nothing to reset
    assert router.info("a").current_weight == -2
    router.update("a", weight=1)
    assert router.info("a") == ("a", 1, 1_000_000, 1, True, frozenset(), 0)
    assert router.info("b").current_weight == 1
    ref = ReferenceRouter()
    for agent_id, cw in (("a", 0), ("b", 1), ("c", 1)):
        ref.add(agent_id, 1, 1_000_000)
        ref.agents[-1].current_weight = cw
    assert [router.pick() for _ in range(9)] == [ref.pick() for _ in range(9)]


def test_update_with_an_invalid_argument_changes_nothing(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 2, 3, groups=["g"])
    router.pick()
    before = router.info("a")
    with pytest.raises(ValueError, match="capacity"):
        router.update("a", weight=7, capacity=-1, groups=["h"], online=False)
    with pytest.raises(TypeError, match="online"):
        router.update("a", weight=7, groups=["h"], online=1)
    with pytest.raises(TypeError, match="groups"):
        router.update("a", weight=7, groups=[1])
    assert router.info("a") == before
    assert router.groups() == ["g"]
    assert router.total_capacity == 3


def test_groups_iterable_that_changes_the_router(router_impl: ModuleType) -> None:
    router = router_impl.Router(max_agents=50)
    router.add("a", 1, 1, groups=["g"])

    def adding() -> Iterator[str]:
        for i in range(20):  # enough to grow the compiled module's arrays meanwhile
            router.add(f"extra{i}", 1, 1, groups=["g"])
        yield "g"

    router.add("b", 1, 1, groups=adding())
    assert router.agents() == ["a", *(f"extra{i}" for i in range(20)), "b"]
    assert router.eligible_count("g") == 22

    def removing() -> Iterator[str]:
        router.remove("a")
        yield "h"

    with pytest.raises(KeyError):
        router.update("a", weight=3, groups=removing())
    assert "a" not in router
    assert router.groups() == ["g"]
    assert [router.pick("g") for _ in range(21)] == router.agents()
    assert router.pick("g") is None


def test_info_is_an_agent_info(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 3, 7, groups=["g"], online=False)
    info = router.info("a")
    assert isinstance(info, router_impl.AgentInfo)
    assert (info.id, info.weight, info.capacity, info.load) == ("a", 3, 7, 0)
    assert (info.online, info.groups, info.current_weight) == (False, frozenset({"g"}), 0)
    with pytest.raises(AttributeError):
        info.load = 5


def test_len_contains_agents_repr(router_impl: ModuleType) -> None:
    router = router_impl.Router(max_agents=10)
    for agent_id in ("c", "a", "b"):
        router.add(agent_id, 1, 1)
    assert len(router) == 3
    assert "a" in router
    assert "z" not in router
    assert 3 not in router
    assert router.agents() == ["c", "a", "b"]
    router.remove("c")
    assert router.agents() == ["a", "b"]
    assert repr(router) == "Router(agents=2, max_agents=10)"
    assert router.max_agents == 10


def test_max_agents_limit(router_impl: ModuleType) -> None:
    router = router_impl.Router(max_agents=2)
    router.add("a", 1, 1)
    router.add("b", 1, 1)
    with pytest.raises(ValueError, match="max_agents=2"):
        router.add("c", 1, 1)
    assert router.agents() == ["a", "b"]
    router.remove("a")
    router.add("c", 1, 1)
    assert router.agents() == ["b", "c"]


@pytest.mark.parametrize(
    ("max_agents", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (1_000_001, ValueError),
        (1.0, TypeError),
        (True, TypeError),
    ],
)
def test_bad_max_agents(router_impl: ModuleType, max_agents: object, error: type) -> None:
    with pytest.raises(error, match="max_agents"):
        router_impl.Router(max_agents=max_agents)


def test_module_limits_agree(router_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = router_pair
    names = ("MAX_AGENTS", "MAX_WEIGHT", "MAX_CAPACITY", "MAX_GROUPS_PER_AGENT")
    assert [getattr(c, n) for n in names] == [getattr(py, n) for n in names]
    assert c.AgentInfo is py.AgentInfo


def test_many_agents_large_router_matches_reference(router_impl: ModuleType) -> None:
    rng = random.Random(7)
    router, ref = router_impl.Router(max_agents=1500), ReferenceRouter(max_agents=1500)
    for i in range(1500):
        weight, capacity = rng.randint(1, 20), rng.randint(0, 3)
        groups = [f"g{rng.randrange(10)}" for _ in range(rng.randint(0, 2))]
        router.add(f"agent{i}", weight, capacity, groups)
        ref.add(f"agent{i}", weight, capacity, groups)
    for i in range(0, 1500, 7):
        router.remove(f"agent{i}")
        ref.remove(f"agent{i}")
    for step in range(600):
        group = None if step % 3 == 0 else f"g{step % 10}"
        assert router.pick(group) == ref.pick(group)
    assert _state(router) == ref.state()


# --- bad input -----------------------------------------------------------------------------------

BAD_WEIGHTS: list[tuple[object, type[Exception]]] = [
    (0, ValueError),
    (-1, ValueError),
    (1_000_001, ValueError),
    (10**30, ValueError),
]
BAD_WEIGHTS += [(1.5, TypeError), (True, TypeError), ("3", TypeError), (None, TypeError)]


@pytest.mark.parametrize(("weight", "error"), BAD_WEIGHTS)
def test_bad_weight(router_impl: ModuleType, weight: object, error: type) -> None:
    router = router_impl.Router()
    with pytest.raises(error, match="weight"):
        router.add("a", weight, 1)
    assert len(router) == 0
    router.add("a", 1, 1)
    if weight is not None:  # update(weight=None) means "keep"
        with pytest.raises(error, match="weight"):
            router.update("a", weight=weight)
    assert router.info("a").weight == 1


@pytest.mark.parametrize(
    ("capacity", "error"),
    [(-1, ValueError), (1_000_001, ValueError), (2.0, TypeError), (False, TypeError)],
)
def test_bad_capacity(router_impl: ModuleType, capacity: object, error: type) -> None:
    router = router_impl.Router()
    with pytest.raises(error, match="capacity"):
        router.add("a", 1, capacity)
    router.add("a", 1, 1)
    with pytest.raises(error, match="capacity"):
        router.update("a", capacity=capacity)
    assert router.info("a").capacity == 1
    assert len(router) == 1


@pytest.mark.parametrize(
    ("agent_id", "error"), [("", ValueError), (1, TypeError), (None, TypeError)]
)
def test_bad_agent_id_in_add(router_impl: ModuleType, agent_id: object, error: type) -> None:
    router = router_impl.Router()
    with pytest.raises(error, match="agent_id"):
        router.add(agent_id, 1, 1)
    assert len(router) == 0


@pytest.mark.parametrize(
    ("groups", "error"),
    [
        ("sales", TypeError),
        (b"sales", TypeError),
        (5, TypeError),
        ([1], TypeError),
        ([""], ValueError),
        ([f"g{i}" for i in range(65)], ValueError),
    ],
)
def test_bad_groups(router_impl: ModuleType, groups: object, error: type) -> None:
    router = router_impl.Router()
    with pytest.raises(error, match="group"):
        router.add("a", 1, 1, groups=groups)
    assert len(router) == 0
    assert router.groups() == []


def test_sixty_four_groups_are_allowed(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1, groups=(f"g{i}" for i in range(64)))
    assert len(router.groups()) == 64
    assert router.pick("g63") == "a"


def test_bad_online_and_force(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    with pytest.raises(TypeError, match="online"):
        router.add("a", 1, 1, online=1)
    router.add("a", 1, 1)
    with pytest.raises(TypeError, match="online"):
        router.set_online("a", "yes")
    with pytest.raises(TypeError, match="force"):
        router.acquire("a", force=1)
    assert router.load("a") == 0
    assert router.info("a").online is True


def test_duplicate_id(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1)
    with pytest.raises(ValueError, match="already exists"):
        router.add("a", 2, 2)
    assert router.info("a").weight == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda r, x: r.remove(x),
        lambda r, x: r.release(x),
        lambda r, x: r.acquire(x),
        lambda r, x: r.acquire(x, force=True),
        lambda r, x: r.update(x, weight=2),
        lambda r, x: r.set_online(x, False),
        lambda r, x: r.load(x),
        lambda r, x: r.info(x),
    ],
    ids=["remove", "release", "acquire", "acquire-force", "update", "set_online", "load", "info"],
)
def test_unknown_or_mistyped_id(router_impl: ModuleType, call: Any) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1)
    with pytest.raises(KeyError):
        call(router, "zz")
    with pytest.raises(KeyError):
        call(router, "")
    with pytest.raises(TypeError, match="agent_id"):
        call(router, 5)
    with pytest.raises(TypeError, match="agent_id"):
        call(router, ["a"])
    assert router.agents() == ["a"]
    assert router.total_load == 0


def test_bad_group_argument(router_impl: ModuleType) -> None:
    router = router_impl.Router()
    router.add("a", 1, 1, groups=["g"])
    for bad in (1, ["g"], b"g"):
        with pytest.raises(TypeError, match="group"):
            router.pick(bad)
        with pytest.raises(TypeError, match="group"):
            router.eligible_count(bad)
    assert router.load("a") == 0


def test_error_messages_are_identical(router_pair: tuple[ModuleType, ModuleType]) -> None:
    calls: list[Callable[[Any], object]] = [
        lambda r: r.add("a", 0, 1),
        lambda r: r.add("a", 1.5, 1),
        lambda r: r.add("a", 1, -1),
        lambda r: r.add("", 1, 1),
        lambda r: r.add(3, 1, 1),
        lambda r: r.add("x", 1, 1, groups="abc"),
        lambda r: r.add("x", 1, 1, groups=[3]),
        lambda r: r.add("x", 1, 1, groups=None),
        lambda r: r.add("x", 1, 1, online=None),
        lambda r: r.add("k", 1, 1),
        lambda r: r.release("k"),
        lambda r: r.release("nope"),
        lambda r: r.pick(3),
        lambda r: r.acquire("k", force="y"),
        lambda r: r.set_online("k", 0),
    ]
    messages: dict[str, list[str]] = {}
    for name, impl in zip(("py", "c"), router_pair, strict=True):
        router = impl.Router(max_agents=1)
        router.add("k", 1, 1)
        messages[name] = []
        for call in calls:
            with pytest.raises((TypeError, ValueError, KeyError)) as info:
                call(router)
            messages[name].append(f"{info.type.__name__}: {info.value}")
    assert messages["py"] == messages["c"]


# --- debug counters ------------------------------------------------------------------------------


def test_debug_counters_return_to_baseline(router_impl: ModuleType) -> None:
    gc.collect()
    before = router_impl.debug_counters()
    assert set(before) == {"live_routers", "live_groups"}
    assert all(isinstance(v, int) and v >= 0 for v in before.values())
    routers = []
    for i in range(3):
        router = router_impl.Router()
        router.add("a", 1, 1, groups=[f"g{i}", "shared"])
        routers.append(router)
    during = router_impl.debug_counters()
    # A KEFU_DEBUG=1 build counts 3 routers and 6 groups more; others count nothing.
    assert during in (before, {k: v + (3 if k == "live_routers" else 6) for k, v in before.items()})
    del routers, router
    gc.collect()
    assert router_impl.debug_counters() == before


# --- property tests: twin, compiled module and reference model agree ----------------------------

IDS = ["a", "b", "c", "d", "e"]
GROUPS = ["g1", "g2", "g3"]
weights = st.integers(1, 6) | st.sampled_from([0, -1, 1.5, True, "3"])
capacities = st.integers(0, 3) | st.sampled_from([-1])
group_sets = st.frozensets(st.sampled_from(GROUPS), max_size=3).map(sorted)
ops = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(IDS), weights, capacities, group_sets, st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(IDS)),
    st.tuples(
        st.just("update"),
        st.sampled_from(IDS),
        st.none() | weights,
        st.none() | capacities,
        st.none() | group_sets,
        st.none() | st.booleans(),
    ),
    st.tuples(st.just("set_online"), st.sampled_from(IDS), st.booleans()),
    st.tuples(st.just("pick"), st.sampled_from([None, None, None, *GROUPS, "unknown"])),
    st.tuples(st.just("pick"), st.sampled_from([None, None, None, *GROUPS, "unknown"])),
    st.tuples(st.just("acquire"), st.sampled_from(IDS), st.booleans()),
    st.tuples(st.just("release"), st.sampled_from(IDS)),
    st.tuples(st.just("info"), st.sampled_from(IDS)),
)


def _apply(router: Any, op: tuple[Any, ...]) -> tuple[str, object]:
    name, *args = op
    try:
        if name == "add":
            agent_id, weight, capacity, groups, online = args
            result: object = router.add(agent_id, weight, capacity, groups, online)
        elif name == "update":
            agent_id, weight, capacity, groups, online = args
            result = router.update(
                agent_id, weight=weight, capacity=capacity, groups=groups, online=online
            )
        elif name == "acquire":
            result = router.acquire(args[0], force=args[1])
        elif name == "info":
            result = tuple(router.info(args[0]))
        else:
            result = getattr(router, name)(*args)
    except (KeyError, ValueError, TypeError) as exc:
        return ("raised", type(exc))
    return ("returned", result)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(max_agents=st.integers(1, 5), operations=st.lists(ops, max_size=60))
def test_twin_compiled_and_reference_agree(
    router_pair: tuple[ModuleType, ModuleType],
    max_agents: int,
    operations: list[tuple[Any, ...]],
) -> None:
    py, c = router_pair
    twin, compiled = py.Router(max_agents), c.Router(max_agents)
    ref = ReferenceRouter(max_agents)
    for op in operations:
        expected = _apply(ref, op)
        assert _apply(twin, op) == expected, op
        assert _apply(compiled, op) == expected, op
        assert _state(twin) == _state(compiled) == ref.state(), op
    for agent_id in ref.agents:
        assert twin.info(agent_id.id) == compiled.info(agent_id.id) == ref.info(agent_id.id)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    weights=st.lists(st.integers(1, 1_000_000), min_size=1, max_size=8),
    toggles=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40)), max_size=6),
)
def test_big_weights_with_eligibility_changes_agree(
    router_pair: tuple[ModuleType, ModuleType],
    weights: list[int],
    toggles: list[tuple[int, int]],
) -> None:
    """Large weights and agents going offline and online: same picks, same current weights."""
    py, c = router_pair
    routers = [py.Router(), c.Router()]
    ids = [f"agent{i}" for i in range(len(weights))]
    for router in routers:
        for agent_id, weight in zip(ids, weights, strict=True):
            router.add(agent_id, weight, 10**6)
    for index, picks in itertools.chain([(0, 5)], toggles):
        agent_id = ids[index % len(ids)]
        for router in routers:
            router.set_online(agent_id, not router.info(agent_id).online)
        seqs = [[router.pick() for _ in range(picks)] for router in routers]
        assert seqs[0] == seqs[1]
    assert [routers[0].info(x) for x in ids] == [routers[1].info(x) for x in ids]
