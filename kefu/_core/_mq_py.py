"""Bounded message queues: the pure-Python twin of ``kefu._core.mq``.

- :class:`BatchQueue` is the queue the group-commit writer drains: bounded in items and in
  bytes, ``put`` answers ``False`` instead of growing past either bound (the caller turns that
  into back-pressure), and ``drain`` takes the oldest items up to an item and a byte budget.
- :class:`OutboundQueue` is one connection's queue of encoded frames, with write-buffer
  watermarks as asyncio transports have: above ``high_water`` it reports ``PUSH_HIGH`` and
  stays ``paused`` until it drains to ``low_water``; a frame that would take it past
  ``limit_bytes`` (or ``max_frames``) is refused with ``PUSH_SLOW`` and marks the connection
  a slow consumer, which the caller closes with code 4008.

Both keep their items in a ring whose storage doubles on demand up to the item bound and falls
back to its initial size when a large queue empties, so an idle queue costs little memory.

Allocating a list may start a garbage collection, whose finalizers may run any Python code,
this queue's methods included. So every method allocates first and reads the state after
(looking again if a finalizer changed it meanwhile), and releases the objects it drops last,
once the queue is whole again, as the compiled module must to stay memory-safe.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "MAX_BYTES",
    "MAX_ITEMS",
    "PUSH_HIGH",
    "PUSH_OK",
    "PUSH_SLOW",
    "BatchQueue",
    "OutboundQueue",
    "debug_counters",
    "fill_batch",
    "settle",
]

PUSH_OK = 0
"""``OutboundQueue.push``: the frame is queued."""
PUSH_HIGH = 1
"""``OutboundQueue.push``: the frame is queued and the queue is paused (above its high water)."""
PUSH_SLOW = 2
"""``OutboundQueue.push``: the frame is NOT queued; the consumer is too slow (close with 4008)."""

MAX_ITEMS = 1 << 26
"""Largest item bound (``max_items``, ``max_frames``) of one queue."""
MAX_BYTES = 1 << 62
"""Largest byte bound of one queue; sums of sizes below it never overflow 64 bits."""

# Ring storage: allocated at this size, doubled on demand, and given back when a queue whose
# storage grew past _SHRINK_ABOVE slots empties (so a once-backlogged connection does not keep
# its peak memory).
_INITIAL_SLOTS = 16
_SHRINK_ABOVE = 1024
# A budget larger than anything a queue can hold.
_NO_LIMIT = 1 << 63


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_batch_queues`` / ``live_outbound_queues``: queues not yet freed. The twin and a
    release build of the compiled module count nothing: every counter is 0.
    """
    return {"live_batch_queues": 0, "live_outbound_queues": 0}


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_budget(name: str, value: object, low: int) -> int:
    # A budget (drain, pop_many) has no upper bound: a huge one simply means "no limit".
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class _Fifo:
    """A ring of items with their sizes in bytes, bounded to ``max_items`` items."""

    __slots__ = (
        "_alloc",
        "_changes",
        "_count",
        "_head",
        "_max_items",
        "_nbytes",
        "_sizes",
        "_slots",
    )

    def __init__(self, max_items: int) -> None:
        self._max_items = max_items
        self._changes = 0  # bumped by every change; checked around allocations
        self._count = 0
        self._slots: list[Any] = []
        self._reset(False)

    def _reset(self, only_if_empty: bool) -> int:
        # Replaces the ring with an empty one of the initial size; returns how many items it
        # held. With only_if_empty, a queue that is not empty once the new storage exists stays.
        alloc = min(self._max_items, _INITIAL_SLOTS)
        slots: list[Any] = [None] * alloc
        sizes = [0] * alloc
        dropped = self._count
        if only_if_empty and dropped:
            return 0
        old = self._slots
        self._slots = slots
        self._sizes = sizes
        self._alloc = alloc
        self._head = 0
        self._count = 0
        self._nbytes = 0
        self._changes += 1
        del old  # released last: a finalizer of an old item may look at the queue
        return dropped

    def _reserve(self) -> None:
        # Room for one more item, unless the queue holds max_items. Doubling keeps pushes
        # amortized O(1).
        while self._count == self._alloc and self._alloc < self._max_items:
            self._grow()

    def _grow(self) -> None:
        # The ring is unrolled into new storage so that head is 0 again.
        alloc = min(2 * self._alloc, self._max_items)
        changes = self._changes
        slots: list[Any] = [None] * alloc
        sizes = [0] * alloc
        if self._changes != changes:
            return  # a finalizer changed the queue: _reserve looks again
        for j in range(self._count):
            p = (self._head + j) % self._alloc
            slots[j] = self._slots[p]
            sizes[j] = self._sizes[p]
        self._slots = slots
        self._sizes = sizes
        self._alloc = alloc
        self._head = 0

    def _push(self, item: object, size: int) -> None:
        # The caller has reserved room and checked the bounds.
        slot = (self._head + self._count) % self._alloc
        self._slots[slot] = item
        self._sizes[slot] = size
        self._count += 1
        self._nbytes += size
        self._changes += 1

    def _take(self) -> Any:
        slot = self._head
        item = self._slots[slot]
        self._slots[slot] = None
        self._nbytes -= self._sizes[slot]
        self._head = (slot + 1) % self._alloc
        self._count -= 1
        self._changes += 1
        if self._count == 0:
            self._emptied()
        return item

    def _take_many(self, max_items: int, max_bytes: int) -> list[Any]:
        # The oldest items, at least one if any, up to max_items and max_bytes.
        while True:
            changes = self._changes
            taken = total = 0
            limit = min(max_items, self._count)
            slot = self._head
            while taken < limit:
                size = self._sizes[slot]
                if taken and total + size > max_bytes:
                    break
                total += size
                taken += 1
                slot = (slot + 1) % self._alloc
            out: list[Any] = [None] * taken
            if self._changes == changes:
                break  # else a finalizer changed the queue while out was allocated: again
        for j in range(taken):
            p = (self._head + j) % self._alloc
            out[j] = self._slots[p]
            self._slots[p] = None
        self._head = slot
        self._count -= taken
        self._nbytes -= total
        self._changes += 1
        if self._count == 0:
            self._emptied()
        return out

    def _emptied(self) -> None:
        self._head = 0
        if self._alloc > _SHRINK_ABOVE:
            self._reset(True)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count != 0

    @property
    def nbytes(self) -> int:
        """The total size in bytes of the queued items."""
        return self._nbytes

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")


