"""Argument validation: the same exception types as torch, messages that name the argument, and the
legacy ``size_average`` / ``reduce`` / ``'elementwise_mean'`` handling with torch's warnings."""

from __future__ import annotations

import itertools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcelogits

bce = bcelogits.binary_cross_entropy_with_logits


def _record(fn):
    """Run ``fn`` and return (result, [(category, message), ...]) of every warning it emitted."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        result = fn()
    return result, [(w.category, str(w.message)) for w in rec]


# ----------------------------------------------------------------------------------------------------
# reduction strings
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["invalid", "Mean", "", "avg", "elementwise-mean"])
def test_invalid_reduction_functional(reduction):
    x, y = torch.randn(3, 5), torch.rand(3, 5)
    with pytest.raises(ValueError) as torch_err:
        F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{reduction} is not a valid value for reduction')}$"):
        bce(x, y, reduction=reduction)
    assert str(torch_err.value) == f"{reduction} is not a valid value for reduction"


@pytest.mark.parametrize("reduction", ["invalid", "MEAN"])
def test_invalid_reduction_module(reduction):
    x, y = torch.randn(3, 5), torch.rand(3, 5)
    # torch raises at forward; raising at construction is acceptable as long as it is this ValueError
    with pytest.raises(ValueError, match=re.escape(f"{reduction} is not a valid value for reduction")):
        bcelogits.BCEWithLogitsLoss(reduction=reduction)(x, y)


def test_torch_suite_invalid_reduction_strings():
    # from test_nn.py::test_invalid_reduction_strings
    inp = torch.randn(3, 5, requires_grad=True)
    for reduction in ["none", "invalid"]:
        if reduction == "invalid":
            with pytest.raises(ValueError):
                bce(inp, inp, reduction=reduction)
        else:
            bce(inp, inp, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# legacy size_average / reduce
# ----------------------------------------------------------------------------------------------------

LEGACY = [
    (sa, rd) for sa, rd in itertools.product([None, True, False], repeat=2) if not (sa is None and rd is None)
]


def _legacy_string(size_average, reduce):
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        return "mean"
    if reduce:
        return "sum"
    return "none"


@pytest.mark.parametrize("explicit", [None, "none", "sum", "mean"])
@pytest.mark.parametrize("size_average,reduce", LEGACY)
def test_legacy_args_functional(size_average, reduce, explicit):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 3, dtype=torch.float64)
    kw = {} if explicit is None else {"reduction": explicit}
    theirs, twarn = _record(
        lambda: F.binary_cross_entropy_with_logits(x, y, size_average=size_average, reduce=reduce, **kw)
    )
    ours, owarn = _record(lambda: bce(x, y, size_average=size_average, reduce=reduce, **kw))
    expected = _legacy_string(size_average, reduce)
    msg = f"size_average and reduce args will be deprecated, please use reduction='{expected}' instead."
    assert twarn == [(UserWarning, msg)]  # documents torch's behaviour
    assert owarn == twarn
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours, bce(x, y, reduction=expected), rtol=0, atol=0)


@pytest.mark.parametrize("size_average,reduce", LEGACY)
def test_legacy_args_module(size_average, reduce):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 3, dtype=torch.float64)
    expected = _legacy_string(size_average, reduce)
    msg = f"size_average and reduce args will be deprecated, please use reduction='{expected}' instead."
    tmod, twarn = _record(
        lambda: torch.nn.BCEWithLogitsLoss(size_average=size_average, reduce=reduce, reduction="sum")
    )
    omod, owarn = _record(
        lambda: bcelogits.BCEWithLogitsLoss(size_average=size_average, reduce=reduce, reduction="sum")
    )
    assert twarn == [(UserWarning, msg)]
    assert owarn == twarn, "the module warns once, at construction"
    assert omod.reduction == tmod.reduction == expected
    theirs, tcall = _record(lambda: tmod(x, y))
    ours, ocall = _record(lambda: omod(x, y))
    assert ocall == tcall == [], "no warning at forward: the string was stored"
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_legacy_args_positional_module():
    # BCEWithLogitsLoss(weight, size_average, reduce, reduction, pos_weight)
    w = torch.rand(3, dtype=torch.float64)
    tmod, twarn = _record(lambda: torch.nn.BCEWithLogitsLoss(w, False))
    omod, owarn = _record(lambda: bcelogits.BCEWithLogitsLoss(w, False))
    assert owarn == twarn
    assert omod.reduction == tmod.reduction == "sum"


def test_elementwise_mean_functional():
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 3, dtype=torch.float64)
    theirs, twarn = _record(lambda: F.binary_cross_entropy_with_logits(x, y, reduction="elementwise_mean"))
    ours, owarn = _record(lambda: bce(x, y, reduction="elementwise_mean"))
    assert twarn == [
        (UserWarning, "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
    ]
    assert owarn == twarn
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours, bce(x, y, reduction="mean"), rtol=0, atol=0)


def test_elementwise_mean_module():
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.rand(4, 3, dtype=torch.float64)

    def both(mod_cls):
        def run():
            m = mod_cls(reduction="elementwise_mean")
            return m, m(x, y)

        return _record(run)

    (tmod, theirs), twarn = both(torch.nn.BCEWithLogitsLoss)
    (omod, ours), owarn = both(bcelogits.BCEWithLogitsLoss)
    assert owarn == twarn
    assert omod.reduction == tmod.reduction
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------

SIZE_MISMATCH = [
    ((4, 3), (3,)),  # broadcastable, still an error
    ((4, 3), (4, 1)),  # broadcastable
    ((4, 3), (1, 4, 3)),  # broadcastable
    ((5,), (5, 1)),
    ((5, 1), (5,)),
    ((2, 3), (3, 2)),
    ((), (1,)),
    ((0,), (1,)),
]


@pytest.mark.parametrize("xs,ys", SIZE_MISMATCH)
def test_target_size_mismatch(xs, ys):
    x, y = torch.randn(xs), torch.rand(ys)
    expected = f"Target size ({torch.Size(ys)}) must be the same as input size ({torch.Size(xs)})"
    with pytest.raises(ValueError) as terr:
        F.binary_cross_entropy_with_logits(x, y)
    assert str(terr.value) == expected
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        bce(x, y)
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        bcelogits.BCEWithLogitsLoss()(x, y)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}], ids=["plain call", "with an option"])
@pytest.mark.parametrize("other", ["target", "input"])
def test_target_on_another_device_is_runtime_error(options, other):
    """A target on another device than the input (the classic CUDA target, CPU logits) raises
    RuntimeError like torch, naming the target and the fix, before any kernel reads its memory (the
    'meta' device stands in for CUDA: its tensors have no data)."""
    x, y = torch.randn(64, 100), torch.rand(64, 100)
    if other == "target":
        y = y.to("meta")
    else:
        x = x.to("meta")
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, y)
    with pytest.raises(
        RuntimeError, match=r"'target' is on .* but input is on .*target\.to\(input\.device\)"
    ):
        bcelogits.binary_cross_entropy_with_logits(x, y, **options)
    with pytest.raises(RuntimeError, match="'target' is on"):
        bcelogits.BCEWithLogitsLoss(**options)(x, y)


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_weight_on_another_device_is_runtime_error(name):
    """The same rule for a weight or pos_weight on another device than the input: RuntimeError like
    torch's, naming the argument and the fix."""
    x, y = torch.randn(64, 100), torch.rand(64, 100)
    kw = {name: torch.rand(100, device="meta")}
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, y, **kw)
    with pytest.raises(RuntimeError, match=rf"'{name}' is on meta but input is on cpu.*{name}\.to\(input"):
        bcelogits.binary_cross_entropy_with_logits(x, y, **kw)
    with pytest.raises(RuntimeError, match=rf"'{name}' is on meta"):
        bcelogits.BCEWithLogitsLoss(**kw)(x, y)


