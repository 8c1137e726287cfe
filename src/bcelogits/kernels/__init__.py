"""Kernel choice, made once per call, and the runners every path goes through.

Three backends evaluate the same algorithm (:mod:`bcelogits._math`):

- ``plain``: the formulas in array ops (torch or NumPy); any device, dtype, stride; differentiable.
- ``cpu``: the fused one-pass native kernel (:mod:`.cpu`: C, built with the package) for CPU data. It
  reads contiguous float32/float64 data; everything else is staged for it first (:func:`_staged`: dense
  layouts permuted to their memory order, other dtypes and strides copied, irregular weight broadcasts
  expanded).
- ``triton``: the fused Triton kernel (:mod:`.triton`) for contiguous CUDA tensors.

``auto`` (the default) picks the fused kernel when it can serve the call and ``plain`` otherwise (other
devices, torch.func transforms, tensor subclasses, jit tracing). Force one with
``with bcelogits.kernels.use("plain"): ...`` or ``BCELOGITS_BACKEND=plain``; a forced kernel that cannot
serve a call (a CUDA tensor forced to ``cpu``, a strided CUDA view) still falls back to ``plain``, so
forcing never changes a result, only the route.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _args, _math
from . import _hugepages

BACKENDS = ("auto", "plain", "cpu", "triton")
_DEFAULT = (os.environ.get("BCELOGITS_BACKEND", "auto") or "auto").strip().lower()
if _DEFAULT not in BACKENDS:
    raise ValueError(
        f"BCELOGITS_BACKEND={os.environ['BCELOGITS_BACKEND']!r} is not a backend: set it to one of "
        f"{', '.join(BACKENDS)}, or unset it (auto)"
    )
# Per thread and per asyncio task: one thread's `use(...)` never reroutes another's calls.
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("bcelogits_backend", default=_DEFAULT)
_state = {"warned": False}


class PerformanceWarning(UserWarning):
    """The fast path is unavailable and a slower one gives the same results.

    Given once per process, when a fused kernel is missing or fails to build and the plain path (the same
    formulas in torch or NumPy operators, several times slower) takes over. The values do not change.
    Silence it, if you know, with
    ``warnings.filterwarnings("ignore", category=bcelogits.PerformanceWarning)``.

    Examples:
        >>> import bcelogits
        >>> issubclass(bcelogits.PerformanceWarning, UserWarning)
        True
    """


class KernelBuildError(RuntimeError):
    """A fused kernel could not be built on this machine (raised on its first use; the dispatcher warns
    once and takes the plain path)."""


@contextlib.contextmanager
def use(backend: str):
    """Route the loss calls inside a ``with`` block through ``backend``.

    A context manager, per thread (and per asyncio task): other threads keep their route. The
    ``BCELOGITS_BACKEND`` environment variable sets the default of a process the same way. Every route
    computes the same algorithm, so forcing one changes speed, not results; a forced kernel that cannot
    serve a call (``"triton"`` for CPU data, ``"cpu"`` for a CUDA tensor) leaves it to the plain path.

    Args:
        backend: ``"auto"`` (the default: the fused kernel where it can serve the call), ``"plain"`` (the
            formulas in torch or NumPy operators), ``"cpu"`` (the fused CPU kernel) or ``"triton"``
            (the fused Triton kernel, for CUDA tensors).

    Raises:
        ValueError: ``backend`` is not one of those names.

    Examples:
        >>> import numpy as np
        >>> import bcelogits
        >>> with bcelogits.kernels.use("plain"):
        ...     print(bcelogits.kernels.current())
        ...     print(bcelogits.binary_cross_entropy_with_logits(np.zeros(2), np.ones(2)))
        plain
        0.6931471805599453
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    token = _backend.set(backend)
    try:
        yield
    finally:
        _backend.reset(token)


def current() -> str:
    """The route that loss calls in this thread (and context) take now.

    Returns:
        One of ``"auto"``, ``"plain"``, ``"cpu"``, ``"triton"``, set by the innermost ``use``, else by
        ``BCELOGITS_BACKEND``, else ``"auto"``.

    Examples:
        >>> import bcelogits
        >>> bcelogits.kernels.current() in ("auto", "plain", "cpu", "triton")
        True
    """
    return _backend.get()


