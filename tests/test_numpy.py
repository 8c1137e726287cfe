"""The NumPy path: values equal torch's, NumPy dtypes, ``loss_and_grad``, mixing rules, and importing /
using bcelogits without torch installed."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference import element_scales, excess

import bcelogits

bce = bcelogits.binary_cross_entropy_with_logits
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

NP_DTYPES = [np.float16, np.float32, np.float64]
RTOL = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}


def _arrays(shape=(5, 4), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random(shape) * 16 - 8).astype(dtype)
    y = rng.random(shape).astype(dtype)
    y[0] = 1.0
    if shape and shape[0] > 1:
        y[1] = 0.0
    w = (rng.random(shape[-1:]) + 0.5).astype(dtype)
    p = (rng.random(shape[-1:]) * 3 + 0.2).astype(dtype)
    return x, y, w, p


def _is_numpy_result(r):
    return isinstance(r, (np.ndarray, np.generic)) and not isinstance(r, torch.Tensor)


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("coef", ["none", "weight", "pos_weight", "both"])
def test_numpy_values_match_torch(backend, dtype, reduction, coef):
    x, y, w, p = _arrays(dtype=dtype)
    w = w if coef in ("weight", "both") else None
    p = p if coef in ("pos_weight", "both") else None
    out = bce(x, y, w, reduction=reduction, pos_weight=p)
    assert _is_numpy_result(out), type(out)
    assert np.asarray(out).dtype == dtype
    assert np.shape(out) == (x.shape if reduction == "none" else ())
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    ref = F.binary_cross_entropy_with_logits(
        t(x).double(),
        t(y).double(),
        None if w is None else t(w).double(),
        reduction=reduction,
        pos_weight=None if p is None else t(p).double(),
    )
    lscale, *_ = element_scales(t(x), t(y), t(w), t(p))
    scale = lscale if reduction == "none" else lscale.sum() / (x.size if reduction == "mean" else 1)
    got = torch.from_numpy(np.asarray(out, dtype=np.float64).copy())
    assert excess(got, ref, RTOL[dtype] * scale + 1e-13 * (1 + scale))[0] <= 0, (got, ref)


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_same_result_as_torch_path(backend, dtype):
    x, y, w, p = _arrays(dtype=dtype, seed=1)
    out_np = bce(x, y, w, reduction="none", pos_weight=p)
    out_t = bce(
        torch.from_numpy(x),
        torch.from_numpy(y),
        torch.from_numpy(w),
        reduction="none",
        pos_weight=torch.from_numpy(p),
    )
    np.testing.assert_allclose(
        np.asarray(out_np, dtype=np.float64), out_t.double().numpy(), rtol=RTOL[dtype], atol=1e-30
    )


@pytest.mark.parametrize(
    "xdt,ydt",
    [(np.float32, np.float64), (np.float64, np.float32), (np.float16, np.float32), (np.float32, np.float16)],
)
def test_numpy_result_dtype_is_target_dtype(backend, xdt, ydt):
    x, y, _, _ = _arrays(seed=2)
    out = bce(x.astype(xdt), y.astype(ydt), reduction="none")
    assert np.asarray(out).dtype == ydt
    loss, grad = bcelogits.loss_and_grad(x.astype(xdt), y.astype(ydt), reduction="none")
    assert np.asarray(loss).dtype == ydt
    assert np.asarray(grad).dtype == xdt


def test_numpy_zero_dim_and_empty(backend):
    x, y = np.array(0.25), np.array(1.0)
    out = bce(x, y, reduction="none")
    assert np.shape(out) == ()
    np.testing.assert_allclose(out, np.log1p(np.exp(-0.25)), rtol=1e-14)
    e = np.zeros((0, 3))
    assert np.isnan(bce(e, e))
    assert bce(e, e, reduction="sum") == 0
    assert np.shape(bce(e, e, reduction="none")) == (0, 3)


def test_numpy_noncontiguous_inputs(backend):
    x, y, w, p = _arrays(shape=(6, 8), seed=3)
    xs, ys = x[:, ::2], y.T.copy().T[:, 1::2]
    out = bce(xs, ys, w[::2], reduction="none", pos_weight=p[::2])
    ref = bce(
        np.ascontiguousarray(xs),
        np.ascontiguousarray(ys),
        np.ascontiguousarray(w[::2]),
        reduction="none",
        pos_weight=np.ascontiguousarray(p[::2]),
    )
    np.testing.assert_allclose(out, ref, rtol=1e-15, atol=0)
    xb = np.broadcast_to(x[:1], (6, 8))  # read-only, zero-stride
    out_b = bce(xb, y, reduction="none")
    np.testing.assert_allclose(out_b, bce(np.ascontiguousarray(xb), y, reduction="none"), rtol=1e-15)


def test_numpy_inputs_are_not_modified(backend):
    x, y, w, p = _arrays(seed=4)
    copies = [a.copy() for a in (x, y, w, p)]
    bce(x, y, w, reduction="sum", pos_weight=p)
    bcelogits.loss_and_grad(x, y, w, p, "sum")
    for a, c in zip((x, y, w, p), copies):
        np.testing.assert_array_equal(a, c)


def test_numpy_size_mismatch_and_bad_reduction(backend):
    with pytest.raises(ValueError):
        bce(np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        bce(np.zeros(3), np.zeros(3), reduction="avg")
    with pytest.raises(RuntimeError, match="weight"):
        bce(np.zeros((4, 3)), np.zeros((4, 3)), weight=np.ones(5))


# ----------------------------------------------------------------------------------------------------
# loss_and_grad
# ----------------------------------------------------------------------------------------------------


def test_loss_and_grad_signature():
    params = list(inspect.signature(bcelogits.loss_and_grad).parameters.values())
    assert [p.name for p in params[:5]] == ["input", "target", "weight", "pos_weight", "reduction"]
    assert [p.default for p in params[2:5]] == [None, None, "mean"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_matches_torch_autograd(backend, dtype, reduction):
    x, y, w, p = _arrays(dtype=dtype, seed=5)
    loss, grad = bcelogits.loss_and_grad(x, y, w, p, reduction)
    assert _is_numpy_result(loss) and isinstance(grad, np.ndarray)
    assert grad.shape == x.shape and grad.dtype == dtype
    assert np.asarray(loss).dtype == dtype
    xt = torch.from_numpy(x).double().requires_grad_(True)
    out = F.binary_cross_entropy_with_logits(
        xt,
        torch.from_numpy(y).double(),
        torch.from_numpy(w).double(),
        reduction=reduction,
        pos_weight=torch.from_numpy(p).double(),
    )
    (g,) = torch.autograd.grad(out, xt, torch.ones_like(out))
    _, gscale, *_ = element_scales(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w), torch.from_numpy(p)
    )
    if reduction == "mean":
        gscale = gscale / x.size
    rtol = RTOL[dtype]
    assert excess(torch.from_numpy(grad.astype(np.float64)), g, rtol * gscale + 1e-300)[0] <= 0
    np.testing.assert_allclose(np.asarray(loss, dtype=np.float64), out.detach().numpy(), rtol=rtol)
    # the loss is the same as the functional's
    np.testing.assert_allclose(loss, bce(x, y, w, reduction=reduction, pos_weight=p), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_keywords_and_defaults(backend, reduction):
    x, y, w, p = _arrays(seed=6)
    a = bcelogits.loss_and_grad(x, y, w, p, reduction)
    b = bcelogits.loss_and_grad(x, y, weight=w, pos_weight=p, reduction=reduction)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    loss, grad = bcelogits.loss_and_grad(x, y)  # mean, no weights
    np.testing.assert_allclose(loss, bce(x, y), rtol=0)
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(grad, (s - y) / x.size, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_torch_tensors_detached(backend, reduction):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    p = torch.rand(4, dtype=torch.float64) * 2
    loss, grad = bcelogits.loss_and_grad(x, y, w, p, reduction)
    assert isinstance(loss, torch.Tensor) and isinstance(grad, torch.Tensor)
    assert not loss.requires_grad and not grad.requires_grad
    assert x.grad is None
    out = F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=p)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(loss, out.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, g, rtol=1e-12, atol=1e-15)


def test_loss_and_grad_float32_torch_grad_dtype(backend):
    x = torch.randn(5, 4)
    y = torch.rand(5, 4, dtype=torch.float64)
    loss, grad = bcelogits.loss_and_grad(x, y)
    assert loss.dtype == torch.float64
    assert grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# mixing array libraries
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["input", "target", "weight", "pos_weight"])
def test_mixing_numpy_and_torch_is_type_error(which):
    x, y, w, p = _arrays(seed=7)
    args = {"input": x, "target": y, "weight": w, "pos_weight": p}
    args[which] = torch.from_numpy(args[which])
    with pytest.raises(TypeError):
        bce(**args)
    with pytest.raises(TypeError):
        bcelogits.loss_and_grad(**args)


def test_numpy_list_target_is_type_error():
    with pytest.raises(TypeError, match="target"):
        bce(np.zeros(3), [0.0, 1.0, 0.5])


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_numpy_integer_target_rejected(dtype):
    with pytest.raises((RuntimeError, TypeError)) as err:
        bce(np.zeros(3), np.ones(3, dtype=dtype))
    assert "target" in str(err.value)


def test_numpy_integer_input_rejected():
    with pytest.raises((NotImplementedError, TypeError)) as err:
        bce(np.ones(3, dtype=np.int64), np.ones(3))
    assert "input" in str(err.value)


@pytest.mark.parametrize("which", ["input", "target"])
def test_numpy_dtype_errors_name_a_numpy_fix(which):
    # NumPy arrays have no .float(): the fix offered must be one a NumPy user can run.
    args = {"input": np.zeros(3, np.float32), "target": np.ones(3, np.float32)}
    args[which] = args[which].astype(np.int32)
    with pytest.raises(TypeError) as err:
        bce(**args)
    msg = str(err.value)
    assert f"{which}.astype(" in msg and ".float()" not in msg
    fixed = dict(args)
    fixed[which] = eval(msg.rsplit("convert with ", 1)[1], {"numpy": np}, args)  # the fix as written runs
    assert np.isfinite(bce(**fixed))


@pytest.mark.parametrize("which", ["input", "target", "weight", "pos_weight"])
def test_numpy_masked_arrays_are_refused(which):
    # A masked array's mask would be silently ignored (the loss would count the masked elements).
    x, y, w, p = _arrays(seed=3)
    args = {"input": x, "target": y, "weight": w, "pos_weight": p}
    a = args[which]
    args[which] = np.ma.masked_array(a, mask=np.arange(a.size).reshape(a.shape) % 2)
    with pytest.raises(TypeError, match=f"'{which}' is a numpy masked array.*weight=.*ignore_index"):
        bce(**args)
    with pytest.raises(TypeError, match="masked array"):
        bcelogits.loss_and_grad(**args)


@pytest.mark.skipif(np.finfo(np.longdouble).bits == 64, reason="long double is float64 on this platform")
def test_numpy_long_double_takes_the_plain_path(backend):
    # No kernel reads long double: it goes through NumPy's own operations, in long double, and keeps its
    # dtype.
    x, y, w, p = _arrays(seed=4)
    xl, yl = x.astype(np.longdouble), y.astype(np.longdouble)
    for reduction in ("none", "mean"):
        got = bce(xl, yl, weight=w.astype(np.longdouble), pos_weight=p, reduction=reduction)
        assert got.dtype == np.longdouble
        ref = F.binary_cross_entropy_with_logits(
            *map(torch.from_numpy, (x, y)), torch.from_numpy(w), pos_weight=torch.from_numpy(p),
            reduction=reduction,
        )  # fmt: skip
        np.testing.assert_allclose(got.astype(np.float64), ref.numpy(), rtol=1e-12)  # (torch: ~1e-14)
    loss, grad = bcelogits.loss_and_grad(xl, yl)
    assert loss.dtype == grad.dtype == np.longdouble and np.all(np.isfinite(grad))


def test_numpy_complex_weight_rejected_like_torch():
    x, y, w, _ = _arrays(seed=5)
    for name in ("weight", "pos_weight"):
        with pytest.raises(TypeError, match=f"'{name}' must be real-valued"):
            bce(x, y, **{name: w.astype(np.complex128)})
        with pytest.raises(TypeError, match=f"'{name}' must be real-valued"):
            bce(torch.from_numpy(x), torch.from_numpy(y), **{name: torch.from_numpy(w.astype(np.complex128))})


# ----------------------------------------------------------------------------------------------------
# without torch
# ----------------------------------------------------------------------------------------------------


def _run_without_torch(code):
    prelude = "import sys\nsys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_import_without_torch():
    r = _run_without_torch("import bcelogits\nprint('ok', bcelogits.__version__)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_numpy_api_without_torch():
    code = """
    import numpy as np
    import bcelogits
    x = np.array([0.5, -1.0, 3.0, -40.0])
    y = np.array([1.0, 0.0, 0.25, 0.0])
    out = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none")
    sp = lambda v: np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v)))
    ref = (1 - y) * sp(x) + y * sp(-x)
    assert isinstance(out, np.ndarray), type(out)
    np.testing.assert_allclose(out, ref, rtol=1e-13)
    loss, grad = bcelogits.loss_and_grad(x, y, reduction="sum")
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(grad, s - y, rtol=1e-13, atol=1e-300)
    assert 'torch' not in sys.modules or sys.modules['torch'] is None
    print("ok")
    """
    r = _run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_masked_array_check_imports_nothing():
    """The masked-array check does not import numpy.ma (8 ms) for a call that has none."""
    code = """
    import numpy as np
    import bcelogits
    before = 'numpy.ma' in sys.modules
    bcelogits.binary_cross_entropy_with_logits(np.zeros(3), np.ones(3), weight=np.ones(3))
    print(before, 'numpy.ma' in sys.modules)
    """
    r = _run_without_torch(code)
    assert r.returncode == 0, r.stderr
    before, after = r.stdout.split()
    if before == "True":
        pytest.skip("this NumPy imports numpy.ma itself: nothing to check")
    assert after == "False"


def test_module_without_torch_says_how_to_install():
    code = """
    import bcelogits
    try:
        bcelogits.BCEWithLogitsLoss()
    except ImportError as exc:
        print("IMPORTERROR", exc)
    else:
        print("NO ERROR")
    """
    r = _run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout, r.stdout
    assert "pip install" in r.stdout and "bcelogits[torch]" in r.stdout, r.stdout


def test_from_import_module_without_torch_says_how_to_install():
    code = """
    try:
        from bcelogits import BCEWithLogitsLoss
    except ImportError as exc:
        print("IMPORTERROR", exc)
    """
    r = _run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "bcelogits[torch]" in r.stdout, r.stdout


def test_import_without_torch_cli_style():
    # literally `python -c "import bcelogits"` with torch unimportable through a sitecustomize
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "sitecustomize.py"), "w") as f:
            f.write("import sys\nsys.modules['torch'] = None\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([d, SRC]))
        r = subprocess.run(
            [sys.executable, "-c", "import bcelogits"], capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode == 0, r.stderr
        r2 = subprocess.run(
            [sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env, timeout=120
        )
        assert r2.returncode != 0  # the hiding works


def test_float16_overflow_is_inf_without_warning(backend):
    # a float16 loss beyond 65504 is +inf (as torch gives), and no RuntimeWarning leaks out of NumPy
    import warnings

    x = np.array([-100.0, 0.0], dtype=np.float16)
    y = np.array([1.0, 1.0], dtype=np.float16)
    p = np.array([1000.0, 1.0], dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bce(x, y, reduction="none", pos_weight=p)
        loss, grad = bcelogits.loss_and_grad(x, y, None, p, "none")
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(y), reduction="none", pos_weight=torch.from_numpy(p)
    )
    assert np.isinf(out[0]) and np.isinf(ref[0].item())
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(out))
    assert np.isfinite(grad).all()


def test_float16_reductions_overflow_only_when_the_result_does(backend):
    import warnings

    z = np.zeros(200_000, dtype=np.float16)  # each element log(2); the sum exceeds 65504, the mean does not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = bce(z, z)
        total = bce(z, z, reduction="sum")
    zt = torch.from_numpy(z)
    assert np.asarray(mean).dtype == np.float16
    np.testing.assert_allclose(float(mean), F.binary_cross_entropy_with_logits(zt, zt).item(), rtol=1e-3)
    assert np.isinf(total) and np.isinf(F.binary_cross_entropy_with_logits(zt, zt, reduction="sum").item())
