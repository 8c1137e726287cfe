"""The keyword-only options: ignore_index, label_smoothing, class_dim, focal_gamma, strict, the
'weighted_mean' reduction, ``pos_weight_from_targets`` and the module's handling of the options.

Every value is checked against an independent reference written from the option definitions
(``_options_reference``: float64 torch ops differentiated by torch autograd, and mpmath), never
against ``bcelogits._math``.  Paths: torch float32 / float64 (forward, backward for input and target,
input-only fused backward, ``loss_and_grad``) and NumPy float32 / float64 (functional and
``loss_and_grad``), on both backends (``backend`` fixture: plain, and the fused cpu kernel when it is
available).

Tolerances (relative to the reference, plus an absolute allowance relative to the largest reference
value, which covers terms that cancel, e.g. the gradient of a soft target):
float64 rtol 1e-11 / atol 1e-13 * max|ref|; float32 rtol 2e-5 / atol 2e-6 * max|ref|.
The mpmath checks of the focal term are per element: float64 rel err <= 1e-12, float32 <= 1e-5,
wherever the exact value is a normal number of the dtype.

Documented edge behaviour (checked here):
* every element ignored: 'mean' and 'weighted_mean' give 0 with an all-zero gradient (not NaN);
* 'weighted_mean' with a zero weight sum over the kept elements gives 0 with an all-zero gradient;
* 'weighted_mean' divides by the weight only (pos_weight is not in the denominator); without a
  weight it equals 'mean' (also when elements are ignored).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _options_reference import (
    f64,
    is_normal,
    mp_focal,
    mp_focal_dy_by_diff,
    pos_weight_on_class_dim,
    ref_loss,
    ref_pos_weight,
    ref_with_grads,
    rel_err,
)
from hypothesis import given
from hypothesis import strategies as st

import bcelogits

BCE = bcelogits.binary_cross_entropy_with_logits
REDUCTIONS = ["none", "mean", "sum", "weighted_mean"]
PATHS = ["torch32", "torch64", "numpy32", "numpy64"]
SWEEP_PATHS = ["torch32", "numpy64"]  # value sweeps of one option (every path is in the pairs test)
PATH_DTYPE = {
    "torch32": torch.float32,
    "torch64": torch.float64,
    "numpy32": torch.float32,
    "numpy64": torch.float64,
}
NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
TOL = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-13)}

SHAPE = (3, 4, 2, 5)  # (N, C, H, W): 4 classes on dim 1, 5 on the last dim
IGNORE = -1.0

# One representative value per option; the pairs test combines every two of them.
OPTION_VALUES = {
    "ignore": {"ignore_index": IGNORE},
    "smooth": {"label_smoothing": 0.1},
    "class_dim": {"class_dim": 1},
    "focal": {"focal_gamma": 0.5},
    "strict": {"strict": True},
}
SINGLES = [(k,) for k in OPTION_VALUES]
PAIRS = list(itertools.combinations(OPTION_VALUES, 2))


# ----------------------------------------------------------------------------------------------------
# data and comparison helpers
# ----------------------------------------------------------------------------------------------------


def make_data(seed, *, ignore=False, coefs=True, class_dim=None, shape=SHAPE, scale=3.0):
    """float64 (x, y, weight, pos_weight): logits ~ N(0, scale^2), targets a mix of hard 0/1 and soft
    values, a quarter of them ``IGNORE`` when ``ignore``; weight per class (dim 1, positive, one zero),
    pos_weight 1-D along ``class_dim`` when it is set, else along the last dim (torch's broadcasting)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y = torch.rand(shape, generator=g, dtype=torch.float64)
    hard = torch.rand(shape, generator=g, dtype=torch.float64) < 0.4
    y = torch.where(hard, (y > 0.5).to(torch.float64), y)
    if ignore:
        y = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.25, IGNORE, y)
    weight = pos_weight = None
    if coefs:
        weight = torch.rand((shape[1], 1, 1), generator=g, dtype=torch.float64) * 1.8 + 0.2
        weight[-1] = 0.0
        n = shape[class_dim] if class_dim is not None else shape[-1]
        pos_weight = torch.rand((n,), generator=g, dtype=torch.float64) * 2.5 + 0.5
    return x, y, weight, pos_weight


def merged(combo):
    opts = {}
    for name in combo:
        opts.update(OPTION_VALUES[name])
    return opts


def to_path(path, *arrays):
    dtype = PATH_DTYPE[path]
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
        elif path.startswith("torch"):
            out.append(a.to(dtype))
        else:
            out.append(a.numpy().astype(NP_DTYPE[dtype]))
    return out


def assert_close_ref(got, ref, dtype, what):
    """``got`` (torch or numpy, any dtype) against the float64 reference ``ref`` within TOL[dtype]."""
    got64 = (
        f64(got)
        if isinstance(got, (torch.Tensor, np.ndarray))
        else torch.tensor(float(got), dtype=torch.float64)
    )
    assert tuple(got64.shape) == tuple(ref.shape), f"{what}: shape {tuple(got64.shape)} != {tuple(ref.shape)}"
    rtol, atol_rel = TOL[dtype]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(
        got64, ref, rtol=rtol, atol=atol_rel * max(scale, 1e-300), msg=lambda m: f"{what}: {m}"
    )