# --------------------------------------------------------------------------------------------- choice
_modules: dict = {}  # imported kernel modules, cached: an import statement costs ~20 us per call


def _cpu_module():
    cpu = _modules.get("cpu")
    if cpu is None:
        try:
            from . import cpu
        except ImportError as exc:  # pragma: no cover - the module ships with the package
            cpu, reason = None, str(exc)
        else:
            _modules["cpu"] = cpu
    if cpu is not None and cpu.available():
        return cpu
    if not _state["warned"] and current() in ("auto", "cpu"):  # (forced "cpu" too: asked for, not given)
        _state["warned"] = True
        _args.warn(
            "bcelogits: the fused CPU kernel is unavailable "
            f"({reason if cpu is None else cpu.unavailable_reason}); using the plain path, "
            "which gives the same results but is about 20x slower (and several times slower than torch's "
            "own loss). For the fast path, reinstall with a C compiler and CMake available: "
            "pip install --force-reinstall --no-binary bcelogits bcelogits (or pip install . in a checkout).",
            PerformanceWarning,
        )
    return None


def _triton_module(device):
    tk = _modules.get("triton")
    if tk is None:
        try:
            from . import triton as tk
        except ImportError:  # pragma: no cover
            return None
        _modules["triton"] = tk
    return tk if tk.available(device) else None


def _kernel_failed(kernel, exc: BaseException) -> bool:
    """A kernel's own build failure (a KernelBuildError, or a triton compile error, raised on the first
    call of a specialisation): warn once and let the caller take the plain path. Anything else is
    re-raised."""
    mod = type(exc).__module__ or ""
    if not (isinstance(exc, KernelBuildError) or mod.startswith("triton")):
        return False
    _failed.add(kernel.__name__)
    _args.warn(
        f"bcelogits: the fused kernel {kernel.__name__} failed to build ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); using the plain path for this process, which is "
        "slower but gives the same results.",
        PerformanceWarning,
    )
    return True


_failed: set = set()  # kernels that failed to build in this process


def flat_pattern(w, shape: tuple):
    """``(w_flat, inner)`` such that element ``i`` of the flattened input uses ``w_flat[(i // inner) % C]``,
    or ``None`` when the broadcast of ``w`` to ``shape`` is not of that form (e.g. shape (N, 1, W))."""
    if w is None:
        return None, 1
    nd = len(shape)
    ws = (1,) * (nd - w.ndim) + tuple(w.shape)
    big = [d for d in range(nd) if ws[d] != 1]
    if not big:
        return w.reshape(1), 1
    d0, d1 = big[0], big[-1]
    if any(ws[d] != shape[d] for d in range(d0, d1 + 1)):
        return None
    return w.reshape(-1), math.prod(shape[d1 + 1 :])


