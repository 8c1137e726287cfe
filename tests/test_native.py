"""The native core (bcelogits.kernels._native): its argument layout, its dispatch targets, and what
happens without it.

The central claim: element losses, gradients and the reduced sums are BITWISE identical on every
dispatch target this machine can run (baseline x86-64, x86-64-v3, x86-64-v4) and for every thread
count. The targets are compiled from the same source with different instruction sets; nothing but
the vector width differs, and the core is written so that the width cannot change a bit.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

cpu = pytest.importorskip("bcelogits.kernels.cpu")
from bcelogits.kernels import _native  # noqa: E402

if not cpu.available():  # pragma: no cover - depends on the install
    if os.environ.get("CI"):
        raise RuntimeError(f"native core unavailable in CI: {cpu.unavailable_reason}")
    pytest.skip(f"native core unavailable: {cpu.unavailable_reason}", allow_module_level=True)

LIB = cpu._state["lib"]
SUPPORTED = sorted(LIB.supported)


def test_the_struct_mirror_matches_the_library():
    """Python's Args is built from the header's field list; the library reports its own layout."""
    raw = LIB._lib
    assert raw.bce_args_size() == ctypes.sizeof(_native.Args) == 8 * len(_native.FIELDS)
    for i, (_, name) in enumerate(_native.FIELDS):
        assert raw.bce_args_offset(i) == getattr(_native.Args, name).offset == 8 * i
    assert raw.bce_args_offset(len(_native.FIELDS)) == -1
    assert _native.PACK.size == ctypes.sizeof(_native.Args)
    assert [n for _, n in _native.FIELDS[:2]] == ["x", "y"]
    # the enums come from the same header
    assert _native.Mode.MODE_GRAD_NONE == 2 and _native.Uses.USE_FOCAL == 16
    assert _native.Target.TARGET_X86_64_V4 == 2


def test_a_mismatched_library_is_refused(tmp_path, monkeypatch):
    """A header whose field list differs from the library's struct: the load fails with the fix named."""
    header = open(_native.HEADER).read().replace("F(I64, n)", "F(I64, n) \\\n    F(I64, extra)")
    fake = tmp_path / "bce_core.h"
    fake.write_text(header)
    fields, _ = _native._parse_header(str(fake))
    assert len(fields) == len(_native.FIELDS) + 1

    class Bigger(ctypes.Structure):
        _fields_ = [(name, ctypes.c_int64) for _, name in fields]

    monkeypatch.setattr(_native, "Args", Bigger)
    monkeypatch.setattr(_native, "FIELDS", fields)
    with pytest.raises(OSError, match="does not match .*rebuild"):
        _native.Library(LIB.path)


