"""The functional API: check the arguments once, then dispatch (torch autograd or NumPy)."""

from __future__ import annotations

import sys

import numpy as np

from . import _args, distributed, kernels


def binary_cross_entropy_with_logits(
    input,
    target,
    weight=None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    pos_weight=None,
    *,
    ignore_index: float | None = None,
    label_smoothing: float = 0.0,
    class_dim: int | None = None,
    focal_gamma: float = 0.0,
    strict: bool = False,
    process_group=None,
    normalizer=None,
):
    r"""Binary cross-entropy between logits ``input`` and probabilities ``target``.

    .. math::

        \ell_i = w_i\,[(1 - y_i)\,\mathrm{softplus}(x_i) + p_i\,y_i\,\mathrm{softplus}(-x_i)]

    reduced by ``reduction`` ('none' | 'mean' | 'sum' | 'weighted_mean'). Takes exactly the arguments of
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` and behaves the same, accurate to a few
    ulps everywhere (see the README for the options after ``pos_weight``). Torch tensors give a
    differentiable tensor; NumPy arrays give a NumPy result.

    A mean over more than this batch ('mean' and 'weighted_mean' only; docs/distributed.md):
    ``process_group=`` (a torch.distributed group) all-reduces the denominator (the count of elements not
    ignored, or the weight sum) and returns ``sum * world_size / global denominator``, so that DDP's averaged
    gradients are those of the global mean; ``normalizer=`` (a number or 0-dim tensor) divides the sum by
    it instead, e.g. the denominator of all micro-batches of a gradient-accumulation step
    (:func:`bcelogits.loss_denominator`).

    >>> import numpy as np
    >>> x = np.array([0.8, -1.2, 2.4], dtype=np.float32)
    >>> y = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    >>> print(f"{binary_cross_entropy_with_logits(x, y):.4f}")
    0.2404
    >>> print(binary_cross_entropy_with_logits(np.array([-1000.0]), np.array([0.0]), reduction="none"))
    [0.]
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch._C._has_torch_function((input, target, weight, pos_weight)):
        # A tensor subclass with its own __torch_function__, or an active TorchFunctionMode: they see this
        # function as one call, as they see torch's (and may run it, or something else, themselves).
        return torch.overrides.handle_torch_function(
            binary_cross_entropy_with_logits, (input, target, weight, pos_weight),
            input, target, weight, size_average, reduce, reduction, pos_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, class_dim=class_dim,
            focal_gamma=focal_gamma, strict=strict, process_group=process_group, normalizer=normalizer,
        )  # fmt: skip
    call = _args.simple_call(
        input, target, weight, size_average, reduce, reduction, pos_weight,
        ignore_index, label_smoothing, class_dim, focal_gamma, strict,
    )  # fmt: skip
    if call is None:
        reduction = _args.resolve_reduction(size_average, reduce, reduction)
        options = _args.check_options(ignore_index, label_smoothing, class_dim, focal_gamma, strict)
        call = _args.parse(input, target, weight, pos_weight, reduction, options)
        if options.strict:
            _args.check_values(call)
    if process_group is not None or normalizer is not None:  # a global mean: the sum, then its denominator
        return distributed.mean_of_sum(call, process_group, normalizer, _reduce)
    return _reduce(call)


def _reduce(call):
    if call.is_torch:
        return _autograd(torch).apply(call)
    return kernels.forward(call).loss


def _autograd(torch):
    """The torch autograd module (imported on first use: ``import bcelogits`` never imports torch)."""
    if torch.compiler.is_compiling():
        # Dynamo would guard on the cache dict below, whose state changes with the first call (the
        # import): a first call traced before any eager call was compiled twice. An import statement
        # is traced without a guard on our state.
        from . import _autograd as mod

        return mod
    mod = _modules.get("autograd")
    if mod is None:
        from . import _autograd as mod

        _modules["autograd"] = mod
    return mod


_modules: dict = {}


def loss_and_grad(
    input,
    target,
    weight=None,
    pos_weight=None,
    reduction: str = "mean",
    *,
    ignore_index: float | None = None,
    label_smoothing: float = 0.0,
    class_dim: int | None = None,
    focal_gamma: float = 0.0,
    strict: bool = False,
):
    """``(loss, d loss / d input)`` in one fused pass, without autograd (NumPy arrays or torch tensors).

    The gradient has the input's shape and dtype. For ``reduction='none'`` it is the elementwise
    derivative ``d loss_i / d input_i``.

    >>> import numpy as np
    >>> loss, grad = loss_and_grad(np.zeros(4), np.ones(4), reduction="sum")
    >>> print(loss, grad)
    2.772588722239781 [-0.5 -0.5 -0.5 -0.5]
    """
    reduction = _args.check_reduction(reduction)
    options = _args.check_options(ignore_index, label_smoothing, class_dim, focal_gamma, strict)
    call = _args.parse(input, target, weight, pos_weight, reduction, options)
    if options.strict:
        _args.check_values(call)
    if call.is_torch:
        import torch

        with torch.no_grad():
            call.input, call.target = call.input.detach(), call.target.detach()
            fwd = kernels.forward(call, want_grad=True)
            return fwd.loss, fwd.final_grad().to(input.dtype)
    fwd = kernels.forward(call, want_grad=True)
    return fwd.loss, fwd.final_grad().astype(input.dtype, copy=False)


def pos_weight_from_targets(target, class_dim: int = -1):
    """``pos_weight`` for imbalanced data: negatives / positives per class (soft targets count
    fractionally). 100 positives and 300 negatives of a class give 3.

    ``class_dim`` is the dimension that indexes classes; every other dimension is counted over. A 1-D
    target is one class (result of shape (1,)). Pass the result together with the same ``class_dim`` to
    the loss (``class_dim=-1``, the default, is torch's own broadcasting over the last dimension).
    A class with no positive example has no finite ratio: that raises a ValueError naming the classes;
    so do NaN targets, and targets outside [0, 1] (a 0/255 mask or -1/+1 labels: the message names the
    conversion, ``mask / 255`` or ``(y + 1) / 2``). The result has the target's dtype when that is
    float32 or float64, else float32 (a float16 ratio would overflow above 65504 negatives per positive,
    and bfloat16 keeps 3 digits).

    >>> import numpy as np
    >>> y = np.zeros((400, 1)); y[:100] = 1
    >>> pos_weight_from_targets(y)
    array([3.])
    """
    name = "pos_weight_from_targets()"
    is_t = _args.is_tensor(target)
    if not (is_t or isinstance(target, np.ndarray)):
        raise _args.ArgumentTypeError(
            f"{name}: target must be a torch.Tensor or numpy.ndarray, got {type(target).__name__}; "
            "wrap it with torch.as_tensor(...) or numpy.asarray(...)"
        )
    xp = _args._torch() if is_t else np
    y = target.to(xp.float64) if is_t else target.astype(np.float64)
    if y.ndim == 0:
        raise ValueError(f"{name}: target must have at least one dimension (a 1-D target is one class)")
    if y.ndim == 1:
        y, class_dim = y.reshape(-1, 1), -1
    if not -y.ndim <= class_dim < y.ndim:
        raise ValueError(f"{name}: class_dim={class_dim} is out of range for a {y.ndim}-dimensional target")
    if bool(xp.isnan(y).any()):
        raise ValueError(f"{name}: target contains NaN; remove or fill those elements first")
    _check_probabilities(name, y)
    d = class_dim % y.ndim
    y = xp.moveaxis(y, d, -1).reshape(-1, y.shape[d])
    pos = y.sum(0)
    empty = [i for i, v in enumerate(pos.tolist()) if not v > 0]
    if empty:
        raise ValueError(
            f"{name}: class(es) {empty[:10]} have no positive example, so "
            "negatives/positives is infinite; drop those classes or set their pos_weight by hand"
        )
    ratio = (y.shape[0] - pos) / pos
    if is_t:
        keep = target.dtype in (xp.float32, xp.float64)
        return ratio.to(target.dtype if keep else xp.float32)
    return ratio.astype(target.dtype if target.dtype in (np.float32, np.float64) else np.float32)


def _check_probabilities(name: str, y) -> None:
    """Targets are probabilities: reject any outside [0, 1], naming the encoding they look like (their
    ratio would be meaningless: 0/255 masks gave a negative pos_weight, -1/+1 labels no positive)."""
    if 0 in tuple(y.shape):
        return
    lo, hi = float(y.min()), float(y.max())
    if 0.0 <= lo and hi <= 1.0:
        return
    if lo >= 0.0 and hi == 255.0:
        hint = "it looks like a 0/255 mask (an 8-bit image); pass mask / 255"
    elif lo == -1.0 and hi <= 1.0:
        hint = "it looks like -1/+1 labels; pass (y + 1) / 2"
    else:
        hint = "BCE targets are probabilities (1 = positive); rescale them into [0, 1]"
    raise ValueError(f"{name}: target values must lie in [0, 1], found the range [{lo:g}, {hi:g}]: {hint}")
