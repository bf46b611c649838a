"""kefu._core.outbox: a connection's outgoing frames, batched per loop turn, queued behind a
transport that takes no more, refused past the slow-consumer limit.

Every test runs over both implementations (``outbox_impl``), with a real ``OutboundQueue``
(``kefu._core.mq``) and a transport that records what it is given.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from kefu._core import mq

TEXT, BINARY = "TEXT", "BINARY"  # stand-ins for picows's opcodes: passed through as given


class _Underlying:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class _Transport:
    """``send(opcode, data)`` for one frame, ``underlying_transport.write`` for several."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, bytes]] = []
        self.underlying_transport = _Underlying()

    def send(self, opcode: Any, data: bytes) -> None:
        self.sent.append((opcode, data))


def _parse(stream: bytes) -> list[tuple[int, bytes]]:
    """Unmasked frames as (first byte, payload), RFC 6455 section 5.2."""
    frames = []
    i = 0
    while i < len(stream):
        first, size = stream[i], stream[i + 1]
        i += 2
        if size == 126:
            size = int.from_bytes(stream[i : i + 2], "big")
            i += 2
        elif size == 127:
            size = int.from_bytes(stream[i : i + 8], "big")
            i += 8
        frames.append((first, stream[i : i + size]))
        i += size
    assert i == len(stream), "a frame runs past the write"
    return frames


class _Rig:
    def __init__(self, impl: ModuleType, *, binary: bool = False, limit: int = 1 << 20) -> None:
        self.scheduled = 0
        self.slow = 0
        self.frames_out: dict[str, int] = {}
        self.flusher = impl.Flusher(self._schedule, self.frames_out)
        self.out = mq.OutboundQueue(limit)
        self.box = impl.Outbox(
            self.flusher, self.out, BINARY if binary else TEXT, binary, self._on_slow, 4096
        )
        self.transport = _Transport()
        self.box.transport = self.transport

    def _schedule(self) -> None:
        self.scheduled += 1

    def _on_slow(self) -> None:
        self.slow += 1
        self.out.clear()
        self.box.closing = True  # as the connection's close does


def test_frames_of_a_turn_leave_in_one_write_in_order(outbox_impl: ModuleType) -> None:
    rig = _Rig(outbox_impl)
    sizes = (0, 1, 125, 126, 300, 65535, 65536)
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    for i, data in enumerate(payloads):
        assert rig.box.send(data, "msg" if i % 2 else "ack")
    # The 65,535 bytes took the batch past 4,096: its six frames were written at once; the
    # last frame started the next batch, which waits for the end of the turn.
    assert rig.box.batched == 1 and not rig.transport.sent
    assert _parse(b"".join(rig.transport.underlying_transport.writes)) == [
        (0x81, data) for data in payloads[:-1]
    ]
    assert rig.scheduled == 1
    rig.flusher.flush()
    assert rig.flusher.pending == 0 and rig.box.batched == 0
    assert rig.transport.sent == [(TEXT, payloads[-1])]
    assert rig.frames_out == {"ack": 4, "msg": 3}
    assert (rig.flusher.batches_written, rig.flusher.batched_frames) == (2, 7)


def test_batches_follow_a_new_transport(outbox_impl: ModuleType) -> None:
    """The write of a batch of several is looked up once per transport: one set later takes
    the next batches, and none is written once the transport is gone."""
    rig = _Rig(outbox_impl)
    assert rig.box.transport is rig.transport
    rig.box.send(b"a", "msg")
    rig.box.send(b"b", "msg")
    rig.flusher.flush()
    assert [f for w in rig.transport.underlying_transport.writes for f in _parse(w)] == [
        (0x81, b"a"),
        (0x81, b"b"),
    ]
    second = _Transport()
    rig.box.transport = second
    assert rig.box.transport is second
    rig.box.send(b"c", "msg")
    rig.box.send(b"d", "msg")
    rig.flusher.flush()
    assert len(rig.transport.underlying_transport.writes) == 1  # the first one had nothing more
    assert [f for w in second.underlying_transport.writes for f in _parse(w)] == [
        (0x81, b"c"),
        (0x81, b"d"),
    ]
    rig.box.transport = None
    assert not rig.box.send(b"e", "msg")  # refused: no transport
    assert second.underlying_transport.writes and len(second.underlying_transport.writes) == 1


