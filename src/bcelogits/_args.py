"""Every rule about arguments, in one place: reductions, legacy arguments, types, dtypes, shapes,
broadcasting, options, and the text of every error.

The functional API calls :func:`parse` once; everything after it may assume a valid :class:`Call`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

REDUCTIONS = ("none", "mean", "sum", "weighted_mean")
FUNCTION = "binary_cross_entropy_with_logits"


class ArgumentTypeError(TypeError, AttributeError):
    """An argument is not an array of a supported kind (torch raises AttributeError or TypeError here)."""


class LayoutError(TypeError, NotImplementedError):
    """A sparse (or other non-strided) tensor: the loss is defined for dense tensors only (torch raises
    NotImplementedError from deep inside an operator here)."""


class DTypeError(TypeError, NotImplementedError):
    """An input or target of a dtype the loss is not defined for (torch raises RuntimeError /
    NotImplementedError here; this class is both a TypeError and a RuntimeError)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_NN_MODULE = os.path.join("torch", "nn", "modules", "module.py")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame outside bcelogits and outside
    ``nn.Module.__call__``, however deep the call came from (functional, module, ``loss_and_grad``)."""
    torch = _torch()
    if torch is not None and torch.compiler.is_compiling():
        return  # torch.compile cannot trace warnings.warn; the eager call warns (README)
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename.endswith(_NN_MODULE)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# --------------------------------------------------------------------------------------------- reduction
def legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """Map the deprecated ``size_average``/``reduce`` pair to a reduction string, warning as torch does."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        ret = "none"
    elif size_average:
        ret = "mean"
    else:
        ret = "sum"
    warn(f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.")
    return ret


def resolve_reduction(size_average, reduce, reduction) -> str:
    """The reduction a call uses: the legacy pair overrides ``reduction`` when either is given."""
    if size_average is not None or reduce is not None:
        return legacy_reduction(size_average, reduce)
    return check_reduction(reduction)


def check_reduction(reduction) -> str:
    if reduction == "elementwise_mean":
        warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
        return "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    """The keyword-only options beyond torch's arguments; defaults reproduce torch exactly.

    ``ignore_index``: an element is ignored where ``target == ignore_index`` holds as torch (NumPy for
    NumPy arrays) evaluates it, i.e. with the value rounded to the target's dtype first: a bfloat16
    target padded with -999 holds -1000, and ``ignore_index=-999`` ignores it. :func:`parse` rounds the
    value once per call (:func:`ignore_value`), so every route compares the same numbers."""

    ignore_index: float | None = None
    label_smoothing: float = 0.0
    class_dim: int | None = None
    focal_gamma: float = 0.0
    strict: bool = False

    def non_default(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v != getattr(Options, k)}


def check_options(ignore_index=None, label_smoothing=0.0, class_dim=None, focal_gamma=0.0, strict=False):
    """Validate the keyword options; returns an :class:`Options`."""
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, float, np.number)):
            raise TypeError(f"ignore_index must be a number or None, got {type(ignore_index).__name__}")
        if float(ignore_index) != float(ignore_index):  # NaN (not math.isnan: see focal_gamma below)
            raise ValueError("ignore_index must not be NaN (NaN never equals a target); pass a finite number")
        ignore_index = float(ignore_index)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.number)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if class_dim is not None and (
        isinstance(class_dim, bool) or not isinstance(class_dim, (int, np.integer))
    ):
        raise TypeError(f"class_dim must be an int or None, got {type(class_dim).__name__}")
    if isinstance(focal_gamma, bool) or not isinstance(focal_gamma, (int, float, np.number)):
        raise TypeError(f"focal_gamma must be a float >= 0, got {type(focal_gamma).__name__}")
    if not 0.0 <= float(focal_gamma) < math.inf:  # (NaN fails too; no math.isfinite: torch.compile with
        # dynamic=True cannot trace it)
        raise ValueError(f"focal_gamma must be a finite number >= 0, got {focal_gamma}")
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(f"strict must be True or False, got {type(strict).__name__}")
    return Options(
        ignore_index,
        float(label_smoothing),
        None if class_dim is None else int(class_dim),
        float(focal_gamma),
        bool(strict),
    )


# (significand bits including the implicit one, smallest and largest normal exponent) of the float
# formats a Python float may be rounded to
_FLOAT32 = (24, -126, 127)
_TORCH_16BIT = {"float16": (11, -14, 15), "bfloat16": (8, -126, 127)}


def _round_float(v: float, fmt: tuple) -> float:
    """``v`` rounded to nearest-even in the binary format ``fmt`` (overflow to +-inf), in plain Python
    arithmetic (exact: math.frexp / ldexp and round() on values below 2**53), which torch.compile traces
    as constants where a torch.tensor(v, dtype=...) would be an operation in the graph."""
    bits, emin, emax = fmt
    if v == 0.0 or v != v or v in (math.inf, -math.inf):
        return v
    e = math.frexp(v)[1]  # v = m * 2**e, 0.5 <= |m| < 1: the leading bit is 2**(e - 1)
    quantum = max(e, emin + 1) - bits  # the format's ulp at v (fixed in the subnormal range)
    r = math.ldexp(round(math.ldexp(v, -quantum)), quantum)  # (round: half to even)
    largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - bits), emax)
    return r if abs(r) <= largest else math.copysign(math.inf, v)


def ignore_value(xp, value: float, target_dtype) -> float:
    """``ignore_index`` as ``target == value`` compares it: rounded to the target's dtype. torch casts the
    Python float to float32 and then to a 16-bit dtype (two roundings, as ``torch.tensor(v,
    dtype=torch.bfloat16)``); NumPy rounds once, to the dtype. The result is a number of the target's
    dtype, so comparing it with the target in any wider dtype (the kernels' compute dtype) matches the
    same elements."""
    if xp is np:
        if target_dtype.itemsize >= 8:  # (float64, long double: a Python float converts exactly)
            return value
        with np.errstate(over="ignore"):  # (beyond float16's range: inf, as NumPy's comparison has it)
            return float(target_dtype.type(value))
    if target_dtype is xp.float64:
        return value
    v = _round_float(value, _FLOAT32)
    fmt = _TORCH_16BIT.get(str(target_dtype).rpartition(".")[2])
    return v if fmt is None else _round_float(v, fmt)


# --------------------------------------------------------------------------------------------- arrays
def _torch():
    """torch if it is already imported (we never import it just to check a type)."""
    return sys.modules.get("torch")


def is_tensor(a) -> bool:
    t = _torch()
    return t is not None and isinstance(a, t.Tensor)


def namespace(input, target, weight=None, pos_weight=None):
    """The array namespace of a call (``torch`` or ``numpy``); rejects lists and mixtures."""
    for name, a in (("input", input), ("target", target)):
        if not (is_tensor(a) or isinstance(a, np.ndarray)):
            raise ArgumentTypeError(
                f"{FUNCTION}(): argument '{name}' must be a torch.Tensor or numpy.ndarray, got "
                f"{type(a).__name__}; wrap it with torch.as_tensor(...) or numpy.asarray(...)"
            )
    for name, a in (("weight", weight), ("pos_weight", pos_weight)):
        if a is not None and not (is_tensor(a) or isinstance(a, np.ndarray)):
            raise ArgumentTypeError(
                f"{FUNCTION}(): argument '{name}' must be a Tensor or None, got {type(a).__name__}; "
                f"pass torch.tensor({name}) (or numpy.asarray for NumPy inputs)"
            )
    ma = sys.modules.get("numpy.ma")  # (no masked array exists unless numpy.ma was imported; `np.ma` would
    # import it, 8 ms)
    for name, a in (("input", input), ("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        if ma is not None and isinstance(a, ma.MaskedArray):
            raise ArgumentTypeError(
                f"{FUNCTION}(): '{name}' is a numpy masked array, and its mask would be ignored; pass "
                f"{name}.filled(...) or {name}.data, and leave the masked elements out with weight= (0 where "
                "masked) or ignore_index="
            )
    kinds = {is_tensor(a) for a in (input, target, weight, pos_weight) if a is not None}
    if len(kinds) > 1:
        raise ArgumentTypeError(
            f"{FUNCTION}(): input, target, weight and pos_weight must all be torch tensors or all numpy "
            "arrays; convert with torch.from_numpy(...) or tensor.numpy()"
        )
    return _torch() if is_tensor(input) else np


def _is_float(a) -> bool:
    if is_tensor(a):
        return a.is_floating_point()
    return np.issubdtype(a.dtype, np.floating)


def _is_real(a) -> bool:
    if is_tensor(a):
        return not a.is_complex()
    return (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)) or (
        a.dtype == np.bool_
    )


def functorch_wrapped(torch, t) -> bool:
    """Is ``t`` a tensor of a torch.func transform (vmap, grad, jvp) rather than an ordinary tensor?"""
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_functorch_wrapped_tensor(t)


def _vmapped(torch, t) -> bool:
    """Is ``t`` batched by a torch.func.vmap, at any level of its functorch wrappers (vmap of grad wraps
    a batched tensor in a gradient-tracking one)?"""
    functorch = getattr(torch._C, "_functorch", None)
    while functorch is not None and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _shape_str(a) -> str:
    return f"torch.Size({list(a.shape)})" if is_tensor(a) else str(tuple(a.shape))


# --------------------------------------------------------------------------------------------- the call
@dataclass
class Call:
    """A validated call: arrays in place, dtypes decided, weights shaped for broadcasting."""

    xp: Any  # torch or numpy
    input: Any  # as given (autocast applied)
    target: Any
    weight: Any  # None or array broadcastable to input.shape without enlarging it
    pos_weight: Any
    reduction: str
    options: Options
    compute_dtype: Any  # float32 or float64 (torch.dtype or numpy.dtype)
    out_dtype: Any  # dtype of the loss: the target's (float32 under autocast for 16-bit)
    # Made by simple_call: torch tensors of one float32/float64 dtype and shape, no weights, no options.
    simple: bool = False

    @property
    def is_torch(self) -> bool:
        return self.xp is not np

    @property
    def shape(self) -> tuple:
        return tuple(self.input.shape)

    def with_arrays(self, input, target, weight, pos_weight) -> Call:
        """The same call on other arrays (a shallow copy: dataclasses.replace costs more per call)."""
        c = object.__new__(Call)
        c.__dict__.update(self.__dict__)
        c.input, c.target, c.weight, c.pos_weight = input, target, weight, pos_weight
        return c


def _autocast_on(torch, device_type: str) -> bool:
    """Is autocast enabled for this device type? (False for types autocast does not know, e.g. 'meta',
    where torch.is_autocast_enabled raises.)"""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def compute_dtype(xp, input_dtype, target_dtype):
    """The dtype the math runs in: the promoted dtype of input and target, but at least float32
    (16-bit inputs are computed in float32 and rounded once)."""
    if xp is np:
        d = np.result_type(input_dtype, target_dtype)
        return d if d.itemsize >= 4 else np.dtype(np.float32)
    d = xp.promote_types(input_dtype, target_dtype)
    return d if d.itemsize >= 4 else xp.float32


def _broadcast_shape(w_shape: tuple, shape: tuple) -> tuple:
    """NumPy's broadcast of two shapes (ValueError if they do not broadcast), for sizes that may be
    symbolic: under torch.export / torch.compile with dynamic shapes a size is a ``SymInt``, which NumPy
    would turn into a constant (``int(size)`` specialises the program to the example's batch), so those
    go through torch's own rule (``torch.broadcast_shapes``), which keeps them symbolic."""
    if all(type(d) is int for d in w_shape + shape):  # (eager calls: NumPy's check is the cheapest)
        return np.broadcast_shapes(w_shape, shape)
    try:
        return tuple(_torch().broadcast_shapes(w_shape, shape))
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def _broadcast_check(name: str, w, shape: tuple, fix: str) -> None:
    try:
        b = _broadcast_shape(tuple(w.shape), shape)
    except ValueError:
        raise RuntimeError(
            f"{FUNCTION}(): {name} of shape {tuple(w.shape)} cannot be broadcast to the input's shape "
            f"{shape}: each of its trailing dimensions must equal the input's or be 1. {fix}"
        ) from None
    if b != shape:
        raise RuntimeError(
            f"{FUNCTION}(): {name} of shape {tuple(w.shape)} would enlarge the loss beyond the input's "
            f"shape {shape} (broadcast shape {b}); a weight may only broadcast to the input. {fix}"
        )


def _cpu_scalar(a) -> bool:
    return a.ndim == 0 and a.device.type == "cpu"


def _on_one_device(input, target, weight, pos_weight):
    """torch's same-device rule: every tensor on the device of the first one that is not a 0-dim CPU
    tensor (the input's, unless it is one), 0-dim CPU tensors allowed anywhere (torch reads them as
    scalars: ``pos_weight=torch.tensor(3.0)`` with CUDA logits). Those are moved to that device here,
    so that no kernel is ever handed a CPU pointer with device tensors (a non-blocking copy of one
    element: the host value is staged at once, nothing waits for the device)."""
    device = input.device
    if target.device == device and all(a is None or a.device == device for a in (weight, pos_weight)):
        return input, target, weight, pos_weight  # (the common case, checked first: 0.3 us, not 2)
    named = (("input", input), ("target", target), ("weight", weight), ("pos_weight", pos_weight))
    ref_name, ref = next(((n, a) for n, a in named if a is not None and not _cpu_scalar(a)), named[0])
    device = ref.device
    for name, a in named:
        if a is not None and a.device != device and not _cpu_scalar(a):
            raise RuntimeError(
                f"{FUNCTION}(): '{name}' is on {a.device} but {ref_name} is on {device}; "
                f"move it with {name}.to({ref_name}.device)"
            )
    if device.type == "cpu":
        return input, target, weight, pos_weight
    return tuple(a if a is None or a.device == device else a.to(device, non_blocking=True) for _, a in named)


def parse(input, target, weight, pos_weight, reduction: str, options: Options) -> Call:
    """Check every argument once and return the :class:`Call` the kernels run."""
    xp = namespace(input, target, weight, pos_weight)
    torch = xp if xp is not np else None

    if not _is_float(input):
        fix = "input.float()" if torch is not None else "input.astype(numpy.float32)"
        raise DTypeError(
            f"{FUNCTION}(): 'input' must hold floating-point logits, got dtype {input.dtype}; "
            f"convert with {fix}"
        )
    if not _is_float(target):
        fix = "target.astype(input.dtype)" if torch is None else "target.float() (or target.to(input.dtype))"
        raise DTypeError(
            f"{FUNCTION}(): 'target' must be floating-point (probabilities in [0, 1]), got dtype "
            f"{target.dtype}; convert with {fix}"
        )
    if torch is not None:
        for name, a in (("input", input), ("target", target)):
            if a.dtype.itemsize == 1:  # (the floating dtypes of one byte: float8_*, float4_e2m1fn_x2)
                raise DTypeError(
                    f"{FUNCTION}(): '{name}' has dtype {a.dtype}, a storage format the loss is not defined "
                    f"for (torch raises NotImplementedError too); convert with {name}.float() (or "
                    f"{name}.to(torch.bfloat16))"
                )
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"Target size ({_shape_str(target)}) must be the same as input size ({_shape_str(input)})"
        )
    shape = tuple(input.shape)
    if torch is not None:
        input, target, weight, pos_weight = _on_one_device(input, target, weight, pos_weight)

    # dtypes: the loss has the target's dtype; 16-bit math is done in float32 and rounded once.
    user_target_dtype = target.dtype  # (before autocast's cast: ignore_index compares in this dtype)
    if torch is not None:
        for name, a in (("input", input), ("target", target), ("weight", weight), ("pos_weight", pos_weight)):
            if a is not None and a.layout is not torch.strided:
                raise LayoutError(
                    f"{FUNCTION}(): '{name}' must be a dense tensor, got layout {a.layout}; "
                    f"convert it with {name}.to_dense()"
                )
        if _autocast_on(torch, input.device.type):  # torch runs this loss in float32 under autocast
            low = (torch.float16, torch.bfloat16)
            input = input.float() if input.dtype in low else input
            target = target.float() if target.dtype in low else target
    compute = compute_dtype(xp, input.dtype, target.dtype)
    out_dtype = target.dtype
    if options.ignore_index is not None:
        value = ignore_value(xp, options.ignore_index, user_target_dtype)
        if value != options.ignore_index:
            options = Options(value, options.label_smoothing, options.class_dim, options.focal_gamma,
                              options.strict)  # fmt: skip

    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is None:
            continue
        if not _is_real(w):
            raise DTypeError(f"{FUNCTION}(): '{name}' must be real-valued, got dtype {w.dtype}")
        if torch is not None:
            if w.requires_grad and torch.is_grad_enabled() and not functorch_wrapped(torch, w):
                # (as torch: fine under no_grad, and under torch.func.grad / jacrev with respect to it)
                raise RuntimeError(
                    f"The function '{FUNCTION}' is not differentiable with respect to argument '{name}'. "
                    f"This input cannot have requires_grad True; pass {name}.detach()"
                )

    if pos_weight is not None and options.class_dim is not None:
        pos_weight = _along_class_dim(pos_weight, shape, options.class_dim)
    if weight is not None:
        _broadcast_check("weight", weight, shape, "For per-class weights use shape (C,) for the last dim.")
    if pos_weight is not None:
        _broadcast_check(
            "pos_weight",
            pos_weight,
            shape,
            "For a class dimension that is not the last, pass class_dim=<dim> (e.g. class_dim=1 for NCHW).",
        )

    if weight is not None and pos_weight is not None and _weight_products_leave_float32(xp, compute, weight,
                                                                                         pos_weight):
        compute = np.dtype(np.float64) if xp is np else xp.float64  # (the loss keeps out_dtype)

    def cast(w):
        if w is None:
            return None
        return w.to(compute) if torch is not None else w.astype(compute, copy=False)

    return Call(xp, input, target, cast(weight), cast(pos_weight), reduction, options, compute, out_dtype)


#: Products ``weight * pos_weight`` beyond ``2**+-100`` are computed in float64 (see below).
WEIGHT_PRODUCT_RANGE_LOG2 = 100


def _weight_products_leave_float32(xp, compute, weight, pos_weight) -> bool:
    """Does a float32 call with both weights need float64 arithmetic? The positive term's coefficient is
    ``weight * pos_weight * y``: with ``weight = pos_weight = 1e30`` it overflows float32 (the exact loss of
    x = 700, y = 0.5 is 3.5e32; in float32 the coefficient is inf and the small side inf * 0 = NaN), and
    with ``1e-30`` it underflows (x = -inf, y = 1: the exact loss is +inf, the float32 coefficient 0 gave
    0). When the largest (smallest nonzero) magnitudes of the two weights multiply to more (less) than
    ``2**+-WEIGHT_PRODUCT_RANGE_LOG2``, the call is computed in float64, whose range holds every product
    of float32 numbers, and the loss rounded once to its dtype. A bound from the weights alone, cheap: it
    never looks at the input. Not decided while torch traces or transforms the call (the bound reads
    values): there the float32 range is assumed."""
    if compute.itemsize != 4:
        return False
    if xp is np:
        wa, pa = np.abs(weight), np.abs(pos_weight)
        if wa.size == 0 or pa.size == 0:
            return False
        big = float(wa.max()) * float(pa.max())
        small = float(np.min(wa, initial=math.inf, where=wa > 0)) * float(np.min(pa, initial=math.inf,
                                                                               where=pa > 0))
    else:
        torch = xp
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        if any(t.device.type == "meta" or functorch_wrapped(torch, t) for t in (weight, pos_weight)):
            return False
        if weight.numel() == 0 or pos_weight.numel() == 0:
            return False
        wa, pa = weight.detach().abs(), pos_weight.detach().abs()
        inf = math.inf
        stats = torch.stack([
            wa.amax().double(), pa.amax().double(),
            torch.where(wa > 0, wa, inf).amin().double(), torch.where(pa > 0, pa, inf).amin().double(),
        ]).tolist()  # fmt: skip
        big, small = stats[0] * stats[1], stats[2] * stats[3]
    return big > 2.0**WEIGHT_PRODUCT_RANGE_LOG2 or small < 2.0**-WEIGHT_PRODUCT_RANGE_LOG2


_DEFAULTS = Options()


def simple_call(
    input, target, weight, size_average, reduce, reduction, pos_weight,
    ignore_index, label_smoothing, class_dim, focal_gamma, strict,
) -> Call | None:  # fmt: skip
    """The :class:`Call` of the most common call, or None: ``input`` and ``target`` torch tensors (not
    subclasses) of one shape, dtype and device, float32 or float64, dense; no weight, pos_weight or legacy
    argument; reduction 'mean', 'sum' or 'none'; every option at its default (exactly: ``0.0``, not ``0``).
    For such a call :func:`parse` checks nothing that can fail and changes nothing (autocast only casts
    16-bit tensors), so this builds its result without it (the option checks and parse took about a
    quarter of a small call's time). Anything else returns None and goes through
    :func:`check_options` and :func:`parse`."""
    torch = _torch()
    if (
        torch is None
        or type(input) is not torch.Tensor
        or type(target) is not torch.Tensor
        or weight is not None
        or pos_weight is not None
        or size_average is not None
        or reduce is not None
        or not (reduction == "mean" or reduction == "sum" or reduction == "none")
        or ignore_index is not None
        or class_dim is not None
        or strict is not False
        or type(label_smoothing) is not float
        or label_smoothing != 0.0
        or type(focal_gamma) is not float
        or focal_gamma != 0.0
    ):
        return None
    dt = input.dtype
    if (
        target.dtype is not dt
        or not (dt is torch.float32 or dt is torch.float64)
        or input.layout is not torch.strided
        or target.layout is not torch.strided
        or input.shape != target.shape
        or input.device != target.device
    ):
        return None
    return Call(torch, input, target, None, None, str(reduction), _DEFAULTS, dt, dt, True)


def _along_class_dim(p, shape: tuple, class_dim: int):
    nd = len(shape)
    if not -nd <= class_dim < nd:
        raise ValueError(f"class_dim={class_dim} is out of range for an input with {nd} dimensions")
    d = class_dim % nd
    if p.ndim != 1:
        raise ValueError(
            f"with class_dim set, pos_weight must be 1-D (one weight per class), got shape {tuple(p.shape)}"
        )
    if p.shape[0] != shape[d]:
        raise ValueError(
            f"pos_weight has {p.shape[0]} entries but input dimension class_dim={class_dim} has size "
            f"{shape[d]}; they must be equal"
        )
    return p.reshape((p.shape[0],) + (1,) * (nd - d - 1))


# --------------------------------------------------------------------------------------------- strict
def check_values(call: Call) -> None:
    """``strict=True``: reject targets outside [0, 1] or not finite (ignored ones excepted) and negative
    weights; warn when every logit lies in [0, 1] (probabilities passed where logits belong).
    Costs a few passes over the data, which is why it is opt-in. Under torch.compile, and under
    torch.func.vmap (which cannot branch on a batched value), a check that depends on the data is not
    possible: both raise a RuntimeError saying where strict mode works (eagerly, on unbatched tensors).
    (torch.func.grad / jacrev / jvp alone are fine: their values can be read.)"""
    xp = call.xp
    if call.is_torch and xp.compiler.is_compiling():
        raise RuntimeError(
            "strict=True checks the values of target, weight and input, which torch.compile cannot trace; "
            "check a batch in eager mode (outside the compiled function) with strict=True, and pass "
            "strict=False inside it"
        )
    if call.is_torch and any(
        _vmapped(xp, t) for t in (call.input, call.target, call.weight, call.pos_weight) if t is not None
    ):
        raise RuntimeError(
            "strict=True checks the values of target, weight and input, which torch.func.vmap cannot "
            "branch on (a batched tensor has no single value); check them eagerly: call the loss with "
            "strict=True on the unbatched tensors outside vmap, and pass strict=False inside it"
        )
    y = call.target
    bad = ~((y >= 0) & (y <= 1))  # also true for NaN
    if call.options.ignore_index is not None:
        bad = bad & (y != call.options.ignore_index)
    if bool(bad.any()):
        where = xp.nonzero(bad, as_tuple=True) if call.is_torch else np.nonzero(bad)
        idx = tuple(int(i[0]) for i in where)
        raise ValueError(
            f"strict: target has {int(bad.sum())} value(s) outside [0, 1] or not finite (e.g. "
            f"{float(y[idx])} at index {idx}); BCE targets are probabilities. Fix the labels, mask them "
            "with ignore_index=..., or pass strict=False"
        )
    for name, w in (("weight", call.weight), ("pos_weight", call.pos_weight)):
        if w is not None and bool((w < 0).any()):
            raise ValueError(
                f"strict: {name} has negative entries (min {float(w.min())}); a negative weight rewards "
                f"the wrong answer. Use weights >= 0 or pass strict=False"
            )
    x = call.input
    if math.prod(call.shape) and bool(((x >= 0) & (x <= 1)).all()):
        warn(
            "strict: every logit lies in [0, 1], which looks like probabilities (was sigmoid applied "
            "already?). Pass raw logits: the loss applies the sigmoid itself."
        )


# ===================================================================================== linear + BCE
# The rules of bcelogits.linear_binary_cross_entropy_with_logits (src/bcelogits/linear.py): the
# classifier's input, weight and bias, dense or sparse targets, and the chunking arguments. Shape, dtype
# and device rules are checked by parse_linear before anything runs; the rules about values (sparse
# indices, and strict mode) by check_linear_values, in the op itself, before its first matmul.
LINEAR_FUNCTION = "linear_binary_cross_entropy_with_logits"
LINEAR_REDUCTIONS = ("none", "mean", "sum")


class TargetForm:
    """How a linear call's target is given: a dense tensor, or positives in CSR form (torch sparse COO
    and CSR tensors and the light tuple all become row pointers, column indices and values)."""

    DENSE = "dense"
    CSR = "csr"


@dataclass
class LinearCall:
    """A validated linear + BCE call: rows flattened, the target in one of the two :class:`TargetForm`s."""

    input: Any  # (N, D), the features with their leading dimensions flattened
    weight: Any  # (C, D)
    bias: Any  # (C,) or None
    form: str  # TargetForm.DENSE or TargetForm.CSR
    target: Any  # (N, C) dense, or None
    crow: Any  # (N + 1,) int64 row pointers, or None
    col: Any  # (nnz,) int64 column indices, or None
    values: Any  # (nnz,) target values in the compute dtype, or None (every stored entry is 1)
    pos_weight: Any  # (C,) in the compute dtype, or None
    ignore_rows: Any  # (N,) bool mask, True for the rows left out, or None
    reduction: str
    options: Options
    chunk_rows: int  # 0: chosen by the memory rule
    chunk_classes: int  # 0: chosen by the memory rule
    memory_budget: int  # bytes for the per-block buffers; 0: the default rule
    compute_dtype: Any  # float32 or float64: the elementwise part
    out_dtype: Any  # dtype of the loss
    lead_shape: tuple  # input.shape[:-1]: 'none' returns lead_shape + (C,)


def _lin(arg: str) -> str:
    return f"{LINEAR_FUNCTION}(): '{arg}'"


def _linear_int_arg(name: str, v, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 0 or (v == 0 and not allow_zero)):
        raise (TypeError if not isinstance(v, (int, np.integer)) or isinstance(v, bool) else ValueError)(
            f"{_lin(name)} must be a positive int, got {v!r}"
        )
    return int(v)


def check_linear_chunking(chunk_size, memory_budget) -> tuple[int, int, int]:
    """``(rows, classes, budget)`` from ``chunk_size`` (None, classes per block, or a (rows, classes)
    pair) and ``memory_budget`` (None or bytes); 0 means "chosen by the rule"."""
    rows = classes = budget = 0
    if chunk_size is not None:
        if isinstance(chunk_size, (tuple, list)):
            if len(chunk_size) != 2:
                raise ValueError(
                    f"{_lin('chunk_size')} must be an int (classes per block) or a pair (rows, "
                    f"classes), got {chunk_size!r}"
                )
            rows = _linear_int_arg("chunk_size[0]", chunk_size[0])
            classes = _linear_int_arg("chunk_size[1]", chunk_size[1])
        else:
            classes = _linear_int_arg("chunk_size", chunk_size)
    if memory_budget is not None:
        budget = _linear_int_arg("memory_budget", memory_budget)
    return rows, classes, budget


def _linear_tensor(torch, name: str, a, fix: str):
    if not isinstance(a, torch.Tensor):
        raise ArgumentTypeError(f"{_lin(name)} must be a torch.Tensor, got {type(a).__name__}; {fix}")
    return a


def _linear_no_grad(torch, name: str, a) -> None:
    if a is not None and a.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{LINEAR_FUNCTION}() is not differentiable with respect to '{name}' (gradients are computed for "
            f"input, weight and bias only); pass {name}.detach()"
        )


def _linear_index(torch, name: str, a, device):
    if not isinstance(a, torch.Tensor) or a.ndim != 1:
        got = type(a).__name__ if not isinstance(a, torch.Tensor) else f"shape {tuple(a.shape)}"
        raise ArgumentTypeError(f"{_lin(name)} must be a 1-D integer tensor, got {got}")
    if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
        raise DTypeError(f"{_lin(name)} must hold integer indices, got dtype {a.dtype}; use .long()")
    if a.device != device:
        raise RuntimeError(f"{_lin(name)} is on {a.device} but input is on {device}; move it there")
    return a.long()


def parse_linear(
    input, weight, target, bias, pos_weight, reduction, options: Options, ignore_rows, chunking
) -> LinearCall:
    """Check the shapes, dtypes, devices and layouts of a linear + BCE call (nothing that reads values)."""
    torch = _torch()
    if torch is None or not isinstance(input, torch.Tensor):
        raise ArgumentTypeError(
            f"{_lin('input')} must be a torch.Tensor, got {type(input).__name__}; the fused linear "
            "loss is for torch tensors (wrap NumPy data with torch.from_numpy)"
        )
    _linear_tensor(torch, "weight", weight, "pass the classifier's weight (C, D), e.g. linear.weight")
    reduction = check_reduction(reduction)
    if reduction not in LINEAR_REDUCTIONS:
        raise ValueError(
            f"{LINEAR_FUNCTION}(): reduction={reduction!r} is not supported: use 'mean', 'sum' or 'none' "
            "('weighted_mean' needs per-element weights, which this op does not take)"
        )
    for name, a in (("input", input), ("weight", weight), ("bias", bias), ("pos_weight", pos_weight)):
        if a is not None:
            _linear_tensor(torch, name, a, f"pass torch.as_tensor({name})")
            if a.layout is not torch.strided:
                raise LayoutError(
                    f"{_lin(name)} must be a dense tensor, got layout {a.layout}; use {name}.to_dense()"
                )
            if a.device != input.device:
                raise RuntimeError(
                    f"{_lin(name)} is on {a.device} but input is on {input.device}; move it with "
                    f"{name}.to(input.device)"
                )
    if not input.is_floating_point():
        raise DTypeError(
            f"{_lin('input')} must hold floating-point features, got dtype {input.dtype}; convert with "
            "input.float() (integer ids go through an nn.Embedding first)"
        )
    if input.ndim < 1:
        raise ValueError(f"{_lin('input')} must have at least one dimension (..., D), got a 0-d tensor")
    if weight.ndim != 2:
        raise ValueError(
            f"{_lin('weight')} must be 2-D (C, D) as nn.Linear.weight, got shape {tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
        raise DTypeError(
            f"{_lin('weight')} has dtype {weight.dtype} but input has dtype {input.dtype}; the matmul "
            "needs one dtype (as F.linear): convert with weight.to(input.dtype) or input.to(weight.dtype)"
        )
    n_classes, d = weight.shape
    if input.shape[-1] != d:
        raise ValueError(
            f"{LINEAR_FUNCTION}(): input has {input.shape[-1]} features (last dimension of shape "
            f"{tuple(input.shape)}) but weight of shape {tuple(weight.shape)} expects D={d}; weight is (C, D)"
        )
    if bias is not None:
        if tuple(bias.shape) != (n_classes,):
            raise ValueError(
                f"{_lin('bias')} must have shape ({n_classes},) (one per class of weight), got "
                f"{tuple(bias.shape)}"
            )
        if bias.dtype != input.dtype:
            raise DTypeError(
                f"{_lin('bias')} has dtype {bias.dtype} but input has dtype {input.dtype}; convert "
                "with bias.to(input.dtype)"
            )
    lead = tuple(input.shape[:-1])
    n_rows = math.prod(lead)

    # The target: dense (..., C), torch sparse COO / CSR (N, C), or (crow, col[, values]).
    dense = crow = col = values = None
    if isinstance(target, (tuple, list)):
        if len(target) not in (2, 3):
            raise ValueError(
                f"{_lin('target')} as a tuple must be (row_pointers, column_indices) or (row_pointers, "
                f"column_indices, values), got {len(target)} items"
            )
        crow = _linear_index(torch, "target[0] (row pointers)", target[0], input.device)
        col = _linear_index(torch, "target[1] (column indices)", target[1], input.device)
        if crow.shape[0] != n_rows + 1:
            raise ValueError(
                f"{LINEAR_FUNCTION}(): target's row pointers have {crow.shape[0]} entries but input has "
                f"{n_rows} rows; they need N + 1 = {n_rows + 1} (row i's positives are col[ptr[i]:ptr[i+1]])"
            )
        if len(target) == 3:
            values = _linear_tensor(torch, "target[2] (values)", target[2], "pass a 1-D float tensor")
            if values.ndim != 1 or values.shape[0] != col.shape[0]:
                raise ValueError(
                    f"{LINEAR_FUNCTION}(): target's values have shape {tuple(values.shape)} but there are "
                    f"{col.shape[0]} column indices; give one value per index"
                )
            if values.device != input.device:
                raise RuntimeError(
                    f"{_lin('target')} values are on {values.device} but input on {input.device}; move them"
                )
        form, target_dtype = TargetForm.CSR, None if values is None else values.dtype
    else:
        _linear_tensor(torch, "target", target, "pass a dense (N, C), sparse COO/CSR tensor or (crow, col)")
        if target.device != input.device:
            raise RuntimeError(
                f"{_lin('target')} is on {target.device} but input is on {input.device}; move it with "
                "target.to(input.device)"
            )
        if target.layout is torch.strided:
            want = lead + (n_classes,)
            if tuple(target.shape) != want:
                raise ValueError(
                    f"{LINEAR_FUNCTION}(): target of shape {tuple(target.shape)} does not match the logits' "
                    f"shape {want} (input.shape[:-1] + (C,), C = weight.shape[0])"
                )
            dense, form, target_dtype = target.reshape(n_rows, n_classes), TargetForm.DENSE, target.dtype
        elif target.layout in (torch.sparse_coo, torch.sparse_csr):
            if target.ndim != 2 or target.dense_dim() != 0 or tuple(target.shape) != (n_rows, n_classes):
                raise ValueError(
                    f"{LINEAR_FUNCTION}(): a sparse target must be 2-D (N, C) = ({n_rows}, {n_classes}) with "
                    f"scalar values, got shape {tuple(target.shape)}; flatten the rows of input to match"
                )
            # (Copies of the index and value tensors, O(nnz): views into a sparse tensor are not ordinary
            # tensors to torch.compile, which then fails on the frames that receive them.)
            if target.layout is torch.sparse_coo:
                coo = target.coalesce()  # sorted by (row, column), duplicates summed (as to_dense does)
                rows, col = coo.indices()[0].clone(), coo.indices()[1].clone()
                values = coo.values().clone()
                crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=input.device)
                if rows.numel():
                    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows)[:n_rows], 0)
            else:
                crow, col = target.crow_indices().clone().long(), target.col_indices().clone().long()
                values = target.values().clone()
            form, target_dtype = TargetForm.CSR, values.dtype
        else:
            raise LayoutError(
                f"{_lin('target')} has layout {target.layout}; use a dense tensor, torch.sparse_coo or "
                "torch.sparse_csr (or the tuple (crow_indices, col_indices[, values]))"
            )
        if target.requires_grad and torch.is_grad_enabled():
            _linear_no_grad(torch, "target", target)
    if target_dtype is not None and not (target_dtype.is_floating_point):
        raise DTypeError(
            f"{_lin('target')} must be floating-point (probabilities in [0, 1]), got dtype "
            f"{target_dtype}; convert with .float() (sparse: its values)"
        )
    if values is not None:
        _linear_no_grad(torch, "target", values)
    compute = compute_dtype(torch, input.dtype, input.dtype if target_dtype is None else target_dtype)
    out_dtype = input.dtype if target_dtype is None else target_dtype
    if _autocast_on(torch, input.device.type) and out_dtype in (torch.float16, torch.bfloat16):
        out_dtype = torch.float32  # torch runs its loss in float32 under autocast
    if values is not None:
        values = values.to(compute)

    if pos_weight is not None:
        if not _is_real(pos_weight):
            raise DTypeError(f"{_lin('pos_weight')} must be real-valued, got {pos_weight.dtype}")
        _linear_no_grad(torch, "pos_weight", pos_weight)
        if tuple(pos_weight.shape) not in ((n_classes,), (1,)):
            raise ValueError(
                f"{_lin('pos_weight')} must have shape ({n_classes},) (one weight per class of weight) "
                f"or (1,), got {tuple(pos_weight.shape)}"
            )
        pos_weight = pos_weight.to(compute).expand(n_classes).contiguous()

    if ignore_rows is not None:
        _linear_tensor(torch, "ignore_rows", ignore_rows, "pass a bool mask, True for rows to leave out")
        if ignore_rows.dtype != torch.bool:
            raise DTypeError(
                f"{_lin('ignore_rows')} must be a bool mask (True = leave the row out), got dtype "
                f"{ignore_rows.dtype}; use (mask != 0)"
            )
        if tuple(ignore_rows.shape) not in (lead, (n_rows,)):
            raise ValueError(
                f"{_lin('ignore_rows')} must have shape {lead} (input's leading dimensions), got "
                f"{tuple(ignore_rows.shape)}"
            )
        if ignore_rows.device != input.device:
            raise RuntimeError(
                f"{_lin('ignore_rows')} is on {ignore_rows.device} but input on {input.device}; move it"
            )
        ignore_rows = ignore_rows.reshape(n_rows)
    rows, classes, budget = chunking
    return LinearCall(
        input.reshape(n_rows, d), weight, bias, form, dense, crow, col, values, pos_weight, ignore_rows,
        reduction, options, rows, classes, budget, compute, out_dtype, lead,
    )  # fmt: skip


