"""kefu._core.tfidf: TF-IDF retrieval, over both implementations.

Scores are checked against scikit-learn's TfidfVectorizer on real questions (BANKING77 in
English, AFQMC in Chinese); edge cases and bad input against both implementations; and the
twin against the compiled module on random corpora (hypothesis), where they must agree exactly.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import linear_kernel

from kefu.text import Vocabulary, tokenize

# ---------------------------------------------------------------------------------------------
# Real data, compared with scikit-learn.


class Corpus:
    """Token lists of documents and queries, as strings (for scikit-learn) and ids (for kefu)."""

    def __init__(self, docs: list[list[str]], queries: list[list[str]]) -> None:
        vocab = Vocabulary()
        self.doc_tokens = docs
        self.doc_ids = [vocab.add_document(d) for d in docs]
        # scikit-learn drops tokens outside its vocabulary; so does lookup().
        kept = [(q, vocab.lookup(q)) for q in queries]
        kept = [(q, ids) for q, ids in kept if ids]
        self.query_tokens = [q for q, _ in kept]
        self.query_ids = [ids for _, ids in kept]
        self._sklearn: dict[tuple[bool, bool], np.ndarray] = {}
        self._indexes: dict[tuple[str, bool, bool], Any] = {}

    def sklearn_scores(self, sublinear_tf: bool, smooth_idf: bool) -> np.ndarray:
        key = (sublinear_tf, smooth_idf)
        if key not in self._sklearn:
            vec = TfidfVectorizer(
                analyzer=lambda d: d, norm="l2", sublinear_tf=sublinear_tf, smooth_idf=smooth_idf
            )
            x = vec.fit_transform(self.doc_tokens)
            self._sklearn[key] = linear_kernel(vec.transform(self.query_tokens), x)
        return self._sklearn[key]

    def index(self, impl: ModuleType, sublinear_tf: bool, smooth_idf: bool) -> Any:
        key = (impl.__name__, sublinear_tf, smooth_idf)
        if key not in self._indexes:
            self._indexes[key] = impl.TfidfIndex.build(
                self.doc_ids, sublinear_tf=sublinear_tf, smooth_idf=smooth_idf
            )
        return self._indexes[key]


@functools.cache
def banking77(data: str) -> Corpus:
    def texts(name: str) -> list[str]:
        with open(os.path.join(data, "banking77", name), newline="", encoding="utf-8") as fh:
            return [row["text"] for row in csv.DictReader(fh)]

    train = texts("train.csv")
    test = texts("test.csv")
    assert len(train) > 10_000
    return Corpus([tokenize(t) for t in train], [tokenize(t) for t in test[::10]])


@functools.cache
def afqmc(data: str) -> Corpus:
    with open(os.path.join(data, "afqmc", "train.txt"), encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for _, line in zip(range(2000), fh, strict=False)]
    return Corpus([tokenize(r[0]) for r in rows], [tokenize(r[1]) for r in rows[:150]])


def assert_same_ranking(
    ids: np.ndarray, scores: np.ndarray, reference: np.ndarray, k: int, tol: float = 1e-5
) -> None:
    """``ids`` is the top ``k`` of ``reference`` (a stable argsort: ties to the smaller id).

    Where the two rankings differ, the two documents must score the same in ``reference``
    within ``tol``: float32 rounding may order documents that float64 separates by less.
    """
    order = np.argsort(-reference, kind="stable")[:k]
    expected = order[reference[order] > 0]
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert len(ids) == len(expected)
    np.testing.assert_allclose(scores, reference[expected], rtol=0, atol=tol)
    for got, want in zip(ids, expected, strict=True):
        if got != want:
            assert abs(reference[got] - reference[want]) <= tol


@pytest.mark.parametrize("sublinear_tf", [False, True], ids=["raw-tf", "sublinear-tf"])
@pytest.mark.parametrize("smooth_idf", [True, False], ids=["smooth", "plain"])
def test_banking77_scores_equal_sklearn(
    tfidf_impl: ModuleType, shared_data: str, sublinear_tf: bool, smooth_idf: bool
) -> None:
    corpus = banking77(shared_data)
    reference = corpus.sklearn_scores(sublinear_tf, smooth_idf)
    index = corpus.index(tfidf_impl, sublinear_tf, smooth_idf)
    assert index.n_docs == len(corpus.doc_ids)
    assert len(corpus.query_ids) >= 300
    for i, query in enumerate(corpus.query_ids):
        np.testing.assert_allclose(index.scores(query), reference[i], rtol=0, atol=1e-5)
        ids, scores = index.query(query, k=10)
        assert_same_ranking(ids, scores, reference[i], 10)


def test_banking77_idf_equals_sklearn(tfidf_impl: ModuleType, shared_data: str) -> None:
    corpus = banking77(shared_data)
    vec = TfidfVectorizer(analyzer=lambda d: d).fit(corpus.doc_tokens)
    index = corpus.index(tfidf_impl, False, True)
    vocab = Vocabulary()
    for doc in corpus.doc_tokens:
        vocab.add_document(doc)
    ours = index.idf
    assert ours.dtype == np.float32 and ours.shape == (len(vocab),)
    for term, column in vec.vocabulary_.items():
        assert ours[vocab.lookup([term])[0]] == pytest.approx(vec.idf_[column], rel=1e-6)


def test_afqmc_chinese_scores_equal_sklearn(tfidf_impl: ModuleType, shared_data: str) -> None:
    corpus = afqmc(shared_data)
    reference = corpus.sklearn_scores(False, True)
    index = corpus.index(tfidf_impl, False, True)
    for i, query in enumerate(corpus.query_ids):
        np.testing.assert_allclose(index.scores(query), reference[i], rtol=0, atol=1e-5)
        ids, scores = index.query(query, k=5)
        assert_same_ranking(ids, scores, reference[i], 5)


# ---------------------------------------------------------------------------------------------
# A small corpus worked by hand.

DOCS = [[0, 1, 2], [1, 1, 3], [], [2, 3, 3, 4], [1, 2, 0]]


def sklearn_scores(docs: list[list[int]], query: list[int], **kwargs: Any) -> np.ndarray:
    vec = TfidfVectorizer(analyzer=lambda d: d, **kwargs)
    x = vec.fit_transform([[str(t) for t in d] for d in docs])
    return linear_kernel(vec.transform([[str(t) for t in query]]), x)[0]


def test_build_reports_shape(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    assert (index.n_docs, index.n_terms, index.nnz) == (5, 5, 3 + 2 + 0 + 3 + 3)
    assert index.sublinear_tf is False and index.smooth_idf is True
    assert "n_docs=5" in repr(index)
    wide = tfidf_impl.TfidfIndex.build(DOCS, n_terms=9, sublinear_tf=True, smooth_idf=False)
    assert (wide.n_terms, wide.sublinear_tf, wide.smooth_idf) == (9, True, False)


def test_idf_formula(tfidf_impl: ModuleType) -> None:
    # df: term 0 -> 2, 1 -> 3, 2 -> 3, 3 -> 2, 4 -> 1; n = 5 documents; terms 5, 6 unseen.
    df = [2, 3, 3, 2, 1]
    smooth = tfidf_impl.TfidfIndex.build(DOCS, n_terms=7).idf
    plain = tfidf_impl.TfidfIndex.build(DOCS, n_terms=7, smooth_idf=False).idf
    assert smooth.dtype == np.float32 and smooth.shape == (7,)
    for t, f in enumerate(df):
        assert smooth[t] == np.float32(math.log(6 / (f + 1)) + 1)
        assert plain[t] == np.float32(math.log(5 / f) + 1)
    assert list(smooth[5:]) == [0.0, 0.0] and list(plain[5:]) == [0.0, 0.0]


@pytest.mark.parametrize("sublinear_tf", [False, True])
@pytest.mark.parametrize("smooth_idf", [True, False])
def test_small_corpus_equals_sklearn(
    tfidf_impl: ModuleType, sublinear_tf: bool, smooth_idf: bool
) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS, sublinear_tf=sublinear_tf, smooth_idf=smooth_idf)
    for query in ([1, 3], [3, 3, 3, 1], [0], [4, 4, 2], [0, 1, 2, 3, 4]):
        reference = sklearn_scores(DOCS, query, sublinear_tf=sublinear_tf, smooth_idf=smooth_idf)
        scores = index.scores(query)
        assert scores.dtype == np.float32 and scores.shape == (5,)
        np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-6)
        ids, top = index.query(query, k=5)
        assert_same_ranking(ids, top, reference, 5, tol=1e-6)


def test_document_matches_itself_with_score_one(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    for d in (0, 1, 3):
        ids, scores = index.query(DOCS[d], k=1)
        assert list(ids) == [d]
        assert scores[0] == pytest.approx(1.0, abs=1e-6) and scores[0] <= 1.0


def test_scores_never_exceed_one(tfidf_impl: ModuleType) -> None:
    # Many equal terms: the float32 sum of the products lands on either side of 1.
    docs = [list(range(n)) for n in range(1, 60)]
    index = tfidf_impl.TfidfIndex.build(docs)
    for doc in docs:
        assert float(index.scores(doc).max()) <= 1.0
        _, scores = index.query(doc, k=3)
        assert float(scores.max()) <= 1.0 and scores[0] == pytest.approx(1.0, abs=1e-6)


def test_ties_go_to_the_smaller_doc_id(tfidf_impl: ModuleType) -> None:
    docs = [[5], [1, 2], [3], [2, 1], [1, 2], [4]]
    index = tfidf_impl.TfidfIndex.build(docs)
    ids, scores = index.query([1, 2], k=10)
    assert list(ids) == [1, 3, 4]
    assert scores[0] == scores[1] == scores[2]
    ids, _ = index.query([2, 1], k=2)
    assert list(ids) == [1, 3]


def test_ranking_best_first(tfidf_impl: ModuleType) -> None:
    docs = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [9]]
    index = tfidf_impl.TfidfIndex.build(docs)
    ids, scores = index.query([0, 1, 2, 3], k=3)
    assert list(ids) == [3, 2, 1]
    assert scores[0] > scores[1] > scores[2] > 0


def test_k_larger_than_matches_returns_only_matches(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    ids, scores = index.query([4], k=100)
    assert list(ids) == [3] and scores.shape == (1,)
    ids, _ = index.query([1], k=10**30)
    assert sorted(ids) == [0, 1, 4]


def test_k_one(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    ids, scores = index.query([1, 3], k=1)
    best = int(np.argmax(index.scores([1, 3])))
    assert list(ids) == [best] and scores[0] == index.scores([1, 3])[best]


def test_query_of_unseen_terms_is_empty(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS, n_terms=8)
    ids, scores = index.query([6, 7, 7], k=3)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert ids.shape == (0,) and scores.shape == (0,)
    assert not index.scores([6, 7]).any()
    terms, weights = index.query_vector([7])
    assert terms.shape == (0,) and weights.shape == (0,)
    # An unseen term weighs nothing next to a seen one, as in scikit-learn.
    np.testing.assert_array_equal(index.scores([1, 6]), index.scores([1]))


def test_empty_documents_never_match(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build([[], [0], [], [0, 1]])
    assert index.nnz == 3
    assert list(index.query([0, 1], k=10)[0]) == [3, 1]
    assert index.scores([0])[[0, 2]].tolist() == [0.0, 0.0]
    nothing = tfidf_impl.TfidfIndex.build([[], []], n_terms=3)
    assert (nothing.n_docs, nothing.nnz) == (2, 0)
    assert nothing.query([1], k=2)[0].shape == (0,)
    none = tfidf_impl.TfidfIndex.build([])
    assert (none.n_docs, none.n_terms, none.nnz) == (0, 0, 0)


def test_one_document(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build([[0, 1, 1]])
    ids, scores = index.query([1], k=5)
    # idf is 1 for both terms; the document is (1, 2) / sqrt(5).
    assert list(ids) == [0]
    assert scores[0] == pytest.approx(2 / math.sqrt(5), abs=1e-6)


def test_duplicate_tokens_count(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    assert not np.array_equal(index.scores([1, 3]), index.scores([1, 1, 3]))
    np.testing.assert_array_equal(index.scores([3, 1, 1]), index.scores([1, 1, 3]))
    reference = sklearn_scores(DOCS, [1, 1, 3])
    np.testing.assert_allclose(index.scores([1, 1, 3]), reference, atol=1e-6)


def test_query_vector_is_normalised(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS, n_terms=6)
    terms, weights = index.query_vector([3, 1, 5, 3])
    assert terms.dtype == np.int32 and weights.dtype == np.float32
    assert list(terms) == [1, 3]
    assert float(np.sum(weights.astype(np.float64) ** 2)) == pytest.approx(1.0, abs=1e-6)
    idf = index.idf
    assert weights[1] / weights[0] == pytest.approx(2 * idf[3] / idf[1], rel=1e-6)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64])
def test_numpy_integer_arrays_as_tokens(tfidf_impl: ModuleType, dtype: Any) -> None:
    as_arrays = [np.asarray(d, dtype=dtype) for d in DOCS]
    index = tfidf_impl.TfidfIndex.build(as_arrays)
    lists = tfidf_impl.TfidfIndex.build(DOCS)
    assert index.nnz == lists.nnz
    query = np.asarray([1, 3, 3], dtype=dtype)
    np.testing.assert_array_equal(index.scores(query), lists.scores([1, 3, 3]))
    for got, want in zip(index.query(query[::-1], k=3), lists.query([3, 3, 1], k=3), strict=True):
        np.testing.assert_array_equal(got, want)
    # Numpy integer scalars in a list, and other iterables, read the same.
    np.testing.assert_array_equal(index.scores(list(query)), lists.scores((1, 3, 3)))
    np.testing.assert_array_equal(index.scores(iter([3, 1, 3])), lists.scores([1, 3, 3]))


def test_generators_are_accepted(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(iter(d) for d in DOCS)
    assert (index.n_docs, index.nnz) == (5, 11)


@pytest.mark.parametrize(
    ("docs", "kwargs", "error", "match"),
    [
        (5, {}, TypeError, "docs must be a sequence"),
        ([[0], 7], {}, TypeError, r"docs\[1\] must be a sequence of token ids, got int"),
        ([[0, 1.0]], {}, TypeError, r"docs\[0\]\[1\]: token ids must be integers, got float"),
        ([["a"]], {}, TypeError, "must be integers, got str"),
        (["ab"], {}, TypeError, "must be integers, got str"),
        ([[0, None]], {}, TypeError, "must be integers, got NoneType"),
        ([np.array([1.0])], {}, TypeError, "must be integers"),
        ([[0], [2, -1]], {}, ValueError, r"docs\[1\]\[1\]: token id -1 is negative"),
        ([np.array([0, -3])], {}, ValueError, "token id -3 is negative"),
        ([[0, 5]], {"n_terms": 5}, ValueError, "token id 5 is out of range for n_terms=5"),
        ([[2**40]], {}, ValueError, "out of range"),
        ([[2**70]], {}, ValueError, "out of range"),
        ([[-(2**70)]], {}, ValueError, "is negative"),
        ([np.array([2**63], dtype=np.uint64)], {"n_terms": 4}, ValueError, "out of range"),
        ([[0]], {"n_terms": -1}, ValueError, "n_terms must be in"),
        ([[0]], {"n_terms": 2**40}, ValueError, "n_terms must be in"),
        ([[0]], {"n_terms": 3.0}, TypeError, "n_terms must be an int"),
        ([[0]], {"sublinear_tf": 1}, TypeError, "sublinear_tf must be a bool"),
        ([[0]], {"smooth_idf": None}, TypeError, "smooth_idf must be a bool"),
    ],
)
def test_build_rejects_bad_input(
    tfidf_impl: ModuleType, docs: Any, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        tfidf_impl.TfidfIndex.build(docs, **kwargs)


def test_max_terms_bound(tfidf_impl: ModuleType) -> None:
    limit = tfidf_impl.MAX_TERMS
    assert limit == 1 << 22 and tfidf_impl.MAX_DOCS == 2**31 - 1
    with pytest.raises(ValueError, match="MAX_TERMS"):
        tfidf_impl.TfidfIndex.build([[limit]])
    with pytest.raises(ValueError, match="n_terms must be in"):
        tfidf_impl.TfidfIndex.build([[0]], n_terms=limit + 1)


def test_index_is_built_only_by_build(tfidf_impl: ModuleType) -> None:
    with pytest.raises(TypeError, match=r"TfidfIndex\.build"):
        tfidf_impl.TfidfIndex()


def test_index_is_read_only(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    for name in ("n_docs", "n_terms", "nnz", "sublinear_tf", "smooth_idf", "idf"):
        with pytest.raises(AttributeError):
            setattr(index, name, 1)
    index.idf[:] = 0  # a copy: the index keeps its own
    assert index.idf.all()
    assert index.n_docs == 5


@pytest.mark.parametrize(
    ("tokens", "k", "error", "match"),
    [
        ([], 5, ValueError, "tokens must not be empty"),
        (np.array([], dtype=np.int64), 5, ValueError, "tokens must not be empty"),
        (3, 5, TypeError, "tokens must be a sequence of token ids, got int"),
        ([1, "2"], 5, TypeError, r"tokens\[1\]: token ids must be integers, got str"),
        ([1.5], 5, TypeError, "must be integers, got float"),
        ([np.float64(1)], 5, TypeError, "must be integers"),
        ([np.True_], 5, TypeError, "must be integers, got bool"),
        ([1, -2], 5, ValueError, r"tokens\[1\]: token id -2 is negative"),
        ([5], 5, ValueError, "token id 5 is out of range for n_terms=5"),
        (np.array([1, 9]), 5, ValueError, r"tokens\[1\]: token id 9 is out of range"),
        ([1], 0, ValueError, "k must be at least 1, got 0"),
        ([1], -3, ValueError, "k must be at least 1"),
        ([1], 1.5, TypeError, "k must be an int, got float"),
        ([1], "3", TypeError, "k must be an int, got str"),
        ([1], None, TypeError, "k must be an int"),
    ],
)
def test_query_rejects_bad_input(
    tfidf_impl: ModuleType, tokens: Any, k: Any, error: type, match: str
) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    with pytest.raises(error, match=match):
        index.query(tokens, k=k)
    if k == 5:  # the same token checks in every method that reads a query
        for method in (index.scores, index.query_vector):
            with pytest.raises(error, match=match):
                method(tokens)
    # A rejected query leaves nothing behind.
    np.testing.assert_array_equal(index.query([1, 3])[0], [1, 3, 0, 4])


def test_queries_do_not_leak_into_each_other(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    first = index.query([1, 3], k=5)
    index.scores([0, 4])
    index.query([2], k=1)
    for got, want in zip(index.query([1, 3], k=5), first, strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Grouped queries (a knowledge-base entry is a group of phrasings).


def brute_force_grouped(
    scores: np.ndarray, groups: np.ndarray, k: int
) -> tuple[list[int], list[int], list[float]]:
    best: dict[int, tuple[float, int]] = {}
    for d, s in enumerate(scores.tolist()):
        if s > 0:
            g = int(groups[d])
            if g not in best or s > best[g][0]:  # ascending d: the first best doc stays
                best[g] = (s, d)
    top = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [g for g, _ in top], [d for _, (_, d) in top], [s for _, (s, _) in top]


def test_query_grouped_equals_brute_force(tfidf_impl: ModuleType) -> None:
    rng = np.random.default_rng(7)
    docs = [list(rng.integers(0, 30, size=rng.integers(0, 9))) for _ in range(400)]
    index = tfidf_impl.TfidfIndex.build(docs)
    for trial in range(60):
        groups = rng.integers(0, [5, 50, 400, 2**31 - 1][trial % 4], size=400).astype(np.int32)
        query = list(rng.integers(0, 30, size=rng.integers(1, 6)))
        k = int(rng.integers(1, 12))
        got_groups, got_docs, got_scores = index.query_grouped(query, groups, k)
        assert got_groups.dtype == got_docs.dtype == np.int32 and got_scores.dtype == np.float32
        want = brute_force_grouped(index.scores(query), groups, k)
        assert got_groups.tolist() == want[0]
        assert got_docs.tolist() == want[1]
        assert got_scores.tolist() == want[2]


def test_query_grouped_best_phrasing_wins(tfidf_impl: ModuleType) -> None:
    docs = [[0, 1], [2], [0], [0, 1], [3, 4]]
    groups = np.array([10, 10, 7, 3, 7], dtype=np.int32)
    index = tfidf_impl.TfidfIndex.build(docs)
    g, d, s = index.query_grouped([0, 1], groups, k=5)
    # Docs 0 and 3 tie for first: groups 3 and 10 tie, the smaller group id first; group 7's
    # best phrasing is doc 2.
    assert g.tolist() == [3, 10, 7] and d.tolist() == [3, 0, 2]
    assert s[0] == s[1] > s[2] > 0
    g, d, _ = index.query_grouped([0, 1], groups, k=1)
    assert g.tolist() == [3] and d.tolist() == [3]


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ([0, 0, 0, 0, 0], TypeError, "groups must be an int32 array, got list"),
        (np.zeros(5, dtype=np.int64), TypeError, "groups must be an int32 array, got dtype int64"),
        (np.zeros(5, dtype=np.uint32), TypeError, "int32"),
        (np.zeros(4, dtype=np.int32), ValueError, "groups has length 4, the index has 5 docs"),
        (np.zeros((5, 1), dtype=np.int32), ValueError, "groups must be 1-D"),
        (np.zeros(10, dtype=np.int32)[::2], ValueError, "groups must be contiguous"),
        (np.array([0, 0, 0, -1, 0], dtype=np.int32), ValueError, r"groups\[3\] is negative"),
    ],
)
def test_query_grouped_rejects_bad_groups(
    tfidf_impl: ModuleType, groups: Any, error: type, match: str
) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    with pytest.raises(error, match=match):
        index.query_grouped([1, 3], groups, k=3)
    # A failed grouped query leaves the score accumulator clean.
    np.testing.assert_array_equal(index.query([1, 3])[0], [1, 3, 0, 4])


def test_query_grouped_ignores_groups_of_unreached_docs(tfidf_impl: ModuleType) -> None:
    index = tfidf_impl.TfidfIndex.build(DOCS)
    groups = np.array([0, 1, -5, 2, 3], dtype=np.int32)  # doc 2 is empty: never reached
    g, d, _ = index.query_grouped([4], groups, k=3)
    assert g.tolist() == [2] and d.tolist() == [3]
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.query_grouped([4], groups, k=0)


def test_debug_counters(tfidf_impl: ModuleType) -> None:
    counters = tfidf_impl.debug_counters()
    if "live_indexes" not in counters:  # the twin and release builds keep none
        assert counters == {}
        return
    before = counters["live_indexes"]
    index = tfidf_impl.TfidfIndex.build(DOCS)
    assert tfidf_impl.debug_counters()["live_indexes"] == before + 1
    del index
    assert tfidf_impl.debug_counters()["live_indexes"] == before


# ---------------------------------------------------------------------------------------------
# The twin against the compiled module: same ids, same scores, same errors.


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        result = fn()
    except (TypeError, ValueError) as exc:
        return ("raised", type(exc), str(exc))
    if isinstance(result, tuple):
        return tuple(np.asarray(r) for r in result)
    return np.asarray(result)


def assert_same_outcome(a: Any, b: Any) -> None:
    if isinstance(a, tuple) and a and isinstance(a[0], str):
        assert a == b
        return
    assert type(a) is type(b)
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    for x, y in pairs:
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype == np.float32:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


token_id = st.integers(min_value=-2, max_value=24)


@st.composite
def corpora(draw: st.DrawFn) -> dict[str, Any]:
    n_terms = draw(st.none() | st.integers(0, 22))
    upper = 20 if n_terms is None else max(n_terms - 1, 0)
    good = st.integers(0, upper)
    # Documents drawn partly from a small pool, so that equal documents (exact score ties,
    # broken by the smaller id) are common.
    pool = draw(st.lists(st.lists(good, max_size=6), min_size=1, max_size=4))
    docs = draw(st.lists(st.sampled_from(pool) | st.lists(good, max_size=9), max_size=14))
    docs = [list(d) for d in docs]
    if draw(st.booleans()) and docs:  # sometimes a bad id somewhere
        docs[draw(st.integers(0, len(docs) - 1))].append(draw(token_id))
    return {
        "docs": docs,
        "n_terms": n_terms,
        "sublinear_tf": draw(st.booleans()),
        "smooth_idf": draw(st.booleans()),
    }


# The pair fixture holds two modules and no state, so sharing it across examples is safe.
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    corpus=corpora(),
    queries=st.lists(
        st.tuples(st.lists(token_id, max_size=7), st.integers(-1, 9), st.integers(0, 2**31 - 1)),
        min_size=1,
        max_size=6,
    ),
)
def test_twin_and_compiled_agree(
    tfidf_pair: tuple[ModuleType, ModuleType],
    corpus: dict[str, Any],
    queries: list[tuple[list[int], int, int]],
) -> None:
    py, c = tfidf_pair
    indexes, errors = [], []
    for m in (py, c):
        try:
            indexes.append(m.TfidfIndex.build(**corpus))
        except (TypeError, ValueError) as exc:
            errors.append((type(exc), str(exc)))
    if errors:  # both raised, alike
        assert len(errors) == 2 and errors[0] == errors[1]
        return
    a, b = indexes
    assert (a.n_docs, a.n_terms, a.nnz) == (b.n_docs, b.n_terms, b.nnz)
    np.testing.assert_array_equal(a.idf, b.idf)
    for tokens, k, seed in queries:
        groups = np.random.default_rng(seed).integers(-1, 4, size=a.n_docs).astype(np.int32)
        results = [
            (
                outcome(functools.partial(ix.query, tokens, k=k)),
                outcome(functools.partial(ix.scores, tokens)),
                outcome(functools.partial(ix.query_vector, tokens)),
                outcome(functools.partial(ix.query_grouped, tokens, groups, k=k)),
                outcome(functools.partial(ix.query_grouped, tokens, np.abs(groups), k=k)),
            )
            for ix in indexes
        ]
        for x, y in zip(*results, strict=True):
            assert_same_outcome(x, y)
        # Ids come out in exactly the same order (ties included) and scores bit for bit.
        if isinstance(results[0][0], tuple) and not isinstance(results[0][0][0], str):
            assert results[0][0][0].tolist() == results[1][0][0].tolist()
            assert results[0][0][1].tobytes() == results[1][0][1].tobytes()
