"""Fixed-capacity ring buffer of Python objects: the pure-Python twin of ``kefu._core.ringbuf``.

A :class:`RingBuffer` holds at most ``capacity`` entries with O(1) ``append`` / ``appendleft`` /
``pop`` / ``popleft``. When it is full, ``append`` evicts the oldest entry and ``appendleft`` the
newest, as ``collections.deque(maxlen=capacity)`` does; ``evicted`` counts them.

Two modes, which combine:

- ``keyed=True``: every entry carries an int64 key that strictly increases from the oldest entry
  to the newest (a conversation's message ``seq``); ``since(key)`` returns the entries after a
  key by binary search, which is how a client resuming after ``last_seq`` gets what it missed.
- ``pinned_head=True``: the first entry put into an empty buffer (an LLM context's system
  prompt) is pinned: it is never evicted or popped, only ``clear()`` removes it. The other
  ``capacity - 1`` entries behave as a ring buffer of their own placed after it.

:class:`RingSet` holds the keyed rings of many conversations (``kefu.hub``: each message is
kept with one ``remember`` call): at most ``max_rings``, the least recently used dropped past
that, with running totals of the items held and of their ``text`` in UTF-8. Here the order is
an ``OrderedDict``; the compiled module keeps a dict of slots and the order in two index arrays.

The ring's storage grows by doubling up to its capacity, so an idle buffer with a large
capacity costs little memory; ``clear()`` gives the storage back.

Allocating a list may start a garbage collection, whose finalizers may run any Python code,
this buffer's methods included. So every method allocates first and reads the state after
(looking again if a finalizer changed it meanwhile), and releases the objects it drops last,
once the buffer is whole again, as the compiled module must to stay memory-safe.
"""

from __future__ import annotations

import operator
import reprlib
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any, NoReturn

__all__ = ["MAX_CAPACITY", "RingBuffer", "RingSet", "debug_counters"]

MAX_CAPACITY = 1 << 26
"""Largest capacity of one buffer: 64 Mi entries, 1 GiB of slot and key arrays at most."""

_KEY_MIN = -(1 << 63)
_KEY_MAX = (1 << 63) - 1

