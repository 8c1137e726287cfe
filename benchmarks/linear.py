"""Fused linear + BCE (bcelogits.linear_binary_cross_entropy_with_logits) against torch's unfused
``F.binary_cross_entropy_with_logits(F.linear(x, W, b), dense_target)``: forward+backward time and peak
extra memory, N = 512 rows, D = 768 features, float32, ~5.5 positives per row, over C classes; and the
Amazon-670K shape (C = 670,091) with a sparse target, checked against a float64 reference computed
chunk by chunk.

    PYTHONPATH=src python benchmarks/linear.py [--classes 8192,65536,262144] [--reps 5] [--no-amazon]
        [--amazon-torch] [--no-memory]

- **Time**: in one process, each round runs torch (dense target), ours with the same dense target and
  ours with the CSR target, in an order that rotates from round to round; ``x.grad``, ``W.grad`` and
  ``b.grad`` are None before each call. Reported: the medians, and the median over rounds of the
  same-round ratio ours / torch (< 1: ours is faster). The machine may be shared: read ratios.
- **Peak extra memory**: a fresh subprocess per (shape, implementation) makes the inputs, runs one
  forward+backward as a warm-up (numba kernels, BLAS buffers), frees its gradients and returns free
  memory to the OS (``malloc_trim``; glibc's mmap threshold is fixed at 64 KiB with
  ``MALLOC_MMAP_THRESHOLD_`` so that freed blocks are unmapped), resets the resident-set high-water
  mark (``echo 5 > /proc/self/clear_refs``), runs one forward+backward and reads ``VmHWM``. Extra =
  HWM - RSS before the call - the gradients of x, W and b, as a percentage of one N×C float32 tensor
  (the goal: <= 5 %).
- **Amazon-670K**: torch is not run by default (about 10 GB, on a shared machine; ``--amazon-torch``
  runs it); ours with the CSR target, then a float64 reference of the loss and the three gradients
  (classes in blocks of 16384: no N×C float64 tensor either): loss relative error, gradient max abs
  error / max abs gradient.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import bcelogits

N, D, AMAZON_C, POSITIVES = 512, 768, 670_091, 5.45


def make(n_classes: int, seed: int = 0, dense: bool = True):
    """x (N, D), W (C, D), b (C,) float32 with gradients; CSR target with ~5.5 positives per row (at
    least 1, at most 20) and its dense form (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(n_classes, D, generator=g) * D**-0.5).requires_grad_()
    b = torch.zeros(n_classes).requires_grad_()
    counts = torch.poisson(torch.full((N,), POSITIVES - 1), generator=g).long().clamp_(0, 19) + 1
    crow = torch.zeros(N + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    col = torch.cat([torch.randperm(n_classes, generator=g)[: int(k)].sort().values for k in counts])
    csr = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), (N, n_classes))
    return x, w, b, csr, (csr.to_dense() if dense else None)


def step(impl: str, x, w, b, csr, dense):
    for t in (x, w, b):
        t.grad = None
    if impl == "torch":
        loss = F.binary_cross_entropy_with_logits(F.linear(x, w, b), dense)
    elif impl == "ours-dense":
        loss = bcelogits.linear_binary_cross_entropy_with_logits(x, w, dense, b)
    else:
        loss = bcelogits.linear_binary_cross_entropy_with_logits(x, w, csr, b)
    loss.backward()
    return loss


def timing(n_classes: int, impls, reps: int):
    x, w, b, csr, dense = make(n_classes, dense=any(i != "ours-csr" for i in impls))
    for impl in impls:  # warm-up
        step(impl, x, w, b, csr, dense)
    times = {i: [] for i in impls}
    for r in range(reps):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            t = time.perf_counter()
            step(impl, x, w, b, csr, dense)
            times[impl].append(time.perf_counter() - t)
    return times


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(impl: str, n_classes: int) -> None:
    """Runs in the subprocess: prints {"extra": bytes}."""
    x, w, b, csr, dense = make(n_classes, dense=impl != "ours-csr")
    step(impl, x, w, b, csr, dense)
    for t in (x, w, b):
        t.grad = None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS")
    step(impl, x, w, b, csr, dense)
    peak = _rss("VmHWM")
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (x, w, b))
    print(json.dumps({"extra": peak - before - grads}))


