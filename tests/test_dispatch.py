"""Kernel choice (bcelogits.kernels), the fallbacks, the Triton route, and torch.compile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcelogits
from bcelogits import _args, kernels
from bcelogits.kernels import cpu

SCRIPTS = Path(__file__).parent / "scripts"
BCE = bcelogits.binary_cross_entropy_with_logits


def _call(x, y, w=None, p=None, reduction="mean", **opts):
    return _args.parse(x, y, w, p, reduction, _args.check_options(**opts))


# ------------------------------------------------------------------------------------------- choice
@pytest.mark.parametrize(
    ("wshape", "shape", "expected"),
    [
        (None, (4, 3), (None, 1)),
        ((), (4, 3), (1, 1)),
        ((3,), (4, 3), (3, 1)),
        ((1, 3), (4, 3), (3, 1)),
        ((4, 1), (4, 3), (4, 3)),
        ((4, 3), (4, 3), (12, 1)),
        ((5, 1, 1), (2, 5, 6, 7), (5, 42)),
        ((2, 5, 1, 1), (2, 5, 6, 7), (10, 42)),
        ((2, 1, 7), (2, 5, 7), None),  # a size-1 gap: not of the (i // inner) % C form
    ],
)
def test_flat_pattern(wshape, shape, expected):
    w = None if wshape is None else torch.arange(float(np.prod(wshape))).reshape(wshape)
    got = kernels.flat_pattern(w, shape)
    if expected is None:
        assert got is None
        return
    flat, inner = got
    assert inner == expected[1]
    if w is None:
        assert flat is None
        return
    assert flat.numel() == expected[0]
    # the rule reproduces torch's broadcast
    full = torch.broadcast_to(w, shape).reshape(-1)
    idx = (torch.arange(full.numel()) // inner) % flat.numel()
    assert torch.equal(flat[idx], full)


needs_cpu = pytest.mark.skipif(  # in CI (the core built on purpose) these run and fail instead
    not cpu.available() and not os.environ.get("CI"),
    reason=f"fused CPU kernel unavailable: {cpu.unavailable_reason}",
)


@needs_cpu
def test_choice_cpu_kernel_for_contiguous_float():
    x, y = torch.randn(8, 5), torch.rand(8, 5)
    assert kernels.choose(_call(x, y)) is cpu
    assert kernels.choose(_call(x.numpy(), y.numpy())) is cpu
    assert kernels.choose(_call(x.double(), y.double(), torch.rand(5, dtype=torch.float64))) is cpu


CL = torch.channels_last


@needs_cpu
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "layouts",
    [("cl", "cl"), ("cl", "c"), ("c", "cl"), ("t", "c"), ("c", "t"), ("t", "t")],
    ids=lambda v: "-".join(v),
)
@pytest.mark.parametrize("weights", ["none", "pos_weight", "weight"])
def test_dense_layouts_take_the_kernel_with_torch_layouts(layouts, reduction, weights):
    """channels_last, transposes and mixtures of them go to the fused kernel in one memory order; values
    and gradients are those of the contiguous call, and the elementwise loss is laid out as torch's."""
    torch.manual_seed(3)
    shape = (3, 5, 6, 7)
    x0, y0 = torch.randn(shape, dtype=torch.float64) * 4, torch.rand(shape, dtype=torch.float64)
    kw = {"none": {}, "pos_weight": {"pos_weight": torch.rand(5, 1, 1, dtype=torch.float64) * 3},
          "weight": {"weight": torch.rand(5, 6, 7, dtype=torch.float64)}}[weights]  # fmt: skip

    def lay(t, how):
        if how == "cl":
            return t.contiguous(memory_format=CL)
        if how == "t":  # a transposed layout: the last two dimensions swapped in memory
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    x, y = lay(x0, layouts[0]).requires_grad_(), lay(y0, layouts[1])
    assert kernels.choose(_call(x, y, kw.get("weight"), kw.get("pos_weight"), reduction)) is cpu
    got = BCE(x, y, reduction=reduction, **kw)
    (g,) = torch.autograd.grad(got.sum(), x)
    xr = x0.clone().requires_grad_()  # the same call on contiguous tensors (tested against torch elsewhere)
    want = BCE(xr, y0, reduction=reduction, **kw)
    (gw,) = torch.autograd.grad(want.sum(), xr)
    if reduction == "none":
        assert torch.equal(got, want)
    else:  # the same terms, summed in another order
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert torch.equal(g, gw)
    # torch's own layout for the same tensors (an elementwise loss laid out like the target: .view works
    # where it works on torch's). Gradient strides are not a contract (torch's vary with its formula;
    # x.grad is laid out like x by autograd either way).
    assert got.stride() == F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw).stride()


