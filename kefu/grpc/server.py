"""The gRPC front of one node (``kefu.v1.Chat``), on ``grpc.aio`` in the node's event loop.

Every call reads its request and metadata, runs the checks the REST front runs (the shared
functions of :mod:`kefu.web.http`: :func:`~kefu.web.http.bearer_token`,
:func:`~kefu.web.http.charge_send`, :func:`~kefu.web.http.send_checked`,
:func:`~kefu.web.http.read_history`, ...) and the same :class:`~kefu.node.Node` method, and
writes the answer: no chat logic lives here. Request fields go through the REST bodies'
decoders (:func:`~kefu.protocol.decode_body`), so a value is refused by the same limits with
the same message.

Credentials and limits
----------------------
Metadata ``authorization: Bearer <token>``, as the REST header: a visitor token acts on its
own session, the API key on any session as that session's visitor; ``History`` also takes the
admin token and agents' tokens, as ``GET /v1/chat/{id}/messages`` does. The rate limits are
REST's: ``Create`` is charged to the client address (not with the API key), ``Send`` to the
address and the visitor. The client address is the TCP peer, or with a trusted proxy in front
the ``x-forwarded-for`` metadata (:mod:`kefu.web.ratelimit`, "Addresses"). A request larger
than ``http.max_body_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED).

Errors
------
A refusal is a gRPC status (:data:`STATUS_OF_CODE`; a code not in the table is a server bug:
INTERNAL ``internal error``, logged) with the human message of REST, and trailing metadata
``kefu-error-code`` (PROTOCOL.md's code). RESOURCE_EXHAUSTED and UNAVAILABLE also carry
``retry-after-ms``: for a rate limit the time until its bucket lets a call through, else
REST's ``Retry-After`` (a second). (``google.rpc.RetryInfo`` in ``grpc-status-details-bin``
would need googleapis-common-protos, which kefu does not depend on.)

Subscribe
---------
A subscriber is, to the node, one more connection of the conversation's visitor
(:class:`Subscriber`, duck-typed like :class:`kefu.web.ws.Connection`): it is registered with
:meth:`Node.on_ready` after a ``hello`` made of its token and resume point, so the replay and
the registration happen in one step exactly as for a WebSocket (PROTOCOL.md, "resume"), and it
is unregistered with :meth:`Node.on_close` however the stream ends: the client cancels or goes
away, the conversation closes, the server stops. It counts under
``limits.ws_connections_per_visitor`` like a WebSocket of that visitor (past it:
RESOURCE_EXHAUSTED). Frames of the visitor's other conversations are not forwarded.

Bounds
------
==================  ====================================  ====================================
what                limit                                 when full
==================  ====================================  ====================================
open subscribers    ``grpc.max_subscribers``              RESOURCE_EXHAUSTED ``busy``
a subscriber's      ``ws.outbound_limit_bytes`` of        the stream ends RESOURCE_EXHAUSTED
unsent events       encoded frames (the WebSocket's)      ``slow_consumer`` (the WS's 4008)
request size        ``http.max_body_bytes``               RESOURCE_EXHAUSTED (by gRPC)
==================  ====================================  ====================================

Not bounded here: the calls in flight, as for REST (each awaits only the node, whose writes
are bounded by the store's queue: a full queue is RESOURCE_EXHAUSTED ``busy`` at once).

TLS
---
With ``tls.cert``/``tls.key`` the port speaks TLS with the same files, 1.3 only, as the HTTP
and WebSocket ports (PROTOCOL.md). grpcio cannot yet be told a minimum version for a server
(grpc/grpc#37305), so a client that offers 1.2 at most completes its handshake, but every call
of such a connection is refused: FAILED_PRECONDITION ``tls_too_old``, before anything else
is looked at (the version is the connection's ``ssl_tls_version`` auth property).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast
from urllib.parse import unquote

import grpc  # type: ignore[import-untyped]
import msgspec

from kefu.config import Config
from kefu.errors import KefuError
from kefu.grpc.v1 import kefu_pb2 as pb
from kefu.grpc.v1 import kefu_pb2_grpc as pb_grpc
from kefu.hub import frame_tag
from kefu.node import Node
from kefu.protocol import (
    DEFAULT_SYNC_LIMIT,
    MAX_SEQ,
    MAX_SYNC_LIMIT,
    CloseRequest,
    CreateChatRequest,
    Hello,
    Msg,
    ProtocolError,
    Resumed,
    ResumePoint,
    SendRequest,
    decode_body,
    encode_json,
    is_conv_id,
)
from kefu.web.http import (
    RETRY_AFTER_S,
    SHUTDOWN_TIMEOUT_S,
    bearer_token,
    charge_create,
    charge_send,
    read_history,
    send_checked,
    session_caller,
)
from kefu.web.ratelimit import RateLimited
from kefu.web.ws import (
    CLOSE_RATE_LIMITED,
    CLOSE_SLOW_CONSUMER,
    AuthError,
    Connection,
    TryAgainLater,
)

__all__ = ["STATUS_OF_CODE", "GrpcServer", "Subscriber", "status_of"]

log = logging.getLogger("kefu.grpc")

_S = grpc.StatusCode

#: PROTOCOL.md error code -> gRPC status; a code not here is INTERNAL.
STATUS_OF_CODE: Final[dict[str, Any]] = {
    "bad_request": _S.INVALID_ARGUMENT,
    "invalid": _S.INVALID_ARGUMENT,
    "unknown_group": _S.INVALID_ARGUMENT,
    "payload_too_large": _S.INVALID_ARGUMENT,
    "invalid_kb": _S.INVALID_ARGUMENT,
    "unauthorized": _S.UNAUTHENTICATED,
    "forbidden": _S.PERMISSION_DENIED,
    "not_found": _S.NOT_FOUND,
    "unknown_agent": _S.NOT_FOUND,
    "conflict": _S.FAILED_PRECONDITION,
    "conversation_closed": _S.FAILED_PRECONDITION,
    "invalid_state": _S.FAILED_PRECONDITION,
    "agent_unavailable": _S.FAILED_PRECONDITION,
    "not_queued": _S.FAILED_PRECONDITION,
    "not_assigned": _S.FAILED_PRECONDITION,
    "unsupported": _S.UNIMPLEMENTED,
    "rate_limited": _S.RESOURCE_EXHAUSTED,
    "busy": _S.RESOURCE_EXHAUSTED,
    "queue_full": _S.RESOURCE_EXHAUSTED,
    "too_many_conversations": _S.RESOURCE_EXHAUSTED,
    "slow_consumer": _S.RESOURCE_EXHAUSTED,
    "tls_too_old": _S.FAILED_PRECONDITION,
    "unavailable": _S.UNAVAILABLE,
    "cluster_unavailable": _S.UNAVAILABLE,
}

#: Trailing metadata keys of a refusal (module doc, "Errors").
ERROR_CODE_KEY: Final = "kefu-error-code"
RETRY_AFTER_KEY: Final = "retry-after-ms"

#: A stream's end, by the WebSocket close code the node (or this module) closed it with.
_CODE_OF_CLOSE: Final[dict[int, str]] = {
    CLOSE_SLOW_CONSUMER: "slow_consumer",
    CLOSE_RATE_LIMITED: "rate_limited",
    1008: "unauthorized",
}

#: The auth-context property of a TLS connection that names its version, and the one served.
TLS_VERSION_PROPERTY: Final = "ssl_tls_version"
TLS_1_3: Final = b"TLSv1.3"

#: ``stop()`` waits this long for the calls in flight (REST's SHUTDOWN_TIMEOUT_S).
STOP_GRACE_S: Final = SHUTDOWN_TIMEOUT_S
#: Subscribers' connection ids, apart from the WebSocket's (which count up from 1).
_SUBSCRIBER_IDS: Final = itertools.count(1 << 48)

_MSG_DECODE: Final = msgspec.json.Decoder(Msg).decode
_RESUMED_DECODE: Final = msgspec.json.Decoder(Resumed).decode


class _Head(msgspec.Struct):
    """The one field of any frame that says which conversation it is about."""

    conv: str | None = None


_HEAD_DECODE: Final = msgspec.json.Decoder(_Head).decode

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_of(code: str) -> Any:
    """The gRPC status of an error ``code`` (INTERNAL for a code the table does not know)."""
    return STATUS_OF_CODE.get(code, _S.INTERNAL)


def _retry_after_ms(exc: KefuError) -> int:
    seconds = exc.retry_after if isinstance(exc, RateLimited) else int(RETRY_AFTER_S)
    return seconds * 1000


async def _abort(context: Any, exc: KefuError) -> None:
    """End the call with ``exc``'s status, message and trailing metadata (module doc)."""
    status = status_of(exc.code)
    if status is _S.INTERNAL:
        log.error("error code %r has no gRPC status", exc.code, exc_info=exc)
        await context.abort(_S.INTERNAL, "internal error", ((ERROR_CODE_KEY, "internal"),))
    metadata: tuple[tuple[str, str], ...] = ((ERROR_CODE_KEY, exc.code),)
    if status in (_S.RESOURCE_EXHAUSTED, _S.UNAVAILABLE):
        metadata += ((RETRY_AFTER_KEY, str(_retry_after_ms(exc))),)
    await context.abort(status, str(exc), metadata)


