"""Drop-in edges (issue 19): places where an audit found us differing from torch 2.13 or from ourselves.

One group per item: export with a dynamic batch and weights (1), 0-dim CPU weights with tensors on
another device (2), one ignore_index rule on every route (3), the plain path's 'none' layouts (4),
pos_weight_from_targets on labels outside [0, 1] (8), strict=True under vmap (9), float8 dtypes (10),
torch.jit.script and the compile count (11). torch is the reference wherever it defines the behaviour.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton route on CPU tensors (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bcelogits  # noqa: E402
from bcelogits import _args, functional, kernels  # noqa: E402

bce = bcelogits.binary_cross_entropy_with_logits


# ---------------------------------------------------------------------------------------------------------
# 1. torch.export with a dynamic batch and a weight / pos_weight
class _LossModel(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, x, y):
        return self.loss(x, y)


class _WeightedByInput(torch.nn.Module):
    """The weight is an input with the batch dimension: (b, 1) for a (b, C) loss."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y, w):
        return self.fn(x, y, weight=w)


def _dims():
    return [
        pytest.param(lambda: torch.export.Dim("b"), id="Dim(b)"),
        pytest.param(lambda: torch.export.Dim.AUTO, id="AUTO"),
    ]


class TestExportDynamicBatch:
    @pytest.mark.parametrize("dim", _dims())
    @pytest.mark.parametrize(
        "kw",
        [
            {"pos_weight": torch.tensor([0.5, 2.0, 3.0])},
            {"weight": torch.tensor([0.2, 1.0, 1.7])},
            {"weight": torch.tensor([0.2, 1.0, 1.7]), "reduction": "none"},
            {"weight": torch.tensor([0.2, 1.0, 1.7]), "pos_weight": torch.tensor([2.0]), "reduction": "sum"},
        ],
        ids=["pos_weight", "weight", "weight-none", "both-sum"],
    )
    def test_module_exports_with_a_dynamic_batch(self, dim, kw):
        """Exported (non-strict) on a batch of 4 and run on batches of 7 and 2: torch's loss does this; ours
        raised 'Constraints violated (b)' (Dim) or fixed the batch to 4 (AUTO)."""
        d = dim()
        x, y = torch.randn(4, 3), torch.rand(4, 3)
        ours = _LossModel(bcelogits.BCEWithLogitsLoss(**kw))
        ep = torch.export.export(ours, (x, y), dynamic_shapes=({0: d}, {0: d}), strict=False)
        for b in (7, 2):
            x2, y2 = torch.randn(b, 3), torch.rand(b, 3)
            want = torch.nn.BCEWithLogitsLoss(**kw)(x2, y2)
            torch.testing.assert_close(ep.module()(x2, y2), want, rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("dim", _dims())
    def test_weight_with_the_batch_dimension(self, dim):
        d = dim()
        x, y, w = torch.randn(4, 3), torch.rand(4, 3), torch.rand(4, 1)
        shapes = ({0: d}, {0: d}, {0: d})
        torch.export.export(
            _WeightedByInput(F.binary_cross_entropy_with_logits),
            (x, y, w),
            dynamic_shapes=shapes,
            strict=False,
        )  # fmt: skip  (torch's own: exports)
        ep = torch.export.export(_WeightedByInput(bce), (x, y, w), dynamic_shapes=shapes, strict=False)
        x2, y2, w2 = torch.randn(6, 3), torch.rand(6, 3), torch.rand(6, 1)
        want = F.binary_cross_entropy_with_logits(x2, y2, weight=w2)
        torch.testing.assert_close(ep.module()(x2, y2, w2), want, rtol=1e-6, atol=1e-7)

    def test_broadcast_errors_unchanged(self):
        """The shape checks still reject what they rejected (the symbolic rule is torch's broadcast)."""
        x, y = torch.randn(4, 3), torch.rand(4, 3)
        with pytest.raises(RuntimeError, match="cannot be broadcast"):
            bce(x, y, weight=torch.rand(2))
        with pytest.raises(RuntimeError, match="would enlarge"):
            bce(x, y, pos_weight=torch.rand(2, 4, 3))


# ---------------------------------------------------------------------------------------------------------
# 2. a 0-dim CPU weight / pos_weight (or target, input) with tensors on another device
def _meta(*shape):
    return torch.empty(shape, device="meta")


class TestCpuScalarOnAnotherDevice:
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    @pytest.mark.parametrize(
        "kw",
        [{"pos_weight": torch.tensor(3.0)}, {"weight": torch.tensor(2.0)},
         {"weight": torch.tensor(2.0, dtype=torch.float64), "pos_weight": torch.tensor(3.0)}],
        ids=["pos_weight", "weight", "both"],
    )  # fmt: skip
    def test_weights_allowed_as_in_torch(self, kw, reduction):
        x, y = _meta(4, 3), _meta(4, 3)
        want = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kw)  # torch accepts it
        got = bce(x, y, reduction=reduction, **kw)
        assert (got.device, got.shape, got.dtype) == (want.device, want.shape, want.dtype)
        got = bcelogits.BCEWithLogitsLoss(reduction=reduction, **kw)(x, y)
        assert (got.device, got.shape) == (want.device, want.shape)

    @pytest.mark.parametrize("which", ["input", "target"])
    def test_zero_dim_cpu_input_or_target(self, which):
        """torch also exempts a 0-dim CPU input or target (both are then 0-dim): the result is on the other
        tensor's device."""
        x = torch.tensor(0.5) if which == "input" else _meta()
        y = torch.tensor(0.25) if which == "target" else _meta()
        want = F.binary_cross_entropy_with_logits(x, y)
        got = bce(x, y)
        assert (got.device, got.shape) == (want.device, want.shape) == (torch.device("meta"), ())

    @pytest.mark.parametrize("name", ["weight", "pos_weight"])
    @pytest.mark.parametrize("shape", [(1,), (3,)])
    def test_other_cpu_tensors_still_rejected(self, name, shape):
        x, y = _meta(4, 3), _meta(4, 3)
        kw = {name: torch.ones(shape)}
        with pytest.raises(RuntimeError):
            F.binary_cross_entropy_with_logits(x, y, **kw)
        with pytest.raises(RuntimeError, match=rf"'{name}' is on cpu but input is on meta.*{name}\.to\("):
            bce(x, y, **kw)

    def test_only_cpu_scalars_are_exempt(self):
        """A 0-dim tensor on another device than the CPU inputs is not exempt (torch: RuntimeError)."""
        x, y = torch.randn(4, 3), torch.rand(4, 3)
        with pytest.raises(RuntimeError):
            F.binary_cross_entropy_with_logits(x, y, pos_weight=_meta())
        with pytest.raises(RuntimeError, match="'pos_weight' is on meta but input is on cpu"):
            bce(x, y, pos_weight=_meta())

    def test_kernels_get_the_scalar_on_the_device(self, monkeypatch):
        """The CPU scalar is moved to the inputs' device before any kernel is chosen: on CUDA the Triton
        kernel reads weight pointers on the device, and a CPU pointer there would be an illegal access.
        Every tensor that reaches kernels.forward is on the inputs' device."""
        seen = []
        real = kernels.forward

        def spy(call, *a, **k):
            seen.append(
                {
                    t.device.type
                    for t in (call.input, call.target, call.weight, call.pos_weight)
                    if t is not None
                }
            )
            return real(call, *a, **k)

        monkeypatch.setattr(kernels, "forward", spy)
        x, y = _meta(4, 3), _meta(4, 3)
        bce(x, y, weight=torch.tensor(2.0), pos_weight=torch.tensor(3.0))
        bce(x.requires_grad_(), y, weight=torch.tensor(2.0), reduction="none")
        assert len(seen) == 2 and all(d == {"meta"} for d in seen), seen
        call = _args.parse(x, y, torch.tensor(2.0), torch.tensor(3.0), "mean", _args.Options())
        assert call.weight.device.type == call.pos_weight.device.type == "meta"
        assert call.weight.shape == call.pos_weight.shape == ()

    @pytest.mark.parametrize("route", ["plain", "cpu", "triton"])
    def test_values_with_a_cpu_scalar(self, route):
        """On CPU tensors the scalar needs no move; every route gives torch's value with it."""
        _require_route(route)
        x, y = torch.randn(5, 3), torch.rand(5, 3)
        kw = {"weight": torch.tensor(0.7), "pos_weight": torch.tensor(3.0)}
        with kernels.use(route):
            got = bce(x, y, **kw)
        torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(x, y, **kw))