@pytest.mark.parametrize("case", ["empty", "forced_plain", "neg_view"])
def test_choice_falls_back_to_plain(case):
    x, y = torch.randn(8, 5), torch.rand(8, 5)
    kw = {}
    if case == "empty":
        x, y = torch.randn(0, 5), torch.rand(0, 5)
    elif case == "neg_view":  # its memory holds -x: a kernel reading the data pointer would miss the sign
        x = torch._neg_view(x)
    if case == "forced_plain":
        with kernels.use("plain"):
            assert kernels.choose(_call(x, y, **kw)) is None
    else:
        assert kernels.choose(_call(x, y, **kw)) is None


@needs_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "case",
    [
        "gapped", "expanded", "bf16", "f16", "mixed", "gap_weight", "gap_pos_weight", "cl_gap_weight",
        "numpy_f16", "numpy_fortran", "numpy_gapped", "numpy_gap_weight",
    ],
)  # fmt: skip
def test_other_cpu_dtypes_and_layouts_are_staged_for_the_kernel(case, reduction):
    """16-bit and mixed dtypes, views with gaps or overlaps, weights that broadcast with a gap: copied
    into the compute dtype (one pass each) and run by the fused kernel; the same values and gradients as
    the plain path, to the output's ulp."""
    torch.manual_seed(5)
    x, y = torch.randn(64, 40) * 3, torch.rand(64, 40)
    w, p = torch.rand(40) + 0.5, None
    if "gap" in case and "weight" in case:  # (N, 1, W): not a periodic pattern of the flat input
        x, y = torch.randn(4, 16, 40) * 3, torch.rand(4, 16, 40)
        w = torch.rand(4, 1, 40) + 0.5
        if case == "gap_pos_weight":
            w, p = None, w
        elif case == "cl_gap_weight":
            x, y = (t.unsqueeze(-1).contiguous(memory_format=CL) for t in (x, y))
            w = w.unsqueeze(-1)
        elif case == "numpy_gap_weight":
            x, y, w = x.numpy(), y.numpy(), w.numpy()
    if case == "gapped":
        x, y = x[:, ::2], y[:, 1::2]
        w = w[::2]
    elif case == "expanded":
        y = y[:1].expand(64, 40)
    elif case in ("bf16", "f16"):
        dt = torch.bfloat16 if case == "bf16" else torch.float16
        x, y = x.to(dt), y.to(dt)
    elif case == "mixed":
        y = y.double()
    elif case == "numpy_f16":
        x, y, w = x.numpy().astype(np.float16), y.numpy().astype(np.float16), w.numpy()
    elif case == "numpy_fortran":
        x, y, w = np.asfortranarray(x.numpy()), y.numpy(), w.numpy()
    elif case == "numpy_gapped":
        x, y, w = x.numpy()[:, ::2], y.numpy()[:, ::2], w.numpy()[::2]
    assert kernels.choose(_call(x, y, w, p, reduction=reduction)) is cpu
    gap = kernels.flat_pattern(p if w is None else w, x.shape) is None
    assert gap == ("gap" in case and "weight" in case)  # (the case really tests what it says)
    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        x = x.clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()

    def run():
        loss = BCE(x, y, w, reduction=reduction, pos_weight=p)
        if not is_torch:
            return loss, None
        (g,) = torch.autograd.grad(loss.sum(), x)
        return loss, g

    got, g = run()
    with kernels.use("plain"):
        want, gw = run()
    out_dt = want.dtype
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, np.dtype(np.float16): 1e-3}.get(out_dt, 2e-6)
    if not is_torch:
        np.testing.assert_allclose(got, want, rtol=tol, atol=0)
        assert got.dtype == want.dtype and got.shape == want.shape
        return
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    torch.testing.assert_close(g, gw, rtol=tol, atol=1e-7)
    assert g.dtype == x.dtype