# Slots allocated when a buffer is created or cleared; the storage doubles from here on demand.
_INITIAL_SLOTS = 16


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_buffers``: RingBuffer objects not yet freed. The twin and a release build of the
    compiled module count nothing: every counter is 0.
    """
    return {"live_buffers": 0}


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def _check_key(key: object) -> int:
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"key must be an int, not {type(key).__name__}")
    if not _KEY_MIN <= key <= _KEY_MAX:
        raise ValueError(f"key must fit a signed 64-bit integer, got {key}")
    return int(key)  # an int subclass is stored as the plain int the compiled module keeps


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_index(index: object) -> int:
    try:
        return operator.index(index)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"RingBuffer indices must be integers, not {type(index).__name__}"
        ) from None


class RingBuffer:
    """A bounded FIFO of Python objects with O(1) operations at both ends.

    ``RingBuffer(capacity, *, keyed=False, pinned_head=False)``: ``capacity`` is an int from 1
    (2 with ``pinned_head``) to ``MAX_CAPACITY``. Index 0 is the oldest entry (the pinned one,
    if any), -1 the newest; iteration goes from oldest to newest and raises ``RuntimeError`` if
    the buffer changes meanwhile.
    """

    __slots__ = (
        "__weakref__",
        "_alloc",
        "_capacity",
        "_count",
        "_evicted",
        "_has_pinned",
        "_head",
        "_keyed",
        "_keys",
        "_pinned",
        "_pinned_head",
        "_pinned_key",
        "_ring_capacity",
        "_slots",
        "_state",
    )

    def __init__(self, capacity: int, *, keyed: bool = False, pinned_head: bool = False) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        keyed = _check_flag("keyed", keyed)
        pinned_head = _check_flag("pinned_head", pinned_head)
        low = 2 if pinned_head else 1
        if not low <= capacity <= MAX_CAPACITY:
            raise ValueError(
                f"capacity must be between {low} and {MAX_CAPACITY}"
                f"{' with pinned_head' if pinned_head else ''}, got {capacity}"
            )
        self._capacity = capacity
        self._keyed = keyed
        self._pinned_head = pinned_head
        # The pinned entry lives outside the ring; the ring holds the unpinned entries.
        self._ring_capacity = capacity - 1 if pinned_head else capacity
        self._evicted = 0
        self._state = 0  # bumped by every change, checked by iterators
        self._reset()

    def _reset(self) -> None:
        alloc = min(self._ring_capacity, _INITIAL_SLOTS)
        slots: list[Any] = [None] * alloc
        keys = [0] * alloc if self._keyed else []
        dropped = (getattr(self, "_slots", None), getattr(self, "_pinned", None))
        self._alloc = alloc
        self._slots = slots
        self._keys = keys
        self._head = 0
        self._count = 0
        self._pinned: Any = None
        self._pinned_key = 0
        self._has_pinned = False
        self._state += 1
        # Released last: a finalizer of an old entry may look at the buffer.
        del dropped

    def _reserve(self) -> None:
        # Room for one more unpinned entry, unless the ring is at capacity (then an append
        # evicts). Doubling keeps appends amortized O(1).
        while self._count == self._alloc and self._alloc < self._ring_capacity:
            self._grow()

    def _grow(self) -> None:
        # The ring is unrolled into new storage so that head is 0 again.
        alloc = min(2 * self._alloc, self._ring_capacity)
        state = self._state
        slots: list[Any] = [None] * alloc
        keys = [0] * alloc if self._keyed else []
        if self._state != state:
            return  # a finalizer changed the buffer: _reserve looks again
        for j in range(self._count):
            p = self._phys(j)
            slots[j] = self._slots[p]
            if self._keyed:
                keys[j] = self._keys[p]
        self._slots = slots
        self._keys = keys
        self._alloc = alloc
        self._head = 0

    def _phys(self, j: int) -> int:
        return (self._head + j) % self._alloc

    def _new_key(self, key: object, newest: bool) -> int:
        if not self._keyed:
            if key is not None:
                raise TypeError("key is only accepted by a keyed RingBuffer")
            return 0
        if key is None:
            raise TypeError("a keyed RingBuffer needs a key")
        k = _check_key(key)
        if newest:
            if self._count:
                bound = self._keys[self._phys(self._count - 1)]
            elif self._has_pinned:
                bound = self._pinned_key
            else:
                return k
            if k <= bound:
                raise ValueError(f"key must be greater than the newest key {bound}, got {k}")
        else:
            if self._count and k >= self._keys[self._head]:
                raise ValueError(
                    f"key must be less than the oldest key {self._keys[self._head]}, got {k}"
                )
            if self._has_pinned and k <= self._pinned_key:
                raise ValueError(
                    f"key must be greater than the pinned entry's key {self._pinned_key}, got {k}"
                )
        return k

    def _pin(self, item: object, key: int) -> None:
        self._pinned = item
        self._pinned_key = key
        self._has_pinned = True
        self._state += 1

    def append(self, item: object, key: int | None = None) -> None:
        """Adds ``item`` as the newest entry; when full, evicts the oldest unpinned entry.

        A keyed buffer needs ``key``, greater than the newest entry's key; an unkeyed one
        refuses it (``TypeError``).
        """
        self._reserve()  # first: it may allocate, and the key is checked against what follows
        k = self._new_key(key, True)
        if self._pinned_head and not self._has_pinned:
            self._pin(item, k)
            return
        if self._count == self._ring_capacity:
            pos = self._head
            self._head = self._phys(1)
            self._evicted += 1
        else:
            pos = self._phys(self._count)
            self._count += 1
        if self._keyed:
            self._keys[pos] = k
        self._state += 1
        self._slots[pos] = item  # last: releasing an evicted entry may run its finalizer

    def appendleft(self, item: object, key: int | None = None) -> None:
        """Adds ``item`` as the oldest unpinned entry; when full, evicts the newest entry.

        With a pinned entry, ``item`` goes right after it. A keyed buffer needs ``key``, less
        than the oldest unpinned entry's key and greater than the pinned entry's key.
        """
        self._reserve()  # first: it may allocate, and the key is checked against what follows
        k = self._new_key(key, False)
        if self._pinned_head and not self._has_pinned:
            self._pin(item, k)
            return
        if self._count == self._ring_capacity:
            self._evicted += 1
        else:
            self._count += 1
        self._head = self._phys(self._alloc - 1)
        if self._keyed:
            self._keys[self._head] = k
        self._state += 1
        self._slots[self._head] = item  # last: releasing an evicted entry may run its finalizer

    def _nothing_to_pop(self) -> NoReturn:
        if self._has_pinned:
            raise IndexError("pop from a RingBuffer holding only its pinned entry")
        raise IndexError("pop from an empty RingBuffer")

    def pop(self) -> Any:
        """Removes and returns the newest entry (never the pinned one); ``IndexError`` if none."""
        if not self._count:
            self._nothing_to_pop()
        self._count -= 1
        pos = self._phys(self._count)
        item = self._slots[pos]
        self._slots[pos] = None
        self._state += 1
        return item

    def popleft(self) -> Any:
        """Removes and returns the oldest unpinned entry; ``IndexError`` if there is none."""
        if not self._count:
            self._nothing_to_pop()
        pos = self._head
        item = self._slots[pos]
        self._slots[pos] = None
        self._head = self._phys(1)
        self._count -= 1
        self._state += 1
        return item

    def clear(self) -> None:
        """Removes every entry, the pinned one too (the next entry put in is pinned again)."""
        self._reset()

    # -- reading ----------------------------------------------------------------------------

    def _item(self, i: int) -> Any:
        # Logical position i, 0 being the pinned entry if there is one.
        if self._has_pinned:
            if i == 0:
                return self._pinned
            i -= 1
        return self._slots[self._phys(i)]

    def _key(self, i: int) -> int:
        if self._has_pinned:
            if i == 0:
                return self._pinned_key
            i -= 1
        return self._keys[self._phys(i)]

    def _position(self, index: object) -> int:
        i = _check_index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("RingBuffer index out of range")
        return i

    def _need_keys(self, what: str) -> None:
        if not self._keyed:
            raise TypeError(f"{what} needs a keyed RingBuffer")

    def __len__(self) -> int:
        return self._count + self._has_pinned

    def __bool__(self) -> bool:
        return bool(self._count or self._has_pinned)

    def __getitem__(self, index: int) -> Any:
        """The entry at ``index`` (0 is the oldest, -1 the newest)."""
        return self._item(self._position(index))

    def key_at(self, index: int) -> int:
        """The key of the entry at ``index`` (keyed buffers only)."""
        self._need_keys("key_at()")
        return self._key(self._position(index))

    def __iter__(self) -> Iterator[Any]:
        return self._iterate(self._state)

    def _iterate(self, state: int) -> Iterator[Any]:
        # ``state`` is read when iter() is called, not at the first next(), as a deque does.
        for i in range(len(self)):
            if self._state != state:
                raise RuntimeError("RingBuffer mutated during iteration")
            yield self._item(i)
        if self._state != state:
            raise RuntimeError("RingBuffer mutated during iteration")

    def _range(self, start: int, stop: int) -> list[Any] | None:
        # Entries at logical positions start <= i < stop, as a new list; None when a finalizer
        # changed the buffer while the list was allocated (the caller then looks again).
        state = self._state
        out: list[Any] = [None] * (stop - start)
        if self._state != state:
            return None
        for j in range(stop - start):
            out[j] = self._item(start + j)
        return out

    def to_list(self) -> list[Any]:
        """All entries, oldest first."""
        out = None
        while out is None:
            out = self._range(0, len(self))
        return out

    def last(self, n: int) -> list[Any]:
        """The ``n`` newest entries, oldest first (all of them when ``n`` exceeds the length)."""
        n = _check_count("n", n)
        out = None
        while out is None:
            size = len(self)
            out = self._range(size - min(n, size), size)
        return out

    def since(self, key: int) -> list[Any]:
        """The entries whose key is greater than ``key``, oldest first (keyed buffers only).

        Binary search: O(log n + m) for m entries returned.
        """
        self._need_keys("since()")
        k = _check_key(key)
        out = None
        while out is None:
            out = self._range(self._first_after(k), len(self))
        return out

    def _first_after(self, key: int) -> int:
        # The first logical position whose key is greater than key (the length if none).
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._key(mid) <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @property
    def first_key(self) -> int | None:
        """The oldest entry's key, None when empty (keyed buffers only)."""
        self._need_keys("first_key")
        return self._key(0) if len(self) else None

    @property
    def last_key(self) -> int | None:
        """The newest entry's key, None when empty (keyed buffers only)."""
        self._need_keys("last_key")
        return self._key(len(self) - 1) if len(self) else None

    @property
    def pinned(self) -> Any:
        """The pinned entry, or None when there is none."""
        return self._pinned if self._has_pinned else None

    @property
    def capacity(self) -> int:
        """The most entries the buffer holds, the pinned one included."""
        return self._capacity

    @property
    def keyed(self) -> bool:
        """Whether entries carry keys."""
        return self._keyed

    @property
    def pinned_head(self) -> bool:
        """Whether the first entry put into the empty buffer is pinned."""
        return self._pinned_head

    @property
    def evicted(self) -> int:
        """How many entries were evicted by appends to the full buffer so far."""
        return self._evicted

    @reprlib.recursive_repr("RingBuffer(...)")
    def __repr__(self) -> str:
        flags = ""
        if self._keyed:
            flags += ", keyed=True"
        if self._pinned_head:
            flags += ", pinned_head=True"
        return f"RingBuffer({self.to_list()!r}, capacity={self._capacity}{flags})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("RingBuffer cannot be pickled or copied; use to_list()")


