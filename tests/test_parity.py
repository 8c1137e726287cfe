"""Parity with ``torch.nn.functional.binary_cross_entropy_with_logits`` (values, gradients, dtypes).

The randomised grid covers input shapes with 0..4 dimensions (0-dim, empty, size-1 dims), every
reduction, every supported weight / pos_weight broadcast pattern, float32 and float64, and
non-contiguous (transposed, sliced, expanded) inputs and targets, on both backends.  Reference values
are torch's own, computed in float64 on the exact inputs (``_reference.torch_f64_loss``): logits stay
in |x| < 10 where torch is accurate, and the tolerance is relative to the size of the loss terms
(rtol 1e-5 for float32, 1e-12 for float64) plus an allowance for torch's own float64 rounding.  Output
shape and dtype are compared with torch called in the same dtypes.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import (
    bcelogits_with_grads,
    element_scales,
    excess,
    torch_bce_with_grads,
)

import bcelogits

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}

SHAPES = [
    (),
    (0,),
    (3, 0),
    (0, 4),
    (2, 0, 3),
    (1,),
    (1, 1),
    (4, 1),
    (1, 5),
    (2, 1, 3),
    (7,),
    (4, 3),
    (2, 3, 4),
    (3, 1, 2, 1),
    (2, 3, 4, 5),
]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def weight_shapes(shape):
    """Every weight shape torch accepts for this input shape (broadcast without enlarging)."""
    nd = len(shape)
    out = {"none": None, "scalar": ()}
    if nd >= 1:
        out["last(C,)"] = (shape[-1],)
    out["full"] = tuple(shape)
    if nd >= 2:
        out["row(1,C)"] = (1, shape[-1])
    if nd >= 3:
        out["middle-broadcast"] = (shape[0],) + (1,) * (nd - 2) + (shape[-1],)
    return out


def pos_weight_shapes(shape):
    nd = len(shape)
    out = {"none": None, "scalar": ()}
    if nd >= 1:
        out["last(C,)"] = (shape[-1],)
    out["full"] = tuple(shape)
    if nd >= 3:
        out["channel(C,1,1)"] = (shape[1],) + (1,) * (nd - 2)
    return out


def make_leaf(shape, layout, dtype, gen, kind):
    """A leaf ``base`` and a function mapping it to a tensor of ``shape`` with the given layout."""
    nd = len(shape)

    def values(s):
        if kind == "logit":
            return (torch.rand(s, generator=gen, dtype=torch.float64) * 19.0 - 9.5).to(dtype)
        t = torch.rand(s, generator=gen, dtype=torch.float64)
        hard = torch.rand(s, generator=gen, dtype=torch.float64)
        t = torch.where(hard < 0.2, torch.zeros_like(t), torch.where(hard > 0.8, torch.ones_like(t), t))
        return t.to(dtype)

    if layout == "transposed" and nd >= 2:
        base = values(tuple(reversed(shape)))
        return base, lambda b: b.permute(*reversed(range(nd)))
    if layout == "sliced" and nd >= 1:
        base = values(tuple(shape[:-1]) + (2 * shape[-1] + 1,))
        return base, lambda b: b[..., ::2][..., : shape[-1]]
    if layout == "expanded" and nd >= 1:
        base = values((1,) + tuple(shape[1:]))
        return base, lambda b: b.expand(*shape)
    base = values(tuple(shape))
    return base, lambda b: b


def make_coef(shape, dtype, gen, low, high, noncontig):
    if shape is None:
        return None
    t = (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)
    if noncontig and len(shape) >= 1 and shape[-1] > 1:
        # same values, strided storage
        big = torch.zeros(tuple(shape[:-1]) + (2 * shape[-1],), dtype=dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    return t


def view_backward(view, base_shape, tol_view):
    """Map a per-element tolerance of the view back onto its base (sums over expanded elements)."""
    dummy = torch.zeros(base_shape, dtype=torch.float64, requires_grad=True)
    v = view(dummy)
    (g,) = torch.autograd.grad(v, dummy, tol_view, allow_unused=True)
    return torch.zeros(base_shape, dtype=torch.float64) if g is None else g


def run_case(shape, wname, wshape, pname, pshape, dtype, reduction, seed):
    """Compare bcelogits with torch on one configuration; return a list of failure descriptions."""
    gen = torch.Generator().manual_seed(seed)
    lx, ly = LAYOUTS[seed % 4], LAYOUTS[(seed // 4) % 4]
    bx, vx = make_leaf(shape, lx, dtype, gen, "logit")
    by, vy = make_leaf(shape, ly, dtype, gen, "target")
    w = make_coef(wshape, dtype, gen, 0.1, 2.0, noncontig=seed % 3 == 0)
    p = make_coef(pshape, dtype, gen, 0.1, 4.0, noncontig=seed % 5 == 0)
    case = (
        f"shape={shape} x:{lx} y:{ly} weight={wname}{tuple(wshape) if wshape is not None else ''} "
        f"pos_weight={pname}{tuple(pshape) if pshape is not None else ''} {dtype} reduction={reduction}"
    )
    failures = []

    # ours, with gradients w.r.t. the bases of input and target
    bxl = bx.clone().requires_grad_(True)
    byl = by.clone().requires_grad_(True)
    out = bcelogits.binary_cross_entropy_with_logits(vx(bxl), vy(byl), w, reduction=reduction, pos_weight=p)

    # torch in the same dtypes: shape and dtype contract
    same = F.binary_cross_entropy_with_logits(vx(bx), vy(by), w, reduction=reduction, pos_weight=p)
    if out.shape != same.shape or out.dtype != same.dtype:
        return [
            f"{case}: got shape/dtype {tuple(out.shape)}/{out.dtype}, torch {tuple(same.shape)}/{same.dtype}"
        ]
    if not out.requires_grad:
        return [f"{case}: result does not require grad"]

    # torch in float64 on the exact inputs: the value and gradient reference
    bx64 = bx.double().requires_grad_(True)
    by64 = by.double().requires_grad_(True)
    w64 = None if w is None else w.double()
    p64 = None if p is None else p.double()
    ref = F.binary_cross_entropy_with_logits(vx(bx64), vy(by64), w64, reduction=reduction, pos_weight=p64)

    n = max(vx(bx).numel(), 1)
    if reduction == "none":
        go64 = torch.rand(ref.shape, generator=gen, dtype=torch.float64) * 2 - 1
        go = go64.to(dtype)
        go64 = go.double()
    else:
        go64 = torch.ones((), dtype=torch.float64)
        go = go64.to(dtype)
    gx, gy = torch.autograd.grad(out, (bxl, byl), go)
    rgx, rgy = torch.autograd.grad(ref, (bx64, by64), go64)

    lscale, gscale, yscale, l_abs, g_abs, y_abs = element_scales(vx(bx), vy(by), w, p)
    rtol = RTOL[dtype]
    if reduction == "none":
        ltol = rtol * lscale + l_abs
        gmul = go64.abs().broadcast_to(lscale.shape)
    else:
        factor = 1.0 / n if reduction == "mean" else 1.0
        ltol = (rtol * lscale + l_abs).sum() * factor + rtol * ref.detach().abs()
        gmul = torch.full(lscale.shape, factor, dtype=torch.float64)
    gtol = view_backward(vx, bx.shape, (rtol * gscale + g_abs) * gmul)
    ytol = view_backward(vy, by.shape, (rtol * yscale + y_abs) * gmul)

    for what, got, want, tol in (
        ("value", out, ref, ltol),
        ("grad_input", gx, rgx, gtol),
        ("grad_target", gy, rgy, ytol),
    ):
        if what != "value" and got.dtype != dtype:
            failures.append(f"{case}: {what} dtype {got.dtype}, expected {dtype}")
        e, where = excess(got, want, tol)
        if e > 0:
            idx = tuple(int(i) for i in where) if where is not None else None
            g_at = got.detach().double()[idx].item() if idx is not None else got
            w_at = want.detach().double()[idx].item() if idx is not None else want
            failures.append(
                f"{case}: {what} off by {e:.3g} beyond tolerance at {idx}: got {g_at!r}, torch {w_at!r}"
            )
    return failures


def grid():
    for shape in SHAPES:
        ws, ps = weight_shapes(shape), pos_weight_shapes(shape)
        for (wname, wshape), (pname, pshape) in itertools.product(ws.items(), ps.items()):
            yield shape, wname, wshape, pname, pshape


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_parity_grid(backend, dtype, reduction):
    failures = []
    count = 0
    for seed, case in enumerate(grid()):
        failures += run_case(*case, dtype=dtype, reduction=reduction, seed=seed)
        count += 1
    assert count > 200
    assert not failures, f"{len(failures)} of {count} configurations differ from torch:\n" + "\n".join(
        failures[:25]
    )


# ----------------------------------------------------------------------------------------------------
# positional call order and defaults (drop-in)
# ----------------------------------------------------------------------------------------------------


def test_positional_arguments_follow_torch_order(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 3, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    p = torch.rand(3, dtype=torch.float64) * 3
    for reduction in ("none", "mean", "sum"):
        ours = bcelogits.binary_cross_entropy_with_logits(x, y, w, None, None, reduction, p)
        theirs = F.binary_cross_entropy_with_logits(x, y, w, None, None, reduction, p)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_default_reduction_is_mean(backend):
    x = torch.randn(5, 2)
    y = torch.rand(5, 2)
    out = bcelogits.binary_cross_entropy_with_logits(x, y)
    assert out.dim() == 0
    torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(x, y), rtol=1e-5, atol=1e-7)


def test_keyword_options_default_off(backend):
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.rand(6, 3, dtype=torch.float64)
    base = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none")
    explicit = bcelogits.binary_cross_entropy_with_logits(
        x,
        y,
        reduction="none",
        ignore_index=None,
        label_smoothing=0.0,
        class_dim=None,
        focal_gamma=0.0,
        strict=False,
    )
    torch.testing.assert_close(base, explicit, rtol=0, atol=0)
    torch.testing.assert_close(
        base, F.binary_cross_entropy_with_logits(x, y, reduction="none"), rtol=1e-12, atol=1e-15
    )


# ----------------------------------------------------------------------------------------------------
# dtype rules: result dtype = target dtype, gradient dtype = input dtype, autocast like torch
# ----------------------------------------------------------------------------------------------------

MIXED = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float16),
]


def _rtol_for(*dtypes):
    eps = max(torch.finfo(d).eps for d in dtypes)
    return max(2 * eps, 1e-5)


@pytest.mark.parametrize("xdt,ydt", MIXED, ids=[f"{a}-{b}".replace("torch.", "") for a, b in MIXED])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mixed_dtypes_follow_torch(backend, xdt, ydt, reduction):
    gen = torch.Generator().manual_seed(7)
    x = (torch.rand(6, 5, generator=gen, dtype=torch.float64) * 16 - 8).to(xdt)
    y = torch.rand(6, 5, generator=gen, dtype=torch.float64).to(ydt)
    w = torch.rand(5, generator=gen).to(ydt)
    p = (torch.rand(5, generator=gen) * 3).to(ydt)
    go = None if reduction != "none" else torch.rand(6, 5, generator=gen).to(ydt)
    ours, gx, gy = bcelogits_with_grads(bcelogits.binary_cross_entropy_with_logits, x, y, w, p, reduction, go)
    theirs, tgx, tgy = torch_bce_with_grads(x, y, w, p, reduction, go)
    assert ours.dtype == theirs.dtype == ydt
    assert gx.dtype == tgx.dtype == xdt
    assert gy.dtype == tgy.dtype == ydt
    assert ours.shape == theirs.shape
    # value reference: torch in float64 on the exact values; tolerance of the lowest precision involved
    ref, rgx, rgy = torch_bce_with_grads(
        x.double(), y.double(), w.double(), p.double(), reduction, None if go is None else go.double()
    )
    rtol = _rtol_for(xdt, ydt)
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=rtol * 1e-2)
    lscale, gscale, yscale, *_ = element_scales(x, y, w, p)
    gmul = 1.0 / x.numel() if reduction == "mean" else 1.0
    if go is not None:
        gmul = go.double().abs()
    # plus half the smallest subnormal step of the gradient's dtype (mean-reduced gradients can be tiny)
    xsub = torch.finfo(xdt).tiny * torch.finfo(xdt).eps
    ysub = torch.finfo(ydt).tiny * torch.finfo(ydt).eps
    assert excess(gx, rgx, 2 * rtol * gscale * gmul + xsub)[0] <= 0, (gx, rgx)
    assert excess(gy, rgy, 2 * rtol * yscale * gmul + ysub)[0] <= 0, (gy, rgy)


@pytest.mark.parametrize("wdt", [torch.float64, torch.float16])
def test_weight_dtype_does_not_change_result_dtype(backend, wdt):
    x = torch.randn(4, 3)
    y = torch.rand(4, 3)
    w = torch.rand(3).to(wdt)
    p = (torch.rand(3) * 2).to(wdt)
    ours = bcelogits.binary_cross_entropy_with_logits(x, y, w, pos_weight=p, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, y, w, pos_weight=p, reduction="none")
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_autocast_bfloat16_gives_float32_like_torch(backend, xdt, reduction):
    x = torch.randn(8, 4).to(xdt)
    y = torch.rand(8, 4).to(xdt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = bcelogits.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        theirs = F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
    assert theirs.dtype == torch.float32
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_autocast_linear_output_into_loss_like_torch(backend):
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5)
    y = torch.rand(7, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        ours = bcelogits.binary_cross_entropy_with_logits(logits, y)
        theirs = F.binary_cross_entropy_with_logits(logits, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, lin.weight, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, lin.weight)
    assert g_ours.dtype == g_theirs.dtype
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# special inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)])
def test_empty_input(backend, shape):
    x = torch.empty(shape, requires_grad=True)
    y = torch.empty(shape)
    mean = bcelogits.binary_cross_entropy_with_logits(x, y)
    assert mean.shape == () and torch.isnan(mean)
    total = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="sum")
    assert total.shape == () and total.item() == 0.0
    none = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert none.shape == shape and none.dtype == torch.float32
    total.backward()
    assert x.grad is not None and x.grad.shape == shape


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_zero_dim_input(backend, reduction):
    x = torch.tensor(0.3, dtype=torch.float64)
    y = torch.tensor(1.0, dtype=torch.float64)
    w = torch.tensor(2.0, dtype=torch.float64)
    p = torch.tensor(3.0, dtype=torch.float64)
    ours, gx, gy = bcelogits_with_grads(bcelogits.binary_cross_entropy_with_logits, x, y, w, p, reduction)
    theirs, tgx, tgy = torch_bce_with_grads(x, y, w, p, reduction)
    assert ours.shape == theirs.shape == ()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx, tgx, rtol=1e-12, atol=0)
    torch.testing.assert_close(gy, tgy, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_targets_outside_unit_interval_and_negative_weights_match_torch(backend, reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(5, 4, generator=gen, dtype=torch.float64) * 12 - 6
    y = torch.rand(5, 4, generator=gen, dtype=torch.float64) * 4 - 1.5  # in [-1.5, 2.5]
    w = torch.rand(4, generator=gen, dtype=torch.float64) * 4 - 2  # negative weights too
    p = torch.rand(5, 1, generator=gen, dtype=torch.float64) * 4 - 1  # and negative pos_weight
    go = None if reduction != "none" else torch.rand(5, 4, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: torch accepts these silently
        ours, gx, gy = bcelogits_with_grads(
            bcelogits.binary_cross_entropy_with_logits, x, y, w, p, reduction, go
        )
    theirs, tgx, tgy = torch_bce_with_grads(x, y, w, p, reduction, go)
    lscale, gscale, yscale, l_abs, g_abs, y_abs = element_scales(x, y, w, p)
    scale = lscale.sum() if reduction != "none" else lscale
    assert excess(ours, theirs, 1e-12 * scale + l_abs.sum())[0] <= 0, (ours, theirs)
    assert excess(gx, tgx, 1e-12 * gscale + g_abs)[0] <= 0
    assert excess(gy, tgy, 1e-12 * yscale + y_abs)[0] <= 0


def test_seed_doc_example_random_targets_backward(backend):
    loss = bcelogits.BCEWithLogitsLoss()
    inp = torch.randn(3, requires_grad=True)
    target = torch.empty(3).random_(2)
    output = loss(inp, target)
    output.backward()
    ref_in = inp.detach().clone().requires_grad_(True)
    ref = torch.nn.BCEWithLogitsLoss()(ref_in, target)
    ref.backward()
    torch.testing.assert_close(output, ref)
    torch.testing.assert_close(inp.grad, ref_in.grad)


# ----------------------------------------------------------------------------------------------------
# sizes beyond one kernel block, memory formats
# ----------------------------------------------------------------------------------------------------

LARGE = [
    # shape, weight shape, pos_weight shape
    ((4097,), None, None),
    ((3, 5000), (5000,), None),
    ((5000, 3), (5000, 1), (3,)),
    ((2, 3, 4103), (3, 1), (4103,)),
    ((2, 3, 4103), (2, 1, 4103), (3, 1)),  # a middle-broadcast weight
    ((6, 7, 9, 11), (7, 1, 1), (7, 1, 1)),
    ((9000,), (), ()),
    ((4096,), (4096,), None),  # exactly one block
    ((1, 4095), (1, 4095), (4095,)),
    ((8193,), (), (8193,)),
    ((13, 631), (13, 1), (631,)),  # a per-row weight whose rows straddle block boundaries
    ((3, 2731, 2), (2731, 1), (2,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_parity_large_tensors(backend, dtype, reduction):
    failures = []
    for i, (shape, wshape, pshape) in enumerate(LARGE):
        gen = torch.Generator().manual_seed(100 + i)
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 19 - 9.5).to(dtype)
        y = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
        w = make_coef(wshape, dtype, gen, 0.1, 2.0, noncontig=False)
        p = make_coef(pshape, dtype, gen, 0.1, 4.0, noncontig=False)
        go = None if reduction != "none" else torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
        ours, gx, gy = bcelogits_with_grads(
            bcelogits.binary_cross_entropy_with_logits, x, y, w, p, reduction, go
        )
        ref, rgx, rgy = torch_bce_with_grads(
            x.double(),
            y.double(),
            None if w is None else w.double(),
            None if p is None else p.double(),
            reduction,
            None if go is None else go.double(),
        )
        lscale, gscale, yscale, l_abs, g_abs, y_abs = element_scales(x, y, w, p)
        rtol = RTOL[dtype]
        if reduction == "none":
            ltol = rtol * lscale + l_abs
            gmul = go.double().abs()
        else:
            f = 1.0 / x.numel() if reduction == "mean" else 1.0
            ltol = (rtol * lscale + l_abs).sum() * f
            gmul = f
        for what, got, want, tol in (
            ("value", ours, ref, ltol),
            ("grad_input", gx, rgx, (rtol * gscale + g_abs) * gmul),
            ("grad_target", gy, rgy, (rtol * yscale + y_abs) * gmul),
        ):
            e, where = excess(got, want, tol)
            if e > 0:
                failures.append(f"shape={shape} w={wshape} p={pshape} {what}: off by {e:.3g} at {where}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_channels_last_inputs(backend, dtype, reduction):
    gen = torch.Generator().manual_seed(5)
    shape = (3, 4, 5, 6)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 16 - 8).to(dtype)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.rand(4, 1, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    p = (torch.rand(4, 1, 1, generator=gen, dtype=torch.float64) * 3).to(dtype)
    xc = x.contiguous(memory_format=torch.channels_last)
    yc = y.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    go = None if reduction != "none" else torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    for xa, ya in ((xc, yc), (xc, y), (x, yc)):
        ours, gx, gy = bcelogits_with_grads(
            bcelogits.binary_cross_entropy_with_logits, xa, ya, w, p, reduction, go
        )
        theirs, tgx, tgy = torch_bce_with_grads(x, y, w, p, reduction, go)
        rtol = RTOL[dtype] * 10
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * 1e-2)
        torch.testing.assert_close(gx, tgx, rtol=rtol, atol=rtol * 1e-2)
        torch.testing.assert_close(gy, tgy, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("grad_of", ["input", "target", "both"])
def test_none_loss_and_its_layout_can_be_modified_in_place(backend, layout, grad_of):
    """The 'none' loss follows the target's layout (as torch's) and is a tensor of its own, not a view:
    in-place operations on it, then backward, work as in torch."""
    gen = torch.Generator().manual_seed(7)
    if layout == "channels_last":
        x = torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.rand(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    else:
        x, y = torch.randn(5, 3, generator=gen).t(), torch.rand(5, 3, generator=gen).t()
    results = []
    for fn in (F.binary_cross_entropy_with_logits, bcelogits.binary_cross_entropy_with_logits):
        xa = x.detach().clone().requires_grad_(grad_of in ("input", "both"))
        ya = y.detach().clone().requires_grad_(grad_of in ("target", "both"))
        loss = fn(xa, ya, reduction="none")
        strides = loss.stride()
        loss.mul_(2)
        loss[0] *= 3
        loss.sum().backward()
        results.append((loss.detach(), strides, xa.grad, ya.grad))
    (want, wstrides, wgx, wgy), (got, gstrides, ggx, ggy) = results
    assert gstrides == wstrides
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in ((ggx, wgx), (ggy, wgy)):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_inference_mode(backend):
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    with torch.inference_mode():
        out = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none")
        ref = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_backend_environment_variable():
    """BCELOGITS_BACKEND forces the path at import like kernels.use(); an unknown name fails loudly."""
    import os
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, generator=g, dtype=torch.float64)
    y = torch.rand(64, 7, generator=g, dtype=torch.float64)
    expected = F.binary_cross_entropy_with_logits(x, y).item()
    code = (
        "import torch, bcelogits\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(64, 7, generator=g, dtype=torch.float64)\n"
        "y = torch.rand(64, 7, generator=g, dtype=torch.float64)\n"
        "print(bcelogits.kernels.current())\n"
        "print(repr(bcelogits.binary_cross_entropy_with_logits(x, y).item()))\n"
    )
    env = dict(os.environ, BCELOGITS_BACKEND="plain", PYTHONPATH=src)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    backend_name, value = r.stdout.strip().splitlines()[-2:]
    assert backend_name == "plain"
    assert abs(float(value) - expected) <= 1e-13 * abs(expected)
    env = dict(os.environ, BCELOGITS_BACKEND="no-such-backend", PYTHONPATH=src)
    r = subprocess.run(
        [sys.executable, "-c", "import bcelogits"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode != 0 and "BCELOGITS_BACKEND" in r.stderr


def _kwonly_defaults(fn):
    import inspect

    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


OPTION_DEFAULTS = {
    "ignore_index": None,
    "label_smoothing": 0.0,
    "class_dim": None,
    "focal_gamma": 0.0,
    "strict": False,
}


def test_functional_signature_matches_torch():
    import inspect

    ours = list(inspect.signature(bcelogits.binary_cross_entropy_with_logits).parameters.values())
    theirs = list(inspect.signature(F.binary_cross_entropy_with_logits).parameters.values())
    assert [p.name for p in ours[:7]] == [p.name for p in theirs[:7]] == [
        "input", "target", "weight", "size_average", "reduce", "reduction", "pos_weight",
    ]  # fmt: skip
    assert [p.default for p in ours[2:7]] == [p.default for p in theirs[2:7]]
    assert all(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in ours[:7])
    kw = _kwonly_defaults(bcelogits.binary_cross_entropy_with_logits)
    assert {k: kw.get(k, "missing") for k in OPTION_DEFAULTS} == OPTION_DEFAULTS


def test_loss_and_grad_option_defaults():
    kw = _kwonly_defaults(bcelogits.loss_and_grad)
    assert {k: kw.get(k, "missing") for k in OPTION_DEFAULTS} == OPTION_DEFAULTS


def test_a_total_beyond_float32_is_inf_as_in_torch(backend):
    """A float32 'sum' whose float64 total exceeds float32's range is inf, as torch's, on every route (the
    fused route raised 'value cannot be converted to type float without overflow'); gradients stay finite.
    The 'mean' of the same elements is the exact 3e38 (torch: inf, its float32 sum overflowing first)."""
    x = torch.tensor([-3e38, -3e38], requires_grad=True)
    y = torch.ones(2)
    out = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="sum")
    (g,) = torch.autograd.grad(out, x)
    want = F.binary_cross_entropy_with_logits(x.detach(), y, reduction="sum")
    assert out.dtype == torch.float32 and torch.isinf(out) and torch.equal(out.detach(), want)
    assert torch.isfinite(g).all()
    assert bcelogits.binary_cross_entropy_with_logits(x.detach(), y).item() == torch.tensor(3e38).item()
    w, x2 = torch.full((2,), 1.5e38), torch.full((2,), -2.0)
    got = bcelogits.binary_cross_entropy_with_logits(x2, y, weight=w, reduction="sum")
    assert torch.isinf(got)
    assert torch.isinf(F.binary_cross_entropy_with_logits(x2, y, weight=w, reduction="sum"))
    loss, grad = bcelogits.loss_and_grad(x.detach(), y, reduction="sum")
    assert torch.isinf(loss) and torch.isfinite(grad).all()