def check_linear_values(call: LinearCall) -> None:
    """The rules that read values, run in the op before its first matmul: sparse row pointers that start
    at 0, never decrease and end at the number of column indices; column indices in [0, C); under
    ``strict``, target values in [0, 1] (or equal to ignore_index) and pos_weight >= 0. O(N + nnz) for
    sparse targets; strict on a dense target reads it once, in row blocks."""
    torch = _torch()
    n_classes = call.weight.shape[0]
    if call.form == TargetForm.CSR:
        crow, col = call.crow, call.col
        steps = crow[1:] - crow[:-1]
        if int(crow[0]) != 0 or int(crow[-1]) != col.shape[0] or bool((steps < 0).any()):
            bad = int(torch.nonzero(steps < 0)[0, 0]) if bool((steps < 0).any()) else None
            where = f"; it decreases after row {bad}" if bad is not None else ""
            raise ValueError(
                f"{LINEAR_FUNCTION}(): target's row pointers must be sorted (non-decreasing), start at "
                f"0 and end at the number of column indices ({col.shape[0]}); got first {int(crow[0])}, last "
                f"{int(crow[-1])}{where}. Build them with torch.cumsum of the row counts"
            )
        if col.numel():
            out = (col < 0) | (col >= n_classes)
            if bool(out.any()):
                i = int(torch.nonzero(out)[0, 0])
                raise ValueError(
                    f"{LINEAR_FUNCTION}(): target has column index {int(col[i])} (entry {i}), out of range "
                    f"for C={n_classes} classes (weight.shape[0]); indices must be in [0, {n_classes})"
                )
    if not call.options.strict:
        return
    ii = call.options.ignore_index
    chunks = [call.values] if call.form == TargetForm.CSR else torch.split(call.target, 4096, 0)
    for y in chunks:
        if y is None:
            continue
        bad = ~((y >= 0) & (y <= 1))
        if ii is not None:
            bad &= y != ii
        if bool(bad.any()):
            v = float(y[bad][0])
            raise ValueError(
                f"strict: target has {int(bad.sum())} value(s) outside [0, 1] or not finite (e.g. {v}); BCE "
                "targets are probabilities. Fix the labels, mask them with ignore_index=..., or pass "
                "strict=False"
            )
    p = call.pos_weight
    if p is not None and bool((p < 0).any()):
        raise ValueError(
            f"strict: pos_weight has negative entries (min {float(p.min())}); use weights >= 0 or pass "
            "strict=False"
        )


