"""The LLM client against the fake provider (tests/fake_llm.py) over loopback: SSE parsing,
timeouts, retries, the circuit breaker, fallback endpoints and the concurrency bound.

Stalls in the fake last far longer (60 s) than the timeouts under test (a fraction of a
second): a call that ends at all, with the timeout's reason, ended because of the timeout.
Every test is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from multidict import CIMultiDict

from kefu.bot.llm import (
    ChatMessage,
    CircuitBreaker,
    Delta,
    Done,
    Endpoint,
    LlmClient,
    LlmEvent,
    LlmInterrupted,
    LlmOptions,
    LlmUnavailable,
    SseError,
    SseParser,
    parse_retry_after,
)
from tests.fake_llm import FakeLlm, Reply

TIMEOUT = 20.0
STALL = 60.0
MESSAGES = [ChatMessage("system", "You answer shoppers."), ChatMessage("user", "运费多少")]


def fast_options(url: str, **overrides: Any) -> LlmOptions:
    """Options for tests: short backoff, timeouts short enough to test, long enough to pass."""
    values: dict[str, Any] = {
        "endpoint": Endpoint(base_url=url, model="fake-model", api_key="sk-test"),
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "first_token_timeout_s": 5.0,
        "chunk_timeout_s": 5.0,
        "total_timeout_s": 15.0,
        "connect_timeout_s": 2.0,
    }
    values.update(overrides)
    return LlmOptions(**values)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Test = Callable[[FakeLlm, LlmClient], Awaitable[None]]


def scenario(
    test: Test,
    *replies: Reply,
    default: Reply | None = None,
    client_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Run ``test(fake, client)`` on uvloop with a fresh fake provider and client."""

    async def main() -> None:
        async with FakeLlm() as fake:
            fake.script(*replies)
            if default is not None:
                fake.default = default
            client = LlmClient(fast_options(fake.url, **options), **(client_kwargs or {}))
            try:
                await asyncio.wait_for(test(fake, client), TIMEOUT)
            finally:
                await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def collect(client: LlmClient) -> tuple[list[str], Done]:
    deltas: list[str] = []
    async with contextlib.aclosing(client.stream(MESSAGES)) as events:
        async for event in events:
            if isinstance(event, Delta):
                deltas.append(event.text)
            else:
                return deltas, event
    raise AssertionError("no Done")


async def failure(client: LlmClient) -> LlmUnavailable:
    with pytest.raises(LlmUnavailable) as info:
        await collect(client)
    return info.value


# ---------------------------------------------------------------------------------------------
# SSE parser


def feed_all(parser: SseParser, data: bytes, step: int | None = None) -> list[str]:
    if step is None:
        return parser.feed(data)
    out: list[str] = []
    for i in range(0, len(data), step):
        out += parser.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_sse_events_any_split(step: int | None) -> None:
    stream = (
        b"\xef\xbb\xbf: comment\n"
        b"event: message\nid: 1\nretry: 5\ndata: one\n\n"
        b"data: two\r\ndata: lines\r\n\r\n"
        b"data:three\rdata\r\r"
        b'data: {"a":\n'
        b"data: 1}\n\n"
        b"unknown: x\n\n"
        b"data: unfinished"
    )
    assert feed_all(SseParser(), stream, step) == ["one", "two\nlines", "three\n", '{"a":\n1}']


def test_sse_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_sse_invalid_utf8_is_replaced() -> None:
    assert SseParser().feed(b"data: \xff\xfe ok\n\n") == ["\ufffd\ufffd ok"]


