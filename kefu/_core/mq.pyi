"""Bounded message queues (compiled; the twin is ``kefu._core._mq_py``).

:class:`BatchQueue`: bounded in items and bytes, drained in batches by the group-commit writer;
``put`` answers ``False`` rather than pass a bound. :class:`OutboundQueue`: one connection's
frames with high/low watermarks; a push past ``limit_bytes`` is ``PUSH_SLOW`` (close 4008).
"""

from collections.abc import Callable
from typing import Any, Final, final

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

PUSH_OK: Final = 0
"""``OutboundQueue.push``: the frame is queued."""
PUSH_HIGH: Final = 1
"""``OutboundQueue.push``: the frame is queued and the queue is paused (above its high water)."""
PUSH_SLOW: Final = 2
"""``OutboundQueue.push``: the frame is NOT queued; the consumer is too slow (close with 4008)."""
MAX_ITEMS: Final[int]
"""Largest item bound (``max_items``, ``max_frames``) of one queue."""
MAX_BYTES: Final[int]
"""Largest byte bound of one queue; sums of sizes below it never overflow 64 bits."""

def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build (``live_batch_queues``,
    ``live_outbound_queues``). A release build, like the twin, counts nothing: every counter is 0.
    """

class _Fifo:
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    @property
    def nbytes(self) -> int:
        """The total size in bytes of the queued items."""

@final
class BatchQueue(_Fifo):
    """A FIFO bounded in items and in bytes, drained in batches by the group-commit writer.

    ``max_items`` from 1 to ``MAX_ITEMS``, ``max_bytes`` from 1 to ``MAX_BYTES``. ``put`` never
    lets the queue pass either bound.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None: ...
    def put(self, item: object, nbytes: int) -> bool:
        """Queues ``item`` of size ``nbytes``; ``False`` (nothing queued) when it does not fit.

        It does not fit when the queue holds ``max_items`` items or when ``nbytes`` would take
        it past ``max_bytes``; each refusal counts in ``rejected``. ``nbytes`` below 0 or above
        ``max_bytes`` (an item that could never fit) raises ``ValueError``.
        """
    def drain(self, max_items: int | None = None, max_bytes: int | None = None) -> list[Any]:
        """Removes and returns the oldest items, up to ``max_items`` items and ``max_bytes``.

        At least one item comes out whenever the queue is not empty, even one larger than
        ``max_bytes``; the batch stops before the first item that would pass a budget.
        """
    def clear(self) -> int:
        """Drops every queued item; returns how many were dropped."""
    @property
    def max_items(self) -> int:
        """The most items the queue holds."""
    @property
    def max_bytes(self) -> int:
        """The most bytes the queued items add up to."""
    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``max_items`` items or ``max_bytes`` bytes."""
    @property
    def rejected(self) -> int:
        """How many ``put`` calls were refused because the queue was full."""
    @property
    def put_total(self) -> int:
        """How many items were queued so far."""
    @property
    def drained_total(self) -> int:
        """How many items ``drain`` returned so far."""

@final
class OutboundQueue(_Fifo):
    """One connection's queue of encoded frames, with back-pressure watermarks.

    ``high_water`` defaults to ``limit_bytes // 2`` and ``low_water`` to ``high_water // 4``;
    ``0 <= low_water <= high_water <= limit_bytes``. Once a push has been refused
    (``PUSH_SLOW``), ``slow_consumer`` stays True and every later push is refused too.
    """

    def __init__(
        self,
        limit_bytes: int = 1 << 20,
        high_water: int | None = None,
        low_water: int | None = None,
        *,
        max_frames: int = 65536,
    ) -> None: ...
    def push(self, frame: bytes | bytearray | memoryview, /) -> int:
        """Queues ``frame``; returns ``PUSH_OK``, ``PUSH_HIGH`` or ``PUSH_SLOW``."""
    def pop(self) -> Any:
        """Removes and returns the oldest frame; ``IndexError`` when empty."""
    def pop_many(self, max_bytes: int) -> list[Any]:
        """Removes and returns the oldest frames, at least one if any, up to ``max_bytes``."""
    def clear(self) -> int:
        """Drops every queued frame; returns how many were dropped. ``slow_consumer`` stays."""
    @property
    def limit_bytes(self) -> int:
        """The most bytes the queue holds; a push past it is ``PUSH_SLOW``."""
    @property
    def high_water(self) -> int:
        """Above this many queued bytes the queue is paused."""
    @property
    def low_water(self) -> int:
        """A paused queue resumes when it drains to this many bytes or fewer."""
    @property
    def max_frames(self) -> int:
        """The most frames the queue holds; a push past it is ``PUSH_SLOW``."""
    @property
    def paused(self) -> bool:
        """Whether the producer should hold back (between high and low water)."""
    @property
    def slow_consumer(self) -> bool:
        """Whether a push was refused; once True, stays True."""
    @property
    def pushed_total(self) -> int:
        """How many frames were queued so far."""
    @property
    def popped_total(self) -> int:
        """How many frames ``pop`` and ``pop_many`` returned so far."""

def fill_batch(
    entries: list[Any], put: Callable[[Any, Any], object], delete: Callable[[Any], object]
) -> tuple[int, int]:
    """Every op of ``entries`` into a write batch, in order (``delete`` for a value of None);
    ``(ops, messages)`` summed."""

def settle(entries: list[Any], overlay: dict[Any, tuple[Any, int]]) -> None:
    """Once ``entries`` are written, their keys leave ``overlay`` unless rewritten since."""