# ----------------------------------------------------------------------------------------- beyond one device
# siglip_loss and the global mean (process_group= / normalizer=): src/bcelogits/siglip.py, distributed.py.
SIGLIP = "siglip_loss"


def check_process_group(process_group, name: str):
    """``torch.distributed`` for a usable ``process_group`` (None: None). Raises when torch.distributed is
    unavailable or not initialised, for an object that is not a group, and for a group this process is not
    a member of."""
    if process_group is None:
        return None
    torch = _torch()
    if torch is None:
        raise ArgumentTypeError(
            f"{name}: process_group is a torch.distributed group and needs torch tensors; NumPy arrays are "
            "local to one process (pass process_group=None, or torch tensors)"
        )
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{name}: process_group was given, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{name}: process_group was given, but torch.distributed is not initialised in this process; "
            "call torch.distributed.init_process_group(...) first, or pass process_group=None"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{name}: process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD "
            f"or one from new_group()), got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(
            f"{name}: this process (global rank {dist.get_rank()}) is not a member of process_group; call it "
            "only on the group's ranks"
        )
    return dist


def check_block_size(block_size) -> int | None:
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(
            f"{SIGLIP}: block_size must be a positive int or None, got {type(block_size).__name__}"
        )
    if block_size < 1:
        raise ValueError(f"{SIGLIP}: block_size must be a positive int or None (automatic), got {block_size}")
    return int(block_size)


