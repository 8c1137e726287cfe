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
    r"""Binary cross-entropy between logits ``input`` and target probabilities ``target``.

    A drop-in for ``torch.nn.functional.binary_cross_entropy_with_logits``: the same positional
    arguments, broadcasting, dtypes, errors and warnings, exact to a few ulps everywhere (torch's own
    evaluation loses confident answers and small ``pos_weight`` gradients). Torch tensors give a
    differentiable tensor; NumPy arrays give a NumPy result. For logit ``x``, target ``y``, weight ``w``
    and positive weight ``p``, each element's loss is:

        loss_i = w_i * [(1 - y_i) * softplus(x_i) + p_i * y_i * softplus(-x_i)]

    (the same as ``-w * [p * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))]``), evaluated without
    cancellation. The keyword-only options are all off by default, when the result is torch's.

    Args:
        input: Logits (unnormalised scores, any real number; not probabilities), a floating-point torch
            tensor or NumPy array.
        target: Target probabilities, usually 0 or 1, of the same shape as ``input`` and a floating-point
            dtype (convert integer labels with ``target.float()``).
        weight: Optional rescaling weight, broadcast to ``input`` (it may not enlarge the result).
        size_average: Deprecated, as in torch: overrides ``reduction`` with torch's warning.
        reduce: Deprecated, as in torch: overrides ``reduction`` with torch's warning.
        reduction: ``'mean'`` (default), ``'sum'``, ``'none'``, or ``'weighted_mean'``: the sum of
            ``weight * loss`` divided by the sum of the weights (torch's ``'mean'`` divides by the element
            count); a zero weight sum gives 0.
        pos_weight: Optional weight of the positive term, broadcast to ``input`` along its last dimension
            (or along ``class_dim``). Values above 1 raise recall, below 1 raise precision; see
            ``pos_weight_from_targets``.
        ignore_index: Target value that marks an element as missing: it contributes no loss and no
            gradient and leaves the mean's denominator (all ignored: a loss of 0). Default ``None``.
        label_smoothing: ``eps`` in [0, 1]: targets become ``y * (1 - eps) + eps / 2`` before everything
            else. Default 0.
        class_dim: Dimension of ``input`` that a 1-D ``pos_weight`` of length C applies along, e.g. 1 for
            an (N, C, H, W) segmentation output. Default ``None``: torch's broadcasting (last dimension).
        focal_gamma: ``gamma >= 0``: each element's loss is multiplied by ``(1 - p_t) ** gamma``, with
            ``p_t = sigmoid(x) * y + (1 - sigmoid(x)) * (1 - y)`` (focal loss); 0 (default) is plain BCE.
        strict: When true, raise ``ValueError`` for a target outside [0, 1] or not finite and for a
            negative ``weight``/``pos_weight``, and warn when every logit lies in [0, 1] (probabilities
            passed as logits). Default ``False`` (torch accepts such inputs).
        process_group: A ``torch.distributed`` group ('mean' and 'weighted_mean' only): the mean's
            denominator (the count of elements not ignored, or the weight sum) is all-reduced over the
            group and each rank returns ``sum * world_size / global denominator``, so that DDP's averaged
            gradients are those of the global mean (docs/distributed.md). Default ``None``.
        normalizer: An explicit denominator, a number or 0-dim tensor ('mean' and 'weighted_mean'
            only): the sum is divided by it, e.g. the denominator of all micro-batches of a
            gradient-accumulation step (``bcelogits.loss_denominator``). Default ``None``.

    Returns:
        The loss, a 0-dimensional tensor (or NumPy scalar) for ``'mean'``, ``'sum'`` and
        ``'weighted_mean'``; for ``'none'`` one value per element, of the broadcast shape. Its dtype is the
        target's (16-bit inputs are computed in float32 and rounded once).

    Raises:
        ValueError: ``target`` has another size than ``input``; ``reduction`` is not one of the names
            above; an option is out of range; ``class_dim`` does not match ``pos_weight``'s length; with
            ``strict``, bad target or weight values.
        RuntimeError: ``weight``/``pos_weight`` cannot broadcast to the input or would enlarge it; a
            tensor is on another device than ``input``; a weight requires grad while grad mode is on.
        bcelogits.DTypeError: integer or bool ``input``/``target`` (a ``TypeError`` and a
            ``RuntimeError``; the message says how to convert).
        bcelogits.ArgumentTypeError: an argument is not a tensor or array (a ``TypeError``), or NumPy
            arrays are mixed with tensors.
        bcelogits.LayoutError: a sparse tensor (a ``TypeError`` and a ``NotImplementedError``).
        TypeError: an option of the wrong type.

    Shape:
        - input: ``(*)``, any number of dimensions.
        - target: ``(*)``, the same shape as ``input``.
        - weight, pos_weight: broadcastable to ``input``.
        - output: scalar, or ``(*)`` for ``reduction='none'``.

    Examples:
        NumPy arrays in, a NumPy value out:

        >>> import numpy as np
        >>> x = np.array([0.8, -1.2, 2.4], dtype=np.float32)
        >>> y = np.array([1.0, 0.0, 1.0], dtype=np.float32)
        >>> print(f"{binary_cross_entropy_with_logits(x, y):.4f}")
        0.2404

        A confident right answer has a small but nonzero loss (torch gives 0 here):

        >>> print(binary_cross_entropy_with_logits(np.array([-40.0]), np.array([0.0]), reduction="none"))
        [4.24835426e-18]

        Missing labels marked -1, and a focal term:

        >>> y = np.array([1.0, -1.0, 1.0], dtype=np.float32)
        >>> print(f"{binary_cross_entropy_with_logits(x, y, ignore_index=-1, focal_gamma=2.0):.5f}")
        0.01813

        Torch tensors are differentiable:

        >>> import torch
        >>> logits = torch.tensor([0.5, -2.0], requires_grad=True)
        >>> loss = binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0]))
        >>> loss.backward()
        >>> logits.grad
        tensor([-0.1888,  0.0596])
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
        return _autograd(call.xp).apply(call)
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
    """The loss and its gradient with respect to ``input``, from one fused pass, without autograd.

    For NumPy arrays (the way to train with NumPy alone) or torch tensors (detached: no graph is built).
    The arguments and options are those of ``binary_cross_entropy_with_logits``, except that
    ``pos_weight`` comes right after ``weight`` and the legacy ``size_average``/``reduce`` are not taken.

    Args:
        input: Logits, a floating-point array or tensor.
        target: Target probabilities, of ``input``'s shape.
        weight: Optional rescaling weight, broadcast to ``input``.
        pos_weight: Optional weight of the positive term (see
            ``binary_cross_entropy_with_logits``).
        reduction: ``'mean'`` (default), ``'sum'``, ``'none'`` or ``'weighted_mean'``.
        ignore_index: As in ``binary_cross_entropy_with_logits``.
        label_smoothing: As in ``binary_cross_entropy_with_logits``.
        class_dim: As in ``binary_cross_entropy_with_logits``.
        focal_gamma: As in ``binary_cross_entropy_with_logits``.
        strict: As in ``binary_cross_entropy_with_logits``.

    Returns:
        A pair ``(loss, grad)``, the loss as ``binary_cross_entropy_with_logits`` returns it and
        ``d loss / d input`` with ``input``'s shape and dtype. For ``reduction='none'`` the gradient is
        the elementwise derivative ``d loss_i / d input_i``.

    Raises:
        ValueError: As in ``binary_cross_entropy_with_logits``.
        RuntimeError: As in ``binary_cross_entropy_with_logits``.
        TypeError: As in ``binary_cross_entropy_with_logits`` (``DTypeError``, ``ArgumentTypeError``,
            ``LayoutError`` are ``TypeError`` s).

    Shape:
        - input, target: ``(*)``, the same shape.
        - loss: scalar, or ``(*)`` for ``reduction='none'``.
        - grad: ``(*)``, ``input``'s shape.

    Examples:
        >>> import numpy as np
        >>> loss, grad = loss_and_grad(np.zeros(4), np.ones(4), reduction="sum")
        >>> print(loss, grad)
        2.772588722239781 [-0.5 -0.5 -0.5 -0.5]

        One step of logistic regression in NumPy:

        >>> w = np.zeros(2)
        >>> features = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> loss, dlogits = loss_and_grad(features @ w, np.array([1.0, 0.0]))
        >>> w -= 0.5 * features.T @ dlogits
        >>> print(w)
        [ 0.125 -0.125]
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
    """``pos_weight`` for imbalanced data: negatives / positives per class.

    100 positives and 300 negatives of a class give 3, torch's documented rule; the loss then weighs the
    positives as if there were as many as negatives. Soft targets count fractionally (a target of 0.25 is a
    quarter positive and three quarters negative).

    Args:
        target: Training targets (a torch tensor or NumPy array), probabilities in [0, 1].
        class_dim: The dimension that indexes classes; every other dimension is counted over. Default
            -1 (the last), which is torch's own broadcasting of ``pos_weight``; pass the same
            ``class_dim`` to the loss for any other. A 1-D target is one class.

    Returns:
        A 1-D tensor or array of length C (the size of ``class_dim``; 1 for a 1-D target), of the
        target's dtype when that is float32 or float64, else float32 (a float16 ratio would overflow
        above 65504 negatives per positive, and bfloat16 keeps 3 digits).

    Raises:
        ValueError: a class has no positive example (its ratio would be infinite; the message names the
            classes), the target contains NaN or values outside [0, 1] (a 0/255 mask or -1/+1 labels: the
            message names the conversion, ``mask / 255`` or ``(y + 1) / 2``), is 0-dimensional, or
            ``class_dim`` is out of range.
        bcelogits.ArgumentTypeError: ``target`` is not a tensor or NumPy array.

    Shape:
        - target: ``(*)``, with C entries along ``class_dim``.
        - output: ``(C,)``.

    Examples:
        >>> import numpy as np
        >>> y = np.zeros((400, 1)); y[:100] = 1
        >>> pos_weight_from_targets(y)
        array([3.])

        Per class of an (N, C, H, W) mask, used along dimension 1:

        >>> import torch
        >>> masks = torch.zeros(2, 3, 4, 4); masks[:, 0, :2] = 1; masks[:, 1, 0, 0] = 1; masks[:, 2] = 0.5
        >>> pos_weight_from_targets(masks, class_dim=1)
        tensor([ 1., 15.,  1.])
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
