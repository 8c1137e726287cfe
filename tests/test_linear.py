"""bcelogits.linear_binary_cross_entropy_with_logits against the unfused computation in float64.

The reference is written here in torch operators (``F.linear``, then the loss with every option spelled
out) and differentiated by autograd; the fused op computes its gradients in the forward pass, block by
block, from dense or sparse targets."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bcelogits

ROOT = pathlib.Path(__file__).resolve().parents[1]
LBCE = bcelogits.linear_binary_cross_entropy_with_logits
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def reference(x, w, b, y, *, pos_weight=None, reduction="mean", label_smoothing=0.0, focal_gamma=0.0,
              ignore_index=None, ignore_rows=None):  # fmt: skip
    """The unfused loss in torch operators: logits by F.linear, then the elementwise loss written out."""
    z = F.linear(x, w, b)
    keep = torch.ones_like(z, dtype=torch.bool)
    if ignore_index is not None:
        keep &= y != ignore_index
    if ignore_rows is not None:
        keep &= ~ignore_rows[..., None]
    y = torch.where(keep, y, 0.0)
    ys = y * (1 - label_smoothing) + 0.5 * label_smoothing
    p = 1.0 if pos_weight is None else pos_weight
    loss = (1 - ys) * F.softplus(z) + p * ys * F.softplus(-z)
    if focal_gamma:
        pt = torch.sigmoid(z) * ys + torch.sigmoid(-z) * (1 - ys)
        loss = loss * (1 - pt) ** focal_gamma
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def make(n=7, d=5, c=13, dtype=torch.float64, density=0.25, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    y = (torch.rand(n, c, generator=g) < density).to(dtype)
    if soft:
        y = y * torch.rand(n, c, generator=g, dtype=dtype)
    return x, w, b, y


def forms(y):
    """The same target as dense, COO, CSR, (crow, col, values) and, for 0/1 targets, (crow, col)."""
    csr = y.to_sparse_csr()
    crow, col, values = (t.clone() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    out = {
        "dense": y,
        "coo": y.to_sparse(),
        "csr": csr,
        "light+values": (crow, col, values),
    }
    if bool(((y == 0) | (y == 1)).all()):
        out["light"] = (crow, col)
    return out


def grads(loss, tensors, seed=1):
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    return torch.autograd.grad(loss, tensors, go)


def check(x, w, b, y_target, y_dense, rtol=1e-12, atol=1e-13, **kw):
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "memory_budget", "strict")}
    xs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    rs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    got = LBCE(xs[0], xs[1], y_target, xs[2], **kw)
    want = reference(rs[0], rs[1], rs[2], y_dense, **ref_kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    for gg, gw, name in zip(grads(got, xs), grads(want, rs), ("input", "weight", "bias")):
        torch.testing.assert_close(gg, gw, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("form", ["dense", "coo", "csr", "light", "light+values"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 4, (3, 5), (1, 1)])
def test_matches_unfused_float64(form, reduction, chunk):
    """Every target form, reduction and chunking (sizes that do not divide N = 7 or C = 13), with bias and
    pos_weight: the loss and the three gradients of the unfused float64 computation."""
    x, w, b, y = make()
    pw = torch.rand(13, dtype=torch.float64) * 3
    check(x, w, b, forms(y)[form], y, reduction=reduction, pos_weight=pw, chunk_size=chunk)


OPTIONS = [
    {"label_smoothing": 0.1},
    {"focal_gamma": 2.0},
    {"focal_gamma": 0.5, "label_smoothing": 0.2},
    {"ignore_index": 0.5},
    {"ignore_rows": "mask"},
    {"ignore_rows": "mask", "ignore_index": 0.5, "focal_gamma": 1.5, "label_smoothing": 0.05},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["dense", "csr", "light+values"])
def test_options_match_unfused(opts, reduction, form):
    """Label smoothing, focal term, ignore_index ((row, class) pairs; a sparse target carries it as a
    stored value) and ignore_rows, alone and together, soft targets, chunks that do not divide N or C;
    'mean' divides by the elements that count, as the unfused computation does."""
    x, w, b, y = make(soft=True, density=0.4)
    y[1, 3] = y[4, 0] = y[4, 12] = 0.5  # stored values equal to ignore_index=0.5
    opts = dict(opts)
    if opts.get("ignore_rows") == "mask":
        opts["ignore_rows"] = torch.tensor([False, True, False, False, True, False, True])
    check(x, w, b, forms(y)[form], y, reduction=reduction, chunk_size=(3, 4), **opts)


@pytest.mark.parametrize("form", ["dense", "csr", "light"])
def test_c1_empty_rows_and_leading_dims(form):
    """C = 1; rows without any positive; input (..., D) flattened to rows ('none' keeps the shape)."""
    x, w, b, y = make(n=6, c=1, density=0.3)
    y[:3] = 0
    check(x, w, b, forms(y)[form], y, chunk_size=(4, 1))
    x, w, b, y = make(n=6, c=9)
    y[::2] = 0
    if form == "dense":
        check(
            x.reshape(2, 3, 5), w, b, y.reshape(2, 3, 9), y.reshape(2, 3, 9), reduction="none", chunk_size=4
        )
    else:
        check(x, w, b, forms(y)[form], y, reduction="mean", chunk_size=(2, 4))
    got = LBCE(x.reshape(2, 3, 5), w, y.reshape(2, 3, 9), b, reduction="none")
    assert got.shape == (2, 3, 9)


def test_no_bias_no_positives_and_empty_batch():
    x, w, _, _ = make()
    y = torch.zeros(7, 13, dtype=torch.float64)
    check(x, w, torch.zeros(13, dtype=torch.float64), forms(y)["light"], y)
    got = LBCE(x, w, y.to_sparse_csr())
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x @ w.T, y), rtol=1e-13, atol=0)
    # N = 0: torch's mean of nothing is NaN, the sum 0
    e = torch.empty(0, 5, dtype=torch.float64, requires_grad=True)
    assert torch.isnan(LBCE(e, w, torch.empty(0, 13, dtype=torch.float64)))
    s = LBCE(e, w.requires_grad_(), torch.empty(0, 13, dtype=torch.float64), reduction="sum")
    s.backward()
    assert float(s) == 0.0 and bool((w.grad == 0).all())


def test_float32_accuracy_against_float64():
    """float32 inputs: the loss and gradients of the float64 computation on the same values to float32
    accuracy (the matmuls accumulate in float32)."""
    x, w, b, y = make(n=64, d=32, c=300, dtype=torch.float32, density=0.02)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    got = LBCE(xs[0], xs[1], y.to_sparse_csr(), xs[2], chunk_size=(20, 70))
    want = reference(x64, w64, b64, y.double())
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 2e-6 * float(want)
    got.backward()
    want.backward()
    for a, r in zip(xs, (x64, w64, b64)):
        err = float((a.grad.double() - r.grad).abs().max() / r.grad.abs().max())
        assert err < 2e-5, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_like_unfused(dtype):
    """16-bit input and weight: logits as F.linear gives them, the elementwise part in float32; close to
    the unfused 16-bit computation and to float64."""
    x, w, b, y = make(n=16, d=8, c=40, dtype=torch.float32)
    x, w, b = (t.to(dtype).requires_grad_() for t in (x, w, b))
    got = LBCE(x, w, y.to_sparse_csr(), b, chunk_size=(5, 9))
    assert got.dtype == torch.float32
    ref = F.binary_cross_entropy_with_logits(F.linear(x, w, b).float(), y)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    got.backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    reference(xr, wr, br, y.double()).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for a, r in zip((x, w, b), (xr, wr, br)):
        assert float((a.grad.double() - r.grad).abs().max() / r.grad.abs().max()) < tol


def test_duplicates_in_coo_are_summed_as_to_dense():
    x, w, b, _ = make(n=3, c=4)
    i = torch.tensor([[0, 0, 2], [1, 1, 3]])
    coo = torch.sparse_coo_tensor(i, torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64), (3, 4))
    check(x, w, b, coo, coo.to_dense(), reduction="sum")


def test_module_and_state_dict():
    pw = torch.rand(13, dtype=torch.float64) + 0.5
    crit = bcelogits.LinearBCEWithLogitsLoss(pw, "sum", label_smoothing=0.1, chunk_size=5)
    assert "pos_weight" in crit.state_dict()
    assert repr(crit) == "LinearBCEWithLogitsLoss(reduction='sum', label_smoothing=0.1, chunk_size=5)"
    x, w, b, y = make()
    got = crit(x, w, y.to_sparse(), b)
    torch.testing.assert_close(
        got, reference(x, w, b, y, pos_weight=pw, reduction="sum", label_smoothing=0.1)
    )
    mask = torch.zeros(7, dtype=torch.bool)
    mask[2] = True
    got = crit(x, w, y, b, ignore_rows=mask)
    want = reference(x, w, b, y, pos_weight=pw, reduction="sum", label_smoothing=0.1, ignore_rows=mask)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------- memory and autograd
class _Record(TorchDispatchMode):
    """Every operator run and the element count of every tensor it returned."""

    def __init__(self):
        super().__init__()
        self.ops, self.sizes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("form", ["coo", "csr", "light"])
def test_sparse_target_never_builds_n_by_c(form):
    """Forward and backward with a sparse target and blocks of 8 x 10 on a 64 x 200 problem: no tensor
    of N×C elements (or of half of it) is created (the gradients are (N, D), (C, D), (C,))."""
    x, w, b, y = make(n=64, d=6, c=200, dtype=torch.float32, density=0.03)
    target = forms(y)[form]
    xs = [t.requires_grad_() for t in (x, w, b)]
    with _Record() as rec:
        LBCE(*xs[:2], target, xs[2], chunk_size=(8, 10)).backward()
    assert max(rec.sizes) < 64 * 200 // 2, max(rec.sizes)
    assert any("mm" in op for op in rec.ops)


def test_double_backward_and_second_backward_raise():
    x, w, b, y = make()
    x.requires_grad_()
    loss = LBCE(x, w, y, b)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = LBCE(x, w, y, b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_no_grad_and_grad_only_where_required():
    x, w, b, y = make()
    w.requires_grad_()
    loss = LBCE(x, w, y, b)
    (gw,) = torch.autograd.grad(loss, w)
    wr = w.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference(x, wr, b, y), wr)
    torch.testing.assert_close(gw, gr, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(LBCE(x, w, y, b), reference(x, w, b, y).detach(), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------- errors
def _err(exc, match, *args, **kw):
    """The call raises ``exc`` matching ``match`` before any matmul runs."""
    with _Record() as rec, pytest.raises(exc, match=match):
        LBCE(*args, **kw)
    assert not [op for op in rec.ops if "mm" in op], rec.ops


def test_errors_before_any_matmul():
    x, w, b, y = make()
    csr = y.to_sparse_csr()
    crow, col = csr.crow_indices(), csr.col_indices()
    _err(ValueError, r"input has 4 features .* expects D=5", x[:, :4], w, y)
    _err(ValueError, r"'bias' must have shape \(13,\)", x, w, y, b[:12])
    _err(ValueError, r"target of shape \(7, 12\) does not match .* \(7, 13\)", x, w, y[:, :12])
    _err(ValueError, r"target of shape \(6, 13\)", x, w, y[:6])
    _err(ValueError, r"'pos_weight' must have shape \(13,\)", x, w, y, pos_weight=torch.ones(12))
    _err(ValueError, r"sparse target must be 2-D \(N, C\) = \(7, 13\)", x, w, y[:, :12].to_sparse())
    _err(ValueError, r"row pointers have 7 entries but input has 7 rows", x, w, (crow[:-1], col))
    _err(ValueError, r"values have shape \(2,\)", x, w, (crow, col, torch.ones(2, dtype=torch.float64)))
    bad_col = col.clone()
    bad_col[3] = 13
    _err(ValueError, r"column index 13 \(entry 3\), out of range for C=13", x, w, (crow, bad_col))
    bad_crow = crow.clone()
    bad_crow[2], bad_crow[3] = bad_crow[3], bad_crow[2] - 1
    _err(ValueError, r"row pointers must be sorted .* decreases after row", x, w, (bad_crow, col))
    soft = (crow, col, torch.full((col.numel(),), 1.5, dtype=torch.float64))
    _err(ValueError, r"strict: target has \d+ value\(s\) outside \[0, 1\]", x, w, soft, strict=True)
    _err(ValueError, r"strict: target", x, w, y * 2, strict=True)
    _err(
        bcelogits.DTypeError,
        r"'input' must hold floating-point features, got dtype torch.int64",
        x.long(),
        w,
        y,
    )
    _err(
        bcelogits.DTypeError,
        r"'weight' has dtype torch.float32 but input has dtype torch.float64",
        x,
        w.float(),
        y,
    )
    _err(bcelogits.DTypeError, r"'target' must be floating-point", x, w, y.long())
    _err(
        bcelogits.DTypeError,
        r"'target\[1\] \(column indices\)' must hold integer",
        x,
        w,
        (crow, col.double()),
    )
    _err(ValueError, r"reduction='weighted_mean' is not supported", x, w, y, reduction="weighted_mean")
    _err(ValueError, r"not a valid value for reduction", x, w, y, reduction="avg")
    _err(ValueError, r"'chunk_size' must be a positive int", x, w, y, chunk_size=0)
    _err(TypeError, r"'chunk_size\[1\]' must be a positive int", x, w, y, chunk_size=(2, 1.5))
    _err(ValueError, r"label_smoothing must be in \[0, 1\]", x, w, y, label_smoothing=2.0)
    _err(bcelogits.DTypeError, r"'ignore_rows' must be a bool mask", x, w, y, ignore_rows=torch.zeros(7))
    _err(ValueError, r"'ignore_rows' must have shape \(7,\)", x, w, y, ignore_rows=torch.zeros(6, dtype=bool))
    _err(RuntimeError, r"'weight' is on meta but input is on cpu", x, w.to("meta"), y)
    _err(RuntimeError, r"not differentiable with respect to 'target'", x, w, y.clone().requires_grad_())
    _err(bcelogits.ArgumentTypeError, r"'input' must be a torch.Tensor", x.numpy(), w, y)


# ------------------------------------------------------------------------------------- routes and compile
TRITON_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
import bcelogits
from bcelogits import kernels
from bcelogits.kernels import triton as tk
calls = []
orig_forward, orig_none = tk.forward, tk.backward_none
tk.forward = lambda *a, **k: calls.append("forward") or orig_forward(*a, **k)
tk.backward_none = lambda *a, **k: calls.append("none") or orig_none(*a, **k)
torch.manual_seed(0)
x, w, b = torch.randn(6, 4), torch.randn(11, 4), torch.randn(11)
y = (torch.rand(6, 11) < 0.3).float()
pw = torch.rand(11) + 0.5
bad = []
for red in ("mean", "sum", "none"):
    for kw in ({}, {"focal_gamma": 1.5, "label_smoothing": 0.1, "ignore_index": 1.0}):
        res = {}
        for route in ("plain", "triton"):
            ts = [t.clone().requires_grad_() for t in (x, w, b)]
            with kernels.use(route):
                loss = bcelogits.linear_binary_cross_entropy_with_logits(
                    ts[0], ts[1], y.to_sparse_csr(), ts[2], pos_weight=pw, reduction=red, chunk_size=(4, 5),
                    **kw)
                loss.sum().backward()
            res[route] = [loss] + [t.grad for t in ts]
        for a, c in zip(res["plain"], res["triton"]):
            if not torch.allclose(a, c, rtol=1e-5, atol=1e-6):
                bad.append((red, kw, float((a - c).abs().max())))
assert "forward" in calls and "none" in calls, calls
print("BAD" if bad else "OK", bad, len(calls))
sys.exit(1 if bad else 0)
"""


