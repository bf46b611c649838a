"""Pure-Python twin of :mod:`kefu._core.tfidf`: the same API, the same results.

TF-IDF retrieval over documents of token ids, with weights exactly as scikit-learn's
``TfidfVectorizer(norm="l2", use_idf=True)`` (computed in float64, stored in float32), and the
float32 dense kernels ``dot`` / ``matvec`` (numpy here, SIMD in the compiled module).

Scores equal the compiled module's bit for bit: both compute query and document weights in
float64 in the same order, round them to float32, and add the query's postings term by term
(ascending term id) into a float32 accumulator. Results are ordered best first, ties broken by
the smaller id, so the two implementations return the same ids in the same order.

This module is the test oracle of the compiled one and its fallback when kefu is built with
``KEFU_NO_EXTENSIONS=1``. It ignores ``KEFU_SIMD`` (its one kernel is ``"numpy"``).
"""

from __future__ import annotations

import math
import operator
import os
import sys
from collections import Counter
from collections.abc import Iterable
from typing import SupportsIndex

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_DOCS",
    "MAX_TERMS",
    "MAX_THREADS",
    "TfidfIndex",
    "debug_counters",
    "dot",
    "matvec",
    "set_simd_impl",
    "simd_impl",
    "simd_impls",
]

#: Document ids are int32.
MAX_DOCS = 2**31 - 1
#: The index keeps per-term arrays for every id below ``n_terms``, so ``n_terms`` is capped.
MAX_TERMS = 1 << 22
#: The most threads one ``matvec`` uses in the compiled module (the caller and 63 workers).
MAX_THREADS = 64

Int32Array = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]
Tokens = Iterable[SupportsIndex]

_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
_INT_CODES = frozenset("bBhHiIlLqQnN")


def debug_counters() -> dict[str, int]:
    """Always ``{}``: the twin keeps no debug counters (a release build returns ``{}`` too)."""
    return {}


# ---------------------------------------------------------------------------------------------
# Dense kernels.


def simd_impl() -> str:
    """The dense kernel in use: always ``"numpy"`` here."""
    return "numpy"


def simd_impls() -> list[str]:
    """The dense kernels available: ``["numpy"]``."""
    return ["numpy"]