def plain_tensor(t, torch) -> bool:
    """A dense tensor the kernels may read through .numpy() / data pointers (no subclass but
    ``nn.Parameter``, whose ``__torch_function__`` is torch's own; no fake tensor, no functorch wrapper,
    no forward-AD tangent, no lazy negation: a ``_neg_view`` shares its memory with the tensor it
    negates)."""
    if (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or t.is_neg():
        return False  # (subclasses, fake tensors under torch.compile)
    if _args.functorch_wrapped(torch, t):
        return False
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_legacy_batchedtensor(t):  # vmap'd backward
        return False
    return not forward_ad_active(torch) or torch.autograd.forward_ad.unpack_dual(t).tangent is None


def forward_ad_active(torch) -> bool:
    """Is a forward-mode AD ``dual_level`` open (tangents exist only inside one)? Read from torch's
    private level counter; if that is ever gone, assume one is."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def choose(call):
    """The kernel module (``cpu`` / ``triton``) that serves ``call``, or ``None`` for the plain path."""
    kernel = _choose(call)
    return None if kernel is None or kernel.__name__ in _failed else kernel


def _choose(call):
    backend = current()
    x, y = call.input, call.target
    if backend == "plain" or math.prod(call.shape) == 0:
        return None
    if not call.is_torch:  # any layout and weight broadcast (see _staged)
        if call.compute_dtype not in (np.float32, np.float64):  # long double: NumPy's own operations
            return None
        return _cpu_module() if backend in ("auto", "cpu") else None
    torch = call.xp
    if torch.jit.is_tracing():  # torch.jit.trace records torch operators; a kernel call is not one
        return None
    if not all(plain_tensor(t, torch) for t in (x, y, call.weight, call.pos_weight) if t is not None):
        return None
    contiguous = x.is_contiguous() and y.is_contiguous()
    if x.device.type == "cpu":
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return _triton_module(x.device) if contiguous and _flat_weights(call) else None
        return _cpu_module() if backend in ("auto", "cpu") else None  # anything (see _staged)
    if x.device.type == "cuda" and backend in ("auto", "triton") and contiguous and _flat_weights(call):
        return _triton_module(x.device)
    return None


def memory_order(t):
    """The order of ``t``'s dimensions in memory (outermost first) when ``t.permute(order)`` is
    C-contiguous: a dense tensor without gaps or overlaps (contiguous, channels_last, a transpose, ...);
    else None."""
    if t.is_contiguous():
        return tuple(range(t.ndim))
    order = tuple(sorted(range(t.ndim), key=lambda d: -t.stride(d)))
    return order if t.permute(order).is_contiguous() else None


def _permute_weight(w, order):
    """A weight broadcastable to the input, as a view broadcastable to ``input.permute(order)``."""
    if w is None:
        return None
    return w.reshape((1,) * (len(order) - w.ndim) + tuple(w.shape)).permute(order)


def _flat_weights(call) -> bool:
    """Can the kernels read the weights of ``call`` as flat periodic patterns?"""
    shape = call.shape
    return flat_pattern(call.weight, shape) is not None and flat_pattern(call.pos_weight, shape) is not None


def _cpu_order(call):
    """The memory order the CPU kernel runs a torch ``call`` in: that of the target for 'none' and of the
    input otherwise, so that results are laid out as torch's (the elementwise loss like the target, the
    gradient of a reduced loss like the input); the logical order for a tensor with gaps or overlaps."""
    lead = call.target if call.reduction == "none" else call.input
    order = memory_order(lead)
    return tuple(range(lead.ndim)) if order is None else order


def _triton_staged(call):
    """The call as the Triton kernels read it. They load each tensor in its own dtype and compute in
    float32, or in float64 when ``x`` or ``y`` is float64; a float32 call that :mod:`bcelogits._args`
    moved to float64 (weight products beyond float32's range) gets its target in float64."""
    dt = call.compute_dtype
    if dt.itemsize == 8 and call.input.dtype != dt and call.target.dtype != dt:
        return call.with_arrays(call.input, call.target.to(dt), call.weight, call.pos_weight)
    return call


def _staged(call):
    """``(call, order)``: the call as the CPU kernel reads it. Input and target C-contiguous in the compute
    dtype: permuted to the memory ``order`` of :func:`_cpu_order` (a view for a dense layout:
    channels_last, a transpose), and copied where that is not enough (16-bit or mixed dtypes, another
    layout, gaps or overlaps: one pass each, far cheaper than the plain path's many). Weights are
    permuted with them (:func:`_kernel_args` reads them). ``order`` is None when nothing was permuted;
    outputs for the staged call are made with :func:`_empty_in_order`."""
    x, y, w, p, dt = call.input, call.target, call.weight, call.pos_weight, call.compute_dtype
    if call.is_torch:
        ready = x.dtype == y.dtype == dt and x.is_contiguous() and y.is_contiguous()
    else:
        ready = x.dtype == y.dtype == dt and x.flags.c_contiguous and y.flags.c_contiguous
    if ready:
        return call, None
    order = _cpu_order(call) if call.is_torch else tuple(range(x.ndim))
    identity = order == tuple(range(len(order)))
    if call.is_torch:
        x, y = (_contiguous_as(a.permute(order), dt) for a in (x, y))
        if not identity:
            w, p = _permute_weight(w, order), _permute_weight(p, order)
    else:
        x, y = (np.asarray(a, dtype=dt, order="C") for a in (x, y))  # (0-d stays 0-d)
    return call.with_arrays(x, y, w, p), None if identity else order


# --------------------------------------------------------------------------------------------- running
@dataclass
class Forward:
    loss: Any  # the reduced loss (0-dim) or the elementwise loss, in call.out_dtype
    grad: Any  # d(reduced loss)/d input in the compute dtype, or None (times `pending`)
    pending: Any  # factor the grad still needs: 1.0, or 1/denominator when it was unknown in the pass
    mean_weight: float | None = None  # 'weighted_mean' on a kernel: weight sum / count (see forward)

    def final_grad(self):
        """The gradient with the pending factor applied (in place: the gradient is this call's own)."""
        if isinstance(self.pending, float) and self.pending == 1.0:
            return self.grad
        p = self.pending
        if not isinstance(p, float) and hasattr(p, "to"):
            p = p.to(self.grad.dtype)
        self.grad *= p
        self.pending = 1.0
        return self.grad


def _options_kw(call) -> dict:
    o = call.options
    return dict(label_smoothing=o.label_smoothing, ignore_index=o.ignore_index, focal_gamma=o.focal_gamma)


def _as_kernel_array(a, is_torch: bool):
    if a is None:
        return None
    return a.detach().contiguous().numpy() if is_torch else np.ascontiguousarray(a)


def _empty(call, dtype):
    """A new output of the call's shape (huge pages asked for on big CPU tensors: see _hugepages; NumPy
    asks for them itself)."""
    if call.is_torch:
        out = call.xp.empty(call.shape, dtype=dtype, device=call.input.device)
        _hugepages.advise_tensor(out)
        return out
    return np.empty(call.shape, dtype=dtype)


def _empty_in_order(call, dtype, order):
    """``(out, view)``: a new output shaped like the *unstaged* input whose memory is laid out in
    ``order`` (:func:`_staged`), and ``view``, the same memory shaped like the staged call (C-contiguous),
    which the kernel writes. ``out`` is not a view, unlike ``view`` permuted back: a Function output (or
    gradient) that is a view could not be modified in place (``loss.mul_(2)`` on a 'none' loss of
    channels_last tensors). Without a permutation both are one tensor."""
    if order is None:
        out = _empty(call, dtype)
        return out, out
    torch, shape = call.xp, call.shape  # (the staged shape: the input's shape permuted by order)
    strides = [1] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]
    orig_shape, orig_strides = [0] * len(shape), [0] * len(shape)
    for k, d in enumerate(order):
        orig_shape[d], orig_strides[d] = shape[k], strides[k]
    out = torch.empty_strided(orig_shape, orig_strides, dtype=dtype, device=call.input.device)
    _hugepages.advise_tensor(out)
    return out, out.permute(order)