@needs_cpu
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "weighted_mean"])
def test_routes_agree(reduction):
    """The fused kernel and the plain path give the same values and gradients (float64: to 1e-13)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 9, generator=g, dtype=torch.float64) * 5
    y0 = torch.rand(6, 4, 9, generator=g, dtype=torch.float64)
    w = torch.rand(9, dtype=torch.float64)
    p = torch.rand(4, dtype=torch.float64) * 4
    out = {}
    for route in ("plain", "cpu"):
        x = x0.clone().requires_grad_(True)
        with kernels.use(route):
            loss = BCE(x, y0, w, reduction=reduction, pos_weight=p, class_dim=1, focal_gamma=1.0)
            loss.sum().backward()
        out[route] = (loss.detach(), x.grad)
    for a, b in zip(out["plain"], out["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_use_is_per_thread():
    """kernels.use() in one thread does not reroute another thread's calls."""
    import threading

    seen = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with kernels.use("plain"):
            seen["worker"] = kernels.current()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    seen["main"] = kernels.current()
    release.set()
    t.join()
    assert seen == {"worker": "plain", "main": "auto"}


def test_use_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use("gpu"):
            pass


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_bad_backend_env_is_a_clear_error():
    r = _run("import bcelogits", BCELOGITS_BACKEND="fast")
    assert r.returncode != 0 and "BCELOGITS_BACKEND='fast'" in r.stderr and "unset it" in r.stderr
    r = _run("import bcelogits.kernels as k; print(k.current())", BCELOGITS_BACKEND="Plain")
    assert r.returncode == 0 and r.stdout.strip() == "plain", r.stderr


