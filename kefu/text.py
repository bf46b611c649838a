"""Text to tokens to token ids, for the knowledge-base index (:mod:`kefu._core.tfidf`).

Tokenization rules:

- Text is lower-cased. Fullwidth ASCII letters and digits (``ＡＢＣ``, ``１２３``, as typed by
  Chinese input methods) are read as ASCII first, so ``ＶＩＰ１`` and ``vip1`` are one token.
- A *word* is a run of letters and digits (what ``str.isalnum`` accepts: Latin, Greek,
  Cyrillic, Hangul, Arabic, ..., and every script's digits) outside the CJK ranges below.
  Everything else separates words: spaces, punctuation, symbols, emoji, the underscore, and
  combining marks (text is expected in the NFC form keyboards produce).
- A *CJK run* is a run of Han ideographs (U+3400..U+4DBF, U+4E00..U+9FFF, U+F900..U+FAFF,
  U+20000..U+323AF, plus 々 and 〇) and Japanese kana (U+3040..U+30FF): scripts written
  without spaces. Each run gives its characters (unigrams), then each pair of neighbouring
  characters (bigrams): ``运费多少`` gives ``运 费 多 少 运费 费多 多少``. Unigrams find
  single-character words; bigrams reward matching word order, without a segmenter.

Tokens come out in text order, run by run.

Tokenizers (``bot.tokenizer``, :func:`get_tokenizer`):

- ``default``: :func:`tokenize` above. No dictionary, so no word it does not know.
- ``jieba``: words as above, but each CJK run is segmented into words by jieba (an optional
  extra: ``pip install 'kefu[jieba]'``), precise mode without the HMM guesser of new words
  (``jieba.lcut(run, HMM=False)``): ``运费多少`` gives ``运费 多少``. Of jieba's modes this
  one scored best on AFQMC (R@1 over the 1,338 dev pairs labelled 1: precise without HMM
  0.186, search mode without HMM 0.182, search mode 0.180, precise 0.176): a sequence outside
  the dictionary comes out as single characters, the same in every phrasing, where the HMM
  guesses different words for it in different sentences. The default tokens score 0.210 on
  the same pairs (bigrams also match across words the dictionary lacks, such as ``花呗``);
  jieba pays off for a knowledge base whose vocabulary the dictionary knows, or extends with
  ``jieba.load_userdict``. Kana runs come out as single characters.

A knowledge base is built and queried with one tokenizer (:class:`kefu.bot.kb.KnowledgeBase`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import operator
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

__all__ = [
    "DEFAULT_MAX_TERMS",
    "TOKENIZERS",
    "TokenizerUnavailable",
    "Vocabulary",
    "get_tokenizer",
    "jieba_available",
    "tokenize",
    "tokenize_jieba",
]

#: The names ``bot.tokenizer`` accepts.
TOKENIZERS: Final = ("default", "jieba")

_CJK = "\u3005\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af"
# Group 1: a word (letters and digits, not CJK, no underscore); group 2: a CJK run.
_TOKEN = re.compile(f"([^\\W_{_CJK}]+)|([{_CJK}]+)")
_ASCII_WORD = re.compile("[a-z0-9]+")
# Only letters and digits: fullwidth punctuation (，？！) is in nearly every Chinese sentence
# and separates words either way, so it is not worth a translate() of the whole text.
_FULLWIDTH = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
_FULLWIDTH_TO_ASCII = {
    c: c - 0xFF01 + 0x21
    for c in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))
}

#: Default bound of a :class:`Vocabulary` (``TfidfIndex`` accepts up to 4,194,304 terms).
DEFAULT_MAX_TERMS = 1 << 20


def tokenize(text: str) -> list[str]:
    """The tokens of ``text``: lower-cased words, and CJK unigrams then bigrams per run.

    >>> tokenize("运费多少? Shipping FEE")
    ['运', '费', '多', '少', '运费', '费多', '多少', 'shipping', 'fee']
    """
    return _tokens(text, _grams)


def _grams(run: str) -> list[str]:
    """A CJK run's unigrams, then its bigrams."""
    if len(run) < 2:
        return [run]
    return [*run, *map(operator.add, run, run[1:])]


