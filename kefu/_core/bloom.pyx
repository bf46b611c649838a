"""A fixed-size Bloom filter over byte strings (compiled; the twin is ``kefu._core._bloom_py``).

The store keeps one over its dedup keys so that a ``send`` whose ``client_msg_id`` was never
used (nearly every one) is answered "new" without a RocksDB point read: ``may_contain`` never
answers ``False`` for a key that was added, and answers ``True`` for a key that was not with a
probability that grows with :attr:`BloomFilter.count` (about 1 % at ``capacity`` keys).

The bit array is sized once, from ``capacity`` and ``bits_per_key``, rounded up to a power of
two (at least one block), and never grows: past ``capacity`` keys :attr:`BloomFilter.full` turns
true and the owner decides what to do (the store stops using the filter). Memory is ``nbytes``.

Blocked (Putze, Sanders and Singler, "Cache-, Hash- and Space-Efficient Bloom Filters"): the
array is cut into blocks of 512 bits, one 64-byte cache line (the array is aligned to them), and
a key's bits all fall in one block. A test or an add is one cache miss, not one per bit: in a
node under load the filter's 8 MiB is out of the caches, and the seven misses a key of a plain
filter took were 1.7 % of the node's core. The price is a slightly higher false-positive rate
at the same size (about 1 % at 10 bits a key, against 0.8 %).

Hashing: FNV-1a over the key's bytes, finished with splitmix64's mixer, gives ``h1``, which
picks the block; ``h2`` is ``h1`` mixed again: its low 9 bits are the first bit's place in the
block and the next 55, made odd, the step, so probe ``i`` is bit ``(a + i * b) mod 512`` of the
block (double hashing, Kirsch and Mitzenmacher, within the block). The twin computes the same
bits, so both answer alike for the same sequence of calls.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport memset

__all__ = ["MAX_BITS", "BloomFilter", "debug_counters"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

MAX_BITS = 1 << 36
cdef uint64_t _MAX_BITS = 1ULL << 36
cdef uint64_t _BLOCK_BITS = 512  # one cache line: a key's bits all fall in one (module doc)

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
    """The two hashes of ``key`` (module doc): ``h1`` picks the block, ``h2`` the bits in it."""
    if key is None:
        raise TypeError("key must be bytes, not None")
    h1[0] = _mix(_fnv1a(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))
    h2[0] = _mix(h1[0] ^ 0x9E3779B97F4A7C15ULL)
    return 0


@cython.final
cdef class BloomFilter:
    """``capacity`` keys at ``bits_per_key`` bits each (rounded up to a power of two bits)."""

    cdef void* _alloc  # what PyMem_Calloc gave; _words is its first 64-byte boundary
    cdef uint64_t* _words
    cdef uint64_t _block_mask
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
        cdef uint64_t nbits = _BLOCK_BITS
        while nbits < want:
            nbits <<= 1
        # Zeroed pages from the allocator: untouched ones cost no memory until a bit lands. A
        # line more than the array, so that its blocks start on cache lines.
        self._alloc = PyMem_Calloc(<size_t>(nbits >> 3) + 64, 1)
        if self._alloc == NULL:
            raise MemoryError()
        self._words = <uint64_t*>((<uintptr_t>self._alloc + 63) & ~(<uintptr_t>63))
        self.nbits = nbits
        self._block_mask = (nbits >> 9) - 1
        # k = bits_per_key * ln 2, the count that minimizes false positives at capacity.
        self._k = max(1, min(16, <int>(bits_per_key * 0.6931471805599453 + 0.5)))
        self.capacity = capacity
        self.count = 0
        if KEFU_DEBUG:
            _live_filters += 1

    def __dealloc__(self):
        global _live_filters
        if self._alloc != NULL:
            PyMem_Free(self._alloc)
            self._alloc = NULL
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

    cdef inline uint64_t* _block(self, bytes key, uint64_t* a, uint64_t* b) except NULL:
        """``key``'s block, and the first bit and the step of its probes in it (module doc)."""
        cdef uint64_t h1, h2
        _hash_pair(key, &h1, &h2)
        a[0] = h2 & 511
        b[0] = (h2 >> 9) | 1
        return self._words + ((h1 & self._block_mask) << 3)

    cpdef void add(self, bytes key):
        """Adds ``key``; counted once per call (a key added twice counts twice)."""
        cdef uint64_t a, b, bit
        cdef uint64_t* block = self._block(key, &a, &b)
        cdef int i
        for i in range(self._k):
            bit = (a + <uint64_t>i * b) & 511
            block[bit >> 6] |= (1ULL << (bit & 63))
        self.count += 1

    cpdef bint may_contain(self, bytes key):
        """``False``: ``key`` was never added. ``True``: it may have been."""
        cdef uint64_t a, b, bit
        cdef uint64_t* block = self._block(key, &a, &b)
        cdef int i
        for i in range(self._k):
            bit = (a + <uint64_t>i * b) & 511
            if not (block[bit >> 6] >> (bit & 63)) & 1:
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