# ---------------------------------------------------------------------------------------------------------
# 3. ignore_index: one rule, target == ignore_index in the target's dtype, on every route
def _route_available(route) -> bool:
    x, y = torch.randn(4), torch.rand(4)
    call = _args.parse(x, y, None, None, "mean", _args.Options())
    if route == "plain":
        return True
    with kernels.use(route):
        k = kernels.choose(call)
    return k is not None and k.__name__.endswith(route)


def _require_route(route):
    if route == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install bcelogits[gpu])")
    if not _route_available(route):
        if route == "cpu" and os.environ.get("CI"):
            pytest.fail("the CPU kernel is unavailable in CI")
        pytest.skip(f"the {route} route cannot serve CPU tensors in this process (triton imported without "
                    "TRITON_INTERPRET=1, or the kernel is unavailable)")  # fmt: skip


IGNORE_VALUES = [-999.0, 0.1, 1.0 / 3.0, 1.0 + 2.0**-11 + 2.0**-40]  # (the last: torch rounds it twice)
TARGET_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


class TestIgnoreIndexOneRule:
    @pytest.mark.parametrize("route", ["plain", "cpu", "triton"])
    @pytest.mark.parametrize("wide_input", [False, True], ids=["input-like-target", "float64-input"])
    @pytest.mark.parametrize("ydtype", TARGET_DTYPES, ids=str)
    def test_routes_ignore_what_torch_compares_equal(self, route, ydtype, wide_input):
        """The elements ignored are those where torch's ``target == ignore_index`` holds, on every route
        and reduction: bfloat16 -999 is stored as -1000 and matches ignore_index=-999; a float32 target
        holding float32(0.1) matches 0.1 also when the math runs in float64 (a float64 input)."""
        _require_route(route)
        g = torch.Generator().manual_seed(1)
        n = 24
        xdtype = torch.float64 if wide_input else ydtype
        x = (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3).to(xdtype)
        for value in IGNORE_VALUES:
            y = (torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1).to(ydtype)
            y[::5] = torch.tensor(value, dtype=ydtype)  # (as a pad written into the target)
            ignored = y == value  # torch's comparison: the reference
            assert ignored.any()
            with kernels.use(route):
                xg = x.clone().requires_grad_()
                none = bce(xg, y, reduction="none", ignore_index=value)
                (gx,) = torch.autograd.grad(none.sum(), xg)
                mean = bce(x, y, ignore_index=value)
            assert torch.equal(none == 0, ignored), (value, none)
            assert torch.equal(gx == 0, ignored)
            kept = ~ignored
            want = F.binary_cross_entropy_with_logits(x[kept].double(), y[kept].double())
            torch.testing.assert_close(mean.double(), want, rtol=1e-2 if ydtype.itemsize == 2 else 1e-6,
                                       atol=0)  # fmt: skip

    @pytest.mark.parametrize("route", ["plain", "cpu"])
    @pytest.mark.parametrize("ydtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
    def test_numpy_routes(self, route, ydtype):
        """NumPy arrays follow NumPy's ``target == ignore_index`` (one rounding, to the target's dtype)."""
        _require_route(route)
        rng = np.random.default_rng(2)
        x = rng.uniform(-3, 3, 20).astype(ydtype)
        for value in IGNORE_VALUES:
            y = rng.uniform(0.1, 0.9, 20).astype(ydtype)
            y[::4] = value
            with kernels.use(route):
                none = bce(x, y, reduction="none", ignore_index=value)
            np.testing.assert_array_equal(none == 0, y == value)

    def test_strict_check_uses_the_same_rule(self):
        y = torch.tensor([0.5, -999.0, 1.0], dtype=torch.bfloat16)  # -999 stored as -1000
        x = torch.tensor([3.0, 4.0, -2.0])
        bce(x, y, ignore_index=-999, strict=True)  # no 'outside [0, 1]' error: the pad is ignored

    def test_rounding_is_torchs(self):
        """``_args.ignore_value`` equals ``torch.tensor(v, dtype=...)`` (float32 first, then 16-bit) on
        random, subnormal, overflowing and double-rounding values."""
        rnd = random.Random(3)
        values = [rnd.uniform(-1, 1) * 10 ** rnd.uniform(-46, 39) for _ in range(3000)]
        values += [1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, 65519.9, 65520.0, 3.4e38, 3.5e38]
        values += [
            2**-25,
            1.5 * 2**-24,
            2**-134,
            1.5 * 2**-133,
            1e-46,
            -999.0,
            0.0,
            -0.0,
            math.inf,
            -math.inf,
        ]
        for dt in TARGET_DTYPES:
            for v in values:
                want = torch.tensor(v, dtype=dt).item()
                assert _args.ignore_value(torch, v, dt) == want, (dt, v)

    def test_compiled_call_uses_the_rule(self):
        y = torch.tensor([0.5, -999.0, 1.0], dtype=torch.bfloat16)
        x = torch.tensor([3.0, 4.0, -2.0], requires_grad=True)
        f = torch.compile(lambda a, b: bce(a, b, reduction="none", ignore_index=-999.0), backend="eager",
                          fullgraph=True)  # fmt: skip
        out = f(x, y)
        assert out[1].item() == 0.0 and out[0].item() > 0


# ---------------------------------------------------------------------------------------------------------
# 4. the plain path lays out 'none' losses and gradients as torch does
def _layouts():
    return {
        "contiguous": lambda t: t,
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "transposed": lambda t: t.transpose(1, 3).contiguous().transpose(1, 3),
        "permuted": lambda t: t.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0),
        "sliced": lambda t: torch.cat([t, t], 3)[..., ::2],
        "expanded": lambda t: t[:, :1].expand(t.shape),
    }


