"""A connection's outgoing frames (compiled; the twin is ``kefu._core._outbox_py``).

:class:`Outbox`: one connection's frames of a loop turn, written with one write;
:class:`Flusher`: the outboxes with frames waiting, flushed together.
"""

from collections.abc import Callable
from typing import Any, final

__all__ = ["Flusher", "Outbox", "debug_counters", "fan_out", "frame_header"]

def debug_counters() -> dict[str, int]:
    """Live-object counters of a ``KEFU_DEBUG=1`` build (``live_outboxes``). A release build,
    like the twin, counts nothing: every counter is 0."""

def frame_header(first: int, size: int) -> bytes:
    """The header of an unmasked (server-to-client) frame: ``first`` is FIN plus opcode, then
    the payload length in its minimal encoding (RFC 6455 section 5.2)."""

@final
class Flusher:
    """The outboxes holding frames of this loop turn: ``flush`` writes them all."""

    frames_out: dict[str, int]
    batches_written: int
    batched_frames: int
    def __init__(self, schedule: Callable[[], object], frames_out: dict[str, int]) -> None: ...
    @property
    def pending(self) -> int:
        """Outboxes waiting for ``flush``."""
    def flush(self) -> None: ...

@final
class Outbox:
    """One connection's outgoing frames: ``send`` batches (or queues, or refuses) a frame,
    ``flush`` writes the batch."""

    transport: Any
    paused: bool
    closing: bool
    def __init__(
        self,
        flusher: Flusher,
        out: Any,
        opcode: object,
        binary: bool,
        on_slow: Callable[[], object],
        flush_bytes: int,
    ) -> None: ...
    @property
    def batched(self) -> int:
        """Frames collected this turn, not written yet."""
    def send(self, data: bytes, kind: str) -> bool:
        """``False``: refused (closing, no transport, or the slow-consumer limit passed)."""
    def flush(self) -> bool:
        """``False``: the batch could not be written (closing, or a slow consumer)."""
    def drop(self) -> None:
        """Forget the batch (the connection is gone)."""

def fan_out(
    first: tuple[tuple[Any, ...], tuple[Any, ...]] | None,
    second: tuple[tuple[Any, ...], tuple[Any, ...]] | None,
    frame: object,
    kind: str,
    encode_json: Callable[[object], bytes],
    encode_msgpack: Callable[[object], bytes],
) -> None:
    """``frame`` to the targets of ``first`` then ``second`` (each None or the pair of
    (JSON targets, MessagePack targets)), encoded at most once per encoding in use."""
