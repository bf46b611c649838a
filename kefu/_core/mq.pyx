"""Bounded message queues (compiled; the twin is ``kefu._core._mq_py``).

- :class:`BatchQueue` is the queue the group-commit writer drains: bounded in items and in
  bytes, ``put`` answers ``False`` instead of growing past either bound (the caller turns that
  into back-pressure), and ``drain`` takes the oldest items up to an item and a byte budget.
- :class:`OutboundQueue` is one connection's queue of encoded frames, with write-buffer
  watermarks as asyncio transports have: above ``high_water`` it reports ``PUSH_HIGH`` and
  stays ``paused`` until it drains to ``low_water``; a frame that would take it past
  ``limit_bytes`` (or ``max_frames``) is refused with ``PUSH_SLOW`` and marks the connection
  a slow consumer, which the caller closes with code 4008.
- :func:`fill_batch` and :func:`settle` are the two loops of the writer over a drained batch
  (``kefu.store.GroupCommitWriter._write``): every op of every entry into the RocksDB write
  batch, then, once written, the entries' keys out of the writer's overlay. Each is one C loop
  where the writer ran about 90 bytecodes per message.

Both queues keep their items in a ring whose storage doubles on demand up to the item bound and
falls back to its initial size when a large queue empties, so an idle queue costs little
memory. The items sit in a Python list used as the ring's slot array, so the cyclic GC sees
them; their sizes in a C ``int64_t`` array beside it (a frame's size is taken once, when it is
pushed: a bytearray resized later cannot skew the byte count).

Allocating a list may start a garbage collection, whose finalizers may run any Python code,
this queue's methods included. So every method allocates first and reads the state after
(looking again if a finalizer changed it meanwhile), and releases the objects it drops last,
once the queue is whole again.
"""

cimport cython
from cpython.bool cimport PyBool_Check
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem
from cpython.bytearray cimport PyByteArray_Check, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_Check, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_Check
from cpython.ref cimport PyObject
from libc.stdint cimport INT64_MAX, int64_t, uint64_t

__all__ = [
    "MAX_BYTES",
    "MAX_ITEMS",
    "PUSH_HIGH",
    "PUSH_OK",
    "PUSH_SLOW",
    "BatchQueue",
    "OutboundQueue",
    "debug_counters",
    "fill_batch",
    "settle",
]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

cdef extern from "kefu_slots.h":
    # The same swap, seen twice: _take_slot gives Cython the old reference to own, _put_slot
    # leaves it to the caller to release once the queue is consistent again (_release).
    object _take_slot "kefu_slot_swap"(list slots, Py_ssize_t i, object v)
    PyObject* _put_slot "kefu_slot_swap"(list slots, Py_ssize_t i, object v)
    void _release "Py_DECREF"(PyObject* o)
    void _move "kefu_slot_move"(list out, Py_ssize_t j, list slots, Py_ssize_t i)
    void _exchange "kefu_slot_exchange"(list a, Py_ssize_t i, list b, Py_ssize_t j)
    list PyList_New(Py_ssize_t size)

PUSH_OK = 0
PUSH_HIGH = 1
PUSH_SLOW = 2
MAX_ITEMS = 1 << 26
MAX_BYTES = 1 << 62

cdef enum:
    _PUSH_OK = 0
    _PUSH_HIGH = 1
    _PUSH_SLOW = 2

cdef Py_ssize_t _MAX_ITEMS = 1 << 26
cdef int64_t _MAX_BYTES = 1LL << 62
# Ring storage: allocated at this size, doubled on demand, and given back when a queue whose
# storage grew past _SHRINK_ABOVE slots empties (so a once-backlogged connection does not keep
# its peak memory).
cdef Py_ssize_t _INITIAL_SLOTS = 16
cdef Py_ssize_t _SHRINK_ABOVE = 1024

