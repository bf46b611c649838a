/* SSE2 kernels (x86-64 baseline).  Compiled with -msse2 only; unaligned loads throughout. */
#include "kefu_simd.h"

#if KEFU_SIMD_X86_64
#include <emmintrin.h>

static inline float hsum128(__m128 v)
{
    __m128 hi = _mm_movehl_ps(v, v);
    v = _mm_add_ps(v, hi);
    hi = _mm_shuffle_ps(v, v, 0x55);
    return _mm_cvtss_f32(_mm_add_ss(v, hi));
}

/* The sums of r0..r3, one per lane, without SSE3's hadd. */
static inline __m128 hsum4x128(__m128 r0, __m128 r1, __m128 r2, __m128 r3)
{
    __m128 a = _mm_add_ps(_mm_unpacklo_ps(r0, r1), _mm_unpackhi_ps(r0, r1));
    __m128 b = _mm_add_ps(_mm_unpacklo_ps(r2, r3), _mm_unpackhi_ps(r2, r3));
    return _mm_add_ps(_mm_movelh_ps(a, b), _mm_movehl_ps(b, a));
}

float kefu_dot_f32_sse2(const float *a, const float *b, size_t n)
{
    /* Four accumulators hide the latency of addps (3-4 cycles at 1-2 per cycle). */
    __m128 s0 = _mm_setzero_ps(), s1 = _mm_setzero_ps();
    __m128 s2 = _mm_setzero_ps(), s3 = _mm_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm_add_ps(s0, _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
        s1 = _mm_add_ps(s1, _mm_mul_ps(_mm_loadu_ps(a + i + 4), _mm_loadu_ps(b + i + 4)));
        s2 = _mm_add_ps(s2, _mm_mul_ps(_mm_loadu_ps(a + i + 8), _mm_loadu_ps(b + i + 8)));
        s3 = _mm_add_ps(s3, _mm_mul_ps(_mm_loadu_ps(a + i + 12), _mm_loadu_ps(b + i + 12)));
    }
    for (; i + 4 <= n; i += 4)
        s0 = _mm_add_ps(s0, _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
    float s = hsum128(_mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Rows 0 .. 4*floor(rows/4) - 1; returns how many rows it did. */
static size_t four_rows_at_a_time(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                                  const float *v, float *out)
{
    size_t r = 0;
    /* Four rows at a time: each load of v serves four rows, halving the loads per product. */
    for (; r + 4 <= rows; r += 4) {
        const float *m0 = m + (ptrdiff_t)r * stride;
        const float *m1 = m0 + stride, *m2 = m1 + stride, *m3 = m2 + stride;
        __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
        __m128 a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
        __m128 b0 = _mm_setzero_ps(), b1 = _mm_setzero_ps();
        __m128 b2 = _mm_setzero_ps(), b3 = _mm_setzero_ps();
        size_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m128 x = _mm_loadu_ps(v + c), y = _mm_loadu_ps(v + c + 4);
            a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_loadu_ps(m0 + c), x));
            a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_loadu_ps(m1 + c), x));
            a2 = _mm_add_ps(a2, _mm_mul_ps(_mm_loadu_ps(m2 + c), x));
            a3 = _mm_add_ps(a3, _mm_mul_ps(_mm_loadu_ps(m3 + c), x));
            b0 = _mm_add_ps(b0, _mm_mul_ps(_mm_loadu_ps(m0 + c + 4), y));
            b1 = _mm_add_ps(b1, _mm_mul_ps(_mm_loadu_ps(m1 + c + 4), y));
            b2 = _mm_add_ps(b2, _mm_mul_ps(_mm_loadu_ps(m2 + c + 4), y));
            b3 = _mm_add_ps(b3, _mm_mul_ps(_mm_loadu_ps(m3 + c + 4), y));
        }
        for (; c + 4 <= cols; c += 4) {
            __m128 x = _mm_loadu_ps(v + c);
            a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_loadu_ps(m0 + c), x));
            a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_loadu_ps(m1 + c), x));
            a2 = _mm_add_ps(a2, _mm_mul_ps(_mm_loadu_ps(m2 + c), x));
            a3 = _mm_add_ps(a3, _mm_mul_ps(_mm_loadu_ps(m3 + c), x));
        }
        __m128 s = hsum4x128(_mm_add_ps(a0, b0), _mm_add_ps(a1, b1), _mm_add_ps(a2, b2),
                             _mm_add_ps(a3, b3));
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

void kefu_matvec_f32_sse2(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four)
{
    size_t r = 0;
    if (by_four)
        r = four_rows_at_a_time(m, rows, cols, stride, v, out);
    for (; r < rows; r++)
        out[r] = kefu_dot_f32_sse2(m + (ptrdiff_t)r * stride, v, cols);
}

#else
/* Not x86-64: nothing to compile (ISO C wants at least one declaration). */
typedef int kefu_simd_sse2_unused;
#endif