def siglip_problem(image_features, text_features, logit_scale, logit_bias):
    """The first thing wrong with the local arguments of a :func:`bcelogits.siglip_loss` call, as
    ``(exception type, message)``, or None. (Returned, not raised: across ranks every rank must learn of a
    problem on any one rank, or the others would wait for it forever.)"""
    for name, f in (("image_features", image_features), ("text_features", text_features)):
        if not is_tensor(f):
            return ArgumentTypeError, (
                f"{SIGLIP}: {name} must be a torch.Tensor, got {type(f).__name__}; wrap it with "
                f"torch.as_tensor(...)"
            )
        if not f.is_floating_point():
            return DTypeError, (
                f"{SIGLIP}: {name} must be floating-point features, got dtype {f.dtype}; convert with "
                f"{name}.float()"
            )
        if f.layout is not _torch().strided:
            return LayoutError, (
                f"{SIGLIP}: {name} must be a dense tensor, got layout {f.layout}; use .to_dense()"
            )
        if f.ndim != 2:
            return ValueError, (
                f"{SIGLIP}: {name} must be 2-D (batch, dim), got shape {tuple(f.shape)}; flatten it with "
                f"{name}.reshape(len({name}), -1)"
            )
    img, txt = image_features, text_features
    if img.shape[1] != txt.shape[1]:
        return ValueError, (
            f"{SIGLIP}: image_features and text_features must have the same feature dimension D, got "
            f"{img.shape[1]} and {txt.shape[1]} (shapes {tuple(img.shape)} and {tuple(txt.shape)}); "
            f"project both "
            "to one embedding size"
        )
    if img.shape[0] != txt.shape[0]:
        return ValueError, (
            f"{SIGLIP}: image_features and text_features must hold the same number of pairs, got "
            f"{img.shape[0]} images and {txt.shape[0]} texts (row i of each is a matching pair)"
        )
    if img.dtype != txt.dtype:
        return DTypeError, (
            f"{SIGLIP}: image_features is {img.dtype} but text_features is {txt.dtype}; convert one with "
            ".to(other.dtype)"
        )
    if img.device != txt.device:
        return RuntimeError, (
            f"{SIGLIP}: image_features is on {img.device} but text_features on {txt.device}; move one with "
            ".to(other.device)"
        )
    for name, s in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if s is None and name == "logit_bias":
            continue
        if is_tensor(s):
            if s.numel() != 1:
                return ValueError, (
                    f"{SIGLIP}: {name} must be a scalar (a 0-dim tensor), got shape {tuple(s.shape)}; one "
                    f"{name} is shared by all pairs (open_clip passes logit_scale.exp() of a 0-dim parameter)"
                )
            if not s.is_floating_point():
                return DTypeError,(
                    f"{SIGLIP}: {name} must be floating-point, got dtype {s.dtype}; use {name}.float()"
                )
            if s.device != img.device:
                return RuntimeError, (
                    f"{SIGLIP}: {name} is on {s.device} but the features are on {img.device}; move it with "
                    f"{name}.to(image_features.device)"
                )
        elif isinstance(s, bool) or not isinstance(s, (int, float, np.number)):
            return TypeError, (
                f"{SIGLIP}: {name} must be a 0-dim tensor or a number, got {type(s).__name__}"
                + ("" if name == "logit_scale" else " (or None for no bias)")
            )
    return None