class BatchQueue(_Fifo):
    """A FIFO bounded in items and in bytes, drained in batches by the group-commit writer.

    ``BatchQueue(max_items, max_bytes)``: ``max_items`` from 1 to ``MAX_ITEMS``, ``max_bytes``
    from 1 to ``MAX_BYTES``. ``put`` never lets the queue pass either bound.
    """

    __slots__ = ("_drained_total", "_max_bytes", "_put_total", "_rejected")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        max_items = _check_int("max_items", max_items, 1, MAX_ITEMS)
        self._max_bytes = _check_int("max_bytes", max_bytes, 1, MAX_BYTES)
        self._rejected = 0
        self._put_total = 0
        self._drained_total = 0
        super().__init__(max_items)

    def put(self, item: object, nbytes: int) -> bool:
        """Queues ``item`` of size ``nbytes``; ``False`` (nothing queued) when it does not fit.

        It does not fit when the queue holds ``max_items`` items or when ``nbytes`` would take
        it past ``max_bytes``; each refusal counts in ``rejected``. ``nbytes`` below 0 or above
        ``max_bytes`` (an item that could never fit) raises ``ValueError``.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes > self._max_bytes:
            raise ValueError(f"nbytes {nbytes} exceeds max_bytes {self._max_bytes}")
        self._reserve()
        if self._count == self._max_items or nbytes > self._max_bytes - self._nbytes:
            self._rejected += 1
            return False
        self._push(item, nbytes)
        self._put_total += 1
        return True

    def drain(self, max_items: int | None = None, max_bytes: int | None = None) -> list[Any]:
        """Removes and returns the oldest items, up to ``max_items`` items and ``max_bytes``.

        At least one item comes out whenever the queue is not empty, even one larger than
        ``max_bytes``; the batch stops before the first item that would pass a budget.
        ``max_items`` must be >= 1 and ``max_bytes`` >= 0 when given.
        """
        items = _NO_LIMIT if max_items is None else _check_budget("max_items", max_items, 1)
        budget = _NO_LIMIT if max_bytes is None else _check_budget("max_bytes", max_bytes, 0)
        taken = self._take_many(items, budget)
        self._drained_total += len(taken)
        return taken

    def clear(self) -> int:
        """Drops every queued item; returns how many were dropped."""
        return self._reset(False)

    @property
    def max_items(self) -> int:
        """The most items the queue holds."""
        return self._max_items

    @property
    def max_bytes(self) -> int:
        """The most bytes the queued items add up to."""
        return self._max_bytes

    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``max_items`` items or ``max_bytes`` bytes."""
        return self._count == self._max_items or self._nbytes == self._max_bytes

    @property
    def rejected(self) -> int:
        """How many ``put`` calls were refused because the queue was full."""
        return self._rejected

    @property
    def put_total(self) -> int:
        """How many items were queued so far."""
        return self._put_total

    @property
    def drained_total(self) -> int:
        """How many items ``drain`` returned so far."""
        return self._drained_total

    def __repr__(self) -> str:
        return (
            f"BatchQueue(len={self._count}, nbytes={self._nbytes}, "
            f"max_items={self._max_items}, max_bytes={self._max_bytes})"
        )


