"""The bot's decisions (kefu.bot.policy) over a stand-in knowledge base and the fake provider:
every branch, and every kind of model failure ends in an answer or a handoff."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from kefu.bot.llm import Endpoint, LlmClient, LlmOptions
from kefu.bot.policy import BotPolicy
from kefu.config import BotConfig, CacheConfig, LlmConfig
from tests import aio
from tests.fake_llm import FakeLlm, Reply


class Hit(msgspec.Struct, frozen=True):
    id: str
    score: float
    question: str
    answer: str


class Rule(msgspec.Struct, frozen=True):
    reply: str | None = None
    action: str | None = None
    group: str | None = None


class FakeKb:
    """Scores fixed per query text; rules keyed by a substring."""

    def __init__(self, scores: dict[str, float], rules: dict[str, Rule] | None = None) -> None:
        self.scores = scores
        self.rules = rules or {}
        self.version = 1

    def search(self, text: str, k: int) -> list[Hit]:
        score = self.scores.get(text, 0.0)
        return [Hit(f"e{i}", score - i * 0.01, f"q{i}", f"answer {i} to {text}") for i in range(k)]

    def match_rule(self, text: str) -> Rule | None:
        for needle, rule in self.rules.items():
            if needle in text:
                return rule
        return None


def run(test: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    aio.run(test, timeout)


CONFIG = BotConfig(answer_threshold=0.6, handoff_threshold=0.3, top_k=2)


def policy(kb: FakeKb, llm: LlmClient | None = None, **kw: Any) -> BotPolicy:
    return BotPolicy(msgspec.structs.replace(CONFIG, **kw), lambda: kb, llm, model="m")


def client(fake: FakeLlm, **kw: Any) -> LlmClient:
    opts = LlmOptions(
        endpoint=Endpoint(base_url=fake.url, model="m"),
        first_token_timeout_s=1.0,
        chunk_timeout_s=1.0,
        total_timeout_s=5.0,
        max_retries=0,
        **kw,
    )
    return LlmClient(opts)


def test_rules_keywords_and_thresholds_without_a_model() -> None:
    async def body() -> None:
        kb = FakeKb(
            {"high": 0.9, "middle": 0.5, "low": 0.1},
            {
                "invoice": Rule(reply="sent within 24h"),
                "angry": Rule(action="handoff"),
                "bye": Rule(action="close"),
                "vip": Rule(action="route", group="vip"),
            },
        )
        p = policy(kb)
        assert (await p.decide(1, "I want a HUMAN please")).handoff.reason == "requested"
        assert (await p.decide(1, "我要转人工")).handoff.reason == "requested"
        turn = await p.decide(1, "my invoice?")
        assert turn.answer.text == "sent within 24h" and turn.answer.source == "rule"
        assert (await p.decide(1, "angry")).handoff.reason == "rule"
        assert (await p.decide(1, "bye")).close
        assert (await p.decide(1, "vip")).handoff.group == "vip"
        turn = await p.decide(1, "high")
        assert turn.answer.source == "kb" and turn.answer.entry_id == "e0"
        assert turn.answer.score == 0.9
        assert (await p.decide(1, "low")).handoff.reason == "no_answer"
        assert (await p.decide(1, "middle")).handoff.reason == "no_answer"  # no model
        assert abs(BotPolicy(CONFIG, lambda: None).fallback_threshold - 0.45) < 1e-9
        assert (await BotPolicy(CONFIG, lambda: None).decide(1, "high")).handoff is not None

    run(body)


def test_middle_scores_ask_the_model_and_stream() -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            fake.script(Reply(text="Returns are free within 7 days.", chunk_chars=5))
            llm = client(fake)
            p = policy(FakeKb({"middle": 0.5}), llm)
            pieces: list[str] = []
            turn = await p.decide(7, "middle", pieces.append)
            assert turn.answer.source == "llm" and turn.handoff is None
            assert turn.answer.text == "Returns are free within 7 days."
            assert "".join(pieces) == turn.answer.text and len(pieces) > 1
            system = fake.messages[0][0]
            assert system["role"] == "system" and "[e0]" in system["content"]
            # The same question in another conversation is answered from the cache.
            turn = await p.decide(8, "middle")
            assert turn.answer.source == "cache" and len(fake.requests) == 1
            await llm.close()

    run(body)


def test_follow_up_reaches_the_model_with_the_earlier_turn() -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            fake.script(Reply(text="退货请在7天内申请。"))
            llm = client(fake)
            p = policy(FakeKb({"运费多少": 0.9, "那退货呢": 0.5}), llm)
            assert (await p.decide(3, "运费多少")).answer.source == "kb"
            turn = await p.decide(3, "那退货呢")
            assert turn.answer.source == "llm"
            contents = [m["content"] for m in fake.messages[0]]
            assert "运费多少" in contents and contents[-1] == "那退货呢"
            await llm.close()

    run(body)


def test_model_failures_end_in_an_answer_or_a_handoff() -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            llm = client(fake, breaker_failures=100)  # each failure must reach the provider
            kb = FakeKb({"good-ish": 0.5, "weak": 0.35})
            p = policy(kb, llm, cache=CacheConfig(max_entries=0))
            failures = [
                Reply(status=500),
                Reply(status=429, retry_after="0"),
                Reply(status=401),
                Reply(raw_body=b"garbage"),
                Reply(stall_first_s=3.0),  # past first_token_timeout_s
                Reply(stream_error_after=0),
            ]
            for failure in failures:
                fake.script(failure)
                turn = await p.decide(5, "good-ish")  # 0.5 >= 0.45: the KB answer
                assert turn.answer is not None and turn.answer.source == "fallback", failure
                fake.script(failure)
                turn = await p.decide(5, "weak")  # 0.35 < 0.45: humans
                assert turn.handoff is not None and turn.handoff.reason == "llm_unavailable"
            # A stream cut after text reached the visitor: that text is kept, then humans.
            fake.script(Reply(text="first part and more", chunk_chars=5, cut_after_chunks=2))
            pieces: list[str] = []
            turn = await p.decide(6, "weak", pieces.append)
            assert turn.answer.truncated and turn.answer.text == "".join(pieces) != ""
            assert turn.handoff.reason == "llm_unavailable"
            await llm.close()

    run(body)


def test_open_breaker_hands_off_without_calling() -> None:
    async def body() -> None:
        async with FakeLlm() as fake:
            llm = client(fake, breaker_failures=2, breaker_cooldown_s=60)
            p = policy(FakeKb({"weak": 0.35}), llm, cache=CacheConfig(max_entries=0))
            fake.script(Reply(status=500), Reply(status=500))
            for _ in range(2):
                assert (await p.decide(1, "weak")).handoff.reason == "llm_unavailable"
            turn = await p.decide(1, "weak")
            assert turn.handoff.reason == "llm_unavailable" and len(fake.requests) == 2
            await llm.close()

    run(body)


def test_contexts_are_bounded() -> None:
    p = BotPolicy(CONFIG, lambda: None, max_contexts=3)
    for conv in range(5):
        p.context(conv).record("q", "a")
    assert p.stats()["contexts"] == 3 and p.contexts_dropped == 2
    assert p.memory_of(4) > 0 and p.memory_of(0) == 0
    p.forget(4)
    assert p.memory_of(4) == 0


def test_llm_config_maps_to_a_valid_client() -> None:
    cfg = LlmConfig(base_url="http://127.0.0.1:1/v1", model="m")
    assert cfg.timeout_s > 0