def test_import_compiles_nothing():
    r = _run(
        "import sys, bcelogits; "
        "assert 'bcelogits.kernels.cpu' not in sys.modules, 'cpu kernel module imported'; "
        "assert 'numba' not in sys.modules, 'numba imported'; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_missing_kernel_warns_once_and_stays_exact(monkeypatch):
    """Without a usable native core the library still works on the plain path and says why, once."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", "the native core is not installed")
    monkeypatch.setitem(kernels._state, "warned", False)
    x, y = torch.randn(5, 3), torch.rand(5, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = BCE(x, y)
        b = BCE(x, y)
    msgs = [str(r.message) for r in rec if issubclass(r.category, bcelogits.PerformanceWarning)]
    assert len(msgs) == 1 and "the native core is not installed" in msgs[0] and "pip install" in msgs[0]
    with kernels.use("plain"):
        torch.testing.assert_close(a, BCE(x, y), rtol=0, atol=0)
    assert torch.equal(a, b)


def test_forced_cpu_kernel_unavailable_warns_too(monkeypatch):
    """Forcing the CPU kernel where it cannot be built gives the plain path, and says so once."""
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", "the native core is not installed")
    monkeypatch.setitem(kernels._state, "warned", False)
    x, y = np.zeros(4, np.float32), np.ones(4, np.float32)
    with warnings.catch_warnings(record=True) as rec, kernels.use("cpu"):
        warnings.simplefilter("always")
        BCE(x, y)
        BCE(x, y)
    msgs = [str(r.message) for r in rec if issubclass(r.category, bcelogits.PerformanceWarning)]
    assert len(msgs) == 1 and "the native core is not installed" in msgs[0]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_public_api_through_triton_route():
    """Every reduction and option through the Triton kernels (interpreter) against the plain path."""
    r = subprocess.run(
        [sys.executable, str(SCRIPTS / "triton_route.py")], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 mismatches" in r.stdout


# ------------------------------------------------------------------------------------------- compile
class _Head(torch.nn.Module):
    def __init__(self, **loss_kw):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)
        self.loss = bcelogits.BCEWithLogitsLoss(**loss_kw)

    def forward(self, x, y):
        return self.loss(self.lin(x), y)


@pytest.mark.parametrize("reduction", ["mean", "none", "weighted_mean"])
def test_compile_fullgraph_uses_custom_op(reduction):
    torch.manual_seed(0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    kw = dict(reduction=reduction, pos_weight=torch.rand(6) + 0.5, ignore_index=-1.0, focal_gamma=0.5)
    m = _Head(**kw)
    x, y = torch.randn(16, 8), torch.rand(16, 6)
    y[0, :2] = -1.0
    eager = m(x, y)
    (ge,) = torch.autograd.grad(eager.sum(), m.lin.weight)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    out = compiled(x, y)
    (gc,) = torch.autograd.grad(out.sum(), m.lin.weight)
    assert any("bcelogits.loss" in g for g in graphs), "the loss was not captured as the custom op"
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compile_channels_last_matches_eager_values_and_layout(reduction):
    """Under torch.compile the custom op's outputs have the layouts its fake implementations promise
    (inductor checks them: before, the eager layouts of a channels_last input failed that check)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=CL).requires_grad_()
    y = torch.rand(2, 3, 4, 5)
    pw = torch.rand(3, 1, 1) + 0.5

    def f(x, y):
        return BCE(x, y, reduction=reduction, pos_weight=pw) * 2.0

    eager = f(x, y)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x, y)
    (gc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "case",
    ["dynamic pos_weight", "dynamic weight", "dynamic float16", "legacy size_average", "elementwise_mean"],
)
def test_compile_fullgraph_off_the_short_route(case):
    """Calls with weights, 16-bit dtypes (dynamic=True shapes) or legacy arguments compile with
    fullgraph=True and give eager's values: the argument checks hold nothing dynamo cannot trace
    (math.isfinite of an option failed under dynamic=True; warnings.warn always failed)."""
    torch.manual_seed(2)
    w = torch.rand(3) + 0.5
    f = {
        "dynamic pos_weight": lambda x, y: BCE(x, y, pos_weight=w),
        "dynamic weight": lambda x, y: BCE(x, y, weight=w),
        "dynamic float16": lambda x, y: BCE(x.half(), y.half()),
        "legacy size_average": lambda x, y: BCE(x, y, size_average=False),
        "elementwise_mean": lambda x, y: BCE(x, y, reduction="elementwise_mean"),
    }[case]
    x, y = torch.randn(6, 3, requires_grad=True), torch.rand(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = f(x, y)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, dynamic=case.startswith("dynamic"), backend="eager")(x, y)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_strict_says_where_strict_works():
    f = lambda x, y: BCE(x, y, strict=True)  # noqa: E731
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict=True checks the values.*eager mode"):
        torch.compile(f, fullgraph=True, backend="eager")(torch.randn(3), torch.rand(3))
    torch._dynamo.reset()  # without fullgraph dynamo runs that frame eagerly, where strict works
    with pytest.raises(ValueError, match="strict: target"):
        torch.compile(f, backend="eager")(torch.randn(3), torch.rand(3) + 1)


def test_compile_inductor_end_to_end():
    """A real inductor compile (fullgraph) of a model with our loss: values and gradients as eager."""
    torch.manual_seed(1)
    m = _Head(pos_weight=torch.full((6,), 2.0))
    x, y = torch.randn(32, 8), torch.rand(32, 6)
    eager = m(x, y)
    (ge,) = torch.autograd.grad(eager, m.lin.bias)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True)(x, y)
    (gc,) = torch.autograd.grad(out, m.lin.bias)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "weighted_mean"])
