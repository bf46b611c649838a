"""kefu._core.tfidf against scikit-learn and bm25s, and its dense kernels against numpy.

Retrieval runs on BANKING77 (``../shared/data/banking77`` beside the repository): the ~10k
training questions are the documents, the test questions the queries. Every implementation
gets the same tokens (``kefu.text.tokenize``), and query timings include tokenizing the text:

- index build: kefu (vocabulary + ``TfidfIndex.build``), scikit-learn
  (``TfidfVectorizer.fit_transform``), bm25s (``BM25().index``);
- one query at a time, top 5: kefu ``query``, scikit-learn ``transform`` + ``linear_kernel`` +
  ``argpartition``, bm25s ``retrieve``; latency percentiles and throughput.

The dense case is a 10,000 x 384 float32 matrix times a vector (embedding search), each SIMD
kernel forced in turn on the calling thread alone (``threads=1``, what a server uses), and the
best kernel with ``threads=`` every CPU this process may use (offline work), against
``numpy.dot`` with the BLAS numpy loads here (threadpoolctl's description of it is in the row),
as configured (every core) and limited to one thread.
"""

from __future__ import annotations

import csv
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench._harness import Row, best_seconds, percentiles, rate
from kefu._core import implementations
from kefu.text import Vocabulary, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "banking77")
K = 5


def _texts(name: str) -> list[str]:
    with open(os.path.join(DATA, name), newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


def _kefu_build(module: Any, doc_tokens: list[list[str]]) -> tuple[Vocabulary, Any]:
    vocab = Vocabulary()
    ids = [vocab.add_document(tokens) for tokens in doc_tokens]
    return vocab, module.TfidfIndex.build(ids)


def _kefu_query(module: Any, doc_tokens: list[list[str]]) -> Callable[[str], object]:
    vocab, index = _kefu_build(module, doc_tokens)
    lookup, query = vocab.lookup, index.query

    def run(text: str) -> object:
        ids = lookup(tokenize(text))
        return query(ids, K) if ids else None

    return run


def _sklearn_build(doc_tokens: list[list[str]]) -> tuple[Any, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer=_identity, norm="l2")
    return vectorizer, vectorizer.fit_transform(doc_tokens)


def _identity(tokens: list[str]) -> list[str]:
    return tokens


def _sklearn_query(doc_tokens: list[list[str]]) -> Callable[[str], object]:
    from sklearn.metrics.pairwise import linear_kernel

    vectorizer, matrix = _sklearn_build(doc_tokens)

    def run(text: str) -> object:
        scores = linear_kernel(vectorizer.transform([tokenize(text)]), matrix)[0]
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top], kind="stable")]

    return run


def _bm25s_build(doc_tokens: list[list[str]]) -> Any:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(doc_tokens, show_progress=False)
    return retriever


def _bm25s_query(doc_tokens: list[list[str]]) -> Callable[[str], object]:
    retriever = _bm25s_build(doc_tokens)

    def run(text: str) -> object:
        return retriever.retrieve([tokenize(text)], k=K, show_progress=False, n_threads=0)

    return run


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    # scikit-learn brings scipy's own OpenBLAS; describe the one numpy loaded.
    libs = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    libs.sort(key=lambda lib: "numpy" not in str(lib.get("filepath", "")))
    if libs:
        lib = libs[0]
        return (
            f"{lib.get('internal_api')} {lib.get('version')} "
            f"{lib.get('architecture')} x{lib.get('num_threads')}"
        )
    return "none"


