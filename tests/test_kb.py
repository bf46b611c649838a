"""The knowledge base: loading and validation with file:line, rules, retrieval on the shipped
sample in Chinese and English, hot reload, the admin endpoints, and retrieval quality on
BANKING77 against scikit-learn with the same tokens."""

from __future__ import annotations

import asyncio
import csv
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kefu.bot.kb import KbError, KbWatcher, KnowledgeBase, load_knowledge_base, sample_kb_path
from kefu.text import tokenize
from tests import aio


def run(test: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    aio.run(test, timeout)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def shop() -> KnowledgeBase:
    return load_knowledge_base([sample_kb_path()])


@pytest.mark.parametrize(
    ("question", "entry"),
    [
        ("运费多少钱？", "shipping_fee"),
        ("满多少包邮啊", "shipping_fee"),
        ("我想退货", "return_policy"),
        ("退款多久能到", "refund_time"),
        ("可以用支付宝吗", "payment_methods"),
        ("忘记密码了怎么办", "password_reset"),
        ("周末客服在吗", "opening_hours"),
        ("快递到哪了，怎么查物流", "track_order"),
        ("东西收到是坏的", "damaged_item"),
        ("可以分期付款吗", "installments"),
        ("How much is shipping?", "shipping_fee"),
        ("can I return my shoes", "return_policy"),
        ("When will I get my refund?", "refund_time"),
        ("do you accept credit cards", "payment_methods"),
        ("my package arrived damaged", "damaged_item"),
        ("How do I track my order?", "track_order"),
        ("I forgot my password", "password_reset"),
        ("what are your opening hours", "opening_hours"),
        ("Do you ship to the US?", "international_shipping"),
        ("is this product genuine", "genuine"),
    ],
)
def test_the_sample_answers_real_questions(shop: KnowledgeBase, question: str, entry: str) -> None:
    hits = shop.search(question, 3)
    assert hits and hits[0].id == entry, [(h.id, h.score) for h in hits]
    assert all(0.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_sample_size_and_rules(shop: KnowledgeBase) -> None:
    assert len(shop) >= 30
    assert shop.match_rule("请问怎么开发票").reply.startswith("电子发票")  # type: ignore[union-attr]
    assert shop.match_rule("I want to file a complaint").action == "handoff"  # type: ignore[union-attr]
    assert shop.match_rule("运费多少") is None
    assert shop.search("zzzz qqqq", 3) == []  # nothing shared: no hit, not a zero score


def test_keyword_rules_match_whole_ascii_words(tmp_path: Path) -> None:
    kb = load_knowledge_base(
        [
            write(
                tmp_path / "r.yaml",
                "rules:\n"
                "  - match: {keywords: [agent, 人工]}\n"
                "    action: handoff\n"
                "  - match: {regex: 'order\\s+#\\d+'}\n"
                "    action: route\n"
                "    group: orders\n",
            )
        ]
    )
    assert kb.match_rule("Agent please") is not None
    assert kb.match_rule("on the agenda") is None  # not a whole word
    assert kb.match_rule("我要人工服务") is not None  # CJK: substring
    rule = kb.match_rule("where is ORDER  #123?")
    assert rule is not None and (rule.action, rule.group) == ("route", "orders")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entries: {}\n", "a.yaml:1: entries must be a list"),
        ("entries:\n  - id: x\n    answer: y\n", "a.yaml:2: entries[0]: questions is missing"),
        (
            "entries:\n  - id: x\n    questions: [a]\n    answer: y\n    colour: red\n",
            "a.yaml:5: unknown key `colour`",
        ),
        ("entries:\n  - id: x\n    questions: []\n    answer: y\n", "questions is empty"),
        ("entries:\n  - id: x\n    questions: [a]\n    answer: ~\n", "a.yaml:4: entries[0].answer"),
        ("rules:\n  - match: {regex: '('}\n    action: handoff\n", "a.yaml:2: rules[0]: bad regex"),
        ("rules:\n  - match: {keywords: [a]}\n    action: dance\n", "must be one of"),
        ("rules:\n  - match: {keywords: [a]}\n    action: route\n", "route needs a group"),
        ("rules:\n  - match: {keywords: [a]}\n", "needs exactly one of reply, action"),
        ("entries: [\n", "a.yaml:2: invalid YAML"),
        ("other: 1\n", "a.yaml:1: unknown key `other`"),
    ],
)
def test_validation_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KbError) as info:
        load_knowledge_base([write(tmp_path / "a.yaml", text)])
    assert message in str(info.value)


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "entries:\n  - id: same\n    questions: [q]\n    answer: a\n")
    b = write(
        tmp_path / "b.yaml",
        "\nentries:\n  - id: other\n    questions: [q]\n    answer: a\n"
        "  - id: same\n    questions: [q]\n    answer: b\n",
    )
    with pytest.raises(KbError) as info:
        load_knowledge_base([a, b])
    assert str(info.value).startswith("b.yaml:6:") and "a.yaml:2" in str(info.value)


