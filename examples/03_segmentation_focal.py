"""Per-pixel segmentation with ``class_dim`` and ``focal_gamma``: which digit is each pixel of?

Each image is two of scikit-learn's 8x8 handwritten digits side by side (8x16 pixels, a little noise);
the target is an (N, 10, 8, 16) mask: channel c is 1 where the ink of a digit c is. Most pixels of a
channel are 0 (a class covers about 4 % of the pixels), the imbalance segmentation losses meet.

A small fully convolutional network is trained with ``bcelogits.BCEWithLogitsLoss`` three ways:

- plain BCE;
- ``pos_weight`` per class from ``pos_weight_from_targets(masks, class_dim=1)``, applied along the class
  dimension with ``class_dim=1`` (torch needs ``pos_weight.view(10, 1, 1)`` for that);
- the same with ``focal_gamma=2``, which down-weights the many easy background pixels.

Per-class intersection over union (IoU) on held-out images is printed, and a few predictions are drawn.

    python examples/03_segmentation_focal.py                 # ~20 s on 2 cores, writes the plot
    python examples/03_segmentation_focal.py --smoke --out /tmp/seg.png   # a few seconds

Needs ``pip install 'bcelogits[torch,examples]'`` (scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import bcelogits

DOCS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
DEFAULT_OUT = os.path.join(DOCS, "example-03-segmentation.png")
CLASSES = 10


def make_pairs(images, digits, n: int, rng):
    """``n`` images of two random digits side by side, and their (n, 10, 8, 16) masks."""
    left, right = rng.integers(0, len(images), n), rng.integers(0, len(images), n)
    x = np.concatenate([images[left], images[right]], axis=2)  # (n, 8, 16), ink in [0, 1]
    masks = np.zeros((n, CLASSES, 8, 16), np.float32)
    ink = x > 0.3
    rows = np.arange(n)
    masks[rows, digits[left], :, :8] = ink[:, :, :8]
    masks[rows, digits[right], :, 8:] = ink[:, :, 8:]
    x = x + rng.normal(0.0, 0.1, x.shape)
    return torch.as_tensor(x[:, None], dtype=torch.float32), torch.as_tensor(masks)


def load(n_train: int, n_test: int, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, digits = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8) / 16.0
    im_tr, im_te, d_tr, d_te = train_test_split(images, digits, test_size=0.25, random_state=seed)
    rng = np.random.default_rng(seed)
    return make_pairs(im_tr, d_tr, n_train, rng) + make_pairs(im_te, d_te, n_test, rng)


def network() -> torch.nn.Module:
    """Dilated 3x3 convolutions: a receptive field of 15 pixels, enough to see a whole digit."""
    c = 32
    layers, channels = [], 1
    for dilation in (1, 2, 4):
        layers += [torch.nn.Conv2d(channels, c, 3, padding=dilation, dilation=dilation), torch.nn.ReLU()]
        channels = c
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(c, CLASSES, 1))


def train(x, masks, criterion, steps: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = network()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=g)
        optimizer.zero_grad()
        criterion(model(x[batch]), masks[batch]).backward()
        optimizer.step()
    return model


def iou_per_class(model, x, masks) -> np.ndarray:
    with torch.no_grad():
        predicted = model(x) > 0
    truth = masks > 0.5
    inter = (predicted & truth).sum((0, 2, 3)).double()
    union = (predicted | truth).sum((0, 2, 3)).double()
    return (inter / union.clamp(min=1)).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="fewer images and steps (for the tests)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where to write the plot (PNG)")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    x_tr, m_tr, x_te, m_te = load(*((512, 128) if args.smoke else (4096, 512)))
    steps = 60 if args.smoke else 600
    pos_weight = bcelogits.pos_weight_from_targets(m_tr, class_dim=1)  # (10,): negatives / positives
    print(f"{len(x_tr)} training images of 8x16 pixels, {CLASSES} classes; positive pixels per class "
          f"{float(m_tr.mean()):.1%}; pos_weight_from_targets -> "
          f"{float(pos_weight.min()):.0f}..{float(pos_weight.max()):.0f}")  # fmt: skip
    criteria = {
        "plain BCE": bcelogits.BCEWithLogitsLoss(),
        "pos_weight, class_dim=1": bcelogits.BCEWithLogitsLoss(pos_weight=pos_weight, class_dim=1),
        "pos_weight + focal_gamma=2": bcelogits.BCEWithLogitsLoss(
            pos_weight=pos_weight, class_dim=1, focal_gamma=2.0
        ),
    }
    models = {name: train(x_tr, m_tr, criterion, steps) for name, criterion in criteria.items()}
    ious = {name: iou_per_class(model, x_te, m_te) for name, model in models.items()}
    print(f"{'held-out IoU':28}" + "".join(f"{c:>6}" for c in range(CLASSES)) + "   mean")
    for name, iou in ious.items():
        print(f"{name:28}" + "".join(f"{v:6.2f}" for v in iou) + f"{iou.mean():7.3f}")
    plot(models, x_te, m_te, ious, args.out)
    print(f"wrote {args.out}")
    return {"iou": ious, "out": args.out}


def _label_map(masks: torch.Tensor) -> np.ndarray:
    """(10, H, W) scores -> (H, W) class of the highest score where it is positive, else -1."""
    best = masks.max(0)
    return np.where(best.values.numpy() > 0, best.indices.numpy(), -1)


def plot(models: dict, x, masks, ious: dict, path: str, shown: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#ffffff"] + [plt.get_cmap("tab10")(i) for i in range(CLASSES)])
    rows = ["input", "truth"] + list(models)
    fig, axes = plt.subplots(len(rows), shown, figsize=(1.9 * shown + 1.5, 1.1 * len(rows) + 0.6))
    with torch.no_grad():
        logits = {name: model(x[:shown]) for name, model in models.items()}
    for j in range(shown):
        axes[0, j].imshow(x[j, 0].numpy(), cmap="gray_r")
        axes[1, j].imshow(_label_map(masks[j] - 0.5) + 1, cmap=cmap, vmin=0, vmax=CLASSES)
        for i, name in enumerate(models, start=2):
            axes[i, j].imshow(_label_map(logits[name][j]) + 1, cmap=cmap, vmin=0, vmax=CLASSES)
    for i, name in enumerate(rows):
        label = name if name not in ious else f"{name}\nmean IoU {ious[name].mean():.2f}"
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("digit of each pixel (colour = class; white = no class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