def test_vmap_and_per_sample_gradients(reduction):
    """torch.func.vmap (e.g. per-sample gradients) equals a loop over samples."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    y = torch.rand(4, 3, 5, generator=g, dtype=torch.float64)
    y[1, 0, 0] = -1.0
    w = torch.rand(5, dtype=torch.float64)
    kw = dict(reduction=reduction, ignore_index=-1.0, focal_gamma=0.5)
    v = torch.func.vmap(lambda a, b: BCE(a, b, w, **kw))(x, y)
    loop = torch.stack([BCE(x[i], y[i], w, **kw) for i in range(4)])
    torch.testing.assert_close(v, loop, rtol=1e-13, atol=1e-15)
    per_sample = torch.func.vmap(torch.func.grad(lambda a, b: BCE(a, b, w, **kw).sum()))(x, y)
    loop_grads = torch.stack(
        [torch.func.grad(lambda a, b: BCE(a, b, w, **kw).sum())(x[i], y[i]) for i in range(4)]
    )
    torch.testing.assert_close(per_sample, loop_grads, rtol=1e-13, atol=1e-15)


@needs_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_build_failure_falls_back_once(monkeypatch, reduction):
    """A kernel that reports a build failure (KernelBuildError) leaves the library working on the plain
    path, with one PerformanceWarning saying why; other errors are not swallowed."""

    def broken(*args, **kwargs):
        raise kernels.KernelBuildError("simulated build failure")

    monkeypatch.setattr(cpu, "_launch", broken)  # what the general route of the CPU kernel runs
    monkeypatch.setattr(cpu, "forward_contiguous", broken)  # and the short one
    monkeypatch.setattr(kernels, "_failed", set())
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(7, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = BCE(x, y, reduction=reduction)
        (g,) = torch.autograd.grad(loss.sum(), x)
        BCE(x, y, reduction=reduction)
    perf = [r for r in rec if issubclass(r.category, bcelogits.PerformanceWarning)]
    assert len(perf) == 1 and "simulated build failure" in str(perf[0].message)
    with kernels.use("plain"):
        ref = BCE(x, y, reduction=reduction)
        (gref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, gref, rtol=0, atol=0)


@needs_cpu
def test_kernel_bugs_are_not_swallowed(monkeypatch):
    def buggy(*args, **kwargs):
        raise IndexError("a bug, not a build failure")

    monkeypatch.setattr(cpu, "_launch", buggy)  # what the general route runs
    monkeypatch.setattr(cpu, "forward_contiguous", buggy)  # and the short one
    with pytest.raises(IndexError, match="a bug"):
        BCE(torch.randn(4), torch.rand(4))


@pytest.mark.parametrize("which", ["input", "target"])
def test_lazily_negated_tensors_give_the_negated_values(which):
    """A ``torch._neg_view`` shares memory with the tensor it negates; the loss must see its values."""
    x, y = torch.randn(64, 33), torch.rand(64, 33) - 0.5
    args = [x, y]
    i = 0 if which == "input" else 1
    args[i] = torch._neg_view(args[i])
    got = bcelogits.binary_cross_entropy_with_logits(*args)
    args[i] = args[i].resolve_neg()
    want = F.binary_cross_entropy_with_logits(args[0].double(), args[1].double()).float()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_meta_tensors_give_meta_results_like_torch():
    """Shape inference on the meta device (no data) works as in torch, forward and backward."""
    x, y = torch.randn(4, 5, device="meta", requires_grad=True), torch.rand(4, 5, device="meta")
    for reduction in ("mean", "none"):
        got = bcelogits.BCEWithLogitsLoss(pos_weight=torch.ones(5), reduction=reduction).to("meta")(x, y)
        want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(5), reduction=reduction).to("meta")(x, y)
        assert (got.device, got.shape, got.dtype) == (want.device, want.shape, want.dtype)
    bcelogits.binary_cross_entropy_with_logits(x, y).backward()
    assert (x.grad.device.type, x.grad.shape) == ("meta", x.shape)


# ------------------------------------------------------------------------------------- simple calls
# The most common call (two torch tensors of one float dtype and shape, no weights, default options,
# 'mean' or 'sum') skips parse and the general kernel route (_args.simple_call,
# kernels._simple_cpu_forward). It must build what parse builds and give the general route's bits.
_SIMPLE_ARGS = dict(
    weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None,
    ignore_index=None, label_smoothing=0.0, class_dim=None, focal_gamma=0.0, strict=False,
)  # fmt: skip


def _simple(x, y, **changes):
    a = dict(_SIMPLE_ARGS, **changes)
    return _args.simple_call(
        x, y, a["weight"], a["size_average"], a["reduce"], a["reduction"], a["pos_weight"],
        a["ignore_index"], a["label_smoothing"], a["class_dim"], a["focal_gamma"], a["strict"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (4, 3), (2, 3, 4, 5)])
def test_simple_call_is_what_parse_builds(dtype, reduction, shape):
    x, y = torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype)
    got = _simple(x, y, reduction=reduction)
    ref = _call(x, y, reduction=reduction)
    assert got is not None and got.simple and not ref.simple
    for field in ("xp", "input", "target", "weight", "pos_weight", "options"):
        assert getattr(got, field) is getattr(ref, field) or getattr(got, field) == getattr(ref, field), field
    assert (got.reduction, got.compute_dtype, got.out_dtype) == (
        ref.reduction,
        ref.compute_dtype,
        ref.out_dtype,
    )


@pytest.mark.parametrize(
    "change",
    [
        dict(weight=torch.ones(3)), dict(pos_weight=torch.ones(3)), dict(size_average=True),
        dict(reduce=True), dict(reduction="weighted_mean"), dict(reduction="avg"), dict(reduction=None),
        dict(ignore_index=-1), dict(class_dim=-1), dict(strict=True), dict(strict=np.False_),
        dict(label_smoothing=0), dict(label_smoothing=0.1), dict(label_smoothing=torch.tensor(0.0)),
        dict(focal_gamma=0), dict(focal_gamma=2.0), dict(focal_gamma=torch.tensor(0.0)),
        dict(x=torch.randn(4, 3).half()), dict(x=torch.randn(4, 3).bfloat16()),
        dict(x=torch.randn(4, 3).double()), dict(y=torch.rand(4, 3).double()), dict(y=torch.rand(1, 3)),
        dict(y=torch.rand(4, 3).numpy()), dict(x=torch.randn(4, 3).numpy(), y=torch.rand(4, 3).numpy()),
        dict(x=torch.nn.Parameter(torch.randn(4, 3))), dict(y=torch.randint(0, 2, (4, 3))),
        dict(x=torch.randn(4, 3).to_sparse(), y=torch.rand(4, 3).to_sparse()),
        dict(y=torch.rand(4, 3, device="meta")),
    ],
)  # fmt: skip
def test_simple_call_declines_everything_else(change):
    """Anything parse might reject, cast or reshape, or any option, goes the general way (None)."""
    x, y = change.pop("x", torch.randn(4, 3)), change.pop("y", torch.rand(4, 3))
    assert _simple(x, y, **change) is None


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape", [(1,), (7, 3), (4096,), (4097,), (70000,), (3, 100003)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_simple_route_gives_the_general_routes_bits(monkeypatch, dtype, reduction, shape, layout):
    """Loss, gradient (with grad_output != 1) and no-grad loss through the simple route equal, bit for bit,
    those of the general route (simple_call switched off); a transposed input, and 'none', are simple
    calls that the general kernel route serves. Shapes: one block, a partial block, several threads."""
    g = torch.Generator().manual_seed(sum(shape))
    x0 = torch.randn(shape, dtype=dtype, generator=g) * 8
    y = torch.rand(shape, dtype=dtype, generator=g)
    if layout == "transposed" and x0.ndim == 2:
        x0, y = x0.t().contiguous().t(), y.t().contiguous().t()

    def run():
        x = x0.clone().requires_grad_(True)
        loss = BCE(x, y, reduction=reduction)
        (loss * 3.0).sum().backward()
        with torch.no_grad():
            nograd = BCE(x0, y, reduction=reduction)
        return loss.detach(), x.grad, nograd

    calls, runs = [], []
    real, real_run = _args.simple_call, kernels._simple_cpu_forward
    monkeypatch.setattr(_args, "simple_call", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(kernels, "_simple_cpu_forward", lambda *a: runs.append(1) or real_run(*a))
    fast = run()
    assert calls and all(c is not None for c in calls)  # the route under test was taken
    # (fused loss and gradient, then the no-grad loss; 'none' takes the general kernel route)
    assert len(runs) == (2 if x0.is_contiguous() and reduction != "none" else 0)
    monkeypatch.setattr(_args, "simple_call", lambda *a: None)
    slow = run()
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@needs_cpu
def test_default_module_takes_the_simple_route(monkeypatch):
    """The module passes its defaults as check_options stored them (0.0, False, None): still simple."""
    seen = []
    real = _args.simple_call
    monkeypatch.setattr(_args, "simple_call", lambda *a: seen.append(real(*a)) or seen[-1])
    bcelogits.BCEWithLogitsLoss()(torch.randn(8, 3), torch.rand(8, 3))
    bcelogits.BCEWithLogitsLoss(reduction="sum")(torch.randn(8, 3), torch.rand(8, 3))
    bcelogits.BCEWithLogitsLoss(pos_weight=torch.ones(3))(torch.randn(8, 3), torch.rand(8, 3))
    assert [c is not None for c in seen] == [True, True, False]


# ------------------------------------------------------------------------------ __torch_function__
def test_tensor_subclasses_and_function_modes_see_one_call():
    """As with torch's loss: a tensor subclass's __torch_function__ and a TorchFunctionMode see the loss
    as one call of the function itself (and may replace it); the default handling runs it and returns
    the subclass."""
    from torch.overrides import TorchFunctionMode

    x, y = torch.randn(4, 3), torch.rand(4, 3)
    want = F.binary_cross_entropy_with_logits(x, y)

    class Logged(torch.Tensor):
        calls: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    out = BCE(x.as_subclass(Logged), y, pos_weight=torch.full((3,), 2.0))
    assert Logged.calls == [BCE] and type(out) is Logged

    class Replace(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is BCE:
                return torch.tensor(42.0)
            return super().__torch_function__(func, types, args, kwargs or {})

    assert BCE(x, y.as_subclass(Replace)).item() == 42.0

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        got = BCE(x, y)
        bcelogits.BCEWithLogitsLoss()(x, y)
    assert mode.seen == [BCE, BCE]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@needs_cpu
def test_parameters_take_the_kernel():
    """nn.Parameter logits (or a frozen Parameter weight) are ordinary dense tensors to the kernel: the
    fused route serves them (not the 20x slower plain path), with torch's values and gradients."""
    torch.manual_seed(3)
    x = torch.nn.Parameter(torch.randn(64, 30, dtype=torch.float64))
    y = torch.rand(64, 30, dtype=torch.float64)
    w = torch.nn.Parameter(torch.rand(30, dtype=torch.float64) + 0.5, requires_grad=False)
    call = bcelogits._args.parse(x, y, w, None, "mean", bcelogits._args.check_options())
    assert kernels.choose(call) is cpu
    for kw in ({}, {"weight": w}):
        got = BCE(x, y, **kw)
        (g,) = torch.autograd.grad(got, x)
        want = F.binary_cross_entropy_with_logits(x, y, **kw)
        (gw,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, gw, rtol=1e-12, atol=1e-14)
