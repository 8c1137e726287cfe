"""Fused Triton kernels against the float64 reference of bcelogits._math.

Triton fixes its mode when it is imported: with TRITON_INTERPRET=1 even its own library functions
(``tl.sum``'s combine function, ``tl.cdiv``) become interpreter objects, and compiled kernels cannot
be built in that process any more. So one run of this file tests one mode:

* without a GPU (or with TRITON_INTERPRET=1 already set) it sets TRITON_INTERPRET=1 before importing
  triton and runs the kernels in the interpreter on CPU tensors; the compiled path is then checked
  by lowering the kernels to PTX and cubin for sm_80/sm_90 in a subprocess (no GPU needed);
* where torch sees a GPU it leaves TRITON_INTERPRET unset, and ``TestCuda`` runs the compiled
  kernels on CUDA tensors (large sizes, libdevice math); the interpreter tests are skipped there.

The tests load a private copy of ``bcelogits/kernels/triton.py``, so they do not depend on whether
another test imported the package module first.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
triton = pytest.importorskip("triton", reason="triton is not installed (pip install bcelogits[gpu])")

from bcelogits import _math as M  # noqa: E402


def _triton_interpreted() -> bool:
    """Whether triton was imported in interpreter mode in this process (by this file or earlier)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(triton.language.standard.cdiv, InterpretedFunction)
    except (ImportError, AttributeError):  # pragma: no cover - other triton layouts
        return triton.knobs.runtime.interpret


INTERPRETED = _triton_interpreted()
KERNELS_PATH = importlib.util.find_spec("bcelogits.kernels.triton").origin
F32_TINY = 2.0**-126
F64_TINY = 2.0**-1022


