/* The element math and the per-thread worker of the fused kernel, for ONE dtype (BCE_F64 = 0 float32,
 * 1 float64) and ONE dispatch target (BCE_TARGET_NAME: baseline, x86_64_v3, x86_64_v4). The build compiles
 * this file once per pair, each with its own -march flags, into the one library; bce_core.c picks the
 * pair at run time.
 *
 * Algorithm (the formulas of bcelogits/_math.py): a = |x|, h = exp(-a/2), e = h*h; big side / small side;
 * a small-side value is multiplied by its coefficient before the second h (so p w e stays normal where
 * e alone underflows); 0 * inf = 0 at |x| = inf; NaN in gives NaN out. The smoothed target is
 * fma(y, 1 - ls, ls/2) and its complement fma(1 - y, 1 - ls, ls/2), with the factors rounded to the
 * dtype. exp and log1p are branch-free range reductions and minimax polynomials (no libm call), with
 * 2^k built from the exponent bits.
 *
 * The same bits on every target: the element math is plain scalar C, every fused multiply-add is an
 * explicit fma(), and the build passes -ffp-contract=off (no contraction of a*b+c), no -ffast-math
 * (no reassociation), so each operation is one IEEE-rounded operation whatever the vector width. The
 * block sums use 16 float64 accumulators in a fixed lane pattern, combined in a fixed tree (loss_sum),
 * and bce_core.c adds the block partials in a fixed order: sums do not depend on the target or on the
 * thread count either. (On the baseline x86-64 target fma() is glibc's exact software fma: slower, the
 * same bits.)
 *
 * Speed: each SUB part of a block is done in two loops: the first computes h from x into a scratch
 * buffer that stays in L1, the second everything else. One loop does the same arithmetic, but each
 * element's chain exp -> log1p -> loss is then too long for the out-of-order core to overlap enough
 * iterations (25-35 % slower, measured on the numba kernel this replaces). After each part, the same
 * part of the next block's input streams is prefetched into L2, so the data is in L2 a block later (the
 * hardware prefetchers stop at each 4 KiB page). With focal, the loop is long enough on its own, and
 * the exponential pass runs once over the whole block (part by part measured slower there).
 *
 * Specialisation: the worker is an always-inline function of (mode, uses) called with constants from a
 * switch, so each case is a function containing only its own options (no weight loads without weight,
 * no gradient division in the loss-only loop, ...).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bce_core.h"

#ifndef BCE_F64
#error "define BCE_F64 (0 or 1)"
#endif
#ifndef BCE_TARGET_NAME
#error "define BCE_TARGET_NAME"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#define NOINLINE static __attribute__((noinline))
#define RESTRICT __restrict__
#define PREFETCH_L2(ptr) __builtin_prefetch((ptr), 0, 2)
#define ALIGNED(n) __attribute__((aligned(n)))
#else
#define INLINE static __forceinline
#define NOINLINE static __declspec(noinline)
#define RESTRICT __restrict
#define PREFETCH_L2(ptr) ((void)(ptr))
#define ALIGNED(n) __declspec(align(n))
#endif

#define CAT3_(a, b, c) a##b##c
#define CAT3(a, b, c) CAT3_(a, b, c)

#if BCE_F64
typedef double T;
typedef uint64_t UBITS;
typedef int64_t SBITS;
#define MANT 52
#define BIAS 1023
#define FMA fma
#define FABS fabs
/* The constant of the dtype: K(float32 value, float64 value). */
#define K(v32, v64) ((T)(v64))
#define WORKER CAT3(bce_worker_f64_, BCE_TARGET_NAME, )
#else
typedef float T;
typedef uint32_t UBITS;
typedef int32_t SBITS;
#define MANT 23
#define BIAS 127
#define FMA fmaf
#define FABS fabsf
#define K(v32, v64) ((T)(v32))
#define WORKER CAT3(bce_worker_f32_, BCE_TARGET_NAME, )
#endif

/* ------------------------------------------------------------------------------------------ constants */
/* Minimax fits (Lawson iteration in 50-digit arithmetic).
 * exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2; max relative error 3e-9 (float32) / 4e-18 (float64). */
