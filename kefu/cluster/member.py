"""A node's membership of a cluster: what ``kefu.node.Node`` does through Redis.

The node keeps running as it does alone; this object adds, when ``cluster.redis_url`` is set,
the link (:mod:`kefu.cluster.link`), the bus between nodes (:mod:`kefu.cluster.bus`) and the
cluster's identity: the node's name, its index (carried by the ids of the conversations it
creates, so the owner of a conversation is known from its id) and the token secret every node
of the cluster signs with.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any, Final

from kefu.cluster.bus import Bus
from kefu.cluster.link import MAX_NODE_INDEX, ClusterUnavailable, Link, new_node_id
from kefu.config import ClusterConfig
from kefu.metrics import CollectedFamily, Kind

if TYPE_CHECKING:
    from kefu.store import Store

__all__ = ["CONV_INDEX_SHIFT", "NODE_META", "Member", "owner_index"]

log = logging.getLogger(__name__)

#: The local meta key that keeps the node's name across restarts.
NODE_META: Final = "cluster_node"
#: Conversation ids of a cluster node: ``index << CONV_INDEX_SHIFT | 47 random bits`` (63 bits
#: in all, as a single node's ids).
CONV_INDEX_SHIFT: Final = 47


def owner_index(conv: int) -> int:
    """The index of the node that created (and owns) conversation ``conv``."""
    return (conv >> CONV_INDEX_SHIFT) & MAX_NODE_INDEX


class Member:
    """The cluster side of one node (module doc)."""

    def __init__(self, config: ClusterConfig, store: Store) -> None:
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

    async def start(self, *, ws_url: str | None, http_url: str | None) -> None:
        """Join: keep the node's name, take its index, listen on its channel. Raises
        ClusterUnavailable when Redis cannot be reached."""
        if self.store.get_meta(NODE_META) != self.node_id.encode():
            await self.store.put_meta(NODE_META, self.node_id.encode())
        await self.link.start(ws_url=ws_url, http_url=http_url)
        try:
            await self.bus.start()
        except BaseException:
            await self.link.stop()
            raise
        self._names[self.link.index] = self.node_id
        log.info(
            "cluster: joined as node %s (index %d) through %s",
            self.node_id,
            self.link.index,
            self.link.key(""),
        )

    async def stop(self) -> None:
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
            one("kefu_cluster_redis_reconnects_total", "counter",
                "Times Redis came back after being down.", link.reconnects_total),
            one("kefu_cluster_nodes_reaped_total", "counter",
                "Dead nodes whose duties this node took over.", link.reaped_total),
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

    def stats(self) -> dict[str, Any]:
        link = self.link
        return {
            "redis_up": 1 if link.up else 0,
            "nodes": len(link.live_nodes),
            "index": link.index,
            "redis_errors_total": link.errors_total,
            "redis_reconnects_total": link.reconnects_total,
            "heartbeats_total": link.heartbeats_total,
            "nodes_reaped_total": link.reaped_total,
            **{f"bus_{k}": v for k, v in self.bus.stats().items()},
        }