LAYOUTS = list(_layouts())
LAYOUT_PAIRS = [p for p in itertools.product(LAYOUTS, LAYOUTS) if p[0] != "expanded"]


class TestPlainPathLayout:
    @pytest.mark.parametrize("weights", ["none", "pos_weight", "weight"])
    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    @pytest.mark.parametrize("xl,yl", LAYOUT_PAIRS, ids=[f"{a}-{b}" for a, b in LAYOUT_PAIRS])
    def test_strides_like_torch(self, xl, yl, reduction, weights):
        """Forced plain route: the 'none' loss, the gradient autograd.grad returns and x.grad have torch's
        strides (channels_last logits with a contiguous target: torch (60, 20, 5, 1), the plain path gave
        (60, 1, 15, 3))."""
        layouts = _layouts()
        g = torch.Generator().manual_seed(4)
        x0, y0 = torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
        kw = {"pos_weight": torch.rand(5, generator=g) + 0.5, "weight": torch.rand(3, 1, 1, generator=g)}
        kw = {k: v for k, v in kw.items() if k == weights}
        results = {}
        for impl in ("torch", "ours"):
            fn = F.binary_cross_entropy_with_logits if impl == "torch" else bce
            x = layouts[xl](x0.clone()).requires_grad_()
            y = layouts[yl](y0.clone())
            with kernels.use("plain"):
                loss = fn(x, y, reduction=reduction, **kw)
                go = torch.ones_like(loss) * 2
                (gx,) = torch.autograd.grad(loss, x, go, retain_graph=True)
                loss.backward(go)
            results[impl] = (loss.stride(), gx.stride(), x.grad.stride())
            results[impl + " values"] = (loss.detach(), gx)
        assert results["ours"] == results["torch"]
        torch.testing.assert_close(results["ours values"], results["torch values"])


