"""PyTorch's own test cases for BCEWithLogitsLoss, rewritten for bcelogits.

From ``test/test_nn.py`` (``test_bce_with_logits_*``), the ``common_nn`` criterion / module tests for
``BCEWithLogitsLoss`` (plain, ``weights``, ``scalar_weights``, ``no_reduce``, ``no_reduce_scalar``,
``legacy_enum``) and the OpInfo samples of ``nn.functional.binary_cross_entropy_with_logits``.
``self.assertEqual`` becomes ``torch.testing.assert_close`` (torch's default tolerances for the dtype).
"""

from __future__ import annotations

import copy
import pickle
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import make_tensor

import bcelogits

BCEWithLogitsLoss = bcelogits.BCEWithLogitsLoss
bce = bcelogits.binary_cross_entropy_with_logits


# ----------------------------------------------------------------------------------------------------
# test_nn.py
# ----------------------------------------------------------------------------------------------------


def test_bce_with_logits_raises_if_target_and_input_are_different_size(backend):
    target = torch.rand(5)
    input = torch.rand(5, 1)
    with pytest.raises(ValueError):
        BCEWithLogitsLoss()(input, target)

    target = torch.rand(5, 1)
    input = torch.rand(5)
    with pytest.raises(ValueError):
        BCEWithLogitsLoss()(input, target)


def test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss(backend):
    sigmoid = nn.Sigmoid()

    target = torch.rand(64, 4)
    output = torch.rand(64, 4) - 0.5

    torch.testing.assert_close(BCEWithLogitsLoss()(output, target), nn.BCELoss()(sigmoid(output), target))

    weight = torch.rand(4)
    torch.testing.assert_close(
        BCEWithLogitsLoss(weight)(output, target), nn.BCELoss(weight)(sigmoid(output), target)
    )

    target = torch.zeros(4, 1, dtype=torch.float)
    output = torch.empty(4, 1, dtype=torch.float).fill_(-100)

    torch.testing.assert_close(BCEWithLogitsLoss()(output, target), nn.BCELoss()(sigmoid(output), target))

    torch.testing.assert_close(
        BCEWithLogitsLoss(reduction="none")(output, target),
        nn.BCELoss(reduction="none")(sigmoid(output), target),
    )

    weight = torch.rand(1, dtype=torch.float)
    torch.testing.assert_close(
        BCEWithLogitsLoss(weight)(output, target), nn.BCELoss(weight)(sigmoid(output), target)
    )


def test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss_large_tensors_with_grad(backend):
    x_size = 1024
    y_size = 256
    target = torch.rand(x_size, y_size)

    for reduction in ["none", "mean", "sum"]:
        output_sig = torch.rand(x_size, y_size) - 0.5
        output_logits = output_sig.clone().detach()

        output_sig.requires_grad = True
        output_logits.requires_grad = True
        weight = torch.rand(y_size)

        loss_sig = nn.BCELoss(weight, reduction=reduction)(torch.sigmoid(output_sig), target)
        loss_logits = BCEWithLogitsLoss(weight, reduction=reduction)(output_logits, target)

        torch.testing.assert_close(loss_logits, loss_sig)

        if reduction == "none":
            grad = torch.rand(x_size, y_size)
            loss_sig.backward(grad)
            loss_logits.backward(grad)
        else:
            loss_sig.backward()
            loss_logits.backward()

        torch.testing.assert_close(output_sig.grad, output_logits.grad)


def test_bce_with_logits_has_correct_forward_grad(backend):
    output = torch.randn(3, 5, requires_grad=True, dtype=torch.double)
    target = torch.randn(3, 5, dtype=torch.double)
    for reduction in ("sum", "mean", "none"):
        assert gradcheck(
            lambda self, target, r=reduction: BCEWithLogitsLoss(reduction=r)(self, target),
            (output, target),
            check_forward_ad=True,
        )