def test_sse_line_longer_than_bound_is_an_error() -> None:
    parser = SseParser(max_line_bytes=1024)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 2000)  # no line end: the buffer may not grow further
    parser = SseParser(max_line_bytes=1024)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 2000 + b"\n\n")
    parser = SseParser(max_line_bytes=1024)
    with pytest.raises(SseError):  # many short lines of one event add up
        parser.feed(b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n" * 40)
    assert SseParser(max_line_bytes=1024).feed(b"data: " + b"x" * 1000 + b"\n\n") == ["x" * 1000]


# ---------------------------------------------------------------------------------------------
# Retry-After and the breaker


def test_parse_retry_after() -> None:
    h = CIMultiDict
    assert parse_retry_after(h()) is None
    assert parse_retry_after(h({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(h({"Retry-After": "0.5"})) == 0.5
    assert parse_retry_after(h({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    assert parse_retry_after(h({"Retry-After": "-1"})) is None
    assert parse_retry_after(h({"Retry-After": "soon"})) is None
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    date = "Tue, 14 Nov 2023 22:13:27 GMT"
    assert parse_retry_after(h({"Retry-After": date}), now=now) == pytest.approx(7.0)
    assert parse_retry_after(h({"Retry-After": date}), now=now + 60) == 0.0


def test_breaker_states() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.allow()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and breaker.opened == 1
    assert not breaker.allow()
    clock.now += 10.0
    assert breaker.current_state() == "half_open"
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one
    breaker.failure()
    assert breaker.state == "open" and breaker.opened == 2
    clock.now += 10.0
    assert breaker.allow()
    breaker.abandon()  # a trial whose caller left frees the slot
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="first_token_timeout_s"):
        fast_options("http://127.0.0.1:1/v1", first_token_timeout_s=0)
    with pytest.raises(ValueError, match="http"):
        fast_options("ftp://x/v1")
    with pytest.raises(ValueError, match="differ"):
        e = Endpoint(base_url="http://127.0.0.1:1/v1", model="m")
        LlmOptions(endpoint=e, fallbacks=(e,))
    assert "sk-" not in repr(Endpoint(base_url="http://h/v1", model="m", api_key="sk-secret"))


# ---------------------------------------------------------------------------------------------
# Streaming through the fake provider


def test_stream_yields_deltas_then_done_and_sends_the_request() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        deltas, done = await collect(client)
        assert deltas == ["运费是1", "0元，满", "99包邮", "。"]
        assert done.text == "运费是10元，满99包邮。" and done.finish_reason == "stop"
        assert done.usage is not None and done.usage.completion_tokens == 4
        assert done.usage.prompt_tokens == len("You answer shoppers.") + len("运费多少")
        assert done.model == "fake-model" and done.attempts == 1
        assert done.first_token_s is not None and done.first_token_s >= 0
        [request] = fake.requests
        assert request["model"] == "fake-model" and request["stream"] is True
        assert request["stream_options"] == {"include_usage": True}
        assert request["messages"] == [
            {"role": "system", "content": "You answer shoppers."},
            {"role": "user", "content": "运费多少"},
        ]
        assert request["max_tokens"] == 512 and request["temperature"] == 0.3
        assert fake.headers[0]["Authorization"] == "Bearer sk-test"
        stats = client.stats()
        assert stats["calls"] == stats["succeeded"] == 1
        assert stats["tokens_out"] == 4 and stats["tokens_in"] == done.usage.prompt_tokens
        assert stats["first_token_count"] == 1 and stats["in_flight"] == 0

    scenario(test, Reply(text="运费是10元，满99包邮。"))


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(text="Hello there, shopper", comments=True), id="comments-fields"),
        pytest.param(Reply(text="Hello there, shopper", crlf=True), id="crlf"),
        pytest.param(Reply(text="Hello there, shopper", split_data=True), id="multiline-data"),
        pytest.param(Reply(text="Hello there, shopper", null_content_chunk=True), id="null"),
        pytest.param(Reply(text="Hello there, shopper", usage=False), id="no-usage"),
        pytest.param(Reply(text="Hello there, shopper", send_done=False), id="finish-no-done"),
        pytest.param(Reply(text="Hello there, shopper", chunk_chars=1), id="one-char-chunks"),
    ],
)
def test_stream_variants_give_the_same_text(reply: Reply) -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        deltas, done = await collect(client)
        assert "".join(deltas) == done.text == "Hello there, shopper"
        assert all(deltas)  # no empty delta
        assert (done.usage is not None) == reply.usage

    scenario(test, reply)


def test_overrides_of_max_tokens_and_temperature() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        async with contextlib.aclosing(
            client.stream(MESSAGES, max_tokens=64, temperature=0.0)
        ) as events:
            [_ async for _ in events]
        assert fake.requests[0]["max_tokens"] == 64 and fake.requests[0]["temperature"] == 0.0

    scenario(test)


def test_complete_is_one_non_streamed_request() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        done = await client.complete(MESSAGES)
        assert done.text == "Whole answer." and done.finish_reason == "stop"
        assert done.usage is not None and done.usage.total_tokens > 0
        assert fake.requests[0]["stream"] is False and "stream_options" not in fake.requests[0]

    scenario(test, Reply(text="Whole answer."))


def test_streaming_request_answered_with_json_is_read_as_a_completion() -> None:
    body = b'{"choices":[{"index":0,"message":{"content":"json reply"},"finish_reason":"stop"}]}'

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        deltas, done = await collect(client)
        assert deltas == ["json reply"] and done.text == "json reply" and done.usage is None

    scenario(test, Reply(raw_body=body))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b"<html>bad gateway</html>", "application/json", id="json-garbage"),
        pytest.param(b'{"choices": 5}', "application/json", id="json-wrong-shape"),
        pytest.param(b'{"choices": []}', "application/json", id="json-no-choices"),
        pytest.param(b"data: {not json\n\n", "text/event-stream", id="sse-garbage"),
        pytest.param(b"data: [1, 2]\n\n", "text/event-stream", id="sse-not-object"),
    ],
)
def test_garbage_is_a_bad_response_without_retry(body: bytes, content_type: str) -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "bad_response" and error.code == "unavailable"
        assert len(fake.requests) == 1

    scenario(test, Reply(raw_body=body, raw_content_type=content_type))