def raise_problem(problem) -> None:
    if problem is not None:
        raise problem[0](problem[1])


GLOBAL_MEAN_REDUCTIONS = ("mean", "weighted_mean")


def check_global_mean(reduction: str, process_group, normalizer, is_torch: bool):
    """Rules of ``process_group=`` and ``normalizer=`` on the plain loss; returns ``(torch.distributed or
    None, normalizer as a float, a 0-dim tensor, or None)``. Both change the denominator of a mean, so both
    apply to 'mean' and 'weighted_mean' only."""
    name = f"{FUNCTION}()"
    if reduction not in GLOBAL_MEAN_REDUCTIONS:
        given = "process_group" if process_group is not None else "normalizer"
        raise ValueError(
            f"{name}: {given}= sets the denominator of a mean, so it needs reduction='mean' or "
            f"'weighted_mean', "
            f"got reduction={reduction!r}; 'sum' has no denominator and 'none' is not reduced (drop "
            f"{given}=, "
            "or use reduction='mean')"
        )
    if process_group is not None and not is_torch:
        raise ArgumentTypeError(
            f"{name}: process_group is a torch.distributed group and needs torch tensors; NumPy arrays "
            f"are local "
            "to one process (pass torch tensors, or normalizer= with a denominator you all-reduced yourself)"
        )
    dist = check_process_group(process_group, name)
    if normalizer is None:
        return dist, None
    if is_tensor(normalizer) or isinstance(normalizer, np.ndarray):
        if normalizer.ndim != 0:
            raise ValueError(
                f"{name}: normalizer must be a number or a 0-dim tensor (the mean's denominator), got shape "
                f"{tuple(normalizer.shape)}"
            )
        if not _is_real(normalizer) or (is_tensor(normalizer) and normalizer.dtype == _torch().bool):
            raise DTypeError(f"{name}: normalizer must be real-valued, got dtype {normalizer.dtype}")
        if is_tensor(normalizer):
            if not is_torch:
                raise ArgumentTypeError(f"{name}: a torch normalizer needs torch inputs; pass a number")
            if normalizer.device.type == "cpu":
                _check_normalizer_value(float(normalizer), name)
            return dist, normalizer.detach()
        normalizer = float(normalizer)
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float, np.number)):
        raise TypeError(
            f"{name}: normalizer must be a number or a 0-dim tensor (the mean's denominator), got "
            f"{type(normalizer).__name__}"
        )
    _check_normalizer_value(float(normalizer), name)
    return dist, float(normalizer)


def _check_normalizer_value(value: float, name: str) -> None:
    if not 0.0 <= value < math.inf:  # (NaN fails too)
        raise ValueError(
            f"{name}: normalizer must be a finite number >= 0 (a count of elements or a sum of weights), got "
            f"{value}"
        )