def test_target_size_mismatch_exact_spec_message():
    with pytest.raises(
        ValueError,
        match=re.escape("Target size (torch.Size([3])) must be the same as input size (torch.Size([4, 3]))"),
    ):
        bce(torch.randn(4, 3), torch.rand(3))


BAD_COEF_SHAPES = [
    ((4, 3), (5,), "cannot broadcast"),
    ((4, 3), (4,), "cannot broadcast"),
    ((4, 3), (2, 4, 3), "would enlarge the output"),
    ((4, 3), (1, 1, 3), "would enlarge the output"),
    ((3,), (1, 3), "would enlarge the output"),
    ((), (2,), "would enlarge the output"),
    ((2, 3, 4), (3, 1, 4), "cannot broadcast"),
]


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
@pytest.mark.parametrize("xs,cs,why", BAD_COEF_SHAPES)
def test_bad_weight_shapes_raise_runtime_error(name, xs, cs, why):
    x, y, c = torch.randn(xs), torch.rand(xs), torch.rand(cs)
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, y, reduction="none", **{name: c})
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(RuntimeError) as err:
            bce(x, y, reduction=reduction, **{name: c})
        assert name in str(err.value), f"message should name {name!r}: {err.value}"
        with pytest.raises(RuntimeError) as err:
            bcelogits.BCEWithLogitsLoss(reduction=reduction, **{name: c})(x, y)
        assert name in str(err.value)