def test_targets_of_this_machine():
    assert _native.Target.TARGET_BASELINE in LIB.supported
    assert LIB.supported <= LIB.compiled
    assert LIB.target == max(LIB.supported)  # the best one, unless BCELOGITS_CPU_TARGET says otherwise
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        flags = open("/proc/cpuinfo").read().split("\nflags")[1].split("\n")[0].split()
        assert (_native.Target.TARGET_X86_64_V3 in LIB.supported) == ({"avx2", "fma", "bmi2"} <= set(flags))
        assert (_native.Target.TARGET_X86_64_V4 in LIB.supported) == (
            {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= set(flags)
        )


def _cases(dt, rng):
    """(x, y, kwargs) covering every option and the special values."""
    n = 37 * cpu.BLOCK + 999  # (several blocks, a partial last one, enough for 3 threads)
    x = rng.normal(0, 6, n)
    x[::97] = rng.uniform(-120, 120, x[::97].size)
    x[:6] = [1e-30, 0.0, -0.0, 89.5, -103.0, 700.0]
    x = x.astype(dt)
    x_special = x.copy()
    x_special[:4] = [np.inf, -np.inf, np.nan, -1e30]
    y_soft = rng.random(n).astype(dt)
    y_hard = (rng.random(n) < 0.3).astype(dt)
    y_ign = y_hard.copy()
    y_ign[::5] = -100
    w_vec = rng.uniform(0.1, 3, 7).astype(dt)
    w_full = rng.uniform(0.1, 3, n).astype(dt)
    p_class = np.array([1e-3, 1.0, 1e6], dt)
    p_long = rng.uniform(0.5, 2, 20011).astype(dt)  # (too long to expand: filled block by block)
    return [
        (x, y_hard, {}),
        (x, y_soft, {}),
        (x, y_soft, dict(w=w_vec)),
        (x, y_hard, dict(p=p_class, p_inner=5)),
        (x, y_soft, dict(w=w_full, p=p_long)),
        (x, y_soft, dict(w=w_vec, w_inner=3, label_smoothing=0.1)),
        (x, y_ign, dict(w=w_vec, ignore_index=-100)),
        (x, y_soft, dict(focal_gamma=2.0)),
        (x, y_ign, dict(w=w_vec, p=p_class, focal_gamma=0.5, label_smoothing=0.05, ignore_index=-100)),
        (x_special, y_soft, dict(w=w_vec)),
        (x_special, y_ign, dict(p=p_class, focal_gamma=2.0, ignore_index=-100)),
    ]


def _all_outputs(x, y, kw):
    """Every output of the three modes for one case: (sums, losses, gradient, 'none' gradient)."""
    w, p = kw.get("w"), kw.get("p")
    wi, pi = kw.get("w_inner", 1), kw.get("p_inner", 1)
    opts = {k: v for k, v in kw.items() if k not in ("w", "p", "w_inner", "p_inner")}
    lo, g = np.empty_like(x), np.empty_like(x)
    r1 = cpu.forward(x, y, w, wi, p, pi, loss_out=lo, grad_out=g, grad_scale=0.5, **opts)
    lo0 = np.empty_like(x)
    r0 = cpu.forward(x, y, w, wi, p, pi, loss_out=lo0, **opts)
    go = np.linspace(-2, 2, x.size).astype(x.dtype)
    gb = np.empty_like(x)
    cpu.backward_none(x, y, w, wi, p, pi, go, gb, **opts)
    return (r1, r0), lo, g, lo0, gb


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_every_target_and_thread_count_gives_the_same_bits(monkeypatch, dt):
    """Element losses, gradients, the 'none' gradient and the sums: bitwise equal across every target
    this machine supports x 1, 2 and 3 threads (the core's own threads), for every option."""
    rng = np.random.default_rng(19)
    cases = _cases(dt, rng)
    monkeypatch.setattr(cpu, "_torch_openmp", lambda: None)
    reference = None
    runs = 0
    for target in SUPPORTED:
        monkeypatch.setitem(cpu._state, "target", int(target))
        for threads in (1, 2, 3):
            monkeypatch.setattr(cpu, "_num_threads", lambda t=threads: t)
            got = [_all_outputs(x, y, kw) for x, y, kw in cases]
            assert sum(np.isfinite(r[0][0][0]) for r in got) >= len(cases) - 2  # (sums that say something)
            runs += 1
            if reference is None:
                reference = got
                continue
            for k, (a, b) in enumerate(zip(got, reference)):
                assert np.array(a[0]).tobytes() == np.array(b[0]).tobytes(), (target, threads, k)  # sums
                for u, v in zip(a[1:], b[1:]):
                    assert u.tobytes() == v.tobytes(), (_native.TARGET_NAMES[target], threads, k)
    assert runs == 3 * len(SUPPORTED)


def test_the_same_bits_on_torch_openmp_threads():
    """The torch launcher (torch's OpenMP team) gives the bits of the core's own threads."""
    torch = pytest.importorskip("torch")
    if cpu._torch_openmp() is None:
        pytest.skip("this torch build does not run its operators on OpenMP")
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.normal(0, 5, 50 * cpu.BLOCK + 3)).astype(np.float32))
    y = torch.from_numpy(rng.random(x.numel()).astype(np.float32))
    g_t, g_n = torch.empty_like(x), np.empty(x.numel(), np.float32)
    r_t = cpu.forward(x, y, None, 1, None, 1, grad_out=g_t)
    r_n = cpu.forward(x.numpy(), y.numpy(), None, 1, None, 1, grad_out=g_n)
    assert r_t == r_n and g_t.numpy().tobytes() == g_n.tobytes()


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k != _native.TARGET_ENV}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("target", SUPPORTED)
def test_the_environment_variable_forces_a_target(target):
    name = _native.TARGET_NAMES[target]
    r = _run("from bcelogits.kernels import cpu; print(cpu.target())", BCELOGITS_CPU_TARGET=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name]


