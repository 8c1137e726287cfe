"""Autograd: gradcheck / gradgradcheck in float64 for input and target, forward-mode AD (dual numbers and
``torch.func.jvp``) and double-backward values compared with torch's.

The jacobian checks here pass ``check_undefined_grad=False`` so that they test the derivatives alone;
undefined (None) output gradients are tested on their own in
``test_backward_accepts_undefined_output_grad`` (and by the default-argument gradchecks of
test_torch_suite.py, as PyTorch's own suite runs them)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bcelogits

bce = bcelogits.binary_cross_entropy_with_logits
REDUCTIONS = ["none", "mean", "sum"]

COEFS = {
    "plain": (None, None),
    "weight": ((4,), None),
    "pos_weight": (None, (4,)),
    "both": ((3, 1), (4,)),
    "both-full": ((3, 4), (3, 4)),
}


def _operands(coef, seed=0, shape=(3, 4)):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 8 - 4).requires_grad_(True)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    wshape, pshape = COEFS[coef]
    w = None if wshape is None else torch.rand(wshape, generator=gen, dtype=torch.float64) + 0.5
    p = None if pshape is None else torch.rand(pshape, generator=gen, dtype=torch.float64) * 3 + 0.2
    return x, y, w, p


@pytest.mark.parametrize("coef", list(COEFS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_input_and_target(backend, reduction, coef):
    x, y, w, p = _operands(coef)

    def f(a, b):
        return bce(a, b, weight=w, pos_weight=p, reduction=reduction)

    assert gradcheck(f, (x, y), check_forward_ad=True, check_undefined_grad=False)


@pytest.mark.parametrize("coef", list(COEFS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_input_and_target(backend, reduction, coef):
    x, y, w, p = _operands(coef, seed=1)

    def f(a, b):
        return bce(a, b, weight=w, pos_weight=p, reduction=reduction)

    assert gradgradcheck(f, (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_input_only_and_target_only(backend, reduction):
    x, y, w, p = _operands("both", seed=2)
    assert gradcheck(
        lambda a: bce(a, y.detach(), w, reduction=reduction, pos_weight=p),
        (x,),
        check_forward_ad=True,
        check_undefined_grad=False,
    )
    assert gradcheck(
        lambda b: bce(x.detach(), b, w, reduction=reduction, pos_weight=p),
        (y,),
        check_forward_ad=True,
        check_undefined_grad=False,
    )
    assert gradgradcheck(lambda a: bce(a, y.detach(), w, reduction=reduction, pos_weight=p), (x,))
    assert gradgradcheck(lambda b: bce(x.detach(), b, w, reduction=reduction, pos_weight=p), (y,))


def test_gradcheck_zero_dim(backend):
    x = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.5, dtype=torch.float64)
    assert gradcheck(lambda a, b: bce(a, b, w), (x, y), check_forward_ad=True, check_undefined_grad=False)
    assert gradgradcheck(lambda a, b: bce(a, b, w, reduction="sum"), (x, y))


@pytest.mark.parametrize("coef", list(COEFS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_ad_dual_numbers_match_torch(backend, reduction, coef):
    x, y, w, p = _operands(coef, seed=3)
    x, y = x.detach(), y.detach()
    gen = torch.Generator().manual_seed(4)
    tx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ty = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    results = {}
    for name, fn in (("ours", bce), ("torch", F.binary_cross_entropy_with_logits)):
        for which in ("both", "input", "target"):
            with fwAD.dual_level():
                a = fwAD.make_dual(x, tx) if which in ("both", "input") else x
                b = fwAD.make_dual(y, ty) if which in ("both", "target") else y
                out = fn(a, b, weight=w, pos_weight=p, reduction=reduction)
                primal, tangent = fwAD.unpack_dual(out)
                results[name, which] = (primal.clone(), None if tangent is None else tangent.clone())
    for which in ("both", "input", "target"):
        op, ot = results["ours", which]
        tp, tt = results["torch", which]
        torch.testing.assert_close(op, tp, rtol=1e-12, atol=1e-14)
        assert ot is not None, f"no tangent for a dual {which}"
        torch.testing.assert_close(ot, tt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_func_jvp_matches_torch(backend, reduction):
    x, y, w, p = _operands("both", seed=5)
    x, y = x.detach(), y.detach()
    tx, ty = torch.randn_like(x), torch.randn_like(y)

    def ours(a, b):
        return bce(a, b, weight=w, pos_weight=p, reduction=reduction)

    def theirs(a, b):
        return F.binary_cross_entropy_with_logits(a, b, weight=w, pos_weight=p, reduction=reduction)

    o_primal, o_tangent = torch.func.jvp(ours, (x, y), (tx, ty))
    t_primal, t_tangent = torch.func.jvp(theirs, (x, y), (tx, ty))
    torch.testing.assert_close(o_primal, t_primal, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(o_tangent, t_tangent, rtol=1e-10, atol=1e-12)
    # jvp in the input alone equals the directional derivative from the backward gradient
    _, o_tx = torch.func.jvp(lambda a: ours(a, y), (x,), (tx,))
    xg = x.clone().requires_grad_(True)
    out = ours(xg, y)
    (g,) = torch.autograd.grad(out, xg, torch.ones_like(out))
    if reduction == "none":
        torch.testing.assert_close(o_tx, g * tx, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(o_tx, (g * tx).sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["weight", "pos_weight"])
def test_func_transforms_of_weight_and_pos_weight_match_torch(backend, which, reduction):
    """torch.func over the weights themselves, as torch allows: vmap over stacked weights alone,
    grad / jacrev and jvp with respect to them (a weight that requires grad is an error only in eager
    autograd, in torch as here)."""
    x, y, w, p = _operands("both-full", seed=6)
    x, y = x.detach(), y.detach()
    v = w if which == "weight" else p
    stacked = torch.stack([v, 2 * v, v + 0.25])
    t = torch.randn_like(v)

    def ours(a):
        return bce(x, y, reduction=reduction, **{"weight": w, "pos_weight": p, which: a})

    def theirs(a):
        kw = {"weight": w, "pos_weight": p, which: a}
        return F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw)

    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(ours)(stacked), torch.func.vmap(theirs)(stacked), **tol)
    torch.testing.assert_close(torch.func.jacrev(ours)(v), torch.func.jacrev(theirs)(v), **tol)
    torch.testing.assert_close(torch.func.jvp(ours, (v,), (t,)), torch.func.jvp(theirs, (v,), (t,)), **tol)
    if reduction != "none":
        torch.testing.assert_close(torch.func.grad(ours)(v), torch.func.grad(theirs)(v), **tol)


def test_forward_ad_tangent_of_a_weight_is_its_derivative(backend):
    """A forward-mode tangent on weight or pos_weight gives the directional derivative (torch returns no
    tangent there); checked against a central difference (the loss is linear in weight)."""
    x, y, w, p = _operands("both-full", seed=8)
    x, y = x.detach(), y.detach()
    for which in ("weight", "pos_weight"):
        v = w if which == "weight" else p
        t = torch.randn_like(v)
        with fwAD.dual_level():
            kw = {"weight": w, "pos_weight": p, which: fwAD.make_dual(v, t)}
            tangent = fwAD.unpack_dual(bce(x, y, **kw)).tangent
        h = 1e-6
        plus = bce(x, y, **{"weight": w, "pos_weight": p, which: v + h * t})
        minus = bce(x, y, **{"weight": w, "pos_weight": p, which: v - h * t})
        torch.testing.assert_close(tangent, (plus - minus) / (2 * h), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("coef", list(COEFS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_values_match_torch(backend, reduction, coef):
    x0, y0, w, p = _operands(coef, seed=6)
    gen = torch.Generator().manual_seed(8)
    go = torch.rand(x0.shape if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5
    vx = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    vy = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def second(fn):
        x = x0.detach().clone().requires_grad_(True)
        y = y0.detach().clone().requires_grad_(True)
        g = go.clone().requires_grad_(True)
        out = fn(x, y, weight=w, pos_weight=p, reduction=reduction)
        gx, gy = torch.autograd.grad(out, (x, y), g, create_graph=True)
        s = (gx * vx).sum() + (gy * vy).sum()
        return (gx, gy) + torch.autograd.grad(s, (x, y, g), allow_unused=True)

    ours = second(bce)
    theirs = second(F.binary_cross_entropy_with_logits)
    names = ["grad_x", "grad_y", "d2/dx", "d2/dy", "d2/dgrad_output"]
    for name, o, t in zip(names, ours, theirs):
        if t is None:
            assert o is None or torch.count_nonzero(o) == 0, name
            continue
        assert o is not None, f"{name} missing"
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_double_backward_second_derivative_analytic(backend):
    # d2l/dx2 = w (1 - y + p y) s(x) s(-x), against the closed form (mixed terms are compared with torch)
    x = torch.linspace(-12, 12, 41, dtype=torch.float64, requires_grad=True)
    y = torch.rand(41, dtype=torch.float64)
    w = torch.rand(41, dtype=torch.float64) + 0.5
    p = torch.rand(41, dtype=torch.float64) * 3
    out = bce(x, y, w, reduction="sum", pos_weight=p)
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    (h,) = torch.autograd.grad(gx.sum(), x)
    xd = x.detach()
    expected = w * (1 - y + p * y) * torch.sigmoid(xd) * torch.sigmoid(-xd)
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-18)


def test_backward_with_noncontiguous_grad_output(backend):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 4, dtype=torch.float64)
    go = torch.rand(4, 5, dtype=torch.float64).t()  # transposed
    go2 = torch.rand(1, 4, dtype=torch.float64).expand(5, 4)  # expanded
    for g in (go, go2):
        (ours,) = torch.autograd.grad(bce(x, y, reduction="none"), x, g)
        (theirs,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, y, reduction="none"), x, g)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_only_target_requires_grad(backend):
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    out = bce(x, y)
    assert out.requires_grad
    out.backward()
    yt = y.detach().clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(x, yt).backward()
    torch.testing.assert_close(y.grad, yt.grad, rtol=1e-12, atol=1e-15)


def test_no_grad_and_detached(backend):
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.rand(5, 4)
    with torch.no_grad():
        out = bce(x, y)
    assert not out.requires_grad
    assert not bce(x.detach(), y).requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_evaluation_skips_autograd_but_not_its_semantics(backend, reduction):
    """Calls with nothing to differentiate bypass the autograd Function: the same values bit for bit; a
    target that requires grad keeps the result differentiable, and forward-mode AD under no_grad (which
    needs no grad mode) still gives torch's tangents."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen) * 4
    y = torch.rand(6, 5, generator=gen)
    w = torch.rand(5, generator=gen) + 0.5
    trained = bce(x.clone().requires_grad_(True), y, w, reduction=reduction)
    assert trained.requires_grad
    with torch.no_grad():
        evaluated = bce(x, y, w, reduction=reduction)
    assert not evaluated.requires_grad and evaluated.grad_fn is None
    torch.testing.assert_close(evaluated, trained.detach(), rtol=0, atol=0)
    # Only the target requires grad: still differentiable.
    assert bce(x, y.clone().requires_grad_(True), w, reduction=reduction).requires_grad
    # Forward-mode AD does not need grad mode: tangents flow under no_grad.
    tx = torch.randn(6, 5, generator=gen)
    with torch.no_grad(), fwAD.dual_level():
        ours = fwAD.unpack_dual(bce(fwAD.make_dual(x, tx), y, w, reduction=reduction)).tangent
        ref = fwAD.unpack_dual(
            F.binary_cross_entropy_with_logits(fwAD.make_dual(x, tx), y, w, reduction=reduction)
        ).tangent
    assert ours is not None
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_retain_graph_backward_twice(backend):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 4, dtype=torch.float64)
    out = bce(x, y, pos_weight=torch.full((4,), 2.0, dtype=torch.float64))
    out.backward(retain_graph=True)
    g1 = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * g1, rtol=1e-15, atol=0)