def _contiguous_as(a, dtype):
    """``a.to(dtype).contiguous()`` for a CPU tensor, the copy (if one is needed) with huge pages."""
    if a.dtype == dtype and a.is_contiguous():
        return a
    out = a.new_empty(a.shape, dtype=dtype)
    _hugepages.advise_tensor(out)
    return out.copy_(a)


def _takes_tensors(kernel) -> bool:
    """The Triton kernels take torch tensors; the native CPU kernel takes NumPy arrays for its weights, and
    NumPy arrays or contiguous CPU tensors (read through ``data_ptr()``, of any shape) for the rest."""
    return kernel.__name__.endswith("triton")


def _kernel_args(call, kernel):
    """Flat views of x, y and the (array, inner) form of the weights, in what ``kernel`` takes."""
    torch_kernel = _takes_tensors(kernel)
    w, w_inner = _weight_pattern(call.weight, call)
    p, p_inner = _weight_pattern(call.pos_weight, call)
    if torch_kernel:
        flat = [a.reshape(-1) for a in (call.input, call.target)]
        w, p = (None if a is None else a.contiguous() for a in (w, p))
    else:
        # Contiguous CPU tensors (see _staged) go to the native kernel as they are: a NumPy view and its
        # address would cost ~5 us per array, as much as the kernel on a small input.
        xy = (call.input, call.target)
        flat = xy if call.is_torch else [np.ascontiguousarray(a).reshape(-1) for a in xy]
        w, p = (_as_kernel_array(a, call.is_torch) for a in (w, p))
    return (*flat, w, w_inner, p, p_inner)


