/* bcelogits native core: target detection, the threads of a call, and the block-order sums.
 * Compiled for the baseline target only (nothing here is vectorised); the kernels of each target are in
 * bce_kernel.c, compiled once per (dtype, target). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bce_core.h"

#if defined(_WIN32)
#include <windows.h>
#else
#include <pthread.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define BCE_X86_64 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

/* The workers compiled into this library (CMake defines BCE_HAVE_<TARGET> for each one it built). */
void bce_worker_f32_baseline(bce_args *a);
void bce_worker_f64_baseline(bce_args *a);
#ifdef BCE_HAVE_X86_64_V3
void bce_worker_f32_x86_64_v3(bce_args *a);
void bce_worker_f64_x86_64_v3(bce_args *a);
#endif
#ifdef BCE_HAVE_X86_64_V4
void bce_worker_f32_x86_64_v4(bce_args *a);
void bce_worker_f64_x86_64_v4(bce_args *a);
#endif

static const bce_worker_fn workers[BCE_N_TARGETS][2] = {
    {bce_worker_f32_baseline, bce_worker_f64_baseline},
#ifdef BCE_HAVE_X86_64_V3
    {bce_worker_f32_x86_64_v3, bce_worker_f64_x86_64_v3},
#else
    {0, 0},
#endif
#ifdef BCE_HAVE_X86_64_V4
    {bce_worker_f32_x86_64_v4, bce_worker_f64_x86_64_v4},
#else
    {0, 0},
#endif
};

/* ------------------------------------------------------------------------------------- CPU features */
#ifdef BCE_X86_64
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER) && !defined(__clang__)
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)v[i];
#else
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

static uint64_t xgetbv0(void) {
#if defined(_MSC_VER) && !defined(__clang__)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
#endif
}

#define BIT(v, n) (((v) >> (n)) & 1u)

/* x86-64-v3 and -v4 as the psABI defines them, each also needing the OS to save the wider registers
 * (XCR0: SSE and AVX state for v3; and opmask, ZMM0-15 upper halves, ZMM16-31 for v4). */
static unsigned x86_targets(void) {
    unsigned r[4], found = 1u << BCE_TARGET_BASELINE;
    cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    if (max_leaf < 7) return found;
    unsigned l1[4], l7[4], ext[4];
    cpuid(1, 0, l1);
    cpuid(7, 0, l7);
    cpuid(0x80000000u, 0, ext);
    unsigned lzcnt = 0;
    if (ext[0] >= 0x80000001u) {
        cpuid(0x80000001u, 0, ext);
        lzcnt = BIT(ext[2], 5);
    }
    unsigned c1 = l1[2], b7 = l7[1];
    int osxsave = BIT(c1, 27);
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int v2 = BIT(c1, 0) && BIT(c1, 9) && BIT(c1, 13) && BIT(c1, 19) && BIT(c1, 20) && BIT(c1, 23);
    int v3 = v2 && osxsave && (xcr0 & 0x6) == 0x6 && BIT(c1, 28) /* AVX */ && BIT(c1, 12) /* FMA */ &&
             BIT(c1, 29) /* F16C */ && BIT(c1, 22) /* MOVBE */ && BIT(b7, 5) /* AVX2 */ &&
             BIT(b7, 3) /* BMI1 */ && BIT(b7, 8) /* BMI2 */ && lzcnt;
    int v4 = v3 && (xcr0 & 0xE6) == 0xE6 && BIT(b7, 16) /* F */ && BIT(b7, 17) /* DQ */ &&
             BIT(b7, 28) /* CD */ && BIT(b7, 30) /* BW */ && BIT(b7, 31) /* VL */;
    if (v3) found |= 1u << BCE_TARGET_X86_64_V3;
    if (v4) found |= 1u << BCE_TARGET_X86_64_V4;
    return found;
}
#endif

BCE_EXPORT unsigned bce_compiled_targets(void) {
    unsigned m = 0;
    for (int t = 0; t < BCE_N_TARGETS; t++)
        if (workers[t][0]) m |= 1u << t;
    return m;
}

static unsigned supported_mask = 0;

BCE_EXPORT unsigned bce_supported_targets(void) {
    unsigned m = supported_mask;
    if (!m) {
#ifdef BCE_X86_64
        m = x86_targets();
#else
        m = 1u << BCE_TARGET_BASELINE;
#endif
        m &= bce_compiled_targets();
        supported_mask = m; /* (a benign race: every thread computes the same value) */
    }
    return m;
}

/* -------------------------------------------------------------------------------------------- layout */
#define BCE_OFFSET_ENTRY(kind, name) (int64_t) offsetof(bce_args, name),
static const int64_t field_offsets[] = {BCE_ARGS_FIELDS(BCE_OFFSET_ENTRY)};