def test_triton_route_through_the_interpreter():
    """The CUDA code path (the Triton elementwise kernel) on CPU tensors under TRITON_INTERPRET=1, in a
    subprocess (triton fixes its mode at import): the same values and gradients as the plain route, and
    the Triton kernel really ran (forward and 'none' backward)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


class _Tagger(torch.nn.Module):
    def __init__(self, d=6, c=20, **kw):
        super().__init__()
        self.body = torch.nn.Linear(5, d)
        self.head = torch.nn.Linear(d, c)
        self.loss = bcelogits.LinearBCEWithLogitsLoss(**kw)

    def forward(self, x, target):
        return self.loss(torch.tanh(self.body(x)), self.head.weight, target, self.head.bias)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["dense", "light+values"])
def test_compile_fullgraph_custom_op(reduction, form):
    """torch.compile(fullgraph=True) of a model using the loss: captured as the custom op
    bcelogits::linear_loss (no graph break); AOT autograd runs its backward; values and gradients equal
    eager's."""
    torch.manual_seed(0)
    m = _Tagger(reduction=reduction, chunk_size=(3, 7), focal_gamma=0.5)
    x = torch.randn(9, 5)
    y = forms((torch.rand(9, 20) < 0.2).float())[form]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    eager = m(x, y)
    ge = torch.autograd.grad(eager.sum(), list(m.parameters()))
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend=backend)(x, y)
    gc = torch.autograd.grad(out.sum(), list(m.parameters()))
    assert any("bcelogits.linear_loss" in g for g in graphs)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    for a, c in zip(gc, ge):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- the example
def test_example_runs_and_loss_falls():
    spec = importlib.util.spec_from_file_location("ex04", ROOT / "examples" / "04_extreme_multilabel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(smoke=True, verbose=False)
    assert len(losses) >= 5 and losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:-1]), losses


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_compile_with_torch_sparse_target_graph_breaks(layout):
    """A torch sparse target cannot enter a compiled graph (dynamo does not wrap sparse tensors): without
    fullgraph the call runs eagerly at a graph break, with eager's values and gradients; fullgraph=True
    says so (pass the (crow, col, values) tuple there)."""
    torch.manual_seed(0)
    m = _Tagger(chunk_size=(4, 6))
    x = torch.randn(9, 5)
    y = forms((torch.rand(9, 20) < 0.2).float())[layout]
    eager = m(x, y)
    ge = torch.autograd.grad(eager, list(m.parameters()))
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager")(x, y)
    gc = torch.autograd.grad(out, list(m.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    for a, c in zip(gc, ge):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="sparse"):
        torch.compile(m, fullgraph=True, backend="aot_eager")(x, y)
