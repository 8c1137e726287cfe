"""Time the `bcelogits bench` CPU cells with the bcelogits of the running interpreter, for an A/B
comparison of two installs (e.g. the native core against the last numba commit in another venv):

    python benchmarks/ab_cells.py --json out_a.json   # in venv A
    python benchmarks/ab_cells.py --json out_b.json   # in venv B, then A again, ... (alternate)

Each cell (shape x weight config x mode) is timed ``--repeats`` times after a warm-up (the numba kernel
compiles or loads its cache there); the median in ms is printed and written as JSON. float32,
reduction='mean', torch's default thread count. Compare the medians of several alternated runs: the
machine is shared, and a single run's milliseconds are noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bcelogits

SHAPES = {"4096x1000": (4096, 1000), "1x16777216": (1, 2**24), "64x80x128x128": (64, 80, 128, 128)}


def cell(shape, config, mode, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    y = torch.rand(shape, generator=g)
    kw = {}
    if config == "weight":
        kw["weight"] = torch.rand(shape[-1], generator=g)
    elif config == "pos_weight":
        kw["pos_weight"] = torch.rand((shape[1],) + (1,) * (len(shape) - 2), generator=g) * 3
    f = bcelogits.binary_cross_entropy_with_logits
    if mode == "fwd+bwd":
        x.requires_grad_(True)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                f(x, y, **kw)
        else:
            x.grad = None
            f(x, y, **kw).backward()

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = {}
    for name in a.shapes.split(","):
        for config in ("none", "weight", "pos_weight"):
            for mode in ("fwd+bwd", "fwd"):
                reps = a.repeats if name != "64x80x128x128" else max(3, a.repeats // 2)
                ms = cell(SHAPES[name], config, mode, reps)
                out[f"{name} {config} {mode}"] = ms
                print(f"{name:>14} {config:>10} {mode:>8} {ms:9.2f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
