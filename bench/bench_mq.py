"""BatchQueue (group commit) and OutboundQueue (one connection's frames).

Each timed call puts ``BATCH`` items and drains them in one batch, as the group-commit writer
does once per loop tick, or pushes ``BATCH`` frames and takes them back with one ``pop_many``,
as a connection's writer does when the socket is writable. The rates count items (or frames)
through the queue per second.

The alternatives: ``asyncio.Queue`` with ``put_nowait`` / ``get_nowait`` (bounded in items
only: it has no byte bound and no batch drain), and the queue a user would write in plain
Python, a ``collections.deque`` with a byte counter and the same bounds and watermarks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bench._harness import Row, rate
from kefu._core import implementations

BATCH = 64
FRAME = b"x" * 100  # a small encoded message frame
NAMES = {"c": "kefu c", "py": "kefu py"}


class DequeBatchQueue:
    """A deque with an item and a byte bound, written as a user would."""

    __slots__ = ("items", "max_bytes", "max_items", "nbytes")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.items: deque[tuple[Any, int]] = deque()
        self.max_items, self.max_bytes, self.nbytes = max_items, max_bytes, 0

    def put(self, item: Any, nbytes: int) -> bool:
        if len(self.items) == self.max_items or self.nbytes + nbytes > self.max_bytes:
            return False
        self.items.append((item, nbytes))
        self.nbytes += nbytes
        return True

    def drain(self, max_items: int, max_bytes: int) -> list[Any]:
        items, out, total = self.items, [], 0
        while items and len(out) < max_items:
            size = items[0][1]
            if out and total + size > max_bytes:
                break
            total += size
            out.append(items.popleft()[0])
        self.nbytes -= total
        return out


class DequeOutboundQueue:
    """A deque of frames with a byte counter and watermarks, written as a user would."""

    __slots__ = ("frames", "high", "limit", "low", "nbytes", "paused", "slow")

    def __init__(self, limit: int) -> None:
        self.frames: deque[bytes] = deque()
        self.limit, self.high, self.low = limit, limit // 2, limit // 8
        self.nbytes, self.paused, self.slow = 0, False, False

    def push(self, frame: bytes) -> int:
        size = len(frame)
        if self.slow or self.nbytes + size > self.limit:
            self.slow = True
            return 2
        self.frames.append(frame)
        self.nbytes += size
        if self.nbytes > self.high:
            self.paused = True
        return 1 if self.paused else 0

    def pop_many(self, max_bytes: int) -> list[bytes]:
        frames, out, total = self.frames, [], 0
        while frames:
            size = len(frames[0])
            if out and total + size > max_bytes:
                break
            total += size
            out.append(frames.popleft())
        self.nbytes -= total
        if self.paused and self.nbytes <= self.low:
            self.paused = False
        return out


def _put_drain(queue: Any) -> Callable[[], None]:
    put, drain = queue.put, queue.drain
    items = [object() for _ in range(BATCH)]

    def run() -> None:
        for item in items:
            put(item, 200)
        if len(drain(BATCH, 1 << 30)) != BATCH:
            raise AssertionError("the batch did not come out whole")

    return run


def _asyncio_put_get() -> Callable[[], None]:
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=10_000)
    put, get = queue.put_nowait, queue.get_nowait
    items = [object() for _ in range(BATCH)]

    def run() -> None:
        for item in items:
            put(item)
        batch = [get() for _ in range(BATCH)]
        if len(batch) != BATCH:
            raise AssertionError("the batch did not come out whole")

    return run


def _push_pop_many(queue: Any) -> Callable[[], None]:
    push, pop_many = queue.push, queue.pop_many

    def run() -> None:
        for _ in range(BATCH):
            push(FRAME)
        if len(pop_many(1 << 20)) != BATCH:
            raise AssertionError("the frames did not come out whole")

    return run


def run(quick: bool) -> list[Row]:
    impls: dict[str, ModuleType] = implementations("mq")
    rows: list[Row] = []

    case = f"mq put+drain (batches of {BATCH})"
    for kind, impl in impls.items():
        fn = _put_drain(impl.BatchQueue(10_000, 1 << 30))
        rows.append(Row(case, NAMES[kind], rate(fn, BATCH, quick=quick) / 1e6, "Mitems/s"))
    fn = _put_drain(DequeBatchQueue(10_000, 1 << 30))
    rows.append(
        Row(
            case, "collections.deque + byte counter", rate(fn, BATCH, quick=quick) / 1e6, "Mitems/s"
        )
    )
    rows.append(
        Row(
            case,
            "asyncio.Queue (put_nowait/get_nowait)",
            rate(_asyncio_put_get(), BATCH, quick=quick) / 1e6,
            "Mitems/s",
            extra={"note": "no byte bound, no batch drain"},
        )
    )

    case = f"outbound push+pop_many ({BATCH} frames of {len(FRAME)} bytes)"
    for kind, impl in impls.items():
        fn = _push_pop_many(impl.OutboundQueue(1 << 20))
        rows.append(Row(case, NAMES[kind], rate(fn, BATCH, quick=quick) / 1e6, "Mframes/s"))
    fn = _push_pop_many(DequeOutboundQueue(1 << 20))
    rows.append(
        Row(
            case,
            "collections.deque + byte counter",
            rate(fn, BATCH, quick=quick) / 1e6,
            "Mframes/s",
        )
    )
    return rows