@functools.cache
def available_backends():
    try:
        from bcelogits.kernels import cpu
    except ImportError:
        return ("plain",)
    return ("plain", "cpu") if cpu.available() else ("plain",)


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def grad_output(reduction, dtype):
    """An upstream gradient other than 1 (1 itself is the fused fast case, used for the input-only
    backward)."""
    if reduction == "none":
        g = torch.Generator().manual_seed(7)
        return (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    return torch.tensor(-2.5, dtype=dtype)


def check_call(path, x, y, weight, pos_weight, reduction, opts):
    """Value, input and target gradients, input-only backward and ``loss_and_grad`` on ``path``
    against the reference (computed from the exact values the call receives)."""
    dtype = PATH_DTYPE[path]
    xp, yp, wp, pp = to_path(path, x, y, weight, pos_weight)
    quiet = no_warnings if opts.get("strict") else contextlib.nullcontext
    ref1, rgx1, _ = ref_with_grads(xp, yp, wp, pp, reduction, **opts)
    if path.startswith("torch"):
        go = grad_output(reduction, dtype)
        ref, rgx, rgy = ref_with_grads(xp, yp, wp, pp, reduction, grad_output=f64(go), **opts)
        xl = xp.clone().requires_grad_(True)
        yl = yp.clone().requires_grad_(True)
        with quiet():
            out = BCE(xl, yl, wp, reduction=reduction, pos_weight=pp, **opts)
        assert out.dtype == dtype
        assert_close_ref(out, ref, dtype, "loss")
        gx, gy = torch.autograd.grad(out, (xl, yl), go)
        assert gx.dtype == dtype and gy.dtype == dtype
        assert_close_ref(gx, rgx, dtype, "d loss / d input")
        assert_close_ref(gy, rgy, dtype, "d loss / d target")
        # input only, upstream gradient 1 (the fused forward+gradient pass handed over as is)
        xl = xp.clone().requires_grad_(True)
        with quiet():
            out = BCE(xl, yp, wp, reduction=reduction, pos_weight=pp, **opts)
        out.backward(torch.ones_like(out))
        assert_close_ref(out.detach(), ref, dtype, "loss (input-only)")
        assert_close_ref(xl.grad, rgx1, dtype, "d loss / d input (input-only backward)")
        with quiet():
            loss, g = bcelogits.loss_and_grad(xp, yp, wp, pp, reduction, **opts)
        assert isinstance(loss, torch.Tensor) and loss.dtype == dtype and g.dtype == dtype
        assert_close_ref(loss, ref1, dtype, "loss_and_grad loss (torch)")
        assert_close_ref(g, rgx1, dtype, "loss_and_grad grad (torch)")
    else:
        with quiet():
            out = BCE(xp, yp, wp, reduction=reduction, pos_weight=pp, **opts)
        assert isinstance(out, (np.ndarray, np.generic)), type(out)
        assert out.dtype == NP_DTYPE[dtype]
        assert_close_ref(np.asarray(out), ref1, dtype, "loss (numpy)")
        with quiet():
            loss, g = bcelogits.loss_and_grad(xp, yp, wp, pp, reduction, **opts)
        assert isinstance(loss, (np.ndarray, np.generic)) and isinstance(g, np.ndarray)
        assert np.asarray(loss).dtype == NP_DTYPE[dtype] and g.dtype == NP_DTYPE[dtype]
        assert_close_ref(np.asarray(loss), ref1, dtype, "loss_and_grad loss (numpy)")
        assert_close_ref(g, rgx1, dtype, "loss_and_grad grad (numpy)")


# ----------------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------------


def test_reference_without_options_is_torch():
    x, y, w, p = make_data(0)
    for reduction in ("none", "mean", "sum"):
        torch.testing.assert_close(
            ref_loss(x, y, w, p, reduction),
            F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p),
            rtol=1e-12,
            atol=1e-14,
        )


def test_reference_focal_agrees_with_mpmath():
    x = torch.tensor([-5.0, -0.5, 0.5, 5.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.3, 0.7], dtype=torch.float64)
    out, gx, gy = ref_with_grads(x, y, reduction="none", focal_gamma=1.5, label_smoothing=0.2)
    for i in range(4):
        loss, dx, dy = mp_focal(float(x[i]), float(y[i]), 1.5, eps=0.2)
        assert rel_err(float(out[i]), loss) < 1e-13
        assert rel_err(float(gx[i]), dx) < 1e-12
        assert rel_err(float(gy[i]), dy) < 1e-12
    # the analytic mpmath d/dy against mpmath.diff, at interior targets, also saturated logits
    for xv, yv, g, e in [
        (-40.0, 0.3, 0.5, 0.0),
        (1e4, 0.3, 0.25, 0.1),
        (5.0, 0.9, 2.0, 0.0),
        (-1e4, 0.01, 2.0, 0.0),
    ]:
        a, b = mp_focal(xv, yv, g, 1.5, 2.0, e)[2], mp_focal_dy_by_diff(xv, yv, g, 1.5, 2.0, e)
        assert abs(a - b) <= 1e-40 * abs(b), (xv, yv, a, b)


# ----------------------------------------------------------------------------------------------------
# every option alone and every pair of options, on every reduction and path
# ----------------------------------------------------------------------------------------------------


COMBOS = [(c, "weighted") for c in SINGLES + PAIRS] + [(c, "unweighted") for c in SINGLES]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("combo,coefs", COMBOS, ids=lambda c: "+".join(c) if isinstance(c, tuple) else c)
def test_options_and_pairs_match_reference(backend, combo, coefs, path, reduction):
    """Each option alone (with and without weight / pos_weight) and every pair of options (with
    both), on every reduction and path."""
    opts = merged(combo)
    seed = 1000 + 17 * (SINGLES + PAIRS).index(combo) + REDUCTIONS.index(reduction)
    x, y, w, p = make_data(
        seed, ignore="ignore_index" in opts, coefs=coefs == "weighted", class_dim=opts.get("class_dim")
    )
    check_call(path, x, y, w, p, reduction, opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", ["torch32", "torch64", "numpy64"])
def test_all_options_at_once(backend, path, reduction):
    opts = {
        "ignore_index": IGNORE,
        "label_smoothing": 0.2,
        "class_dim": -3,
        "focal_gamma": 2.0,
        "strict": True,
    }
    x, y, w, p = make_data(5, ignore=True, class_dim=1)
    check_call(path, x, y, w, p, reduction, opts)


@given(
    seed=st.integers(0, 2**31 - 1),
    reduction=st.sampled_from(REDUCTIONS),
    ignore=st.booleans(),
    eps=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    class_dim=st.sampled_from([None, 0, 1, 2, -1, -2]),
    gamma=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.5]),
    coefs=st.booleans(),
)
def test_random_option_combinations_float64(seed, reduction, ignore, eps, class_dim, gamma, coefs):
    shape = (3, 4, 5)
    x, y, w, p = make_data(seed, ignore=ignore, coefs=False, shape=shape)
    if coefs:
        g = torch.Generator().manual_seed(seed + 1)
        w = torch.rand((5,), generator=g, dtype=torch.float64) + 0.1
        n = shape[class_dim] if class_dim is not None else shape[-1]
        p = torch.rand((n,), generator=g, dtype=torch.float64) * 3 + 0.1
    opts = {
        "ignore_index": IGNORE if ignore else None,
        "label_smoothing": eps,
        "class_dim": class_dim,
        "focal_gamma": gamma,
    }
    ref, rgx, rgy = ref_with_grads(x, y, w, p, reduction, **opts)
    for name in available_backends():  # (hypothesis does not mix with function-scoped fixtures)
        with bcelogits.kernels.use(name):
            xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            out = BCE(xl, yl, w, reduction=reduction, pos_weight=p, **opts)
            gx, gy = torch.autograd.grad(out, (xl, yl), torch.ones_like(out))
        assert_close_ref(out, ref, torch.float64, f"loss [{name}]")
        assert_close_ref(gx, rgx, torch.float64, f"d/dx [{name}]")
        assert_close_ref(gy, rgy, torch.float64, f"d/dy [{name}]")


# ----------------------------------------------------------------------------------------------------
# ignore_index
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", SWEEP_PATHS)
@pytest.mark.parametrize("ignore_value", [-1.0, -100, 0.0, 1.0, 0.5])
def test_ignore_index_values(backend, path, reduction, ignore_value):
    """Any value may be ignored, also one inside [0, 1] (0.0: the hard negatives)."""
    x, y, w, p = make_data(11)
    if ignore_value not in (0.0, 1.0):
        mask = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) < 0.3
        y = torch.where(mask, float(ignore_value), y)
    assert bool((y == ignore_value).any())
    check_call(path, x, y, w, p, reduction, {"ignore_index": ignore_value})


