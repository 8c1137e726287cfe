r"""Fused one-pass CPU kernel (numba) for the exact BCE-with-logits loss.

One pass over ``x, y`` (plus the optional weight, pos_weight and upstream gradient) produces the loss
sum, the element losses and the gradient together. The element formulas are exactly those of
:mod:`bcelogits._math`: ``a = |x|``, ``h = exp(-a/2)``, ``e = h*h``; big side / small side; a small-side
value is multiplied by its coefficient before the second ``h`` (so ``p w e`` stays normal where ``e``
alone underflows); ``0 * inf = 0`` at ``|x| = inf``; NaN in gives NaN out. The smoothed target is
``fma(y, 1 - ls, ls / 2)`` in the dtype (the two factors rounded to it), and its complement ``fma(1 - y,
1 - ls, ls / 2)``, not ``1 - ys``. Without weight and pos_weight the two coefficients add up to 1 and the
loss is computed as ``cb a + log1p(e)``.

Speed comes from LLVM vectorising the element loops (AVX2 or AVX-512, whatever the host has; the
functions ask for 512-bit vectors, which LLVM's tuning for Intel AVX-512 CPUs would not use, see
:func:`_i_wide`). Each
part of :data:`SUB` elements of a block is done in two loops: the first computes ``h`` from ``x`` into a
scratch buffer that stays in L1, the second everything else (with focal, the first runs over the whole
block of :data:`BLOCK` elements at once, see below). One loop would do the same arithmetic, but each
element's chain exp -> log1p -> loss is then too long for the out-of-order core to overlap enough
iterations, and it measured 25-35 % slower. numba
has no vector math library here (no SVML), so ``exp`` and ``log1p`` are written below as branch-free
range reductions plus minimax polynomials, with ``2**k`` built from the exponent bits. Everything is
computed in the input dtype with dtype-exact constants and explicit ``fma``; no fast-math flag is set
on any element computation (only the float64 block sums carry 'reassoc'), so NaN and infinities
propagate exactly as in the reference. Measured accuracy against mpmath: at most about 2.2e-7 relative in
float32 and 5e-16 in float64, loss and gradient.

Memory: a block's inputs come from memory, not from cache, whenever the inputs are bigger than the
caches or other work ran since they were written, as in a training step; the loops then took 1.5-2x
their time in cache, the hardware prefetchers (which stop at each 4 KiB page) not hiding the wait. So the
worker computes a block in parts of :data:`SUB` elements and, after each part, prefetches the same part
of the next block's input streams into L2 (:func:`_i_prefetch_next`): about two lines per 16 elements,
spread over the block (a whole block prefetched at once measured slower; a prefetch inside an element
loop keeps LLVM from vectorising it), so the data is in L2 a block later. float32, 2 threads, tensors
torch allocated, 64 MiB written before each call (``benchmarks/kernel_cpu_micro.py --evict 64
--torch-memory``): 4.1M loss only 2.12-2.36 -> 1.25-1.37 ms, loss and gradient 2.68-2.86 -> 1.89-1.91;
16.8M 9.40-9.65 -> 6.92 and 11.39-11.54 -> 9.33-9.48. Read back to back from the L3 cache, loss only is
5-8 % slower; on inputs on 2 MiB pages the gain at 16.8M is gone and the 'none' backward loses 5-8 %
(Intel Xeon with AVX-512; docs/performance.md). The exponential pass runs part by part too, so the
prefetches are spread over all of a block's time, not only over the second loop's 60 % of it: 16.8M,
same command, six alternated runs each, medians: loss only 7.50 -> 7.22 ms, loss and gradient 10.18 ->
9.59, the 'none' backward 11.42 -> 10.72; in cache within noise. Not with focal: its loop is long enough
on its own, and there the part-by-part exponential was slower (17.3 -> 18.0 ms), so focal keeps one pass
per block.

Work split: the flat input is cut into fixed blocks of :data:`BLOCK` elements. A call runs on up to
``torch.get_num_threads()`` threads (capped by ``NUMBA_NUM_THREADS`` if set, else by the CPUs the
process may use; the same count without torch). For torch tensors they are torch's own OpenMP
threads (the worker is handed to ``GOMP_parallel`` of the libgomp in torch's directory): after each
torch operator they keep spinning for a few milliseconds, and would otherwise compete with ours for the
cores. For NumPy arrays (torch imported or not): the calling thread plus a pool of Python threads, the
compiled code running without the GIL (see :func:`_launch` for why not OpenMP there). Threads claim
runs of blocks (see :func:`_chunk`) from a shared atomic counter, so a
thread that is slowed down does less of the work instead of holding the call up. Each block stores
float64 partial sums, added in block order at the end, so results are bitwise identical for any thread
count and any split of blocks between threads.

Specialisations: dtype (float32/float64) x what is computed (loss only, loss + gradient, gradient from
an upstream ``grad_out`` for reduction='none') x plain or focal x which of weight, pos_weight, label
smoothing and ignore_index the call has, each a separate compiled function containing only its own
loop (compiled on first use: a program typically needs two or three). The loss-only one has no gradient
in its loop (no division for sigmoid, no gradient stores) and gives the same element losses, bit for
bit, as the loss + gradient one.

Compilation and cache: importing this module imports neither numba nor llvmlite. A specialisation is
compiled with numba on its first use on a machine (about a second) and its object code is stored by
:mod:`bcelogits.kernels._objcache`; later processes load that object code with llvmlite alone, without
importing numba, in milliseconds. The compiled code is called through ctypes, which releases the GIL.
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import sys
import threading

import numpy as np

from .._math import SMALL_SIDE_LINEAR

__all__ = [
    "available",
    "forward",
    "forward_contiguous",
    "backward_none",
    "prepare",
    "unavailable_reason",
    "BLOCK",
]

#: Elements per block: the unit of work of a thread and of a partial sum.
BLOCK = 4096
#: Elements of a block computed between two groups of prefetches (see :func:`_i_prefetch_next`).
SUB = 256
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
# The coefficients of exp(-u/2), 1 and -1/2 first, times 2**-32 / 2**-64 (see _half_exp; exact).
_EXP32US = tuple(c * 2.0**-32 for c in (1.0, -0.5, *_EXP32U))
_EXP64US = tuple(c * 2.0**-64 for c in (1.0, -0.5, *_EXP64U))
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
# The same in w = (2s)^2: R_j = Q_j / 4^(j+1) (exact scalings).
_LOG32T = tuple(c * 0.25 ** (j + 1) for j, c in enumerate(_LOG32))
_LOG64T = tuple(c * 0.25 ** (j + 1) for j, c in enumerate(_LOG64))
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


def _i_fetch_add(typingctx, arr, val):
    """``arr[0] += val`` atomically; returns the old ``arr[0]`` (an int64 array shared by threads)."""
    from numba.core import types

    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(val, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        v = context.cast(builder, args[1], sig.args[1], types.int64)
        return builder.atomic_rmw("add", data, v, "monotonic")

    return types.int64(arr, val), codegen


def _i_outlined(typingctx, fn, args):
    """``fn(*args)`` (``fn`` a numba function, ``args`` a tuple) through a call LLVM must not inline: the
    element loops stay functions of their own (see :func:`_loop_loss`)."""
    from numba.core import types

    if not isinstance(fn, types.Dispatcher) or not isinstance(args, types.BaseTuple):
        return None
    sig = fn.get_call_type(typingctx, tuple(args), {})

    def codegen(context, builder, isig, llargs):
        cres = fn.dispatcher.overloads[sig.args]
        context.add_linking_libs([cres.library])
        callee = context.declare_function(builder.module, cres.fndesc)
        vals = [builder.extract_value(llargs[1], i) for i in range(len(args))]
        rt = cres.signature.return_type
        _, res = context.call_conv.call_function(builder, callee, rt, sig.args, vals, attrs=("noinline",))
        return res

    return sig.return_type(fn, args), codegen


def _i_array(typingctx, addr, n, dtype):
    """The 1-D C-contiguous array of ``n`` elements of ``dtype`` at ``addr`` (an integer address or a
    ``void *``): what ``numba.carray`` gives, without its overload, which is one more function per dtype
    to compile on first use."""
    from numba.core import types
    from numba.np.arrayobj import make_array, populate_array

    ok = isinstance(addr, (types.Integer, types.RawPointer)) and isinstance(n, types.Integer)
    if not ok or not isinstance(dtype, types.NumberClass):
        return None
    aryty = types.Array(dtype.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        ary = make_array(aryty)(context, builder)
        lt = context.get_data_type(dtype.dtype)
        size = context.get_constant(types.intp, context.get_abi_sizeof(lt))
        length = context.cast(builder, args[1], sig.args[1], types.intp)
        if isinstance(sig.args[0], types.Integer):
            data = builder.inttoptr(context.cast(builder, args[0], sig.args[0], types.intp), lt.as_pointer())
        else:
            data = builder.bitcast(args[0], lt.as_pointer())
        populate_array(ary, data=data, shape=[length], strides=[size], itemsize=size, meminfo=None)
        return ary._getvalue()

    return aryty(addr, n, dtype), codegen


def _i_view(typingctx, arr, start, stop):
    """``arr[start:stop]`` of a 1-D C-contiguous array, for ``0 <= start <= stop <= arr.size`` (not
    checked; every caller's bounds are within the array by construction): what numba's slicing gives,
    without its clamping and wraparound code, which numba types and lowers for every slice (the slices
    of the parts of a block added about 0.1 s to each first compile)."""
    from numba.core import types
    from numba.np.arrayobj import make_array, populate_array

    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"):
        return None
    if not (isinstance(start, types.Integer) and isinstance(stop, types.Integer)):
        return None
    aryty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        src = make_array(sig.args[0])(context, builder, args[0])
        lo = context.cast(builder, args[1], sig.args[1], types.intp)
        hi = context.cast(builder, args[2], sig.args[2], types.intp)
        out = make_array(aryty)(context, builder)
        size = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(arr.dtype)))
        populate_array(
            out, data=builder.gep(src.data, [lo]), shape=[builder.sub(hi, lo)], strides=[size], itemsize=size,
            meminfo=None,
        )  # fmt: skip
        return out._getvalue()

    return aryty(arr, start, stop), codegen


def _i_wide(typingctx):
    """Marks the function being compiled ``"prefer-vector-width"="512"``: LLVM's tuning for Intel
    AVX-512 CPUs (Skylake-SP to Sapphire Rapids) otherwise keeps loops at 256 bits. On such a CPU (an
    Intel Xeon that LLVM takes for a ``rocketlake``) the loss-only loops ran 10-20 % faster with 512-bit
    vectors. No effect where 512-bit vectors are not available (AVX2) or already preferred (AMD Zen 4)."""
    from numba.core import types

    def codegen(context, builder, sig, args):
        # (llvmlite's attribute set accepts only the attributes it knows; a string attribute is written
        # into the IR text as given.)
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


def _i_prefetch_next(typingctx, arrs, mask, start, stop):
    """Prefetch elements ``start .. stop-1`` (clipped to each array's size) of the arrays of the tuple
    ``arrs`` whose bit is set in ``mask`` (bit ``k`` for ``arrs[k]``) into L2: one ``llvm.prefetch``
    (read, locality 2: on x86 ``prefetcht1``) per 64-byte line. An intrinsic, the loops cost almost nothing
    to compile (as a numba function called from each element loop they added about 0.25 s to a first
    compile, and building views of the next block in the worker another 0.1 s)."""
    from llvmlite import ir
    from numba.core import cgutils, types

    if not (isinstance(arrs, types.BaseTuple) and all(isinstance(t, types.Array) for t in arrs)):
        return None
    if not all(isinstance(t, types.Integer) for t in (mask, start, stop)):
        return None

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        bits, lo, hi = (context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:]))
        for k, aty in enumerate(sig.args[0]):
            on = builder.icmp_signed("!=", builder.and_(bits, bits.type(1 << k)), bits.type(0))
            with builder.if_then(on):
                ary = context.make_array(aty)(context, builder, builder.extract_value(args[0], k))
                size = builder.extract_value(ary.shape, 0)
                end = builder.select(builder.icmp_signed("<", hi, size), hi, size)
                step = context.get_constant(
                    types.intp, 64 // context.get_abi_sizeof(context.get_data_type(aty.dtype))
                )
                with cgutils.for_range_slice(builder, lo, end, step) as (q, _):
                    ptr = builder.bitcast(builder.gep(ary.data, [q]), i8p)
                    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arrs, mask, start, stop), codegen


# The names the compiled code calls; _build() binds them to numba intrinsics made from the functions above.
_fma = _k = _cast = _radd = _is64 = _pow2 = _scale2 = _logsplit = _fetch_add = _outlined = _array = _wide = (
    _prefetch_next
) = _view = None


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
    """``2**-off * exp(-u/2)`` for ``|u| <= ln2`` (``off`` = 32 in float32, 64 in float64; see
    :func:`_half_exp`): the :data:`_EXP32U` / :data:`_EXP64U` polynomial with every coefficient times
    ``2**-off`` (exact: no product comes near the underflow threshold), so the final scaling by ``2**k``
    is one multiply. float32 by Horner's rule: 6 fused multiply-adds, and with the folded scale 10
    multiplications per element for the whole exponential instead of 13; in its own loop the long
    dependency chain does not matter (loss only, one core, 6.6e4-2.6e5 elements: Horner's rule and the
    folded scale together 4-5 % faster per element than Estrin's scheme with a separate scaling, and the
    float32 worst case on the accuracy grid fell from 3.1e-7 to 2.2e-7).
    float64 by Estrin's scheme (pairs of terms, then powers of ``u^2``): Horner's rule measured no faster."""
    if _is64(u):
        c = _EXP64US
        u2 = u * u
        u4 = u2 * u2
        q03 = _fma(u2, _fma(u, _cast(u, c[3]), _cast(u, c[2])), _fma(u, _cast(u, c[1]), _cast(u, c[0])))
        q47 = _fma(u2, _fma(u, _cast(u, c[7]), _cast(u, c[6])), _fma(u, _cast(u, c[5]), _cast(u, c[4])))
        q811 = _fma(u2, _fma(u, _cast(u, c[11]), _cast(u, c[10])), _fma(u, _cast(u, c[9]), _cast(u, c[8])))
        return _fma(u4 * u4, q811, _fma(u4, q47, q03))
    q = _k(u, _EXP32US[-1], 0.0)
    for c in _EXP32US[-2::-1]:
        q = _fma(q, u, _k(u, c, 0.0))
    return q


def _log1p01(e):
    """``log1p(e)`` for ``e`` in ``[0, 1]``: ``2 atanh(e / (2 + e))``, from ``t = 2e / (2 + e)`` (no
    cancellation; ``2e`` is exact, so a denormal ``e`` comes out exactly, where ``e / 2`` would round).
    In float32 this measured faster than a division-free degree-8 polynomial in ``e`` once the
    exponential moved to a pass of its own (0.88 against 0.96 ns per element and core, loss only, AMD
    Zen 3): the division runs on its own unit, and the polynomial in ``w`` is half as long. On the Intel
    machine a division-free degree-9 polynomial measured the same (docs/performance.md)."""
    return _atanh2((e + e) / (_k(e, 2.0, 2.0) + e))


def _atanh2(t):
    """``2 atanh(t/2) = log((2 + t) / (2 - t))`` for ``t*t <= 4/9``: ``t + t w R(w)``, ``w = t^2``, where
    ``R(w) = Q(w/4)/4`` (:data:`_LOG32T` / :data:`_LOG64T`: coefficients scaled by powers of 1/4, exact).
    Taking ``t = 2s`` instead of ``s`` saves a multiply per element."""
    w = t * t
    if _is64(t):
        q = _k(t, 0.0, _LOG64T[-1])
        for c in _LOG64T[-2::-1]:
            q = _fma(q, w, _cast(t, c))
    else:
        q = _k(t, _LOG32T[-1], 0.0)
        for c in _LOG32T[-2::-1]:
            q = _fma(q, w, _cast(t, c))
    return _fma(t * w, q, t)


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
    r = _atanh2((f + f) / (_k(v, 2.0, 2.0) + f))
    r = _fma(kf, _k(v, _LN2_HI32, _LN2_HI64), _fma(kf, _k(v, _LN2_LO32, _LN2_LO64), r))
    zero = _k(v, 0.0, 0.0)
    inf = _k(v, math.inf, math.inf)
    r = inf if v == inf else r
    special = -inf if v == zero else _k(v, math.nan, math.nan)
    return r if v > zero else special


def _half_exp(x):
    """``h = exp(-|x|/2)``: the one exponential of an element, computed in a pass of its own over a part
    of a block (see :func:`_loop_h`).

    h = exp(t), t = max(-a/2, lo) (NaN kept), t = k ln2 + r, h = (2^-off exp(r)) 2^(k+off): both factors
    are normal numbers, and the product rounds once into the denormal range. Computed from
    u = -2r = ac + 2k ln2 with ac = min(a, -2 lo): the constants carry the exact factors -1/2, so no
    product -a/2 is formed and every rounding is that of the t, r formulation."""
    a = abs(x)
    hi = _k(x, 208.0, 1492.0)
    ac = hi if a > hi else a
    magic = _k(x, 12582912.0, 6755399441055744.0)
    z = _fma(ac, _k(x, -0.5 * _LOG2E, -0.5 * _LOG2E), magic)
    kf = z - magic
    u = _fma(kf, _k(x, 2.0 * _LN2_HI32, 2.0 * _LN2_HI64), ac)
    u = _fma(kf, _k(x, 2.0 * _LN2_LO32, 2.0 * _LN2_LO64), u)
    off = 64 if _is64(x) else 32
    return _exp_poly_u(u) * _pow2(z, off)


def _core(x, y, w, p, k1, k0, h):
    """Loss and gradient of one element, given ``h = exp(-|x|/2)``, plus the pieces the focal variant
    reuses: ``(loss, dloss/dx, pos, a, e, log1p(e), 1 + e, smoothed y, 1 - smoothed y)``. ``w``, ``p`` or
    ``k1`` (no smoothing) may be None: the plain call, compiled without those operations."""
    zero = _k(x, 0.0, 0.0)
    one = _k(x, 1.0, 1.0)
    pos = x >= zero
    a = abs(x)  # (-0.0 -> 0.0: the same values)
    ys = y if k1 is None else _fma(y, k1, k0)
    # 1 - ys from y, not from the rounded ys (see _math.smooth_complement)
    omy = (one - y) if k1 is None else _fma(one - y, k1, k0)
    py = ys if p is None else p * ys
    c_pos = omy if w is None else w * omy
    c_neg = py if w is None else w * py
    cb = c_pos if pos else c_neg
    cs = c_neg if pos else c_pos
    e = h * h
    lp = _log1p01(e)
    small_e = (cs * h) * h
    if w is None and p is None:
        # Unweighted: cb + cs = 1 - ys + ys = 1, so the loss is cb a + log1p(e) (log1p(e) is accurate
        # relative to itself down to denormal e, and cs <= 1 cannot lift a tail that underflows).
        loss = (cb * zero if cb == zero else cb * a) + lp
    else:
        small = small_e if a > _k(x, SMALL_SIDE_LINEAR, SMALL_SIDE_LINEAR) else cs * lp
        loss = (cb * zero if cb == zero else cb * (a + lp)) + small
    one_e = one + e
    g = (cb - small_e) / one_e
    return loss, (g if pos else -g), pos, a, e, lp, one_e, ys, omy


def _focal(x, y, w, p, k1, k0, gamma, h):
    """``(f * loss, f * (g + gamma * loss * dL1))`` with ``f = exp(gamma * L1)``, ``L1 = log(1 - p_t)``."""
    loss, g, pos, a, e, lp, one_e, ys, omy = _core(x, y, w, p, k1, k0, h)
    zero = _k(x, 0.0, 0.0)
    one = _k(x, 1.0, 1.0)
    b = omy if pos else ys
    s = ys if pos else omy
    b0 = b == zero
    bse = b + s * e
    lg = _log(s if b0 else bse)
    num = one if b0 else e
    den = (one if s == zero else s) if b0 else bse
    dl1 = ((one - (ys + ys)) if k1 is None else (omy - ys)) * num / (den * one_e)
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


def _block_weights(src, inner, ext, buf, s, m):
    """The weights of elements ``s .. s+m-1``: a view of ``ext`` (periodic patterns), of ``src``, or
    ``buf`` filled run by run. A function of its own (called through :func:`_i_outlined`, not inlined):
    compiled once per dtype and process, where inlined it was compiled into every weighted
    specialisation, once for ``w`` and once more for ``p`` (first compile of the float32 loss + gradient
    kernel with weight 1.54-1.57 -> 1.42 s, with weight and pos_weight 1.74-1.76 -> 1.43 s).

    Every loop here indexes views from 0: an index numba cannot prove non-negative (``buf[q]`` for ``q``
    in ``range(k, k + run)``, ``src[q - r]``) gets its negative-index wraparound, so LLVM vectorises the
    loop with gather and scatter instructions, one element at a time. Filled that way, the runs took
    about a quarter of a loss-only call (84M float32 elements, pos_weight along dimension 1 of (64, 80,
    128, 128): 53-55 ms, against 41-42 ms with plain vector stores and 38-40 ms for a pos_weight that
    needs no filling)."""
    _wide()
    period = src.size * inner
    if ext.size:
        ph = s % period
        return ext[ph : ph + m]
    if inner == 1:
        j = s % period
        if j + m <= period:
            return src[j : j + m]
        r = period - j
        head, tail = src[j:], buf[r:m]
        for q in range(r):
            buf[q] = head[q]
        for q in range(m - r):
            tail[q] = src[q]
        return buf[:m]
    g = s // inner
    off = s - g * inner
    j = g % src.size
    k = 0
    while k < m:
        run = inner - off if inner - off < m - k else m - k
        seg = buf[k : k + run]
        v = src[j]
        for q in range(run):
            seg[q] = v
        k += run
        off = 0
        j = j + 1 if j + 1 < src.size else 0
    return buf[:m]


# The element loops of one block, each in a function of its own (not inlined): a loop that is the
# outermost of its function keeps the polynomial constants in registers, where inside the block loop
# numba's code model reloads each of them on every iteration (measured: 59 against 88 instructions per
# 8 float32 elements, and about 20 % faster).
def _loop_loss(xs, hv, ys, wv, pv, lv, k1, k0, igT, gamma):
    _wide()
    zero = _k(xs[0], 0.0, 0.0)
    if gamma is None:
        for i in range(xs.size):
            v = _core(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, hv[i])[0]
            lv[i] = v if _kept(ys[i], igT) else zero
    else:
        for i in range(xs.size):
            v = _focal(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, gamma, hv[i])[0]
            lv[i] = v if _kept(ys[i], igT) else zero


def _loop_grad(xs, hv, ys, wv, pv, lv, gv, k1, k0, igT, gsT, gamma):
    _wide()
    zero = _k(xs[0], 0.0, 0.0)
    if gamma is None:
        for i in range(xs.size):
            r = _core(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, hv[i])
            ok = _kept(ys[i], igT)
            lv[i] = r[0] if ok else zero
            gv[i] = gsT * r[1] if ok else zero
    else:
        for i in range(xs.size):
            r = _focal(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, gamma, hv[i])
            ok = _kept(ys[i], igT)
            lv[i] = r[0] if ok else zero
            gv[i] = gsT * r[1] if ok else zero


def _loop_go(xs, hv, ys, wv, pv, gov, gv, k1, k0, igT, gamma):
    _wide()
    zero = _k(xs[0], 0.0, 0.0)
    if gamma is None:
        for i in range(xs.size):
            v = _core(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, hv[i])[1]
            gv[i] = gov[i] * v if _kept(ys[i], igT) else zero
    else:
        for i in range(xs.size):
            v = _focal(xs[i], ys[i], _at(wv, i), _at(pv, i), k1, k0, gamma, hv[i])[1]
            gv[i] = gov[i] * v if _kept(ys[i], igT) else zero


def _loop_h(xs, hv):
    """``hv[i] = exp(-|xs[i]|/2)``: the pass of its own before the element loop (why: the module
    docstring; measured, float32, one core: loss only 1.21 -> 0.86 ns per element, loss and gradient
    1.47 -> 1.10)."""
    _wide()
    for i in range(xs.size):
        hv[i] = _half_exp(xs[i])


def _at(a, i):
    """``a[i]``, or None for a None ``a`` (a weight that is absent in this specialisation)."""
    return None if a is None else a[i]


def _kept(y, igT):
    """Is the element counted (its target is not ``ignore_index``; always, without one)?"""
    return True if igT is None else y != igT


def _loss_sum(lv):
    """A block's loss sum, accumulated in float64 (in an order fixed by the code)."""
    acc = 0.0
    for i in range(lv.size):
        acc = _radd(acc, np.float64(lv[i]))
    return acc


def _kept_sums(ys, wv, igT):
    """A block's (count, weight sum) of the elements not ignored, in float64."""
    c = 0.0
    ws = 0.0
    for i in range(ys.size):
        ok = ys[i] != igT
        c = _radd(c, 1.0 if ok else 0.0)
        wt = 1.0 if wv is None else np.float64(wv[i])
        ws = _radd(ws, wt if ok else 0.0)
    return c, ws


def _make_worker(mode, focal, uses):
    """The worker of one specialisation. ``mode`` (0 loss, 1 loss and ``gscale * grad``, 2 ``go * grad``
    only), ``focal`` and ``uses`` (which of weight ``w``, pos_weight ``p``, label smoothing ``s`` and
    ignore_index ``i`` the call has; the others are left out of the loop) are constants of the closure,
    so a specialisation contains only its own loop.

    Each thread of a call runs the worker: it claims ``chunk`` blocks at a time (see :func:`_chunk`)
    from the shared counter ``ctr[0]`` until none are left, so a thread slowed down (by another process,
    or by torch's OpenMP threads still spinning after the previous operator) simply processes fewer
    blocks. ``part`` (3 rows of
    ``nb``, kept flat: one array type fewer to compile) receives block ``b``'s loss sum, count and weight
    sum at ``b``, ``nb + b`` and ``2 nb + b``, whichever thread computed it. ``flags``: 1 write ``lo``,
    2 loss sum, 4 ignore active."""
    has_w, has_p, has_ls, has_ig = ("w" in uses), ("p" in uses), ("s" in uses), ("i" in uses)

    def work(
        x, y, w, p, go, lo, gr, part, wext, pext, scratch, ctr, ls, ig, gamma, gscale, wi, pi, flags, chunk
    ):
        _wide()
        n = x.size
        nb = (n + BLOCK - 1) // BLOCK
        one = _k(x[0], 1.0, 1.0)
        gsT = _cast(one, gscale)
        if has_ls:
            k1 = _cast(one, 1.0 - ls)  # ys = y * (1 - ls) + ls / 2, with the factors rounded to the dtype
            k0 = _cast(one, 0.5 * ls)
        else:
            k1 = k0 = None
        if has_ig:
            igT = _cast(one, ig)
        else:
            igT = None
        if focal:
            gT = _cast(one, gamma)
        else:
            gT = None
        # The arrays the worker reads from memory block after block: x, y, a weight read straight from an
        # input-sized array (not expanded, not filled), the upstream gradient.
        streams = (x, y, w, p, go)
        pmask = 3
        if has_w and wi == 1 and w.size == n and wext.size == 0:
            pmask |= 4
        if has_p and pi == 1 and p.size == n and pext.size == 0:
            pmask |= 8
        if mode == 2:
            pmask |= 16
        while True:
            c = _fetch_add(ctr, chunk)
            if c >= nb:
                break
            end = c + chunk
            for b in range(c, nb if end > nb else end):  # (no min() in compiled code: its overload is
                # one more function to compile on first use)
                s = b * BLOCK
                m = n - s if n - s < BLOCK else BLOCK
                xs = _view(x, s, s + m)
                ys = _view(y, s, s + m)
                if has_w:
                    wv = _outlined(_block_weights, (w, wi, wext, scratch[:BLOCK], s, m))
                else:
                    wv = None
                if has_p:
                    pv = _outlined(_block_weights, (p, pi, pext, scratch[BLOCK : 2 * BLOCK], s, m))
                else:
                    pv = None
                lv = _view(lo, s, s + m) if flags & 1 else _view(scratch, 2 * BLOCK, 2 * BLOCK + m)
                hv = _view(scratch, 3 * BLOCK, 3 * BLOCK + m)
                if focal:
                    _outlined(_loop_h, (xs, hv))
                # While this block is computed in parts of SUB elements, the same parts of the next block's
                # input streams are prefetched (none past the end of the input). Without focal the
                # exponential pass runs part by part too, so the prefetches are spread over all of the
                # block's time; the focal loop is long enough to spread them on its own, and there one
                # exponential pass over the whole block measured faster (see the module docstring).
                ns = s + BLOCK
                for j in range(0, m, SUB):
                    e = j + SUB if j + SUB < m else m
                    xj, hj, yj = _view(xs, j, e), _view(hv, j, e), _view(ys, j, e)
                    if not focal:
                        _outlined(_loop_h, (xj, hj))
                    wj = None if wv is None else _view(wv, j, e)
                    pj = None if pv is None else _view(pv, j, e)
                    if mode == 0:
                        _outlined(_loop_loss, (xj, hj, yj, wj, pj, _view(lv, j, e), k1, k0, igT, gT))
                    elif mode == 1:
                        gj = _view(gr, s + j, s + e)
                        _outlined(_loop_grad, (xj, hj, yj, wj, pj, _view(lv, j, e), gj, k1, k0, igT, gsT, gT))
                    else:
                        gj = _view(gr, s + j, s + e)
                        _outlined(
                            _loop_go, (xj, hj, yj, wj, pj, _view(go, s + j, s + e), gj, k1, k0, igT, gT)
                        )
                    _prefetch_next(streams, pmask, ns + j, ns + e)
                if mode != 2 and flags & 2:
                    part[b] = _loss_sum(lv)
                if has_ig:
                    if mode != 2 and flags & 4:
                        part[nb + b], part[2 * nb + b] = _kept_sums(ys, wv, igT)

    work.__name__ = work.__qualname__ = f"_work_{mode}{'f' if focal else ''}_{uses}"
    return work


# The argument block of the C entry point: one int64 array, shared by all threads of a call.
# [0:22]: (address, length) of x, y, w, p, go, lo, gr, part (3 x nb), wext, pext, scratch.
_A_CTR = 22  # address of the block counter, then of the scratch-slot counter
_A_INTS = 24  # wi, pi, flags
_A_FLOATS = 27  # ls, ig, gamma, gscale, stored as float64 bits
_A_SLOTS = 31  # number of scratch slots (see _slot_bytes)
_A_CHUNK = 32  # blocks a thread claims at a time (see _chunk)
_A_SIZE = 33


def _slot_bytes(is64):
    """Bytes of a thread's scratch slot: 4 blocks of the dtype (weights, pos_weights, losses, ``h``)."""
    return 4 * BLOCK * (8 if is64 else 4)


def _make_entry(work, is64):
    """The C entry point ``entry(args)`` around ``work``: ``args`` points to the int64 argument block
    (see ``_A_*``); arrays are made from its addresses with :func:`_i_array`. Every thread of a call runs
    ``entry`` on the same block: it takes a scratch slot from the slot counter, then claims blocks."""
    F = np.float64 if is64 else np.float32
    i64 = np.int64
    slot_bytes = _slot_bytes(is64)

    def entry(args):
        a = _array(args, _A_SIZE, i64)
        d = _array(args, _A_SIZE, np.float64)
        slot = _fetch_add(_array(a[_A_CTR + 1], 1, i64), 1)
        if slot >= a[_A_SLOTS]:  # more threads than scratch slots: this one has nothing to do
            return
        scratch = _array(a[20] + slot * slot_bytes, 4 * BLOCK, F)
        # (The worker raises nothing; calling it this way lets LLVM drop the generic exception
        # handling of the C wrapper, which would tie the object code to numba's runtime.)
        _outlined(work, (
            _array(a[0], a[1], F), _array(a[2], a[3], F),
            _array(a[4], a[5], F), _array(a[6], a[7], F),
            _array(a[8], a[9], F), _array(a[10], a[11], F),
            _array(a[12], a[13], F), _array(a[14], a[15], np.float64),
            _array(a[16], a[17], F), _array(a[18], a[19], F),
            scratch, _array(a[_A_CTR], 1, i64),
            d[_A_FLOATS], d[_A_FLOATS + 1], d[_A_FLOATS + 2], d[_A_FLOATS + 3],
            a[_A_INTS], a[_A_INTS + 1], a[_A_INTS + 2], a[_A_CHUNK],
        ))  # fmt: skip

    return entry


# --------------------------------------------------------------------------------------------------
# Build (lazy), the on-disk cache of compiled workers, and Python entry points.
# --------------------------------------------------------------------------------------------------

_INTRINSICS = (
    "_fma", "_k", "_cast", "_radd", "_is64", "_pow2", "_scale2", "_logsplit", "_fetch_add", "_outlined",
    "_array", "_wide", "_prefetch_next", "_view",
)  # fmt: skip
# LLVM alwaysinline:
_INLINE = (
    "_half_exp", "_exp_poly", "_exp_poly_u", "_log1p01", "_atanh2", "_exp_any", "_log", "_core", "_focal",
    "_at", "_kept", "_loss_sum", "_kept_sums",
)  # fmt: skip
_OUTLINED = ("_loop_loss", "_loop_grad", "_loop_go", "_loop_h", "_block_weights")
# Blocks a thread claims at a time: about 1/8 of its share of the call, at least 2 and at most 64.
_CHUNK_MIN, _CHUNK_MAX, _CHUNKS_PER_THREAD = 2, 64, 8


def _chunk(nb, nthreads):
    """How many blocks a thread claims at a time in a call of ``nb`` blocks on ``nthreads`` threads.

    Long runs of consecutive blocks let the hardware prefetchers stream ahead; claiming 2 blocks at a
    time interleaved the two threads every 32 KiB of float32 input, and at 2^24-2^26 elements (data no
    longer in cache) the loss-only kernel took 0.62-0.64 ns per element against 0.45-0.51 with runs of
    64 blocks (Intel Xeon, AVX-512, 2 threads). Eight claims per thread keep a thread that is slowed
    down from holding the call up by more than about an eighth of its share."""
    c = nb // (nthreads * _CHUNKS_PER_THREAD)
    return _CHUNK_MIN if c < _CHUNK_MIN else (_CHUNK_MAX if c > _CHUNK_MAX else c)


_OPTS = {"error_model": "numpy"}
# The numba functions are only ever called from other compiled code: without the CPython and C wrappers
# numba would build for each of them, the first compile takes about 0.4 s less (2.1 -> 1.7 s).
_NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}
_built = False
_numba = None
_pipeline = None
_ok: bool | None = None
_lock = threading.RLock()
_kernels: dict = {}  # (dtype char, mode, focal) -> callable C entry point
_compiled: list = []  # numba cfunc objects whose code the entry points run (kept alive)
# The C entry point's argument: the address of the argument block.
_C_ARGS = (ctypes.c_void_p,)


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
    global _built, _numba, _pipeline
    with _lock:
        if _built:
            return
        import numba
        from numba.extending import intrinsic

        g = globals()
        for name in _INTRINSICS:
            g[name] = intrinsic(g["_i" + name])
        for name in _INLINE:
            g[name] = numba.njit(forceinline=True, **_NO_WRAPPERS, **_OPTS)(g[name])
        _pipeline = _noalias_pipeline()
        for name in _OUTLINED:
            g[name] = numba.njit(pipeline_class=_pipeline, **_NO_WRAPPERS, **_OPTS)(g[name])
        _numba = numba
        _built = True


def _signature():
    """The numba signature of the C entry point: ``void entry(void *args)``."""
    from numba import types

    return types.void(types.voidptr)


def _compile(is64, mode, focal, uses):
    """Compile one specialisation with numba; returns the ``numba.cfunc``."""
    _build()
    work = _numba.njit(pipeline_class=_pipeline, **_NO_WRAPPERS, **_OPTS)(_make_worker(mode, focal, uses))
    return _numba.cfunc(_signature(), **_OPTS)(_make_entry(work, is64))


def _cache_key(name):
    """The cache key of a specialisation: this file's source and everything else its code depends on."""
    from . import _objcache

    with open(__file__, "rb") as f:
        src = f.read()
    return _objcache.key(src, name, repr((SMALL_SIDE_LINEAR, BLOCK)))


def _kernel(dt, mode, focal, uses):
    """The C entry point of a specialisation, as (ctypes function, address): loaded from the on-disk cache
    (no numba import), else compiled with numba (first use on this machine) and stored there."""
    spec = (dt.char, mode, focal, uses)
    fn = _kernels.get(spec)
    if fn is not None:
        return fn
    with _lock:
        fn = _kernels.get(spec)
        if fn is not None:
            return fn
        from . import KernelBuildError, _objcache

        is64 = dt == np.float64
        name = f"work_{'f8' if is64 else 'f4'}_{mode}{'_focal' if focal else ''}_{uses}"
        k = _cache_key(name)
        fn = _objcache.load(k, None, _C_ARGS)
        _origin[spec] = "cached"
        if fn is None:
            try:
                cf = _compile(is64, mode, focal, uses)
            except Exception as exc:
                raise KernelBuildError(f"{type(exc).__name__}: {exc}") from exc
            _compiled.append(cf)
            _origin[spec] = "compiled and stored" if _objcache.store(k, cf) else "compiled (not stored)"
            fn = ctypes.CFUNCTYPE(None, *_C_ARGS)(cf.address)
        fn = _kernels[spec] = (fn, ctypes.cast(fn, ctypes.c_void_p).value)
    return fn


_origin: dict = {}  # spec -> how this process got its kernel (see prepare)


def prepare(dtype, mode: int, focal: bool, uses: str) -> str:
    """Make one specialisation ready (load it from the on-disk cache, or compile and store it) and say
    how: "cached", "compiled and stored", "compiled (not stored)" or "in memory" (already loaded by this
    process). ``dtype``: float32 or float64; ``mode``: 0 loss only, 1 loss and gradient, 2 the gradient
    of reduction='none'; ``uses``: which of weight ``w``, pos_weight ``p``, label smoothing ``s``,
    ignore_index ``i`` (in that order, "" for none). Used by ``bcelogits warmup``."""
    dt = np.dtype(dtype)
    spec = (dt.char, mode, focal, uses)
    if spec in _kernels:
        return "in memory"
    _kernel(dt, mode, focal, uses)
    return _origin[spec]


def available() -> bool:
    """True if numba and llvmlite are installed. Never raises; imports and compiles nothing; the result is
    remembered; when False the reason is in :data:`unavailable_reason`. Each specialisation (see the
    module docstring) is loaded from the on-disk cache or compiled on its first use, so a process pays
    only for the kernels it runs. A specialisation that fails to build raises
    :class:`~bcelogits.kernels.KernelBuildError`, on which the dispatcher warns once and falls back to
    the plain path; the test suite checks every specialisation against the reference."""
    global _ok, unavailable_reason
    if _ok is None:
        import importlib.util

        missing = [m for m in ("numba", "llvmlite") if importlib.util.find_spec(m) is None]
        unavailable_reason = f"ModuleNotFoundError: {' and '.join(missing)} not installed" if missing else ""
        _ok = not missing
    return _ok


# ---- argument handling --------------------------------------------------------------------------
_CONSTS: dict = {}
_CONST_ADDRESSES: dict = {}


def _consts(dt):
    """(ones(1), empty) of dtype ``dt``, kept for the process: the weight of an unweighted call and the
    stand-in for an absent array (the kernel never writes either)."""
    c = _CONSTS.get(dt)
    if c is None:
        c = _CONSTS[dt] = (np.ones(1, dt), np.empty(0, dt))
        _CONST_ADDRESSES.update((id(a), a.ctypes.data) for a in c)
    return c


def _dtype_of(a):
    """The NumPy dtype of a float32/float64 NumPy array or CPU torch tensor, else None."""
    if isinstance(a, np.ndarray):
        return a.dtype if a.dtype in (np.float32, np.float64) else None
    if hasattr(a, "data_ptr"):  # a torch tensor (torch itself is never imported here)
        d = a.dtype
        if d.is_floating_point and d.itemsize in (4, 8):  # the only such torch dtypes: float32, float64
            return np.dtype(np.float32 if d.itemsize == 4 else np.float64)
    return None


def _span(name, a, dt, n, writable=False):
    """``(start, end)`` data addresses of ``a``: a 1-D C-contiguous NumPy array or a contiguous CPU torch
    tensor (any shape: read flat) of dtype ``dt`` and ``n`` elements. A tensor's address comes from
    ``data_ptr()``: converting it to a NumPy array and asking that for its address costs about 5 us."""
    if isinstance(a, np.ndarray):
        if a.ndim != 1 or a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected a 1-D C-contiguous {dt} numpy array or contiguous CPU tensor")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name}: not writeable")
        size, start = a.size, a.ctypes.data
    else:
        if _dtype_of(a) != dt or a.device.type != "cpu" or not a.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dt} CPU tensor or 1-D C-contiguous numpy array")
        size, start = a.numel(), a.data_ptr()
    if size != n:
        raise ValueError(f"{name}: expected length {n}, got {size}")
    return start, start + n * dt.itemsize


