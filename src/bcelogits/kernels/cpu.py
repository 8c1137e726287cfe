r"""Fused one-pass CPU kernel for the exact BCE-with-logits loss: the Python side of the native core.

One pass over ``x, y`` (plus the optional weight, pos_weight and upstream gradient) produces the loss
sum, the element losses and the gradient together. The kernel itself is C (``native/bce_kernel.c``, its
docstring-comment states the algorithm: the formulas of :mod:`bcelogits._math` with branch-free
``exp``/``log1p``, blocks of :data:`BLOCK` elements computed in parts of :data:`SUB` with the next block
prefetched, float64 block partials), built by the package's own build into one shared library and
called through ctypes: one call into the core per loss call (:func:`_launch`), which releases the GIL.
Nothing is compiled at run time.

Results are bitwise identical on every dispatch target (baseline x86-64, x86-64-v3, x86-64-v4: see
:mod:`._native`) and for every thread count: the element math is scalar C with explicit fma and no
contraction or reassociation, and the block sums have a fixed lane order and are added in a fixed order.

Work split: a call runs on up to ``torch.get_num_threads()`` threads (capped by
``BCELOGITS_NUM_THREADS`` if set, else by the CPUs the process may use; the same count without torch).
For torch tensors they are torch's own OpenMP threads (the core is handed ``GOMP_parallel`` of the
libgomp in torch's directory): after each torch operator they keep spinning for a few milliseconds, and
would otherwise compete with ours for the cores. For NumPy arrays the core starts its own threads for
the call and joins them before returning (a process that has used an OpenMP team cannot use it again in
a forked child, and NumPy work must not leave a process that merely imported torch in that state).
Nothing of a call outlives it: a Ctrl-C arrives when the call has returned, and a forked child finds no
thread of ours. Threads claim runs of blocks (see :func:`_chunk`) from a shared atomic counter, so a
thread that is slowed down does less of the work instead of holding the call up.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading

import numpy as np

from . import _native

__all__ = ["available", "forward", "forward_contiguous", "backward_none", "unavailable_reason", "BLOCK"]

#: Elements per block: the unit of work of a thread and of a partial sum (BCE_BLOCK of the core).
BLOCK = 4096
#: Elements of a block computed between two groups of prefetches (BCE_SUB of the core).
SUB = 256
# Weight patterns whose period (len * inner) is at most this are expanded once per call.
_EXT_MAX = 16384
# Another thread is used only when each gets at least this many blocks.
_MIN_BLOCKS_PER_THREAD = 8

#: Why the kernel cannot be used: "" while it can (or before :func:`available` has been asked).
unavailable_reason: str = ""

Uses, Mode, Flags, DType = _native.Uses, _native.Mode, _native.Flags, _native.DType
_lock = threading.RLock()
_state: dict = {}  # "lib": the loaded _native.Library (None when it cannot load), "run", "target"


def available() -> bool:
    """True if the native core is loaded (loading it on the first call). Never raises (but for a bad
    ``BCELOGITS_CPU_TARGET``, ValueError); the result is remembered; when False the reason is in
    :data:`unavailable_reason`, and the dispatcher warns once and serves calls on the plain path."""
    if "lib" not in _state:
        _load()
    return _state["lib"] is not None


def _load() -> None:
    global unavailable_reason
    with _lock:
        if "lib" in _state:
            return
        try:
            lib = _native.load()
        except OSError as exc:
            unavailable_reason = str(exc)
            _state["lib"] = None
            return
        _state.update(lib=lib, run=lib.run, target=int(lib.target))
        unavailable_reason = ""


def target() -> str:
    """The dispatch target calls run on ("baseline", "x86-64-v3", "x86-64-v4"), or "" if unavailable."""
    return _native.TARGET_NAMES[_state["target"]] if available() else ""


# Plain ints of the enums the short route uses (an IntEnum's arithmetic costs microseconds).
_MODE_LOSS, _MODE_LOSS_GRAD = int(Mode.MODE_LOSS), int(Mode.MODE_LOSS_GRAD)
_FLAG_LOSS_SUM = int(Flags.FLAG_LOSS_SUM)


def _dtype_code(dt) -> int:
    return DType.DTYPE_FLOAT64 if dt == np.float64 else DType.DTYPE_FLOAT32


# ---- argument handling --------------------------------------------------------------------------
_CONSTS: dict = {}
_CONST_ADDRESSES: dict = {}


def _consts(dt):
    """(ones(1), empty) of dtype ``dt``, kept for the process: the weight of an unweighted call and the
    stand-in for an absent array (the kernel never writes either)."""
    c = _CONSTS.get(dt)
    if c is None:
        c = _CONSTS[dt] = (np.ones(1, dt), np.empty(0, dt))
        _CONST_ADDRESSES.update((id(a), a.ctypes.data) for a in c)
    return c


# (address of ones(1), address of the empty array) per dtype, indexed by "is float64"
_CONST_PTRS = tuple((_consts(d)[0].ctypes.data, _consts(d)[1].ctypes.data) for d in map(np.dtype, "fd"))


def _dtype_of(a):
    """The NumPy dtype of a float32/float64 NumPy array or CPU torch tensor, else None."""
    if isinstance(a, np.ndarray):
        return a.dtype if a.dtype in (np.float32, np.float64) else None
    if hasattr(a, "data_ptr"):  # a torch tensor (torch itself is never imported here)
        d = a.dtype
        if d.is_floating_point and d.itemsize in (4, 8):  # the only such torch dtypes: float32, float64
            return np.dtype(np.float32 if d.itemsize == 4 else np.float64)
    return None


def _span(name, a, dt, n, writable=False):
    """``(start, end)`` data addresses of ``a``: a 1-D C-contiguous NumPy array or a contiguous CPU torch
    tensor (any shape: read flat) of dtype ``dt`` and ``n`` elements. A tensor's address comes from
    ``data_ptr()``: converting it to a NumPy array and asking that for its address costs about 5 us."""
    if isinstance(a, np.ndarray):
        if a.ndim != 1 or a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected a 1-D C-contiguous {dt} numpy array or contiguous CPU tensor")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name}: not writeable")
        size, start = a.size, a.ctypes.data
    else:
        if _dtype_of(a) != dt or a.device.type != "cpu" or not a.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dt} CPU tensor or 1-D C-contiguous numpy array")
        size, start = a.numel(), a.data_ptr()
    if size != n:
        raise ValueError(f"{name}: expected length {n}, got {size}")
    return start, start + n * dt.itemsize


def _check_out(name, out, same_ok, others):
    """An output span that overlaps no input span, except by being exactly one of ``same_ok``."""
    for b in same_ok:
        if b is not None and out[0] < b[1] and b[0] < out[1] and out != b:
            raise ValueError(f"{name} partially overlaps an input")
    for b in others:
        if b is not None and out[0] < b[1] and b[0] < out[1]:
            raise ValueError(f"{name} overlaps another argument")


def _pattern(name, a, inner, dt):
    """A weight as (contiguous 1-D array of dtype ``dt``, inner), ``None`` -> (ones(1), 1)."""
    if a is None:
        return _consts(dt)[0], 1
    a = np.ascontiguousarray(a, dtype=dt).reshape(-1)
    inner = int(inner)
    if a.size == 0 or inner < 1:
        raise ValueError(f"{name}: empty, or {name}_inner < 1")
    return a, inner


def _wspan(a):
    """The span of a weight pattern (``None`` for the constant of an absent weight)."""
    if a.size == 0 or id(a) in _CONST_ADDRESSES:
        return None
    start = a.ctypes.data
    return start, start + a.nbytes


def _prep(x, y, w, w_inner, p, p_inner):
    dt = _dtype_of(x)
    if dt is None:
        raise ValueError("x: expected a float32 or float64 numpy array or CPU tensor")
    n = x.size if isinstance(x, np.ndarray) else x.numel()
    xs = _span("x", x, dt, n)
    ys = _span("y", y, dt, n)
    wv, wi = _pattern("w", w, w_inner, dt)
    pv, pi = _pattern("p", p, p_inner, dt)
    return dt, n, xs, ys, wv, wi, pv, pi


# ---- threads ------------------------------------------------------------------------------------
def _cpu_cap() -> int:
    """``BCELOGITS_NUM_THREADS`` if set, else the CPUs this process may run on (read once per process)."""
    pid = os.getpid()
    if _cap_state.get("pid") != pid:
        _cap_state.update(pid=pid, cap=_read_cpu_cap())
    return _cap_state["cap"]


_cap_state: dict = {}


def _read_cpu_cap() -> int:
    env = os.environ.get("BCELOGITS_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _num_threads() -> int:
    """``torch.get_num_threads()`` when torch is imported, capped by :func:`_cpu_cap`, which is also the
    count without torch."""
    cap = _cpu_cap()
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else cap
    return max(1, min(int(n), cap))


# Blocks a thread claims at a time: about 1/8 of its share of the call, at least 2 and at most 64.
_CHUNK_MIN, _CHUNK_MAX, _CHUNKS_PER_THREAD = 2, 64, 8


def _chunk(nb, nthreads):
    """How many blocks a thread claims at a time in a call of ``nb`` blocks on ``nthreads`` threads.

    Long runs of consecutive blocks let the hardware prefetchers stream ahead (claims of 2 blocks
    interleaved two threads every 32 KiB and cost a quarter of the time at 2^24-2^26 elements); eight
    claims per thread keep a thread that is slowed down from holding the call up by more than about an
    eighth of its share."""
    c = nb // (nthreads * _CHUNKS_PER_THREAD)
    return _CHUNK_MIN if c < _CHUNK_MIN else (_CHUNK_MAX if c > _CHUNK_MAX else c)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's other threads: a fresh lock (one held by another thread at
    the fork would stay held) and no remembered OpenMP runtime (looked up again)."""
    global _lock
    _lock = threading.RLock()
    _gomp_state.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