def test_one_frame_goes_through_the_transports_send_with_its_opcode(
    outbox_impl: ModuleType,
) -> None:
    for binary, opcode in ((False, TEXT), (True, BINARY)):
        rig = _Rig(outbox_impl, binary=binary)
        assert rig.box.send(b"one", "msg")
        assert rig.transport.sent == []  # nothing before the end of the turn
        rig.flusher.flush()
        assert rig.transport.sent == [(opcode, b"one")]
        assert rig.transport.underlying_transport.writes == []
        # The next turn starts a new batch and schedules a new flush.
        assert rig.box.send(b"two", "msg") and rig.box.send(b"three", "msg")
        assert rig.scheduled == 2
        rig.flusher.flush()
        first = 0x82 if binary else 0x81
        assert _parse(rig.transport.underlying_transport.writes[0]) == [
            (first, b"two"),
            (first, b"three"),
        ]


def test_the_flusher_schedules_once_per_turn_for_many_outboxes(outbox_impl: ModuleType) -> None:
    rig = _Rig(outbox_impl)
    boxes = [rig.box]
    transports = [rig.transport]
    for _ in range(4):
        box = outbox_impl.Outbox(
            rig.flusher, mq.OutboundQueue(1 << 20), TEXT, False, rig._on_slow, 4096
        )
        box.transport = transport = _Transport()
        boxes.append(box)
        transports.append(transport)
    for i, box in enumerate(boxes):
        assert box.send(f"m{i}".encode(), "msg")
        assert box.send(f"again {i}".encode(), "msg")
    assert rig.scheduled == 1 and rig.flusher.pending == 5
    rig.flusher.flush()
    for i, transport in enumerate(transports):
        assert _parse(transport.underlying_transport.writes[0]) == [
            (0x81, f"m{i}".encode()),
            (0x81, f"again {i}".encode()),
        ]
    assert rig.flusher.batches_written == 5 and rig.frames_out == {"msg": 10}


def test_a_paused_transport_queues_frames_behind_it_in_order(outbox_impl: ModuleType) -> None:
    rig = _Rig(outbox_impl)
    assert rig.box.send(b"a", "msg")
    rig.box.paused = True  # the transport's buffer passed its high water after the batch began
    rig.flusher.flush()
    assert rig.box.send(b"b", "msg")  # straight to the queue, after the batch
    rig.box.paused = False
    assert rig.box.send(b"c", "msg")  # frames still queued: this one waits behind them
    rig.flusher.flush()
    assert rig.transport.sent == [] and rig.transport.underlying_transport.writes == []
    assert rig.out.pop_many(1 << 20) == [b"a", b"b", b"c"]
    assert rig.frames_out == {"msg": 3}


def test_past_the_limit_the_frame_is_refused_and_the_owner_told(outbox_impl: ModuleType) -> None:
    rig = _Rig(outbox_impl, limit=100)
    rig.box.paused = True
    assert rig.box.send(b"x" * 60, "msg")
    assert not rig.box.send(b"y" * 60, "msg")  # 120 bytes > 100: slow consumer
    assert rig.slow == 1 and len(rig.out) == 0
    assert not rig.box.send(b"z", "msg")  # closing now: refused, nothing counted
    assert rig.frames_out == {"msg": 1}


def test_a_batch_that_overflows_the_queue_stops_at_the_refused_frame(
    outbox_impl: ModuleType,
) -> None:
    rig = _Rig(outbox_impl, limit=100)
    for data in (b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 10):
        assert rig.box.send(data, "msg")
    rig.box.paused = True
    assert rig.box.flush() is False
    assert rig.slow == 1  # told once; the frames after the refused one were not offered
    assert rig.transport.sent == [] and rig.transport.underlying_transport.writes == []


def test_closing_or_no_transport_refuses_and_a_dropped_batch_is_never_written(
    outbox_impl: ModuleType,
) -> None:
    rig = _Rig(outbox_impl)
    assert rig.box.send(b"kept", "msg")
    rig.box.drop()  # the connection is gone
    assert rig.box.batched == 0
    rig.flusher.flush()
    assert rig.transport.sent == []
    rig.box.closing = True
    assert not rig.box.send(b"late", "msg")
    fresh = outbox_impl.Outbox(
        rig.flusher, mq.OutboundQueue(1 << 20), TEXT, False, rig._on_slow, 4096
    )
    assert not fresh.send(b"early", "msg")  # not connected yet
    assert rig.frames_out == {"msg": 1}
    # A batch whose connection started closing after it began is not written either.
    rig2 = _Rig(outbox_impl)
    assert rig2.box.send(b"x", "msg")
    rig2.box.closing = True
    assert rig2.box.flush() is False and rig2.transport.sent == []


