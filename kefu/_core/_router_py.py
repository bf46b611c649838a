"""Weighted smooth round-robin over agents: the pure-Python twin of ``kefu._core.router``.

The algorithm is nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer``): on each
pick, every eligible candidate's current weight grows by its weight, the candidate with the
largest current weight wins (ties go to the agent added earliest) and its current weight drops
by the total weight of the eligible candidates. While eligibility does not change, the picks
follow the exact SWRR sequence: weights 5, 1, 1 give ``a a b a c a a`` and repeat.

An agent is eligible when it is online and its load is below its capacity (and, for
``pick(group)``, it belongs to the group). As in nginx, an agent that drops out of the
candidates keeps its current weight and resumes from it when it becomes eligible again; a change
of weight resets that agent's current weight to 0, as nginx does for a reloaded peer.

Limits: at most ``max_agents`` agents (``MAX_AGENTS`` at most), weights 1 to ``MAX_WEIGHT``,
capacities 0 to ``MAX_CAPACITY``, ``MAX_GROUPS_PER_AGENT`` groups per agent. With these the
total weight stays below 10**12, so the current weights, which SWRR keeps within a small
multiple of the total weight, fit the compiled module's 64-bit integers by a wide margin.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "MAX_AGENTS",
    "MAX_CAPACITY",
    "MAX_GROUPS_PER_AGENT",
    "MAX_WEIGHT",
    "AgentInfo",
    "Router",
    "debug_counters",
]

MAX_AGENTS = 1_000_000
"""Upper bound of ``Router(max_agents=...)``."""
MAX_WEIGHT = 1_000_000
"""Largest weight of one agent."""
MAX_CAPACITY = 1_000_000
"""Largest capacity (concurrent chats) of one agent."""
MAX_GROUPS_PER_AGENT = 64
"""Largest number of groups one agent belongs to."""


class AgentInfo(NamedTuple):
    """What the router knows about one agent, as of the call to :meth:`Router.info`."""

    id: str
    weight: int
    capacity: int
    load: int
    online: bool
    groups: frozenset[str]
    current_weight: int


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    The twin and a release build of the compiled module count nothing: every counter is 0.
    """
    return {"live_routers": 0, "live_groups": 0}


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; True as a weight is almost surely a mistake, so it is refused.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def _check_id(agent_id: object) -> str:
    if not isinstance(agent_id, str):
        raise TypeError(f"agent_id must be a str, not {type(agent_id).__name__}")
    return agent_id


def _check_group(group: object) -> str:
    if not isinstance(group, str):
        raise TypeError(f"group must be a str or None, not {type(group).__name__}")
    return group


def _check_groups(groups: object) -> frozenset[str]:
    if isinstance(groups, (str, bytes)):
        raise TypeError(f"groups must be an iterable of str, not a single {type(groups).__name__}")
    try:
        items = iter(groups)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"groups must be an iterable of str, not {type(groups).__name__}") from None
    names: set[str] = set()
    for name in items:
        if not isinstance(name, str):
            raise TypeError(f"groups must hold str, not {type(name).__name__}")
        if not name:
            raise ValueError("group names must be non-empty")
        names.add(name)
        if len(names) > MAX_GROUPS_PER_AGENT:
            raise ValueError(f"an agent belongs to at most {MAX_GROUPS_PER_AGENT} groups")
    return frozenset(names)


class _Agent:
    __slots__ = ("capacity", "current_weight", "groups", "id", "load", "online", "seq", "weight")

    def __init__(
        self,
        agent_id: str,
        weight: int,
        capacity: int,
        groups: frozenset[str],
        online: bool,
        seq: int,
    ) -> None:
        self.id = agent_id
        self.weight = weight
        self.capacity = capacity
        self.load = 0
        self.online = online
        self.groups = groups
        self.current_weight = 0
        self.seq = seq  # order of addition: breaks ties between equal current weights