#define EXP32_0 0.49999993447560215
#define EXP32_1 0.1666652062943919
#define EXP32_2 0.0416683880926952
#define EXP32_3 0.008368717090860945
#define EXP32_4 0.001381459638233105
#define EXP64_0 0.5000000000000011
#define EXP64_1 0.16666666666666413
#define EXP64_2 0.04166666666653015
#define EXP64_3 0.008333333333494465
#define EXP64_4 0.0013888888943631803
#define EXP64_5 0.00019841269506578428
#define EXP64_6 2.4801493097261263e-05
#define EXP64_7 2.7557586370338387e-06
#define EXP64_8 2.763024893189953e-07
#define EXP64_9 2.5000063549257597e-08
/* 2 atanh(s) = 2s + 2s z Q(z), z = s^2 in [0, 1/9]; max relative error 5e-9 / 1e-18. */
#define LOG32_0 0.33333206564805007
#define LOG32_1 0.2001084959436607
#define LOG32_2 0.13999569703293127
#define LOG32_3 0.14012232824624316
#define LOG64_0 0.33333333333333154
#define LOG64_1 0.20000000000078622
#define LOG64_2 0.14285714273926878
#define LOG64_3 0.11111111984868975
#define LOG64_4 0.09090871962356532
#define LOG64_5 0.07693279963590306
#define LOG64_6 0.06650486768431797
#define LOG64_7 0.06053043304299665
#define LOG64_8 0.041700500513788714
#define LOG64_9 0.08509288835457396
/* ln 2 = hi + lo per dtype (Cody-Waite reduction with fma). */
#define LN2_HI32 0.6931471824645996
#define LN2_LO32 (-1.9046542121259336e-09)
#define LN2_HI64 0.6931471805599453
#define LN2_LO64 2.3190468138462996e-17
#define LOG2E 1.4426950408889634
/* Beyond this |x| the small-side softplus is (c h) h (bcelogits._math.SMALL_SIDE_LINEAR). */
#define SMALL_SIDE_LINEAR 40.0

/* Polynomial in u for exp(-u/2) scaled by 2^-32 / 2^-64: coefficient of u^(j+2) is P_j (-1/2)^(j+2),
 * then times 2^-off; the products are exact in double (powers of two), then rounded once to T. */
#define EU32(j, c) ((T)((c) * ((j) % 2 ? -1.0 : 1.0) * (1.0 / (double)(1ull << ((j) + 2))) * 0x1p-32))
#define EU64(j, c) ((T)((c) * ((j) % 2 ? -1.0 : 1.0) * (1.0 / (double)(1ull << ((j) + 2))) * 0x1p-64))
/* atanh polynomial in w = (2s)^2: R_j = Q_j / 4^(j+1) (exact). */
#define LT(j, c) ((T)((c) / (double)(1ull << (2 * ((j) + 1)))))

/* --------------------------------------------------------------------------------------- bit helpers */
INLINE UBITS bits_of(T v) {
    UBITS u;
    memcpy(&u, &v, sizeof u);
    return u;
}

