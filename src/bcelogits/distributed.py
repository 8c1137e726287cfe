r"""A mean over more than one batch: the global mean across data-parallel ranks (``process_group=``) and
an explicit denominator (``normalizer=``), for :func:`bcelogits.binary_cross_entropy_with_logits` and
:class:`bcelogits.BCEWithLogitsLoss`.

A mean is a sum over a denominator: the number of elements that are not ignored (``reduction='mean'``)
or their total weight (``'weighted_mean'``). When each rank divides by its own denominator and DDP
averages the ranks' gradients, the result is the global mean only if every rank had the same
denominator. With ``process_group=`` each rank returns

.. math::

    L_r = \frac{W \cdot S_r}{\sum_{r'} D_{r'}}

(``S_r`` its sum, ``D_r`` its denominator, ``W`` the group's size): the mean of the ranks' ``L_r`` is the
global mean, and so is DDP's average of their gradients. With ``normalizer=c`` the sum is divided by
``c`` instead (times ``W`` when a group is given too: ``c`` is then the global denominator), which is
how a mean over several accumulated micro-batches is formed (count them with :func:`loss_denominator`).

The sum goes through the same fused pass as every other call; only the denominator is counted apart
(one pass over the target, when ``ignore_index`` is set) and, across ranks, all-reduced: one
``all_reduce`` of one float64 per call. ``torch`` and ``torch.distributed`` are imported on first use.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from . import _args


def loss_denominator(target, weight=None, *, reduction: str = "mean", ignore_index=None, process_group=None):
    r"""The denominator the loss divides its sum by, counted the way the loss counts it.

    'mean': the number of elements of ``target`` not equal to ``ignore_index``; 'weighted_mean': the sum
    of ``weight`` broadcast to the target's shape over those elements. With ``process_group`` the sum over
    the group's ranks (an ``all_reduce``; every rank must call it). Sum it over the micro-batches of a
    gradient-accumulation step and pass it as ``normalizer=`` to make their losses add up to the mean
    over the whole step.

    Args:
        target: the targets of a batch (torch tensor or NumPy array; its shape is the input's).
        weight: the ``weight`` passed to the loss, or None.
        reduction: 'mean' or 'weighted_mean'.
        ignore_index: the ``ignore_index`` passed to the loss, or None.
        process_group: a ``torch.distributed`` group to sum over, or None (this batch only).

    Returns:
        A float64 0-dim tensor on the target's device (NumPy: a ``numpy.float64``).

    >>> import numpy as np
    >>> y = np.array([[1.0, 0.0, -100.0], [0.0, -100.0, 1.0]])
    >>> float(loss_denominator(y, ignore_index=-100))
    4.0
    >>> float(loss_denominator(y, np.array([1.0, 2.0, 3.0]), reduction="weighted_mean", ignore_index=-100))
    7.0
    """
    name = "loss_denominator()"
    if reduction not in _args.GLOBAL_MEAN_REDUCTIONS:
        raise ValueError(
            f"{name}: reduction must be 'mean' or 'weighted_mean' (the means), got {reduction!r}"
        )
    options = _args.check_options(ignore_index=ignore_index)
    if not (_args.is_tensor(target) or isinstance(target, np.ndarray)):
        raise _args.ArgumentTypeError(
            f"{name}: target must be a torch.Tensor or numpy.ndarray, got {type(target).__name__}"
        )
    if weight is not None:
        if _args.is_tensor(weight) != _args.is_tensor(target) or not hasattr(weight, "shape"):
            raise _args.ArgumentTypeError(f"{name}: weight must be an array of the target's kind, or None")
        _args._broadcast_check("weight", weight, tuple(target.shape), "Pass the weight given to the loss.")
    xp = sys.modules["torch"] if _args.is_tensor(target) else np
    dist = _args.check_process_group(process_group, name)
    if dist is not None and xp is np:
        raise _args.ArgumentTypeError(f"{name}: process_group needs torch tensors; NumPy arrays are local")
    denom = _denominator(xp, target, weight if reduction == "weighted_mean" else None, options.ignore_index)
    if dist is not None:
        dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=process_group)
    return denom


def _denominator(xp, target, weight, ignore_index):
    """Count of kept elements (weight None) or their broadcast weight sum, in float64."""
    n = math.prod(target.shape)
    torch = xp if xp is not np else None
    if weight is None:
        if ignore_index is None:
            return (
                torch.tensor(float(n), dtype=torch.float64, device=target.device) if torch else np.float64(n)
            )
        keep = target != ignore_index
        return keep.sum(dtype=xp.float64)
    if ignore_index is None:  # each weight element is used n / weight.size times
        repeat = n // max(math.prod(weight.shape), 1)
        total = weight.sum(dtype=xp.float64) if torch else np.sum(weight, dtype=np.float64)
        return total * float(repeat) if n else total * 0.0
    keep = target != ignore_index
    w = weight.to(torch.float64) if torch else np.asarray(weight, dtype=np.float64)
    return xp.where(keep, w, 0.0).sum() if torch else np.float64(np.where(keep, w, 0.0).sum())


def mean_scale(call, process_group, normalizer):
    """The factor that turns a validated call's *sum* into its (global) mean: ``W / denominator``, with the
    loss's rules for an empty denominator (NaN for a plain mean of no elements; 0 when every element was
    ignored or the weights sum to 0). A python float, or a float64 0-dim tensor on the input's device."""
    dist, normalizer = _args.check_global_mean(call.reduction, process_group, normalizer, call.is_torch)
    world = 1 if dist is None else dist.get_world_size(process_group)
    if normalizer is not None:
        denom = normalizer
    else:
        weight = call.weight if call.reduction == "weighted_mean" else None
        denom = _denominator(call.xp, call.target, weight, call.options.ignore_index)
        if dist is not None:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=process_group)
    empty = (
        math.nan
        if call.reduction == "mean" and call.options.ignore_index is None and normalizer is None
        else 0.0
    )
    if _args.is_tensor(denom):
        torch = call.xp
        denom = denom.to(device=call.input.device, dtype=torch.float64)
        return torch.where(denom == 0, empty, world / torch.where(denom == 0, 1.0, denom))
    denom = float(denom)
    return empty if denom == 0 else world / denom


def mean_of_sum(call, process_group, normalizer, reduce_sum):
    """The loss of ``call`` ('mean' or 'weighted_mean') as ``reduce_sum(the same call with 'sum')`` times
    :func:`mean_scale`, computed in float64 and rounded once to the loss's dtype."""
    scale = mean_scale(call, process_group, normalizer)
    summed = call.with_arrays(call.input, call.target, call.weight, call.pos_weight)
    summed.reduction = "sum"
    summed.out_dtype = call.xp.float64  # (rounded once, after the division; a 16-bit sum could overflow)
    total = reduce_sum(summed)
    if call.is_torch:
        return (total.to(call.xp.float64) * scale).to(call.out_dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(np.float64(total) * scale).astype(call.out_dtype)
