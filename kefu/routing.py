"""Who serves a conversation: the agent pool, the waiting queue and the routing decisions.

Everything here is synchronous and free of I/O. Time comes in as ``now_ms`` arguments and no
clock is read, so tests drive grace periods by hand. Each operation of :class:`Routing`
returns a list of **effects** (:class:`Assign`, :class:`Queue`, :class:`PositionChanged`,
:class:`Unassign`, :class:`Requeue`) that the node applies in order: frames to send, records
to store, :meth:`kefu.conversations.Conversations.apply` to keep the conversation states in
step. An operation that raises has changed nothing.

Rules
-----
- **Available and eligible**: an agent is *available* when its status is ``online`` (its own
  ``status`` frame; it starts ``offline`` and keeps its status across reconnects), it has at
  least one live connection and it is not disabled. Exactly the available agents are online
  in the :class:`~kefu._core.router.Router`. An available agent is *eligible* for a
  conversation while its load is below its capacity and it is in the conversation's group, if
  any; the router picks among the eligible ones by weighted smooth round-robin.
- **Presence and grace**: when an agent's last connection goes it gets no new conversations at
  once (nobody would see them) but keeps the ones it holds for ``grace_ms`` (default 60 s), so
  a page reload or a network blip costs the visitor nothing. A new connection within the grace
  ends it. Past it, :meth:`AgentPool.expired_agents` names the agent and
  :meth:`Routing.requeue_agent` puts its conversations back in the queue. ``away`` and
  ``offline`` set by a connected agent only stop new assignments: the agent is there and
  finishes the conversations it holds.
- **Queue order is arrival order**: a conversation gets a ticket the first time it asks for a
  human, and the queue is sorted by ticket. A conversation that comes back (its agent's grace
  ran out, it was transferred to a busy group) keeps its ticket, so it waits behind those who
  came before it and ahead of everyone who came later: the visitor is not sent to the back for
  something they did not do. ``queued {position}`` is the global rank, 1-based.
- **Oldest servable first**: the queue is split into lanes by (group, excluded agent); an
  agent with a free slot takes the oldest conversation among the lane heads it can serve, so a
  conversation waiting for a busy group never holds up those behind it. Work per assignment is
  bounded by the number of lanes, not the queue length.
- **The queue is always drained**: every operation that can free or add capacity assigns
  queued conversations before it returns, so after any call no queued conversation could be
  taken by an eligible agent. A new conversation is therefore routed straight to an agent when
  one is eligible, and queued otherwise.
- **Transfers**: to a named agent, the target must have a free slot and be online; an admin's
  ``force=True`` overrides the capacity and the ``away``/``offline`` status, never a missing
  connection or a disabled account (the conversation would sit with nobody). If the target
  cannot take it, :class:`AgentUnavailable` is raised and the conversation stays where it was.
  To a group, an eligible member other than the sender is picked; with none, the conversation
  is queued for the group with the sender excluded, so the freed slot does not hand it straight
  back (the sender may still ``accept`` it by hand).
- **Manual accept**: any online agent with a free slot may take any queued conversation;
  groups steer automatic routing, a person choosing is trusted. It is not a round-robin turn.
- **Disabling or removing an agent** requeues its conversations at once.

Bounds
------
========================  ====================================  ==================================
what                      limit                                 when full
========================  ====================================  ==================================
agents                    ``max_agents`` (the Router's)         ``add`` raises ``ValueError``
waiting queue             ``max_len`` (config                   new conversation, handoff or
                          ``routing.max_queue``)                transfer to a group: QueueFull,
                                                                nothing changes (the node answers
                                                                ``queue_full``, HTTP 503);
                                                                requeues (at most the load they
                                                                free) and restores are let in
conv -> agent map         the agents' capacities, plus forced   (by construction)
                          transfers (an admin's) and restored
                          assignments
lanes                     at most the queue's length            (by construction)
grace deadlines           at most one per agent                 (by construction)
========================  ====================================  ==================================

Metrics: :meth:`Routing.stats`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

import msgspec

from kefu._core import router as _router
from kefu.errors import KefuError

if TYPE_CHECKING:
    from kefu._core.router import Router

__all__ = [
    "AGENT_STATUSES",
    "DEFAULT_GRACE_MS",
    "DEFAULT_MAX_AGENTS",
    "DEFAULT_MAX_QUEUE",
    "Agent",
    "AgentPool",
    "AgentStatus",
    "AgentUnavailable",
    "Assign",
    "Effect",
    "NotAssigned",
    "NotQueued",
    "PositionChanged",
    "Queue",
    "QueueEntry",
    "QueueFull",
    "Requeue",
    "Routing",
    "RoutingError",
    "Unassign",
    "UnknownAgent",
    "UnknownGroup",
    "WaitingQueue",
]

AgentStatus = Literal["online", "away", "offline"]
AGENT_STATUSES: Final = frozenset({"online", "away", "offline"})
DEFAULT_GRACE_MS: Final = 60_000  # config routing.agent_grace_s
DEFAULT_MAX_QUEUE: Final = 10_000  # config routing.max_queue
DEFAULT_MAX_AGENTS: Final = 10_000  # the config's bound on its agents list


# ---------------------------------------------------------------------------------------------
# Errors: each carries the snake_case code the node puts in its error frame or body.


class RoutingError(KefuError):
    """A routing operation was refused; nothing changed."""

    code = "routing_error"


class QueueFull(RoutingError):
    """No agent can take the conversation now and the waiting queue is at its limit."""

    code = "queue_full"


class AgentUnavailable(RoutingError):
    """The agent cannot take the conversation: full, not online, disconnected or disabled."""

    code = "agent_unavailable"


class UnknownAgent(RoutingError, KeyError):
    code = "unknown_agent"


class UnknownGroup(RoutingError):
    """No agent belongs to the group, so a conversation queued for it would wait forever."""

    code = "unknown_group"


class NotQueued(RoutingError):
    code = "not_queued"


class NotAssigned(RoutingError):
    """The conversation is not held by the agent that asked to hand it on."""

    code = "not_assigned"


# ---------------------------------------------------------------------------------------------
# Effects


class Assign(msgspec.Struct, frozen=True):
    """``conv`` now belongs to ``agent_id``: ``assigned`` to the visitor and the agent."""

    conv: int
    agent_id: str
    group: str | None = None


class Queue(msgspec.Struct, frozen=True):
    """``conv`` entered the waiting queue at ``position``: ``queued`` to the visitor."""

    conv: int
    position: int
    group: str | None = None


class PositionChanged(msgspec.Struct, frozen=True):
    """A queued conversation moved: ``queued {position}`` again to its visitor."""

    conv: int
    position: int


class Unassign(msgspec.Struct, frozen=True):
    """``agent_id`` handed ``conv`` on (transfer): ``transferred`` to that agent.

    An :class:`Assign` or a :class:`Queue` for the same conversation follows in the same list.
    """

    conv: int
    agent_id: str


class Requeue(msgspec.Struct, frozen=True):
    """``conv`` was taken from ``agent_id`` (grace ran out, disabled, removed).

    An :class:`Assign` or a :class:`Queue` for the same conversation follows in the same list.
    """

    conv: int
    agent_id: str


Effect: TypeAlias = Assign | Queue | PositionChanged | Unassign | Requeue


# ---------------------------------------------------------------------------------------------
# Agents


class Agent:
    """What the pool knows about one agent. Read it; change it through the pool."""

    __slots__ = (
        "chosen_max_chats",
        "connections",
        "disabled",
        "grace_deadline_ms",
        "groups",
        "id",
        "max_chats",
        "name",
        "status",
        "weight",
    )

    def __init__(
        self,
        agent_id: str,
        name: str,
        weight: int,
        max_chats: int,
        groups: frozenset[str],
        disabled: bool,
    ) -> None:
        self.id = agent_id
        self.name = name
        self.weight = weight
        self.max_chats = max_chats  # set by an admin: the ceiling
        self.chosen_max_chats: int | None = None  # set by the agent's `status` frame
        self.groups = groups
        self.disabled = disabled
        self.status: AgentStatus = "offline"
        self.connections = 0
        self.grace_deadline_ms: int | None = None

    def __repr__(self) -> str:
        return (
            f"Agent({self.id!r}, status={self.status}, connections={self.connections}, "
            f"capacity={self.capacity}, disabled={self.disabled})"
        )

    @property
    def capacity(self) -> int:
        """Concurrent conversations: the agent's own choice, never above the admin's."""
        chosen = self.chosen_max_chats
        return self.max_chats if chosen is None else min(chosen, self.max_chats)

    @property
    def available(self) -> bool:
        """Online, connected and enabled: may get new conversations while it has a free slot."""
        return self.status == "online" and self.connections > 0 and not self.disabled


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _group_names(groups: Iterable[str]) -> frozenset[str]:
    if isinstance(groups, (str, bytes)):  # "sales" would become the groups s, a, l, e
        raise TypeError("groups must be an iterable of names, not a single string")
    return frozenset(groups)


class AgentPool:
    """The agents (settings from the config or the admin API) and their presence.

    The settings live in a :class:`~kefu._core.router.Router`, which also counts each agent's
    load; an agent is online in the router exactly when :attr:`Agent.available`. ``router``
    lets a test pass one implementation of the router explicitly; it must be empty.

    Change a pool that :class:`Routing` serves through :class:`Routing`'s methods of the same
    names, which assign queued conversations when capacity appears.
    """

    def __init__(
        self,
        *,
        max_agents: int = DEFAULT_MAX_AGENTS,
        grace_ms: int = DEFAULT_GRACE_MS,
        router: Router | None = None,
    ) -> None:
        self.grace_ms = _check_count("grace_ms", grace_ms)
        if router is None:
            router = _router.Router(max_agents=max_agents)
        elif len(router):
            raise ValueError("the router must be empty: the pool owns its agents")
        self._router: Router = router
        self._agents: dict[str, Agent] = {}
        self._group_sizes: dict[str, int] = {}
        # Agents whose last connection went and who hold their conversations until the deadline.
        self._grace: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._agents)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[Agent]:
        return iter(list(self._agents.values()))

    @property
    def router(self) -> Router:
        """The router holding settings and loads. Read it; the pool and Routing change it."""
        return self._router

    def get(self, agent_id: str) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise UnknownAgent(f"no agent {agent_id!r}")
        return agent

    def load(self, agent_id: str) -> int:
        """Conversations the agent holds now."""
        return self._router.load(self.get(agent_id).id)

    def has_group(self, group: str) -> bool:
        """Whether any agent, available or not, belongs to ``group``."""
        return group in self._group_sizes

    def can_take(self, agent_id: str, group: str | None = None) -> bool:
        """Whether the agent is eligible now: available, a free slot, in ``group`` if given."""
        agent = self._agents.get(agent_id)
        if agent is None or not agent.available:
            return False
        if group is not None and group not in agent.groups:
            return False
        return self._router.load(agent_id) < agent.capacity

    def in_grace(self) -> int:
        """Agents whose last connection went and whose grace has not been settled."""
        return len(self._grace)

    # -- settings ----------------------------------------------------------------------------

    def add(
        self,
        agent_id: str,
        name: str,
        *,
        weight: int = 1,
        max_chats: int = 5,
        groups: Iterable[str] = (),
        disabled: bool = False,
    ) -> Agent:
        """Add an agent, offline and without connections. ValueError if the id is taken."""
        if agent_id in self._agents:
            raise ValueError(f"agent {agent_id!r} already exists")
        names = _group_names(groups)
        # The router validates every value (and its own bound) before it changes anything.
        self._router.add(agent_id, weight, max_chats, names, online=False)
        agent = Agent(agent_id, name, weight, max_chats, names, bool(disabled))
        self._agents[agent_id] = agent
        self._count_groups(names, 1)
        return agent

    def update(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        weight: int | None = None,
        max_chats: int | None = None,
        groups: Iterable[str] | None = None,
        disabled: bool | None = None,
    ) -> None:
        """Change an agent's settings; ``None`` keeps one. Nothing changes if one is invalid."""
        agent = self.get(agent_id)
        names = None if groups is None else _group_names(groups)
        capacity = None
        if max_chats is not None:
            chosen = agent.chosen_max_chats
            capacity = max_chats if chosen is None else min(chosen, max_chats)
        enabled = not agent.disabled if disabled is None else not disabled
        online = agent.status == "online" and agent.connections > 0 and enabled
        self._router.update(agent_id, weight=weight, capacity=capacity, groups=names, online=online)
        if name is not None:
            agent.name = name
        if weight is not None:
            agent.weight = weight
        if max_chats is not None:
            agent.max_chats = max_chats
        if names is not None:
            self._count_groups(agent.groups, -1)
            self._count_groups(names, 1)
            agent.groups = names
        if disabled is not None:
            agent.disabled = bool(disabled)

    def remove(self, agent_id: str) -> None:
        """Forget an agent. ValueError while it holds conversations: requeue them first."""
        agent = self.get(agent_id)
        if self._router.load(agent_id):
            raise ValueError(f"agent {agent_id!r} still holds conversations")
        self._router.remove(agent_id)
        del self._agents[agent_id]
        self._count_groups(agent.groups, -1)
        self._grace.pop(agent_id, None)

    def _count_groups(self, names: Iterable[str], delta: int) -> None:
        sizes = self._group_sizes
        for name in names:
            size = sizes.get(name, 0) + delta
            if size:
                sizes[name] = size
            else:
                del sizes[name]

    # -- presence ----------------------------------------------------------------------------

    def set_status(self, agent_id: str, status: str, max_chats: int | None = None) -> None:
        """The agent's own ``status`` frame: presence, and optionally its capacity.

        ``max_chats`` above the admin's ``max_chats`` is held to it (the admin sets the
        ceiling, the agent may work below it).
        """
        agent = self.get(agent_id)
        if status not in AGENT_STATUSES:
            raise ValueError(f"status must be one of {sorted(AGENT_STATUSES)}, got {status!r}")
        if max_chats is not None:
            _check_count("max_chats", max_chats)
            self._router.update(agent_id, capacity=min(max_chats, agent.max_chats))
            agent.chosen_max_chats = max_chats
        agent.status = "online" if status == "online" else "away" if status == "away" else "offline"
        self._sync(agent)

    def connected(self, agent_id: str) -> None:
        """One more live connection of the agent; ends a grace period."""
        agent = self.get(agent_id)
        agent.connections += 1
        agent.grace_deadline_ms = None
        self._grace.pop(agent_id, None)
        self._sync(agent)

    def disconnected(self, agent_id: str, now_ms: int) -> None:
        """One live connection fewer; with none left the grace period starts."""
        agent = self.get(agent_id)
        if agent.connections == 0:
            raise ValueError(f"agent {agent_id!r} has no connection to lose")
        agent.connections -= 1
        if agent.connections == 0:
            self.begin_grace(agent_id, now_ms)
        self._sync(agent)

    def begin_grace(self, agent_id: str, now_ms: int) -> None:
        """Start the grace period of an agent without connections, unless one is running.

        ``disconnected`` calls it; so does :meth:`Routing.restore`, for an agent that held
        conversations before a restart and has not connected since.
        """
        agent = self.get(agent_id)
        if agent.connections == 0 and agent.grace_deadline_ms is None:
            agent.grace_deadline_ms = now_ms + self.grace_ms
            self._grace[agent_id] = agent.grace_deadline_ms

    def end_grace(self, agent_id: str) -> None:
        """Settle a grace period (its conversations were requeued)."""
        self.get(agent_id).grace_deadline_ms = None
        self._grace.pop(agent_id, None)

    def expired_agents(self, now_ms: int) -> list[str]:
        """Agents whose grace ran out at or before ``now_ms``, earliest deadline first.

        An agent stays listed until :meth:`end_grace` (which :meth:`Routing.requeue_agent`
        calls) or a new connection.
        """
        due = [(deadline, a) for a, deadline in self._grace.items() if deadline <= now_ms]
        due.sort()
        return [a for _, a in due]

    def next_grace_deadline(self) -> int | None:
        """The earliest running deadline, for the node's timer; None when none runs."""
        return min(self._grace.values(), default=None)

    def _sync(self, agent: Agent) -> None:
        self._router.set_online(agent.id, agent.available)


