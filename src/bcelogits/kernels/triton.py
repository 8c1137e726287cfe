r"""Fused Triton kernels for BCE-with-logits: one pass computes the loss, its gradient and the sums.

The kernels implement the algorithm of :mod:`bcelogits._math` element by element (``a = |x|``,
``h = exp(-a/2)``, ``e = h*h``; big and small sides; the small-side value multiplied by its coefficient
before the second ``h``; ``0 * inf = 0`` at ``|x| = inf``; NaN in, NaN out), reading ``x``, ``y`` (and
``w``, ``pos_weight``, the upstream gradient) once in their own dtypes and writing the per-element
loss and/or gradient once, cast to the output dtypes on store.

Arithmetic is float32, or float64 when ``x`` or ``y`` is float64. On a GPU ``exp``, ``log`` and
``log1p`` come from libdevice (``__nv_expf``/``__nv_logf``/``__nv_log1pf`` and their float64 forms):
Triton's own ``tl.exp`` is ``ex2.approx`` of ``x*log2(e)`` in float32, whose relative error grows like
``|x| * 2**-24`` and would break the 1e-6 bound on the small-side loss at ``|x| ~ 50``. float32
divisions use ``tl.div_rn`` (IEEE round-to-nearest, ``div.rn.f32``) instead of the default
``div.full.f32``. Under the Triton interpreter (``TRITON_INTERPRET=1``, for CPU testing) extern
libdevice calls are not supported, so ``exp``/``log`` map to numpy and ``log1p(e)`` is evaluated as
``log(u) * (e / (u - 1))`` with ``u = 1 + e`` (exact to a few ulp for ``0 <= e <= 1``). Triton
links libdevice in flush-to-zero mode; that only affects values whose contribution is below the
float32 normal range (``e`` subnormal for ``|x| > 87``, where the small side is ``(c*h)*h`` anyway).

Reductions are deterministic: each program writes its block's loss sum (a tree sum in the compute
dtype), its count of kept elements and its weight sum into a float64 buffer; fixed-shape passes of
a small kernel then add the partials in float64 down to one program, which writes the results. No
atomics; the host is never synchronised (all results stay on the device).

The scalar options travel to the GPU kernel as float64 arguments (exact in the float64 path) and are
materialised with ``tl.full`` (exact under the interpreter too, where a bare Python float would be
rounded to float32).
"""

import contextlib

unavailable_reason: str | None = None

try:
    import torch
except Exception as exc:  # noqa: BLE001 - any failure means "not available", never an import error
    torch = None
    unavailable_reason = f"torch could not be imported: {exc!r}"

try:  # importing compiles nothing: ``triton.jit`` only wraps the functions below
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001
    triton = tl = None
    unavailable_reason = unavailable_reason or f"triton could not be imported: {exc!r}"

libdevice = None
if triton is not None:
    try:
        from triton.language.extra import libdevice
    except Exception:  # noqa: BLE001 - older layouts
        try:
            from triton.language.extra.cuda import libdevice
        except Exception:  # noqa: BLE001
            libdevice = None

__all__ = ["available", "forward", "backward_none", "unavailable_reason"]

# Elements per program and warps per program. Elementwise work is memory-bound: 8 elements per thread
# (one 16-byte load per float32 stream for full blocks) on 4 warps. Registers (ptxas, sm_90): about 80
# for the plain float32 variant, about 190 with every option on (focal, weights, smoothing, ignore,
# upstream gradient), no spills; that leaves 2 (fullest) to 6 (plain) programs resident per SM, 2048 to
# 6144 elements in flight. A block twice as large spills in the fullest float64 variant.
BLOCK_F32 = 1024
BLOCK_F64 = 512
NUM_WARPS = 4
# Partials reduction: passes of REDUCE_BLOCK partials per program until at most FINISH_MAX are left,
# then one program adds those (a fixed order throughout, so the sums are bitwise reproducible).
REDUCE_BLOCK = 4096
FINISH_MAX = 4 * 4096
# Offsets switch to int64 when n + BLOCK reaches this (int32 index math is cheaper, notably the
# division/modulo of broadcast weights).
INDEX64_THRESHOLD = 2**31 - 1

# Index modes for w and pos_weight: element i reads v[(i // inner) % len].
_ABSENT, _SCALAR, _FULL, _MOD, _DIV, _DIVMOD = 0, 1, 2, 3, 4, 5


