/* Dense float32 kernels of kefu._core.tfidf, one implementation per instruction set.
 *
 * Each dot_<isa>.c is compiled on its own with only its own ISA enabled (setup.py, BuildExt),
 * so the shipped binary runs on any CPU of its architecture: dispatch.c picks the best kernel
 * the running CPU supports, once, and every call goes through its function pointers.
 *
 * All kernels take unaligned pointers (4-byte alignment of float is the only requirement) and
 * any length, including 0.  The matrix of matvec is row-major with a row stride in elements
 * (negative strides allowed), so a row or column slice of a bigger matrix needs no copy.
 */
#ifndef KEFU_SIMD_H
#define KEFU_SIMD_H

#include <stddef.h>

#if defined(__x86_64__) || defined(_M_X64)
#define KEFU_SIMD_X86_64 1
#else
#define KEFU_SIMD_X86_64 0
#endif

#if defined(__aarch64__) || defined(_M_ARM64)
#define KEFU_SIMD_AARCH64 1
#else
#define KEFU_SIMD_AARCH64 0
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Above this many matrix elements (32 MB, beyond the last-level caches of common CPUs) the
 * matrix streams from DRAM, and the SIMD matvec kernels read it one row at a time: a single
 * sequential stream the hardware prefetchers follow.  Four interleaved rows were slower there
 * (100,000 x 384 on an EPYC VM: SSE2 10 vs 17 GFLOP/s, AVX2 17 vs 19), while in cache the four
 * rows sharing each load of v win (500 x 384: SSE2 49 vs 32 GFLOP/s).
 *
 * The two walks add in different orders, so the choice is made once per call from the size of
 * the whole matrix (kefu_matvec_f32, kefu_matvec_f32_threads) and passed to the kernel as
 * `by_four`: a block of rows computed by a worker thread rounds exactly as it would in a
 * single-threaded call of the same matrix. */
#define KEFU_MATVEC_STREAM_FLOATS ((size_t)8 << 20)

typedef float (*kefu_dot_f32_fn)(const float *a, const float *b, size_t n);
/* With `by_four`, rows 4k..4k+3 are computed together for every k from 0 (the remaining 0-3
 * rows one at a time); without it every row is one kefu_dot_f32_<isa>.  The scalar kernel has
 * one walk only and ignores the flag. */
typedef void (*kefu_matvec_f32_fn)(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                                   const float *v, float *out, int by_four);

/* Portable C, always present: the fallback and the reference of the others. */
float kefu_dot_f32_scalar(const float *a, const float *b, size_t n);
void kefu_matvec_f32_scalar(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                            const float *v, float *out, int by_four);

#if KEFU_SIMD_X86_64
/* SSE2 is part of x86-64, so this kernel runs on every x86-64 CPU. */
float kefu_dot_f32_sse2(const float *a, const float *b, size_t n);
void kefu_matvec_f32_sse2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four);
/* AVX2 + FMA: only called when the CPU and the OS (YMM state) support both. */
float kefu_dot_f32_avx2(const float *a, const float *b, size_t n);
void kefu_matvec_f32_avx2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four);
#endif

#if KEFU_SIMD_AARCH64
/* Advanced SIMD is part of AArch64. */
float kefu_dot_f32_neon(const float *a, const float *b, size_t n);
void kefu_matvec_f32_neon(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four);
#endif

/* Dispatcher (dispatch.c).  The selection is process-wide; the first call of any function
 * below selects the best available kernel if none was selected yet. */

/* Name of the kernel in use: "scalar", "sse2", "avx2" or "neon". */
const char *kefu_simd_impl(void);
/* Number of kernels this CPU can run, and their names, worst first (index 0 is "scalar"). */
int kefu_simd_count(void);
const char *kefu_simd_name(int index);
/* Selects a kernel by name; NULL or "auto" selects the best one this CPU can run.
 * Returns 0, or -1 for a name not compiled into this build, -2 for one the CPU cannot run. */
int kefu_simd_select(const char *name);
/* Whether `name` is a kernel of this build at all (for error messages). */
int kefu_simd_known(const char *name);

float kefu_dot_f32(const float *a, const float *b, size_t n);
void kefu_matvec_f32(const float *m, size_t rows, size_t cols, ptrdiff_t stride, const float *v,
                     float *out);

/* Threads one matvec may use: the caller and at most KEFU_MATVEC_MAX_THREADS - 1 pool workers
 * (kefu._core.tfidf.MAX_THREADS). */
#define KEFU_MATVEC_MAX_THREADS 64

/* kefu_matvec_f32 with the rows shared by up to `threads` threads: the calling thread and
 * workers of a process-wide pool, started on first need and parked between calls (dispatch.c).
 * Each thread takes contiguous blocks of rows starting on a multiple of 4 and runs the selected
 * kernel on them with the walk chosen for the whole matrix, so the result is bit-identical to
 * kefu_matvec_f32's whatever the number of threads.
 *
 * Fewer threads are used (down to the calling thread alone) when the matrix is too small for
 * them to pay off (a thread gets at least four rows, and enough elements to be worth handing
 * over or waking: see dispatch.c), when `threads` exceeds KEFU_MATVEC_MAX_THREADS, when workers
 * cannot be started, and when another thread is using the pool: that call then runs on its own
 * thread rather than wait.  Returns the number of threads the call was shared by.  Never
 * touches Python: call it without the GIL. */
int kefu_matvec_f32_threads(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                            const float *v, float *out, int threads);

#ifdef __cplusplus
}
#endif

#endif /* KEFU_SIMD_H */
