"""The bot inside a node: its overhead on top of the LLM provider, cache hits, knowledge-base
answers with a 10,000-entry knowledge base, and answers while the provider fails 10% of calls.

    python -m bench --only bot

Everything runs in one process on one uvloop event loop: a :class:`kefu.node.Node` (store,
routing, bot) and the fake OpenAI-protocol provider of the tests (``tests/fake_llm.py``, an
aiohttp server on 127.0.0.1) streaming each answer in 4 chunks over a fixed 50 ms (20 ms to
the first chunk, 10 ms between chunks). A visitor message is :meth:`Node.send_message`, what
``POST /v1/chat/send`` does after parsing: the message is stored, the bot decides, the answer
is stored; timed from the call to its return. Each message is the first of a new
conversation, so every sample does the same work.

- **bot overhead**: an LLM-zone question (cache off), minus the provider's own time for it
  (measured inside the provider, from the request read to the end of the stream): what the
  node adds (storing both messages, retrieval, the prompt, the HTTP client, SSE parsing,
  the deltas) to what the model costs.
- **cache hit**: the same question in a new conversation after one LLM answer; no provider.
- **KB answer**: BANKING77's 10,003 training phrasings as entries (as ``bench_kb``, which
  times the search and the decision alone), its test questions as visitors, every hit
  answered from the knowledge base (``answer_threshold`` 0): the whole message in the node.
- **provider failing 10%**: a seeded tenth of the provider's calls fail, a third each as
  HTTP 500, HTTP 429 (``Retry-After: 0``) and a stream cut after its first chunk, with the
  default retries (2). Shares of the visitor messages: answered (KB, LLM or the KB fallback,
  complete), handed off (a cut after text reached the visitor counts as handed off: its
  partial answer is kept, and a human follows), and errors (an exception, or neither an answer
  nor a handoff). Errors must be 0.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from typing import Any

import uvloop
from aiohttp import web

from bench._harness import Row, percentiles
from bench.bench_kb import _rows
from kefu.bot.kb import Entry, KnowledgeBase, load_knowledge_base, sample_kb_path
from kefu.config import BotConfig, CacheConfig, Config, LlmConfig, WsConfig
from kefu.node import Node
from tests.fake_llm import FakeLlm, Reply

ANSWER = "您好，运费满99元包邮，不满99元收取10元运费，偏远地区另计。"  # 32 characters
PROVIDER_MS = 50  # 20 ms to the first chunk, then 3 chunks 10 ms apart


def _reply() -> Reply:
    return Reply(text=ANSWER, chunk_chars=8, stall_first_s=0.020, chunk_delay_s=0.010)


class TimedFake(FakeLlm):
    """The fake provider, recording how long it took over each request (``durations``)."""

    def __init__(self) -> None:
        super().__init__()
        self.durations: list[float] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            return await super()._handle(request)
        finally:
            self.durations.append(time.perf_counter() - t0)


def _questions() -> list[str]:
    """LLM-zone questions for the sample shop knowledge base: each phrasing with a polite
    prefix, so it scores below 1 (the answer threshold below is 0.99) but finds its entry."""
    kb = load_knowledge_base([sample_kb_path()])
    words = [w.lower() for w in BotConfig().handoff_keywords]
    out = []
    for q in (f"请问{q}" for e in kb.entries for q in e.questions):
        hits = kb.search(q, 1)
        llm_zone = hits and hits[0].score < 0.99 and kb.match_rule(q) is None
        if llm_zone and not any(w in q.lower() for w in words):
            out.append(q)
    return out


def _config(data_dir: str, llm_url: str | None, *, cache: bool, **bot: Any) -> Config:
    llm = LlmConfig(
        base_url=llm_url,
        model="fake" if llm_url else None,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    return Config(
        data_dir=data_dir,
        ws=WsConfig(host="127.0.0.1", port=0),
        bot=BotConfig(
            kb=[sample_kb_path()],
            kb_reload_interval_s=60,
            answer_threshold=bot.pop("answer_threshold", 0.99),
            handoff_threshold=bot.pop("handoff_threshold", 0.0),
            llm=llm,
            cache=CacheConfig(max_entries=1024 if cache else 0),
            **bot,
        ),
    )


async def _ask(node: Node, text: str) -> tuple[float, Any]:
    conv, *_ = await node.create_chat()
    t0 = time.perf_counter()
    result = await node.send_message(conv, text)
    return time.perf_counter() - t0, result


async def _overhead_and_cache(n: int) -> list[Row]:
    rows: list[Row] = []
    questions = _questions()
    async with TimedFake() as fake:
        fake.default = _reply()
        with tempfile.TemporaryDirectory() as tmp:
            node = Node(_config(tmp, fake.url, cache=False))
            await node.start()
            try:
                for q in questions[:5]:  # warm up: connections, first allocations
                    await _ask(node, q)
                totals, provider, overhead = [], [], []
                for i in range(n):
                    q = questions[i % len(questions)]
                    before = len(fake.durations)
                    took, result = await _ask(node, q)
                    assert result.replies and result.replies[0].meta["source"] == "llm", result
                    assert len(fake.durations) == before + 1
                    totals.append(took)
                    provider.append(fake.durations[-1])
                    overhead.append(took - fake.durations[-1])
            finally:
                await node.stop()
        p50, p99 = (v / 1e3 for v in percentiles(overhead))
        t50, t99 = (v / 1e3 for v in percentiles(totals))
        f50, f99 = (v / 1e3 for v in percentiles(provider))
        case = f"bot overhead over the provider (fake, {PROVIDER_MS} ms streamed in 4 chunks)"
        extra: dict[str, float | str] = {
            "visitor_p50_ms": t50,
            "visitor_p99_ms": t99,
            "provider_p50_ms": f50,
            "provider_p99_ms": f99,
            "n": float(n),
        }
        rows.append(Row(case, "kefu p50", p50, "ms", higher_is_better=False, extra=extra))
        rows.append(Row(case, "kefu p99", p99, "ms", higher_is_better=False))

        with tempfile.TemporaryDirectory() as tmp:
            node = Node(_config(tmp, fake.url, cache=True))
            await node.start()
            try:
                q = questions[0]
                await _ask(node, q)  # the one LLM answer, cached
                calls = len(fake.requests)
                samples = []
                for _ in range(n):
                    took, result = await _ask(node, q)
                    assert result.replies[0].meta["source"] == "cache", result
                    samples.append(took)
                assert len(fake.requests) == calls  # no provider call on a hit
            finally:
                await node.stop()
        p50, p99 = (v / 1e3 for v in percentiles(samples))
        case = "cache hit through the node (visitor message to stored answer)"
        rows.append(Row(case, "kefu p50", p50, "ms", higher_is_better=False))
        rows.append(Row(case, "kefu p99", p99, "ms", higher_is_better=False))
    return rows


async def _kb_answers(quick: bool) -> list[Row]:
    train, test = _rows("train.csv"), _rows("test.csv")
    if quick:
        test = test[:300]
    kb = KnowledgeBase(
        [Entry(id=f"e{i}", questions=(q,), answer=f"answer {i}") for i, q in enumerate(train)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, None, cache=False, answer_threshold=0.0)
        node = Node(cfg)
        await node.start()
        node._kb = kb  # the 10,003-entry knowledge base instead of the sample
        try:
            samples = []
            for q in test:
                took, result = await _ask(node, q)
                if result.replies and result.replies[0].meta["source"] == "kb":
                    samples.append(took)
        finally:
            await node.stop()
    p50, p99 = (v / 1e3 for v in percentiles(samples))
    case = f"kb answer through the node, {len(kb):,} entries"
    extra: dict[str, float | str] = {"answered": float(len(samples)), "asked": float(len(test))}
    rows = [Row(case, "kefu p50", p50, "ms", higher_is_better=False, extra=extra)]
    rows.append(Row(case, "kefu p99", p99, "ms", higher_is_better=False))
    return rows


def _failing_script(calls: int, rng: random.Random) -> list[Reply]:
    replies = []
    for _ in range(calls):
        if rng.random() >= 0.10:
            replies.append(_reply())
            continue
        kind = rng.randrange(3)
        if kind == 0:
            replies.append(Reply(status=500))
        elif kind == 1:
            replies.append(Reply(status=429, retry_after="0"))
        else:
            cut = _reply()
            cut.cut_after_chunks = 1
            replies.append(cut)
    return replies


async def _failing(n: int) -> list[Row]:
    questions = _questions()
    rng = random.Random(4)
    answered = handed_off = errors = 0
    sources: dict[str, int] = {}
    async with TimedFake() as fake:
        # Every call, retries included, takes the next scripted reply: a tenth of them fail.
        fake.script(*_failing_script(3 * n, rng))
        with tempfile.TemporaryDirectory() as tmp:
            node = Node(_config(tmp, fake.url, cache=False))
            await node.start()
            try:
                for i in range(n):
                    try:
                        _took, result = await _ask(node, questions[i % len(questions)])
                    except Exception:  # counted: the share must be 0
                        errors += 1
                        continue
                    reply = result.replies[0] if result.replies else None
                    if result.status != "bot":
                        handed_off += 1
                    elif reply is not None and not reply.meta.get("truncated"):
                        answered += 1
                        source = str(reply.meta["source"])
                        sources[source] = sources.get(source, 0) + 1
                    else:
                        errors += 1
            finally:
                await node.stop()
        calls = len(fake.requests)
    case = "visitor messages while the provider fails 10% of calls (500, 429, cut)"
    extra: dict[str, float | str] = {"messages": float(n), "provider_calls": float(calls)}
    extra.update({f"by_{k}": float(v) for k, v in sorted(sources.items())})
    return [
        Row(case, "answered %", 100 * answered / n, "%", extra=extra),
        Row(case, "handed off %", 100 * handed_off / n, "%"),
        Row(case, "errors or silence %", 100 * errors / n, "%"),
    ]


def run(quick: bool) -> list[Row]:
    n = 100 if quick else 500

    async def main() -> list[Row]:
        rows = await _overhead_and_cache(n)
        rows += await _kb_answers(quick)
        rows += await _failing(200 if quick else 1000)
        return rows

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