def test_line_longer_than_the_bound_is_a_bad_response() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "bad_response" and "longer than" in str(error)

    scenario(test, Reply(prefix=b"data: " + b"x" * 5000), max_line_bytes=4096)


def test_error_object_in_a_200_stream_before_text_is_retried() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        _, done = await collect(client)
        assert done.text == "second try" and done.attempts == 2
        assert client.stats()["attempt_failures"]["provider_error"] == 1

    scenario(test, Reply(stream_error_after=0), Reply(text="second try"))


def test_error_object_after_text_interrupts_without_retry() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert isinstance(error, LlmInterrupted)
        assert error.reason == "provider_error" and error.partial_text == "abcd"
        assert len(fake.requests) == 1
        assert client.stats()["interrupted"] == 1

    scenario(test, Reply(text="abcdefgh", stream_error_after=1))


def test_quota_error_in_a_stream_is_not_retried() -> None:
    quota = {"message": "You exceeded your quota", "code": "insufficient_quota"}

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "quota" and len(fake.requests) == 1

    scenario(test, Reply(stream_error_after=0, stream_error=quota))


def test_cut_off_midway_is_final() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert isinstance(error, LlmInterrupted) and error.reason == "cut_off"
        assert error.partial_text == "abcdefgh" and len(fake.requests) == 1

    scenario(test, Reply(text="abcdefghijkl", cut_after_chunks=2))


def test_cut_off_before_text_is_retried() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        _, done = await collect(client)
        assert done.text == "ok" and len(fake.requests) == 2

    scenario(test, Reply(cut_after_chunks=0), Reply(text="ok"))


def test_end_without_done_nor_finish_is_cut_off() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert isinstance(error, LlmInterrupted) and error.reason == "cut_off"

    scenario(test, Reply(text="abcdefgh", send_done=False, send_finish=False, usage=False))


def test_caller_leaving_early_frees_the_call() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        async with contextlib.aclosing(client.stream(MESSAGES)) as events:
            async for event in events:
                assert isinstance(event, Delta)
                break
        stats = client.stats()
        assert stats["in_flight"] == 0 and stats["abandoned"] == 1
        endpoint = stats["endpoints"][client.options.endpoint.label]
        assert endpoint["consecutive_failures"] == 0 and endpoint["state"] == "closed"
        _, done = await collect(client)  # the slot and the pool are usable again
        assert done.text

    scenario(test, Reply(text="x" * 40, chunk_delay_s=0.05), max_concurrency=1)