BCE_EXPORT int64_t bce_args_size(void) { return (int64_t)sizeof(bce_args); }

BCE_EXPORT int64_t bce_args_offset(int64_t i) {
    int64_t count = (int64_t)(sizeof field_offsets / sizeof field_offsets[0]);
    return i >= 0 && i < count ? field_offsets[i] : -1;
}

/* ------------------------------------------------------------------------------------------- threads */
static void run_worker(void *arg) {
    bce_args *a = (bce_args *)arg;
    workers[a->target][a->dtype](a);
}

typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

#if defined(_WIN32)
static DWORD WINAPI thread_main(LPVOID arg) {
    run_worker(arg);
    return 0;
}
#else
static void *thread_main(void *arg) {
    run_worker(arg);
    return 0;
}
#endif

/* The call's own threads: nthreads - 1 started, the caller the last one, all joined before returning
 * (nothing of a call outlives it: an interrupted caller or a forked child finds no thread of ours). A
 * thread that cannot be started is simply not there: the others claim its blocks. */
static void run_on_own_threads(bce_args *a, int64_t nthreads) {
    enum { MAX_THREADS = 256 };
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
#if defined(_WIN32)
    HANDLE handles[MAX_THREADS];
    int started = 0;
    for (int64_t t = 1; t < nthreads; t++) {
        HANDLE h = CreateThread(NULL, 0, thread_main, a, 0, NULL);
        if (!h) break;
        handles[started++] = h;
    }
    run_worker(a);
    for (int i = 0; i < started; i++) {
        WaitForSingleObject(handles[i], INFINITE);
        CloseHandle(handles[i]);
    }
#else
    pthread_t ids[MAX_THREADS];
    int started = 0;
    pthread_attr_t attr;
    int have_attr = pthread_attr_init(&attr) == 0;
    /* The worker keeps 4 blocks of scratch (up to 128 KiB) on its stack: ask for 1 MiB, enough
     * everywhere (macOS's default for secondary threads is 512 KiB). */
    if (have_attr) pthread_attr_setstacksize(&attr, 1 << 20);
    for (int64_t t = 1; t < nthreads; t++) {
        if (pthread_create(&ids[started], have_attr ? &attr : NULL, thread_main, a) != 0) break;
        started++;
    }
    if (have_attr) pthread_attr_destroy(&attr);
    run_worker(a);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
#endif
}

/* Pairwise sum of v[0 .. n-1] in a fixed order (halves split at n / 2): deterministic and accurate. */
static double fixed_sum(const double *v, int64_t n) {
    if (n <= 8) {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += v[i];
        return s;
    }
    int64_t h = n / 2;
    return fixed_sum(v, h) + fixed_sum(v + h, n - h);
}

BCE_EXPORT int bce_run(bce_args *a) {
    if (a->target < 0 || a->target >= BCE_N_TARGETS || !((bce_supported_targets() >> a->target) & 1u))
        return BCE_ERROR_TARGET;
    if (a->dtype < 0 || a->dtype > 1 || a->mode < 0 || a->mode > 2 || a->n <= 0 || a->nthreads < 1 ||
        a->chunk < 1 || a->uses < 0 || a->uses > 31 || a->w_len < 1 || a->w_inner < 1 || a->p_len < 1 ||
        a->p_inner < 1)
        return BCE_ERROR_ARGS;
    const int64_t nb = (a->n + BCE_BLOCK - 1) / BCE_BLOCK;
    int64_t nthreads = a->nthreads < nb ? a->nthreads : nb;
    a->counter = 0;
    if (nthreads == 1) {
        run_worker(a);
    } else if (a->gomp_parallel) {
        /* torch's own OpenMP team: its threads are the ones still spinning after torch's last operator,
         * so they start on our blocks at once instead of competing with ours for the cores. */
        ((gomp_parallel_fn)(uintptr_t)a->gomp_parallel)(run_worker, a, (unsigned)nthreads, 0);
    } else {
        run_on_own_threads(a, nthreads);
    }
    const double *part = (const double *)(uintptr_t)a->part;
    if (a->mode != BCE_MODE_GRAD_NONE && (a->flags & BCE_FLAG_LOSS_SUM)) a->out_total = fixed_sum(part, nb);
    if (a->mode != BCE_MODE_GRAD_NONE && (a->flags & BCE_FLAG_KEPT_SUMS) && (a->uses & BCE_USE_IGNORE)) {
        a->out_count = fixed_sum(part + nb, nb);
        a->out_wsum = fixed_sum(part + 2 * nb, nb);
    }
    return BCE_OK;
}
