/* Runtime selection of the dense kernels: one function pointer pair, chosen by CPU detection
 * at first use (kefu._core.tfidf selects at import, honouring KEFU_SIMD), or forced by name;
 * and the worker pool that shares the rows of one matvec between threads.
 *
 * This file is compiled with the extension's baseline flags only; it calls the ISA-specific
 * kernels through pointers and only after the CPU check, so no AVX2 instruction can run on a
 * CPU without it. */
/* -std=c11 hides POSIX: pthread_sigmask, sigfillset, sysconf; and on Linux sched_getaffinity. */
#define _GNU_SOURCE

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
static pthread_once_t detected = PTHREAD_ONCE_INIT;
/* Read by kernels running without the GIL while a Python thread may select another. */
static const kefu_simd_kernel *_Atomic active = NULL;

static void detect_once(void)
{
    int n = 0;
    for (int i = 0; i < N_KERNELS; i++)
        if (KERNELS[i].supported())
            available[n++] = &KERNELS[i];
    n_available = n;
}

static void detect(void) { pthread_once(&detected, detect_once); }

static const kefu_simd_kernel *current(void)
{
    const kefu_simd_kernel *kernel = atomic_load(&active);
    if (kernel == NULL) {
        detect();
        /* The best kernel, unless another thread selected one meanwhile. */
        const kefu_simd_kernel *expected = NULL;
        if (atomic_compare_exchange_strong(&active, &expected, available[n_available - 1]))
            return available[n_available - 1];
        return expected;
    }
    return kernel;
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
        atomic_store(&active, available[n_available - 1]);
        return 0;
    }
    for (int i = 0; i < n_available; i++) {
        if (strcmp(available[i]->name, name) == 0) {
            atomic_store(&active, available[i]);
            return 0;
        }
    }
    return kefu_simd_known(name) ? -2 : -1;
}

float kefu_dot_f32(const float *a, const float *b, size_t n) { return current()->dot(a, b, n); }

/* Past the caches, one sequential stream beats four (KEFU_MATVEC_STREAM_FLOATS). */
static int by_four_for(size_t rows, size_t cols)
{
    return rows * cols <= KEFU_MATVEC_STREAM_FLOATS;
}

void kefu_matvec_f32(const float *m, size_t rows, size_t cols, ptrdiff_t stride, const float *v,
                     float *out)
{
    current()->matvec(m, rows, cols, stride, v, out, by_four_for(rows, cols));
}

/* ------------------------------------------------------------------------------------------
 * The worker pool of kefu_matvec_f32_threads.
 *
 * One caller at a time owns the pool (`busy`); a concurrent caller does not queue behind it but
 * computes its matvec on its own thread.  The owner publishes a job under `lock` with a new
 * generation, wakes the parked workers it wants, and claims parts of the job itself like any
 * worker, so a worker slow to wake delays nothing: the caller takes its parts.  Parts are
 * claimed from `ticket`, the generation in its high 32 bits and the next part in its low 32: a
 * worker that comes late, after its job ended, finds another generation there and claims
 * nothing, so it never writes into memory its caller has since given back.  The caller returns
 * once `done` counts every part.
 *
 * After a job a worker spins for SPIN_NS before parking on `wake`, so calls in quick succession
 * find it awake.  Workers are detached, block all signals and never touch Python: process exit
 * does not wait for them, and none is mid-job then (every caller waits for its parts).  After
 * fork() the child has none; the atfork handlers make fork wait for a job in flight and reset
 * the pool in the child, which starts new workers when it next needs them.
 *
 * Thresholds, measured on a 2-vCPU EPYC VM with 384-column matrices (time per call, one thread
 * -> two; calls back to back, or 300 us apart so that the worker is parked):
 * - handing parts to a worker that is awake costs well under a microsecond: two threads win
 *   from about 192k elements (7 -> 4 us; 256k: 12 -> 6 us; 1M: 51 -> 29 us), none at 128k, so
 *   a thread is worth using from AWAKE_FLOATS elements of its own;
 * - waking a parked worker costs the caller 10-15 us inside pthread_cond_signal (an IPI: a VM
 *   exit here), and the worker runs some 40 us later: two threads lose below 1M elements
 *   (256k: 12 -> 21 us) and win above (2M: 82 -> 72 us; 3.84M: 219 -> 139 us), so a thread is
 *   worth waking or starting from WAKE_FLOATS elements of its own, or for a stream of calls
 *   (one starting within SPIN_NS of the last one's end), which wakes the workers only once.
 */