# ---------------------------------------------------------------------------------------------------------
# 8. pos_weight_from_targets rejects targets outside [0, 1]
class TestPosWeightFromTargetsRange:
    @pytest.mark.parametrize("kind", ["torch", "numpy"])
    def test_mask_0_255(self, kind):
        y = np.zeros((10, 2))
        y[:3] = 255
        y = torch.from_numpy(y) if kind == "torch" else y
        with pytest.raises(ValueError, match=r"\[0, 255\].*0/255 mask.*mask / 255"):
            bcelogits.pos_weight_from_targets(y)

    @pytest.mark.parametrize("kind", ["torch", "numpy"])
    def test_plus_minus_one(self, kind):
        y = -np.ones((10, 2), dtype=np.float32)
        y[:3] = 1
        y = torch.from_numpy(y) if kind == "torch" else y
        with pytest.raises(ValueError, match=r"\[-1, 1\].*-1/\+1 labels.*\(y \+ 1\) / 2"):
            bcelogits.pos_weight_from_targets(y)

    def test_other_range(self):
        with pytest.raises(ValueError, match=r"\[0, 2\].*into \[0, 1\]"):
            bcelogits.pos_weight_from_targets(torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match=r"\[-0.5, 1\]"):
            bcelogits.pos_weight_from_targets(torch.tensor([-0.5, 1.0, 0.0]))

    def test_the_fixes_work(self):
        mask = torch.tensor([[0.0], [255.0], [0.0], [0.0]])
        torch.testing.assert_close(bcelogits.pos_weight_from_targets(mask / 255), torch.tensor([3.0]))
        pm = np.array([-1.0, 1.0, -1.0, -1.0])
        np.testing.assert_allclose(bcelogits.pos_weight_from_targets((pm + 1) / 2), [3.0])
        soft = torch.tensor([[0.25], [0.75], [0.0], [1.0]])  # soft targets in [0, 1]: still accepted
        torch.testing.assert_close(bcelogits.pos_weight_from_targets(soft), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------
# 9. strict=True under torch.func.vmap
class TestStrictUnderVmap:
    MESSAGE = r"strict=True.*torch\.func\.vmap.*eagerly.*strict=True on the unbatched tensors"

    def test_vmap(self):
        x, y = torch.randn(3, 4), torch.rand(3, 4)
        with pytest.raises(RuntimeError, match=self.MESSAGE):
            torch.func.vmap(lambda a, b: bce(a, b, strict=True))(x, y)

    def test_vmap_of_grad_and_batched_weight(self):
        x, y = torch.randn(3, 4), torch.rand(3, 4)
        with pytest.raises(RuntimeError, match=self.MESSAGE):
            torch.func.vmap(torch.func.grad(lambda a, b: bce(a, b, strict=True)))(x, y)
        with pytest.raises(RuntimeError, match=self.MESSAGE):
            torch.func.vmap(lambda w: bce(x, y, weight=w, strict=True))(torch.rand(2, 4))

    def test_eager_and_grad_still_check(self):
        x, y = torch.randn(3, 4), torch.rand(3, 4)
        torch.func.grad(lambda a: bce(a, y, strict=True))(x)  # grad alone can read values
        with pytest.raises(ValueError, match="outside"):
            torch.func.grad(lambda a: bce(a, y * 3, strict=True))(x)
        # the advice works: strict outside vmap, then vmap without it
        bce(x, y, strict=True)
        torch.func.vmap(lambda a, b: bce(a, b))(x, y)


# ---------------------------------------------------------------------------------------------------------
# 10. float8 (and float4) input or target
ONE_BYTE_FLOATS = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                   "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2") if hasattr(torch, n)]  # fmt: skip


