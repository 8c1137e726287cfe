"""bcelogits.siglip_loss on one device, against the unchunked float64 computation of its definition (the N x N
logits, torch's logsigmoid, torch autograd) and against open_clip's SigLipLoss. The distributed exchange is
tested in tests/test_distributed.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import bcelogits
from bcelogits import siglip_loss


def _features(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # a few pairs that match well, so the positives are not all hard
    k = n // 3
    txt[:k] = F.normalize(txt[:k] + 2 * img[:k], dim=1)
    return img.to(dtype), txt.to(dtype)


def reference(img, txt, scale, bias):
    """The definition, unchunked, in float64: -(1/N) sum_ij logsigmoid(z_ij (t x_i.y_j + b))."""
    n = img.shape[0]
    logits = scale * img @ txt.T + (0.0 if bias is None else bias)
    z = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


def _grads(fn, img, txt, scale, bias, dtype):
    leaves = [a.detach().to(dtype).requires_grad_() for a in (img, txt, scale, bias)]
    loss = fn(*leaves)
    return loss, torch.autograd.grad(loss, leaves)


SCALE, BIAS = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)


@pytest.mark.parametrize(
    "n,d,block", [(1, 3, None), (7, 5, 3), (37, 16, 10), (64, 8, 64), (50, 4, 1000), (33, 7, 1)]
)
def test_float64_matches_unchunked_reference(n, d, block):
    img, txt = _features(n, d)
    want, want_g = _grads(reference, img, txt, SCALE, BIAS, torch.float64)
    got, got_g = _grads(lambda *a: siglip_loss(*a, block_size=block), img, txt, SCALE, BIAS, torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for name, g, w in zip(("image", "text", "scale", "bias"), got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"d loss / d {name}")


@pytest.mark.parametrize("block", [None, 16])
def test_float32_matches_float64_reference(block):
    img, txt = _features(45, 12)
    want, want_g = _grads(reference, img, txt, SCALE, BIAS, torch.float64)
    got, got_g = _grads(lambda *a: siglip_loss(*a, block_size=block), img, txt, SCALE, BIAS, torch.float32)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_g)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_extreme_logits_are_exact():
    """Large scales drive logits to +-1e4: torch's logsigmoid of the float64 logits is the reference (the
    loss is then dominated by a few wrong pairs; nothing overflows or is lost)."""
    img, txt = _features(20, 6)
    for scale, bias in ((1e4, 0.0), (30.0, -60.0), (1e-3, 5.0)):
        t, b = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
        want, want_g = _grads(reference, img, txt, t, b, torch.float64)
        got, got_g = _grads(lambda *a: siglip_loss(*a, block_size=7), img, txt, t, b, torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_scale_and_bias_forms():
    img, txt = _features(9, 4)
    want = reference(img, txt, 10.0, -3.0)
    for scale in (
        10.0,
        10,
        torch.tensor(10.0, dtype=torch.float64),
        torch.tensor([10.0], dtype=torch.float64),
    ):
        torch.testing.assert_close(siglip_loss(img, txt, scale, -3.0, block_size=4), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        siglip_loss(img, txt, 10.0, None), reference(img, txt, 10.0, None), rtol=1e-13, atol=0
    )
    # a 1-element parameter gets a gradient of its own shape; a float32 scale with float64 features too
    t = torch.tensor([10.0], requires_grad=True)
    siglip_loss(img, txt, t, -3.0).backward()
    assert t.grad.shape == (1,) and t.grad.dtype == torch.float32


def test_grad_output_partial_grads_no_grad_and_second_backward():
    img, txt = _features(23, 5)
    leaves = [a.detach().clone().requires_grad_() for a in (img, txt, SCALE, BIAS)]
    loss = siglip_loss(*leaves, block_size=6)
    (2.5 * loss).backward(retain_graph=True)
    first = [a.grad.clone() for a in leaves]
    _, want_g = _grads(reference, img, txt, SCALE, BIAS, torch.float64)
    for g, w in zip(first, want_g):
        torch.testing.assert_close(g, 2.5 * w, rtol=1e-10, atol=1e-12)
    for a in leaves:
        a.grad = None
    loss.backward()  # the second backward through the graph recomputes (the first handed its tensors over)
    for a, w in zip(leaves, want_g):
        torch.testing.assert_close(a.grad, w, rtol=1e-10, atol=1e-12)
    # only the text features need a gradient
    t_only = txt.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(siglip_loss(img, t_only, SCALE, BIAS, block_size=6), [t_only])
    torch.testing.assert_close(g, want_g[1], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            siglip_loss(*leaves, block_size=6), reference(img, txt, SCALE, BIAS), rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_features_computed_in_float32(dtype):
    img, txt = _features(30, 8, dtype=dtype)
    got, got_g = _grads(lambda *a: siglip_loss(*a), img, txt, SCALE, BIAS, dtype)
    # the reference on the same (rounded) features in float64; the result is rounded once to 16 bits
    want, want_g = _grads(reference, img.double(), txt.double(), SCALE, BIAS, torch.float64)
    assert got.dtype == dtype and got_g[0].dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=2 * eps, atol=0)
    for g, w in zip(got_g[:2], want_g[:2]):
        torch.testing.assert_close(g.double(), w, rtol=4 * eps, atol=4 * eps * float(w.abs().max()))


def test_module_is_the_functional():
    img, txt = _features(11, 6)
    crit = bcelogits.SigLIPLoss(block_size=4)
    assert "block_size=4" in repr(crit)
    torch.testing.assert_close(
        crit(img, txt, SCALE, BIAS), siglip_loss(img, txt, SCALE, BIAS), rtol=1e-14, atol=0
    )


def _open_clip_loss_module():
    """open_clip's loss.py, loaded by file (its package __init__ imports timm, torchvision, ...: the loss
    module itself needs only torch). None when open_clip_torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    loader = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return mod