def test_ignored_elements_have_zero_loss_and_gradients(backend):
    x, y, w, p = make_data(12, ignore=True)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = BCE(
        xl, yl, w, reduction="none", pos_weight=p, ignore_index=IGNORE, focal_gamma=0.5, label_smoothing=0.1
    )
    out.backward(torch.full_like(out, 3.0))
    ign = y == IGNORE
    assert bool(ign.any()) and bool((~ign).any())
    assert bool((out.detach()[ign] == 0).all())
    assert bool((xl.grad[ign] == 0).all()) and bool((yl.grad[ign] == 0).all())
    assert bool((out.detach()[~ign & (w.broadcast_to(SHAPE) > 0)] > 0).all())


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean"])
def test_ignored_elements_leave_the_denominator(backend, reduction):
    x, y, w, p = make_data(13, ignore=True)
    full = BCE(x, y, w, reduction="sum", pos_weight=p, ignore_index=IGNORE)
    keep = y != IGNORE
    denom = keep.sum() if reduction == "mean" else (w.broadcast_to(SHAPE) * keep).sum()
    got = BCE(x, y, w, reduction=reduction, pos_weight=p, ignore_index=IGNORE)
    torch.testing.assert_close(got, full / denom, rtol=1e-13, atol=0)


def test_ignore_index_compares_the_raw_target_not_the_smoothed_one(backend):
    x = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    eps = 0.2
    got = BCE(x, y, reduction="none", label_smoothing=eps, ignore_index=0.0)
    ys = y * (1 - eps) + eps / 2
    expect = F.binary_cross_entropy_with_logits(x, ys, reduction="none") * (y != 0)
    torch.testing.assert_close(got, expect, rtol=1e-13, atol=0)
    # 0.1 is what 0 is smoothed to: it matches no raw target, so nothing is ignored
    got = BCE(x, y, reduction="none", label_smoothing=eps, ignore_index=0.1)
    torch.testing.assert_close(
        got, F.binary_cross_entropy_with_logits(x, ys, reduction="none"), rtol=1e-13, atol=0
    )


def test_ignore_index_int_equals_float(backend):
    x, y, w, p = make_data(14, ignore=True)
    a = BCE(x, y, w, pos_weight=p, ignore_index=-1)
    b = BCE(x, y, w, pos_weight=p, ignore_index=-1.0)
    assert torch.equal(a, b)


ALL_IGNORED_OPTS = [
    {},
    {"focal_gamma": 0.5},
    {"label_smoothing": 0.3, "focal_gamma": 2.0},
    {"class_dim": 1, "strict": True},
]


@pytest.mark.parametrize("opts", ALL_IGNORED_OPTS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
def test_every_element_ignored_gives_zero_and_zero_gradient(backend, path, reduction, opts):
    """Documented: with every element ignored, 'mean' (and 'weighted_mean') are 0, not NaN, and the
    gradient is all zeros; 'sum' is 0 and 'none' all zeros."""
    opts = {"ignore_index": IGNORE, **opts}
    x, _, w, p = make_data(15, class_dim=opts.get("class_dim"))
    y = torch.full(SHAPE, IGNORE, dtype=torch.float64)
    xp, yp, wp, pp = to_path(path, x, y, w, p)
    expect_shape = SHAPE if reduction == "none" else ()
    if path.startswith("torch"):
        xl, yl = xp.clone().requires_grad_(True), yp.clone().requires_grad_(True)
        out = BCE(xl, yl, wp, reduction=reduction, pos_weight=pp, **opts)
        assert tuple(out.shape) == expect_shape
        assert bool((out.detach() == 0).all()), out
        gx, gy = torch.autograd.grad(out, (xl, yl), torch.ones_like(out))
        assert bool((gx == 0).all()) and bool((gy == 0).all()), (gx, gy)
        xl = xp.clone().requires_grad_(True)
        out = BCE(xl, yp, wp, reduction=reduction, pos_weight=pp, **opts)
        out.backward(torch.ones_like(out))
        assert bool((xl.grad == 0).all()), xl.grad
    else:
        out = np.asarray(BCE(xp, yp, wp, reduction=reduction, pos_weight=pp, **opts))
        assert out.shape == expect_shape and bool((out == 0).all()), out
    loss, g = bcelogits.loss_and_grad(xp, yp, wp, pp, reduction, **opts)
    assert float(np.asarray(loss).sum() if not isinstance(loss, torch.Tensor) else loss.sum()) == 0.0
    g = g if isinstance(g, np.ndarray) else g.numpy()
    assert g.shape == SHAPE and bool((g == 0).all()), g


def test_every_element_ignored_zero_dim_and_single(backend):
    # (An empty input is left out: whether 'mean' of no elements is torch's NaN or 0 once
    # ignore_index is set is not specified.)
    for shape in [(), (1,)]:
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y = torch.full(shape, IGNORE, dtype=torch.float64)
        out = BCE(x, y, ignore_index=IGNORE)
        assert float(out.detach()) == 0.0, (shape, out)
        out.backward()
        assert x.grad is None or bool((x.grad == 0).all())


# ----------------------------------------------------------------------------------------------------
# label_smoothing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", SWEEP_PATHS)
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5, 1.0])
def test_label_smoothing_values(backend, path, reduction, eps):
    x, y, w, p = make_data(21)
    check_call(path, x, y, w, p, reduction, {"label_smoothing": eps})


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_label_smoothing_equals_torch_on_smoothed_targets(backend, eps):
    x, y, w, p = make_data(22)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = BCE(xl, yl, w, reduction="sum", pos_weight=p, label_smoothing=eps)
    gx, gy = torch.autograd.grad(out, (xl, yl))
    xt, yt = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(xt, yt * (1 - eps) + eps / 2, w, reduction="sum", pos_weight=p)
    rx, ry = torch.autograd.grad(ref, (xt, yt))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy, ry, rtol=1e-12, atol=1e-14)
    if eps == 1.0:  # every target becomes 1/2: the target gradient vanishes (factor 1 - eps)
        assert bool((gy == 0).all())


