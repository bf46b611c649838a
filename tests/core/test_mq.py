"""kefu._core.mq: the group-commit BatchQueue and the per-connection OutboundQueue.

Every behavioural test runs over both implementations (``mq_impl``); the property tests drive
the twin, the compiled module and the deque-based reference models below with the same random
operations and compare every result and every exception type.
"""

from __future__ import annotations

import array
import gc
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

MIB = 1 << 20


class Payload:
    """A weak-referenceable item, to see when a queue lets go of it."""

    def __init__(self, name: object) -> None:
        self.name = name
        self.link: object = None


def test_module_constants(mq_impl: ModuleType) -> None:
    assert (mq_impl.PUSH_OK, mq_impl.PUSH_HIGH, mq_impl.PUSH_SLOW) == (0, 1, 2)
    assert mq_impl.MAX_ITEMS == 1 << 26
    assert mq_impl.MAX_BYTES == 1 << 62


# -- BatchQueue ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exc", "name"),
    [
        ((0, 10), ValueError, "max_items"),
        ((-1, 10), ValueError, "max_items"),
        (((1 << 26) + 1, 10), ValueError, "max_items"),
        ((1 << 80, 10), ValueError, "max_items"),
        ((True, 10), TypeError, "max_items"),
        ((2.0, 10), TypeError, "max_items"),
        (("2", 10), TypeError, "max_items"),
        ((2, 0), ValueError, "max_bytes"),
        ((2, -5), ValueError, "max_bytes"),
        ((2, (1 << 62) + 1), ValueError, "max_bytes"),
        ((2, None), TypeError, "max_bytes"),
        ((2, 1.5), TypeError, "max_bytes"),
    ],
)
def test_batch_queue_bad_bounds(
    mq_impl: ModuleType, args: tuple[Any, Any], exc: type[Exception], name: str
) -> None:
    with pytest.raises(exc, match=name):
        mq_impl.BatchQueue(*args)


