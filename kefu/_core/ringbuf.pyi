"""Fixed-capacity ring buffer of Python objects (compiled; the twin is ``kefu._core._ringbuf_py``).

``append`` evicts the oldest entry of a full buffer and ``appendleft`` the newest, as
``collections.deque(maxlen=capacity)`` does. ``keyed=True``: entries carry strictly increasing
int64 keys (message ``seq``) and ``since(key)`` finds the entries after a key by binary search.
``pinned_head=True``: the first entry put into the empty buffer is never evicted or popped.
"""

from collections.abc import Hashable, Iterator
from typing import Any, Final, final

__all__ = ["MAX_CAPACITY", "RingBuffer", "RingSet", "debug_counters"]

MAX_CAPACITY: Final[int]
"""Largest capacity of one buffer: 64 Mi entries, 1 GiB of slot and key arrays at most."""

def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build (``live_buffers``).

    A release build, like the twin, counts nothing: every counter is 0.
    """

@final
class RingBuffer:
    """A bounded FIFO of Python objects with O(1) operations at both ends.

    ``capacity`` is an int from 1 (2 with ``pinned_head``) to ``MAX_CAPACITY``. Index 0 is the
    oldest entry (the pinned one, if any), -1 the newest; iteration goes from oldest to newest
    and raises ``RuntimeError`` if the buffer changes meanwhile.
    """

    def __init__(
        self, capacity: int, *, keyed: bool = False, pinned_head: bool = False
    ) -> None: ...
    def append(self, item: object, key: int | None = None) -> None:
        """Adds ``item`` as the newest entry; when full, evicts the oldest unpinned entry.

        A keyed buffer needs ``key``, greater than the newest entry's key; an unkeyed one
        refuses it (``TypeError``).
        """
    def appendleft(self, item: object, key: int | None = None) -> None:
        """Adds ``item`` as the oldest unpinned entry; when full, evicts the newest entry.

        With a pinned entry, ``item`` goes right after it. A keyed buffer needs ``key``, less
        than the oldest unpinned entry's key and greater than the pinned entry's key.
        """
    def pop(self) -> Any:
        """Removes and returns the newest entry (never the pinned one); ``IndexError`` if none."""
    def popleft(self) -> Any:
        """Removes and returns the oldest unpinned entry; ``IndexError`` if there is none."""
    def clear(self) -> None:
        """Removes every entry, the pinned one too (the next entry put in is pinned again)."""
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    def __getitem__(self, index: int) -> Any:
        """The entry at ``index`` (0 is the oldest, -1 the newest)."""
    def key_at(self, index: int) -> int:
        """The key of the entry at ``index`` (keyed buffers only)."""
    def __iter__(self) -> Iterator[Any]: ...
    def to_list(self) -> list[Any]:
        """All entries, oldest first."""
    def last(self, n: int) -> list[Any]:
        """The ``n`` newest entries, oldest first (all of them when ``n`` exceeds the length)."""
    def since(self, key: int) -> list[Any]:
        """The entries whose key is greater than ``key``, oldest first (keyed buffers only).

        Binary search: O(log n + m) for m entries returned.
        """
    @property
    def first_key(self) -> int | None:
        """The oldest entry's key, None when empty (keyed buffers only)."""
    @property
    def last_key(self) -> int | None:
        """The newest entry's key, None when empty (keyed buffers only)."""
    @property
    def pinned(self) -> Any:
        """The pinned entry, or None when there is none."""
    @property
    def capacity(self) -> int:
        """The most entries the buffer holds, the pinned one included."""
    @property
    def keyed(self) -> bool:
        """Whether entries carry keys."""
    @property
    def pinned_head(self) -> bool:
        """Whether the first entry put into the empty buffer is pinned."""
    @property
    def evicted(self) -> int:
        """How many entries were evicted by appends to the full buffer so far."""

@final
class RingSet:
    """Keyed rings of recent items by conversation, the least recently used dropped past
    ``max_rings``; running totals of the items held and of their text's UTF-8 bytes."""

    max_rings: Final[int]
    ring_capacity: Final[int]
    items: Final[int]
    text_bytes: Final[int]
    dropped: Final[int]
    def __init__(self, max_rings: int, ring_capacity: int) -> None: ...
    def __len__(self) -> int: ...
    def remember(self, conv: Hashable, item: Any, key: int) -> None: ...
    def get(self, conv: Hashable) -> RingBuffer | None: ...
    def touch(self, conv: Hashable) -> RingBuffer | None: ...
    def forget(self, conv: Hashable) -> None: ...
    def clear(self) -> None: ...
    def conversations(self) -> list[Hashable]: ...