def test_label_smoothing_target_gradient_factor(backend):
    """d/dy with smoothing eps = (1 - eps) * (d/dy' at the smoothed target y')."""
    x, y, w, p = make_data(23)
    eps = 0.3
    ys = y * (1 - eps) + eps / 2
    yl = y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad(BCE(x, yl, w, reduction="sum", pos_weight=p, label_smoothing=eps), yl)
    ysl = ys.clone().requires_grad_(True)
    (gys,) = torch.autograd.grad(BCE(x, ysl, w, reduction="sum", pos_weight=p), ysl)
    torch.testing.assert_close(gy, (1 - eps) * gys, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# class_dim
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", SWEEP_PATHS)
@pytest.mark.parametrize("class_dim", [0, 1, 2, 3, -1, -2, -3, -4])
def test_class_dim_values(backend, path, reduction, class_dim):
    x, y, w, p = make_data(31, class_dim=class_dim)
    check_call(path, x, y, w, p, reduction, {"class_dim": class_dim})


@pytest.mark.parametrize("class_dim", [1, -3])
def test_class_dim_equals_torch_with_reshaped_pos_weight(backend, class_dim):
    x, y, w, p = make_data(32, class_dim=1)
    got = BCE(x, y, w, reduction="none", pos_weight=p, class_dim=class_dim)
    ref = F.binary_cross_entropy_with_logits(x, y, w, reduction="none", pos_weight=p.reshape(4, 1, 1))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # last dim: class_dim=-1 / 3 is torch's own broadcasting
    x, y, w, p = make_data(33)
    for cd in (-1, 3):
        got = BCE(x, y, w, reduction="none", pos_weight=p, class_dim=cd)
        assert torch.equal(got, BCE(x, y, w, reduction="none", pos_weight=p)), cd


def test_class_dim_does_not_apply_to_weight(backend):
    """class_dim lays out pos_weight only; weight keeps torch's broadcasting (last dim)."""
    x, y, _, p = make_data(34, class_dim=1)
    w_last = torch.rand(5, dtype=torch.float64) + 0.5
    got = BCE(x, y, w_last, reduction="none", pos_weight=p, class_dim=1)
    ref = F.binary_cross_entropy_with_logits(x, y, w_last, reduction="none", pos_weight=p.reshape(4, 1, 1))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    w_class = torch.rand(4, dtype=torch.float64) + 0.5  # a (C,) weight does not broadcast to (.., 5)
    with pytest.raises(RuntimeError):
        BCE(x, y, w_class, pos_weight=p, class_dim=1)


def test_class_dim_without_pos_weight_changes_nothing(backend):
    x, y, w, _ = make_data(35)
    for cd in (0, 1, -1):
        assert torch.equal(BCE(x, y, w, reduction="none", class_dim=cd), BCE(x, y, w, reduction="none"))


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_class_dim_length_mismatch_names_both_sizes(backend, kind):
    x = torch.randn(2, 7, 3)
    y = torch.rand(2, 7, 3)
    p = torch.ones(4)
    if kind == "numpy":
        x, y, p = x.numpy(), y.numpy(), p.numpy()
    with pytest.raises(ValueError) as err:
        BCE(x, y, pos_weight=p, class_dim=1)
    msg = str(err.value)
    assert re.search(r"\b4\b", msg) and re.search(r"\b7\b", msg), msg
    with pytest.raises(ValueError):
        bcelogits.loss_and_grad(x, y, pos_weight=p, class_dim=1)


@pytest.mark.parametrize("pshape", [(7, 1), (1, 7), (2, 7, 3), ()])
def test_class_dim_needs_1d_pos_weight(backend, pshape):
    x = torch.randn(2, 7, 3)
    y = torch.rand(2, 7, 3)
    with pytest.raises(ValueError):
        BCE(x, y, pos_weight=torch.ones(pshape), class_dim=1)


@pytest.mark.parametrize("class_dim", [3, -4, 10])
def test_class_dim_out_of_range(backend, class_dim):
    x = torch.randn(2, 7, 3)
    y = torch.rand(2, 7, 3)
    with pytest.raises((ValueError, IndexError)):
        BCE(x, y, pos_weight=torch.ones(7), class_dim=class_dim)


# ----------------------------------------------------------------------------------------------------
# weighted_mean
# ----------------------------------------------------------------------------------------------------


def test_weighted_mean_hand_example(backend):
    """pos_weight is not in the denominator: w=2, p=3 at x=0, y=1 gives 2*3*log 2 / 2."""
    x = torch.tensor([0.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    w = torch.tensor([2.0, 6.0], dtype=torch.float64)
    p = torch.tensor([3.0], dtype=torch.float64)
    got = BCE(x, y, w, reduction="weighted_mean", pos_weight=p)
    expect = (2 * 3 * math.log(2) + 6 * math.log(2)) / 8
    assert float(got) == pytest.approx(expect, rel=1e-15)
    loss, g = bcelogits.loss_and_grad(x.numpy(), y.numpy(), w.numpy(), p.numpy(), "weighted_mean")
    assert float(loss) == pytest.approx(expect, rel=1e-15)
    np.testing.assert_allclose(g, [2 * 3 * -0.5 / 8, 6 * 0.5 / 8], rtol=1e-15)


def test_weighted_mean_without_weight_is_mean(backend):
    x, y, _, p = make_data(41, ignore=True)
    for opts in ({}, {"ignore_index": IGNORE}, {"ignore_index": IGNORE, "focal_gamma": 2.0}):
        yy = y if opts else y.clamp(0, 1)
        a = BCE(x, yy, reduction="weighted_mean", pos_weight=p, **opts)
        b = BCE(x, yy, reduction="mean", pos_weight=p, **opts)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["zero-weight", "zero-weight-on-kept"])
def test_weighted_mean_zero_weight_sum_is_zero(backend, path, case):
    """Documented: if the weights of the kept elements sum to 0, 'weighted_mean' is 0 with an
    all-zero gradient (not NaN)."""
    x, y, _, p = make_data(42, ignore=case != "zero-weight")
    opts = {}
    if case == "zero-weight":
        w = torch.zeros((4, 1, 1), dtype=torch.float64)
    else:  # weight 0 wherever the target is kept, 1 on the ignored ones
        w = (y == IGNORE).to(torch.float64)
        opts = {"ignore_index": IGNORE}
    xp, yp, wp, pp = to_path(path, x, y, w, p)
    if path.startswith("torch"):
        xl = xp.clone().requires_grad_(True)
        yl = yp.clone().requires_grad_(True)
        out = BCE(xl, yl, wp, reduction="weighted_mean", pos_weight=pp, **opts)
        assert float(out.detach()) == 0.0, out
        gx, gy = torch.autograd.grad(out, (xl, yl))
        assert bool((gx == 0).all()) and bool((gy == 0).all()), (gx, gy)
    else:
        out = BCE(xp, yp, wp, reduction="weighted_mean", pos_weight=pp, **opts)
        assert float(out) == 0.0, out
    loss, g = bcelogits.loss_and_grad(xp, yp, wp, pp, "weighted_mean", **opts)
    assert float(loss) == 0.0
    g = g if isinstance(g, np.ndarray) else g.numpy()
    assert bool((g == 0).all()), g


# ----------------------------------------------------------------------------------------------------
# focal_gamma
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", SWEEP_PATHS)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 2.0, 3.7])
def test_focal_gamma_values(backend, path, reduction, gamma):
    x, y, w, p = make_data(51)
    check_call(path, x, y, w, p, reduction, {"focal_gamma": gamma})


@pytest.mark.parametrize("others", [{}, {"ignore_index": IGNORE, "label_smoothing": 0.1, "class_dim": 1}])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_gamma_zero_is_bitwise_the_plain_loss(backend, dtype, reduction, others):
    x, y, w, p = make_data(52, ignore="ignore_index" in others, class_dim=others.get("class_dim"))
    x, y, w, p = (t.to(dtype) for t in (x, y, w, p))
    results = []
    for kw in ({}, {"focal_gamma": 0.0}, {"focal_gamma": 0}):
        xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = BCE(xl, yl, w, reduction=reduction, pos_weight=p, **others, **kw)
        gx, gy = torch.autograd.grad(out, (xl, yl), torch.ones_like(out))
        ln, gn = bcelogits.loss_and_grad(
            x.numpy(), y.numpy(), w.numpy(), p.numpy(), reduction, **others, **kw
        )
        results.append((out.detach(), gx, gy, torch.from_numpy(np.asarray(ln)), torch.from_numpy(gn)))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_focal_gamma_int_equals_float(backend):
    x, y, w, p = make_data(53)
    assert torch.equal(BCE(x, y, w, pos_weight=p, focal_gamma=2), BCE(x, y, w, pos_weight=p, focal_gamma=2.0))


FOCAL_X = [-40.0, -5.0, -0.5, 0.5, 5.0, 40.0]
FOCAL_Y = [0.0, 1.0, 0.3]
SAT_X = [-1e4, -40.0, 40.0, 1e4]
MP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@functools.cache
def _mp(x, y, gamma, w=1.0, p=1.0, eps=0.0):
    return mp_focal(x, y, gamma, w, p, eps)


def _focal_elementwise(xs, ys, dtype, gamma, **kw):
    """bcelogits' elementwise loss, d/dx and d/dy by every route, as ``{what: [(route, values)]}``."""
    x = torch.tensor(xs, dtype=dtype)
    y = torch.tensor(ys, dtype=dtype)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = BCE(xl, yl, reduction="none", focal_gamma=gamma, **kw)
    gx, gy = torch.autograd.grad(out, (xl, yl), torch.ones_like(out))
    routes = {
        "loss": [("torch 'none'", out.detach())],
        "dx": [("torch 'none' backward", gx)],
        "dy": [("torch 'none' backward", gy)],
    }
    xl = x.clone().requires_grad_(True)
    BCE(xl, y, reduction="sum", focal_gamma=gamma, **kw).backward()
    routes["dx"].append(("torch 'sum' input-only backward", xl.grad))
    for kind, (a, b) in (("torch", (x, y)), ("numpy", (x.numpy(), y.numpy()))):
        loss, g = bcelogits.loss_and_grad(a, b, reduction="none", focal_gamma=gamma, **kw)
        routes["loss"].append((f"loss_and_grad {kind}", torch.as_tensor(np.asarray(loss))))
        routes["dx"].append((f"loss_and_grad {kind}", torch.as_tensor(np.asarray(g))))
    out_np = BCE(x.numpy(), y.numpy(), reduction="none", focal_gamma=gamma, **kw)
    routes["loss"].append(("numpy 'none'", torch.as_tensor(np.asarray(out_np))))
    return x, y, routes


def _compare_mp(x, y, routes, gamma, dtype, which, kw):
    """Per element and route: finite; within MP_TOL of the exact value where that is a normal
    number of ``dtype``; at most 2 * tiny where the exact value underflows."""
    fi = torch.finfo(dtype)
    failures = []
    eps = kw.get("label_smoothing", 0.0)
    for i in range(x.numel()):
        exact = dict(zip(("loss", "dx", "dy"), _mp(float(x[i]), float(y[i]), gamma, 1.0, 1.0, eps)))
        for what in which:
            for route, vals in routes[what]:
                got = float(vals.reshape(-1)[i])
                where = f"{what} [{route}] x={float(x[i])} y={float(y[i])} gamma={gamma} {kw}: got {got!r}"
                ex = mpf_str(exact[what])
                if not math.isfinite(got):
                    failures.append(f"{where}, exact {ex}")
                elif is_normal(exact[what], fi.tiny, fi.max):
                    e = rel_err(got, exact[what])
                    if e > MP_TOL[dtype]:
                        failures.append(f"{where}, exact {ex}, rel err {e:.3g}")
                elif abs(got) > 2 * fi.tiny:  # the exact value underflows: so must the result
                    failures.append(f"{where}, exact {ex} (not normal)")
    return failures


def mpf_str(v):
    import mpmath

    return mpmath.nstr(v, 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_loss_and_input_gradient_match_mpmath(backend, gamma, dtype):
    xs = [a for a in FOCAL_X for _ in FOCAL_Y]
    ys = [b for _ in FOCAL_X for b in FOCAL_Y]
    x, y, routes = _focal_elementwise(xs, ys, dtype, gamma)
    failures = _compare_mp(x, y, routes, gamma, dtype, ("loss", "dx"), {})
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_target_gradient_matches_mpmath(backend, gamma, dtype):
    xs = [a for a in FOCAL_X for _ in FOCAL_Y]
    ys = [b for _ in FOCAL_X for b in FOCAL_Y]
    x, y, routes = _focal_elementwise(xs, ys, dtype, gamma)
    failures = _compare_mp(x, y, routes, gamma, dtype, ("dy",), {})
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}], ids=["hard", "smoothed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_focal_saturated_logits_input_gradient(backend, gamma, dtype, kw):
    """At x = +-40, +-1e4 loss and d/dx are finite for every gamma (also 0 < gamma < 1, where
    (1 - p_t)^(gamma - 1) blows up) and match mpmath where the exact value is normal."""
    xs = [a for a in SAT_X for _ in FOCAL_Y]
    ys = [b for _ in SAT_X for b in FOCAL_Y]
    x, y, routes = _focal_elementwise(xs, ys, dtype, gamma, **kw)
    failures = _compare_mp(x, y, routes, gamma, dtype, ("loss", "dx"), kw)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_focal_saturated_logits_target_gradient(backend, gamma, dtype):
    xs = [a for a in SAT_X for _ in FOCAL_Y]
    ys = [b for _ in SAT_X for b in FOCAL_Y]
    x, y, routes = _focal_elementwise(xs, ys, dtype, gamma)
    failures = _compare_mp(x, y, routes, gamma, dtype, ("dy",), {})
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "weighted_mean"])
def test_focal_saturated_logits_reduced_finite(backend, gamma, reduction):
    x = torch.tensor(SAT_X * 3, dtype=torch.float32).reshape(3, 4).requires_grad_(True)
    y = torch.tensor(FOCAL_Y, dtype=torch.float32).repeat_interleave(4).reshape(3, 4)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])
    p = torch.tensor([2.0, 1.0, 0.5, 4.0])
    out = BCE(x, y, w, reduction=reduction, pos_weight=p, focal_gamma=gamma)
    out.backward()
    assert math.isfinite(float(out.detach())) and bool(torch.isfinite(x.grad).all()), (out, x.grad)
    loss, g = bcelogits.loss_and_grad(
        x.detach().numpy(), y.numpy(), w.numpy(), p.numpy(), reduction, focal_gamma=gamma
    )
    assert math.isfinite(float(loss)) and bool(np.isfinite(g).all()), (loss, g)


