"""Independent references for the bcelogits tests (no bcelogits code is used here).

Two kinds of reference:

* ``mp_*``: the exact loss and derivatives in mpmath (50 significant digits), evaluated from the
  exact binary values of x, y, w, p (``float(t)`` of an element is exact for every float dtype).
* ``torch_f64_reference``: PyTorch's own ``binary_cross_entropy_with_logits`` evaluated in float64 on
  the exact (upcast) inputs, with gradients for input and target through PyTorch's autograd.  Values
  of our lower-precision results are compared with this, so torch's own float32 cancellation errors do
  not pollute the parity tests; the tolerance models below allow for torch's remaining float64 error.

Element notation as in the spec: ``l = w[(1-y) softplus(x) + p y softplus(-x)]``.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import torch
import torch.nn.functional as F

MP_DPS = 50

# Bits of precision after the leading one (the ulp of 1.0 is 2**-MANT_BITS).
MANT_BITS = {
    torch.bfloat16: 7,
    torch.float16: 10,
    torch.float32: 23,
    torch.float64: 52,
}
EPS64 = 2.0**-52


# ----------------------------------------------------------------------------------------------------
# exact (mpmath) element values
# ----------------------------------------------------------------------------------------------------


def mp_element(x: float, y: float, w: float = 1.0, p: float = 1.0):
    """Exact ``(loss, dloss/dx, dloss/dy, grad_scale, dy_scale)`` for finite float inputs.

    ``grad_scale = |w| (|1-y| sigma(x) + |p y| sigma(-x))`` is the size of the two gradient terms
    (they cancel for soft targets); ``dy_scale = |w| (|p| softplus(-x) + softplus(x))`` likewise for the
    target derivative.
    """
    with mpmath.workdps(MP_DPS):
        x, y, w, p = (mpmath.mpf(float(v)) for v in (x, y, w, p))
        sp_pos = mpmath.log1p(mpmath.exp(x))  # softplus(x)
        sp_neg = mpmath.log1p(mpmath.exp(-x))  # softplus(-x)
        sig_pos = 1 / (1 + mpmath.exp(-x))  # sigma(x)
        sig_neg = 1 / (1 + mpmath.exp(x))  # sigma(-x)
        loss = w * ((1 - y) * sp_pos + p * y * sp_neg)
        gx = w * ((1 - y) * sig_pos - p * y * sig_neg)
        gy = w * (p * sp_neg - sp_pos)
        gscale = abs(w) * (abs(1 - y) * sig_pos + abs(p * y) * sig_neg)
        yscale = abs(w) * (abs(p) * sp_neg + sp_pos)
        return loss, gx, gy, gscale, yscale


def is_normal(v, dtype: torch.dtype) -> bool:
    """True when the exact value ``v`` (mpf or float) is a normal finite number of ``dtype``."""
    fi = torch.finfo(dtype)
    a = abs(v)
    return bool(fi.tiny <= a <= fi.max)


def ulp(v, dtype: torch.dtype):
    """The spacing of ``dtype`` at the exact normal value ``v`` (as an mpf)."""
    with mpmath.workdps(MP_DPS):
        a = abs(mpmath.mpf(v))
        e = int(mpmath.floor(mpmath.log(a, 2)))
        # guard against log rounding right at a power of two
        if mpmath.mpf(2) ** e > a:
            e -= 1
        elif mpmath.mpf(2) ** (e + 1) <= a:
            e += 1
        return mpmath.mpf(2) ** (e - MANT_BITS[dtype])


def rel_err(got: float, exact, scale=None):
    """``|got - exact| / scale`` (scale defaults to |exact|), as a float, inf for a non-finite got."""
    if not math.isfinite(got):
        return math.inf
    with mpmath.workdps(MP_DPS):
        s = abs(mpmath.mpf(exact)) if scale is None else mpmath.mpf(scale)
        return float(abs(mpmath.mpf(got) - mpmath.mpf(exact)) / s)


# ----------------------------------------------------------------------------------------------------
# torch float64 reference and tolerance models
# ----------------------------------------------------------------------------------------------------


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def torch_f64_loss(x, y, weight=None, pos_weight=None, reduction="mean"):
    """torch's value in float64 on the exact inputs (no gradients)."""
    return F.binary_cross_entropy_with_logits(
        _f64(x), _f64(y), weight=_f64(weight), pos_weight=_f64(pos_weight), reduction=reduction
    )