def _check_out(name, out, same_ok, others):
    """An output span that overlaps no input span, except by being exactly one of ``same_ok``."""
    for b in same_ok:
        if b is not None and out[0] < b[1] and b[0] < out[1] and out != b:
            raise ValueError(f"{name} partially overlaps an input")
    for b in others:
        if b is not None and out[0] < b[1] and b[0] < out[1]:
            raise ValueError(f"{name} overlaps another argument")


def _pattern(name, a, inner, dt):
    """A weight as (contiguous 1-D array of dtype ``dt``, inner), ``None`` -> (ones(1), 1)."""
    if a is None:
        return _consts(dt)[0], 1
    a = np.ascontiguousarray(a, dtype=dt).reshape(-1)
    inner = int(inner)
    if a.size == 0 or inner < 1:
        raise ValueError(f"{name}: empty, or {name}_inner < 1")
    return a, inner


def _wspan(a):
    """The span of a weight pattern (``None`` for the constant of an absent weight)."""
    if a.size == 0 or id(a) in _CONST_ADDRESSES:
        return None
    start = a.ctypes.data
    return start, start + a.nbytes


def _prep(x, y, w, w_inner, p, p_inner):
    dt = _dtype_of(x)
    if dt is None:
        raise ValueError("x: expected a float32 or float64 numpy array or CPU tensor")
    n = x.size if isinstance(x, np.ndarray) else x.numel()
    xs = _span("x", x, dt, n)
    ys = _span("y", y, dt, n)
    wv, wi = _pattern("w", w, w_inner, dt)
    pv, pi = _pattern("p", p, p_inner, dt)
    return dt, n, xs, ys, wv, wi, pv, pi


