"""Fixed-capacity ring buffer of Python objects (compiled; the twin is ``kefu._core._ringbuf_py``).

A :class:`RingBuffer` holds at most ``capacity`` entries with O(1) ``append`` / ``appendleft`` /
``pop`` / ``popleft``. When it is full, ``append`` evicts the oldest entry and ``appendleft`` the
newest, as ``collections.deque(maxlen=capacity)`` does; ``evicted`` counts them.

Two modes, which combine:

- ``keyed=True``: every entry carries an int64 key that strictly increases from the oldest entry
  to the newest (a conversation's message ``seq``); ``since(key)`` returns the entries after a
  key by binary search, which is how a client resuming after ``last_seq`` gets what it missed.
- ``pinned_head=True``: the first entry put into an empty buffer (an LLM context's system
  prompt) is pinned: it is never evicted or popped, only ``clear()`` removes it. The other
  ``capacity - 1`` entries behave as a ring buffer of their own placed after it.

:class:`RingSet` holds the keyed rings of many conversations (``kefu.hub``: each message is
kept with one ``remember`` call): at most ``max_rings``, the least recently used dropped past
that, with running totals of the items held and of their ``text`` in UTF-8. A dict finds a
conversation's slot and the recency order is two index arrays (``kefu_lru.h``), where an
``OrderedDict`` moved an entry per message.

The entries sit in a Python list of fixed length used as the ring's slot array, so the cyclic
GC sees them (a buffer holding an object that refers back to the buffer is collected). A raw
``PyObject*`` array with NULL in its empty slots would be about 1.5 ns faster per
append+popleft pair (17.0 against 18.5 ns, measured), mostly None's reference count on empty
slots; but such an array hides the entries from the GC, and a list must hold valid objects
since anything walking ``gc.get_objects()`` can reach it. The keys are a C ``int64_t`` array
beside it. The storage grows by doubling up to the capacity, so an idle buffer with a large
capacity costs little memory; ``clear()`` gives the storage back.

Allocating a list may start a garbage collection, whose finalizers may run any Python code,
this buffer's methods included. So every method allocates first and reads the state after
(looking again if a finalizer changed it meanwhile), and releases the objects it drops last,
once the buffer is whole again.
"""

cimport cython
from cpython.bool cimport PyBool_Check
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyIndex_Check, PyNumber_AsSsize_t
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t

from kefu._core.kefu_lru cimport (
    kefu_lru,
    kefu_lru_append,
    kefu_lru_free,
    kefu_lru_grow,
    kefu_lru_init,
    kefu_lru_release,
    kefu_lru_take_free,
    kefu_lru_touch,
    kefu_lru_unlink,
)