def test_a_bad_target_name_is_an_error_naming_the_choices():
    r = _run("from bcelogits.kernels import cpu; cpu.available()", BCELOGITS_CPU_TARGET="avx9000")
    assert r.returncode != 0
    assert "BCELOGITS_CPU_TARGET='avx9000' is not a CPU target" in r.stderr and "x86-64-v3" in r.stderr


def test_a_target_this_machine_lacks_warns_and_runs_the_best_it_has():
    baseline = {_native.Target.TARGET_BASELINE}
    with pytest.warns(RuntimeWarning, match="x86-64-v4 asks for a target this CPU or OS cannot run"):
        got = _native.choose_target(baseline, "x86-64-v4")
    assert got == _native.Target.TARGET_BASELINE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.choose_target(set(_native.Target), "baseline") == _native.Target.TARGET_BASELINE


def test_the_core_refuses_a_target_it_cannot_run_and_bad_fields():
    """The C side checks too: never an illegal instruction, never a read past the arrays it was given."""
    x = np.zeros(10, np.float32)
    args = _native.Args()
    args.x = args.y = x.ctypes.data
    args.w = args.p = np.ones(1, np.float32).ctypes.data
    args.part = np.zeros(3, np.float64).ctypes.data
    args.n, args.w_len, args.w_inner, args.p_len, args.p_inner = 10, 1, 1, 1, 1
    args.nthreads = args.chunk = 1
    args.target = 7
    assert LIB.run(ctypes.addressof(args)) == _native.Error.ERROR_TARGET
    unsupported = set(_native.Target) - LIB.supported
    for t in unsupported:
        args.target = int(t)
        assert LIB.run(ctypes.addressof(args)) == _native.Error.ERROR_TARGET
    args.target = 0
    args.n = 0
    assert LIB.run(ctypes.addressof(args)) == _native.Error.ERROR_ARGS
    args.n, args.mode = 10, 3
    assert LIB.run(ctypes.addressof(args)) == _native.Error.ERROR_ARGS
    args.mode, args.flags = 0, int(_native.Flags.FLAG_LOSS_SUM)
    assert LIB.run(ctypes.addressof(args)) == _native.Error.OK
    assert args.out_total == pytest.approx(10 * np.log(2.0))


def test_without_the_library_the_plain_path_serves_with_one_warning_saying_why():
    """The library missing (an install that skipped the build): one PerformanceWarning naming the cause
    and the fix (rebuild with a C compiler), and the plain path's results."""
    code = """
import warnings, torch, bcelogits
from bcelogits import kernels
from bcelogits.kernels import _native
_native.library_name = lambda: "libbce_core_missing.so"
x, y = torch.randn(64, 10), torch.rand(64, 10)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    a = bcelogits.binary_cross_entropy_with_logits(x, y)
    b = bcelogits.binary_cross_entropy_with_logits(x, y)
msgs = [str(r.message) for r in rec if issubclass(r.category, bcelogits.PerformanceWarning)]
with kernels.use("plain"):
    ref = bcelogits.binary_cross_entropy_with_logits(x, y)
print(len(msgs), torch.equal(a, ref), torch.equal(a, b))
print(msgs[0])
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    first, message = r.stdout.split("\n", 1)
    assert first.split() == ["1", "True", "True"]
    assert "libbce_core_missing.so is not installed" in message
    assert "C compiler" in message and "pip install" in message
