"""TF-IDF retrieval over contiguous postings, and float32 dense kernels with SIMD dispatch.

The pure-Python twin ``kefu._core._tfidf_py`` has the same API and the same results: the same
float32 scores bit for bit and the same order. Its docstrings and ``tfidf.pyi`` describe the
API; the comments here explain the native layout.
"""

import os
import sys
import warnings

import numpy as np

from cpython.buffer cimport (
    PyBUF_RECORDS_RO,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.list cimport PyList_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyIndex_Check, PyNumber_Index
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.tuple cimport PyTuple_CheckExact
from libc.math cimport log, sqrt
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport qsort
from libc.string cimport memcpy, memset


cdef extern from "kefu_debug.h":
    int KEFU_DEBUG


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

# Document ids are int32.  Every per-term array is allocated for all of 0..n_terms-1 whether or
# not a term occurs (16 bytes per term kept, 32 while building), so n_terms is capped where
# those arrays stay within 64 MB (128 MB while building).
MAX_DOCS = 2**31 - 1
MAX_TERMS = 1 << 22
cdef Py_ssize_t _MAX_DOCS = MAX_DOCS
cdef Py_ssize_t _MAX_TERMS = MAX_TERMS

cdef Py_ssize_t _live_indexes = 0

cdef char _NATIVE_ORDER = c'<' if sys.byteorder == "little" else c'>'
cdef object _np_empty = np.empty
cdef object _ndarray = np.ndarray
cdef object _INT32 = np.dtype(np.int32)
cdef object _FLOAT32 = np.dtype(np.float32)


def debug_counters():
    """``{"live_indexes": n}`` in a ``KEFU_DEBUG=1`` build; ``{}`` in a release build."""
    if KEFU_DEBUG:
        return {"live_indexes": _live_indexes}
    return {}


# ---------------------------------------------------------------------------------------------
# Buffers: the checks the twin repeats on a memoryview, in the same order with the same errors.

cdef inline const char *_format_code(const char *fmt) noexcept:
    """The struct code of a buffer format without a native byte-order/size prefix."""
    if fmt == NULL:
        return b"B"
    if fmt[0] == c'@' or fmt[0] == c'=' or fmt[0] == _NATIVE_ORDER:
        return fmt + 1
    return fmt


cdef inline bint _has_code(const Py_buffer *view, char code) noexcept:
    cdef const char *c = _format_code(view.format)
    return c[0] == code and c[1] == 0 and view.itemsize == 4


cdef str _describe(object obj, const Py_buffer *view):
    if isinstance(obj, _ndarray):
        return f"dtype {obj.dtype}"
    fmt = "B" if view.format == NULL else view.format.decode("ascii", "replace")
    return f"buffer format {fmt!r}"


cdef int _get_float32(object obj, Py_buffer *view, str name) except -1:
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"{name} must be a float32 array, got {type(obj).__name__}")
    PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    if not _has_code(view, c'f'):
        desc = _describe(obj, view)
        PyBuffer_Release(view)
        raise TypeError(f"{name} must be a float32 array, got {desc}")
    if (<uintptr_t>view.buf) % 4:
        PyBuffer_Release(view)
        raise ValueError(f"{name} is not aligned to 4 bytes")
    return 0


cdef int _get_vector(object obj, Py_buffer *view, str name) except -1:
    _get_float32(obj, view, name)
    if view.ndim != 1:
        ndim = view.ndim
        PyBuffer_Release(view)
        raise ValueError(f"{name} must be 1-D, got {ndim}-D")
    if view.shape[0] > 1 and view.strides[0] != 4:
        stride = view.strides[0]
        PyBuffer_Release(view)
        raise ValueError(f"{name} must be contiguous, got a stride of {stride} bytes")
    return 0


cdef int _get_matrix(object obj, Py_buffer *view, str name) except -1:
    _get_float32(obj, view, name)
    if view.ndim != 2:
        ndim = view.ndim
        PyBuffer_Release(view)
        raise ValueError(f"{name} must be 2-D, got {ndim}-D")
    if view.shape[1] > 1 and view.strides[1] != 4:
        stride = view.strides[1]
        PyBuffer_Release(view)
        raise ValueError(
            f"{name} rows must be contiguous (column stride 4 bytes), got {stride} bytes"
        )
    if view.shape[0] > 1 and view.strides[0] % 4:
        stride = view.strides[0]
        PyBuffer_Release(view)
        raise ValueError(f"{name} row stride must be a multiple of 4 bytes, got {stride}")
    return 0


cdef inline bint _overlaps(const char *a0, const char *a1, const char *b0, const char *b1) noexcept:
    return a0 < b1 and b0 < a1


