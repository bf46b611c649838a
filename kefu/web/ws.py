"""The WebSocket front of one node: transport rules and limits, on picows and uvloop.

This module knows nothing about conversations. It accepts connections on ``ws.path``, enforces
RFC 6455 and the limits of ``PROTOCOL.md`` ("Errors and limits"), decodes frames with
:mod:`kefu.protocol` and hands them to a :class:`FrameHandler` (the node).

Decisions
---------
- **One frame at a time per connection.** A connection's frames are handled in arrival order,
  each after the previous one's handler call returned: answers keep the order of the commands
  (an ``error`` for a bad frame comes after the ``ack`` of the ``send`` before it), and the
  node never sees two commands of one client at once (but for the sends of the next point).
  The inbox between the socket and the handler is bounded (:data:`INBOX_FRAMES` frames,
  :data:`INBOX_BYTES` bytes); a command that does not fit is refused like one over the token
  bucket (``rate_limited``, and it counts towards the 4029 close). The worker task exists
  only while the inbox is not empty, so an idle connection holds no task.
- **Sends without a task.** A ``send`` arriving while its connection has nothing in hand but
  sends taken this way (the common case: a client waits for its ack, or pipelines a few sends)
  is offered to the handler's optional ``on_send_nowait``, which stores it and answers from
  the store's completion callback: no task, no coroutine chain and no future per message (a
  third of the CPU per message at full load went to those). Such sends are the one exception
  to one-at-a-time: up to :data:`NOWAIT_MAX` of one connection may be in the handler's hands
  at once, since the handler orders them itself (it takes each one's ``seq`` as it takes it,
  and the store answers in that order), so their answers keep the order of the commands.
  Anything else (another command, a send the handler declines, a send past
  :data:`NOWAIT_MAX`) queues in the inbox until the handler has called ``frame_done`` for
  every send it took, and the one-at-a-time order above holds from there. A client that
  pipelines its sends (``python -m loadtest chat --window 4``) so gets one read and one write
  for several messages, not a task per message.
- **Upgrade refusals are HTTP answers**: a path other than ``ws.path`` is 404, an ``Origin``
  outside the allow-list 403, a node at ``max_connections`` (or stopping) 503 with
  ``Retry-After``: cheaper than accepting and closing with 1013, and load balancers understand
  it. No ``Origin`` header (non-browser clients) is allowed, as is any origin when the list is
  empty.
- **Subprotocol** ``kefu.msgpack``, when the client offers it, is selected: frames are then
  binary MessagePack. Otherwise frames are text JSON, and a binary frame is answered with
  ``error {code: "bad_frame"}``.
- **Upgrade deadline**: a TCP connection must complete its upgrade request within
  :data:`HANDSHAKE_TIMEOUT_S` (or ``hello_timeout_s`` when shorter); picows then closes it.
- **Limits beyond the connection** (when the server is given a
  :class:`~kefu.web.ratelimit.Limits`): every message is also charged to the bucket of the
  client's address and, once welcomed, of the visitor, all of them or none (refused like one
  over the connection's bucket); a connection past the per-address cap is closed with 4029
  right after the upgrade, one past the per-visitor or per-agent cap at its ``hello``
  (:mod:`kefu.web.ratelimit` says why 4029 and why not an HTTP refusal).
- **Hello**: the first message must be a valid ``hello`` (else close 1008), and the welcome
  must be sent within ``hello_timeout_s`` of the upgrade, authentication included (else 1008).
  Frames pipelined after the hello wait in the inbox and are handled after the welcome. The
  server fills the welcome's ``ping_interval_ms`` and ``max_msg_bytes`` from its config.
- **Heartbeat**: the server sends a WS ping every ``ping_interval_s`` to a connection it has
  heard nothing from in that interval; with no pong within ``pong_timeout_s`` it fails the
  connection with close 1011 ("pong timeout") and drops the TCP connection without waiting for
  the peer (it is presumed gone). A client that spoke in the interval is known to be there, and
  its traffic keeps idle timeouts on the way open: pinging it would cost a write, a read and two
  timers per connection and interval for nothing (at 8,000 busy connections, 400 of each per
  second, in bursts as the connections came in together). A peer gone silent is so detected
  within two intervals and the pong timeout.
- **Write coalescing**: the frames a connection is sent during one turn of the event loop are
  collected and written with one ``write`` at the end of the turn (the server keeps the list of
  connections with frames waiting, and one ``call_soon`` drains it). A message fanned out to an
  agent holding a hundred conversations, or a group commit that acks many messages, would
  otherwise cost one ``send`` system call per frame: on loopback that call was a third of the
  server's time under load. A single frame goes out through picows as before; a batch that
  reaches :data:`BATCH_FLUSH_BYTES` is written at once; a close writes what is waiting first.
  This bookkeeping is compiled (:mod:`kefu._core.outbox`): every frame of every message passes
  it, and ``send_encoded`` is the outbox's own method.
  A group commit's answers are written as soon as the batch's callbacks have run
  (:meth:`WsServer.flush_writes`): its write runs from a callback, and a callback's
  ``call_soon`` waits for the loop's next turn, after the next poll has read (and handled)
  every socket that is ready; the acks of a busy node would wait that long. A batch that a
  full queue forced from inside a socket's read is the exception (``kefu.store``,
  ``after_ack``): its frames wait for the end of the turn, or on a saturated node the clients
  would answer within the same poll, and the loop would read on for seconds, its timers and
  callbacks waiting.
- **Busy polling** (``ws.busy_poll_us``, off by default): after the node writes frames, the
  loop keeps polling its sockets without sleeping for that long (a callback that puts itself
  back in the ready queue, so each turn polls with a zero timeout), then sleeps again. On a
  virtual machine an idle CPU halts and hands its core back to the host, and the next frame
  then finds it to be woken and its caches cold. At 10,000 msgs/s, with the loop idle a
  quarter of the time in gaps under a millisecond, p99 was lower with a 2 ms window in six
  alternating pairs of six (``loadtest/README.md``, "session 18"), on a machine too noisy for
  one figure; on a quieter one (session 19) it changed nothing measurable. The price is the
  core: it stays busy while traffic flows (the node's CPU reads 92-94 % where it read 70-80
  %), so it is for a node with a core of its own. The turns spent so are counted
  (``busy_polls``).
- **Slow consumer**: frames go straight to the transport while it takes them. When its buffer
  passes :data:`TRANSPORT_HIGH_WATER` (picows forwards ``pause_writing``), frames wait in the
  connection's ``OutboundQueue`` until ``resume_writing``; a push past
  ``outbound_limit_bytes`` closes with 4008 and drops the queue. Pongs answering client pings
  are not queued: while writing is paused only the latest is kept (RFC 6455 section 5.5.3
  allows answering the most recent ping only).
- **Closing**: a close we start waits :data:`CLOSE_TIMEOUT_S` for the client's close frame,
  then the TCP connection is aborted (a client that does not read would otherwise hold it until
  TCP timeouts). For a protocol failure (RFC 6455 section 7.1.7) the server closes TCP right
  after its close frame. Frames still queued when a close starts are dropped (live pushes are
  at most once; resuming from the log completes them). On the client's close the server echoes
  its code (1000 for an empty close frame) and closes TCP (section 7.1.1: the server closes
  first).
- **Echo mode** (``ws.echo_path``, off unless set): a conformance-test aid. On that path the
  same :class:`Connection`, with the same RFC 6455 checks, limits and heartbeat, sends every
  message back as it came (text as text, binary as binary) instead of speaking the chat
  protocol: no hello, no handler, no token bucket (the Autobahn test suite sends thousands of
  messages and an echo answers each with one). The echo is written straight to the transport;
  when its buffer passes the high water the connection stops reading until it drains, so a
  peer that writes faster than it reads holds at most that buffer plus one message.

What picows 2.3.1 enforces, and what this module adds
-----------------------------------------------------
picows checks masking of client frames, unknown opcodes, fragmented control frames, control
frames over 125 bytes, non-minimal length encodings, one frame over ``max_frame_size`` (set to
``max_msg_bytes``: close 1009 from the header, before the payload is read), close frames with a
1-byte payload, close codes below 3000 outside its enum, and close reasons that are not UTF-8
(1007). This module adds: reserved bits (RSV1-3, no extension is negotiated: 1002); the
fragmentation rules (continuation without a start, a new data frame inside a fragmented
message: 1002); the size of a fragmented message, checked as fragments arrive (1009); UTF-8 of
text messages, incrementally across fragments (1007); the close codes picows lets through
(0 in a 2-byte payload, 1006, 5000 and above: 1002); the echo of a close; pongs (picows's
automatic pong is off so that the checks above also apply to pings); the heartbeat (picows's
auto-ping would close with 1001).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import resource
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, Final, Protocol

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from kefu._core import mq, outbox
from kefu.config import WsConfig
from kefu.protocol import (
    ClientFrame,
    Error,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Send,
    Welcome,
    encode_json,
    encode_msgpack,
)
from kefu.web.ratelimit import Limits, TokenBucket

__all__ = [
    "CLOSE_RATE_LIMITED",
    "CLOSE_SLOW_CONSUMER",
    "SUBPROTOCOL_MSGPACK",
    "AuthError",
    "Connection",
    "FrameHandler",
    "WsServer",
    "raise_nofile_limit",
]

log = logging.getLogger("kefu.ws")

SUBPROTOCOL_MSGPACK: Final = "kefu.msgpack"
CLOSE_SLOW_CONSUMER: Final = 4008  # PROTOCOL.md: "slow consumer"
CLOSE_RATE_LIMITED: Final = 4029  # PROTOCOL.md: the token bucket keeps refusing
#: Commands waiting for the handler, per connection; beyond, the command is refused.
INBOX_FRAMES: Final = 64
#: Bytes of those commands; 16 messages of the default 64 KiB.
INBOX_BYTES: Final = 1 << 20
#: Sends of one connection the handler may hold at once without a task (module doc, "Sends
#: without a task"); past it, sends wait in the inbox.
NOWAIT_MAX: Final = 32
#: Transport buffer above which frames wait in the OutboundQueue (where they count against
#: ``outbound_limit_bytes``); resume below the low water.
TRANSPORT_HIGH_WATER: Final = 64 << 10
#: A connection's frames collected in one loop turn are written at once past this size.
BATCH_FLUSH_BYTES: Final = 64 << 10
TRANSPORT_LOW_WATER: Final = 16 << 10
#: How long a close we started waits for the client's close frame before the TCP abort.
CLOSE_TIMEOUT_S: Final = 5.0
#: Deadline from TCP accept to a complete upgrade request (picows closes the socket after it);
#: never longer than ``hello_timeout_s``, so no connection outlives that deadline unnamed.
HANDSHAKE_TIMEOUT_S: Final = 5.0
#: File descriptors kept for the rest of the process (store, HTTP listener, logs).
FD_RESERVE: Final = 256
#: RFC 6455 section 5.5: a control frame's payload is at most 125 bytes, 2 of them the code.
_MAX_CLOSE_REASON_BYTES: Final = 123

_BINARY_ON_JSON: Final = f"binary frames need subprotocol {SUBPROTOCOL_MSGPACK}"

_TEXT: Final = WSMsgType.TEXT
#: ``Connection._worker`` while the handler answers a send it took without a task.
_TAKEN: Final = object()
_BINARY: Final = WSMsgType.BINARY


_CONT: Final = WSMsgType.CONTINUATION
_PING: Final = WSMsgType.PING
_PONG: Final = WSMsgType.PONG
_CLOSE: Final = WSMsgType.CLOSE

# Connection states.
_HELLO: Final = 0  # waiting for the first message
_AUTH: Final = 1  # hello received, authentication running
_OPEN: Final = 2  # welcome sent
_CLOSING: Final = 3  # a close frame was sent
_CLOSED: Final = 4  # TCP connection gone


def _valid_close_code(code: int) -> bool:
    """RFC 6455 section 7.4: codes a peer may send in a close frame.

    1004-1006 and 1015 are reserved (never sent), below 1000 and 1016-2999 unassigned, 5000
    and above out of range. 1012-1014 are registered with IANA (service restart, try again
    later, bad gateway), so they are accepted.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _close_payload_reason(reason: str) -> bytes:
    """``reason`` as UTF-8, cut on a character boundary to fit a close frame."""
    data = reason.encode()
    if len(data) <= _MAX_CLOSE_REASON_BYTES:
        return data
    return data[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()


_tags: dict[type, str] = {}


def _tag(cls: type) -> str:
    """The ``type`` a frame class is written with (cached: one dict lookup per frame)."""
    tag = _tags.get(cls)
    if tag is None:
        tag = _tags[cls] = str(cls.__struct_config__.tag)  # type: ignore[attr-defined]
    return tag


class AuthError(Exception):
    """Raised by :meth:`FrameHandler.authenticate` for a bad token: close 1008."""


class TryAgainLater(Exception):
    """Raised by :meth:`FrameHandler.authenticate` when the token is good but what it opens
    cannot be reached now (a cluster node or Redis is away): close 1013, "try again later"."""


class FrameHandler(Protocol):
    """What the WebSocket front calls; the node implements it.

    Calls for one connection never overlap: each waits for the previous one to return.
    """

    async def authenticate(self, conn: Connection, hello: Hello) -> Welcome:
        """Check ``hello.token``; raise :class:`AuthError` to refuse (close 1008).

        The server sets ``ping_interval_ms`` and ``max_msg_bytes`` of the returned welcome,
        sends it, and sets ``conn.role`` and ``conn.principal`` from it.
        """
        ...

    async def on_ready(self, conn: Connection, hello: Hello) -> None:
        """Called once right after the welcome was queued: replay ``hello.resume`` here."""
        ...

    async def on_frame(self, conn: Connection, frame: ClientFrame) -> None:
        """One decoded command of an authenticated connection (never ``hello`` or ``ping``)."""
        ...

    # Optional: def on_unwelcomed(self, conn: Connection) -> None
    #     ``authenticate`` answered but the connection will not be welcomed (it closed
    #     meanwhile, or a connection limit refused it): no ``on_ready``, no ``on_close``.

    # Optional: def on_send_nowait(self, conn: Connection, frame: Send) -> bool
    #     Take ``frame`` without a task, when the connection has nothing else in hand but
    #     sends taken so (up to NOWAIT_MAX; the handler answers them in the order it took
    #     them). True: the handler took it and calls ``conn.frame_done()`` exactly once when it
    #     is answered (until all are, the connection's other frames wait). False: it goes
    #     through ``on_frame``, after the sends taken before it.

    def on_close(self, conn: Connection) -> None:
        """The connection is gone. Called once for each connection that was welcomed, after
        the last of its other handler calls returned."""
        ...


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows's own lines, under ``kefu.ws.transport``.

    picows logs every accepted and lost connection at INFO, and a client's framing error at
    ERROR; at thousands of connections those are debug lines and client faults, not server
    errors.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG
        elif level == logging.ERROR and isinstance(msg, str) and msg.startswith("WS parser"):
            level = logging.INFO
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


class Connection(WSListener):
    """One client connection: its state, limits and outgoing queue.

    Public: ``id``, ``remote`` (``host:port``), ``msgpack`` (subprotocol ``kefu.msgpack``),
    ``role`` and ``principal`` (from the welcome; ``None`` before), ``close_code`` (the code
    the server sent, if any), :meth:`send`, :meth:`send_encoded`, :meth:`close`.
    """

    __slots__ = (
        "_bucket",
        "_close_timer",
        "_decoder",
        "_forwarded_for",
        "_frag_op",
        "_frag_parts",
        "_frag_size",
        "_frag_utf8",
        "_heard",
        "_hello_timer",
        "_inbox",
        "_inbox_bytes",
        "_ip_bucket",
        "_ip_counted",
        "_notify_close",
        "_opcode",
        "_out",
        "_outbox",
        "_pending_pong",
        "_ping_timer",
        "_pong_timer",
        "_principal_counted",
        "_refusals",
        "_server",
        "_state",
        "_taken",
        "_transport",
        "_visitor_bucket",
        "_worker",
        "close_code",
        "echo",
        "id",
        "ip",
        "msgpack",
        "principal",
        "received_ns",
        "remote",
        "role",
        "send_encoded",
    )

    #: ``send_encoded(data, kind) -> bool`` sends a frame already encoded for this
    #: connection's encoding (``msgpack``): for fan-out, encode a frame once per encoding and
    #: send the bytes to every recipient. ``kind`` is the frame's ``type``, for the counters.
    #: Same answer as :meth:`send`; frames of this turn already waiting go first (module doc,
    #: "Write coalescing"). The outbox's own method (``kefu._core.outbox``): every frame of
    #: every message comes this way, and a method of this class around it was a Python call
    #: more per frame.
    send_encoded: Callable[[bytes, str], bool]

    def __init__(
        self, server: WsServer, conn_id: int, msgpack: bool, *, echo: bool = False
    ) -> None:
        self._server = server
        self.id = conn_id
        self.msgpack = msgpack
        self.echo = echo  # module doc, "Echo mode"
        self.remote = ""
        self.ip = ""  # the client's address (kefu.web.ratelimit, "Addresses")
        self._forwarded_for: str | None = None  # X-Forwarded-For of the upgrade request
        self._ip_bucket: TokenBucket | None = None
        self._visitor_bucket: TokenBucket | None = None
        self._ip_counted = False
        self._principal_counted = False
        self.role: str | None = None
        self.principal: str | None = None
        self.close_code: int | None = None
        # perf_counter_ns() when the frame being handled was read (for the latency metrics)
        self.received_ns = 0
        self._state = _HELLO
        self._transport: WSTransport | None = None
        self._opcode = _BINARY if msgpack else _TEXT
        self._decoder = server._decoders[msgpack]
        self._out = mq.OutboundQueue(server.config.outbound_limit_bytes)
        # This turn's frames, written at its end (module doc, "Write coalescing"), and the
        # queue behind a transport that takes no more.
        self._outbox = outbox.Outbox(
            server._flusher,
            self._out,
            self._opcode,
            msgpack,
            self._slow_consumer,
            BATCH_FLUSH_BYTES,
        )
        self.send_encoded = self._outbox.send
        self._pending_pong: bytes | None = None
        self._frag_op: WSMsgType | None = None
        self._frag_parts: list[Any] = []
        self._frag_size = 0
        self._frag_utf8: codecs.IncrementalDecoder | None = None
        # Made when a frame has to wait and dropped once handled (a send taken without a task
        # never needs one): an empty deque is 760 bytes, which an idle connection would hold
        # for nothing.
        self._inbox: deque[tuple[ClientFrame | ProtocolError, int, int]] | None = None
        self._inbox_bytes = 0
        #: The drain task, or _TAKEN while the handler holds sends it took without one.
        self._worker: asyncio.Task[None] | object | None = None
        self._taken = 0  # how many: each ends with the handler's frame_done
        self._bucket: TokenBucket | None = None
        self._refusals = 0
        self._hello_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._heard = False  # a frame came since the last ping timer (module doc, "Heartbeat")
        self._pong_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._notify_close = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.remote} role={self.role} principal={self.principal}>"

    # -----------------------------------------------------------------------------------------
    # Sending

    @property
    def closing(self) -> bool:
        """Whether a close started (or the connection is gone): :meth:`send` is refused."""
        return self._state >= _CLOSING

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the outbound queue (the transport would not take them yet)."""
        return int(self._out.nbytes)

    def send(self, frame: Any) -> bool:
        """Encodes ``frame`` for this connection and sends or queues it.

        ``False`` when the connection is closing, or when the frame would take the queue past
        ``outbound_limit_bytes``: the connection is then closed with 4008 ("slow consumer").
        """
        if self._state >= _CLOSING:
            return False
        data = encode_msgpack(frame) if self.msgpack else encode_json(frame)
        if type(frame) is Error:
            errors = self._server.errors
            errors[frame.code] = errors.get(frame.code, 0) + 1
        return self.send_encoded(data, _tag(type(frame)))

    def _slow_consumer(self) -> None:
        """The queue would pass ``outbound_limit_bytes``: close with 4008 (the outbox refused
        the frame)."""
        out = self._out
        self._server.slow_consumer_closes += 1
        log.info("conn %s: slow consumer, %d bytes queued", self.id, out.nbytes)
        out.clear()
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Starts the closing handshake with ``code``; the TCP connection is aborted if the
        client has not answered within :data:`CLOSE_TIMEOUT_S`. Does nothing if closing."""
        if self._state >= _CLOSING or self._transport is None:
            return
        box = self._outbox
        if box.batched:
            box.flush()  # what was sent before the close goes before it
            if self._state >= _CLOSING:
                return
        self._state = _CLOSING
        box.closing = True
        self.close_code = code
        self._cancel_timers()
        self._drop_inbox()
        self._inbox_bytes = 0
        self._frag_parts = []
        self._out.clear()
        self._transport.send_close(WSCloseCode(code), _close_payload_reason(reason))
        loop = self._server._loop
        self._close_timer = loop.call_later(self._server.close_timeout_s, self._abort)

    def _fail(self, code: int, reason: str) -> None:
        """RFC 6455 section 7.1.7, "Fail the WebSocket Connection": close frame, then TCP."""
        log.info("conn %s: failing with %d (%s)", self.id, code, reason)
        self.close(code, reason)
        if self._transport is not None:
            self._transport.disconnect(graceful=True)

    def _abort(self) -> None:
        self._close_timer = None
        if self._transport is not None and not self._transport.is_disconnected:
            self._transport.disconnect(graceful=False)

    def _cancel_timers(self) -> None:
        for timer in (self._hello_timer, self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._hello_timer = self._ping_timer = self._pong_timer = None

    # -----------------------------------------------------------------------------------------
    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        self._outbox.transport = transport
        server = self._server
        loop = server._loop
        underlying = transport.underlying_transport
        peer = underlying.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.remote = f"{peer[0]}:{peer[1]}"
        limits = server.limits
        over_ip_cap = False
        if limits is not None and not self.echo and isinstance(peer, tuple) and peer:
            self.ip = limits.client_ip(str(peer[0]), self._forwarded_for)
            self._ip_bucket = limits.ip_bucket(self.ip, loop.time())
            self._ip_counted = limits.connect_ip(self.ip)
            over_ip_cap = not self._ip_counted
        underlying.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER, low=TRANSPORT_LOW_WATER)
        if self.echo:
            self._state = _OPEN  # no hello and no commands: every message is echoed
        else:
            rate = server.config.rate
            self._bucket = TokenBucket(rate.per_second, rate.burst, loop.time())
            self._hello_timer = loop.call_later(server.config.hello_timeout_s, self._hello_expired)
        self._ping_timer = loop.call_later(server.config.ping_interval_s, self._send_ping)
        server._register(self)
        if over_ip_cap:
            # kefu.web.ratelimit: past the per-address cap, closed before any frame is read.
            self.close(CLOSE_RATE_LIMITED, "too many connections from this address")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._state = _CLOSED
        self._outbox.closing = True
        self._cancel_timers()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._drop_inbox()
        self._out.clear()
        self._outbox.drop()
        self._release_limits()
        self._server._unregister(self, transport)
        if self.role is not None:
            if self._worker is None:
                self._server._notify_closed(self)
            else:
                self._notify_close = True  # the worker calls on_close when its call returns

    def pause_writing(self) -> None:
        self._outbox.paused = True

    def resume_writing(self) -> None:
        box = self._outbox
        box.paused = False
        transport = self._transport
        if transport is None:
            return
        if self.echo:
            transport.underlying_transport.resume_reading()
        if self._state >= _CLOSING:
            return
        if self._pending_pong is not None:
            transport.send_pong(self._pending_pong)
            self._pending_pong = None
        out = self._out
        opcode = self._opcode
        while out and not box.paused:
            for data in out.pop_many(TRANSPORT_HIGH_WATER):
                transport.send(opcode, data)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self._heard = True
        try:
            # The common frame, a whole text message on an open connection, straight to
            # _on_message (what _on_frame does with it, with one call less a message).
            if (
                frame.msg_type is _TEXT
                and frame.fin
                and self._state < _CLOSING
                and self._frag_op is None
                and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
            ):
                data = frame.get_payload_as_bytes()
                if data.isascii() or self._valid_text(data):  # ASCII is UTF-8: no call
                    self._on_message(False, data)
                return
            self._on_frame(frame)
        except Exception:
            log.exception("conn %s: failure while reading a frame", self.id)
            self._fail(1011, "internal error")

    # -----------------------------------------------------------------------------------------
    # Reading

    def _on_frame(self, frame: WSFrame) -> None:
        op = frame.msg_type
        if self._state >= _CLOSING:
            # RFC 6455 section 5.5.1: after sending a close, only the peer's close matters.
            if op is _CLOSE and self._transport is not None:
                self._transport.disconnect(graceful=True)
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # Section 5.2: nonzero RSV bits without a negotiated extension fail the connection.
            self._fail(1002, "reserved bits set")
            return
        if op is _TEXT or op is _BINARY:
            if self._frag_op is not None:
                # Section 5.4: a fragmented message must end before the next message starts.
                self._fail(1002, "new message inside a fragmented message")
                return
            if frame.fin:
                data = frame.get_payload_as_bytes()
                if op is _TEXT and not (data.isascii() or self._valid_text(data)):
                    return
                self._on_message(op is _BINARY, data)
            else:
                self._frag_op = op
                self._frag_size = 0
                self._frag_parts = []
                self._frag_utf8 = codecs.getincrementaldecoder("utf-8")() if op is _TEXT else None
                self._add_fragment(frame)
        elif op is _CONT:
            if self._frag_op is None:
                self._fail(1002, "continuation frame without a message to continue")
                return
            self._add_fragment(frame)
        elif op is _PING:
            payload = frame.get_payload_as_bytes()
            if self._outbox.paused:
                self._pending_pong = payload
            elif self._transport is not None:
                self._transport.send_pong(payload)
        elif op is _PONG:
            # Section 5.5.3: an unsolicited pong is allowed and needs no answer.
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
        elif op is _CLOSE:
            self._on_close_frame(frame)

    def _valid_text(self, data: bytes) -> bool:
        """Whether a whole text message that is not ASCII (its callers test that first, without
        a call) is UTF-8; if not, the connection fails with 1007."""
        try:
            data.decode()
        except UnicodeDecodeError:
            self._fail(1007, "text frame is not valid UTF-8")  # section 8.1
            return False
        return True

    def _add_fragment(self, frame: WSFrame) -> None:
        size = self._frag_size + frame.payload_size
        if size > self._server.config.max_msg_bytes:
            # PROTOCOL.md: a message over max_msg_bytes closes with 1009, checked per fragment
            # so that no more than the limit is ever buffered.
            self._fail(1009, "message too big")
            return
        self._frag_size = size
        data = frame.get_payload_as_bytes()
        utf8 = self._frag_utf8
        if utf8 is not None:
            try:
                # Incremental: an invalid sequence fails at the fragment that holds it.
                self._frag_parts.append(utf8.decode(data, frame.fin))
            except UnicodeDecodeError:
                self._fail(1007, "text message is not valid UTF-8")
                return
        else:
            self._frag_parts.append(data)
        if frame.fin:
            binary = self._frag_op is _BINARY
            parts = self._frag_parts
            self._frag_op = None
            self._frag_parts = []
            self._frag_utf8 = None
            self._on_message(binary, b"".join(parts) if binary else "".join(parts))

    def _on_close_frame(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if not payload:
            code = 1000  # section 7.1.5: no status code received; answer a normal close
        else:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                self._fail(1002, "invalid close code")
                return
        if self._transport is not None:
            self.close(code)
            self._transport.disconnect(graceful=True)

    def _on_message(self, binary: bool, data: bytes | str) -> None:
        if self.echo:
            self._echo(binary, data)
            return
        server = self._server
        bucket = self._bucket
        if bucket is not None:
            # All of this message's buckets or none (kefu.web.ratelimit), inline: this runs
            # for every message.
            now = server._loop.time()
            if not bucket.take(now):
                self._refuse("rate limit exceeded")
                return
            visitor = self._visitor_bucket
            if visitor is not None and not visitor.take(now):
                bucket.give_back()
                self._refuse_keyed("ws_visitor", "rate limit of this visitor exceeded")
                return
            ip = self._ip_bucket
            if ip is not None and not ip.take(now):
                bucket.give_back()
                if visitor is not None:
                    visitor.give_back()
                self._refuse_keyed("ws_ip", "rate limit of this address exceeded")
                return
        self._refusals = 0
        item: ClientFrame | ProtocolError
        if binary and not self.msgpack:
            item = ProtocolError("bad_frame", _BINARY_ON_JSON)
        else:
            try:
                item = self._decoder.decode(data)
            except ProtocolError as exc:
                item = exc
            else:
                # By class, named at read time (frames_in): one dict update a frame.
                counts = server.frames_in_by_class
                cls = type(item)
                counts[cls] = counts.get(cls, 0) + 1
        if self._state == _HELLO:
            if type(item) is not Hello:
                # PROTOCOL.md: no valid hello first closes with 1008.
                self.close(1008, "the first frame must be a valid hello")
                return
            self._state = _AUTH
        size = len(data)
        inbox = self._inbox  # None while empty: made only for a frame that has to wait
        if (
            inbox is not None and len(inbox) >= INBOX_FRAMES
        ) or self._inbox_bytes + size > INBOX_BYTES:
            self._refuse("too many commands in flight")
            return
        worker = self._worker
        if (
            (worker is None or (worker is _TAKEN and self._taken < NOWAIT_MAX))
            and not inbox
            and self._state == _OPEN
            and type(item) is Send
            and server._nowait is not None
        ):
            # The fast path (module doc, "Sends without a task"): nothing of this connection
            # is in hand but sends taken so, so the handler may take this one now and answer
            # it from a callback.
            self.received_ns = time.perf_counter_ns()
            self._worker = _TAKEN
            self._taken += 1
            try:
                taken = server._nowait(self, item)
            except Exception:
                log.exception("conn %s: handler failed on send", self.id)
                self._untake()
                self.send(Error(code="internal", message="internal error", ref="send"))
                return
            if taken:
                return
            self._untake()
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append((item, size, time.perf_counter_ns()))
        self._inbox_bytes += size
        if self._worker is None:
            self._worker = server._loop.create_task(self._drain())

    def _untake(self) -> None:
        """A send offered to ``on_send_nowait`` was not taken after all (declined, or the call
        failed): it counts no more; the queued frames wait for the sends still taken."""
        self._taken -= 1
        if not self._taken:
            self._worker = None

    def frame_done(self) -> None:
        """The handler finished a send it took with ``on_send_nowait``. Once it finished them
        all, the next frames (queued meanwhile) go on, or the close waiting for it is
        reported."""
        if self._worker is not _TAKEN:
            return
        self._taken -= 1
        if self._taken:
            return
        self._worker = None
        if self._notify_close:
            self._notify_close = False
            self._server._notify_closed(self)
        elif self._inbox and self._state < _CLOSING:
            self._worker = self._server._loop.create_task(self._drain())

    def _echo(self, binary: bool, data: bytes | str) -> None:
        """Echo mode: the message goes back as it came (module doc, "Echo mode")."""
        transport = self._transport
        if transport is None:
            return
        transport.send(_BINARY if binary else _TEXT, data.encode() if type(data) is str else data)
        if self._outbox.paused:
            # The peer reads slower than it writes: read nothing more until the transport's
            # buffer drains (resume_writing), so that the buffer does not grow without bound.
            transport.underlying_transport.pause_reading()

    def _refuse_keyed(self, limit: str, message: str) -> None:
        """A command refused by a per-visitor or per-address bucket: counted, then as any."""
        limits = self._server.limits
        if limits is not None:
            limits.refused[limit] += 1
        self._refuse(message)

    def _release_limits(self) -> None:
        """Gives back this connection's places under the connection caps (once)."""
        limits = self._server.limits
        if limits is None:
            return
        if self._ip_counted:
            self._ip_counted = False
            limits.disconnect_ip(self.ip)
        if self._principal_counted and self.role is not None and self.principal is not None:
            self._principal_counted = False
            limits.disconnect_principal(self.role, self.principal)

    def _refuse(self, message: str) -> None:
        """A command over the budget: ``rate_limited``, and 4029 if refusals go on."""
        self._refusals += 1
        if self._refusals >= self._server.config.rate_close_after:
            self._server.rate_limit_closes += 1
            self.close(CLOSE_RATE_LIMITED, "rate limited")
        else:
            self.send(Error(code="rate_limited", message=message))

    # -----------------------------------------------------------------------------------------
    # Handling, one frame at a time

    def _drop_inbox(self) -> None:
        """Forget the frames not handled yet (a close drops them, module doc)."""
        inbox = self._inbox
        if inbox is not None:
            inbox.clear()  # the worker, if any, sees it empty and stops
            self._inbox = None

    async def _drain(self) -> None:
        inbox = self._inbox
        try:
            while inbox and self._state < _CLOSING:
                item, size, self.received_ns = inbox.popleft()
                self._inbox_bytes -= size
                await self._dispatch(item)
        finally:
            self._worker = None
            if self._inbox is inbox and not inbox:
                self._inbox = None  # handled all: the next frame makes a new one
            if self._notify_close:
                self._notify_close = False
                self._server._notify_closed(self)

    async def _dispatch(self, item: ClientFrame | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            self.send(item.to_frame())
        elif isinstance(item, Ping):
            self.send(Pong())
        elif isinstance(item, Hello):
            if self._state == _AUTH:
                await self._authenticate(item)
            else:
                self.send(Error(code="invalid", message="already authenticated", ref="hello"))
        else:
            try:
                await self._server.handler.on_frame(self, item)
            except Exception:
                tag = _tag(type(item))
                log.exception("conn %s: handler failed on %s", self.id, tag)
                self.send(Error(code="internal", message="internal error", ref=tag))

    async def _authenticate(self, hello: Hello) -> None:
        server = self._server
        try:
            welcome = await server.handler.authenticate(self, hello)
        except AuthError as exc:
            server.auth_failures += 1
            self.close(1008, str(exc) or "authentication failed")  # PROTOCOL.md: bad token
            return
        except TryAgainLater as exc:
            self.close(1013, str(exc) or "try again later")
            return
        except Exception:
            log.exception("conn %s: authentication failed with an error", self.id)
            self.close(1011, "internal error")
            return
        if self._state != _AUTH:
            self._unwelcomed()
            return  # closed while authenticating (hello timeout, client gone)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        limits = server.limits
        if limits is not None:
            if not limits.connect_principal(welcome.role, welcome.id):
                # kefu.web.ratelimit: 4029, "back off", not 1008 (the token is good).
                self.close(CLOSE_RATE_LIMITED, f"too many connections for this {welcome.role}")
                self._unwelcomed()
                return
            self._principal_counted = True
            if welcome.role == "visitor":
                self._visitor_bucket = limits.connection_visitor_bucket(
                    welcome.id, server._loop.time()
                )
        welcome.ping_interval_ms = round(server.config.ping_interval_s * 1000)
        welcome.max_msg_bytes = server.config.max_msg_bytes
        self.role = welcome.role
        self.principal = welcome.id
        self._state = _OPEN
        self.send(welcome)
        try:
            await server.handler.on_ready(self, hello)
        except Exception:
            log.exception("conn %s: handler failed after the welcome", self.id)

    def _unwelcomed(self) -> None:
        """``authenticate`` answered but the connection is not welcomed after all: the
        handler's optional ``on_unwelcomed`` drops what it kept for it."""
        hook = getattr(self._server.handler, "on_unwelcomed", None)
        if hook is not None:
            try:
                hook(self)
            except Exception:
                log.exception("conn %s: handler failed on an unwelcomed connection", self.id)

    # -----------------------------------------------------------------------------------------
    # Timers

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self._state < _OPEN:
            self._server.hello_timeouts += 1
            self.close(1008, "no valid hello in time")  # PROTOCOL.md: within 10 s

    def _send_ping(self) -> None:
        server = self._server
        self._ping_timer = server._loop.call_later(server.config.ping_interval_s, self._send_ping)
        if self._heard:
            self._heard = False
            return  # the client spoke this interval: it is there
        if self._pong_timer is not None or self._transport is None:
            return  # still waiting for the previous pong
        self._transport.send_ping()
        self._pong_timer = server._loop.call_later(server.config.pong_timeout_s, self._pong_missed)

    def _pong_missed(self) -> None:
        self._pong_timer = None
        self._server.pong_timeouts += 1
        self._fail(1011, "pong timeout")
        self._abort()  # the peer is presumed gone: do not wait for it to read the close


class WsServer:
    """The WebSocket listener of one node: ``await start()``, ``await stop()``.

    ``allowed_origins`` is the config's top-level ``allowed_origins`` (empty: every origin).
    Counters are attributes; :meth:`stats` returns them as one dict for the metrics.
    """

    def __init__(
        self,
        config: WsConfig,
        handler: FrameHandler,
        *,
        ssl: ssl_module.SSLContext | None = None,
        allowed_origins: Iterable[str] = (),
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        limits: Limits | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self._nowait: Callable[[Connection, Send], bool] | None = getattr(
            handler, "on_send_nowait", None
        )
        #: Per-address and per-visitor buckets and the connection caps (None: only ws.rate).
        self.limits = limits
        self.close_timeout_s = close_timeout_s
        self._ssl = ssl
        self._origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)
        self._path = config.path.encode()
        self._echo_path = None if config.echo_path is None else config.echo_path.encode()
        self._decoders = {False: FrameDecoder(msgpack=False), True: FrameDecoder(msgpack=True)}
        self._conns: dict[int, Connection] = {}
        self._next_id = 0
        self._busy_poll_s = config.busy_poll_us / 1e6  # module doc, "Busy polling"
        self._busy_until = 0.0
        self._busy_polling = False
        self.busy_polls = 0
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False
        self._all_closed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.capacity = 0
        # Counters
        self.connections_total = 0
        self.refused: dict[str, int] = {"path": 0, "origin": 0, "capacity": 0}
        #: Frames read by their class (``Connection._on_message``); :attr:`frames_in` names them.
        #: Bounded by the protocol's frame classes.
        self.frames_in_by_class: dict[type, int] = {}
        self.frames_out: dict[str, int] = {}
        # The connections with frames collected this loop turn (module doc, "Write
        # coalescing"): at most one entry per connection and turn, so bounded by the
        # connections.
        self._flusher = outbox.Flusher(self._schedule_flush, self.frames_out)
        self.errors: dict[str, int] = {}
        self.closes_sent: dict[int, int] = {}
        self.slow_consumer_closes = 0
        self.rate_limit_closes = 0
        self.hello_timeouts = 0
        self.pong_timeouts = 0
        self.auth_failures = 0

    # -----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``port: 0``)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        sockets = self._server.sockets  # type: ignore[attr-defined]
        return int(sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _schedule_flush(self) -> None:
        """A connection started a batch this turn: write the batches at the end of the turn."""
        self._loop.call_soon(self.flush_writes)

    @property
    def batches_written(self) -> int:
        """Writes of collected frames (one per connection and turn with frames)."""
        return int(self._flusher.batches_written)

    @property
    def batched_frames(self) -> int:
        """Frames those writes carried."""
        return int(self._flusher.batched_frames)

    def flush_writes(self) -> None:
        """Write every connection's waiting frames now (one write each), rather than at the
        end of the turn; the end of the turn then writes only what comes after. The node
        calls it when a group commit's answers have all been sent (module doc, "Write
        coalescing")."""
        self._flusher.flush()
        if self._busy_poll_s:
            self._busy_until = time.monotonic() + self._busy_poll_s
            if not self._busy_polling:
                self._busy_polling = True
                self._loop.call_soon(self._busy_poll)

    def _busy_poll(self) -> None:
        """One turn of busy polling (module doc): back in the ready queue until the window
        after the last write has passed, or the server stops."""
        if self._stopping or time.monotonic() >= self._busy_until:
            self._busy_polling = False
            return
        self.busy_polls += 1
        self._loop.call_soon(self._busy_poll)

    @property
    def frames_in(self) -> dict[str, int]:
        """Frames read by their ``type``."""
        return {_tag(cls): n for cls, n in self.frames_in_by_class.items()}

    def stats(self) -> dict[str, Any]:
        return {
            "connections_open": len(self._conns),
            "connections_total": self.connections_total,
            "capacity": self.capacity,
            "refused": dict(self.refused),
            "frames_in": self.frames_in,
            "frames_out": dict(self.frames_out),
            "errors": dict(self.errors),
            "closes_sent": dict(self.closes_sent),
            "slow_consumer_closes": self.slow_consumer_closes,
            "write_batches": self.batches_written,
            "write_batched_frames": self.batched_frames,
            "busy_polls": self.busy_polls,
            "rate_limit_closes": self.rate_limit_closes,
            "hello_timeouts": self.hello_timeouts,
            "pong_timeouts": self.pong_timeouts,
            "auth_failures": self.auth_failures,
        }

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        limit = raise_nofile_limit()
        self.capacity = max(limit - FD_RESERVE, 0)
        config = self.config
        self._server = await ws_create_server(
            self._accept,
            config.host,
            config.port,
            ssl=self._ssl,
            max_frame_size=config.max_msg_bytes,
            enable_auto_ping=False,
            enable_auto_pong=False,
            # A TCP connection that never sends its upgrade request is closed (module doc).
            websocket_handshake_timeout=min(HANDSHAKE_TIMEOUT_S, config.hello_timeout_s),
            logger_name=_PicowsLog(logging.getLogger("kefu.ws.transport"), {}),
            backlog=1024,
            # The first read buffer of each connection; picows grows it for larger frames.
            # Measured here (3,000 visitor connections after hello): 29.9 KiB of server RSS
            # per connection with picows's 16 KiB default, 15.9 KiB with 2 KiB; chat frames
            # are a few hundred bytes.
            read_buffer_init_size=config.read_buffer_bytes,
        )
        log.info(
            "WebSocket on %s:%d%s; open files limit %d: room for about %d connections "
            "(max_connections %d)",
            config.host,
            self.port,
            config.path,
            limit,
            self.capacity,
            config.max_connections,
        )
        if config.echo_path is not None:
            log.warning(
                "echo mode on %s (ws.echo_path): a conformance-test aid, not for production",
                config.echo_path,
            )
        if config.max_connections > self.capacity:
            log.warning(
                "max_connections (%d) is above what the open files limit allows (%d)",
                config.max_connections,
                self.capacity,
            )

    async def stop(self, timeout: float = 5.0) -> None:
        """Stops accepting, closes every connection with 1001, waits at most ``timeout``."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        self._server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self._conns.values()):
            conn.close(1001, "going away")
        if self._conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)
        for conn in list(self._conns.values()):
            conn._abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        log.info("WebSocket server stopped (%d connections served)", self.connections_total)

    # -----------------------------------------------------------------------------------------

    def _accept(
        self, request: WSUpgradeRequest
    ) -> WSListener | WSUpgradeResponseWithListener | None:
        path = request.path.split(b"?", 1)[0]
        echo = path == self._echo_path
        if path != self._path and not echo:
            self.refused["path"] += 1
            return None  # picows answers 404
        origin = request.headers.get("Origin")
        if origin is not None and self._origins and origin.lower().rstrip("/") not in self._origins:
            # PROTOCOL.md: an Origin not in allowed_origins is 403 at the upgrade.
            self.refused["origin"] += 1
            return _refusal(HTTPStatus.FORBIDDEN, b"origin not allowed")
        if self._stopping or len(self._conns) >= self.config.max_connections:
            self.refused["capacity"] += 1
            return _refusal(HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections", retry=True)
        offered = {
            p.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for p in value.split(",")
        }
        msgpack = SUBPROTOCOL_MSGPACK in offered and not echo
        self._next_id += 1
        conn = Connection(self, self._next_id, msgpack, echo=echo)
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded is not None and self.limits is not None:
            conn._forwarded_for = forwarded[:4096]
        if not msgpack:
            return conn
        response = WSUpgradeResponse.create_101_response(
            extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL_MSGPACK}
        )
        return WSUpgradeResponseWithListener(response, conn)

    def _register(self, conn: Connection) -> None:
        self._conns[conn.id] = conn
        self.connections_total += 1
        if self._stopping:
            conn.close(1001, "going away")

    def _unregister(self, conn: Connection, transport: WSTransport) -> None:
        self._conns.pop(conn.id, None)
        handshake = transport.close_handshake
        if handshake is not None and handshake.sent is not None:
            code = int(handshake.sent.code.value)
            self.closes_sent[code] = self.closes_sent.get(code, 0) + 1
        if not self._conns and self._all_closed is not None:
            self._all_closed.set()

    def _notify_closed(self, conn: Connection) -> None:
        try:
            self.handler.on_close(conn)
        except Exception:
            log.exception("conn %s: handler failed on close", conn.id)


def _refusal(
    status: HTTPStatus, body: bytes, *, retry: bool = False
) -> WSUpgradeResponseWithListener:
    headers = {"Retry-After": "5"} if retry else None
    response = WSUpgradeResponse.create_error_response(status, body, extra_headers=headers)
    return WSUpgradeResponseWithListener(response, None)


def raise_nofile_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force.

    Each connection holds one file descriptor, and the usual soft limit (1024) would cap the
    node far below ``max_connections``. An unlimited hard limit is capped at 2**20 (Linux
    refuses a soft limit above ``fs.nr_open``, 2**20 by default).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
