"""A conversation's context window for the LLM: the system prompt, the knowledge-base entries
retrieved for the question, and as many earlier turns as a token budget allows.

Use::

    estimator = TokenEstimator()                   # one per model, shared by conversations
    context = ConversationContext(system_prompt, estimator)
    messages = context.build_messages("那退货呢", hits)   # hits: .id .question .answer
    done = ...                                      # the LLM call (kefu.bot.llm)
    context.record("那退货呢", done.text)            # the whole turn, once answered
    if done.usage is not None:
        estimator.observe(messages, done.usage.prompt_tokens)

Decisions and bounds
--------------------
- **One ring per conversation** (``_core.ringbuf.RingBuffer`` with ``pinned_head``): the
  system prompt is its pinned first entry, then at most ``max_turns`` turns. A turn is a user
  message with the answer it got, stored together, so trimming never splits a question from its
  answer; a question the bot did not answer is not recorded (a lone user message would break
  the user/assistant alternation some chat templates require). The ring evicts the oldest turn
  when full.
- **Messages**: one ``system`` message first (the prompt, then the knowledge-base entries with
  their ids), then the kept turns oldest first, then the question. The entries go into the one
  system message because several chat templates (Gemma, older Mistral) refuse a system
  message anywhere but first.
- **Token budget** (``token_budget``, prompt tokens): the system prompt and the question always
  go; knowledge-base entries go in rank order while they fit (the first always goes); then
  whole turns, newest first, until the next one would pass the budget: older turns are dropped
  first, and a turn is never cut. Texts are stored cut to ``max_message_chars`` and entries sent
  cut to ``max_passage_chars``, so one message cannot take the whole budget.
- **Offline token estimate**: characters weighted by kind: CJK ideographs and kana
  ``cjk_weight`` (1.0: one token per character in cl100k, a little less in Qwen's and
  DeepSeek's vocabularies), ASCII ``ascii_weight`` (0.3: about 3.3 characters per token of
  English), other characters ``other_weight`` (0.6), plus ``message_overhead`` tokens per
  message and ``reply_priming`` per request (OpenAI's chat format). The sum is multiplied by a
  ratio calibrated from the server's ``usage.prompt_tokens``: each observation moves the ratio
  ``alpha`` of the way toward ``prompt_tokens / estimate`` (an exponentially smoothed ratio),
  clamped to ``[min_ratio, max_ratio]`` so one odd answer cannot make the budget useless.
- **Memory** (:attr:`ConversationContext.bytes_held`): the turns' strings as
  ``sys.getsizeof`` counts them, plus each turn's object and ring slot, plus the context's own
  objects; kept up to date on every append and eviction, for per-session accounting. The system
  prompt is shared by every conversation and not counted.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from typing import Any, Final, Protocol

from kefu._core import ringbuf
from kefu.bot.llm import ChatMessage

__all__ = [
    "KB_HEADER",
    "BuildReport",
    "ConversationContext",
    "KbPassage",
    "TokenEstimator",
]

KB_HEADER: Final = "Knowledge base entries (answer from these; each starts with its id):"
"""The line that introduces the knowledge-base entries in the system message."""

# Han ideographs (with extensions and compatibility forms), kana, 々 and 〇, as in kefu.text,
# plus CJK punctuation and fullwidth forms, which tokenizers also spend about a token on.
_CJK: Final = re.compile(
    "[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    "\U00020000-\U000323af]"
)


class KbPassage(Protocol):
    """A retrieved knowledge-base entry, as the KB's search hits carry it."""

    @property
    def id(self) -> str: ...
    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...