# ---- threads ------------------------------------------------------------------------------------
_pool = None  # (reset in a forked child, see _after_fork_in_child)


def _cpu_cap() -> int:
    """``NUMBA_NUM_THREADS`` if set, else the CPUs this process may run on (read once per process)."""
    pid = os.getpid()
    if _cap_state.get("pid") != pid:
        _cap_state.update(pid=pid, cap=_read_cpu_cap())
    return _cap_state["cap"]


_cap_state: dict = {}


def _read_cpu_cap() -> int:
    env = os.environ.get("NUMBA_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _num_threads() -> int:
    """``torch.get_num_threads()`` when torch is imported, capped by :func:`_cpu_cap`, which is also the
    count without torch."""
    cap = _cpu_cap()
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else cap
    return max(1, min(int(n), cap))


def _executor():
    """The pool of helper threads for calls without torch's OpenMP team: :func:`_cpu_cap` - 1 threads
    (started as calls need them), created on first use and again after a fork, and never replaced while
    the process runs: a thread in another call may be submitting to it at any time."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        with _lock:
            if _pool is None:
                workers = max(1, _cpu_cap() - 1)
                _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bcelogits-cpu")
    return _pool


def _wait_all(futures) -> None:
    """Wait for every helper of a call, through KeyboardInterrupt too (raised again once all are done): a
    helper still running would go on reading this thread's argument buffer, which the thread's next call
    reuses, and writing the call's outputs."""
    interrupted = False
    for f in futures:
        while True:
            try:
                f.result()
                break
            except KeyboardInterrupt:
                interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's other threads: a fresh lock (one held by another thread at
    the fork would stay held, and the child's first call needing it would wait forever) and no pool (its
    threads are gone)."""
    global _lock, _pool
    _lock = threading.RLock()
    _pool = None


os.register_at_fork(after_in_child=_after_fork_in_child)


_gomp_state: dict = {}


def _address(arr):
    """The data address of ``arr`` (remembered for the constant arrays of :func:`_consts`)."""
    a = _CONST_ADDRESSES.get(id(arr))
    return arr.ctypes.data if a is None else a


def _torch_openmp():
    """``GOMP_parallel`` of the OpenMP runtime torch runs its operators on (the ``libgomp`` in torch's own
    directory), or None (torch not imported, another parallel backend, not Linux)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "__file__"):
        return None
    pid = os.getpid()
    if _gomp_state.get("pid") == pid:
        return _gomp_state["fn"]
    fn = None
    try:
        root = os.path.dirname(os.path.realpath(torch.__file__))
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
        for path in sorted(paths):
            if os.path.realpath(path).startswith(root + os.sep):
                fn = ctypes.CDLL(path).GOMP_parallel
                fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
                fn.restype = None
                break
    except (OSError, AttributeError, ValueError):
        fn = None
    _gomp_state.update(pid=pid, fn=fn)
    return fn


