"""Independent references for the keyword options of bcelogits (no bcelogits code is used here).

Written from the option definitions, not from the implementation:

* ``ref_loss``: the loss in plain float64 torch ops, differentiable by torch autograd, so the
  reference gradients for input and target come from autograd of the definition:

  - label smoothing:  ``ys = y (1 - eps) + eps / 2`` (raw y is what ``ignore_index`` compares);
  - element loss:     ``l = w [(1 - ys) softplus(x) + p ys softplus(-x)]`` with ``w`` = weight broadcast
    to the input (1 when absent) and ``p`` = pos_weight broadcast the torch way, or, with ``class_dim``
    set, a 1-D pos_weight laid along input dimension ``class_dim``;
  - focal term:       ``l *= (1 - p_t)^gamma``, ``p_t = sigma(x) ys + (1 - sigma(x)) (1 - ys)``, written as
    ``1 - p_t = sigma(x) (1 - ys) + sigma(-x) ys`` (two non-negative terms, no cancellation);
  - ignore_index:     elements whose raw target equals it give 0 (and are left out of denominators);
  - reductions:       none / sum / mean = sum over the count of kept elements / weighted_mean =
    sum(l) / sum of the broadcast weight over kept elements (pos_weight not in it); a zero
    denominator gives 0 (with a zero gradient).

  ``softplus`` is ``logaddexp(x, 0)`` (``F.softplus`` has a threshold of 20 and is not exact there).
  Meant for moderate logits, where every term is a normal float64 number.

* ``mp_focal``: the exact element loss and its derivatives in mpmath (60 digits), the derivatives by
  ``mpmath.diff`` of the loss as a function of x (or y), for the saturated / accuracy checks.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import torch

MP_DPS = 60


def f64(a):
    """A float64 torch copy of a torch tensor or numpy array (exact upcast), or None."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a, dtype=np.float64))
    return a.detach().to(torch.float64)


def softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))


def pos_weight_on_class_dim(pos_weight, ndim: int, class_dim: int):
    """A 1-D pos_weight reshaped to lie along ``class_dim`` of an ``ndim``-dimensional input."""
    d = class_dim % ndim
    return pos_weight.reshape([-1 if i == d else 1 for i in range(ndim)])


def ref_loss(
    x,
    y,
    weight=None,
    pos_weight=None,
    reduction="mean",
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_dim=None,
    focal_gamma=0.0,
    strict=False,  # validation only: never changes a value
):
    """The loss from the definitions, in float64 torch ops (x, y float64, may require grad)."""
    del strict
    shape = x.shape
    keep = torch.ones(shape, dtype=torch.bool) if ignore_index is None else (y.detach() != ignore_index)
    # Ignored targets may be anything (e.g. -1): replace them by 1/2 before any arithmetic, so that no
    # NaN of the unused branch can leak into autograd through the final where().
    y_safe = torch.where(keep, y, torch.full_like(y, 0.5))
    eps = float(label_smoothing)
    ys = y_safe * (1.0 - eps) + eps / 2.0

    w = torch.ones(shape, dtype=torch.float64) if weight is None else f64(weight).broadcast_to(shape)
    if pos_weight is None:
        p = torch.ones(shape, dtype=torch.float64)
    elif class_dim is not None:
        p = pos_weight_on_class_dim(f64(pos_weight), len(shape), class_dim).broadcast_to(shape)
    else:
        p = f64(pos_weight).broadcast_to(shape)

    ell = w * ((1.0 - ys) * softplus(x) + p * ys * softplus(-x))
    if focal_gamma:
        one_minus_pt = torch.sigmoid(x) * (1.0 - ys) + torch.sigmoid(-x) * ys
        ell = ell * one_minus_pt ** float(focal_gamma)
    ell = torch.where(keep, ell, torch.zeros_like(ell))

    if reduction == "none":
        return ell
    total = ell.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        denom = keep.sum().to(torch.float64)
    elif reduction == "weighted_mean":
        denom = torch.where(keep, w, torch.zeros_like(w)).sum()
    else:  # pragma: no cover
        raise ValueError(reduction)
    if float(denom) == 0.0:
        return total * 0.0  # 0, with a zero gradient
    return total / denom


def ref_with_grads(x, y, weight=None, pos_weight=None, reduction="mean", grad_output=None, **options):
    """``(loss, d/dx, d/dy)`` of :func:`ref_loss` in float64, by autograd, for upcast inputs.

    ``grad_output`` (float or tensor) is what the loss is back-propagated with (1 by default).
    """
    xl = f64(x).clone().requires_grad_(True)
    yl = f64(y).clone().requires_grad_(True)
    out = ref_loss(xl, yl, f64(weight), f64(pos_weight), reduction, **options)
    go = torch.ones_like(out) if grad_output is None else torch.as_tensor(grad_output, dtype=torch.float64)
    go = go.broadcast_to(out.shape)
    gx, gy = torch.autograd.grad(out, (xl, yl), go)
    return out.detach(), gx, gy


