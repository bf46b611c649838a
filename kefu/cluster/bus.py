"""Node-to-node calls and events over Redis Pub/Sub.

Each node listens on one channel, ``{prefix}n:{node_id}``. What goes over it is a MessagePack
:class:`Envelope`: a **request** (``kind``, a body, a request id) answered by a **reply** on the
caller's channel, or an **event** that expects no answer.

Everything a node publishes goes through one queue and one writer (a pipeline at a time on one
connection), so what node A sends to node B arrives in the order A sent it: a reply after the
events queued before it, events in the order of the frames they carry. The envelopes of one
pipeline that go to the same node travel as one **bundle** (an envelope whose body is theirs,
in order, up to :data:`BUNDLE_BYTES`): one ``PUBLISH``, one Pub/Sub message to read and one
decode instead of one each, which is most of what a message crossing nodes costs under load.

Pub/Sub delivers at most once: a request or its reply may be lost (the receiving node is
restarting, Redis restarted, the subscriber's connection was cut). The caller then gets
:class:`~kefu.cluster.link.ClusterUnavailable` after ``timeout_s`` and never a wrong answer, so
every request the node makes is one whose retry is harmless: a send carries its
``client_msg_id`` (the owner answers a retry with the first seq, ``dup: true``), a watch or a
history read is idempotent. Events are a fast path whose loss the receiver repairs
(``kefu.cluster`` package doc).

Bounds
------
==========================  =====================  ========================================
what                        limit                  when full
==========================  =====================  ========================================
requests awaiting a reply   ``max_pending``        ``request`` raises ClusterUnavailable
requests being handled      ``max_handling``       the request is answered ``busy`` at once
envelopes to publish        ``max_outbound``       ``emit``/``request`` raise
                                                   ClusterUnavailable (counted)
one envelope                ``MAX_ENVELOPE_BYTES`` ``request``/``tell`` raise ValueError; a
                                                   bigger one received is dropped (counted)
==========================  =====================  ========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import msgspec

from kefu.cluster.link import ClusterUnavailable, Link
from kefu.errors import KefuError

__all__ = ["MAX_ENVELOPE_BYTES", "Bus", "Envelope", "RemoteError"]

log = logging.getLogger(__name__)

MAX_ENVELOPE_BYTES: Final = 1 << 20
#: Pause between two attempts to subscribe again.
RESUBSCRIBE_S: Final = 0.1
#: Envelopes published in one pipeline.
WRITE_BATCH: Final = 256
#: A bundle's envelopes, in bytes at most (a single bigger envelope travels alone).
BUNDLE_BYTES: Final = 256 * 1024
REQUEST: Final = 0
REPLY: Final = 1
EVENT: Final = 2
BUNDLE: Final = 3

Handler = Callable[[str, Any], Awaitable[Any]]
EventHandler = Callable[[str, Any], None]


_Out = tuple[str, bytes, "asyncio.Future[int] | None"]
#: One Pub/Sub message to publish: channel, data, the futures it settles.
_Message = tuple[str, bytes, "list[asyncio.Future[int]]"]


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One message between nodes: ``t`` REQUEST/REPLY/EVENT, ``k`` the kind, ``i`` the request
    id (0 for events), ``f`` the sender's node id, ``b`` the body, ``e`` an error reply's
    ``(code, message)``."""

    t: int
    k: str
    i: int
    f: str
    b: Any = None
    e: tuple[str, str] | None = None


class RemoteError(KefuError):
    """The other node refused the request: its error code and message, as it gave them
    (the instance's ``code``; the class's is a placeholder)."""

    code = "remote_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(Envelope).decode
#: How an encoded bundle starts: an array of six or fewer (0x9N), then BUNDLE (a fixint).
_BUNDLE_HEAD: Final = bytes(_ENCODE(Envelope(BUNDLE, "", 0, "")))[:2]


