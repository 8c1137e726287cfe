"""``weight * pos_weight`` far outside float32's range: never NaN for non-NaN input, +inf only where the
exact value overflows, and the exact value (to float32 accuracy) otherwise, on every route.

The exact values are computed with mpmath from the definition, 50 digits. Before the fix (float32 calls
with both weights are computed in float64 when their products leave 2**+-100), w = p = 1e30 gave NaN at
x = 700, y = 0.5 (exact 3.5e32) and inf at x = 100 (exact 5e31), and w = p = 1e-30 gave 0 at x = -inf,
y = 1 (exact +inf).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch

import bcelogits
from bcelogits import kernels

mp.mp.dps = 50
F32_MAX = float(np.finfo(np.float32).max)
XS = [-math.inf, -700.0, -100.0, -3.0, 0.0, 3.0, 100.0, 700.0, math.inf]
YS = [0.0, 0.5, 1.0]
SCALES = [(1e30, 1e30), (1e-30, 1e-30), (1e30, 1e-30), (1e-30, 1e30), (1e25, 1e20), (1.0, 1.0)]


def _softplus(t):
    if t == mp.inf:
        return mp.inf
    if t == -mp.inf:
        return mp.mpf(0)
    return t + mp.log1p(mp.exp(-t)) if t > 0 else mp.log1p(mp.exp(t))


def _times(c, v):
    return mp.mpf(0) if c == 0 else c * v  # (a zero coefficient times an infinite softplus is 0)


def exact(x, y, w, p):
    """(loss, d loss / dx) from the definition, in 50-digit arithmetic."""
    x, y, w, p = (mp.mpf(v) for v in (x, y, w, p))
    loss = w * (_times(1 - y, _softplus(x)) + _times(p * y, _softplus(-x)))
    sig = mp.mpf(1) if x == mp.inf else mp.mpf(0) if x == -mp.inf else 1 / (1 + mp.exp(-x))
    grad = w * ((1 - y) * sig - p * y * (1 - sig))
    return loss, grad


def _as_float32_expectation(v):
    """The float32 value the exact ``v`` rounds to (+-inf beyond float32's range)."""
    if abs(v) > F32_MAX:
        return math.copysign(math.inf, float(v))
    return float(np.float32(float(v)))


def _check(got, want, what):
    assert not math.isnan(got), (what, got, want)
    if math.isinf(want):
        assert got == want, (what, got, want)
        return
    assert math.isfinite(got), (what, got, want)
    # float32 accuracy; values in float32's denormal range are held to an absolute 1e-44
    assert abs(got - want) <= 1e-5 * abs(want) + 1e-44, (what, got, want)


def _grid():
    xs, ys = np.meshgrid(np.array(XS), np.array(YS), indexing="ij")
    return torch.tensor(xs.ravel(), dtype=torch.float32), torch.tensor(ys.ravel(), dtype=torch.float32)


@pytest.mark.parametrize("route", ["plain", "cpu", "triton"])
@pytest.mark.parametrize("w,p", SCALES)
def test_extreme_weight_products_are_exact_and_never_nan(route, w, p):
    x, y = _grid()
    weight, pos_weight = torch.full_like(x, w), torch.full_like(x, p)
    xg = x.clone().requires_grad_()
    with kernels.use(route):
        loss = bcelogits.binary_cross_entropy_with_logits(
            xg, y, weight, reduction="none", pos_weight=pos_weight
        )
        (grad,) = torch.autograd.grad(loss.sum(), xg)
        _, grad_fused = bcelogits.loss_and_grad(x, y, weight, pos_weight, reduction="sum")
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    for i in range(x.numel()):
        want_l, want_g = exact(float(x[i]), float(y[i]), float(weight[i]), float(pos_weight[i]))
        what = (route, float(x[i]), float(y[i]), w, p)
        _check(float(loss[i].detach()), _as_float32_expectation(want_l), what + ("loss",))
        _check(float(grad[i]), _as_float32_expectation(want_g), what + ("grad",))
        _check(float(grad_fused[i]), _as_float32_expectation(want_g), what + ("loss_and_grad",))


@pytest.mark.parametrize("route", ["plain", "cpu"])
def test_numpy_and_reductions(route):
    x, y = _grid()
    keep = torch.isfinite(x)  # (the sum of an infinite loss is inf on both sides; keep it simple)
    x, y = x[keep], y[keep]
    w, p = np.full(x.shape, 1e30, np.float32), np.full(x.shape, 1e30, np.float32)
    with kernels.use(route):
        got = bcelogits.binary_cross_entropy_with_logits(
            x.numpy(), y.numpy(), w, reduction="none", pos_weight=p
        )
        total = bcelogits.binary_cross_entropy_with_logits(
            x.numpy(), y.numpy(), w, reduction="sum", pos_weight=p
        )
    assert got.dtype == np.float32
    wants = [exact(float(a), float(b), 1e30, 1e30)[0] for a, b in zip(x, y)]
    for g, want in zip(got.tolist(), wants):
        _check(g, _as_float32_expectation(want), (route, "numpy"))
    _check(float(total), _as_float32_expectation(mp.fsum(wants)), (route, "sum"))


def test_ordinary_weights_stay_in_float32():
    """The float64 route is taken only for products beyond 2**+-100: ordinary weights keep the float32
    kernel (the rule reads the weights, not the input)."""
    from bcelogits import _args

    x = torch.randn(10, 4)
    call = _args.parse(
        x, torch.rand(10, 4), torch.rand(4) * 1e6, torch.rand(4) * 1e6, "mean", _args.Options()
    )
    assert call.compute_dtype == torch.float32
    call = _args.parse(
        x, torch.rand(10, 4), torch.full((4,), 1e30), torch.full((4,), 1e30), "mean", _args.Options()
    )
    assert call.compute_dtype == torch.float64