def _load_kernels():
    """A private copy of bcelogits.kernels.triton, its kernels built in this process's triton mode."""
    name = "_bcelogits_kernels_triton_" + ("interp" if INTERPRETED else "compiled")
    spec = importlib.util.spec_from_file_location(name, KERNELS_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


K = _load_kernels()


# tests that run in a subprocess and so do not depend on this process's triton mode
ANY_MODE = {"test_compiles_for_nvidia", "test_import_without_triton"}


@pytest.fixture(autouse=True)
def _mode_guard(request):
    if request.cls is not None and request.cls.__name__ == "TestCuda":
        if INTERPRETED:
            pytest.skip("triton was imported with TRITON_INTERPRET=1 in this process; run this file alone")
    elif not INTERPRETED and request.function.__name__ not in ANY_MODE:
        pytest.skip("interpreter test: triton was imported without TRITON_INTERPRET=1 in this process")


# ---------------------------------------------------------------------------------------------------------
# inputs and reference


def make_inputs(n, dtype=torch.float32, ydtype=None, seed=0, device="cpu", span=100.0):
    """Logits spread over [-span, span] (a third uniform, a third N(0, 4^2), a third uniform on +-20),
    targets half hard 0/1, half soft."""
    g = torch.Generator().manual_seed(seed)
    k = n // 3
    x = torch.cat(
        [
            (torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) * span,
            torch.randn(k, generator=g, dtype=torch.float64) * 4,
            (torch.rand(n - 2 * k, generator=g, dtype=torch.float64) * 2 - 1) * 20,
        ]
    )[torch.randperm(n, generator=g)]
    y = torch.rand(n, generator=g, dtype=torch.float64)
    hard = torch.rand(n, generator=g) < 0.5
    y = torch.where(hard, (y < 0.5).double(), y)
    return x.to(dtype).to(device), y.to(ydtype or dtype).to(device)


def positive(n, lo_exp, hi_exp, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (
        (10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * (hi_exp - lo_exp) + lo_exp))
        .to(dtype)
        .to(device)
    )


def expand(v, inner, n):
    if v is None:
        return None
    idx = torch.arange(n, device=v.device)
    return v.double()[(idx // inner) % v.numel()]


def reference(x, y, w=None, w_inner=1, p=None, p_inner=1, *, label_smoothing=0.0, ignore_index=None,
              focal_gamma=0.0):  # fmt: skip
    """float64 evaluation of bcelogits._math, plus error scales for the comparisons."""
    n = x.numel()
    X = x.double()
    Y = M.smooth_target(y.double(), label_smoothing)
    W, P = expand(w, w_inner, n), expand(p, p_inner, n)
    pc = M.Pieces(torch, X)
    L = M.loss(torch, X, Y, W, P, pc)
    G = M.grad_input(torch, X, Y, W, P, pc)
    # |(1-y)w sigma(x)| + |p y w sigma(-x)|: the size of the gradient's terms (the gradient cancels)
    c_big, c_small = M._sides(torch, pc, *M.coefficients(Y, W, P))
    gscale = (c_big.abs() + (c_small.abs() * pc.h) * pc.h) / pc.one_e
    cond = torch.ones_like(X)
    if focal_gamma:
        L1 = M.log_one_minus_pt(torch, X, Y, pc)
        f = torch.exp(focal_gamma * L1)
        dL1 = M.d_log_one_minus_pt(torch, X, Y, pc)
        gscale = f * (gscale + torch.where(dL1 == 0, 0.0, focal_gamma * L * dL1.abs()))
        G = f * (G + torch.where(dL1 == 0, 0.0, focal_gamma * L * dL1))
        L = f * L
        cond = 1.0 + focal_gamma * L1.abs()  # exp(gamma*L1) amplifies L1's absolute error
    keep = torch.ones(n, dtype=torch.bool, device=x.device) if ignore_index is None else y != ignore_index
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    L, G, gscale = torch.where(keep, L, zero), torch.where(keep, G, zero), torch.where(keep, gscale, zero)
    cond = torch.where(keep, cond, 1.0)
    wk = keep.double() if W is None else torch.where(keep, W, zero)
    return {"loss": L, "grad": G, "gscale": gscale, "cond": cond, "keep": keep,
            "sum": L.sum(), "count": int(keep.sum()), "wsum": wk.sum()}  # fmt: skip


def assert_close_scaled(out, ref, scale, rtol, tiny, what):
    """|out - ref| <= rtol * scale where scale is a normal number; otherwise <= 2 * tiny."""
    out = out.double()
    err = (out - ref).abs()
    normal = scale >= tiny
    bad = torch.where(normal, err > rtol * scale, err > 2 * tiny)
    bad |= out.isnan() != ref.isnan()
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements off; first at {i}: got {out[i].item()!r}, "
            f"expected {ref[i].item()!r} (scale {scale[i].item()!r}, rtol {rtol})"
        )


def tolerances(compute_dtype, out_dtype=None):
    f64 = compute_dtype == torch.float64
    loss_rtol, grad_rtol, tiny = (1e-13, 1e-12, F64_TINY) if f64 else (1e-6, 2e-5, F32_TINY)
    if out_dtype in (torch.float16, torch.bfloat16):  # one rounding on store
        eps = 2.0**-11 if out_dtype == torch.float16 else 2.0**-8
        loss_rtol, grad_rtol = loss_rtol + eps, grad_rtol + eps
        tiny = 2.0**-14 if out_dtype == torch.float16 else F32_TINY
    elif out_dtype == torch.float32 and f64:
        loss_rtol, grad_rtol, tiny = 2.0**-24 + 1e-13, 2.0**-24 + 1e-12, F32_TINY
    return loss_rtol, grad_rtol, tiny


def run_and_check(x, y, w=None, w_inner=1, p=None, p_inner=1, *, out_dtype=None, kernels=None,
                  grad_scale=1.0, **opts):  # fmt: skip
    kernels = kernels or K
    n = x.numel()
    compute = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    out_dtype = out_dtype or x.dtype
    loss_out = torch.full((n,), float("nan"), dtype=out_dtype, device=x.device)
    grad_out = torch.full((n,), float("nan"), dtype=out_dtype, device=x.device)
    s, c, ws = kernels.forward(x, y, w, w_inner, p, p_inner, loss_out=loss_out, grad_out=grad_out,
                               grad_scale=grad_scale, **opts)  # fmt: skip
    ref = reference(x, y, w, w_inner, p, p_inner, **opts)
    loss_rtol, grad_rtol, tiny = tolerances(compute, out_dtype)
    gs = float(grad_scale)
    assert_close_scaled(loss_out, ref["loss"], ref["loss"].abs() * ref["cond"], loss_rtol, tiny, "loss")
    assert_close_scaled(grad_out, gs * ref["grad"], abs(gs) * ref["gscale"] * ref["cond"], grad_rtol, tiny,
                        "grad")  # fmt: skip
    assert s.dtype == torch.float64 and ws.dtype == torch.float64 and c.dtype == torch.int64
    assert s.dim() == c.dim() == ws.dim() == 0 and s.device == x.device
    sum_rtol = (2e-6 if compute == torch.float32 else 1e-13) * float(ref["cond"].max())
    if ref["sum"].isnan():
        assert s.isnan()
    else:
        assert abs(s.item() - ref["sum"].item()) <= sum_rtol * abs(ref["sum"].item()) + 1e-300
    assert c.item() == ref["count"]
    assert abs(ws.item() - ref["wsum"].item()) <= 1e-6 * abs(ref["wsum"].item())
    return loss_out, grad_out, (s, c, ws)


# ---------------------------------------------------------------------------------------------------------
# interpreter tests (CPU tensors)


def test_available():
    assert K.unavailable_reason is None
    assert K.available()
    assert K.available("cpu")
    assert K.available(torch.device("cpu"))
    assert K.available(torch.zeros(1))
    assert K._interpreted()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 1000, 2048, 5003])