__all__ = ["MAX_CAPACITY", "RingBuffer", "RingSet", "debug_counters"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

cdef extern from "Python.h":
    int Py_ReprEnter(object o) except -1
    void Py_ReprLeave(object o)
    # With a NULL exception type, an int past PY_SSIZE_T_MAX is clamped instead of refused.
    Py_ssize_t _clamped_ssize "PyNumber_AsSsize_t"(object o, PyObject* exc) except? -1

cdef extern from "Python.h":
    bint PyUnicode_Check(object o)
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


cdef extern from "kefu_slots.h":
    # The same swap, seen twice: _take gives Cython the old reference to own (pop), _put leaves
    # it to the caller to release once the buffer is consistent again (_release).
    object _take "kefu_slot_swap"(list slots, Py_ssize_t i, object v)
    PyObject* _put "kefu_slot_swap"(list slots, Py_ssize_t i, object v)
    void _release "Py_DECREF"(PyObject* o)
    void _exchange "kefu_slot_exchange"(list a, Py_ssize_t i, list b, Py_ssize_t j)
    void _fill "kefu_slot_fill"(list out, Py_ssize_t j, object v)
    PyObject* _borrow "kefu_slot_borrow"(list slots, Py_ssize_t i)
    list PyList_New(Py_ssize_t size)

MAX_CAPACITY = 1 << 26

cdef Py_ssize_t _MAX_CAPACITY = 1 << 26
# Slots allocated when a buffer is created or cleared; the storage doubles from here on demand.
cdef Py_ssize_t _INITIAL_SLOTS = 16

cdef Py_ssize_t _live_buffers = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_buffers``: RingBuffer objects not yet freed. The twin and a release build of the
    compiled module count nothing: every counter is 0.
    """
    return {"live_buffers": _live_buffers}


cdef bint _check_flag(str name, object value) except -1:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value is True


cdef int64_t _check_key(object key) except? -1:
    cdef int overflow = 0
    cdef long long value
    if not PyLong_Check(key) or PyBool_Check(key):
        raise TypeError(f"key must be an int, not {type(key).__name__}")
    value = PyLong_AsLongLongAndOverflow(key, &overflow)
    if overflow:
        raise ValueError(f"key must fit a signed 64-bit integer, got {key}")
    return value


cdef Py_ssize_t _check_count(str name, object value) except -1:
    if not PyLong_Check(value) or PyBool_Check(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    # A count past PY_SSIZE_T_MAX means "all of them": clamp rather than overflow.
    return _clamped_ssize(value, NULL)


cdef inline Py_ssize_t _wrap(Py_ssize_t slot, Py_ssize_t alloc) noexcept:
    # slot < 2 * alloc at every call, so one subtraction replaces a division.
    return slot - alloc if slot >= alloc else slot


# binding=False: plain method descriptors instead of cyfunctions, which CPython calls as it
# calls deque.append. Measured per append+popleft pair through bound methods: 27.6 ns with
# cyfunctions, 19.5 ns without (collections.deque: about 20 ns).
# no_gc_clear: the cyclic GC must not set a buffer's attributes to None while its methods can
# still run; every cycle through a buffer passes through one of its lists (the slots or the
# pinned cell), whose own tp_clear breaks the cycle.
@cython.no_gc_clear
@cython.binding(False)
cdef class RingBuffer:
    """A bounded FIFO of Python objects with O(1) operations at both ends.

    ``RingBuffer(capacity, *, keyed=False, pinned_head=False)``: ``capacity`` is an int from 1
    (2 with ``pinned_head``) to ``MAX_CAPACITY``. Index 0 is the oldest entry (the pinned one,
    if any), -1 the newest; iteration goes from oldest to newest and raises ``RuntimeError`` if
    the buffer changes meanwhile.
    """

    def __cinit__(self, capacity, *, keyed=False, pinned_head=False):
        global _live_buffers
        cdef Py_ssize_t low
        self._keys = NULL
        if KEFU_DEBUG:
            _live_buffers += 1
        if not PyLong_Check(capacity) or PyBool_Check(capacity):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        self._keyed = _check_flag("keyed", keyed)
        self._pinned_head = _check_flag("pinned_head", pinned_head)
        low = 2 if self._pinned_head else 1
        if not low <= capacity <= _MAX_CAPACITY:
            raise ValueError(
                f"capacity must be between {low} and {_MAX_CAPACITY}"
                f"{' with pinned_head' if self._pinned_head else ''}, got {capacity}"
            )
        self._capacity = capacity
        self._ring_capacity = self._capacity - 1 if self._pinned_head else self._capacity
        self._evicted = 0
        self._state = 0
        self._reset()

    def __dealloc__(self):
        global _live_buffers
        PyMem_Free(self._keys)
        if KEFU_DEBUG:
            _live_buffers -= 1

    cdef int _reset(self) except -1:
        cdef Py_ssize_t alloc = min(self._ring_capacity, _INITIAL_SLOTS)
        cdef list slots = [None] * alloc
        cdef list pinned = [None]
        cdef int64_t* keys = NULL
        if self._keyed:
            keys = <int64_t*>PyMem_Malloc(alloc * sizeof(int64_t))
            if keys == NULL:
                raise MemoryError()
        # No allocation from here on: the old state is replaced at once.
        PyMem_Free(self._keys)
        self._keys = keys
        cdef list _old_slots = self._slots
        cdef list _old_pinned = self._pinned
        self._slots = slots
        self._pinned = pinned
        self._alloc = alloc
        self._head = 0
        self._count = 0
        self._pinned_key = 0
        self._has_pinned = False
        self._state += 1
        # Released last: a finalizer of an old entry may look at the buffer.
        _old_slots = None
        _old_pinned = None
        return 0

    cdef int _reserve(self) except -1:
        # Room for one more unpinned entry, unless the ring is at capacity (then an append
        # evicts). Doubling keeps appends amortized O(1).
        while self._count == self._alloc and self._alloc < self._ring_capacity:
            self._grow()
        return 0

    cdef int _grow(self) except -1:
        # The ring is unrolled into new storage so that head is 0 again.
        cdef Py_ssize_t alloc = min(2 * self._alloc, self._ring_capacity)
        cdef Py_ssize_t j, slot
        cdef int64_t* keys = NULL
        cdef uint64_t state = self._state
        cdef list slots = [None] * alloc
        if self._state != state:
            return 0  # a finalizer changed the buffer: _reserve looks again
        if self._keyed:
            keys = <int64_t*>PyMem_Malloc(alloc * sizeof(int64_t))
            if keys == NULL:
                raise MemoryError()
        for j in range(self._count):
            slot = _wrap(self._head + j, self._alloc)
            _exchange(slots, j, self._slots, slot)
            if keys != NULL:
                keys[j] = self._keys[slot]
        PyMem_Free(self._keys)
        self._keys = keys
        self._slots = slots
        self._alloc = alloc
        self._head = 0
        return 0

    cdef int64_t _new_key(self, object key, bint newest) except? -1:
        cdef int64_t k, bound
        if not self._keyed:
            raise TypeError("key is only accepted by a keyed RingBuffer")
        if key is None:
            raise TypeError("a keyed RingBuffer needs a key")
        k = _check_key(key)
        if newest:
            if self._count:
                bound = self._keys[_wrap(self._head + self._count - 1, self._alloc)]
            elif self._has_pinned:
                bound = self._pinned_key
            else:
                return k
            if k <= bound:
                raise ValueError(f"key must be greater than the newest key {bound}, got {k}")
        else:
            if self._count and k >= self._keys[self._head]:
                raise ValueError(
                    f"key must be less than the oldest key {self._keys[self._head]}, got {k}"
                )
            if self._has_pinned and k <= self._pinned_key:
                raise ValueError(
                    f"key must be greater than the pinned entry's key {self._pinned_key}, got {k}"
                )
        return k

    def append(self, object item, object key=None):
        """Adds ``item`` as the newest entry; when full, evicts the oldest unpinned entry.

        A keyed buffer needs ``key``, greater than the newest entry's key; an unkeyed one
        refuses it (``TypeError``).
        """
        cdef int64_t k = 0
        cdef Py_ssize_t slot
        self._reserve()  # first: it may allocate, and the key is checked against what follows
        if self._keyed or key is not None:
            k = self._new_key(key, True)
        if self._pinned_head and not self._has_pinned:
            _release(_put(self._pinned, 0, item))
            self._pinned_key = k
            self._has_pinned = True
            self._state += 1
            return
        if self._count == self._ring_capacity:
            slot = self._head
            self._head = _wrap(slot + 1, self._alloc)
            self._evicted += 1
        else:
            slot = _wrap(self._head + self._count, self._alloc)
            self._count += 1
        if self._keyed:
            self._keys[slot] = k
        self._state += 1
        # The evicted entry is released last: a finalizer it runs may look at the buffer.
        _release(_put(self._slots, slot, item))

    def appendleft(self, object item, object key=None):
        """Adds ``item`` as the oldest unpinned entry; when full, evicts the newest entry.

        With a pinned entry, ``item`` goes right after it. A keyed buffer needs ``key``, less
        than the oldest unpinned entry's key and greater than the pinned entry's key.
        """
        cdef int64_t k = 0
        self._reserve()  # first: it may allocate, and the key is checked against what follows
        if self._keyed or key is not None:
            k = self._new_key(key, False)
        if self._pinned_head and not self._has_pinned:
            _release(_put(self._pinned, 0, item))
            self._pinned_key = k
            self._has_pinned = True
            self._state += 1
            return
        if self._count == self._ring_capacity:
            # Full: the slot before head is the newest entry's, which this overwrites.
            self._evicted += 1
        else:
            self._count += 1
        self._head = _wrap(self._head + self._alloc - 1, self._alloc)
        if self._keyed:
            self._keys[self._head] = k
        self._state += 1
        _release(_put(self._slots, self._head, item))

    cdef _nothing_to_pop(self):
        if self._has_pinned:
            raise IndexError("pop from a RingBuffer holding only its pinned entry")
        raise IndexError("pop from an empty RingBuffer")

    def pop(self):
        """Removes and returns the newest entry (never the pinned one); ``IndexError`` if none."""
        if self._count == 0:
            self._nothing_to_pop()
        self._count -= 1
        self._state += 1
        return _take(self._slots, _wrap(self._head + self._count, self._alloc), None)

    def popleft(self):
        """Removes and returns the oldest unpinned entry; ``IndexError`` if there is none."""
        cdef Py_ssize_t slot = self._head
        if self._count == 0:
            self._nothing_to_pop()
        self._head = _wrap(slot + 1, self._alloc)
        self._count -= 1
        self._state += 1
        return _take(self._slots, slot, None)

    def clear(self):
        """Removes every entry, the pinned one too (the next entry put in is pinned again)."""
        self._reset()

    # -- reading ----------------------------------------------------------------------------

    cdef object _item(self, Py_ssize_t i):
        # Logical position i, 0 being the pinned entry if there is one.
        if self._has_pinned:
            if i == 0:
                return <object>_borrow(self._pinned, 0)
            i -= 1
        return <object>_borrow(self._slots, _wrap(self._head + i, self._alloc))

    cdef int64_t _key(self, Py_ssize_t i) noexcept:
        if self._has_pinned:
            if i == 0:
                return self._pinned_key
            i -= 1
        return self._keys[_wrap(self._head + i, self._alloc)]

    cdef Py_ssize_t _position(self, object index) except -1:
        cdef Py_ssize_t i, n
        if not PyIndex_Check(index):
            raise TypeError(f"RingBuffer indices must be integers, not {type(index).__name__}")
        i = PyNumber_AsSsize_t(index, IndexError)  # may run __index__: the length is read after
        n = self._count + self._has_pinned
        if i < 0:
            i += n
        if i < 0 or i >= n:
            raise IndexError("RingBuffer index out of range")
        return i

    cdef list _range(self, Py_ssize_t start, Py_ssize_t stop):
        # Entries at logical positions start <= i < stop, as a new list; None when a finalizer
        # changed the buffer while the list was allocated (the caller then looks again).
        cdef uint64_t state = self._state
        cdef list out = PyList_New(stop - start)
        cdef Py_ssize_t j = 0, i
        if self._state != state:
            return None
        if self._has_pinned:
            if start == 0 and stop > 0:
                _fill(out, 0, <object>_borrow(self._pinned, 0))
                j = 1
                start = 1
            start -= 1
            stop -= 1
        for i in range(start, stop):
            _fill(out, j, <object>_borrow(self._slots, _wrap(self._head + i, self._alloc)))
            j += 1
        return out

    cdef Py_ssize_t _first_after(self, int64_t key) noexcept:
        # The first logical position whose key is greater than key (len if none).
        cdef Py_ssize_t lo = 0, hi = self._count + self._has_pinned, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._key(mid) <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef _need_keys(self, str what):
        if not self._keyed:
            raise TypeError(f"{what} needs a keyed RingBuffer")

    def __len__(self):
        return self._count + self._has_pinned

    def __bool__(self):
        return self._count != 0 or self._has_pinned

    def __getitem__(self, index):
        """The entry at ``index`` (0 is the oldest, -1 the newest)."""
        return self._item(self._position(index))

    def key_at(self, index):
        """The key of the entry at ``index`` (keyed buffers only)."""
        self._need_keys("key_at()")
        return self._key(self._position(index))

    def __iter__(self):
        return RingBufferIterator(self)

    def to_list(self):
        """All entries, oldest first."""
        cdef list out = None
        while out is None:
            out = self._range(0, self._count + self._has_pinned)
        return out

    def last(self, n):
        """The ``n`` newest entries, oldest first (all of them when ``n`` exceeds the length)."""
        cdef Py_ssize_t wanted = _check_count("n", n)  # may run Python code: size read after
        cdef Py_ssize_t size
        cdef list out = None
        while out is None:
            size = self._count + self._has_pinned
            out = self._range(size - min(wanted, size), size)
        return out

    def since(self, key):
        """The entries whose key is greater than ``key``, oldest first (keyed buffers only).

        Binary search: O(log n + m) for m entries returned.
        """
        self._need_keys("since()")
        cdef int64_t k = _check_key(key)
        cdef list out = None
        while out is None:
            out = self._range(self._first_after(k), self._count + self._has_pinned)
        return out

    @property
    def first_key(self):
        """The oldest entry's key, None when empty (keyed buffers only)."""
        self._need_keys("first_key")
        return self._key(0) if self._count + self._has_pinned else None

    @property
    def last_key(self):
        """The newest entry's key, None when empty (keyed buffers only)."""
        self._need_keys("last_key")
        cdef Py_ssize_t size = self._count + self._has_pinned
        return self._key(size - 1) if size else None

    @property
    def pinned(self):
        """The pinned entry, or None when there is none."""
        return <object>_borrow(self._pinned, 0)

    @property
    def capacity(self):
        """The most entries the buffer holds, the pinned one included."""
        return self._capacity

    @property
    def keyed(self):
        """Whether entries carry keys."""
        return self._keyed

    @property
    def pinned_head(self):
        """Whether the first entry put into the empty buffer is pinned."""
        return self._pinned_head

    @property
    def evicted(self):
        """How many entries were evicted by appends to the full buffer so far."""
        return self._evicted

    def __repr__(self):
        if Py_ReprEnter(self):
            return "RingBuffer(...)"
        try:
            flags = ""
            if self._keyed:
                flags += ", keyed=True"
            if self._pinned_head:
                flags += ", pinned_head=True"
            return f"RingBuffer({self.to_list()!r}, capacity={self._capacity}{flags})"
        finally:
            Py_ReprLeave(self)

    def __reduce__(self):
        raise TypeError("RingBuffer cannot be pickled or copied; use to_list()")


# As for RingBuffer: a cycle through an iterator passes through its buffer's lists.
@cython.binding(False)
@cython.no_gc_clear
cdef class RingBufferIterator:
    """Iterator over a RingBuffer, oldest to newest; fails if the buffer changes meanwhile."""

    cdef RingBuffer _buffer
    cdef Py_ssize_t _next
    cdef Py_ssize_t _stop     # -1 once finished, so that later calls stop as a generator does
    cdef uint64_t _state

    def __cinit__(self, RingBuffer buffer not None):
        self._buffer = buffer
        self._next = 0
        self._stop = buffer._count + buffer._has_pinned
        self._state = buffer._state

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop < 0:
            raise StopIteration
        if self._buffer._state != self._state:
            self._stop = -1
            raise RuntimeError("RingBuffer mutated during iteration")
        if self._next >= self._stop:
            self._stop = -1
            raise StopIteration
        self._next += 1
        return self._buffer._item(self._next - 1)


cdef Py_ssize_t _utf8_len(object text) except -1:
    """Bytes of ``text`` in UTF-8 (a lone surrogate as 3)."""
    if not PyUnicode_Check(text):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    if PyUnicode_IS_ASCII(text):
        return PyUnicode_GET_LENGTH(text)
    return len((<str>text).encode("utf-8", "surrogatepass"))


@cython.final
cdef class RingSet:
    """Keyed rings of recent items by conversation (module doc of ``kefu.hub``).

    At most ``max_rings`` rings of ``ring_capacity`` items each; a new conversation past that
    drops the least recently used ring (``dropped``). ``remember(conv, item, key)`` appends
    ``item`` (its ``text`` a str) to ``conv``'s ring with ``key`` (its ``seq``): a key at or
    below the ring's newest is ignored, and one past a gap restarts the ring. Running totals:
    ``items`` held and their ``text_bytes`` in UTF-8, so that no ring is read to sum them.
    """

    cdef dict _index  # conversation -> its slot
    cdef list _convs  # slot -> conversation (None: a free slot)
    cdef list _rings  # slot -> its RingBuffer (None: a free slot)
    cdef kefu_lru _lru  # the slots from the least recently used
    cdef readonly Py_ssize_t max_rings
    cdef readonly Py_ssize_t ring_capacity
    cdef readonly long long items
    cdef readonly long long text_bytes
    cdef readonly long long dropped

    def __cinit__(self, Py_ssize_t max_rings, Py_ssize_t ring_capacity):
        kefu_lru_init(&self._lru)
        if max_rings < 1:
            raise ValueError(f"max_rings must be >= 1, got {max_rings}")
        if not 1 <= ring_capacity <= _MAX_CAPACITY:
            raise ValueError(
                f"ring_capacity must be between 1 and {_MAX_CAPACITY}, got {ring_capacity}"
            )
        self.max_rings = max_rings
        self.ring_capacity = ring_capacity
        self._index = {}
        self._convs = []
        self._rings = []

    def __dealloc__(self):
        kefu_lru_free(&self._lru)

    def __len__(self):
        return len(self._index)

    cdef int _uncount(self, RingBuffer ring) except -1:
        cdef Py_ssize_t i, n = ring._count + ring._has_pinned
        for i in range(n):
            self.text_bytes -= _utf8_len(ring._item(i).text)
        self.items -= n
        return 0

    cdef Py_ssize_t _new_slot(self) except -1:
        """A slot for a new ring: a free one, a new one, or the least recently used one's."""
        cdef Py_ssize_t i = kefu_lru_take_free(&self._lru)
        if i >= 0:
            return i
        i = len(self._convs)
        if i < self.max_rings:
            if i == self._lru.allocated:
                kefu_lru_grow(&self._lru, min(max(2 * self._lru.allocated, 16), self.max_rings))
            self._convs.append(None)
            self._rings.append(None)
            return i
        i = self._lru.oldest
        kefu_lru_unlink(&self._lru, i)
        PyDict_DelItem(self._index, self._convs[i])
        self._uncount(self._rings[i])
        self.dropped += 1
        return i

    def remember(self, conv, item, key):
        cdef Py_ssize_t size = _utf8_len(item.text)  # refusals first: nothing changed yet
        cdef int64_t k = _check_key(key), last
        hash(conv)
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        cdef Py_ssize_t i
        cdef RingBuffer ring
        cdef object dropped_ring = None  # released last, once the set is whole
        if found != NULL:
            i = <Py_ssize_t><object>found
            ring = self._rings[i]
            kefu_lru_touch(&self._lru, i)
        else:
            ring = RingBuffer(self.ring_capacity, keyed=True)
            i = self._new_slot()
            dropped_ring = self._rings[i]
            self._convs[i] = conv
            self._rings[i] = ring
            PyDict_SetItem(self._index, conv, i)
            kefu_lru_append(&self._lru, i)
        cdef Py_ssize_t held = ring._count + ring._has_pinned
        if held:
            last = ring._key(held - 1)
            if k <= last:
                return  # acks resolved out of order: the ring starts later
            if k != last + 1:
                self._uncount(ring)
                ring._reset()
        if ring._count == ring._ring_capacity:  # the append evicts the oldest
            self.text_bytes -= _utf8_len(ring._item(0).text)
        else:
            self.items += 1
        self.text_bytes += size
        ring.append(item, key)
        dropped_ring = None

    def get(self, conv):
        """``conv``'s ring, or None; its place in the order is left as it is."""
        hash(conv)
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        if found == NULL:
            return None
        return self._rings[<Py_ssize_t><object>found]

    def touch(self, conv):
        """``conv``'s ring, now the most recently used; None when it has none."""
        hash(conv)
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        if found == NULL:
            return None
        cdef Py_ssize_t i = <Py_ssize_t><object>found
        kefu_lru_touch(&self._lru, i)
        return self._rings[i]

    def forget(self, conv):
        """Drops ``conv``'s ring, if it has one (not counted in ``dropped``)."""
        hash(conv)
        cdef PyObject* found = PyDict_GetItem(self._index, conv)
        if found == NULL:
            return
        cdef Py_ssize_t i = <Py_ssize_t><object>found
        ring = self._rings[i]
        kefu_lru_release(&self._lru, i)
        PyDict_DelItem(self._index, conv)
        self._uncount(ring)
        self._convs[i] = None
        self._rings[i] = None

    def clear(self):
        """Drops every ring (not counted in ``dropped``)."""
        cdef list _old_rings = self._rings  # released last, once the set is whole
        self._index = {}
        self._convs = []
        self._rings = []
        kefu_lru_free(&self._lru)
        self.items = 0
        self.text_bytes = 0

    def conversations(self):
        """The conversations with a ring, from the least recently used."""
        cdef list out = []
        cdef Py_ssize_t i = self._lru.oldest
        while i >= 0:
            out.append(self._convs[i])
            i = self._lru.next[i]
        return out