_local = threading.local()
#: Largest call buffer (int64 words) a thread keeps for its next calls: 4 MiB.
_KEEP_WORDS = 1 << 19


def _buffer(words):
    """``(array, address, memoryview)``: an int64 buffer of at least ``words`` words for one call. The
    calling thread keeps its last one (up to :data:`_KEEP_WORDS`) with its address: on small inputs,
    allocating it and looking its address up cost about as much as the kernel itself."""
    kept = getattr(_local, "buf", None)
    if kept is not None and kept[0].size >= words:
        return kept
    buf = np.empty(max(words, 1 << 14), np.int64)
    kept = (buf, buf.ctypes.data, memoryview(buf).cast("B"))
    if buf.size <= _KEEP_WORDS:
        _local.buf = kept
    return kept


# The argument block as packed by _launch: the (address, length) pairs, the two counter addresses, wi,
# pi and flags (int64), then ls, ig, gamma, gscale (float64), then the number of scratch slots and the
# claim size (see _chunk).
_ARGS = struct.Struct(f"<{_A_FLOATS}q4d2q")
_PART3 = struct.Struct("<3d")  # one block's (loss sum, count, weight sum), when nb == 1


def _launch(mode, focal, uses, dt, n, refs, scalars, flags, omp):
    """Run the ``(mode, focal, uses)`` worker of dtype ``dt`` over ``n`` elements, on the arrays
    ``refs = (x, y, w, p, go, lo, gr, wext, pext)`` given as (address, length) pairs, on up to
    :func:`_num_threads` threads and return the (loss sum, count, weight sum) of the block partials,
    summed in block order: the same bits for any thread count and any split of the blocks between threads.

    The threads: for torch tensors (``omp``), the OpenMP team torch itself uses for its operators (the
    worker is handed to ``GOMP_parallel``): its threads are the ones still spinning after torch's previous
    operator, so they start on our blocks at once instead of competing with us for the cores. For NumPy
    arrays, or without torch, the calling thread and a pool of Python threads (the compiled code runs
    without the GIL): a process that has used an OpenMP team cannot use it again in a forked child (it
    hangs there, torch's own operators included), and NumPy work must not leave a process that merely
    imported torch in that state."""
    fn, address = _kernel(dt, mode, focal, uses)
    nb = (n + BLOCK - 1) // BLOCK
    if nb < 2 * _MIN_BLOCKS_PER_THREAD:
        nthreads = 1
    else:
        nthreads = max(1, min(_num_threads(), nb // _MIN_BLOCKS_PER_THREAD))
    # One buffer per call (the calling thread's kept one, see _buffer): the argument block (_A_SIZE
    # int64), the two counters, the block partials (3 x nb float64), then the threads' scratch slots.
    # Packed with struct: a few numpy operations would cost more than the kernel on a small input.
    nscratch = nthreads * _slot_bytes(dt == np.float64)
    buf, base, mem = _buffer(_A_SIZE + 2 + 3 * nb + nscratch // 8)
    ctr = base + 8 * _A_SIZE
    ctypes.memset(ctr, 0, 8 * (2 + 3 * nb))
    x, y, w, p, go, lo, gr, wext, pext = refs
    _ARGS.pack_into(
        mem, 0, *x, *y, *w, *p, *go, *lo, *gr, ctr + 16, 3 * nb, *wext, *pext,
        ctr + 16 + 24 * nb, nscratch, ctr, ctr + 8, scalars[4], scalars[5], flags, *scalars[:4], nthreads,
        _chunk(nb, nthreads),
    )  # fmt: skip
    gomp = _torch_openmp() if nthreads > 1 and omp else None
    if nthreads == 1:
        fn(base)
    elif gomp is not None:
        gomp(address, base, nthreads, 0)
    else:
        futures = []
        try:
            pool = _executor()
            for _ in range(1, nthreads):
                try:
                    futures.append(pool.submit(fn, base))
                except RuntimeError:  # no new work at interpreter exit: this thread does the rest
                    break
            fn(base)  # (the threads claim blocks until none are left, however many of them started)
        finally:
            _wait_all(futures)
    if nb == 1:  # (what the sum below gives: 0.0 + the value, and no block sum is -0.0)
        return _PART3.unpack_from(mem, 8 * (_A_SIZE + 2))
    part = buf[_A_SIZE + 2 : _A_SIZE + 2 + 3 * nb].view(np.float64).reshape(3, nb)
    total, count, wsum = part.sum(axis=1)  # pairwise over blocks: independent of the thread count
    return float(total), float(count), float(wsum)


def _ext(src, inner, n):
    """One period and a block more of the broadcast pattern ``src[(k // inner) % len(src)]``, when the
    period is at most :data:`_EXT_MAX` (else empty: the worker views or fills the weights block by
    block)."""
    period = src.size * inner
    if period > _EXT_MAX:
        return _consts(src.dtype)[1]
    need = period + min(BLOCK, n)
    return np.tile(np.repeat(src, inner) if inner > 1 else src, -(-need // period))[:need]


def _launch_run(
    dt, n, x, y, w, p, go, lo, gr, ls, ig, gamma, gscale, w_inner, p_inner, mode, flags, uses, omp
):
    """The worker over all blocks. ``x, y``: spans (see :func:`_span`); ``go, lo, gr``: spans or None;
    ``w, p``: weight patterns. ``gamma == 0`` selects a non-focal specialisation, ``uses`` (see
    :func:`_uses`) one with only the operations the call needs."""
    none = _consts(dt)[1]
    absent = (_address(none), 0)
    # (The expanded patterns stay referenced here until the call returns. Written out rather than
    # looped over: on a small input this function's own time is a good part of the call's.)
    wext = _ext(w, w_inner, n) if "w" in uses else none
    pext = _ext(p, p_inner, n) if "p" in uses else none
    refs = (
        (x[0], n), (y[0], n), (_address(w), w.size), (_address(p), p.size),
        absent if go is None else (go[0], n), absent if lo is None else (lo[0], n),
        absent if gr is None else (gr[0], n), (_address(wext), wext.size), (_address(pext), pext.size),
    )  # fmt: skip
    scalars = (float(ls), float(ig), float(gamma), float(gscale), int(w_inner), int(p_inner))
    return _launch(mode, gamma != 0.0, uses, dt, n, refs, scalars, flags, omp)


def _uses(w, p, label_smoothing, ignore_index):
    """Which optional operations a call needs: ``w`` weight, ``p`` pos_weight, ``s`` label smoothing,
    ``i`` ignore_index ("" for the plain loss)."""
    on = (w is not None, p is not None, label_smoothing != 0.0, ignore_index is not None)
    return "".join(c for c, used in zip("wpsi", on) if used)


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

    ``x, y``: 1-D C-contiguous float32/float64 NumPy arrays of one dtype (the compute dtype) and length
    ``n``, or contiguous CPU torch tensors (of any shape, read flat; so are ``loss_out`` and ``grad_out``).
    ``w, p``: ``None`` or 1-D arrays; element ``i`` uses ``w[(i // w_inner) % len(w)]`` (same for ``p``).
    Elements with ``y == ignore_index`` (compared in the dtype, before smoothing) give loss 0 and grad 0
    and are not counted. ``loss_sum`` is accumulated in float64; ``weight_sum`` is the sum of the weights
    of the counted elements (``count`` when ``w`` is None). ``grad_out`` may be ``x`` itself; outputs
    must not otherwise overlap the inputs. ``weight_sum=False``: the caller does not need the weight
    sum (returned as NaN when no element is ignored), which saves a pass over a full-shape ``w``.
    """
    dt, n, xs, ys, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    flags = 2
    los = gos = None
    if loss_out is not None:
        los = _span("loss_out", loss_out, dt, n, writable=True)
        _check_out("loss_out", los, (), (xs, ys, _wspan(wv), _wspan(pv)))
        flags |= 1
    if grad_out is not None:
        gos = _span("grad_out", grad_out, dt, n, writable=True)
        _check_out("grad_out", gos, (xs,), (ys, _wspan(wv), _wspan(pv), los))
    if ignore_index is not None:
        flags |= 4
    if n == 0:
        return 0.0, 0, 0.0
    ig = math.nan if ignore_index is None else float(ignore_index)
    total, count, wsum = _launch_run(
        dt, n, xs, ys, wv, pv, None, los, gos,
        label_smoothing, ig, focal_gamma, grad_scale,
        wi, pi, 0 if grad_out is None else 1, flags, _uses(w, p, label_smoothing, ignore_index),
        not isinstance(x, np.ndarray),
    )  # fmt: skip
    if ignore_index is None:
        count = n
        if w is None:
            wsum = float(n)
        else:
            wsum = _weight_sum_all(wv, wi, n) if weight_sum else math.nan
    return total, int(count), wsum


def forward_contiguous(x, y, grad_out, grad_scale):
    """:func:`forward` without weights or options, for the caller that has already checked what
    :func:`forward` would (its dispatcher does, for its most common call): ``x``, ``y`` and ``grad_out``
    (None, or a new tensor) contiguous CPU torch tensors of one float32/float64 dtype and of ``n > 0``
    elements. Returns the loss sum; the same kernel call as :func:`forward`, so the same bits."""
    dt = _dtype_of(x)
    n = x.numel()
    size = n * dt.itemsize
    xs, ys = (a.data_ptr() for a in (x, y))
    gr = None if grad_out is None else (grad_out.data_ptr(), grad_out.data_ptr() + size)
    ones = _consts(dt)[0]  # (what _pattern gives for an absent weight)
    total, _, _ = _launch_run(
        dt, n, (xs, xs + size), (ys, ys + size), ones, ones, None, None, gr,
        0.0, math.nan, 0.0, grad_scale, 1, 1, 0 if grad_out is None else 1, 2, "", True,
    )  # fmt: skip
    return total


def backward_none(
    x, y, w, w_inner, p, p_inner, go, grad_out, *, label_smoothing=0.0, ignore_index=None, focal_gamma=0.0
):
    """``grad_out[i] = go[i] * dloss_i/dx_i``, the backward of reduction='none', in one pass over
    ``x, y, w, p, go`` (arrays as in :func:`forward`; a NumPy ``go`` is cast to the dtype if needed);
    ``grad_out`` may be ``x`` or ``go``."""
    dt, n, xs, ys, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    if isinstance(go, np.ndarray):
        go = np.ascontiguousarray(go, dtype=dt)
    gs = _span("go", go, dt, n)
    gos = _span("grad_out", grad_out, dt, n, writable=True)
    _check_out("grad_out", gos, (xs, gs), (ys, _wspan(wv), _wspan(pv)))
    if n == 0:
        return None
    _launch_run(
        dt, n, xs, ys, wv, pv, gs, None, gos,
        label_smoothing, math.nan if ignore_index is None else ignore_index, focal_gamma, 1.0,
        wi, pi, 2, 0, _uses(w, p, label_smoothing, ignore_index), not isinstance(x, np.ndarray),
    )  # fmt: skip
    return None