def _weight_pattern(w, call):
    """:func:`flat_pattern` of a weight; one whose broadcast is not periodic in the flat input (shape
    (N, 1, W) on an (N, C, W) input) is expanded to the input's shape and read as a full weight (one
    copy). Only the CPU kernel meets those: the Triton route takes periodic weights only (_choose)."""
    got = flat_pattern(w, call.shape)
    return got if got is not None else (call.xp.broadcast_to(w, call.shape).reshape(-1), 1)


def _denominator(call, count, wsum):
    r = call.reduction
    if r == "mean":
        return count
    if r == "weighted_mean":
        return wsum
    return 1


def _divide(call, total, denom):
    """total / denom with the empty-set rules: mean of nothing is NaN (torch), unless elements were
    ignored (then 0, with a zero gradient); a zero weight sum gives 0."""
    nan_if_empty = call.reduction == "mean" and call.options.ignore_index is None
    if isinstance(denom, (int, float)):
        if denom == 0:
            return math.nan if nan_if_empty else 0.0
        return total / denom
    denom = denom.to(call.xp.float64) if call.is_torch else np.float64(denom)
    safe = call.xp.where(denom == 0, 1.0, denom)
    q = total / safe
    return q if nan_if_empty else call.xp.where(denom == 0, 0.0, q)


def _to_out(call, value):
    """A python float or array/tensor of loss into the output's dtype and kind."""
    if call.is_torch:
        torch = call.xp
        if isinstance(value, torch.Tensor):
            return value.to(call.out_dtype)
        try:
            return torch.scalar_tensor(value, dtype=call.out_dtype, device=call.input.device)
        except RuntimeError:  # a float64 total beyond the dtype's range: inf, as torch's own sum gives
            wide = torch.scalar_tensor(value, dtype=torch.float64, device=call.input.device)
            return wide.to(call.out_dtype)
    with np.errstate(over="ignore"):  # float16 results overflow to inf, silently as in torch
        return np.asarray(value).astype(call.out_dtype, copy=False)


