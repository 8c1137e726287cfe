"""The fused CPU kernel (bcelogits.kernels.cpu, the native core), tested directly.

References: the formulas of ``bcelogits._math`` evaluated in float64 NumPy on the same (dtype-rounded)
inputs, and mpmath at 50 digits for spot checks. Errors are relative, per element, where the true value
is a normal number of the dtype; for the gradient, relative to ``|first term| + |second term|`` (soft
targets make the two terms cancel).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from bcelogits import _math as M

cpu = pytest.importorskip("bcelogits.kernels.cpu")
if not cpu.available():  # pragma: no cover - depends on the install
    if os.environ.get("CI"):  # CI builds the core on purpose: an unusable kernel must fail, not skip
        raise RuntimeError(f"fused CPU kernel unavailable in CI: {cpu.unavailable_reason}")
    pytest.skip(f"fused CPU kernel unavailable: {cpu.unavailable_reason}", allow_module_level=True)

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 7, 4097, 100003]
# Tolerances of the spec: float32 loss / grad, float64 loss / grad.
TOL = {np.float32: (1e-6, 2e-5), np.float64: (1e-14, 1e-12)}


# ---------------------------------------------------------------------------------------- reference
def _expand(a, inner, n):
    if a is None:
        return None
    return np.asarray(a, np.float64)[(np.arange(n) // inner) % a.size]


def smoothed(y, ls):
    """The smoothed target and its complement as the kernel defines them: fma(y, dtype(1 - ls), dtype(ls / 2))
    and fma(1 - y, ...) in y's dtype (the complement None without smoothing: 1 - ys then)."""
    if not ls:
        return y.astype(np.float64), None
    dt = y.dtype.type
    out = []
    for v in (y.astype(np.float64), (1 - y).astype(np.float64)):  # (1 - y: exact or rounded as in y's dtype)
        exact = v * float(dt(1.0 - ls)) + float(dt(0.5 * ls))  # fma, as far as float64 goes
        out.append(exact.astype(np.float32).astype(np.float64) if dt is np.float32 else exact)
    return tuple(out)


def reference(x, y, w=None, wi=1, p=None, pi=1, ls=0.0, ignore=None, gamma=0.0):
    """Float64 (loss, grad, grad_scale) per element from bcelogits._math."""
    n = x.size
    x64 = x.astype(np.float64)
    wf, pf = _expand(w, wi, n), _expand(p, pi, n)
    ys, omy = smoothed(y, ls)
    with np.errstate(all="ignore"):
        loss = M.loss(np, x64, ys, wf, pf, omy=omy)
        g = M.grad_input(np, x64, ys, wf, pf, omy=omy)
        c_pos, c_neg = M.coefficients(ys, wf, pf, omy)
        scale = np.abs(c_pos / (1 + np.exp(-x64))) + np.abs(c_neg / (1 + np.exp(x64)))
        if gamma:
            l1 = M.log_one_minus_pt(np, x64, ys, omy=omy)
            d1 = M.d_log_one_minus_pt(np, x64, ys, omy=omy)
            f = np.exp(gamma * l1)
            extra = np.where(d1 == 0, 0.0, gamma * loss * d1)
            scale = f * (scale + np.abs(extra))
            loss, g = f * loss, f * (g + extra)
    if ignore is not None:
        keep = y != np.asarray(ignore, y.dtype)
        loss, g, scale = (np.where(keep, v, 0.0) for v in (loss, g, scale))
    return loss, g, scale


def rel_err(got, want, scale):
    """Max relative error over elements whose reference scale is a normal number of got's dtype."""
    tiny = np.finfo(got.dtype).tiny
    m = np.isfinite(want) & (np.abs(scale) >= tiny)
    if not m.any():
        return 0.0
    return float(np.max(np.abs(got[m].astype(np.float64) - want[m]) / np.abs(scale[m])))