def test_pos_weight_error_does_not_mention_weight_only():
    # a message for pos_weight must say pos_weight, not just "weight"
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="pos_weight"):
        bce(x, y, pos_weight=torch.rand(5))
    with pytest.raises(RuntimeError) as err:
        bce(x, y, weight=torch.rand(5))
    assert "weight" in str(err.value).replace("pos_weight", "")


# ----------------------------------------------------------------------------------------------------
# requires_grad on weights, dtypes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_weight_requiring_grad_raises_at_forward(name):
    x, y = torch.randn(4, 3, requires_grad=True), torch.rand(4, 3)
    c = torch.rand(3, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, y, **{name: c})
    with pytest.raises(RuntimeError) as err:
        bce(x, y, **{name: c})
    assert name in str(err.value)
    # the module accepts it at construction (as torch does: it is registered as a buffer) ...
    tmod = torch.nn.BCEWithLogitsLoss(**{name: c})
    omod = bcelogits.BCEWithLogitsLoss(**{name: c})
    # ... and fails at forward
    with pytest.raises(RuntimeError):
        tmod(x, y)
    with pytest.raises(RuntimeError) as err:
        omod(x, y)
    assert name in str(err.value)


def test_weight_requiring_grad_raises_even_without_input_grad():
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="weight"):
        bce(x, y, weight=torch.rand(3, requires_grad=True))


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_or_bool_target_raises_runtime_error(tdtype):
    x = torch.randn(4, 3)
    y = torch.ones(4, 3, dtype=tdtype)
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy_with_logits(x, y)
    with pytest.raises(RuntimeError) as err:
        bce(x, y)
    assert "target" in str(err.value)
    with pytest.raises(RuntimeError):
        bcelogits.BCEWithLogitsLoss()(x, y)


@pytest.mark.parametrize("xdtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_raises_not_implemented(xdtype):
    x = torch.ones(4, 3, dtype=xdtype)
    y = torch.rand(4, 3)
    with pytest.raises(NotImplementedError):
        F.binary_cross_entropy_with_logits(x, y)
    with pytest.raises(NotImplementedError) as err:
        bce(x, y)
    assert "input" in str(err.value)
    with pytest.raises(NotImplementedError):
        bcelogits.BCEWithLogitsLoss()(x, y)


# ----------------------------------------------------------------------------------------------------
# non-tensor arguments
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["input", "target", "weight", "pos_weight"])
def test_list_instead_of_tensor_is_type_error(which):
    args = {"input": torch.randn(3), "target": torch.rand(3), "weight": None, "pos_weight": None}
    args[which] = [0.5, 0.25, 0.75]
    with pytest.raises((AttributeError, TypeError)):  # torch: AttributeError or TypeError
        F.binary_cross_entropy_with_logits(**args)
    with pytest.raises(TypeError) as err:
        bce(**args)
    msg = str(err.value)
    assert which in msg, f"message should name {which!r}: {msg}"
    assert "list" in msg, f"message should say a list was given (not a NumPy/torch mix): {msg}"