def memory(impl: str, n_classes: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", impl, str(n_classes)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


def amazon_check(reps: int):
    """Ours on the Amazon-670K shape (CSR target): times, and the float64 chunked reference."""
    x, w, b, csr, _ = make(AMAZON_C, dense=False)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loss = step("ours-csr", x, w, b, csr, None)
        times.append(time.perf_counter() - t)
    x64, crow, col = x.detach().double(), csr.crow_indices(), csr.col_indices()
    rows = torch.repeat_interleave(torch.arange(N), crow[1:] - crow[:-1])
    total, gx = 0.0, torch.zeros(N, D, dtype=torch.float64)
    err_w = max_w = err_b = max_b = 0.0
    scale = 1.0 / (N * AMAZON_C)
    for c0 in range(0, AMAZON_C, 16384):
        c1 = min(c0 + 16384, AMAZON_C)
        wb = w.detach()[c0:c1].double()
        z = torch.addmm(b.detach()[c0:c1].double(), x64, wb.t())
        y = torch.zeros_like(z)
        sel = (col >= c0) & (col < c1)
        y[rows[sel], col[sel] - c0] = 1.0
        total += float(F.binary_cross_entropy_with_logits(z, y, reduction="sum"))
        g = (torch.sigmoid(z) - y) * scale
        gx += g @ wb
        gw = g.t() @ x64
        gb = g.sum(0)
        err_w = max(err_w, float((w.grad[c0:c1].double() - gw).abs().max()))
        max_w = max(max_w, float(gw.abs().max()))
        err_b = max(err_b, float((b.grad[c0:c1].double() - gb).abs().max()))
        max_b = max(max_b, float(gb.abs().max()))
    ref = total * scale
    return {
        "times": times,
        "loss": float(loss),
        "loss_rel_err": abs(float(loss) - ref) / ref,
        "grad_input_err": float((x.grad.double() - gx).abs().max() / gx.abs().max()),
        "grad_weight_err": err_w / max_w,
        "grad_bias_err": err_b / max_b,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="8192,65536,262144", help="comma-separated C values")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per shape (default 5)")
    p.add_argument("--no-amazon", action="store_true", help="skip the Amazon-670K shape")
    p.add_argument("--amazon-torch", action="store_true", help="also run torch's unfused loss at 670K")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.memory_child[0], int(a.memory_child[1]))
    impls = ["torch", "ours-dense", "ours-csr"]
    print(f"N={N} D={D} float32, fwd+bwd, threads={torch.get_num_threads()}, {_cpu()}")
    print("| C | torch ms | ours (dense y) ms | ours (CSR y) ms | ratio dense | ratio CSR | "
          "extra mem torch | ours dense | ours CSR |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for c in [int(v) for v in a.classes.split(",") if v]:
        t = timing(c, impls, a.reps)
        med = {i: float(np.median(v)) * 1e3 for i, v in t.items()}
        ratio = {i: float(np.median(np.array(t[i]) / np.array(t["torch"]))) for i in impls[1:]}
        unit = N * c * 4 / 100
        mem = {i: "-" if a.no_memory else f"{memory(i, c) / unit:.1f} %" for i in impls}
        print(
            f"| {c} | {med['torch']:.0f} | {med['ours-dense']:.0f} | {med['ours-csr']:.0f} | "
            f"{ratio['ours-dense']:.2f} | {ratio['ours-csr']:.2f} | {mem['torch']} | {mem['ours-dense']} | "
            f"{mem['ours-csr']} |",
            flush=True,
        )
    if not a.no_amazon:
        if a.amazon_torch:
            t = timing(AMAZON_C, ["torch", "ours-csr"], a.reps)
            ratio = float(np.median(np.array(t["ours-csr"]) / np.array(t["torch"])))
            print(f"Amazon-670K torch vs ours (CSR): ratio {ratio:.2f}")
        r = amazon_check(a.reps)
        mem = "-" if a.no_memory else f"{memory('ours-csr', AMAZON_C) / (N * AMAZON_C * 4 / 100):.1f} %"
        print(
            f"Amazon-670K (N={N}, D={D}, C={AMAZON_C}, CSR target, {POSITIVES}/row): ours "
            f"{np.median(r['times']) * 1e3:.0f} ms fwd+bwd (median of {a.reps}), peak extra memory {mem} "
            f"of N×C float32; vs float64 chunked reference: loss rel err {r['loss_rel_err']:.1e}, "
            f"grad_input {r['grad_input_err']:.1e}, grad_weight {r['grad_weight_err']:.1e}, "
            f"grad_bias {r['grad_bias_err']:.1e} (max abs err / max abs grad)"
        )


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
        return f"{name}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return "CPU unknown"


if __name__ == "__main__":
    main()