def make(n, dt, rng, soft=False, span=100.0):
    x = rng.uniform(-span, span, n)
    x[: n // 2] = rng.normal(0, 4, n // 2)
    y = rng.random(n) if soft else (rng.random(n) > 0.5).astype(np.float64)
    return x.astype(dt), y.astype(dt)


def run_forward(x, y, w=None, wi=1, p=None, pi=1, **kw):
    lo = np.full_like(x, np.nan)
    g = np.full_like(x, np.nan)
    total, count, wsum = cpu.forward(x, y, w, wi, p, pi, loss_out=lo, grad_out=g, **kw)
    return lo, g, total, count, wsum


# weight / pos_weight patterns: (name, w(n, dt, rng) -> (array or None, inner))
def _w_none(n, dt, rng):
    return None, 1


def _w_scalar(n, dt, rng):
    return np.array([0.7], dt), 1


def _w_lastdim(n, dt, rng):  # (C,) vector on the last dim
    return rng.uniform(0.1, 3, 7).astype(dt), 1


def _w_class(n, dt, rng):  # class vector on an inner dim: (C,) with C=3, inner 5
    return rng.uniform(0.1, 3, 3).astype(dt), 5


def _w_full(n, dt, rng):
    return rng.uniform(0.1, 3, max(n, 1)).astype(dt), 1


def _p_vec(n, dt, rng):  # pos_weight 1e-3 .. 1e6 on the last dim
    return np.exp(rng.uniform(math.log(1e-3), math.log(1e6), 11)).astype(dt), 1


def _p_class(n, dt, rng):
    return np.array([1e-3, 1.0, 1e6], dt), 4


CONFIGS = {
    "plain": (_w_none, _w_none, {}),
    "w_scalar": (_w_scalar, _w_none, {}),
    "w_lastdim_p_vec": (_w_lastdim, _p_vec, {}),
    "w_class_p_class": (_w_class, _p_class, {}),
    "w_full_p_vec": (_w_full, _p_vec, {}),
    "smoothing": (_w_none, _p_vec, {"label_smoothing": 0.1}),
    "ignore": (_w_class, _w_none, {"ignore_index": -100}),
    "focal_0.5": (_w_none, _w_none, {"focal_gamma": 0.5}),
    "focal_2_all": (_w_lastdim, _p_vec, {"focal_gamma": 2.0, "ignore_index": -100, "label_smoothing": 0.05}),
}


# ---------------------------------------------------------------------------------------- tests
def test_import_is_lazy():
    """Importing the module loads no library (available() does) and imports neither numba nor torch."""
    code = (
        "import sys, bcelogits.kernels.cpu as c; assert not c._state;"
        "assert not {'numba', 'llvmlite', 'torch'} & set(sys.modules); assert c.available(); print(c.BLOCK)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(cpu.BLOCK)]


def test_available():
    assert cpu.available() is True
    assert cpu.unavailable_reason == ""


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dt", DTYPES)
def test_against_reference(dt, n, config):
    rng = np.random.default_rng(zlib.crc32(f"{config}/{n}".encode()))
    wfun, pfun, kw = CONFIGS[config]
    x, y = make(n, dt, rng, soft=config in ("smoothing", "focal_0.5"))
    w, wi = wfun(n, dt, rng)
    p, pi = pfun(n, dt, rng)
    if "ignore_index" in kw and n:
        y[rng.random(n) < 0.3] = kw["ignore_index"]
    lo, g, total, count, wsum = run_forward(x, y, w, wi, p, pi, **kw)
    L, G, S = reference(
        x, y, w, wi, p, pi, kw.get("label_smoothing", 0.0), kw.get("ignore_index"), kw.get("focal_gamma", 0.0)
    )
    tl, tg = TOL[dt]
    if kw.get("focal_gamma", 0.0):
        # f = exp(gamma L1) turns an absolute error of L1 = log(1 - p_t) into a relative one, times gamma:
        # the float64 reference's own rounding is up to ~gamma |L1| 1e-16, and with a soft target near the
        # confident side (1 - p_t ~ 1e-6) float32 log(1 - p_t) is good to ~u |L1| only.
        tl = {np.float32: 4e-6, np.float64: 5e-14}[dt]
    assert rel_err(lo, L, L) <= tl
    assert rel_err(g, G, S) <= tg
    # The reductions: float64 sum, count and weight sum of the counted elements.
    keep = np.ones(n, bool) if "ignore_index" not in kw else y != np.asarray(kw["ignore_index"], dt)
    assert count == int(keep.sum())
    wfull = np.ones(n) if w is None else _expand(w, wi, n)
    assert wsum == pytest.approx(math.fsum(wfull[keep]), rel=1e-12, abs=0)
    assert total == pytest.approx(math.fsum(lo.astype(np.float64)), rel=1e-12, abs=1e-300)
    if n:
        assert total == pytest.approx(math.fsum(L), rel=10 * tl)
    # Loss only (the gradient-free kernel unless focal): the same element losses and sums, bitwise.
    lo2 = np.full_like(x, np.nan)
    assert cpu.forward(x, y, w, wi, p, pi, loss_out=lo2, **kw) == (total, count, wsum)
    np.testing.assert_array_equal(lo2, lo)
    assert cpu.forward(x, y, w, wi, p, pi, **kw) == (total, count, wsum)
    # backward of reduction='none': go * dloss/dx (bitwise what the forward pass gives times go).
    go = rng.normal(size=n).astype(dt)
    gb = np.full_like(x, np.nan)
    cpu.backward_none(x, y, w, wi, p, pi, go, gb, **kw)
    np.testing.assert_array_equal(gb, go * g)


@pytest.mark.parametrize("dt", DTYPES)
def test_sweep_hard_and_soft_targets(dt):
    """A denser sweep over logits in [-100, 100], targets {0,1} and soft, weights, pos_weight 1e-3..1e6."""
    rng = np.random.default_rng(7)
    n = 200_000
    for soft in (False, True):
        x, y = make(n, dt, rng, soft=soft)
        w = rng.uniform(0.1, 3, n).astype(dt)
        p = np.exp(rng.uniform(math.log(1e-3), math.log(1e6), n)).astype(dt)
        lo, g, *_ = run_forward(x, y, w, 1, p, 1)
        L, G, S = reference(x, y, w, 1, p, 1)
        tl, tg = TOL[dt]
        assert rel_err(lo, L, L) <= tl
        assert rel_err(g, G, S) <= tg


def _mp_loss_grad(x, y, w, p):
    import mpmath as mp

    x, y, w, p = (mp.mpf(float(v)) for v in (x, y, w, p))

    def softplus(t):
        return mp.log1p(mp.exp(t)) if t < 0 else t + mp.log1p(mp.exp(-t))

    sp_pos, sp_neg = softplus(x), softplus(-x)
    t1, t2 = w * (1 - y) / (1 + mp.exp(-x)), w * p * y / (1 + mp.exp(x))
    return w * ((1 - y) * sp_pos + p * y * sp_neg), t1 - t2, abs(t1) + abs(t2)


@pytest.mark.parametrize("dt", DTYPES)
def test_mpmath_spot_checks(dt):
    import mpmath as mp

    mp.mp.dps = 50
    xs = [0.0, 1e-30, -1e-7, 0.3, -2.5, 15.0, -17.5, 40.5, -41.0, 88.0, -88.5, 99.75, -100.0]
    ys = [0.0, 1.0, 0.25, 1e-6, 0.999]
    ws = [1.0, 0.37]
    ps = [1e-3, 1.0, 1e6]
    cases = [(a, b, c, d) for a in xs for b in ys for c in ws for d in ps]
    x, y, w, p = (np.array(v, dt) for v in zip(*cases))
    lo, g, *_ = run_forward(x, y, w, 1, p, 1)
    tl, tg = TOL[dt]
    tiny = np.finfo(dt).tiny
    for i, (a, b, c, d) in enumerate(cases):
        L, G, S = _mp_loss_grad(x[i], y[i], w[i], p[i])
        if L >= tiny:
            assert abs(lo[i] - L) <= tl * L, (a, b, c, d, lo[i], L)
        if S >= tiny:
            assert abs(g[i] - G) <= tg * S, (a, b, c, d, g[i], G)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("dt", DTYPES)
def test_infinite_and_nan_logits(dt, gamma):
    """+-inf give the exact limits (never NaN); NaN logits give NaN, unless the element is ignored."""
    x = np.array([np.inf, -np.inf, np.inf, -np.inf, np.inf, -np.inf, np.nan, np.nan, 1e30, -1e30], dt)
    y = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0, -100.0, 0.0, 1.0], dt)
    p = np.array([3.0], dt)
    lo, g, total, count, _ = run_forward(x, y, None, 1, p, 1, ignore_index=-100, focal_gamma=gamma)
    assert lo[0] == np.inf and g[0] == 1.0  # softplus(inf), sigma(inf)
    assert lo[1] == np.inf and g[1] == -3.0  # p * softplus(inf), -p * sigma(inf)
    assert lo[2] == 0.0 and g[2] == 0.0
    assert lo[3] == 0.0 and g[3] == 0.0
    assert lo[4] == np.inf and lo[5] == np.inf
    if gamma == 0.0:
        assert g[4] == 0.5 and g[5] == -1.5
    assert np.isnan(lo[6]) and np.isnan(g[6])
    assert lo[7] == 0.0 and g[7] == 0.0 and count == 9
    assert np.isnan(total)
    L, G, _ = reference(x, y, None, 1, p, 1, ignore=-100, gamma=gamma)
    np.testing.assert_allclose(lo, L.astype(dt), rtol=TOL[dt][0] * 4, equal_nan=True)
    np.testing.assert_allclose(g, G.astype(dt), rtol=TOL[dt][1], equal_nan=True)


