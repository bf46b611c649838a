"""TF-IDF retrieval over contiguous postings, and float32 dense kernels with SIMD dispatch.

The compiled twin of :mod:`kefu._core._tfidf_py`: the same API and the same results (float32
scores bit for bit, the same order). ``KEFU_SIMD=scalar|sse2|avx2|neon`` in the environment at
import forces a dense kernel; an unknown or unavailable one warns (``RuntimeWarning``) and the
best kernel for the CPU is used.
"""

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

Int32Array = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]
Tokens = Iterable[SupportsIndex]

MAX_DOCS: int
"""Document ids are int32: at most 2**31 - 1 documents."""
MAX_TERMS: int
"""At most 4,194,304 term ids (the index keeps per-term arrays for every id below n_terms)."""
MAX_THREADS: int
"""The most threads one :func:`matvec` uses: 64 (the calling thread and 63 pool workers)."""

def debug_counters() -> dict[str, int]:
    """``{"live_indexes": n}`` in a ``KEFU_DEBUG=1`` build; ``{}`` in a release build."""

def simd_impl() -> str:
    """The dense kernel in use: ``"scalar"``, ``"sse2"``, ``"avx2"`` or ``"neon"``."""

def simd_impls() -> list[str]:
    """The dense kernels this CPU can run, slowest first (``"scalar"`` is always there)."""

def set_simd_impl(name: str) -> None:
    """Use kernel ``name`` from now on (process-wide); ``"auto"`` picks the best for this CPU.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: no such kernel in this build, or this CPU cannot run it.
    """

def dot(a: Float32Array, b: Float32Array) -> float:
    """Dot product of two 1-D contiguous float32 arrays of the same length.

    Any float32 buffer works (numpy arrays, ``array.array("f")``); any 4-byte-aligned start.

    Raises:
        TypeError: an argument is not a float32 array (float64 is refused, not cast).
        ValueError: not 1-D, not contiguous, not 4-byte aligned, or the lengths differ.
    """

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

    ``threads`` (keyword only) shares the rows between up to that many threads: the caller
    and workers of a process-wide pool, started on first need and parked between calls. The
    default, 1, computes on the calling thread alone, as a server wants (one event loop per
    core); more is for offline work (re-ranking, cache rebuilds, evaluation). ``None`` means
    the CPUs this process may run on. Whatever the count, the result is bit for bit that of
    ``threads=1``: each row is computed by the same kernel in the same order.

    The count is an upper bound. Fewer threads run when more would not pay: never more than
    MAX_THREADS or the CPUs this process may run on, at least four rows and 64k elements per
    thread, and waking a parked worker only for 512k elements per thread or when calls come
    in quick succession (the workers then stay awake in between). A call made while another
    thread's call is using the pool runs on its own thread rather than wait. The GIL is
    released during the product. The pool survives ``os.fork()`` (the child starts its own
    workers) and does not delay process exit.

    Raises:
        TypeError: an argument is not float32 (float64 is refused, not cast), or ``out`` is not
            a numpy array; ``threads`` is not an int or None (a bool is refused).
        ValueError: wrong dimensions, strides, alignment or lengths; ``out`` read-only;
            ``threads`` < 1.
    """

class TfidfIndex:
    """TF-IDF vectors of documents of token ids, searched by cosine similarity.

    Built once by :meth:`build`, then read-only. The postings (for each term, the documents
    containing it and their weights) are contiguous arrays, and a query walks only its own
    terms' postings, so its cost grows with those postings, not with the number of documents.
    """

    @property
    def n_docs(self) -> int:
        """How many documents were indexed (ids 0 .. n_docs - 1)."""
    @property
    def n_terms(self) -> int:
        """The vocabulary size: valid token ids are 0 .. n_terms - 1."""
    @property
    def nnz(self) -> int:
        """Stored postings: the distinct terms of every document, summed."""
    @property
    def sublinear_tf(self) -> bool:
        """Whether tf is ``1 + ln(count)`` rather than the raw count."""
    @property
    def smooth_idf(self) -> bool:
        """Whether idf is ``ln((1 + n) / (1 + df)) + 1`` rather than ``ln(n / df) + 1``."""
    @property
    def idf(self) -> Float32Array:
        """A float32 copy of the idf of every term id (0 for terms no document contains)."""
    def __init__(self, *args: object, **kwargs: object) -> None:
        """Always raises ``TypeError``: an index comes from :meth:`build`."""
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
    def scores(self, tokens: Tokens) -> Float32Array:
        """The score of every document for ``tokens`` (dense, length ``n_docs``).

        Raises:
            as :meth:`query`.
        """
    def query_vector(self, tokens: Tokens) -> tuple[Int32Array, Float32Array]:
        """The query's weighted vector: ``(term_ids ascending, L2-normalised weights)``.

        Terms of zero weight (unseen in every document) are left out.

        Raises:
            as :meth:`query`.
        """
