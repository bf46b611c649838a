"""Pure-Python twin of ``kefu._core.bloom``: the same filter, the same bits (that module's doc)."""

from __future__ import annotations

__all__ = ["MAX_BITS", "BloomFilter", "debug_counters"]

MAX_BITS = 1 << 36
_M64 = (1 << 64) - 1
_BLOCK_BITS = 512  # one cache line: a key's bits all fall in one block


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_bloom_filters``: filters not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_bloom_filters": 0}


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _hashes(key: bytes) -> tuple[int, int]:
    if not isinstance(key, bytes):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    h = 0xCBF29CE484222325
    for byte in key:
        h = ((h ^ byte) * 0x100000001B3) & _M64
    h1 = _mix(h)
    return h1, _mix(h1 ^ 0x9E3779B97F4A7C15)


class BloomFilter:
    """``capacity`` keys at ``bits_per_key`` bits each (rounded up to a power of two bits)."""

    __slots__ = ("_bits", "_block_mask", "_k", "capacity", "count", "nbits")

    def __init__(self, capacity: int, bits_per_key: int = 10) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= bits_per_key <= 64:
            raise ValueError(f"bits_per_key must be in 1..64, got {bits_per_key}")
        want = capacity * bits_per_key
        if want > MAX_BITS:
            raise ValueError(f"capacity * bits_per_key must be <= {MAX_BITS}, got {want}")
        nbits = _BLOCK_BITS
        while nbits < want:
            nbits <<= 1
        self._bits = bytearray(nbits >> 3)
        self.nbits = nbits
        self._block_mask = (nbits >> 9) - 1
        self._k = max(1, min(16, int(bits_per_key * 0.6931471805599453 + 0.5)))
        self.capacity = capacity
        self.count = 0

    @property
    def hashes(self) -> int:
        return self._k

    @property
    def nbytes(self) -> int:
        return self.nbits >> 3

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def _probes(self, key: bytes) -> list[int]:
        """The bits of ``key``: all in one block of 512 (the compiled module's doc)."""
        h1, h2 = _hashes(key)
        base = (h1 & self._block_mask) << 9
        a, b = h2 & 511, (h2 >> 9) | 1
        return [base + ((a + i * b) & 511) for i in range(self._k)]

    def add(self, key: bytes) -> None:
        bits = self._bits
        for bit in self._probes(key):
            bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1

    def may_contain(self, key: bytes) -> bool:
        bits = self._bits
        return all((bits[bit >> 3] >> (bit & 7)) & 1 for bit in self._probes(key))

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, key: object) -> bool:
        return self.may_contain(key)  # type: ignore[arg-type]