def broadcast_operands(x, y, weight=None, pos_weight=None):
    """float64 copies of x, y, w, p broadcast to the shape of x (w = p = 1 when absent)."""
    x64, y64 = _f64(x), _f64(y)
    shape = x64.shape
    w = torch.ones(shape, dtype=torch.float64) if weight is None else _f64(weight).broadcast_to(shape)
    p = torch.ones(shape, dtype=torch.float64) if pos_weight is None else _f64(pos_weight).broadcast_to(shape)
    return x64, y64, w, p


def softplus64(x):
    return torch.logaddexp(torch.zeros_like(x), x)


def element_scales(x, y, weight=None, pos_weight=None):
    """Per-element (loss, grad-x, grad-y) magnitudes and torch-float64 absolute error allowances.

    Returns ``(lscale, gscale, yscale, l_abs, g_abs, y_abs)``:
    ``lscale = |w|(|1-y| sp(x) + |p y| sp(-x))``, ``gscale = |w|(|1-y| s(x) + |p y| s(-x))``,
    ``yscale = |w|(|p| sp(-x) + sp(x))``; the ``*_abs`` terms bound torch's own float64 rounding error
    (its formula ``(1-y) x - (1+(p-1)y) logsigmoid(x)`` cancels for confident right answers).
    """
    x64, y64, w, p = broadcast_operands(x, y, weight, pos_weight)
    aw, ap = w.abs(), p.abs()
    a1y, apy = (1 - y64).abs(), (p * y64).abs()
    sp_pos, sp_neg = softplus64(x64), softplus64(-x64)
    sig_pos, sig_neg = torch.sigmoid(x64), torch.sigmoid(-x64)
    lscale = aw * (a1y * sp_pos + apy * sp_neg)
    gscale = aw * (a1y * sig_pos + apy * sig_neg)
    yscale = aw * (ap * sp_neg + sp_pos)
    terms = a1y + apy + (1 + (p - 1) * y64).abs() + 1
    l_abs = 16 * EPS64 * aw * terms * (x64.abs() + 1)
    g_abs = 16 * EPS64 * aw * terms
    y_abs = 16 * EPS64 * aw * (1 + ap) * (x64.abs() + 1)
    return lscale, gscale, yscale, l_abs, g_abs, y_abs


def excess(got, ref, tol):
    """Largest ``|got - ref| - tol`` over the elements (NaN matches NaN, inf matches the same inf).

    A result <= 0 means within tolerance.  Returns ``(excess, index_of_worst)``.
    """
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    tol = torch.as_tensor(tol, dtype=torch.float64).broadcast_to(ref.shape)
    if got.shape != ref.shape:
        return math.inf, None
    if got.numel() == 0:
        return -math.inf, None
    both_nan = torch.isnan(got) & torch.isnan(ref)
    same_inf = torch.isinf(got) & torch.isinf(ref) & (got == ref)
    diff = (got - ref).abs() - tol
    diff = torch.where(both_nan | same_inf, torch.full_like(diff, -math.inf), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    worst = int(torch.argmax(diff.reshape(-1)))
    return float(diff.reshape(-1)[worst]), np.unravel_index(worst, ref.shape) if ref.dim() else ()


def torch_bce_with_grads(x, y, weight=None, pos_weight=None, reduction="mean", grad_output=None):
    """torch's value and (input, target) gradients, in the dtypes given."""
    xl = x.detach().clone().requires_grad_(True)
    yl = y.detach().clone().requires_grad_(True)
    out = F.binary_cross_entropy_with_logits(
        xl, yl, weight=weight, pos_weight=pos_weight, reduction=reduction
    )
    go = torch.ones_like(out) if grad_output is None else grad_output
    gx, gy = torch.autograd.grad(out, (xl, yl), go)
    return out.detach(), gx, gy


def bcelogits_with_grads(fn, x, y, weight=None, pos_weight=None, reduction="mean", grad_output=None, **kw):
    """The same through ``fn`` (bcelogits' functional)."""
    xl = x.detach().clone().requires_grad_(True)
    yl = y.detach().clone().requires_grad_(True)
    out = fn(xl, yl, weight=weight, pos_weight=pos_weight, reduction=reduction, **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output
    gx, gy = torch.autograd.grad(out, (xl, yl), go)
    return out.detach(), gx, gy


def numpy_softplus(x):
    """float64 softplus for the torch-free checks."""
    x = np.asarray(x, dtype=np.float64)
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))
