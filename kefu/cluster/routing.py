"""The cluster's routing: one agent pool and one waiting queue for every node, kept in Redis.

In cluster mode every node routes through this module instead of a local
:class:`kefu.routing.Routing`. The rules are the same (kefu/routing.py's module doc: available
and eligible agents, grace, queue order by ticket, "oldest servable first" lanes, the queue
always drained, transfers, manual accept) and so is the round-robin (nginx's smooth weighted
round-robin of kefu/_core/_router_py.py, ties to the agent added earliest, a weight change
resets the current weight, an ineligible agent keeps its own): a user sees the same behaviour
with one node or many.

Atomicity
---------
Each method that changes state is **one** ``EVALSHA`` of ``routing.lua`` (one script; its first
argument names the command). Redis runs a script alone, so two nodes never both hand an agent
its last slot and the queue has one order for the cluster. Every check that can refuse a call
runs before the script's first write: a call that raises has changed nothing (the
``queue_full_total`` counter excepted). redis-py reloads the script when Redis answers
``NOSCRIPT`` (a restarted Redis). The settings (``grace_ms``, ``max_queue``, ``max_agents``,
``drain_limit``) travel with every call, so all nodes must be configured alike.

Effects
-------
A changing call returns an :class:`Outcome`: the effects of kefu.routing (:class:`Assign`,
:class:`Queue`, :class:`Unassign`, :class:`Requeue`), in the order the node applies them, as
``Routing`` would return them, with one difference. ``Routing`` also returns a
:class:`~kefu.routing.PositionChanged` for every queued conversation that moved, which is
O(queue) work inside the script on each removal near the head of a long queue. Here
``Outcome.moved_from`` says instead that the conversations at positions ``>= moved_from`` (after
the call) may have moved, or ``None`` when no queued conversation moved; the node asks
:meth:`ClusterRouting.positions` (``ZRANK``, pipelined) for the queued conversations whose
visitors it serves, and tells those whose position differs from the one they were last told.
A conversation queued by the call has its :class:`Queue` effect with its position, as before.

Bounded work
------------
A drain makes at most ``drain_limit`` assignments per call (default 100); each costs
O(lanes + eligible agents of the lane's group) Redis commands. When it stops at the bound with
conversations still queued, ``Outcome.more`` is true and the node calls :meth:`drain` again
(the queue is then drained across calls, each short, rather than in one long script that would
stall Redis for every node). :meth:`expire` requeues at most ``drain_limit`` agents per call,
with ``more`` set likewise. :meth:`stats` and :meth:`snapshot` are O(agents) and O(agents +
routed conversations): for the metrics endpoint and debugging, not the hot path.

A pick is O(eligible agents of the group), as in the local router, but inside Redis, which
serves nobody else meanwhile: the weights are read and written 1,000 agents per command.
Measured round trips (one client, a local redis-server 7.0, a 2-core machine): a route that
assigns took 0.23 ms with 10 eligible agents, 0.5 ms with 100 and 1.8 ms with 1,000 (0.4 ms
with 1,000 agents in 20 groups); a route that queues 0.3 ms; a release that drains one
0.3 to 0.6 ms.

Keys
----
Every key is under ``{prefix}route:`` (``prefix`` default ``kefu:``; "hex" is a conversation
id as 16 lowercase hex digits). The scripts touch keys they derive from the prefix, so the
routing state needs one Redis (or a primary with replicas), not a Redis Cluster.

=======================  ==========  ======================================  =====================
key                      type        holds                                   bound
=======================  ==========  ======================================  =====================
``agents``               sorted set  agent id -> seq (order added)           ``max_agents``
``agent_seq``            string      the last seq given out                  one
``a:{agent}``            hash        max_chats m, chosen c, disabled d,      one per agent
                                     status st, load ld, seq, connections
                                     cn, grace deadline gr, flags av el
``weight``               hash        agent -> weight                         ``max_agents``
``current``              hash        agent -> current weight (SWRR)          ``max_agents``
``ag:{agent}``           set         the agent's groups                      64 per agent
``ac:{agent}``           hash        node -> the agent's connections there   one entry per node
``ah:{agent}``           sorted set  conversations held, in order got        its capacity, plus
                                                                             forced transfers
``g:{group}``            sorted set  the group's members, by seq             ``max_agents``
``ge:{group}``           sorted set  its eligible members, by seq            ``max_agents``
``elig``                 sorted set  eligible agents (free slot), by seq     ``max_agents``
``avail``                sorted set  available agents, by seq                ``max_agents``
``grace``                sorted set  agent -> grace deadline (ms)            ``max_agents``
``n:{node}``             set         agents connected on the node            ``max_agents``
``c:{hex}``              hash        ticket t, since s, group g, agent a,    one per routed
                                     excluded agent x                        conversation (held +
                                                                             queued)
``queue``                sorted set  queued conversation -> ticket           ``max_queue`` (+ the
                                                                             requeued, as in
                                                                             kefu.routing)
``l:{group}\\0{agent}``   sorted set  one lane: its conversations by ticket   the queue's length
``lanes``                set         the lanes that hold a conversation      the queue's length
``ticket``               string      the last ticket given out               one
``assign_seq``           string      the last assignment seq                 one
``counters``             hash        assigned/accepted/transferred/...       six fields
=======================  ==========  ======================================  =====================

The number of group keys is bounded by ``max_agents`` * 64 and that of node sets by the
nodes. Ids (agents, groups, nodes) are 1 to :data:`MAX_NAME_BYTES` UTF-8 bytes without control
characters (a lane name joins two with NUL).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgspec
import redis.asyncio
import redis.exceptions

from kefu._core._router_py import MAX_CAPACITY, MAX_GROUPS_PER_AGENT, MAX_WEIGHT
from kefu.cluster.link import ClusterUnavailable  # one error for "Redis is not there"
from kefu.routing import (
    AGENT_STATUSES,
    DEFAULT_GRACE_MS,
    DEFAULT_MAX_AGENTS,
    DEFAULT_MAX_QUEUE,
    AgentUnavailable,
    Assign,
    Effect,
    NotAssigned,
    NotQueued,
    Queue,
    QueueFull,
    Requeue,
    RoutingError,
    Unassign,
    UnknownAgent,
    UnknownGroup,
)

__all__ = [
    "DEFAULT_DRAIN_LIMIT",
    "MAX_NAME_BYTES",
    "ClusterRouting",
    "ClusterUnavailable",
    "Outcome",
]

DEFAULT_DRAIN_LIMIT: Final = 100
"""Assignments one call makes at most (and agents one :meth:`ClusterRouting.expire` settles)."""
MAX_NAME_BYTES: Final = 128
"""Longest agent id, group name or node name, in UTF-8 bytes."""
MAX_CONNECTIONS: Final = 1_000_000
"""Most connections one node reports for one agent (a sanity bound on a node's report)."""
_MAX_MS: Final = 2**53  # times travel as Lua numbers (doubles): exact below this
_MAX_CONV: Final = 2**64

_SCRIPT: Final = importlib.resources.files("kefu.cluster").joinpath("routing.lua").read_text()

_REDIS_DOWN: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class Outcome(msgspec.Struct, frozen=True):
    """What one call did: the effects to apply, and the queue's news (module doc, "Effects").

    ``moved_from``: the queued conversations at this 1-based position or later may have a
    new position (read them with :meth:`ClusterRouting.positions`); ``None``: none moved.
    ``more``: the drain stopped at its bound; call :meth:`ClusterRouting.drain` again.
    """

    effects: list[Effect]
    moved_from: int | None = None
    more: bool = False


_REFUSALS: Final[dict[str, type[Exception]]] = {
    "queue_full": QueueFull,
    "unknown_group": UnknownGroup,
    "unknown_agent": UnknownAgent,
    "agent_unavailable": AgentUnavailable,
    "not_queued": NotQueued,
    "not_assigned": NotAssigned,
    # kefu.routing raises ValueError for these two: a caller's mistake, not a refusal.
    "already_routed": ValueError,
    "too_many_agents": ValueError,
}


# ---------------------------------------------------------------------------------------------
# Argument checks: bad input never reaches Redis.


def conv_key(conv: int) -> str:
    """A conversation id as the scripts spell it: 16 lowercase hex digits."""
    if isinstance(conv, bool) or not isinstance(conv, int) or not 0 <= conv < _MAX_CONV:
        raise ValueError(f"a conversation id is an int in [0, 2**64), got {conv!r}")
    return f"{conv:016x}"


def _name(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value or len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{what} must be 1 to {MAX_NAME_BYTES} UTF-8 bytes, got {value!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{what} must not hold control characters, got {value!r}")
    return value


def _count(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value


def _ms(value: object) -> int:
    return _count("now_ms", value, 0, _MAX_MS - 1)


def _groups(groups: Iterable[str]) -> list[str]:
    if isinstance(groups, (str, bytes)):  # "sales" would become the groups s, a, l, e
        raise TypeError("groups must be an iterable of names, not a single string")
    names = sorted({_name("group", g) for g in groups})
    if len(names) > MAX_GROUPS_PER_AGENT:
        raise ValueError(f"an agent belongs to at most {MAX_GROUPS_PER_AGENT} groups")
    return names


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _list(value: Any) -> list[Any]:
    # Redis's cjson writes an empty Lua table as {}: it is an empty list here.
    return value if isinstance(value, list) else []


def _effect(row: list[Any]) -> Effect:
    kind, conv = row[0], int(row[1], 16)
    if kind == "A":
        return Assign(conv, row[2], row[3])
    if kind == "Q":
        return Queue(conv, int(row[2]), row[3])
    if kind == "U":
        return Unassign(conv, row[2])
    if kind == "R":
        return Requeue(conv, row[2])
    raise AssertionError(f"unknown effect {row!r} from the routing script")


# ---------------------------------------------------------------------------------------------


class ClusterRouting:
    """Routing decisions over the agent pool and the waiting queue that Redis holds.

    ``client`` is the node's ``redis.asyncio.Redis``; ``prefix`` the cluster's key prefix.
    Methods raise kefu.routing's errors as :class:`~kefu.routing.Routing` does (then nothing
    changed) and :class:`ClusterUnavailable` when Redis cannot be reached (then the call may or
    may not have run: a node that retries must tolerate either, as ``release`` does).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str = "kefu:",
        *,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_agents: int = DEFAULT_MAX_AGENTS,
        drain_limit: int = DEFAULT_DRAIN_LIMIT,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.grace_ms = _count("grace_ms", grace_ms, 0, 86_400_000)
        self.max_queue = _count("max_queue", max_queue, 1, 1_000_000)
        self.max_agents = _count("max_agents", max_agents, 1, 1_000_000)
        self.drain_limit = _count("drain_limit", drain_limit, 1, 100_000)
        self._keys = prefix + "route:"
        self._script = client.register_script(_SCRIPT)
        self._settings = (prefix, self.grace_ms, self.max_queue, self.max_agents, self.drain_limit)

    # -- the script --------------------------------------------------------------------------

    async def _run(self, command: str, *args: str | int) -> dict[str, Any]:
        try:
            raw = await self._script(args=(command, *self._settings, *args))
        except _REDIS_DOWN as exc:
            raise ClusterUnavailable(f"redis is unreachable: {exc}") from exc
        reply: dict[str, Any] = msgspec.json.decode(raw)
        code = reply.get("err")
        if code is not None:
            raise _REFUSALS.get(code, RoutingError)(reply.get("msg", code))
        return reply

    async def _outcome(self, command: str, *args: str | int) -> Outcome:
        reply = await self._run(command, *args)
        moved = reply.get("m")
        return Outcome(
            [_effect(row) for row in _list(reply.get("e"))],
            None if moved is None else int(moved) + 1,
            bool(reply.get("more")),
        )

    async def _read(self, coro: Any) -> Any:
        try:
            return await coro
        except _REDIS_DOWN as exc:
            raise ClusterUnavailable(f"redis is unreachable: {exc}") from exc

    # -- agents ------------------------------------------------------------------------------

    async def upsert_agent(
        self,
        agent_id: str,
        *,
        weight: int = 1,
        max_chats: int = 5,
        groups: Iterable[str] = (),
        disabled: bool = False,
    ) -> Outcome:
        """An admin's settings. A new agent starts offline, unconnected, load 0; an existing one
        keeps its load, status, connections and current weight (reset if the weight changed).
        Disabling requeues its conversations. ValueError beyond ``max_agents``."""
        _name("agent_id", agent_id)
        _count("weight", weight, 1, MAX_WEIGHT)
        _count("max_chats", max_chats, 0, MAX_CAPACITY)
        names = _groups(groups)
        return await self._outcome(
            "upsert", agent_id, weight, max_chats, "1" if disabled else "0", *names
        )

    async def agent_state(
        self,
        agent_id: str,
        *,
        node: str,
        status: str,
        connections: int,
        chosen_max_chats: int | None = None,
        now_ms: int | None = None,
    ) -> Outcome:
        """What ``node`` reports of the agent: its status and its connections on that node.

        Any connection in the cluster ends a grace. With ``now_ms``, the grace starts here when
        no connection is left anywhere (else :meth:`disconnected` starts it). ``chosen_max_chats``
        is the agent's own capacity, held to the admin's ``max_chats``.
        """
        _name("agent_id", agent_id)
        _name("node", node)
        if status not in AGENT_STATUSES:
            raise ValueError(f"status must be one of {sorted(AGENT_STATUSES)}, got {status!r}")
        _count("connections", connections, 0, MAX_CONNECTIONS)
        chosen = (
            ""
            if chosen_max_chats is None
            else _count("max_chats", chosen_max_chats, 0, MAX_CAPACITY)
        )
        now = "" if now_ms is None else _ms(now_ms)
        return await self._outcome("state", agent_id, node, status, connections, chosen, now)

    async def disconnected(self, agent_id: str, now_ms: int) -> Outcome:
        """Start the agent's grace if it has no connection on any node and none runs."""
        _name("agent_id", agent_id)
        return await self._outcome("disconnected", agent_id, _ms(now_ms))

    async def drop_node(self, node: str, now_ms: int | None = None) -> list[str]:
        """Forget every connection of a dead node; return the agents left with none, sorted.

        With ``now_ms`` their grace starts in the same call; without it, call
        :meth:`disconnected` for each.
        """
        _name("node", node)
        reply = await self._run("drop_node", node, "" if now_ms is None else _ms(now_ms))
        return [str(a) for a in _list(reply.get("r"))]

    async def expire(self, now_ms: int) -> Outcome:
        """Requeue the conversations of the agents whose grace ran out by ``now_ms`` (earliest
        deadline first; at most ``drain_limit`` agents, ``more`` when others are due)."""
        return await self._outcome("expire", _ms(now_ms))

    async def requeue_agent(self, agent_id: str) -> Outcome:
        """Put the agent's conversations back in line at their arrival places, then drain."""
        return await self._outcome("requeue", _name("agent_id", agent_id))

    async def remove_agent(self, agent_id: str) -> Outcome:
        """Requeue the agent's conversations, then forget it."""
        return await self._outcome("remove", _name("agent_id", agent_id))

    # -- conversations -----------------------------------------------------------------------

    async def route(self, conv: int, now_ms: int, group: str | None = None) -> Outcome:
        """A conversation asks for a human: assigned when an agent is eligible, else queued.

        Raises QueueFull, UnknownGroup, or ValueError if it is already routed.
        """
        key = conv_key(conv)
        return await self._outcome(
            "route", key, _ms(now_ms), "" if group is None else _name("group", group)
        )

    async def restore(
        self, conv: int, now_ms: int, *, agent_id: str | None = None, group: str | None = None
    ) -> Outcome:
        """Take back a conversation the cluster's routing lost (Redis restarted without its
        data), as :meth:`kefu.routing.Routing.restore` does after a node's restart: back to
        ``agent_id`` if that agent exists and is enabled (no effect), else in line. Raises
        ValueError if it is routed already."""
        return await self._outcome(
            "restore",
            conv_key(conv),
            _ms(now_ms),
            "" if group is None else _name("group", group),
            "" if agent_id is None else _name("agent_id", agent_id),
        )

    async def release(self, conv: int) -> Outcome:
        """The conversation ended or left: free its agent's slot or its place in line."""
        return await self._outcome("release", conv_key(conv))

    async def accept(self, conv: int, agent_id: str) -> Outcome:
        """``agent_id`` takes a queued conversation by hand (NotQueued, AgentUnavailable)."""
        return await self._outcome("accept", conv_key(conv), _name("agent_id", agent_id))

    async def transfer(
        self,
        conv: int,
        from_agent: str,
        to_agent: str | None = None,
        to_group: str | None = None,
        force: bool = False,
    ) -> Outcome:
        """As :meth:`kefu.routing.Routing.transfer`: to an agent or to a group."""
        if (to_agent is None) == (to_group is None):
            raise ValueError("exactly one of to_agent and to_group must be given")
        return await self._outcome(
            "transfer",
            conv_key(conv),
            _name("from_agent", from_agent),
            "" if to_agent is None else _name("to_agent", to_agent),
            "" if to_group is None else _name("to_group", to_group),
            "1" if force else "0",
        )

    async def drain(self) -> Outcome:
        """Assign queued conversations while an eligible agent can take one (after ``more``)."""
        return await self._outcome("drain")

    # -- queries (one command or one pipeline each) ------------------------------------------

    async def assigned_to(self, conv: int) -> str | None:
        agent = await self._read(self.client.hget(self._keys + "c:" + conv_key(conv), "a"))
        return None if agent is None else _text(agent)

    async def conversations_of(self, agent_id: str) -> list[int]:
        """The conversations the agent holds, in the order it got them."""
        key = self._keys + "ah:" + _name("agent_id", agent_id)
        return [int(_text(h), 16) for h in await self._read(self.client.zrange(key, 0, -1))]

    async def load(self, agent_id: str) -> int:
        """Conversations the agent holds now (UnknownAgent if there is no such agent)."""
        key = self._keys + "a:" + _name("agent_id", agent_id)
        load = await self._read(self.client.hget(key, "ld"))
        if load is None:
            raise UnknownAgent(f"no agent {agent_id!r}")
        return int(load)

    async def position(self, conv: int) -> int | None:
        """1-based place in the cluster's queue; None when not queued."""
        return (await self.positions((conv,)))[0]

    async def positions(self, convs: Sequence[int]) -> list[int | None]:
        """The places of many conversations, in one round trip (ZRANK each, pipelined)."""
        keys = [conv_key(c) for c in convs]
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zrank(self._keys + "queue", key)
        ranks = await self._read(pipe.execute())
        return [None if r is None else int(r) + 1 for r in ranks]

    async def stats(self, now_ms: int) -> dict[str, int]:
        """Gauges and counters, the same names as :meth:`kefu.routing.Routing.stats`."""
        reply = await self._run("stats", _ms(now_ms))
        return {str(k): int(v) for k, v in reply["r"].items()}

    async def snapshot(self) -> dict[str, Any]:
        """Everything the routing state holds, for debugging: agents and the queue in order."""
        reply = await self._run("snapshot")
        state: dict[str, Any] = reply["r"]
        agents = []
        for agent in _list(state.get("agents")):
            conns = _list(agent.get("connections"))
            agent["connections"] = {conns[i]: int(conns[i + 1]) for i in range(0, len(conns), 2)}
            agent["groups"] = sorted(_list(agent.get("groups")))
            agent["held"] = [int(h, 16) for h in _list(agent.get("held"))]
            agents.append(agent)
        queue = [
            {"conv": int(c, 16), "ticket": int(t), "since_ms": int(s), "group": g, "exclude": x}
            for c, t, s, g, x in _list(state.get("queue"))
        ]
        return {"agents": agents, "queue": queue, "lanes": int(state.get("lanes", 0))}