_gomp_state: dict = {}


def _torch_openmp():
    """The address of ``GOMP_parallel`` of the OpenMP runtime torch runs its operators on (the
    ``libgomp`` in torch's own directory), or None (torch not imported, another parallel backend, not
    Linux)."""
    if "fn" in _gomp_state:
        return _gomp_state["fn"]
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "__file__"):
        return None
    fn = None
    try:
        root = os.path.dirname(os.path.realpath(torch.__file__))
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
        for path in sorted(paths):
            if os.path.realpath(path).startswith(root + os.sep):
                fn = ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
                break
    except (OSError, AttributeError, ValueError):
        fn = None
    _gomp_state["fn"] = fn
    return fn


_local = threading.local()


def _call_buffer(nb):
    """``(args, address, memoryview, part address)``: the calling thread's argument block and a partials
    buffer of at least ``3 nb`` float64, kept for its next calls (allocating them and looking their
    addresses up would cost as much as the kernel on a small input)."""
    kept = getattr(_local, "buf", None)
    if kept is not None and kept[4] >= nb:
        return kept
    args = _native.Args()
    size = max(nb, 64)
    part = np.empty(3 * size, np.float64)
    kept = (args, ctypes.addressof(args), memoryview(args).cast("B"), part.ctypes.data, size, part)
    if size <= 1 << 16:
        _local.buf = kept
    return kept