def _utf8_len(text: object) -> int:
    """Bytes of ``text`` in UTF-8 (a lone surrogate as 3)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _size(name: str, value: object, low: int, high: int) -> int:
    n = operator.index(value)  # type: ignore[arg-type]  # refuses what is not an int
    if not low <= n <= high:
        if high == (1 << 63) - 1:
            raise ValueError(f"{name} must be >= {low}, got {n}")
        raise ValueError(f"{name} must be between {low} and {high}, got {n}")
    return n


class RingSet:
    """Keyed rings of recent items by conversation (module doc of ``kefu.hub``).

    At most ``max_rings`` rings of ``ring_capacity`` items each; a new conversation past that
    drops the least recently used ring (``dropped``). ``remember(conv, item, key)`` appends
    ``item`` (its ``text`` a str) to ``conv``'s ring with ``key`` (its ``seq``): a key at or
    below the ring's newest is ignored, and one past a gap restarts the ring. Running totals:
    ``items`` held and their ``text_bytes`` in UTF-8, so that no ring is read to sum them.
    """

    __slots__ = ("_rings", "dropped", "items", "max_rings", "ring_capacity", "text_bytes")

    def __init__(self, max_rings: int, ring_capacity: int) -> None:
        self.max_rings = _size("max_rings", max_rings, 1, (1 << 63) - 1)
        self.ring_capacity = _size("ring_capacity", ring_capacity, 1, MAX_CAPACITY)
        self._rings: OrderedDict[Hashable, RingBuffer] = OrderedDict()
        self.items = 0
        self.text_bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._rings)

    def _uncount(self, ring: RingBuffer) -> None:
        held = ring.to_list()
        for item in held:
            self.text_bytes -= _utf8_len(item.text)
        self.items -= len(held)

    def remember(self, conv: Hashable, item: Any, key: int) -> None:
        size = _utf8_len(item.text)  # refusals first: nothing changed yet
        k = _check_key(key)
        rings = self._rings
        ring = rings.get(conv)
        if ring is None:
            ring = RingBuffer(self.ring_capacity, keyed=True)
            if len(rings) >= self.max_rings:
                self._uncount(rings.popitem(last=False)[1])
                self.dropped += 1
            rings[conv] = ring
        else:
            rings.move_to_end(conv)
        last = ring.last_key
        if last is not None:
            if k <= last:
                return  # acks resolved out of order: the ring starts later
            if k != last + 1:
                self._uncount(ring)
                ring.clear()
        if len(ring) == self.ring_capacity:  # the append evicts the oldest
            self.text_bytes -= _utf8_len(ring[0].text)
        else:
            self.items += 1
        self.text_bytes += size
        ring.append(item, k)

    def get(self, conv: Hashable) -> RingBuffer | None:
        """``conv``'s ring, or None; its place in the order is left as it is."""
        return self._rings.get(conv)

    def touch(self, conv: Hashable) -> RingBuffer | None:
        """``conv``'s ring, now the most recently used; None when it has none."""
        ring = self._rings.get(conv)
        if ring is not None:
            self._rings.move_to_end(conv)
        return ring

    def forget(self, conv: Hashable) -> None:
        """Drops ``conv``'s ring, if it has one (not counted in ``dropped``)."""
        ring = self._rings.pop(conv, None)
        if ring is not None:
            self._uncount(ring)

    def clear(self) -> None:
        """Drops every ring (not counted in ``dropped``)."""
        self._rings = OrderedDict()
        self.items = 0
        self.text_bytes = 0

    def conversations(self) -> list[Hashable]:
        """The conversations with a ring, from the least recently used."""
        return list(self._rings)
