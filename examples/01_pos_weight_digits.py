"""pos_weight trades precision for recall: one digit against the rest of scikit-learn's digits.

torch's documentation says that ``pos_weight > 1`` raises recall and ``pos_weight < 1`` raises precision.
This example shows it on real, imbalanced data: the 8x8 handwritten digits that scikit-learn ships
(1,797 images), with one digit as the positive class against the nine others (about 1 positive in 10).
A logistic regression (one linear layer on the 64 pixels) is trained once per ``pos_weight`` with
``bcelogits.BCEWithLogitsLoss``, and precision and recall on a held-out quarter are plotted against
``pos_weight``. ``bcelogits.pos_weight_from_targets`` gives the balancing value, negatives / positives.

    python examples/01_pos_weight_digits.py                 # ~10 s on 2 cores, writes the plot
    python examples/01_pos_weight_digits.py --smoke --out /tmp/pr.png   # a few seconds (the tests run it)

Needs ``pip install 'bcelogits[torch,examples]'`` (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import bcelogits

DOCS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
DEFAULT_OUT = os.path.join(DOCS, "example-01-pos-weight.png")


def load(digit: int, seed: int = 0):
    """Standardised pixels and 0/1 targets (1 = ``digit``), split 3:1, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, labels = load_digits(return_X_y=True)
    y = (labels == digit).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    to = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return to((x_tr - mean) / std), to(y_tr), to((x_te - mean) / std), to(y_te)


def train(x, y, pos_weight: float, steps: int, seed: int = 0) -> torch.nn.Module:
    """Full-batch logistic regression with a small L2 penalty (so that the classes are not separated
    perfectly and the trade-off is visible)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    criterion = bcelogits.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = criterion(model(x).squeeze(1), y)
        loss.backward()
        optimizer.step()
    return model


def precision_recall(model, x, y) -> tuple[float, float]:
    """Precision and recall of the 0.5-probability threshold on ``x``."""
    with torch.no_grad():
        predicted = model(x).squeeze(1) > 0  # logit > 0 <=> probability > 0.5
    tp = float((predicted & (y == 1)).sum())
    n_predicted = float(predicted.sum())
    precision = tp / n_predicted if n_predicted else float("nan")  # (no positive predicted: undefined)
    return precision, tp / float((y == 1).sum())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digit", type=int, default=8, help="the positive class (default 8, one of the hardest)")
    p.add_argument("--smoke", action="store_true", help="fewer weights and steps (for the tests)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where to write the plot (PNG)")
    args = p.parse_args(argv)

    x_tr, y_tr, x_te, y_te = load(args.digit)
    balancing = float(bcelogits.pos_weight_from_targets(y_tr)[0])  # negatives / positives, ~9 here
    weights = [0.1, 1.0, balancing] if args.smoke else [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, balancing, 20.0, 50.0]
    weights = sorted(set(weights))
    steps = 150 if args.smoke else 400
    print(f"digit {args.digit} vs the rest: {int(y_tr.sum())} positives of {len(y_tr)} training images; "
          f"pos_weight_from_targets -> {balancing:.2f}")  # fmt: skip
    print(f"{'pos_weight':>10} {'precision':>9} {'recall':>6}")
    results = {}
    for w in weights:
        precision, recall = precision_recall(train(x_tr, y_tr, w, steps), x_te, y_te)
        results[w] = (precision, recall)
        print(f"{w:10.2f} {precision:9.3f} {recall:6.3f}")
    plot(results, balancing, args.digit, args.out)
    print(f"wrote {args.out}")
    return {"balancing": balancing, "results": results, "out": args.out}


def plot(results: dict, balancing: float, digit: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(w, [results[k][0] for k in w], "o-", label="precision")
    ax.plot(w, [results[k][1] for k in w], "s-", label="recall")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="pos_weight = 1 (plain BCE)")
    ax.axvline(balancing, color="#2ca02c", ls=":", lw=1.5, label=f"pos_weight_from_targets = {balancing:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("pos_weight (log scale)")
    ax.set_ylabel("on the held-out quarter")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"scikit-learn digits: '{digit}' vs the rest (~1:9), logistic regression", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
