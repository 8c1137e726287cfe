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
    """The keyword-only options beyond torch's arguments; defaults reproduce torch exactly."""

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


def _broadcast_check(name: str, w, shape: tuple, fix: str) -> None:
    try:
        b = np.broadcast_shapes(tuple(w.shape), shape)
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
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"Target size ({_shape_str(target)}) must be the same as input size ({_shape_str(input)})"
        )
    shape = tuple(input.shape)
    if torch is not None:
        for name, a in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
            if a is not None and a.device != input.device:
                raise RuntimeError(
                    f"{FUNCTION}(): '{name}' is on {a.device} but input is on {input.device}; "
                    f"move it with {name}.to(input.device)"
                )

    # dtypes: the loss has the target's dtype; 16-bit math is done in float32 and rounded once.
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

    def cast(w):
        if w is None:
            return None
        return w.to(compute) if torch is not None else w.astype(compute, copy=False)

    return Call(xp, input, target, cast(weight), cast(pos_weight), reduction, options, compute, out_dtype)


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
    Costs a few passes over the data, which is why it is opt-in. Under torch.compile a check that
    depends on the data cannot be traced: that is an error saying where strict mode works."""
    xp = call.xp
    if call.is_torch and xp.compiler.is_compiling():
        raise RuntimeError(
            "strict=True checks the values of target, weight and input, which torch.compile cannot trace; "
            "check a batch in eager mode (outside the compiled function) with strict=True, and pass "
            "strict=False inside it"
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