def test_inplace_modification_after_forward_is_detected_or_harmless(backend):
    # torch saves input/target for backward; modifying them in place must not silently corrupt grads
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = torch.rand(6, dtype=torch.float64)
    expected_out = F.binary_cross_entropy_with_logits(x, y, reduction="sum")
    (expected,) = torch.autograd.grad(expected_out, x)
    xi = x.detach().clone().requires_grad_(True)
    yi = y.clone()
    out = bce(xi, yi, reduction="sum")
    yi.add_(0.25)
    try:
        (g,) = torch.autograd.grad(out, xi)
    except RuntimeError as exc:  # torch's version-counter check: acceptable
        assert "modified by an inplace operation" in str(exc)
    else:
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)


def test_training_step_in_a_model(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(10, 6, dtype=torch.float64)
    y = (torch.rand(10, 3) > 0.5).double()
    pw = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ours = bcelogits.BCEWithLogitsLoss(pos_weight=pw)(model(x), y)
    theirs = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(twin(x), y)
    ours.backward()
    theirs.backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_accepts_undefined_output_grad(backend, reduction):
    """gradcheck's check_undefined_grad: backward called with an undefined (None) output gradient
    must give no gradient / zeros, as torch's op does, not crash."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    for fn in (F.binary_cross_entropy_with_logits, bce):
        out = fn(x, y, reduction=reduction)
        undefined = torch._C._functions.UndefinedGrad()(out)
        grads = torch.autograd.grad(undefined, (x, y), torch.ones_like(undefined), allow_unused=True)
        for g in grads:
            assert g is None or torch.count_nonzero(g) == 0