# ----------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64 with options on
# ----------------------------------------------------------------------------------------------------

GRADCHECK_OPTS = [
    {"focal_gamma": 0.5},
    {"focal_gamma": 2.0, "label_smoothing": 0.2},
    {"label_smoothing": 0.1, "class_dim": 1, "focal_gamma": 1.5, "strict": True},
    {"ignore_index": IGNORE, "focal_gamma": 0.5},
    {"ignore_index": IGNORE, "label_smoothing": 0.3, "class_dim": -2},
]


def _gradcheck_data(opts):
    g = torch.Generator().manual_seed(61)
    shape = (2, 3, 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    y = torch.rand(shape, generator=g, dtype=torch.float64) * 0.8 + 0.1  # soft: perturbations stay in (0, 1)
    if "ignore_index" in opts:
        y = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.3, IGNORE, y)
    w = torch.rand(2, generator=g, dtype=torch.float64) + 0.2
    p = torch.rand(3 if "class_dim" in opts else 2, generator=g, dtype=torch.float64) * 2 + 0.3
    # The target is differentiated only where no target is ignored: a perturbed ignored target (-1 + h)
    # is no longer ignored, so finite differences across it are meaningless.
    return x, y, w, p, "ignore_index" not in opts


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", GRADCHECK_OPTS, ids=lambda o: "+".join(o))
def test_gradcheck_and_gradgradcheck(backend, opts, reduction):
    x, y, w, p, target_grad = _gradcheck_data(opts)
    x.requires_grad_(True)
    y.requires_grad_(target_grad)

    def f(x, y):
        return BCE(x, y, w, reduction=reduction, pos_weight=p, **opts)

    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, (x, y), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", GRADCHECK_OPTS[:3], ids=lambda o: "+".join(o))
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_gradcheck_forward_mode(backend, opts, reduction):
    x, y, w, p, _ = _gradcheck_data(opts)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def f(x, y):
        return BCE(x, y, w, reduction=reduction, pos_weight=p, **opts)

    assert torch.autograd.gradcheck(
        f, (x, y), eps=1e-6, atol=1e-8, rtol=1e-6, check_forward_ad=True, check_backward_ad=False
    )


