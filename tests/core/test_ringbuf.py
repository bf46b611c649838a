"""kefu._core.ringbuf: a fixed-capacity ring buffer, keyed (replay after a seq) or pinned-head.

Every behavioural test runs over both implementations (``ringbuf_impl``); the property tests
drive the twin, the compiled module and the deque-based reference model below with the same
random operations and compare every result and every exception type.
"""

from __future__ import annotations

import copy
import gc
import itertools
import pickle
import sys
import weakref
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY_MIN = -(1 << 63)
KEY_MAX = (1 << 63) - 1


class Payload:
    """A weak-referenceable item, to see when a buffer lets go of it."""

    def __init__(self, name: object) -> None:
        self.name = name
        self.link: object = None

    def __repr__(self) -> str:
        return f"Payload({self.name!r})"


def _filled(impl: ModuleType, capacity: int, items: range | list[Any], **kw: Any) -> Any:
    buf = impl.RingBuffer(capacity, **kw)
    for i, item in enumerate(items):
        if kw.get("keyed"):
            buf.append(item, i)
        else:
            buf.append(item)
    return buf


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, -(1 << 70), (1 << 26) + 1, 1 << 80])
def test_capacity_out_of_range_is_a_value_error(ringbuf_impl: ModuleType, capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ringbuf_impl.RingBuffer(capacity)


@pytest.mark.parametrize("capacity", [True, 2.0, "3", None, [4]])
def test_capacity_of_wrong_type_is_a_type_error(ringbuf_impl: ModuleType, capacity: Any) -> None:
    with pytest.raises(TypeError, match="capacity"):
        ringbuf_impl.RingBuffer(capacity)


def test_pinned_head_needs_room_for_one_more_entry(ringbuf_impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ringbuf_impl.RingBuffer(1, pinned_head=True)
    assert ringbuf_impl.RingBuffer(2, pinned_head=True).capacity == 2


@pytest.mark.parametrize("flag", ["keyed", "pinned_head"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_mode_flags_must_be_bools(ringbuf_impl: ModuleType, flag: str, value: Any) -> None:
    with pytest.raises(TypeError, match=flag):
        ringbuf_impl.RingBuffer(4, **{flag: value})


def test_largest_capacity_allocates_lazily(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(ringbuf_impl.MAX_CAPACITY, keyed=True)
    assert ringbuf_impl.MAX_CAPACITY == 1 << 26
    for k in range(100):
        buf.append(k, k)
    assert buf.capacity == 1 << 26
    assert buf.to_list() == list(range(100))
    assert buf.since(96) == [97, 98, 99]


def test_properties_of_a_new_buffer(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(3, keyed=True, pinned_head=True)
    assert (buf.capacity, buf.keyed, buf.pinned_head) == (3, True, True)
    assert (len(buf), bool(buf), buf.evicted, buf.pinned) == (0, False, 0, None)
    assert buf.first_key is None and buf.last_key is None
    assert buf.to_list() == [] and list(buf) == [] and buf.last(5) == [] and buf.since(0) == []


# -- eviction and wrap-around ----------------------------------------------------------------


def test_capacity_one(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(1)
    buf.append("a")
    buf.append("b")
    assert buf.to_list() == ["b"] and buf.evicted == 1
    buf.appendleft("c")
    assert buf.to_list() == ["c"] and buf.evicted == 2
    assert buf.pop() == "c"
    with pytest.raises(IndexError):
        buf.pop()
    with pytest.raises(IndexError):
        buf.popleft()
    buf.appendleft("d")
    assert buf.popleft() == "d" and len(buf) == 0 and not buf


# 16 is the initial storage: 17 and 33 grow it while the ring is in use.
@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 16, 17, 33])
def test_append_wraps_at_every_boundary(ringbuf_impl: ModuleType, capacity: int) -> None:
    for n in sorted({max(capacity - 1, 0), capacity, capacity + 1, 2 * capacity + 1}):
        buf = _filled(ringbuf_impl, capacity, range(n))
        expected = list(range(n))[-capacity:] if n else []
        assert buf.to_list() == expected
        assert list(buf) == expected
        assert len(buf) == len(expected)
        assert buf.evicted == max(0, n - capacity)
        assert [buf[i] for i in range(len(buf))] == expected
        assert [buf[-i] for i in range(1, len(buf) + 1)] == expected[::-1]


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 16, 40])
def test_mixed_ends_across_the_wrap_point_match_a_deque(
    ringbuf_impl: ModuleType, capacity: int
) -> None:
    buf = ringbuf_impl.RingBuffer(capacity)
    ref: deque[int] = deque(maxlen=capacity)
    evicted = 0
    # A fixed walk that moves head around the ring in both directions, then grows it.
    pattern = "aaLapPaLLaaPpaaaLpLaLLLpPPpaaaaaaLaPLLaaLLLLpppaaaaaaaaaaaaaaaaaaaaaaaa"
    for step, op in enumerate(pattern):
        if op == "a":
            evicted += len(ref) == capacity
            buf.append(step)
            ref.append(step)
        elif op == "L":
            evicted += len(ref) == capacity
            buf.appendleft(step)
            ref.appendleft(step)
        elif op == "p":
            assert buf.pop() == ref.pop() if ref else _raises(IndexError, buf.pop)
        else:
            assert buf.popleft() == ref.popleft() if ref else _raises(IndexError, buf.popleft)
        assert buf.to_list() == list(ref)
        assert buf.evicted == evicted
        if ref:
            assert (buf[0], buf[-1]) == (ref[0], ref[-1])


def _raises(exc: type[BaseException], fn: Callable[[], object]) -> bool:
    with pytest.raises(exc):
        fn()
    return True


def test_growth_while_head_is_mid_ring_keeps_order(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(100, keyed=True)
    for k in range(10):
        buf.append(k, k)
    for _ in range(7):
        buf.popleft()
    for k in range(10, 60):  # the storage grows from 16 with head at slot 7
        buf.append(k, k)
    assert buf.to_list() == list(range(7, 60))
    assert buf.since(40) == list(range(41, 60))
    assert [buf.key_at(i) for i in range(len(buf))] == list(range(7, 60))


def test_pop_and_popleft_on_empty(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(4)
    with pytest.raises(IndexError, match="empty"):
        buf.pop()
    with pytest.raises(IndexError, match="empty"):
        buf.popleft()
    buf.append(1)
    buf.append(2)
    assert (buf.popleft(), buf.pop()) == (1, 2)
    with pytest.raises(IndexError):
        buf.pop()


def test_appendleft_when_full_evicts_the_newest(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 3, ["a", "b", "c"])
    buf.appendleft("z")
    assert buf.to_list() == ["z", "a", "b"] and buf.evicted == 1


# -- reading -----------------------------------------------------------------------------------


def test_getitem_bad_index(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 4, ["a", "b", "c"])
    assert (buf[True], buf[False], buf[-3]) == ("b", "a", "a")
    for index in (3, -4, 1 << 70, -(1 << 70)):
        with pytest.raises(IndexError):
            buf[index]
    for bad in ("1", 1.0, None, slice(0, 1)):
        with pytest.raises(TypeError):
            buf[bad]
    with pytest.raises(IndexError):
        ringbuf_impl.RingBuffer(2)[0]


def test_last(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 4, range(6))
    assert buf.last(0) == []
    assert buf.last(1) == [5]
    assert buf.last(3) == [3, 4, 5]
    assert buf.last(4) == [2, 3, 4, 5]
    assert buf.last(5) == [2, 3, 4, 5]
    assert buf.last(1 << 80) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="n"):
        buf.last(-1)
    with pytest.raises(ValueError, match="n"):
        buf.last(-(1 << 80))
    for bad in ("2", 2.0, None, True):
        with pytest.raises(TypeError, match="n"):
            buf.last(bad)


def test_iteration_fails_when_the_buffer_changes(ringbuf_impl: ModuleType) -> None:
    mutations: list[Callable[[Any], object]] = [
        lambda b: b.append(9),
        lambda b: b.appendleft(9),
        lambda b: b.pop(),
        lambda b: b.popleft(),
        lambda b: b.clear(),
    ]
    for mutate in mutations:
        buf = _filled(ringbuf_impl, 5, [1, 2, 3])
        it = iter(buf)
        assert next(it) == 1
        mutate(buf)
        with pytest.raises(RuntimeError, match="mutated"):
            next(it)
        with pytest.raises(StopIteration):  # finished after the error, as a generator is
            next(it)
    buf = _filled(ringbuf_impl, 5, [1, 2, 3])
    it = iter(buf)  # the state is taken when iter() is called, not at the first next()
    buf.append(4)
    with pytest.raises(RuntimeError):
        next(it)
    it = iter(buf)
    assert [next(it), next(it), next(it), next(it)] == [1, 2, 3, 4]
    buf.append(5)  # after the last item, before the end was seen
    with pytest.raises(RuntimeError):
        next(it)


def test_iteration_without_change_and_reading_do_not_count_as_mutation(
    ringbuf_impl: ModuleType,
) -> None:
    buf = _filled(ringbuf_impl, 3, range(5), keyed=True)
    it = iter(buf)
    assert next(it) == 2
    assert (buf[0], buf.last(1), buf.since(3), buf.to_list(), len(buf)) == (
        2,
        [4],
        [4],
        [2, 3, 4],
        3,
    )
    assert list(it) == [3, 4]
    assert iter(it) is it


def test_repr(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 3, ["a", 1])
    assert repr(buf) == "RingBuffer(['a', 1], capacity=3)"
    buf = ringbuf_impl.RingBuffer(3, keyed=True, pinned_head=True)
    buf.append("sys", 1)
    assert repr(buf) == "RingBuffer(['sys'], capacity=3, keyed=True, pinned_head=True)"
    buf = ringbuf_impl.RingBuffer(2)
    buf.append(buf)
    assert repr(buf) == "RingBuffer([RingBuffer(...)], capacity=2)"


def test_cannot_be_pickled_or_copied(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 3, [1])
    with pytest.raises(TypeError):
        pickle.dumps(buf)
    with pytest.raises(TypeError):
        copy.copy(buf)


# -- keyed mode ------------------------------------------------------------------------------


def test_since_at_every_boundary(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(5, keyed=True)
    for key in (10, 20, 30):
        buf.append(f"m{key}", key)
    cases = {
        KEY_MIN: ["m10", "m20", "m30"],
        9: ["m10", "m20", "m30"],
        10: ["m20", "m30"],
        15: ["m20", "m30"],
        20: ["m30"],
        29: ["m30"],
        30: [],
        31: [],
        KEY_MAX: [],
    }
    for key, expected in cases.items():
        assert buf.since(key) == expected, key
    assert (buf.first_key, buf.last_key) == (10, 30)
    assert [buf.key_at(i) for i in (0, 1, 2, -1, -3)] == [10, 20, 30, 30, 10]


def test_since_with_negative_and_extreme_keys(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(6, keyed=True)
    for key in (KEY_MIN, -5, -3, 0, 2, KEY_MAX):
        buf.append(key, key)
    assert buf.since(-4) == [-3, 0, 2, KEY_MAX]
    assert buf.since(-5) == [-3, 0, 2, KEY_MAX]
    assert buf.since(KEY_MIN) == [-5, -3, 0, 2, KEY_MAX]
    assert buf.since(KEY_MAX - 1) == [KEY_MAX]
    assert (buf.first_key, buf.last_key) == (KEY_MIN, KEY_MAX)


def test_since_after_evictions(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(3, keyed=True)
    for seq in range(1, 11):
        buf.append(f"m{seq}", seq)
    assert buf.since(0) == ["m8", "m9", "m10"]  # the evicted ones are gone
    assert buf.since(7) == ["m8", "m9", "m10"]
    assert buf.since(8) == ["m9", "m10"]
    assert buf.since(10) == []
    assert (buf.first_key, buf.last_key, buf.evicted) == (8, 10, 7)
    buf.appendleft("m5", 5)  # evicts the newest
    assert buf.to_list() == ["m5", "m8", "m9"]
    assert buf.since(6) == ["m8", "m9"]


def test_since_over_a_wrapped_ring_of_every_length(ringbuf_impl: ModuleType) -> None:
    for capacity in (1, 2, 5, 16, 17):
        buf = ringbuf_impl.RingBuffer(capacity, keyed=True)
        keys: deque[int] = deque(maxlen=capacity)
        for seq in range(0, 3 * capacity * 2, 2):  # even keys: probe the odd ones between
            buf.append(seq, seq)
            keys.append(seq)
            for probe in range(keys[0] - 2, keys[-1] + 2):
                assert buf.since(probe) == [k for k in keys if k > probe]


def test_key_rules(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(4, keyed=True)
    with pytest.raises(TypeError, match="key"):
        buf.append("x")
    with pytest.raises(TypeError, match="key"):
        buf.appendleft("x", None)
    buf.append("a", 5)
    for bad_key in (5, 4, KEY_MIN):
        with pytest.raises(ValueError, match="greater"):
            buf.append("x", bad_key)
    for bad_key in (5, 6):
        with pytest.raises(ValueError, match="less"):
            buf.appendleft("x", bad_key)
    for wrong in ("6", 6.0, True, [6]):
        with pytest.raises(TypeError, match="key"):
            buf.append("x", wrong)
    for out_of_range in (KEY_MAX + 1, KEY_MIN - 1, 1 << 100):
        with pytest.raises(ValueError, match="64-bit"):
            buf.append("x", out_of_range)
        with pytest.raises(ValueError, match="64-bit"):
            buf.since(out_of_range)
    assert buf.to_list() == ["a"] and buf.evicted == 0  # every refusal left it unchanged
    buf.append("b", KEY_MAX)
    buf.appendleft("c", KEY_MIN)
    assert buf.to_list() == ["c", "a", "b"]
    with pytest.raises(TypeError, match="key"):
        buf.since("1")
    with pytest.raises(TypeError, match="key"):
        buf.since(None)
    buf.clear()
    buf.append("d", 0)  # keys start afresh after clear
    assert (buf.first_key, buf.last_key) == (0, 0)


def test_keyed_queries_need_a_keyed_buffer(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 3, [1, 2])
    with pytest.raises(TypeError, match="key"):
        buf.append(3, 7)
    with pytest.raises(TypeError, match="key"):
        buf.appendleft(3, key=7)
    for query in (
        lambda: buf.since(0),
        lambda: buf.key_at(0),
        lambda: buf.first_key,
        lambda: buf.last_key,
    ):
        with pytest.raises(TypeError, match="keyed"):
            query()
    assert buf.to_list() == [1, 2]


def test_key_at_bad_index(ringbuf_impl: ModuleType) -> None:
    buf = _filled(ringbuf_impl, 3, ["a"], keyed=True)
    assert buf.key_at(0) == 0 and buf.key_at(-1) == 0
    with pytest.raises(IndexError):
        buf.key_at(1)
    with pytest.raises(TypeError):
        buf.key_at("0")


def test_keys_accept_int_subclasses_but_not_bool(ringbuf_impl: ModuleType) -> None:
    class Seq(int):
        pass

    buf = ringbuf_impl.RingBuffer(3, keyed=True)
    buf.append("a", Seq(3))
    assert buf.last_key == 3 and type(buf.last_key) is int
    with pytest.raises(TypeError):
        buf.append("b", True)


# -- pinned head -----------------------------------------------------------------------------


def test_pinned_head_capacity_two(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(2, pinned_head=True)
    buf.append("system")
    for turn in ("u1", "a1", "u2"):
        buf.append(turn)
    assert buf.to_list() == ["system", "u2"] and buf.evicted == 2
    assert buf.pinned == "system"
    assert buf.pop() == "u2"
    with pytest.raises(IndexError, match="pinned"):
        buf.pop()
    with pytest.raises(IndexError, match="pinned"):
        buf.popleft()
    assert buf.to_list() == ["system"] and len(buf) == 1 and buf


def test_pinned_head_eviction_order(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(4, pinned_head=True)
    for item in ("sys", "t1", "t2", "t3", "t4", "t5"):
        buf.append(item)
    assert buf.to_list() == ["sys", "t3", "t4", "t5"] and buf.evicted == 2
    assert buf.popleft() == "t3"
    buf.appendleft("t2")  # right after the pinned entry
    assert buf.to_list() == ["sys", "t2", "t4", "t5"]
    buf.appendleft("t1")  # full: the newest goes, never the pinned one
    assert buf.to_list() == ["sys", "t1", "t2", "t4"] and buf.evicted == 3
    assert [buf[0], buf[1], buf[-1]] == ["sys", "t1", "t4"]
    assert buf.last(2) == ["t2", "t4"] and buf.last(10) == ["sys", "t1", "t2", "t4"]
    assert (buf.pop(), buf.pop(), buf.pop()) == ("t4", "t2", "t1")
    assert buf.to_list() == ["sys"]
    buf.clear()
    assert (len(buf), buf.pinned, buf.to_list()) == (0, None, [])
    buf.append("new system")
    buf.append("t")
    assert buf.pinned == "new system" and buf.to_list() == ["new system", "t"]


def test_appendleft_into_an_empty_pinned_buffer_pins(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(3, pinned_head=True)
    buf.appendleft("sys")
    buf.appendleft("b")
    buf.appendleft("a")
    assert buf.pinned == "sys" and buf.to_list() == ["sys", "a", "b"]


def test_pinned_none_is_still_pinned(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(2, pinned_head=True)
    buf.append(None)
    buf.append("x")
    buf.append("y")
    assert buf.to_list() == [None, "y"] and len(buf) == 2


def test_keyed_pinned_head(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(3, keyed=True, pinned_head=True)
    buf.append("sys", 0)
    for seq in range(1, 6):
        buf.append(f"m{seq}", seq)
    assert buf.to_list() == ["sys", "m4", "m5"]
    assert buf.since(-1) == ["sys", "m4", "m5"]
    assert buf.since(0) == ["m4", "m5"]
    assert buf.since(2) == ["m4", "m5"]
    assert buf.since(4) == ["m5"]
    assert (buf.first_key, buf.last_key, buf.key_at(0)) == (0, 5, 0)
    with pytest.raises(ValueError, match="pinned"):
        buf.appendleft("early", 0)  # must stay after the pinned entry's key
    buf.popleft()
    buf.appendleft("m3", 3)
    assert buf.to_list() == ["sys", "m3", "m5"]
    buf.pop()
    buf.pop()
    with pytest.raises(ValueError, match="greater"):
        buf.append("x", 0)
    buf.appendleft("m1", 1)  # only the pinned entry is left: any key above it
    assert buf.to_list() == ["sys", "m1"]


# -- references and the cyclic GC ------------------------------------------------------------


def _put(buf: Any, item: object, key: int) -> None:
    if buf.keyed:
        buf.append(item, key)
    else:
        buf.append(item)


@pytest.mark.parametrize("kw", [{}, {"keyed": True}, {"pinned_head": True}])
def test_entries_are_released(ringbuf_impl: ModuleType, kw: dict[str, bool]) -> None:
    def make() -> tuple[Any, weakref.ref[Any], weakref.ref[Any]]:
        buf = ringbuf_impl.RingBuffer(3, **kw)
        first, second = Payload(1), Payload(2)
        _put(buf, first, 1)
        _put(buf, second, 2)
        return buf, weakref.ref(first), weakref.ref(second)

    buf, r1, r2 = make()
    for k in range(3, 6):
        _put(buf, Payload(k), k)
    assert r2() is None  # evicted
    if kw.get("pinned_head"):
        assert r1() is buf.pinned  # never evicted
    else:
        assert r1() is None
    buf, r1, r2 = make()
    popped = buf.pop()
    assert popped is r2()
    del popped
    assert r2() is None and r1() is not None
    buf, r1, r2 = make()
    buf.clear()
    assert r1() is None and r2() is None
    buf, r1, r2 = make()
    del buf
    assert r1() is None and r2() is None


def test_reference_counts_balance(ringbuf_impl: ModuleType) -> None:
    item = object()
    before = sys.getrefcount(item)
    buf = ringbuf_impl.RingBuffer(64, keyed=True)
    for k in range(40):  # grows the storage twice
        buf.append(item, k)
    assert sys.getrefcount(item) == before + 40
    assert buf.since(30) == [item] * 9
    buf.popleft()
    buf.pop()
    buf.appendleft(item, -1)
    _ = buf[3], buf.last(2), buf.to_list(), list(buf)
    del _
    assert sys.getrefcount(item) == before + 39
    for k in range(40, 200):  # wraps and evicts
        buf.append(item, k)
    assert sys.getrefcount(item) == before + 64
    buf.clear()
    assert sys.getrefcount(item) == before
    buf.append(item, 0)
    del buf
    assert sys.getrefcount(item) == before


@pytest.mark.parametrize("kw", [{}, {"pinned_head": True}])
def test_cycles_through_a_buffer_are_collected(
    ringbuf_impl: ModuleType, kw: dict[str, bool]
) -> None:
    gc.collect()
    buf = ringbuf_impl.RingBuffer(4, **kw)
    node = Payload("node")
    node.link = buf
    buf.append(node)
    buf.append(Payload("other"))
    refs = [weakref.ref(buf), weakref.ref(node)]
    del buf, node
    # A buffer holding itself, and one referred to by a tuple (which has no tp_clear) only.
    selfish = ringbuf_impl.RingBuffer(2, **kw)
    selfish.append(selfish)
    boxed = ringbuf_impl.RingBuffer(2, **kw)
    boxed.append((boxed,))
    refs += [weakref.ref(selfish), weakref.ref(boxed)]
    del selfish, boxed
    gc.collect()
    assert [r() for r in refs] == [None] * 4


def test_iterator_cycle_is_collected(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(3)
    it = iter(buf)
    buf.append(it)
    ref = weakref.ref(buf)
    del buf, it
    gc.collect()
    assert ref() is None


def test_a_finalizer_of_an_evicted_entry_sees_a_whole_buffer(ringbuf_impl: ModuleType) -> None:
    seen: list[list[Any]] = []

    class Watcher:
        def __init__(self, buf: Any) -> None:
            self.buf = weakref.proxy(buf)

        def __del__(self) -> None:
            seen.append([len(self.buf), self.buf.to_list()])

    buf = ringbuf_impl.RingBuffer(2)
    buf.append(Watcher(buf))
    buf.append("b")
    buf.append("c")  # evicts the watcher
    assert seen == [[2, ["b", "c"]]]
    buf.appendleft(Watcher(buf))  # evicts "c"
    buf.clear()
    assert seen[1] == [0, []]


def _at_next_collection(
    action: Callable[[], object], fired: list[bool], inside: list[bool]
) -> None:
    """Makes cyclic garbage whose finalizer runs ``action`` when the GC collects it."""

    class Finalizer:
        def __del__(self) -> None:
            fired.append(inside[0])
            action()

    bomb = Finalizer()
    bomb.cycle = bomb  # type: ignore[attr-defined]


def _collect_during(call: Callable[[], object]) -> tuple[str, object]:
    """Calls ``call`` with a GC threshold of 1: its first allocation of a container collects."""
    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        return ("ok", call())
    except ValueError as exc:
        return ("raised", type(exc))
    finally:
        gc.set_threshold(*old)


# Python 3.11 collects inside the allocation that passes the threshold, so the finalizer runs
# in the middle of the method; later versions defer it to the next bytecode boundary.
COLLECTS_INSIDE_ALLOCATION = sys.version_info < (3, 12)


@pytest.mark.parametrize(
    ("mutation", "outcome", "after"),
    [
        # The finalizer empties the buffer while append grows it: 100 goes into the empty one.
        ("clear", ("ok", None), [100]),
        # The finalizer appends 1000 first: the key 100 is then checked against 1000.
        ("append", ("raised", ValueError), [*range(16), 1000]),
    ],
)
def test_a_finalizer_run_by_growth_sees_and_leaves_a_whole_buffer(
    ringbuf_impl: ModuleType, mutation: str, outcome: tuple[str, object], after: list[int]
) -> None:
    buf = ringbuf_impl.RingBuffer(64, keyed=True)
    for k in range(16):  # the initial storage is full: the next append grows it
        buf.append(k, k)
    fired: list[bool] = []
    inside = [False]
    action = buf.clear if mutation == "clear" else lambda: buf.append(1000, 1000)
    append = buf.append
    gc.collect()
    _at_next_collection(action, fired, inside)
    inside[0] = True
    result = _collect_during(lambda: append(100, 100))
    inside[0] = False
    gc.collect()
    items = buf.to_list()
    assert len(buf) == len(items) == len(list(buf))
    assert [buf.key_at(i) for i in range(len(buf))] == items
    if COLLECTS_INSIDE_ALLOCATION:
        assert fired == [True]
        assert (result, items) == (outcome, after)
    buf.append(2000, 2000)
    assert buf.last(1) == [2000] and buf.since(1999) == [2000]


def test_a_finalizer_run_by_a_read_is_seen_by_the_read(ringbuf_impl: ModuleType) -> None:
    buf = ringbuf_impl.RingBuffer(8, keyed=True)
    for k in range(8):
        buf.append(k, k)
    fired: list[bool] = []
    inside = [False]
    since = buf.since
    gc.collect()
    _at_next_collection(buf.clear, fired, inside)
    inside[0] = True
    result = _collect_during(lambda: since(2))
    inside[0] = False
    gc.collect()
    if COLLECTS_INSIDE_ALLOCATION:
        assert fired == [True]
        assert result == ("ok", [])  # read again after the finalizer emptied the buffer
    assert (len(buf), buf.to_list()) == (0, [])


def test_debug_counters(ringbuf_impl: ModuleType) -> None:
    before = ringbuf_impl.debug_counters()
    assert set(before) == {"live_buffers"} and all(type(v) is int for v in before.values())
    buf = ringbuf_impl.RingBuffer(2)
    during = ringbuf_impl.debug_counters()["live_buffers"]
    del buf
    after = ringbuf_impl.debug_counters()["live_buffers"]
    assert after == before["live_buffers"]
    # a debug build counts the buffer; a release build and the twin count nothing
    assert during - after in ((1,) if before["live_buffers"] else (0, 1))
    if ringbuf_impl.__name__.endswith("_py"):
        assert during == 0


def test_twin_and_compiled_export_the_same_names(
    ringbuf_pair: tuple[ModuleType, ModuleType],
) -> None:
    py, c = ringbuf_pair
    assert py.__all__ == c.__all__
    public = [n for n in dir(py.RingBuffer) if not n.startswith("_")]
    assert public == [n for n in dir(c.RingBuffer) if not n.startswith("_")]


# -- property tests: twin, compiled and a deque-based model agree ----------------------------


class ModelRingBuffer:
    """The specification over a deque of ``(key, item)`` pairs, plus the pinned pair apart."""

    def __init__(self, capacity: int, keyed: bool, pinned_head: bool) -> None:
        self.capacity, self.keyed, self.pinned_head = capacity, keyed, pinned_head
        self.head: list[tuple[int | None, Any]] = []  # the pinned entry, if any
        self.ring: deque[tuple[int | None, Any]] = deque()
        self.evicted = 0

    @property
    def room(self) -> int:
        return self.capacity - 1 if self.pinned_head else self.capacity

    def entries(self) -> list[tuple[int | None, Any]]:
        return self.head + list(self.ring)

    def _key(self, key: object, position: int) -> int | None:
        if not self.keyed:
            if key is not None:
                raise TypeError
            return None
        if key is None or isinstance(key, bool) or not isinstance(key, int):
            raise TypeError
        if not KEY_MIN <= key <= KEY_MAX:
            raise ValueError
        keys = [k for k, _ in self.entries()]
        keys.insert(position, key)
        if any(a >= b for a, b in itertools.pairwise(keys)):  # type: ignore[operator]
            raise ValueError
        return key

    def append(self, item: Any, key: object = None) -> None:
        k = self._key(key, len(self.entries()))
        if self.pinned_head and not self.head:
            self.head.append((k, item))
            return
        if len(self.ring) == self.room:
            self.ring.popleft()
            self.evicted += 1
        self.ring.append((k, item))

    def appendleft(self, item: Any, key: object = None) -> None:
        k = self._key(key, len(self.head))
        if self.pinned_head and not self.head:
            self.head.append((k, item))
            return
        if len(self.ring) == self.room:
            self.ring.pop()
            self.evicted += 1
        self.ring.appendleft((k, item))

    def pop(self) -> Any:
        if not self.ring:
            raise IndexError
        return self.ring.pop()[1]

    def popleft(self) -> Any:
        if not self.ring:
            raise IndexError
        return self.ring.popleft()[1]

    def clear(self) -> None:
        self.head, self.ring = [], deque()

    def to_list(self) -> list[Any]:
        return [item for _, item in self.entries()]

    def __len__(self) -> int:
        return len(self.entries())

    def __iter__(self) -> Any:
        return iter(self.to_list())

    def _index(self, index: object) -> int:
        if isinstance(index, (str, float)) or index is None:
            raise TypeError
        assert isinstance(index, int)
        if not -len(self) <= index < len(self):
            raise IndexError
        return index

    def __getitem__(self, index: object) -> Any:
        return self.entries()[self._index(index)][1]

    def key_at(self, index: object) -> Any:
        if not self.keyed:
            raise TypeError
        return self.entries()[self._index(index)][0]

    def _need_keys(self) -> None:
        if not self.keyed:
            raise TypeError

    def since(self, key: object) -> list[Any]:
        self._need_keys()
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError
        if not KEY_MIN <= key <= KEY_MAX:
            raise ValueError
        return [item for k, item in self.entries() if k > key]  # type: ignore[operator]

    def last(self, n: object) -> list[Any]:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError
        if n < 0:
            raise ValueError
        return self.to_list()[len(self) - min(n, len(self)) :]

    @property
    def first_key(self) -> Any:
        self._need_keys()
        return self.entries()[0][0] if len(self) else None

    @property
    def last_key(self) -> Any:
        self._need_keys()
        return self.entries()[-1][0] if len(self) else None

    @property
    def pinned(self) -> Any:
        return self.head[0][1] if self.head else None


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        return ("raised", type(exc))


_odd_keys = st.sampled_from([None, "7", 2.5, True, KEY_MIN, KEY_MAX, KEY_MAX + 1, KEY_MIN - 1])
_key_specs = st.one_of(
    st.tuples(st.just("rel"), st.integers(-3, 4)),
    st.tuples(st.just("rel"), st.integers(-3, 4)),
    st.tuples(st.just("odd"), _odd_keys),
)
_indexes = st.one_of(st.integers(-8, 8), st.sampled_from(["0", 1.0, None, 1 << 70]))
_op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 999), _key_specs),
    st.tuples(st.just("append"), st.integers(0, 999), _key_specs),
    st.tuples(st.just("appendleft"), st.integers(0, 999), _key_specs),
    st.tuples(st.sampled_from(["pop", "popleft", "clear", "first_key", "last_key", "iter"])),
    st.tuples(st.just("since"), _key_specs),
    st.tuples(st.just("last"), st.one_of(st.integers(-2, 9), st.just("3"))),
    st.tuples(st.sampled_from(["getitem", "key_at"]), _indexes),
)
_ops = st.lists(_op, max_size=60)
# Long runs of valid appends at both ends first, so that the storage grows (past its initial 16
# slots) with the ring wrapped at any point, then random operations.
_growth_ops = st.tuples(
    st.lists(
        st.tuples(st.sampled_from(["append", "append", "appendleft"]), st.integers(0, 999)),
        min_size=10,
        max_size=45,
    ),
    st.lists(_op, max_size=40),
).map(
    lambda parts: (
        [(op, item, ("rel", 1 if op == "append" else -1)) for op, item in parts[0]] + parts[1]
    )
)


def _resolve(spec: tuple[str, Any], model: ModelRingBuffer, newest: bool) -> Any:
    kind, value = spec
    if kind == "odd":
        return value
    keys = [k for k, _ in model.entries()]
    if not model.keyed:
        return value if value == 4 else None  # an unkeyed buffer mostly gets no key
    if not keys:
        return value
    base = keys[-1] if newest else keys[len(model.head)] if model.ring else keys[0]
    return base + value


def _run_against_model(
    pair: tuple[ModuleType, ModuleType],
    capacity: int,
    keyed: bool,
    pinned_head: bool,
    ops: list[tuple[Any, ...]],
) -> None:
    py, c = pair
    if pinned_head and capacity < 2:
        capacity = 2
    model = ModelRingBuffer(capacity, keyed, pinned_head)
    bufs = [model, py.RingBuffer(capacity, keyed=keyed, pinned_head=pinned_head)]
    bufs.append(c.RingBuffer(capacity, keyed=keyed, pinned_head=pinned_head))
    for op, *args in ops:
        if op in ("append", "appendleft"):
            item, spec = args
            key = _resolve(spec, model, op == "append")
            if key is None:
                calls = [lambda b, op=op, item=item: getattr(b, op)(item)] * 3
            else:
                calls = [lambda b, op=op, item=item, key=key: getattr(b, op)(item, key)] * 3
        elif op == "since":
            key = _resolve(args[0], model, True)
            calls = [lambda b, key=key: b.since(key)] * 3
        elif op == "iter":
            calls = [lambda b: list(b)] * 3
        elif op in ("first_key", "last_key"):
            calls = [lambda b, op=op: getattr(b, op)] * 3
        elif op == "getitem":
            calls = [lambda b, i=args[0]: b[i]] * 3
        elif op in ("key_at", "last"):
            calls = [lambda b, op=op, a=args[0]: getattr(b, op)(a)] * 3
        else:
            calls = [lambda b, op=op: getattr(b, op)()] * 3
        outcomes = [
            _outcome(lambda b=b, call=call: call(b)) for b, call in zip(bufs, calls, strict=True)
        ]
        assert outcomes[0] == outcomes[1] == outcomes[2], (op, args, outcomes)
        states = [(b.to_list(), len(b), bool(len(b)), b.pinned) for b in bufs]
        assert states[0] == states[1] == states[2], (op, args)
        assert bufs[1].evicted == bufs[2].evicted == model.evicted
        assert list(bufs[1]) == list(bufs[2]) == model.to_list()
        assert bool(bufs[1]) == bool(bufs[2]) == bool(len(model))


# The pair fixture holds two modules, never state: sharing it between examples is safe.
_property = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_property
@given(capacity=st.integers(1, 6), keyed=st.booleans(), pinned_head=st.booleans(), ops=_ops)
def test_twin_compiled_and_model_agree(
    ringbuf_pair: tuple[ModuleType, ModuleType],
    capacity: int,
    keyed: bool,
    pinned_head: bool,
    ops: list[tuple[Any, ...]],
) -> None:
    _run_against_model(ringbuf_pair, capacity, keyed, pinned_head, ops)


@_property
@given(
    capacity=st.integers(14, 40),
    keyed=st.booleans(),
    pinned_head=st.booleans(),
    ops=_growth_ops,
)
def test_twin_compiled_and_model_agree_through_growth(
    ringbuf_pair: tuple[ModuleType, ModuleType],
    capacity: int,
    keyed: bool,
    pinned_head: bool,
    ops: list[tuple[Any, ...]],
) -> None:
    _run_against_model(ringbuf_pair, capacity, keyed, pinned_head, ops)


# -- RingSet -------------------------------------------------------------------------------------


class _Item:
    __slots__ = ("seq", "text")

    def __init__(self, seq: int, text: str) -> None:
        self.seq = seq
        self.text = text

    def __repr__(self) -> str:
        return f"_Item({self.seq}, {self.text!r})"


def _seqs(rings: Any, conv: object) -> list[int]:
    ring = rings.get(conv)
    return [] if ring is None else [m.seq for m in ring]


def test_ringset_keeps_recent_items_per_conversation(ringbuf_impl: ModuleType) -> None:
    rings = ringbuf_impl.RingSet(3, 4)
    for seq in range(1, 7):
        rings.remember(1, _Item(seq, "ab"), seq)
    assert _seqs(rings, 1) == [3, 4, 5, 6]  # the ring keeps its newest four
    assert rings.items == 4 and rings.text_bytes == 8 and len(rings) == 1
    rings.remember(1, _Item(6, "late"), 6)  # at or below the newest: left out
    rings.remember(1, _Item(2, "older"), 2)
    assert _seqs(rings, 1) == [3, 4, 5, 6] and rings.text_bytes == 8
    rings.remember(1, _Item(9, "é"), 9)  # a gap: the ring restarts from it
    assert _seqs(rings, 1) == [9] and rings.items == 1 and rings.text_bytes == 2
    assert rings.get(2) is None and rings.touch(2) is None
    assert rings.get(1).first_key == 9 and rings.ring_capacity == 4 and rings.max_rings == 3


def test_ringset_drops_the_least_recently_used_ring(ringbuf_impl: ModuleType) -> None:
    rings = ringbuf_impl.RingSet(2, 8)
    rings.remember("a", _Item(1, "x"), 1)
    rings.remember("b", _Item(1, "yy"), 1)
    rings.touch("a")  # a resume replayed a's ring: b is now the least recently used
    rings.remember("c", _Item(1, "zzz"), 1)
    assert rings.conversations() == ["a", "c"] and rings.dropped == 1
    assert rings.items == 2 and rings.text_bytes == 4
    rings.get("a")  # a read leaves the order as it is
    rings.remember("d", _Item(1, "w"), 1)
    assert rings.conversations() == ["c", "d"] and rings.dropped == 2
    rings.forget("c")
    rings.forget("nobody")
    assert rings.conversations() == ["d"] and rings.items == 1 and rings.text_bytes == 1
    rings.remember("e", _Item(5, "vv"), 5)  # into the slot c left: nothing dropped
    assert rings.conversations() == ["d", "e"] and rings.dropped == 2
    rings.clear()
    assert len(rings) == 0 and rings.items == 0 and rings.text_bytes == 0
    rings.remember("f", _Item(1, "u"), 1)
    assert rings.conversations() == ["f"] and rings.dropped == 2


def test_ringset_refusals_change_nothing(ringbuf_impl: ModuleType) -> None:
    rings = ringbuf_impl.RingSet(1, 2)
    rings.remember(1, _Item(1, "ok"), 1)
    for item, key, conv, exc in (
        (_Item(2, b"bytes"), 2, 2, TypeError),  # type: ignore[arg-type]
        (object(), 2, 2, AttributeError),  # no text
        (_Item(2, "x"), "2", 2, TypeError),
        (_Item(2, "x"), 1 << 63, 2, ValueError),
        (_Item(2, "x"), 2, [2], TypeError),  # an unhashable conversation
    ):
        with pytest.raises(exc):
            rings.remember(conv, item, key)
    assert rings.conversations() == [1] and _seqs(rings, 1) == [1]
    assert rings.items == 1 and rings.text_bytes == 2 and rings.dropped == 0
    for bad in ((0, 2), (2, 0), (1, ringbuf_impl.MAX_CAPACITY + 1)):
        with pytest.raises(ValueError):
            ringbuf_impl.RingSet(*bad)


def test_ringset_twin_and_compiled_agree(ringbuf_pair: tuple[ModuleType, ModuleType]) -> None:
    import random

    py, c = ringbuf_pair
    rng = random.Random(3)
    a, b = py.RingSet(12, 6), c.RingSet(12, 6)
    seqs: dict[int, int] = {}
    texts = ("hi", "你好", "\udcff", "", "a longer message")
    for _ in range(20_000):
        op = rng.random()
        conv = rng.randrange(20)
        if op < 0.85:
            seq = seqs.get(conv, 0) + rng.choice((1, 1, 1, 1, 0, -1, 3))
            seqs[conv] = max(seqs.get(conv, 0), seq)
            item = _Item(seq, rng.choice(texts))
            a.remember(conv, item, seq)
            b.remember(conv, item, seq)
        elif op < 0.93:
            assert (a.touch(conv) is None) == (b.touch(conv) is None)
        elif op < 0.995:
            a.forget(conv)
            b.forget(conv)
        else:
            a.clear()
            b.clear()
        assert (a.items, a.text_bytes, a.dropped, len(a)) == (
            b.items,
            b.text_bytes,
            b.dropped,
            len(b),
        )
    assert a.conversations() == b.conversations()
    for conv in range(20):
        assert _seqs(a, conv) == _seqs(b, conv)
    total = sum(
        len(str(m.text).encode("utf-8", "surrogatepass"))
        for k in a.conversations()
        for m in a.get(k)
    )
    assert a.text_bytes == total
