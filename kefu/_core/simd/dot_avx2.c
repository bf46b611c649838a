/* AVX2 + FMA kernels.  Compiled with -mavx2 -mfma only: never call them unless the dispatcher
 * found both in the CPU and the OS saving YMM state.  Unaligned loads throughout. */
#include "kefu_simd.h"

#if KEFU_SIMD_X86_64
#include <immintrin.h>

static inline float hsum256(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 0x55));
    return _mm_cvtss_f32(x);
}

/* The sums of r0..r3, one per lane. */
static inline __m128 hsum4x256(__m256 r0, __m256 r1, __m256 r2, __m256 r3)
{
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(r0, r1), _mm256_hadd_ps(r2, r3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

float kefu_dot_f32_avx2(const float *a, const float *b, size_t n)
{
    /* FMA has a latency of 4-5 cycles at two per cycle: four independent accumulators are the
     * least that keeps both ports busy (eight would fully cover the latency, but the loop is
     * bound by the two loads per FMA anyway). */
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Rows 0 .. 4*floor(rows/4) - 1; returns how many rows it did. */
static size_t four_rows_at_a_time(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                                  const float *v, float *out)
{
    size_t r = 0;
    /* Four rows by sixteen columns: eight accumulators cover the FMA latency, and each load of
     * v serves four rows (10 loads per 8 FMAs instead of 16). */
    for (; r + 4 <= rows; r += 4) {
        const float *m0 = m + (ptrdiff_t)r * stride;
        const float *m1 = m0 + stride, *m2 = m1 + stride, *m3 = m2 + stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        size_t c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m256 x = _mm256_loadu_ps(v + c), y = _mm256_loadu_ps(v + c + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + c), x, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + c), x, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + c), x, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + c), x, a3);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + c + 8), y, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + c + 8), y, b1);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + c + 8), y, b2);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + c + 8), y, b3);
        }
        for (; c + 8 <= cols; c += 8) {
            __m256 x = _mm256_loadu_ps(v + c);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(m0 + c), x, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(m1 + c), x, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(m2 + c), x, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(m3 + c), x, a3);
        }
        __m128 s = hsum4x256(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1),
                             _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));
        if (c < cols) {
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
            for (; c < cols; c++) {
                t0 += m0[c] * v[c];
                t1 += m1[c] * v[c];
                t2 += m2[c] * v[c];
                t3 += m3[c] * v[c];
            }
            s = _mm_add_ps(s, _mm_setr_ps(t0, t1, t2, t3));
        }
        _mm_storeu_ps(out + r, s);
    }
    return r;
}

void kefu_matvec_f32_avx2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four)
{
    size_t r = 0;
    if (by_four)
        r = four_rows_at_a_time(m, rows, cols, stride, v, out);
    for (; r < rows; r++)
        out[r] = kefu_dot_f32_avx2(m + (ptrdiff_t)r * stride, v, cols);
}

#else
/* Not x86-64: nothing to compile (ISO C wants at least one declaration). */
typedef int kefu_simd_avx2_unused;
#endif