def _launch(mode, uses, dt, n, refs, scalars, flags, omp):
    """Run the kernel of ``(mode, uses)`` and dtype ``dt`` over ``n`` elements, on the arrays
    ``refs = (x, y, w, p, go, lo, gr, wext, pext)`` given as (address, length) pairs, on up to
    :func:`_num_threads` threads (torch's OpenMP team when ``omp``), in one call into the core. Returns
    the (loss sum, count, weight sum) of the block partials, summed in a fixed order by the core: the
    same bits for any thread count and any split of the blocks between threads."""
    lib = _state["lib"] if "lib" in _state else (available() and _state["lib"])
    nb = (n + BLOCK - 1) // BLOCK
    if nb < 2 * _MIN_BLOCKS_PER_THREAD:
        nthreads = 1
    else:
        nthreads = max(1, min(_num_threads(), nb // _MIN_BLOCKS_PER_THREAD))
    gomp = (_torch_openmp() or 0) if nthreads > 1 and omp else 0
    args, address, mem, part, _, _ = _call_buffer(nb)
    x, y, w, p, go, lo, gr, wext, pext = refs
    ls, ig, gamma, gscale, wi, pi = scalars
    _native.PACK.pack_into(
        mem, 0, x[0], y[0], w[0], p[0], go[0], lo[0], gr[0], wext[0], pext[0], part, gomp,
        n, w[1], wi, p[1], pi, wext[1], pext[1], _dtype_code(dt), mode, uses, flags, nthreads,
        _chunk(nb, nthreads), _state["target"], 0, ls, ig, gamma, gscale, 0.0, 0.0, 0.0,
    )  # fmt: skip
    rc = lib.run(address)
    if rc != 0:  # (the arguments are checked before; this is a bug, never a wrong number)
        raise RuntimeError(f"bcelogits native core refused a call: {_native.Error(rc).name}")
    return _native.RESULTS.unpack_from(mem, _native.RESULTS_OFFSET)


def _address(arr):
    """The data address of ``arr`` (remembered for the constant arrays of :func:`_consts`)."""
    a = _CONST_ADDRESSES.get(id(arr))
    return arr.ctypes.data if a is None else a


def _ext(src, inner, n):
    """One period and a block more of the broadcast pattern ``src[(k // inner) % len(src)]``, when the
    period is at most :data:`_EXT_MAX` (else empty: the worker views or fills the weights block by
    block)."""
    period = src.size * inner
    if period > _EXT_MAX:
        return _consts(src.dtype)[1]
    need = period + min(BLOCK, n)
    return np.tile(np.repeat(src, inner) if inner > 1 else src, -(-need // period))[:need]


def _launch_run(
    dt, n, x, y, w, p, go, lo, gr, ls, ig, gamma, gscale, w_inner, p_inner, mode, flags, uses, omp
):
    """The kernel over all blocks. ``x, y``: spans (see :func:`_span`); ``go, lo, gr``: spans or None;
    ``w, p``: weight patterns; ``uses`` (see :func:`_uses`) selects the specialisation with only the
    operations the call needs."""
    none = _consts(dt)[1]
    absent = (_address(none), 0)
    # (The expanded patterns stay referenced here until the call returns.)
    wext = _ext(w, w_inner, n) if uses & Uses.USE_WEIGHT else none
    pext = _ext(p, p_inner, n) if uses & Uses.USE_POS_WEIGHT else none
    refs = (
        (x[0], n), (y[0], n), (_address(w), w.size), (_address(p), p.size),
        absent if go is None else (go[0], n), absent if lo is None else (lo[0], n),
        absent if gr is None else (gr[0], n), (_address(wext), wext.size), (_address(pext), pext.size),
    )  # fmt: skip
    scalars = (float(ls), float(ig), float(gamma), float(gscale), int(w_inner), int(p_inner))
    return _launch(mode, uses, dt, n, refs, scalars, flags, omp)


def _uses(w, p, label_smoothing, ignore_index, focal_gamma):
    """Which optional operations a call's loop contains (:class:`Uses` flags; 0 for the plain loss)."""
    u = 0
    if w is not None:
        u |= Uses.USE_WEIGHT
    if p is not None:
        u |= Uses.USE_POS_WEIGHT
    if label_smoothing != 0.0:
        u |= Uses.USE_SMOOTHING
    if ignore_index is not None:
        u |= Uses.USE_IGNORE
    if focal_gamma != 0.0:
        u |= Uses.USE_FOCAL
    return int(u)


def _weight_sum_all(w, w_inner, n):
    """``sum_i w[(i // w_inner) % len(w)]`` over ``i < n``, in float64, from exact per-entry counts."""
    lw = w.size
    reps, rem = divmod(n, lw * w_inner)
    if rem == 0:  # any broadcast of w to the input uses every entry equally often: no temporaries
        return float(w.sum(dtype=np.float64)) * (reps * w_inner)
    q, r = divmod(n, w_inner)
    cnt = np.full(lw, float(w_inner) * (q // lw))
    cnt[: q % lw] += w_inner
    cnt[q % lw] += r
    return float(np.dot(w.astype(np.float64), cnt))


# ---- entry points -------------------------------------------------------------------------------
def forward(
    x,
    y,
    w,
    w_inner,
    p,
    p_inner,
    *,
    label_smoothing=0.0,
    ignore_index=None,
    focal_gamma=0.0,
    loss_out=None,
    grad_out=None,
    grad_scale=1.0,
    weight_sum=True,
):
    """One pass: returns ``(loss_sum, count, weight_sum)``, and fills ``loss_out`` (element losses) and
    ``grad_out`` (``grad_scale * dloss/dx``) when given.

    ``x, y``: 1-D C-contiguous float32/float64 NumPy arrays of one dtype (the compute dtype) and length
    ``n``, or contiguous CPU torch tensors (of any shape, read flat; so are ``loss_out`` and ``grad_out``).
    ``w, p``: ``None`` or 1-D arrays; element ``i`` uses ``w[(i // w_inner) % len(w)]`` (same for ``p``).
    Elements with ``y == ignore_index`` (compared in the dtype, before smoothing) give loss 0 and grad 0
    and are not counted. ``loss_sum`` is accumulated in float64; ``weight_sum`` is the sum of the weights
    of the counted elements (``count`` when ``w`` is None). ``grad_out`` may be ``x`` itself; outputs
    must not otherwise overlap the inputs. ``weight_sum=False``: the caller does not need the weight
    sum (returned as NaN when no element is ignored), which saves a pass over a full-shape ``w``.
    """
    dt, n, xs, ys, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    flags = 2
    los = gos = None
    if loss_out is not None:
        los = _span("loss_out", loss_out, dt, n, writable=True)
        _check_out("loss_out", los, (), (xs, ys, _wspan(wv), _wspan(pv)))
        flags |= 1
    if grad_out is not None:
        gos = _span("grad_out", grad_out, dt, n, writable=True)
        _check_out("grad_out", gos, (xs,), (ys, _wspan(wv), _wspan(pv), los))
    if ignore_index is not None:
        flags |= 4
    if n == 0:
        return 0.0, 0, 0.0
    ig = math.nan if ignore_index is None else float(ignore_index)
    total, count, wsum = _launch_run(
        dt, n, xs, ys, wv, pv, None, los, gos,
        label_smoothing, ig, focal_gamma, grad_scale,
        wi, pi, 0 if grad_out is None else 1, flags, _uses(w, p, label_smoothing, ignore_index, focal_gamma),
        not isinstance(x, np.ndarray),
    )  # fmt: skip
    if ignore_index is None:
        count = n
        if w is None:
            wsum = float(n)
        else:
            wsum = _weight_sum_all(wv, wi, n) if weight_sum else math.nan
    return total, int(count), wsum


def forward_contiguous(x, y, grad_out, grad_scale):
    """:func:`forward` without weights or options, for the caller that has already checked what
    :func:`forward` would (its dispatcher does, for its most common call): ``x``, ``y`` and ``grad_out``
    (None, or a new tensor) contiguous CPU torch tensors of one float32/float64 dtype and of ``n > 0``
    elements. Returns the loss sum; the same kernel call as :func:`forward`, so the same bits.

    Written out, without the general route's helpers: on a small input this function's own Python is a
    good part of the call."""
    lib = _state.get("lib") or (available() and _state["lib"])
    is64 = x.dtype.itemsize == 8
    ones, none = _CONST_PTRS[is64]
    n = x.numel()
    nb = (n + BLOCK - 1) // BLOCK
    if nb < 2 * _MIN_BLOCKS_PER_THREAD:
        nthreads, gomp = 1, 0
    else:
        nthreads = max(1, min(_num_threads(), nb // _MIN_BLOCKS_PER_THREAD))
        gomp = (_torch_openmp() or 0) if nthreads > 1 else 0
    args, address, mem, part, _, _ = _call_buffer(nb)
    if grad_out is None:
        gr, mode = none, _MODE_LOSS
    else:
        gr, mode = grad_out.data_ptr(), _MODE_LOSS_GRAD
    _native.PACK.pack_into(
        mem, 0, x.data_ptr(), y.data_ptr(), ones, ones, none, none, gr, none, none, part, gomp,
        n, 1, 1, 1, 1, 0, 0, int(is64), mode, 0, _FLAG_LOSS_SUM, nthreads,
        _chunk(nb, nthreads), _state["target"], 0, 0.0, math.nan, 0.0, grad_scale, 0.0, 0.0, 0.0,
    )  # fmt: skip
    rc = lib.run(address)
    if rc != 0:  # pragma: no cover - the arguments were checked by the caller
        raise RuntimeError(f"bcelogits native core refused a call: {_native.Error(rc).name}")
    return _native.RESULTS.unpack_from(mem, _native.RESULTS_OFFSET)[0]


def backward_none(
    x, y, w, w_inner, p, p_inner, go, grad_out, *, label_smoothing=0.0, ignore_index=None, focal_gamma=0.0
):
    """``grad_out[i] = go[i] * dloss_i/dx_i``, the backward of reduction='none', in one pass over
    ``x, y, w, p, go`` (arrays as in :func:`forward`; a NumPy ``go`` is cast to the dtype if needed);
    ``grad_out`` may be ``x`` or ``go``."""
    dt, n, xs, ys, wv, wi, pv, pi = _prep(x, y, w, w_inner, p, p_inner)
    if isinstance(go, np.ndarray):
        go = np.ascontiguousarray(go, dtype=dt)
    gs = _span("go", go, dt, n)
    gos = _span("grad_out", grad_out, dt, n, writable=True)
    _check_out("grad_out", gos, (xs, gs), (ys, _wspan(wv), _wspan(pv)))
    if n == 0:
        return None
    _launch_run(
        dt, n, xs, ys, wv, pv, gs, None, gos,
        label_smoothing, math.nan if ignore_index is None else ignore_index, focal_gamma, 1.0,
        wi, pi, 2, 0, _uses(w, p, label_smoothing, ignore_index, focal_gamma), not isinstance(x, np.ndarray),
    )  # fmt: skip
    return None