class Bus:
    """Requests, replies and events between the nodes of one cluster (module doc).

    Counters: ``requests_total``, ``replies_total``, ``timeouts_total``, ``events_in``,
    ``events_out``, ``dropped_total`` (undecodable or oversized), ``busy_total``.
    """

    def __init__(
        self,
        link: Link,
        *,
        timeout_s: float = 2.0,
        max_pending: int = 10_000,
        max_handling: int = 10_000,
        max_outbound: int = 100_000,
    ) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_handling = max_handling
        self._handlers: dict[str, Handler] = {}
        self._events: dict[str, EventHandler] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._on_reply: dict[int, Callable[[Any], None]] = {}
        self._ids = itertools.count(1)
        self._handling = 0
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests_total = 0
        self.replies_total = 0
        self.timeouts_total = 0
        self.events_in = 0
        self.events_out = 0
        self.dropped_total = 0
        self.busy_total = 0
        self.subscribed = asyncio.Event()
        self.max_outbound = max_outbound
        self._closing = False
        #: Called when the listener subscribed again after a cut (see ``_listen``).
        self.on_resubscribed: Callable[[], None] | None = None
        self.resubscribed_total = 0
        self._outbound: deque[_Out] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.outbound_full_total = 0
        self.lost_total = 0
        self.published_total = 0  # Pub/Sub messages (a bundle is one)
        self.bundled_total = 0  # envelopes that travelled in a bundle

    def channel(self, node: str) -> str:
        return self.link.key("n", node)

    def on_request(self, kind: str, handler: Handler) -> None:
        """``await handler(from_node, body)`` answers requests of ``kind``: its return value
        is the reply's body, a KefuError it raises the reply's error."""
        self._handlers[kind] = handler

    def on_event(self, kind: str, handler: EventHandler) -> None:
        """``handler(from_node, body)`` takes events of ``kind`` (synchronous: in arrival
        order, nothing awaited between two events)."""
        self._events[kind] = handler

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._task = loop.create_task(self._listen())
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self.subscribed.wait()
        except TimeoutError:
            raise ClusterUnavailable("could not subscribe to the node's channel") from None

    async def stop(self) -> None:
        self._closing = True
        self._wake.set()
        tasks = {t for t in (self._task, self._writer) if t is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a cancellation swallowed inside the client library still ends the
            # loops at their next turn (``_closing``).
            await asyncio.wait(tasks, timeout=self.timeout_s + 1.0)
        self._task = self._writer = None
        for t in list(self._tasks):
            t.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ClusterUnavailable("the node is stopping"))
        self._pending.clear()
        while self._outbound:
            waiter = self._outbound.popleft()[2]
            if waiter is not None and not waiter.done():
                waiter.set_exception(ClusterUnavailable("the node is stopping"))

    # -- sending -------------------------------------------------------------------------------

    async def request(
        self, node: str, kind: str, body: Any, on_reply: Callable[[Any], None] | None = None
    ) -> Any:
        """Ask ``node``; the reply's body. Raises RemoteError with the other node's code, or
        ClusterUnavailable when Redis or the node does not answer within ``timeout_s``.

        ``on_reply(body)``, when given, runs as the reply is read, before the next envelope
        from any node is handled: what it does comes before the events sent after the reply.
        """
        if len(self._pending) >= self.max_pending:
            raise ClusterUnavailable(f"{self.max_pending} requests to other nodes are pending")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        data = _ENCODE(Envelope(REQUEST, kind, rid, self.link.node_id, body))
        if len(data) > MAX_ENVELOPE_BYTES:
            raise ValueError(f"a request of {len(data)} bytes is over {MAX_ENVELOPE_BYTES}")
        self._pending[rid] = fut
        if on_reply is not None:
            self._on_reply[rid] = on_reply
        try:
            self.requests_total += 1
            receivers = await self._post(node, data)
            if not receivers:
                raise ClusterUnavailable(f"node {node} is not listening")
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await fut
            except TimeoutError:
                self.timeouts_total += 1
                raise ClusterUnavailable(f"node {node} did not answer {kind}") from None
        finally:
            self._pending.pop(rid, None)
            self._on_reply.pop(rid, None)

    async def tell(self, node: str, kind: str, body: Any) -> bool:
        """Send an event and wait until Redis took it: True when a node was listening (not
        that it was handled)."""
        return bool(await self._post(node, self._event(kind, body)))

    def emit(self, node: str, kind: str, body: Any) -> None:
        """Send an event without waiting: in order after everything this node sent to
        ``node`` before. Raises ClusterUnavailable when the outbound queue is full."""
        self._post_nowait(node, self._event(kind, body), None)

    def _event(self, kind: str, body: Any) -> bytes:
        data = _ENCODE(Envelope(EVENT, kind, 0, self.link.node_id, body))
        if len(data) > MAX_ENVELOPE_BYTES:
            raise ValueError(f"an event of {len(data)} bytes is over {MAX_ENVELOPE_BYTES}")
        self.events_out += 1
        return data

    def _reply(self, to: str, env: Envelope) -> None:
        with contextlib.suppress(ClusterUnavailable):  # the caller times out and retries
            self._post_nowait(to, _ENCODE(env), None)
        self.replies_total += 1

    # -- the one writer: everything this node publishes, in order ------------------------------

    async def _post(self, node: str, data: bytes) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._post_nowait(node, data, fut)
        return await fut

    def _post_nowait(self, node: str, data: bytes, fut: asyncio.Future[int] | None) -> None:
        if len(self._outbound) >= self.max_outbound:
            self.outbound_full_total += 1
            raise ClusterUnavailable("the queue of envelopes to other nodes is full")
        self._outbound.append((self.channel(node), data, fut))
        self._wake.set()

    async def _write(self) -> None:
        """Publish the outbound queue in order, a pipeline at a time: one connection, so the
        envelopes this node sends to one node arrive in the order they were queued."""
        outbound = self._outbound
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while outbound:
                batch = [outbound.popleft() for _ in range(min(len(outbound), WRITE_BATCH))]
                messages = self._bundle(batch)

                async def publish(r: Any, messages: list[_Message] = messages) -> list[Any]:
                    pipe = r.pipeline(transaction=False)
                    for channel, data, _ in messages:
                        pipe.publish(channel, data)
                    return list(await pipe.execute())

                try:
                    results = await self.link.call(publish)
                except ClusterUnavailable as exc:
                    self.lost_total += len(batch)
                    for _, _, fut in batch:
                        if fut is not None and not fut.done():
                            fut.set_exception(exc)
                    continue
                self.published_total += len(messages)
                for (_, _, futures), receivers in zip(messages, results, strict=True):
                    for fut in futures:
                        if not fut.done():
                            fut.set_result(int(receivers))

    def _bundle(self, batch: list[_Out]) -> list[_Message]:
        """The Pub/Sub messages of ``batch``: per channel, its envelopes in order, several
        together as one bundle (module doc) as long as they fit in :data:`BUNDLE_BYTES`."""
        groups: dict[str, list[list[_Out]]] = {}
        size: dict[str, int] = {}  # bytes in each channel's last run
        for out in batch:
            runs = groups.setdefault(out[0], [[]])
            run = runs[-1]
            if run and size[out[0]] + len(out[1]) > BUNDLE_BYTES:
                run = []
                runs.append(run)
                size[out[0]] = 0
            run.append(out)
            size[out[0]] = size.get(out[0], 0) + len(out[1])
        messages: list[_Message] = []
        for channel, runs in groups.items():
            for run in runs:
                futures = [fut for _, _, fut in run if fut is not None]
                if len(run) == 1:
                    messages.append((channel, run[0][1], futures))
                    continue
                self.bundled_total += len(run)
                body = [data for _, data, _ in run]
                bundle = _ENCODE(Envelope(BUNDLE, "", 0, self.link.node_id, body))
                messages.append((channel, bundle, futures))
        return messages

    # -- receiving -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe, then read for as long as the node runs; subscribe again after a cut.

        The listener does not judge whether Redis is up (the heartbeat does: a stale
        connection after a Redis restart fails once here without Redis being down). When it
        was cut while the link stayed up, envelopes may have been lost meanwhile:
        ``on_resubscribed`` lets the node repair that."""
        errors: tuple[type[Exception], ...] = (ClusterUnavailable, *self.link._errors)
        channel = self.channel(self.link.node_id)
        cut = False
        while not self._closing:
            try:
                self._pubsub = self.link.redis.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(channel)
                self.subscribed.set()
                if cut:
                    cut = False
                    self.resubscribed_total += 1
                    if self.on_resubscribed is not None:
                        self.on_resubscribed()
                while not self._closing:
                    message = await self._pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._received(message["data"])
            except asyncio.CancelledError:
                await self._close_pubsub()
                raise
            except Exception as exc:
                if not isinstance(exc, errors):
                    log.exception("cluster bus: the listener failed; subscribing again")
                cut = True
                self.subscribed.clear()
                await self._close_pubsub()
                await asyncio.sleep(RESUBSCRIBE_S)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):  # already broken
                await pubsub.aclose()

    def _received(self, data: bytes) -> None:
        if len(data) > MAX_ENVELOPE_BYTES:
            self.dropped_total += 1
            return
        try:
            env = _DECODE(data)
        except msgspec.DecodeError:
            self.dropped_total += 1
            return
        if env.t == BUNDLE:
            # A bundle's envelopes, in order; a bundle inside one is not made: dropped.
            for data in env.b if isinstance(env.b, list) else ():
                if isinstance(data, bytes) and data[:2] != _BUNDLE_HEAD:
                    self._received(data)
                else:
                    self.dropped_total += 1
        elif env.t == REPLY:
            fut = self._pending.get(env.i)
            if fut is not None and not fut.done():
                if env.e is None:
                    callback = self._on_reply.pop(env.i, None)
                    if callback is not None:
                        try:
                            callback(env.b)
                        except Exception as exc:
                            log.exception("cluster bus: the reply to %s failed", env.k)
                            fut.set_exception(exc)
                            return
                    fut.set_result(env.b)
                else:
                    fut.set_exception(RemoteError(*env.e))
        elif env.t == EVENT:
            self.events_in += 1
            handler = self._events.get(env.k)
            if handler is None:
                self.dropped_total += 1
                return
            try:
                handler(env.f, env.b)
            except Exception:
                log.exception("cluster bus: event %s from %s failed", env.k, env.f)
        elif env.t == REQUEST:
            if self._handling >= self.max_handling:
                self.busy_total += 1
                self._reply(
                    env.f, Envelope(REPLY, env.k, env.i, self.link.node_id, None, ("busy", "busy"))
                )
                return
            self._handling += 1  # now, not in the task: the next envelope sees it
            self._spawn(self._handle(env))
        else:
            self.dropped_total += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, env: Envelope) -> None:
        try:
            handler = self._handlers.get(env.k)
            if handler is None:
                reply = Envelope(
                    REPLY, env.k, env.i, self.link.node_id, None, ("unsupported", env.k)
                )
            else:
                try:
                    body = await handler(env.f, env.b)
                    reply = Envelope(REPLY, env.k, env.i, self.link.node_id, body)
                except KefuError as exc:
                    reply = Envelope(
                        REPLY, env.k, env.i, self.link.node_id, None, (exc.code, str(exc))
                    )
                except Exception:
                    log.exception("cluster bus: request %s from %s failed", env.k, env.f)
                    reply = Envelope(
                        REPLY, env.k, env.i, self.link.node_id, None, ("internal", "internal")
                    )
        finally:
            self._handling -= 1
        self._reply(env.f, reply)

    def stats(self) -> dict[str, int]:
        return {
            "pending": len(self._pending),
            "handling": self._handling,
            "requests_total": self.requests_total,
            "replies_total": self.replies_total,
            "timeouts_total": self.timeouts_total,
            "events_in": self.events_in,
            "events_out": self.events_out,
            "dropped_total": self.dropped_total,
            "busy_total": self.busy_total,
            "outbound": len(self._outbound),
            "outbound_full_total": self.outbound_full_total,
            "lost_total": self.lost_total,
            "published_total": self.published_total,
            "bundled_total": self.bundled_total,
        }
