"""Transparent huge pages for the large CPU tensors the loss allocates itself (its gradient, its
'none' loss, the staged copies of 16-bit inputs).

A fresh tensor costs its first-touch page faults, one per 4 KiB page: on the benchmark machine that
made writing a new 64 MiB tensor take 25 ms, most of a fused forward+backward. With 2 MiB pages the
same write took 8-9 ms (84M float32 elements: 135 -> 36-40 ms). NumPy asks Linux for huge pages
(``madvise(MADV_HUGEPAGE)``) on every allocation of 4 MiB or more by default; torch's CPU allocator does
only with ``THP_MEM_ALLOC_ENABLE=1``. For the torch tensors it allocates, bcelogits does what NumPy does,
on allocations of at least :data:`MIN_BYTES`: advice on the 2 MiB-aligned interior of the buffer, given
before anything is written. Below 32 MiB glibc may serve an allocation from heap memory that is reused,
already faulted in; from 32 MiB on it always maps fresh memory, which is where the faults are.

Only on Linux with transparent huge pages in 'madvise' mode (in 'always' mode the kernel uses them
without advice; in 'never' mode it cannot). ``BCELOGITS_HUGEPAGES=0`` turns the advice off. It changes
no value: only how the memory is mapped.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: Allocations of at least this many bytes are advised.
MIN_BYTES = 32 << 20
_HUGE = 2 << 20  # the huge page size on x86-64 and arm64 (4 KiB base pages)
_MADV_HUGEPAGE = 14  # Linux
_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

_state: dict = {}  # "on": bool, decided once per process; "madvise": the libc function


def _decide() -> bool:
    if os.environ.get("BCELOGITS_HUGEPAGES", "").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        with open(_MODE_FILE) as f:
            if "[madvise]" not in f.read():
                return False
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    _state["madvise"] = fn
    return True


def enabled() -> bool:
    """Whether :func:`advise` gives advice in this process (decided on the first call)."""
    on = _state.get("on")
    if on is None:
        on = _state["on"] = _decide()
    return on


def advise(address: int, nbytes: int) -> bool:
    """Ask for huge pages on the 2 MiB-aligned interior of the ``nbytes`` at ``address`` (a buffer not
    yet written). True if the advice was given. Buffers under :data:`MIN_BYTES` are left alone; a
    refused call (a kernel without huge pages) turns the advice off for the process."""
    if nbytes < MIN_BYTES or not enabled():
        return False
    lo = (address + _HUGE - 1) & -_HUGE
    hi = (address + nbytes) & -_HUGE
    if hi <= lo:
        return False
    if _state["madvise"](lo, hi - lo, _MADV_HUGEPAGE) != 0:
        _state["on"] = False
        return False
    return True


def advise_tensor(t) -> None:
    """:func:`advise` for a fresh, contiguous CPU torch tensor (small ones are left alone first: this
    is on the path of every small call)."""
    nbytes = t.numel() * t.element_size()
    if nbytes >= MIN_BYTES and t.device.type == "cpu":
        advise(t.data_ptr(), nbytes)