def test_batch_queue_largest_bounds_allocate_lazily(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(mq_impl.MAX_ITEMS, mq_impl.MAX_BYTES)
    assert q.put("a", mq_impl.MAX_BYTES)
    assert (q.max_items, q.max_bytes, q.nbytes, q.is_full) == (1 << 26, 1 << 62, 1 << 62, True)
    assert q.put("b", 0) is True  # full of bytes, yet a 0-byte item fits
    assert q.drain() == ["a", "b"]


def test_batch_queue_new(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(3, 100)
    assert (len(q), bool(q), q.nbytes, q.is_full) == (0, False, 0, False)
    assert (q.rejected, q.put_total, q.drained_total) == (0, 0, 0)
    assert q.drain() == [] and q.drain(max_items=1, max_bytes=0) == []
    assert repr(q) == "BatchQueue(len=0, nbytes=0, max_items=3, max_bytes=100)"


def test_put_answers_false_when_full_by_items(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(3, 1000)
    assert [q.put(i, 1) for i in range(3)] == [True, True, True]
    assert q.is_full
    assert q.put("late", 0) is False
    assert q.put("later", 1) is False
    assert (len(q), q.nbytes, q.rejected, q.put_total) == (3, 3, 2, 3)
    assert q.drain() == [0, 1, 2]


def test_put_answers_false_when_full_by_bytes(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(10, 100)
    assert q.put("a", 60)
    assert q.put("b", 40)  # exactly max_bytes fits
    assert q.is_full and q.nbytes == 100
    assert q.put("c", 1) is False
    assert q.put("empty", 0)  # a 0-byte item fits a queue full of bytes
    assert (len(q), q.nbytes, q.rejected) == (3, 100, 1)
    assert q.drain(max_items=1) == ["a"]
    assert not q.is_full
    assert q.put("c", 60) is True
    assert q.put("d", 1) is False


def test_put_bad_nbytes(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(4, 100)
    for bad in (101, 1 << 63, 1 << 100):
        with pytest.raises(ValueError, match="max_bytes"):
            q.put("x", bad)
    for bad in (-1, -(1 << 63), -(1 << 100)):
        with pytest.raises(ValueError, match="nbytes"):
            q.put("x", bad)
    for bad in ("3", 3.0, None, True):
        with pytest.raises(TypeError, match="nbytes"):
            q.put("x", bad)
    assert (len(q), q.nbytes, q.rejected, q.put_total) == (0, 0, 0, 0)


def test_drain_budgets(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(10, 1000)
    for name, size in [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("e", 50)]:
        q.put(name, size)
    assert q.drain(max_items=2) == ["a", "b"]
    assert q.nbytes == 120
    assert q.drain(max_bytes=69) == ["c"]  # c + d = 70 would pass 69
    assert q.drain(max_bytes=5) == ["d"]  # at least one, even past the budget
    assert q.drain(max_items=5, max_bytes=1 << 90) == ["e"]
    assert q.drain() == []
    assert (q.nbytes, q.drained_total, q.put_total) == (0, 5, 5)


def test_drain_stops_at_the_first_item_that_does_not_fit(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(10, 1000)
    for name, size in [("z1", 0), ("z2", 0), ("big", 5), ("z3", 0)]:
        q.put(name, size)
    assert q.drain(max_bytes=0) == ["z1", "z2"]
    assert q.drain(max_bytes=4) == ["big"]
    assert q.drain(max_bytes=0) == ["z3"]


def test_drain_exact_budget(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(10, 1000)
    for i in range(6):
        q.put(i, 10)
    assert q.drain(max_bytes=30) == [0, 1, 2]
    assert q.drain(max_items=2, max_bytes=30) == [3, 4]
    assert q.drain(max_items=1 << 80) == [5]


def test_drain_bad_budgets(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(4, 100)
    q.put("a", 1)
    for kwargs, exc in [
        ({"max_items": 0}, ValueError),
        ({"max_items": -1}, ValueError),
        ({"max_items": -(1 << 80)}, ValueError),
        ({"max_bytes": -1}, ValueError),
        ({"max_items": "1"}, TypeError),
        ({"max_items": True}, TypeError),
        ({"max_bytes": 1.0}, TypeError),
    ]:
        name = next(iter(kwargs))
        with pytest.raises(exc, match=name):
            q.drain(**kwargs)
    assert q.drain(1, 0) == ["a"]  # positional budgets too


def test_batch_queue_clear(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(5, 100)
    for i in range(4):
        q.put(i, 10)
    q.put("x", 99)
    assert q.clear() == 4
    assert (len(q), q.nbytes, q.put_total, q.drained_total, q.rejected) == (0, 0, 4, 0, 1)
    assert q.clear() == 0
    assert q.put("y", 100) and q.drain() == ["y"]


def test_batch_queue_wraps_and_grows_in_order(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(100, 1 << 30)
    expected: deque[int] = deque()
    counter = 0
    # Put and drain in uneven rounds so that the storage grows (16, 32, 64, 100 slots) while
    # the ring is wrapped at different points.
    for put_count, drain_count in [(10, 7), (20, 3), (40, 30), (70, 60), (50, 90), (5, 100)]:
        for _ in range(put_count):
            if len(expected) < 100:
                assert q.put(counter, counter % 7)
                expected.append(counter)
                counter += 1
            else:
                assert q.put(counter, 0) is False
        taken = q.drain(max_items=drain_count)
        assert taken == [expected.popleft() for _ in range(len(taken))]
        assert len(taken) == min(drain_count, len(taken) + len(expected))
        assert len(q) == len(expected)
        assert q.nbytes == sum(i % 7 for i in expected)


def test_large_queue_empties_and_refills(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(5000, 1 << 40)
    for round_ in range(3):
        for i in range(3000):  # storage past the shrink threshold
            assert q.put((round_, i), 1)
        assert q.drain(max_items=1000) == [(round_, i) for i in range(1000)]
        assert q.drain() == [(round_, i) for i in range(1000, 3000)]
        assert (len(q), q.nbytes) == (0, 0)


def test_batch_queue_releases_items(mq_impl: ModuleType) -> None:
    def filled() -> tuple[Any, list[weakref.ref[Any]]]:
        q = mq_impl.BatchQueue(40, 1000)
        items = [Payload(i) for i in range(20)]
        for item in items:
            q.put(item, 1)
        return q, [weakref.ref(item) for item in items]

    q, refs = filled()
    batch = q.drain(max_items=5)
    assert [r() for r in refs[:5]] == batch
    del batch
    assert all(r() is None for r in refs[:5]) and all(r() is not None for r in refs[5:])
    q.clear()
    assert all(r() is None for r in refs)
    q, refs = filled()
    del q
    assert all(r() is None for r in refs)


def test_batch_queue_reference_counts_balance(mq_impl: ModuleType) -> None:
    item = object()
    before = sys.getrefcount(item)
    q = mq_impl.BatchQueue(100, 1000)
    for _ in range(50):
        q.put(item, 1)
    assert sys.getrefcount(item) == before + 50
    batch = q.drain(max_items=20)
    assert sys.getrefcount(item) == before + 50
    del batch
    assert sys.getrefcount(item) == before + 30
    q.put(item, 2000 - 1000)  # refused: no new reference
    assert sys.getrefcount(item) == before + 30
    q.clear()
    assert sys.getrefcount(item) == before


def test_cycles_through_a_queue_are_collected(mq_impl: ModuleType) -> None:
    gc.collect()
    q = mq_impl.BatchQueue(4, 100)
    node = Payload("node")
    node.link = q
    q.put(node, 1)
    # A queue holding itself, and one referred to by a tuple (which has no tp_clear) only;
    # the marker beside each dies with its queue.
    selfish = mq_impl.BatchQueue(3, 10)
    selfish.put(selfish, 1)
    boxed = mq_impl.BatchQueue(3, 10)
    boxed.put((boxed,), 1)
    markers = [Payload("in selfish"), Payload("in boxed")]
    selfish.put(markers[0], 1)
    boxed.put(markers[1], 1)
    refs = [weakref.ref(node), *(weakref.ref(m) for m in markers)]
    del q, node, selfish, boxed, markers
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_batch_queue_cannot_be_pickled(mq_impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(mq_impl.BatchQueue(2, 10))
    with pytest.raises(TypeError):
        pickle.dumps(mq_impl.OutboundQueue())


# -- OutboundQueue ---------------------------------------------------------------------------


def test_outbound_defaults(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue()
    assert (q.limit_bytes, q.high_water, q.low_water, q.max_frames) == (
        MIB,
        MIB // 2,
        MIB // 8,
        65536,
    )
    assert (len(q), q.nbytes, q.paused, q.slow_consumer) == (0, 0, False, False)
    assert (q.pushed_total, q.popped_total) == (0, 0)
    q = mq_impl.OutboundQueue(1000)
    assert (q.high_water, q.low_water) == (500, 125)
    q = mq_impl.OutboundQueue(1000, 100)
    assert (q.high_water, q.low_water) == (100, 25)
    q = mq_impl.OutboundQueue(1000, low_water=7)
    assert (q.high_water, q.low_water) == (500, 7)
    q = mq_impl.OutboundQueue(1, 1, 1, max_frames=1)
    assert (q.limit_bytes, q.high_water, q.low_water, q.max_frames) == (1, 1, 1, 1)
    q = mq_impl.OutboundQueue(10, 0, 0)
    assert (q.high_water, q.low_water) == (0, 0)
    assert repr(mq_impl.OutboundQueue(100, 50, 10)) == (
        "OutboundQueue(len=0, nbytes=0, limit_bytes=100, high_water=50, low_water=10, "
        "paused=False, slow_consumer=False)"
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"limit_bytes": 0}, ValueError, "limit_bytes"),
        ({"limit_bytes": (1 << 62) + 1}, ValueError, "limit_bytes"),
        ({"limit_bytes": "1"}, TypeError, "limit_bytes"),
        ({"limit_bytes": True}, TypeError, "limit_bytes"),
        ({"limit_bytes": 100, "high_water": 101}, ValueError, "high_water"),
        ({"limit_bytes": 100, "high_water": -1}, ValueError, "high_water"),
        ({"limit_bytes": 100, "high_water": 5.0}, TypeError, "high_water"),
        ({"limit_bytes": 100, "high_water": 50, "low_water": 51}, ValueError, "low_water"),
        ({"limit_bytes": 100, "low_water": 51}, ValueError, "low_water"),  # default high 50
        ({"limit_bytes": 100, "low_water": -1}, ValueError, "low_water"),
        ({"limit_bytes": 100, "low_water": "0"}, TypeError, "low_water"),
        ({"max_frames": 0}, ValueError, "max_frames"),
        ({"max_frames": (1 << 26) + 1}, ValueError, "max_frames"),
        ({"max_frames": None}, TypeError, "max_frames"),
    ],
)
def test_outbound_bad_bounds(
    mq_impl: ModuleType, kwargs: dict[str, Any], exc: type[Exception], name: str
) -> None:
    with pytest.raises(exc, match=name):
        mq_impl.OutboundQueue(**kwargs)


def test_watermarks_with_exact_byte_counts(mq_impl: ModuleType) -> None:
    ok, high = mq_impl.PUSH_OK, mq_impl.PUSH_HIGH
    q = mq_impl.OutboundQueue(100, 50, 10)
    assert q.push(b"a" * 30) == ok
    assert q.push(b"b" * 20) == ok  # 50: at the high water mark, not above it
    assert q.push(b"") == ok
    assert not q.paused
    assert q.push(b"c") == high  # 51
    assert q.paused
    assert q.pop() == b"a" * 30  # 21 left: above low water, still paused
    assert q.paused
    assert q.push(b"d" * 5) == high  # 26: paused until it drains to low water
    assert q.pop_many(20) == [b"b" * 20, b""]  # the next frame would pass 20 bytes
    assert (q.nbytes, q.paused) == (6, False)
    assert q.push(b"e" * 4) == ok
    assert (len(q), q.nbytes) == (3, 10)


def test_resumes_exactly_at_low_water(mq_impl: ModuleType) -> None:
    ok, high = mq_impl.PUSH_OK, mq_impl.PUSH_HIGH
    q = mq_impl.OutboundQueue(100, 20, 10)
    assert [q.push(b"x" * 11), q.push(b"y" * 11)] == [ok, high]
    q.pop()
    assert (q.nbytes, q.paused) == (11, True)  # one byte above low water
    q.pop()
    assert (q.nbytes, q.paused) == (0, False)
    assert [q.push(b"x" * 11), q.push(b"y" * 10)] == [ok, high]
    q.pop()
    assert (q.nbytes, q.paused) == (10, False)  # at low water
    assert q.push(b"z") == ok


def test_clear_resumes_a_paused_queue(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(100, 10, 5)
    q.push(b"x" * 11)
    q.push(b"y")
    assert q.paused
    assert q.clear() == 2
    assert (len(q), q.nbytes, q.paused, q.popped_total, q.pushed_total) == (0, 0, False, 0, 2)


def test_slow_consumer_is_sticky(mq_impl: ModuleType) -> None:
    high, slow = mq_impl.PUSH_HIGH, mq_impl.PUSH_SLOW
    q = mq_impl.OutboundQueue(100, 50, 10)
    assert q.push(b"a" * 60) == high
    assert q.push(b"b" * 41) == slow  # 101 would pass the limit: not queued
    assert (len(q), q.nbytes, q.slow_consumer, q.pushed_total) == (1, 60, True, 1)
    assert q.push(b"c") == slow  # it would fit, but a frame was dropped before it
    assert q.pop() == b"a" * 60
    assert q.push(b"d") == slow
    q.clear()
    assert q.slow_consumer and q.push(b"") == slow
    assert (len(q), q.pushed_total, q.popped_total) == (0, 1, 1)


def test_limit_is_inclusive(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(100, 100, 0)
    assert q.push(b"x" * 100) == mq_impl.PUSH_OK  # exactly the limit; high water == limit
    assert q.push(b"") == mq_impl.PUSH_OK
    assert q.push(b"y") == mq_impl.PUSH_SLOW
    big = mq_impl.OutboundQueue(100)
    assert big.push(b"z" * 101) == mq_impl.PUSH_SLOW  # could never fit
    assert (len(big), big.slow_consumer) == (0, True)


def test_max_frames_bounds_empty_frames(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(100, max_frames=3)
    assert [q.push(b"") for _ in range(3)] == [mq_impl.PUSH_OK] * 3
    assert (len(q), q.nbytes) == (3, 0)
    assert q.push(b"") == mq_impl.PUSH_SLOW
    assert q.slow_consumer and len(q) == 3


def test_frame_types(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(1000, 1000)
    ints = array.array("i", [1, 2, 3])
    frames: list[Any] = [
        b"abc",
        bytearray(b"defg"),
        memoryview(b"hijkl"),
        memoryview(b"0123456789")[2:5],
        memoryview(ints),
        b"",
    ]
    sizes = [3, 4, 5, 3, 3 * ints.itemsize, 0]
    total = 0
    for frame, size in zip(frames, sizes, strict=True):
        assert q.push(frame) == mq_impl.PUSH_OK
        total += size
        assert q.nbytes == total
    assert len(q) == 6
    popped = [q.pop() for _ in range(6)]
    assert all(a is b for a, b in zip(popped, frames, strict=True))
    assert (q.nbytes, q.pushed_total, q.popped_total) == (0, 6, 6)


def test_frame_of_wrong_type(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(1000)
    for bad in ("text", 5, None, [b"x"], array.array("b", [1]), object()):
        with pytest.raises(TypeError, match="frame"):
            q.push(bad)
    view = memoryview(b"abc")
    view.release()
    with pytest.raises(ValueError):
        q.push(view)
    with pytest.raises(TypeError):
        q.push(frame=b"x")  # positional only
    assert (len(q), q.nbytes, q.pushed_total, q.slow_consumer) == (0, 0, 0, False)


def test_frame_size_is_taken_when_pushed(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(1000)
    frame = bytearray(b"x" * 10)
    q.push(frame)
    q.push(b"tail")
    frame.extend(b"y" * 90)  # the caller changed it after the push
    assert q.nbytes == 14
    assert q.pop() is frame
    assert q.nbytes == 4


def test_pop_and_pop_many(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(1000)
    with pytest.raises(IndexError):
        q.pop()
    assert q.pop_many(100) == []
    for size in (10, 20, 30, 40):
        q.push(b"x" * size)
    assert [len(f) for f in q.pop_many(0)] == [10]  # at least one
    assert [len(f) for f in q.pop_many(49)] == [20]
    assert [len(f) for f in q.pop_many(1 << 70)] == [30, 40]
    assert (q.nbytes, q.popped_total, q.pushed_total) == (0, 4, 4)
    for bad, exc in [(-1, ValueError), (-(1 << 70), ValueError), ("1", TypeError)]:
        with pytest.raises(exc, match="max_bytes"):
            q.pop_many(bad)
    with pytest.raises(TypeError):
        q.pop_many(None)


def test_outbound_wraps_and_grows_in_order(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(10_000, 5000, 100, max_frames=200)
    expected: deque[bytes] = deque()
    n = 0
    for push_count, pop_bytes in [(10, 30), (25, 5), (60, 400), (150, 200), (10, 10_000)]:
        for _ in range(push_count):
            frame = bytes([n % 256]) * (n % 9)
            n += 1
            if len(expected) < 200:
                assert q.push(frame) != mq_impl.PUSH_SLOW
                expected.append(frame)
        taken = q.pop_many(pop_bytes)
        assert taken == [expected.popleft() for _ in range(len(taken))]
        assert q.nbytes == sum(map(len, expected))
        assert len(q) == len(expected)
    assert not q.slow_consumer


def test_outbound_reference_counts_balance(mq_impl: ModuleType) -> None:
    frame = b"shared frame payload"
    before = sys.getrefcount(frame)
    q = mq_impl.OutboundQueue(10_000)
    for _ in range(40):
        q.push(frame)
    assert sys.getrefcount(frame) == before + 40
    q.pop()
    batch = q.pop_many(100)
    del batch
    assert sys.getrefcount(frame) == before + 40 - 1 - 5
    q.clear()
    assert sys.getrefcount(frame) == before
    q.push(frame)
    del q
    assert sys.getrefcount(frame) == before


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


def _collect_during(call: Callable[[], Any]) -> Any:
    """Calls ``call`` with a GC threshold of 1: its first allocation of a container collects."""
    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        return call()
    finally:
        gc.set_threshold(*old)


# Python 3.11 collects inside the allocation that passes the threshold, so the finalizer runs
# in the middle of the method; later versions defer it to the next bytecode boundary.
COLLECTS_INSIDE_ALLOCATION = sys.version_info < (3, 12)


def test_a_finalizer_run_by_growth_sees_and_leaves_a_whole_queue(mq_impl: ModuleType) -> None:
    q = mq_impl.BatchQueue(64, 1000)
    for i in range(16):  # the initial storage is full: the next put grows it
        q.put(i, 10)
    drained: list[Any] = []
    fired: list[bool] = []
    inside = [False]
    put = q.put
    gc.collect()
    _at_next_collection(lambda: drained.extend(q.drain()), fired, inside)
    inside[0] = True
    taken = _collect_during(lambda: put("new", 5))
    inside[0] = False
    gc.collect()
    assert taken is True
    assert drained + q.drain() == [*range(16), "new"]  # each item out exactly once
    if COLLECTS_INSIDE_ALLOCATION:
        assert fired == [True]
        assert drained == list(range(16))  # the finalizer ran while the put grew the storage
    assert (len(q), q.nbytes) == (0, 0)


def test_a_finalizer_run_by_a_drain_is_seen_by_the_drain(mq_impl: ModuleType) -> None:
    q = mq_impl.OutboundQueue(1000)
    for i in range(5):
        q.push(bytes([65 + i]))
    fired: list[bool] = []
    inside = [False]
    pop_many = q.pop_many
    gc.collect()
    _at_next_collection(lambda: q.push(b"late"), fired, inside)
    inside[0] = True
    frames = _collect_during(lambda: pop_many(1000))
    inside[0] = False
    gc.collect()
    assert frames + q.pop_many(1000) == [b"A", b"B", b"C", b"D", b"E", b"late"]
    if COLLECTS_INSIDE_ALLOCATION:
        assert fired == [True]
        assert len(frames) == 6  # counted again after the finalizer pushed
    assert (len(q), q.nbytes, q.popped_total) == (0, 0, 6)


def test_debug_counters(mq_impl: ModuleType) -> None:
    keys = {"live_batch_queues", "live_outbound_queues"}
    before = mq_impl.debug_counters()
    assert set(before) == keys and all(type(v) is int for v in before.values())
    queues = [mq_impl.BatchQueue(2, 2), mq_impl.OutboundQueue()]
    during = mq_impl.debug_counters()
    del queues
    assert mq_impl.debug_counters() == before
    for key in keys:  # a debug build counts; a release build and the twin count nothing
        assert during[key] - before[key] in (0, 1)
    if mq_impl.__name__.endswith("_py"):
        assert set(during.values()) == {0}


def test_twin_and_compiled_export_the_same_names(mq_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = mq_pair
    assert py.__all__ == c.__all__
    for cls in ("BatchQueue", "OutboundQueue"):
        public = [n for n in dir(getattr(py, cls)) if not n.startswith("_")]
        assert public == [n for n in dir(getattr(c, cls)) if not n.startswith("_")]


# -- property tests: twin, compiled and deque-based models agree -----------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ModelBatchQueue:
    """The specification of BatchQueue over a deque of ``(item, nbytes)``."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: deque[tuple[Any, int]] = deque()
        self.rejected = self.put_total = self.drained_total = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_full(self) -> bool:
        return len(self.items) == self.max_items or self.nbytes == self.max_bytes

    def put(self, item: Any, nbytes: object) -> bool:
        if not _is_int(nbytes):
            raise TypeError
        assert isinstance(nbytes, int)
        if nbytes < 0 or nbytes > self.max_bytes:
            raise ValueError
        if len(self.items) == self.max_items or self.nbytes + nbytes > self.max_bytes:
            self.rejected += 1
            return False
        self.items.append((item, nbytes))
        self.put_total += 1
        return True

    def drain(self, max_items: object = None, max_bytes: object = None) -> list[Any]:
        for value, low in ((max_items, 1), (max_bytes, 0)):
            if value is not None and not _is_int(value):
                raise TypeError
            if value is not None and value < low:  # type: ignore[operator]
                raise ValueError
        out: list[Any] = []
        total = 0
        while self.items and (max_items is None or len(out) < max_items):  # type: ignore[operator]
            size = self.items[0][1]
            if out and max_bytes is not None and total + size > max_bytes:  # type: ignore[operator]
                break
            total += size
            out.append(self.items.popleft()[0])
        self.drained_total += len(out)
        return out

    def clear(self) -> int:
        n = len(self.items)
        self.items.clear()
        return n


class ModelOutboundQueue:
    """The specification of OutboundQueue over a deque of frames."""

    def __init__(self, limit: int, high: int | None, low: int | None, max_frames: int) -> None:
        self.limit = limit
        self.high = limit // 2 if high is None else high
        self.low = self.high // 4 if low is None else low
        self.max_frames = max_frames
        self.frames: deque[tuple[Any, int]] = deque()
        self.paused = self.slow_consumer = False
        self.pushed_total = self.popped_total = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def push(self, frame: Any) -> int:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise TypeError
        size = memoryview(frame).nbytes
        if self.slow_consumer:
            return 2
        if len(self.frames) == self.max_frames or self.nbytes + size > self.limit:
            self.slow_consumer = True
            return 2
        self.frames.append((frame, size))
        self.pushed_total += 1
        if self.nbytes > self.high:
            self.paused = True
        return 1 if self.paused else 0

    def _after_pop(self, count: int) -> None:
        self.popped_total += count
        if self.nbytes <= self.low:
            self.paused = False

    def pop(self) -> Any:
        if not self.frames:
            raise IndexError
        frame = self.frames.popleft()[0]
        self._after_pop(1)
        return frame

    def pop_many(self, max_bytes: object) -> list[Any]:
        if not _is_int(max_bytes):
            raise TypeError
        assert isinstance(max_bytes, int)
        if max_bytes < 0:
            raise ValueError
        out: list[Any] = []
        total = 0
        while self.frames and (not out or total + self.frames[0][1] <= max_bytes):
            frame, size = self.frames.popleft()
            total += size
            out.append(frame)
        self._after_pop(len(out))
        return out

    def clear(self) -> int:
        n = len(self.frames)
        self.frames.clear()
        self.paused = False
        return n


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        return ("raised", type(exc))


def _agree(objects: list[Any], call: Callable[[Any], Any], attrs: tuple[str, ...]) -> None:
    outcomes = [_outcome(lambda o=o: call(o)) for o in objects]
    assert outcomes[0] == outcomes[1] == outcomes[2], outcomes
    states = [(*(getattr(o, a) for a in attrs), len(o)) for o in objects]
    assert states[0] == states[1] == states[2], (attrs, states)


_property = settings(
    max_examples=500,
    deadline=None,
    # The pair fixture holds two modules, never state: sharing it between examples is safe.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_sizes = st.one_of(st.integers(-2, 25), st.sampled_from([1 << 70, -(1 << 70), "4", True, 2.0]))
_budgets = st.one_of(st.none(), st.integers(-1, 40), st.sampled_from([1 << 70, "2", False]))


@_property
@given(
    max_items=st.integers(1, 6),
    max_bytes=st.integers(1, 50),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 99), _sizes),
            st.tuples(st.just("put"), st.integers(0, 99), st.integers(0, 15)),
            st.tuples(st.just("drain"), _budgets, _budgets),
            st.tuples(st.just("clear")),
        ),
        max_size=50,
    ),
)
def test_batch_queue_twin_compiled_and_model_agree(
    mq_pair: tuple[ModuleType, ModuleType],
    max_items: int,
    max_bytes: int,
    ops: list[tuple[Any, ...]],
) -> None:
    py, c = mq_pair
    queues = [ModelBatchQueue(max_items, max_bytes)]
    queues += [py.BatchQueue(max_items, max_bytes), c.BatchQueue(max_items, max_bytes)]
    attrs = ("nbytes", "is_full", "rejected", "put_total", "drained_total")
    for op, *args in ops:
        if op == "put":
            _agree(queues, lambda q, a=args: q.put(a[0], a[1]), attrs)
        elif op == "drain":
            _agree(queues, lambda q, a=args: q.drain(a[0], a[1]), attrs)
        else:
            _agree(queues, lambda q: q.clear(), attrs)


_frames = st.one_of(
    st.binary(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.binary(max_size=20).map(memoryview),
    st.sampled_from(["str", 3, None]),
)


@st.composite
def _watermarks(draw: st.DrawFn) -> tuple[int, int | None, int | None]:
    limit = draw(st.integers(1, 60))
    high = draw(st.one_of(st.none(), st.integers(0, limit)))
    top = limit // 2 if high is None else high
    low = draw(st.one_of(st.none(), st.integers(0, top)))
    return limit, high, low


@_property
@given(
    marks=_watermarks(),
    max_frames=st.integers(1, 8),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), _frames),
            st.tuples(st.just("push"), _frames),
            st.tuples(st.just("pop")),
            st.tuples(st.just("pop_many"), st.one_of(st.integers(-1, 40), st.just("9"))),
            st.tuples(st.just("clear")),
        ),
        max_size=50,
    ),
)
def test_outbound_queue_twin_compiled_and_model_agree(
    mq_pair: tuple[ModuleType, ModuleType],
    marks: tuple[int, int | None, int | None],
    max_frames: int,
    ops: list[tuple[Any, ...]],
) -> None:
    py, c = mq_pair
    limit, high, low = marks
    queues = [ModelOutboundQueue(limit, high, low, max_frames)]
    queues += [impl.OutboundQueue(limit, high, low, max_frames=max_frames) for impl in (py, c)]
    attrs = ("nbytes", "paused", "slow_consumer", "pushed_total", "popped_total")
    for op, *args in ops:
        if op == "push":
            _agree(queues, lambda q, a=args: q.push(a[0]), attrs)
        elif op == "pop_many":
            _agree(queues, lambda q, a=args: q.pop_many(a[0]), attrs)
        else:
            _agree(queues, lambda q, op=op: getattr(q, op)(), attrs)
    assert (queues[1].high_water, queues[1].low_water) == (queues[0].high, queues[0].low)
    assert (queues[2].high_water, queues[2].low_water) == (queues[0].high, queues[0].low)


# -- the writer's loops over a drained batch -----------------------------------------------------


class _Entry:
    def __init__(self, ops: list[tuple[bytes, bytes | None]], messages: int, serial: int) -> None:
        self.ops = ops
        self.messages = messages
        self.serial = serial


def test_fill_batch_puts_and_deletes_every_op_in_order(mq_impl: ModuleType) -> None:
    calls: list[tuple[Any, ...]] = []
    entries = [
        _Entry([(b"m1", b"one"), (b"d1", b"\x01")], 1, 1),
        _Entry([(b"c", b"rec"), (b"o", None), (b"u", b"x")], 0, 2),
        _Entry([], 0, 3),
        _Entry([(b"m2", b"")], 1, 4),  # an empty value is put, not deleted
    ]
    got = mq_impl.fill_batch(
        entries, lambda k, v: calls.append(("put", k, v)), lambda k: calls.append(("del", k))
    )
    assert got == (6, 2)
    assert calls == [
        ("put", b"m1", b"one"),
        ("put", b"d1", b"\x01"),
        ("put", b"c", b"rec"),
        ("del", b"o"),
        ("put", b"u", b"x"),
        ("put", b"m2", b""),
    ]
    assert mq_impl.fill_batch([], None, None) == (0, 0)


def test_fill_batch_refusals_and_a_failing_put(mq_impl: ModuleType) -> None:
    def put(k: bytes, v: bytes) -> None:
        raise OSError("the batch refused it")

    with pytest.raises(OSError):
        mq_impl.fill_batch([_Entry([(b"k", b"v")], 1, 1)], put, None)
    for bad in ((["not a tuple"], 0), ((b"k", b"v"), 0), ([(b"k", b"v")], 1.5)):
        with pytest.raises(TypeError):
            mq_impl.fill_batch([_Entry(*bad, 1)], lambda k, v: None, lambda k: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mq_impl.fill_batch((), None, None)


def test_settle_drops_only_what_the_entries_themselves_queued(mq_impl: ModuleType) -> None:
    overlay: dict[bytes, tuple[bytes | None, int]] = {
        b"a": (b"1", 1),
        b"b": (b"2", 5),  # rewritten by a later entry, still queued: kept
        b"c": (None, 2),  # a queued delete: dropped with its entry
        b"z": (b"9", 7),  # not in these entries
    }
    mq_impl.settle(
        [_Entry([(b"a", b"1"), (b"b", b"x")], 0, 1), _Entry([(b"c", None), (b"m", b"")], 1, 2)],
        overlay,
    )
    assert overlay == {b"b": (b"2", 5), b"z": (b"9", 7)}
    with pytest.raises(TypeError):
        mq_impl.settle([_Entry([(b"a", b"1")], 0, 1)], [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mq_impl.settle([_Entry(["x"], 0, 1)], overlay)  # type: ignore[list-item]
