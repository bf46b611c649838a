"""The context window: pinned system prompt, KB entries with ids, whole turns trimmed oldest
first to a token budget, the calibrated token estimate, memory accounting, and a follow-up
question that reaches the (fake) provider with the earlier turn.

The context runs over both ring buffer implementations (``ringbuf_impl``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
import uvloop

from kefu.bot import context as context_module
from kefu.bot.context import KB_HEADER, ConversationContext, TokenEstimator
from kefu.bot.llm import ChatMessage, Delta, Done, Endpoint, LlmClient, LlmOptions
from tests.fake_llm import FakeLlm, Reply

PROMPT = "You are the shop's assistant. Answer briefly."


@dataclass(frozen=True)
class Hit:
    id: str
    question: str
    answer: str


@pytest.fixture(autouse=True)
def ring_impl(ringbuf_impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(context_module, "ringbuf", ringbuf_impl)
    yield


def make(**kwargs: object) -> ConversationContext:
    return ConversationContext(PROMPT, TokenEstimator(), **kwargs)  # type: ignore[arg-type]


def roles(messages: list[ChatMessage]) -> list[str]:
    return [m.role for m in messages]


def test_first_question_is_system_then_user() -> None:
    ctx = make()
    messages = ctx.build_messages("运费多少")
    assert messages == [ChatMessage("system", PROMPT), ChatMessage("user", "运费多少")]
    assert len(ctx) == 0 and ctx.last_build.turns_sent == 0


def test_kb_entries_go_into_the_system_message_with_their_ids() -> None:
    ctx = make(max_passage_chars=20)
    hits = [
        Hit("ship-fee", "运费多少", "满99元包邮，否则运费10元。"),
        Hit("returns", "怎么退货", "签收后7天内可无理由退货，" * 5),
    ]
    system = ctx.build_messages("运费多少", hits)[0]
    assert system.role == "system" and system.content.startswith(PROMPT)
    assert KB_HEADER in system.content
    first = system.content.index("[ship-fee] Q: 运费多少\nA: 满99元包邮")
    second = system.content.index("[returns] Q: 怎么退货\nA: ")
    assert first < second  # rank order
    assert system.content.endswith("…")  # the long answer was cut to max_passage_chars
    assert ctx.last_build.passages_sent == 2


def test_turns_come_whole_and_in_order() -> None:
    ctx = make()
    ctx.record("运费多少", "满99元包邮。")
    ctx.record("多久到", "一般2到3天。")
    messages = ctx.build_messages("那退货呢")
    assert roles(messages) == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m.content for m in messages[1:]] == [
        "运费多少",
        "满99元包邮。",
        "多久到",
        "一般2到3天。",
        "那退货呢",
    ]
    assert ctx.turns() == [("运费多少", "满99元包邮。"), ("多久到", "一般2到3天。")]


def test_ring_keeps_the_newest_turns_and_the_system_prompt() -> None:
    ctx = make(max_turns=3)
    for n in range(5):
        ctx.record(f"question {n}", f"answer {n}")
    assert len(ctx) == 3 and ctx.evicted == 2
    assert ctx.system_prompt == PROMPT
    assert [u for u, _ in ctx.turns()] == ["question 2", "question 3", "question 4"]
    fresh = make(max_turns=3)
    for n in range(2, 5):
        fresh.record(f"question {n}", f"answer {n}")
    assert ctx.bytes_held == fresh.bytes_held  # eviction gave the bytes back


def test_trimming_drops_whole_turns_oldest_first_and_keeps_the_system_prompt() -> None:
    estimator = TokenEstimator()
    turn = ("q" * 100, "a" * 100)  # 2 * (100 * 0.3 + 4) = 68 units per turn
    fixed = estimator.reply_priming + estimator.message_units(PROMPT)
    fixed += estimator.message_units("next?")
    budget = int(fixed + 68 * 3 + 10)  # room for three turns, not four
    ctx = ConversationContext(PROMPT, estimator, max_turns=10, token_budget=budget)
    for n in range(6):
        ctx.record(f"{n}" + turn[0][1:], f"{n}" + turn[1][1:])
    messages = ctx.build_messages("next?")
    assert messages[0] == ChatMessage("system", PROMPT)
    assert messages[-1] == ChatMessage("user", "next?")
    assert roles(messages) == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert [m.content[0] for m in messages[1:-1]] == ["3", "3", "4", "4", "5", "5"]
    report = ctx.last_build
    assert report.turns_sent == 3 and report.turns_dropped == 3
    assert report.estimated_tokens <= budget


def test_a_turn_that_does_not_fit_stops_older_ones_too() -> None:
    ctx = make(token_budget=300)
    ctx.record("old", "short")
    ctx.record("big " * 400, "answer")  # far over the budget on its own
    ctx.record("new", "short")
    messages = ctx.build_messages("now?")
    assert [m.content for m in messages[1:]] == ["new", "short", "now?"]


def test_budget_too_small_still_sends_prompt_question_and_the_best_entry() -> None:
    ctx = make(token_budget=64)
    ctx.record("运费多少", "满99元包邮。")
    hits = [Hit("a", "q" * 50, "x" * 400), Hit("b", "q", "y" * 400)]
    messages = ctx.build_messages("那退货呢" * 30, hits)
    assert roles(messages) == ["system", "user"]
    assert "[a]" in messages[0].content and "[b]" not in messages[0].content
    assert ctx.last_build.passages_dropped == 1 and ctx.last_build.turns_dropped == 1


def test_stored_texts_are_cut_to_max_message_chars() -> None:
    ctx = make(max_message_chars=10)
    ctx.record("u" * 50, "a" * 50)
    assert ctx.turns() == [("u" * 10, "a" * 10)]
    assert ctx.build_messages("q" * 50)[-1].content == "q" * 10


def test_token_estimate_weights_cjk_more_than_ascii() -> None:
    estimator = TokenEstimator()
    assert estimator.units("") == 0
    assert estimator.units("abcdefghij") == pytest.approx(3.0)
    assert estimator.units("运费多少") == pytest.approx(4.0)
    assert estimator.units("运费 is 10") == pytest.approx(2 + 6 * 0.3)
    assert estimator.units("Привет") == pytest.approx(6 * 0.6)
    messages = [ChatMessage("system", "abcdefghij"), ChatMessage("user", "运费多少")]
    assert estimator.estimate(messages) == 3 + 4 + 3 + 4 + 4


def test_calibration_moves_toward_the_server_count_and_stays_bounded() -> None:
    estimator = TokenEstimator(alpha=0.5)
    messages = [ChatMessage("user", "运费多少" * 10)]
    raw = estimator.estimate(messages)
    actual = raw * 2
    previous = raw
    for _ in range(12):
        estimator.observe(messages, actual)
        now = estimator.estimate(messages)
        assert previous <= now <= actual + 1
        previous = now
    assert estimator.estimate(messages) == pytest.approx(actual, rel=0.01)
    assert estimator.samples == 12
    for _ in range(40):
        estimator.observe(messages, actual * 1000)  # absurd numbers: the ratio is clamped
    assert estimator.ratio == pytest.approx(estimator.max_ratio)
    assert estimator.ratio <= estimator.max_ratio
    estimator.observe(messages, 0)  # no usage: ignored
    assert estimator.samples == 52


def test_calibration_changes_how_many_turns_fit() -> None:
    estimator = TokenEstimator()
    ctx = ConversationContext(PROMPT, estimator, token_budget=400)
    for n in range(8):
        ctx.record(f"question number {n} " * 3, f"answer number {n} " * 3)
    ctx.build_messages("next?")
    before = ctx.last_build.turns_sent
    messages = ctx.build_messages("next?")
    for _ in range(20):
        estimator.observe(messages, estimator.estimate(messages) * 3)
    ctx.build_messages("next?")
    assert 0 < ctx.last_build.turns_sent < before


def test_memory_grows_with_turns_and_is_bounded_by_max_turns() -> None:
    ctx = make(max_turns=4)
    empty = ctx.bytes_held
    assert empty > 0
    ctx.record("运费多少", "满99元包邮。")
    one = ctx.bytes_held
    assert one - empty >= len("运费多少".encode()) + len("满99元包邮。".encode())
    for n in range(20):
        ctx.record("x" * 1000, f"{n:04d}" + "y" * 996)
    full = ctx.bytes_held
    for n in range(20):
        ctx.record("x" * 1000, f"{n:04d}" + "y" * 996)
    assert ctx.bytes_held == full and full > 4 * 2000
    ctx.clear()
    assert ctx.bytes_held == empty and len(ctx) == 0 and ctx.system_prompt == PROMPT


def test_set_system_prompt_keeps_the_turns() -> None:
    ctx = make()
    ctx.record("a", "b")
    ctx.set_system_prompt("New prompt.")
    assert ctx.build_messages("c")[0].content == "New prompt."
    assert ctx.turns() == [("a", "b")]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        make(max_turns=0)
    with pytest.raises(ValueError):
        make(token_budget=10)
    with pytest.raises(ValueError):
        TokenEstimator(alpha=0)


def test_follow_up_reaches_the_provider_with_the_earlier_turn() -> None:
    async def main() -> None:
        async with FakeLlm() as fake:
            fake.script(Reply(text="运费10元，满99包邮。"), Reply(text="7天内可退货。"))
            options = LlmOptions(endpoint=Endpoint(base_url=fake.url, model="fake"))
            estimator = TokenEstimator()
            ctx = ConversationContext(PROMPT, estimator)
            hits = {
                "运费多少": [Hit("ship-fee", "运费多少", "满99元包邮，否则10元。")],
                "那退货呢": [Hit("returns", "怎么退货", "签收后7天内可退货。")],
            }
            async with LlmClient(options) as client:
                for question in ("运费多少", "那退货呢"):
                    messages = ctx.build_messages(question, hits[question])
                    text = ""
                    async with contextlib.aclosing(client.stream(messages)) as events:
                        async for event in events:
                            if isinstance(event, Delta):
                                text += event.text
                            else:
                                assert isinstance(event, Done) and event.usage is not None
                                estimator.observe(messages, event.usage.prompt_tokens)
                    ctx.record(question, text)
            first, second = fake.messages
            assert [m["role"] for m in first] == ["system", "user"]
            assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
            assert second[1] == {"role": "user", "content": "运费多少"}
            assert second[2] == {"role": "assistant", "content": "运费10元，满99包邮。"}
            assert second[3] == {"role": "user", "content": "那退货呢"}
            assert "[returns]" in second[0]["content"]
            assert "[ship-fee]" not in second[0]["content"]
            assert estimator.samples == 2 and estimator.ratio != 1.0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 20.0))
