"""Hypothesis property tests of the loss (both backends, torch and NumPy paths).

* l >= 0 for y in [0, 1] and w, p >= 0 (any logit, including huge ones);
* symmetry l(x, y) = l(-x, 1 - y) when p = 1 (targets on a dyadic grid so 1 - y is exact);
* d l / d x and d l / d y equal central finite differences (float64);
* sum = mean * N;
* pos_weight of ones equals no pos_weight; weights scale the loss linearly;
* the two backends, and the torch and NumPy paths, agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bcelogits

bce = bcelogits.binary_cross_entropy_with_logits

DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}


def logits(dtype=np.float64, max_abs=1e4):
    return st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=64).map(
        lambda v: float(dtype(v))
    )


def arrays_of(elements, min_size=1, max_size=40):
    return st.lists(elements, min_size=min_size, max_size=max_size)


@st.composite
def problems(draw, max_abs=1e4, soft=True, min_size=1):
    """(x, y, w, p) lists of one length: logits, targets in [0,1], non-negative weights."""
    n = draw(st.integers(min_size, 40))
    x = draw(st.lists(logits(max_abs=max_abs), min_size=n, max_size=n))
    target = st.floats(0.0, 1.0) if soft else st.sampled_from([0.0, 1.0])
    y = draw(st.lists(target, min_size=n, max_size=n))
    w = draw(st.lists(st.floats(0.0, 1e3), min_size=n, max_size=n))
    p = draw(st.lists(st.floats(0.0, 1e3), min_size=n, max_size=n))
    return x, y, w, p


def _cpu_available():
    try:
        from bcelogits.kernels import cpu
    except ImportError:  # pragma: no cover
        return False
    return bool(cpu.available())


def _t(v, dtype):
    return torch.tensor(v, dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(prob=problems())
def test_loss_is_non_negative(backend, dtype, prob):
    tdt, ndt = DTYPES[dtype]
    x, y, w, p = prob
    out = bce(_t(x, tdt), _t(y, tdt), _t(w, tdt), reduction="none", pos_weight=_t(p, tdt))
    assert not torch.isnan(out).any()
    assert (out >= 0).all(), out
    out_np = bce(
        np.array(x, ndt), np.array(y, ndt), np.array(w, ndt), reduction="none", pos_weight=np.array(p, ndt)
    )
    assert (np.asarray(out_np) >= 0).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(
    x=st.lists(logits(max_abs=200.0), min_size=1, max_size=30),
    k=st.lists(st.integers(0, 1024), min_size=30, max_size=30),
    w=st.floats(0.01, 100.0),
)
def test_symmetry_when_pos_weight_is_one(backend, dtype, x, k, w):
    tdt, _ = DTYPES[dtype]
    y = [ki / 1024 for ki in k[: len(x)]]  # dyadic: 1 - y is exact
    xt, yt = _t(x, tdt), _t(y, tdt)
    wt = torch.full_like(xt, w)
    a = bce(xt, yt, wt, reduction="none")
    b = bce(-xt, 1 - yt, wt, reduction="none")
    rtol = 1e-14 if tdt == torch.float64 else 2e-6
    torch.testing.assert_close(a, b, rtol=rtol, atol=torch.finfo(tdt).tiny)
    # and with pos_weight=1 given explicitly
    c = bce(-xt, 1 - yt, wt, reduction="none", pos_weight=torch.ones_like(xt))
    torch.testing.assert_close(a, c, rtol=rtol, atol=torch.finfo(tdt).tiny)


@given(
    x=st.floats(-30.0, 30.0),
    y=st.floats(0.0, 1.0),
    w=st.floats(0.1, 10.0),
    p=st.floats(0.0, 10.0),
)
def test_gradients_equal_finite_differences(backend, x, y, w, p):
    dt = torch.float64
    xt = torch.tensor([x], dtype=dt, requires_grad=True)
    yt = torch.tensor([y], dtype=dt, requires_grad=True)
    wt, pt = torch.tensor([w], dtype=dt), torch.tensor([p], dtype=dt)
    out = bce(xt, yt, wt, reduction="sum", pos_weight=pt)
    gx, gy = torch.autograd.grad(out, (xt, yt))

    def f(xv, yv):
        return bce(
            torch.tensor([xv], dtype=dt), torch.tensor([yv], dtype=dt), wt, reduction="sum", pos_weight=pt
        ).item()

    h = 1e-5 * max(1.0, abs(x))
    xp, xm = x + h, x - h
    fd_x = (f(xp, y) - f(xm, y)) / (xp - xm)
    hy = 1e-6
    yp, ym = y + hy, y - hy
    fd_y = (f(x, yp) - f(x, ym)) / (yp - ym)
    sx = torch.sigmoid(torch.tensor(x, dtype=dt)).item()
    gscale = w * ((1 - y) * sx + p * y * (1 - sx)) + 1e-300
    loss_size = abs(out.item()) + w * (1 + p) * (abs(x) + 1)
    # central differences: truncation O(h^2 f''') plus rounding O(eps |f| / h)
    assert abs(gx.item() - fd_x) <= 1e-6 * gscale + 1e-15 * loss_size / h, (gx.item(), fd_x)
    assert abs(gy.item() - fd_y) <= 1e-7 * loss_size + 1e-15 * loss_size / hy, (gy.item(), fd_y)


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(prob=problems(max_abs=50.0))
def test_sum_equals_mean_times_n(backend, dtype, prob):
    tdt, ndt = DTYPES[dtype]
    x, y, w, p = prob
    args = (_t(x, tdt), _t(y, tdt), _t(w, tdt))
    s = bce(*args, reduction="sum", pos_weight=_t(p, tdt))
    m = bce(*args, reduction="mean", pos_weight=_t(p, tdt))
    n = bce(*args, reduction="none", pos_weight=_t(p, tdt))
    rtol = 1e-13 if tdt == torch.float64 else 1e-5
    tiny = torch.finfo(tdt).tiny
    torch.testing.assert_close(s, m * len(x), rtol=rtol, atol=tiny * len(x))
    torch.testing.assert_close(s, n.double().sum().to(tdt), rtol=rtol, atol=tiny * len(x))
    xs, ys, ws, ps = (np.array(v, ndt) for v in (x, y, w, p))
    sn = bce(xs, ys, ws, reduction="sum", pos_weight=ps)
    mn = bce(xs, ys, ws, reduction="mean", pos_weight=ps)
    np.testing.assert_allclose(sn, mn * len(x), rtol=rtol, atol=tiny * len(x))


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(prob=problems(max_abs=100.0), c=st.floats(1e-3, 1e3))
def test_weight_scales_linearly_and_unit_pos_weight_is_none(backend, dtype, prob, c):
    tdt, _ = DTYPES[dtype]
    x, y, _, _ = prob
    xt, yt = _t(x, tdt), _t(y, tdt)
    base = bce(xt, yt, reduction="none")
    ones = bce(xt, yt, reduction="none", pos_weight=torch.ones_like(xt))
    torch.testing.assert_close(base, ones, rtol=4 * torch.finfo(tdt).eps, atol=0)
    scaled = bce(xt, yt, torch.full_like(xt, c), reduction="none")
    rtol = 1e-14 if tdt == torch.float64 else 1e-6
    torch.testing.assert_close(
        scaled,
        (base.double() * torch.tensor(c, dtype=tdt).double()).to(tdt),
        rtol=rtol,
        atol=torch.finfo(tdt).tiny,
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(prob=problems(max_abs=1e3), reduction=st.sampled_from(["none", "mean", "sum"]))
def test_backends_and_array_libraries_agree(dtype, prob, reduction):
    tdt, ndt = DTYPES[dtype]
    x, y, w, p = prob
    xt = _t(x, tdt).requires_grad_(True)
    yt, wt, pt = _t(y, tdt), _t(w, tdt), _t(p, tdt)
    results = {}
    backends = ["plain"] + (["cpu"] if _cpu_available() else [])
    for b in backends:
        with bcelogits.kernels.use(b):
            out = bce(xt, yt, wt, reduction=reduction, pos_weight=pt)
            (g,) = torch.autograd.grad(out, xt, torch.ones_like(out))
            on = bce(
                np.array(x, ndt),
                np.array(y, ndt),
                np.array(w, ndt),
                reduction=reduction,
                pos_weight=np.array(p, ndt),
            )
            ln, gn = bcelogits.loss_and_grad(
                np.array(x, ndt), np.array(y, ndt), np.array(w, ndt), np.array(p, ndt), reduction
            )
        results[b] = (
            out.detach().double().numpy(),
            g.double().numpy(),
            np.asarray(on, np.float64),
            np.asarray(ln, np.float64),
            np.asarray(gn, np.float64),
        )
    ref = results["plain"]
    # loss: a few ulps; gradient: relative to its term scale
    xs, ys, ws, ps = (np.array(v, np.float64) for v in (x, y, w, p))
    s_pos = np.exp(-np.logaddexp(0.0, -xs))  # sigma(x), no cancellation
    s_neg = np.exp(-np.logaddexp(0.0, xs))  # sigma(-x)
    gscale = ws * ((1 - ys) * s_pos + ps * ys * s_neg)
    if reduction == "mean":
        gscale = gscale / len(x)
    eps = float(np.finfo(ndt).eps)
    tiny = float(np.finfo(ndt).tiny)
    for b, (lo, go, on, ln, gn) in results.items():
        lrtol = (16 if reduction == "none" else 64) * eps  # reductions may sum in another order
        for name, v in (("torch", lo), ("numpy", on), ("loss_and_grad", ln)):
            np.testing.assert_allclose(v, ref[0], rtol=lrtol, atol=tiny, err_msg=f"{b} {name} loss")
        for name, v in (("torch grad", go), ("loss_and_grad grad", gn)):
            assert (np.abs(v - ref[1]) <= 64 * eps * gscale + tiny).all(), (b, name, v, ref[1])


@given(
    x=hnp.arrays(
        np.float64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), elements=st.floats(-40, 40)
    ),
    data=st.data(),
)
def test_torch_parity_random_shapes(backend, x, data):
    y = data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(0, 1)))
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ours = bce(xt, yt, reduction=reduction)
    theirs = torch.nn.functional.binary_cross_entropy_with_logits(xt, yt, reduction=reduction)
    assert ours.shape == theirs.shape
    # torch float64 loses ~|x| eps absolute to cancellation
    atol = 1e-15 * (1 + np.abs(x).sum()) if x.size else 0.0
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=atol, equal_nan=True)