def open_clip_formula(img, txt, scale, bias):
    """open_clip's SigLipLoss._loss for one device, restated: labels 2I - 1 (so z), logits
    scale * img @ txt.T + bias, -logsigmoid(labels * logits).sum() / N."""
    n = img.shape[0]
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(n, dtype=img.dtype) - torch.ones(n, n, dtype=img.dtype)
    return -F.logsigmoid(labels * logits).sum() / n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_open_clip(dtype):
    oc = _open_clip_loss_module()
    if oc is None:
        pytest.skip(
            "open_clip_torch is not installed (pip install --no-deps open_clip_torch); the formula is "
            "compared in test_against_open_clip_formula"
        )
    img, txt = _features(40, 16)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    want, want_g = _grads(oc.SigLipLoss(), img, txt, SCALE, BIAS, dtype)
    got, got_g = _grads(lambda *a: siglip_loss(*a, block_size=16), img, txt, SCALE, BIAS, dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=100 * tol, atol=tol)


def test_against_open_clip_formula():
    img, txt = _features(40, 16)
    want, want_g = _grads(open_clip_formula, img, txt, SCALE, BIAS, torch.float64)
    got, got_g = _grads(lambda *a: siglip_loss(*a, block_size=9), img, txt, SCALE, BIAS, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_bad_input():
    img, txt = _features(6, 4)
    t = torch.tensor(10.0)
    with pytest.raises(ValueError, match="same feature dimension D, got 4 and 5"):
        siglip_loss(img, torch.randn(6, 5, dtype=torch.float64), t, 0.0)
    with pytest.raises(ValueError, match="same number of pairs, got 6 images and 5 texts"):
        siglip_loss(img, txt[:5], t, 0.0)
    with pytest.raises(bcelogits.DTypeError, match="image_features must be floating-point"):
        siglip_loss(img.long(), txt, t, 0.0)
    with pytest.raises(bcelogits.DTypeError, match="float64 but text_features is torch.float32"):
        siglip_loss(img, txt.float(), t, 0.0)
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar .*got shape \(2,\)"):
        siglip_loss(img, txt, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        siglip_loss(img, txt, t, torch.zeros(1, 6))
    with pytest.raises(TypeError, match="logit_scale must be a 0-dim tensor or a number, got str"):
        siglip_loss(img, txt, "10", 0.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        siglip_loss(img[None], txt[None], t, 0.0)
    with pytest.raises(bcelogits.ArgumentTypeError, match="must be a torch.Tensor, got list"):
        siglip_loss(img.tolist(), txt, t, 0.0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        siglip_loss(img, txt, t, 0.0, block_size=0)
    with pytest.raises(TypeError, match="block_size must be a positive int or None, got bool"):
        siglip_loss(img, txt, t, 0.0, block_size=True)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            siglip_loss(img, txt, t, 0.0, process_group=object())