INLINE T from_bits(UBITS u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* 2^(k + off) from z = k + 1.5 * 2^MANT (the round-to-integer magic number): z's low bits are k. */
INLINE T pow2_of_magic(T z, int off) {
    UBITS zi = bits_of(z);
    return from_bits((UBITS)((zi << MANT) + ((UBITS)(off + BIAS) << MANT)));
}

/* p * 2^k as (p * 2^(k>>1)) * 2^(k - (k>>1)), k from the magic number z (k may exceed one exponent). */
INLINE T scale2(T p, T z) {
    const UBITS magic = bits_of(K(12582912.0, 6755399441055744.0));
    SBITS k = (SBITS)(bits_of(z) - magic);
    SBITS k1 = k >> 1;
    SBITS k2 = k - k1;
    T s1 = from_bits((UBITS)((UBITS)(k1 + BIAS) << MANT));
    T s2 = from_bits((UBITS)((UBITS)(k2 + BIAS) << MANT));
    return (p * s1) * s2;
}

/* v = m 2^k with m in [sqrt(1/2), sqrt(2)) (v positive normal; other v give values that are masked). */
INLINE void log_split(T v, T *m, T *kf) {
    const UBITS one = bits_of((T)1.0);
    const UBITS sqh = bits_of(K(0.7071067811865476, 0.7071067811865476));
    UBITS vi = bits_of(v) + (one - sqh);
    SBITS k = ((SBITS)vi >> MANT) - BIAS;
    *m = from_bits((vi & (((UBITS)1 << MANT) - 1)) + sqh);
    *kf = (T)k;
}

/* ----------------------------------------------------------------------------------------- element math */
/* exp(r) for |r| <= ln2/2: the minimax polynomial by Horner's rule, then 1, 1. */
INLINE T exp_poly(T r) {
    T q;
#if BCE_F64
    q = (T)EXP64_9;
    q = FMA(q, r, (T)EXP64_8);
    q = FMA(q, r, (T)EXP64_7);
    q = FMA(q, r, (T)EXP64_6);
    q = FMA(q, r, (T)EXP64_5);
    q = FMA(q, r, (T)EXP64_4);
    q = FMA(q, r, (T)EXP64_3);
    q = FMA(q, r, (T)EXP64_2);
    q = FMA(q, r, (T)EXP64_1);
    q = FMA(q, r, (T)EXP64_0);
#else
    q = (T)EXP32_4;
    q = FMA(q, r, (T)EXP32_3);
    q = FMA(q, r, (T)EXP32_2);
    q = FMA(q, r, (T)EXP32_1);
    q = FMA(q, r, (T)EXP32_0);
#endif
    q = FMA(q, r, (T)1.0);
    return FMA(q, r, (T)1.0);
}

/* 2^-off exp(-u/2) for |u| <= ln2 (off = 32 / 64): every coefficient carries the 2^-off (exact), so the
 * final scaling by 2^k is one multiply. float32 by Horner's rule, float64 by Estrin's scheme. */
INLINE T exp_poly_u(T u) {
#if BCE_F64
    const T c0 = (T)(0x1p-64), c1 = (T)(-0.5 * 0x1p-64);
    const T c2 = EU64(0, EXP64_0), c3 = EU64(1, EXP64_1), c4 = EU64(2, EXP64_2), c5 = EU64(3, EXP64_3);
    const T c6 = EU64(4, EXP64_4), c7 = EU64(5, EXP64_5), c8 = EU64(6, EXP64_6), c9 = EU64(7, EXP64_7);
    const T c10 = EU64(8, EXP64_8), c11 = EU64(9, EXP64_9);
    T u2 = u * u;
    T u4 = u2 * u2;
    T q03 = FMA(u2, FMA(u, c3, c2), FMA(u, c1, c0));
    T q47 = FMA(u2, FMA(u, c7, c6), FMA(u, c5, c4));
    T q811 = FMA(u2, FMA(u, c11, c10), FMA(u, c9, c8));
    return FMA(u4 * u4, q811, FMA(u4, q47, q03));
#else
    T q = EU32(4, EXP32_4);
    q = FMA(q, u, EU32(3, EXP32_3));
    q = FMA(q, u, EU32(2, EXP32_2));
    q = FMA(q, u, EU32(1, EXP32_1));
    q = FMA(q, u, EU32(0, EXP32_0));
    q = FMA(q, u, (T)(-0.5 * 0x1p-32));
    return FMA(q, u, (T)(0x1p-32));
#endif
}

/* 2 atanh(t/2) = log((2 + t) / (2 - t)) for t^2 <= 4/9: t + t w R(w), w = t^2. */
INLINE T atanh2(T t) {
    T w = t * t;
    T q;
#if BCE_F64
    q = LT(9, LOG64_9);
    q = FMA(q, w, LT(8, LOG64_8));
    q = FMA(q, w, LT(7, LOG64_7));
    q = FMA(q, w, LT(6, LOG64_6));
    q = FMA(q, w, LT(5, LOG64_5));
    q = FMA(q, w, LT(4, LOG64_4));
    q = FMA(q, w, LT(3, LOG64_3));
    q = FMA(q, w, LT(2, LOG64_2));
    q = FMA(q, w, LT(1, LOG64_1));
    q = FMA(q, w, LT(0, LOG64_0));
#else
    q = LT(3, LOG32_3);
    q = FMA(q, w, LT(2, LOG32_2));
    q = FMA(q, w, LT(1, LOG32_1));
    q = FMA(q, w, LT(0, LOG32_0));
#endif
    return FMA(t * w, q, t);
}

/* log1p(e) for e in [0, 1]: 2 atanh(e / (2 + e)) from t = 2e / (2 + e) (2e exact: denormals too). */
INLINE T log1p01(T e) {
    return atanh2((e + e) / ((T)2.0 + e));
}

/* exp(t + tlo) for any t and |tlo| <= ulp(t): overflow to inf, underflow to 0 or a denormal, NaN kept. */
INLINE T exp_any(T t, T tlo) {
    const T lo = K(-104.0, -746.0), hi = K(89.0, 710.0);
    const T magic = K(12582912.0, 6755399441055744.0);
    t = t < lo ? lo : t;
    t = t > hi ? hi : t;
    T z = FMA(t, K(LOG2E, LOG2E), magic);
    T kf = z - magic;
    T r = FMA(kf, K(-LN2_HI32, -LN2_HI64), t);
    r = FMA(kf, K(-LN2_LO32, -LN2_LO64), r) + tlo;
    return scale2(exp_poly(r), z);
}

/* log(v) for any v: 0 -> -inf, negative or NaN -> NaN, inf -> inf, denormals exact. */
INLINE T log_any(T v) {
    const T zero = (T)0.0, inf = (T)INFINITY;
    int tiny = v < K(1.1754943508222875e-38, 2.2250738585072014e-308);
    T vs = tiny ? v * K(16777216.0, 18014398509481984.0) : v;
    T m, kf;
    log_split(vs, &m, &kf);
    kf = tiny ? kf - K(24.0, 54.0) : kf;
    T f = m - (T)1.0;
    T r = atanh2((f + f) / ((T)2.0 + f));
    r = FMA(kf, K(LN2_HI32, LN2_HI64), FMA(kf, K(LN2_LO32, LN2_LO64), r));
    r = v == inf ? inf : r;
    T special = v == zero ? -inf : (T)NAN;
    return v > zero ? r : special;
}

/* h = exp(-|x|/2), computed from u = -2r = ac + 2k ln2 with ac = min(a, -2 lo): t = max(-a/2, lo),
 * t = k ln2 + r, h = (2^-off exp(r)) 2^(k+off), both factors normal, one rounding into the denormals. */
INLINE T half_exp(T x) {
    T a = FABS(x);
    const T hi = K(208.0, 1492.0);
    const T magic = K(12582912.0, 6755399441055744.0);
    T ac = a > hi ? hi : a;
    T z = FMA(ac, K(-0.5 * LOG2E, -0.5 * LOG2E), magic);
    T kf = z - magic;
    T u = FMA(kf, K(2.0 * LN2_HI32, 2.0 * LN2_HI64), ac);
    u = FMA(kf, K(2.0 * LN2_LO32, 2.0 * LN2_LO64), u);
    return exp_poly_u(u) * pow2_of_magic(z, BCE_F64 ? 64 : 32);
}

/* One element's loss and gradient, given h, and the pieces the focal variant reuses. */
typedef struct {
    T loss, grad, a, e, lp, one_e, ys, omy;
    int pos;
} elem;

#define HAS(flag) ((uses & BCE_##flag) != 0)

INLINE elem core(T x, T y, T w, T p, T k1, T k0, T h, const unsigned uses) {
    const T zero = (T)0.0, one = (T)1.0;
    elem r;
    int pos = x >= zero;
    T a = FABS(x); /* (-0.0 -> 0.0: the same values) */
    T ys = HAS(USE_SMOOTHING) ? FMA(y, k1, k0) : y;
    /* 1 - ys from y, not from the rounded ys (bcelogits._math.smooth_complement) */
    T omy = HAS(USE_SMOOTHING) ? FMA(one - y, k1, k0) : one - y;
    T py = HAS(USE_POS_WEIGHT) ? p * ys : ys;
    T c_pos = HAS(USE_WEIGHT) ? w * omy : omy;
    T c_neg = HAS(USE_WEIGHT) ? w * py : py;
    T cb = pos ? c_pos : c_neg;
    T cs = pos ? c_neg : c_pos;
    T e = h * h;
    T lp = log1p01(e);
    T small_e = (cs * h) * h;
    T loss;
    if (!HAS(USE_WEIGHT) && !HAS(USE_POS_WEIGHT)) {
        /* Unweighted: cb + cs = 1, so the loss is cb a + log1p(e). */
        loss = (cb == zero ? cb * zero : cb * a) + lp;
    } else {
        T small = a > (T)SMALL_SIDE_LINEAR ? small_e : cs * lp;
        loss = (cb == zero ? cb * zero : cb * (a + lp)) + small;
    }
    T one_e = one + e;
    T g = (cb - small_e) / one_e;
    r.loss = loss;
    r.grad = pos ? g : -g;
    r.pos = pos;
    r.a = a;
    r.e = e;
    r.lp = lp;
    r.one_e = one_e;
    r.ys = ys;
    r.omy = omy;
    return r;
}

/* (f loss, f (g + gamma loss dL1)) with f = exp(gamma L1), L1 = log(1 - p_t). */
INLINE void focal(T x, T y, T w, T p, T k1, T k0, T gamma, T h, const unsigned uses, T *loss_out,
                  T *grad_out) {
    const T zero = (T)0.0, one = (T)1.0;
    elem c = core(x, y, w, p, k1, k0, h, uses);
    T b = c.pos ? c.omy : c.ys;
    T s = c.pos ? c.ys : c.omy;
    int b0 = b == zero;
    T bse = b + s * c.e;
    T lg = log_any(b0 ? s : bse);
    T num = b0 ? one : c.e;
    T den = b0 ? (s == zero ? one : s) : bse;
    T dl1 = ((HAS(USE_SMOOTHING) ? (c.omy - c.ys) : (one - (c.ys + c.ys))) * num) / (den * c.one_e);
    /* f = exp(gamma L1), L1 = (lg - lp) - (a if b0 else 0); gamma a reaches hundreds, so the argument
     * is kept as t + tlo (exact product errors and the TwoSum error). */
    T aa = b0 ? c.a : zero;
    T bb = lg - c.lp;
    T h1 = gamma * aa;
    T h2 = gamma * bb;
    T t = h2 - h1;
    T v = t - h2;
    T tlo = (FMA(gamma, bb, -h2) - FMA(gamma, aa, -h1)) + ((h2 - (t - v)) - (h1 + v));
    T f = exp_any(t, t - t == zero ? tlo : zero);
    T gl = gamma * c.loss * dl1;
    gl = dl1 == zero ? zero : gl;
    *loss_out = f * c.loss;
    *grad_out = f * (c.grad + gl);
}

/* One element: loss and gradient of the specialisation (plain or focal). */
INLINE void element(T x, T y, T w, T p, T k1, T k0, T gamma, T h, const unsigned uses, T *loss, T *grad) {
    if (HAS(USE_FOCAL)) {
        focal(x, y, w, p, k1, k0, gamma, h, uses, loss, grad);
    } else {
        elem c = core(x, y, w, p, k1, k0, h, uses);
        *loss = c.loss;
        *grad = c.grad;
    }
}

/* ------------------------------------------------------------------------------------------ loops */
INLINE void loop_h(const T *RESTRICT xs, T *RESTRICT hv, int64_t m) {
    for (int64_t i = 0; i < m; i++) hv[i] = half_exp(xs[i]);
}

#define W_AT(i) (HAS(USE_WEIGHT) ? wv[i] : (T)1.0)
#define P_AT(i) (HAS(USE_POS_WEIGHT) ? pv[i] : (T)1.0)
#define KEPT(i) (!HAS(USE_IGNORE) || ys[i] != ig)
/* Every NaN stored is the one quiet NaN: which operand's NaN an instruction passes on (and the sign of
 * the NaN an invalid operation makes) differs between instruction sets, and the outputs are to be the
 * same bits on every target. */
#define CANON(v) ((v) != (v) ? (T)NAN : (v))

INLINE void loop_loss(const T *RESTRICT xs, const T *RESTRICT hv, const T *RESTRICT ys, const T *RESTRICT wv,
                      const T *RESTRICT pv, T *RESTRICT lv, int64_t m, T k1, T k0, T ig, T gamma,
                      const unsigned uses) {
    for (int64_t i = 0; i < m; i++) {
        T l, g;
        element(xs[i], ys[i], W_AT(i), P_AT(i), k1, k0, gamma, hv[i], uses, &l, &g);
        (void)g;
        lv[i] = KEPT(i) ? CANON(l) : (T)0.0;
    }
}

/* (gv may be xs: each element is read before it is written.) */
INLINE void loop_grad(const T *xs, const T *RESTRICT hv, const T *RESTRICT ys, const T *RESTRICT wv,
                      const T *RESTRICT pv, T *RESTRICT lv, T *gv, int64_t m, T k1, T k0, T ig, T gamma,
                      T gscale, const unsigned uses) {
    for (int64_t i = 0; i < m; i++) {
        T l, g;
        element(xs[i], ys[i], W_AT(i), P_AT(i), k1, k0, gamma, hv[i], uses, &l, &g);
        int ok = KEPT(i);
        lv[i] = ok ? CANON(l) : (T)0.0;
        gv[i] = ok ? CANON(gscale * g) : (T)0.0;
    }
}

/* (gv may be xs or gov.) */
INLINE void loop_go(const T *xs, const T *RESTRICT hv, const T *RESTRICT ys, const T *RESTRICT wv,
                    const T *RESTRICT pv, const T *gov, T *gv, int64_t m, T k1, T k0, T ig, T gamma,
                    const unsigned uses) {
    for (int64_t i = 0; i < m; i++) {
        T l, g;
        element(xs[i], ys[i], W_AT(i), P_AT(i), k1, k0, gamma, hv[i], uses, &l, &g);
        (void)l;
        gv[i] = KEPT(i) ? CANON(gov[i] * g) : (T)0.0;
    }
}

/* A block's loss sum in float64: 16 accumulators, element i of the block into lane i % 16, combined in
 * a fixed tree. The order is written here, not left to the compiler (no reassociation is allowed), so
 * the sum is the same for every vector width. */
INLINE double loss_sum(const T *RESTRICT lv, int64_t m) {
    double acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= m; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += (double)lv[i + j];
    for (int j = 0; i + j < m; j++) acc[j] += (double)lv[i + j];
    for (int s = 8; s >= 1; s >>= 1)
        for (int j = 0; j < s; j++) acc[j] += acc[j + s];
    return acc[0];
}

/* A block's (count, weight sum) of the elements not ignored, in float64, in the same fixed order. */
INLINE void kept_sums(const T *RESTRICT ys, const T *RESTRICT wv, int64_t m, T ig, int has_w, double *count,
                      double *wsum) {
    double c[16] = {0}, s[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= m; i += 16)
        for (int j = 0; j < 16; j++) {
            int ok = ys[i + j] != ig;
            c[j] += ok ? 1.0 : 0.0;
            s[j] += ok ? (has_w ? (double)wv[i + j] : 1.0) : 0.0;
        }
    for (int j = 0; i + j < m; j++) {
        int ok = ys[i + j] != ig;
        c[j] += ok ? 1.0 : 0.0;
        s[j] += ok ? (has_w ? (double)wv[i + j] : 1.0) : 0.0;
    }
    for (int k = 8; k >= 1; k >>= 1)
        for (int j = 0; j < k; j++) {
            c[j] += c[j + k];
            s[j] += s[j + k];
        }
    *count = c[0];
    *wsum = s[0];
}

/* The weights of elements s .. s+m-1 of the pattern src[(k / inner) % len]: a pointer into ext (a
 * pattern expanded over a period and a block), into src, or buf filled run by run. */
NOINLINE const T *block_weights(const T *src, int64_t len, int64_t inner, const T *ext, int64_t ext_len,
                                T *RESTRICT buf, int64_t s, int64_t m) {
    int64_t period = len * inner;
    if (ext_len) return ext + s % period;
    if (inner == 1) {
        int64_t j = s % period;
        if (j + m <= period) return src + j;
        int64_t r = period - j;
        memcpy(buf, src + j, (size_t)r * sizeof(T));
        memcpy(buf + r, src, (size_t)(m - r) * sizeof(T));
        return buf;
    }
    int64_t g = s / inner;
    int64_t off = s - g * inner;
    int64_t j = g % len;
    int64_t k = 0;
    while (k < m) {
        int64_t run = inner - off < m - k ? inner - off : m - k;
        T v = src[j];
        T *seg = buf + k;
        for (int64_t q = 0; q < run; q++) seg[q] = v;
        k += run;
        off = 0;
        j = j + 1 < len ? j + 1 : 0;
    }
    return buf;
}

INLINE int64_t claim(bce_args *a, int64_t chunk) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_fetch_add(&a->counter, chunk, __ATOMIC_RELAXED);
#else
    return _InterlockedExchangeAdd64((volatile long long *)&a->counter, chunk);
#endif
}

