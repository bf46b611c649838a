"""A client of the OpenAI chat-completions protocol, on aiohttp: streaming, timeouts, retries,
a circuit breaker per endpoint, fallback endpoints and bounded concurrency.

It speaks to any server of that protocol (OpenAI, vLLM, Ollama, llama.cpp, DeepSeek, Qwen):
``POST {base_url}/chat/completions`` with ``Authorization: Bearer {api_key}`` when a key is set.
``base_url`` includes the version path, as in the OpenAI SDKs (``https://api.openai.com/v1``).

Use::

    client = LlmClient(LlmOptions(endpoint=Endpoint(base_url=url, model="gpt-4o-mini")))
    async with contextlib.aclosing(client.stream(messages)) as events:
        async for event in events:
            if isinstance(event, Delta):
                ...                      # event.text: the next piece of the answer
            else:
                ...                      # Done: whole text, finish_reason, usage
    done = await client.complete(messages)   # the same, one request with "stream": false
    await client.close()

Every failure is an :class:`LlmUnavailable` whose ``reason`` is one of :data:`REASONS`; one
raised after text was already yielded is its subclass :class:`LlmInterrupted` (the text reached
the visitor and cannot be taken back, so nothing is retried). The caller answers either with
the best knowledge-base answer or a handoff: never silence.

Decisions and bounds
--------------------
- **SSE per the WHATWG event-stream rules.** Lines end in LF, CRLF or CR (a CR that ends one
  read and an LF that starts the next are one line end); a leading BOM is dropped; ``:`` starts
  a comment; ``data`` lines of one event are joined with ``\\n``; ``event``, ``id``, ``retry``
  and unknown fields are ignored; a blank line ends an event; an unfinished event at the end of
  the stream is dropped. ``data: [DONE]`` ends the answer. Chunks without ``choices`` (the usage
  chunk of ``stream_options.include_usage``), a ``delta`` without ``content`` or with
  ``content: null`` (the role chunk) and empty events are skipped; only choice 0 is read.
- **An error object inside a 200 stream** is a ``provider_error`` (``quota`` when its code is
  ``insufficient_quota``). A stream that ends without ``[DONE]`` is ``cut_off``, unless a
  ``finish_reason`` already came (llama.cpp and some proxies omit ``[DONE]``; the text is
  whole then). A server that answers a streaming request with ``application/json`` is read as a
  non-streamed completion.
- **No unbounded buffer.** A line (or an event's joined data) longer than ``max_line_bytes``
  and a response larger than ``max_response_bytes`` are ``bad_response``; the connection is
  dropped. Error bodies of non-200 answers are read up to 64 KiB.
- **Timeouts** (all from the event loop's clock, each bounded by the call's total deadline):
  ``connect_timeout_s`` for the TCP/TLS connect; ``first_token_timeout_s`` from the request to
  the first piece of text (headers and role chunks do not count); ``chunk_timeout_s`` between
  reads once text flows (any bytes, keep-alive comments included, count as progress);
  ``total_timeout_s`` for the whole call, retries and fallbacks included. Waiting for a
  concurrency slot is bounded separately by ``queue_timeout_s``, so a caller waits at most
  ``queue_timeout_s + total_timeout_s``.
- **Retries** (``max_retries`` per endpoint after the first attempt) on 408, 409, 429, 5xx,
  connection errors, timeouts, a provider error or a cut-off stream, only while no text was
  yielded. Never on 400, 401, 403, 404 (nor other 4xx) or a quota error (``insufficient_quota``
  in the body, or 402). The delay is ``Retry-After`` when the server sent one
  (``retry-after-ms``, seconds, or an HTTP date), else exponential backoff with full jitter:
  ``uniform(0, min(backoff_max_s, backoff_base_s * 2**attempt))``. A ``Retry-After`` above
  ``retry_after_max_s``, or a delay that would pass the deadline, ends the retries on that
  endpoint at once (the visitor should not wait for it): the next endpoint is tried.
- **Circuit breaker per endpoint**: ``breaker_failures`` consecutive failed attempts open it;
  calls skip an open endpoint (reason ``breaker_open``) for ``breaker_cooldown_s``; then it is
  half-open and lets exactly one trial attempt through: success closes it, failure opens it
  again. A failure that opens it also ends the retries on that endpoint. An open endpoint is
  reported as ``breaker_open`` only when no attempt of the call failed for a reason of its own.
  Request errors (400, 413, 422, ...) prove the endpoint alive and count as successes;
  401, 403, 404 and quota errors count as failures (a misconfigured endpoint should not be
  called again at every message). An attempt abandoned by its caller counts as neither.
- **Fallback endpoints** are tried in order when the primary's breaker is open or its attempts
  failed, while no text was yielded.
- **Bounded concurrency**: at most ``max_concurrency`` calls run at once (the connection pool
  has the same bound); at most ``max_waiting`` wait for a slot, each at most
  ``queue_timeout_s``; beyond either the call fails at once with reason ``busy``.
- **Metrics**: :meth:`LlmClient.stats` (calls, failures by reason, retries, fallbacks, breaker
  state per endpoint, tokens from ``usage``, first-token latency count/sum/max) and the
  ``on_first_token`` hook for a latency histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Literal, Protocol, TypeVar

import aiohttp
import msgspec
from msgspec import Struct

from kefu.errors import KefuError
from kefu.protocol import encode_json

__all__ = [
    "REASONS",
    "ChatMessage",
    "ChatModel",
    "CircuitBreaker",
    "Delta",
    "Done",
    "Endpoint",
    "LlmClient",
    "LlmEvent",
    "LlmInterrupted",
    "LlmOptions",
    "LlmUnavailable",
    "SseError",
    "SseParser",
    "Usage",
    "parse_retry_after",
]

T = TypeVar("T")
KiB: Final = 1024
MiB: Final = 1024 * KiB

Role = Literal["system", "user", "assistant"]

Reason = Literal[
    "connect_timeout",
    "first_token_timeout",
    "chunk_timeout",
    "total_timeout",
    "connection",
    "http_status",
    "quota",
    "provider_error",
    "cut_off",
    "bad_response",
    "breaker_open",
    "busy",
]
REASONS: Final[tuple[Reason, ...]] = (
    "connect_timeout",
    "first_token_timeout",
    "chunk_timeout",
    "total_timeout",
    "connection",
    "http_status",
    "quota",
    "provider_error",
    "cut_off",
    "bad_response",
    "breaker_open",
    "busy",
)
"""Why a call failed; the keys of ``stats()["failures"]``."""

# Statuses worth another attempt: timeout, conflict, rate limit, and every server error.
_RETRY_STATUSES: Final = frozenset({408, 409, 429})
# Statuses that say the endpoint is misconfigured, not that this request was wrong.
_ENDPOINT_FAULT_STATUSES: Final = frozenset({401, 402, 403, 404})
_ERROR_BODY_LIMIT: Final = 64 * KiB
_QUOTA_CODE: Final = "insufficient_quota"


# ---------------------------------------------------------------------------------------------
# Public values


class ChatMessage(Struct, frozen=True):
    """One message of the conversation sent to the model."""

    role: Role
    content: str


class Usage(Struct, frozen=True, kw_only=True):
    """Token counts the server reported (``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Delta(Struct, frozen=True):
    """The next piece of the answer's text (never empty)."""

    text: str


class Done(Struct, frozen=True, kw_only=True):
    """The end of a successful call: the whole text and what the server said about it.

    ``finish_reason`` is ``"stop"`` for a whole answer, ``"length"`` when ``max_tokens`` cut it
    (only ``"stop"`` answers belong in a cache). ``usage`` is None when the server sent none.
    ``first_token_s``: seconds from the call's start to its first text (None without text).
    """

    text: str
    finish_reason: str | None
    usage: Usage | None
    endpoint: str
    model: str
    attempts: int
    first_token_s: float | None


LlmEvent = Delta | Done


class Endpoint(Struct, frozen=True, kw_only=True):
    """One server: ``base_url`` with the version path (``http://127.0.0.1:8000/v1``)."""

    base_url: str
    model: str
    api_key: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """The endpoint's name in stats and errors (never the key)."""
        return self.name or f"{self.base_url.rstrip('/')}#{self.model}"

    def __repr__(self) -> str:
        return f"Endpoint({self.label!r})"  # keeps the key out of logs


class LlmOptions(Struct, frozen=True, kw_only=True):
    """Everything :class:`LlmClient` needs; defaults suit a hosted API. See the module doc."""

    endpoint: Endpoint
    fallbacks: tuple[Endpoint, ...] = ()
    max_tokens: int = 512
    temperature: float = 0.3
    connect_timeout_s: float = 3.0
    first_token_timeout_s: float = 8.0
    chunk_timeout_s: float = 5.0
    total_timeout_s: float = 30.0
    max_retries: int = 2
    backoff_base_s: float = 0.25
    backoff_max_s: float = 4.0
    retry_after_max_s: float = 8.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    max_concurrency: int = 16
    max_waiting: int = 256
    queue_timeout_s: float = 2.0
    max_line_bytes: int = 256 * KiB
    max_response_bytes: int = 4 * MiB
    stream_usage: bool = True
    trust_env: bool = False

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[float, float]] = {
            "max_tokens": (1, 32_768),
            "temperature": (0.0, 2.0),
            "connect_timeout_s": (0.01, 600.0),
            "first_token_timeout_s": (0.01, 600.0),
            "chunk_timeout_s": (0.01, 600.0),
            "total_timeout_s": (0.01, 3600.0),
            "max_retries": (0, 10),
            "backoff_base_s": (0.0, 60.0),
            "backoff_max_s": (0.0, 600.0),
            "retry_after_max_s": (0.0, 600.0),
            "breaker_failures": (1, 1_000),
            "breaker_cooldown_s": (0.0, 3600.0),
            "max_concurrency": (1, 1_024),
            "max_waiting": (0, 1_000_000),
            "queue_timeout_s": (0.0, 600.0),
            "max_line_bytes": (1 * KiB, 16 * MiB),
            "max_response_bytes": (1 * KiB, 256 * MiB),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"LlmOptions.{name} must be in [{low}, {high}], got {value}")
        for endpoint in (self.endpoint, *self.fallbacks):
            if not endpoint.base_url.startswith(("http://", "https://")):
                raise ValueError(f"endpoint base_url must be http(s): {endpoint.label!r}")
        labels = [e.label for e in (self.endpoint, *self.fallbacks)]
        if len(set(labels)) != len(labels):
            raise ValueError(f"endpoint labels must differ: {labels}")