if triton is not None:

    @triton.jit
    def _exp(v, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.exp(v)
        else:
            return tl.exp(v)

    @triton.jit
    def _log(v, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            return libdevice.log(v)
        else:
            return tl.log(v)

    @triton.jit
    def _div(a, b, F64: tl.constexpr):
        if F64:
            return a / b  # float64 division is IEEE (div.rn.f64)
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _log1p_small(e, LIBDEVICE: tl.constexpr, F64: tl.constexpr):
        # log1p(e) for 0 <= e <= 1 (NaN passes through)
        if LIBDEVICE:
            return libdevice.log1p(e)
        else:
            u = 1.0 + e
            # u - 1 is exact; log(u) / (u - 1) cancels the rounding of u (Goldberg's trick)
            return tl.where(u == 1.0, e, tl.log(u) * _div(e, tl.where(u == 1.0, 1.0, u - 1.0), F64))

    @triton.jit
    def _load(ptr, offs, mask, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offs, mask=mask, other=0)
        else:
            return tl.load(ptr + offs)

    @triton.jit
    def _store(ptr, offs, v, mask, MASKED: tl.constexpr, EMULATE_RN: tl.constexpr):
        # Store v cast to the pointer's dtype. The interpreter truncates float -> bfloat16 (a GPU
        # rounds to nearest even), so there the value is first rounded to a bfloat16 in float32 bits.
        if EMULATE_RN and ptr.dtype.element_ty == tl.bfloat16:
            f = v.to(tl.float32)
            bits = f.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            v = tl.where(f != f, f, bits.to(tl.float32, bitcast=True))
        if MASKED:
            tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ptr + offs, v.to(ptr.dtype.element_ty))

    @triton.jit
    def _load_bcast(ptr, offs, mask, length, inner, MODE: tl.constexpr, CDT: tl.constexpr,
                    MASKED: tl.constexpr):  # fmt: skip
        # v[(offs // inner) % length] converted to CDT
        if MODE == 1:
            v = tl.load(ptr).to(CDT)
        elif MODE == 2:
            v = _load(ptr, offs, mask, MASKED).to(CDT)
        elif MODE == 3:
            v = _load(ptr, offs % length, mask, MASKED).to(CDT)
        elif MODE == 4:
            v = _load(ptr, offs // inner, mask, MASKED).to(CDT)
        else:
            v = _load(ptr, (offs // inner) % length, mask, MASKED).to(CDT)
        return v

    @triton.jit
    def _bce_block(
        pid, x_ptr, y_ptr, w_ptr, p_ptr, go_ptr, gs_ptr, loss_ptr, grad_ptr, part_ptr,
        n, w_len, w_inner, p_len, p_inner, num_blocks,
        ls_scale, ls_shift, ignore_value, gamma, grad_scale,
        CDT: tl.constexpr, F64: tl.constexpr, LIBDEVICE: tl.constexpr, EMULATE_RN: tl.constexpr,
        IDX64: tl.constexpr,
        W_MODE: tl.constexpr, P_MODE: tl.constexpr, HAS_LS: tl.constexpr, HAS_IGNORE: tl.constexpr,
        HAS_FOCAL: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
        GO_MODE: tl.constexpr, GS_MODE: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr,
        MASKED: tl.constexpr,
    ):  # fmt: skip
        # One block of BLOCK elements; MASKED only for the last, partial block (unmasked loads and
        # stores vectorise whatever n is).
        if IDX64:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
        else:
            mask = tl.full([BLOCK], 1, tl.int1)

        x = _load(x_ptr, offs, mask, MASKED).to(CDT)
        y_raw = _load(y_ptr, offs, mask, MASKED).to(CDT)

        keep = mask
        if HAS_IGNORE:
            keep = keep & (y_raw != tl.full([BLOCK], ignore_value, CDT))

        # Target weights of softplus(x) and softplus(-x): 1 - ys and ys. With smoothing,
        # 1 - ys = (1 - y) * (1 - eps) + eps/2 avoids the cancellation of 1 - ys near ys = 1.
        if HAS_LS:
            scale = tl.full([BLOCK], ls_scale, CDT)
            shift = tl.full([BLOCK], ls_shift, CDT)
            ys = y_raw * scale + shift
            oms = (1.0 - y_raw) * scale + shift
        else:
            ys = y_raw
            oms = 1.0 - y_raw

        c_pos = oms
        c_neg = ys
        if P_MODE != 0:
            c_neg = _load_bcast(p_ptr, offs, mask, p_len, p_inner, P_MODE, CDT, MASKED) * c_neg
        if W_MODE != 0:
            wv = _load_bcast(w_ptr, offs, mask, w_len, w_inner, W_MODE, CDT, MASKED)
            c_pos = wv * c_pos
            c_neg = wv * c_neg

        pos = x >= 0.0
        a = tl.where(pos, x, -x)
        h = _exp(-0.5 * a, LIBDEVICE)
        e = h * h
        one_e = 1.0 + e
        lp = _log1p_small(e, LIBDEVICE, F64)
        c_big = tl.where(pos, c_pos, c_neg)
        c_small = tl.where(pos, c_neg, c_pos)
        small_h = c_small * h  # coefficient first: p*w*exp(-a) stays normal when the product is
        loss = tl.where(c_big == 0.0, 0.0, c_big * (a + lp))
        loss = loss + tl.where(a > 40.0, small_h * h, c_small * lp)

        if WRITE_GRAD:
            g = _div(c_big - small_h * h, one_e, F64)
            g = tl.where(pos, g, -g)

        if HAS_FOCAL:
            gam = tl.full([BLOCK], gamma, CDT)
            b = tl.where(pos, oms, ys)
            s = tl.where(pos, ys, oms)
            b0 = b == 0.0
            se = s * e
            safe_b = tl.where(b0, se + 1.0, b + se)
            l1 = tl.where(b0, _log(s, LIBDEVICE) - a, _log(safe_b, LIBDEVICE)) - lp
            f = _exp(gam * l1, LIBDEVICE)
            if WRITE_GRAD:
                ratio = tl.where(
                    b0,
                    _div(1.0, tl.where(s == 0.0, 1.0, s), F64),
                    _div(e, tl.where(b0, 1.0, b + se), F64),
                )
                dl1 = _div((oms - ys) * ratio, one_e, F64)
                g = f * (g + tl.where(dl1 == 0.0, 0.0, gam * loss * dl1))
            loss = f * loss

        loss = tl.where(keep, loss, 0.0)
        if WRITE_LOSS:
            _store(loss_ptr, offs, loss, mask, MASKED, EMULATE_RN)
        if WRITE_GRAD:
            if GO_MODE == 1:
                g = g * tl.load(go_ptr).to(CDT)
            elif GO_MODE == 2:
                g = g * _load(go_ptr, offs, mask, MASKED).to(CDT)
            if GS_MODE == 1:
                g = g * tl.full([BLOCK], grad_scale, CDT)
            elif GS_MODE == 2:
                g = g * tl.load(gs_ptr).to(CDT)
            g = tl.where(keep, g, 0.0)
            _store(grad_ptr, offs, g, mask, MASKED, EMULATE_RN)

        if REDUCE:
            kept = keep.to(CDT)
            if W_MODE != 0:
                wsum = tl.sum(tl.where(keep, wv, 0.0), axis=0)
            else:
                wsum = tl.sum(kept, axis=0)
            slot = pid.to(tl.int64)
            tl.store(part_ptr + slot, tl.sum(loss, axis=0).to(tl.float64))
            tl.store(part_ptr + num_blocks + slot, tl.sum(kept, axis=0).to(tl.float64))
            tl.store(part_ptr + 2 * num_blocks + slot, wsum.to(tl.float64))

    # Sizes are not specialised on (that would compile a kernel per divisibility class of n): full
    # blocks take the unmasked path anyway.
    @triton.jit(do_not_specialize=["n", "num_full", "w_len", "w_inner", "p_len", "p_inner", "num_blocks"])
    def _bce_kernel(
        x_ptr, y_ptr, w_ptr, p_ptr, go_ptr, gs_ptr, loss_ptr, grad_ptr, part_ptr,
        n, num_full, w_len, w_inner, p_len, p_inner, num_blocks,
        ls_scale: tl.float64, ls_shift: tl.float64, ignore_value: tl.float64, gamma: tl.float64,
        grad_scale: tl.float64,
        CDT: tl.constexpr, F64: tl.constexpr, LIBDEVICE: tl.constexpr, EMULATE_RN: tl.constexpr,
        IDX64: tl.constexpr,
        W_MODE: tl.constexpr, P_MODE: tl.constexpr, HAS_LS: tl.constexpr, HAS_IGNORE: tl.constexpr,
        HAS_FOCAL: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
        GO_MODE: tl.constexpr, GS_MODE: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        if pid < num_full:
            _bce_block(
                pid, x_ptr, y_ptr, w_ptr, p_ptr, go_ptr, gs_ptr, loss_ptr, grad_ptr, part_ptr,
                n, w_len, w_inner, p_len, p_inner, num_blocks,
                ls_scale, ls_shift, ignore_value, gamma, grad_scale,
                CDT, F64, LIBDEVICE, EMULATE_RN, IDX64, W_MODE, P_MODE, HAS_LS, HAS_IGNORE, HAS_FOCAL,
                WRITE_LOSS, WRITE_GRAD, GO_MODE, GS_MODE, REDUCE, BLOCK, False,
            )  # fmt: skip
        else:
            _bce_block(
                pid, x_ptr, y_ptr, w_ptr, p_ptr, go_ptr, gs_ptr, loss_ptr, grad_ptr, part_ptr,
                n, w_len, w_inner, p_len, p_inner, num_blocks,
                ls_scale, ls_shift, ignore_value, gamma, grad_scale,
                CDT, F64, LIBDEVICE, EMULATE_RN, IDX64, W_MODE, P_MODE, HAS_LS, HAS_IGNORE, HAS_FOCAL,
                WRITE_LOSS, WRITE_GRAD, GO_MODE, GS_MODE, REDUCE, BLOCK, True,
            )  # fmt: skip

    @triton.jit(do_not_specialize=["nb_src", "nb_dst"])
    def _partials_kernel(src_ptr, dst_ptr, nb_src, nb_dst, RBLOCK: tl.constexpr):
        # one reduction pass: each program adds RBLOCK consecutive partials of each of the 3 rows
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * RBLOCK + tl.arange(0, RBLOCK).to(tl.int64)
        m = idx < nb_src
        for k in tl.static_range(3):
            v = tl.load(src_ptr + k * nb_src + idx, mask=m, other=0.0)
            tl.store(dst_ptr + k * nb_dst + pid, tl.sum(v, axis=0))

    @triton.jit(do_not_specialize=["num_blocks"])
    def _finish_kernel(part_ptr, out_ptr, count_ptr, num_blocks, RBLOCK: tl.constexpr):
        # add the remaining partials in a fixed order, in float64, and write the three results
        acc_loss = tl.zeros([RBLOCK], dtype=tl.float64)
        acc_count = tl.zeros([RBLOCK], dtype=tl.float64)
        acc_w = tl.zeros([RBLOCK], dtype=tl.float64)
        for start in range(0, num_blocks, RBLOCK):
            idx = start + tl.arange(0, RBLOCK).to(tl.int64)
            m = idx < num_blocks
            acc_loss += tl.load(part_ptr + idx, mask=m, other=0.0)
            acc_count += tl.load(part_ptr + num_blocks + idx, mask=m, other=0.0)
            acc_w += tl.load(part_ptr + 2 * num_blocks + idx, mask=m, other=0.0)
        tl.store(out_ptr, tl.sum(acc_loss, axis=0))
        tl.store(out_ptr + 1, tl.sum(acc_w, axis=0))
        tl.store(count_ptr, tl.sum(acc_count, axis=0).to(tl.int64))


def _built_for_interpreter() -> bool:
    if triton is None or torch is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001
        return False
    return isinstance(_bce_kernel, InterpretedFunction)


# Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when this module was
# imported): fixed at import, since ``triton.jit`` decides then.
_INTERPRETED = _built_for_interpreter()


def _interpreted() -> bool:
    return _INTERPRETED


_cuda_driver_ok: bool | None = None


def _cuda_ok() -> bool:
    global _cuda_driver_ok
    if _cuda_driver_ok is None:
        try:
            _cuda_driver_ok = bool(torch.cuda.is_available()) and triton.runtime.driver.active is not None
            if _cuda_driver_ok:
                triton.runtime.driver.active.get_current_target()
        except Exception:  # noqa: BLE001 - no usable GPU backend
            _cuda_driver_ok = False
    return _cuda_driver_ok


def available(device=None) -> bool:
    """True if the kernels can run on ``device`` (a ``torch.device``, string, tensor or None).

    Under the interpreter (``TRITON_INTERPRET=1`` when this module was imported) any device works
    (tensors are staged through host memory); otherwise the device must be CUDA (or ROCm, which
    torch also calls "cuda") with a working Triton GPU backend. Never raises.
    """
    try:
        if triton is None or torch is None:
            return False
        if _interpreted():
            return True
        if device is None:
            return _cuda_ok()
        if isinstance(device, torch.Tensor):
            device = device.device
        return torch.device(device).type == "cuda" and _cuda_ok()
    except Exception:  # noqa: BLE001
        return False


_FLOAT_DTYPES = () if torch is None else (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_vec(name, t, device, n=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a 1-D contiguous tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float64/float16/bfloat16, got {t.dtype}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n}")


def _bcast_mode(name, v, inner, n, device):
    """Index mode and (len, inner) of a broadcast operand read as v[(i // inner) % len]."""
    if v is None:
        return _ABSENT, 1, 1
    _check_vec(name, v, device)
    length = v.numel()
    inner = 1 if inner is None else int(inner)
    if length == 0 or inner < 1:
        raise ValueError(f"{name} must be non-empty with inner >= 1 (len {length}, inner {inner})")
    if length == 1:
        return _SCALAR, 1, 1
    if inner == 1:
        return (_FULL if length >= n else _MOD), length, 1
    if (n - 1) // inner < length:
        return _DIV, length, inner
    return _DIVMOD, length, inner


def _errstate():
    # The interpreter evaluates both arms of every tl.where with numpy, which warns on IEEE special
    # values (log(0) in an unused arm, inf - inf for an infinite logit) that a GPU computes silently;
    # the results are selected exactly as on the GPU, so these warnings carry no information.
    if _interpreted():
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def _launch(x, y, w, w_inner, p, p_inner, *, label_smoothing, ignore_index, focal_gamma, loss_out, grad_out,
            go, grad_scale, reduce):  # fmt: skip
    if triton is None or torch is None:
        raise RuntimeError(f"bcelogits Triton kernels unavailable: {unavailable_reason}")
    _check_vec("x", x, x.device)
    device = x.device
    n = x.numel()
    _check_vec("y", y, device, n)
    if loss_out is not None:
        _check_vec("loss_out", loss_out, device, n)
    if grad_out is not None:
        _check_vec("grad_out", grad_out, device, n)
    w_mode, w_len, w_inner = _bcast_mode("w", w, w_inner, n, device)
    p_mode, p_len, p_inner = _bcast_mode("p", p, p_inner, n, device)

    go_mode = 0
    if go is not None:
        _check_vec("go", go, device)
        if go.numel() not in (1, n):
            raise ValueError(f"go has {go.numel()} elements, expected 1 or {n}")
        go_mode = 1 if go.numel() == 1 and n != 1 else 2

    gs_mode, gs_value, gs_ptr = 0, 1.0, None
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or grad_scale.device != device:
            raise ValueError("a tensor grad_scale must hold one element on the inputs' device")
        gs_mode, gs_ptr = 2, grad_scale.reshape(1)
    elif float(grad_scale) != 1.0:
        gs_mode, gs_value = 1, float(grad_scale)

    f64 = x.dtype == torch.float64 or y.dtype == torch.float64
    cdt = tl.float64 if f64 else tl.float32
    block = BLOCK_F64 if f64 else BLOCK_F32
    num_blocks = triton.cdiv(n, block)

    eps = float(label_smoothing)
    has_ls = eps != 0.0
    has_ignore = ignore_index is not None
    # y == ignore_index as torch compares a tensor with a Python scalar: in y's dtype
    ignore_value = float(torch.tensor(float(ignore_index), dtype=y.dtype)) if has_ignore else 0.0
    gamma = float(focal_gamma)
    if gamma < 0.0:
        raise ValueError(f"focal_gamma must be >= 0, got {gamma}")

    out = torch.empty(2, dtype=torch.float64, device=device) if reduce else None
    count = torch.empty((), dtype=torch.int64, device=device) if reduce else None
    if n == 0:
        if reduce:
            out.zero_()
            count.zero_()
            return out[0], count, out[1]
        return None
    part = torch.empty(3 * num_blocks, dtype=torch.float64, device=device) if reduce else None

    interp = _interpreted()
    # Triton launches on the current CUDA device: make it the inputs' device.
    on_device = (
        torch.cuda.device(device) if device.type == "cuda" and not interp else contextlib.nullcontext()
    )
    # Unused pointer slots get x (never dereferenced: their constexpr flags are off).
    with _errstate(), on_device:
        _bce_kernel[(num_blocks,)](
            x, y, w if w is not None else x, p if p is not None else x,
            go if go is not None else x, gs_ptr if gs_ptr is not None else x,
            loss_out if loss_out is not None else x, grad_out if grad_out is not None else x,
            part if part is not None else x,
            n, n // block, w_len, w_inner, p_len, p_inner, num_blocks,
            1.0 - eps, 0.5 * eps, ignore_value, gamma, gs_value,
            CDT=cdt, F64=f64, LIBDEVICE=libdevice is not None and not interp, EMULATE_RN=interp,
            IDX64=n + block >= INDEX64_THRESHOLD,
            W_MODE=w_mode, P_MODE=p_mode, HAS_LS=has_ls, HAS_IGNORE=has_ignore, HAS_FOCAL=gamma != 0.0,
            WRITE_LOSS=loss_out is not None, WRITE_GRAD=grad_out is not None,
            GO_MODE=go_mode, GS_MODE=gs_mode, REDUCE=reduce, BLOCK=block,
            num_warps=NUM_WARPS, enable_fp_fusion=True,
        )  # fmt: skip
        if reduce:
            nb = num_blocks
            while nb > FINISH_MAX:
                nb_next = triton.cdiv(nb, REDUCE_BLOCK)
                nxt = torch.empty(3 * nb_next, dtype=torch.float64, device=device)
                _partials_kernel[(nb_next,)](part, nxt, nb, nb_next, RBLOCK=REDUCE_BLOCK, num_warps=8)
                part, nb = nxt, nb_next
            _finish_kernel[(1,)](part, out, count, nb, RBLOCK=REDUCE_BLOCK, num_warps=8)
    if reduce:
        return out[0], count, out[1]
    return None


def forward(x, y, w, w_inner, p, p_inner, *, label_smoothing=0.0, ignore_index=None, focal_gamma=0.0,
            loss_out=None, grad_out=None, grad_scale=1.0, weight_sum=True):  # fmt: skip
    """One fused pass: per-element loss into ``loss_out``, ``grad_scale * dloss/dx`` into ``grad_out``.

    ``x``, ``y``: 1-D contiguous tensors of length n (float32/float64/float16/bfloat16, may differ);
    ``w``, ``p``: None or 1-D tensors read as ``w[(i // w_inner) % len(w)]``; ``grad_scale``: a
    number or a one-element tensor (read on the device, so a loss scale needs no host sync).
    Returns 0-dim device tensors ``(loss_sum float64, count int64, weight_sum float64)`` over the
    elements whose target is not ``ignore_index``; ``weight_sum == count`` when ``w`` is None. The
    ``weight_sum`` flag exists for the CPU kernel's signature: here the sum is free, always computed.
    """
    return _launch(x, y, w, w_inner, p, p_inner, label_smoothing=label_smoothing, ignore_index=ignore_index,
                   focal_gamma=focal_gamma, loss_out=loss_out, grad_out=grad_out, go=None,
                   grad_scale=grad_scale, reduce=True)  # fmt: skip


def backward_none(x, y, w, w_inner, p, p_inner, go, grad_out, *, label_smoothing=0.0, ignore_index=None,
                  focal_gamma=0.0) -> None:  # fmt: skip
    """``grad_out[i] = go[i] * dloss_i/dx_i`` (backward of reduction='none'); ``go`` may also hold one
    element (broadcast). Ignored elements get 0."""
    if grad_out is None:
        raise ValueError("backward_none needs grad_out")
    _launch(x, y, w, w_inner, p, p_inner, label_smoothing=label_smoothing, ignore_index=ignore_index,
            focal_gamma=focal_gamma, loss_out=None, grad_out=grad_out, go=go, grad_scale=1.0,
            reduce=False)  # fmt: skip
