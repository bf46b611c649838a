"""kefu.text: the tokenizer and the bounded vocabulary of the knowledge-base index."""

from __future__ import annotations

from typing import Any

import pytest

from kefu.text import DEFAULT_MAX_TERMS, Vocabulary, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", ""),
        ("   \t\n", ""),
        ("How do I change my PIN?", "how do i change my pin"),
        ("card-arrival, ETA: 2 weeks!", "card arrival eta 2 weeks"),
        ("order_id=AB12", "order id ab12"),
        ("3.14", "3 14"),
        ("运费多少", "运 费 多 少 运费 费多 多少"),
        ("退款", "退 款 退款"),
        ("好", "好"),
        ("我想退款，订单号多少？", "我 想 退 款 我想 想退 退款 订 单 号 多 少 订单 单号 号多 多少"),
        ("花呗 账单", "花 呗 花呗 账 单 账单"),
        ("my 花呗 bill", "my 花 呗 花呗 bill"),
        ("iPhone15到了吗", "iphone15 到 了 吗 到了 了吗"),
        ("ＶＩＰ会员１２３", "vip 会 员 会员 123"),
        ("ｅｍａｉｌ：ａ＠ｂ", "email a b"),
        ("谢谢😀👍!!", "谢 谢 谢谢"),
        ("great 👍🏽 service", "great service"),
        ("Café NAÏVE Straße", "café naïve straße"),
        ("Привет МИР", "привет мир"),
        ("한국어 텍스트", "한국어 텍스트"),
        ("日本語のテキスト", "日 本 語 の テ キ ス ト 日本 本語 語の のテ テキ キス スト"),
        ("人々", "人 々 人々"),
        ("𠀀𠀁", "𠀀 𠀁 𠀀𠀁"),
        ("٣ apples", "٣ apples"),
    ],
)
def test_tokenize(text: str, tokens: str) -> None:
    # Expected tokens written space-separated (no token contains a space).
    assert tokenize(text) == tokens.split()


def test_tokenize_ascii_fast_path_agrees_with_the_general_rules() -> None:
    # The same ASCII words, once alone and once next to a CJK run (the general path).
    text = "Where's my REFUND_2024? it-was 3 days ago..."
    assert tokenize(text + " 好") == [*tokenize(text), "好"]


def test_tokenize_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenize(b"abc")  # type: ignore[arg-type]


def test_vocabulary_assigns_ids_in_order_of_first_appearance() -> None:
    vocab = Vocabulary()
    assert vocab.add_document(["a", "b", "a"]) == [0, 1, 0]
    assert vocab.add_document(["c", "a"]) == [2, 0]
    assert vocab.add_document([]) == []
    assert len(vocab) == 3 and "b" in vocab and "z" not in vocab
    assert [vocab.term(i) for i in range(3)] == ["a", "b", "c"]
    assert vocab.max_terms == DEFAULT_MAX_TERMS
    assert repr(vocab) == f"Vocabulary(3 terms, max_terms={DEFAULT_MAX_TERMS})"


def test_vocabulary_lookup_drops_unknown_tokens() -> None:
    vocab = Vocabulary()
    vocab.add_document(tokenize("运费多少 shipping"))
    assert vocab.lookup(["shipping", "nope", "运费", "运"]) == [7, 4, 0]
    assert vocab.lookup([]) == []
    assert len(vocab) == 8  # lookup never adds


def test_vocabulary_full_raises_and_adds_nothing() -> None:
    vocab = Vocabulary(max_terms=3)
    vocab.add_document(["a", "b"])
    with pytest.raises(ValueError, match="vocabulary full: 2 new terms would exceed max_terms=3"):
        vocab.add_document(["a", "c", "d"])
    assert len(vocab) == 2 and "c" not in vocab
    assert vocab.add_document(["c", "a", "c"]) == [2, 0, 2]
    assert vocab.add_document(["a", "b", "c"]) == [0, 1, 2]  # known tokens still fit
    with pytest.raises(ValueError, match="vocabulary full"):
        vocab.add_document(["e"])


@pytest.mark.parametrize(
    ("max_terms", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_vocabulary_rejects_bad_bounds(max_terms: Any, error: type) -> None:
    with pytest.raises(error, match="max_terms"):
        Vocabulary(max_terms=max_terms)


def test_vocabulary_rejects_non_str_tokens_atomically() -> None:
    vocab = Vocabulary()
    with pytest.raises(TypeError, match="tokens must be str, got int"):
        vocab.add_document(["a", 1])  # type: ignore[list-item]
    assert len(vocab) == 0


def test_vocabulary_term_out_of_range() -> None:
    vocab = Vocabulary()
    vocab.add_document(["a"])
    for bad in (1, -1):
        with pytest.raises(IndexError, match=f"token id {bad} not in vocabulary of 1"):
            vocab.term(bad)
