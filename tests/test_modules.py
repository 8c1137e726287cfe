"""``bcelogits.BCEWithLogitsLoss`` as a drop-in ``nn.Module``: buffers, dtype moves, (de)serialisation,
state_dict interchange with ``torch.nn.BCEWithLogitsLoss``, and the documentation examples."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch

import bcelogits

Ours = bcelogits.BCEWithLogitsLoss
Theirs = torch.nn.BCEWithLogitsLoss


def _pair(**kw):
    return Ours(**kw), Theirs(**kw)


def _data(shape=(6, 4), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 12 - 6).to(dtype)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


# ----------------------------------------------------------------------------------------------------
# documentation examples (the seeds)
# ----------------------------------------------------------------------------------------------------


def test_doc_example_pos_weight_ones(backend):
    target = torch.ones([10, 64], dtype=torch.float32)  # 64 classes, batch size = 10
    output = torch.full([10, 64], 1.5)  # A prediction (logit)
    pos_weight = torch.ones([64])  # All weights are equal to 1
    criterion = Ours(pos_weight=pos_weight)
    result = criterion(output, target)  # -log(sigmoid(1.5))
    expected = Theirs(pos_weight=pos_weight)(output, target)
    torch.testing.assert_close(result, expected)
    assert repr(result) == repr(expected) == "tensor(0.2014)"
    torch.testing.assert_close(
        result, -torch.log(torch.sigmoid(torch.tensor(1.5, dtype=torch.float64))).float(), rtol=1e-6, atol=0
    )


def test_doc_example_random_binary_targets(backend):
    loss = Ours()
    inp = torch.randn(3, requires_grad=True)
    target = torch.empty(3).random_(2)
    output = loss(inp, target)
    output.backward()
    ref_in = inp.detach().clone().requires_grad_(True)
    Theirs()(ref_in, target).backward()
    torch.testing.assert_close(output, Theirs()(inp.detach(), target))
    torch.testing.assert_close(inp.grad, ref_in.grad)


def test_tutorial_binary_classification(backend):
    y_pred = torch.tensor([[0.8], [-1.2], [2.4]])
    y_true = torch.tensor([[1.0], [0.0], [1.0]])
    loss = Ours()(y_pred, y_true)
    assert isinstance(loss.item(), float)
    torch.testing.assert_close(loss, Theirs()(y_pred, y_true))


def test_tutorial_class_imbalance_pos_weight(backend):
    y_pred = torch.tensor([[0.8], [-1.2], [2.4]])
    y_true = torch.tensor([[1.0], [0.0], [1.0]])
    pos_weight = torch.tensor([3.0])
    loss_fn = Ours(pos_weight=pos_weight)
    torch.testing.assert_close(loss_fn(y_pred, y_true), Theirs(pos_weight=pos_weight)(y_pred, y_true))
    # pos_weight 3 triples the positive terms
    per = Ours(reduction="none")(y_pred, y_true)
    torch.testing.assert_close(
        Ours(pos_weight=pos_weight, reduction="none")(y_pred, y_true),
        per * torch.where(y_true == 1, 3.0, 1.0),
    )


# ----------------------------------------------------------------------------------------------------
# construction, attributes, buffers
# ----------------------------------------------------------------------------------------------------


def test_is_a_module_with_torch_signature():
    assert issubclass(Ours, torch.nn.Module)
    params = list(inspect.signature(Ours).parameters.values())
    names = [p.name for p in params]
    assert names[:5] == ["weight", "size_average", "reduce", "reduction", "pos_weight"]
    assert [p.default for p in params[:5]] == [None, None, None, "mean", None]
    kwonly = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kwonly.get("ignore_index", "missing") is None
    assert kwonly.get("label_smoothing", "missing") == 0.0
    assert kwonly.get("class_dim", "missing") is None
    assert kwonly.get("focal_gamma", "missing") == 0.0
    assert kwonly.get("strict", "missing") is False


def test_positional_construction_like_torch(backend):
    w, p = torch.rand(4), torch.rand(4) * 3
    ours = Ours(w, None, None, "sum", p)
    theirs = Theirs(w, None, None, "sum", p)
    assert ours.reduction == theirs.reduction == "sum"
    x, y = _data()
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reduction_attribute_and_forward(backend, reduction):
    w, p = torch.rand(4), torch.rand(4) * 3
    ours, theirs = _pair(weight=w, pos_weight=p, reduction=reduction)
    assert ours.reduction == reduction
    x, y = _data()
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)


def test_reduction_attribute_can_be_changed_after_construction(backend):
    ours, theirs = _pair()
    ours.reduction = theirs.reduction = "sum"
    x, y = _data()
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)


def test_weights_are_persistent_buffers():
    w, p = torch.rand(4), torch.rand(4)
    m = Ours(weight=w, pos_weight=p)
    buffers = dict(m.named_buffers())
    assert set(buffers) == {"weight", "pos_weight"}
    assert list(m.parameters()) == []
    torch.testing.assert_close(m.weight, w, rtol=0, atol=0)
    torch.testing.assert_close(m.pos_weight, p, rtol=0, atol=0)
    assert set(m.state_dict()) == set(Theirs(weight=w, pos_weight=p).state_dict()) == {"weight", "pos_weight"}


def test_default_module_has_none_buffers_and_empty_state_dict():
    m = Ours()
    assert m.weight is None and m.pos_weight is None
    assert dict(m.state_dict()) == dict(Theirs().state_dict()) == {}
    only_w = Ours(weight=torch.ones(3))
    assert only_w.pos_weight is None
    assert set(only_w.state_dict()) == set(Theirs(weight=torch.ones(3)).state_dict()) == {"weight"}


def test_repr():
    r = repr(Ours())
    assert r == repr(Theirs()) == "BCEWithLogitsLoss()"
    assert repr(Ours(weight=torch.ones(2), reduction="sum")).startswith("BCEWithLogitsLoss(")


@pytest.mark.parametrize("mover", ["to_float64", "double", "to_dtype_kw", "half", "float"])
def test_dtype_moves_buffers(backend, mover):
    w, p = torch.rand(4), torch.rand(4) * 3
    ours, theirs = _pair(weight=w, pos_weight=p)
    move = {
        "to_float64": lambda m: m.to(torch.float64),
        "double": lambda m: m.double(),
        "to_dtype_kw": lambda m: m.to(dtype=torch.float64),
        "half": lambda m: m.half(),
        "float": lambda m: m.double().float(),
    }[mover]
    ours, theirs = move(ours), move(theirs)
    assert ours.weight.dtype == theirs.weight.dtype
    assert ours.pos_weight.dtype == theirs.pos_weight.dtype
    dt = ours.weight.dtype
    x, y = _data(dtype=torch.float64 if dt == torch.float16 else dt)
    out, ref = ours(x, y), theirs(x, y)
    assert out.dtype == ref.dtype
    tol = 2e-3 if dt == torch.float16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_module_to_device_cpu_noop():
    m = Ours(weight=torch.rand(3)).to("cpu")
    assert m.weight.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# state_dict interchange and serialisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["weight", "pos_weight", "both"])
def test_state_dict_torch_to_ours_and_back(backend, which):
    def kw(gen_seed):
        g = torch.Generator().manual_seed(gen_seed)
        d = {}
        if which in ("weight", "both"):
            d["weight"] = torch.rand(4, generator=g)
        if which in ("pos_weight", "both"):
            d["pos_weight"] = torch.rand(4, generator=g) * 3
        return d

    x, y = _data()
    # torch -> ours (strict)
    theirs = Theirs(**kw(1))
    ours = Ours(**kw(2))
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)
    # ours -> torch (strict)
    ours2 = Ours(**kw(3))
    theirs2 = Theirs(**kw(4))
    theirs2.load_state_dict(ours2.state_dict(), strict=True)
    torch.testing.assert_close(ours2(x, y), theirs2(x, y), rtol=1e-5, atol=1e-6)


def test_state_dict_in_a_larger_model(backend):
    class Net(torch.nn.Module):
        def __init__(self, crit):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.crit = crit

    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    theirs = Net(Theirs(pos_weight=pw))
    ours = Net(Ours(pos_weight=torch.zeros(4)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours.crit.pos_weight, pw, rtol=0, atol=0)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_torch_save_load_state_dict_weights_only_default(backend):
    m = Ours(weight=torch.rand(4), pos_weight=torch.rand(4) * 2, reduction="sum")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)  # weights_only default
    fresh = Ours(weight=torch.zeros(4), pos_weight=torch.zeros(4), reduction="sum")
    fresh.load_state_dict(sd)
    x, y = _data()
    torch.testing.assert_close(fresh(x, y), m(x, y), rtol=0, atol=0)
    # the same file loads into torch's module
    buf.seek(0)
    t = Theirs(weight=torch.zeros(4), pos_weight=torch.zeros(4), reduction="sum")
    t.load_state_dict(torch.load(buf))
    torch.testing.assert_close(t(x, y), m(x, y), rtol=1e-5, atol=1e-5)


def test_torch_save_load_whole_module(backend):
    m = Ours(weight=torch.rand(4), pos_weight=torch.rand(4) * 2, reduction="none")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(m)
    assert loaded.reduction == "none"
    x, y = _data()
    torch.testing.assert_close(loaded(x, y), m(x, y), rtol=0, atol=0)


def test_deepcopy_and_pickle(backend):
    m = Ours(weight=torch.rand(4), pos_weight=torch.rand(4) * 2, reduction="sum")
    x, y = _data()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone is not m
        assert clone.reduction == "sum"
        assert clone.weight.data_ptr() != m.weight.data_ptr()
        torch.testing.assert_close(clone(x, y), m(x, y), rtol=0, atol=0)
    c = copy.deepcopy(m)
    c.weight.mul_(2)
    torch.testing.assert_close(c(x, y), 2 * m(x, y), rtol=1e-6, atol=0)


def test_legacy_module_deepcopy_keeps_reduction():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = Ours(size_average=False)
    assert copy.deepcopy(m).reduction == "sum"


def test_module_in_train_and_eval_mode_same(backend):
    m = Ours(pos_weight=torch.rand(4) * 2)
    x, y = _data()
    a = m.train()(x, y)
    b = m.eval()(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_jit_trace_replays_like_torch(backend, reduction, grad_mode):
    """A traced module gives what eager gives on new inputs (values and gradients), as a traced
    torch.nn.BCEWithLogitsLoss does: while tracing, the loss is computed with torch operators."""
    w, p = torch.rand(4) + 0.5, torch.rand(4) * 3
    x, y = _data()
    for module in _pair(weight=w, pos_weight=p, reduction=reduction):
        with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
            traced = torch.jit.trace(module, (x.clone().requires_grad_(grad_mode == "grad"), y))
        x2, y2 = _data(seed=1)
        a, b = x2.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        out_traced, out_eager = traced(a, y2), module(b, y2)
        torch.testing.assert_close(out_traced, out_eager, rtol=1e-6, atol=1e-7)
        out_traced.sum().backward()
        out_eager.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_module_float64_weights_with_float32_data_like_torch(backend):
    w = torch.rand(4, dtype=torch.float64)
    ours, theirs = _pair(weight=w, pos_weight=w * 2)
    x, y = _data()
    o, t = ours(x, y), theirs(x, y)
    assert o.dtype == t.dtype
    torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)


def test_module_is_a_torch_loss():
    """Code that recognises losses by their base class (isinstance(m, nn.modules.loss._Loss)) finds ours
    as it finds torch's."""
    for kw in ({}, {"reduction": "sum"}, {"pos_weight": torch.ones(3), "ignore_index": -1.0}):
        m = bcelogits.BCEWithLogitsLoss(**kw)
        assert isinstance(m, torch.nn.modules.loss._Loss)
        theirs = torch.nn.BCEWithLogitsLoss(**{k: v for k, v in kw.items() if k != "ignore_index"})
        assert m.reduction == theirs.reduction