# ----------------------------------------------------------------------------------------------------
# strict
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf"), -float("inf"), 1.0000001])
def test_strict_rejects_targets_outside_unit_interval(backend, kind, bad):
    x = torch.randn(4, 3, dtype=torch.float64) * 3
    y = torch.rand(4, 3, dtype=torch.float64)
    y[2, 1] = bad
    if kind == "numpy":
        x, y = x.numpy(), y.numpy()
    with pytest.raises(ValueError):
        BCE(x, y, strict=True)
    with pytest.raises(ValueError):
        bcelogits.loss_and_grad(x, y, strict=True)
    with pytest.raises(ValueError):
        BCE(x, y, strict=True, ignore_index=IGNORE)  # ignoring other values does not help


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_strict_allows_ignored_out_of_range_targets(backend, kind):
    x = torch.randn(4, 3, dtype=torch.float64) * 3
    y = torch.rand(4, 3, dtype=torch.float64)
    y[0, 0] = y[3, 2] = IGNORE
    y[1, 1], y[2, 2] = 0.0, 1.0  # the bounds themselves are fine
    if kind == "numpy":
        x, y = x.numpy(), y.numpy()
    with no_warnings():
        a = BCE(x, y, strict=True, ignore_index=IGNORE)
    b = BCE(x, y, ignore_index=IGNORE)
    assert float(a) == float(b)


def test_strict_ignore_index_inside_interval(backend):
    x = torch.randn(6, dtype=torch.float64) * 3
    y = torch.tensor([0.0, 1.0, 7.0, 0.5, 7.0, 0.2], dtype=torch.float64)
    with no_warnings():
        BCE(x, y, strict=True, ignore_index=7)
    with pytest.raises(ValueError):
        BCE(x, y, strict=True, ignore_index=0.5)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("which", ["weight", "pos_weight", "pos_weight_class_dim"])
def test_strict_rejects_negative_weights(backend, kind, which):
    x = torch.randn(4, 3, dtype=torch.float64) * 3
    y = torch.rand(4, 3, dtype=torch.float64)
    c = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    kw = {"weight": c} if which == "weight" else {"pos_weight": c}
    if which == "pos_weight_class_dim":
        kw = {"pos_weight": torch.tensor([1.0, 2.0, -1e-30, 1.0], dtype=torch.float64), "class_dim": 0}
    if kind == "numpy":
        x, y = x.numpy(), y.numpy()
        kw = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(ValueError):
        BCE(x, y, strict=True, **kw)
    with pytest.raises(ValueError):
        bcelogits.loss_and_grad(x, y, strict=True, **kw)
    # zero weights are fine
    kw0 = {k: (v * 0 if not isinstance(v, int) else v) for k, v in kw.items()}
    with no_warnings():
        BCE(x, y, strict=True, **kw0)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_strict_warns_when_logits_look_like_probabilities(backend, kind):
    x = torch.rand(5, 4, dtype=torch.float64)  # every value in [0, 1]
    x[0, 0], x[1, 1] = 0.0, 1.0
    y = (torch.rand(5, 4, dtype=torch.float64) > 0.5).to(torch.float64)
    if kind == "numpy":
        x, y = x.numpy(), y.numpy()
    with pytest.warns(UserWarning):
        out = BCE(x, y, strict=True)
    assert float(out) == float(BCE(x, y))  # a warning, not a change of value
    with pytest.warns(UserWarning):
        bcelogits.loss_and_grad(x, y, strict=True)
    with no_warnings():  # off by default
        BCE(x, y)
    x2 = x.copy() if kind == "numpy" else x.clone()
    x2[2, 2] = -1e-3  # one logit outside [0, 1] is enough to silence it
    with no_warnings():
        BCE(x2, y, strict=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_strict_off_by_default_accepts_what_torch_accepts(backend, reduction):
    x = torch.rand(4, 5, dtype=torch.float64)  # looks like probabilities
    y = torch.randn(4, 5, dtype=torch.float64) * 2  # targets outside [0, 1]
    w = torch.randn(5, dtype=torch.float64)  # negative weights
    p = torch.randn(5, dtype=torch.float64)
    with no_warnings():
        got = BCE(x, y, w, reduction=reduction, pos_weight=p)
    if reduction != "weighted_mean":
        ref = F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, ref_loss(x, y, w, p, reduction), rtol=1e-10, atol=1e-12)


def test_strict_does_not_change_values(backend):
    x, y, w, p = make_data(71, ignore=True, class_dim=1)
    opts = {"ignore_index": IGNORE, "class_dim": 1, "focal_gamma": 0.5, "label_smoothing": 0.1}
    for reduction in REDUCTIONS:
        xl1, xl2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a = BCE(xl1, y, w, reduction=reduction, pos_weight=p, strict=True, **opts)
        b = BCE(xl2, y, w, reduction=reduction, pos_weight=p, **opts)
        assert torch.equal(a, b)
        a.backward(torch.ones_like(a))
        b.backward(torch.ones_like(b))
        assert torch.equal(xl1.grad, xl2.grad)


# ----------------------------------------------------------------------------------------------------
# bad option values
# ----------------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"label_smoothing": -0.1}, ValueError),
    ({"label_smoothing": 1.5}, ValueError),
    ({"label_smoothing": float("nan")}, ValueError),
    ({"focal_gamma": -1.0}, ValueError),
    ({"focal_gamma": float("nan")}, ValueError),
    ({"class_dim": "1"}, TypeError),
    ({"class_dim": 1.0}, TypeError),
    ({"ignore_index": float("nan")}, ValueError),
    ({"strict": "yes"}, TypeError),
]


