"""kefu._core.bloom: the fixed-size Bloom filter the store keeps over its dedup keys.

Every test runs over both implementations (``bloom_impl``); ``bloom_pair`` checks that the twin
and the compiled module set the same bits, so they answer alike for the same calls.
"""

from __future__ import annotations

import random
from types import ModuleType

import pytest


def keys(seed: int, n: int, size: int = 30) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, size)) for _ in range(n)]


def test_an_added_key_is_always_found(bloom_impl: ModuleType) -> None:
    f = bloom_impl.BloomFilter(5_000)
    added = keys(1, 5_000)
    for k in added:
        f.add(k)
    assert all(f.may_contain(k) for k in added)
    assert all(k in f for k in added)
    assert len(f) == f.count == 5_000


def test_an_empty_filter_finds_nothing(bloom_impl: ModuleType) -> None:
    f = bloom_impl.BloomFilter(1_000)
    assert not any(f.may_contain(k) for k in keys(2, 2_000))
    assert not f.may_contain(b"")


def false_positive_rate(impl: ModuleType, capacity: int, probes: int, seed: int) -> float:
    """A filter of ``capacity`` keys at 10 bits, full: the share of ``probes`` keys never added
    (of another length than any added) that it may contain."""
    f = impl.BloomFilter(capacity, 10)
    for k in keys(seed, capacity, size=40):
        f.add(k)
    return sum(f.may_contain(b"\x00" * 41 + k) for k in keys(seed + 1, probes)) / probes


def test_false_positives_stay_near_the_design_rate_at_capacity(bloom_impl: ModuleType) -> None:
    # 10 bits per key rounded up to 131,072 bits (13 a key), 7 hashes in 512-bit blocks.
    assert false_positive_rate(bloom_impl, 10_000, 20_000, seed=3) < 0.01


def test_false_positives_at_ten_bits_a_key_stay_near_one_percent(bloom_impl: ModuleType) -> None:
    # 13,107 keys at 10 bits: 131,070 bits, rounded to 131,072 (no slack from the rounding).
    # Blocked, 7 hashes in 512-bit blocks: about 1 % (a plain filter: 0.8 %).
    assert 0.002 < false_positive_rate(bloom_impl, 13_107, 40_000, seed=7) < 0.02


def test_a_keys_bits_fall_in_one_cache_line(bloom_pair: tuple[ModuleType, ModuleType]) -> None:
    py, _ = bloom_pair
    f = py.BloomFilter(100_000, 10)
    blocks = set()
    for k in keys(9, 500):
        probes = f._probes(k)
        assert len(probes) == f.hashes == 7
        assert len({bit >> 9 for bit in probes}) == 1  # one block of 512 bits: 64 bytes
        assert len(set(probes)) == 7  # the step is odd: no bit probed twice
        blocks.add(probes[0] >> 9)
    assert len(blocks) > 400  # and the keys spread over the blocks


def test_sizes_and_hashes(bloom_impl: ModuleType) -> None:
    f = bloom_impl.BloomFilter(10_000, 10)
    assert f.nbits == 131_072 and f.nbytes == 16_384 and f.hashes == 7
    assert bloom_impl.BloomFilter(1, 1).nbits == 512  # one block at least
    assert bloom_impl.BloomFilter(1_000, 4).hashes == 3
    assert bloom_impl.BloomFilter(1_000, 64).hashes == 16


def test_full_at_capacity_and_clear_forgets(bloom_impl: ModuleType) -> None:
    f = bloom_impl.BloomFilter(3)
    for i, k in enumerate([b"a", b"b", b"c"]):
        assert not f.full
        f.add(k)
        assert f.count == i + 1
    assert f.full
    f.add(b"d")  # past capacity: still added, still counted
    assert f.count == 4 and f.may_contain(b"d")
    f.clear()
    assert f.count == 0 and not f.full
    assert not any(f.may_contain(k) for k in (b"a", b"b", b"c", b"d"))


@pytest.mark.parametrize(
    ("capacity", "bits"), [(0, 10), (-1, 10), (10, 0), (10, 65), (1 << 40, 10)]
)
def test_bad_sizes_are_refused(bloom_impl: ModuleType, capacity: int, bits: int) -> None:
    with pytest.raises(ValueError):
        bloom_impl.BloomFilter(capacity, bits)


@pytest.mark.parametrize("bad", [None, "text", 5, bytearray(b"x")])
def test_keys_must_be_bytes(bloom_impl: ModuleType, bad: object) -> None:
    f = bloom_impl.BloomFilter(10)
    with pytest.raises(TypeError):
        f.add(bad)
    with pytest.raises(TypeError):
        f.may_contain(bad)
    assert f.count == 0


def test_twin_and_compiled_answer_alike(bloom_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = bloom_pair
    fp, fc = py.BloomFilter(2_000, 6), c.BloomFilter(2_000, 6)
    for k in keys(5, 2_500):
        fp.add(k)
        fc.add(k)
    probes = keys(6, 5_000)
    answers = [fp.may_contain(k) for k in probes]
    assert answers == [fc.may_contain(k) for k in probes]
    assert 0 < sum(answers) < len(probes)  # past capacity: some false positives, not all


def test_debug_counters(bloom_impl: ModuleType) -> None:
    counters = bloom_impl.debug_counters()
    assert set(counters) == {"live_bloom_filters"}
