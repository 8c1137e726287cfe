"""Extreme multi-label classification with a fused linear + BCE head and sparse targets.

A synthetic XMC-like task (made here, no download): documents are bags of word ids; each of C labels is
tied to a few "topic" words, and a document's labels are those whose topic words it contains (a handful
per document, power-law label frequencies, as in real XMC data). The model is an embedding bag and a
linear classifier over all C labels; its loss is ``bcelogits.LinearBCEWithLogitsLoss``, fed the
classifier's weight and bias and a sparse CSR target, so the (batch, C) logits never exist.

    PYTHONPATH=src python examples/04_extreme_multilabel.py            # C = 100,000 labels, ~30 s on 2 cores
    PYTHONPATH=src python examples/04_extreme_multilabel.py --smoke    # tiny, a few seconds
"""

from __future__ import annotations

import argparse
import time

import torch

import bcelogits


def synthetic_batch(gen, batch, vocab, n_labels, label_words, words_per_doc=40):
    """(word ids (batch, words), CSR target (batch, n_labels)): each document draws ``words_per_doc``
    words, a few of them the topic words of labels drawn with Zipf-like frequencies."""
    ranks = torch.arange(1, n_labels + 1, dtype=torch.float64)
    label_p = 1.0 / ranks
    n_pos = torch.randint(1, 10, (batch,), generator=gen)  # 1..9 labels per document (~5 on average)
    crow = torch.zeros(batch + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(n_pos, 0)
    cols, words = [], torch.randint(0, vocab, (batch, words_per_doc), generator=gen)
    for i, k in enumerate(n_pos.tolist()):
        labels = torch.multinomial(label_p, k, generator=gen).sort().values
        cols.append(labels)
        words[i, : 2 * k] = label_words[labels].reshape(-1)  # the labels' topic words appear
    col = torch.cat(cols)
    target = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), (batch, n_labels))
    return words, target


class XMCModel(torch.nn.Module):
    def __init__(self, vocab, dim, n_labels):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocab, dim, mode="mean")
        self.proj = torch.nn.Linear(dim, dim)
        self.classifier = torch.nn.Linear(dim, n_labels)  # only its parameters are used: no logits
        self.loss = bcelogits.LinearBCEWithLogitsLoss()

    def features(self, words):
        return torch.relu(self.proj(self.embed(words)))

    def forward(self, words, target):
        return self.loss(self.features(words), self.classifier.weight, target, self.classifier.bias)


def main(smoke: bool = False, verbose: bool = True, steps: int | None = None):
    """Train for a few steps; returns the losses (one per step)."""
    n_labels, vocab, dim, batch = (1_000, 2_000, 16, 32) if smoke else (100_000, 50_000, 128, 256)
    steps = steps or (10 if smoke else 40)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    label_words = torch.randint(0, vocab, (n_labels, 2), generator=gen)
    model = XMCModel(vocab, dim, n_labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # A fixed pool of batches, cycled: the loss falls as the model learns the label-word ties.
    pool = [synthetic_batch(gen, batch, vocab, n_labels, label_words) for _ in range(4)]
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        words, target = pool[step % len(pool)]
        loss = model(words, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if verbose and (step % 5 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.6f}  ({time.perf_counter() - t0:.1f} s)")
    if verbose:
        full = batch * n_labels * 4 / 2**20
        print(f"C = {n_labels} labels: unfused logits: {full:.0f} MiB a batch (their gradient as much)")
    return losses


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args()
    main(smoke=a.smoke, steps=a.steps)
