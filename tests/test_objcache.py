"""The object-code cache of compiled kernels (:mod:`bcelogits.kernels._objcache`).

Toy ``numba.cfunc`` kernels shaped like the real one (raw pointers, ``numba.carray``, blocked loops)
are stored from this process and loaded in fresh interpreters where importing numba is impossible.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bcelogits.kernels import _objcache

numba = pytest.importorskip("numba")
types = numba.types

F32P, F64P, I64P = (types.CPointer(t) for t in (types.float32, types.float64, types.int64))


def _exp_kernel(xp, outp, n, s):
    """out = exp(s * x) + 1, in blocks of 256."""
    x = numba.carray(xp, (n,))
    out = numba.carray(outp, (n,))
    for b0 in range(0, n, 256):
        b1 = min(b0 + 256, n)
        xb, ob = x[b0:b1], out[b0:b1]
        for i in range(xb.shape[0]):
            ob[i] = np.exp(xb[i] * s) + np.float32(1.0)


def _gather_kernel(xp, ip, outp, n):
    """out[i] = x[idx[i] % n] / (1 + |x[i]|) + log1p(|x[i]|); returns the sum of out."""
    x = numba.carray(xp, (n,))
    idx = numba.carray(ip, (n,))
    out = numba.carray(outp, (n,))
    total = 0.0
    for b0 in range(0, n, 128):
        for i in range(b0, min(b0 + 128, n)):
            a = abs(x[i])
            out[i] = x[idx[i] % n] / (1.0 + a) + np.log1p(a)
            total += out[i]
    return total


def _spin_kernel(outp, n):
    """A serial recurrence that keeps one core busy for ``n`` steps."""
    out = numba.carray(outp, (1,))
    acc = 0.0
    for i in range(n):
        acc = acc * 0.999999 + math.sqrt(i)
    out[0] = acc


def _exp_reference(x, s):
    return np.exp(x * np.float32(s)) + np.float32(1.0)


def _gather_reference(x, idx):
    a = np.abs(x)
    return x[idx % x.size] / (1.0 + a) + np.log1p(a)


@pytest.fixture(scope="module")
def kernels():
    exp = numba.cfunc(types.void(F32P, F32P, types.int64, types.float32))(_exp_kernel)
    gather = numba.cfunc(types.float64(F64P, I64P, F64P, types.int64), error_model="numpy")(_gather_kernel)
    spin = numba.cfunc(types.void(F64P, types.int64))(_spin_kernel)
    return {"exp": exp, "gather": gather, "spin": spin}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("BCELOGITS_CACHE_DIR", str(d))
    return d


def _fresh_python(script: str, cache_dir, block_numba: bool = True, **params) -> dict:
    """Run ``script`` in a new interpreter (where ``import numba`` fails if ``block_numba``); the script
    prints one JSON line, returned parsed."""
    prelude = "import sys\n" + ("sys.modules['numba'] = None\n" if block_numba else "") + "import json\n"
    env = dict(os.environ, BCELOGITS_CACHE_DIR=str(cache_dir), OBJCACHE_PARAMS=json.dumps(params))
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- key
def test_key_changes_with_every_part(monkeypatch):
    k = _objcache.key("source", "float32")
    assert len(k) == 32 and int(k, 16) >= 0
    assert k == _objcache.key("source", "float32")
    others = [
        _objcache.key("source", "float64"),
        _objcache.key("sourc", "efloat32"),
        _objcache.key("sourcefloat32"),
        _objcache.key(("source", "float32")),
        _objcache.key(b"source", "float32"),
        _objcache.key("source", "float32", 0),
    ]
    assert len({k, *others}) == 1 + len(others)
    monkeypatch.setenv("NUMBA_OPT", "0")
    assert _objcache.key("source", "float32") != k
    monkeypatch.delenv("NUMBA_OPT")
    parts = _objcache._platform_parts()
    for i in range(len(parts)):  # another CPU, llvmlite, numba, Python, ...: another key
        changed = parts[:i] + (str(parts[i]) + "x",) + parts[i + 1 :]
        monkeypatch.setattr(_objcache, "_platform_parts", lambda changed=changed: changed)
        assert _objcache.key("source", "float32") != k
    with pytest.raises(TypeError):
        _objcache.key(object())


def test_cache_dir_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("BCELOGITS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _objcache.cache_dir() == tmp_path / "xdg" / "bcelogits"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _objcache.cache_dir() == tmp_path / "home" / ".cache" / "bcelogits"
    monkeypatch.setenv("BCELOGITS_CACHE_DIR", str(tmp_path / "mine"))
    assert _objcache.cache_dir() == tmp_path / "mine" and (tmp_path / "mine").is_dir()


# ---------------------------------------------------------------------------------- fresh process
def test_load_in_fresh_process_without_numba(kernels, cache):
    keys = {name: _objcache.key("toy kernels", name) for name in ("exp", "gather")}
    for name, k in keys.items():
        assert _objcache.store(k, kernels[name])
    assert sorted(p.name for p in cache.iterdir()) == sorted(k + ".obj" for k in keys.values())

    out = _fresh_python(
        """
        import ctypes, os, time
        import numpy as np
        from bcelogits.kernels import _objcache
        keys = json.loads(os.environ["OBJCACHE_PARAMS"])["keys"]
        t0 = time.perf_counter()
        import llvmlite.binding
        t1 = time.perf_counter()
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        exp = _objcache.load(keys["exp"], None, (P, P, I64, ctypes.c_float))
        t2 = time.perf_counter()
        x = np.linspace(-4, 4, 1001, dtype=np.float32)
        out = np.empty_like(x)
        exp(x.ctypes.data, out.ctypes.data, x.size, 0.75)
        t3 = time.perf_counter()
        gather = _objcache.load(keys["gather"], ctypes.c_double, (P, P, P, I64))
        t4 = time.perf_counter()
        y = np.random.default_rng(0).normal(size=777)
        idx = np.arange(777, dtype=np.int64)[::-1] * 5
        gout = np.empty_like(y)
        total = gather(y.ctypes.data, idx.ctypes.data, gout.ctypes.data, y.size)
        print(json.dumps(dict(
            import_llvmlite=t1 - t0, first_load=t2 - t1, first_call=t3 - t2, second_load=t4 - t3,
            exp=out.tolist(), gather=gout.tolist(), total=total,
            again=_objcache.load(keys["exp"], None, (P, P, I64, ctypes.c_float)) is exp,
            key=_objcache.key("toy kernels", "exp"),
            numba=sorted(m for m, v in sys.modules.items() if m.startswith("numba") and v is not None),
        )))
        """,
        cache,
        keys=keys,
    )
    print(
        "fresh process: import llvmlite.binding {import_llvmlite:.3f}s, engine + first load "
        "{first_load:.4f}s, first call {first_call:.5f}s, second load {second_load:.4f}s".format(**out)
    )
    x = np.linspace(-4, 4, 1001, dtype=np.float32)
    np.testing.assert_allclose(out["exp"], _exp_reference(x, 0.75), rtol=2e-6)
    y = np.random.default_rng(0).normal(size=777)
    ref = _gather_reference(y, np.arange(777, dtype=np.int64)[::-1] * 5)
    np.testing.assert_allclose(out["gather"], ref, rtol=1e-12)
    assert out["total"] == pytest.approx(ref.sum(), rel=1e-12)
    assert out["again"] is True
    assert out["key"] == keys["exp"]  # the key is the same computed without numba, in another process
    assert out["numba"] == []  # and sys.modules['numba'] is None there: any import of numba would fail
    assert out["import_llvmlite"] + out["first_load"] + out["first_call"] < 0.5


def test_calls_release_the_gil(kernels, cache):
    k = _objcache.key("toy kernels", "spin")
    assert _objcache.store(k, kernels["spin"])
    out = _fresh_python(
        """
        import ctypes, os, threading, time
        import numpy as np
        from bcelogits.kernels import _objcache
        k = json.loads(os.environ["OBJCACHE_PARAMS"])["key"]
        spin = _objcache.load(k, None, (ctypes.c_void_p, ctypes.c_int64))
        buf = np.zeros(4)
        t = time.perf_counter(); spin(buf.ctypes.data, 2_000_000); dt = time.perf_counter() - t
        n = int(2_000_000 * 0.12 / max(dt, 1e-6))  # ~0.12 s per call

        def run(slot, spans):
            t = time.perf_counter(); spin(buf[slot:].ctypes.data, n); spans.append((t, time.perf_counter()))

        spans = []
        t = time.perf_counter(); run(0, spans); run(1, spans); serial = time.perf_counter() - t
        # while one thread is inside the call, this thread keeps running Python
        one = []
        th = threading.Thread(target=run, args=(0, one)); th.start()
        ticks = []
        while th.is_alive():
            ticks.append(time.perf_counter())
        th.join()
        (a, b), = one
        inside = [a] + [u for u in ticks if a < u < b] + [b]
        gap = max(v - u for u, v in zip(inside, inside[1:]))
        spans = []
        threads = [threading.Thread(target=run, args=(i, spans)) for i in (0, 1)]
        t = time.perf_counter()
        for th in threads: th.start()
        for th in threads: th.join()
        parallel = time.perf_counter() - t
        print(json.dumps(dict(serial=serial, parallel=parallel, call=b - a, gap=gap, spans=spans,
                              same=bool(buf[0] == buf[1]), numba="numba" in sys.modules)))
        """,
        cache,
        block_numba=False,
        key=k,
    )
    print(
        "2 calls: serial {serial:.3f}s, 2 threads {parallel:.3f}s; longest GIL gap during a "
        "{call:.3f}s call: {gap:.4f}s".format(**out)
    )
    assert out["same"] and not out["numba"]
    assert out["gap"] < 0.5 * out["call"]  # the caller's thread was never blocked for the whole call
    (a0, b0), (a1, b1) = out["spans"]
    assert max(a0, a1) < min(b0, b1)  # the two calls overlapped in time
    # On an idle machine with 2+ cores the two threads take about half the serial time; that is printed,
    # not asserted, since it depends on the load on the machine.


# ------------------------------------------------------------------------------------- in process
def test_load_in_process_and_twice(kernels, cache):
    k = _objcache.key("in process", "exp")
    assert _objcache.store(k, kernels["exp"])
    argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float)
    fn = _objcache.load(k, None, argtypes)
    assert fn is not None and _objcache.load(k, None, argtypes) is fn
    x = np.linspace(-2, 2, 300, dtype=np.float32)
    out = np.empty_like(x)
    fn(x.ctypes.data, out.ctypes.data, x.size, -1.5)
    np.testing.assert_allclose(out, _exp_reference(x, -1.5), rtol=2e-6)
    # The stand-ins for numba's GIL helpers (only reached on a wrapper's error path), called with the GIL
    # held: Ensure then reports PyGILState_LOCKED (0) and Release undoes it.
    engine = _objcache._state["engines"][-1]  # (each object gets an engine of its own)
    proto = ctypes.PYFUNCTYPE(None, ctypes.POINTER(ctypes.c_int))
    ensure, release = (proto(engine.get_function_address(f"numba_gil_{n}")) for n in ("ensure", "release"))
    state = ctypes.c_int(-1)
    ensure(ctypes.byref(state))
    assert state.value == 0
    release(ctypes.byref(state))


def test_damaged_or_missing_entries_load_as_none(kernels, cache):
    sig = (None, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float))
    ks = [_objcache.key("damaged", i) for i in range(4)]
    for k in ks:
        assert _objcache.store(k, kernels["exp"])
    blob = (cache / (ks[0] + ".obj")).read_bytes()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    (cache / (ks[0] + ".obj")).write_bytes(bytes(flipped))  # corrupted
    (cache / (ks[1] + ".obj")).write_bytes(blob[: len(blob) - 100])  # truncated
    (cache / (ks[2] + ".obj")).write_bytes(b"")  # empty
    os.replace(cache / (ks[3] + ".obj"), cache / (_objcache.key("renamed") + ".obj"))  # another key's file
    for k in [*ks, _objcache.key("renamed"), _objcache.key("never stored")]:
        assert _objcache.load(k, *sig) is None
    for bad in ("", "../x", "ABC", 123, None):
        assert _objcache.load(bad, *sig) is None
        assert _objcache.store(bad, kernels["exp"]) is False
    assert not list(cache.glob(".tmp-*"))


def test_unwritable_cache_dir(kernels, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("BCELOGITS_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert _objcache.cache_dir() is None
    k = _objcache.key("unwritable")
    assert _objcache.store(k, kernels["exp"]) is False
    assert _objcache.load(k, None, ()) is None


def test_store_refuses_what_it_cannot_load(cache):
    assert _objcache.store(_objcache.key("not a cfunc"), object()) is False
    # error_model='python' division raises ZeroDivisionError through numba's exception helpers
    raising = numba.cfunc(types.float64(types.float64, types.float64))(lambda a, b: a / b)
    syms = _objcache._elf_symbols(raising._library.serialize_using_object_code()[2][0])
    assert syms is not None and _objcache._unsupported(syms[0])
    assert _objcache.store(_objcache.key("raising"), raising) is False
    assert not list(cache.iterdir())


def test_elf_reader_rejects_garbage(kernels):
    obj = kernels["exp"]._library.serialize_using_object_code()[2][0]
    undefined, strong, functions = _objcache._elf_symbols(obj)
    assert kernels["exp"].native_name in functions and kernels["exp"].native_name in strong
    assert {"numba_gil_ensure", "numba_gil_release", "PyErr_SetString", "expf"} <= undefined
    for junk in (b"", b"\x7fELF", obj[:64], obj[:200], b"\x00" * 4096):
        assert _objcache._elf_symbols(junk) is None


def test_kernels_compiled_in_different_processes_load_together(tmp_path, monkeypatch):
    """numba names a compiled function after its Python name and a per-process counter, so the float32 and
    the float64 kernel, each compiled first in a process of its own, define the same entry symbol. Both
    must still load, side by side, in a later process (before, the second was compiled again in every
    process)."""
    script = """
        import os, sys
        import numpy as np
        from bcelogits import loss_and_grad
        from bcelogits.kernels import cpu
        x = np.linspace(-5, 5, 50_000)
        y = (x > 0.3).astype(np.float64)
        for dt in os.environ["DTYPES"].split(","):
            loss_and_grad(x.astype(dt), y.astype(dt))
        print(json.dumps({"origin": sorted(cpu._origin.values()), "numba": "numba" in sys.modules}))
    """
    for dtypes in ("float32", "float64", "float32,float64", "float64,float32"):
        monkeypatch.setenv("DTYPES", dtypes)
        out = _fresh_python(script, tmp_path / "cache", block_numba=False)
        if "," in dtypes:
            assert out == {"origin": ["cached", "cached"], "numba": False}, out
        else:
            assert out["origin"] == ["compiled and stored"], out