class OutboundQueue(_Fifo):
    """One connection's queue of encoded frames, with back-pressure watermarks.

    ``OutboundQueue(limit_bytes=1 << 20, high_water=None, low_water=None, *, max_frames=65536)``:
    ``high_water`` defaults to ``limit_bytes // 2`` and ``low_water`` to ``high_water // 4``;
    they must satisfy ``0 <= low_water <= high_water <= limit_bytes``. Frames are ``bytes``,
    ``bytearray`` or ``memoryview`` objects, sized by their length in bytes when pushed.

    Once a push has been refused (``PUSH_SLOW``), ``slow_consumer`` stays True and every later
    push is refused too: delivering frames after a dropped one would leave a gap.
    """

    __slots__ = (
        "_high_water",
        "_limit_bytes",
        "_low_water",
        "_paused",
        "_popped_total",
        "_pushed_total",
        "_slow_consumer",
    )

    def __init__(
        self,
        limit_bytes: int = 1 << 20,
        high_water: int | None = None,
        low_water: int | None = None,
        *,
        max_frames: int = 65536,
    ) -> None:
        limit_bytes = _check_int("limit_bytes", limit_bytes, 1, MAX_BYTES)
        if high_water is None:
            high_water = limit_bytes // 2
        else:
            high_water = _check_int("high_water", high_water, 0, limit_bytes)
        if low_water is None:
            low_water = high_water // 4
        else:
            low_water = _check_int("low_water", low_water, 0, high_water)
        max_frames = _check_int("max_frames", max_frames, 1, MAX_ITEMS)
        self._limit_bytes = limit_bytes
        self._high_water = high_water
        self._low_water = low_water
        self._paused = False
        self._slow_consumer = False
        self._pushed_total = 0
        self._popped_total = 0
        super().__init__(max_frames)

    def push(self, frame: bytes | bytearray | memoryview, /) -> int:
        """Queues ``frame``; returns ``PUSH_OK``, ``PUSH_HIGH`` or ``PUSH_SLOW``.

        ``PUSH_HIGH``: queued, and the queue is paused (it went above ``high_water`` and has
        not drained to ``low_water`` since). ``PUSH_SLOW``: not queued, because it would take
        the queue past ``limit_bytes`` or ``max_frames``, or a push was refused before.
        """
        if isinstance(frame, (bytes, bytearray)):
            size = len(frame)
        elif isinstance(frame, memoryview):
            size = frame.nbytes
        else:
            raise TypeError(
                f"frame must be bytes, bytearray or memoryview, not {type(frame).__name__}"
            )
        if self._slow_consumer:
            return PUSH_SLOW
        self._reserve()
        if self._count == self._max_items or size > self._limit_bytes - self._nbytes:
            self._slow_consumer = True
            return PUSH_SLOW
        self._push(frame, size)
        self._pushed_total += 1
        if self._nbytes > self._high_water:
            self._paused = True
        return PUSH_HIGH if self._paused else PUSH_OK

    def _drained(self, count: int) -> None:
        self._popped_total += count
        if self._paused and self._nbytes <= self._low_water:
            self._paused = False

    def pop(self) -> Any:
        """Removes and returns the oldest frame; ``IndexError`` when empty."""
        if not self._count:
            raise IndexError("pop from an empty OutboundQueue")
        frame = self._take()
        self._drained(1)
        return frame

    def pop_many(self, max_bytes: int) -> list[Any]:
        """Removes and returns the oldest frames, at least one if any, up to ``max_bytes``.

        Stops before the first frame that would pass ``max_bytes`` (>= 0).
        """
        budget = _check_budget("max_bytes", max_bytes, 0)
        frames = self._take_many(_NO_LIMIT, budget)
        self._drained(len(frames))
        return frames

    def clear(self) -> int:
        """Drops every queued frame; returns how many were dropped. ``slow_consumer`` stays."""
        dropped = self._reset(False)
        self._paused = False
        return dropped

    @property
    def limit_bytes(self) -> int:
        """The most bytes the queue holds; a push past it is ``PUSH_SLOW``."""
        return self._limit_bytes

    @property
    def high_water(self) -> int:
        """Above this many queued bytes the queue is paused."""
        return self._high_water

    @property
    def low_water(self) -> int:
        """A paused queue resumes when it drains to this many bytes or fewer."""
        return self._low_water

    @property
    def max_frames(self) -> int:
        """The most frames the queue holds; a push past it is ``PUSH_SLOW``."""
        return self._max_items

    @property
    def paused(self) -> bool:
        """Whether the producer should hold back (between high and low water)."""
        return self._paused

    @property
    def slow_consumer(self) -> bool:
        """Whether a push was refused; once True, stays True."""
        return self._slow_consumer

    @property
    def pushed_total(self) -> int:
        """How many frames were queued so far."""
        return self._pushed_total

    @property
    def popped_total(self) -> int:
        """How many frames ``pop`` and ``pop_many`` returned so far."""
        return self._popped_total

    def __repr__(self) -> str:
        return (
            f"OutboundQueue(len={self._count}, nbytes={self._nbytes}, "
            f"limit_bytes={self._limit_bytes}, high_water={self._high_water}, "
            f"low_water={self._low_water}, paused={self._paused}, "
            f"slow_consumer={self._slow_consumer})"
        )


