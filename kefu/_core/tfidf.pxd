cimport cython
from libc.stdint cimport int32_t


cdef extern from "kefu_simd.h" nogil:
    ctypedef float (*kefu_dot_f32_fn)(const float *a, const float *b, size_t n) noexcept
    ctypedef void (*kefu_matvec_f32_fn)(
        const float *m, size_t rows, size_t cols, Py_ssize_t stride, const float *v, float *out,
        int by_four
    ) noexcept

    int KEFU_MATVEC_MAX_THREADS

    const char *kefu_simd_impl() noexcept
    int kefu_simd_count() noexcept
    const char *kefu_simd_name(int index) noexcept
    int kefu_simd_select(const char *name) noexcept
    int kefu_simd_known(const char *name) noexcept
    float kefu_dot_f32(const float *a, const float *b, size_t n) noexcept
    void kefu_matvec_f32(
        const float *m, size_t rows, size_t cols, Py_ssize_t stride, const float *v, float *out
    ) noexcept
    int kefu_matvec_f32_threads(
        const float *m, size_t rows, size_t cols, Py_ssize_t stride, const float *v, float *out,
        int threads
    ) noexcept


# A query after parsing: its distinct term ids, ascending, and their L2-normalised weights
# (terms of zero weight left out).
cdef struct QueryTerms:
    int32_t *terms
    float *weights
    Py_ssize_t n


@cython.final
cdef class TfidfIndex:
    cdef readonly Py_ssize_t n_docs
    cdef readonly Py_ssize_t n_terms
    cdef readonly Py_ssize_t nnz
    cdef readonly bint sublinear_tf
    cdef readonly bint smooth_idf
    # Per term: idf (0 for terms no document contains) and where its postings start;
    # the postings of term t are [_term_ptr[t], _term_ptr[t + 1]).
    cdef double *_idf
    cdef Py_ssize_t *_term_ptr
    # Postings, term-major: document ids (ascending within a term) and their weights.
    cdef int32_t *_post_docs
    cdef float *_post_weights
    # Query scratch: one score per document, all zero between queries, and the documents the
    # running query has reached.
    cdef float *_acc
    cdef int32_t *_touched

    cdef int _query_terms(self, object tokens, QueryTerms *q) except -1
    cdef Py_ssize_t _accumulate(self, const QueryTerms *q) noexcept nogil
    cdef void _reset(self, Py_ssize_t n_touched) noexcept nogil
