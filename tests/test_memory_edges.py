"""Peak memory of the 'none' backward with a broadcast upstream gradient (``loss.sum().backward()``), and
that its fast route gives the same bits as an explicit upstream gradient.

Peak memory is read in a fresh process: the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) around one forward+backward, in input-sized tensors. torch needs 2 (the loss and
the gradient); the 'none' backward used to make the expanded grad_output contiguous, a third.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import bcelogits

_SCRIPT = r"""
import sys, torch, bcelogits
n = 1 << 23
x = torch.randn(n, requires_grad=True); y = torch.rand(n)
bcelogits.binary_cross_entropy_with_logits(x[:10], y[:10], reduction="none").sum().backward()  # (warm)
x.grad = None
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
loss = bcelogits.binary_cross_entropy_with_logits(x, y, reduction="none")
loss.sum().backward()
print((status("VmHWM") - base) / (4 * n))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_none_then_sum_backward_peaks_at_two_input_sized_tensors():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = float(out.stdout.split()[-1])
    assert peak < 2.5, f"peak {peak:.2f} input-sized tensors (torch: 2)"


@pytest.mark.parametrize("backend", ["plain", "cpu"])
@pytest.mark.parametrize(
    "options", [{}, {"ignore_index": 0.0}, {"label_smoothing": 0.1, "focal_gamma": 2.0}], ids=str
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_broadcast_grad_output_gives_the_bits_of_an_explicit_one(backend, options, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = (torch.rand(3, 4, 5, 6, generator=g) > 0.5).float()
    w, p = torch.rand(6, generator=g), torch.rand(6, generator=g) * 3
    with bcelogits.kernels.use(backend):
        loss = bcelogits.binary_cross_entropy_with_logits(x, y, w, reduction="none", pos_weight=p, **options)
        (broadcast,) = torch.autograd.grad(loss.sum() * 3.0, x, retain_graph=True)
        (explicit,) = torch.autograd.grad(loss, x, torch.full(x.shape, 3.0))
    assert torch.equal(broadcast, explicit)
    assert broadcast.stride() == explicit.stride()