class LlmUnavailable(KefuError):
    """The model gave no answer. ``reason`` is one of :data:`REASONS`.

    ``status`` is the last HTTP status when the reason is ``http_status`` or ``quota``;
    ``endpoint`` the label of the last endpoint tried (None when none was); ``attempts`` the
    HTTP requests made.
    """

    code = "unavailable"

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        status: int | None = None,
        endpoint: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.status = status
        self.endpoint = endpoint
        self.attempts = attempts


class LlmInterrupted(LlmUnavailable):
    """The stream failed after text was yielded: ``partial_text`` already reached the caller.

    Never retried (the visitor saw the start of an answer, and another attempt would write a
    different one); the caller decides how to end the message.
    """

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        partial_text: str,
        status: int | None = None,
        endpoint: str | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(reason, message, status=status, endpoint=endpoint, attempts=attempts)
        self.partial_text = partial_text


class ChatModel(Protocol):
    """What the bot needs of a model: :class:`LlmClient`, or a test double."""

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncIterator[LlmEvent]: ...

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Done: ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Server-sent events


class SseError(ValueError):
    """The byte stream broke a bound of :class:`SseParser`."""


class SseParser:
    """Incremental parser of a ``text/event-stream``: bytes in, each event's ``data`` out.

    ``feed(chunk)`` returns the data of every event a blank line completed in it. Memory is
    bounded by ``max_line_bytes``: a longer line, or an event whose data lines add up to more,
    raises :class:`SseError`.
    """

    __slots__ = ("_buf", "_data", "_data_bytes", "_max_line", "_skip_lf", "_started")

    def __init__(self, max_line_bytes: int = 256 * KiB) -> None:
        self._max_line = max_line_bytes
        self._buf = bytearray()
        self._data: list[str] = []
        self._data_bytes = 0
        self._skip_lf = False
        self._started = False

    def feed(self, chunk: bytes) -> list[str]:
        """Parse ``chunk``; return the data of the events it completed, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf
        buf += chunk
        if not self._started and len(buf) >= 3:
            self._started = True
            if buf[:3] == b"\xef\xbb\xbf":
                del buf[:3]
        out: list[str] = []
        pos = 0
        end = len(buf)
        while pos < end:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else end)
            if cr >= 0:
                line_end, next_pos = cr, cr + 1
                if next_pos < end and buf[next_pos] == 0x0A:
                    next_pos += 1
                elif next_pos == end:
                    self._skip_lf = True  # the LF of a CRLF may start the next read
            elif lf >= 0:
                line_end, next_pos = lf, lf + 1
            else:
                break
            if line_end - pos > self._max_line:
                raise SseError(f"event-stream line longer than {self._max_line} bytes")
            self._line(bytes(buf[pos:line_end]), out)
            pos = next_pos
        del buf[:pos]
        if len(buf) > self._max_line:
            raise SseError(f"event-stream line longer than {self._max_line} bytes")
        return out

    def _line(self, line: bytes, out: list[str]) -> None:
        if not line:
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
                self._data_bytes = 0
            return
        if line[0] == 0x3A:  # ":" starts a comment (servers send them as keep-alives)
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name != b"data":
            return  # event, id, retry and unknown fields mean nothing to this protocol
        self._data_bytes += len(value) + 1
        if self._data_bytes > self._max_line:
            raise SseError(f"event-stream event longer than {self._max_line} bytes")
        self._data.append(value.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------
# Provider JSON (unknown fields are ignored; a wrong type is a bad response)


class _RawUsage(Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    def usage(self) -> Usage:
        prompt = self.prompt_tokens or 0
        completion = self.completion_tokens or 0
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=self.total_tokens or prompt + completion,
        )


class _ApiError(Struct):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _DeltaBody(Struct):
    content: str | None = None


class _ChunkChoice(Struct):
    index: int = 0
    delta: _DeltaBody | None = None
    finish_reason: str | None = None


class _Chunk(Struct):
    choices: list[_ChunkChoice] | None = None
    usage: _RawUsage | None = None
    error: _ApiError | str | None = None


class _MessageBody(Struct):
    content: str | None = None


class _Choice(Struct):
    index: int = 0
    message: _MessageBody | None = None
    finish_reason: str | None = None


class _Completion(Struct):
    choices: list[_Choice] | None = None
    usage: _RawUsage | None = None
    error: _ApiError | str | None = None


class _ErrorBody(Struct):
    error: _ApiError | str | None = None


class _Request(Struct, omit_defaults=True):
    model: str
    messages: Sequence[ChatMessage]
    max_tokens: int
    temperature: float
    stream: bool
    stream_options: dict[str, bool] | None = None


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)
_completion_decoder: Final = msgspec.json.Decoder(_Completion)
_error_decoder: Final = msgspec.json.Decoder(_ErrorBody)
_DECODE_FAILURES: Final = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def _error_text(error: _ApiError | str) -> str:
    if isinstance(error, str):
        return error[:200]
    return (error.message or error.type or str(error.code) or "error")[:200]


def _is_quota(error: _ApiError | str | None) -> bool:
    if isinstance(error, _ApiError):
        return _QUOTA_CODE in (error.code, error.type)
    return isinstance(error, str) and _QUOTA_CODE in error


def parse_retry_after(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    ``headers`` is a case-insensitive mapping; ``now`` is wall-clock time (tests). A date in the
    past is 0; a value that parses as neither is None (ignored, as if absent).
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        with contextlib.suppress(ValueError):
            ms = float(value)
            if ms >= 0 and ms == ms:
                return ms / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if seconds >= 0 and seconds == seconds else None


# ---------------------------------------------------------------------------------------------
# Circuit breaker

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed, open for ``cooldown_s`` after ``failures`` consecutive failures, then half-open
    with one trial attempt. ``clock`` is monotonic seconds (injectable for tests)."""

    __slots__ = (
        "_clock",
        "_opened_at",
        "_trial",
        "consecutive_failures",
        "cooldown_s",
        "failures",
        "opened",
        "state",
    )

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state: BreakerState = "closed"
        self.consecutive_failures = 0
        self.opened = 0  # times it went from closed or half-open to open
        self._opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        """Whether an attempt may start now; in half-open, True once until that trial ends."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.cooldown_s:
                return False
            self.state = "half_open"
            self._trial = False
        if self._trial:
            return False
        self._trial = True
        return True

    def current_state(self) -> BreakerState:
        """The state, reading an expired cooldown as half-open (for stats)."""
        if self.state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return self.state

    def success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self._trial = False

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive_failures >= self.failures
        ):
            self.state = "open"
            self._opened_at = self._clock()
            self.opened += 1
        self._trial = False

    def abandon(self) -> None:
        """The attempt ended without a verdict (its caller left): free the trial slot."""
        self._trial = False


# ---------------------------------------------------------------------------------------------
# The client


class _AttemptFailed(Exception):
    """One HTTP attempt failed; the call decides whether to retry, fall back or give up."""

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        retryable: bool,
        breaker_failure: bool = True,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason: Reason = reason
        self.detail = detail
        self.retryable = retryable
        self.breaker_failure = breaker_failure
        self.status = status
        self.retry_after = retry_after


if sys.version_info >= (3, 11):

    async def _within(aw: Awaitable[T], when: float) -> T:
        """``await aw`` or raise ``TimeoutError`` at loop time ``when``."""
        async with asyncio.timeout_at(when):
            return await aw

else:  # pragma: no cover - Python 3.10

    async def _within(aw: Awaitable[T], when: float) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(aw, max(0.0, when - loop.time()))


class _Progress:
    """What one call has yielded so far (shared by its attempts)."""

    __slots__ = ("first_token_s", "parts", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.parts: list[str] = []
        self.first_token_s: float | None = None


class LlmClient:
    """The OpenAI chat-completions client; one per node, shared by every conversation.

    ``clock`` (monotonic seconds) drives the breakers, ``sleep`` the retry delays and ``rand``
    the jitter; tests replace them. ``on_first_token(seconds)`` is called at each call's first
    text (for a histogram). The aiohttp session is made at first use, inside the running loop.
    """

    def __init__(
        self,
        options: LlmOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        on_first_token: Callable[[float], None] | None = None,
    ) -> None:
        self.options = options
        self._endpoints = (options.endpoint, *options.fallbacks)
        self._breakers = {
            e.label: CircuitBreaker(options.breaker_failures, options.breaker_cooldown_s, clock)
            for e in self._endpoints
        }
        self._sleep = sleep
        self._rand = rand
        self._on_first_token = on_first_token
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(options.max_concurrency)
        self._in_flight = 0
        self._waiting = 0
        self._closed = False
        # Counters for stats().
        self._calls = 0
        self._succeeded = 0
        self._failures: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._attempt_failures: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._interrupted = 0
        self._abandoned = 0
        self._retries = 0
        self._fallback_attempts = 0
        self._attempts: dict[str, int] = {e.label: 0 for e in self._endpoints}
        self._tokens_in = 0
        self._tokens_out = 0
        self._first_token_count = 0
        self._first_token_sum = 0.0
        self._first_token_max = 0.0

    # -- lifecycle

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("LlmClient is closed")
        if self._session is None:
            o = self.options
            connector = aiohttp.TCPConnector(
                limit=o.max_concurrency, limit_per_host=0, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout_s),
                trust_env=o.trust_env,
            )
        return self._session

    async def close(self) -> None:
        """Close the connection pool; later calls raise ``RuntimeError``."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LlmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- calls

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[LlmEvent, None]:
        """The answer as :class:`Delta` events then one :class:`Done`.

        Raises :class:`LlmUnavailable` before the first delta, :class:`LlmInterrupted` after.
        Iterate it to the end or close it (``contextlib.aclosing``) so its connection is freed
        at once.
        """
        async with contextlib.aclosing(
            self._call(messages, max_tokens, temperature, streaming=True)
        ) as events:
            async for event in events:
                yield event

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Done:
        """The whole answer from one non-streamed request (``"stream": false``)."""
        async with contextlib.aclosing(
            self._call(messages, max_tokens, temperature, streaming=False)
        ) as events:
            async for event in events:
                if isinstance(event, Done):
                    return event
        raise AssertionError("a call ends with Done or an exception")  # pragma: no cover

    async def _acquire(self) -> None:
        o = self.options
        if self._slots.locked():
            if self._waiting >= o.max_waiting:
                raise LlmUnavailable("busy", f"{self._waiting} LLM calls already waiting")
            self._waiting += 1
            try:
                loop = asyncio.get_running_loop()
                await _within(self._slots.acquire(), loop.time() + o.queue_timeout_s)
            except asyncio.TimeoutError:
                raise LlmUnavailable(
                    "busy", f"no LLM slot free within {o.queue_timeout_s:g} s"
                ) from None
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()

    async def _call(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        temperature: float | None,
        *,
        streaming: bool,
    ) -> AsyncGenerator[LlmEvent, None]:
        o = self.options
        self._calls += 1
        try:
            await self._acquire()
        except LlmUnavailable as exc:
            self._failures[exc.reason] += 1
            raise
        self._in_flight += 1
        try:
            session = self._ensure_session()
            loop = asyncio.get_running_loop()
            progress = _Progress(loop.time())
            deadline = progress.started + o.total_timeout_s
            attempts = 0
            last: _AttemptFailed | None = None
            last_label: str | None = None
            for index, endpoint in enumerate(self._endpoints):
                breaker = self._breakers[endpoint.label]
                payload = encode_json(
                    _Request(
                        model=endpoint.model,
                        messages=messages,
                        max_tokens=o.max_tokens if max_tokens is None else max_tokens,
                        temperature=o.temperature if temperature is None else temperature,
                        stream=streaming,
                        stream_options={"include_usage": True}
                        if streaming and o.stream_usage
                        else None,
                    )
                )
                retry = 0
                while True:
                    if not breaker.allow():
                        self._attempt_failures["breaker_open"] += 1
                        if last is None:  # a real failure says more than an open circuit
                            last = _AttemptFailed(
                                "breaker_open",
                                f"circuit open for {endpoint.label}",
                                retryable=False,
                                breaker_failure=False,
                            )
                            last_label = endpoint.label
                        break
                    attempts += 1
                    self._attempts[endpoint.label] += 1
                    if index > 0 and retry == 0:
                        self._fallback_attempts += 1
                    verdict = False
                    try:
                        async with contextlib.aclosing(
                            self._attempt(session, endpoint, payload, streaming, deadline, progress)
                        ) as events:
                            async for event in events:
                                if isinstance(event, Done):
                                    verdict = True
                                    breaker.success()
                                    done = self._finish(event, endpoint, attempts, progress)
                                    yield done
                                    return
                                yield event
                    except _AttemptFailed as failure:
                        verdict = True
                        last_label = endpoint.label
                        self._attempt_failures[failure.reason] += 1
                        if failure.breaker_failure:
                            breaker.failure()
                        else:
                            breaker.success()
                        if progress.parts:
                            self._interrupted += 1
                            self._failures[failure.reason] += 1
                            raise LlmInterrupted(
                                failure.reason,
                                f"{endpoint.label}: {failure.detail} after text was sent",
                                partial_text="".join(progress.parts),
                                status=failure.status,
                                endpoint=endpoint.label,
                                attempts=attempts,
                            ) from None
                        last = failure
                        if breaker.state == "open":
                            break  # this failure opened it: on to the next endpoint
                        delay = self._retry_delay(failure, retry, deadline, loop.time())
                        if delay is None:
                            break
                        self._retries += 1
                        retry += 1
                        await self._sleep(delay)
                    finally:
                        if not verdict:
                            breaker.abandon()  # the caller left (closed us, or cancelled)
                            self._abandoned += 1
                if loop.time() >= deadline:
                    break
            if last is None:  # pragma: no cover - at least one endpoint exists
                last = _AttemptFailed("total_timeout", "no attempt", retryable=False)
            if loop.time() >= deadline and last.reason != "breaker_open":
                reason: Reason = last.reason if last.reason.endswith("timeout") else "total_timeout"
            else:
                reason = last.reason
            self._failures[reason] += 1
            raise LlmUnavailable(
                reason,
                f"{last_label}: {last.detail}",
                status=last.status,
                endpoint=last_label,
                attempts=attempts,
            )
        finally:
            self._in_flight -= 1
            self._slots.release()

    def _finish(self, event: Done, endpoint: Endpoint, attempts: int, progress: _Progress) -> Done:
        self._succeeded += 1
        if event.usage is not None:
            self._tokens_in += event.usage.prompt_tokens
            self._tokens_out += event.usage.completion_tokens
        return Done(
            text=event.text,
            finish_reason=event.finish_reason,
            usage=event.usage,
            endpoint=endpoint.label,
            model=endpoint.model,
            attempts=attempts,
            first_token_s=progress.first_token_s,
        )

    def _retry_delay(
        self, failure: _AttemptFailed, retry: int, deadline: float, now: float
    ) -> float | None:
        o = self.options
        if not failure.retryable or retry >= o.max_retries:
            return None
        if failure.retry_after is not None:
            if failure.retry_after > o.retry_after_max_s:
                return None
            delay = failure.retry_after
        else:
            delay = self._rand() * min(o.backoff_max_s, o.backoff_base_s * 2.0**retry)
        if now + delay >= deadline:
            return None
        return delay

    def _delta(self, text: str, progress: _Progress, now: float) -> Delta:
        if progress.first_token_s is None:
            elapsed = now - progress.started
            progress.first_token_s = elapsed
            self._first_token_count += 1
            self._first_token_sum += elapsed
            self._first_token_max = max(self._first_token_max, elapsed)
            if self._on_first_token is not None:
                self._on_first_token(elapsed)
        progress.parts.append(text)
        return Delta(text)

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        endpoint: Endpoint,
        payload: bytes,
        streaming: bool,
        deadline: float,
        progress: _Progress,
    ) -> AsyncGenerator[LlmEvent, None]:
        """One HTTP request: yields its deltas and Done, or raises :class:`_AttemptFailed`."""
        o = self.options
        loop = asyncio.get_running_loop()
        # A non-streamed answer comes whole at the end: only the total deadline bounds it.
        first_deadline = (
            min(deadline, loop.time() + o.first_token_timeout_s) if streaming else deadline
        )
        headers = {"Content-Type": "application/json"}
        if streaming:
            headers["Accept"] = "text/event-stream"
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        url = f"{endpoint.base_url.rstrip('/')}/chat/completions"
        try:
            response = await _within(
                session.post(url, data=payload, headers=headers), first_deadline
            )
        except aiohttp.ServerTimeoutError:
            raise _AttemptFailed(
                "connect_timeout", f"no connection within {o.connect_timeout_s:g} s", retryable=True
            ) from None
        except asyncio.TimeoutError:
            raise self._timeout(first_deadline, deadline, "first_token_timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _AttemptFailed(
                "connection", f"connection failed: {type(exc).__name__}", retryable=True
            ) from None
        done = False
        try:
            if response.status != 200:
                raise await self._status_failure(response, deadline)
            content_type = response.headers.get("Content-Type", "").lower()
            if not streaming or content_type.startswith("application/json"):
                body = await self._read_body(
                    response, o.max_response_bytes, first_deadline, deadline
                )
                completion = self._decode_completion(body)
                text, finish, usage = completion
                if text:
                    yield self._delta(text, progress, loop.time())
                done = True
                yield Done(
                    text=text,
                    finish_reason=finish,
                    usage=usage,
                    endpoint=endpoint.label,
                    model=endpoint.model,
                    attempts=0,
                    first_token_s=None,
                )
                return
            async with contextlib.aclosing(
                self._read_stream(response, endpoint, first_deadline, deadline, progress)
            ) as events:
                async for event in events:
                    if isinstance(event, Done):
                        done = True
                    yield event
        finally:
            if done:
                response.release()
            else:
                response.close()  # drop a half-read connection rather than drain it

    def _timeout(self, when: float, deadline: float, reason: Reason) -> _AttemptFailed:
        o = self.options
        if when >= deadline:
            return _AttemptFailed(
                "total_timeout", f"no answer within {o.total_timeout_s:g} s", retryable=False
            )
        bound = o.first_token_timeout_s if reason == "first_token_timeout" else o.chunk_timeout_s
        what = "first token" if reason == "first_token_timeout" else "next chunk"
        return _AttemptFailed(reason, f"no {what} within {bound:g} s", retryable=True)

    async def _status_failure(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> _AttemptFailed:
        status = response.status
        error: _ApiError | str | None = None
        with contextlib.suppress(
            _AttemptFailed, asyncio.TimeoutError, aiohttp.ClientError, *_DECODE_FAILURES
        ):
            body = await self._read_body(response, _ERROR_BODY_LIMIT, deadline, deadline)
            error = _error_decoder.decode(body).error
        detail = f"HTTP {status}" + (f": {_error_text(error)}" if error is not None else "")
        if status == 402 or (status == 429 and _is_quota(error)):
            return _AttemptFailed("quota", detail, retryable=False, status=status)
        retryable = status in _RETRY_STATUSES or status >= 500
        return _AttemptFailed(
            "http_status",
            detail,
            retryable=retryable,
            breaker_failure=retryable or status in _ENDPOINT_FAULT_STATUSES,
            status=status,
            retry_after=parse_retry_after(response.headers) if retryable else None,
        )

    async def _read_body(
        self, response: aiohttp.ClientResponse, limit: int, when: float, deadline: float
    ) -> bytes:
        body = bytearray()
        while True:
            try:
                chunk = await _within(response.content.readany(), when)
            except asyncio.TimeoutError:
                raise self._timeout(when, deadline, "first_token_timeout") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _AttemptFailed(
                    "cut_off", f"body cut off: {type(exc).__name__}", retryable=True
                ) from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise _AttemptFailed(
                    "bad_response", f"response body over {limit} bytes", retryable=False
                )

    def _decode_completion(self, body: bytes) -> tuple[str, str | None, Usage | None]:
        try:
            completion = _completion_decoder.decode(body)
        except _DECODE_FAILURES as exc:
            raise _AttemptFailed(
                "bad_response", f"response is not a completion: {exc}", retryable=False
            ) from None
        if completion.error is not None:
            raise self._provider_error(completion.error)
        if not completion.choices:
            raise _AttemptFailed("bad_response", "completion has no choices", retryable=False)
        choice = completion.choices[0]
        text = (choice.message.content if choice.message is not None else None) or ""
        usage = completion.usage.usage() if completion.usage is not None else None
        return text, choice.finish_reason, usage

    def _provider_error(self, error: _ApiError | str) -> _AttemptFailed:
        if _is_quota(error):
            return _AttemptFailed("quota", _error_text(error), retryable=False)
        return _AttemptFailed("provider_error", _error_text(error), retryable=True)

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        endpoint: Endpoint,
        first_deadline: float,
        deadline: float,
        progress: _Progress,
    ) -> AsyncGenerator[LlmEvent, None]:
        o = self.options
        loop = asyncio.get_running_loop()
        parser = SseParser(o.max_line_bytes)
        finish: str | None = None
        usage: Usage | None = None
        got_text = False
        received = 0
        ended = False
        while not ended:
            if got_text:
                when = min(deadline, loop.time() + o.chunk_timeout_s)
                reason: Reason = "chunk_timeout"
            else:
                when = first_deadline
                reason = "first_token_timeout"
            try:
                chunk = await _within(response.content.readany(), when)
            except asyncio.TimeoutError:
                raise self._timeout(when, deadline, reason) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _AttemptFailed(
                    "cut_off", f"stream cut off: {type(exc).__name__}", retryable=True
                ) from None
            if not chunk:
                if finish is not None:
                    break  # a finish_reason came: the text is whole without [DONE]
                raise _AttemptFailed("cut_off", "stream ended without [DONE]", retryable=True)
            received += len(chunk)
            if received > o.max_response_bytes:
                raise _AttemptFailed(
                    "bad_response", f"stream over {o.max_response_bytes} bytes", retryable=False
                )
            try:
                events = parser.feed(chunk)
            except SseError as exc:
                raise _AttemptFailed("bad_response", str(exc), retryable=False) from None
            for data in events:
                if data == "[DONE]":
                    ended = True
                    break
                if not data:
                    continue
                try:
                    parsed = _chunk_decoder.decode(data)
                except _DECODE_FAILURES as exc:
                    raise _AttemptFailed(
                        "bad_response",
                        f"stream chunk is not JSON of a chunk: {exc}",
                        retryable=False,
                    ) from None
                if parsed.error is not None:
                    raise self._provider_error(parsed.error)
                if parsed.usage is not None:
                    usage = parsed.usage.usage()
                for choice in parsed.choices or ():
                    if choice.index != 0:
                        continue
                    if choice.delta is not None and choice.delta.content:
                        got_text = True
                        yield self._delta(choice.delta.content, progress, loop.time())
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        yield Done(
            text="".join(progress.parts),
            finish_reason=finish,
            usage=usage,
            endpoint=endpoint.label,
            model=endpoint.model,
            attempts=0,
            first_token_s=None,
        )

    # -- metrics

    def stats(self) -> dict[str, Any]:
        """Counters since start, for ``/metrics`` (see the module doc)."""
        return {
            "calls": self._calls,
            "succeeded": self._succeeded,
            "failures": dict(self._failures),
            "attempt_failures": dict(self._attempt_failures),
            "interrupted": self._interrupted,
            "abandoned": self._abandoned,
            "retries": self._retries,
            "fallback_attempts": self._fallback_attempts,
            "in_flight": self._in_flight,
            "waiting": self._waiting,
            "tokens_in": self._tokens_in,
            "tokens_out": self._tokens_out,
            "first_token_count": self._first_token_count,
            "first_token_seconds_sum": self._first_token_sum,
            "first_token_seconds_max": self._first_token_max,
            "endpoints": {
                label: {
                    "state": breaker.current_state(),
                    "consecutive_failures": breaker.consecutive_failures,
                    "opened": breaker.opened,
                    "attempts": self._attempts[label],
                }
                for label, breaker in self._breakers.items()
            },
        }
