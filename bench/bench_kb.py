"""The bot's knowledge base: answer latency with a 10,000-entry knowledge base, its build
time, and the response cache.

    python -m bench --only kb

The knowledge base is BANKING77's training set with every phrasing its own entry (10,003
entries, from ``../shared/data/banking77`` beside the repository); the visitors are its 3,080
test questions. "KB answer" is what the bot does for a message before any LLM: rule check,
tokenization, retrieval of the top 3 entries (best phrasing per entry), decision. Each
question is timed alone (no batching), on one thread, and p50/p99 are over all of them.
"""

from __future__ import annotations

import asyncio
import csv
import os
import time

from bench._harness import Row, percentiles
from kefu.bot.cache import ResponseCache, cache_key
from kefu.bot.kb import Entry, KnowledgeBase, Rule
from kefu.bot.policy import BotPolicy
from kefu.config import BotConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "banking77")


def _rows(name: str) -> list[str]:
    with open(os.path.join(DATA, name), newline="", encoding="utf-8") as f:
        return [r["text"] for r in csv.DictReader(f)]


def run(quick: bool) -> list[Row]:
    train, test = _rows("train.csv"), _rows("test.csv")
    if quick:
        test = test[:500]
    entries = [Entry(id=f"e{i}", questions=(q,), answer=f"answer {i}") for i, q in enumerate(train)]
    rules = [Rule(keywords=("human", "agent", "转人工"), action="handoff")]
    t0 = time.perf_counter()
    kb = KnowledgeBase(entries, rules)
    build_ms = (time.perf_counter() - t0) * 1e3
    rows = [Row("kb build, 10,003 entries", "kefu c", build_ms, "ms", higher_is_better=False)]

    samples = []
    for q in test:
        t = time.perf_counter()
        if kb.match_rule(q) is None:
            kb.search(q, 3)
        samples.append(time.perf_counter() - t)
    p50, p99 = percentiles(samples)
    case = "kb answer (rules + top-3 search), 10,003 entries"
    rows.append(Row(case, "kefu c p50", p50, "µs", higher_is_better=False))
    rows.append(Row(case, "kefu c p99", p99, "µs", higher_is_better=False))

    # The whole decision of the bot's policy (handoff words, rules, search, thresholds).
    policy = BotPolicy(BotConfig(), lambda: kb)

    async def decide_all() -> list[float]:
        out = []
        for i, q in enumerate(test):
            t = time.perf_counter()
            await policy.decide(i, q)
            out.append(time.perf_counter() - t)
        return out

    p50, p99 = percentiles(asyncio.run(decide_all()))
    case = "bot decision without LLM, 10,003 entries"
    rows.append(Row(case, "kefu c p50", p50, "µs", higher_is_better=False))
    rows.append(Row(case, "kefu c p99", p99, "µs", higher_is_better=False))

    cache = ResponseCache(max_entries=4096, max_bytes=8 << 20, ttl_s=3600)
    keys = [cache_key(q, kb_version=1, entry_ids=["e1", "e2"], model="m") for q in test]
    for key in keys:
        if key is not None:
            cache.put(key, "a cached answer of some length " * 4)
    samples = []
    for q in test:
        t = time.perf_counter()
        key = cache_key(q, kb_version=1, entry_ids=["e1", "e2"], model="m")
        if key is not None:
            cache.get(key)
        samples.append(time.perf_counter() - t)
    p50, p99 = percentiles(samples)
    case = "response cache hit (key + lookup)"
    rows.append(Row(case, "kefu p50", p50, "µs", higher_is_better=False))
    rows.append(Row(case, "kefu p99", p99, "µs", higher_is_better=False))
    return rows
