/* Advanced SIMD (NEON) kernels for AArch64, where NEON is baseline: no extra flags needed. */
#include "kefu_simd.h"

#if KEFU_SIMD_AARCH64
#include <arm_neon.h>

float kefu_dot_f32_neon(const float *a, const float *b, size_t n)
{
    /* Four accumulators cover the FMLA latency (4 cycles) at the two-per-cycle rate of
     * common cores. */
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
    float32x4_t s2 = vdupq_n_f32(0.0f), s3 = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4)
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Rows 0 .. 4*floor(rows/4) - 1; returns how many rows it did. */
static size_t four_rows_at_a_time(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                                  const float *v, float *out)
{
    size_t r = 0;
    /* Four rows by eight columns: each load of v serves four rows. */
    for (; r + 4 <= rows; r += 4) {
        const float *m0 = m + (ptrdiff_t)r * stride;
        const float *m1 = m0 + stride, *m2 = m1 + stride, *m3 = m2 + stride;
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
        float32x4_t a2 = vdupq_n_f32(0.0f), a3 = vdupq_n_f32(0.0f);
        float32x4_t b0 = vdupq_n_f32(0.0f), b1 = vdupq_n_f32(0.0f);
        float32x4_t b2 = vdupq_n_f32(0.0f), b3 = vdupq_n_f32(0.0f);
        size_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            float32x4_t x = vld1q_f32(v + c), y = vld1q_f32(v + c + 4);
            a0 = vfmaq_f32(a0, vld1q_f32(m0 + c), x);
            a1 = vfmaq_f32(a1, vld1q_f32(m1 + c), x);
            a2 = vfmaq_f32(a2, vld1q_f32(m2 + c), x);
            a3 = vfmaq_f32(a3, vld1q_f32(m3 + c), x);
            b0 = vfmaq_f32(b0, vld1q_f32(m0 + c + 4), y);
            b1 = vfmaq_f32(b1, vld1q_f32(m1 + c + 4), y);
            b2 = vfmaq_f32(b2, vld1q_f32(m2 + c + 4), y);
            b3 = vfmaq_f32(b3, vld1q_f32(m3 + c + 4), y);
        }
        for (; c + 4 <= cols; c += 4) {
            float32x4_t x = vld1q_f32(v + c);
            a0 = vfmaq_f32(a0, vld1q_f32(m0 + c), x);
            a1 = vfmaq_f32(a1, vld1q_f32(m1 + c), x);
            a2 = vfmaq_f32(a2, vld1q_f32(m2 + c), x);
            a3 = vfmaq_f32(a3, vld1q_f32(m3 + c), x);
        }
        /* Pairwise adds leave the four row sums in the four lanes. */
        float32x4_t s = vpaddq_f32(vpaddq_f32(vaddq_f32(a0, b0), vaddq_f32(a1, b1)),
                                   vpaddq_f32(vaddq_f32(a2, b2), vaddq_f32(a3, b3)));
        if (c < cols) {
            float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (; c < cols; c++) {
                t[0] += m0[c] * v[c];
                t[1] += m1[c] * v[c];
                t[2] += m2[c] * v[c];
                t[3] += m3[c] * v[c];
            }
            s = vaddq_f32(s, vld1q_f32(t));
        }
        vst1q_f32(out + r, s);
    }
    return r;
}

void kefu_matvec_f32_neon(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                          const float *v, float *out, int by_four)
{
    size_t r = 0;
    if (by_four)
        r = four_rows_at_a_time(m, rows, cols, stride, v, out);
    for (; r < rows; r++)
        out[r] = kefu_dot_f32_neon(m + (ptrdiff_t)r * stride, v, cols);
}

#else
/* Not AArch64: nothing to compile (ISO C wants at least one declaration). */
typedef int kefu_simd_neon_unused;
#endif