def test_bad_arguments_are_refused(outbox_impl: ModuleType) -> None:
    rig = _Rig(outbox_impl)
    with pytest.raises(TypeError):
        rig.box.send("text, not bytes", "msg")
    with pytest.raises(ValueError):
        outbox_impl.Outbox(rig.flusher, rig.out, TEXT, False, rig._on_slow, 0)
    with pytest.raises(ValueError):
        outbox_impl.frame_header(256, 1)
    with pytest.raises(ValueError):
        outbox_impl.frame_header(0x81, -1)
    assert rig.frames_out == {} and rig.box.batched == 0


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 1 << 32])
def test_frame_header_is_the_minimal_length_encoding(outbox_impl: ModuleType, size: int) -> None:
    header = outbox_impl.frame_header(0x81, size)
    assert header[0] == 0x81
    if size < 126:
        assert header == bytes((0x81, size))
    elif size < 1 << 16:
        assert header[1] == 126 and int.from_bytes(header[2:], "big") == size and len(header) == 4
    else:
        assert header[1] == 127 and int.from_bytes(header[2:], "big") == size and len(header) == 10


def test_debug_counters(outbox_impl: ModuleType) -> None:
    counters = outbox_impl.debug_counters()
    assert set(counters) == {"live_outboxes"}
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())


def test_fan_out_encodes_once_per_encoding_and_reaches_every_target(
    outbox_impl: ModuleType,
) -> None:
    text, packed = _Rig(outbox_impl), _Rig(outbox_impl, binary=True)
    text2 = _Rig(outbox_impl)
    called: list[tuple[bytes, str]] = []
    encodes: list[str] = []

    def enc_json(frame: object) -> bytes:
        encodes.append("json")
        return b'{"f":' + str(frame).encode() + b"}"

    def enc_packed(frame: object) -> bytes:
        encodes.append("msgpack")
        return b"\x81\xa1f" + bytes([int(str(frame))])

    visitor = ((text.box, lambda data, kind: called.append((data, kind))), (packed.box,))
    agent = ((text2.box,), ())
    outbox_impl.fan_out(visitor, agent, 7, "msg", enc_json, enc_packed)
    assert encodes == ["json", "msgpack"]  # each encoding once, for three and one targets
    assert called == [(b'{"f":7}', "msg")]
    for rig in (text, packed, text2):
        rig.flusher.flush()
    assert text.transport.sent == [(TEXT, b'{"f":7}')]
    assert text2.transport.sent == [(TEXT, b'{"f":7}')]
    assert packed.transport.sent == [(BINARY, b"\x81\xa1f\x07")]
    assert text.frames_out == text2.frames_out == packed.frames_out == {"msg": 1}
    encodes.clear()
    outbox_impl.fan_out(None, ((), (packed.box,)), 8, "msg", enc_json, enc_packed)
    outbox_impl.fan_out(None, None, 9, "msg", enc_json, enc_packed)
    assert encodes == ["msgpack"]  # no JSON target: no JSON encoding


def test_fan_out_skips_a_refusing_target_and_refuses_bad_input(outbox_impl: ModuleType) -> None:
    closed, open_ = _Rig(outbox_impl), _Rig(outbox_impl)
    closed.box.closing = True  # a slow consumer closed by an earlier write
    outbox_impl.fan_out(((closed.box, open_.box), ()), None, 1, "msg", lambda f: b"x", bytes)
    closed.flusher.flush()
    open_.flusher.flush()
    assert closed.transport.sent == [] and open_.transport.sent == [(TEXT, b"x")]
    with pytest.raises(TypeError):
        outbox_impl.fan_out(((open_.box,), ()), None, 1, "msg", lambda f: "not bytes", bytes)
    with pytest.raises(TypeError):
        outbox_impl.fan_out(([open_.box], ()), None, 1, "msg", lambda f: b"x", bytes)
