# ruff: noqa: B023  (the timed closures are called within the loop iteration that defines them)
"""Microbenchmark of the fused CPU kernel (bcelogits.kernels.cpu, native core) against torch, one process.

    PYTHONPATH=src python benchmarks/kernel_cpu_micro.py [--sizes 4100000 84000000] [--reps 7] [--evict 64]
    PYTHONPATH=src python benchmarks/kernel_cpu_micro.py --compile   # first calls of a fresh process

Times are medians of ``--reps`` wall-clock runs (after one warm-up run); the CPU time per call (all
threads) shows whether the threads really ran in parallel (about 2x the wall time with 2 threads) or
the machine was busy. torch runs
``F.binary_cross_entropy_with_logits`` (mean) forward under ``torch.no_grad()``, and forward + backward.
``--torch-memory`` hands the kernel tensors torch allocated (ordinary 4 KiB pages) instead of NumPy
arrays (2 MiB pages from 4 MiB up). ``--evict MB`` writes a buffer of that many MiB before each timed
call (outside the timing), as a model's own work would between two loss calls: the inputs then come from
memory, not from the cache.
``--compile`` times the first calls of two fresh processes (nothing is compiled at run time; the name
stayed from the numba kernel, whose first use compiled); ``--no-scipy`` hides scipy from them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _median_time(fn, reps, evict=None):
    """(median wall seconds, process CPU seconds per call) over ``reps`` calls after a warm-up call;
    ``evict``: an array written before each call (its time is in neither number)."""
    fn()
    ts = []
    cpu_s = 0.0
    for _ in range(reps):
        if evict is not None:
            evict += 1.0
        c0 = time.process_time()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        cpu_s += time.process_time() - c0
    return float(np.median(ts)), cpu_s / reps


def _cases(n, dtype, torch_memory=False):
    """The timed callables for one size (closures over this size's arrays). ``torch_memory``: the kernel's
    arrays are tensors torch allocated (ordinary 4 KiB pages, as for a model's tensors), not NumPy arrays
    (which NumPy puts on 2 MiB pages from 4 MiB up, where Linux allows it)."""
    import torch
    import torch.nn.functional as F

    from bcelogits.kernels import cpu

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n, dtype=np.float32) * 4).astype(dtype)
    y = (rng.random(n, dtype=np.float32) > 0.5).astype(dtype)
    w = (rng.random(n, dtype=np.float32) + 0.5).astype(dtype)
    g = np.zeros_like(x)
    lo = np.zeros_like(x)
    go = np.ones_like(x)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if torch_memory:
        x, y, w, g, lo, go = (
            torch.empty(a.shape, dtype=xt.dtype).copy_(torch.from_numpy(a)) for a in (x, y, w, g, lo, go)
        )
        xt, yt = x, y
    scale = 1.0 / n

    def torch_fwd():
        with torch.no_grad():
            F.binary_cross_entropy_with_logits(xt, yt)

    def torch_fwd_bwd():
        xr = xt.detach().requires_grad_()
        F.binary_cross_entropy_with_logits(xr, yt).backward()

    return {
        "kernel loss-only (sum)": lambda: cpu.forward(x, y, None, 1, None, 1),
        "kernel loss+grad": lambda: cpu.forward(x, y, None, 1, None, 1, grad_out=g, grad_scale=scale),
        "kernel loss+grad (full weight)": lambda: cpu.forward(
            x, y, w, 1, None, 1, grad_out=g, grad_scale=scale, weight_sum=False
        ),
        "kernel loss+grad (new out)": lambda: cpu.forward(
            x,
            y,
            None,
            1,
            None,
            1,
            grad_out=(torch.empty_like if torch_memory else np.empty_like)(x),
            grad_scale=scale,
        ),
        "kernel loss_out": lambda: cpu.forward(x, y, None, 1, None, 1, loss_out=lo),
        "kernel backward_none": lambda: cpu.backward_none(x, y, None, 1, None, 1, go, g),
        "kernel focal loss+grad": lambda: cpu.forward(x, y, None, 1, None, 1, grad_out=g, focal_gamma=2.0),
        "torch fwd (mean, no_grad)": torch_fwd,
        "torch fwd+bwd (mean)": torch_fwd_bwd,
    }


def bench(sizes, reps, dtype, evict_mb=0, torch_memory=False):
    import torch

    from bcelogits.kernels import cpu

    assert cpu.available(), cpu.unavailable_reason
    print(
        f"threads: {cpu._num_threads()} (torch {torch.get_num_threads()}), dtype {dtype}, block {cpu.BLOCK}"
        + (f", {evict_mb} MiB written before each call" if evict_mb else "")
        + (", arrays allocated by torch" if torch_memory else ", NumPy arrays")
    )
    evict = np.zeros(evict_mb << 18, np.float32) if evict_mb else None
    rows = []
    for n in sizes:
        print(f"\nn = {n:,}")
        for name, fn in _cases(n, dtype, torch_memory).items():
            t, cpu_s = _median_time(fn, reps, evict)
            rows.append({"n": n, "case": name, "median_ms": t * 1e3, "cpu_ms_per_call": cpu_s * 1e3})
            print(f"  {name:31s} {t * 1e3:10.2f} ms   ({cpu_s * 1e3:8.2f} ms cpu per call)")
    return rows


_CHILD = """
import sys, time, json
if {no_scipy}:
    sys.modules["scipy"] = None  # import scipy -> ImportError, as if it were not installed
t0 = time.perf_counter(); c0 = time.process_time()
import numpy as np
from bcelogits.kernels import cpu
ok = cpu.available()
t1 = time.perf_counter(); c1 = time.process_time()
x = np.ones(5, np.float32); cpu.forward(x, x, None, 1, None, 1, grad_out=np.empty_like(x))
t2 = time.perf_counter(); c2 = time.process_time()
cpu.forward(x, x, None, 1, None, 1)
t3 = time.perf_counter(); c3 = time.process_time()
x = np.ones(5); cpu.forward(x, x, None, 1, None, 1, grad_out=np.empty(5))
t4 = time.perf_counter(); c4 = time.process_time()
print(json.dumps({{"ok": ok, "import": [t1 - t0, c1 - c0], "float32": [t2 - t1, c2 - c1],
                  "loss_only": [t3 - t2, c3 - c2], "float64": [t4 - t3, c4 - c3],
                  "numba": "numba" in sys.modules, "scipy": bool(sys.modules.get("scipy"))}}))
"""


def compile_times(no_scipy=False):
    """First calls in two fresh processes (labelled as in the numba days; both load one library): import
    numpy and the kernel module; first float32 loss + gradient call; first float32 loss-only call; first
    float64 loss + gradient call."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, BCELOGITS_CACHE_DIR=cache)
        code = _CHILD.format(no_scipy=bool(no_scipy))
        for label in ("empty cache", "cached"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            imp, f32, lo, f64 = d["import"], d["float32"], d["loss_only"], d["float64"]
            print(
                f"{label:12s} import numpy+kernels {imp[0]:.2f}s wall / {imp[1]:.2f}s cpu;"
                f" first float32 loss+grad {f32[0]:.2f}s / {f32[1]:.2f}s;"
                f" first float32 loss-only {lo[0]:.2f}s / {lo[1]:.2f}s;"
                f" first float64 {f64[0]:.2f}s / {f64[1]:.2f}s; numba imported: {d['numba']};"
                f" scipy imported: {d['scipy']}"
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4_100_000, 2**24, 84_000_000])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--compile", action="store_true", help="measure compile and cache-load times only")
    ap.add_argument("--no-scipy", action="store_true", help="with --compile: children see no scipy")
    ap.add_argument("--evict", type=int, default=0, metavar="MB", help="write MB MiB before each call")
    ap.add_argument("--torch-memory", action="store_true", help="the kernel's arrays allocated by torch")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if a.compile:
        compile_times(a.no_scipy)
        return
    rows = bench(a.sizes, a.reps, np.dtype(a.dtype), a.evict, a.torch_memory)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
