"""A node's link to the cluster's Redis: the connection, its health, and the node registry.

Nodes cooperate only through Redis (``cluster.redis_url``); this module owns the connection
and answers three questions for the rest of the node: is Redis there (``up``), which nodes are
alive (``nodes``), and which ones just died (``on_node_dead``).

Node identity
-------------
A node is named by ``cluster.node_id`` or, without it, by a name drawn at its first start and
kept in its own store (``meta`` key ``cluster_node``): a node restarted on the same data
directory is the same node, and so owns the same conversations again (its RocksDB is its own).
Each node also gets a small number, its **index** (``INCR`` of ``{prefix}node_index`` on the
first start, then kept with the name in Redis under ``{prefix}node_ids``): conversation ids
made on a node carry it, so any node knows a conversation's owner without asking Redis.

Presence
--------
Every ``heartbeat_s`` the node writes ``{prefix}node:{id}`` (its addresses and start time, as
JSON) with an expiry of ``node_timeout_s`` and its time into the sorted set
``{prefix}nodes``. A node whose score is older than ``node_timeout_s`` is dead: the first
node to take the lock ``{prefix}reap:{id}`` (``SET NX PX``) runs ``on_node_dead(id)`` once for
it and removes it from the set. A node that comes back simply registers again.

Redis down
----------
Every call that fails with a connection error or a timeout raises :class:`ClusterUnavailable`
(``cluster_unavailable``): the caller refuses what needs the cluster with that error and keeps
serving what is local. The heartbeat alone (every ``heartbeat_s``, on connections of its own)
judges the link: a failed beat marks it ``down``, the next good one ``up`` again and calls
``on_reconnect``, where the node re-announces what Redis lost or missed. (A failed ordinary call
does not mark it down: right after Redis comes back, pooled connections that died with it fail
once more, and each would otherwise count as a new outage.) A node whose Redis is down does not reap
anyone: it cannot tell a dead node from its own cut.

Keys (``prefix`` default ``kefu:``)
-----------------------------------
=========================  ===========  ================================  ======================
key                        type         holds                             bound
=========================  ===========  ================================  ======================
``node_index``             string       the last index given out          one
``node_ids``               hash         node id -> index                  one entry per node
                                                                          ever started (65,535)
``node:{id}``              string       the node's JSON card              expires
                                                                          (``node_timeout_s``)
``nodes``                  sorted set   live node ids by last heartbeat   reaped when stale
``reap:{id}``              string       the lock of one reaping           expires
=========================  ===========  ================================  ======================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar

import msgspec

from kefu.errors import KefuError

__all__ = [
    "MAX_NODE_INDEX",
    "ClusterUnavailable",
    "Link",
    "NodeCard",
    "new_node_id",
]

log = logging.getLogger(__name__)

#: Node indexes fit 16 bits of a conversation id.
MAX_NODE_INDEX: Final = 0xFFFF
#: How long one Redis call may take before the link counts as down.
CALL_TIMEOUT_S: Final = 2.0
#: Calls to Redis at once (calls beyond wait for a free one, within CALL_TIMEOUT_S).
MAX_CONNECTIONS: Final = 64
#: Connections beyond MAX_CONNECTIONS: the Pub/Sub listener, the routing's scripts.
POOL_HEADROOM: Final = 64

LinkState = Literal["connecting", "up", "down", "closed"]
T = TypeVar("T")


class ClusterUnavailable(KefuError):
    """Redis cannot be reached: what needs the cluster is refused until it is back."""

    code = "cluster_unavailable"


class NodeCard(msgspec.Struct, frozen=True, kw_only=True):
    """What a node tells the others about itself (``node:{id}``)."""

    id: str
    index: int
    started_ms: int
    pid: int
    ws_url: str | None = None
    http_url: str | None = None


def new_node_id() -> str:
    return "n" + secrets.token_hex(6)


def _redis_errors() -> tuple[type[Exception], ...]:
    import redis.exceptions as rex

    return (rex.ConnectionError, rex.TimeoutError, OSError, asyncio.TimeoutError)


class Link:
    """The node's Redis connection and its place in the registry (module doc).

    Counters for the metrics: ``errors_total``, ``reconnects_total``, ``heartbeats_total``,
    ``reaped_total``; ``state`` and ``live_nodes`` as gauges.
    """

    def __init__(
        self,
        url: str,
        node_id: str,
        *,
        prefix: str = "kefu:",
        heartbeat_s: float = 1.0,
        node_timeout_s: float = 5.0,
        on_node_dead: Callable[[str], Awaitable[None]] | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        on_node_gone: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < heartbeat_s < node_timeout_s:
            raise ValueError("heartbeat_s must be above 0 and below node_timeout_s")
        self.url = url
        self.node_id = node_id
        self.prefix = prefix
        self.heartbeat_s = heartbeat_s
        self.node_timeout_s = node_timeout_s
        self.on_node_dead = on_node_dead
        self.on_reconnect = on_reconnect
        #: Called on every node (not only the reaper) when a node leaves the live set.
        self.on_node_gone = on_node_gone
        self.index = 0
        self.state: LinkState = "connecting"
        self.last_error: str | None = None
        self.errors_total = 0
        self.reconnects_total = 0
        self.heartbeats_total = 0
        self.reaped_total = 0
        self.live_nodes: list[str] = []
        self.card: NodeCard | None = None
        self._errors = _redis_errors()
        self._redis: Any = None
        self._beat_redis: Any = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._closing = False
        self.busy_total = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def redis(self) -> Any:
        """The ``redis.asyncio.Redis`` client (for modules that run their own scripts)."""
        if self._redis is None:
            raise ClusterUnavailable("the cluster link is not started")
        return self._redis

    @property
    def up(self) -> bool:
        return self.state == "up"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- life ----------------------------------------------------------------------------------

    async def start(self, *, ws_url: str | None = None, http_url: str | None = None) -> None:
        """Connect, take the node's index and register. Raises ClusterUnavailable when Redis
        cannot be reached: a node is not started into a cluster it cannot join."""
        import redis.asyncio as aredis

        def client(connections: int) -> Any:
            # A blocking pool: a caller past the bound waits for a connection (within the
            # call's deadline) instead of failing at once as if Redis were gone.
            pool = aredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=connections,
                timeout=CALL_TIMEOUT_S,
                socket_timeout=CALL_TIMEOUT_S,
                socket_connect_timeout=CALL_TIMEOUT_S,
            )
            return aredis.Redis(connection_pool=pool, decode_responses=False)

        # Room for the Pub/Sub listener and the routing's scripts beyond the link's calls.
        self._redis = client(MAX_CONNECTIONS + POOL_HEADROOM)
        # Heartbeats have connections of their own: a node busy with traffic must not look
        # dead to the others for want of a free connection.
        self._beat_redis = client(2)
        self.index = await self.call(self._take_index)
        self.card = NodeCard(
            id=self.node_id,
            index=self.index,
            started_ms=int(time.time() * 1000),
            pid=_pid(),
            ws_url=ws_url,
            http_url=http_url,
        )
        await self.call(self._beat, beat=True)
        self.state = "up"
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Leave the registry (so others need not wait for the timeout) and disconnect."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation swallowed by a library still ends the loop at its next
            # turn (``_closing``).
            await asyncio.wait({task}, timeout=CALL_TIMEOUT_S + self.heartbeat_s)
        if self._redis is not None and self.state == "up":
            # Leaving is a courtesy: the heartbeat key expires anyway.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await self._redis.zrem(self.key("nodes"), self.node_id)
                    await self._redis.delete(self.key("node", self.node_id))
        self.state = "closed"
        for r in (self._redis, self._beat_redis):
            if r is not None:
                with contextlib.suppress(Exception):  # a broken connection: nothing left
                    await r.aclose()

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Any], Awaitable[T]], *, beat: bool = False) -> T:
        """``await fn(redis)`` under the link's rules: at most :data:`MAX_CONNECTIONS` calls
        at once (the others wait their turn within the deadline: past it they are refused as
        busy, and Redis does not count as down); a connection error or a timeout of the call
        itself marks the link down; both raise ClusterUnavailable (module doc)."""
        if self._redis is None:
            raise ClusterUnavailable("the cluster link is not started")
        running = False
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                if beat:
                    running = True
                    return await fn(self._beat_redis)
                async with self._slots:
                    running = True
                    return await fn(self._redis)
        except self._errors as exc:
            if not running:
                self.busy_total += 1
                raise ClusterUnavailable(
                    f"all {MAX_CONNECTIONS} connections to redis are busy"
                ) from exc
            if beat:
                self._failed(exc)
            else:
                # Counted, but only the heartbeat judges Redis down: right after Redis comes
                # back, a pooled connection that died with it fails once more, and taking that
                # for a new outage would close the followers a second time.
                self.errors_total += 1
                self.last_error = repr(exc)
            raise ClusterUnavailable(f"redis is unreachable: {exc}") from exc

    def _failed(self, exc: BaseException) -> None:
        self.errors_total += 1
        self.last_error = repr(exc)
        if self.state == "up":
            log.warning("cluster: redis is unreachable (%r); serving what is local", exc)
            self.state = "down"
            self._wake.set()

    # -- registry ------------------------------------------------------------------------------

    async def _take_index(self, r: Any) -> int:
        ids = self.key("node_ids")
        held = await r.hget(ids, self.node_id)
        if held is not None:
            return int(held)
        index = int(await r.incr(self.key("node_index")))
        if index > MAX_NODE_INDEX:
            raise ClusterUnavailable(f"more than {MAX_NODE_INDEX} node ids were handed out")
        if not await r.hsetnx(ids, self.node_id, index):  # another start of the same id won
            return int(await r.hget(ids, self.node_id))
        return index

    async def _beat(self, r: Any) -> None:
        now_ms = int(time.time() * 1000)
        assert self.card is not None
        pipe = r.pipeline(transaction=False)
        pipe.set(
            self.key("node", self.node_id),
            msgspec.json.encode(self.card),
            px=int(self.node_timeout_s * 1000),
        )
        pipe.zadd(self.key("nodes"), {self.node_id: now_ms})
        pipe.zrange(self.key("nodes"), 0, -1, withscores=True)
        *_, members = await pipe.execute()
        self.heartbeats_total += 1
        stale_before = now_ms - self.node_timeout_s * 1000
        live: list[str] = []
        dead: list[str] = []
        for member, score in members:
            node = member.decode()
            (dead if score < stale_before else live).append(node)
        gone = set(self.live_nodes).difference(live)
        self.live_nodes = live
        if self.on_node_gone is not None:
            for node in gone:
                try:
                    self.on_node_gone(node)
                except Exception:
                    log.exception("cluster: handling the departure of node %s failed", node)
        for node in dead:
            await self._reap(r, node)

    async def _reap(self, r: Any, node: str) -> None:
        """Once per death across the cluster: the lock holder runs ``on_node_dead``."""
        if node == self.node_id:
            return
        lock = self.key("reap", node)
        if not await r.set(lock, self.node_id, nx=True, px=int(self.node_timeout_s * 1000)):
            return
        log.warning("cluster: node %s missed its heartbeats; taking over its duties", node)
        if self.on_node_dead is not None:
            try:
                await self.on_node_dead(node)
            except ClusterUnavailable:
                raise
            except Exception:
                log.exception("cluster: handling the death of node %s failed", node)
        await r.zrem(self.key("nodes"), node)
        self.reaped_total += 1

    async def _run(self) -> None:
        while not self._closing:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for may swallow a cancellation
            # that meets its timeout, and the node's stop would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            was_up = self.state == "up"
            try:
                await self.call(self._beat, beat=True)
            except ClusterUnavailable:
                continue
            except Exception:
                log.exception("cluster: heartbeat failed")
                continue
            if not was_up:
                self.state = "up"
                self.reconnects_total += 1
                log.warning("cluster: redis is back")
                if self.on_reconnect is not None:
                    try:
                        await self.on_reconnect()
                    except ClusterUnavailable:
                        pass
                    except Exception:
                        log.exception("cluster: re-announcing after the reconnect failed")

    async def node_cards(self) -> list[NodeCard]:
        """The cards of the nodes alive now (their heartbeat key has not expired)."""

        async def read(r: Any) -> list[Any]:
            ids = await r.zrange(self.key("nodes"), 0, -1)
            if not ids:
                return []
            return list(await r.mget([self.key("node", i.decode()) for i in ids]))

        raw = await self.call(read)
        return [msgspec.json.decode(v, type=NodeCard) for v in raw if v is not None]

    async def nodes_now(self) -> list[str]:
        """The nodes alive now, read from Redis (``live_nodes`` lags a node that has just
        joined by up to one heartbeat: what must reach every node reads this)."""

        async def read(r: Any) -> list[Any]:
            stale_before = int(time.time() * 1000) - self.node_timeout_s * 1000
            return list(await r.zrangebyscore(self.key("nodes"), stale_before, "+inf"))

        return [m.decode() for m in await self.call(read)]

    def stats(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "index": self.index,
            "state": self.state,
            "live_nodes": len(self.live_nodes),
            "errors_total": self.errors_total,
            "reconnects_total": self.reconnects_total,
            "heartbeats_total": self.heartbeats_total,
            "reaped_total": self.reaped_total,
            "last_error": self.last_error,
        }


def _pid() -> int:
    import os

    return os.getpid()