# ---------------------------------------------------------------------------------------------
# Waiting queue


class QueueEntry:
    """One waiting conversation. ``order`` is its arrival ticket; the queue is sorted by it."""

    __slots__ = ("conv", "enqueued_ms", "exclude", "group", "order", "reported")

    def __init__(
        self,
        conv: int,
        group: str | None,
        enqueued_ms: int,
        order: int,
        exclude: str | None,
    ) -> None:
        self.conv = conv
        self.group = group
        self.enqueued_ms = enqueued_ms
        self.order = order
        self.exclude = exclude  # an agent that must not get it automatically (the sender)
        self.reported = 0  # the position the visitor was last told

    def __repr__(self) -> str:
        return f"QueueEntry(conv={self.conv}, group={self.group!r}, order={self.order})"


def _order_of(entry: QueueEntry) -> int:
    return entry.order


_Lane: TypeAlias = tuple[str | None, str | None]  # (group, excluded agent)


class WaitingQueue:
    """Conversations waiting for an agent, in order of arrival, bounded by ``max_len``.

    Position changes are collected, not reported one removal at a time: the visitors whose
    position moved since the last :meth:`pop_changes` are told once, with their final
    position, however many removals and insertions happened in between.
    """

    def __init__(self, max_len: int = DEFAULT_MAX_QUEUE) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        self.max_len = max_len
        self.rejections = 0  # pushes refused because the queue was full
        self._entries: list[QueueEntry] = []  # sorted by order
        self._by_conv: dict[int, QueueEntry] = {}
        self._lanes: dict[_Lane, list[QueueEntry]] = {}  # each sorted by order
        self._next_order = 1
        self._dirty_from: int | None = None  # lowest index whose position may have changed

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conv: object) -> bool:
        return conv in self._by_conv

    def __iter__(self) -> Iterator[QueueEntry]:
        """The entries, first in line first."""
        return iter(list(self._entries))

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_len

    def get(self, conv: int) -> QueueEntry | None:
        return self._by_conv.get(conv)

    def ticket(self) -> int:
        """A new arrival ticket, after every one given so far."""
        order = self._next_order
        self._next_order += 1
        return order

    def position(self, conv: int) -> int | None:
        """1-based place in line; None when ``conv`` is not queued."""
        entry = self._by_conv.get(conv)
        if entry is None:
            return None
        return bisect.bisect_left(self._entries, entry.order, key=_order_of) + 1

    def oldest_wait_ms(self, now_ms: int) -> int:
        """How long the first in line has waited (``now_ms - enqueued_ms``); 0 when empty."""
        if not self._entries:
            return 0
        return max(0, now_ms - self._entries[0].enqueued_ms)

    def push(
        self,
        conv: int,
        group: str | None = None,
        enqueued_ms: int = 0,
        *,
        order: int | None = None,
        exclude: str | None = None,
        force: bool = False,
    ) -> int:
        """Queue ``conv`` and return its position.

        Without ``order`` it goes to the back; with the ticket of an earlier arrival it goes
        to that place, and everyone behind moves down (see :meth:`pop_changes`). Raises
        :class:`QueueFull` at ``max_len`` unless ``force`` (for conversations that already
        held a slot: requeues and restores).
        """
        if conv in self._by_conv:
            raise ValueError(f"conversation {conv} is already queued")
        if not force and len(self._entries) >= self.max_len:
            self.rejections += 1
            raise QueueFull(f"the waiting queue is full ({self.max_len} conversations)")
        if order is None:
            order = self.ticket()
        elif order >= self._next_order:
            self._next_order = order + 1
        entries = self._entries
        index = bisect.bisect_left(entries, order, key=_order_of)
        if index < len(entries) and entries[index].order == order:
            raise ValueError(f"ticket {order} is taken")
        entry = QueueEntry(conv, group, enqueued_ms, order, exclude)
        entries.insert(index, entry)
        self._by_conv[conv] = entry
        lane = self._lanes.setdefault((group, exclude), [])
        bisect.insort(lane, entry, key=_order_of)
        entry.reported = index + 1
        if index + 1 < len(entries):
            self._mark_dirty(index + 1)
        return index + 1

    def discard(self, conv: int) -> QueueEntry:
        """Take ``conv`` out of line; the moves it causes wait for :meth:`pop_changes`."""
        entry = self._by_conv.pop(conv, None)
        if entry is None:
            raise NotQueued(f"conversation {conv} is not queued")
        index = bisect.bisect_left(self._entries, entry.order, key=_order_of)
        del self._entries[index]
        key = (entry.group, entry.exclude)
        lane = self._lanes[key]
        del lane[bisect.bisect_left(lane, entry.order, key=_order_of)]
        if not lane:
            del self._lanes[key]
        if index < len(self._entries):
            self._mark_dirty(index)
        return entry

    def remove(self, conv: int) -> list[tuple[int, int]]:
        """Take ``conv`` out of line; return ``(conv, new_position)`` of everyone who moved."""
        self.discard(conv)
        return self.pop_changes()

    def pop_changes(self) -> list[tuple[int, int]]:
        """``(conv, position)`` of each queued conversation whose position differs from the
        one last returned for it (by :meth:`push` or here), in queue order."""
        start = self._dirty_from
        if start is None:
            return []
        self._dirty_from = None
        changes: list[tuple[int, int]] = []
        for index in range(start, len(self._entries)):
            entry = self._entries[index]
            if entry.reported != index + 1:
                entry.reported = index + 1
                changes.append((entry.conv, index + 1))
        return changes

    def heads(self) -> list[QueueEntry]:
        """The first entry of each lane: the only candidates for the next assignment."""
        return [lane[0] for lane in self._lanes.values()]

    def lanes(self) -> int:
        return len(self._lanes)

    def _mark_dirty(self, index: int) -> None:
        if self._dirty_from is None or index < self._dirty_from:
            self._dirty_from = index