def _retrieval(quick: bool) -> list[Row]:
    docs = _texts("train.csv")
    queries = _texts("test.csv")
    if quick:
        queries = queries[:300]
    doc_tokens = [tokenize(t) for t in docs]
    modules = implementations("tfidf")
    builders: dict[str, Callable[[], object]] = {
        f"kefu {kind}": (lambda m=m: _kefu_build(m, doc_tokens)) for kind, m in modules.items()
    }
    builders["scikit-learn"] = lambda: _sklearn_build(doc_tokens)
    builders["bm25s"] = lambda: _bm25s_build(doc_tokens)
    rows: list[Row] = []
    for impl, build in builders.items():
        secs = best_seconds(build, repeat=1 if quick else 3, min_time=0.0)
        extra: dict[str, float | str] = {"docs": float(len(docs))}
        if impl.startswith("kefu"):  # the part after the vocabulary, which is plain Python
            module = modules[impl.split()[1]]
            vocab = Vocabulary()
            ids = [vocab.add_document(tokens) for tokens in doc_tokens]
            index_secs = best_seconds(
                functools.partial(module.TfidfIndex.build, ids),
                repeat=1 if quick else 3,
                min_time=0.0,
            )
            extra["TfidfIndex.build ms"] = index_secs * 1e3
        rows.append(Row("tfidf index build", impl, secs * 1e3, "ms", False, extra))

    runners: dict[str, Callable[[str], object]] = {
        f"kefu {kind}": _kefu_query(m, doc_tokens) for kind, m in modules.items()
    }
    runners["scikit-learn"] = _sklearn_query(doc_tokens)
    runners["bm25s"] = _bm25s_query(doc_tokens)
    for impl, run in runners.items():
        for text in queries[:50]:  # warm caches and lazy imports
            run(text)
        samples = []
        for text in queries:
            t0 = time.perf_counter()
            run(text)
            samples.append(time.perf_counter() - t0)
        p50, p99 = percentiles(samples)
        rows.append(
            Row(
                "tfidf single query p50/p99 (tokenization included)",
                impl,
                p50,
                "µs",
                False,
                {"p99": p99, "queries": float(len(queries))},
            )
        )
        sample = queries[:200] if impl in ("scikit-learn", "bm25s") else queries

        def run_all(run: Callable[[str], object] = run, sample: list[str] = sample) -> None:
            for text in sample:
                run(text)

        rows.append(
            Row(
                "tfidf single-query throughput",
                impl,
                rate(run_all, len(sample), quick=quick),
                "queries/s",
            )
        )
    return rows


def _dense(quick: bool) -> list[Row]:
    rows_n, dim = 10_000, 384
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((rows_n, dim)).astype(np.float32)
    vec = rng.standard_normal(dim).astype(np.float32)
    out = np.empty(rows_n, dtype=np.float32)
    flops = 2 * rows_n * dim
    case = f"dense dot {dim}-dim x {rows_n:,} rows (matvec)"
    modules = implementations("tfidf")
    result: list[Row] = []
    if "c" in modules:
        c = modules["c"]
        default = c.simd_impl()
        try:
            for name in c.simd_impls():
                c.set_simd_impl(name)
                gflops = rate(lambda: c.matvec(matrix, vec, out), flops, quick=quick) / 1e9
                result.append(Row(case, f"kefu c {name}", gflops, "GFLOP/s"))
            c.set_simd_impl("auto")
            gflops = rate(lambda: c.matvec(matrix, vec, out), flops, quick=quick) / 1e9
            result.append(Row(case, "kefu c", gflops, "GFLOP/s", extra={"kernel": c.simd_impl()}))
            # Before any numpy call: OpenBLAS's threads spin for a while after each one.
            threads = _usable_cpus()
            if threads > 1:
                shared = functools.partial(c.matvec, matrix, vec, out, threads=threads)
                gflops = rate(shared, flops, quick=quick) / 1e9
                label = f"kefu c, threads={threads}"
                result.append(Row(case, label, gflops, "GFLOP/s", extra={"kernel": c.simd_impl()}))
        finally:
            c.set_simd_impl(default)
    py = modules["py"]
    gflops = rate(lambda: py.matvec(matrix, vec, out), flops, quick=quick) / 1e9
    result.append(Row(case, "kefu py", gflops, "GFLOP/s"))
    gflops = rate(lambda: np.dot(matrix, vec, out=out), flops, quick=quick) / 1e9
    coretype = os.environ.get("OPENBLAS_CORETYPE", "")
    blas = {"blas": _blas(), "OPENBLAS_CORETYPE": coretype or "unset"}
    result.append(Row(case, "numpy.dot", gflops, "GFLOP/s", extra=blas))
    # kefu's kernels run on the calling thread by default (a server keeps its other cores for
    # other requests); numpy's BLAS uses every core.  This row compares one core with one core.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return result
    with threadpool_limits(limits=1, user_api="blas"):
        gflops = rate(lambda: np.dot(matrix, vec, out=out), flops, quick=quick) / 1e9
    result.append(Row(case, "numpy.dot, 1 BLAS thread", gflops, "GFLOP/s"))
    return result


def run(quick: bool) -> list[Row]:
    # The dense case runs first: after scikit-learn's queries its OpenMP threads keep spinning
    # for a while, and numpy's two OpenBLAS threads, starved on a 2-core machine, measured
    # 1 GFLOP/s instead of 80.
    dense = _dense(quick)
    return _retrieval(quick) + dense
