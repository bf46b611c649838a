"""Pure-Python twin of ``kefu._core.outbox``: the same outboxes, the same writes (that module's
doc)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

__all__ = ["Flusher", "Outbox", "debug_counters", "fan_out", "frame_header"]


def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_outboxes``: outboxes not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_outboxes": 0}


_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


def frame_header(first: int, size: int) -> bytes:
    """The header of an unmasked (server-to-client) frame: ``first`` is FIN plus opcode,
    then the payload length in its minimal encoding (RFC 6455 section 5.2)."""
    if not 0 <= first <= 255:
        raise ValueError(f"first must be a byte, got {first}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size < 126:
        return bytes((first, size))
    if size < 1 << 16:
        return _H16.pack(first, 126, size)
    return _H64.pack(first, 127, size)


class Flusher:
    """The outboxes holding frames of this loop turn: ``flush`` writes them all."""

    __slots__ = ("_dirty", "_schedule", "batched_frames", "batches_written", "frames_out")

    def __init__(self, schedule: Callable[[], object], frames_out: dict[str, int]) -> None:
        self._schedule = schedule
        self.frames_out = frames_out
        self._dirty: list[Outbox] = []
        self.batches_written = 0
        self.batched_frames = 0

    @property
    def pending(self) -> int:
        """Outboxes waiting for ``flush``."""
        return len(self._dirty)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for box in dirty:
            box.flush()


class Outbox:
    """One connection's outgoing frames (module doc of ``kefu._core.outbox``)."""

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_first",
        "_flush_bytes",
        "_flusher",
        "_on_slow",
        "_opcode",
        "_out",
        "_transport",
        "_write",
        "closing",
        "paused",
    )

    def __init__(
        self,
        flusher: Flusher,
        out: Any,
        opcode: object,
        binary: bool,
        on_slow: Callable[[], object],
        flush_bytes: int,
    ) -> None:
        if flush_bytes < 1:
            raise ValueError(f"flush_bytes must be >= 1, got {flush_bytes}")
        self._flusher = flusher
        self._out = out
        self._opcode = opcode
        self._first = 0x82 if binary else 0x81  # FIN and the opcode (binary or text)
        self._on_slow = on_slow
        self._flush_bytes = flush_bytes
        self._batch: list[bytes] | None = None
        self._batch_bytes = 0
        self._transport: Any = None
        self._write: Callable[[bytes], object] | None = None
        self.paused = False
        self.closing = False

    @property
    def transport(self) -> Any:
        """Where the batches go (picows' ``WSTransport``); None: every send is refused."""
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        self._transport = value
        self._write = None  # the new transport's, looked up when a batch of several needs it

    @property
    def batched(self) -> int:
        """Frames collected this turn, not written yet."""
        return 0 if self._batch is None else len(self._batch)

    def send(self, data: bytes, kind: str) -> bool:
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self.closing or self._transport is None:
            return False
        batch = self._batch
        if batch is not None:
            batch.append(data)
            self._batch_bytes += len(data)
            if self._batch_bytes >= self._flush_bytes and not self.flush():
                return False
        elif self.paused or self._out:
            if not self._enqueue(data):
                return False
        else:
            self._batch = [data]
            self._batch_bytes = len(data)
            flusher = self._flusher
            if not flusher._dirty:
                flusher._schedule()
            flusher._dirty.append(self)
        frames_out = self._flusher.frames_out
        frames_out[kind] = frames_out.get(kind, 0) + 1
        return True

    def _enqueue(self, data: bytes) -> bool:
        if self._out.push(data) == _PUSH_SLOW:
            self._on_slow()
            return False
        return True

    def flush(self) -> bool:
        batch = self._batch
        if batch is None:
            return True
        self._batch = None
        self._batch_bytes = 0
        transport = self._transport
        if transport is None or self.closing:
            return False
        flusher = self._flusher
        flusher.batches_written += 1
        flusher.batched_frames += len(batch)
        if self.paused or self._out:
            return all(self._enqueue(data) for data in batch)
        if len(batch) == 1:
            transport.send(self._opcode, batch[0])
            return True
        first = self._first
        parts: list[bytes] = []
        for data in batch:
            parts.append(frame_header(first, len(data)))
            parts.append(data)
        write = self._write
        if write is None:
            write = self._write = transport.underlying_transport.write
        write(b"".join(parts))
        return True

    def drop(self) -> None:
        self._batch = None
        self._batch_bytes = 0


_PUSH_SLOW = 2  # kefu._core.mq.PUSH_SLOW


def fan_out(
    first: tuple[tuple[Any, ...], tuple[Any, ...]] | None,
    second: tuple[tuple[Any, ...], tuple[Any, ...]] | None,
    frame: object,
    kind: str,
    encode_json: Callable[[object], bytes],
    encode_msgpack: Callable[[object], bytes],
) -> None:
    """``frame`` (of type ``kind``) to the targets of ``first`` then of ``second``: each None
    or a pair of tuples, the targets taking JSON and those taking MessagePack. A target is an
    :class:`Outbox` or a callable ``(data, kind)``. ``encode_json(frame)`` and
    ``encode_msgpack(frame)`` are called at most once each, and only for an encoding in use."""
    json_data: bytes | None = None
    packed: bytes | None = None
    for pair in (first, second):
        if pair is None:
            continue
        json_targets, packed_targets = pair[0], pair[1]
        if json_targets:
            if json_data is None:
                json_data = encode_json(frame)
            _send_all(json_targets, json_data, kind)
        if packed_targets:
            if packed is None:
                packed = encode_msgpack(frame)
            _send_all(packed_targets, packed, kind)


def _send_all(targets: tuple[Any, ...], data: bytes, kind: str) -> None:
    if not isinstance(targets, tuple):
        raise TypeError(f"expected tuple, got {type(targets).__name__}")
    if type(data) is not bytes:
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    for target in targets:
        if type(target) is Outbox:
            target.send(data, kind)
        else:
            target(data, kind)
