cimport cython
from libc.stdint cimport int64_t, uint64_t


# The unpinned entries live in a ring over ``_slots``, a list of fixed length ``_alloc`` that the
# cyclic GC traverses (a raw PyObject* array would hide the entries from it); ``_keys`` is the
# parallel key array of a keyed buffer. The pinned entry is held apart, in the one-slot list
# ``_pinned`` (a list too, so that any reference cycle through the buffer contains a list).
@cython.final
cdef class RingBuffer:
    cdef list _slots
    cdef int64_t* _keys
    cdef list _pinned
    cdef int64_t _pinned_key
    cdef bint _has_pinned
    cdef bint _keyed
    cdef bint _pinned_head
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _ring_capacity    # capacity less the pinned entry's place
    cdef Py_ssize_t _alloc            # len(_slots): grows by doubling up to _ring_capacity
    cdef Py_ssize_t _head             # slot of the oldest unpinned entry
    cdef Py_ssize_t _count            # unpinned entries
    cdef uint64_t _evicted
    cdef uint64_t _state              # bumped by every change; iterators compare it
    cdef object __weakref__

    cdef int _reset(self) except -1
    cdef int _reserve(self) except -1
    cdef int _grow(self) except -1
    cdef int64_t _new_key(self, object key, bint newest) except? -1
    cdef object _item(self, Py_ssize_t i)
    cdef int64_t _key(self, Py_ssize_t i) noexcept
    cdef Py_ssize_t _position(self, object index) except -1
    cdef Py_ssize_t _first_after(self, int64_t key) noexcept
    cdef list _range(self, Py_ssize_t start, Py_ssize_t stop)
    cdef _nothing_to_pop(self)
    cdef _need_keys(self, str what)
