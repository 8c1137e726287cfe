"""Multi-label classification with missing labels: ``ignore_index`` instead of guessing them.

Real data sets are often partly labelled: an annotator answered some questions about an image and not
others. Filling the unanswered ones with 0 ("not present") teaches the model that they are absent;
``ignore_index`` leaves them out of the loss, its gradient and the mean's denominator.

The data: scikit-learn's 8x8 handwritten digits (1,797 images), each with four yes/no attributes of its
digit: even, at least 5, prime, drawn with a closed loop (0, 6, 8, 9). Of the training labels, 60 % are
hidden at random. Three small networks (64 -> 64 -> 4) are trained with ``bcelogits.BCEWithLogitsLoss``:

- every label known (the reference);
- the hidden labels filled with 0 (the common mistake);
- the hidden labels marked -1 with ``ignore_index=-1``;

and each attribute's recall and F1 on a fully labelled held-out quarter are printed and plotted.

    python examples/02_multilabel_missing_labels.py                # ~10 s on 2 cores, writes the plot
    python examples/02_multilabel_missing_labels.py --smoke --out /tmp/ml.png   # a few seconds

Needs ``pip install 'bcelogits[torch,examples]'`` (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import bcelogits

DOCS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
DEFAULT_OUT = os.path.join(DOCS, "example-02-missing-labels.png")
ATTRIBUTES = {
    "even": {0, 2, 4, 6, 8},
    ">= 5": {5, 6, 7, 8, 9},
    "prime": {2, 3, 5, 7},
    "loop": {0, 6, 8, 9},
}
MISSING = -1.0


def load(missing_rate: float, seed: int = 0):
    """Standardised pixels, the (N, 4) attribute targets, and a copy of the training targets with
    ``missing_rate`` of its entries replaced by ``MISSING``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, digit = load_digits(return_X_y=True)
    y = np.stack([np.isin(digit, sorted(s)) for s in ATTRIBUTES.values()], axis=1).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    hidden = np.random.default_rng(seed).random(y_tr.shape) < missing_rate
    y_partial = np.where(hidden, MISSING, y_tr).astype(np.float32)
    to = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return to((x_tr - mean) / std), to(y_tr), to(y_partial), to((x_te - mean) / std), to(y_te)


def train(x, y, steps: int, ignore_index=None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, y.shape[1]))
    criterion = bcelogits.BCEWithLogitsLoss(ignore_index=ignore_index)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    return model


def scores(model, x, y) -> dict:
    """Per attribute: (recall, F1) of the 0.5-probability threshold."""
    with torch.no_grad():
        predicted = (model(x) > 0).float()
    out = {}
    for j, name in enumerate(ATTRIBUTES):
        tp = float((predicted[:, j] * y[:, j]).sum())
        recall = tp / float(y[:, j].sum())
        precision = tp / max(float(predicted[:, j].sum()), 1.0)
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        out[name] = (recall, f1)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--missing", type=float, default=0.6, help="fraction of training labels hidden (0.6)")
    p.add_argument("--smoke", action="store_true", help="fewer steps (for the tests)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where to write the plot (PNG)")
    args = p.parse_args(argv)

    x_tr, y_full, y_partial, x_te, y_te = load(args.missing)
    steps = 150 if args.smoke else 500
    n_hidden = int((y_partial == MISSING).sum())
    print(f"{len(x_tr)} training images x {len(ATTRIBUTES)} attributes; {n_hidden} labels hidden "
          f"({n_hidden / y_partial.numel():.0%})")  # fmt: skip
    runs = {
        "every label known": train(x_tr, y_full, steps),
        "missing filled with 0": train(x_tr, torch.where(y_partial == MISSING, 0.0, y_partial), steps),
        "missing -> ignore_index=-1": train(x_tr, y_partial, steps, ignore_index=MISSING),
    }
    results = {name: scores(model, x_te, y_te) for name, model in runs.items()}
    print(f"{'held-out quarter':28}" + "".join(f"{a:>16}" for a in ATTRIBUTES))
    print(f"{'':28}" + "".join(f"{'recall  F1':>16}" for _ in ATTRIBUTES))
    for name, per in results.items():
        print(f"{name:28}" + "".join(f"{r:>10.3f}{f:6.3f}" for r, f in per.values()))
    plot(results, args.missing, args.out)
    print(f"wrote {args.out}")
    return {"results": results, "out": args.out}


def plot(results: dict, missing: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ATTRIBUTES)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    width = 0.8 / len(results)
    for k, (metric, ax) in enumerate(zip(("recall", "F1"), axes)):
        for i, (run, per) in enumerate(results.items()):
            xs = np.arange(len(names)) - 0.4 + width * (i + 0.5)
            ax.bar(xs, [per[n][k] for n in names], width * 0.9, label=run)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{metric} per attribute (held-out quarter)", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"digits, 4 attributes, {missing:.0%} of the training labels missing", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