def set_simd_impl(name: str) -> None:
    """Select a kernel by name: only ``"numpy"`` (or ``"auto"``) exists here.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: no such kernel here.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in ("numpy", "auto"):
        raise ValueError(f"unknown SIMD kernel {name!r}; this CPU runs {simd_impls()}")


def _format_code(fmt: str) -> str:
    return fmt[1:] if fmt[:1] in ("@", "=", _NATIVE_ORDER) else fmt


def _describe(obj: object, view: memoryview) -> str:
    if isinstance(obj, np.ndarray):
        return f"dtype {obj.dtype}"
    return f"buffer format {view.format!r}"


def _buffer(obj: object) -> memoryview | None:
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def _float32(obj: object, name: str) -> Float32Array:
    view = _buffer(obj)
    if view is None:
        raise TypeError(f"{name} must be a float32 array, got {type(obj).__name__}")
    if _format_code(view.format) != "f" or view.itemsize != 4:
        raise TypeError(f"{name} must be a float32 array, got {_describe(obj, view)}")
    arr: Float32Array = np.asarray(view)  # the same memory, shape and strides
    if arr.ctypes.data % 4:
        raise ValueError(f"{name} is not aligned to 4 bytes")
    return arr


def _vector(obj: object, name: str) -> Float32Array:
    arr = _float32(obj, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {arr.ndim}-D")
    if arr.shape[0] > 1 and arr.strides[0] != 4:
        raise ValueError(f"{name} must be contiguous, got a stride of {arr.strides[0]} bytes")
    return arr


def _matrix(obj: object, name: str) -> Float32Array:
    arr = _float32(obj, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {arr.ndim}-D")
    rows, cols = arr.shape
    if cols > 1 and arr.strides[1] != 4:
        raise ValueError(
            f"{name} rows must be contiguous (column stride 4 bytes), got {arr.strides[1]} bytes"
        )
    if rows > 1 and arr.strides[0] % 4:
        raise ValueError(f"{name} row stride must be a multiple of 4 bytes, got {arr.strides[0]}")
    return arr


def dot(a: Float32Array, b: Float32Array) -> float:
    """Dot product of two 1-D contiguous float32 arrays of the same length.

    Raises:
        TypeError: an argument is not a float32 array (float64 is refused, not cast).
        ValueError: not 1-D, not contiguous, not 4-byte aligned, or the lengths differ.
    """
    x = _vector(a, "a")
    y = _vector(b, "b")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"a and b differ in length: {x.shape[0]} != {y.shape[0]}")
    return float(np.dot(x, y))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_threads(threads: object) -> int:
    """``threads`` as a count in [1, MAX_THREADS]; ``None``: the CPUs this process may use."""
    if threads is None:
        return min(_usable_cpus(), MAX_THREADS)
    if isinstance(threads, bool) or not hasattr(type(threads), "__index__"):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    value = operator.index(threads)  # type: ignore[arg-type]
    if value < 1:
        raise ValueError(f"threads must be at least 1, got {value}")
    return min(value, MAX_THREADS)


def matvec(
    matrix: Float32Array,
    vec: Float32Array,
    out: Float32Array | None = None,
    *,
    threads: int | None = 1,
) -> Float32Array:
    """``matrix @ vec`` in float32, written to ``out`` (a new array when ``None``).

    ``matrix`` is 2-D with contiguous rows and any row stride (a slice of a bigger matrix
    needs no copy); ``vec`` is 1-D contiguous with one value per column; ``out`` is a 1-D
    contiguous writable float32 numpy array with one value per row, which may overlap the
    inputs.

    ``threads`` is checked as in the compiled module, which shares the rows of a large matrix
    between that many threads; here numpy computes the product (with its BLAS's own threads).

    Raises:
        TypeError: an argument is not float32 (float64 is refused, not cast), or ``out`` is not
            a numpy array; ``threads`` is not an int or None.
        ValueError: wrong dimensions, strides, alignment or lengths; ``out`` read-only;
            ``threads`` < 1.
    """
    _check_threads(threads)
    m = _matrix(matrix, "matrix")
    v = _vector(vec, "vec")
    rows, cols = m.shape
    if v.shape[0] != cols:
        raise ValueError(f"vec has length {v.shape[0]}, matrix has {cols} columns")
    result: Float32Array = np.dot(m, v) if rows and cols else np.zeros(rows, np.float32)
    if out is None:
        return result
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy float32 array, got {type(out).__name__}")
    dest = _vector(out, "out")
    if not dest.flags.writeable:
        raise ValueError("out is read-only")
    if dest.shape[0] != rows:
        raise ValueError(f"out has length {dest.shape[0]}, matrix has {rows} rows")
    out[...] = result
    return out


# ---------------------------------------------------------------------------------------------
# Token ids.


def _where(doc: int, pos: int) -> str:
    return f"tokens[{pos}]" if doc < 0 else f"docs[{doc}][{pos}]"


def _bad_id(doc: int, pos: int, value: int, n_terms: int) -> ValueError:
    where = _where(doc, pos)
    if value < 0:
        return ValueError(f"{where}: token id {value} is negative")
    if n_terms < 0:
        return ValueError(f"{where}: token id {value} is out of range (MAX_TERMS={MAX_TERMS})")
    return ValueError(f"{where}: token id {value} is out of range for n_terms={n_terms}")


def _token_ids(tokens: object, n_terms: int, doc: int) -> list[int]:
    """The ids of ``tokens``, each checked against ``n_terms`` (``-1``: against MAX_TERMS).

    ``doc`` is the document's index, or -1 for a query (it only shapes error messages).
    """
    upper = n_terms if n_terms >= 0 else MAX_TERMS
    seq: list[object] | tuple[object, ...]
    if type(tokens) is list or type(tokens) is tuple:
        seq = tokens
    else:
        try:
            it = iter(tokens)  # type: ignore[call-overload]
        except TypeError:
            what = "tokens" if doc < 0 else f"docs[{doc}]"
            raise TypeError(
                f"{what} must be a sequence of token ids, got {type(tokens).__name__}"
            ) from None
        seq = list(it)
    ids: list[int] = []
    for pos, tok in enumerate(seq):
        if type(tok) is int:
            value = tok
        elif hasattr(type(tok), "__index__"):
            value = operator.index(tok)  # type: ignore[arg-type]
        else:
            raise TypeError(
                f"{_where(doc, pos)}: token ids must be integers, got {type(tok).__name__}"
            )
        if value < 0 or value >= upper:
            raise _bad_id(doc, pos, value, n_terms)
        ids.append(value)
    return ids


def _check_k(k: object) -> int:
    if not hasattr(type(k), "__index__"):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    value = operator.index(k)  # type: ignore[arg-type]
    if value < 1:
        raise ValueError(f"k must be at least 1, got {value}")
    return min(value, MAX_DOCS)


def _tf(count: int, sublinear: bool) -> float:
    return 1.0 + math.log(count) if sublinear else float(count)


# ---------------------------------------------------------------------------------------------
# The index.


class TfidfIndex:
    """TF-IDF vectors of documents of token ids, searched by cosine similarity.

    Built once by :meth:`build`, then read-only. The postings (for each term, the documents
    containing it and their weights) are contiguous arrays, and a query walks only its own
    terms' postings, so its cost grows with those postings, not with the number of documents.
    """

    __slots__ = (
        "_idf",
        "_n_docs",
        "_n_terms",
        "_nnz",
        "_post_docs",
        "_post_weights",
        "_smooth_idf",
        "_sublinear_tf",
        "_term_ptr",
    )

    _n_docs: int
    _n_terms: int
    _nnz: int
    _sublinear_tf: bool
    _smooth_idf: bool
    _idf: list[float]
    _term_ptr: npt.NDArray[np.intp]
    _post_docs: Int32Array
    _post_weights: Float32Array

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("build a TfidfIndex with TfidfIndex.build(docs, ...)")

    @classmethod
    def build(
        cls,
        docs: Iterable[Tokens],
        n_terms: int | None = None,
        *,
        sublinear_tf: bool = False,
        smooth_idf: bool = True,
    ) -> TfidfIndex:
        """Index ``docs``, each a sequence of token ids (ints ≥ 0, numpy integers accepted).

        Weights are scikit-learn's ``TfidfVectorizer(norm="l2")``: tf is the raw count (or
        ``1 + ln(count)`` with ``sublinear_tf``), idf is ``ln((1 + n) / (1 + df)) + 1`` (or
        ``ln(n / df) + 1`` without ``smooth_idf``), and each document vector is L2-normalised.
        A term no document contains has idf 0: it matches nothing and weighs nothing in a
        query, like a word missing from scikit-learn's vocabulary. An empty document is
        allowed: it never matches.

        Args:
            docs: the documents; document ``i`` gets id ``i``.
            n_terms: the vocabulary size; ``None`` for the largest id + 1. At most MAX_TERMS.

        Raises:
            TypeError: ``docs`` or a document is not iterable, a token is not an integer, a
                flag is not a bool, ``n_terms`` is not an int.
            ValueError: a negative id, an id ≥ ``n_terms`` (or ≥ MAX_TERMS), ``n_terms`` out
                of range, more than MAX_DOCS documents.
        """
        if not isinstance(sublinear_tf, bool):
            raise TypeError(f"sublinear_tf must be a bool, got {type(sublinear_tf).__name__}")
        if not isinstance(smooth_idf, bool):
            raise TypeError(f"smooth_idf must be a bool, got {type(smooth_idf).__name__}")
        limit = -1
        if n_terms is not None:
            if not hasattr(type(n_terms), "__index__"):
                raise TypeError(f"n_terms must be an int or None, got {type(n_terms).__name__}")
            limit = operator.index(n_terms)
            if limit < 0 or limit > MAX_TERMS:
                raise ValueError(f"n_terms must be in [0, {MAX_TERMS}], got {limit}")
        try:
            it = iter(docs)
        except TypeError:
            raise TypeError(
                f"docs must be a sequence of token-id sequences, got {type(docs).__name__}"
            ) from None
        doc_list = list(it)
        if len(doc_list) > MAX_DOCS:
            raise ValueError(f"at most {MAX_DOCS} documents, got {len(doc_list)}")
        doc_ids = [_token_ids(doc, limit, d) for d, doc in enumerate(doc_list)]

        self = object.__new__(cls)
        n_docs = len(doc_ids)
        self._n_docs = n_docs
        self._n_terms = n_terms_ = (
            limit if limit >= 0 else max((max(ids) for ids in doc_ids if ids), default=-1) + 1
        )
        self._sublinear_tf = sublinear_tf
        self._smooth_idf = smooth_idf

        # Distinct terms of each document in ascending id order (the order of its sum of
        # squares in both implementations), with their counts.
        entries = [sorted(Counter(ids).items()) for ids in doc_ids]
        df = [0] * n_terms_
        for items in entries:
            for t, _ in items:
                df[t] += 1
        idf = [0.0] * n_terms_
        for t, f in enumerate(df):
            if f:
                idf[t] = (
                    math.log((n_docs + 1) / (f + 1)) + 1.0
                    if smooth_idf
                    else math.log(n_docs / f) + 1.0
                )
        self._idf = idf

        terms: list[int] = []
        owners: list[int] = []
        weights: list[float] = []
        for d, items in enumerate(entries):
            raw = [_tf(c, sublinear_tf) * idf[t] for t, c in items]
            sumsq = 0.0
            for v in raw:
                sumsq += v * v
            norm = math.sqrt(sumsq)
            for (t, _), v in zip(items, raw, strict=True):
                terms.append(t)
                owners.append(d)
                weights.append(v / norm)
        self._nnz = len(terms)
        term_arr = np.asarray(terms, dtype=np.int64)
        order = np.argsort(term_arr, kind="stable")
        self._post_docs = np.asarray(owners, dtype=np.int32)[order]
        self._post_weights = np.asarray(weights, dtype=np.float64).astype(np.float32)[order]
        ptr = np.zeros(n_terms_ + 1, dtype=np.intp)
        np.cumsum(np.bincount(term_arr, minlength=n_terms_), out=ptr[1:])
        self._term_ptr = ptr
        return self

    def __repr__(self) -> str:
        return (
            f"TfidfIndex(n_docs={self.n_docs}, n_terms={self.n_terms}, nnz={self.nnz}, "
            f"sublinear_tf={self.sublinear_tf}, smooth_idf={self.smooth_idf})"
        )

    @property
    def n_docs(self) -> int:
        """How many documents were indexed (ids 0 .. n_docs - 1)."""
        return self._n_docs

    @property
    def n_terms(self) -> int:
        """The vocabulary size: valid token ids are 0 .. n_terms - 1."""
        return self._n_terms

    @property
    def nnz(self) -> int:
        """Stored postings: the distinct terms of every document, summed."""
        return self._nnz

    @property
    def sublinear_tf(self) -> bool:
        """Whether tf is ``1 + ln(count)`` rather than the raw count."""
        return self._sublinear_tf

    @property
    def smooth_idf(self) -> bool:
        """Whether idf is ``ln((1 + n) / (1 + df)) + 1`` rather than ``ln(n / df) + 1``."""
        return self._smooth_idf

    @property
    def idf(self) -> Float32Array:
        """A float32 copy of the idf of every term id (0 for terms no document contains)."""
        return np.asarray(self._idf, dtype=np.float64).astype(np.float32)

    def _query_terms(self, tokens: Tokens) -> tuple[list[int], list[np.float32]]:
        ids = _token_ids(tokens, self.n_terms, -1)
        if not ids:
            raise ValueError("tokens must not be empty")
        raw: list[tuple[int, float]] = []
        sumsq = 0.0
        for t, c in sorted(Counter(ids).items()):
            v = _tf(c, self.sublinear_tf) * self._idf[t]
            sumsq += v * v
            raw.append((t, v))
        norm = math.sqrt(sumsq)
        if norm == 0.0:
            return [], []
        kept = [(t, v) for t, v in raw if v != 0.0]
        return [t for t, _ in kept], [np.float32(v / norm) for _, v in kept]

    def _accumulate(self, tokens: Tokens) -> Float32Array:
        terms, weights = self._query_terms(tokens)
        acc = np.zeros(self.n_docs, dtype=np.float32)
        ptr = self._term_ptr
        for t, w in zip(terms, weights, strict=True):
            lo, hi = ptr[t], ptr[t + 1]
            # float32 product, then float32 sum: the compiled loop's arithmetic exactly.
            acc[self._post_docs[lo:hi]] += w * self._post_weights[lo:hi]
        return acc

    def query(self, tokens: Tokens, k: int = 5) -> tuple[Int32Array, Float32Array]:
        """The ``k`` documents most similar to ``tokens``: ``(doc_ids, scores)``, best first.

        The query is weighted like a document (tf of its tokens times idf, L2-normalised) and
        scored by cosine similarity in [0, 1]. Ties go to the smaller document id; documents
        scoring 0 are never returned, so fewer than ``k`` may come back (none when every
        query term has zero weight).

        Raises:
            TypeError: ``k`` or a token is not an integer, ``tokens`` is not iterable.
            ValueError: ``k`` < 1, ``tokens`` empty, a token id negative or ≥ ``n_terms``.
        """
        kk = _check_k(k)
        acc = self._accumulate(tokens)
        docs = np.flatnonzero(acc).astype(np.int32)
        scores = np.minimum(acc[docs], np.float32(1.0))
        order = np.lexsort((docs, -scores))[:kk]
        return docs[order], scores[order]

    def query_grouped(
        self, tokens: Tokens, groups: Int32Array, k: int = 5
    ) -> tuple[Int32Array, Int32Array, Float32Array]:
        """The ``k`` best groups of documents: ``(group_ids, doc_ids, scores)``, best first.

        ``groups[d]`` is the group (e.g. a knowledge-base entry) of document ``d`` (e.g. one
        phrasing of it); a group scores as its best document, which is the one returned (ties
        to the smaller document id). Groups tie-break by the smaller group id.

        Raises:
            TypeError: ``groups`` is not an int32 array; as :meth:`query`.
            ValueError: ``groups`` is not 1-D contiguous with one entry per document, a
                document the query reaches has a negative group; as :meth:`query`.
        """
        kk = _check_k(k)
        view = _buffer(groups)
        if view is None:
            raise TypeError(f"groups must be an int32 array, got {type(groups).__name__}")
        if _format_code(view.format) not in ("i", "l") or view.itemsize != 4:
            raise TypeError(f"groups must be an int32 array, got {_describe(groups, view)}")
        group_of: Int32Array = np.asarray(view).view(np.int32)
        if group_of.ndim != 1:
            raise ValueError(f"groups must be 1-D, got {group_of.ndim}-D")
        if group_of.shape[0] > 1 and group_of.strides[0] != 4:
            raise ValueError(
                f"groups must be contiguous, got a stride of {group_of.strides[0]} bytes"
            )
        if group_of.ctypes.data % 4:
            raise ValueError("groups is not aligned to 4 bytes")
        if group_of.shape[0] != self.n_docs:
            raise ValueError(
                f"groups has length {group_of.shape[0]}, the index has {self.n_docs} docs"
            )
        acc = self._accumulate(tokens)
        docs = np.flatnonzero(acc).astype(np.int32)
        scores = np.minimum(acc[docs], np.float32(1.0))
        g = group_of[docs]
        negative = docs[g < 0]
        if negative.size:
            bad = int(negative.min())
            raise ValueError(f"groups[{bad}] is negative ({int(group_of[bad])})")
        # Per group, its best document: sort by (group, score descending, doc), keep firsts.
        order = np.lexsort((docs, -scores, g))
        first = np.ones(order.size, dtype=bool)
        first[1:] = g[order][1:] != g[order][:-1]
        best = order[first]
        best_groups, best_docs, best_scores = g[best], docs[best], scores[best]
        top = np.lexsort((best_groups, -best_scores))[:kk]
        return (
            best_groups[top].astype(np.int32),
            best_docs[top].astype(np.int32),
            best_scores[top],
        )

    def scores(self, tokens: Tokens) -> Float32Array:
        """The score of every document for ``tokens`` (dense, length ``n_docs``).

        Raises:
            as :meth:`query`.
        """
        return np.minimum(self._accumulate(tokens), np.float32(1.0))

    def query_vector(self, tokens: Tokens) -> tuple[Int32Array, Float32Array]:
        """The query's weighted vector: ``(term_ids ascending, L2-normalised weights)``.

        Terms of zero weight (unseen in every document) are left out.

        Raises:
            as :meth:`query`.
        """
        terms, weights = self._query_terms(tokens)
        return np.asarray(terms, dtype=np.int32), np.asarray(weights, dtype=np.float32)
