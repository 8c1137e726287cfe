r"""Fused one-pass CPU kernel (numba) for the exact BCE-with-logits loss.

One pass over ``x, y`` (plus the optional weight, pos_weight and upstream gradient) produces the loss
sum, the element losses and the gradient together. The element formulas are exactly those of
:mod:`bcelogits._math`: ``a = |x|``, ``h = exp(-a/2)``, ``e = h*h``; big side / small side; a small-side
value is multiplied by its coefficient before the second ``h`` (so ``p w e`` stays normal where ``e``
alone underflows); ``0 * inf = 0`` at ``|x| = inf``; NaN in gives NaN out. The smoothed target is
``fma(y, 1 - ls, ls / 2)`` in the dtype (the two factors rounded to it).

Speed comes from LLVM vectorising the element loop (AVX2 or AVX-512, whatever the host has). numba
has no vector math library here (no SVML), so ``exp`` and ``log1p`` are written below as branch-free
range reductions plus minimax polynomials, with ``2**k`` built from the exponent bits. Everything is
computed in the input dtype with dtype-exact constants and explicit ``fma``; no fast-math flag is set
on any element computation (only the float64 block sums carry 'reassoc'), so NaN and infinities
propagate exactly as in the reference. Measured accuracy against float64 / mpmath: about 4e-7 relative
in float32 and 1e-15 in float64, loss and gradient.

Work split: the flat input is cut into fixed blocks of :data:`BLOCK` elements. A call runs contiguous
runs of blocks on up to ``torch.get_num_threads()`` threads (capped by numba's ``NUMBA_NUM_THREADS``,
which is also the count when torch is not imported): the calling thread plus a small pool of Python
threads, the compiled code releasing the GIL. Each block stores float64 partial sums, added in block
order at the end, so results are bitwise identical for any thread count.

Loss only (no ``grad_out``, no focal term) runs a separate kernel, :func:`_run_loss`, whose loop has
no gradient (no second division, no gradient stores): the same element losses and block sums, bit for
bit, as the loss + gradient kernel.

Compilation: importing this module neither imports numba nor compiles. Each kernel is compiled on first
use, one specialisation per dtype: :func:`available` compiles the float32 loss + gradient kernel; the
loss-only kernel, float64 and focal loss compile on their first use. All are cached on disk by numba
(``cache=True``), so later processes only load them.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

from .._math import SMALL_SIDE_LINEAR

__all__ = ["available", "forward", "backward_none", "unavailable_reason", "BLOCK"]

#: Elements per block: the unit of work of a thread and of a partial sum.
BLOCK = 4096
# Weight patterns whose period (len * inner) is at most this are expanded once per call.
_EXT_MAX = 16384
# Another thread is used only when each gets at least this many blocks.
_MIN_BLOCKS_PER_THREAD = 8

#: Why the kernel cannot be used: "" while it can (or before :func:`available` has been asked).
unavailable_reason: str = ""

# Polynomial coefficients: minimax fits (Lawson iteration in 50-digit arithmetic).
# exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2, P = (P0, P1, ...); max relative error 3e-9 / 4e-18.
_EXP32 = (
    0.49999993447560215,
    0.1666652062943919,
    0.0416683880926952,
    0.008368717090860945,
    0.001381459638233105,
)
_EXP64 = (
    0.5000000000000011,
    0.16666666666666413,
    0.04166666666653015,
    0.008333333333494465,
    0.0013888888943631803,
    0.00019841269506578428,
    2.4801493097261263e-05,
    2.7557586370338387e-06,
    2.763024893189953e-07,
    2.5000063549257597e-08,
)
# The same for exp(-u/2) as a polynomial in u (coefficient of u^(j+2): P_j (-1/2)^(j+2), exact scalings).
_EXP32U = tuple(c * (-0.5) ** (j + 2) for j, c in enumerate(_EXP32))
_EXP64U = tuple(c * (-0.5) ** (j + 2) for j, c in enumerate(_EXP64))
# 2 atanh(s) = 2s + 2s z Q(z), z = s^2 in [0, 1/9], Q = (Q0, Q1, ...); max relative error 5e-9 / 1e-18.
_LOG32 = (0.33333206564805007, 0.2001084959436607, 0.13999569703293127, 0.14012232824624316)
_LOG64 = (
    0.33333333333333154,
    0.20000000000078622,
    0.14285714273926878,
    0.11111111984868975,
    0.09090871962356532,
    0.07693279963590306,
    0.06650486768431797,
    0.06053043304299665,
    0.041700500513788714,
    0.08509288835457396,
)
# ln 2 split as hi + lo for each dtype (Cody-Waite reduction with fma).
_LN2_HI32, _LN2_LO32 = 0.6931471824645996, -1.9046542121259336e-09
_LN2_HI64, _LN2_LO64 = 0.6931471805599453, 2.3190468138462996e-17
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# LLVM intrinsics (typing functions; wrapped with numba.extending.intrinsic in _build()).
# --------------------------------------------------------------------------------------------------


def _float_bits(ty):
    """(bits, mantissa bits, exponent bias) of a numba float type."""
    return ty.bitwidth, (23 if ty.bitwidth == 32 else 52), (127 if ty.bitwidth == 32 else 1023)


def _i_fma(typingctx, a, b, c):
    """``fma(a, b, c)`` with one rounding (llvm.fma)."""
    from llvmlite import ir
    from numba.core import cgutils, types

    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        lt = context.get_value_type(a)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lt, [lt, lt, lt]), f"llvm.fma.f{a.bitwidth}"
        )
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _i_k(typingctx, like, v32, v64):
    """The constant ``v32`` (float32 ``like``) or ``v64`` (float64), in ``like``'s type."""
    from numba.core import types

    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, sig, args):
        if like.bitwidth == 32:
            return context.cast(builder, args[1], sig.args[1], like)
        return context.cast(builder, args[2], sig.args[2], like)

    return like(like, v32, v64), codegen


