"""``bot.tokenizer: jieba``: CJK runs segmented into words by jieba, at the index build and at
every query alike; the configuration refuses it when jieba is missing; the kb commands take
``--tokenizer``; AFQMC retrieval with jieba tokens at least scikit-learn's on the same tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kefu.config
import kefu.text
from kefu.bot.kb import KbError, KnowledgeBase, load_knowledge_base
from kefu.config import AgentConfig, BotConfig, Config, ConfigError, WsConfig, load_config
from kefu.text import get_tokenizer, tokenize, tokenize_jieba
from tests.test_kb import ENTRY, afqmc_eval, afqmc_pairs, afqmc_sklearn_r_at_1, run, write

ALIPAY = ENTRY.format(id="alipay", q="支付宝怎么绑定银行卡", a="在“我的-设置-支付”里绑定。")


def test_cjk_runs_are_segmented_into_words() -> None:
    text = "我想退货，运费多少？VIP会员 Ｎｏ.１"
    assert tokenize_jieba(text) == ["我", "想", "退货", "运费", "多少", "vip", "会员", "no", "1"]
    # The default tokens of the same text: characters and character pairs.
    assert "想退" in tokenize(text) and "想退" not in tokenize_jieba(text)
    assert tokenize_jieba("Shipping FEE?") == tokenize("Shipping FEE?") == ["shipping", "fee"]
    assert get_tokenizer("jieba") is tokenize_jieba and get_tokenizer("default") is tokenize
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


def test_jieba_loads_beside_a_pkg_resources_without_resource_stream(tmp_path: Path) -> None:
    """jieba opens its dictionary through ``pkg_resources`` when it can import one; setuptools
    no longer ships it, and packages put shims of it on ``sys.path`` (the Autobahn suite's
    runner does) that lack ``resource_stream``. The tokenizer still loads and segments."""
    (tmp_path / "pkg_resources.py").write_text('"""A shim: no resource_stream."""\n')
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pkg_resources; "
        "assert not hasattr(pkg_resources, 'resource_stream'); "
        "from kefu.text import tokenize_jieba; print(tokenize_jieba('运费多少? fee'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['运费', '多少', 'fee']"


def test_the_index_and_the_queries_use_the_same_tokenizer(tmp_path: Path) -> None:
    path = write(tmp_path / "kb.yaml", ALIPAY)
    default = load_knowledge_base([path])
    jieba = load_knowledge_base([path], tokenizer="jieba")
    assert (default.tokenizer, jieba.tokenizer) == ("default", "jieba")
    # "支付宝" is one jieba word: it matches only a query tokenized by jieba as well (the
    # default tokens of the query, 支 付 宝 支付 付宝, are none of the index's words).
    hits = jieba.search("支付宝", 3)
    assert [h.id for h in hits] == ["alipay"] and hits[0].score > 0.3
    # "支付" is a word of its own for jieba, not part of "支付宝": no hit, while the default
    # tokens share 支, 付 and 支付 with the entry.
    assert jieba.search("支付", 3) == []
    assert [h.id for h in default.search("支付", 3)] == ["alipay"]


def test_the_kb_commands_take_the_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kefu.cli import main

    path = write(tmp_path / "kb.yaml", ALIPAY)
    assert main(["kb", "query", path, "-t", "支付", "--tokenizer", "jieba"]) == 0
    assert "alipay" not in capsys.readouterr().out
    assert main(["kb", "query", path, "-t", "支付", "--tokenizer", "default"]) == 0
    assert "alipay" in capsys.readouterr().out
    queries = tmp_path / "q.csv"
    queries.write_text("text,expected_id\n支付宝,alipay\n支付,alipay\n", encoding="utf-8")
    argv = ["kb", "eval", "--kb", path, "--queries", str(queries), "--json"]
    assert main([*argv, "--tokenizer", "jieba"]) == 0
    assert '"r_at_1": 0.5' in capsys.readouterr().out
    assert main(argv) == 0
    assert '"r_at_1": 1.0' in capsys.readouterr().out


def test_jieba_missing_is_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kefu.yaml"
    config.write_text("bot:\n  tokenizer: jieba\n", encoding="utf-8")
    assert load_config(config).bot.tokenizer == "jieba"  # installed here
    monkeypatch.setattr(kefu.config, "jieba_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert info.value.key == "bot.tokenizer"
    assert str(info.value).startswith(f'{config}: `bot.tokenizer` is "jieba" but the jieba')
    assert "pip install 'kefu[jieba]'" in str(info.value)
    # A knowledge base built without the configuration check (kefu kb, the library) says so.
    monkeypatch.setattr(kefu.text, "_jieba", None)
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba: ImportError
    with pytest.raises(KbError, match=r"`bot.tokenizer`: the jieba tokenizer needs the jieba"):
        load_knowledge_base([write(tmp_path / "kb.yaml", ALIPAY)], tokenizer="jieba")


def test_a_node_with_the_jieba_tokenizer_answers_with_it(tmp_path: Path) -> None:
    from kefu.node import Node

    kb_path = write(tmp_path / "kb.yaml", ALIPAY)

    async def body() -> None:
        cfg = Config(
            data_dir=str(tmp_path / "data"),
            ws=WsConfig(host="127.0.0.1", port=0),
            agents=[AgentConfig(id="alice", name="Alice", token="alice-token")],
            bot=BotConfig(kb=[kb_path], tokenizer="jieba", kb_reload_interval_s=60),
        )
        node = Node(cfg)
        await node.start()
        try:
            assert node.kb_watcher is not None and node.kb_watcher.current is not None
            assert node.kb_watcher.current.tokenizer == "jieba"
            conv, *_ = await node.create_chat()
            result = await node.send_message(conv, "支付宝怎么绑定银行卡？")
            assert [m.meta["kb_entry"] for m in result.replies] == ["alipay"]
            reloaded = await node.kb_reload()  # a rebuild keeps the tokenizer
            assert reloaded.version == 2 and node.kb_watcher.current.tokenizer == "jieba"
            result = await node.send_message(conv, "支付")  # nothing shared: to the humans
            assert result.replies == [] and result.status == "queued"
        finally:
            await node.stop()

    run(body)


def test_afqmc_recall_with_jieba_at_least_scikit_learns(shared_data: str) -> None:
    pairs = afqmc_pairs(shared_data)
    result = afqmc_eval(pairs, tokenizer="jieba")
    sk_r1 = afqmc_sklearn_r_at_1(pairs, tokenize_jieba)
    default_r1 = afqmc_eval(pairs)["r_at_1"]
    print(
        f"AFQMC jieba R@1 ours {result['r_at_1']:.4f} sklearn {sk_r1:.4f} "
        f"R@5 {result['r_at_5']:.4f} MRR {result['mrr']:.4f} (default tokens R@1 {default_r1:.4f})"
    )
    assert result["r_at_1"] >= sk_r1 - 1e-9
    assert result["r_at_5"] > result["r_at_1"] > 0.15


def test_config_default_is_the_default_tokenizer() -> None:
    assert BotConfig().tokenizer == "default"
    assert KnowledgeBase([]).tokenizer == "default"