/* Prefetch elements lo .. hi-1 (clipped to n) of a stream into L2: one prefetch per 64-byte line. */
INLINE void prefetch_range(const T *base, int64_t lo, int64_t hi, int64_t n) {
    if (hi > n) hi = n;
    for (int64_t q = lo; q < hi; q += 64 / (int64_t)sizeof(T)) PREFETCH_L2(base + q);
}

/* The worker of one specialisation: claims chunk blocks at a time from the shared counter until none are
 * left (a thread that is slowed down does fewer blocks), computes each block in SUB parts, and stores the
 * block's partials at part[b], part[nb + b], part[2 nb + b], whichever thread computed it. */
INLINE void work(bce_args *a, const int mode, const unsigned uses) {
    ALIGNED(64) T scratch[4 * BCE_BLOCK];
    const T *x = (const T *)(uintptr_t)a->x, *y = (const T *)(uintptr_t)a->y;
    const T *w = (const T *)(uintptr_t)a->w, *p = (const T *)(uintptr_t)a->p;
    const T *wext = (const T *)(uintptr_t)a->wext, *pext = (const T *)(uintptr_t)a->pext;
    const T *go = (const T *)(uintptr_t)a->go;
    T *lo = (T *)(uintptr_t)a->lo, *gr = (T *)(uintptr_t)a->gr;
    double *part = (double *)(uintptr_t)a->part;
    const int64_t n = a->n, chunk = a->chunk;
    const int64_t nb = (n + BCE_BLOCK - 1) / BCE_BLOCK;
    const int64_t flags = a->flags;
    const T k1 = HAS(USE_SMOOTHING) ? (T)(1.0 - a->label_smoothing) : (T)1.0;
    const T k0 = HAS(USE_SMOOTHING) ? (T)(0.5 * a->label_smoothing) : (T)0.0;
    const T ig = HAS(USE_IGNORE) ? (T)a->ignore_index : (T)0.0;
    const T gamma = HAS(USE_FOCAL) ? (T)a->gamma : (T)0.0;
    const T gscale = (T)a->grad_scale;
    /* The streams read from memory block after block: x, y, a weight read straight from an input-sized
     * array (not expanded, not filled), the upstream gradient. */
    const int pf_w = HAS(USE_WEIGHT) && a->w_inner == 1 && a->w_len == n && a->wext_len == 0;
    const int pf_p = HAS(USE_POS_WEIGHT) && a->p_inner == 1 && a->p_len == n && a->pext_len == 0;
    T *wbuf = scratch, *pbuf = scratch + BCE_BLOCK, *lbuf = scratch + 2 * BCE_BLOCK;
    T *hv = scratch + 3 * BCE_BLOCK;
    for (;;) {
        int64_t c = claim(a, chunk);
        if (c >= nb) break;
        int64_t end = c + chunk < nb ? c + chunk : nb;
        for (int64_t b = c; b < end; b++) {
            const int64_t s = b * BCE_BLOCK;
            const int64_t m = n - s < BCE_BLOCK ? n - s : BCE_BLOCK;
            const T *xs = x + s, *ys = y + s;
            const T *wv = HAS(USE_WEIGHT)
                              ? block_weights(w, a->w_len, a->w_inner, wext, a->wext_len, wbuf, s, m)
                              : 0;
            const T *pv = HAS(USE_POS_WEIGHT)
                              ? block_weights(p, a->p_len, a->p_inner, pext, a->pext_len, pbuf, s, m)
                              : 0;
            T *lv = (flags & BCE_FLAG_WRITE_LOSS) ? lo + s : lbuf;
            if (HAS(USE_FOCAL)) loop_h(xs, hv, m);
            const int64_t ns = s + BCE_BLOCK;
            for (int64_t j = 0; j < m; j += BCE_SUB) {
                const int64_t e = j + BCE_SUB < m ? j + BCE_SUB : m;
                const int64_t len = e - j;
                if (!HAS(USE_FOCAL)) loop_h(xs + j, hv + j, len);
                const T *wj = HAS(USE_WEIGHT) ? wv + j : 0;
                const T *pj = HAS(USE_POS_WEIGHT) ? pv + j : 0;
                if (mode == BCE_MODE_LOSS)
                    loop_loss(xs + j, hv + j, ys + j, wj, pj, lv + j, len, k1, k0, ig, gamma, uses);
                else if (mode == BCE_MODE_LOSS_GRAD)
                    loop_grad(xs + j, hv + j, ys + j, wj, pj, lv + j, gr + s + j, len, k1, k0, ig, gamma,
                              gscale, uses);
                else
                    loop_go(xs + j, hv + j, ys + j, wj, pj, go + s + j, gr + s + j, len, k1, k0, ig, gamma,
                            uses);
                if (ns < n) {
                    prefetch_range(x, ns + j, ns + e, n);
                    prefetch_range(y, ns + j, ns + e, n);
                    if (pf_w) prefetch_range(w, ns + j, ns + e, n);
                    if (pf_p) prefetch_range(p, ns + j, ns + e, n);
                    if (mode == BCE_MODE_GRAD_NONE) prefetch_range(go, ns + j, ns + e, n);
                }
            }
            if (mode != BCE_MODE_GRAD_NONE && (flags & BCE_FLAG_LOSS_SUM)) part[b] = loss_sum(lv, m);
            if (HAS(USE_IGNORE) && mode != BCE_MODE_GRAD_NONE && (flags & BCE_FLAG_KEPT_SUMS))
                kept_sums(ys, wv, m, ig, HAS(USE_WEIGHT), &part[nb + b], &part[2 * nb + b]);
        }
    }
}