@pytest.mark.parametrize("kind", ["torch", "numpy", "loss_and_grad", "module"])
@pytest.mark.parametrize("bad,exc", BAD_OPTIONS, ids=lambda v: repr(v))
def test_bad_option_values(backend, kind, bad, exc):
    x = torch.randn(3, 2)
    y = torch.rand(3, 2)
    with pytest.raises(exc):
        if kind == "torch":
            BCE(x, y, **bad)
        elif kind == "numpy":
            BCE(x.numpy(), y.numpy(), **bad)
        elif kind == "loss_and_grad":
            bcelogits.loss_and_grad(x.numpy(), y.numpy(), **bad)
        else:
            bcelogits.BCEWithLogitsLoss(**bad)(x, y)


@pytest.mark.parametrize(
    "good",
    [
        {"label_smoothing": 0},
        {"label_smoothing": 1},
        {"focal_gamma": 0},
        {"class_dim": np.int64(1)},
        {"ignore_index": -100},
        {"strict": np.bool_(True)},
    ],
)
def test_boundary_option_values_accepted(backend, good):
    x = torch.randn(3, 2) * 3
    y = torch.rand(3, 2)
    assert torch.isfinite(BCE(x, y, **good))


def test_options_are_keyword_only(backend):
    x, y = torch.randn(3, 2), torch.rand(3, 2)
    with pytest.raises(TypeError):
        BCE(x, y, None, None, None, "mean", None, -1.0)
    with pytest.raises(TypeError):
        bcelogits.loss_and_grad(x, y, None, None, "mean", -1.0)
    with pytest.raises(TypeError):
        bcelogits.BCEWithLogitsLoss(None, None, None, "mean", None, -1.0)


# ----------------------------------------------------------------------------------------------------
# pos_weight_from_targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_seed_rule(kind):
    y = np.zeros((400, 2), dtype=np.float32)
    y[:100, 0] = 1  # 100 positive, 300 negative -> 3
    y[:320, 1] = 1  # 320 positive, 80 negative -> 0.25
    yy = torch.from_numpy(y) if kind == "torch" else y
    got = bcelogits.pos_weight_from_targets(yy)
    assert tuple(got.shape) == (2,)
    assert [float(v) for v in got] == [3.0, 0.25]
    assert (got.dtype == torch.float32) if kind == "torch" else (got.dtype == np.float32)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_one_dim_is_one_class(kind):
    y = np.zeros(400)
    y[:100] = 1
    yy = torch.from_numpy(y) if kind == "torch" else y
    got = bcelogits.pos_weight_from_targets(yy)
    assert tuple(got.shape) == (1,) and float(got[0]) == 3.0


