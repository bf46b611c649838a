"""The REST front of one node, on aiohttp: PROTOCOL.md's REST table, nothing more.

Every handler reads its input (path, query, ``Authorization``, JSON body), calls one public
method of :class:`~kefu.node.Node` and writes the answer. The chat logic lives in the node, so a
REST call and the WebSocket frame that does the same thing run the same code.

Errors
------
One middleware turns every refusal into ``{"error": {"code", "message"}}``
(:class:`~kefu.protocol.ErrorBody`), never a 200 with an error inside and never a stack trace:

- a :class:`~kefu.errors.KefuError` gets the status of its ``code`` from :data:`STATUS_OF_CODE`
  (a code not in the table is a server bug: 500 ``internal``, logged); 401 carries
  ``WWW-Authenticate: Bearer``, 429 and 503 ``Retry-After`` (:data:`RETRY_AFTER_S`, or for a
  rate limit the whole seconds until its bucket lets a call through);
- aiohttp's own refusals keep their status with a snake_case code: an unknown path is 404
  ``not_found``, a known path with another method 405 ``method_not_allowed`` (with ``Allow``),
  a body over :data:`MAX_BODY_BYTES` 413 ``payload_too_large``;
- any other exception is 500 ``internal`` with the message ``internal error``; the exception is
  logged with its traceback, the client sees neither.

Malformed HTTP (a broken request line, a header over ``max_field_size``) is answered by
aiohttp's protocol layer before any middleware runs, with its own plain-text 400: there is no
request yet to route. Every valid request fits its limits (:data:`MAX_REQUEST_LINE_BYTES`), and
the log has one INFO line for such a request, not aiohttp's ERROR with a traceback
(:class:`_ProtocolLog`).

Request bodies
--------------
A POST or PATCH body must be JSON: ``Content-Type: application/json``, with an optional
``charset`` parameter that must then be ``utf-8`` (RFC 8259: JSON exchanged between systems is
UTF-8). Anything else, an absent ``Content-Type`` included, is 415 ``unsupported_media_type``:
one rule with no guessing, and a form post from a foreign page (which cannot set that type
without a CORS preflight) never reaches a handler. The body is decoded with
:func:`~kefu.protocol.decode_body`: not JSON or not an object is 400 ``bad_request``, a field
missing, mistyped or out of its limits 400 ``invalid`` with the field named. An empty object is
a valid body for ``/v1/chat/create`` (every field is optional).

Authentication and authorisation
--------------------------------
``Authorization: Bearer <token>`` (scheme case-insensitive). No header, another scheme or an
empty token is 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``; a token that does not
grant the request is 403 ``forbidden``. For the chat operations the order is:
authentication, then the body, then authorisation against the session the body names (the
session of a visitor token is only known once the body is read). The admin token is checked
before the body is read.

- ``/v1/chat/create``, ``/v1/config``, ``/healthz``, ``/metrics``, ``/openapi.json``: public
  (``create`` applies the ``identity`` rules: a wrong ``user_hash`` is 401).
- ``send``, ``close``, ``messages``: the visitor token of that very session, or the API key
  (acting as the session's visitor).
- ``/v1/admin/...``: the admin token.
- ``/v1/agent/...`` and an agent reading ``messages``: the agent's own token or one of its
  session tokens (``kefu.node``, "Agent tokens"), except ``/v1/agent/login`` (the agent's own
  token only: a session cannot extend itself) and ``/v1/agent/logout`` (a session token only).
  ``login`` takes an optional body: none (or an empty one) is ``{}``.

A ``session_id`` in the path that is not a conversation id is 404 ``not_found`` (no such
session); in a body it is 400 ``invalid`` (the body's schema says what it must look like).

Rate limits
-----------
(:mod:`kefu.web.ratelimit`.) ``create`` is charged to the bucket of the client's address before
its body is read, unless the caller shows the API key (a back end creates chats for many users
from one address). ``send`` is charged to the address's bucket and, for a valid visitor
token, the visitor's, before the body is read; with the API key, to the bucket of the visitor
of the session the body names (not to the address's). Past a bucket: 429 ``rate_limited``
with ``Retry-After``, and nothing else happens.

Streaming
---------
``send`` with ``stream: true`` answers ``text/event-stream``: one ``msg`` event per reply (the
bot's answers, PROTOCOL.md), then one ``done`` event whose data is the
:class:`~kefu.protocol.SendResponse` JSON. With no reply (no bot) the stream is the ``done``
event alone. The message is stored before the stream starts, so a refusal is still an ordinary
JSON error with its status.

Bounds and timeouts
-------------------
=========================  =====================================  ===========================
what                       limit                                  beyond
=========================  =====================================  ===========================
request body               ``http.max_body_bytes`` (1 MiB; 16,000  413 ``payload_too_large``
                           characters of text are 64 KB at most)  (checked on Content-Length
                                                                  first, else while reading)
request line               :data:`MAX_REQUEST_LINE_BYTES`         400 from aiohttp
header                     aiohttp's 8190 bytes each, 128 headers 400 from aiohttp
idle keep-alive            :data:`KEEPALIVE_TIMEOUT_S`            connection closed
in-flight requests at      :data:`SHUTDOWN_TIMEOUT_S`, then       cancelled
stop                       :data:`CANCEL_TIMEOUT_S` to end
query parameters           ``after`` 0..2**63-1, ``limit``        400 ``invalid`` naming the
                           1..500 (default 50), once each         parameter
=========================  =====================================  ===========================

No handler timeout: a handler awaits only the node, whose writes are bounded by the store's
group-commit queue (a full queue is 503 ``busy`` at once, never a wait). Cancelling a handler
half-way would cancel the store's future under a write that still happens. For the same reason
a client that disconnects does not cancel its handler (aiohttp's ``handler_cancellation`` stays
off). No state is kept per request beyond the request itself; the server keeps one counter,
the requests in flight, for a graceful :meth:`HttpServer.stop`.

Not bounded here: the time a client takes to send its headers or body. aiohttp has no read
timeout for a request in progress (``KEEPALIVE_TIMEOUT_S`` covers the idle time between
requests); a deployment open to the Internet puts a reverse proxy with such timeouts in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl as ssl_module
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from kefu.config import Config
from kefu.errors import KefuError
from kefu.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kefu.node import Node, SendResult
from kefu.protocol import (
    DEFAULT_SYNC_LIMIT,
    MAX_SEQ,
    MAX_SYNC_LIMIT,
    AgentCreate,
    AgentLoginRequest,
    AgentTokenRequest,
    AgentUpdate,
    CloseRequest,
    CloseResponse,
    CreateChatRequest,
    CreateChatResponse,
    ErrorBody,
    ErrorDetail,
    HistoryResponse,
    SendRequest,
    SendResponse,
    decode_body,
    encode_json,
    is_conv_id,
)
from kefu.web.openapi import openapi_json
from kefu.web.pages import StaticFiles, add_pages
from kefu.web.ratelimit import Limits, RateLimited, TokenBucket, retry_after_s, take_all

__all__ = [
    "CANCEL_TIMEOUT_S",
    "JSON_CONTENT_TYPE",
    "KEEPALIVE_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "SHUTDOWN_TIMEOUT_S",
    "STATUS_OF_CODE",
    "HttpServer",
    "bearer_token",
    "charge",
    "charge_create",
    "charge_send",
    "read_history",
    "send_checked",
    "session_caller",
    "status_of",
]

log = logging.getLogger("kefu.http")

#: Largest request body. The biggest legal body (a ``send`` of 16,000 four-byte characters, or
#: an agent with 64 groups) is far below it.
MAX_BODY_BYTES: Final = 1 << 20  # the default of http.max_body_bytes
_MAX_BODY: Final = web.AppKey("max_body_bytes", int)
#: An idle keep-alive connection is closed after this long (aiohttp's default is an hour).
KEEPALIVE_TIMEOUT_S: Final = 15.0
#: Longest request line. The longest valid one is a knowledge-base search of 1,000 four-byte
#: characters, percent-encoded: 12,000 bytes of query, over aiohttp's default of 8,190.
MAX_REQUEST_LINE_BYTES: Final = 16 << 10
#: ``stop()`` waits this long for the requests in flight to finish ...
SHUTDOWN_TIMEOUT_S: Final = 5.0
#: ... then gives those still running this long to end once cancelled.
CANCEL_TIMEOUT_S: Final = 1.0

#: ``Retry-After`` of a 429 or 503 refusal: the store's queue drains within a group commit or
#: a few, so a second is long enough not to hammer it and short enough for a visitor waiting.
RETRY_AFTER_S: Final = "1"

JSON_CONTENT_TYPE: Final = "application/json"
EVENT_STREAM_CONTENT_TYPE: Final = "text/event-stream"

#: Error code -> HTTP status; a code not here is 500.
STATUS_OF_CODE: Final[dict[str, int]] = {
    "bad_request": 400,
    "invalid": 400,
    "unknown_group": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_agent": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "conversation_closed": 409,
    "invalid_state": 409,
    "agent_unavailable": 409,
    "not_queued": 409,
    "not_assigned": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_kb": 422,
    "rate_limited": 429,
    "unsupported": 501,
    "queue_full": 503,
    "busy": 503,
    "unavailable": 503,
    "too_many_conversations": 503,
    "cluster_unavailable": 503,
}

#: aiohttp's own refusals (raised by its router and body reader) -> error code.
MAX_KB_QUERY_CHARS: Final = 1_000  # GET /v1/admin/kb/search?q=
MAX_KB_HITS: Final = 50  # ...&k=

_CODE_OF_HTTP_STATUS: Final[dict[int, str]] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

_HTTP_MESSAGES: Final[dict[int, str]] = {
    404: "no such path",
    405: "method not allowed on this path",
    413: "request body is larger than http.max_body_bytes",
}

_DIGITS: Final = re.compile(r"[0-9]{1,19}")
_BEARER: Final = "bearer "


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's protocol-layer lines, with a client's malformed request at INFO.

    aiohttp logs every request it cannot parse (a NUL in a header, a broken request line) at
    ERROR with a traceback, then answers 400: a client fault that anyone on the Internet can
    repeat to fill the server's log. Such a line becomes one INFO line without the traceback;
    the server's own failures keep their level.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if (
            level >= logging.ERROR
            and isinstance(exc, HttpProcessingError)
            and 400 <= (exc.code or 500) < 500
        ):
            level = logging.INFO
            kwargs["exc_info"] = None
            msg = f"{msg}: {exc.code} {exc.message.splitlines()[0] if exc.message else ''}"
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def status_of(code: str) -> int:
    """The HTTP status of an error ``code`` (500 for a code the table does not know)."""
    return STATUS_OF_CODE.get(code, 500)


class _Refusal(KefuError):
    """A refusal made by this module (content type, size, query, credentials); each instance
    names its own code (the class default is only what a bare refusal would be)."""

    code = "bad_request"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = encode_json(ErrorBody(error=ErrorDetail(code=code, message=message)))
    return web.Response(status=status, body=body, content_type=JSON_CONTENT_TYPE, headers=headers)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode_json(body), content_type=JSON_CONTENT_TYPE)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as :class:`ErrorBody` with its status (module doc, "Errors")."""
    try:
        return await handler(request)
    except KefuError as exc:
        status = status_of(exc.code)
        if status == 500:
            log.exception(
                "%s %s: error code %r has no status", request.method, request.path, exc.code
            )
            return _error_response(500, "internal", "internal error")
        headers = None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif status in (429, 503):
            # A rate limit knows when its bucket refills (kefu.web.ratelimit); others guess.
            retry = exc.retry_after if isinstance(exc, RateLimited) else RETRY_AFTER_S
            headers = {"Retry-After": str(retry)}
        return _error_response(status, exc.code, str(exc), headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect or a success raised on purpose is not an error
        code = _CODE_OF_HTTP_STATUS.get(exc.status)
        if code is None:
            code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_") or "error"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        return _error_response(exc.status, code, message, headers)
    except ConnectionResetError:
        raise  # the client went away (e.g. during an event stream): nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error_response(500, "internal", "internal error")


# ---------------------------------------------------------------------------------------------
# Input


def _bearer(request: web.Request) -> str:
    """The bearer token of the request; 401 ``unauthorized`` when there is none."""
    return bearer_token(request.headers.get("Authorization", ""))


def _check_content_type(request: web.Request) -> None:
    """``application/json``, optionally with ``charset=utf-8`` (module doc, "Request bodies")."""
    header = request.headers.get("Content-Type")
    if header is None:
        raise _Refusal("unsupported_media_type", "Content-Type must be application/json")
    media, _, params = header.partition(";")
    if media.strip().lower() != JSON_CONTENT_TYPE:
        raise _Refusal("unsupported_media_type", "Content-Type must be application/json")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise _Refusal("unsupported_media_type", "JSON bodies must be UTF-8")


async def _read_body(request: web.Request) -> bytes:
    """The request body after the content-type and size checks."""
    _check_content_type(request)
    length = request.content_length
    limit = request.app[_MAX_BODY]
    if length is not None and length > limit:
        raise _Refusal("payload_too_large", f"request body is larger than {limit} bytes")
    return await request.read()  # client_max_size: HTTPRequestEntityTooLarge past the limit


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise _Refusal("invalid", f"query parameter `{name}` is given more than once")
    text = values[0]
    if _DIGITS.fullmatch(text) is None or not low <= int(text) <= high:
        raise _Refusal(
            "invalid", f"query parameter `{name}` must be an integer between {low} and {high}"
        )
    return int(text)


# ---------------------------------------------------------------------------------------------
# The checks of the chat operations, shared with the gRPC front (kefu.grpc): the one copy of
# "Authentication and authorisation" and "Rate limits" (module doc) for the request/answer
# fronts.


def bearer_token(header: str) -> str:
    """The token of an ``Authorization`` value ``Bearer <token>`` (scheme case-insensitive);
    401 ``unauthorized`` when there is none, another scheme or an empty token."""
    if header[: len(_BEARER)].lower() != _BEARER:
        raise _Refusal("unauthorized", "missing `Authorization: Bearer <token>`")
    token = header[len(_BEARER) :].strip()
    if not token:
        raise _Refusal("unauthorized", "empty bearer token")
    return token


def session_caller(node: Node, token: str, session_id: str) -> str | None:
    """The visitor id acting on ``session_id`` (None: the API key, acting as the session's
    visitor); 403 ``forbidden`` for any other token."""
    if node.is_api_key(token):
        return None
    found = node.visitor_of_token(token)
    if found is None or found[1] != session_id:
        raise _Refusal("forbidden", "this token may not act on this session")
    return found[0]


def charge(limits: Limits, now: float, *limited: tuple[str, TokenBucket | None]) -> None:
    """One token of each ``(limit name, bucket)``, or none and 429 ``rate_limited`` with
    ``Retry-After``; the first empty bucket's limit is counted as the refusing one."""
    wait = take_all([bucket for _, bucket in limited], now)
    if wait > 0.0:
        name = next(n for n, b in limited if b is not None and b.tokens < 1.0)
        limits.refused[name] += 1
        raise RateLimited(
            f"too many requests, retry in {retry_after_s(wait)} s", retry_after_s(wait)
        )


def charge_create(node: Node, api_key: bool, client_ip: str, now: float) -> None:
    """``create``'s limit, before its body is read: the address's bucket; a server-to-server
    caller (the API key) creates chats for many users from one address and is not limited."""
    if not api_key:
        limits = node.limits
        charge(limits, now, ("create_ip", limits.create_bucket(client_ip, now)))


def charge_send(node: Node, token: str, client_ip: str, now: float) -> bool:
    """``send``'s limits that come before its body is read: the address's bucket and the
    visitor's of a valid visitor token (none for the API key). True: ``token`` is the API
    key."""
    if node.is_api_key(token):
        return True
    limits = node.limits
    found = node.visitor_of_token(token)
    charge(
        limits,
        now,
        ("rest_ip", limits.ip_bucket(client_ip, now)),
        ("rest_visitor", None if found is None else limits.visitor_bucket(found[0], now)),
    )
    return False


async def send_checked(
    node: Node, token: str, api_key: bool, req: SendRequest, now: float
) -> SendResult:
    """``send`` once its body is read: authorisation against the session, the API key's
    charge to that session's visitor, then :meth:`Node.send_message`."""
    visitor = session_caller(node, token, req.session_id)
    if api_key:
        # The API key acts as the session's visitor: that visitor's bucket.
        of_session = node.visitor_of_session(req.session_id)
        if of_session is not None:
            limits = node.limits
            charge(limits, now, ("rest_visitor", limits.visitor_bucket(of_session, now)))
    return await node.send_message(
        req.session_id, req.text, req.client_msg_id, role="visitor", principal=visitor
    )


async def read_history(
    node: Node, token: str, session_id: str, after: int, limit: int
) -> HistoryResponse:
    """A page of ``session_id``'s history for ``token``: the administrator reads every
    conversation, an agent one it may see, a visitor its own session, the API key any (as the
    session's visitor). A ``session_id`` that is not a conversation id is 404 ``not_found``."""
    if node.is_admin(token):
        # The administrator may read every conversation (PROTOCOL.md's roles).
        if not is_conv_id(session_id):
            raise _Refusal("not_found", "no such session")
        return await node.history_anywhere(
            session_id, after, limit, role="admin", principal="admin"
        )
    agent = node.agent_of_token(token)
    if agent is not None:
        # An agent reads a conversation it may see (its own, closed ones included, or a
        # queued one): the workbench pages the history it was not sent with `assigned`.
        if not is_conv_id(session_id):
            raise _Refusal("not_found", "no such session")
        return await node.history_anywhere(session_id, after, limit, role="agent", principal=agent)
    visitor = session_caller(node, token, session_id)
    if not is_conv_id(session_id):  # only the API key gets here with such an id
        raise _Refusal("not_found", "no such session")
    return await node.history_anywhere(session_id, after, limit, role="visitor", principal=visitor)


class HttpServer:
    """The REST API of ``node`` on ``config.http`` (module doc). ``await start()``, then
    ``await stop()``."""

    def __init__(
        self, config: Config, node: Node, *, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        self.config = config
        self.node = node
        self._ssl = ssl
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._in_flight = 0
        self._stopping = False
        self._drained: asyncio.Event | None = None
        self.app = self._make_app()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running (from the headers to the end of the answer)."""
        return self._in_flight

    def _make_app(self) -> web.Application:
        @web.middleware
        async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            self._in_flight += 1
            try:
                response = await handler(request)
                if self._stopping:
                    response.force_close()  # no next request on this connection
                return response
            finally:
                self._in_flight -= 1
                if self._in_flight == 0 and self._drained is not None:
                    self._drained.set()

        limit = self.config.http.max_body_bytes
        app = web.Application(
            middlewares=[count_in_flight, error_middleware], client_max_size=limit
        )
        app[_MAX_BODY] = limit
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("POST", "/v1/chat/create", self.create_chat),
            ("POST", "/v1/chat/send", self.send),
            ("POST", "/v1/chat/close", self.close_chat),
            ("GET", "/v1/chat/{session_id}/messages", self.messages),
            ("GET", "/v1/config", self.public_config),
            ("GET", "/healthz", self.healthz),
            ("GET", "/metrics", self.metrics),
            ("GET", "/openapi.json", self.openapi),
            ("GET", "/v1/admin/agents", self.list_agents),
            ("POST", "/v1/admin/agents", self.create_agent),
            ("GET", "/v1/admin/agents/{agent_id}", self.get_agent),
            ("PATCH", "/v1/admin/agents/{agent_id}", self.update_agent),
            ("DELETE", "/v1/admin/agents/{agent_id}", self.delete_agent),
            ("POST", "/v1/admin/agents/{agent_id}/token", self.rotate_agent_token),
            ("POST", "/v1/admin/sessions/{session_id}/close", self.admin_close),
            ("GET", "/v1/admin/sessions/{session_id}/stats", self.session_stats),
            ("GET", "/v1/admin/kb/search", self.kb_search),
            ("POST", "/v1/admin/kb/reload", self.kb_reload),
            ("GET", "/v1/admin/stats", self.admin_stats),
            ("POST", "/v1/agent/login", self.agent_login),
            ("POST", "/v1/agent/logout", self.agent_logout),
            ("GET", "/v1/agent/me", self.agent_me),
            ("GET", "/v1/agent/conversations", self.agent_conversations),
            ("GET", "/v1/agent/sessions/{session_id}/stats", self.agent_session_stats),
        ]
        for method, path, handler in routes:
            # No implicit HEAD routes: the router holds exactly the documented operations.
            app.router.add_route(method, path, handler)
        # The pages of the web front (not REST operations: not in /openapi.json).
        add_pages(app, lambda: self.node.public_config().ws_url, StaticFiles())
        return app

    async def start(self) -> None:
        http = self.config.http
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=CANCEL_TIMEOUT_S,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            logger=_ProtocolLog(logging.getLogger("aiohttp.server"), {}),
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, http.host, http.port, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])

    @property
    def port(self) -> int:
        """The port the listener is bound to (the OS's pick when the config says 0)."""
        if self._port is None:
            raise RuntimeError("HTTP server not started")
        return self._port

    async def stop(self) -> None:
        """Stop accepting, let the requests in flight finish, then close every connection.

        The listener closes first. The requests in flight get :data:`SHUTDOWN_TIMEOUT_S` to
        finish while their connections still read, so a body still arriving is received
        (aiohttp's own shutdown stops reading at once, which would strand such a request);
        their answers carry ``Connection: close``. Then aiohttp closes the idle connections
        and cancels what is still running, waiting :data:`CANCEL_TIMEOUT_S` for it.
        """
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        for site in list(runner.sites):
            await site.stop()
        if self._in_flight:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), SHUTDOWN_TIMEOUT_S)
        await runner.cleanup()

    # -- authorisation ----------------------------------------------------------------------

    def _admin(self, request: web.Request) -> None:
        if not self.node.is_admin(_bearer(request)):
            raise _Refusal("forbidden", "this token is not the admin token")

    def _session_caller(self, token: str, session_id: str) -> str | None:
        return session_caller(self.node, token, session_id)

    # -- rate limits (kefu.web.ratelimit) --------------------------------------------------

    def _client_ip(self, request: web.Request) -> str:
        forwarded = request.headers.get("X-Forwarded-For")
        return self.node.limits.client_ip(request.remote or "", forwarded)

    def _is_api_key_call(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header[: len(_BEARER)].lower() != _BEARER:
            return False
        return self.node.is_api_key(header[len(_BEARER) :].strip())

    # -- chat -------------------------------------------------------------------------------

    async def create_chat(self, request: web.Request) -> web.Response:
        # Limited per address before anything is read (charge_create).
        now = asyncio.get_running_loop().time()
        charge_create(self.node, self._is_api_key_call(request), self._client_ip(request), now)
        req = decode_body(await _read_body(request), CreateChatRequest)
        node = self.node
        node.check_identity(req.user_id, req.user_hash)
        session_id, visitor_id, token, status, created = await node.create_chat(
            user_id=req.user_id, name=req.name, metadata=req.metadata
        )
        body = CreateChatResponse(
            session_id=session_id,
            visitor_id=visitor_id,
            token=token,
            ws_url=node.public_config().ws_url,
            status=status,
        )
        return _json(body, 201 if created else 200)

    async def send(self, request: web.Request) -> web.StreamResponse:
        token = _bearer(request)
        node = self.node
        now = asyncio.get_running_loop().time()
        # The address, and the visitor of a valid token, before the body is read.
        api_key = charge_send(node, token, self._client_ip(request), now)
        req = decode_body(await _read_body(request), SendRequest)
        result = await send_checked(node, token, api_key, req, now)
        answer = SendResponse(seq=result.seq, status=result.status, replies=result.replies)
        if not req.stream:
            return _json(answer)
        stream = web.StreamResponse(
            headers={"Content-Type": EVENT_STREAM_CONTENT_TYPE, "Cache-Control": "no-store"}
        )
        await stream.prepare(request)
        for reply in result.replies:
            await stream.write(b"event: msg\ndata: " + encode_json(reply) + b"\n\n")
        await stream.write(b"event: done\ndata: " + encode_json(answer) + b"\n\n")
        await stream.write_eof()
        return stream

    async def close_chat(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        req = decode_body(await _read_body(request), CloseRequest)
        visitor = self._session_caller(token, req.session_id)
        await self.node.close_chat(req.session_id, by="visitor", principal=visitor)
        return _json(CloseResponse(session_id=req.session_id, status="closed"))

    async def messages(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        session_id = request.match_info["session_id"]
        after = _query_int(request, "after", 0, 0, MAX_SEQ)
        limit = _query_int(request, "limit", DEFAULT_SYNC_LIMIT, 1, MAX_SYNC_LIMIT)
        return _json(await read_history(self.node, token, session_id, after, limit))

    # -- the agent workbench ----------------------------------------------------------------

    def _agent(self, request: web.Request) -> str:
        agent = self.node.agent_of_token(_bearer(request))
        if agent is None:
            raise _Refusal("forbidden", "this token is not an agent's token")
        return agent

    async def agent_login(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        if self.node.agent_of_own_token(token) is None:  # before the body is read
            raise _Refusal("forbidden", "a session is opened with the agent's own token only")
        ttl_s = None
        if request.body_exists:
            ttl_s = decode_body(await _read_body(request), AgentLoginRequest).ttl_s
        return _json(self.node.agent_login(token, ttl_s))

    async def agent_logout(self, request: web.Request) -> web.Response:
        await self.node.agent_logout(_bearer(request))
        return web.Response(status=204)

    async def agent_me(self, request: web.Request) -> web.Response:
        return _json(self.node.agent_me(self._agent(request)))

    async def agent_conversations(self, request: web.Request) -> web.Response:
        return _json(await self.node.agent_conversations_anywhere(self._agent(request)))

    async def agent_session_stats(self, request: web.Request) -> web.Response:
        agent = self._agent(request)
        session_id = request.match_info["session_id"]
        if not is_conv_id(session_id):
            raise _Refusal("not_found", "no such session")
        return _json(self.node.agent_session_stats(agent, session_id))

    async def admin_stats(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json(await self.node.admin_stats_anywhere())

    # -- public -----------------------------------------------------------------------------

    async def public_config(self, request: web.Request) -> web.Response:
        return _json(self.node.public_config())

    async def healthz(self, request: web.Request) -> web.Response:
        health = self.node.health()
        return _json(health, 200 if health.status == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.node.metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=openapi_json(), content_type=JSON_CONTENT_TYPE)

    # -- admin ------------------------------------------------------------------------------

    async def list_agents(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json(self.node.list_agents())

    async def create_agent(self, request: web.Request) -> web.Response:
        self._admin(request)
        req = decode_body(await _read_body(request), AgentCreate)
        return _json(await self.node.create_agent(req), 201)

    async def get_agent(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json(self.node.get_agent(request.match_info["agent_id"]))

    async def update_agent(self, request: web.Request) -> web.Response:
        self._admin(request)
        req = decode_body(await _read_body(request), AgentUpdate)
        return _json(await self.node.update_agent(request.match_info["agent_id"], req))

    async def rotate_agent_token(self, request: web.Request) -> web.Response:
        self._admin(request)
        req = decode_body(await _read_body(request), AgentTokenRequest)
        return _json(await self.node.rotate_agent_token(request.match_info["agent_id"], req))

    async def delete_agent(self, request: web.Request) -> web.Response:
        self._admin(request)
        await self.node.delete_agent(request.match_info["agent_id"])
        return web.Response(status=204)

    async def kb_search(self, request: web.Request) -> web.Response:
        self._admin(request)
        values = request.query.getall("q", [])
        # Exactly the document's rule (1 to 1,000 characters): a blank query is valid and
        # matches nothing, as a blank question would.
        if len(values) != 1 or not 1 <= len(values[0]) <= MAX_KB_QUERY_CHARS:
            raise _Refusal(
                "invalid",
                f"query parameter `q` must be given once, 1 to {MAX_KB_QUERY_CHARS} characters",
            )
        k = _query_int(request, "k", 5, 1, MAX_KB_HITS)
        return _json(self.node.kb_search(values[0], k))

    async def kb_reload(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _json(await self.node.kb_reload())

    async def session_stats(self, request: web.Request) -> web.Response:
        self._admin(request)
        session_id = request.match_info["session_id"]
        if not is_conv_id(session_id):
            raise _Refusal("not_found", "no such session")
        return _json(self.node.session_stats(session_id))

    async def admin_close(self, request: web.Request) -> web.Response:
        self._admin(request)
        session_id = request.match_info["session_id"]
        if not is_conv_id(session_id):
            raise _Refusal("not_found", "no such session")
        await self.node.close_chat(session_id, by="admin")
        return _json(CloseResponse(session_id=session_id, status="closed"))
