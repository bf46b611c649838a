/* Runtime selection of the dense kernels: one function pointer pair, chosen by CPU detection
 * at first use (kefu._core.tfidf selects at import, honouring KEFU_SIMD), or forced by name.
 *
 * This file is compiled with the extension's baseline flags only; it calls the ISA-specific
 * kernels through pointers and only after the CPU check, so no AVX2 instruction can run on a
 * CPU without it. */
#include <string.h>

#include "kefu_simd.h"

typedef struct {
    const char *name;
    kefu_dot_f32_fn dot;
    kefu_matvec_f32_fn matvec;
    int (*supported)(void);
} kefu_simd_kernel;

static int always(void) { return 1; }

#if KEFU_SIMD_X86_64
#if defined(__GNUC__) || defined(__clang__)
/* libgcc's (and compiler-rt's) detection reports AVX2 and FMA only when the OS also enables
 * the YMM state (OSXSAVE and XCR0 bits 1-2), which the kernels need as much as the CPU bits. */
static int has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
/* No portable detection here: stay on the x86-64 baseline. */
static int has_avx2_fma(void) { return 0; }
#endif
#endif

/* Worst first: the best kernel the CPU supports is the last supported entry. */
static const kefu_simd_kernel KERNELS[] = {
    {"scalar", kefu_dot_f32_scalar, kefu_matvec_f32_scalar, always},
#if KEFU_SIMD_X86_64
    {"sse2", kefu_dot_f32_sse2, kefu_matvec_f32_sse2, always},
    {"avx2", kefu_dot_f32_avx2, kefu_matvec_f32_avx2, has_avx2_fma},
#endif
#if KEFU_SIMD_AARCH64
    {"neon", kefu_dot_f32_neon, kefu_matvec_f32_neon, always},
#endif
};
#define N_KERNELS ((int)(sizeof(KERNELS) / sizeof(KERNELS[0])))

/* Filled once: which kernels this CPU runs, in KERNELS order. */
static const kefu_simd_kernel *available[N_KERNELS];
static int n_available = -1;
static const kefu_simd_kernel *active = NULL;

static void detect(void)
{
    if (n_available >= 0)
        return;
    int n = 0;
    for (int i = 0; i < N_KERNELS; i++)
        if (KERNELS[i].supported())
            available[n++] = &KERNELS[i];
    n_available = n;
}

static const kefu_simd_kernel *current(void)
{
    if (active == NULL) {
        detect();
        active = available[n_available - 1];
    }
    return active;
}

const char *kefu_simd_impl(void) { return current()->name; }

int kefu_simd_count(void)
{
    detect();
    return n_available;
}

const char *kefu_simd_name(int index)
{
    detect();
    if (index < 0 || index >= n_available)
        return NULL;
    return available[index]->name;
}

int kefu_simd_known(const char *name)
{
    for (int i = 0; i < N_KERNELS; i++)
        if (strcmp(KERNELS[i].name, name) == 0)
            return 1;
    return 0;
}

int kefu_simd_select(const char *name)
{
    detect();
    if (name == NULL || strcmp(name, "auto") == 0) {
        active = available[n_available - 1];
        return 0;
    }
    for (int i = 0; i < n_available; i++) {
        if (strcmp(available[i]->name, name) == 0) {
            active = available[i];
            return 0;
        }
    }
    return kefu_simd_known(name) ? -2 : -1;
}

float kefu_dot_f32(const float *a, const float *b, size_t n) { return current()->dot(a, b, n); }

void kefu_matvec_f32(const float *m, size_t rows, size_t cols, ptrdiff_t stride, const float *v,
                     float *out)
{
    current()->matvec(m, rows, cols, stride, v, out);
}
