"""Pure-Python twin of ``kefu._core.bloom``: the same filter, the same bits (that module's doc)."""

from __future__ import annotations

__all__ = ["MAX_BITS", "BloomFilter", "debug_counters"]

MAX_BITS = 1 << 36
_M64 = (1 << 64) - 1


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
    return h1, _mix(h1 ^ 0x9E3779B97F4A7C15) | 1


class BloomFilter:
    """``capacity`` keys at ``bits_per_key`` bits each (rounded up to a power of two bits)."""

    __slots__ = ("_bits", "_k", "_mask", "capacity", "count", "nbits")

    def __init__(self, capacity: int, bits_per_key: int = 10) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= bits_per_key <= 64:
            raise ValueError(f"bits_per_key must be in 1..64, got {bits_per_key}")
        want = capacity * bits_per_key
        if want > MAX_BITS:
            raise ValueError(f"capacity * bits_per_key must be <= {MAX_BITS}, got {want}")
        nbits = 64
        while nbits < want:
            nbits <<= 1
        self._bits = bytearray(nbits >> 3)
        self.nbits = nbits
        self._mask = nbits - 1
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

    def add(self, key: bytes) -> None:
        h1, h2 = _hashes(key)
        bits, mask = self._bits, self._mask
        for i in range(self._k):
            bit = (h1 + i * h2) & _M64 & mask
            bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1

    def may_contain(self, key: bytes) -> bool:
        h1, h2 = _hashes(key)
        bits, mask = self._bits, self._mask
        for i in range(self._k):
            bit = (h1 + i * h2) & _M64 & mask
            if not (bits[bit >> 3] >> (bit & 7)) & 1:
                return False
        return True

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, key: object) -> bool:
        return self.may_contain(key)  # type: ignore[arg-type]