#define AWAKE_FLOATS ((size_t)64 << 10)
#define WAKE_FLOATS ((size_t)512 << 10)
/* About a parked thread's wake-up latency above: spinning longer saves no more. */
#define SPIN_NS ((uint64_t)50 * 1000)
/* Parts per thread: a thread that starts late or is descheduled mid-call holds up the others
 * for a quarter of its share at most. */
#define PARTS_PER_THREAD 4

typedef struct {
    kefu_matvec_f32_fn matvec;
    const float *m;
    size_t rows, cols;
    ptrdiff_t stride;
    const float *v;
    float *out;
    int by_four;
    size_t groups; /* rows / 4: each part is whole groups of four rows, the last one the rest */
    uint32_t parts;
} matvec_job;

static struct {
    pthread_mutex_t busy;    /* held by the one caller using the pool */
    pthread_mutex_t lock;    /* guards the fields below; the atomics are written under it too */
    pthread_cond_t wake;     /* parked workers wait for a new generation */
    pthread_cond_t finished; /* the caller waits for its last part */
    matvec_job job;
    int workers; /* started, in this process */
    int atfork_registered;
    _Atomic int awake;           /* workers not parked on `wake` */
    _Atomic uint32_t generation; /* of the current job; spinning workers watch it */
    _Atomic uint64_t ticket;     /* generation << 32 | next part to claim (not under `lock`) */
    _Atomic uint32_t done;       /* parts of the current job computed (not under `lock`) */
    _Atomic uint64_t last_end;   /* now_ns() when the last call big enough to share ended */
} pool = {
    .busy = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .finished = PTHREAD_COND_INITIALIZER,
};

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if KEFU_SIMD_X86_64 && (defined(__GNUC__) || defined(__clang__))
    __builtin_ia32_pause();
#elif KEFU_SIMD_AARCH64 && (defined(__GNUC__) || defined(__clang__))
    __asm__ __volatile__("yield");
#endif
}

/* Spins for up to SPIN_NS while *word == value, or while it differs (`until_equal`).  No more
 * threads than CPUs ever spin (share), so a spinner does not keep the thread it waits for off
 * a CPU. */
static void spin(_Atomic uint32_t *word, uint32_t value, int until_equal)
{
    uint64_t deadline = 0;
    for (unsigned i = 1;; i++) {
        if ((atomic_load_explicit(word, memory_order_relaxed) == value) == until_equal)
            return;
        cpu_relax();
        if (i % 64 == 0) {
            uint64_t t = now_ns();
            if (deadline == 0)
                deadline = t + SPIN_NS;
            else if (t >= deadline)
                return;
        }
    }
}

/* The CPUs this thread may run on (its affinity mask where there is one). */
static size_t usable_cpus(void)
{
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return (size_t)CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (size_t)n : 1;
}

static void run_part(const matvec_job *job, uint32_t part)
{
    size_t r0 = 4 * (job->groups * part / job->parts);
    size_t r1 = part + 1 == job->parts ? job->rows : 4 * (job->groups * (part + 1) / job->parts);
    job->matvec(job->m + (ptrdiff_t)r0 * job->stride, r1 - r0, job->cols, job->stride, job->v,
                job->out + r0, job->by_four);
}

/* Claims and computes parts of job `generation` until none is left, or the pool moved on. */
static void work_on(const matvec_job *job, uint32_t generation)
{
    uint64_t t = atomic_load(&pool.ticket);
    while ((uint32_t)(t >> 32) == generation && (uint32_t)t < job->parts) {
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1))
            continue; /* t now holds the current ticket */
        run_part(job, (uint32_t)t);
        if (atomic_fetch_add(&pool.done, 1) + 1 == job->parts) {
            /* The last part: the caller may be asleep on `finished`. */
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.finished);
            pthread_mutex_unlock(&pool.lock);
        }
        t = atomic_load(&pool.ticket);
    }
}

static void *worker_main(void *arg)
{
    uint32_t seen = (uint32_t)(uintptr_t)arg; /* the generation when it was started */
    for (;;) {
        spin(&pool.generation, seen, 0);
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.generation) == seen) {
            atomic_fetch_sub(&pool.awake, 1);
            pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_add(&pool.awake, 1);
        }
        seen = atomic_load(&pool.generation);
        matvec_job job = pool.job;
        pthread_mutex_unlock(&pool.lock);
        work_on(&job, seen);
    }
    return NULL;
}

/* Under `lock`: starts workers until there are `want`.  They block every signal, so signals go
 * to the threads Python and the application expect. */