def _tokens(text: str, split_cjk: Callable[[str], Iterable[str]]) -> list[str]:
    """Words lower-cased (fullwidth letters and digits folded to ASCII), each CJK run split
    by ``split_cjk``: what both tokenizers share."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    if _FULLWIDTH.search(text) is not None:
        text = text.translate(_FULLWIDTH_TO_ASCII)
    tokens: list[str] = []
    for word, run in _TOKEN.findall(text.lower()):
        if word:
            tokens.append(word)
        else:
            tokens.extend(split_cjk(run))
    return tokens


class TokenizerUnavailable(RuntimeError):
    """The tokenizer asked for needs a package that is not installed."""


def jieba_available() -> bool:
    """Whether jieba can be imported (without importing it: that loads nothing yet)."""
    return importlib.util.find_spec("jieba") is not None


_jieba: Any = None
_jieba_lock = threading.Lock()


def _load_jieba() -> Any:
    """jieba, imported and its dictionary loaded once (about 0.5 s, from its cache file), so
    the first query does not pay for it. Knowledge bases are built in worker threads: the
    lock keeps two builds from loading it twice."""
    global _jieba
    with _jieba_lock:
        if _jieba is None:
            try:
                jieba = importlib.import_module("jieba")  # optional: no import at the top
            except ImportError:
                raise TokenizerUnavailable(
                    "the jieba tokenizer needs the jieba package: pip install 'kefu[jieba]'"
                ) from None
            jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" on stderr
            # Its own dictionary by path: by default jieba opens it through pkg_resources,
            # which setuptools no longer ships and which other packages shadow with shims
            # that lack ``resource_stream``.
            where = jieba.__file__
            dictionary = os.path.join(os.path.dirname(where), "dict.txt") if where else ""
            if dictionary and os.path.isfile(dictionary):
                jieba.set_dictionary(dictionary)
            jieba.initialize()
            _jieba = jieba
        return _jieba


def tokenize_jieba(text: str) -> list[str]:
    """:func:`tokenize`, with each CJK run segmented into words by jieba (module doc).

    >>> tokenize_jieba("运费多少? Shipping FEE")
    ['运费', '多少', 'shipping', 'fee']
    """
    if isinstance(text, str) and not text.isascii():
        cut = _load_jieba().lcut  # TokenizerUnavailable before any work, as before
        return _tokens(text, lambda run: cut(run, HMM=False))
    return _tokens(text, _grams)  # no CJK run: the same tokens (and the same TypeError)


def get_tokenizer(name: str) -> Callable[[str], list[str]]:
    """The tokenizer called ``name`` (one of :data:`TOKENIZERS`).

    Raises:
        ValueError: an unknown name.
        TokenizerUnavailable: ``jieba`` without the jieba package.
    """
    if name == "default":
        return tokenize
    if name == "jieba":
        _load_jieba()
        return tokenize_jieba
    raise ValueError(f"unknown tokenizer {name!r} (one of: {', '.join(TOKENIZERS)})")


class Vocabulary:
    """A bounded map from tokens to dense ids 0, 1, 2, ... in order of first appearance.

    When adding a document would take the vocabulary past ``max_terms``, :meth:`add_document`
    raises ``ValueError`` and adds none of that document's new tokens.
    """

    __slots__ = ("_ids", "_terms", "max_terms")

    def __init__(self, max_terms: int = DEFAULT_MAX_TERMS) -> None:
        if not isinstance(max_terms, int) or isinstance(max_terms, bool):
            raise TypeError(f"max_terms must be an int, got {type(max_terms).__name__}")
        if max_terms < 1:
            raise ValueError(f"max_terms must be at least 1, got {max_terms}")
        self.max_terms = max_terms
        self._ids: dict[str, int] = {}
        self._terms: list[str] = []

    def __len__(self) -> int:
        return len(self._terms)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __repr__(self) -> str:
        return f"Vocabulary({len(self._terms)} terms, max_terms={self.max_terms})"

    def add_document(self, tokens: Iterable[str]) -> list[int]:
        """The ids of ``tokens``, giving new ids to tokens not seen before.

        Raises:
            TypeError: a token is not a str.
            ValueError: the new tokens would exceed ``max_terms`` (nothing is added).
        """
        tokens = list(tokens)
        ids = self._ids
        new: dict[str, None] = {}
        for token in tokens:
            if not isinstance(token, str):
                raise TypeError(f"tokens must be str, got {type(token).__name__}")
            if token not in ids:
                new[token] = None
        if len(self._terms) + len(new) > self.max_terms:
            raise ValueError(
                f"vocabulary full: {len(new)} new terms would exceed max_terms={self.max_terms} "
                f"({len(self._terms)} in use)"
            )
        for token in new:
            ids[token] = len(self._terms)
            self._terms.append(token)
        return [ids[token] for token in tokens]

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        """The ids of the known ``tokens``, in order; unknown tokens are left out."""
        get = self._ids.get
        return [i for i in map(get, tokens) if i is not None]

    def term(self, token_id: int) -> str:
        """The token of ``token_id``.

        Raises:
            IndexError: no such id.
        """
        if not 0 <= token_id < len(self._terms):
            raise IndexError(f"token id {token_id} not in vocabulary of {len(self._terms)}")
        return self._terms[token_id]
