"""The response cache: keys, hits and misses, LRU by entries and by bytes, TTL, refusals."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kefu.bot.cache import ResponseCache, cache_key, normalize_question


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(question: str = "运费多少", **parts: object) -> bytes:
    values: dict[str, object] = {"kb_version": "v1", "entry_ids": ["ship-1"], "model": "m"}
    values.update(parts)
    result = cache_key(question, **values)  # type: ignore[arg-type]
    assert result is not None
    return result


def test_normalisation_ignores_case_width_punctuation_and_spacing() -> None:
    assert normalize_question("运费多少？") == "运 费 多 少 运费 费多 多少"
    assert normalize_question("  Shipping   FEE?! ") == "shipping fee"
    assert key("运费多少？") == key("运费多少") == key("  运费多少!! ")
    assert key("Shipping FEE?") == key("shipping fee") == key("ｓｈｉｐｐｉｎｇ ｆｅｅ")
    assert key("shipping fee") != key("fee shipping")
    assert key("运费多少") != key("运费多")


def test_question_without_tokens_has_no_key_and_is_not_cached() -> None:
    assert cache_key("👍!!", kb_version="v1", entry_ids=[], model="m") is None
    cache = ResponseCache()
    assert not cache.put(None, "answer")
    assert cache.get(None) is None
    stats = cache.stats()
    assert stats["refused"]["uncacheable"] == 1 and stats["misses"] == 1 and stats["entries"] == 0


def test_every_key_part_counts() -> None:
    base = key()
    assert key(kb_version="v2") != base
    assert key(model="other-model") != base
    assert key(entry_ids=["ship-1", "ship-2"]) != base
    assert key(entry_ids=[]) != base
    assert key(context="previous turn") != base
    # No ambiguity from joining parts: ids cannot leak into the version or the model.
    assert key(kb_version="v1", entry_ids=["a", "b"]) != key(kb_version="v1", entry_ids=["a,b"])
    assert key(kb_version=1) == key(kb_version="1")


def test_hit_and_miss() -> None:
    cache = ResponseCache()
    assert cache.get(key()) is None
    assert cache.put(key(), "运费10元")
    assert cache.get(key("运费多少?")) == "运费10元"
    assert cache.get(key(kb_version="v2")) is None  # a new KB version misses
    assert cache.get(key(model="m2")) is None  # so does another model
    assert cache.get(key(entry_ids=["ret-1"])) is None  # and other retrieved entries
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 4 and stats["puts"] == 1


def test_lru_eviction_by_entries_keeps_the_recently_read() -> None:
    cache = ResponseCache(max_entries=3)
    for n in range(3):
        cache.put(key(f"question {n}"), f"answer {n}")
    assert cache.get(key("question 0")) == "answer 0"  # now the most recent
    cache.put(key("question 3"), "answer 3")
    assert len(cache) == 3
    assert cache.get(key("question 1")) is None  # the least recently used went
    assert cache.get(key("question 0")) == "answer 0"
    assert cache.stats()["evictions"] == {"entries": 1, "bytes": 0, "expired": 0}


def test_lru_eviction_by_bytes() -> None:
    cache = ResponseCache(max_entries=1000, max_bytes=8 * 1024)
    answer = "x" * 2000
    for n in range(10):
        assert cache.put(key(f"q {n}"), answer)
        assert cache.bytes_held <= cache.max_bytes
    stats = cache.stats()
    assert stats["evictions"]["bytes"] > 0 and stats["evictions"]["entries"] == 0
    assert 1 <= stats["entries"] < 10
    assert cache.get(key("q 9")) == answer and cache.get(key("q 0")) is None
    assert stats["bytes"] >= stats["entries"] * sys.getsizeof(answer)


def test_answer_larger_than_the_cache_is_refused() -> None:
    cache = ResponseCache(max_bytes=4096)
    assert not cache.put(key(), "y" * 5000)
    assert cache.stats()["refused"]["too_large"] == 1 and len(cache) == 0


def test_ttl_expiry_on_read_and_by_purge() -> None:
    clock = FakeClock()
    cache = ResponseCache(ttl_s=60.0, clock=clock)
    cache.put(key("a"), "A")
    clock.now += 30
    cache.put(key("b"), "B")
    clock.now += 29.9
    assert cache.get(key("a")) == "A"  # reading does not extend the TTL
    clock.now += 0.1
    assert cache.get(key("a")) is None
    assert cache.get(key("b")) == "B"
    clock.now += 30
    assert cache.purge_expired() == 1 and len(cache) == 0 and cache.bytes_held == 0
    assert cache.stats()["evictions"]["expired"] == 2


def test_old_kb_version_entries_age_out() -> None:
    clock = FakeClock()
    cache = ResponseCache(ttl_s=10.0, clock=clock)
    cache.put(key(kb_version="v1"), "old")
    clock.now += 5
    cache.put(key(kb_version="v2"), "new")
    assert cache.get(key(kb_version="v2")) == "new"
    clock.now += 5
    assert cache.purge_expired() == 1  # the v1 entry, never read again, is gone
    assert cache.get(key(kb_version="v2")) == "new"


@pytest.mark.parametrize("finish_reason", ["length", "content_filter", None])
def test_only_complete_answers_are_put(finish_reason: str | None) -> None:
    cache = ResponseCache()
    assert not cache.put(key(), "cut answer", finish_reason=finish_reason)
    assert not cache.put(key(), "   ")
    assert len(cache) == 0
    assert cache.stats()["refused"] == {
        "uncacheable": 0,
        "incomplete": 1,
        "empty": 1,
        "too_large": 0,
    }


def test_replacing_a_key_does_not_count_it_twice() -> None:
    cache = ResponseCache()
    cache.put(key(), "first")
    held = cache.bytes_held
    cache.put(key(), "again")  # same length, so the same size
    assert len(cache) == 1 and cache.bytes_held == held and cache.get(key()) == "again"
    cache.clear()
    assert len(cache) == 0 and cache.bytes_held == 0


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ResponseCache(max_entries=0)
    with pytest.raises(ValueError):
        ResponseCache(max_bytes=10)
    with pytest.raises(ValueError):
        ResponseCache(ttl_s=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 12), st.integers(0, 3000)),
        max_size=80,
    )
)
def test_bounds_hold_under_any_operations(ops: list[tuple[str, int, int]]) -> None:
    clock = FakeClock()
    cache = ResponseCache(max_entries=5, max_bytes=8192, ttl_s=50.0, clock=clock)
    for op, n, size in ops:
        clock.now += 1
        if op == "put":
            cache.put(key(f"q{n}"), "z" * (size + 1))
        else:
            cache.get(key(f"q{n}"))
        assert len(cache) <= 5 and 0 <= cache.bytes_held <= 8192
    stats = cache.stats()
    assert stats["bytes"] == sum(e.nbytes for e in cache._entries.values())
