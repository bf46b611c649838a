"""RingBuffer: the per-conversation window of recent messages and the LLM context window.

Compared with ``collections.deque(maxlen=...)``, what a user would reach for. The deque has no
keys: for the keyed cases it holds ``(seq, message)`` tuples, and ``since`` becomes the fastest
natural way to find the messages after a seq, a scan from the right end that stops at the
first older message. A plain list with ``bisect`` answers ``since`` faster still, but cannot
evict its oldest entry in O(1); it is shown for reference, its eviction cost left out.

Each timed call performs ``BATCH`` operations through pre-bound methods, so the numbers are
per-operation costs including one Python-level call each: for the compiled module and for
deque alike, most of the time goes into the call itself.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bench._harness import Row, rate
from kefu._core import implementations

BATCH = 1000  # operations per timed call
CAPACITY = 1024
HISTORY = 1000  # keyed entries searched by since()
REPLAY = 50  # entries since() returns

NAMES = {"c": "kefu c", "py": "kefu py"}


def _append_popleft(buf: Any) -> Callable[[], None]:
    append, popleft = buf.append, buf.popleft
    items = list(range(BATCH))

    def run() -> None:
        for item in items:
            append(item)
            popleft()

    return run


def _append(buf: Any) -> Callable[[], None]:
    append = buf.append
    items = list(range(BATCH))

    def run() -> None:
        for item in items:
            append(item)

    return run


def _keyed_append_ring(buf: Any) -> Callable[[], None]:
    append = buf.append
    next_seq = [buf.last_key + 1]
    message = "message"

    def run() -> None:
        start = next_seq[0]
        for seq in range(start, start + BATCH):
            append(message, seq)
        next_seq[0] = start + BATCH

    return run


def _keyed_append_deque(d: deque[tuple[int, str]]) -> Callable[[], None]:
    append = d.append
    next_seq = [d[-1][0] + 1]
    message = "message"

    def run() -> None:
        start = next_seq[0]
        for seq in range(start, start + BATCH):
            append((seq, message))
        next_seq[0] = start + BATCH

    return run


def _full(impl: ModuleType, keyed: bool = False) -> Any:
    buf = impl.RingBuffer(CAPACITY, keyed=keyed)
    for i in range(CAPACITY):
        if keyed:
            buf.append(f"m{i}", i)
        else:
            buf.append(i)
    return buf


def _since_deque(d: deque[tuple[int, str]], after: int) -> list[str]:
    out = []
    for seq, message in reversed(d):
        if seq <= after:
            break
        out.append(message)
    out.reverse()
    return out


def _since_cases(impls: dict[str, ModuleType], quick: bool) -> list[Row]:
    case = f"ringbuf since() over {HISTORY:,} keyed entries ({REPLAY} newest)"
    after = HISTORY - REPLAY - 1
    rows: list[Row] = []
    for kind, impl in impls.items():
        buf = impl.RingBuffer(HISTORY, keyed=True)
        for seq in range(HISTORY):
            buf.append(f"m{seq}", seq)
        since = buf.since
        assert len(since(after)) == REPLAY

        def run(since: Callable[[int], list[Any]] = since) -> None:
            for _ in range(100):
                since(after)

        rows.append(Row(case, NAMES[kind], rate(run, 100, quick=quick), "queries/s"))

    d: deque[tuple[int, str]] = deque(((s, f"m{s}") for s in range(HISTORY)), maxlen=HISTORY)
    assert len(_since_deque(d, after)) == REPLAY

    def run_deque() -> None:
        for _ in range(100):
            _since_deque(d, after)

    rows.append(
        Row(
            case,
            "collections.deque (scan from the right)",
            rate(run_deque, 100, quick=quick),
            "queries/s",
        )
    )
    keys = list(range(HISTORY))
    messages = [f"m{s}" for s in range(HISTORY)]
    assert len(messages[bisect_right(keys, after) :]) == REPLAY

    def run_bisect() -> None:
        for _ in range(100):
            messages[bisect_right(keys, after) :]

    rows.append(
        Row(
            case,
            "list + bisect (no eviction)",
            rate(run_bisect, 100, quick=quick),
            "queries/s",
            extra={"note": "cannot evict in O(1)"},
        )
    )
    return rows


def run(quick: bool) -> list[Row]:
    impls = implementations("ringbuf")
    rows: list[Row] = []

    case = f"ringbuf append+popleft (steady state, full buffer of {CAPACITY:,})"
    for kind, impl in impls.items():
        rows.append(
            Row(
                case,
                NAMES[kind],
                rate(_append_popleft(_full(impl)), BATCH, quick=quick) / 1e6,
                "Mops/s",
            )
        )
    d = deque(range(CAPACITY), maxlen=CAPACITY)
    rows.append(
        Row(case, "collections.deque", rate(_append_popleft(d), BATCH, quick=quick) / 1e6, "Mops/s")
    )

    case = "ringbuf append when full (evicting)"
    for kind, impl in impls.items():
        rows.append(
            Row(case, NAMES[kind], rate(_append(_full(impl)), BATCH, quick=quick) / 1e6, "Mops/s")
        )
    d = deque(range(CAPACITY), maxlen=CAPACITY)
    rows.append(
        Row(case, "collections.deque", rate(_append(d), BATCH, quick=quick) / 1e6, "Mops/s")
    )

    case = "ringbuf keyed append(message, seq) when full"
    for kind, impl in impls.items():
        fn = _keyed_append_ring(_full(impl, keyed=True))
        rows.append(Row(case, NAMES[kind], rate(fn, BATCH, quick=quick) / 1e6, "Mops/s"))
    keyed: deque[tuple[int, str]] = deque(((i, f"m{i}") for i in range(CAPACITY)), maxlen=CAPACITY)
    fn = _keyed_append_deque(keyed)
    rows.append(
        Row(
            case,
            "collections.deque of (seq, message)",
            rate(fn, BATCH, quick=quick) / 1e6,
            "Mops/s",
        )
    )

    rows += _since_cases(impls, quick)
    return rows
