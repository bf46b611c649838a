"""Two meters every message passes (compiled; the twin is ``kefu._core._meters_py``).

- :class:`Histogram`: observations counted per bucket and summed, one series of a
  ``kefu.metrics`` histogram. The node observes three per message (time to persist, receive to
  persisted, receive to delivered); here an observation is a binary search over a C array of
  bounds and two stores, where the twin runs a Python frame around ``bisect``.
- :class:`TokenBucket`: a command rate (``kefu.web.ratelimit``), taken once per frame of
  every connection that has one; a C struct of three doubles.

Both answer exactly as the twin for the same sequence of calls (the same floating-point
operations in the same order); ``tests/core/test_meters.py`` runs one suite over both.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport INFINITY, isfinite

__all__ = ["Histogram", "TokenBucket", "debug_counters"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

cdef Py_ssize_t _live_histograms = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_histograms``: histograms not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_histograms": _live_histograms}


@cython.final
cdef class Histogram:
    """Observations counted per bucket (not cumulative) and summed.

    ``bounds``: the finite upper bounds, increasing; a value goes to the first bucket whose
    bound is at least the value (Prometheus' ``le``), past the last one to the ``+Inf`` bucket.
    NaN is not counted.
    """

    cdef double* _bounds
    cdef unsigned long long* _counts  # _n + 1: the +Inf bucket last
    cdef Py_ssize_t _n
    cdef double _sum
    cdef readonly tuple bounds

    def __cinit__(self, bounds):
        global _live_histograms
        cdef tuple checked = tuple([float(b) for b in bounds])
        cdef Py_ssize_t n = len(checked), i
        cdef double b, prev = -INFINITY
        for i in range(n):
            b = checked[i]
            if not isfinite(b):
                raise ValueError(f"a histogram bound must be finite, got {b!r}")
            if i and b <= prev:
                raise ValueError("histogram bounds must increase")
            prev = b
        self._bounds = <double*>PyMem_Malloc(max(n, 1) * sizeof(double))
        self._counts = <unsigned long long*>PyMem_Malloc((n + 1) * sizeof(unsigned long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(n):
            self._bounds[i] = checked[i]
        for i in range(n + 1):
            self._counts[i] = 0
        self._n = n
        self._sum = 0.0
        self.bounds = checked
        if KEFU_DEBUG:
            _live_histograms += 1

    def __dealloc__(self):
        global _live_histograms
        if self.bounds is not None and KEFU_DEBUG:  # made whole by __cinit__
            _live_histograms -= 1
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)
        self._bounds = NULL
        self._counts = NULL

    def observe(self, double v):
        if v != v:  # NaN
            return
        # bisect_left: the first bound >= v, the bucket whose ``le`` holds v.
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        cdef double* bounds = self._bounds
        while lo < hi:
            mid = (lo + hi) >> 1
            if bounds[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self._sum += v

    @property
    def sum(self):
        return self._sum

    @property
    def count(self):
        cdef unsigned long long total = 0
        cdef Py_ssize_t i
        for i in range(self._n + 1):
            total += self._counts[i]
        return total

    def counts(self):
        """The count of each bucket, ``+Inf``'s last (not cumulative)."""
        return [self._counts[i] for i in range(self._n + 1)]

    def cumulative(self):
        """``[(le, observations <= le), ...]`` ending with ``(inf, count)``."""
        cdef list out = []
        cdef unsigned long long total = 0
        cdef Py_ssize_t i
        for i in range(self._n + 1):
            total += self._counts[i]
            out.append((self._bounds[i] if i < self._n else INFINITY, total))
        return out


@cython.final
cdef class TokenBucket:
    """``burst`` commands at once, refilled at ``per_second``; starts full.

    The caller passes the time (``loop.time()``, a monotonic clock) so that one clock read
    serves every check of a frame and tests can drive the bucket without sleeping.
    """

    cdef double _tokens
    cdef double _last
    cdef double _burst
    cdef readonly double per_second
    cdef readonly long long burst

    def __cinit__(self, double per_second, long long burst, double now):
        if not per_second > 0 or burst < 1:
            raise ValueError("per_second must be > 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self._burst = <double>burst
        self._tokens = <double>burst
        self._last = now

    def take(self, double now):
        """Spends one token; ``False`` (nothing spent) when the bucket is empty."""
        cdef double tokens = self._tokens + (now - self._last) * self.per_second
        self._last = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def refill(self, double now):
        """Brings the bucket to ``now`` without spending; the tokens it holds."""
        cdef double tokens = self._tokens + (now - self._last) * self.per_second
        self._last = now
        self._tokens = tokens if tokens < self._burst else self._burst
        return self._tokens

    def give_back(self):
        """Returns the token of the last :meth:`take` (a call refused by another bucket)."""
        self._tokens = min(self._tokens + 1.0, self._burst)

    def wait_s(self):
        """Seconds from the last refill until one token is there (0 when one is)."""
        cdef double missing = 1.0 - self._tokens
        return missing / self.per_second if missing > 0 else 0.0

    @property
    def tokens(self):
        """Tokens left at the last :meth:`take` (without the refill since)."""
        return self._tokens