@pytest.mark.parametrize("class_dim", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_class_dim_soft_targets(kind, class_dim):
    g = np.random.default_rng(5)
    y = g.random((6, 4, 5))  # soft targets count fractionally
    yy = torch.from_numpy(y) if kind == "torch" else y
    got = bcelogits.pos_weight_from_targets(yy, class_dim=class_dim)
    np.testing.assert_allclose(np.asarray(got), ref_pos_weight(y, class_dim), rtol=1e-12)
    assert tuple(got.shape) == (y.shape[class_dim],)


def test_pos_weight_from_targets_feeds_the_loss_with_class_dim(backend):
    y = (torch.rand(8, 3, 4, dtype=torch.float64) < torch.tensor([0.1, 0.5, 0.8]).reshape(3, 1)).to(
        torch.float64
    )
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    pw = bcelogits.pos_weight_from_targets(y, class_dim=1)
    got = BCE(x, y, pos_weight=pw, class_dim=1, reduction="none")
    ref = F.binary_cross_entropy_with_logits(
        x, y, pos_weight=pos_weight_on_class_dim(pw, 3, 1), reduction="none"
    )
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_class_without_positives_is_named(kind):
    y = np.zeros((50, 6))
    y[::2, [0, 1, 2, 4]] = 1
    y[:, 5] = 0.5  # soft positives count
    yy = torch.from_numpy(y) if kind == "torch" else y
    with pytest.raises(ValueError) as err:
        bcelogits.pos_weight_from_targets(yy)
    msg = str(err.value)
    assert re.search(r"\b3\b", msg), msg
    for other in ("0", "1", "2", "4", "5"):
        assert not re.search(rf"\b{other}\b", msg.replace("(es)", "")), msg
    y1 = np.zeros(10)
    with pytest.raises(ValueError):
        bcelogits.pos_weight_from_targets(torch.from_numpy(y1) if kind == "torch" else y1)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_16_bit_targets_give_float32(kind):
    # 99,999 negatives per positive: float16 (max 65504) would make that inf
    y = np.zeros((100_000, 1), dtype=np.float16)
    y[0] = 1
    yy = torch.from_numpy(y) if kind == "torch" else y
    got = bcelogits.pos_weight_from_targets(yy)
    assert (got.dtype == torch.float32) if kind == "torch" else (got.dtype == np.float32)
    assert float(got[0]) == 99_999.0
    if kind == "torch":
        got = bcelogits.pos_weight_from_targets(yy.to(torch.bfloat16))
        assert got.dtype == torch.float32 and float(got[0]) == 99_999.0


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_pos_weight_from_targets_rejects_nan_targets(kind):
    y = np.zeros((10, 2))
    y[:5] = 1
    y[3, 1] = np.nan
    yy = torch.from_numpy(y) if kind == "torch" else y
    with pytest.raises(ValueError, match="NaN"):
        bcelogits.pos_weight_from_targets(yy)


def test_pos_weight_from_targets_names_itself_for_a_list():
    with pytest.raises(TypeError, match=r"pos_weight_from_targets\(\): target must be .*numpy.asarray"):
        bcelogits.pos_weight_from_targets([[0.0, 1.0], [1.0, 0.0]])


# ----------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------


def test_module_default_repr_and_state_dict():
    m = bcelogits.BCEWithLogitsLoss()
    assert repr(m) == "BCEWithLogitsLoss()" == repr(torch.nn.BCEWithLogitsLoss())
    assert list(m.state_dict()) == list(torch.nn.BCEWithLogitsLoss().state_dict())


def test_module_repr_shows_non_default_options():
    m = bcelogits.BCEWithLogitsLoss(ignore_index=-1.0, focal_gamma=2.0)
    assert repr(m) == "BCEWithLogitsLoss(ignore_index=-1.0, focal_gamma=2.0)"
    m = bcelogits.BCEWithLogitsLoss(
        ignore_index=-1, label_smoothing=0.1, class_dim=1, focal_gamma=2, strict=True
    )
    r = repr(m)
    parts = ["ignore_index=-1.0", "label_smoothing=0.1", "class_dim=1", "focal_gamma=2.0", "strict=True"]
    pos = [r.find(s) for s in parts]
    assert all(i >= 0 for i in pos) and pos == sorted(pos), r
    # options at their defaults are not shown
    m = bcelogits.BCEWithLogitsLoss(
        ignore_index=None, label_smoothing=0.0, class_dim=None, focal_gamma=0.0, strict=False
    )
    assert repr(m) == "BCEWithLogitsLoss()"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_stores_and_applies_options(backend, reduction):
    x, y, w, p = make_data(81, ignore=True, class_dim=1)
    opts = {
        "ignore_index": IGNORE,
        "label_smoothing": 0.1,
        "class_dim": 1,
        "focal_gamma": 0.5,
        "strict": True,
    }
    m = bcelogits.BCEWithLogitsLoss(weight=w, reduction=reduction, pos_weight=p, **opts)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    with no_warnings():
        out = m(xl, yl)
    ref, rgx, rgy = ref_with_grads(x, y, w, p, reduction, **opts)
    assert_close_ref(out, ref, torch.float64, "module loss")
    gx, gy = torch.autograd.grad(out, (xl, yl), torch.ones_like(out))
    assert_close_ref(gx, rgx, torch.float64, "module d/dx")
    assert_close_ref(gy, rgy, torch.float64, "module d/dy")
    # called twice, same result (options are not consumed)
    assert torch.equal(m(x, y), out.detach())


def test_module_state_dict_only_weights_and_round_trip(backend):
    w = torch.rand(4, 1, 1, dtype=torch.float64)
    p = torch.rand(4, dtype=torch.float64) + 0.5
    m = bcelogits.BCEWithLogitsLoss(
        weight=w.clone(), pos_weight=p.clone(), ignore_index=-1.0, class_dim=1, focal_gamma=2.0
    )
    t = torch.nn.BCEWithLogitsLoss(weight=w.clone(), pos_weight=p.clone())
    assert sorted(m.state_dict()) == sorted(t.state_dict()) == ["pos_weight", "weight"]
    # loading torch's state dict (and ours into torch) works both ways
    t2 = torch.nn.BCEWithLogitsLoss(weight=w * 2, pos_weight=p * 3)
    m.load_state_dict(t2.state_dict())
    torch.testing.assert_close(m.pos_weight, p * 3, rtol=0, atol=0)
    t3 = torch.nn.BCEWithLogitsLoss(weight=w.clone(), pos_weight=p.clone())
    t3.load_state_dict(m.state_dict())
    torch.testing.assert_close(t3.weight, w * 2, rtol=0, atol=0)
    x, y, _, _ = make_data(82, ignore=True, class_dim=1)
    assert_close_ref(
        m(x, y),
        ref_loss(x, y, w * 2, p * 3, "mean", ignore_index=-1.0, class_dim=1, focal_gamma=2.0),
        torch.float64,
        "module after load_state_dict",
    )
    assert "ignore_index=-1.0" in repr(m)  # options survive a state-dict load


def test_module_rejects_bad_options_at_construction():
    for bad, exc in BAD_OPTIONS:
        with pytest.raises(exc):
            bcelogits.BCEWithLogitsLoss(**bad)


def test_module_deepcopy_and_pickle_keep_options(backend):
    import copy
    import pickle

    m = bcelogits.BCEWithLogitsLoss(ignore_index=-1.0, label_smoothing=0.2, focal_gamma=1.5)
    for m2 in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert repr(m2) == repr(m)
        x, y, _, _ = make_data(83, ignore=True, coefs=False)
        assert torch.equal(m2(x, y), m(x, y))


# ----------------------------------------------------------------------------------------------------
# label smoothing near y = 1: 1 - ys from y, not from the rounded ys
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("eps", [1e-7, 1e-5, 1e-3, 0.05])
def test_small_label_smoothing_keeps_confident_answers_exact(backend, dtype, eps):
    """With y = 1 (or 0) and a small eps, 1 - ys = eps/2 is the whole big-side coefficient of a confident
    right answer; taken from the rounded ys it was off by up to 19 % in float32 (x = 30, eps = 1e-7) and
    1.6e-9 in float64. Against mpmath, loss and gradient, both targets, both signs of x."""
    import mpmath as mp

    xs = [30.0, 15.0, 4.0, -4.0, -15.0, -30.0, 90.0, -90.0]
    rows = [(x, y) for x in xs for y in (0.0, 1.0)]
    x = torch.tensor([r[0] for r in rows], dtype=dtype, requires_grad=True)
    y = torch.tensor([r[1] for r in rows], dtype=dtype)
    loss = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none", label_smoothing=eps)
    (g,) = torch.autograd.grad(loss.sum(), x)
    tol_l, tol_g = (1e-6, 2e-5) if dtype == torch.float32 else (1e-14, 1e-12)
    with mp.workdps(50):
        E = mp.mpf(eps)
        for i, (xv, yv) in enumerate(rows):
            X = mp.mpf(rows[i][0])  # (exact in both dtypes)
            ys = mp.mpf(yv) * (1 - E) + E / 2
            want = (1 - ys) * mp.log(1 + mp.exp(X)) + ys * mp.log(1 + mp.exp(-X))
            want_g = (1 - ys) / (1 + mp.exp(-X)) - ys / (1 + mp.exp(X))
            assert abs(mp.mpf(float(loss[i])) - want) <= tol_l * abs(want), (xv, yv, float(loss[i]), want)
            assert abs(mp.mpf(float(g[i])) - want_g) <= tol_g * abs(want_g), (xv, yv, float(g[i]), want_g)


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 1e-30), (torch.float32, 1e-39), (torch.float32, 1e-44), (torch.float32, 1e36),
     (torch.float64, 1e-300), (torch.float64, 1e-310), (torch.float64, 1e300)],
)  # fmt: skip
def test_weighted_mean_with_weights_far_from_one(dtype, scale):
    """'weighted_mean' is the same for weights w and c*w. On the fused route, weights far from 1 (products
    with the loss, or 1 / their sum, outside the dtype's range) are scaled by a power of two first: float32
    weights of 1e-39 gave an infinite gradient, 1e-30 a loss 3e-3 off, 1e36 an infinite loss. Checked
    against torch in float64. (The plain path, for other devices and transforms, does not rescale:
    README.)"""
    from bcelogits import kernels
    from bcelogits.kernels import cpu

    if not cpu.available() and not os.environ.get("CI"):  # (CI builds the core: there this must run)
        pytest.skip(f"fused CPU kernel unavailable: {cpu.unavailable_reason}")

    x = torch.tensor([-100.0, 0.5, -30.0, 4.0], dtype=dtype, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 0.3], dtype=dtype)
    w = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=dtype) * scale  # (rounded in the dtype, maybe subnormal)
    with kernels.use("cpu"):
        got = bcelogits.binary_cross_entropy_with_logits(x, y, weight=w, reduction="weighted_mean")
        (g,) = torch.autograd.grad(got, x)
    # Reference: torch in float64 on the same (rounded) weights, normalised before use so that nothing
    # leaves float64's range: sum(w l) / sum(w) = sum((w/m) l) / sum(w/m).
    x64, y64, w64 = (t.detach().double() for t in (x, y, w))
    w64 = w64 / w64.max()
    x64.requires_grad_()
    want = F.binary_cross_entropy_with_logits(x64, y64, weight=w64, reduction="sum") / w64.sum()
    (gw,) = torch.autograd.grad(want, x64)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(g.double(), gw, rtol=tol, atol=1e-300)
