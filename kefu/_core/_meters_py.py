"""Pure-Python twin of ``kefu._core.meters``: the same histogram, token bucket, ledger and
message meter (that module's doc), answering alike for the same sequence of calls."""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

__all__ = ["Histogram", "Ledger", "MessageMeter", "TokenBucket", "debug_counters"]


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_histograms``, ``live_ledgers``: histograms and ledgers not yet freed. The twin and a
    release build of the compiled module count nothing: every counter is 0.
    """
    return {"live_histograms": 0, "live_ledgers": 0}


def _checked_bounds(bounds: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(b) for b in bounds)
    for b in out:
        if not math.isfinite(b):
            raise ValueError(f"a histogram bound must be finite, got {b!r}")
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError("histogram bounds must increase")
    return out


class Histogram:
    """Observations counted per bucket (not cumulative) and summed.

    ``bounds``: the finite upper bounds, increasing; a value goes to the first bucket whose
    bound is at least the value (Prometheus' ``le``), past the last one to the ``+Inf`` bucket.
    NaN is not counted.
    """

    __slots__ = ("_counts", "_sum", "bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = _checked_bounds(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0

    def observe(self, v: float) -> None:
        if not isinstance(v, (int, float)):
            raise TypeError(f"must be real number, not {type(v).__name__}")
        v = float(v)
        if v != v:  # NaN
            return
        # bisect_left: the first bound >= v, the bucket whose ``le`` holds v.
        self._counts[bisect.bisect_left(self.bounds, v)] += 1
        self._sum += v

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def count(self) -> int:
        return sum(self._counts)

    def counts(self) -> list[int]:
        """The count of each bucket, ``+Inf``'s last (not cumulative)."""
        return list(self._counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(le, observations <= le), ...]`` ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        total = 0
        for le, c in zip((*self.bounds, math.inf), self._counts, strict=True):
            total += c
            out.append((le, total))
        return out


class TokenBucket:
    """``burst`` commands at once, refilled at ``per_second``; starts full.

    The caller passes the time (``loop.time()``, a monotonic clock) so that one clock read
    serves every check of a frame and tests can drive the bucket without sleeping.
    """

    __slots__ = ("_last", "_tokens", "burst", "per_second")

    def __init__(self, per_second: float, burst: int, now: float) -> None:
        per_second = float(per_second)
        if not per_second > 0 or burst < 1:
            raise ValueError("per_second must be > 0 and burst >= 1")
        self.per_second = per_second
        self.burst = int(burst)
        self._tokens = float(burst)
        self._last = float(now)

    def take(self, now: float) -> bool:
        """Spends one token; ``False`` (nothing spent) when the bucket is empty."""
        tokens = self._tokens + (now - self._last) * self.per_second
        self._last = now
        if tokens > self.burst:
            tokens = float(self.burst)
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def refill(self, now: float) -> float:
        """Brings the bucket to ``now`` without spending; the tokens it holds."""
        tokens = self._tokens + (now - self._last) * self.per_second
        self._last = now
        self._tokens = tokens if tokens < self.burst else float(self.burst)
        return self._tokens

    def give_back(self) -> None:
        """Returns the token of the last :meth:`take` (a call refused by another bucket)."""
        self._tokens = min(self._tokens + 1.0, float(self.burst))

    def wait_s(self) -> float:
        """Seconds from the last refill until one token is there (0 when one is)."""
        missing = 1.0 - self._tokens
        return missing / self.per_second if missing > 0 else 0.0

    @property
    def tokens(self) -> float:
        """Tokens left at the last :meth:`take` (without the refill since)."""
        return self._tokens


class Ledger:
    """Nanoseconds charged per conversation, least recently charged dropped past ``capacity``.

    ``total_ns`` sums every charge, dropped conversations' included. A conversation is any
    hashable key (the node's are ints).
    """

    __slots__ = ("_ns", "capacity", "dropped", "total_ns")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._ns: OrderedDict[Hashable, int] = OrderedDict()
        self.total_ns = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._ns)

    def charge(self, conv: Hashable, ns: int) -> None:
        ns = operator.index(ns)  # as the compiled ``long long``: no float, no str
        held = self._ns
        if conv in held:
            held.move_to_end(conv)
            held[conv] += ns
        else:
            if len(held) >= self.capacity:
                held.popitem(last=False)
                self.dropped += 1
            held[conv] = ns
        self.total_ns += ns

    def get(self, conv: Hashable, default: int = 0) -> int:
        """The nanoseconds charged to ``conv``, or ``default`` when it holds none."""
        return self._ns.get(conv, default)

    def items(self) -> list[tuple[Hashable, int]]:
        """``[(conv, ns), ...]`` from the least recently charged to the most."""
        return list(self._ns.items())


class MessageMeter:
    """The node's measures of each message it lands (``kefu._core.meters``' doc).

    ``clock_ns``: ``time.perf_counter_ns``, the clock of the ``received`` times (a test passes
    its own). ``roles``: the senders' roles counted, each from 0 (``counts``); a role not among
    them is counted too, from its first message.
    """

    __slots__ = (
        "_clock_ns",
        "_counts",
        "_persist",
        "_received_delivered",
        "_received_persisted",
        "_run_ns",
        "_run_s",
        "_t1",
        "ledger",
        "messages_total",
    )

    def __init__(
        self,
        persist: Histogram,
        received_persisted: Histogram,
        received_delivered: Histogram,
        ledger: Ledger,
        roles: Iterable[str],
        clock_ns: Callable[[], int],
    ) -> None:
        for h in (persist, received_persisted, received_delivered):
            if not isinstance(h, Histogram):
                raise TypeError(f"expected a Histogram, got {type(h).__name__}")
        if not isinstance(ledger, Ledger):
            raise TypeError(f"expected a Ledger, got {type(ledger).__name__}")
        self._persist = persist
        self._received_persisted = received_persisted
        self._received_delivered = received_delivered
        self.ledger = ledger
        self._counts = {role: 0 for role in roles}
        self._clock_ns = clock_ns
        self.messages_total = 0
        self.start_run()

    def start_run(self) -> None:
        """A run of landings begins: its write was answered now."""
        now = int(self._clock_ns())
        self._run_ns = now
        self._run_s = now / 1e9
        self._t1 = now

    def persisted(self, w0: float, received: int, role: str) -> None:
        """A message of the run was persisted: ``w0``, when its write was queued (seconds of
        the same clock); ``received``, when its frame was read (ns; 0: not from a frame)."""
        if not isinstance(w0, (int, float)):
            raise TypeError(f"must be real number, not {type(w0).__name__}")
        received = operator.index(received)
        self._persist.observe(self._run_s - w0)
        if received:
            self._received_persisted.observe((self._run_ns - received) / 1e9)
        self.messages_total += 1
        counts = self._counts
        counts[role] = counts.get(role, 0) + 1

    def delivered(self, conv: Hashable, received: int, t_sync: int) -> None:
        """The message was acked and delivered: ``conv`` is charged ``t_sync`` (its CPU before
        the write) and the time since the run's previous message was delivered."""
        received, t_sync = operator.index(received), operator.index(t_sync)
        hash(conv)  # an unhashable key raises here, before anything is measured
        now = int(self._clock_ns())
        if received:
            self._received_delivered.observe((now - received) / 1e9)
        self.ledger.charge(conv, t_sync + now - self._t1)
        self._t1 = now

    def counts(self) -> dict[str, int]:
        """Messages persisted by the sender's role."""
        return dict(self._counts)
