"""Pure-Python twin of ``kefu._core.meters``: the same histogram and token bucket (that
module's doc), answering alike for the same sequence of calls."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable

__all__ = ["Histogram", "TokenBucket", "debug_counters"]


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_histograms``: histograms not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_histograms": 0}


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