# ----------------------------------------------------------------------------------------------------
# mpmath
# ----------------------------------------------------------------------------------------------------


def _mp_element(x, y, gamma, w, p, eps):
    ys = y * (1 - eps) + eps / 2
    sp_pos = mpmath.log1p(mpmath.exp(x))
    sp_neg = mpmath.log1p(mpmath.exp(-x))
    ell = w * ((1 - ys) * sp_pos + p * ys * sp_neg)
    if gamma:
        sig_pos = 1 / (1 + mpmath.exp(-x))
        sig_neg = 1 / (1 + mpmath.exp(x))
        ell = ell * (sig_pos * (1 - ys) + sig_neg * ys) ** gamma
    return ell


def _mp_dy(x, y, gamma, w, p, eps):
    """Analytic d/dy (raw y) of the element loss: (1 - eps) [l_ys q^g + l g q^(g-1) (s(-x) - s(x))]
    with q = 1 - p_t.  (A finite difference in y is no good at y = 0 or 1: there q may turn negative
    one step outside [0, 1] for saturated x.)"""
    ys = y * (1 - eps) + eps / 2
    sp_pos = mpmath.log1p(mpmath.exp(x))
    sp_neg = mpmath.log1p(mpmath.exp(-x))
    ell = w * ((1 - ys) * sp_pos + p * ys * sp_neg)
    d_ell = w * (p * sp_neg - sp_pos)
    if not gamma:
        return (1 - eps) * d_ell
    sig_pos = 1 / (1 + mpmath.exp(-x))
    sig_neg = 1 / (1 + mpmath.exp(x))
    q = sig_pos * (1 - ys) + sig_neg * ys
    return (1 - eps) * (d_ell * q**gamma + ell * gamma * q ** (gamma - 1) * (sig_neg - sig_pos))


def mp_focal(x: float, y: float, gamma: float, w: float = 1.0, p: float = 1.0, eps: float = 0.0):
    """Exact ``(loss, d loss/dx, d loss/dy)`` of one element (floats are taken at their exact value).

    ``d/dx`` by ``mpmath.diff`` of the definition; ``d/dy`` (with respect to the raw target, through the
    smoothing) analytic, cross-checked against ``mpmath.diff`` in the tests at interior targets."""
    with mpmath.workdps(MP_DPS):
        X, Y, G, W, P, E = (mpmath.mpf(float(v)) for v in (x, y, gamma, w, p, eps))
        loss = _mp_element(X, Y, G, W, P, E)
        dx = mpmath.diff(lambda t: _mp_element(t, Y, G, W, P, E), X)
        dy = _mp_dy(X, Y, G, W, P, E)
        return loss, dx, dy


def mp_focal_dy_by_diff(x: float, y: float, gamma: float, w: float = 1.0, p: float = 1.0, eps: float = 0.0):
    """d/dy by ``mpmath.diff`` (interior targets only), to cross-check :func:`_mp_dy`."""
    with mpmath.workdps(MP_DPS):
        X, Y, G, W, P, E = (mpmath.mpf(float(v)) for v in (x, y, gamma, w, p, eps))
        return mpmath.diff(lambda t: _mp_element(X, t, G, W, P, E), Y)


def is_normal(v, tiny: float, big: float) -> bool:
    a = abs(v)
    return bool(tiny <= a <= big)


def rel_err(got: float, exact) -> float:
    """``|got - exact| / |exact|`` (inf for a non-finite ``got``)."""
    if not math.isfinite(got):
        return math.inf
    with mpmath.workdps(MP_DPS):
        e = mpmath.mpf(exact)
        if e == 0:
            return 0.0 if got == 0 else math.inf
        return float(abs(mpmath.mpf(got) - e) / abs(e))


# ----------------------------------------------------------------------------------------------------
# pos_weight_from_targets
# ----------------------------------------------------------------------------------------------------


def ref_pos_weight(target: np.ndarray, class_dim: int = -1) -> np.ndarray:
    """negatives / positives per class, soft targets counted fractionally (float64 numpy)."""
    y = np.asarray(target, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
        class_dim = -1
    y = np.moveaxis(y, class_dim, -1).reshape(-1, y.shape[class_dim])
    pos = y.sum(axis=0)
    neg = (1.0 - y).sum(axis=0)
    return neg / pos
