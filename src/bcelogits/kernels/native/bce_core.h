/* bcelogits native core: the fused one-pass BCE-with-logits kernel, C ABI.
 *
 * One call of bce_run() computes, for n elements, the element losses and/or the gradient and the float64
 * block partial sums, on nthreads threads, for one of the dispatch targets compiled into the library.
 * Python (bcelogits/kernels/_native.py) fills a bce_args block and makes that one call.
 *
 * The argument layout and the enums below are declared ONCE, as X-macro lists: C expands them into the
 * struct and the enum constants; Python parses the same lines (the F(...) and E(...) entries, one per
 * line) into its ctypes.Structure and IntEnum/IntFlag classes and checks size and offsets against
 * bce_args_size() / bce_args_offset() at load. Every field is 8 bytes (pointers travel as uint64), so
 * the layout is the same on every platform.
 */
#ifndef BCE_CORE_H
#define BCE_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Elements per block: the unit of work a thread claims and of one float64 partial sum. */
#define BCE_BLOCK 4096
/* Elements of a block computed between two groups of prefetches of the next block. */
#define BCE_SUB 256

/* clang-format off */
#define BCE_ARGS_FIELDS(F) \
    F(PTR, x)             /* logits, n elements of the dtype */ \
    F(PTR, y)             /* targets, n elements */ \
    F(PTR, w)             /* weight pattern: element i uses w[(i / w_inner) % w_len] */ \
    F(PTR, p)             /* pos_weight pattern, same rule */ \
    F(PTR, go)            /* upstream gradient (MODE_GRAD_NONE), n elements */ \
    F(PTR, lo)            /* element losses out (FLAG_WRITE_LOSS), n elements */ \
    F(PTR, gr)            /* gradient out (MODE_LOSS_GRAD, MODE_GRAD_NONE), n elements; may be x or go */ \
    F(PTR, wext)          /* w expanded over one period and a block (or 0): wext[k] = weight of k */ \
    F(PTR, pext)          /* the same for p */ \
    F(PTR, part)          /* 3 * nblocks float64: block loss sums, kept counts, kept weight sums */ \
    F(PTR, gomp_parallel) /* GOMP_parallel of the OpenMP runtime to run on, or 0: the core's own threads */ \
    F(I64, n)             /* number of elements (> 0) */ \
    F(I64, w_len) \
    F(I64, w_inner) \
    F(I64, p_len) \
    F(I64, p_inner) \
    F(I64, wext_len) \
    F(I64, pext_len) \
    F(I64, dtype)         /* enum bce_dtype */ \
    F(I64, mode)          /* enum bce_mode */ \
    F(I64, uses)          /* enum bce_uses, or-ed: the options this call's loop contains */ \
    F(I64, flags)         /* enum bce_flags, or-ed */ \
    F(I64, nthreads)      /* threads to run on (>= 1) */ \
    F(I64, chunk)         /* blocks a thread claims at a time (>= 1) */ \
    F(I64, target)        /* enum bce_target to run (must be supported: bce_supported_targets) */ \
    F(I64, counter)       /* next unclaimed block (set by bce_run) */ \
    F(F64, label_smoothing) \
    F(F64, ignore_index) \
    F(F64, gamma)         /* focal exponent (USE_FOCAL) */ \
    F(F64, grad_scale)    /* MODE_LOSS_GRAD writes grad_scale * dloss/dx */ \
    F(F64, out_total)     /* result: loss sum (FLAG_LOSS_SUM) */ \
    F(F64, out_count)     /* result: kept count (FLAG_KEPT_SUMS) */ \
    F(F64, out_wsum)      /* result: kept weight sum (FLAG_KEPT_SUMS) */

#define BCE_DTYPE(E) \
    E(DTYPE_FLOAT32, 0) \
    E(DTYPE_FLOAT64, 1)

#define BCE_MODE(E) \
    E(MODE_LOSS, 0)        /* loss only */ \
    E(MODE_LOSS_GRAD, 1)   /* loss and grad_scale * gradient */ \
    E(MODE_GRAD_NONE, 2)   /* go * gradient: the backward of reduction='none' */

#define BCE_USES(E) \
    E(USE_WEIGHT, 1) \
    E(USE_POS_WEIGHT, 2) \
    E(USE_SMOOTHING, 4) \
    E(USE_IGNORE, 8) \
    E(USE_FOCAL, 16)

#define BCE_FLAGS(E) \
    E(FLAG_WRITE_LOSS, 1)  /* write the element losses to lo */ \
    E(FLAG_LOSS_SUM, 2)    /* block loss sums into part, total into out_total */ \
    E(FLAG_KEPT_SUMS, 4)   /* block kept counts and weight sums, totals into out_count, out_wsum */

#define BCE_TARGET(E) \
    E(TARGET_BASELINE, 0)  /* x86-64 (SSE2), aarch64 (NEON), or whatever the compiler's default is */ \
    E(TARGET_X86_64_V3, 1) /* AVX2 + FMA (Haswell, Zen 1 and later) */ \
    E(TARGET_X86_64_V4, 2) /* AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Zen 4 and later) */

#define BCE_ERROR(E) \
    E(OK, 0) \
    E(ERROR_TARGET, -1)    /* the target is not compiled in or not supported by this CPU and OS */ \
    E(ERROR_ARGS, -2)      /* a field out of range (dtype, mode, n, nthreads, chunk, lengths) */
/* clang-format on */

#define BCE_FIELD_DECL_PTR(name) uint64_t name;
#define BCE_FIELD_DECL_I64(name) int64_t name;
#define BCE_FIELD_DECL_F64(name) double name;
#define BCE_FIELD_DECL(kind, name) BCE_FIELD_DECL_##kind(name)

typedef struct bce_args {
    BCE_ARGS_FIELDS(BCE_FIELD_DECL)
} bce_args;

#define BCE_ENUM_ITEM(name, value) BCE_##name = value,
enum bce_dtype { BCE_DTYPE(BCE_ENUM_ITEM) };
enum bce_mode { BCE_MODE(BCE_ENUM_ITEM) };
enum bce_uses { BCE_USES(BCE_ENUM_ITEM) };
enum bce_flags { BCE_FLAGS(BCE_ENUM_ITEM) };
enum bce_target { BCE_TARGET(BCE_ENUM_ITEM) BCE_N_TARGETS };
enum bce_error { BCE_ERROR(BCE_ENUM_ITEM) };

#if defined(_WIN32)
#define BCE_EXPORT __declspec(dllexport)
#else
#define BCE_EXPORT __attribute__((visibility("default")))
#endif

/* Run one call; returns BCE_OK or a (negative) enum bce_error. Never reads or writes outside the
 * arrays the fields describe. Blocks until every thread it started has finished. */
BCE_EXPORT int bce_run(bce_args *args);
/* Bit t set: target t is compiled into this library (and, for bce_supported_targets, this CPU and OS
 * can run it: CPUID features and the XCR0 register-state bits). */
BCE_EXPORT unsigned bce_compiled_targets(void);
BCE_EXPORT unsigned bce_supported_targets(void);
/* Layout of bce_args, for the check of Python's mirror: its size, and the offset of field i (in the
 * order of BCE_ARGS_FIELDS), or -1 past the last. */
BCE_EXPORT int64_t bce_args_size(void);
BCE_EXPORT int64_t bce_args_offset(int64_t i);

/* The per-thread worker of one dtype and target (internal: bce_kernel.c, compiled once per pair). */
typedef void (*bce_worker_fn)(bce_args *args);

#ifdef __cplusplus
}
#endif

#endif /* BCE_CORE_H */