# ---------------------------------------------------------------------------------------------
# Timeouts: each one fires, and the call ends long before the stall would


def test_first_token_timeout_while_waiting_for_headers() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "first_token_timeout" and len(fake.requests) == 1

    scenario(test, Reply(stall_headers_s=STALL), first_token_timeout_s=0.3, max_retries=0)


def test_first_token_timeout_after_the_role_chunk() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        _, done = await collect(client)  # retried once, the second answer comes
        assert done.text == "late" and len(fake.requests) == 2
        assert client.stats()["attempt_failures"]["first_token_timeout"] == 1

    scenario(test, Reply(stall_first_s=STALL), Reply(text="late"), first_token_timeout_s=0.3)


def test_chunk_timeout_midway_interrupts() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert isinstance(error, LlmInterrupted) and error.reason == "chunk_timeout"
        assert error.partial_text == "abcd"

    scenario(
        test, Reply(text="abcdefgh", stall_after_chunks=1, stall_mid_s=STALL), chunk_timeout_s=0.3
    )


def test_total_timeout_bounds_a_slow_stream() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert isinstance(error, LlmInterrupted) and error.reason == "total_timeout"

    scenario(
        test,
        Reply(text="x" * 400, chunk_chars=1, chunk_delay_s=0.05),
        total_timeout_s=0.5,
        chunk_timeout_s=5.0,
    )


def test_total_timeout_bounds_retries() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "total_timeout"

    scenario(
        test,
        default=Reply(stall_headers_s=STALL),
        first_token_timeout_s=5.0,
        total_timeout_s=0.5,
        max_retries=5,
    )