ENTRY = "entries:\n  - id: {id}\n    questions: [{q}]\n    answer: {a}\n"


def test_hot_reload_serves_edits_and_keeps_the_old_version_on_a_broken_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kb.yaml"
    write(path, ENTRY.format(id="ship", q="运费多少", a="10元"))

    async def body() -> None:
        watcher = KbWatcher([str(path)], interval_s=0.1)
        await watcher.start()
        assert watcher.current is not None and watcher.current.version == 1
        stop = asyncio.Event()
        searches = 0

        async def search_all_along() -> None:
            nonlocal searches
            while not stop.is_set():
                kb = watcher.current
                assert kb is not None and kb.search("运费多少", 1)  # never without a KB
                searches += 1
                await asyncio.sleep(0)

        searcher = asyncio.ensure_future(search_all_along())
        try:
            write(path, ENTRY.format(id="ship", q="运费多少", a="包邮"))
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime
            t0 = time.monotonic()
            while watcher.current.answer_of("ship") != "包邮":  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
            assert time.monotonic() - t0 < 2.0
            assert watcher.current.version == 2  # type: ignore[union-attr]
            write(path, "entries: [broken\n")
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
            while watcher.reload_failures_total == 0:
                await asyncio.sleep(0.05)
            assert watcher.current.version == 2  # type: ignore[union-attr]
            assert "kb.yaml" in (watcher.last_error or "")
            assert watcher.stats()["healthy"] == 0
            with pytest.raises(KbError):
                await watcher.reload()
        finally:
            stop.set()
            await searcher
            await watcher.stop()
        assert searches > 10

    run(body)


def test_admin_search_and_reload_over_http(tmp_path: Path) -> None:
    import aiohttp

    from kefu.config import BotConfig, Config, HttpConfig, WsConfig
    from kefu.node import Node
    from kefu.web.http import HttpServer

    kb_path = tmp_path / "kb.yaml"
    write(kb_path, ENTRY.format(id="ship", q="运费多少", a="10元"))

    async def body() -> None:
        cfg = Config(
            data_dir=str(tmp_path / "data"),
            http=HttpConfig(port=0),
            ws=WsConfig(port=0),
            admin_token="adm",
            bot=BotConfig(kb=[str(kb_path)], kb_reload_interval_s=60),
        )
        node = Node(cfg)
        await node.start()
        http = HttpServer(cfg, node)
        await http.start()
        base = f"http://127.0.0.1:{http.port}"
        auth = {"Authorization": "Bearer adm"}
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{base}/v1/admin/kb/search?q=运费多少&k=3", headers=auth) as r:
                    body_ = await r.json()
                    assert r.status == 200 and body_["version"] == 1
                    assert body_["hits"][0]["id"] == "ship" and body_["hits"][0]["score"] > 0.99
                async with s.get(f"{base}/v1/admin/kb/search?k=3", headers=auth) as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid"
                async with s.get(f"{base}/v1/admin/kb/search?q=x") as r:
                    assert r.status == 401
                write(kb_path, ENTRY.format(id="ship2", q="运费多少", a="包邮"))
                async with s.post(f"{base}/v1/admin/kb/reload", headers=auth) as r:
                    assert r.status == 200 and await r.json() == {"version": 2, "entries": 1}
                write(kb_path, "entries: 1\n")
                async with s.post(f"{base}/v1/admin/kb/reload", headers=auth) as r:
                    error = (await r.json())["error"]
                    assert r.status == 422 and error["code"] == "invalid_kb"
                    assert error["message"].startswith("kb.yaml:1:")
                # The version in service answers, the bot answers from it.
                conv, *_ = await node.create_chat()
                result = await node.send_message(conv, "运费多少")
                assert [m.text for m in result.replies] == ["包邮"]
                async with s.get(f"{base}/metrics") as r:
                    text = await r.text()
                    assert "kefu_kb_version 2" in text and "kefu_kb_reload_failures_total 1" in text
                    assert 'kefu_bot_decisions_total{branch="kb"} 1' in text
        finally:
            await http.stop()
            await node.stop()

    run(body)


# ---------------------------------------------------------------------------------------------
# Retrieval quality on BANKING77: one entry per intent with all its training phrasings, the
# test questions as visitors. Ours is TF-IDF over kefu.text tokens, best phrasing per entry;
# the reference is scikit-learn's TfidfVectorizer on the same tokens, scored the same way.