def test_plain_sizes(n, dtype):
    x, y = make_inputs(n, dtype, seed=n)
    run_and_check(x, y)


def test_many_blocks(monkeypatch):
    # 79 programs, two reduction passes (79 -> 20 -> 5 partials) and a finishing loop of 2 chunks
    monkeypatch.setattr(K, "BLOCK_F32", 64)
    monkeypatch.setattr(K, "REDUCE_BLOCK", 4)
    monkeypatch.setattr(K, "FINISH_MAX", 8)
    x, y = make_inputs(5003, seed=3)
    w = positive(5003, -1, 1, seed=4)
    run_and_check(x, y, w, 1, ignore_index=0.0)


def test_int64_offsets(monkeypatch):
    monkeypatch.setattr(K, "INDEX64_THRESHOLD", 0)
    monkeypatch.setattr(K, "BLOCK_F32", 256)
    x, y = make_inputs(1001, seed=5)
    w = positive(7, -1, 1, seed=6)
    p = positive(11, -3, 3, seed=7)
    run_and_check(x, y, w, 13, p, 1)


@pytest.mark.parametrize(
    "xdt, ydt",
    [
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float64),  # a float64 target makes the compute float64
        (torch.float64, torch.bfloat16),
    ],
)
def test_mixed_dtypes(xdt, ydt):
    x, y = make_inputs(1000, xdt, ydt, seed=11)
    w = positive(10, -1, 1, seed=12, dtype=torch.float64)
    p = positive(1, 2, 2.5, seed=13, dtype=torch.float16)
    run_and_check(x, y, w, 1, p, 1, out_dtype=torch.float32)


def test_low_precision_outputs():
    x, y = make_inputs(1000, torch.float32, seed=21, span=30)
    n = x.numel()
    lo16 = torch.empty(n, dtype=torch.float16)
    gbf = torch.empty(n, dtype=torch.bfloat16)
    K.forward(x, y, None, None, None, None, loss_out=lo16, grad_out=gbf)
    lo32 = torch.empty(n)
    g32 = torch.empty(n)
    K.forward(x, y, None, None, None, None, loss_out=lo32, grad_out=g32)
    assert torch.equal(lo16, lo32.to(torch.float16))
    assert torch.equal(gbf, g32.to(torch.bfloat16))


# (B, C, H) = (3, 5, 67): n = 1005; a class vector on each dim, a scalar, a full tensor
N_W = 1005
WEIGHT_CASES = {
    "scalar": (lambda s: positive(1, -1, 1, s), 1),
    "last_dim": (lambda s: positive(67, -1, 1, s), 1),  # v[i % 67]
    "first_dim": (lambda s: positive(3, -1, 1, s), 335),  # v[i // 335]
    "middle_dim": (lambda s: positive(5, -1, 1, s), 67),  # v[(i // 67) % 5]
    "full": (lambda s: positive(N_W, -1, 1, s), 1),
    "scalar_inner": (lambda s: positive(1, -1, 1, s), 67),
}


@pytest.mark.parametrize("wcase", list(WEIGHT_CASES))
def test_weights(wcase):
    make_w, w_inner = WEIGHT_CASES[wcase]
    w = make_w(31)
    x, y = make_inputs(N_W, seed=32)
    run_and_check(x, y, w, w_inner)


