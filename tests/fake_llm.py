"""A fake OpenAI chat-completions provider for tests: an aiohttp server on 127.0.0.1, port 0.

Each request takes the next scripted :class:`Reply` (``fake.script(...)``), or ``fake.default``
when none is left, and every request body is recorded (``fake.requests``, decoded JSON), so a
test can assert the messages the model saw. Use::

    fake = FakeLlm()
    await fake.start()
    fake.script(Reply(status=429, retry_after="1"), Reply(text="运费 10 元"))
    ...  # LlmClient(LlmOptions(endpoint=Endpoint(base_url=fake.url, model="fake")))
    await fake.stop()

Stalls wait on an event that :meth:`FakeLlm.stop` sets (and :meth:`FakeLlm.release` too), so a
stalled handler never outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeLlm", "Reply"]


@dataclass
class Reply:
    """One scripted answer; the defaults stream ``text`` in ``chunk_chars`` pieces then usage."""

    text: str = "好的，这是回答。"
    chunk_chars: int = 4
    chunk_delay_s: float = 0.0
    # Before the response headers are sent.
    stall_headers_s: float = 0.0
    # After the headers (and the role chunk), before the first text chunk.
    stall_first_s: float = 0.0
    # After this many text chunks, stall ``stall_mid_s`` seconds.
    stall_after_chunks: int | None = None
    stall_mid_s: float = 0.0
    # After this many text chunks, close the connection (no [DONE], incomplete chunked body).
    cut_after_chunks: int | None = None
    # Non-200: the status, optional Retry-After and a JSON error body.
    status: int = 200
    retry_after: str | None = None
    error_body: dict[str, Any] | None = None
    # A body sent as is (garbage), with this content type.
    raw_body: bytes | None = None
    raw_content_type: str = "application/json"
    # An {"error": ...} chunk inside the 200 stream after this many text chunks.
    stream_error_after: int | None = None
    stream_error: dict[str, Any] = field(
        default_factory=lambda: {"message": "overloaded", "type": "server_error"}
    )
    usage: bool = True
    prompt_tokens: int | None = None  # default: the characters of the request's messages
    finish_reason: str = "stop"
    send_finish: bool = True
    send_done: bool = True
    comments: bool = False  # keep-alive comments and event/id/retry fields between events
    crlf: bool = False
    split_data: bool = False  # each chunk's JSON over two `data:` lines
    role_chunk: bool = True
    null_content_chunk: bool = False
    # Extra bytes written before the events (e.g. an over-long line).
    prefix: bytes = b""


class FakeLlm:
    """The fake provider; see the module doc. ``url`` is the base URL (with ``/v1``)."""

    def __init__(self) -> None:
        self.default = Reply()
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies, taken one per request in order."""
        self.replies.extend(replies)

    @property
    def messages(self) -> list[list[dict[str, str]]]:
        """The ``messages`` of each request received."""
        return [r["messages"] for r in self.requests]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def release(self) -> None:
        """End every stall now."""
        self._released.set()

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLlm:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _stall(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._released.wait(), seconds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.replies.pop(0) if self.replies else self.default
        await self._stall(reply.stall_headers_s)
        if reply.status != 200:
            headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
            error = reply.error_body or {"error": {"message": f"status {reply.status}"}}
            return web.json_response(error, status=reply.status, headers=headers)
        if reply.raw_body is not None:
            return web.Response(
                body=reply.raw_body, headers={"Content-Type": reply.raw_content_type}
            )
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = sum(len(m.get("content", "")) for m in body.get("messages", []))
        pieces = [
            reply.text[i : i + reply.chunk_chars]
            for i in range(0, len(reply.text), max(1, reply.chunk_chars))
        ]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        if not body.get("stream"):
            await self._stall(reply.stall_first_s)
            completion = {
                "id": "cmpl-fake",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
            }
            if reply.usage:
                completion["usage"] = usage
            return web.json_response(completion)
        return await self._stream(request, reply, pieces, usage, body.get("model"))

    async def _stream(
        self,
        request: web.Request,
        reply: Reply,
        pieces: list[str],
        usage: dict[str, int],
        model: str | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        eol = b"\r\n" if reply.crlf else b"\n"

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
            lines: list[bytes] = []
            if reply.comments:
                lines += [b": keep-alive", b"event: message", b"id: 7", b"retry: 1000"]
            if reply.split_data and data != "[DONE]" and "," in data:
                cut = data.index(",") + 1
                lines += [f"data: {data[:cut]}".encode(), f"data:{data[cut:]}".encode()]
            else:
                lines.append(f"data: {data}".encode())
            await response.write(eol.join(lines) + eol + eol)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chunk-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        if reply.prefix:
            await response.write(reply.prefix)
        if reply.role_chunk:
            await event(chunk({"role": "assistant", "content": ""}))
        if reply.null_content_chunk:
            await event(chunk({"content": None}))
        await self._stall(reply.stall_first_s)
        for n, piece in enumerate(pieces):
            if reply.cut_after_chunks is not None and n == reply.cut_after_chunks:
                assert request.transport is not None
                request.transport.close()  # the chunked body never ends
                return response
            if reply.stream_error_after is not None and n == reply.stream_error_after:
                await event({"error": reply.stream_error})
                await response.write_eof()
                return response
            if reply.stall_after_chunks is not None and n == reply.stall_after_chunks:
                await self._stall(reply.stall_mid_s)
            if reply.chunk_delay_s > 0 and n > 0:
                await asyncio.sleep(reply.chunk_delay_s)
            await event(chunk({"content": piece}))
        if reply.send_finish:
            await event(chunk({}, reply.finish_reason))
        if reply.usage:
            await event({"id": "chunk-fake", "choices": [], "usage": usage})
        if reply.send_done:
            await event("[DONE]")
        await response.write_eof()
        return response
