"""Rate limits and connection caps: token buckets, keyed and bounded, and the node's limiter.

What is limited (the ``limits:`` section of the config, ``kefu.example.yaml``)
-----------------------------------------------------------------------------
=============================  ==================================  ===========================
bucket / cap                   what draws from it                  refusal
=============================  ==================================  ===========================
``ws.rate`` per connection     every WS message of the connection  ``error {rate_limited}``,
                                                                   4029 if it goes on
``limits.per_ip``              every WS message and every REST     WS: as above; REST: 429
                               ``send`` of one client address      ``rate_limited``
                               (not with the API key)
``limits.per_visitor``         every WS message of a visitor's     as above
                               connections and every REST ``send``
                               of that visitor (null: ``ws.rate``)
``limits.create_per_ip``       ``POST /v1/chat/create`` of one     429 ``rate_limited``
                               address (not with the API key)
``ws_connections_per_ip``      open WS connections of one address  close 4029 right after the
                                                                   upgrade
``ws_connections_per_visitor`` open WS connections of one visitor  close 4029 at the ``hello``
``ws_connections_per_agent``   ... of one agent                    close 4029 at the ``hello``
=============================  ==================================  ===========================

A REST refusal is ``429 {"error": {"code": "rate_limited", ...}}`` with ``Retry-After``: the
whole seconds until every bucket involved holds a token again (at least 1). A command is
charged to all its buckets or to none: when one of them is empty nothing is spent, so a
refused call costs the client nothing it could use later, and the server nothing but the check.

Connection caps close with 4029 ("too many connections ...") rather than 1008: 1008 tells a
client its token is bad (it would drop the token and log in again), whereas 4029 is
PROTOCOL.md's "back off and retry later", which is what a client past a cap should do. The
per-address cap is applied once the upgrade is done: picows gives the upgrade callback the
request but not the peer's address, so the connection is accepted and closed at once (before
any ``hello`` is read); a browser sees that close code and reason, where an HTTP refusal of the
upgrade shows only as 1006.

Addresses
---------
The client address is the TCP peer, or, when the peer is one of ``limits.trusted_proxies``,
the right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy (the left part
of that header is whatever the client wrote, so it is never believed). Addresses in
``limits.exempt`` (by default loopback: a reverse proxy on the same host would otherwise put
every visitor in one bucket) have no per-address bucket and no per-address cap; the
per-connection and per-visitor limits still apply to them.

Bounds
------
Each keyed map (:class:`KeyedBuckets`) keeps at most ``limits.max_tracked`` keys, least
recently used first out. The one evicted is the key idle the longest, whose bucket has most
likely refilled already, so forgetting it costs nothing; under a flood of distinct keys a
forgotten key comes back with a full bucket (the flood is then bounded by the other limits:
new visitor ids come from ``create``, limited per address). A WebSocket connection holds the
buckets it was given at its upgrade and welcome, so a message costs no map lookup; should its
key be evicted meanwhile, a later connection of that key starts a new bucket. Connection counts
(:class:`ConnectionCounts`) hold an entry only while its key has an open connection, so they
are bounded by the open connections (``ws.max_connections``). Sizes and evictions are in
:meth:`Limits.stats` (``/metrics``).

With ``per_visitor`` left at its default (the rate of ``ws.rate``), a visitor's only
connection draws from its own per-connection bucket, which has that very rate, and the shared
per-visitor bucket is made when the visitor opens a second connection (or sends over REST):
tens of thousands of idle visitors then hold no second bucket and no map entry each (a quarter
of a KiB per connection). The connection opened first keeps its own bucket only, so a visitor
with several connections gets at most one connection's rate more than the shared bucket's.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from kefu import _core
from kefu.config import LimitsConfig, RateConfig
from kefu.errors import KefuError

__all__ = [
    "ConnectionCounts",
    "KeyedBuckets",
    "Limits",
    "RateLimited",
    "TokenBucket",
    "retry_after_s",
    "take_all",
]

#: The least ``Retry-After`` given: a header of 0 would invite an immediate retry.
MIN_RETRY_AFTER_S: Final = 1


if TYPE_CHECKING:
    from kefu._core.meters import TokenBucket
else:
    #: ``burst`` commands at once, refilled at ``per_second``, starting full; the caller
    #: passes the time. Compiled (``kefu._core.meters``) unless the extensions are off.
    TokenBucket = _core.meters.TokenBucket


def take_all(buckets: Sequence[TokenBucket | None], now: float) -> float:
    """Spends one token of each bucket (``None`` skipped) if every one has one: 0.0. Else
    nothing is spent and the answer is the seconds until all of them have one.

    Takes in order and gives back on the first refusal: on the path that succeeds (nearly
    every call) that is one :meth:`TokenBucket.take` per bucket and nothing else.
    """
    for i, b in enumerate(buckets):
        if b is not None and not b.take(now):
            wait = 0.0
            for j, other in enumerate(buckets):
                if other is None:
                    continue
                if j < i:
                    other.give_back()
                elif j > i:
                    other.refill(now)
                w = other.wait_s()
                if w > wait:
                    wait = w
            return wait
    return 0.0


def retry_after_s(wait: float) -> int:
    """``Retry-After`` for a wait of ``wait`` seconds: whole seconds, rounded up, at least 1."""
    return max(MIN_RETRY_AFTER_S, math.ceil(wait))


class RateLimited(KefuError):
    """A REST call over a bucket: 429 with ``Retry-After: retry_after`` (whole seconds)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KeyedBuckets:
    """One :class:`TokenBucket` per key (an address, a visitor id), at most ``max_keys``.

    Least recently used first out (module doc, "Bounds"); ``evictions`` counts those.
    """

    __slots__ = ("_buckets", "burst", "evictions", "max_keys", "per_second")

    def __init__(self, per_second: float, burst: int, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        TokenBucket(per_second, burst, 0.0)  # the same checks of the rate
        self.per_second = per_second
        self.burst = burst
        self.max_keys = max_keys
        self.evictions = 0
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        """The bucket of ``key`` (made full if new), now the most recently used."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
            return bucket
        if len(buckets) >= self.max_keys:
            buckets.popitem(last=False)
            self.evictions += 1
        bucket = buckets[key] = TokenBucket(self.per_second, self.burst, now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


class ConnectionCounts:
    """Open connections per key; a key is dropped when its count reaches 0."""

    __slots__ = ("_counts", "refused")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self.refused = 0

    def acquire(self, key: str, cap: int) -> bool:
        """Counts one more connection of ``key``; ``False`` (nothing counted) at ``cap``."""
        n = self._counts.get(key, 0)
        if n >= cap:
            self.refused += 1
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: Iterable[str]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _in(address: str, networks: tuple[_Network, ...]) -> bool:
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


class Limits:
    """The limits of one node, shared by its WebSocket and REST fronts (module doc).

    Built from the ``limits`` config section and the per-connection ``ws.rate`` (the default
    of ``limits.per_visitor``); the fronts ask it for buckets and caps, and :meth:`stats`
    reports the maps' sizes and what was refused.
    """

    def __init__(
        self,
        *,
        per_ip: tuple[float, int],
        per_visitor: tuple[float, int],
        per_visitor_explicit: bool = True,
        create_per_ip: tuple[float, int],
        max_tracked: int,
        ws_connections_per_ip: int,
        ws_connections_per_visitor: int,
        ws_connections_per_agent: int,
        exempt: Iterable[str] = (),
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.ip = KeyedBuckets(*per_ip, max_tracked)
        self.visitor = KeyedBuckets(*per_visitor, max_tracked)
        # per_visitor given apart from ws.rate: every visitor connection draws from the shared
        # bucket. Otherwise (the default) a visitor's only connection is limited by its own
        # bucket, the same rate, and the shared one is made from its second connection on
        # (module doc, "Bounds": one bucket less per connected visitor).
        self.visitor_explicit = per_visitor_explicit
        self.create_ip = KeyedBuckets(*create_per_ip, max_tracked)
        self.ip_connections = ConnectionCounts()
        # By role, keyed by the principal's id itself (no key string made per connection).
        self.principal_connections = {"visitor": ConnectionCounts(), "agent": ConnectionCounts()}
        self.cap_per_ip = ws_connections_per_ip
        self.cap_per_role = {
            "visitor": ws_connections_per_visitor,
            "agent": ws_connections_per_agent,
        }
        self._exempt = _networks(exempt)
        self._proxies = _networks(trusted_proxies)
        # Refusals by limit, for the metrics.
        self.refused: dict[str, int] = {
            "ws_ip": 0,
            "ws_visitor": 0,
            "rest_ip": 0,
            "rest_visitor": 0,
            "create_ip": 0,
        }

    @classmethod
    def from_config(cls, limits: LimitsConfig, ws_rate: RateConfig) -> Limits:
        """From the ``limits`` section and the ``ws.rate`` of the same config."""
        visitor = limits.per_visitor if limits.per_visitor is not None else ws_rate
        return cls(
            per_ip=(limits.per_ip.per_second, limits.per_ip.burst),
            per_visitor=(visitor.per_second, visitor.burst),
            per_visitor_explicit=limits.per_visitor is not None,
            create_per_ip=(limits.create_per_ip.per_second, limits.create_per_ip.burst),
            max_tracked=limits.max_tracked,
            ws_connections_per_ip=limits.ws_connections_per_ip,
            ws_connections_per_visitor=limits.ws_connections_per_visitor,
            ws_connections_per_agent=limits.ws_connections_per_agent,
            exempt=limits.exempt,
            trusted_proxies=limits.trusted_proxies,
        )

    # -- addresses ------------------------------------------------------------------------------

    def client_ip(self, peer: str, forwarded_for: str | None = None) -> str:
        """The client's address: ``peer``, or from ``X-Forwarded-For`` when ``peer`` is a
        trusted proxy (module doc, "Addresses")."""
        if forwarded_for is None or not _in(peer, self._proxies):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",")]
        for hop in reversed(hops[:64]):  # a header of more hops is someone's invention
            if not hop:
                continue
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # garbage in the chain: believe only what we saw
            if not _in(hop, self._proxies):
                return hop
        return peer

    def is_exempt(self, ip: str) -> bool:
        return _in(ip, self._exempt)

    def ip_bucket(self, ip: str, now: float) -> TokenBucket | None:
        """The per-address bucket of ``ip``; ``None`` for an exempt address."""
        if not ip or self.is_exempt(ip):
            return None
        return self.ip.get(ip, now)

    def create_bucket(self, ip: str, now: float) -> TokenBucket | None:
        """The ``create`` bucket of ``ip``; ``None`` for an exempt address."""
        if not ip or self.is_exempt(ip):
            return None
        return self.create_ip.get(ip, now)

    def visitor_bucket(self, visitor_id: str, now: float) -> TokenBucket:
        return self.visitor.get(visitor_id, now)

    def connection_visitor_bucket(self, visitor_id: str, now: float) -> TokenBucket | None:
        """The shared bucket a visitor's new connection also draws from: always when
        ``per_visitor`` is set apart, else once the visitor holds two connections or more
        (or already has a shared bucket from REST sends)."""
        if (
            self.visitor_explicit
            or visitor_id in self.visitor
            or self.principal_connections["visitor"].count(visitor_id) > 1
        ):
            return self.visitor.get(visitor_id, now)
        return None

    # -- connection caps ------------------------------------------------------------------------

    def connect_ip(self, ip: str) -> bool:
        """Counts a WS connection of ``ip``; ``False`` at the cap (exempt: always ``True``,
        uncounted)."""
        if not ip or self.is_exempt(ip):
            return True
        return self.ip_connections.acquire(ip, self.cap_per_ip)

    def disconnect_ip(self, ip: str) -> None:
        if ip and not self.is_exempt(ip):
            self.ip_connections.release(ip)

    def connect_principal(self, role: str, principal: str) -> bool:
        cap = self.cap_per_role.get(role)
        if cap is None:
            return True
        return self.principal_connections[role].acquire(principal, cap)

    def disconnect_principal(self, role: str, principal: str) -> None:
        counts = self.principal_connections.get(role)
        if counts is not None:
            counts.release(principal)

    # -- metrics --------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Sizes of the maps, evictions and refusals, by map or limit (for ``/metrics``)."""
        return {
            "tracked": {
                "ip": len(self.ip),
                "visitor": len(self.visitor),
                "create_ip": len(self.create_ip),
            },
            "evictions_total": {
                "ip": self.ip.evictions,
                "visitor": self.visitor.evictions,
                "create_ip": self.create_ip.evictions,
            },
            "connection_keys": {
                "ip": len(self.ip_connections),
                "principal": sum(len(c) for c in self.principal_connections.values()),
            },
            "refused_total": {
                **self.refused,
                "connections_ip": self.ip_connections.refused,
                "connections_principal": sum(
                    c.refused for c in self.principal_connections.values()
                ),
            },
        }
