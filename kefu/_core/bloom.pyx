"""A fixed-size Bloom filter over byte strings (compiled; the twin is ``kefu._core._bloom_py``).

The store keeps one over its dedup keys so that a ``send`` whose ``client_msg_id`` was never
used (nearly every one) is answered "new" without a RocksDB point read: ``may_contain`` never
answers ``False`` for a key that was added, and answers ``True`` for a key that was not with a
probability that grows with :attr:`BloomFilter.count` (about 1 % at ``capacity`` keys).

The bit array is sized once, from ``capacity`` and ``bits_per_key``, rounded up to a power of
two, and never grows: past ``capacity`` keys :attr:`BloomFilter.full` turns true and the owner
decides what to do (the store stops using the filter). Memory is ``nbytes``.

Hashing: FNV-1a over the key's bytes, finished with splitmix64's mixer, gives ``h1``; ``h2`` is
``h1`` mixed again, made odd; probe ``i`` is bit ``(h1 + i * h2) mod nbits`` (double hashing,
Kirsch and Mitzenmacher). The twin computes the same bits, so both answer alike for the same
sequence of calls.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint64_t
from libc.string cimport memset

__all__ = ["MAX_BITS", "BloomFilter", "debug_counters"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

MAX_BITS = 1 << 36
cdef uint64_t _MAX_BITS = 1ULL << 36

cdef Py_ssize_t _live_filters = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_bloom_filters``: filters not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_bloom_filters": _live_filters}


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _fnv1a(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001B3ULL
    return h


cdef inline int _hash_pair(bytes key, uint64_t* h1, uint64_t* h2) except -1:
    """The two hashes of ``key`` (module doc): probe ``i`` is bit ``h1 + i * h2``."""
    if key is None:
        raise TypeError("key must be bytes, not None")
    h1[0] = _mix(_fnv1a(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))
    h2[0] = _mix(h1[0] ^ 0x9E3779B97F4A7C15ULL) | 1
    return 0


@cython.final
cdef class BloomFilter:
    """``capacity`` keys at ``bits_per_key`` bits each (rounded up to a power of two bits)."""

    cdef uint64_t* _words
    cdef uint64_t _mask
    cdef int _k
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t count
    cdef readonly uint64_t nbits

    def __cinit__(self, Py_ssize_t capacity, int bits_per_key=10):
        global _live_filters
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= bits_per_key <= 64:
            raise ValueError(f"bits_per_key must be in 1..64, got {bits_per_key}")
        cdef uint64_t want = <uint64_t>capacity * <uint64_t>bits_per_key
        if want > _MAX_BITS:
            raise ValueError(f"capacity * bits_per_key must be <= {_MAX_BITS}, got {want}")
        cdef uint64_t nbits = 64
        while nbits < want:
            nbits <<= 1
        # Zeroed pages from the allocator: untouched ones cost no memory until a bit lands.
        self._words = <uint64_t*>PyMem_Calloc(<size_t>(nbits >> 6), 8)
        if self._words == NULL:
            raise MemoryError()
        self.nbits = nbits
        self._mask = nbits - 1
        # k = bits_per_key * ln 2, the count that minimizes false positives at capacity.
        self._k = max(1, min(16, <int>(bits_per_key * 0.6931471805599453 + 0.5)))
        self.capacity = capacity
        self.count = 0
        if KEFU_DEBUG:
            _live_filters += 1

    def __dealloc__(self):
        global _live_filters
        if self._words != NULL:
            PyMem_Free(self._words)
            self._words = NULL
            if KEFU_DEBUG:
                _live_filters -= 1

    @property
    def hashes(self):
        """Bits set (and tested) per key."""
        return self._k

    @property
    def nbytes(self):
        """Bytes of the bit array."""
        return self.nbits >> 3

    @property
    def full(self):
        """Whether ``capacity`` keys were added: past it false positives climb."""
        return self.count >= self.capacity

    cdef inline void _probes(self, bytes key, uint64_t* bits) except *:
        """The ``_k`` bits of ``key`` (module doc: double hashing)."""
        cdef uint64_t h1, h2
        _hash_pair(key, &h1, &h2)
        cdef int i
        for i in range(self._k):
            bits[i] = (h1 + <uint64_t>i * h2) & self._mask

    cpdef void add(self, bytes key):
        """Adds ``key``; counted once per call (a key added twice counts twice)."""
        cdef uint64_t bits[16]
        self._probes(key, bits)
        cdef int i
        for i in range(self._k):
            self._words[bits[i] >> 6] |= (1ULL << (bits[i] & 63))
        self.count += 1

    cpdef bint may_contain(self, bytes key):
        """``False``: ``key`` was never added. ``True``: it may have been."""
        cdef uint64_t bits[16]
        self._probes(key, bits)
        cdef int i
        for i in range(self._k):
            if not (self._words[bits[i] >> 6] >> (bits[i] & 63)) & 1:
                return False
        return True

    def clear(self):
        """Forgets every key."""
        memset(self._words, 0, <size_t>(self.nbits >> 3))
        self.count = 0

    def __len__(self):
        return self.count

    def __contains__(self, key):
        return self.may_contain(key)
