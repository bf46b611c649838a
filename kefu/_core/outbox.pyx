"""A connection's outgoing frames (compiled; the twin is ``kefu._core._outbox_py``).

Every message leaves the node as three frames (the sender's ack and the message to both sides
of the conversation), and each goes through here: collected per connection during one turn of
the event loop, then written with one write per connection (``kefu.web.ws``, "Write
coalescing"). Here that bookkeeping is a few C stores per frame where the Python it replaces
ran about 150 bytecodes per message.

- :class:`Outbox` (one per connection): ``send(data, kind)`` adds an encoded frame to this
  turn's batch (its first frame puts the outbox on the flusher's list), or queues it behind
  frames the transport has not taken (``out``, an ``OutboundQueue``; a push past its limit
  calls ``on_slow`` and the frame is refused), and counts it in ``frames_out[kind]``. ``flush``
  writes the batch: one frame through ``transport.send(opcode, data)``, several framed here and
  joined into one ``transport.underlying_transport.write``. A batch reaching ``flush_bytes`` is
  written at once. ``closing`` or no ``transport``: every send is refused (``False``).
- :func:`fan_out`: one frame to the connections of up to two principals (a message's visitor
  and agent, ``kefu.hub``), encoded once per encoding in use; an outbox's ``send`` is a C call
  from here, any other target (a test's fake connection) is called.
- :class:`Flusher` (one per server): the outboxes with a batch; ``schedule`` is called when the
  first of a turn joins (the server's ``call_soon`` of its flush), ``flush`` writes them all.
  Bounded by the connections: an outbox joins once per batch.

Both answer exactly as the twin for the same sequence of calls; ``tests/core/test_outbox.py``
runs one suite over both.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject
from libc.string cimport memcpy

__all__ = ["Flusher", "Outbox", "debug_counters", "fan_out", "frame_header"]

cdef extern from "kefu_debug.h":
    int KEFU_DEBUG

cdef Py_ssize_t _live_outboxes = 0


def debug_counters():
    """Live-object counters of a ``KEFU_DEBUG=1`` build, for leak checks.

    ``live_outboxes``: outboxes not yet freed. The twin and a release build of the compiled
    module count nothing: every counter is 0.
    """
    return {"live_outboxes": _live_outboxes}


cdef int _PUSH_SLOW = 2  # kefu._core.mq.PUSH_SLOW


cdef inline Py_ssize_t _header_size(Py_ssize_t size) noexcept:
    if size < 126:
        return 2
    if size < 65536:
        return 4
    return 10


cdef inline void _put_header(char* p, unsigned char first, Py_ssize_t size) noexcept:
    cdef int i
    cdef unsigned long long n = <unsigned long long>size
    p[0] = <char>first
    if size < 126:
        p[1] = <char>size
    elif size < 65536:
        p[1] = <char>126
        p[2] = <char>((n >> 8) & 0xFF)
        p[3] = <char>(n & 0xFF)
    else:
        p[1] = <char>127
        for i in range(8):
            p[2 + i] = <char>((n >> (56 - 8 * i)) & 0xFF)


def frame_header(int first, Py_ssize_t size):
    """The header of an unmasked (server-to-client) frame: ``first`` is FIN plus opcode,
    then the payload length in its minimal encoding (RFC 6455 section 5.2)."""
    if not 0 <= first <= 255:
        raise ValueError(f"first must be a byte, got {first}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    cdef char buf[10]
    _put_header(buf, <unsigned char>first, size)
    return PyBytes_FromStringAndSize(buf, _header_size(size))


@cython.final
cdef class Flusher:
    """The outboxes holding frames of this loop turn: ``flush`` writes them all."""

    cdef list _dirty
    cdef object _schedule
    cdef public dict frames_out
    cdef public long long batches_written
    cdef public long long batched_frames

    def __cinit__(self, schedule, dict frames_out not None):
        self._schedule = schedule
        self.frames_out = frames_out
        self._dirty = []
        self.batches_written = 0
        self.batched_frames = 0

    @property
    def pending(self):
        return len(self._dirty)

    def flush(self):
        cdef list dirty = self._dirty
        self._dirty = []
        cdef Outbox box
        for box in dirty:
            box._flush()


@cython.final
cdef class Outbox:
    """One connection's outgoing frames (module doc)."""

    cdef Flusher _flusher
    cdef object _out
    cdef object _opcode
    cdef unsigned char _first
    cdef object _on_slow
    cdef Py_ssize_t _flush_bytes
    cdef list _batch
    cdef Py_ssize_t _batch_bytes
    cdef object _transport
    cdef object _write  # _transport.underlying_transport.write, looked up at its first use
    cdef public bint paused
    cdef public bint closing

    def __cinit__(
        self,
        Flusher flusher not None,
        out,
        opcode,
        bint binary,
        on_slow,
        Py_ssize_t flush_bytes,
    ):
        global _live_outboxes
        if flush_bytes < 1:
            raise ValueError(f"flush_bytes must be >= 1, got {flush_bytes}")
        self._flusher = flusher
        self._out = out
        self._opcode = opcode
        self._first = 0x82 if binary else 0x81  # FIN and the opcode (binary or text)
        self._on_slow = on_slow
        self._flush_bytes = flush_bytes
        self._batch = None
        self._batch_bytes = 0
        self._transport = None
        self._write = None
        self.paused = False
        self.closing = False
        if KEFU_DEBUG:
            _live_outboxes += 1

    def __dealloc__(self):
        global _live_outboxes
        if self._flusher is not None and KEFU_DEBUG:  # made whole by __cinit__
            _live_outboxes -= 1

    @property
    def transport(self):
        """Where the batches go (picows' ``WSTransport``); None: every send is refused."""
        return self._transport

    @transport.setter
    def transport(self, value):
        self._transport = value
        self._write = None  # the new transport's, looked up when a batch of several needs it

    @property
    def batched(self):
        """Frames collected this turn, not written yet."""
        return 0 if self._batch is None else len(self._batch)

    def send(self, bytes data not None, kind):
        return self._send(data, kind)

    cdef bint _send(self, bytes data, object kind) except -1:
        if self.closing or self._transport is None:
            return False
        cdef list batch = self._batch
        if batch is not None:
            batch.append(data)
            self._batch_bytes += PyBytes_GET_SIZE(data)
            if self._batch_bytes >= self._flush_bytes and not self._flush():
                return False
        elif self.paused or self._out:
            if not self._enqueue(data):
                return False
        else:
            self._batch = [data]
            self._batch_bytes = PyBytes_GET_SIZE(data)
            flusher = self._flusher
            if not flusher._dirty:
                flusher._schedule()
            flusher._dirty.append(self)
        cdef dict frames_out = self._flusher.frames_out
        cdef PyObject* count = PyDict_GetItem(frames_out, kind)
        PyDict_SetItem(frames_out, kind, 1 if count is NULL else <object>count + 1)
        return True

    cdef bint _enqueue(self, bytes data) except -1:
        if self._out.push(data) == _PUSH_SLOW:
            self._on_slow()
            return False
        return True

    def flush(self):
        return self._flush()

    cdef bint _flush(self) except -1:
        cdef list batch = self._batch
        if batch is None:
            return True
        self._batch = None
        self._batch_bytes = 0
        transport = self._transport
        if transport is None or self.closing:
            return False
        cdef Flusher flusher = self._flusher
        cdef Py_ssize_t n = len(batch)
        flusher.batches_written += 1
        flusher.batched_frames += n
        cdef bytes data
        if self.paused or self._out:
            for data in batch:
                if not self._enqueue(data):
                    return False
            return True
        if n == 1:
            transport.send(self._opcode, batch[0])
            return True
        cdef Py_ssize_t total = 0, size
        for data in batch:
            size = PyBytes_GET_SIZE(data)
            total += _header_size(size) + size
        cdef bytes joined = PyBytes_FromStringAndSize(NULL, total)
        cdef char* p = PyBytes_AS_STRING(joined)
        for data in batch:
            size = PyBytes_GET_SIZE(data)
            _put_header(p, self._first, size)
            p += _header_size(size)
            memcpy(p, PyBytes_AS_STRING(data), size)
            p += size
        write = self._write
        if write is None:
            # Once per transport: a property and a method lookup a batch were 1 % of a node's
            # core under load (perf).
            write = self._write = transport.underlying_transport.write
        write(joined)
        return True

    def drop(self):
        self._batch = None
        self._batch_bytes = 0


cdef int _send_all(tuple targets, bytes data, object kind) except -1:
    for target in targets:
        if type(target) is Outbox:
            (<Outbox>target)._send(data, kind)
        else:
            target(data, kind)
    return 0


def fan_out(first, second, frame, kind, encode_json, encode_msgpack):
    """``frame`` (of type ``kind``) to the targets of ``first`` then of ``second``: each None
    or a pair of tuples, the targets taking JSON and those taking MessagePack. A target is an
    :class:`Outbox` or a callable ``(data, kind)``. ``encode_json(frame)`` and
    ``encode_msgpack(frame)`` are called at most once each, and only for an encoding in use."""
    cdef object json_data = None, packed = None
    cdef tuple targets
    for pair in (first, second):
        if pair is None:
            continue
        targets = pair[0]
        if targets:
            if json_data is None:
                json_data = encode_json(frame)
            _send_all(targets, json_data, kind)
        targets = pair[1]
        if targets:
            if packed is None:
                packed = encode_msgpack(frame)
            _send_all(targets, packed, kind)