def test_bce_with_logits_has_correct_grad_at_zero(backend):
    output = torch.zeros(3, 1, requires_grad=True)
    target = torch.zeros(3, 1)
    BCEWithLogitsLoss(reduction="sum")(output, target).backward()
    expected_grad = torch.empty(3, 1).fill_(0.5)
    torch.testing.assert_close(output.grad, expected_grad)


def test_bce_with_logits_broadcasts_weights(backend):
    target = torch.rand(16, 4)
    output = torch.rand(16, 4) - 0.5

    weight = torch.rand(4)
    out1 = BCEWithLogitsLoss(weight)(output, target)

    weight = weight.expand(16, 4).contiguous()
    out2 = BCEWithLogitsLoss(weight)(output, target)

    torch.testing.assert_close(out1, out2)

    weight = torch.rand(16, 1)
    out1 = BCEWithLogitsLoss(weight)(output, target)

    weight = weight.expand(16, 4).contiguous()
    out2 = BCEWithLogitsLoss(weight)(output, target)

    torch.testing.assert_close(out1, out2)


def test_bce_with_logits_ones_in_pos_weights_are_the_same_as_none(backend):
    target = torch.rand(64, 4)
    output = torch.rand(64, 4) - 0.5
    pos_weight = torch.ones(64, 4)

    torch.testing.assert_close(
        BCEWithLogitsLoss()(output, target), BCEWithLogitsLoss(pos_weight=pos_weight)(output, target)
    )


def test_bce_with_logits_broadcasts_pos_weights(backend):
    target = torch.rand(64, 4)
    output = torch.rand(64, 4) - 0.5
    pos_weight = torch.rand(4)
    out1 = BCEWithLogitsLoss(pos_weight=pos_weight)(output, target)

    pos_weight1 = pos_weight.expand(1, 4)
    out2 = BCEWithLogitsLoss(pos_weight=pos_weight1)(output, target)

    pos_weight2 = pos_weight.expand(64, 4)
    out3 = BCEWithLogitsLoss(pos_weight=pos_weight2)(output, target)

    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(out1, out3)


def test_bce_with_logits_with_pos_weight_has_correct_grad_at_zero(backend):
    output = torch.zeros(3, 1, requires_grad=True)
    target = torch.zeros(3, 1)
    pos_weight = torch.ones(3, 1)
    BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")(output, target).backward()
    expected_grad = torch.empty(3, 1).fill_(0.5)
    grad = output.grad
    torch.testing.assert_close(grad, expected_grad)


def test_bce_with_logits_stability(backend):
    output = torch.tensor([0.0, -120.0])
    target = torch.tensor([0.0, 1.0])
    pos_weight = torch.tensor([1.0, 1.0])

    out1 = BCEWithLogitsLoss()(output, target)
    assert torch.isfinite(out1).all().item()

    out2 = BCEWithLogitsLoss(pos_weight=pos_weight)(output, target)
    assert torch.isfinite(out2).all().item()


def test_bce_loss_always_nonnegative_with_logits(backend):
    # test_nn.py::test_bce_loss_always_nonnegative, for the logits version
    target = torch.ones(5)
    inp = torch.ones(5)
    assert (BCEWithLogitsLoss()(inp, target) >= 0).all()
    target = torch.zeros(5)
    inp = torch.zeros(5)
    assert (BCEWithLogitsLoss()(inp, target) >= 0).all()


def test_loss_equal_input_target_shape(backend):
    # test_nn.py::test_loss_equal_input_target_shape (the bce_with_logits entry)
    inp = torch.randn(3, 5)
    target = torch.randn(5, 3)
    with pytest.raises(ValueError):
        bce(inp, target)


# ----------------------------------------------------------------------------------------------------
# common_nn.py criterion tests (forward vs reference, gradcheck, gradgradcheck, pickle)
# ----------------------------------------------------------------------------------------------------


