/* Portable C kernels: always compiled, always available, and the fallback of every CPU. */
#include "kefu_simd.h"

float kefu_dot_f32_scalar(const float *a, const float *b, size_t n)
{
    /* Four independent sums keep the adder busy instead of waiting on one dependency chain.
     * The compiler may pack them into one baseline vector register (SSE2, NEON); each sum still
     * adds its own products in source order, so the result is the same as four scalar sums. */
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

void kefu_matvec_f32_scalar(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                            const float *v, float *out, int by_four)
{
    (void)by_four; /* one row at a time either way: the scalar dot has no v to share */
    for (size_t r = 0; r < rows; r++)
        out[r] = kefu_dot_f32_scalar(m + (ptrdiff_t)r * stride, v, cols);
}