@pytest.mark.parametrize("pcase", ["scalar", "last_dim", "middle_dim", "full"])
def test_pos_weight(pcase):
    _, p_inner = WEIGHT_CASES[pcase]
    size = {"scalar": 1, "last_dim": 67, "middle_dim": 5, "full": N_W}[pcase]
    p = positive(size, -6, 6, seed=41)  # pos_weight from 1e-6 to 1e6
    x, y = make_inputs(N_W, seed=42)
    w = positive(5, -1, 1, seed=43)
    run_and_check(x, y, w, 67, p, p_inner)


def test_weights_with_zeros():
    x, y = make_inputs(N_W, seed=44)
    w = positive(5, -1, 1, seed=45)
    w[2] = 0.0
    p = positive(67, -2, 2, seed=46)
    p[::4] = 0.0
    run_and_check(x, y, w, 67, p, 1)


@pytest.mark.parametrize("ydtype", [torch.float32, torch.float16])
def test_ignore_index(ydtype):
    x, y = make_inputs(1000, torch.float32, ydtype, seed=51)
    y[::7] = -100
    w = positive(10, -1, 1, seed=52)
    loss, grad, (s, c, ws) = run_and_check(x, y, w, 1, ignore_index=-100, out_dtype=torch.float32)
    ign = y == -100
    assert c.item() == 1000 - int(ign.sum())
    assert (loss[ign] == 0).all() and (grad[ign] == 0).all()


