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
 * rows sharing each load of v win (500 x 384: SSE2 49 vs 32 GFLOP/s). */
#define KEFU_MATVEC_STREAM_FLOATS ((size_t)8 << 20)

typedef float (*kefu_dot_f32_fn)(const float *a, const float *b, size_t n);
typedef void (*kefu_matvec_f32_fn)(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                                   const float *v, float *out);

/* Portable C, always present: the fallback and the reference of the others. */
float kefu_dot_f32_scalar(const float *a, const float *b, size_t n);
void kefu_matvec_f32_scalar(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                            const float *v, float *out);

#if KEFU_SIMD_X86_64
/* SSE2 is part of x86-64, so this kernel runs on every x86-64 CPU. */
float kefu_dot_f32_sse2(const float *a, const float *b, size_t n);
void kefu_matvec_f32_sse2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out);
/* AVX2 + FMA: only called when the CPU and the OS (YMM state) support both. */
float kefu_dot_f32_avx2(const float *a, const float *b, size_t n);
void kefu_matvec_f32_avx2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out);
#endif

#if KEFU_SIMD_AARCH64
/* Advanced SIMD is part of AArch64. */
float kefu_dot_f32_neon(const float *a, const float *b, size_t n);
void kefu_matvec_f32_neon(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out);
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

#ifdef __cplusplus
}
#endif

#endif /* KEFU_SIMD_H */