/* One function per (mode, uses): the switch passes constants, so each case is its own specialisation. */
#define CASE_USES(mode, u)       \
    case u:                      \
        work(a, mode, u);        \
        return;
#define ALL_USES(mode)                                                                                  \
    switch ((unsigned)a->uses) {                                                                        \
        CASE_USES(mode, 0) CASE_USES(mode, 1) CASE_USES(mode, 2) CASE_USES(mode, 3) CASE_USES(mode, 4)  \
        CASE_USES(mode, 5) CASE_USES(mode, 6) CASE_USES(mode, 7) CASE_USES(mode, 8) CASE_USES(mode, 9)  \
        CASE_USES(mode, 10) CASE_USES(mode, 11) CASE_USES(mode, 12) CASE_USES(mode, 13)                 \
        CASE_USES(mode, 14) CASE_USES(mode, 15) CASE_USES(mode, 16) CASE_USES(mode, 17)                 \
        CASE_USES(mode, 18) CASE_USES(mode, 19) CASE_USES(mode, 20) CASE_USES(mode, 21)                 \
        CASE_USES(mode, 22) CASE_USES(mode, 23) CASE_USES(mode, 24) CASE_USES(mode, 25)                 \
        CASE_USES(mode, 26) CASE_USES(mode, 27) CASE_USES(mode, 28) CASE_USES(mode, 29)                 \
        CASE_USES(mode, 30) CASE_USES(mode, 31) default : return;                                       \
    }

NOINLINE void work_loss(bce_args *a) { ALL_USES(BCE_MODE_LOSS) }
NOINLINE void work_loss_grad(bce_args *a) { ALL_USES(BCE_MODE_LOSS_GRAD) }
NOINLINE void work_grad_none(bce_args *a) { ALL_USES(BCE_MODE_GRAD_NONE) }

void WORKER(bce_args *a);
void WORKER(bce_args *a) {
    if (a->mode == BCE_MODE_LOSS)
        work_loss(a);
    else if (a->mode == BCE_MODE_LOSS_GRAD)
        work_loss_grad(a);
    else
        work_grad_none(a);
}
