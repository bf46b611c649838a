"""What the bot does with one visitor message: answer, hand off, or close.

For each visitor message while the bot owns the conversation, in this order:

1. **The visitor asks for a person** (a ``bot.handoff_keywords`` word, case-insensitive, as a
   substring: ``转人工``, ``人工``, ``human``, ...): hand off, reason ``requested``.
2. **A knowledge-base rule matches** (keyword or regex, checked before retrieval): its canned
   ``reply``, or its ``action`` (``handoff``, ``close``, ``route`` to a group).
3. **Retrieval** (``_core.tfidf`` over the entries' phrasings, best phrasing per entry):

   - top score >= ``answer_threshold``: the entry's answer, no LLM call;
   - top score < ``handoff_threshold``: hand off, reason ``no_answer``;
   - in between, with an LLM: the model gets the system prompt, the top ``bot.top_k`` entries
     (with their ids) and the conversation's earlier turns; its answer streams as deltas and
     is stored whole. Complete answers are cached (key: normalised question, KB version,
     retrieved ids, model, and a digest of the earlier turns, so a follow-up is never answered
     with the reply to the same words asked first); a cached answer skips the model;
   - in between without an LLM: hand off, reason ``no_answer``.

4. **The LLM fails** (timeout, HTTP error, breaker open, cut off, busy: every failure of
   :class:`~kefu.bot.llm.LlmUnavailable`): the best KB answer when its score is at least halfway
   between the two thresholds (:meth:`BotPolicy.fallback_threshold`), else hand off, reason
   ``llm_unavailable``. When the stream broke after text reached the visitor, that text is
   kept as the answer (``meta.truncated``) and the conversation is handed off as well: the
   visitor never waits on silence.

Which humans: the group of a handoff
-----------------------------------
Knowledge-base entries may name the agents' ``group`` for their topic (``group: sales``). A
handoff goes to that group as follows:

- The conversation's **topic** is the entry the bot retrieved last in it with confidence:
  the top hit of the latest visitor message whose top score was at least
  ``handoff_threshold`` (the score from which the entry is good enough to ground the model
  on). A later confident hit replaces it, even one without a group (the visitor moved on
  to a topic nobody in particular owns); a weak or empty search leaves it as it was.
- A handoff for the message being answered (``no_answer``, ``llm_unavailable``, a rule's
  ``handoff``, ``requested``) goes to the topic's group as it stands after that message's
  search: a middling question about an entry with a group goes to that group; a question
  the KB knows nothing about goes to the group of the earlier topic; ``转人工`` (which is
  not searched: its words would match entries about human service rather than the
  visitor's concern) goes to the group of what the visitor asked about before.
- A rule's ``route`` names its group itself, and wins.
- No topic, or a topic entry without a group: anyone (round robin, as without groups). A
  group nobody is in: anyone as well, rather than a queue nobody serves (:meth:`kefu.node.
  Node._handoff`). A group whose agents are all busy or away: the conversation waits in the
  queue for that group.

The topic of a conversation is kept while the bot owns it (forgotten at its handoff or
close), for at most ``max_contexts`` conversations, the least recently updated dropped first;
the group is the one the entry had when it was retrieved.

The policy is I/O-free apart from the model call; the node stores and sends what it decides.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, Protocol

import msgspec

from kefu.bot.cache import ResponseCache, cache_key
from kefu.bot.context import ConversationContext, KbPassage, TokenEstimator
from kefu.bot.llm import ChatModel, Delta, Done, LlmInterrupted, LlmUnavailable
from kefu.config import BotConfig

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "MAX_CONTEXTS",
    "Answer",
    "BotPolicy",
    "BotTurn",
    "Handoff",
    "KnowledgeSource",
]

DEFAULT_SYSTEM_PROMPT: Final = (
    "You are the customer-service assistant of an online shop. Answer the customer's question "
    "briefly and politely, in the customer's language, using only the knowledge-base entries "
    "given below. If they do not answer the question, say that you will pass the customer to "
    "a human colleague, and do not invent policies, prices or dates."
)
#: Conversations with an LLM context in memory; the least recently used is dropped past it
#: (its next question then goes to the model without earlier turns).
MAX_CONTEXTS: Final = 10_000

Source = Literal["rule", "kb", "cache", "llm", "fallback"]


class _Hit(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...


class _Rule(Protocol):
    @property
    def reply(self) -> str | None: ...
    @property
    def action(self) -> str | None: ...
    @property
    def group(self) -> str | None: ...


class KnowledgeSource(Protocol):
    """What the policy needs of a knowledge-base snapshot (:class:`kefu.bot.kb.KnowledgeBase`)."""

    @property
    def version(self) -> Any: ...
    def search(self, text: str, k: int) -> Sequence[_Hit]: ...
    def match_rule(self, text: str) -> _Rule | None: ...


class Answer(msgspec.Struct, frozen=True):
    text: str
    source: Source
    entry_id: str | None = None
    score: float = 0.0
    truncated: bool = False


class Handoff(msgspec.Struct, frozen=True):
    reason: str
    group: str | None = None


class BotTurn(msgspec.Struct, frozen=True):
    """The outcome of one visitor message: an answer, a handoff, a close, or an answer and
    then a handoff (a stream cut off after text reached the visitor)."""

    answer: Answer | None = None
    handoff: Handoff | None = None
    close: bool = False
    cpu_ns: int = 0  # CPU time of this decision on the loop's thread (see BotPolicy.decide)


class _CpuClock:
    """Time of one decision on the loop's thread, in synchronous stretches (CPU time unless the
    OS preempts the process; see kefu.node "Accounting"): ``lap()`` before each await adds the
    time since the last mark, ``resume()`` after it sets a new mark, so what other tasks do
    while this one waits is not counted. The model client's own parsing inside ``__anext__`` is not
    counted either."""

    __slots__ = ("mark", "total_ns")

    def __init__(self) -> None:
        self.total_ns = 0
        self.mark = time.perf_counter_ns()

    def lap(self) -> None:
        now = time.perf_counter_ns()
        self.total_ns += now - self.mark
        self.mark = now

    def resume(self) -> None:
        self.mark = time.perf_counter_ns()


class _Passage(msgspec.Struct, frozen=True):
    id: str
    question: str
    answer: str


class BotPolicy:
    """The decision for each visitor message (module doc). One per node."""

    def __init__(
        self,
        config: BotConfig,
        kb: Callable[[], KnowledgeSource | None],
        llm: ChatModel | None = None,
        *,
        model: str = "",
        max_contexts: int = MAX_CONTEXTS,
    ) -> None:
        self.config = config
        self._kb = kb
        self.llm = llm
        self.model = model
        self.cache = ResponseCache(
            max_entries=max(config.cache.max_entries, 1),
            max_bytes=config.cache.max_bytes,
            ttl_s=config.cache.ttl_s,
        )
        self.cache_enabled = config.cache.max_entries > 0
        self.estimator = TokenEstimator()
        self.system_prompt = config.llm.system_prompt or DEFAULT_SYSTEM_PROMPT
        self._contexts: dict[int, ConversationContext] = {}
        # conversation -> (entry id, its group): the topic (module doc, "Which humans").
        self._topics: dict[int, tuple[str, str | None]] = {}
        self.max_contexts = max_contexts
        self._keywords = [w.lower() for w in config.handoff_keywords]
        self.decisions: dict[str, int] = {}
        self.contexts_dropped = 0

    @property
    def fallback_threshold(self) -> float:
        """The least KB score answered when the LLM fails (module doc, point 4)."""
        c = self.config
        return c.handoff_threshold + (c.answer_threshold - c.handoff_threshold) / 2

    def _count(self, what: str) -> None:
        self.decisions[what] = self.decisions.get(what, 0) + 1

    def context(self, conv: int) -> ConversationContext:
        ctx = self._contexts.pop(conv, None)
        if ctx is None:
            ctx = ConversationContext(
                self.system_prompt,
                self.estimator,
                max_turns=max(self.config.llm.context_messages, 1),
                token_budget=self.config.llm.context_token_budget,
            )
            if len(self._contexts) >= self.max_contexts:
                del self._contexts[next(iter(self._contexts))]
                self.contexts_dropped += 1
        self._contexts[conv] = ctx  # most recently used last
        return ctx

    def forget(self, conv: int) -> None:
        """The conversation left the bot (handoff, close): its context and topic go."""
        self._contexts.pop(conv, None)
        self._topics.pop(conv, None)

    def topic(self, conv: int) -> tuple[str, str | None] | None:
        """The conversation's topic: ``(entry id, group)`` (module doc, "Which humans")."""
        return self._topics.get(conv)

    def topic_group(self, conv: int) -> str | None:
        """The group a handoff of ``conv`` goes to now, None for anyone."""
        topic = self._topics.get(conv)
        return None if topic is None else topic[1]

    def _set_topic(self, conv: int, hit: _Hit) -> None:
        topics = self._topics
        topics.pop(conv, None)
        if len(topics) >= self.max_contexts:
            del topics[next(iter(topics))]  # the least recently updated
        # A stand-in knowledge source may give hits without groups.
        topics[conv] = (hit.id, getattr(hit, "group", None))

    def memory_of(self, conv: int) -> int:
        ctx = self._contexts.get(conv)
        return 0 if ctx is None else ctx.bytes_held

    def memory_total(self) -> int:
        """:meth:`memory_of` summed over the contexts held (at most ``max_contexts``)."""
        return sum(ctx.bytes_held for ctx in self._contexts.values())

    def stats(self) -> dict[str, Any]:
        return {
            "decisions": dict(self.decisions),
            "contexts": len(self._contexts),
            "contexts_max": self.max_contexts,
            "contexts_dropped_total": self.contexts_dropped,
            "topics": len(self._topics),
            "cache": self.cache.stats(),
        }

    async def decide(
        self, conv: int, text: str, on_delta: Callable[[str], None] | None = None
    ) -> BotTurn:
        """What to do with the visitor's ``text`` (module doc). Never raises for a model
        failure; ``on_delta`` gets each piece of a streamed answer as it arrives."""
        clock = _CpuClock()
        turn = await self._decide(conv, text, on_delta, clock)
        clock.lap()
        turn = msgspec.structs.replace(turn, cpu_ns=clock.total_ns)
        if turn.answer is not None and turn.handoff is None:
            # Every answer is a turn of the context, so a follow-up that reaches the model
            # carries the earlier question even when the KB answered it.
            self.context(conv).record(text, turn.answer.text)
        if turn.handoff is not None:
            self._count(f"handoff_{turn.handoff.reason}")
        elif turn.close:
            self._count("close")
        elif turn.answer is not None:
            self._count(turn.answer.source)
        return turn

    async def _decide(
        self,
        conv: int,
        text: str,
        on_delta: Callable[[str], None] | None,
        clock: _CpuClock,
    ) -> BotTurn:
        lowered = text.lower()
        if any(w in lowered for w in self._keywords):
            return BotTurn(handoff=Handoff("requested", self.topic_group(conv)))
        kb = self._kb()
        if kb is None:
            return BotTurn(handoff=Handoff("no_answer", self.topic_group(conv)))
        rule = kb.match_rule(text)
        if rule is not None:
            if rule.reply is not None:
                return BotTurn(answer=Answer(rule.reply, "rule"))
            if rule.action == "close":
                return BotTurn(close=True)
            if rule.action == "route":
                return BotTurn(handoff=Handoff("rule", rule.group))
            return BotTurn(handoff=Handoff("rule", self.topic_group(conv)))
        cfg = self.config
        hits = list(kb.search(text, max(cfg.top_k, 1)))
        best = hits[0] if hits else None
        top = best.score if best is not None else 0.0
        if best is not None and top >= cfg.handoff_threshold:
            self._set_topic(conv, best)
        if best is not None and top >= cfg.answer_threshold:
            return BotTurn(answer=Answer(best.answer, "kb", best.id, top))
        if best is None or top < cfg.handoff_threshold or self.llm is None:
            return BotTurn(handoff=Handoff("no_answer", self.topic_group(conv)))
        return await self._ask_model(conv, text, kb, hits, on_delta, clock)

    async def _ask_model(
        self,
        conv: int,
        text: str,
        kb: KnowledgeSource,
        hits: list[_Hit],
        on_delta: Callable[[str], None] | None,
        clock: _CpuClock,
    ) -> BotTurn:
        assert self.llm is not None
        ctx = self.context(conv)
        turns = ctx.turns()
        history = hashlib.blake2b(repr(turns).encode(), digest_size=8).hexdigest() if turns else ""
        key = (
            cache_key(
                text,
                kb_version=str(kb.version),
                entry_ids=[h.id for h in hits],
                model=self.model,
                context=history,
            )
            if self.cache_enabled
            else None
        )
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return BotTurn(answer=Answer(cached, "cache", hits[0].id, hits[0].score))
        passages: list[KbPassage] = [_Passage(h.id, h.question, h.answer) for h in hits]
        messages = ctx.build_messages(text, passages)
        llm = self.config.llm
        try:
            done: Done | None = None
            clock.lap()
            async for event in self.llm.stream(
                messages, max_tokens=llm.max_tokens, temperature=llm.temperature
            ):
                clock.resume()
                if isinstance(event, Delta):
                    if on_delta is not None:
                        on_delta(event.text)
                else:
                    done = event
                clock.lap()
            clock.resume()
        except LlmInterrupted as exc:
            clock.resume()
            return BotTurn(
                answer=Answer(exc.partial_text, "llm", hits[0].id, hits[0].score, truncated=True),
                handoff=Handoff("llm_unavailable", self.topic_group(conv)),
            )
        except LlmUnavailable:
            clock.resume()
            return self._fallback(conv, hits)
        if done is None or not done.text.strip():
            return self._fallback(conv, hits)
        if done.usage is not None:
            self.estimator.observe(messages, done.usage.prompt_tokens)
        if key is not None:
            self.cache.put(key, done.text, finish_reason=done.finish_reason or "stop")
        return BotTurn(answer=Answer(done.text, "llm", hits[0].id, hits[0].score))

    def _fallback(self, conv: int, hits: list[_Hit]) -> BotTurn:
        best = hits[0]
        if best.score >= self.fallback_threshold:
            return BotTurn(answer=Answer(best.answer, "fallback", best.id, best.score))
        return BotTurn(handoff=Handoff("llm_unavailable", self.topic_group(conv)))