@pytest.mark.parametrize("dt", DTYPES)
def test_underflow_tail(dt):
    """Small-side terms are scaled before the second exp(-a/2): p*exp(-|x|) stays a normal number where
    exp(-|x|) alone underflows (float32, |x| > 87), and denormal results round once."""
    x = np.array([95.0, -95.0, 100.0, -100.0, 180.0, -180.0, 760.0, -760.0], dt)
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dt)
    p = np.array([1e6], dt)
    w = np.array([1e30 if dt is np.float32 else 1e300], dt)
    lo, g, *_ = run_forward(x, y, w, 1, p, 1)
    L, G, S = reference(x, y, w, 1, p, 1)
    rel = np.abs(lo - L) / np.maximum(np.abs(L), np.finfo(dt).tiny)
    assert np.all((rel <= TOL[dt][0]) | (np.abs(lo - L) <= np.finfo(dt).smallest_subnormal))
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(g))


def test_focal_gamma_zero_is_plain():
    rng = np.random.default_rng(3)
    x, y = make(5000, np.float32, rng, soft=True)
    a = run_forward(x, y)
    b = run_forward(x, y, focal_gamma=0.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


@pytest.mark.parametrize("dt", DTYPES)
def test_outputs_optional_and_grad_scale(dt):
    rng = np.random.default_rng(4)
    x, y = make(30001, dt, rng)
    p = np.array([2.0], dt)
    lo, g, total, count, wsum = run_forward(x, y, None, 1, p, 1)
    t2 = cpu.forward(x, y, None, 1, p, 1)  # sum only
    assert t2 == (total, count, wsum)
    lo2 = np.empty_like(x)
    assert cpu.forward(x, y, None, 1, p, 1, loss_out=lo2)[0] == total
    np.testing.assert_array_equal(lo2, lo)
    g2 = np.empty_like(x)
    assert cpu.forward(x, y, None, 1, p, 1, grad_out=g2, grad_scale=0.25)[0] == total
    np.testing.assert_array_equal(g2, g * dt(0.25))


@pytest.mark.parametrize("dt", DTYPES)
def test_long_weight_periods(dt):
    """Weight patterns too long to pre-expand: runs longer than a block (inner > BLOCK: blocks inside one
    run and blocks across two), many runs per block (inner < BLOCK, the pattern wrapping around inside
    a block), wrapped views (inner = 1)."""
    rng = np.random.default_rng(5)
    n = 100_003
    x, y = make(n, dt, rng, soft=True)
    patterns = [(3, 6001), (50, 500), (7, 2999), (20011, 1)]
    for size, wi in patterns:
        assert size * wi > cpu._EXT_MAX  # (else the pattern is expanded once per call instead)
        w = rng.uniform(0.1, 2, size).astype(dt)
        lo, g, total, count, wsum = run_forward(x, y, w, wi, w, wi)
        L, G, S = reference(x, y, w, wi, w, wi)
        assert rel_err(lo, L, L) <= TOL[dt][0] and rel_err(g, G, S) <= TOL[dt][1]
        assert wsum == pytest.approx(math.fsum(_expand(w, wi, n)), rel=1e-12)


@pytest.mark.parametrize("launcher", ["torch-openmp", "own-threads"])
@pytest.mark.parametrize("dt", DTYPES)
def test_sum_is_independent_of_thread_count(monkeypatch, dt, launcher):
    """Loss + gradient, loss only (element losses and sum only), focal and the plain specialisation:
    bitwise the same for any number of threads, on torch's OpenMP team or on the core's own threads, and the
    loss-only kernel agrees bitwise with the loss + gradient one."""
    torch = pytest.importorskip("torch")
    if launcher == "torch-openmp":
        if torch.__config__.parallel_info().find("parallel backend: OpenMP") < 0:
            pytest.skip("this torch build does not run its operators on OpenMP")
        assert cpu._torch_openmp() is not None  # torch's libgomp found: the launcher under test
    else:
        monkeypatch.setattr(cpu, "_torch_openmp", lambda: None)
    rng = np.random.default_rng(6)
    n = 2**18 + 5
    x, y = make(n, dt, rng, soft=True)
    y[::7] = -1
    yb = (y > 0.5).astype(dt)
    w = rng.uniform(0.1, 2, 13).astype(dt)
    p = np.exp(rng.uniform(-7, 14, 5)).astype(dt)
    results = []
    for threads in (1, 2, 3, 5):
        monkeypatch.setattr(cpu, "_num_threads", lambda t=threads: t)
        g, lo, lo2, gp = np.empty_like(x), np.empty_like(x), np.empty_like(x), np.empty_like(x)
        kw = {"ignore_index": -1, "label_smoothing": 0.05}
        r = cpu.forward(x, y, w, 1, p, 1, grad_out=g, loss_out=lo, **kw)
        r2 = cpu.forward(x, y, w, 1, p, 1, loss_out=lo2, **kw)
        r3 = cpu.forward(x, y, w, 1, p, 1, **kw)
        rf = cpu.forward(x, y, w, 1, p, 1, focal_gamma=2.0, **kw)
        rp = cpu.forward(x, yb, None, 1, None, 1, grad_out=gp)
        assert r == r2 == r3
        assert rp == cpu.forward(x, yb, None, 1, None, 1)
        np.testing.assert_array_equal(lo2, lo)
        results.append(((r, rf, rp), g, lo, gp))
    for res in results[1:]:
        assert res[0] == results[0][0]
        for a, b in zip(res[1:], results[0][1:]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("launcher", ["torch-openmp", "own-threads"])
def test_concurrent_calls_from_several_threads(monkeypatch, launcher):
    """Calls made at the same time from several Python threads (the kernel runs without the GIL; each
    call has its own argument block, counters and scratch) give the bits of the same calls made one
    after another: sizes from one block to multi-threaded, loss + gradient and loss only, with and
    without weights, on torch's OpenMP team and on our own threads."""
    import threading

    torch = pytest.importorskip("torch")
    if launcher == "own-threads":
        monkeypatch.setattr(cpu, "_torch_openmp", lambda: None)
    elif cpu._torch_openmp() is None:
        pytest.skip("this torch build does not run its operators on OpenMP")
    monkeypatch.setattr(cpu, "_num_threads", lambda: 2)
    rng = np.random.default_rng(11)
    cases = []
    for n in (100, 5 * cpu.BLOCK + 7, 40 * cpu.BLOCK + 1):
        x, y = make(n, np.float32, rng, soft=True)
        w = rng.uniform(0.1, 2, 7).astype(np.float32)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        cases += [(x, y, None, False), (x, y, w, True), (xt, yt, None, True)]

    def run(case):
        x, y, w, grad = case
        g = (np.empty_like(x) if isinstance(x, np.ndarray) else torch.empty_like(x)) if grad else None
        r = cpu.forward(x, y, w, 1, None, 1, grad_out=g)
        return r, None if g is None else np.asarray(g).copy()

    expected = [run(c) for c in cases]
    failures = []

    def worker(k):
        for it in range(8):
            i = (k * 5 + it) % len(cases)
            r, g = run(cases[i])
            if r != expected[i][0] or (g is not None and not np.array_equal(g, expected[i][1])):
                failures.append((k, it, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("dt", DTYPES)
def test_results_are_independent_of_the_claim_size(monkeypatch, dt):
    """Threads claim ``_chunk(nb, threads)`` blocks at a time; any claim size (1, uneven, a last claim
    running past the end, one claim for everything) gives the same bits, for loss + gradient with
    weights and for the plain loss-only kernel."""
    monkeypatch.setattr(cpu, "_num_threads", lambda: 2)
    rng = np.random.default_rng(8)
    n = 70 * cpu.BLOCK + 123  # 71 blocks
    x, y = make(n, dt, rng, soft=True)
    w = rng.uniform(0.1, 2, 13).astype(dt)
    results = []
    for chunk in (1, 2, 3, 7, 64, 71, 1000):
        monkeypatch.setattr(cpu, "_chunk", lambda nb, nthreads, c=chunk: c)
        g = np.empty_like(x)
        r = cpu.forward(x, y, w, 1, None, 1, grad_out=g)
        results.append((r, cpu.forward(x, y, None, 1, None, 1), g))
    for r, r0, g in results[1:]:
        assert (r, r0) == results[0][:2]
        np.testing.assert_array_equal(g, results[0][2])


def test_claim_size():
    """About an eighth of a thread's share of the blocks, within [2, 64]."""
    assert cpu._chunk(1, 1) == 2
    assert cpu._chunk(65, 2) == 4
    assert cpu._chunk(1001, 2) == 62
    assert cpu._chunk(4096, 2) == 64
    assert cpu._chunk(4096, 64) == 8


def test_thread_count_follows_torch():
    torch = pytest.importorskip("torch")

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu._num_threads() == 1
        torch.set_num_threads(2)
        assert cpu._num_threads() == min(2, cpu._cpu_cap())
    finally:
        torch.set_num_threads(old)


def test_torch_views_and_readonly_inputs():
    torch = pytest.importorskip("torch")
    xt = torch.linspace(-20, 20, 9999)
    yt = (xt > 0.5).float()
    g = torch.empty_like(xt)
    total, count, _ = cpu.forward(xt.numpy(), yt.numpy(), None, 1, None, 1, grad_out=g.numpy())
    want = torch.nn.functional.binary_cross_entropy_with_logits(xt.double(), yt.double(), reduction="sum")
    assert total == pytest.approx(want.item(), rel=1e-6) and count == 9999
    assert torch.allclose(g, torch.sigmoid(xt) - yt, atol=1e-6)
    x, y = xt.numpy().copy(), yt.numpy().copy()
    x.flags.writeable = False
    y.flags.writeable = False
    assert cpu.forward(x, y, None, 1, None, 1)[0] == total


def test_in_place_gradient():
    """grad_out may be x itself (forward) or go itself (backward_none)."""
    rng = np.random.default_rng(8)
    x, y = make(10000, np.float64, rng)
    _, g, *_ = run_forward(x, y)
    xc = x.copy()
    cpu.forward(xc, y, None, 1, None, 1, grad_out=xc)
    np.testing.assert_array_equal(xc, g)
    go = rng.normal(size=x.size)
    gb = np.empty_like(x)
    cpu.backward_none(x, y, None, 1, None, 1, go, gb)
    cpu.backward_none(x, y, None, 1, None, 1, go, go)
    np.testing.assert_array_equal(go, gb)


def test_argument_errors():
    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        cpu.forward(x, np.zeros(10, np.float64), None, 1, None, 1)
    with pytest.raises(ValueError):
        cpu.forward(x, np.zeros(9, np.float32), None, 1, None, 1)
    with pytest.raises(ValueError):
        cpu.forward(x.astype(np.float16), x.astype(np.float16), None, 1, None, 1)
    with pytest.raises(ValueError):
        cpu.forward(x, x, None, 1, None, 1, grad_out=np.zeros(9, np.float32))
    big = np.zeros(20, np.float32)
    with pytest.raises(ValueError):
        cpu.forward(big[:10], x, None, 1, None, 1, grad_out=big[5:15])  # partial overlap
    with pytest.raises(ValueError):
        cpu.forward(x, x.copy(), np.zeros(0, np.float32), 1, None, 1)


def test_torch_tensors_are_read_through_their_data_pointers():
    """CPU tensors go to the kernel as they are (any shape, read flat): the same bits as their NumPy views;
    a tensor the kernel cannot read flat is refused with the argument's name."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    for dt in (np.float32, np.float64):
        x, y = make(3 * 4097, dt, rng)
        xt, yt = torch.from_numpy(x).reshape(3, 4097), torch.from_numpy(y).reshape(3, 4097)
        w = rng.random(4097).astype(dt)
        g_np, g_t = np.empty_like(x), torch.empty(3, 4097, dtype=xt.dtype)
        lo_np, lo_t = np.empty_like(x), torch.empty(3, 4097, dtype=xt.dtype)
        kw = dict(label_smoothing=0.1)
        want = cpu.forward(x, y, w, 1, None, 1, loss_out=lo_np, grad_out=g_np, **kw)
        got = cpu.forward(xt, yt, w, 1, None, 1, loss_out=lo_t, grad_out=g_t, **kw)
        assert got == want
        np.testing.assert_array_equal(g_t.numpy().reshape(-1), g_np)
        np.testing.assert_array_equal(lo_t.numpy().reshape(-1), lo_np)
        go = torch.from_numpy(rng.normal(size=x.size).astype(dt))
        gb_np, gb_t = np.empty_like(x), torch.empty_like(xt)
        cpu.backward_none(x, y, w, 1, None, 1, go.numpy(), gb_np)
        cpu.backward_none(xt, yt, w, 1, None, 1, go, gb_t)
        np.testing.assert_array_equal(gb_t.numpy().reshape(-1), gb_np)
        g_plain = np.empty_like(x)
        cpu.forward(x, y, None, 1, None, 1, grad_out=g_plain)
        cpu.forward(xt, yt, None, 1, None, 1, grad_out=xt)  # in place, as with arrays
        np.testing.assert_array_equal(x, g_plain)  # (x is xt's memory)
    x32 = torch.zeros(8, 10)
    with pytest.raises(ValueError, match="^x: expected"):
        cpu.forward(x32.t(), x32.t(), None, 1, None, 1)  # not contiguous
    with pytest.raises(ValueError, match="^y: expected"):
        cpu.forward(x32, x32.double(), None, 1, None, 1)
    with pytest.raises(ValueError, match="^grad_out: expected length 80"):
        cpu.forward(x32, x32.clone(), None, 1, None, 1, grad_out=torch.zeros(79))
    big = torch.zeros(120)
    with pytest.raises(ValueError, match="grad_out partially overlaps"):
        cpu.forward(big[:80], x32, None, 1, None, 1, grad_out=big[40:])
    with pytest.raises(ValueError, match="loss_out overlaps"):
        cpu.forward(x32, big[:80], None, 1, None, 1, loss_out=big[40:])


# ------------------------------------------------------------------------------ threads and fork
def _script(code, timeout=120, **env):
    """Run ``code`` in a fresh interpreter (a hang is a failure, not a wait); returns its stdout."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    full_env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_concurrent_calls_from_many_threads():
    """Six Python threads calling at once with different sizes (NumPy, no torch: each call starts its own
    threads), on a machine allowing 8 threads: no error, and every result is the single-threaded one."""
    out = _script(
        """
import threading, numpy as np
from bcelogits import loss_and_grad
sizes = [4096 * b for b in range(16, 136, 8)]  # (15 sizes)
r = np.random.default_rng(0)
X = (r.standard_normal(sizes[-1]) * 3).astype(np.float32); Y = (r.random(sizes[-1]) < .5).astype(np.float32)
errors, got = [], []
def run():
    for n in sizes:
        try:
            got.append((n, loss_and_grad(X[:n], Y[:n], reduction='sum')[0]))
        except Exception as e:
            errors.append(repr(e))
ts = [threading.Thread(target=run) for _ in range(6)]
[t.start() for t in ts]; [t.join() for t in ts]
ref = {n: loss_and_grad(X[:n], Y[:n], reduction='sum')[0] for n in sizes}
wrong = [n for n, v in got if v != ref[n]]
print(len(errors), len(wrong), len(got), errors[:2])
""",
        BCELOGITS_NUM_THREADS="8",
    )
    assert out.split()[:3] == ["0", "0", str(6 * 15)], out


def test_ctrl_c_during_calls_leaves_nothing_running():
    """A Ctrl-C (SIGINT) arriving while multi-threaded calls run: the KeyboardInterrupt is raised only
    once the call in progress has returned, with every thread it started joined (the process has as
    many OS threads as before), and the thread's next call, which reuses its argument block, gives the
    right bits. (Before the native core, pool threads could go on with the buffer of an interrupted
    wait, and the next call got a wrong sum.)"""
    out = _script(
        """
import os, signal, threading, time, numpy as np
from bcelogits.kernels import cpu
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job inherits SIGINT ignored)
r = np.random.default_rng(1)
xa, ya = (r.standard_normal(1 << 22) * 3).astype(np.float32), (r.random(1 << 22) < 0.5).astype(np.float32)
xb, yb = (r.standard_normal(1 << 20) * 3).astype(np.float32), (r.random(1 << 20) < 0.2).astype(np.float32)
ref = cpu.forward(xb, yb, None, 1, None, 1)
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
interrupted = 0
for k in range(5):
    threading.Timer(0.02 + 0.01 * k, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            cpu.forward(xa, ya, None, 1, None, 1, focal_gamma=2.0)
    except KeyboardInterrupt:
        interrupted += 1
    time.sleep(0.05)  # (the timer threads end)
    assert cpu.forward(xb, yb, None, 1, None, 1) == ref
print(interrupted, tasks() == before)
""",
        BCELOGITS_NUM_THREADS="2",
    )
    assert out.split() == ["5", "True"], out


def test_fork_after_numpy_calls_with_torch_imported():
    """NumPy calls run on the core's own threads even with torch imported, so a process forked after them
    runs torch's multi-threaded operators and ours (torch's OpenMP team, once used, hangs in a forked
    child: that is torch's, with or without us)."""
    out = _script(
        """
import multiprocessing as mp, numpy as np, torch
from bcelogits import loss_and_grad
x = np.linspace(-5, 5, 2_000_000).astype(np.float32); y = (x > 0).astype(np.float32)
ref = float(loss_and_grad(x, y)[0])
def child(q):
    q.put((float(torch.exp(torch.zeros(1 << 22)).sum()), float(loss_and_grad(x, y)[0])))
ctx = mp.get_context("fork"); q = ctx.Queue()
p = ctx.Process(target=child, args=(q,)); p.start(); p.join(30)
if p.is_alive():
    p.kill(); print("HANG")
else:
    t, v = q.get(timeout=5); print("ok", t == 1 << 22, v == ref)
""",
        timeout=90,
    )
    assert out.split() == ["ok", "True", "True"], out


def test_fork_while_another_thread_holds_the_kernel_lock():
    """A child forked while another thread holds the module's lock (loading the library, say) gets a fresh
    lock: before, its first multi-threaded NumPy call waited forever for a thread that is not there."""
    out = _script(
        """
import multiprocessing as mp, threading, time, numpy as np
from bcelogits import loss_and_grad
from bcelogits.kernels import cpu
x = np.linspace(-5, 5, 1_000_000).astype(np.float32); y = (x > 0).astype(np.float32)
loss_and_grad(x[:1000], y[:1000])  # the kernel is loaded; the thread pool is not made yet
held = threading.Event()
def hold():
    with cpu._lock:
        held.set(); time.sleep(3)
threading.Thread(target=hold).start(); held.wait()
def child(q):
    q.put(float(loss_and_grad(x, y)[0]))
ctx = mp.get_context("fork"); q = ctx.Queue()
p = ctx.Process(target=child, args=(q,)); p.start(); p.join(30)
print("HANG" if p.is_alive() else "ok"); p.kill()
""",
        timeout=90,
        BCELOGITS_NUM_THREADS="2",
    )
    assert out.split() == ["ok"], out
