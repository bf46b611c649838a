"""A node's membership of a cluster: what ``kefu.node.Node`` does through Redis.

The node keeps running as it does alone; this object adds, when ``cluster.redis_url`` is set,
the link (:mod:`kefu.cluster.link`), the bus between nodes (:mod:`kefu.cluster.bus`) and the
cluster's identity: the node's name, its index (carried by the ids of the conversations it
creates, so the owner of a conversation is known from its id) and the token secret every node
of the cluster signs with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import msgspec

from kefu.cluster.bus import Bus
from kefu.cluster.link import MAX_NODE_INDEX, ClusterUnavailable, Link, new_node_id
from kefu.cluster.routing import ClusterRouting, Outcome
from kefu.config import ClusterConfig
from kefu.errors import KefuError
from kefu.hub import Encoded, Principal, frame_tag
from kefu.metrics import CollectedFamily, Kind
from kefu.protocol import (
    AdminStats,
    AgentConversation,
    AgentConversations,
    AgentPresence,
    AgentStatus,
    ClientFrame,
    ClusterFigures,
    ConvState,
    Error,
    NodeFigures,
    Presence,
    WaitingConversation,
    decode_client_frame,
    encode_msgpack,
)
from kefu.routing import Assign, Effect, PositionChanged, Queue, Requeue, Unassign

if TYPE_CHECKING:
    from kefu.node import Node
    from kefu.store import Store
    from kefu.web.ws import Connection

__all__ = ["CONV_INDEX_SHIFT", "MAX_STATS_NODES", "NODE_META", "Member", "owner_index"]

log = logging.getLogger(__name__)

#: The local meta key that keeps the node's name across restarts.
NODE_META: Final = "cluster_node"
#: Conversations this node, as their owner, sends frames to other nodes for; past it a node's
#: attach is refused (``cluster_unavailable``) and its clients retry.
MAX_WATCHED: Final = 1_000_000
#: Frames a connection may be sent in one reply of the owner (a resume's replay is at most
#: RESUME_MAX messages plus its status frames).
MAX_REPLY_FRAMES: Final = 1_000
#: WebSocket close code for connections whose remote owner restarted or whose Redis came back
#: (events may have been lost meanwhile): the client reconnects and resumes.
CLOSE_SERVICE_RESTART: Final = 1012
#: Drain calls one routing change may chain (each assigns up to the script's drain_limit).
MAX_DRAIN_ROUNDS: Final = 100
#: Queued conversations whose position one refresh reads.
MAX_POSITION_READ: Final = 10_000
#: Routing calls running in the background at once.
MAX_BACKGROUND: Final = 10_000
#: Tries of one agent report the cluster refused as unreachable, a heartbeat apart: right
#: after Redis comes back, a pooled connection that died with it fails once more, and the
#: close of a connection reported then (the 1012 of the followers) must still reach Redis.
REPORT_ATTEMPTS: Final = 5
#: Nodes one ``GET /v1/admin/stats`` lists (this node, the live ones, then the others the
#: cluster knows, the latest first); only the live ones are asked for their figures.
MAX_STATS_NODES: Final = 64
#: Conversation ids of a cluster node: ``index << CONV_INDEX_SHIFT | 47 random bits`` (63 bits
#: in all, as a single node's ids).
CONV_INDEX_SHIFT: Final = 47


def owner_index(conv: int) -> int:
    """The index of the node that created (and owns) conversation ``conv``."""
    return (conv >> CONV_INDEX_SHIFT) & MAX_NODE_INDEX


class Member:
    """The cluster side of one node (module doc)."""

    def __init__(
        self,
        config: ClusterConfig,
        store: Store,
        *,
        grace_ms: int = 60_000,
        max_queue: int = 10_000,
    ) -> None:
        if config.redis_url is None:
            raise ValueError("a cluster member needs cluster.redis_url")
        self.config = config
        self.store = store
        node_id = config.node_id
        if node_id is None:
            held = store.get_meta(NODE_META)
            node_id = held.decode() if held is not None else new_node_id()
        self.node_id = node_id
        self.link = Link(
            config.redis_url,
            node_id,
            prefix=config.key_prefix,
            heartbeat_s=config.heartbeat_s,
            node_timeout_s=config.node_timeout_s,
        )
        self.bus = Bus(self.link, timeout_s=config.request_timeout_s)
        #: Node index -> node id, for owners of conversations (filled from Redis on demand).
        self._names: dict[int, str] = {}
        self.node: Node | None = None
        # Owner side: the other nodes that have a participant of a conversation connected.
        self._watchers: dict[int, set[str]] = {}
        # Non-owner side: the local connections of a remote conversation whose attach is not
        # answered yet (no live frame of it for them until the replay), and, by owner, the
        # connections that follow a conversation of that owner.
        self._attaching: dict[int, set[Connection]] = {}
        self._following: dict[str, set[Connection]] = {}
        self._followed: dict[Connection, set[str]] = {}
        self.forwarded_total = 0
        self.lag_seconds_total = 0.0
        self.lag_events_total = 0
        self.lag_max = 0.0
        self.fanned_out_total = 0
        self.fan_out_dropped_total = 0
        self.detached_total = 0
        self.restart_closes_total = 0
        self.link.on_node_gone = self._node_gone
        self.link.on_reconnect = self._reconnected
        self.link.on_node_dead = self._reap
        self.bus.on_resubscribed = self._resubscribed
        self._reconnecting = False
        self._grace_ms = grace_ms
        self._max_queue = max_queue
        self._routing: ClusterRouting | None = None
        #: Queue positions of the queued conversations owned here, as last told their visitors.
        self.positions: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporting: set[str] = set()
        self._report_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._dirty: set[str] = set()
        self.routing_failures_total = 0
        self.report_retries_total = 0

    def bind(self, node: Node) -> None:
        """Serve the other nodes' calls with ``node`` (before :meth:`start`)."""
        self.node = node
        bus = self.bus
        bus.on_request("rest", self._serve_rest)
        bus.on_request("agent_view", self._serve_agent_view)
        bus.on_event("presence", self._on_presence)
        bus.on_event("effects", self._on_effects)
        bus.on_event("moved", self._on_moved)
        bus.on_request("frame", self._serve_frame)
        bus.on_request("attach", self._serve_attach)
        bus.on_request("describe", self._serve_describe)
        bus.on_request("stats", self._serve_stats)
        bus.on_event("f", self._on_frames)
        bus.on_event("detach", self._on_detach)
        bus.on_event("started", self._on_started)
        bus.on_event("agent", self._on_agent)

    async def start(self, *, ws_url: str | None, http_url: str | None) -> None:
        """Join: keep the node's name, take its index, listen on its channel. Raises
        ClusterUnavailable when Redis cannot be reached."""
        if self.store.get_meta(NODE_META) != self.node_id.encode():
            await self.store.put_meta(NODE_META, self.node_id.encode())
        await self.link.start(ws_url=ws_url, http_url=http_url)
        self._routing = ClusterRouting(
            self.link.redis,
            self.config.key_prefix,
            grace_ms=self._grace_ms,
            max_queue=self._max_queue,
        )
        try:
            await self.bus.start()
        except BaseException:
            await self.link.stop()
            raise
        self._names[self.link.index] = self.node_id
        for other in self.link.live_nodes:
            if other != self.node_id:
                # Whatever they follow of this node's conversations is gone with its memory.
                self.bus.emit(other, "started", self.node_id)
        log.info(
            "cluster: joined as node %s (index %d) through %s",
            self.node_id,
            self.link.index,
            self.link.key(""),
        )

    @property
    def routing(self) -> ClusterRouting:
        if self._routing is None:
            raise ClusterUnavailable("the cluster link is not started")
        return self._routing

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.bus.stop()
        await self.link.stop()

    @property
    def index(self) -> int:
        return self.link.index

    def new_conversation_id(self) -> int:
        """A random id whose top bits name this node (``owner_index``)."""
        return (self.link.index << CONV_INDEX_SHIFT) | secrets.randbits(CONV_INDEX_SHIFT)

    def is_local(self, conv: int) -> bool:
        return owner_index(conv) == self.link.index

    async def owner_of(self, conv: int) -> str:
        """The name of the node that owns ``conv``."""
        index = owner_index(conv)
        name = self._names.get(index)
        if name is not None:
            return name

        async def lookup(r: Any) -> dict[bytes, bytes]:
            return dict(await r.hgetall(self.link.key("node_ids")))

        for raw_name, raw_index in (await self.link.call(lookup)).items():
            if len(self._names) < MAX_NODE_INDEX:
                self._names[int(raw_index)] = raw_name.decode()
        name = self._names.get(index)
        if name is None:
            raise ClusterUnavailable(f"no node has index {index}")
        return name

    async def shared_secret(self, local: bytes) -> bytes:
        """The secret every node of the cluster signs tokens with: the first node's own
        secret, stored once in Redis (``SET NX``); later nodes adopt it."""
        key = self.link.key("secret")

        async def agree(r: Any) -> bytes:
            await r.set(key, local, nx=True)
            value: bytes = await r.get(key)
            return value

        return await self.link.call(agree)

    # -- routing: decisions in Redis, effects applied by each conversation's owner -----------

    async def routed(self, call: Awaitable[Outcome]) -> list[Effect]:
        """Run a routing call (kefu.cluster.routing); return the effects for conversations
        owned here, for the caller to apply as a local routing's. The others go to their
        owners, with the nodes of each newly assigned agent, which then follow the
        conversation. Raises what the call raises (nothing changed) or ClusterUnavailable."""
        outcome = await call
        effects = list(outcome.effects)
        moved = outcome.moved_from
        rounds = 0
        while outcome.more and rounds < MAX_DRAIN_ROUNDS:
            rounds += 1
            outcome = await self.routing.drain()
            effects += outcome.effects
            if outcome.moved_from is not None:
                moved = outcome.moved_from if moved is None else min(moved, outcome.moved_from)
        agents = sorted({e.agent_id for e in effects if isinstance(e, Assign)})
        nodes_of = await self.agent_nodes(agents) if agents else {}
        local: list[Effect] = []
        remote: dict[str, list[Effect]] = {}
        for effect in effects:
            if self.is_local(effect.conv):
                local.append(effect)
            else:
                remote.setdefault(await self.owner_of(effect.conv), []).append(effect)
        for owner, owned in remote.items():
            body = ([_effect_row(e) for e in owned], nodes_of)
            try:
                self.bus.emit(owner, "effects", body)
            except ClusterUnavailable:
                self.routing_failures_total += 1
                log.error("cluster: effects for node %s not sent: %s", owner, owned)
        self._follow_assigned(local, nodes_of)
        if moved is not None:
            for other in self.link.live_nodes:
                if other != self.node_id:
                    with contextlib.suppress(ClusterUnavailable):
                        self.bus.emit(other, "moved", moved)
            self.refresh_positions()
        return local

    def _follow_assigned(self, effects: list[Effect], nodes_of: dict[str, list[str]]) -> None:
        """The nodes of an agent who gets a conversation follow it from now on; queue
        positions are noted for the visitors."""
        positions = self.positions
        for effect in effects:
            if isinstance(effect, Assign):
                positions.pop(effect.conv, None)
                for node in nodes_of.get(effect.agent_id, ()):
                    with contextlib.suppress(ClusterUnavailable):
                        self.watch(effect.conv, node)
            elif isinstance(effect, (Queue, PositionChanged)):
                positions[effect.conv] = effect.position

    def _on_effects(self, sender: str, body: Any) -> None:
        rows, nodes_of = body
        effects = [_row_effect(row) for row in rows]
        effects = [e for e in effects if self.is_local(e.conv)]
        self._follow_assigned(effects, nodes_of)
        node = cast("Node", self.node)
        node._run_effects(effects)

    async def agent_nodes(self, agents: list[str]) -> dict[str, list[str]]:
        """The nodes where each agent has a connection (kefu.cluster.routing's ``ac:``)."""
        keys = [f"{self.config.key_prefix}route:ac:{a}" for a in agents]

        async def read(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.hkeys(key)
            return list(await pipe.execute())

        found = await self.link.call(read)
        return {a: [n.decode() for n in nodes] for a, nodes in zip(agents, found, strict=True)}

    def _on_moved(self, sender: str, body: Any) -> None:
        self.refresh_positions()

    def refresh_positions(self) -> None:
        """Queue positions may have moved: read those of the queued conversations owned here
        and tell each visitor whose position changed (in the background)."""
        if self.positions:
            self.spawn(self._refresh_positions(), "queue positions")

    async def _refresh_positions(self) -> None:
        convs = list(self.positions)[:MAX_POSITION_READ]
        ranks = await self.routing.positions(convs)
        effects: list[Effect] = []
        for conv, rank in zip(convs, ranks, strict=True):
            if rank is None:
                continue  # assigned meanwhile: its Assign says so
            if self.positions.get(conv) != rank:
                self.positions[conv] = rank
                effects.append(PositionChanged(conv, rank))
        if effects:
            cast("Node", self.node)._notify(effects)

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``coro`` in the background (a routing change from a synchronous path); its
        ClusterUnavailable or refusal is logged and counted."""
        if len(self._tasks) >= MAX_BACKGROUND:
            self.routing_failures_total += 1
            log.error("cluster: %s dropped: %d background calls already", what, MAX_BACKGROUND)
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except KefuError as exc:
                self.routing_failures_total += 1
                log.warning("cluster: %s failed: %s", what, exc)
            except Exception:
                self.routing_failures_total += 1
                log.exception("cluster: %s failed", what)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before it ran (stop) never starts ``coro``: close it, quietly.
        task.add_done_callback(lambda _t: coro.close())

    def apply_later(self, call: Awaitable[Outcome], what: str) -> None:
        """``routed(call)`` in the background, its local effects applied when it answers."""

        async def run() -> None:
            effects = await self.routed(call)
            if effects:
                cast("Node", self.node)._run_effects(effects)

        self.spawn(run(), what)

    def report_agent(self, agent_id: str) -> asyncio.Future[None]:
        """The agent's status or connections here changed: tell the cluster's routing. One
        report in flight per agent, always of the latest state, so reports cannot overtake
        each other on their way to Redis. The future resolves once a report made after this
        call is answered (an error is logged, not raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._report_waiters.setdefault(agent_id, [])
        if len(waiting) < MAX_BACKGROUND:
            waiting.append(done)
        else:
            done.set_result(None)
        if agent_id in self._reporting:
            self._dirty.add(agent_id)
            return done
        self._reporting.add(agent_id)
        self.spawn(self._report(agent_id), f"the state of agent {agent_id}")
        return done

    async def _report(self, agent_id: str) -> None:
        node = cast("Node", self.node)
        try:
            while True:
                self._dirty.discard(agent_id)
                waiting = self._report_waiters.pop(agent_id, [])
                try:
                    if agent_id not in node.pool:
                        return
                    effects = await self._report_state(agent_id)
                    if effects:
                        node._run_effects(effects)
                    # Now that Redis has it: every agent of the cluster sees it.
                    self.presence_changed([agent_id])
                finally:
                    for fut in waiting:
                        if not fut.done():
                            fut.set_result(None)
                if agent_id not in self._dirty:
                    return
        finally:
            self._reporting.discard(agent_id)
            for fut in self._report_waiters.pop(agent_id, []):
                if not fut.done():
                    fut.set_result(None)

    async def _report_state(self, agent_id: str) -> list[Effect]:
        """The agent's latest state to the cluster's routing; tried again a heartbeat later
        while Redis cannot be reached, :data:`REPORT_ATTEMPTS` times in all (the state is
        read anew for each try). Raises the last ClusterUnavailable."""
        node = cast("Node", self.node)
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            agent = node.pool.get(agent_id)
            try:
                return await self.routed(
                    self.routing.agent_state(
                        agent_id,
                        node=self.node_id,
                        status=agent.status,
                        connections=agent.connections,
                        chosen_max_chats=agent.chosen_max_chats,
                        now_ms=_now_ms(),
                    )
                )
            except ClusterUnavailable:
                if attempt == REPORT_ATTEMPTS:
                    raise
                self.report_retries_total += 1
                await asyncio.sleep(self.config.heartbeat_s)
                if agent_id not in node.pool:
                    return []
        raise AssertionError("unreachable")  # pragma: no cover

    # -- presence: what every agent sees of the others ----------------------------------------

    async def presence(self, agents: list[str]) -> list[AgentPresence]:
        """The agents' presence as the cluster's routing has it: online somewhere, and the
        conversations they hold on every node."""
        prefix = f"{self.config.key_prefix}route:a:"

        async def read(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for agent_id in agents:
                pipe.hmget(prefix + agent_id, "st", "cn", "d", "ld")
            return list(await pipe.execute())

        out: list[AgentPresence] = []
        for agent_id, (status, connections, disabled, load) in zip(
            agents, await self.link.call(read), strict=True
        ):
            if status is None:
                continue
            live = int(connections or 0) > 0 and disabled != b"1"
            out.append(
                AgentPresence(
                    id=agent_id,
                    status=cast("AgentStatus", status.decode()) if live else "offline",
                    active_chats=int(load or 0),
                )
            )
        return out

    def presence_changed(self, agents: list[str]) -> None:
        """Tell every agent of the cluster the new presence of ``agents`` (read from Redis,
        then sent here and to every other node), in the background."""
        self.spawn(self._publish_presence(agents), "presence")

    async def _publish_presence(self, agents: list[str]) -> None:
        frames = [encode_msgpack(Presence(agent=p)) for p in await self.presence(agents)]
        if not frames:
            return
        self._on_presence(self.node_id, frames)
        for other in self.link.live_nodes:
            if other != self.node_id:
                with contextlib.suppress(ClusterUnavailable):
                    self.bus.emit(other, "presence", frames)

    def _on_presence(self, sender: str, frames: list[bytes]) -> None:
        hub = cast("Node", self.node).hub
        hub.send_role("agent", [Encoded.from_msgpack(f, "presence") for f in frames])

    async def send_presence(self, conn: Connection, agents: list[str]) -> None:
        """Every agent's presence to a new agent connection."""
        for chunk in range(0, len(agents), 500):
            for p in await self.presence(agents[chunk : chunk + 500]):
                conn.send(Presence(agent=p))

    async def _reap(self, node: str) -> None:
        """A node died: its agents' connections there are gone (their grace starts)."""
        now_ms = _now_ms()
        await self.routing.drop_node(node, now_ms)

    # -- owner side: the conversations this node owns ------------------------------------------

    def watch(self, conv: int, node: str) -> None:
        """``node`` has a participant of ``conv`` connected: send it ``conv``'s frames."""
        if node == self.node_id:
            return
        nodes = self._watchers.get(conv)
        if nodes is None:
            if len(self._watchers) >= MAX_WATCHED:
                raise ClusterUnavailable("this node follows too many conversations for others")
            nodes = self._watchers[conv] = set()
        nodes.add(node)

    def fan_out(
        self,
        conv: int,
        keys: list[Principal],
        frame: object,
        skip: Principal | None,
        participants: list[Principal],
    ) -> None:
        """``frame`` for ``keys`` to every node that follows ``conv`` (after the local
        delivery; Pub/Sub may drop it, a resume recovers it)."""
        nodes = self._watchers.get(conv)
        if not nodes:
            return
        encoded = frame if isinstance(frame, Encoded) else Encoded(frame)
        body = (conv, keys, skip, encoded.kind, encoded.msgpack(), participants, time.time())
        self.fanned_out_total += 1
        for node in list(nodes):
            try:
                self.bus.emit(node, "f", body)
            except ClusterUnavailable:
                self.fan_out_dropped_total += 1

    def followed(self, conv: int) -> bool:
        return conv in self._watchers

    def _on_detach(self, sender: str, conv: int) -> None:
        nodes = self._watchers.get(conv)
        if nodes is not None:
            nodes.discard(sender)
            if not nodes:
                del self._watchers[conv]

    async def _serve_frame(self, sender: str, body: Any) -> list[tuple[str, bytes]]:
        """A command of a client connected to ``sender``, for a conversation owned here."""
        node = cast("Node", self.node)
        role, principal, raw = body
        frame = decode_client_frame(raw, msgpack=True)
        out = _Collector(role, principal)
        key = (role, principal)
        try:
            state = node._visible(getattr(frame, "conv", ""), role, principal)
            self.watch(state.id, sender)
        except KefuError as exc:
            out.send(Error(code=exc.code, message=str(exc), ref=_ref(frame)))
            return out.frames
        await node.handle_frame(cast("Connection", out), key, frame)
        return out.frames

    async def _serve_attach(self, sender: str, body: Any) -> list[Any]:
        """A connection on ``sender`` follows conversations owned here: their states, the
        replay of each resume point, the visitor's status; ``sender`` follows them from this
        step on (no await in between, as a local resume)."""
        node = cast("Node", self.node)
        role, principal, points = body
        out = _Collector(role, principal)
        states: list[bytes] = []
        for conv_hex, epoch, last in points[:MAX_REPLY_FRAMES]:
            try:
                state = node._visible(conv_hex, role, principal)
                self.watch(state.id, sender)
            except KefuError as exc:
                out.send(Error(code=exc.code, message=str(exc), ref="hello"))
                continue
            cs = node._conv_state(state.id)
            if cs is not None:
                states.append(encode_msgpack(cs))
            if epoch is not None:
                node._resume(cast("Connection", out), state, epoch, last)
            if role == "visitor":
                node._visitor_status(cast("Connection", out), state)
        return [states, out.frames]

    async def call_owner(self, conv: int, op: str, args: tuple[Any, ...]) -> Any:
        """A REST call about ``conv``, answered by its owner (send, close, history)."""
        owner = await self.owner_of(conv)
        self.forwarded_total += 1
        return await self.bus.request(owner, "rest", (op, *args))

    async def _serve_rest(self, sender: str, body: Any) -> Any:
        node = cast("Node", self.node)
        op, *args = body
        if op == "send":
            session_id, text, client_msg_id, role, principal = args
            result = await node.send_message(
                session_id, text, client_msg_id, role=role, principal=principal
            )
            return encode_msgpack(result)
        if op == "close":
            session_id, by, principal = args
            await node.close_chat(session_id, by=by, principal=principal)
            return None
        if op == "history":
            session_id, after, limit, role, principal = args
            page = node.history(session_id, after, limit, role=role, principal=principal)
            return encode_msgpack(page)
        raise ValueError(f"unknown call {op!r}")

    async def queue_head(self, count: int) -> list[int]:
        """The first ``count`` conversations of the cluster's queue, in order."""
        key = f"{self.config.key_prefix}route:queue"

        async def read(r: Any) -> list[Any]:
            return list(await r.zrange(key, 0, count - 1))

        return [int(raw, 16) for raw in await self.link.call(read)]

    async def describe_for_agent(
        self, agent_id: str, held: list[int], head: list[int]
    ) -> AgentConversations:
        """``GET /v1/agent/conversations`` in a cluster: each owner describes its own."""
        by_owner: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        for conv in held:
            by_owner.setdefault(await self.owner_of(conv), ([], []))[0].append(conv)
        for position, conv in enumerate(head, start=1):
            by_owner.setdefault(await self.owner_of(conv), ([], []))[1].append((conv, position))
        mine: list[AgentConversation] = []
        waiting: list[WaitingConversation] = []
        for owner, (convs, queued) in by_owner.items():
            if owner == self.node_id:
                part = self._describe_here(agent_id, convs, queued)
            else:
                try:
                    raw = await self.bus.request(owner, "agent_view", (agent_id, convs, queued))
                except KefuError as exc:
                    log.warning(
                        "cluster: node %s did not describe its conversations: %s", owner, exc
                    )
                    continue  # that node is away: its conversations are left out meanwhile
                part = msgspec.msgpack.decode(raw, type=AgentConversations)
            mine += part.conversations
            waiting += part.queue
        mine.sort(key=lambda c: held.index(int(c.session_id, 16)))
        waiting.sort(key=lambda w: w.position)
        return AgentConversations(conversations=mine, queue=waiting)

    def _describe_here(
        self, agent_id: str, convs: list[int], queued: list[tuple[int, int]]
    ) -> AgentConversations:
        node = cast("Node", self.node)
        mine = [node._agent_conversation(agent_id, c) for c in convs[:MAX_REPLY_FRAMES]]
        waiting = [node._waiting_conversation(c, p) for c, p in queued[:MAX_REPLY_FRAMES]]
        return AgentConversations(
            conversations=[c for c in mine if c is not None],
            queue=[w for w in waiting if w is not None],
        )

    async def _serve_agent_view(self, sender: str, body: Any) -> bytes:
        agent_id, convs, queued = body
        return encode_msgpack(
            self._describe_here(agent_id, list(convs), [(c, p) for c, p in queued])
        )

    async def _serve_describe(self, sender: str, body: Any) -> bytes | None:
        node = cast("Node", self.node)
        role, principal, conv_hex = body
        state = node._visible(conv_hex, role, principal)
        cs = node._conv_state(state.id)
        return None if cs is None else encode_msgpack(cs)

    # -- non-owner side: conversations owned elsewhere ----------------------------------------

    def _on_frames(self, sender: str, body: Any) -> None:
        conv, keys, skip, kind, data, participants, sent_at = body
        lag = max(0.0, time.time() - sent_at)  # the nodes' clocks: NTP-close, as token expiry's
        self.lag_seconds_total += lag
        self.lag_events_total += 1
        self.lag_max = max(self.lag_max, lag)
        node = cast("Node", self.node)
        exclude = self._attaching.get(conv, ())
        hub = node.hub
        targets = [(k[0], k[1]) for k in keys]
        sent = hub.send(
            targets,
            Encoded.from_msgpack(data, kind),
            None if skip is None else (skip[0], skip[1]),
            exclude,
        )
        if sent:
            # These connections follow a conversation of ``sender`` now (an agent given one
            # there): if ``sender`` restarts, they must resume (``_close_followers``).
            for key in targets:
                for conn in hub.connections(key):
                    if sender not in self._followed.get(conn, ()):
                        self._follow(conn, sender)
        if (
            not sent
            and not exclude
            and not any(hub.is_connected((p[0], p[1])) for p in participants)
        ):
            # No participant of it is here any more: the owner stops sending (lazily, once).
            self.detached_total += 1
            with contextlib.suppress(ClusterUnavailable):
                self.bus.emit(sender, "detach", conv)

    async def describe(self, conv: int, conv_hex: str, role: str, principal: str) -> ConvState:
        """The state of a remote conversation as ``principal`` may see it (for a welcome)."""
        owner = await self.owner_of(conv)
        raw = await self.bus.request(owner, "describe", (role, principal, conv_hex))
        if raw is None:
            raise ClusterUnavailable("the owner has no state for this conversation")
        return msgspec.msgpack.decode(raw, type=ConvState)

    async def forward(
        self, conn: Connection, key: Principal, frame: ClientFrame, conv: int
    ) -> None:
        """A command of a local client for a conversation owned elsewhere: the owner runs it
        and its answers (ack, history, error...) go to ``conn``."""
        owner = await self.owner_of(conv)
        self._follow(conn, owner)
        self.forwarded_total += 1
        try:
            reply = await self.bus.request(owner, "frame", (key[0], key[1], encode_msgpack(frame)))
        except KefuError as exc:
            conn.send(Error(code=exc.code, message=str(exc), ref=_ref(frame)))
            return
        for kind, data in reply[:MAX_REPLY_FRAMES]:
            Encoded.from_msgpack(data, kind).send(conn)

    async def attach(
        self,
        conn: Connection,
        key: Principal,
        points: list[tuple[int, str, int | None, int]],
        quiet: set[int] | None = None,
    ) -> None:
        """``conn`` follows remote conversations: ``(conv, conv_hex, epoch | None, last_seq)``
        each (a resume point, or none). Their live frames wait until the owner's answer, which
        brings the replay: nothing missed, nothing twice. A failed attach closes ``conn`` with
        1012: the client reconnects and resumes. ``quiet``: conversations whose point is the
        node's own (where the welcome said they stood), not the client's: their ``resumed`` is
        not passed on when it recovered everything."""
        by_owner: dict[str, list[tuple[int, str, int | None, int]]] = {}
        for point in points:
            owner = await self.owner_of(point[0])
            by_owner.setdefault(owner, []).append(point)
        for owner, owned in by_owner.items():
            self._follow(conn, owner)
            convs = [p[0] for p in owned]
            for conv in convs:
                self._attaching.setdefault(conv, set()).add(conn)

            def answered(body: Any, convs: list[int] = convs) -> None:
                self._attached(conn, convs)
                for kind, data in body[1][:MAX_REPLY_FRAMES]:
                    if kind == "resumed" and quiet and _recovered_of(data, quiet):
                        continue
                    Encoded.from_msgpack(data, kind).send(conn)

            try:
                await self.bus.request(
                    owner,
                    "attach",
                    (key[0], key[1], [(p[1], p[2], p[3]) for p in owned]),
                    on_reply=answered,
                )
            except KefuError as exc:
                self._attached(conn, convs)
                if key[0] == "agent":
                    # The agent works on with its other conversations; it stays a follower of
                    # that node, so that the node's "started" makes it resume them.
                    log.warning("cluster: node %s did not answer an attach: %s", owner, exc)
                    continue
                self.restart_closes_total += 1
                conn.close(CLOSE_SERVICE_RESTART, "the conversation's node did not answer")
                return

    def _attached(self, conn: Connection, convs: list[int]) -> None:
        for conv in convs:
            waiting = self._attaching.get(conv)
            if waiting is not None:
                waiting.discard(conn)
                if not waiting:
                    del self._attaching[conv]

    def _follow(self, conn: Connection, owner: str) -> None:
        self._following.setdefault(owner, set()).add(conn)
        self._followed.setdefault(conn, set()).add(owner)

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed."""
        for owner in self._followed.pop(conn, ()):
            conns = self._following.get(owner)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self._following[owner]
        if self._attaching:
            for conv in [c for c, conns in self._attaching.items() if conn in conns]:
                self._attached(conn, [conv])

    def _close_followers(self, owner: str | None, reason: str) -> None:
        """Close the connections that follow ``owner``'s conversations (every owner's when
        None): frames may have been lost, and a resume on reconnect recovers them."""
        owners = list(self._following) if owner is None else [owner]
        for o in owners:
            for conn in list(self._following.get(o, ())):
                self.restart_closes_total += 1
                conn.close(CLOSE_SERVICE_RESTART, reason)

    def _on_agent(self, sender: str, agent_id: Any) -> None:
        """Another node changed an agent (kefu.cluster.directory): read it from Redis."""
        if isinstance(agent_id, str):
            self.spawn(cast("Node", self.node).pull_agent(agent_id), "agent")

    def _on_started(self, sender: str, body: Any) -> None:
        self._close_followers(sender, "the conversation's node restarted")
        self._node_gone(sender)

    def _node_gone(self, node: str) -> None:
        for nodes in list(self._watchers.values()):
            nodes.discard(node)
        self._watchers = {c: n for c, n in self._watchers.items() if n}
        self._close_followers(node, "the conversation's node is gone")

    async def _reconnected(self) -> None:
        """Redis is back: what Pub/Sub carried meanwhile is lost, so followers resume (once
        this node listens again, so that their new attach is answered); and Redis may have
        lost its data, so the node announces itself again."""
        self._reconnecting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.request_timeout_s * 2):
                    await self.bus.subscribed.wait()
            self._close_followers(None, "the cluster's link was cut")
            await cast("Node", self.node).announce()
        finally:
            self._reconnecting = False

    def _resubscribed(self) -> None:
        """The listener was cut while Redis stayed up: envelopes may have been lost."""
        if not self._reconnecting and self.link.up:
            self._close_followers(None, "the node's listener was cut")

    # -- the admin's figures, summed over the nodes ---------------------------------------------

    async def cluster_stats(self, here: AdminStats) -> AdminStats:
        """``GET /v1/admin/stats`` in a cluster: ``here`` (this node's figures) with the
        connections, conversations and messages of every live node that answers within
        ``request_timeout_s`` added, the cluster's queue length from Redis, and the list of
        nodes. A node away or silent is listed ``up: false`` and counts for nothing; with
        Redis unreachable the answer is this node's view (``cluster.error``), its queue length
        the queued conversations of the nodes that answered."""
        mine = _figures(self.node_id, here)
        try:
            live, others, queued = await self._stats_registry()
        except ClusterUnavailable as exc:
            away = [n for n in self.link.live_nodes if n != self.node_id]
            nodes = [mine, *(_away(n, "redis is unreachable") for n in away)]
            cluster = ClusterFigures(
                node=self.node_id, nodes=nodes[:MAX_STATS_NODES], error=str(exc)
            )
            return _summed(here, cluster, None)
        live = live[: MAX_STATS_NODES - 1]
        others = others[: MAX_STATS_NODES - 1 - len(live)]
        answers = await asyncio.gather(*(self._ask_stats(n) for n in live))
        nodes = [mine, *answers, *(_away(n, "not alive (no recent heartbeat)") for n in others)]
        return _summed(here, ClusterFigures(node=self.node_id, nodes=nodes), queued)

    async def _stats_registry(self) -> tuple[list[str], list[str], int]:
        """From Redis, in one round trip: the other live nodes (by name), the other nodes
        the cluster knows (the latest registered first) and the length of the cluster's
        queue. ``node_ids`` holds at most MAX_NODE_INDEX entries (kefu.cluster.link)."""
        link = self.link
        queue = f"{self.config.key_prefix}route:queue"

        async def read(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.zrange(link.key("nodes"), 0, -1, withscores=True)
            pipe.hgetall(link.key("node_ids"))
            pipe.zcard(queue)
            return list(await pipe.execute())

        beats, ids, queued = await link.call(read)
        fresh_after = _now_ms() - self.config.node_timeout_s * 1000
        alive = {m.decode() for m, score in beats if score >= fresh_after}
        alive.discard(self.node_id)
        known = sorted(((int(i), n.decode()) for n, i in ids.items()), reverse=True)
        others = [n for _, n in known if n not in alive and n != self.node_id]
        return sorted(alive), others, int(queued)

    async def _ask_stats(self, node: str) -> NodeFigures:
        """``node``'s own figures, or why it gave none (within ``request_timeout_s``)."""
        timeout = self.config.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                raw = await self.bus.request(node, "stats", None)
            figures = msgspec.msgpack.decode(raw, type=NodeFigures)
        except TimeoutError:
            return _away(node, f"no answer within {timeout:g} s")
        except KefuError as exc:
            return _away(node, f"{exc.code}: {exc}")
        except (msgspec.DecodeError, TypeError) as exc:
            return _away(node, f"undecodable answer: {exc}")
        return msgspec.structs.replace(figures, id=node, up=True, error=None)

    async def _serve_stats(self, sender: str, body: Any) -> bytes:
        """Another node's ``GET /v1/admin/stats`` asks for this node's figures."""
        return encode_msgpack(_figures(self.node_id, cast("Node", self.node).admin_stats()))

    def health(self) -> str:
        return "ok" if self.link.up else "unavailable"

    def collect(self) -> list[CollectedFamily]:
        """The ``kefu_cluster_*`` families of ``/metrics``."""
        link, bus = self.link, self.bus

        def one(name: str, kind: Kind, text: str, value: float) -> CollectedFamily:
            return CollectedFamily(name, kind, text, [({}, float(value))])

        return [
            one("kefu_cluster_redis_up", "gauge", "1 while Redis answers.", link.up),
            one("kefu_cluster_nodes", "gauge", "Nodes alive (heartbeat not expired).",
                len(link.live_nodes)),
            one("kefu_cluster_node_index", "gauge", "This node's index.", link.index),
            one("kefu_cluster_redis_errors_total", "counter",
                "Redis calls that failed (connection lost, timeout).", link.errors_total),
            one("kefu_cluster_redis_busy_total", "counter",
                "Redis calls refused because every connection stayed busy past the deadline.",
                link.busy_total),
            one("kefu_cluster_redis_reconnects_total", "counter",
                "Times Redis came back after being down.", link.reconnects_total),
            one("kefu_cluster_nodes_reaped_total", "counter",
                "Dead nodes whose duties this node took over.", link.reaped_total),
            one("kefu_cluster_forwarded_total", "counter",
                "Commands and REST calls of local clients forwarded to their conversation's "
                "owner.", self.forwarded_total),
            one("kefu_cluster_fan_out_total", "counter",
                "Frames sent to the other nodes that follow a conversation owned here.",
                self.fanned_out_total),
            one("kefu_cluster_fan_out_dropped_total", "counter",
                "Frames for other nodes dropped (outbound queue full; a resume recovers them).",
                self.fan_out_dropped_total),
            one("kefu_cluster_pubsub_lag_seconds_total", "counter",
                "Sum of the delays from an owner's fan-out to its arrival here (divide by "
                "kefu_cluster_pubsub_lag_events_total for the mean).", self.lag_seconds_total),
            one("kefu_cluster_pubsub_lag_events_total", "counter",
                "Frames from owners whose delay was measured.", self.lag_events_total),
            one("kefu_cluster_pubsub_lag_max_seconds", "gauge",
                "Longest delay from an owner's fan-out to its arrival here since the last "
                "scrape.", self._take_lag_max()),
            one("kefu_cluster_follower_closes_total", "counter",
                "Connections closed (1012) to resume after their conversation's node restarted "
                "or died, or Redis came back.", self.restart_closes_total),
            one("kefu_cluster_report_retries_total", "counter",
                "Agent reports tried again because Redis could not be reached.",
                self.report_retries_total),
            one("kefu_cluster_routing_failures_total", "counter",
                "Routing changes made in the background that failed (logged).",
                self.routing_failures_total),
            one("kefu_cluster_requests_total", "counter",
                "Requests sent to other nodes.", bus.requests_total),
            one("kefu_cluster_request_timeouts_total", "counter",
                "Requests to other nodes that got no answer in time.", bus.timeouts_total),
            one("kefu_cluster_requests_pending", "gauge",
                "Requests to other nodes awaiting their answer.", bus.pending),
            one("kefu_cluster_events_total", "counter", "Events received from other nodes.",
                bus.events_in),
            one("kefu_cluster_dropped_total", "counter",
                "Envelopes from other nodes dropped (undecodable, oversized, unknown).",
                bus.dropped_total),
            one("kefu_cluster_busy_total", "counter",
                "Requests from other nodes refused because too many were being handled.",
                bus.busy_total),
        ]  # fmt: skip

    def _take_lag_max(self) -> float:
        lag, self.lag_max = self.lag_max, 0.0
        return lag


def _recovered_of(data: bytes, convs: set[int]) -> bool:
    """Whether ``data`` is a ``resumed`` that recovered everything, for one of ``convs``."""
    try:
        frame = msgspec.msgpack.decode(data)
        return (
            isinstance(frame, dict)
            and frame.get("recovered", True) is True
            and int(frame.get("conv", ""), 16) in convs
        )
    except (msgspec.DecodeError, TypeError, ValueError):
        return False


def _ref(frame: ClientFrame) -> str:
    client_msg_id = getattr(frame, "client_msg_id", None)
    return client_msg_id if isinstance(client_msg_id, str) else frame_tag(frame)


class _Collector:
    """Stands for a connection on another node while the owner runs its command: what the
    node would send to that connection is collected for the reply."""

    msgpack = True
    received_ns = 0

    def __init__(self, role: str, principal: str) -> None:
        self.role = role
        self.principal = principal
        self.id = f"remote:{role}:{principal}"
        self.frames: list[tuple[str, bytes]] = []

    def send(self, frame: object) -> bool:
        if len(self.frames) < MAX_REPLY_FRAMES:
            self.frames.append((frame_tag(frame), encode_msgpack(frame)))
        return True

    def send_encoded(self, data: bytes, kind: str) -> bool:
        if len(self.frames) < MAX_REPLY_FRAMES:
            self.frames.append((kind, data))
        return True


def _now_ms() -> int:
    return int(time.time() * 1000)


def _figures(node_id: str, stats: AdminStats) -> NodeFigures:
    """A node's own share of the cluster's admin figures."""
    return NodeFigures(
        id=node_id,
        up=True,
        connections=stats.connections,
        conversations=stats.conversations,
        messages_total=stats.messages_total,
        uptime_s=stats.uptime_s,
    )


def _away(node_id: str, error: str) -> NodeFigures:
    return NodeFigures(id=node_id, up=False, error=error)


def _summed(here: AdminStats, cluster: ClusterFigures, queued: int | None) -> AdminStats:
    """``here`` with the counts of every node that answered added. Only the keys this node
    reports are summed: a node of another version may report more, never fewer rows."""
    up = [n for n in cluster.nodes if n.up]

    def total(counts: list[dict[str, int] | None], keys: dict[str, int]) -> dict[str, int]:
        return {k: sum((c or {}).get(k, 0) for c in counts) for k in keys}

    conversations = total([n.conversations for n in up], here.conversations)
    return msgspec.structs.replace(
        here,
        connections=total([n.connections for n in up], here.connections),
        conversations=conversations,
        messages_total=sum(n.messages_total or 0 for n in up),
        queue_length=conversations.get("queued", 0) if queued is None else queued,
        cluster=cluster,
    )


def _effect_row(effect: Effect) -> tuple[Any, ...]:
    if isinstance(effect, Assign):
        return ("A", effect.conv, effect.agent_id, effect.group)
    if isinstance(effect, Queue):
        return ("Q", effect.conv, effect.position, effect.group)
    if isinstance(effect, PositionChanged):
        return ("P", effect.conv, effect.position, None)
    if isinstance(effect, Unassign):
        return ("U", effect.conv, effect.agent_id, None)
    return ("R", effect.conv, effect.agent_id, None)


def _row_effect(row: Any) -> Effect:
    kind, conv, a, b = row
    if kind == "A":
        return Assign(conv, a, b)
    if kind == "Q":
        return Queue(conv, a, b)
    if kind == "P":
        return PositionChanged(conv, a)
    if kind == "U":
        return Unassign(conv, a)
    return Requeue(conv, a)