def _refusals(method: F) -> F:
    """Every refusal of a call as its status (module doc, "Errors"); any other exception is
    INTERNAL ``internal error``, logged with its traceback (the client sees neither)."""

    @functools.wraps(method)
    async def call(self: ChatService, request: Any, context: Any) -> Any:
        try:
            if self.tls:
                _check_tls(context)
            return await method(self, request, context)
        except KefuError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("%s failed", method.__name__)
            await context.abort(_S.INTERNAL, "internal error", ((ERROR_CODE_KEY, "internal"),))
        return None

    return call  # type: ignore[return-value]


def _check_tls(context: Any) -> None:
    """Refuse a call that came over TLS older than 1.3 (module doc, "TLS")."""
    versions = context.auth_context().get(TLS_VERSION_PROPERTY) or (b"",)
    if versions[0] != TLS_1_3:
        raise _Refused(
            "tls_too_old", f"this port serves TLS 1.3 only, not {versions[0].decode() or '?'}"
        )


def _metadata(context: Any, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value if isinstance(value, str) else None
    return None


def _token(context: Any) -> str:
    return bearer_token(_metadata(context, "authorization") or "")


def _peer_ip(peer: str) -> str:
    """The address of a gRPC peer name (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, percent-encoded
    or not); empty for another kind (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = unquote(rest).rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _message(m: Msg) -> Any:
    """A ``msg`` frame as the proto's ``Message``."""
    sender = m.from_
    return pb.Message(
        conv=m.conv,
        seq=m.seq,
        epoch=m.epoch,
        id=m.id,
        client_msg_id=m.client_msg_id,
        sender=pb.Sender(role=sender.role, id=sender.id, name=sender.name),
        text=m.text,
        ts=m.ts,
        meta_json=b"" if m.meta is None else encode_json(m.meta),
    )


def _event(kind: str, data: bytes, conv: str) -> Any:
    """The ``Event`` of a frame the node sent the subscriber (JSON ``data`` of type ``kind``),
    or None for a frame about another conversation of the visitor."""
    if kind == "msg":
        m = _MSG_DECODE(data)
        return None if m.conv != conv else pb.Event(type=kind, msg=_message(m))
    if kind == "resumed":
        r = _RESUMED_DECODE(data)
        if r.conv != conv:
            return None
        resumed = pb.Resumed(
            conv=r.conv, recovered=r.recovered, from_seq=r.from_seq or 0, to_seq=r.to_seq or 0
        )
        return pb.Event(type=kind, resumed=resumed)
    head = _HEAD_DECODE(data)
    if head.conv is not None and head.conv != conv:
        return None
    return pb.Event(type=kind, frame_json=data)


class Subscriber:
    """One ``Subscribe`` stream, as the node sees a connection (module doc, "Subscribe").

    The node and the hub call :meth:`send`, :meth:`send_encoded` and :meth:`close`, as on a
    :class:`kefu.web.ws.Connection` with JSON frames; the stream takes what they queued with
    :meth:`take`. The queue holds at most ``limit_bytes`` of encoded frames: a frame past it
    ends the subscriber as a slow consumer and drops the queue.
    """

    msgpack: Final = False  # the hub encodes JSON for it

    __slots__ = (
        "_bytes",
        "_ended",
        "_limit",
        "_queue",
        "_wake",
        "close_code",
        "close_reason",
        "id",
        "principal",
        "received_ns",
        "remote",
        "role",
    )

    def __init__(self, limit_bytes: int, remote: str) -> None:
        self.id = next(_SUBSCRIBER_IDS)
        self.remote = remote
        self.role: str | None = None
        self.principal: str | None = None
        self.received_ns = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._limit = limit_bytes
        self._queue: deque[tuple[str, bytes]] = deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<Subscriber {self.id} {self.remote} principal={self.principal}>"

    @property
    def as_connection(self) -> Connection:
        """This subscriber where the node's methods take a WebSocket connection: it has the
        part of that interface they use (the class doc)."""
        return cast("Connection", self)

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def send(self, frame: Any) -> bool:
        if self.close_code is not None:
            return False
        return self.send_encoded(encode_json(frame), frame_tag(frame))

    def send_encoded(self, data: bytes, kind: str) -> bool:
        if self.close_code is not None:
            return False
        if self._bytes + len(data) > self._limit:
            log.info("subscriber %s: slow consumer, %d bytes queued", self.id, self._bytes)
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        self._queue.append((kind, data))
        self._bytes += len(data)
        self._wake.set()
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """End the stream after what is queued (or at once, dropping it, for a slow
        consumer); does nothing once closing."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if code == CLOSE_SLOW_CONSUMER:
            self._queue.clear()
            self._bytes = 0
        self._wake.set()
        self._ended.set_result(None)

    def frame_done(self) -> None:
        """Part of the connection interface; a subscriber sends no commands."""

    @property
    def ended(self) -> asyncio.Future[None]:
        """Done once :meth:`close` was called."""
        return self._ended

    async def take(self) -> list[tuple[str, bytes]]:
        """The frames queued so far (waiting for one); empty once closed and drained."""
        while not self._queue and self.close_code is None:
            self._wake.clear()
            await self._wake.wait()
        frames = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        return frames


class ChatService(pb_grpc.ChatServicer):
    """``kefu.v1.Chat`` over one node (module doc)."""

    def __init__(self, config: Config, node: Node, *, tls: bool = False) -> None:
        self.config = config
        self.node = node
        self.tls = tls  # refuse calls over TLS older than 1.3
        self.subscribers: set[Subscriber] = set()

    def _client_ip(self, context: Any) -> str:
        return self.node.limits.client_ip(
            _peer_ip(context.peer() or ""), _metadata(context, "x-forwarded-for")
        )

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    @_refusals
    async def Create(self, request: Any, context: Any) -> Any:
        node = self.node
        header = _metadata(context, "authorization")
        api_key = header is not None and node.is_api_key(bearer_token(header))
        charge_create(node, api_key, self._client_ip(context), self._now())
        fields: dict[str, object] = {}
        for name in ("user_id", "name", "user_hash"):
            if request.HasField(name):
                fields[name] = getattr(request, name)
        if request.metadata:
            fields["metadata"] = dict(request.metadata)
        req = decode_body(encode_json(fields), CreateChatRequest)
        node.check_identity(req.user_id, req.user_hash)
        session_id, visitor_id, token, status, created = await node.create_chat(
            user_id=req.user_id, name=req.name, metadata=req.metadata
        )
        return pb.CreateResponse(
            session_id=session_id,
            visitor_id=visitor_id,
            token=token,
            ws_url=node.public_config().ws_url,
            status=status,
            created=created,
        )

    @_refusals
    async def Send(self, request: Any, context: Any) -> Any:
        node = self.node
        token = _token(context)
        now = self._now()
        api_key = charge_send(node, token, self._client_ip(context), now)
        fields: dict[str, object] = {"session_id": request.session_id, "text": request.text}
        if request.HasField("client_msg_id"):
            fields["client_msg_id"] = request.client_msg_id
        req = decode_body(encode_json(fields), SendRequest)
        result = await send_checked(node, token, api_key, req, now)
        return pb.SendResponse(
            seq=result.seq,
            status=result.status,
            replies=[_message(m) for m in result.replies],
            ts=result.ts,
            dup=result.dup,
        )

    @_refusals
    async def Close(self, request: Any, context: Any) -> Any:
        token = _token(context)
        req = decode_body(encode_json({"session_id": request.session_id}), CloseRequest)
        visitor = session_caller(self.node, token, req.session_id)
        await self.node.close_chat(req.session_id, by="visitor", principal=visitor)
        return pb.CloseResponse(session_id=req.session_id, status="closed")

    @_refusals
    async def History(self, request: Any, context: Any) -> Any:
        token = _token(context)
        after = request.after if request.HasField("after") else 0
        limit = request.limit if request.HasField("limit") else DEFAULT_SYNC_LIMIT
        if after > MAX_SEQ:
            raise ProtocolError("invalid", f"`after` must be between 0 and {MAX_SEQ}")
        if not 1 <= limit <= MAX_SYNC_LIMIT:
            raise ProtocolError("invalid", f"`limit` must be between 1 and {MAX_SYNC_LIMIT}")
        page = await read_history(self.node, token, request.session_id, after, limit)
        return pb.HistoryResponse(
            messages=[_message(m) for m in page.messages], more=page.more, epoch=page.epoch
        )

    async def Subscribe(self, request: Any, context: Any) -> None:
        conn = Subscriber(self.config.ws.outbound_limit_bytes, context.peer() or "")
        try:
            await self._subscribe(request, context, conn)
        except KefuError as exc:
            await _abort(context, exc)
        except AuthError as exc:
            await _abort(context, _Refused("unauthorized", str(exc) or "bad token"))
        except TryAgainLater as exc:
            await _abort(context, _Refused("unavailable", str(exc) or "try again later"))
        except Exception:
            log.exception("Subscribe failed")
            await context.abort(_S.INTERNAL, "internal error", ((ERROR_CODE_KEY, "internal"),))

    async def _subscribe(self, request: Any, context: Any, conn: Subscriber) -> None:
        if self.tls:
            _check_tls(context)
        node = self.node
        token = _token(context)
        session_id = request.session_id
        if not is_conv_id(session_id):
            raise ProtocolError("invalid", "`session_id` is not a conversation id")
        resume = None
        if request.HasField("resume"):
            point = request.resume
            if point.epoch > MAX_SEQ or point.last_seq > MAX_SEQ:
                raise ProtocolError("invalid", f"`resume` values must be at most {MAX_SEQ}")
            resume = [ResumePoint(conv=session_id, epoch=point.epoch, last_seq=point.last_seq)]
        visitor = session_caller(node, token, session_id)
        if visitor is None:  # the API key, as the session's visitor
            state = node.conversation_state(session_id)
            found = node.visitor_of_session(session_id)
            if found is None:
                raise _Refused("not_found", "no such session")
            visitor = found
        else:
            # A visitor token: the welcome tells where its conversation stands (also when
            # another node of the cluster owns it).
            welcome = await node.authenticate(conn.as_connection, Hello(token=token))
            if not welcome.convs:
                raise _Refused("not_found", "no such session")
            state = welcome.convs[0]
        if len(self.subscribers) >= self.config.grpc.max_subscribers:
            raise _Refused("busy", "too many subscribers on this node")
        limits = node.limits
        if not limits.connect_principal("visitor", visitor):
            raise _Refused("rate_limited", "too many connections for this visitor")
        # Without a resume point the stream starts where ``subscribed`` says the conversation
        # stands: resuming from there replays what lands before the registration (writing
        # ``subscribed`` and, in a cluster, following the owner take a moment), and that
        # resume's own ``resumed`` is not passed on.
        quiet = resume is None
        if quiet:
            resume = [ResumePoint(conv=session_id, epoch=state.epoch, last_seq=state.top_seq)]
        conn.role, conn.principal = "visitor", visitor
        self.subscribers.add(conn)
        registered = False
        try:
            subscribed = pb.Subscribed(
                conv=state.conv, epoch=state.epoch, top_seq=state.top_seq, status=state.status
            )
            await context.write(pb.Event(type="subscribed", subscribed=subscribed))
            registered = True  # on_ready registers before its first await
            await node.on_ready(conn.as_connection, Hello(token=token, resume=resume))
            await self._forward(context, conn, session_id, quiet)
        finally:
            self.subscribers.discard(conn)
            if registered:
                node.on_close(conn.as_connection)
            limits.disconnect_principal("visitor", visitor)

    async def _forward(self, context: Any, conn: Subscriber, conv: str, quiet: bool) -> None:
        """The node's frames to the stream until the conversation's ``closed``, or until the
        subscriber is closed (slow consumer, server stop). ``quiet``: the first ``resumed`` is
        the stream's own (``_subscribe``), dropped when it recovered everything."""
        while True:
            frames = await conn.take()
            for kind, data in frames:
                event = _event(kind, data, conv)
                if event is None:
                    continue
                if quiet and kind == "resumed":
                    quiet = False
                    if event.resumed.recovered:
                        continue
                await _write(context, conn, event)
                if kind == "closed":
                    return
            if not frames and conn.close_code is not None:
                _end_of(conn)


def _end_of(conn: Subscriber) -> None:
    """Raise the refusal that ends a closed subscriber's stream."""
    code = _CODE_OF_CLOSE.get(cast(int, conn.close_code), "unavailable")
    raise _Refused(code, conn.close_reason or "the subscription ended")


async def _write(context: Any, conn: Subscriber, event: Any) -> None:
    """Write ``event``; a write still waiting for the client's flow control when the
    subscriber is closed (it stopped reading and became a slow consumer, or the server stops)
    is cancelled, and the stream ends at once with the close's refusal."""
    write = asyncio.ensure_future(context.write(event))
    if not write.done():
        await asyncio.wait((write, conn.ended), return_when=asyncio.FIRST_COMPLETED)
        if not write.done():
            write.cancel()
            _end_of(conn)
    write.result()


class _Refused(KefuError):
    """A refusal made by this module; each instance names its own code (the class default
    is only what a bare refusal would be)."""

    code = "bad_request"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class GrpcServer:
    """``kefu.v1.Chat`` of ``node`` on ``config.grpc`` (module doc). ``await start()``, then
    ``await stop()``."""

    def __init__(
        self, config: Config, node: Node, *, tls: tuple[bytes, bytes] | None = None
    ) -> None:
        """``tls``: the PEM certificate chain and private key, or None for plain TCP."""
        self.config = config
        self.node = node
        self.service = ChatService(config, node, tls=tls is not None)
        self._tls = tls
        self._server: Any = None
        self._port: int | None = None

    @property
    def host(self) -> str:
        return self.config.grpc.host or self.config.http.host

    @property
    def port(self) -> int:
        """The port the listener is bound to (the OS's pick when the config says 0)."""
        if self._port is None:
            raise RuntimeError("gRPC server not started")
        return self._port

    async def start(self) -> None:
        """Listen; raises :class:`OSError` when the address cannot be bound."""
        limit = self.config.http.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),  # a port in use is an error, as for HTTP and WS
            ]
        )
        pb_grpc.add_ChatServicer_to_server(self.service, server)  # type: ignore[no-untyped-call]
        host = self.host
        address = (
            f"[{host}]:{self.config.grpc.port}"
            if ":" in host
            else f"{host}:{self.config.grpc.port}"
        )
        try:
            if self._tls is None:
                port = server.add_insecure_port(address)
            else:
                cert, key = self._tls
                port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        except RuntimeError as exc:  # grpc says "Failed to bind to address ..."
            await server.stop(None)
            raise OSError(f"cannot bind {address}: {exc}") from None
        await server.start()
        self._server = server
        self._port = port

    async def stop(self) -> None:
        """End every subscription (UNAVAILABLE, the WebSocket's 1001), then let the calls in
        flight finish within :data:`STOP_GRACE_S`; later ones are cancelled."""
        server, self._server = self._server, None
        if server is None:
            return
        for conn in list(self.service.subscribers):
            conn.close(1001, "server stopping")
        with contextlib.suppress(asyncio.CancelledError):
            await server.stop(STOP_GRACE_S)
