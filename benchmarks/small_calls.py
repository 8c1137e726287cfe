"""Per-call time on small inputs, where Python overhead, not the kernel, decides: bcelogits against
torch for evaluation (``torch.no_grad()``) and for a training step (loss + backward). This produced the
"Small inputs" numbers in the README and docs/performance.md.

    python benchmarks/small_calls.py [--shapes 64x1,256x10,256x100,256x1000] [--calls 300] [--rounds 7]
                                     [--evict MB] [--threads N]

Each round times ``--calls`` back-to-back calls of each of the four functions (ours and torch's, no_grad
and fwd+bwd), one after the other; the table has the medians over rounds, in microseconds per call, and
the medians of the per-round ratios ours / torch (below 1: ours is faster).
float32, reduction='mean', no weights: the call the library's short route serves.

``--evict MB`` writes a buffer of that many MiB before every call (outside the timing), as a model's
own forward and backward would between two loss calls: the call then starts with its code, its Python
objects and its inputs out of the caches, which costs a Python library more than torch's C++ path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bcelogits


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.lower().split("x"))


def measure(shape: tuple[int, ...], calls: int, rounds: int, evict_mib: int = 0) -> dict[str, float]:
    """Median microseconds per call of ours / torch's, no_grad / forward+backward, on ``shape``, and the
    medians of the per-round ratios ("fwd ratio", "fwd+bwd ratio"); with ``evict_mib``, a buffer of that
    size is written before each call, outside the timing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    y = torch.rand(shape, generator=g)
    junk = torch.empty(evict_mib << 18) if evict_mib else None  # float32: 2**18 per MiB

    def step(fn):
        def run():
            fn(x, y).backward()

        return run

    def evaluate(fn):
        def run():
            with torch.no_grad():
                fn(x, y)

        return run

    ours, theirs = bcelogits.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    fns = {"ours fwd": evaluate(ours), "ours fwd+bwd": step(ours)}
    fns |= {"torch fwd": evaluate(theirs), "torch fwd+bwd": step(theirs)}
    for fn in fns.values():  # warm-up (and the kernel's compile or cache load)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if junk is None:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
                continue
            spent = 0.0
            for _ in range(calls):
                junk.fill_(1.0)
                t0 = time.perf_counter()
                fn()
                spent += time.perf_counter() - t0
            times[name].append(spent / calls * 1e6)
    out = {k: statistics.median(v) for k, v in times.items()}
    for kind in ("fwd", "fwd+bwd"):
        ratios = [a / b for a, b in zip(times[f"ours {kind}"], times[f"torch {kind}"])]
        out[f"{kind} ratio"] = statistics.median(ratios)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="64x1,256x10,256x100,256x1000", help="comma-separated, e.g. 64x10")
    p.add_argument("--calls", type=int, default=300, help="calls per round (default 300)")
    p.add_argument("--rounds", type=int, default=7, help="rounds; the medians are reported (default 7)")
    p.add_argument("--evict", type=int, default=0, metavar="MB", help="write MB MiB before each call")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) first (default: as is)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    evict = f", {a.evict} MiB written before each call" if a.evict else ""
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; µs per call, medians of {a.rounds}{evict}")
    print()
    print("| shape | elements | ours fwd | torch fwd | ratio | ours fwd+bwd | torch fwd+bwd | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for text in a.shapes.split(","):
        shape = _shape(text)
        m = measure(shape, a.calls, a.rounds, a.evict)
        n = 1
        for d in shape:
            n *= d
        cols = [f"{m[k]:.0f}" for k in ("ours fwd", "torch fwd")] + [f"{m['fwd ratio']:.2f}"]
        cols += [f"{m[k]:.0f}" for k in ("ours fwd+bwd", "torch fwd+bwd")] + [f"{m['fwd+bwd ratio']:.2f}"]
        print(f"| {text} | {n} | " + " | ".join(cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
