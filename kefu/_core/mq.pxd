cimport cython
from libc.stdint cimport int64_t, uint64_t


# A ring of items over ``_slots``, a list of fixed length ``_alloc`` that the cyclic GC traverses,
# with each item's size in the parallel C array ``_sizes``. The storage doubles on demand up to
# ``_max_items`` and shrinks back when a large queue empties. The ring operations are module-level
# functions over it (``_fifo_push``, ...): calls from the queue classes are then direct, where
# cdef methods of this base class would go through its vtable.
cdef class _Fifo:
    cdef list _slots
    cdef int64_t* _sizes
    cdef Py_ssize_t _alloc
    cdef Py_ssize_t _head
    cdef Py_ssize_t _count
    cdef Py_ssize_t _max_items
    cdef int64_t _nbytes
    cdef uint64_t _changes    # bumped by every change; checked around allocations


@cython.final
cdef class BatchQueue(_Fifo):
    cdef int64_t _max_bytes
    cdef uint64_t _rejected
    cdef uint64_t _put_total
    cdef uint64_t _drained_total


@cython.final
cdef class OutboundQueue(_Fifo):
    cdef int64_t _limit_bytes
    cdef int64_t _high_water
    cdef int64_t _low_water
    cdef bint _paused
    cdef bint _slow_consumer
    cdef uint64_t _pushed_total
    cdef uint64_t _popped_total

    cdef int _drained(self, Py_ssize_t count) except -1
