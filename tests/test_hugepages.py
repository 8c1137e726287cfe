"""Huge-page advice on the big CPU tensors the loss allocates (bcelogits.kernels._hugepages)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bcelogits
from bcelogits import kernels
from bcelogits.kernels import _hugepages as hp

MIB = 1 << 20


@pytest.fixture
def recorded(monkeypatch):
    """Advice switched on with a recording stand-in for libc's madvise."""
    calls = []

    def madvise(addr, length, advice):
        calls.append((addr, length, advice))
        return 0

    monkeypatch.setattr(hp, "_state", {"on": True, "madvise": madvise})
    return calls


def test_advice_covers_the_aligned_interior(recorded):
    base = 123 * hp._HUGE + 4096  # not 2 MiB-aligned
    assert hp.advise(base, 40 * MIB)
    ((lo, length, advice),) = recorded
    assert advice == 14  # MADV_HUGEPAGE
    assert lo % hp._HUGE == 0 and length % hp._HUGE == 0
    assert base <= lo < base + hp._HUGE  # the first whole huge page inside the buffer
    assert lo + length <= base + 40 * MIB < lo + length + hp._HUGE  # ... to the last one


def test_small_buffers_are_left_alone(recorded):
    assert not hp.advise(0, hp.MIN_BYTES - 1)
    assert recorded == []


def test_a_refused_call_turns_the_advice_off(monkeypatch):
    monkeypatch.setattr(hp, "_state", {"on": True, "madvise": lambda *a: -1})
    assert not hp.advise(0, 64 * MIB)
    assert not hp.enabled()


@pytest.mark.parametrize(
    "env, mode, want",
    [
        ("", "always [madvise] never\n", True),
        ("0", "always [madvise] never\n", False),
        ("", "[always] madvise never\n", False),  # the kernel does it without advice
        ("", "always madvise [never]\n", False),
    ],
)
def test_decided_by_the_thp_mode_and_the_environment(monkeypatch, tmp_path, env, mode, want):
    f = tmp_path / "enabled"
    f.write_text(mode)
    monkeypatch.setattr(hp, "_MODE_FILE", str(f))
    monkeypatch.setenv("BCELOGITS_HUGEPAGES", env)
    monkeypatch.setattr(hp, "_state", {})
    assert hp.enabled() is (want and hp.sys.platform.startswith("linux"))


def _covered(calls, t):
    """Was advice given on (the aligned interior of) tensor ``t``'s buffer?"""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(start <= lo and lo + n <= end and lo - start < hp._HUGE for lo, n, _ in calls)


def test_gradient_and_none_loss_are_advised(recorded):
    n = hp.MIN_BYTES // 4 + 1000  # float32: just over the threshold
    x = torch.randn(n, requires_grad=True)
    y = torch.rand(n)
    with kernels.use("cpu"):
        bcelogits.binary_cross_entropy_with_logits(x, y).backward()
        assert _covered(recorded, x.grad)
        recorded.clear()
        loss = bcelogits.binary_cross_entropy_with_logits(x.detach(), y, reduction="none")
        assert _covered(recorded, loss)
        # a 16-bit target is staged as a float32 copy: that copy is advised too
        recorded.clear()
        want = bcelogits.binary_cross_entropy_with_logits(x.detach(), y.half().float())
        got = bcelogits.binary_cross_entropy_with_logits(x.detach(), y.half())
        assert len(recorded) == 1
    assert got.dtype == torch.float16 and torch.equal(got, want.half())  # (the loss has the target dtype)


def test_small_calls_give_no_advice(recorded):
    x = torch.randn(1000, 100, requires_grad=True)
    bcelogits.binary_cross_entropy_with_logits(x, torch.rand(1000, 100)).backward()
    assert recorded == []


def _vm_flags(start, end):
    """VmFlags of the mappings that overlap [start, end), from /proc/self/smaps."""
    flags, cur = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                a, b = (int(v, 16) for v in head.split("-"))
                cur = a < end and b > start
            elif cur and line.startswith("VmFlags:"):
                flags.append(line.split()[1:])
    return flags


def test_real_advice_marks_the_mapping():
    """On a Linux in 'madvise' mode the kernel records the advice (the 'hg' VmFlag) on the gradient's
    memory; whether it then finds free huge pages is up to the machine, so that is not asserted."""
    hp._state.clear()
    if not hp.enabled():
        pytest.skip("no transparent huge pages in 'madvise' mode here (or BCELOGITS_HUGEPAGES=0)")
    t = torch.empty(hp.MIN_BYTES // 4, dtype=torch.float32)
    assert hp.advise(t.data_ptr(), hp.MIN_BYTES)
    lo = (t.data_ptr() + hp._HUGE - 1) & -hp._HUGE
    flags = _vm_flags(lo, lo + hp._HUGE)
    assert flags and all("hg" in f for f in flags)
    t.fill_(1.0)
    assert float(t.sum()) == hp.MIN_BYTES // 4
    np.testing.assert_array_equal(t[:3].numpy(), np.ones(3, np.float32))
