"""Data-parallel training with bcelogits on 2 CPU processes (gloo over 127.0.0.1):

1. the global mean: a multi-label classifier under DDP whose ranks ignore different numbers of labels;
   ``process_group=`` makes DDP's averaged gradient the gradient of the mean over all ranks' labels;
2. gradient accumulation: ``normalizer=`` with the step's denominator (``loss_denominator``), so that the
   micro-batches add up to the mean over the whole step (Hugging Face's ``num_items_in_batch`` recipe);
3. one SigLIP step: each rank scores its images against the texts of both ranks (``siglip_loss`` with
   ``process_group=``), the text features travelling between the ranks, never the N x N logits.

Run: ``python examples/05_distributed.py`` (about 10 s).
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bcelogits

WORLD = 2
IGNORE = -100.0


def step_global_mean(rank, group):
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = DDP(torch.nn.Linear(16, 8))
    criterion = bcelogits.BCEWithLogitsLoss(ignore_index=IGNORE, process_group=group)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(32, 16, generator=g)
    y = (torch.rand(32, 8, generator=g) > 0.7).float()
    y[: 8 * (1 + 3 * rank)] = IGNORE  # rank 1 ignores many more labels than rank 0
    loss = criterion(model(x), y)  # = this rank's sum * world size / all ranks' count of kept labels
    loss.backward()  # DDP averages: the gradient of the mean over every kept label of both ranks
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    if rank == 0:
        print(f"global mean over both ranks' kept labels: {float(mean) / WORLD:.6f}")


def step_accumulation(rank, group):
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(16, 8))
    g = torch.Generator().manual_seed(200 + rank)
    micro = []
    for k in range(3):
        y = (torch.rand(10, 8, generator=g) > 0.5).float()
        y[: 2 * k + rank] = IGNORE
        micro.append((torch.randn(10, 16, generator=g), y))
    # the step's denominator: every micro-batch, every rank (one all_reduce)
    count = sum(bcelogits.loss_denominator(y, ignore_index=IGNORE) for _, y in micro)
    dist.all_reduce(count, group=group)
    for k, (x, y) in enumerate(micro):
        sync = model.no_sync() if k < len(micro) - 1 else contextlib.nullcontext()
        with sync:  # (DDP reduces gradients on the last micro-batch only)
            loss = bcelogits.binary_cross_entropy_with_logits(
                model(x), y, ignore_index=IGNORE, normalizer=count, process_group=group
            )
            loss.backward()
    if rank == 0:
        print(f"accumulated 3 micro-batches x {WORLD} ranks over {int(count)} labels: global mean gradient")


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(32, 64)
        self.text = torch.nn.Linear(24, 64)
        self.log_scale = torch.nn.Parameter(torch.tensor(10.0).log())  # SigLIP's initial t = 10, b = -10
        self.bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.log_scale.exp(), self.bias)  # fmt: skip


def step_siglip(rank, group):
    torch.manual_seed(0)
    model = DDP(Towers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(300 + rank)
    images, texts = torch.randn(256, 32, generator=g), torch.randn(256, 24, generator=g)
    criterion = bcelogits.SigLIPLoss(process_group=group)
    loss = criterion(*model(images, texts))  # this rank's 256 images against all 512 texts, / 256
    loss.backward()
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=group)
    if rank == 0:
        print(f"SigLIP loss of the global batch of {WORLD * 256} pairs: {float(mean) / WORLD:.6f}")


def main(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        group = dist.group.WORLD
        step_global_mean(rank, group)
        step_accumulation(rank, group)
        step_siglip(rank, group)
        gc.collect()  # the DDP models of the steps are freed while their group still exists
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(main, args=(port,), nprocs=WORLD, join=False, start_method="spawn")
    deadline, done = time.monotonic() + 120, False
    try:
        while not done and time.monotonic() < deadline:
            done = ctx.join(timeout=max(deadline - time.monotonic(), 0.1))  # raises if a rank failed
    finally:
        for p in ctx.processes:  # a rank still running (hung, or its peer failed): stop it
            if p.is_alive():
                p.kill()
    sys.exit(0 if done else "the ranks did not finish within 120 s")