def _i_cast(typingctx, like, v):
    """``v`` converted to ``like``'s float type."""
    from numba.core import types

    if not isinstance(like, types.Float) or not isinstance(v, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[1], sig.args[1], like)

    return like(like, v), codegen


def _i_radd(typingctx, a, b):
    """``a + b`` flagged 'reassoc' (lets LLVM vectorise a sum; the order is then fixed by the code)."""
    from numba.core import types

    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return a(a, b), codegen


def _i_is64(typingctx, like):
    """Compile-time constant: is ``like`` a float64?"""
    from numba.core import types

    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.boolean, like.bitwidth == 64)

    return types.boolean(like), codegen


def _i_pow2(typingctx, z, off):
    """``2**(k + off)`` from ``z = k + 1.5 * 2**mant`` (the round-to-integer magic number trick)."""
    from llvmlite import ir
    from numba.core import types

    if not isinstance(z, types.Float) or not isinstance(off, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        nbits, mant, bias = _float_bits(z)
        it = ir.IntType(nbits)
        zi = builder.bitcast(args[0], it)
        o = context.cast(builder, args[1], sig.args[1], types.int64)
        o = builder.trunc(o, it) if nbits == 32 else o
        # z_bits << mant == k << mant (the magic number's low bits are zero; two's complement wraps).
        cm = ir.Constant(it, mant)
        e = builder.add(builder.shl(zi, cm), builder.shl(builder.add(o, ir.Constant(it, bias)), cm))
        return builder.bitcast(e, context.get_value_type(z))

    return z(z, off), codegen


def _i_scale2(typingctx, p, z):
    """``p * 2**k`` as ``(p * 2**(k>>1)) * 2**(k - (k>>1))`` with ``k`` from the magic number ``z``."""
    from llvmlite import ir
    from numba.core import types

    if not (isinstance(p, types.Float) and p == z):
        return None

    def codegen(context, builder, sig, args):
        nbits, mant, bias = _float_bits(z)
        it = ir.IntType(nbits)
        ft = context.get_value_type(z)
        zi = builder.bitcast(args[1], it)
        npi, npf = (np.int32, np.float32) if nbits == 32 else (np.int64, np.float64)
        magic = int(np.array(1.5 * 2.0**mant, npf).view(npi))
        k = builder.sub(zi, ir.Constant(it, magic))
        k1 = builder.ashr(k, ir.Constant(it, 1))
        k2 = builder.sub(k, k1)
        cm, cb = ir.Constant(it, mant), ir.Constant(it, bias)
        s1 = builder.bitcast(builder.shl(builder.add(k1, cb), cm), ft)
        s2 = builder.bitcast(builder.shl(builder.add(k2, cb), cm), ft)
        return builder.fmul(builder.fmul(args[0], s1), s2)

    return p(p, z), codegen


def _i_logsplit(typingctx, v):
    """``(m, k)`` with ``v = m * 2**k``, ``m`` in ``[sqrt(1/2), sqrt(2))`` (``v`` positive normal)."""
    from llvmlite import ir
    from numba.core import types

    if not isinstance(v, types.Float):
        return None
    rt = types.UniTuple(v, 2)

    def codegen(context, builder, sig, args):
        nbits, mant, bias = _float_bits(v)
        it = ir.IntType(nbits)
        ft = context.get_value_type(v)
        npi, npf = (np.int32, np.float32) if nbits == 32 else (np.int64, np.float64)
        one = int(np.array(1.0, npf).view(npi))
        sqh = int(np.array(math.sqrt(0.5), npf).view(npi))
        vi = builder.add(builder.bitcast(args[0], it), ir.Constant(it, one - sqh))
        k = builder.sub(builder.ashr(vi, ir.Constant(it, mant)), ir.Constant(it, bias))
        mi = builder.add(builder.and_(vi, ir.Constant(it, (1 << mant) - 1)), ir.Constant(it, sqh))
        m = builder.bitcast(mi, ft)
        kf = builder.sitofp(k, ft)
        return context.make_tuple(builder, rt, (m, kf))

    return rt(v), codegen


# The names the compiled code calls; _build() binds them to numba intrinsics made from the functions above.
_fma = _k = _cast = _radd = _is64 = _pow2 = _scale2 = _logsplit = None


# --------------------------------------------------------------------------------------------------
# Element math (plain Python; compiled with numba.njit in _build(), calls resolved via module globals).
# All constants go through _k(like, ...) so that float32 code never promotes to float64.
# --------------------------------------------------------------------------------------------------


def _exp_poly(r):
    """``exp(r)`` for ``|r| <= ln2/2``: minimax polynomial (coefficients of r^2.., then 1, 1), Horner."""
    if _is64(r):
        q = _k(r, 0.0, _EXP64[-1])
        for c in _EXP64[-2::-1]:
            q = _fma(q, r, _cast(r, c))
    else:
        q = _k(r, _EXP32[-1], 0.0)
        for c in _EXP32[-2::-1]:
            q = _fma(q, r, _cast(r, c))
    one = _k(r, 1.0, 1.0)
    q = _fma(q, r, one)
    return _fma(q, r, one)


def _exp_poly_u(u):
    """``exp(-u/2)`` for ``|u| <= ln2``: :func:`_exp_poly` at ``r = -u/2`` with the coefficients scaled by
    powers of -1/2 (exact), so the same value bit for bit without computing ``-u/2``."""
    if _is64(u):
        q = _k(u, 0.0, _EXP64U[-1])
        for c in _EXP64U[-2::-1]:
            q = _fma(q, u, _cast(u, c))
    else:
        q = _k(u, _EXP32U[-1], 0.0)
        for c in _EXP32U[-2::-1]:
            q = _fma(q, u, _cast(u, c))
    q = _fma(q, u, _k(u, -0.5, -0.5))
    return _fma(q, u, _k(u, 1.0, 1.0))


def _atanh2(s):
    """``2 atanh(s) = log((1 + s) / (1 - s))`` for ``s*s <= 1/9``: ``2s + 2s z Q(z)``, ``z = s^2``."""
    z = s * s
    if _is64(s):
        q = _k(s, 0.0, _LOG64[-1])
        for c in _LOG64[-2::-1]:
            q = _fma(q, z, _cast(s, c))
    else:
        q = _k(s, _LOG32[-1], 0.0)
        for c in _LOG32[-2::-1]:
            q = _fma(q, z, _cast(s, c))
    s2 = s + s
    return _fma(s2 * z, q, s2)


def _exp_any(t, tlo):
    """``exp(t + tlo)`` for any ``t`` and a correction ``|tlo| <= ulp(t)`` (overflow to inf, underflow to 0
    or a denormal, NaN -> NaN)."""
    lo = _k(t, -104.0, -746.0)
    hi = _k(t, 89.0, 710.0)
    t = lo if t < lo else t
    t = hi if t > hi else t
    magic = _k(t, 12582912.0, 6755399441055744.0)
    z = _fma(t, _k(t, _LOG2E, _LOG2E), magic)
    kf = z - magic
    r = _fma(kf, _k(t, -_LN2_HI32, -_LN2_HI64), t)
    r = _fma(kf, _k(t, -_LN2_LO32, -_LN2_LO64), r) + tlo
    return _scale2(_exp_poly(r), z)


def _log(v):
    """``log(v)`` for any ``v`` (0 -> -inf, negative or NaN -> NaN, inf -> inf, denormals exact)."""
    tiny = v < _k(v, 1.1754943508222875e-38, 2.2250738585072014e-308)
    vs = v * _k(v, 16777216.0, 18014398509481984.0) if tiny else v
    m, kf = _logsplit(vs)
    kf = kf - _k(v, 24.0, 54.0) if tiny else kf
    f = m - _k(v, 1.0, 1.0)
    r = _atanh2(f / (_k(v, 2.0, 2.0) + f))
    r = _fma(kf, _k(v, _LN2_HI32, _LN2_HI64), _fma(kf, _k(v, _LN2_LO32, _LN2_LO64), r))
    zero = _k(v, 0.0, 0.0)
    inf = _k(v, math.inf, math.inf)
    r = inf if v == inf else r
    special = -inf if v == zero else _k(v, math.nan, math.nan)
    return r if v > zero else special


def _core(x, y, w, p, k1, k0):
    """Loss and gradient of one element plus the pieces the focal variant reuses:
    ``(loss, dloss/dx, pos, a, e, log1p(e), 1 + e, smoothed y)``."""
    zero = _k(x, 0.0, 0.0)
    one = _k(x, 1.0, 1.0)
    pos = x >= zero
    a = abs(x)  # (-0.0 -> 0.0: the same values)
    ys = _fma(y, k1, k0)
    c_pos = w * (one - ys)
    c_neg = w * (p * ys)
    cb = c_pos if pos else c_neg
    cs = c_neg if pos else c_pos
    # h = exp(-a/2) = exp(t), t = max(-a/2, lo) (NaN kept), t = k ln2 + r, h = (2^(k+off) exp(r)) 2^-off,
    # the last product rounding once into the denormal range. Computed from u = -2r = ac + 2k ln2 with
    # ac = min(a, -2 lo): the constants carry the exact factors -1/2, so no product -a/2 is formed and
    # every rounding is that of the t, r formulation.
    hi = _k(x, 208.0, 1492.0)
    ac = hi if a > hi else a
    magic = _k(x, 12582912.0, 6755399441055744.0)
    z = _fma(ac, _k(x, -0.5 * _LOG2E, -0.5 * _LOG2E), magic)
    kf = z - magic
    u = _fma(kf, _k(x, 2.0 * _LN2_HI32, 2.0 * _LN2_HI64), ac)
    u = _fma(kf, _k(x, 2.0 * _LN2_LO32, 2.0 * _LN2_LO64), u)
    off = 64 if _is64(x) else 32
    h = (_exp_poly_u(u) * _pow2(z, off)) * _pow2(magic, -off)
    e = h * h
    lp = _atanh2(e / (_k(x, 2.0, 2.0) + e))  # log1p(e), e in [0, 1]
    small_e = (cs * h) * h
    small = small_e if a > _k(x, SMALL_SIDE_LINEAR, SMALL_SIDE_LINEAR) else cs * lp
    big = cb * zero if cb == zero else cb * (a + lp)
    one_e = one + e
    g = (cb - small_e) / one_e
    return big + small, (g if pos else -g), pos, a, e, lp, one_e, ys


def _focal(x, y, w, p, k1, k0, gamma):
    """``(f * loss, f * (g + gamma * loss * dL1))`` with ``f = exp(gamma * L1)``, ``L1 = log(1 - p_t)``."""
    loss, g, pos, a, e, lp, one_e, ys = _core(x, y, w, p, k1, k0)
    zero = _k(x, 0.0, 0.0)
    one = _k(x, 1.0, 1.0)
    omy = one - ys
    b = omy if pos else ys
    s = ys if pos else omy
    b0 = b == zero
    bse = b + s * e
    lg = _log(s if b0 else bse)
    num = one if b0 else e
    den = (one if s == zero else s) if b0 else bse
    dl1 = (one - (ys + ys)) * num / (den * one_e)
    # f = exp(gamma * L1), L1 = (lg - lp) - (a if b0 else 0). gamma * a reaches hundreds, so the argument
    # is kept as t + tlo (exact product errors and the TwoSum error), else its rounding (u |t|) would
    # become a relative error of f.
    aa = a if b0 else zero
    bb = lg - lp
    h1 = gamma * aa
    h2 = gamma * bb
    t = h2 - h1
    v = t - h2
    tlo = (_fma(gamma, bb, -h2) - _fma(gamma, aa, -h1)) + ((h2 - (t - v)) - (h1 + v))
    f = _exp_any(t, tlo if t - t == zero else zero)
    gl = gamma * loss * dl1
    gl = zero if dl1 == zero else gl
    return f * loss, f * (g + gl)


def _expand(src, inner, ext):
    """``ext[k] = src[(k // inner) % len(src)]`` (one period and a block more of the broadcast pattern)."""
    j = 0
    c = 0
    ns = src.size
    for k in range(ext.size):
        ext[k] = src[j]
        c += 1
        if c == inner:
            c = 0
            j = j + 1 if j + 1 < ns else 0


def _block_weights(src, inner, ext, buf, s, m):
    """The weights of elements ``s .. s+m-1``: a view of ``ext`` (periodic patterns), of ``src``, or
    ``buf`` filled run by run."""
    period = src.size * inner
    if ext.size:
        ph = s % period
        return ext[ph : ph + m]
    if inner == 1:
        j = s % period
        if j + m <= period:
            return src[j : j + m]
        r = period - j
        for q in range(r):
            buf[q] = src[j + q]
        for q in range(r, m):
            buf[q] = src[q - r]
        return buf[:m]
    g = s // inner
    off = s - g * inner
    j = g % src.size
    k = 0
    while k < m:
        run = min(inner - off, m - k)
        v = src[j]
        for q in range(k, k + run):
            buf[q] = v
        k += run
        off = 0
        j = j + 1 if j + 1 < src.size else 0
    return buf[:m]


def _run(x, y, w, p, go, lo, gr, part, b0, b1, ls, ig, gamma, gscale, w_inner, p_inner, mode, flags):
    """Process blocks ``b0 .. b1-1`` sequentially (one thread; the GIL is released).

    ``mode``: 0 loss, 1 loss and ``gscale * grad``, 2 ``go * grad`` only. ``flags``: 1 write ``lo``,
    2 loss sum, 4 ignore active (count and weight sum per block). ``gamma``: None (plain loss; this
    specialisation contains no focal code) or the focal gamma. ``part[:, b]`` receives block ``b``'s
    (loss sum, count, weight sum), each accumulated in float64 (in an order fixed by the code)."""
    n = x.size
    dt = x.dtype
    scratch = np.empty(4 * BLOCK, dt)  # weights, pos_weights, losses, gradients
    # Periodic weight patterns (period = len * inner <= _EXT_MAX) are expanded once per call, so that a
    # block's weights are a view; longer ones are viewed or filled block by block.
    mb = min(BLOCK, n)
    wper = w.size * w_inner
    pper = p.size * p_inner
    wext = np.empty(wper + mb if wper <= _EXT_MAX else 0, dt)
    pext = np.empty(pper + mb if pper <= _EXT_MAX else 0, dt)
    _expand(w, w_inner, wext)
    _expand(p, p_inner, pext)
    one = _k(x[0], 1.0, 1.0)
    zero = _k(one, 0.0, 0.0)
    k1 = _cast(one, 1.0 - ls)  # ys = y * (1 - ls) + ls / 2, with the factors rounded to the dtype
    k0 = _cast(one, 0.5 * ls)
    igT = _cast(one, ig)
    gsT = _cast(one, gscale)
    for b in range(b0, b1):
        s = b * BLOCK
        m = min(BLOCK, n - s)
        xs = x[s : s + m]
        ys = y[s : s + m]
        wv = _block_weights(w, w_inner, wext, scratch[:BLOCK], s, m)
        pv = _block_weights(p, p_inner, pext, scratch[BLOCK : 2 * BLOCK], s, m)
        lv = lo[s : s + m] if flags & 1 else scratch[2 * BLOCK : 2 * BLOCK + m]
        gv = gr[s : s + m] if mode != 0 else scratch[3 * BLOCK : 3 * BLOCK + m]
        if gamma is None:
            if mode == 2:
                gov = go[s : s + m]
                for i in range(m):
                    v = _core(xs[i], ys[i], wv[i], pv[i], k1, k0)[1]
                    gv[i] = gov[i] * v if ys[i] != igT else zero
            else:
                for i in range(m):
                    r = _core(xs[i], ys[i], wv[i], pv[i], k1, k0)
                    ok = ys[i] != igT
                    lv[i] = r[0] if ok else zero
                    gv[i] = gsT * r[1] if ok else zero
        else:
            gT = _cast(one, gamma)
            if mode == 2:
                gov = go[s : s + m]
                for i in range(m):
                    v = _focal(xs[i], ys[i], wv[i], pv[i], k1, k0, gT)[1]
                    gv[i] = gov[i] * v if ys[i] != igT else zero
            else:
                for i in range(m):
                    r = _focal(xs[i], ys[i], wv[i], pv[i], k1, k0, gT)
                    ok = ys[i] != igT
                    lv[i] = r[0] if ok else zero
                    gv[i] = gsT * r[1] if ok else zero
        _block_sums(lv, ys, wv, igT, part, b, m, flags)


def _run_loss(x, y, w, p, lo, part, b0, b1, ls, ig, w_inner, p_inner, flags):
    """The loss-only variant of :func:`_run` (plain loss, no gradient): the same element losses, bitwise,
    and the same block partials, from a loop that computes no gradient (no second division, no stores
    but the loss). Compiled separately, on first use, so that the first call of the gradient kernel
    does not pay for it. ``flags`` as for :func:`_run`."""
    n = x.size
    dt = x.dtype
    scratch = np.empty(3 * BLOCK, dt)  # weights, pos_weights, losses
    mb = min(BLOCK, n)
    wper = w.size * w_inner
    pper = p.size * p_inner
    wext = np.empty(wper + mb if wper <= _EXT_MAX else 0, dt)
    pext = np.empty(pper + mb if pper <= _EXT_MAX else 0, dt)
    _expand(w, w_inner, wext)
    _expand(p, p_inner, pext)
    one = _k(x[0], 1.0, 1.0)
    zero = _k(one, 0.0, 0.0)
    k1 = _cast(one, 1.0 - ls)
    k0 = _cast(one, 0.5 * ls)
    igT = _cast(one, ig)
    for b in range(b0, b1):
        s = b * BLOCK
        m = min(BLOCK, n - s)
        xs = x[s : s + m]
        ys = y[s : s + m]
        wv = _block_weights(w, w_inner, wext, scratch[:BLOCK], s, m)
        pv = _block_weights(p, p_inner, pext, scratch[BLOCK : 2 * BLOCK], s, m)
        lv = lo[s : s + m] if flags & 1 else scratch[2 * BLOCK : 2 * BLOCK + m]
        for i in range(m):
            v = _core(xs[i], ys[i], wv[i], pv[i], k1, k0)[0]
            lv[i] = v if ys[i] != igT else zero
        _block_sums(lv, ys, wv, igT, part, b, m, flags)


def _block_sums(lv, ys, wv, igT, part, b, m, flags):
    """Block ``b``'s float64 partials: loss sum (flags & 2), count and weight sum (flags & 4)."""
    if flags & 2:
        acc = 0.0
        for i in range(m):
            acc = _radd(acc, np.float64(lv[i]))
        part[0, b] = acc
    if flags & 4:
        c = 0.0
        ws = 0.0
        for i in range(m):
            ok = ys[i] != igT
            c = _radd(c, 1.0 if ok else 0.0)
            ws = _radd(ws, np.float64(wv[i]) if ok else 0.0)
        part[1, b] = c
        part[2, b] = ws


# --------------------------------------------------------------------------------------------------
# Build (lazy) and Python entry points.
# --------------------------------------------------------------------------------------------------

_INTRINSICS = ("_fma", "_k", "_cast", "_radd", "_is64", "_pow2", "_scale2", "_logsplit")
# LLVM alwaysinline:
_INLINE = ("_exp_poly", "_exp_poly_u", "_atanh2", "_exp_any", "_log", "_core", "_focal", "_block_sums")
_KERNELS = ("_expand", "_block_weights", "_run", "_run_loss")
_built = False
_numba = None
_ok: bool | None = None
_lock = threading.RLock()


def _noalias_pipeline():
    """numba's nopython pipeline, with ``noalias`` on the arguments: the vectorised loops then need no
    runtime overlap checks nor scalar fallback copies (compiles faster). :func:`_check_out` keeps
    outputs from overlapping the inputs other than exactly (``grad_out`` may be ``x`` or ``go``)."""
    from numba.core import typed_passes
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.core.compiler_machinery import FunctionPass, register_pass

    @register_pass(mutates_CFG=False, analysis_only=True)
    class _NoAlias(FunctionPass):
        _name = "bcelogits_noalias"

        def __init__(self):
            FunctionPass.__init__(self)

        def run_pass(self, state):
            state.flags.noalias = True
            return False

    class _Pipeline(CompilerBase):
        def define_pipelines(self):
            pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
            pm.add_pass_after(_NoAlias, typed_passes.NopythonTypeInference)
            pm.finalize()
            return [pm]

    return _Pipeline


def _build() -> None:
    """Import numba and turn the functions above into dispatchers (nothing is compiled here)."""
    global _built, _numba
    with _lock:
        if _built:
            return
        import numba
        from numba.extending import intrinsic

        g = globals()
        for name in _INTRINSICS:
            g[name] = intrinsic(g["_i" + name])
        opts = {"cache": True, "error_model": "numpy", "nogil": True}
        for name in _INLINE:
            g[name] = numba.njit(forceinline=True, **opts)(g[name])
        pipeline = _noalias_pipeline()
        for name in _KERNELS:
            g[name] = numba.njit(pipeline_class=pipeline, **opts)(g[name])
        _numba = numba
        _built = True


def available() -> bool:
    """True if numba imports and the kernels can be set up. Never raises; the result is remembered; when
    False the reason is in :data:`unavailable_reason`. Nothing is compiled here: each specialisation
    (float32/float64, loss+grad / loss-only, focal) compiles, or loads from numba's on-disk cache, on its
    first use, so a process pays only for the kernels it runs. A specialisation that fails to build then
    raises a numba error, on which the dispatcher (:mod:`bcelogits.kernels`) warns once and falls back
    to the plain path; the test suite checks every specialisation against the reference."""
    global _ok, unavailable_reason
    if _ok is not None:
        return _ok
    with _lock:
        if _ok is not None:
            return _ok
        try:
            _build()
            unavailable_reason = ""
            _ok = True
        except Exception as exc:  # no numba, or a broken install: "not usable"
            unavailable_reason = f"{type(exc).__name__}: {exc}"
            _ok = False
    return _ok


# ---- argument handling --------------------------------------------------------------------------
_CONSTS: dict = {}


def _ro(a):
    """A read-only view: the kernel is compiled for read-only inputs only (one specialisation)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _consts(dt):
    """(ones(1) read-only, empty read-only, empty writable) of dtype ``dt``."""
    c = _CONSTS.get(dt)
    if c is None:
        c = _CONSTS[dt] = (_ro(np.ones(1, dt)), _ro(np.empty(0, dt)), np.empty(0, dt))
    return c


def _check_1d(name, a, dt, n):
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dt or not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a 1-D C-contiguous {dt} numpy array")
    if a.size != n:
        raise ValueError(f"{name}: expected length {n}, got {a.size}")


def _check_out(name, a, dt, n, same_ok, others):
    """A writable output that overlaps no input, except by being exactly one of ``same_ok``."""
    _check_1d(name, a, dt, n)
    if not a.flags.writeable:
        raise ValueError(f"{name}: not writeable")
    for b in same_ok:
        if b is not None and np.may_share_memory(a, b):
            if a.__array_interface__["data"][0] != b.__array_interface__["data"][0]:
                raise ValueError(f"{name} partially overlaps an input")
    for b in others:
        if b is not None and np.may_share_memory(a, b):
            raise ValueError(f"{name} overlaps another argument")


def _pattern(name, a, inner, dt):
    """A weight as (read-only contiguous array of dtype ``dt``, inner), ``None`` -> (ones(1), 1)."""
    if a is None:
        return _consts(dt)[0], 1
    a = np.ascontiguousarray(a, dtype=dt).reshape(-1)
    inner = int(inner)
    if a.size == 0 or inner < 1:
        raise ValueError(f"{name}: empty, or {name}_inner < 1")
    return _ro(a), inner


def _prep(x, y, w, w_inner, p, p_inner):
    if not _built:
        _build()
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise ValueError("x: expected a float32 or float64 numpy array")
    dt = x.dtype
    n = x.size
    _check_1d("x", x, dt, n)
    _check_1d("y", y, dt, n)
    wv, wi = _pattern("w", w, w_inner, dt)
    pv, pi = _pattern("p", p, p_inner, dt)
    return dt, n, wv, wi, pv, pi


# ---- threads ------------------------------------------------------------------------------------
_pool = None
_pool_key = (0, 0)


def _num_threads() -> int:
    """``torch.get_num_threads()`` when torch is imported, capped by ``numba.config.NUMBA_NUM_THREADS``
    (the number of CPUs unless set), which is also the count without torch."""
    cap = max(1, int(_numba.config.NUMBA_NUM_THREADS))
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else cap
    return max(1, min(int(n), cap))


def _executor(workers):
    """A pool of at least ``workers`` threads (re-created after a fork)."""
    global _pool, _pool_key
    pid = os.getpid()
    if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
        from concurrent.futures import ThreadPoolExecutor

        with _lock:
            if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
                old = _pool if _pool_key[0] == pid else None
                _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcelogits-cpu")
                _pool_key = (pid, workers)
                if old is not None:
                    old.shutdown(wait=False)
    return _pool


def _launch(fn, args, rest, n):
    """Run ``fn(*args, b0, b1, *rest)`` over all blocks (contiguous block ranges per thread; the calling
    thread takes the first) and return the (loss sum, count, weight sum) of the block partials, summed in
    block order. ``args`` ends with the partials array."""
    nb = (n + BLOCK - 1) // BLOCK
    part = np.zeros((3, nb))
    args = (*args, part)
    nchunks = max(1, min(_num_threads(), nb // _MIN_BLOCKS_PER_THREAD))
    if nchunks == 1:
        fn(*args, 0, nb, *rest)
    else:
        bounds = [c * nb // nchunks for c in range(nchunks + 1)]
        pool = _executor(nchunks - 1)
        futures = [pool.submit(fn, *args, bounds[c], bounds[c + 1], *rest) for c in range(1, nchunks)]
        try:
            fn(*args, bounds[0], bounds[1], *rest)
        finally:
            for f in futures:
                f.result()
    total, count, wsum = part.sum(axis=1)  # pairwise over blocks: independent of the thread count
    return float(total), float(count), float(wsum)


def _launch_run(x, y, w, p, go, lo, gr, ls, ig, gamma, gscale, w_inner, p_inner, mode, flags):
    """:func:`_run` over all blocks; ``gamma == 0`` selects the plain (non-focal) specialisation."""
    rest = (float(ls), float(ig), None if gamma == 0.0 else float(gamma), float(gscale), w_inner, p_inner)
    return _launch(_run, (_ro(x), _ro(y), w, p, go, lo, gr), (*rest, mode, flags), x.size)


def _weight_sum_all(w, w_inner, n):
    """``sum_i w[(i // w_inner) % len(w)]`` over ``i < n``, in float64, from exact per-entry counts."""
    lw = w.size
    reps, rem = divmod(n, lw * w_inner)
    if rem == 0:  # any broadcast of w to the input uses every entry equally often: no temporaries
        return float(w.sum(dtype=np.float64)) * (reps * w_inner)
    q, r = divmod(n, w_inner)
    cnt = np.full(lw, float(w_inner) * (q // lw))
    cnt[: q % lw] += w_inner
    cnt[q % lw] += r
    return float(np.dot(w.astype(np.float64), cnt))


# ---- entry points -------------------------------------------------------------------------------
def forward(
    x,
    y,
    w,
    w_inner,
    p,
    p_inner,
    *,
    label_smoothing=0.0,
    ignore_index=None,
    focal_gamma=0.0,
    loss_out=None,
    grad_out=None,
    grad_scale=1.0,
    weight_sum=True,
):
    """One pass: returns ``(loss_sum, count, weight_sum)``, and fills ``loss_out`` (element losses) and
    ``grad_out`` (``grad_scale * dloss/dx``) when given.

    ``x, y``: 1-D C-contiguous float32/float64 arrays of one dtype (the compute dtype) and length ``n``.
    ``w, p``: ``None`` or 1-D arrays; element ``i`` uses ``w[(i // w_inner) % len(w)]`` (same for ``p``).
    Elements with ``y == ignore_index`` (compared in the dtype, before smoothing) give loss 0 and grad 0
    and are not counted. ``loss_sum`` is accumulated in float64; ``weight_sum`` is the sum of the weights
    of the counted elements (``count`` when ``w`` is None). ``grad_out`` may be ``x`` itself; outputs
    must not otherwise overlap the inputs. ``weight_sum=False``: the caller does not need the weight
    sum (returned as NaN when no element is ignored), which saves a pass over a full-shape ``w``.
    """
    dt, n, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    empty = _consts(dt)[2]
    flags = 2
    if loss_out is not None:
        _check_out("loss_out", loss_out, dt, n, (), (x, y, wv, pv))
        flags |= 1
    if grad_out is not None:
        _check_out("grad_out", grad_out, dt, n, (x,), (y, wv, pv, loss_out))
    if ignore_index is not None:
        flags |= 4
    if n == 0:
        return 0.0, 0, 0.0
    ig = math.nan if ignore_index is None else float(ignore_index)
    lo = empty if loss_out is None else loss_out
    if grad_out is None and focal_gamma == 0.0:
        # Loss only: the gradient-free kernel (compiled on its first use).
        rest = (float(label_smoothing), ig, wi, pi, flags)
        total, count, wsum = _launch(_run_loss, (_ro(x), _ro(y), wv, pv, lo), rest, n)
    else:
        total, count, wsum = _launch_run(
            x, y, wv, pv, _consts(dt)[1], lo, empty if grad_out is None else grad_out,
            label_smoothing, ig, focal_gamma, grad_scale,
            wi, pi, 0 if grad_out is None else 1, flags,
        )  # fmt: skip
    if ignore_index is None:
        count = n
        if w is None:
            wsum = float(n)
        else:
            wsum = _weight_sum_all(wv, wi, n) if weight_sum else math.nan
    return total, int(count), wsum


def backward_none(
    x, y, w, w_inner, p, p_inner, go, grad_out, *, label_smoothing=0.0, ignore_index=None, focal_gamma=0.0
):
    """``grad_out[i] = go[i] * dloss_i/dx_i``, the backward of reduction='none', in one pass over
    ``x, y, w, p, go``. ``go`` is cast to the dtype if needed; ``grad_out`` may be ``x`` or ``go``."""
    dt, n, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    go = np.ascontiguousarray(go, dtype=dt)
    _check_1d("go", go, dt, n)
    _check_out("grad_out", grad_out, dt, n, (x, go), (y, wv, pv))
    if n == 0:
        return None
    empty = _consts(dt)[2]
    _launch_run(
        x, y, wv, pv, _ro(go), empty, grad_out,
        label_smoothing, math.nan if ignore_index is None else ignore_index, focal_gamma, 1.0,
        wi, pi, 2, 0,
    )  # fmt: skip
    return None