static void start_workers(size_t want)
{
    if ((size_t)pool.workers >= want)
        return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while ((size_t)pool.workers < want) {
        pthread_t tid;
        void *seen = (void *)(uintptr_t)atomic_load(&pool.generation);
        if (pthread_create(&tid, &attr, worker_main, seen) != 0)
            break; /* out of threads or memory: the call goes on with those there are */
        pool.workers++;
        atomic_fetch_add(&pool.awake, 1);
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* fork() waits for the job in flight (its caller holds `busy` until the last part is done) and
 * forks with both locks held, so the child's copy of the pool is consistent. */
static void before_fork(void)
{
    pthread_mutex_lock(&pool.busy);
    pthread_mutex_lock(&pool.lock);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.busy);
}

static void after_fork_in_child(void)
{
    /* Only the forking thread exists in the child.  The condition variables may still count
     * the parent's parked workers as waiters, so they start afresh. */
    pool.workers = 0;
    atomic_store(&pool.awake, 0);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.finished, NULL);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.busy);
}

/* Under `busy`: shares `job` between the caller and up to n - 1 workers, of which it wakes or
 * starts no more than wake - 1; returns the number of threads that shared it. */
static size_t share(matvec_job *job, size_t n, size_t wake)
{
    pthread_mutex_lock(&pool.lock);
    if (!pool.atfork_registered)
        pool.atfork_registered =
            pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;
    n = min_size(n, usable_cpus());
    wake = min_size(wake, n);
    /* No worker without the fork handlers: a child would inherit a pool whose threads it does
     * not have. */
    if (wake >= 2 && pool.atfork_registered)
        start_workers(wake - 1);
    size_t awake = (size_t)atomic_load(&pool.awake);
    size_t helpers = min_size(n - 1, wake >= 2 && wake - 1 > awake ? wake - 1 : awake);
    helpers = min_size(helpers, (size_t)pool.workers);
    if (helpers == 0) {
        pthread_mutex_unlock(&pool.lock);
        job->matvec(job->m, job->rows, job->cols, job->stride, job->v, job->out, job->by_four);
        return 1;
    }
    size_t to_wake = helpers > awake ? helpers - awake : 0;
    job->parts = (uint32_t)min_size((helpers + 1) * PARTS_PER_THREAD, job->groups);
    uint32_t generation = atomic_load(&pool.generation) + 1;
    pool.job = *job;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.ticket, (uint64_t)generation << 32);
    atomic_store(&pool.generation, generation);
    pthread_mutex_unlock(&pool.lock);
    /* Parked workers re-check the generation under `lock`, so waking them after unlocking
     * loses none, and they do not wake into a lock still held. */
    for (size_t i = 0; i < to_wake; i++)
        pthread_cond_signal(&pool.wake);

    work_on(job, generation);
    /* The parts left are being computed: wait for them awake first (a sleeping caller takes
     * as long to wake as a worker). */
    spin(&pool.done, job->parts, 1);
    if (atomic_load(&pool.done) != job->parts) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.done) != job->parts)
            pthread_cond_wait(&pool.finished, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    return helpers + 1;
}

int kefu_matvec_f32_threads(const float *m, size_t rows, size_t cols, ptrdiff_t stride,
                            const float *v, float *out, int threads)
{
    size_t size = rows * cols;
    matvec_job job = {current()->matvec, m, rows, cols, stride, v, out, by_four_for(rows, cols),
                      rows / 4, 1};
    /* Each thread gets at least one group of four rows and AWAKE_FLOATS elements; and a CPU
     * (share): the kernel is bound by memory, so threads beyond the CPUs only add switches,
     * and a thread spinning while the one it waits for has no CPU would make it worse. */
    size_t n = threads < 1 ? 1 : min_size((size_t)threads, KEFU_MATVEC_MAX_THREADS);
    n = min_size(n, min_size(job.groups, size / AWAKE_FLOATS));
    if (n < 2) {
        job.matvec(m, rows, cols, stride, v, out, job.by_four);
        return 1;
    }
    /* Workers awake now cost nothing to use; parked or new ones pay off on WAKE_FLOATS each,
     * or in a stream of calls. */
    int in_stream = now_ns() - atomic_load(&pool.last_end) < SPIN_NS;
    size_t wake = in_stream ? n : min_size(n, size / WAKE_FLOATS);
    size_t used = 1;
    if ((wake >= 2 || atomic_load(&pool.awake) > 0) && pthread_mutex_trylock(&pool.busy) == 0) {
        used = share(&job, n, wake);
        pthread_mutex_unlock(&pool.busy);
    } else {
        job.matvec(m, rows, cols, stride, v, out, job.by_four);
    }
    atomic_store(&pool.last_end, now_ns());
    return (int)used;
}