def forward(call, want_grad: bool = False) -> Forward:
    """The loss (and, fused into the same pass, the gradient of the reduced loss) for ``call``."""
    kernel = choose(call)
    if kernel is None:
        return _plain_forward(call, want_grad)
    try:
        fwd = _kernel_forward(call, kernel, want_grad)
    except Exception as exc:
        if _kernel_failed(kernel, exc):
            return _plain_forward(call, want_grad)
        raise
    shift = _weight_shift(fwd.mean_weight, call.compute_dtype)
    if shift:
        # 'weighted_mean' does not change when every weight is scaled alike: weights far from 1 are scaled
        # by a power of two (exactly) and the pass is run again, so that their products with the loss and
        # the gradient's 1 / weight sum stay in the dtype's range (float32 weights of 1e-39 gave an
        # infinite gradient, 1e-30 a loss 3e-3 off, 1e37 an infinite loss).
        w = call.weight
        scaled = w.double() if call.is_torch else w.astype(np.float64)
        for part in (shift // 2, shift - shift // 2):  # (2**shift alone may be beyond float64's range)
            scaled = scaled * 2.0**part
        scaled = scaled.to(w.dtype) if call.is_torch else scaled.astype(w.dtype)
        return _kernel_forward(
            call.with_arrays(call.input, call.target, scaled, call.pos_weight), kernel, want_grad
        )
    return fwd


def _weight_shift(mean_weight, dtype) -> int:
    """The power of two that brings a 'weighted_mean' call's mean weight near 1, when it is far from 1 for
    ``dtype`` (beyond 2**+-60 in float32, 2**+-500 in float64), else 0."""
    if not mean_weight or not math.isfinite(mean_weight):
        return 0
    limit = 500 if dtype.itemsize == 8 else 60  # (a torch or a NumPy dtype)
    e = math.frexp(mean_weight)[1]
    return -e if abs(e) > limit else 0


def _kernel_forward(call, kernel, want_grad: bool) -> Forward:
    if (
        call.simple
        and call.reduction != "none"
        and kernel is _modules.get("cpu")
        and call.input.is_contiguous()
        and call.target.is_contiguous()
    ):
        return _simple_cpu_forward(call, kernel, want_grad)
    call, order = (_triton_staged(call), None) if _takes_tensors(kernel) else _staged(call)
    n = math.prod(call.shape)
    elementwise = call.reduction == "none"
    loss_out, loss_k = _empty_in_order(call, call.compute_dtype, order) if elementwise else (None, None)
    grad_out, grad_k = _empty_in_order(call, call.compute_dtype, order) if want_grad else (None, None)
    # The denominator of 'mean' is known before the pass unless elements may be ignored.
    known = call.reduction == "mean" and call.options.ignore_index is None
    scale = 1.0 / n if known else 1.0
    total, count, wsum = kernel.forward(
        *_kernel_args(call, kernel),
        **_options_kw(call),
        loss_out=None if loss_k is None else _flat_view(loss_k, call, kernel),
        grad_out=None if grad_k is None else _flat_view(grad_k, call, kernel),
        grad_scale=scale,
        weight_sum=call.reduction == "weighted_mean",
    )
    if elementwise:
        return Forward(_to_out(call, loss_out), grad_out, 1.0)
    denom = _denominator(call, count, wsum)
    value = _divide(call, total, denom)
    pending = 1.0 if known or call.reduction == "sum" else _divide(call, 1.0, denom)
    mean_weight = (
        wsum / count if call.reduction == "weighted_mean" and call.weight is not None and count else None
    )
    return Forward(_to_out(call, value), grad_out, pending, mean_weight)


def _simple_cpu_forward(call, cpu, want_grad: bool) -> Forward:
    """:func:`_kernel_forward` of a :func:`~bcelogits._args.simple_call` on contiguous CPU tensors, the
    most common call ('mean' or 'sum'): nothing to stage, no weights or options, so the denominator is
    known before the pass. The same kernel call and the same arithmetic on its result, so the same bits.
    With simple_call, a no-grad call on a 64x10 input costs 0.035 ms instead of 0.09 ms
    (benchmarks/small_calls.py)."""
    n = call.input.numel()
    grad_out = _empty(call, call.compute_dtype) if want_grad else None
    denom = _denominator(call, n, n)
    total = cpu.forward_contiguous(call.input, call.target, grad_out, 1.0 / denom)
    return Forward(_to_out(call, _divide(call, total, denom)), grad_out, 1.0)


def _flat_view(out, call, kernel):
    return out if call.is_torch and not _takes_tensors(kernel) else out.reshape(-1)


def _compute_inputs(call):
    if call.is_torch:
        return call.input.to(call.compute_dtype), call.target.to(call.compute_dtype)
    return call.input.astype(call.compute_dtype, copy=False), call.target.astype(
        call.compute_dtype, copy=False
    )


def _plain_forward(call, want_grad: bool) -> Forward:
    xp = call.xp
    x, y = _compute_inputs(call)
    with _quiet(call):
        loss, g, _ = _math.evaluate(
            xp, x, y, call.weight, call.pos_weight, **_options_kw(call), want_grad=want_grad
        )
    if call.reduction == "none":
        loss = _torch_layout(call, loss, call.out_dtype, call.target)
        return Forward(_to_out(call, loss), _torch_grad_layout(call, g), 1.0)
    denom = _plain_denominator(call)
    value = _divide(call, loss.sum(dtype=xp.float64), denom)
    if g is not None and call.reduction != "sum":
        scale = _divide(call, 1.0, denom)
        g = g * (scale if isinstance(scale, float) else scale.to(g.dtype) if call.is_torch else scale)
    return Forward(_to_out(call, value), _torch_grad_layout(call, g), 1.0)


def _torch_layout(call, a, dtype, *like):
    """``a`` (a result of the plain path's operators, which follow the logits' layout) in ``dtype`` and
    laid out as torch's own elementwise operator on the tensors ``like`` lays out its output (TensorIterator's
    rule, as torch._prims_common states it): a copy only where the layouts differ. torch's 'none' loss has
    the target's layout (it starts from ``1 - target``); its gradient that of ``input.sigmoid()``, or of
    ``pos_weight * target`` with a pos_weight. Only for ordinary tensors: under a torch.func transform or
    jit tracing strides are not the user's to see."""
    if a is None or not call.is_torch:
        return a
    torch = call.xp
    if torch.jit.is_tracing() or not all(plain_tensor(t, torch) for t in (a, *like)):
        return a
    if a.is_contiguous() and all(t.is_contiguous() for t in like):
        return a
    from torch._prims_common import compute_elementwise_output_strides

    strides = compute_elementwise_output_strides(*(t.expand(call.shape) for t in like))
    if tuple(strides) == a.stride():
        return a
    return torch.empty_strided(call.shape, strides, dtype=dtype, device=a.device).copy_(a)


def _torch_grad_layout(call, g):
    """The gradient ``g`` of the plain path in the layout of torch's (:func:`_torch_layout`)."""
    if g is None or call.pos_weight is None:
        return _torch_layout(call, g, None if g is None else g.dtype, call.input)
    return _torch_layout(call, g, g.dtype, call.pos_weight, call.target)


def backward_none(call, go):
    """``go * d loss_i / d x_i`` for the 'none' reduction, in the compute dtype."""
    kernel = choose(call)
    if kernel is not None:
        try:
            return _kernel_backward_none(call, kernel, go)
        except Exception as exc:
            if not _kernel_failed(kernel, exc):
                raise
    x, y = _compute_inputs(call)
    with _quiet(call):
        _, g, _ = _math.evaluate(
            call.xp, x, y, call.weight, call.pos_weight, **_options_kw(call), want_loss=False, want_grad=True
        )
    return _torch_grad_layout(call, g * go.to(g.dtype)) if call.is_torch else g * go


def _kernel_backward_none(call, kernel, go):
    call, order = (_triton_staged(call), None) if _takes_tensors(kernel) else _staged(call)
    if order is not None:
        go = go.permute(order)
    grad, grad_k = _empty_in_order(call, call.compute_dtype, order)
    if call.is_torch and not _takes_tensors(kernel) and all(s == 0 for s in go.stride()):
        # A broadcast upstream gradient (loss.sum().backward() expands one value): the pass that scales the
        # gradient by a number (as for reduction='sum'), with no input-sized copy of grad_output. The
        # same product grad_output * d loss_i / d x_i in the compute dtype, so the same bits.
        kernel.forward(
            *_kernel_args(call, kernel),
            **_options_kw(call),
            loss_out=None,
            grad_out=_flat_view(grad_k, call, kernel),
            grad_scale=float(go.reshape(-1)[0].to(call.compute_dtype)),
            weight_sum=False,
        )
        return grad
    go_flat = go.to(call.compute_dtype).contiguous() if call.is_torch else go.astype(call.compute_dtype)
    kernel.backward_none(
        *_kernel_args(call, kernel),
        _flat_view(go_flat, call, kernel),
        _flat_view(grad_k, call, kernel),
        **_options_kw(call),
    )
    return grad


def _plain_denominator(call):
    """The reduction's denominator computed from the arrays (what the kernels return as count / wsum):
    the number of kept elements for 'mean', their broadcast weight sum for 'weighted_mean'."""
    if call.reduction in ("sum", "none"):
        return 1
    xp = call.xp
    ii = call.options.ignore_index
    keep = None if ii is None else call.target != ii
    if call.reduction == "mean":
        return math.prod(call.shape) if keep is None else keep.sum()
    wb = xp.ones_like(call.input, dtype=call.compute_dtype)
    wb = wb if call.weight is None else wb * call.weight
    return (wb if keep is None else xp.where(keep, wb, 0.0)).sum(dtype=xp.float64)


def reduced_scale(call):
    """d(reduced loss)/d(elementwise loss) for reductions other than 'none' (plain, differentiable)."""
    return _divide(call, 1.0, _plain_denominator(call))


@contextlib.contextmanager
def _quiet(call):
    """NumPy warns on the masked-out branches of ``where`` (log(0), inf*0); their values are never used."""
    if call.is_torch:
        yield
    else:
        with np.errstate(all="ignore"):
            yield