def test_non_streamed_call_is_bounded_by_the_total_timeout() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        with pytest.raises(LlmUnavailable) as info:
            await client.complete(MESSAGES)
        assert info.value.reason == "total_timeout"

    scenario(test, Reply(stall_first_s=STALL), total_timeout_s=0.5, first_token_timeout_s=0.1)


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full: new connects hang (SYNs are dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # enough to fill a backlog of 0 (Linux keeps 1) and its SYN queue
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_connect_timeout() -> None:
    async def main() -> None:
        with unaccepting_listener() as port:
            options = fast_options(
                f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.3, max_retries=1
            )
            async with LlmClient(options) as client:
                error = await asyncio.wait_for(failure(client), TIMEOUT)
        assert error.reason == "connect_timeout" and error.attempts == 2

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_connection_refused_is_retried_then_fails() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # bound, never listening: connects are refused
            async with LlmClient(fast_options(f"http://127.0.0.1:{port}/v1")) as client:
                error = await asyncio.wait_for(failure(client), TIMEOUT)
                assert error.reason == "connection" and error.attempts == 3
                assert client.stats()["retries"] == 2

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# ---------------------------------------------------------------------------------------------
# Retries


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_retryable_statuses_are_retried(status: int) -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        _, done = await collect(client)
        assert done.text == "ok" and done.attempts == 3 and len(fake.requests) == 3
        assert client.stats()["retries"] == 2

    scenario(test, Reply(status=status), Reply(status=status), Reply(text="ok"))


def test_backoff_is_exponential_with_full_jitter() -> None:
    sleep = RecordingSleep()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "http_status" and error.status == 500
        assert len(fake.requests) == 5
        # rand() = 1.0 gives each bound: base * 2**n, capped by backoff_max_s.
        assert sleep.delays == [0.1, 0.2, 0.4, 0.5]

    scenario(
        test,
        default=Reply(status=500),
        client_kwargs={"sleep": sleep, "rand": lambda: 1.0},
        max_retries=4,
        backoff_base_s=0.1,
        backoff_max_s=0.5,
    )


def test_retry_after_is_honoured() -> None:
    sleep = RecordingSleep()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        _, done = await collect(client)
        assert done.text == "ok"
        assert sleep.delays == [3.0]

    scenario(
        test,
        Reply(status=429, retry_after="3"),
        Reply(text="ok"),
        client_kwargs={"sleep": sleep},
    )


def test_retry_after_waits_for_real() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, done = await collect(client)
        assert done.text == "ok" and loop.time() - started >= 0.9

    scenario(test, Reply(status=503, retry_after="1"), Reply(text="ok"))


def test_retry_after_above_the_cap_is_not_waited_for() -> None:
    sleep = RecordingSleep()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "http_status" and error.status == 429
        assert len(fake.requests) == 1 and sleep.delays == []

    scenario(
        test,
        Reply(status=429, retry_after="120"),
        client_kwargs={"sleep": sleep},
        retry_after_max_s=5.0,
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(status: int) -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "http_status" and error.status == status
        assert len(fake.requests) == 1 and client.stats()["retries"] == 0
        assert f"status {status}" in str(error)  # the provider's message is kept

    scenario(test, Reply(status=status), Reply(text="never asked for"))


def test_quota_429_is_not_retried() -> None:
    quota = {"error": {"message": "quota", "type": "insufficient_quota", "code": None}}

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "quota" and error.status == 429 and len(fake.requests) == 1

    scenario(test, Reply(status=429, retry_after="1", error_body=quota))


# ---------------------------------------------------------------------------------------------
# Circuit breaker and fallback


def test_breaker_opens_skips_the_endpoint_then_half_open_trial_closes_it() -> None:
    clock = FakeClock()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        label = client.options.endpoint.label
        for _ in range(2):
            assert (await failure(client)).reason == "http_status"
        assert client.stats()["endpoints"][label]["state"] == "open"
        error = await failure(client)
        assert error.reason == "breaker_open" and error.attempts == 0
        assert len(fake.requests) == 2  # the open breaker sent nothing
        clock.now += 30.0
        assert client.stats()["endpoints"][label]["state"] == "half_open"
        # The trial stalls; meanwhile a second call is refused without a request.
        fake.script(Reply(text="trial ok", stall_first_s=STALL))
        trial = asyncio.ensure_future(collect(client))
        while len(fake.requests) < 3:
            await asyncio.sleep(0.01)
        assert (await failure(client)).reason == "breaker_open"
        assert len(fake.requests) == 3
        fake.release()
        _, done = await trial
        assert done.text == "trial ok"
        assert client.stats()["endpoints"][label]["state"] == "closed"
        fake.script(Reply(text="again"))
        assert (await collect(client))[1].text == "again"

    scenario(
        test,
        Reply(status=500),
        Reply(status=500),
        client_kwargs={"clock": clock},
        max_retries=0,
        breaker_failures=2,
        breaker_cooldown_s=30.0,
    )


def test_failed_half_open_trial_opens_again() -> None:
    clock = FakeClock()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        label = client.options.endpoint.label
        await failure(client)
        clock.now += 10.0
        assert (await failure(client)).reason == "http_status"  # the trial failed
        stats = client.stats()["endpoints"][label]
        assert stats["state"] == "open" and stats["opened"] == 2
        assert (await failure(client)).reason == "breaker_open"

    scenario(
        test,
        default=Reply(status=503),
        client_kwargs={"clock": clock},
        max_retries=0,
        breaker_failures=1,
        breaker_cooldown_s=10.0,
    )


def test_retries_stop_when_the_breaker_opens_and_the_real_reason_is_kept() -> None:
    sleep = RecordingSleep()

    async def test(fake: FakeLlm, client: LlmClient) -> None:
        error = await failure(client)
        assert error.reason == "http_status" and error.status == 502
        assert len(fake.requests) == 2 and len(sleep.delays) == 1
        assert (await failure(client)).reason == "breaker_open"

    scenario(
        test,
        default=Reply(status=502),
        client_kwargs={"sleep": sleep},
        max_retries=5,
        breaker_failures=2,
    )


def test_request_errors_do_not_open_the_breaker() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        for _ in range(3):
            assert (await failure(client)).status == 400
        assert client.stats()["endpoints"][client.options.endpoint.label]["state"] == "closed"

    scenario(test, default=Reply(status=400), max_retries=0, breaker_failures=1)


def test_fallback_endpoint_is_used_when_the_primary_fails_or_is_open() -> None:
    async def test(primary: FakeLlm, client: LlmClient) -> None:
        async with FakeLlm() as backup:
            backup.default = Reply(text="from backup")
            options = fast_options(
                primary.url,
                fallbacks=(Endpoint(base_url=backup.url, model="backup-model", name="backup"),),
                max_retries=1,
                breaker_failures=2,
            )
            async with LlmClient(options) as with_fallback:
                _, done = await collect(with_fallback)
                assert done.text == "from backup" and done.endpoint == "backup"
                assert done.model == "backup-model" and done.attempts == 3
                assert len(primary.requests) == 2 and len(backup.requests) == 1
                assert backup.requests[0]["model"] == "backup-model"
                assert "Authorization" not in backup.headers[0]  # no key for that endpoint
                # The primary's breaker is open now: the next call goes straight to the backup.
                _, done = await collect(with_fallback)
                assert done.endpoint == "backup" and len(primary.requests) == 2
                stats = with_fallback.stats()
                assert stats["endpoints"][options.endpoint.label]["state"] == "open"
                assert stats["fallback_attempts"] == 2 and stats["succeeded"] == 2

    scenario(test, default=Reply(status=500))


def test_all_endpoints_failing_is_unavailable() -> None:
    async def test(primary: FakeLlm, client: LlmClient) -> None:
        async with FakeLlm() as backup:
            backup.default = Reply(status=401)
            options = fast_options(
                primary.url,
                fallbacks=(Endpoint(base_url=backup.url, model="m", name="backup"),),
                max_retries=0,
            )
            async with LlmClient(options) as with_fallback:
                error = await failure(with_fallback)
                assert error.endpoint == "backup" and error.status == 401
                assert with_fallback.stats()["failures"]["http_status"] == 1

    scenario(test, default=Reply(status=500))


# ---------------------------------------------------------------------------------------------
# Concurrency bound


def test_concurrency_is_bounded() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        results = await asyncio.gather(*(collect(client) for _ in range(6)))
        assert all(done.text == "abcdefgh" for _, done in results)
        assert fake.max_in_flight == 2
        assert client.stats()["waiting"] == 0 and client.stats()["in_flight"] == 0

    scenario(
        test,
        default=Reply(text="abcdefgh", chunk_chars=2, chunk_delay_s=0.05),
        max_concurrency=2,
        queue_timeout_s=TIMEOUT,
    )


def test_waiting_too_long_for_a_slot_fails_fast() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        first = asyncio.ensure_future(collect(client))
        while not fake.requests:
            await asyncio.sleep(0.01)
        error = await failure(client)
        assert error.reason == "busy" and len(fake.requests) == 1
        fake.release()
        _, done = await first
        assert done.text == "first"
        assert client.stats()["failures"]["busy"] == 1

    scenario(test, Reply(text="first", stall_first_s=STALL), max_concurrency=1, queue_timeout_s=0.2)


def test_no_waiting_room_fails_at_once() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        first = asyncio.ensure_future(collect(client))
        while not fake.requests:
            await asyncio.sleep(0.01)
        error = await failure(client)
        assert error.reason == "busy" and "waiting" in str(error)
        fake.release()
        await first

    scenario(
        test,
        Reply(text="first", stall_first_s=STALL),
        max_concurrency=1,
        max_waiting=0,
        queue_timeout_s=TIMEOUT,
    )


def test_events_are_the_public_types() -> None:
    async def test(fake: FakeLlm, client: LlmClient) -> None:
        events: list[LlmEvent] = []
        async with contextlib.aclosing(client.stream(MESSAGES)) as stream:
            events = [e async for e in stream]
        assert isinstance(events[-1], Done)
        assert all(isinstance(e, Delta) for e in events[:-1])

    scenario(test)
