"""Command line: ``bcelogits compare`` (accuracy vs torch) and ``bcelogits bench`` (speed vs torch)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from decimal import Decimal, getcontext

DESCRIPTION = """\
bcelogits: an exact, fused BCEWithLogitsLoss for PyTorch and NumPy.

  bcelogits compare   our values vs torch's vs the exact ones, where torch is wrong
  bcelogits bench     speed, memory and error vs torch, interleaved in one process
"""

# (label, quantity, logit, target, pos_weight, dtype name)
CASES = [
    ("confident right answer, y=0", "loss", -20.0, 0.0, None, "float32"),
    ("confident right answer, y=0", "loss", -60.0, 0.0, None, "float32"),
    ("confident right answer, y=1", "grad", 20.0, 1.0, None, "float32"),
    ("pos_weight=0.1", "grad", 20.0, 1.0, 0.1, "float32"),
    ("pos_weight=0.001", "grad", 10.0, 1.0, 0.001, "float32"),
    ("pos_weight=0.001", "loss", 3.0, 1.0, 0.001, "float32"),
    ("pos_weight=1e6, far tail", "loss", 95.0, 1.0, 1e6, "float32"),
    ("confident right answer, y=0", "loss", -40.0, 0.0, None, "float64"),
    ("bfloat16 logits, y=0", "loss", -4.1875, 0.0, None, "bfloat16"),
    ("float16 logits, y=0", "loss", -6.23828125, 0.0, None, "float16"),
    ("logit +inf, y=1", "loss", math.inf, 1.0, None, "float32"),
    ("logit -inf, y=0", "loss", -math.inf, 0.0, None, "float32"),
    ("logit -inf, y=1", "loss", -math.inf, 1.0, None, "float32"),
]


def exact(quantity: str, x: float, y: float, p: float | None) -> float:
    """The true value from the definition, in 60-digit decimal arithmetic (independent of our code)."""
    p = 1.0 if p is None else p
    if math.isinf(x):  # limits, by hand: softplus(+inf) = inf, softplus(-inf) = 0, sigma(+inf) = 1
        right = (x > 0 and y == 1.0) or (x < 0 and y == 0.0)
        if quantity == "loss":
            return 0.0 if right else math.inf
        return 0.0 if right else (1.0 - y if x > 0 else -p * y)
    getcontext().prec = 60
    X, Y, P = Decimal(x), Decimal(y), Decimal(p)
    if quantity == "loss":
        sp_pos = (1 + X.exp()).ln()
        sp_neg = (1 + (-X).exp()).ln()
        return float((1 - Y) * sp_pos + P * Y * sp_neg)
    return float((1 - Y) / (1 + (-X).exp()) - P * Y / (1 + X.exp()))


def _evaluate(fn, quantity, x, y, p, dtype):
    import torch

    dt = getattr(torch, dtype)
    xt = torch.tensor([x], dtype=dt, requires_grad=True)
    yt = torch.tensor([y], dtype=dt)
    pt = None if p is None else torch.tensor([p], dtype=dt)
    loss = fn(xt, yt, pos_weight=pt, reduction="sum")
    if quantity == "loss":
        return float(loss.detach())
    loss.backward()
    return float(xt.grad)


def _rel(got: float, want: float) -> str:
    if math.isnan(got):
        return "NaN"
    if got == want:
        return "0"
    if math.isinf(want) or math.isinf(got) or want == 0:
        return "wrong"
    err = abs(got - want) / abs(want)
    sign = " (sign!)" if got * want < 0 else ""
    return f"{err:.0e}{sign}" if err < 10 else f"{err:.0f}x{sign}"


def compare(_args) -> int:
    try:
        import torch
    except ImportError:
        print("bcelogits compare needs PyTorch: pip install 'bcelogits[torch]'", file=sys.stderr)
        return 2
    import bcelogits

    rows = []
    for label, q, x, y, p, dtype in CASES:
        # Round the inputs to the dtype first: the exact value is that of the numbers actually passed.
        xr = float(torch.tensor(x, dtype=getattr(torch, dtype)))
        yr = float(torch.tensor(y, dtype=getattr(torch, dtype)))
        pr = None if p is None else float(torch.tensor(p, dtype=getattr(torch, dtype)))
        want = exact(q, xr, yr, pr)
        t = _evaluate(torch.nn.functional.binary_cross_entropy_with_logits, q, xr, yr, pr, dtype)
        b = _evaluate(bcelogits.binary_cross_entropy_with_logits, q, xr, yr, pr, dtype)
        pw = "" if p is None else f", p={p:g}"
        rows.append(
            (
                f"{label} ({dtype}{pw})",
                f"{q} at x={xr:g}",
                f"{want:.6g}",
                f"{t:.6g}",
                f"{b:.6g}",
                _rel(t, want),
                _rel(b, want),
            )
        )
    head = ("case", "value", "exact", "torch", "bcelogits", "torch rel.err", "ours rel.err")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(f"bcelogits {bcelogits.__version__} vs torch {torch.__version__}; exact = 60-digit decimal")
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\n16-bit results are computed in float32 and rounded once.")
    print("'wrong' = an infinite or zero value where the exact one is finite and nonzero, or vice versa.")
    return 0


def bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    import bcelogits

    parser = argparse.ArgumentParser(
        prog="bcelogits", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bcelogits {bcelogits.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="our values vs torch's vs the exact ones where torch is wrong")
    p.set_defaults(func=compare)
    p = sub.add_parser("bench", help="speed and memory vs torch, interleaved in one process")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (about 20 s)")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu (default; the fused native kernel) or cuda (the Triton kernel; other sizes)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the speed-ups as a chart")
    p.add_argument("--csv", metavar="FILE.csv", help="also write the rows as CSV")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per cell, exactly (median reported). Default: at least 5, and more until a "
        "cell has measured for 2 s (at most 60); 3 with --quick",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated sizes instead of the defaults: element counts (16M, 1e6, 2**28; N becomes "
        "shape (N/1024, 1024) when 1024 divides it) or shapes (1x16777216, 64x80x128x128)",
    )
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`bcelogits compare | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so exit's flush cannot fail)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