def _banking77(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    def rows(name: str) -> list[tuple[str, str]]:
        with open(root / "banking77" / name, newline="", encoding="utf-8") as f:
            return [(r["text"], r["category"]) for r in csv.DictReader(f)]

    return rows("train.csv"), rows("test.csv")


def test_banking77_recall_at_least_scikit_learns(shared_data: str) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from kefu.bot.kb import Entry

    train, test = _banking77(Path(shared_data))
    by_label: dict[str, list[str]] = {}
    for text, label in train:
        by_label.setdefault(label, []).append(text)
    labels = sorted(by_label)
    kb = KnowledgeBase([Entry(id=lb, questions=tuple(by_label[lb]), answer=lb) for lb in labels])
    ours_r1 = ours_r5 = 0
    for text, label in test:
        ids = [h.id for h in kb.search(text, 5)]
        ours_r1 += bool(ids) and ids[0] == label
        ours_r5 += label in ids
    docs = [tokenize(q) for lb in labels for q in by_label[lb]]
    owner = np.array([i for i, lb in enumerate(labels) for _ in by_label[lb]])
    vec = TfidfVectorizer(analyzer=lambda x: x)
    m = vec.fit_transform(docs)
    s = (vec.transform([tokenize(t) for t, _ in test]) @ m.T).toarray()
    best = np.full((len(test), len(labels)), -1.0)
    for j in range(len(labels)):
        best[:, j] = s[:, owner == j].max(axis=1)
    truth = np.array([labels.index(lb) for _, lb in test])
    top = np.argmax(best, axis=1)
    sk_r1 = int(np.sum((top == truth) & (best[np.arange(len(test)), top] > 0)))
    print(f"BANKING77 R@1 ours {ours_r1 / len(test):.4f} sklearn {sk_r1 / len(test):.4f}")
    assert ours_r1 >= sk_r1
    assert ours_r5 / len(test) > 0.9 and ours_r1 / len(test) > 0.7


def afqmc_pairs(shared_data: str) -> list[tuple[str, str]]:
    """AFQMC dev pairs labelled 1 (same meaning)."""
    with open(Path(shared_data) / "afqmc" / "dev.txt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [(a, b) for a, b, label in rows if label == "1"]


def afqmc_eval(pairs: list[tuple[str, str]], tokenizer: str = "default") -> dict[str, Any]:
    """:func:`kefu.bot.kbtool.evaluate` of the pairs: the left side of each is an entry's
    question, the right side the visitor's; every pair is its own entry, so the others are
    distractors."""
    from kefu.bot.kb import Entry
    from kefu.bot.kbtool import evaluate

    kb = KnowledgeBase(
        [Entry(id=f"p{i}", questions=(a,), answer=a) for i, (a, _) in enumerate(pairs)],
        tokenizer=tokenizer,
    )
    return evaluate(kb, [(b, f"p{i}") for i, (_, b) in enumerate(pairs)])


def afqmc_sklearn_r_at_1(
    pairs: list[tuple[str, str]], tok: Callable[[str], list[str]] = tokenize
) -> float:
    """R@1 of scikit-learn's TfidfVectorizer on the same pairs with the tokens of ``tok``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer=lambda x: x)
    m = vec.fit_transform([tok(a) for a, _ in pairs])
    s = (vec.transform([tok(b) for _, b in pairs]) @ m.T).toarray()
    top = np.argmax(s, axis=1)
    return float(np.mean((top == np.arange(len(pairs))) & (s.max(axis=1) > 0)))


def test_afqmc_recall_at_least_scikit_learns(shared_data: str) -> None:
    """AFQMC with the default tokens, against scikit-learn with the same tokens."""
    pairs = afqmc_pairs(shared_data)
    result = afqmc_eval(pairs)
    sk_r1 = afqmc_sklearn_r_at_1(pairs)
    print(f"AFQMC R@1 ours {result['r_at_1']:.4f} sklearn {sk_r1:.4f} R@5 {result['r_at_5']:.4f}")
    assert result["r_at_1"] >= sk_r1 - 1e-9
    assert result["r_at_5"] > result["r_at_1"] > 0.15
    curve = result["curve"]
    assert curve[0]["answered"] == 1.0 and curve[-1]["answered"] < 0.05


def test_kb_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kefu.cli import main

    good = write(tmp_path / "kb.yaml", ENTRY.format(id="ship", q="运费多少", a="10元"))
    bad = write(tmp_path / "bad.yaml", "entries:\n  - id: x\n")
    assert main(["kb", "check", good]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert main(["kb", "check", bad]) == 1
    assert "bad.yaml:2: entries[0]: questions is missing" in capsys.readouterr().err
    assert main(["kb", "query", good, "-t", "运费多少钱", "-k", "2"]) == 0
    assert "ship" in capsys.readouterr().out
    queries = tmp_path / "q.csv"
    queries.write_text("text,expected_id\n运费多少,ship\n退货,none\n", encoding="utf-8")
    assert main(["kb", "eval", "--kb", good, "--queries", str(queries), "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert (result["r_at_1"], result["r_at_5"], result["queries"]) == (0.5, 0.5, 2)
    assert len(result["curve"]) == 21
