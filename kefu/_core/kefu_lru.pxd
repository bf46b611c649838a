# The recency order of kefu_lru.h (meters.Ledger, ringbuf.RingSet): declarations only, nothing
# to import at run time.

cdef extern from "kefu_lru.h":
    ctypedef struct kefu_lru:
        Py_ssize_t oldest
        Py_ssize_t newest
        Py_ssize_t allocated
        Py_ssize_t* next
    void kefu_lru_init(kefu_lru* l) noexcept
    int kefu_lru_grow(kefu_lru* l, Py_ssize_t n) except -1
    void kefu_lru_free(kefu_lru* l) noexcept
    void kefu_lru_append(kefu_lru* l, Py_ssize_t i) noexcept
    void kefu_lru_touch(kefu_lru* l, Py_ssize_t i) noexcept
    void kefu_lru_unlink(kefu_lru* l, Py_ssize_t i) noexcept
    void kefu_lru_release(kefu_lru* l, Py_ssize_t i) noexcept
    Py_ssize_t kefu_lru_take_free(kefu_lru* l) noexcept