class TestFloat8:
    @pytest.mark.parametrize("which", ["input", "target"])
    @pytest.mark.parametrize("dtype", ONE_BYTE_FLOATS, ids=str)
    def test_not_implemented_like_torch(self, dtype, which):
        if dtype.is_floating_point and dtype.itemsize == 1 and "float4" in str(dtype):
            a = torch.zeros(4, dtype=torch.uint8).view(dtype)
        else:
            a = torch.zeros(4).to(dtype)
        b = torch.zeros(4)
        x, y = (a, b) if which == "input" else (b, a)
        with pytest.raises(NotImplementedError):
            F.binary_cross_entropy_with_logits(x, y)
        with pytest.raises(NotImplementedError, match=rf"'{which}' has dtype {dtype}.*{which}\.float\(\)"):
            bce(x, y)
        with pytest.raises(NotImplementedError, match=rf"'{which}' has dtype"):
            bcelogits.BCEWithLogitsLoss(label_smoothing=0.1)(x, y)


# ---------------------------------------------------------------------------------------------------------
# 11. torch.jit.script, and one compilation
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.loss = bcelogits.BCEWithLogitsLoss(pos_weight=torch.ones(4))

    def forward(self, x, y):
        return self.loss(self.lin(x), y)


class TestJitAndCompile:
    MESSAGE = r"cannot be compiled by torch\.jit\.script.*torch\.compile.*torch\.jit\.trace"

    def test_script_says_what_works(self):
        with pytest.raises(RuntimeError, match=self.MESSAGE):
            torch.jit.script(bcelogits.BCEWithLogitsLoss())
        with pytest.raises(RuntimeError, match=self.MESSAGE):
            torch.jit.script(_Net())

    def test_trace_works(self):
        m = bcelogits.BCEWithLogitsLoss(pos_weight=torch.full([3], 2.0))
        with pytest.warns(Warning):  # (torch's deprecation and tracer warnings)
            traced = torch.jit.trace(m, (torch.randn(4, 3), torch.rand(4, 3)))
        x, y = torch.randn(4, 3), torch.rand(4, 3)
        torch.testing.assert_close(
            traced(x, y), torch.nn.BCEWithLogitsLoss(pos_weight=torch.full([3], 2.0))(x, y)
        )

    @pytest.mark.parametrize("options", [{}, {"ignore_index": -1.0, "label_smoothing": 0.1}])
    def test_compiles_once(self, monkeypatch, options):
        """The first call compiled before any eager call (the lazily imported modules not yet cached)
        compiles once for three calls of one shape; it compiled twice (a guard on functional._modules)."""
        from torch._dynamo.testing import CompileCounter

        monkeypatch.setattr(functional, "_modules", {})  # the state of a fresh process
        monkeypatch.setattr(kernels, "_modules", {})
        torch._dynamo.reset()
        net = _Net()
        net.loss = bcelogits.BCEWithLogitsLoss(pos_weight=torch.ones(4), **options)
        counter = CompileCounter()
        compiled = torch.compile(net, backend=counter)
        x, y = torch.randn(16, 8), torch.rand(16, 4)
        for _ in range(3):
            compiled(x, y).backward()
        assert counter.frame_count == 1
        torch._dynamo.reset()
