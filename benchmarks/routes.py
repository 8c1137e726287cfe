"""Forward+backward time of the CPU routes that are not a contiguous float32/float64 pair (channels_last,
16-bit, gapped views, mixed dtypes, an irregular weight broadcast): torch, bcelogits, and bcelogits with the
plain path forced. This produced the table under "Routes and warnings" in the README.

    PYTHONPATH=src python benchmarks/routes.py [--reps 9]

Times are medians (ms) of ``--reps`` calls after a warm-up call (5 for the slow plain path), in one process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import bcelogits
from bcelogits import kernels


def _median_ms(fn, n=9):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def _cases():
    torch.manual_seed(0)
    cl = torch.channels_last
    shape = (2048, 1000)
    x4 = torch.randn(16, 8, 128, 128).contiguous(memory_format=cl)
    y4 = (torch.rand(16, 8, 128, 128) > 0.5).float()
    return {
        "channels_last, contiguous target": (x4, y4, None),
        "channels_last, channels_last target": (x4, y4.contiguous(memory_format=cl), None),
        "bfloat16 (2048, 1000)": (torch.randn(shape).bfloat16(), (torch.rand(shape) > 0.5).bfloat16(), None),
        "float16 (2048, 1000)": (torch.randn(shape).half(), (torch.rand(shape) > 0.5).half(), None),
        "every other column of (2048, 2000)": (
            torch.randn(2048, 2000)[:, ::2], (torch.rand(2048, 2000) > 0.5).float()[:, ::2], None,
        ),
        "float32 input, float64 target": (torch.randn(shape), (torch.rand(shape) > 0.5).double(), None),
        "weight (64, 1, 400) on (64, 80, 400)": (
            torch.randn(64, 80, 400), (torch.rand(64, 80, 400) > 0.5).float(), torch.rand(64, 1, 400),
        ),
    }  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=9, help="timed calls per route and case (default 9)")
    reps = parser.parse_args(argv).reps
    if reps < 1:
        parser.error(f"--reps must be >= 1, got {reps}")
    print(f"{'input':40s} {'torch':>8s} {'ours':>8s} {'plain':>8s}   (ms, forward+backward)")
    for name, (x, y, w) in _cases().items():
        xg = x.detach().requires_grad_()
        t = _median_ms(lambda: F.binary_cross_entropy_with_logits(xg, y, w).backward(), reps)  # noqa: B023
        o = _median_ms(lambda: bcelogits.binary_cross_entropy_with_logits(xg, y, w).backward(), reps)  # noqa: B023
        with kernels.use("plain"):
            p = _median_ms(
                lambda: bcelogits.binary_cross_entropy_with_logits(xg, y, w).backward(),  # noqa: B023
                min(reps, 5),
            )
        print(f"{name:40s} {t:8.1f} {o:8.1f} {p:8.1f}")


if __name__ == "__main__":
    main()