def test_ignore_index_compares_in_target_dtype():
    # as torch's `y == 0.1` for a float16 y: the scalar is rounded to float16 first
    x, y = make_inputs(100, torch.float32, torch.float16, seed=53)
    y[::3] = 0.1
    _, grad, (_, c, _) = run_and_check(x, y, ignore_index=0.1, out_dtype=torch.float32)
    assert c.item() == 100 - len(range(0, 100, 3))
    assert (grad[::3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_label_smoothing(eps, dtype):
    # the float64 tolerance (1e-13) also checks that the scalars reach the kernel unrounded
    x, y = make_inputs(1000, dtype, seed=61)
    run_and_check(x, y, label_smoothing=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal(gamma, dtype):
    x, y = make_inputs(1003, dtype, seed=71)
    w = positive(17, -1, 1, seed=72, dtype=dtype)
    p = positive(1, 0, 1, seed=73, dtype=dtype)
    run_and_check(x, y, w, 1, p, 1, focal_gamma=gamma)


def test_focal_all_options():
    x, y = make_inputs(1000, torch.float32, seed=74)
    y[5::9] = -1
    w = positive(4, -1, 1, seed=75)
    p = positive(250, -3, 3, seed=76)
    run_and_check(x, y, w, 250, p, 1, focal_gamma=2.0, label_smoothing=0.1, ignore_index=-1.0)


def test_focal_zero_is_plain():
    x, y = make_inputs(500, seed=77)
    a = run_and_check(x, y, focal_gamma=0.0)
    b = run_and_check(x, y)
    for u, v in zip(a[:2], b[:2], strict=True):
        assert torch.equal(u, v)


def test_optional_outputs_and_grad_scale():
    x, y = make_inputs(777, seed=81)
    w = positive(7, -1, 1, seed=82)
    ref = reference(x, y, w, 111)
    s0 = K.forward(x, y, w, 111, None, None)  # sums only
    g = torch.empty(777)
    s1 = K.forward(x, y, w, 111, None, None, grad_out=g, grad_scale=0.25)
    assert_close_scaled(g, 0.25 * ref["grad"], 0.25 * ref["gscale"], 2e-5, F32_TINY, "grad")
    lo = torch.empty(777, dtype=torch.float64)
    s2 = K.forward(x, y, w, 111, None, None, loss_out=lo)
    assert_close_scaled(lo, ref["loss"], ref["loss"].abs(), 1e-6, F32_TINY, "loss")
    for a, b in zip(s0, s1, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(s0, s2, strict=True):
        assert torch.equal(a, b)
    # a tensor scale is read in the kernel (no host sync); any float dtype
    g2 = torch.empty(777)
    K.forward(x, y, w, 111, None, None, grad_out=g2, grad_scale=torch.tensor([0.25], dtype=torch.float64))
    assert torch.equal(g, g2)
    run_and_check(x, y, w, 111, grad_scale=-3.0)


@pytest.mark.parametrize("go_kind", ["full", "one"])
def test_backward_none(go_kind):
    x, y = make_inputs(1001, seed=91)
    y[::10] = -100
    w = positive(7, -1, 1, seed=92)
    p = positive(13, -2, 2, seed=93)
    go = positive(1001 if go_kind == "full" else 1, -2, 2, seed=94, dtype=torch.float64)
    opts = {"label_smoothing": 0.05, "ignore_index": -100, "focal_gamma": 1.5}
    grad = torch.full((1001,), float("nan"))
    assert K.backward_none(x, y, w, 1, p, 13, go, grad, **opts) is None
    ref = reference(x, y, w, 1, p, 13, **opts)
    assert_close_scaled(grad, go * ref["grad"], go * ref["gscale"] * ref["cond"], 2e-5, F32_TINY, "grad")
    assert (grad[::10] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_special_values(dtype, gamma):
    inf, nan = float("inf"), float("nan")
    xs = [inf, -inf, nan, 0.0, -0.0, 1e30, -1e30, 100.0, -100.0, 88.5, -88.5, 104.0, -104.0, 40.0, -40.5]
    ys = [0.0, 1.0, 0.3]
    x = torch.tensor([a for a in xs for _ in ys], dtype=dtype)
    y = torch.tensor([b for _ in xs for b in ys], dtype=dtype)
    p = torch.tensor([1e6], dtype=dtype)
    w = torch.tensor([0.0, 2.0, 0.5, 1.5], dtype=dtype)  # w = 0 with an infinite softplus gives 0
    loss, grad, (s, c, ws) = run_and_check(x, y, w, 1, p, 1, focal_gamma=gamma)
    ref = reference(x, y, w, 1, p, 1, focal_gamma=gamma)
    # limits at |x| = inf are exact (0 * inf = 0, inf stays inf); NaN in -> NaN out
    for i in range(x.numel()):
        xi, yi = x[i].item(), y[i].item()
        if xi != xi:
            assert loss[i].isnan() and grad[i].isnan()
        elif abs(xi) == inf:
            for got, want in (
                (loss[i].item(), ref["loss"][i].item()),
                (grad[i].item(), ref["grad"][i].item()),
            ):
                assert got == got, (xi, yi)
                if want == 0 or abs(want) == inf:
                    assert got == want, (xi, yi, got, want)
    assert s.isnan()
    assert c.item() == x.numel()


def test_nan_target_and_ignored_nan_logit():
    x = torch.tensor([0.5, float("nan"), 2.0, -1.0])
    y = torch.tensor([float("nan"), -100.0, 1.0, 0.0])
    lo, g = torch.empty(4), torch.empty(4)
    s, c, ws = K.forward(x, y, None, None, None, None, ignore_index=-100, loss_out=lo, grad_out=g)
    assert lo[0].isnan() and g[0].isnan()
    assert lo[1] == 0 and g[1] == 0  # an ignored element is 0 whatever its logit
    assert s.isnan() and c.item() == 3 and ws.item() == 3.0


def test_determinism(monkeypatch):
    monkeypatch.setattr(K, "BLOCK_F32", 128)
    x, y = make_inputs(5003, seed=101)
    w = positive(7, -1, 1, seed=102)
    outs = []
    for _ in range(2):
        lo, g = torch.empty(5003), torch.empty(5003)
        sums = K.forward(
            x, y, w, 1, None, None, focal_gamma=2.0, label_smoothing=0.1, loss_out=lo, grad_out=g
        )
        outs.append((lo, g, *sums))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_empty():
    x = torch.empty(0)
    s, c, ws = K.forward(x, x, None, None, None, None, loss_out=torch.empty(0), grad_out=torch.empty(0))
    assert s.item() == 0.0 and c.item() == 0 and ws.item() == 0.0
    K.backward_none(x, x, None, None, None, None, torch.empty(0), torch.empty(0))


def test_validation():
    x, y = make_inputs(10)
    with pytest.raises(ValueError):
        K.forward(x, y[:9], None, None, None, None)
    with pytest.raises(ValueError):
        K.forward(x.view(2, 5), y.view(2, 5), None, None, None, None)
    with pytest.raises(ValueError):
        K.forward(x[::2], y[::2], None, None, None, None)
    with pytest.raises(TypeError):
        K.forward(x, y.int(), None, None, None, None)
    with pytest.raises(ValueError):
        K.forward(x, y, torch.ones(3), 0, None, None)
    with pytest.raises(ValueError):
        K.forward(x, y, None, None, None, None, loss_out=torch.empty(9))
    with pytest.raises(ValueError):
        K.backward_none(x, y, None, None, None, None, torch.ones(3), torch.empty(10))


# ---------------------------------------------------------------------------------------------------------
# the compiled path without a GPU: lower the kernels to PTX and cubin for NVIDIA targets


_COMPILE_SCRIPT = r"""
import importlib.util, sys
try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("no ahead-of-time compile API:", exc)
    sys.exit(77)
if "nvidia" not in getattr(triton.backends, "backends", {}):
    print("triton has no NVIDIA backend")
    sys.exit(77)
spec = importlib.util.spec_from_file_location("_bcelogits_kernels_triton_aot", sys.argv[1])
kg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kg)
assert not kg._interpreted()


def build(fn, sig, consts, arch, warps):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    opts = {"num_warps": warps, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


for xt, yt, f64, idx64, arch in [("bf16", "fp16", False, True, 90), ("fp32", "fp64", True, False, 80)]:
    ptrs = dict(x_ptr=xt, y_ptr=yt, w_ptr="fp32", p_ptr="fp16", go_ptr="fp32", gs_ptr="fp64",
                loss_ptr="bf16", grad_ptr=xt, part_ptr="fp64")
    sig = {k: "*" + v for k, v in ptrs.items()}
    ints = ("n", "num_full", "w_len", "w_inner", "p_len", "p_inner", "num_blocks")
    sig.update({k: "i64" if idx64 else "i32" for k in ints})
    sig.update({k: "fp64" for k in ("ls_scale", "ls_shift", "ignore_value", "gamma", "grad_scale")})
    consts = dict(CDT=tl.float64 if f64 else tl.float32, F64=f64, LIBDEVICE=True, EMULATE_RN=False,
                  IDX64=idx64, W_MODE=5, P_MODE=3, HAS_LS=True, HAS_IGNORE=True, HAS_FOCAL=True,
                  WRITE_LOSS=True, WRITE_GRAD=True, GO_MODE=2, GS_MODE=2, REDUCE=True,
                  BLOCK=kg.BLOCK_F64 if f64 else kg.BLOCK_F32)
    ck = build(kg._bce_kernel, sig, consts, arch, kg.NUM_WARPS)
    ptx = ck.asm["ptx"]
    assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, "non-IEEE division"
    assert ("div.rn.f64" if f64 else "div.rn.f32") in ptx
    assert ck.asm.get("cubin"), "no cubin"
    build(kg._partials_kernel, {"src_ptr": "*fp64", "dst_ptr": "*fp64", "nb_src": "i32", "nb_dst": "i32"},
          {"RBLOCK": kg.REDUCE_BLOCK}, arch, 8)
    sig = {"part_ptr": "*fp64", "out_ptr": "*fp64", "count_ptr": "*i64", "num_blocks": "i32"}
    build(kg._finish_kernel, sig, {"RBLOCK": kg.REDUCE_BLOCK}, arch, 8)
print("compiled")
"""


def test_compiles_for_nvidia():
    # the compiled path on a machine without a GPU: a fresh process (triton not in interpreter mode)
    # lowers the fullest kernel variants to PTX and cubin for sm_80 and sm_90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, KERNELS_PATH],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled" in proc.stdout


_NO_TRITON_SCRIPT = r"""
import importlib.util, sys
sys.modules["triton"] = None  # as if triton were not installed
spec = importlib.util.spec_from_file_location("_bcelogits_kernels_triton_missing", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
import torch
assert not m.available() and not m.available("cpu") and not m.available("cuda")
assert "triton" in m.unavailable_reason, m.unavailable_reason
x = torch.zeros(3)
try:
    m.forward(x, x, None, None, None, None)
except RuntimeError as exc:
    assert "unavailable" in str(exc)
    print("unavailable:", m.unavailable_reason)
"""


def test_import_without_triton():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TRITON_SCRIPT, KERNELS_PATH], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unavailable:" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# real GPU (compiled kernels, libdevice math); skipped without CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    @pytest.fixture(scope="class")
    def kg(self):
        if INTERPRETED:  # (a class-scoped fixture runs before the autouse guard)
            pytest.skip("triton was imported with TRITON_INTERPRET=1 in this process; run this file alone")
        assert not K._interpreted()
        assert K.available("cuda") and K.available() and not K.available("cpu")
        return K

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_plain_large(self, kg, dtype):
        x, y = make_inputs((1 << 22) + 3, dtype, seed=201, device="cuda")
        run_and_check(x, y, kernels=kg, out_dtype=torch.float32 if dtype == torch.bfloat16 else dtype)

    def test_all_options_large(self, kg):
        n = 3 * 1000 * 1403  # (B, C, H) with C = 1000 on the middle dim
        x, y = make_inputs(n, torch.float32, seed=202, device="cuda")
        y[::11] = -100
        w = positive(1000, -1, 1, seed=203, device="cuda")
        p = positive(1403, -6, 6, seed=204, device="cuda")
        for gamma in (0.0, 0.5, 2.0):
            run_and_check(x, y, w, 1403, p, 1, kernels=kg, label_smoothing=0.1, ignore_index=-100,
                          focal_gamma=gamma, grad_scale=1.0 / n)  # fmt: skip

    def test_extreme_logits(self, kg):
        # the small side alone (hard target on the confident side): loss = c * exp(-|x|), where
        # an approximate exp (ex2.approx) would miss 1e-6; also pos_weight up to 1e6
        n = (1 << 20) + 1
        g = torch.Generator().manual_seed(205)
        x = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 100).float().cuda()
        y = (x > 0).float()
        p = positive(n, -6, 6, seed=206, device="cuda")
        run_and_check(x, y, None, 1, p, 1, kernels=kg)
        run_and_check(x, 1 - y, None, 1, p, 1, kernels=kg)

    def test_backward_none_and_determinism(self, kg):
        n = (1 << 21) + 5
        x, y = make_inputs(n, torch.float16, seed=207, device="cuda")
        go = torch.randn(n, device="cuda")
        g1, g2 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        kg.backward_none(x, y, None, None, None, None, go, g1, focal_gamma=2.0)
        kg.backward_none(x, y, None, None, None, None, go, g2, focal_gamma=2.0)
        assert torch.equal(g1, g2)
        ref = reference(x, y, focal_gamma=2.0)
        gd = go.double()
        assert_close_scaled(
            g1, gd * ref["grad"], gd.abs() * ref["gscale"] * ref["cond"], 2e-5, F32_TINY, "grad"
        )
        a = kg.forward(x, y, None, None, None, None)
        b = kg.forward(x, y, None, None, None, None)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    def test_over_2_31_elements(self, kg):
        # int64 offsets: x = 0 (loss w*log 2, grad w/2) except a tail of x = 3 past element 2**31
        n = 2**31 + 4099
        free, _ = torch.cuda.mem_get_info()
        if free < 3 * 2 * n + (1 << 30):
            pytest.skip("not enough GPU memory for three bf16 tensors of 2**31 elements")
        tail = 5000
        x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
        y = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
        x[-tail:] = 3.0
        w = torch.tensor([1.0, 2.0, 3.0], device="cuda")
        g = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        s, c, ws = kg.forward(x, y, w, 1, None, None, grad_out=g)

        def per_class(m):  # how often each class k occurs among the first m elements (w[i % 3])
            return [(m - k + 2) // 3 for k in range(3)]

        wl = w.tolist()
        head = sum(wk * ck for wk, ck in zip(wl, per_class(n - tail), strict=True))
        sp3 = float(torch.nn.functional.softplus(torch.tensor(3.0, dtype=torch.float64)))
        tail_w = w.double()[torch.arange(n - tail, n, device="cuda") % 3]
        expect = head * 0.6931471805599453 + sp3 * float(tail_w.sum())
        assert c.item() == n
        assert ws.item() == sum(wk * ck for wk, ck in zip(wl, per_class(n), strict=True))
        assert abs(s.item() - expect) <= 1e-5 * expect
        sig3 = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64, device="cuda"))
        assert torch.equal(g[-tail:], (tail_w * sig3).to(torch.bfloat16))
        assert torch.equal(
            g[:tail], (w.double()[torch.arange(tail, device="cuda") % 3] * 0.5).to(torch.bfloat16)
        )