class Router:
    """Assigns chats to agents by nginx's smooth weighted round-robin.

    Each agent has a weight (its share of new chats), a capacity (concurrent chats), a load (chats
    it holds now), an online flag and a set of groups. :meth:`pick` chooses among the eligible
    agents (online, load below capacity, in the group if one is given) and takes a slot;
    :meth:`release` gives it back when the chat ends. At most ``max_agents`` agents; adding one
    more raises ``ValueError``.
    """

    def __init__(self, max_agents: int = 100_000) -> None:
        self._max_agents = _check_int("max_agents", max_agents, 1, MAX_AGENTS)
        # Insertion order of this dict is the order of addition (agents() and tie-breaking).
        self._agents: dict[str, _Agent] = {}
        # group name -> members; a group exists while it has at least one member.
        self._groups: dict[str, dict[str, _Agent]] = {}
        self._next_seq = 0
        self._total_load = 0
        self._total_capacity = 0  # of online agents

    def __repr__(self) -> str:
        return f"Router(agents={len(self._agents)}, max_agents={self._max_agents})"

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, agent_id: object) -> bool:
        return isinstance(agent_id, str) and agent_id in self._agents

    @property
    def max_agents(self) -> int:
        """The most agents this router holds."""
        return self._max_agents

    @property
    def total_load(self) -> int:
        """Chats held by all agents, online or not."""
        return self._total_load

    @property
    def total_capacity(self) -> int:
        """Sum of the capacities of the online agents."""
        return self._total_capacity

    def _get(self, agent_id: object) -> _Agent:
        agent = self._agents.get(_check_id(agent_id))
        if agent is None:
            raise KeyError(agent_id)
        return agent

    def _join(self, agent: _Agent, names: Iterable[str]) -> None:
        for name in names:
            members = self._groups.get(name)
            if members is None:
                members = self._groups[name] = {}
            members[agent.id] = agent

    def _leave(self, agent: _Agent, names: Iterable[str]) -> None:
        for name in names:
            members = self._groups[name]
            del members[agent.id]
            if not members:
                del self._groups[name]

    def add(
        self,
        agent_id: str,
        weight: int,
        capacity: int,
        groups: Iterable[str] = (),
        online: bool = True,
    ) -> None:
        """Add an agent with load 0 and current weight 0.

        Raises ``ValueError`` if the id is taken or the router holds ``max_agents`` agents.
        """
        _check_id(agent_id)
        if not agent_id:
            raise ValueError("agent_id must be a non-empty str")
        _check_int("weight", weight, 1, MAX_WEIGHT)
        _check_int("capacity", capacity, 0, MAX_CAPACITY)
        names = _check_groups(groups)
        _check_bool("online", online)
        if agent_id in self._agents:
            raise ValueError(f"agent {agent_id!r} already exists")
        if len(self._agents) >= self._max_agents:
            raise ValueError(f"router is full: max_agents={self._max_agents}")
        agent = _Agent(agent_id, weight, capacity, names, online, self._next_seq)
        self._next_seq += 1
        self._agents[agent_id] = agent
        self._join(agent, names)
        if online:
            self._total_capacity += capacity

    def remove(self, agent_id: str) -> None:
        """Remove an agent; the chats it held leave ``total_load`` with it. KeyError if unknown."""
        agent = self._get(agent_id)
        self._leave(agent, agent.groups)
        del self._agents[agent.id]
        self._total_load -= agent.load
        if agent.online:
            self._total_capacity -= agent.capacity

    def update(
        self,
        agent_id: str,
        *,
        weight: int | None = None,
        capacity: int | None = None,
        groups: Iterable[str] | None = None,
        online: bool | None = None,
    ) -> None:
        """Change any of an agent's settings; ``None`` keeps the current one.

        A new weight (different from the current one) resets the agent's current weight to 0.
        A capacity below the current load is allowed: the agent is not picked until its load
        drops below it. Nothing changes if any argument is invalid.
        """
        agent = self._get(agent_id)
        if weight is not None:
            _check_int("weight", weight, 1, MAX_WEIGHT)
        if capacity is not None:
            _check_int("capacity", capacity, 0, MAX_CAPACITY)
        names = None if groups is None else _check_groups(groups)
        if online is not None:
            _check_bool("online", online)
        # Iterating ``groups`` ran the caller's code, which may have added or removed agents.
        agent = self._get(agent_id)
        if weight is not None and weight != agent.weight:
            agent.weight = weight
            agent.current_weight = 0
        if capacity is not None:
            if agent.online:
                self._total_capacity += capacity - agent.capacity
            agent.capacity = capacity
        if names is not None and names != agent.groups:
            self._leave(agent, agent.groups - names)
            self._join(agent, names - agent.groups)
            agent.groups = names
        if online is not None:
            self._set_online(agent, online)

    def _set_online(self, agent: _Agent, online: bool) -> None:
        if online != agent.online:
            agent.online = online
            self._total_capacity += agent.capacity if online else -agent.capacity

    def set_online(self, agent_id: str, online: bool) -> None:
        """Mark an agent online or offline; an offline agent keeps its load and current weight."""
        agent = self._get(agent_id)
        self._set_online(agent, _check_bool("online", online))

    def pick(self, group: str | None = None) -> str | None:
        """Choose the next eligible agent by SWRR, take one of its slots, return its id.

        Eligible: online, load below capacity, and in ``group`` unless it is ``None``. Returns
        ``None`` when no agent is eligible (an unknown group has no eligible agent).
        """
        if group is None:
            candidates: Iterable[_Agent] = self._agents.values()
        else:
            members = self._groups.get(_check_group(group))
            if members is None:
                return None
            candidates = members.values()
        best: _Agent | None = None
        total = 0
        for agent in candidates:
            if agent.online and agent.load < agent.capacity:
                agent.current_weight += agent.weight
                total += agent.weight
                if (
                    best is None
                    or agent.current_weight > best.current_weight
                    or (agent.current_weight == best.current_weight and agent.seq < best.seq)
                ):
                    best = agent
        if best is None:
            return None
        best.current_weight -= total
        best.load += 1
        self._total_load += 1
        return best.id

    def acquire(self, agent_id: str, *, force: bool = False) -> bool:
        """Take a slot of a given agent (it accepted a queued chat, or a transfer).

        Returns ``True`` and increments the load if the agent is online with load below
        capacity, else ``False``. ``force=True`` takes the slot regardless of the online flag and
        the capacity (a transfer an admin forces) and returns ``True``. Current weights are left
        as they are: a manual assignment is not a round-robin turn.
        """
        agent = self._get(agent_id)
        if not _check_bool("force", force) and not (agent.online and agent.load < agent.capacity):
            return False
        agent.load += 1
        self._total_load += 1
        return True

    def release(self, agent_id: str) -> None:
        """Give back one slot when a chat ends. ValueError if the agent's load is already 0."""
        agent = self._get(agent_id)
        if agent.load == 0:
            raise ValueError(f"agent {agent.id!r} has no chat to release (load is 0)")
        agent.load -= 1
        self._total_load -= 1

    def load(self, agent_id: str) -> int:
        """Chats the agent holds now."""
        return self._get(agent_id).load

    def info(self, agent_id: str) -> AgentInfo:
        """A snapshot of everything the router knows about the agent."""
        a = self._get(agent_id)
        return AgentInfo(a.id, a.weight, a.capacity, a.load, a.online, a.groups, a.current_weight)

    def agents(self) -> list[str]:
        """Agent ids in order of addition."""
        return list(self._agents)

    def groups(self) -> list[str]:
        """Names of the groups that have at least one member, sorted."""
        return sorted(self._groups)

    def eligible_count(self, group: str | None = None) -> int:
        """How many agents :meth:`pick` would choose among now."""
        if group is None:
            candidates: Iterable[_Agent] = self._agents.values()
        else:
            members = self._groups.get(_check_group(group))
            if members is None:
                return 0
            candidates = members.values()
        return sum(1 for a in candidates if a.online and a.load < a.capacity)
