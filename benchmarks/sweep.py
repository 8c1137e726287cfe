"""A longer sweep than ``bcelogits bench``: sizes 2**16..2**26, 1 and 2 threads, float32 and float64.

Each cell is measured by :func:`bcelogits.bench.run` (torch and bcelogits interleaved in one process,
medians of same-round ratios). Writes ``<out>.csv`` and ``<out>.png`` (speed-up against size, one panel per
mode and dtype, a line per configuration and thread count)::

    python benchmarks/sweep.py                       # the whole grid (tens of minutes on 2 cores)
    python benchmarks/sweep.py --max-log2 22 --dtypes float32 --out /tmp/sweep
    python benchmarks/sweep.py --memory              # also peak memory (a subprocess per cell and library)

Shapes are (n / 1024, 1024); pos_weight has one entry per column (1024 classes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bcelogits import bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-log2", type=int, default=16, help="smallest size, as a power of 2 (default 16)")
    p.add_argument("--max-log2", type=int, default=26, help="largest size, as a power of 2 (default 26)")
    p.add_argument("--step", type=int, default=2, help="step between powers of 2 (default 2)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=None, help="thread counts (default 1 and all cores)"
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--configs", nargs="+", default=["none", "pos_weight"], choices=list(bench.CONFIGS))
    p.add_argument("--modes", nargs="+", default=list(bench.MODES), choices=list(bench.MODES))
    p.add_argument("--repeats", type=int, default=5, help="rounds per cell (median reported; default 5)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per cell after 3 rounds (default 20)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (slower)")
    p.add_argument(
        "--out", default="sweep", help="output prefix: writes OUT.csv and OUT.png (default ./sweep)"
    )
    return p.parse_args(argv)


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = [m for m in bench.MODES if any(r.mode == m for r in rows)]
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    threads = sorted({r.threads for r in rows})
    kinds = list(dict.fromkeys(r.config.split(" (")[0] for r in rows))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(
        len(modes),
        len(dtypes),
        figsize=(6.0 * len(dtypes), 3.8 * len(modes)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for kind in kinds:
                for k, t in enumerate(threads):
                    pts = sorted(
                        (r.numel, r.speedup)
                        for r in rows
                        if r.mode == mode
                        and r.dtype == dtype
                        and r.threads == t
                        and r.config.split(" (")[0] == kind
                    )
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs,
                        ys,
                        styles[k % len(styles)],
                        marker="o",
                        ms=4,
                        color=bench._color(kind),
                        label=f"{kind}, {t} thread{'s' if t > 1 else ''}",
                    )
                    ax.annotate(
                        f"{ys[-1]:.2f}x",
                        (xs[-1], ys[-1]),
                        xytext=(4, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=8,
                    )
            ax.axhline(1.0, ls="--", color="k", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{mode}, {dtype}")
            if i == len(modes) - 1:
                ax.set_xlabel("elements")
            if j == 0:
                ax.set_ylabel("speed-up vs torch (> 1: bcelogits faster)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def table(rows) -> str:
    head = "| size | dtype | threads | config | mode | torch ms | ours ms | speed-up | ours/floor | backend |"
    out = [head, "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        floor = "" if r.bcelogits_over_floor is None else f"{r.bcelogits_over_floor:.1f}x"
        out.append(
            f"| {r.size} | {r.dtype} | {r.threads} | {r.config} | {r.mode} | {bench._ms(r.torch_ms)} | "
            f"{bench._ms(r.bcelogits_ms)} | {r.speedup:.2f}x | {floor} | {r.backend} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    shapes = [(2**k // 1024, 1024) for k in range(args.min_log2, args.max_log2 + 1, args.step)]
    t0 = time.perf_counter()
    rows, notes = [], []
    for dtype in args.dtypes:
        cells = bench.make_cells(shapes, args.configs, args.modes, dtype)
        for t in threads:
            print(f"{dtype}, {t} thread(s): {len(cells)} cells", file=sys.stderr)
            res = bench.run(cells, args.repeats, memory=args.memory, threads=t, budget_s=args.budget)
            rows += res.rows
            notes += [n for n in res.notes if n not in notes]
            if res.interrupted:
                break
        else:
            continue
        break
    machine = bench.machine_line()
    print(f"machine: {machine}")
    for n in notes:
        print(f"note: {n}")
    print(table(rows))
    print(f"\n{len(rows)} cells in {time.perf_counter() - t0:.0f} s")
    bench.write_csv(rows, f"{args.out}.csv", machine)
    print(f"wrote {args.out}.csv")
    try:
        plot(rows, f"{args.out}.png", f"bcelogits vs torch BCEWithLogits, reduction='mean'\n{machine}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'bcelogits[bench]')", file=sys.stderr)
        return 1
    print(f"wrote {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