# ---------------------------------------------------------------------------------------------
# Routing


class _Routed:
    """A conversation that asked for a human and has not ended."""

    __slots__ = ("agent", "group", "order", "since_ms")

    def __init__(self, group: str | None, order: int, since_ms: int) -> None:
        self.agent: str | None = None
        self.group = group
        self.order = order  # arrival ticket, kept for requeues
        self.since_ms = since_ms  # when it first asked for a human


class Routing:
    """The routing decisions over one pool and one queue; see the module doc for the rules."""

    def __init__(self, pool: AgentPool, queue: WaitingQueue) -> None:
        if len(queue):
            raise ValueError("the queue must be empty: routing owns its entries")
        if pool.router.total_load:
            raise ValueError("the pool's agents must hold no conversations yet")
        self.pool = pool
        self.queue = queue
        self._router = pool.router
        self._convs: dict[int, _Routed] = {}
        self._by_agent: dict[str, dict[int, None]] = {}  # ordered sets, in assignment order
        self.assigned_total = 0
        self.accepted_total = 0
        self.transferred_total = 0
        self.requeued_total = 0
        self.forced_total = 0

    # -- queries -----------------------------------------------------------------------------

    def __contains__(self, conv: object) -> bool:
        """Whether ``conv`` is routed: assigned or queued."""
        return conv in self._convs

    def assigned_to(self, conv: int) -> str | None:
        rec = self._convs.get(conv)
        return None if rec is None else rec.agent

    def group_of(self, conv: int) -> str | None:
        rec = self._convs.get(conv)
        return None if rec is None else rec.group

    def conversations_of(self, agent_id: str) -> list[int]:
        """The conversations ``agent_id`` holds, in the order it got them."""
        return list(self._by_agent.get(agent_id, ()))

    def stats(self, now_ms: int) -> dict[str, int]:
        """Gauges and counters for the metrics endpoint."""
        router = self._router
        return {
            "agents": len(self.pool),
            "agents_available": sum(1 for a in self.pool if a.available),
            "agents_in_grace": self.pool.in_grace(),
            "capacity": router.total_capacity,
            "load": router.total_load,
            "queued": len(self.queue),
            "queue_max": self.queue.max_len,
            "queue_lanes": self.queue.lanes(),
            "queue_oldest_wait_ms": self.queue.oldest_wait_ms(now_ms),
            "queue_full_total": self.queue.rejections,
            "assigned_total": self.assigned_total,
            "accepted_total": self.accepted_total,
            "transferred_total": self.transferred_total,
            "requeued_total": self.requeued_total,
            "forced_total": self.forced_total,
        }

    # -- conversations -----------------------------------------------------------------------

    def route(self, conv: int, now_ms: int, group: str | None = None) -> list[Effect]:
        """A conversation asks for a human (created with the bot off, or a handoff).

        Assigned at once when an eligible agent exists, else queued. Raises
        :class:`QueueFull` (it would have to wait and the queue is full) or
        :class:`UnknownGroup`; then nothing changed.
        """
        if conv in self._convs:
            raise ValueError(f"conversation {conv} is already routed")
        self._check_group(group)
        rec = _Routed(group, self.queue.ticket(), now_ms)
        # Under the drain invariant a servable conversation is assigned in the drain below, so
        # the queue's bound is only enforced on one that would really wait.
        self.queue.push(conv, group, now_ms, order=rec.order, force=self._can_serve(group, None))
        self._convs[conv] = rec
        out: list[Effect] = []
        self._drain(out)
        return self._finish(out, (conv,))

    def release(self, conv: int) -> list[Effect]:
        """``conv`` ended (closed or expired): free its agent's slot or its place in line."""
        rec = self._convs.pop(conv, None)
        out: list[Effect] = []
        if rec is None:
            return out
        if rec.agent is None:
            self.queue.discard(conv)
        else:
            self._free_slot(conv, rec.agent)
            rec.agent = None
            self._drain(out)
        return self._finish(out, ())

    def drain(self) -> list[Effect]:
        """Assign queued conversations while an eligible agent can take one.

        Every operation here already drains; this is for a node that changed the router.
        """
        out: list[Effect] = []
        self._drain(out)
        return self._finish(out, ())

    def accept(self, conv: int, agent_id: str) -> list[Effect]:
        """``agent_id`` takes ``conv`` from the queue by hand.

        :class:`NotQueued` if it is not waiting, :class:`AgentUnavailable` if the agent is
        not online and connected with a free slot.
        """
        rec = self._convs.get(conv)
        if rec is None or rec.agent is not None:
            raise NotQueued(f"conversation {conv} is not queued")
        self.pool.get(agent_id)
        if not self._router.acquire(agent_id):
            raise AgentUnavailable(f"agent {agent_id!r} cannot take another conversation now")
        self.queue.discard(conv)
        out: list[Effect] = []
        self._assign(conv, agent_id, rec, out)
        self.accepted_total += 1
        return self._finish(out, ())

    def transfer(
        self,
        conv: int,
        from_agent: str,
        *,
        to_agent: str | None = None,
        to_group: str | None = None,
        force: bool = False,
    ) -> list[Effect]:
        """``from_agent`` hands ``conv`` to an agent or a group (exactly one of the two).

        ``force`` (an admin's transfer to a named agent) overrides the target's capacity and
        away/offline status. Raises :class:`NotAssigned`, :class:`UnknownAgent`,
        :class:`AgentUnavailable`, :class:`UnknownGroup` or :class:`QueueFull`; then nothing
        changed and ``from_agent`` keeps the conversation.
        """
        if (to_agent is None) == (to_group is None):
            raise ValueError("exactly one of to_agent and to_group must be given")
        rec = self._convs.get(conv)
        if rec is None or rec.agent != from_agent:
            raise NotAssigned(f"conversation {conv} is not assigned to {from_agent!r}")
        out: list[Effect] = []
        pushed: tuple[int, ...] = ()
        if to_agent is not None:
            target = self.pool.get(to_agent)
            if to_agent == from_agent:
                raise AgentUnavailable(f"conversation {conv} is already with {to_agent!r}")
            if target.disabled or target.connections == 0:
                raise AgentUnavailable(f"agent {to_agent!r} is not connected")
            over = self._router.load(to_agent) >= target.capacity or not target.available
            if not self._router.acquire(to_agent, force=force):
                raise AgentUnavailable(f"agent {to_agent!r} cannot take another conversation now")
            if over:
                self.forced_total += 1
            self._free_slot(conv, from_agent)
            out.append(Unassign(conv, from_agent))
            self._assign(conv, to_agent, rec, out)
        else:
            assert to_group is not None
            self._check_group(to_group)
            picked = self._pick(to_group, from_agent)
            if picked is None:
                # Raises QueueFull before anything changed: the sender keeps the conversation.
                self.queue.push(conv, to_group, rec.since_ms, order=rec.order, exclude=from_agent)
                pushed = (conv,)
            self._free_slot(conv, from_agent)
            rec.agent = None
            rec.group = to_group
            out.append(Unassign(conv, from_agent))
            if picked is not None:
                self._assign(conv, picked, rec, out)
        self.transferred_total += 1
        self._drain(out)  # the sender's slot is free
        return self._finish(out, pushed)

    def requeue_agent(self, agent_id: str) -> list[Effect]:
        """Put every conversation of ``agent_id`` back in line, each at its arrival place.

        For an agent whose grace ran out (this settles the grace), or one disabled or removed.
        The queue may pass ``max_len`` by the load freed here: these visitors were already
        being served, and refusing them would close conversations nobody asked to close.
        """
        self.pool.end_grace(agent_id)
        held = list(self._by_agent.get(agent_id, ()))
        out: list[Effect] = []
        for conv in held:
            rec = self._convs[conv]
            self._free_slot(conv, agent_id)
            rec.agent = None
            out.append(Requeue(conv, agent_id))
            self.queue.push(conv, rec.group, rec.since_ms, order=rec.order, force=True)
        self.requeued_total += len(held)
        self._drain(out)
        return self._finish(out, held)

    def expire_agents(self, now_ms: int) -> list[Effect]:
        """Requeue the conversations of every agent whose grace ran out by ``now_ms``."""
        out: list[Effect] = []
        for agent_id in self.pool.expired_agents(now_ms):
            out.extend(self.requeue_agent(agent_id))
        return out

    def restore(
        self, conv: int, now_ms: int, *, agent_id: str | None = None, group: str | None = None
    ) -> list[Effect]:
        """Take back a conversation that was routed before a restart.

        Call it in order of arrival (the first to ask for a human first). A conversation
        whose agent still exists and is enabled stays with it, over capacity if need be,
        and the agent's grace starts if it is not connected; it returns no effect. Any other
        goes in line and returns its :class:`Queue`. A group nobody belongs to any more is
        dropped, so that the visitor is served by anyone rather than by nobody.
        """
        if conv in self._convs:
            raise ValueError(f"conversation {conv} is already routed")
        if group is not None and not self.pool.has_group(group):
            group = None
        rec = _Routed(group, self.queue.ticket(), now_ms)
        self._convs[conv] = rec
        if agent_id is not None and agent_id in self.pool and not self.pool.get(agent_id).disabled:
            self._router.acquire(agent_id, force=True)
            rec.agent = agent_id
            self._by_agent.setdefault(agent_id, {})[conv] = None
            self.pool.begin_grace(agent_id, now_ms)
            return []
        self.queue.push(conv, group, now_ms, order=rec.order, force=True)
        return self._finish([], (conv,))

    # -- agents ------------------------------------------------------------------------------

    def agent_connected(self, agent_id: str) -> list[Effect]:
        self.pool.connected(agent_id)
        return self.drain()

    def agent_disconnected(self, agent_id: str, now_ms: int) -> list[Effect]:
        """The grace starts with the last connection; nothing is requeued yet."""
        self.pool.disconnected(agent_id, now_ms)
        return []

    def agent_status(
        self, agent_id: str, status: str, max_chats: int | None = None
    ) -> list[Effect]:
        self.pool.set_status(agent_id, status, max_chats)
        return self.drain()

    def update_agent(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        weight: int | None = None,
        max_chats: int | None = None,
        groups: Iterable[str] | None = None,
        disabled: bool | None = None,
    ) -> list[Effect]:
        """An admin's change; disabling requeues the agent's conversations at once."""
        self.pool.update(
            agent_id,
            name=name,
            weight=weight,
            max_chats=max_chats,
            groups=groups,
            disabled=disabled,
        )
        if disabled:
            return self.requeue_agent(agent_id)
        return self.drain()

    def remove_agent(self, agent_id: str) -> list[Effect]:
        """An admin removes an agent: its conversations are requeued, then it is forgotten."""
        self.pool.get(agent_id)
        self.pool.update(agent_id, disabled=True)  # out of the drain below
        out = self.requeue_agent(agent_id)
        self.pool.remove(agent_id)
        self._by_agent.pop(agent_id, None)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _check_group(self, group: str | None) -> None:
        if group is not None and not self.pool.has_group(group):
            raise UnknownGroup(f"no agent belongs to group {group!r}")

    def _can_serve(self, group: str | None, exclude: str | None) -> bool:
        eligible = self._router.eligible_count(group)
        if eligible == 0:
            return False
        if eligible > 1 or exclude is None:
            return True
        return not self.pool.can_take(exclude, group)

    def _pick(self, group: str | None, exclude: str | None) -> str | None:
        if exclude is None or not self.pool.can_take(exclude, group):
            picked: str | None = self._router.pick(group)
            return picked
        # Out of the candidates for one pick; an offline agent keeps its current weight, so
        # the round-robin state of everyone is as if it had not been eligible this turn.
        self._router.set_online(exclude, False)
        try:
            picked = self._router.pick(group)
        finally:
            self._router.set_online(exclude, True)
        return picked

    def _drain(self, out: list[Effect]) -> None:
        queue = self.queue
        while len(queue):
            best: QueueEntry | None = None
            for head in queue.heads():
                if (best is None or head.order < best.order) and self._can_serve(
                    head.group, head.exclude
                ):
                    best = head
            if best is None:
                return
            agent_id = self._pick(best.group, best.exclude)
            if agent_id is None:  # _can_serve said yes: the router disagrees
                raise AssertionError(f"no agent picked for lane {(best.group, best.exclude)}")
            queue.discard(best.conv)
            self._assign(best.conv, agent_id, self._convs[best.conv], out)

    def _assign(self, conv: int, agent_id: str, rec: _Routed, out: list[Effect]) -> None:
        rec.agent = agent_id
        self._by_agent.setdefault(agent_id, {})[conv] = None
        self.assigned_total += 1
        out.append(Assign(conv, agent_id, rec.group))

    def _free_slot(self, conv: int, agent_id: str) -> None:
        self._router.release(agent_id)
        held = self._by_agent[agent_id]
        del held[conv]
        if not held:
            del self._by_agent[agent_id]

    def _finish(self, out: list[Effect], pushed: Iterable[int]) -> list[Effect]:
        """Append the queue's news: a :class:`Queue` for each conversation this operation
        put in line and that is still there, then the moves of the others."""
        changes = self.queue.pop_changes()
        fresh: set[int] = set()
        for conv in pushed:
            position = self.queue.position(conv)
            if position is not None:
                fresh.add(conv)
                out.append(Queue(conv, position, self._convs[conv].group))
        out.extend(PositionChanged(c, p) for c, p in changes if c not in fresh)
        return out
