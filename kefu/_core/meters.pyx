"""The meters every message passes (compiled; the twin is ``kefu._core._meters_py``).

- :class:`Histogram`: observations counted per bucket and summed, one series of a
  ``kefu.metrics`` histogram. The node observes three per message (time to persist, receive to
  persisted, receive to delivered); here an observation is a binary search over a C array of
  bounds and two stores, where the twin runs a Python frame around ``bisect``.
- :class:`TokenBucket`: a command rate (``kefu.web.ratelimit``), taken once per frame of
  every connection that has one; a C struct of three doubles.
- :class:`Ledger`: the CPU time charged to each conversation (``kefu.node``, "Accounting"),
  bounded: past ``capacity`` conversations the least recently charged is dropped (counted in
  ``dropped``). A dict finds a conversation's slot; its nanoseconds and its place in the
  recency order are C arrays, where the twin moves an ``OrderedDict`` entry.
- :class:`MessageMeter`: what the node measures of each message it lands, in two calls a
  message rather than a dozen Python operations: ``persisted`` (time to persist, receive to
  persisted, the count by sender's role) and ``delivered`` (receive to delivered, and the CPU
  since the last message charged to the conversation in the ledger). ``start_run`` reads the
  clock once for a run of landings (``GroupCommitWriter.set_batch_handler``).

Both answer exactly as the twin for the same sequence of calls (the same floating-point
operations in the same order); ``tests/core/test_meters.py`` runs one suite over both.
"""

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.math cimport INFINITY, isfinite

from kefu._core.kefu_lru cimport (
    kefu_lru,
    kefu_lru_append,
    kefu_lru_free,
    kefu_lru_grow,
    kefu_lru_init,
    kefu_lru_touch,
    kefu_lru_unlink,
)

__all__ = ["Histogram", "Ledger", "MessageMeter", "TokenBucket", "debug_counters"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

cdef Py_ssize_t _live_histograms = 0
cdef Py_ssize_t _live_ledgers = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_histograms``, ``live_ledgers``: histograms and ledgers not yet freed. The twin and a
    release build of the compiled module count nothing: every counter is 0.
    """
    return {"live_histograms": _live_histograms, "live_ledgers": _live_ledgers}


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
        self._observe(v)

    cdef inline void _observe(self, double v) noexcept:
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


@cython.final
cdef class Ledger:
    """Nanoseconds charged per conversation, least recently charged dropped past ``capacity``.

    ``total_ns`` sums every charge, dropped conversations' included. A conversation is any
    hashable key (the node's are ints).
    """

    cdef dict _index  # conversation -> its slot
    cdef list _keys  # slot -> conversation
    cdef long long* _ns
    cdef kefu_lru _lru  # the slots from the least recently charged
    cdef readonly Py_ssize_t capacity
    cdef readonly long long total_ns
    cdef readonly long long dropped

    def __cinit__(self, Py_ssize_t capacity):
        global _live_ledgers
        kefu_lru_init(&self._lru)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._index = {}
        self._keys = []
        if KEFU_DEBUG:
            _live_ledgers += 1

    def __dealloc__(self):
        global _live_ledgers
        if self._index is not None and KEFU_DEBUG:  # made whole by __cinit__
            _live_ledgers -= 1
        PyMem_Free(self._ns)
        self._ns = NULL
        kefu_lru_free(&self._lru)

    def __len__(self):
        return len(self._keys)

    cdef int _grow(self) except -1:
        cdef Py_ssize_t n = min(max(2 * self._lru.allocated, 64), self.capacity)
        cdef long long* ns = <long long*>PyMem_Realloc(self._ns, n * sizeof(long long))
        if ns == NULL:
            raise MemoryError()
        self._ns = ns
        kefu_lru_grow(&self._lru, n)
        return 0

    def charge(self, conv, long long ns):
        self._charge(conv, ns)

    cdef int _charge(self, object conv, long long ns) except -1:
        hash(conv)  # an unhashable key raises here, before anything is dropped
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        cdef Py_ssize_t i
        if found != NULL:
            i = <Py_ssize_t><object>found
            self._ns[i] += ns
            kefu_lru_touch(&self._lru, i)
        else:
            i = len(self._keys)
            if i < self.capacity:
                if i == self._lru.allocated:
                    self._grow()
                self._keys.append(conv)
            else:
                i = self._lru.oldest
                PyDict_DelItem(self._index, self._keys[i])
                kefu_lru_unlink(&self._lru, i)
                self._keys[i] = conv
                self.dropped += 1
            PyDict_SetItem(self._index, conv, i)
            self._ns[i] = ns
            kefu_lru_append(&self._lru, i)
        self.total_ns += ns
        return 0

    def get(self, conv, default=0):
        """The nanoseconds charged to ``conv``, or ``default`` when it holds none."""
        hash(conv)
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        if found == NULL:
            return default
        return self._ns[<Py_ssize_t><object>found]

    def items(self):
        """``[(conv, ns), ...]`` from the least recently charged to the most."""
        cdef list out = []
        cdef Py_ssize_t i = self._lru.oldest
        while i >= 0:
            out.append((self._keys[i], self._ns[i]))
            i = self._lru.next[i]
        return out


@cython.final
cdef class MessageMeter:
    """The node's measures of each message it lands (module doc).

    ``clock_ns``: ``time.perf_counter_ns``, the clock of the ``received`` times (a test passes
    its own). ``roles``: the senders' roles counted, each from 0 (``counts``); a role not among
    them is counted too, from its first message.
    """

    cdef Histogram _persist
    cdef Histogram _received_persisted
    cdef Histogram _received_delivered
    cdef readonly Ledger ledger
    cdef dict _counts
    cdef object _clock_ns
    cdef long long _run_ns
    cdef double _run_s
    cdef long long _t1
    cdef readonly long long messages_total

    def __cinit__(
        self,
        Histogram persist not None,
        Histogram received_persisted not None,
        Histogram received_delivered not None,
        Ledger ledger not None,
        roles,
        clock_ns,
    ):
        self._persist = persist
        self._received_persisted = received_persisted
        self._received_delivered = received_delivered
        self.ledger = ledger
        self._counts = {role: 0 for role in roles}
        self._clock_ns = clock_ns
        self.start_run()

    def start_run(self):
        """A run of landings begins: its write was answered now."""
        cdef long long now = self._clock_ns()
        self._run_ns = now
        self._run_s = now / 1e9
        self._t1 = now

    def persisted(self, double w0, long long received, role):
        """A message of the run was persisted: ``w0``, when its write was queued (seconds of
        the same clock); ``received``, when its frame was read (ns; 0: not from a frame)."""
        self._persist._observe(self._run_s - w0)
        if received:
            self._received_persisted._observe((self._run_ns - received) / 1e9)
        self.messages_total += 1
        cdef dict counts = self._counts
        cdef PyObject* count = PyDict_GetItem(counts, role)
        PyDict_SetItem(counts, role, 1 if count is NULL else <object>count + 1)

    def delivered(self, conv, long long received, long long t_sync):
        """The message was acked and delivered: ``conv`` is charged ``t_sync`` (its CPU before
        the write) and the time since the run's previous message was delivered."""
        hash(conv)  # an unhashable key raises here, before anything is measured
        cdef long long now = self._clock_ns()
        if received:
            self._received_delivered._observe((now - received) / 1e9)
        self.ledger._charge(conv, t_sync + now - self._t1)
        self._t1 = now

    def counts(self):
        """Messages persisted by the sender's role."""
        return dict(self._counts)