cdef object _new_array(Py_ssize_t n, object dtype, void **data):
    """A fresh writable numpy array and its data pointer (valid while the array lives)."""
    cdef Py_buffer view
    arr = _np_empty(n, dtype)
    PyObject_GetBuffer(arr, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    data[0] = view.buf
    PyBuffer_Release(&view)
    return arr


# ---------------------------------------------------------------------------------------------
# Dense kernels.

# Calls on at least this many floats release the GIL (the buffers stay exported meanwhile), so
# other threads run, or share the rows of one big matvec; below it the release costs more than
# it frees.
cdef Py_ssize_t _NOGIL_FLOATS = 1 << 15

# The most threads one matvec uses (kefu_simd.h): the caller and up to 63 pool workers.
MAX_THREADS = KEFU_MATVEC_MAX_THREADS


cdef int _check_threads(object threads) except -1:
    """``threads`` as a count in [1, MAX_THREADS]; ``None``: the CPUs this process may use."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
    elif isinstance(threads, bool) or not PyIndex_Check(threads):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    threads = PyNumber_Index(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return min(threads, KEFU_MATVEC_MAX_THREADS)


def simd_impl():
    """The dense kernel in use: ``"scalar"``, ``"sse2"``, ``"avx2"`` or ``"neon"``."""
    return kefu_simd_impl().decode("ascii")


def simd_impls():
    """The dense kernels this CPU can run, slowest first (``"scalar"`` is always there)."""
    return [kefu_simd_name(i).decode("ascii") for i in range(kefu_simd_count())]


def set_simd_impl(name):
    """Use kernel ``name`` from now on (process-wide); ``"auto"`` picks the best for this CPU."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    cdef bytes raw = name.encode("utf-8", "replace")
    cdef int rc = -1 if b"\0" in raw else kefu_simd_select(raw)
    if rc == -1:
        raise ValueError(f"unknown SIMD kernel {name!r}; this CPU runs {simd_impls()}")
    if rc == -2:
        raise ValueError(f"this CPU cannot run SIMD kernel {name!r}; it runs {simd_impls()}")


def _select_from_environment():
    name = os.environ.get("KEFU_SIMD", "").strip().lower()
    if not name or name == "auto":
        return
    try:
        set_simd_impl(name)
    except ValueError as exc:
        warnings.warn(
            f"KEFU_SIMD={name!r} ignored: {exc}; using {simd_impl()!r}",
            RuntimeWarning,
            stacklevel=2,
        )


_select_from_environment()


def dot(a, b):
    """Dot product of two 1-D contiguous float32 arrays of the same length."""
    cdef Py_buffer va, vb
    _get_vector(a, &va, "a")
    try:
        _get_vector(b, &vb, "b")
    except BaseException:
        PyBuffer_Release(&va)
        raise
    cdef Py_ssize_t n = va.shape[0]
    cdef Py_ssize_t nb = vb.shape[0]
    cdef float result = 0.0
    if n == nb:
        if n >= _NOGIL_FLOATS:
            with nogil:
                result = kefu_dot_f32(<const float *>va.buf, <const float *>vb.buf, <size_t>n)
        else:
            result = kefu_dot_f32(<const float *>va.buf, <const float *>vb.buf, <size_t>n)
    PyBuffer_Release(&va)
    PyBuffer_Release(&vb)
    if n != nb:
        raise ValueError(f"a and b differ in length: {n} != {nb}")
    return result


def matvec(matrix, vec, out=None, *, threads=1):
    """``matrix @ vec`` for a float32 matrix with contiguous rows (any row stride), its rows
    shared by up to ``threads`` threads."""
    cdef int n_threads = _check_threads(threads)
    cdef Py_buffer vm, vv, vo
    cdef bint have_out = False
    cdef void *tmp = NULL
    cdef void *data
    cdef float *dest
    cdef float *dest_kernel
    cdef Py_ssize_t rows, cols, stride
    cdef const char *m_lo
    cdef const char *m_hi
    _get_matrix(matrix, &vm, "matrix")
    try:
        _get_vector(vec, &vv, "vec")
    except BaseException:
        PyBuffer_Release(&vm)
        raise
    try:
        rows = vm.shape[0]
        cols = vm.shape[1]
        if vv.shape[0] != cols:
            raise ValueError(f"vec has length {vv.shape[0]}, matrix has {cols} columns")
        if out is None:
            out = _new_array(rows, _FLOAT32, &data)
            dest = <float *>data
        else:
            if not isinstance(out, _ndarray):
                raise TypeError(f"out must be a numpy float32 array, got {type(out).__name__}")
            _get_vector(out, &vo, "out")
            have_out = True
            if vo.readonly:
                raise ValueError("out is read-only")
            if vo.shape[0] != rows:
                raise ValueError(f"out has length {vo.shape[0]}, matrix has {rows} rows")
            dest = <float *>vo.buf
        if rows == 0:
            return out
        stride = vm.strides[0] // 4 if rows > 1 else cols
        if cols == 0:
            memset(dest, 0, rows * sizeof(float))
            return out
        if have_out:
            # A result written over its own inputs would change them under the kernel.
            if stride >= 0:
                m_lo = <const char *>vm.buf
                m_hi = m_lo + ((rows - 1) * stride + cols) * 4
            else:
                m_lo = <const char *>vm.buf + (rows - 1) * stride * 4
                m_hi = <const char *>vm.buf + cols * 4
            if _overlaps(<char *>dest, <char *>(dest + rows), m_lo, m_hi) or _overlaps(
                <char *>dest, <char *>(dest + rows),
                <const char *>vv.buf, <const char *>vv.buf + cols * 4,
            ):
                tmp = PyMem_Malloc(rows * sizeof(float))
                if tmp == NULL:
                    raise MemoryError()
        if tmp != NULL:
            dest_kernel = <float *>tmp
        else:
            dest_kernel = dest
        if rows * cols >= _NOGIL_FLOATS:
            # Rows are shared between threads only far above this size (128k elements), so
            # always without the GIL; the pool's workers never take it.
            with nogil:
                kefu_matvec_f32_threads(
                    <const float *>vm.buf, rows, cols, stride, <const float *>vv.buf,
                    dest_kernel, n_threads,
                )
        else:
            kefu_matvec_f32(
                <const float *>vm.buf, rows, cols, stride, <const float *>vv.buf, dest_kernel
            )
        if tmp != NULL:
            memcpy(dest, tmp, rows * sizeof(float))
        return out
    finally:
        PyMem_Free(tmp)
        PyBuffer_Release(&vm)
        PyBuffer_Release(&vv)
        if have_out:
            PyBuffer_Release(&vo)


# ---------------------------------------------------------------------------------------------
# Token ids.

cdef struct IdBuffer:
    int32_t *data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _grow(IdBuffer *buf) except -1:
    cdef Py_ssize_t capacity = buf.capacity * 2 if buf.capacity else 64
    cdef int32_t *data = <int32_t *>PyMem_Realloc(buf.data, capacity * sizeof(int32_t))
    if data == NULL:
        raise MemoryError()
    buf.data = data
    buf.capacity = capacity
    return 0


cdef str _where(Py_ssize_t doc, Py_ssize_t pos):
    return f"tokens[{pos}]" if doc < 0 else f"docs[{doc}][{pos}]"


cdef object _bad_id(Py_ssize_t doc, Py_ssize_t pos, object value, Py_ssize_t n_terms):
    where = _where(doc, pos)
    if value < 0:
        return ValueError(f"{where}: token id {value} is negative")
    if n_terms < 0:
        return ValueError(f"{where}: token id {value} is out of range (MAX_TERMS={MAX_TERMS})")
    return ValueError(f"{where}: token id {value} is out of range for n_terms={n_terms}")


cdef inline bint _is_int_code(char c) noexcept:
    return c != 0 and c in b"bBhHiIlLqQnN"


cdef int _append_from_buffer(
    const Py_buffer *view, IdBuffer *buf, Py_ssize_t n_terms, Py_ssize_t doc, int32_t *max_id
) except -1:
    """Token ids from a 1-D integer buffer (a numpy array): no Python object per token."""
    cdef Py_ssize_t upper = n_terms if n_terms >= 0 else _MAX_TERMS
    cdef char code = _format_code(view.format)[0]
    cdef bint signed = code in b"bhilqn"
    cdef Py_ssize_t n = view.shape[0], step = view.strides[0], size = view.itemsize, j
    cdef const char *p
    cdef long long v
    cdef unsigned long long u
    cdef int8_t i8
    cdef int16_t i16
    cdef int32_t i32
    cdef int64_t i64
    cdef uint8_t u8
    cdef uint16_t u16
    cdef uint32_t u32
    cdef uint64_t u64
    for j in range(n):
        p = <const char *>view.buf + j * step
        # memcpy: the buffer need not be aligned; compilers turn it into a plain load.
        if signed:
            if size == 1:
                memcpy(&i8, p, 1)
                v = i8
            elif size == 2:
                memcpy(&i16, p, 2)
                v = i16
            elif size == 4:
                memcpy(&i32, p, 4)
                v = i32
            else:
                memcpy(&i64, p, 8)
                v = i64
            if v < 0 or v >= upper:
                raise _bad_id(doc, j, v, n_terms)
        else:
            if size == 1:
                memcpy(&u8, p, 1)
                u = u8
            elif size == 2:
                memcpy(&u16, p, 2)
                u = u16
            elif size == 4:
                memcpy(&u32, p, 4)
                u = u32
            else:
                memcpy(&u64, p, 8)
                u = u64
            if u >= <unsigned long long>upper:
                raise _bad_id(doc, j, u, n_terms)
            v = <long long>u
        if buf.size == buf.capacity:
            _grow(buf)
        buf.data[buf.size] = <int32_t>v
        buf.size += 1
        if v > max_id[0]:
            max_id[0] = <int32_t>v
    return 0


cdef int _append_ids(
    object tokens, IdBuffer *buf, Py_ssize_t n_terms, Py_ssize_t doc, int32_t *max_id
) except -1:
    """Appends the token ids of ``tokens`` to ``buf``, checking each against ``n_terms``
    (``-1``: against MAX_TERMS).  ``doc`` is the document's index, or -1 for a query."""
    cdef Py_buffer view
    cdef Py_ssize_t upper = n_terms if n_terms >= 0 else _MAX_TERMS
    cdef Py_ssize_t j
    cdef long long v
    cdef int overflow
    cdef const char *code
    if PyObject_CheckBuffer(tokens):
        PyObject_GetBuffer(tokens, &view, PyBUF_RECORDS_RO)
        try:
            if view.ndim == 1 and view.itemsize in (1, 2, 4, 8):
                code = _format_code(view.format)
                if _is_int_code(code[0]) and code[1] == 0:
                    return _append_from_buffer(&view, buf, n_terms, doc, max_id)
        finally:
            PyBuffer_Release(&view)
    if PyList_CheckExact(tokens) or PyTuple_CheckExact(tokens):
        seq = tokens
    else:
        try:
            it = iter(tokens)
        except TypeError:
            what = "tokens" if doc < 0 else f"docs[{doc}]"
            raise TypeError(
                f"{what} must be a sequence of token ids, got {type(tokens).__name__}"
            ) from None
        seq = list(it)
    j = 0
    # The size is read again on every step: an __index__ may shrink a list being read.
    while j < PySequence_Fast_GET_SIZE(seq):
        tok = <object>PySequence_Fast_GET_ITEM(seq, j)
        overflow = 0
        if PyLong_CheckExact(tok):
            v = PyLong_AsLongLongAndOverflow(tok, &overflow)
        elif PyIndex_Check(tok):
            tok = PyNumber_Index(tok)
            v = PyLong_AsLongLongAndOverflow(tok, &overflow)
        else:
            raise TypeError(
                f"{_where(doc, j)}: token ids must be integers, got {type(tok).__name__}"
            )
        if overflow or v < 0 or v >= upper:
            raise _bad_id(doc, j, tok, n_terms)
        if buf.size == buf.capacity:
            _grow(buf)
        buf.data[buf.size] = <int32_t>v
        buf.size += 1
        if v > max_id[0]:
            max_id[0] = <int32_t>v
        j += 1
    return 0


cdef int _cmp_int32(const void *a, const void *b) noexcept nogil:
    cdef int32_t x = (<const int32_t *>a)[0]
    cdef int32_t y = (<const int32_t *>b)[0]
    return (x > y) - (x < y)


cdef inline void _sort_ids(int32_t *a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef int32_t x
    if n > 24:
        qsort(a, n, sizeof(int32_t), _cmp_int32)
        return
    # Insertion sort: documents and queries are mostly a handful of terms.
    for i in range(1, n):
        x = a[i]
        j = i
        while j > 0 and a[j - 1] > x:
            a[j] = a[j - 1]
            j -= 1
        a[j] = x


cdef inline double _tf(int32_t count, bint sublinear) noexcept nogil:
    return 1.0 + log(<double>count) if sublinear else <double>count


cdef Py_ssize_t _check_k(object k) except -1:
    if not PyIndex_Check(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = PyNumber_Index(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > _MAX_DOCS:
        return _MAX_DOCS
    return k


# ---------------------------------------------------------------------------------------------
# Top k by a bounded heap.

cdef struct Scored:
    float score
    int32_t id      # document or group id: the tie-breaker, smaller first
    int32_t doc     # for groups: the best document of the group


cdef inline bint _worse(const Scored *a, const Scored *b) noexcept nogil:
    return a.score < b.score or (a.score == b.score and a.id > b.id)


cdef inline void _sift_down(Scored *heap, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    cdef Scored x = heap[i]
    cdef Py_ssize_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _worse(&heap[c + 1], &heap[c]):
            c += 1
        if not _worse(&heap[c], &x):
            break
        heap[i] = heap[c]
        i = c
    heap[i] = x


cdef inline void _offer(Scored *heap, Py_ssize_t *size, Py_ssize_t k, Scored x) noexcept nogil:
    """Keeps the best ``k`` offered so far; the root is the worst of them."""
    cdef Py_ssize_t i, parent
    if size[0] < k:
        i = size[0]
        size[0] += 1
        while i > 0:
            parent = (i - 1) // 2
            if not _worse(&x, &heap[parent]):
                break
            heap[i] = heap[parent]
            i = parent
        heap[i] = x
    elif _worse(&heap[0], &x):
        heap[0] = x
        _sift_down(heap, k, 0)


cdef void _sort_best_first(Scored *heap, Py_ssize_t n) noexcept nogil:
    """Heap sort: the worst goes to the end each round, leaving the best at index 0."""
    cdef Scored x
    while n > 1:
        n -= 1
        x = heap[0]
        heap[0] = heap[n]
        heap[n] = x
        _sift_down(heap, n, 0)


cdef struct GroupSlot:
    int32_t group   # -1: empty
    int32_t doc
    float score


# ---------------------------------------------------------------------------------------------
# The index.

cdef class TfidfIndex:
    """TF-IDF vectors of documents of token ids, searched by cosine similarity."""

    def __cinit__(self):
        global _live_indexes
        if KEFU_DEBUG:
            _live_indexes += 1

    def __dealloc__(self):
        global _live_indexes
        PyMem_Free(self._idf)
        PyMem_Free(self._term_ptr)
        PyMem_Free(self._post_docs)
        PyMem_Free(self._post_weights)
        PyMem_Free(self._acc)
        PyMem_Free(self._touched)
        if KEFU_DEBUG:
            _live_indexes -= 1

    def __init__(self, *args, **kwargs):
        raise TypeError("build a TfidfIndex with TfidfIndex.build(docs, ...)")

    @classmethod
    def build(cls, docs, n_terms=None, *, sublinear_tf=False, smooth_idf=True):
        if not isinstance(sublinear_tf, bool):
            raise TypeError(f"sublinear_tf must be a bool, got {type(sublinear_tf).__name__}")
        if not isinstance(smooth_idf, bool):
            raise TypeError(f"smooth_idf must be a bool, got {type(smooth_idf).__name__}")
        cdef Py_ssize_t limit = -1
        if n_terms is not None:
            if not PyIndex_Check(n_terms):
                raise TypeError(f"n_terms must be an int or None, got {type(n_terms).__name__}")
            n_terms = PyNumber_Index(n_terms)
            if n_terms < 0 or n_terms > MAX_TERMS:
                raise ValueError(f"n_terms must be in [0, {MAX_TERMS}], got {n_terms}")
            limit = n_terms
        try:
            it = iter(docs)
        except TypeError:
            raise TypeError(
                f"docs must be a sequence of token-id sequences, got {type(docs).__name__}"
            ) from None
        doc_list = list(it)
        if len(doc_list) > MAX_DOCS:
            raise ValueError(f"at most {MAX_DOCS} documents, got {len(doc_list)}")
        cdef TfidfIndex index = TfidfIndex.__new__(TfidfIndex)
        index.sublinear_tf = sublinear_tf
        index.smooth_idf = smooth_idf
        _build(index, doc_list, limit)
        return index

    def __repr__(self):
        return (
            f"TfidfIndex(n_docs={self.n_docs}, n_terms={self.n_terms}, nnz={self.nnz}, "
            f"sublinear_tf={self.sublinear_tf}, smooth_idf={self.smooth_idf})"
        )

    @property
    def idf(self):
        cdef void *data
        arr = _new_array(self.n_terms, _FLOAT32, &data)
        cdef float *out = <float *>data
        cdef Py_ssize_t t
        for t in range(self.n_terms):
            out[t] = <float>self._idf[t]
        return arr

    cdef int _query_terms(self, object tokens, QueryTerms *q) except -1:
        cdef IdBuffer ids = IdBuffer(NULL, 0, 0)
        cdef double *raw = NULL
        cdef int32_t max_id = -1
        cdef Py_ssize_t i, j, m, n, distinct
        cdef int32_t t, count
        cdef double v, sumsq, norm
        try:
            _append_ids(tokens, &ids, self.n_terms, -1, &max_id)
            n = ids.size
            if n == 0:
                raise ValueError("tokens must not be empty")
            _sort_ids(ids.data, n)
            distinct = 1
            for i in range(1, n):
                distinct += ids.data[i] != ids.data[i - 1]
            q.terms = <int32_t *>PyMem_Malloc(distinct * sizeof(int32_t))
            q.weights = <float *>PyMem_Malloc(distinct * sizeof(float))
            raw = <double *>PyMem_Malloc(distinct * sizeof(double))
            if q.terms == NULL or q.weights == NULL or raw == NULL:
                raise MemoryError()
            # The sum of squares runs in ascending term order, which the twin repeats exactly.
            sumsq = 0.0
            i = 0
            j = 0
            while i < n:
                t = ids.data[i]
                count = 1
                i += 1
                while i < n and ids.data[i] == t:
                    count += 1
                    i += 1
                v = _tf(count, self.sublinear_tf) * self._idf[t]
                sumsq += v * v
                q.terms[j] = t
                raw[j] = v
                j += 1
            norm = sqrt(sumsq)
            m = 0
            if norm != 0.0:
                for j in range(distinct):
                    if raw[j] != 0.0:
                        q.terms[m] = q.terms[j]
                        q.weights[m] = <float>(raw[j] / norm)
                        m += 1
            q.n = m
        finally:
            PyMem_Free(ids.data)
            PyMem_Free(raw)
        return 0

    cdef Py_ssize_t _accumulate(self, const QueryTerms *q) noexcept nogil:
        """Adds the query's postings into ``_acc``; returns how many documents it reached.

        Every product is positive (weights are at least ~1e-11, far from float underflow), so
        a score of zero means "not reached yet"; ``_touched`` gets one slack entry so the
        branch-free append can write past the last document without a test.
        """
        cdef Py_ssize_t n_touched = 0, i, end
        cdef int32_t t, d
        cdef float qw, p
        cdef float *acc = self._acc
        cdef int32_t *touched = self._touched
        cdef const int32_t *docs = self._post_docs
        cdef const float *weights = self._post_weights
        for j in range(q.n):
            t = q.terms[j]
            qw = q.weights[j]
            end = self._term_ptr[t + 1]
            for i in range(self._term_ptr[t], end):
                d = docs[i]
                touched[n_touched] = d
                n_touched += acc[d] == 0.0
                # Product and sum as two statements: no fused multiply-add on any compiler,
                # so the twin's float32 numpy arithmetic gives the same bits.
                p = qw * weights[i]
                acc[d] = acc[d] + p
        return n_touched

    cdef void _reset(self, Py_ssize_t n_touched) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(n_touched):
            self._acc[self._touched[i]] = 0.0

    def query(self, tokens, k=5):
        cdef Py_ssize_t kk = _check_k(k)
        cdef QueryTerms q = QueryTerms(NULL, NULL, 0)
        cdef Scored *heap = NULL
        cdef Py_ssize_t size = 0, n_touched, i
        cdef Scored x
        cdef float s
        cdef void *data
        try:
            self._query_terms(tokens, &q)
            if kk > self.n_docs:
                kk = self.n_docs
            heap = <Scored *>PyMem_Malloc((kk + 1) * sizeof(Scored))
            if heap == NULL:
                raise MemoryError()
            n_touched = self._accumulate(&q)
            x.doc = 0
            for i in range(n_touched):
                x.id = self._touched[i]
                s = self._acc[x.id]
                self._acc[x.id] = 0.0
                x.score = s if s < 1.0 else 1.0
                _offer(heap, &size, kk, x)
            _sort_best_first(heap, size)
            ids = _new_array(size, _INT32, &data)
            for i in range(size):
                (<int32_t *>data)[i] = heap[i].id
            scores = _new_array(size, _FLOAT32, &data)
            for i in range(size):
                (<float *>data)[i] = heap[i].score
            return ids, scores
        finally:
            PyMem_Free(heap)
            PyMem_Free(q.terms)
            PyMem_Free(q.weights)

    def query_grouped(self, tokens, groups, k=5):
        cdef Py_ssize_t kk = _check_k(k)
        cdef Py_buffer gv
        cdef QueryTerms q = QueryTerms(NULL, NULL, 0)
        cdef GroupSlot *table = NULL
        cdef Scored *heap = NULL
        cdef Py_ssize_t n_touched = 0, i, size = 0, capacity, mask, slot
        cdef Py_ssize_t bad = -1
        cdef int32_t d, g
        cdef const int32_t *group_of
        cdef float s
        cdef Scored x
        cdef void *data
        if not PyObject_CheckBuffer(groups):
            raise TypeError(f"groups must be an int32 array, got {type(groups).__name__}")
        PyObject_GetBuffer(groups, &gv, PyBUF_RECORDS_RO)
        try:
            if not (_has_code(&gv, c'i') or _has_code(&gv, c'l')):
                raise TypeError(f"groups must be an int32 array, got {_describe(groups, &gv)}")
            if gv.ndim != 1:
                raise ValueError(f"groups must be 1-D, got {gv.ndim}-D")
            if gv.shape[0] > 1 and gv.strides[0] != 4:
                raise ValueError(
                    f"groups must be contiguous, got a stride of {gv.strides[0]} bytes"
                )
            if (<uintptr_t>gv.buf) % 4:
                raise ValueError("groups is not aligned to 4 bytes")
            if gv.shape[0] != self.n_docs:
                raise ValueError(
                    f"groups has length {gv.shape[0]}, the index has {self.n_docs} docs"
                )
            group_of = <const int32_t *>gv.buf
            self._query_terms(tokens, &q)
            n_touched = self._accumulate(&q)
            try:
                # An open-addressing table sized for the documents actually reached: the best
                # (score, smaller doc) of each group.
                capacity = 16
                while capacity < 2 * n_touched:
                    capacity *= 2
                mask = capacity - 1
                table = <GroupSlot *>PyMem_Malloc(capacity * sizeof(GroupSlot))
                if table == NULL:
                    raise MemoryError()
                for i in range(capacity):
                    table[i].group = -1
                for i in range(n_touched):
                    d = self._touched[i]
                    s = self._acc[d]
                    if s > 1.0:
                        s = 1.0
                    g = group_of[d]
                    if g < 0:
                        if bad < 0 or d < bad:
                            bad = d
                        continue
                    slot = (<uint32_t>g * <uint32_t>2654435761u) & mask
                    while table[slot].group != -1 and table[slot].group != g:
                        slot = (slot + 1) & mask
                    if table[slot].group == -1:
                        table[slot].group = g
                        table[slot].doc = d
                        table[slot].score = s
                    elif s > table[slot].score or (s == table[slot].score and d < table[slot].doc):
                        table[slot].doc = d
                        table[slot].score = s
            finally:
                self._reset(n_touched)
            if bad >= 0:
                raise ValueError(f"groups[{bad}] is negative ({group_of[bad]})")
            heap = <Scored *>PyMem_Malloc((min(kk, n_touched) + 1) * sizeof(Scored))
            if heap == NULL:
                raise MemoryError()
            for i in range(capacity):
                if table[i].group != -1:
                    x.score = table[i].score
                    x.id = table[i].group
                    x.doc = table[i].doc
                    _offer(heap, &size, min(kk, n_touched), x)
            _sort_best_first(heap, size)
            group_ids = _new_array(size, _INT32, &data)
            for i in range(size):
                (<int32_t *>data)[i] = heap[i].id
            doc_ids = _new_array(size, _INT32, &data)
            for i in range(size):
                (<int32_t *>data)[i] = heap[i].doc
            scores = _new_array(size, _FLOAT32, &data)
            for i in range(size):
                (<float *>data)[i] = heap[i].score
            return group_ids, doc_ids, scores
        finally:
            PyBuffer_Release(&gv)
            PyMem_Free(table)
            PyMem_Free(heap)
            PyMem_Free(q.terms)
            PyMem_Free(q.weights)

    def scores(self, tokens):
        cdef QueryTerms q = QueryTerms(NULL, NULL, 0)
        cdef Py_ssize_t n_touched, i
        cdef int32_t d
        cdef float s
        cdef void *data
        try:
            self._query_terms(tokens, &q)
            out = _new_array(self.n_docs, _FLOAT32, &data)
            memset(data, 0, self.n_docs * sizeof(float))
            n_touched = self._accumulate(&q)
            for i in range(n_touched):
                d = self._touched[i]
                s = self._acc[d]
                self._acc[d] = 0.0
                (<float *>data)[d] = s if s < 1.0 else 1.0
            return out
        finally:
            PyMem_Free(q.terms)
            PyMem_Free(q.weights)

    def query_vector(self, tokens):
        cdef QueryTerms q = QueryTerms(NULL, NULL, 0)
        cdef void *data
        try:
            self._query_terms(tokens, &q)
            terms = _new_array(q.n, _INT32, &data)
            if q.n:
                memcpy(data, q.terms, q.n * sizeof(int32_t))
            weights = _new_array(q.n, _FLOAT32, &data)
            if q.n:
                memcpy(data, q.weights, q.n * sizeof(float))
            return terms, weights
        finally:
            PyMem_Free(q.terms)
            PyMem_Free(q.weights)


cdef int _build(TfidfIndex index, list docs, Py_ssize_t limit) except -1:
    """Fills ``index`` from ``docs``; ``limit`` is n_terms, or -1 for max id + 1."""
    cdef Py_ssize_t n_docs = len(docs), n_terms, d, i, s, e, w, nnz, p
    cdef IdBuffer flat = IdBuffer(NULL, 0, 0)
    cdef int32_t max_id = -1
    cdef int32_t t
    cdef Py_ssize_t *doc_start = NULL
    cdef Py_ssize_t *entry_start = NULL
    cdef int32_t *counts = NULL
    cdef int32_t *df = NULL
    cdef int32_t *entry_terms = NULL
    cdef int32_t *entry_counts = NULL
    cdef float *entry_weights = NULL
    cdef Py_ssize_t *pos = NULL
    cdef double v, sumsq, norm, idf
    cdef bint sublinear = index.sublinear_tf
    try:
        doc_start = <Py_ssize_t *>PyMem_Malloc((n_docs + 1) * sizeof(Py_ssize_t))
        if doc_start == NULL:
            raise MemoryError()
        doc_start[0] = 0
        for d in range(n_docs):
            _append_ids(docs[d], &flat, limit, d, &max_id)
            doc_start[d + 1] = flat.size
        n_terms = limit if limit >= 0 else max_id + 1
        index.n_docs = n_docs
        index.n_terms = n_terms

        # Per document: its distinct terms in ascending id order with their counts.  Ascending
        # order makes the sum of squares (and so the weights) of two documents with the same
        # bag of words bit-identical, as in scikit-learn, whose rows have sorted indices.
        counts = <int32_t *>PyMem_Malloc((n_terms + 1) * sizeof(int32_t))
        df = <int32_t *>PyMem_Malloc((n_terms + 1) * sizeof(int32_t))
        entry_terms = <int32_t *>PyMem_Malloc((flat.size + 1) * sizeof(int32_t))
        entry_counts = <int32_t *>PyMem_Malloc((flat.size + 1) * sizeof(int32_t))
        entry_start = <Py_ssize_t *>PyMem_Malloc((n_docs + 1) * sizeof(Py_ssize_t))
        if (counts == NULL or df == NULL or entry_terms == NULL or entry_counts == NULL
                or entry_start == NULL):
            raise MemoryError()
        memset(counts, 0, n_terms * sizeof(int32_t))
        memset(df, 0, n_terms * sizeof(int32_t))
        w = 0
        entry_start[0] = 0
        for d in range(n_docs):
            s = doc_start[d]
            e = doc_start[d + 1]
            for i in range(s, e):
                t = flat.data[i]
                if counts[t] == 0:
                    entry_terms[w] = t
                    w += 1
                counts[t] += 1
            _sort_ids(entry_terms + entry_start[d], w - entry_start[d])
            for i in range(entry_start[d], w):
                t = entry_terms[i]
                entry_counts[i] = counts[t]
                counts[t] = 0
                df[t] += 1
            entry_start[d + 1] = w
        nnz = w
        index.nnz = nnz
        PyMem_Free(flat.data)
        flat.data = NULL

        # idf as scikit-learn's TfidfTransformer; a term no document contains gets 0, like a
        # word missing from scikit-learn's vocabulary: it matches nothing and does not dilute
        # a query's norm.
        index._idf = <double *>PyMem_Malloc((n_terms + 1) * sizeof(double))
        if index._idf == NULL:
            raise MemoryError()
        for t in range(n_terms):
            if df[t] == 0:
                idf = 0.0
            elif index.smooth_idf:
                idf = log((n_docs + 1.0) / (df[t] + 1.0)) + 1.0
            else:
                idf = log(<double>n_docs / <double>df[t]) + 1.0
            index._idf[t] = idf

        # L2-normalised weights, per document.
        entry_weights = <float *>PyMem_Malloc((nnz + 1) * sizeof(float))
        if entry_weights == NULL:
            raise MemoryError()
        for d in range(n_docs):
            sumsq = 0.0
            for i in range(entry_start[d], entry_start[d + 1]):
                v = _tf(entry_counts[i], sublinear) * index._idf[entry_terms[i]]
                sumsq += v * v
            norm = sqrt(sumsq)
            for i in range(entry_start[d], entry_start[d + 1]):
                v = _tf(entry_counts[i], sublinear) * index._idf[entry_terms[i]]
                entry_weights[i] = <float>(v / norm)

        # Term-major postings (counting sort by term; documents stay ascending in each term).
        index._term_ptr = <Py_ssize_t *>PyMem_Malloc((n_terms + 1) * sizeof(Py_ssize_t))
        pos = <Py_ssize_t *>PyMem_Malloc((n_terms + 1) * sizeof(Py_ssize_t))
        index._post_docs = <int32_t *>PyMem_Malloc((nnz + 1) * sizeof(int32_t))
        index._post_weights = <float *>PyMem_Malloc((nnz + 1) * sizeof(float))
        index._acc = <float *>PyMem_Malloc((n_docs + 1) * sizeof(float))
        index._touched = <int32_t *>PyMem_Malloc((n_docs + 1) * sizeof(int32_t))
        if (index._term_ptr == NULL or pos == NULL or index._post_docs == NULL
                or index._post_weights == NULL or index._acc == NULL or index._touched == NULL):
            raise MemoryError()
        index._term_ptr[0] = 0
        for t in range(n_terms):
            index._term_ptr[t + 1] = index._term_ptr[t] + df[t]
            pos[t] = index._term_ptr[t]
        for d in range(n_docs):
            for i in range(entry_start[d], entry_start[d + 1]):
                t = entry_terms[i]
                p = pos[t]
                pos[t] = p + 1
                index._post_docs[p] = <int32_t>d
                index._post_weights[p] = entry_weights[i]
        memset(index._acc, 0, (n_docs + 1) * sizeof(float))
    finally:
        PyMem_Free(flat.data)
        PyMem_Free(doc_start)
        PyMem_Free(entry_start)
        PyMem_Free(counts)
        PyMem_Free(df)
        PyMem_Free(entry_terms)
        PyMem_Free(entry_counts)
        PyMem_Free(entry_weights)
        PyMem_Free(pos)
    return 0