cdef Py_ssize_t _live_batch_queues = 0
cdef Py_ssize_t _live_outbound_queues = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_batch_queues`` / ``live_outbound_queues``: queues not yet freed. The twin and a
    release build of the compiled module count nothing: every counter is 0.
    """
    return {
        "live_batch_queues": _live_batch_queues,
        "live_outbound_queues": _live_outbound_queues,
    }


cdef int64_t _check_int(str name, object value, int64_t low, int64_t high) except? -1:
    if not PyLong_Check(value) or PyBool_Check(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    # Compared as Python ints first: a huge int must give this error, not an OverflowError.
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return <int64_t>value


cdef int64_t _check_budget(str name, object value, int64_t low) except? -1:
    # A budget (drain, pop_many) has no upper bound: a huge one simply means "no limit".
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(value) or PyBool_Check(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0 or v < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return v


cdef inline Py_ssize_t _wrap(Py_ssize_t slot, Py_ssize_t alloc) noexcept:
    # slot < 2 * alloc at every call, so one subtraction replaces a division.
    return slot - alloc if slot >= alloc else slot


cdef Py_ssize_t _fifo_reset(_Fifo fifo, bint only_if_empty) except -1:
    # Replaces the ring with an empty one of the initial size; returns how many items it held.
    # With only_if_empty, a queue that is not empty once the new storage exists stays as it is.
    cdef Py_ssize_t alloc = min(fifo._max_items, _INITIAL_SLOTS)
    cdef list slots = [None] * alloc
    cdef int64_t* sizes
    cdef Py_ssize_t dropped = fifo._count
    if only_if_empty and dropped:
        return 0
    sizes = <int64_t*>PyMem_Malloc(alloc * sizeof(int64_t))
    if sizes == NULL:
        raise MemoryError()
    # No allocation from here on: the old state is replaced at once.
    PyMem_Free(fifo._sizes)
    fifo._sizes = sizes
    cdef list _old_slots = fifo._slots
    fifo._slots = slots
    fifo._alloc = alloc
    fifo._head = 0
    fifo._count = 0
    fifo._nbytes = 0
    fifo._changes += 1
    # Released last: a finalizer of an old item may look at the queue.
    _old_slots = None
    return dropped


cdef int _fifo_reserve(_Fifo fifo) except -1:
    # Room for one more item, unless the queue holds max_items. Doubling keeps pushes
    # amortized O(1).
    while fifo._count == fifo._alloc and fifo._alloc < fifo._max_items:
        _fifo_grow(fifo)
    return 0


cdef int _fifo_grow(_Fifo fifo) except -1:
    # The ring is unrolled into new storage so that head is 0 again.
    cdef Py_ssize_t alloc = min(2 * fifo._alloc, fifo._max_items)
    cdef Py_ssize_t j, slot, head = fifo._head, count = fifo._count
    cdef uint64_t changes = fifo._changes
    cdef list old = fifo._slots
    cdef list slots = [None] * alloc
    cdef int64_t* sizes
    if fifo._changes != changes:
        return 0  # a finalizer changed the queue: _fifo_reserve looks again
    sizes = <int64_t*>PyMem_Malloc(alloc * sizeof(int64_t))
    if sizes == NULL:
        raise MemoryError()
    for j in range(count):
        slot = _wrap(head + j, fifo._alloc)
        _exchange(slots, j, old, slot)
        sizes[j] = fifo._sizes[slot]
    PyMem_Free(fifo._sizes)
    fifo._sizes = sizes
    fifo._slots = slots
    fifo._alloc = alloc
    fifo._head = 0
    return 0


cdef int _fifo_push(_Fifo fifo, object item, int64_t size) except -1:
    # The caller has reserved room (_fifo_reserve) and checked the bounds.
    cdef Py_ssize_t slot
    slot = _wrap(fifo._head + fifo._count, fifo._alloc)
    fifo._sizes[slot] = size
    fifo._count += 1
    fifo._nbytes += size
    fifo._changes += 1
    _release(_put_slot(fifo._slots, slot, item))  # the slot held None
    return 0


cdef object _fifo_take(_Fifo fifo):
    # The oldest item; the caller has checked that there is one.
    cdef Py_ssize_t slot = fifo._head
    fifo._nbytes -= fifo._sizes[slot]
    fifo._head = _wrap(slot + 1, fifo._alloc)
    fifo._count -= 1
    fifo._changes += 1
    item = _take_slot(fifo._slots, slot, None)
    if fifo._count == 0:
        _fifo_emptied(fifo)
    return item


cdef list _fifo_take_many(_Fifo fifo, Py_ssize_t max_items, int64_t max_bytes):
    # The oldest items, at least one if any, up to max_items and max_bytes.
    cdef Py_ssize_t k, j, slot, limit
    cdef int64_t total, size
    cdef uint64_t changes
    cdef list out
    while True:
        changes = fifo._changes
        k = 0
        total = 0
        slot = fifo._head
        limit = min(max_items, fifo._count)
        while k < limit:
            size = fifo._sizes[slot]
            # total and size are at most MAX_BYTES = 2**62 each: the sum cannot overflow.
            if k and total + size > max_bytes:
                break
            total += size
            k += 1
            slot = _wrap(slot + 1, fifo._alloc)
        out = PyList_New(k)
        if fifo._changes == changes:
            break  # else a finalizer changed the queue while out was allocated: again
    for j in range(k):
        _move(out, j, fifo._slots, _wrap(fifo._head + j, fifo._alloc))
    fifo._head = slot
    fifo._count -= k
    fifo._nbytes -= total
    fifo._changes += 1
    if fifo._count == 0:
        _fifo_emptied(fifo)
    return out


cdef int _fifo_emptied(_Fifo fifo) except -1:
    fifo._head = 0
    if fifo._alloc > _SHRINK_ABOVE:
        _fifo_reset(fifo, True)
    return 0


# no_gc_clear: the cyclic GC must not set a queue's slot list to None while its methods can
# still run; every cycle through a queue passes through that list, whose own tp_clear breaks it.
# binding=False: plain method descriptors instead of cyfunctions, so a call like q.push(frame)
# takes CPython's specialized method-call path, as deque.append does (see ringbuf.pyx: about
# 4 ns less per call, measured).
@cython.no_gc_clear
@cython.binding(False)
cdef class _Fifo:
    """A ring of items with their sizes in bytes, bounded to ``max_items`` items."""

    def __dealloc__(self):
        PyMem_Free(self._sizes)

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count != 0

    @property
    def nbytes(self):
        """The total size in bytes of the queued items."""
        return self._nbytes

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")


@cython.no_gc_clear
@cython.binding(False)
cdef class BatchQueue(_Fifo):
    """A FIFO bounded in items and in bytes, drained in batches by the group-commit writer.

    ``BatchQueue(max_items, max_bytes)``: ``max_items`` from 1 to ``MAX_ITEMS``, ``max_bytes``
    from 1 to ``MAX_BYTES``. ``put`` never lets the queue pass either bound.
    """

    def __cinit__(self, max_items, max_bytes):
        global _live_batch_queues
        if KEFU_DEBUG:
            _live_batch_queues += 1
        self._max_items = _check_int("max_items", max_items, 1, _MAX_ITEMS)
        self._max_bytes = _check_int("max_bytes", max_bytes, 1, _MAX_BYTES)
        _fifo_reset(self, False)

    def __dealloc__(self):
        global _live_batch_queues
        if KEFU_DEBUG:
            _live_batch_queues -= 1

    def put(self, object item, object nbytes):
        """Queues ``item`` of size ``nbytes``; ``False`` (nothing queued) when it does not fit.

        It does not fit when the queue holds ``max_items`` items or when ``nbytes`` would take
        it past ``max_bytes``; each refusal counts in ``rejected``. ``nbytes`` below 0 or above
        ``max_bytes`` (an item that could never fit) raises ``ValueError``.
        """
        cdef int overflow = 0
        cdef long long size
        if not PyLong_Check(nbytes) or PyBool_Check(nbytes):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        size = PyLong_AsLongLongAndOverflow(nbytes, &overflow)
        if overflow < 0 or (overflow == 0 and size < 0):
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if overflow > 0 or size > self._max_bytes:
            raise ValueError(f"nbytes {nbytes} exceeds max_bytes {self._max_bytes}")
        _fifo_reserve(self)
        if self._count == self._max_items or size > self._max_bytes - self._nbytes:
            self._rejected += 1
            return False
        _fifo_push(self, item, size)
        self._put_total += 1
        return True

    def drain(self, max_items=None, max_bytes=None):
        """Removes and returns the oldest items, up to ``max_items`` items and ``max_bytes``.

        At least one item comes out whenever the queue is not empty, even one larger than
        ``max_bytes``; the batch stops before the first item that would pass a budget.
        ``max_items`` must be >= 1 and ``max_bytes`` >= 0 when given.
        """
        cdef int64_t items = INT64_MAX, budget = INT64_MAX
        if max_items is not None:
            items = _check_budget("max_items", max_items, 1)
        if max_bytes is not None:
            budget = _check_budget("max_bytes", max_bytes, 0)
        cdef list taken = _fifo_take_many(self, <Py_ssize_t>min(items, PY_SSIZE_T_MAX), budget)
        self._drained_total += len(taken)
        return taken

    def clear(self):
        """Drops every queued item; returns how many were dropped."""
        return _fifo_reset(self, False)

    @property
    def max_items(self):
        """The most items the queue holds."""
        return self._max_items

    @property
    def max_bytes(self):
        """The most bytes the queued items add up to."""
        return self._max_bytes

    @property
    def is_full(self):
        """Whether the queue holds ``max_items`` items or ``max_bytes`` bytes."""
        return self._count == self._max_items or self._nbytes == self._max_bytes

    @property
    def rejected(self):
        """How many ``put`` calls were refused because the queue was full."""
        return self._rejected

    @property
    def put_total(self):
        """How many items were queued so far."""
        return self._put_total

    @property
    def drained_total(self):
        """How many items ``drain`` returned so far."""
        return self._drained_total

    def __repr__(self):
        return (
            f"BatchQueue(len={self._count}, nbytes={self._nbytes}, "
            f"max_items={self._max_items}, max_bytes={self._max_bytes})"
        )


@cython.no_gc_clear
@cython.binding(False)
cdef class OutboundQueue(_Fifo):
    """One connection's queue of encoded frames, with back-pressure watermarks.

    ``OutboundQueue(limit_bytes=1 << 20, high_water=None, low_water=None, *, max_frames=65536)``:
    ``high_water`` defaults to ``limit_bytes // 2`` and ``low_water`` to ``high_water // 4``;
    they must satisfy ``0 <= low_water <= high_water <= limit_bytes``. Frames are ``bytes``,
    ``bytearray`` or ``memoryview`` objects, sized by their length in bytes when pushed.

    Once a push has been refused (``PUSH_SLOW``), ``slow_consumer`` stays True and every later
    push is refused too: delivering frames after a dropped one would leave a gap.
    """

    def __cinit__(self, limit_bytes=1 << 20, high_water=None, low_water=None, *,
                  max_frames=65536):
        global _live_outbound_queues
        if KEFU_DEBUG:
            _live_outbound_queues += 1
        self._limit_bytes = _check_int("limit_bytes", limit_bytes, 1, _MAX_BYTES)
        if high_water is None:
            self._high_water = self._limit_bytes // 2
        else:
            self._high_water = _check_int("high_water", high_water, 0, self._limit_bytes)
        if low_water is None:
            self._low_water = self._high_water // 4
        else:
            self._low_water = _check_int("low_water", low_water, 0, self._high_water)
        self._max_items = _check_int("max_frames", max_frames, 1, _MAX_ITEMS)
        _fifo_reset(self, False)

    def __dealloc__(self):
        global _live_outbound_queues
        if KEFU_DEBUG:
            _live_outbound_queues -= 1

    def push(self, frame, /):
        """Queues ``frame``; returns ``PUSH_OK``, ``PUSH_HIGH`` or ``PUSH_SLOW``.

        ``PUSH_HIGH``: queued, and the queue is paused (it went above ``high_water`` and has
        not drained to ``low_water`` since). ``PUSH_SLOW``: not queued, because it would take
        the queue past ``limit_bytes`` or ``max_frames``, or a push was refused before.
        """
        cdef int64_t size
        if PyBytes_Check(frame):
            size = PyBytes_GET_SIZE(frame)
        elif PyByteArray_Check(frame):
            size = PyByteArray_GET_SIZE(frame)
        elif PyMemoryView_Check(frame):
            size = frame.nbytes  # raises ValueError for a released view, as in the twin
        else:
            raise TypeError(
                f"frame must be bytes, bytearray or memoryview, not {type(frame).__name__}"
            )
        if self._slow_consumer:
            return _PUSH_SLOW
        _fifo_reserve(self)
        if self._count == self._max_items or size > self._limit_bytes - self._nbytes:
            self._slow_consumer = True
            return _PUSH_SLOW
        _fifo_push(self, frame, size)
        self._pushed_total += 1
        if self._nbytes > self._high_water:
            self._paused = True
        return _PUSH_HIGH if self._paused else _PUSH_OK

    cdef int _drained(self, Py_ssize_t count) except -1:
        self._popped_total += count
        if self._paused and self._nbytes <= self._low_water:
            self._paused = False
        return 0

    def pop(self):
        """Removes and returns the oldest frame; ``IndexError`` when empty."""
        if self._count == 0:
            raise IndexError("pop from an empty OutboundQueue")
        frame = _fifo_take(self)
        self._drained(1)
        return frame

    def pop_many(self, max_bytes):
        """Removes and returns the oldest frames, at least one if any, up to ``max_bytes``.

        Stops before the first frame that would pass ``max_bytes`` (>= 0).
        """
        cdef int64_t budget = _check_budget("max_bytes", max_bytes, 0)
        cdef list frames = _fifo_take_many(self, PY_SSIZE_T_MAX, budget)
        self._drained(len(frames))
        return frames

    def clear(self):
        """Drops every queued frame; returns how many were dropped. ``slow_consumer`` stays."""
        cdef Py_ssize_t dropped = _fifo_reset(self, False)
        self._paused = False
        return dropped

    @property
    def limit_bytes(self):
        """The most bytes the queue holds; a push past it is ``PUSH_SLOW``."""
        return self._limit_bytes

    @property
    def high_water(self):
        """Above this many queued bytes the queue is paused."""
        return self._high_water

    @property
    def low_water(self):
        """A paused queue resumes when it drains to this many bytes or fewer."""
        return self._low_water

    @property
    def max_frames(self):
        """The most frames the queue holds; a push past it is ``PUSH_SLOW``."""
        return self._max_items

    @property
    def paused(self):
        """Whether the producer should hold back (between high and low water)."""
        return self._paused

    @property
    def slow_consumer(self):
        """Whether a push was refused; once True, stays True."""
        return self._slow_consumer

    @property
    def pushed_total(self):
        """How many frames were queued so far."""
        return self._pushed_total

    @property
    def popped_total(self):
        """How many frames ``pop`` and ``pop_many`` returned so far."""
        return self._popped_total

    def __repr__(self):
        return (
            f"OutboundQueue(len={self._count}, nbytes={self._nbytes}, "
            f"limit_bytes={self._limit_bytes}, high_water={self._high_water}, "
            f"low_water={self._low_water}, paused={self._paused}, "
            f"slow_consumer={self._slow_consumer})"
        )


def fill_batch(list entries not None, put, delete):
    """Every op of ``entries`` in order: ``put(key, value)``, or ``delete(key)`` for a value of
    None. An entry has ``ops`` (a list of ``(key, value)`` tuples) and ``messages``; returns
    ``(ops, messages)`` summed over them."""
    cdef Py_ssize_t ops = 0, messages = 0
    cdef list entry_ops
    cdef tuple op
    for entry in entries:
        entry_ops = entry.ops
        for op in entry_ops:
            value = op[1]
            if value is None:
                delete(op[0])
            else:
                put(op[0], value)
        ops += len(entry_ops)
        messages += <Py_ssize_t>entry.messages
    return ops, messages


def settle(list entries not None, dict overlay not None):
    """Once ``entries`` are written: each of their keys leaves ``overlay`` (key -> ``(value,
    serial)``) unless a later entry has written it since (its serial is not the entry's)."""
    cdef tuple op
    cdef PyObject* held
    for entry in entries:
        serial = entry.serial
        for op in entry.ops:
            key = op[0]
            held = PyDict_GetItem(overlay, key)
            if held != NULL and (<object>held)[1] == serial:
                PyDict_DelItem(overlay, key)
