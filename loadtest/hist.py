"""A log-linear latency histogram in the manner of HdrHistogram, small enough to write here.

Values are microseconds. Below :data:`SUB_BUCKETS` each value has its own bucket; above, every
power of two is cut into ``SUB_BUCKETS / 2`` equal buckets, so a bucket is at most 1/128 of its
value wide (under 0.8 %, close to HdrHistogram's two significant digits). Recording is one
``bit_length`` and a list increment: cheap enough for every message on the client's loop.

Bounds: the counts are a fixed list of :data:`BUCKETS` integers whatever is recorded; values
above :data:`MAX_US` (about 76 hours) go to the last bucket. Histograms of several processes
merge by adding their counts (:meth:`LatencyHistogram.merge`, or over the wire as bytes).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

#: Buckets per power of two is half of this; below it, one bucket per microsecond.
SUB_BUCKETS: Final = 256
_HALF: Final = SUB_BUCKETS // 2
_SUB_BITS: Final = 8  # SUB_BUCKETS == 1 << _SUB_BITS
#: Largest value kept apart from the rest (2**38 us is about 76 hours).
MAX_US: Final = (1 << 38) - 1
BUCKETS: Final = SUB_BUCKETS + (38 - _SUB_BITS) * _HALF


def bucket_of(us: int) -> int:
    """The index of the bucket that holds ``us`` microseconds."""
    if us < SUB_BUCKETS:
        return us if us > 0 else 0
    if us > MAX_US:
        us = MAX_US
    shift = us.bit_length() - _SUB_BITS
    return SUB_BUCKETS + (shift - 1) * _HALF + ((us >> shift) - _HALF)


def _bounds() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Lowest value and width of every bucket."""
    low = np.arange(BUCKETS, dtype=np.float64)
    width = np.ones(BUCKETS, dtype=np.float64)
    i = np.arange(SUB_BUCKETS, BUCKETS)
    shift = (i - SUB_BUCKETS) // _HALF + 1
    low[SUB_BUCKETS:] = (((i - SUB_BUCKETS) % _HALF) + _HALF) * (2.0**shift)
    width[SUB_BUCKETS:] = 2.0**shift
    return low, width


_LOW, _WIDTH = _bounds()


class LatencyHistogram:
    """Counts of latencies in log-linear buckets, with the exact count, min and max."""

    __slots__ = ("counts", "max_us", "min_us", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.max_us = 0
        self.min_us = MAX_US

    def record_ns(self, ns: int) -> None:
        us = ns // 1000
        if us < 0:  # one clock for every process, but be safe
            us = 0
        self.counts[bucket_of(us)] += 1
        self.total += 1
        if us > self.max_us:
            self.max_us = us
        if us < self.min_us:
            self.min_us = us

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)
        self.min_us = min(self.min_us, other.min_us)

    def to_wire(self) -> tuple[bytes, int, int, int]:
        return (
            np.asarray(self.counts, dtype=np.int64).tobytes(),
            self.total,
            self.max_us,
            self.min_us,
        )

    @classmethod
    def from_wire(cls, wire: tuple[bytes, int, int, int]) -> LatencyHistogram:
        h = cls()
        raw, h.total, h.max_us, h.min_us = wire
        h.counts = np.frombuffer(raw, dtype=np.int64).tolist()
        return h

    def percentile_ms(self, q: float) -> float | None:
        """The value at percentile ``q`` (0..100) in ms: the middle of its bucket, at most max."""
        if self.total == 0:
            return None
        if q >= 100:
            return self.max_us / 1000
        counts = np.asarray(self.counts, dtype=np.int64)
        rank = max(1, int(np.ceil(q / 100 * self.total)))
        i = int(np.searchsorted(np.cumsum(counts), rank))
        mid = _LOW[i] + (_WIDTH[i] - 1) / 2
        return float(min(max(mid, self.min_us), self.max_us)) / 1000

    def summary(self) -> dict[str, float | int | None]:
        """Count and p50/p90/p99/p99.9/max in milliseconds."""
        out: dict[str, float | int | None] = {"count": self.total}
        for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)):
            v = self.percentile_ms(q)
            out[f"{name}_ms"] = None if v is None else round(v, 3)
        out["max_ms"] = round(self.max_us / 1000, 3) if self.total else None
        return out

    def cdf(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(upper bound in ms, cumulative fraction) of every non-empty bucket, for plotting."""
        counts = np.asarray(self.counts, dtype=np.float64)
        nz = counts > 0
        if not nz.any():
            return np.empty(0), np.empty(0)
        cum = np.cumsum(counts)[nz] / counts.sum()
        upper = (_LOW + _WIDTH)[nz] / 1000
        return upper, cum