def _criterion_check(module, torch_module, input, target, check_gradgrad=True):
    """What common_nn's CriterionTest does: forward vs torch, jacobian checks, pickling."""
    out = module(input, target)
    ref = torch_module(input, target)
    torch.testing.assert_close(out, ref)
    if input.dtype == torch.float64:
        x = input.detach().clone().requires_grad_(True)
        assert gradcheck(lambda i: module(i, target), (x,))
        if check_gradgrad:
            assert gradgradcheck(lambda i: module(i, target), (x,))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(clone(input, target), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_criterion_BCEWithLogitsLoss(backend, dtype):
    input = torch.rand(15, 10, dtype=dtype).clamp_(1e-2, 1 - 1e-2)
    target = torch.randn(15, 10).gt(0).to(dtype)
    _criterion_check(BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(), input, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_criterion_BCEWithLogitsLoss_weights(backend, dtype):
    weight = torch.rand(10, dtype=dtype)
    input = torch.rand(15, 10, dtype=dtype).clamp_(1e-2, 1 - 1e-2)
    target = torch.randn(15, 10).gt(0).to(dtype)
    _criterion_check(BCEWithLogitsLoss(weight), nn.BCEWithLogitsLoss(weight), input, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_criterion_BCEWithLogitsLoss_scalar_weights(backend, dtype):
    weight = torch.rand((), dtype=dtype)
    input = torch.rand((), dtype=dtype).clamp_(1e-2, 1 - 1e-2)
    target = torch.randn(()).gt(0).to(dtype)
    _criterion_check(BCEWithLogitsLoss(weight), nn.BCEWithLogitsLoss(weight), input, target)


def _no_reduce_reference(i, t):
    return -(t * i.sigmoid().log() + (1 - t) * (-i.sigmoid()).log1p())


def test_BCEWithLogitsLoss_no_reduce(backend):
    t = torch.randn(15, 10).gt(0).double()
    input = torch.rand(15, 10, dtype=torch.double).clamp_(2.8e-2, 1 - 2.8e-2).requires_grad_(True)

    def f(i):
        return bce(i, t.type_as(i), reduction="none")

    torch.testing.assert_close(f(input), _no_reduce_reference(input, t))
    assert gradcheck(f, (input,))
    assert gradgradcheck(f, (input,))


def test_BCEWithLogitsLoss_no_reduce_scalar(backend):
    t = torch.randn(()).gt(0).double()
    input = torch.rand((), dtype=torch.double).clamp_(2.8e-2, 1 - 2.8e-2).requires_grad_(True)

    def f(i):
        return bce(i, t.type_as(i), reduction="none")

    torch.testing.assert_close(f(input), _no_reduce_reference(input, t))
    assert gradcheck(f, (input,))
    assert gradgradcheck(f, (input,))


def test_BCEWithLogitsLoss_legacy_enum(backend):
    t = torch.randn(15, 10).gt(0).double()
    sigmoid = nn.Sigmoid()
    input = torch.rand(15, 10, dtype=torch.double).clamp_(2.8e-2, 1 - 2.8e-2).requires_grad_(True)

    def f(i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return bce(i, t.type_as(i), reduce=False)

    torch.testing.assert_close(f(input), -(t * sigmoid(input).log() + (1 - t) * (1 - sigmoid(input)).log()))
    assert gradcheck(f, (input,))


# ----------------------------------------------------------------------------------------------------
# OpInfo samples (common_methods_invocations.sample_inputs_binary_cross_entropy_with_logits)
# ----------------------------------------------------------------------------------------------------

S = 5


def _opinfo_samples(dtype, requires_grad, gen_seed=0):
    torch.manual_seed(gen_seed)
    make = partial(make_tensor, device="cpu", dtype=dtype)
    make_prob = partial(make, low=0, high=1)
    reductions = ("mean", "sum", "none")

    def make_weight_shape_kwargs():
        kwargs = []
        for shape in ((1,), (1, S), (S,), (S, S)):
            kwargs.extend(
                [((S, S), dict(reduction=reduction, weight=make(shape))) for reduction in reductions]
            )
        return kwargs

    shapes_and_kwargs = [
        *[(shape, None) for shape in ((), (1,), (S,), (S, S), (S, S, S))],
        *[((S, S), dict(reduction=reduction)) for reduction in reductions],
        *make_weight_shape_kwargs(),
        *[((S, S), dict(reduction=reduction, pos_weight=make((S,), low=0))) for reduction in reductions],
        *[
            ((S, S), dict(reduction=reduction, weight=make((S, S)), pos_weight=make((S,), low=0)))
            for reduction in reductions
        ],
    ]
    for shape, kwargs in shapes_and_kwargs:
        yield (
            make(shape, requires_grad=requires_grad),
            make_prob(shape, requires_grad=requires_grad),
            kwargs or {},
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_opinfo_samples_match_torch(backend, dtype):
    for x, y, kwargs in _opinfo_samples(dtype, requires_grad=True):
        ours = bce(x, y, **kwargs)
        theirs = F.binary_cross_entropy_with_logits(x, y, **kwargs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        # torch's lower-precision results are themselves rounded: compare against float64 torch
        ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        xd = x.detach().double().requires_grad_(True)
        yd = y.detach().double().requires_grad_(True)
        ref = F.binary_cross_entropy_with_logits(xd, yd, **ref_kwargs)
        tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        # weights from make_tensor span [-9, 9]; the loss terms then cancel, so allow for their size
        scale = F.binary_cross_entropy_with_logits(
            xd.detach(),
            yd.detach(),
            **{**ref_kwargs, **{k: v.abs() for k, v in ref_kwargs.items() if isinstance(v, torch.Tensor)}},
        ).abs()
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol * (1 + scale.max().item()))
        go = torch.ones_like(ours)
        gx, gy = torch.autograd.grad(ours, (x, y), go)
        rgx, rgy = torch.autograd.grad(ref, (xd, yd), go.double())
        assert gx.dtype == dtype and gy.dtype == dtype
        gtol = tol * (1 + rgx.abs().max().item() if rgx.numel() else 1)
        torch.testing.assert_close(gx.double(), rgx, rtol=tol, atol=gtol)
        ytol = tol * (1 + rgy.abs().max().item() if rgy.numel() else 1)
        torch.testing.assert_close(gy.double(), rgy, rtol=tol, atol=ytol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opinfo_samples_gradcheck_float64(backend, reduction):
    for x, y, kwargs in _opinfo_samples(torch.float64, requires_grad=True, gen_seed=1):
        if kwargs.get("reduction", "mean") != reduction:
            continue
        assert gradcheck(lambda a, b, kw=kwargs: bce(a, b, **kw), (x, y), check_forward_ad=True)
        assert gradgradcheck(lambda a, b, kw=kwargs: bce(a, b, **kw), (x, y))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opinfo_batched_grad_and_fwd_over_rev(backend, reduction):
    """OpInfo's test_fn_grad / test_fn_gradgrad / test_fn_fwgrad_bwgrad: torch's op supports batched
    gradients (vmap over backward: is_grads_batched, jacobian(vectorize=True)) and forward-over-reverse."""
    samples = [
        s
        for s in _opinfo_samples(torch.float64, requires_grad=True, gen_seed=2)
        if s[2].get("reduction", "mean") == reduction
    ]
    x, y, kwargs = samples[-1]  # weight (S, S) and pos_weight (S,)
    assert "weight" in kwargs and "pos_weight" in kwargs

    def f(a, b):
        return bce(a, b, **kwargs)

    assert gradcheck(f, (x, y), check_batched_grad=True, check_forward_ad=True)
    assert gradgradcheck(f, (x, y), check_batched_grad=True, check_fwd_over_rev=True)
    jac = torch.autograd.functional.jacobian(lambda a: f(a, y.detach()), x.detach(), vectorize=True)
    ref = torch.autograd.functional.jacobian(
        lambda a: F.binary_cross_entropy_with_logits(a, y.detach(), **kwargs), x.detach(), vectorize=True
    )
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)