def fill_batch(
    entries: list[Any], put: Callable[[Any, Any], object], delete: Callable[[Any], object]
) -> tuple[int, int]:
    """Every op of ``entries`` in order: ``put(key, value)``, or ``delete(key)`` for a value of
    None. An entry has ``ops`` (a list of ``(key, value)`` tuples) and ``messages``; returns
    ``(ops, messages)`` summed over them."""
    if not isinstance(entries, list):
        raise TypeError(f"entries must be a list, not {type(entries).__name__}")
    ops = messages = 0
    for entry in entries:
        entry_ops = entry.ops
        if not isinstance(entry_ops, list):
            raise TypeError(f"ops must be a list, not {type(entry_ops).__name__}")
        for op in entry_ops:
            if not isinstance(op, tuple):
                raise TypeError(f"an op must be a tuple, not {type(op).__name__}")
            value = op[1]
            if value is None:
                delete(op[0])
            else:
                put(op[0], value)
        ops += len(entry_ops)
        messages += operator.index(entry.messages)
    return ops, messages


def settle(entries: list[Any], overlay: dict[Any, tuple[Any, int]]) -> None:
    """Once ``entries`` are written: each of their keys leaves ``overlay`` (key -> ``(value,
    serial)``) unless a later entry has written it since (its serial is not the entry's)."""
    if not isinstance(entries, list):
        raise TypeError(f"entries must be a list, not {type(entries).__name__}")
    if not isinstance(overlay, dict):
        raise TypeError(f"overlay must be a dict, not {type(overlay).__name__}")
    for entry in entries:
        serial = entry.serial
        for op in entry.ops:
            if not isinstance(op, tuple):
                raise TypeError(f"an op must be a tuple, not {type(op).__name__}")
            key = op[0]
            held = overlay.get(key)
            if held is not None and held[1] == serial:
                del overlay[key]