class TokenEstimator:
    """Estimates prompt tokens offline, calibrated from ``usage.prompt_tokens``; see the module
    doc. One per model: the ratio describes that model's tokenizer."""

    __slots__ = (
        "alpha",
        "ascii_weight",
        "cjk_weight",
        "max_ratio",
        "message_overhead",
        "min_ratio",
        "other_weight",
        "ratio",
        "reply_priming",
        "samples",
    )

    def __init__(
        self,
        *,
        cjk_weight: float = 1.0,
        ascii_weight: float = 0.3,
        other_weight: float = 0.6,
        message_overhead: int = 4,
        reply_priming: int = 3,
        alpha: float = 0.2,
        min_ratio: float = 0.25,
        max_ratio: float = 4.0,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 < min_ratio <= 1.0 <= max_ratio:
            raise ValueError(f"need 0 < min_ratio <= 1 <= max_ratio, got {min_ratio}, {max_ratio}")
        self.cjk_weight = cjk_weight
        self.ascii_weight = ascii_weight
        self.other_weight = other_weight
        self.message_overhead = message_overhead
        self.reply_priming = reply_priming
        self.alpha = alpha
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self.ratio = 1.0
        self.samples = 0

    def units(self, text: str) -> float:
        """The uncalibrated token count of ``text`` (no message overhead)."""
        if text.isascii():
            return len(text) * self.ascii_weight
        ascii_chars = len(text.encode("ascii", "ignore"))
        cjk = len(_CJK.findall(text))
        other = len(text) - ascii_chars - cjk
        return cjk * self.cjk_weight + ascii_chars * self.ascii_weight + other * self.other_weight

    def message_units(self, text: str) -> float:
        """:meth:`units` of one message's content plus the per-message overhead."""
        return self.units(text) + self.message_overhead

    def tokens(self, units: float) -> int:
        """Calibrated tokens of an amount of units."""
        return math.ceil(units * self.ratio)

    def estimate(self, messages: Sequence[ChatMessage]) -> int:
        """Calibrated prompt tokens of a whole request."""
        return self.tokens(self._request_units(messages))

    def observe(self, messages: Sequence[ChatMessage], prompt_tokens: int) -> None:
        """Move the ratio toward what the server counted for ``messages``."""
        units = self._request_units(messages)
        if prompt_tokens <= 0 or units <= 0:
            return
        sample = min(self.max_ratio, max(self.min_ratio, prompt_tokens / units))
        ratio = self.ratio + self.alpha * (sample - self.ratio)
        self.ratio = min(self.max_ratio, max(self.min_ratio, ratio))
        self.samples += 1

    def _request_units(self, messages: Sequence[ChatMessage]) -> float:
        return self.reply_priming + sum(self.message_units(m.content) for m in messages)


class _Turn:
    """A question and the answer it got, with its cached size."""

    __slots__ = ("answer", "nbytes", "units", "user")

    def __init__(self, user: str, answer: str, units: float) -> None:
        self.user = user
        self.answer = answer
        self.units = units
        self.nbytes = sys.getsizeof(user) + sys.getsizeof(answer) + _TURN_BYTES


# A turn object with its slot in the ring (8 bytes per pointer).
_TURN_BYTES: Final = sys.getsizeof(_Turn.__new__(_Turn)) + 8


class BuildReport:
    """What the last :meth:`ConversationContext.build_messages` kept and dropped."""

    __slots__ = (
        "estimated_tokens",
        "passages_dropped",
        "passages_sent",
        "turns_dropped",
        "turns_sent",
    )

    def __init__(self) -> None:
        self.turns_sent = 0
        self.turns_dropped = 0
        self.passages_sent = 0
        self.passages_dropped = 0
        self.estimated_tokens = 0


class ConversationContext:
    """The context window of one conversation; see the module doc for the rules."""

    __slots__ = (
        "_bytes",
        "_ring",
        "estimator",
        "last_build",
        "max_message_chars",
        "max_passage_chars",
        "token_budget",
    )

    def __init__(
        self,
        system_prompt: str,
        estimator: TokenEstimator,
        *,
        max_turns: int = 10,
        token_budget: int = 3000,
        max_message_chars: int = 4000,
        max_passage_chars: int = 1500,
    ) -> None:
        if not 1 <= max_turns <= 100:
            raise ValueError(f"max_turns must be in [1, 100], got {max_turns}")
        if not 64 <= token_budget <= 1_000_000:
            raise ValueError(f"token_budget must be in [64, 1000000], got {token_budget}")
        if max_message_chars < 1 or max_passage_chars < 1:
            raise ValueError("max_message_chars and max_passage_chars must be at least 1")
        self.estimator = estimator
        self.token_budget = token_budget
        self.max_message_chars = max_message_chars
        self.max_passage_chars = max_passage_chars
        self._ring: Any = ringbuf.RingBuffer(max_turns + 1, pinned_head=True)
        self._ring.append(system_prompt)
        self._bytes = _CONTEXT_BYTES
        self.last_build = BuildReport()

    @property
    def system_prompt(self) -> str:
        prompt: str = self._ring.pinned
        return prompt

    @property
    def max_turns(self) -> int:
        return int(self._ring.capacity) - 1

    def __len__(self) -> int:
        """The turns held."""
        return len(self._ring) - 1

    @property
    def bytes_held(self) -> int:
        """Memory this context holds (see the module doc), for per-session accounting."""
        return self._bytes

    @property
    def evicted(self) -> int:
        """Turns dropped because the ring was full."""
        return int(self._ring.evicted)

    def turns(self) -> list[tuple[str, str]]:
        """The turns held, oldest first, as ``(user, answer)``."""
        return [(t.user, t.answer) for t in self._ring.to_list()[1:]]

    def record(self, user: str, answer: str) -> None:
        """Keep an answered turn; the oldest one goes when ``max_turns`` are held."""
        user = user[: self.max_message_chars]
        answer = answer[: self.max_message_chars]
        estimator = self.estimator
        turn = _Turn(user, answer, estimator.message_units(user) + estimator.message_units(answer))
        ring = self._ring
        if len(ring) == ring.capacity:
            self._bytes -= ring[1].nbytes  # the oldest turn, which this append evicts
        ring.append(turn)
        self._bytes += turn.nbytes

    def set_system_prompt(self, system_prompt: str) -> None:
        """Replace the pinned prompt (a configuration reload), keeping the turns."""
        ring = self._ring
        turns = ring.to_list()[1:]
        ring.clear()
        ring.append(system_prompt)
        for turn in turns:
            ring.append(turn)

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        prompt = self.system_prompt
        self._ring.clear()
        self._ring.append(prompt)
        self._bytes = _CONTEXT_BYTES

    def build_messages(
        self, question: str, passages: Sequence[KbPassage] = ()
    ) -> list[ChatMessage]:
        """The messages for the model: system (prompt + entries), kept turns, the question."""
        estimator = self.estimator
        report = BuildReport()
        question = question[: self.max_message_chars]
        system = self.system_prompt
        units = (
            estimator.reply_priming
            + estimator.message_units(system)
            + estimator.message_units(question)
        )
        budget = self.token_budget
        blocks: list[str] = []
        for passage in passages:
            block = self._passage_block(passage)
            cost = estimator.units(block) + estimator.units("\n\n")
            if blocks and estimator.tokens(units + cost) > budget:
                report.passages_dropped = len(passages) - len(blocks)
                break
            blocks.append(block)
            units += cost
        if blocks:
            system = f"{system}\n\n{KB_HEADER}\n\n" + "\n\n".join(blocks)
        kept: list[_Turn] = []
        turns = self._ring.to_list()[1:]
        for turn in reversed(turns):
            if estimator.tokens(units + turn.units) > budget:
                break
            kept.append(turn)
            units += turn.units
        messages = [ChatMessage("system", system)]
        for turn in reversed(kept):
            messages.append(ChatMessage("user", turn.user))
            messages.append(ChatMessage("assistant", turn.answer))
        messages.append(ChatMessage("user", question))
        report.turns_sent = len(kept)
        report.turns_dropped = len(turns) - len(kept)
        report.passages_sent = len(blocks)
        report.estimated_tokens = estimator.tokens(units)
        self.last_build = report
        return messages

    def _passage_block(self, passage: KbPassage) -> str:
        answer = passage.answer
        if len(answer) > self.max_passage_chars:
            answer = answer[: self.max_passage_chars] + "…"
        return f"[{passage.id}] Q: {passage.question}\nA: {answer}"


def _context_bytes() -> int:
    probe = ConversationContext.__new__(ConversationContext)
    ring = ringbuf.RingBuffer(2, pinned_head=True)
    return sys.getsizeof(probe) + sys.getsizeof(ring) + sys.getsizeof(BuildReport())


_CONTEXT_BYTES: Final = _context_bytes()