@pytest.mark.parametrize("which", ["weight", "pos_weight"])
def test_python_float_weight_is_type_error_like_torch(which):
    x, y = torch.randn(3), torch.rand(3)
    with pytest.raises(TypeError) as terr:
        F.binary_cross_entropy_with_logits(x, y, **{which: 2.0})
    assert "float" in str(terr.value)
    with pytest.raises(TypeError) as err:
        bce(x, y, **{which: 2.0})
    msg = str(err.value)
    assert which in msg and "float" in msg, f"message should name {which!r} and the type given: {msg}"


@pytest.mark.parametrize("which", ["input", "target"])
def test_list_instead_of_tensor_module(which):
    args = [torch.randn(3), torch.rand(3)]
    args[["input", "target"].index(which)] = [0.5, 0.25, 0.75]
    with pytest.raises(TypeError) as err:
        bcelogits.BCEWithLogitsLoss()(*args)
    assert which in str(err.value)


def test_list_error_is_catchable_like_torch():
    # code written against torch may catch AttributeError; ours may subclass both
    try:
        bce([0.1, 0.2], torch.rand(2))
    except TypeError:
        pass
    else:  # pragma: no cover
        pytest.fail("no TypeError")


@pytest.mark.parametrize("bad", [1.5, "x", None])
def test_scalar_or_none_target_is_type_error(bad):
    with pytest.raises(TypeError, match="target"):
        bce(torch.randn(3), bad)


@pytest.mark.parametrize("which", ["target", "weight", "pos_weight"])
def test_numpy_mixed_with_torch_is_type_error(which):
    args = {"input": torch.randn(3), "target": torch.rand(3), "weight": None, "pos_weight": None}
    args[which] = np.array([0.5, 0.25, 0.75], dtype=np.float32)
    with pytest.raises(TypeError):
        bce(**args)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_weight_requiring_grad_is_fine_when_grad_is_disabled(name, mode):
    # torch only refuses a weight that requires grad when autograd would record the op
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    c = torch.rand(3, requires_grad=True)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        theirs = F.binary_cross_entropy_with_logits(x, y, **{name: c})
        ours = bce(x, y, **{name: c})
        ours_mod = bcelogits.BCEWithLogitsLoss(**{name: c})(x, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_mod, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["input", "target", "weight", "pos_weight"])
def test_sparse_tensors_are_refused_with_the_argument_and_the_fix(name):
    """torch fails deep inside an operator (NotImplementedError); we name the argument and the fix."""
    args = {"input": torch.randn(4, 5), "target": torch.rand(4, 5), "weight": torch.rand(4, 5),
            "pos_weight": torch.rand(4, 5)}  # fmt: skip
    args[name] = args[name].to_sparse()
    with pytest.raises(NotImplementedError, match=rf"'{name}' must be a dense tensor.*{name}\.to_dense\(\)"):
        bcelogits.binary_cross_entropy_with_logits(**args)
    module = bcelogits.BCEWithLogitsLoss(weight=args["weight"], pos_weight=args["pos_weight"])
    with pytest.raises(bcelogits.LayoutError) as info:
        module(args["input"], args["target"])
    assert isinstance(info.value, TypeError)  # and a NotImplementedError, as torch's


def test_warnings_point_at_the_callers_line():
    """Every warning the argument checks give names the user's line, whichever entry point was used (the
    module's call goes through nn.Module.__call__ and the functional: more frames than a direct call)."""
    x, y = torch.rand(4), torch.rand(4)
    calls = [
        lambda: bcelogits.loss_and_grad(x.numpy(), y.numpy(), reduction="elementwise_mean"),
        lambda: bcelogits.binary_cross_entropy_with_logits(x, y, reduction="elementwise_mean"),
        lambda: bcelogits.BCEWithLogitsLoss(reduction="elementwise_mean")(x, y),
        lambda: bcelogits.binary_cross_entropy_with_logits(x, y, size_average=False),
        lambda: bcelogits.BCEWithLogitsLoss(reduce=False),
        lambda: bcelogits.binary_cross_entropy_with_logits(x, y, strict=True),
        lambda: bcelogits.BCEWithLogitsLoss(strict=True)(x, y),
        lambda: bcelogits.loss_and_grad(x, y, strict=True),
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            call()
        assert len(rec) == 1, [str(r.message) for r in rec]
        assert rec[0].filename == __file__, (rec[0].filename, str(rec[0].message))
