"""``bcelogits bench``: speed, peak memory and accuracy of bcelogits against torch's own loss.

Every cell (size x weight configuration x mode) times ``torch.nn.functional.binary_cross_entropy_with_logits``
and ``bcelogits.binary_cross_entropy_with_logits`` *interleaved* in one process: each round runs both (the
order alternates between rounds), so a noisy neighbour slows both alike. The speed-up reported is the
median over rounds of the same-round ratio torch / bcelogits, with its min-max spread, and the times shown
are those of that median round (the floor's too), so every number of a row comes from the same round and
torch ms / bcelogits ms is the speed-up shown.

- ``fwd``: the loss under ``torch.no_grad()``;
- ``fwd+bwd``: ``loss = f(x, y); loss.backward()`` with ``x.grad = None`` before each round, so the
  gradient is a fresh tensor as in a training step;
- floor (CPU), measured in every round after both libraries: for ``fwd+bwd``, ``torch.add(x, y)`` into a
  new tensor of the input's size, about what any function that returns an input-sized tensor from torch's
  allocator pays (on big tensors mostly first-touch page faults); for ``fwd``, reading the inputs once
  (``torch.dot(x, y)``, plus ``.sum()`` of an input-sized weight or pos_weight), the least any loss of
  these inputs pays;
- peak extra memory: one fresh subprocess per (cell, library) measures the resident-set high-water mark of
  one call above what the inputs already hold, in units of one input-sized tensor (CUDA:
  ``torch.cuda.max_memory_allocated``);
- error: the loss (and gradient) against torch's float64 evaluation on the same inputs: loss relative
  error, gradient max abs error / max abs gradient.

``bcelogits bench --quick`` takes about 20 s: two sizes instead of three, 3 rounds a cell, and no
peak-memory measurement (it says so in its output). :func:`run` is the programmatic entry point
(``benchmarks/sweep.py`` and the tests use it).
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

LIBS = ("torch", "bcelogits")
CONFIGS = ("none", "weight", "pos_weight")
MODES = ("fwd+bwd", "fwd")

CPU_SHAPES = [(4096, 1000), (1, 2**24), (64, 80, 128, 128)]
QUICK_SHAPES = [(4096, 1000), (1024, 1024)]
CUDA_SHAPES = [(4096, 4096), (64, 80, 128, 128), (16384, 16384)]

DEFAULT_REPEATS = {"full": 5, "quick": 3, "cuda": 20}
MIN_ROUNDS = 3  # with the time budget, a cell stops after this many rounds once it has used its budget
CELL_BUDGET_S = 60.0  # per cell, full CPU run, when --repeats is not given
# Full CPU run without --repeats: a cell keeps measuring until it has spent this long (at most MAX_ROUNDS
# rounds), so that small, fast cells get many rounds: their times are the noisiest on a shared machine.
CELL_MIN_S = 2.0
MAX_ROUNDS = 60
WARM_ELEMENTS = 2**20  # CPU warm-up size (JIT compilation, lazy initialisation) before a cell's rounds
MEM_WARM_ELEMENTS = 2**12  # memory child: warm-up small enough not to leave input-sized free memory behind
CHUNK = 2**22  # elements per chunk when comparing gradients in float64


# --------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One measurement: a shape, a weight configuration, a mode and a dtype."""

    shape: tuple[int, ...]
    config: str = "none"  # "none" | "weight" (full-shape) | "pos_weight" (one per class)
    mode: str = "fwd+bwd"  # "fwd+bwd" | "fwd"
    dtype: str = "float32"

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"config must be one of {CONFIGS}, got {self.config!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def class_dim(self) -> int:
        """The class dimension of pos_weight: 1 for N, C, ... layouts (3+ dims), else the last."""
        return 1 if len(self.shape) >= 3 else len(self.shape) - 1

    @property
    def size(self) -> str:
        return size_label(self.numel)

    @property
    def config_label(self) -> str:
        if self.config == "none":
            return "no weights"
        if self.config == "weight":
            return "weight (full)"
        d = self.class_dim
        where = "" if d == len(self.shape) - 1 else f", dim {d}"
        return f"pos_weight ({self.shape[d]}{where})"


def size_label(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)


def make_cells(shapes, configs=CONFIGS, modes=MODES, dtype: str = "float32") -> list[Cell]:
    """The grid in measuring order: per shape, per configuration, the modes (inputs are shared)."""
    return [Cell(tuple(s), c, m, dtype) for s in shapes for c in configs for m in modes]


def _small_shape(shape: tuple, limit: int) -> tuple:
    """``shape`` with its largest dimensions halved until at most ``limit`` elements (same ndim)."""
    s = list(shape)
    while math.prod(s) > limit:
        i = max(range(len(s)), key=lambda k: s[k])
        s[i] = (s[i] + 1) // 2
    return tuple(s)


# --------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    size: str
    shape: str
    numel: int
    config: str
    mode: str
    dtype: str
    device: str
    threads: int
    backend: str
    rounds: int
    # the times of the median round: the round whose same-round ratio torch / bcelogits is the median
    # (the lower median for an even count), so torch_ms / bcelogits_ms == speedup
    torch_ms: float
    bcelogits_ms: float
    speedup: float  # median over rounds of torch / bcelogits (> 1: bcelogits faster)
    speedup_min: float
    speedup_max: float
    # CPU fwd+bwd: torch.add into a fresh tensor; CPU fwd: one read of the inputs; CUDA: clone of the bytes;
    # measured in every round, shown for the median round
    floor_ms: float | None = None
    bcelogits_over_floor: float | None = None
    torch_gbps: float | None = None
    bcelogits_gbps: float | None = None
    copy_gbps: float | None = None
    torch_mem: float | None = None  # peak extra memory, in input-sized tensors
    bcelogits_mem: float | None = None
    mem_method: str | None = None
    torch_loss_err: float | None = None
    bcelogits_loss_err: float | None = None
    torch_grad_err: float | None = None
    bcelogits_grad_err: float | None = None

    @property
    def torch_err(self):
        return self.torch_loss_err if self.mode == "fwd" else self.torch_grad_err

    @property
    def bcelogits_err(self):
        return self.bcelogits_loss_err if self.mode == "fwd" else self.bcelogits_grad_err


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    x: object
    y: object
    kw_torch: dict  # weight= / pos_weight= as torch's function takes them
    kw_ours: dict  # the same for bcelogits (pos_weight along class_dim instead of a view)


def make_inputs(cell: Cell, device: str = "cpu", seed: int = 0) -> Inputs:
    """Logits ~ N(0, 2), 0/1 targets (30% positive), weights in [0.5, 1.5], pos_weight in [0.5, 4];
    filled in place, so making them allocates nothing but the tensors themselves."""
    import torch

    dt = getattr(torch, cell.dtype)
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def new():
        return torch.empty(cell.shape, dtype=dt, device=device)

    x = new().normal_(0.0, 2.0, generator=g)
    y = new().bernoulli_(0.3, generator=g)
    kw_torch, kw_ours = {}, {}
    if cell.config == "weight":
        kw_torch["weight"] = kw_ours["weight"] = new().uniform_(0.5, 1.5, generator=g)
    elif cell.config == "pos_weight":
        d = cell.class_dim
        c = cell.shape[d]
        p = torch.empty(c, dtype=dt, device=device).uniform_(0.5, 4.0, generator=g)
        kw_ours["pos_weight"] = p
        if d == len(cell.shape) - 1:
            kw_torch["pos_weight"] = p
        else:
            kw_torch["pos_weight"] = p.view((c,) + (1,) * (len(cell.shape) - d - 1))
            kw_ours["class_dim"] = d
    return Inputs(x, y, kw_torch, kw_ours)


def _functions():
    import torch.nn.functional as F

    import bcelogits

    return {
        "torch": F.binary_cross_entropy_with_logits,
        "bcelogits": bcelogits.binary_cross_entropy_with_logits,
    }


def _kwargs(inp: Inputs, lib: str) -> dict:
    return inp.kw_torch if lib == "torch" else inp.kw_ours


def backend_for(inp: Inputs) -> tuple[str, str | None]:
    """``(name, note)``: the kernel bcelogits routes these inputs through ('plain', 'cpu', 'triton'), as
    :func:`bcelogits.kernels.choose` decides it, and the library's warning about it, if any."""
    from bcelogits import _args, kernels

    kw = inp.kw_ours
    options = _args.check_options(class_dim=kw.get("class_dim"))
    call = _args.parse(inp.x, inp.y, kw.get("weight"), kw.get("pos_weight"), "mean", options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = kernels.choose(call)
    note = next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), None)
    name = "plain" if kernel is None else kernel.__name__.rsplit(".", 1)[-1]
    return name, note


# --------------------------------------------------------------------------------------------- timing
def _sync(device: str):
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def call_once(fn, inp: Inputs, kw: dict, mode: str, sync):
    """Seconds for one call (and backward), and the loss. Leaves the gradient in ``inp.x.grad``."""
    import torch

    x, y = inp.x, inp.y
    if mode == "fwd":
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            loss = fn(x, y, **kw)
            sync()
            return time.perf_counter() - t0, loss
    x.grad = None
    sync()
    t0 = time.perf_counter()
    loss = fn(x, y, **kw)
    loss.backward()
    sync()
    return time.perf_counter() - t0, loss


def _floor_once(inp: Inputs, sync) -> float:
    import torch

    with torch.no_grad():
        a, b = inp.x.detach(), inp.y
        sync()
        t0 = time.perf_counter()
        z = torch.add(a, b)
        sync()
        t = time.perf_counter() - t0
    del z
    return t


def _read_floor_once(inp: Inputs, sync) -> float:
    """Seconds to read the input-sized tensors of a forward call once: ``torch.dot(x, y)`` (the fastest
    pass over two tensors torch has on CPU, measured against ``x.sum(), y.sum()``), plus ``.sum()`` of a
    weight or pos_weight with as many elements as the input (a full-shape weight; the pos_weight of a
    (1, C) input)."""
    import torch

    a, b = inp.x.detach().reshape(-1), inp.y.reshape(-1)
    more = [t for t in inp.kw_torch.values() if torch.is_tensor(t) and t.numel() == a.numel()]
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        torch.dot(a, b)
        for t in more:
            t.sum()
        sync()
        return time.perf_counter() - t0


def _copy_once(buf, sync) -> float:
    sync()
    t0 = time.perf_counter()
    z = buf.clone()
    sync()
    t = time.perf_counter() - t0
    del z
    return t


def bytes_moved(cell: Cell) -> int:
    """Bytes a call must move at the least: read logits, targets (and a full weight), write the gradient."""
    item = 8 if cell.dtype == "float64" else 4 if cell.dtype == "float32" else 2
    tensors = 2 + (cell.config == "weight") + (cell.mode == "fwd+bwd")
    extra = cell.shape[cell.class_dim] * item if cell.config == "pos_weight" else 0
    return tensors * cell.numel * item + extra


# --------------------------------------------------------------------------------------------- errors
@dataclass
class Reference:
    loss: float
    grad: object  # float64 gradient, or None
    grad_max: float


def reference(inp: Inputs, want_grad: bool) -> Reference:
    """torch's float64 loss (and gradient) on the exact float32 inputs."""
    import torch
    import torch.nn.functional as F

    xd = inp.x.detach().double()
    yd = inp.y.double()
    kw = {k: v.double() for k, v in inp.kw_torch.items()}
    if want_grad:
        xd.requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(xd, yd, **kw)
        loss.backward()
        grad = xd.grad
        xd.grad = None
        gmax = float(grad.abs().max())
    else:
        with torch.no_grad():
            loss = F.binary_cross_entropy_with_logits(xd, yd, **kw)
        grad, gmax = None, math.nan
    return Reference(loss.item(), grad, gmax)


def loss_error(loss, ref: Reference) -> float:
    v = loss.detach().item()
    return abs(v - ref.loss) / abs(ref.loss) if ref.loss else abs(v)


def grad_error(grad, ref: Reference) -> float | None:
    if grad is None or ref.grad is None:
        return None
    g, r = grad.detach().reshape(-1), ref.grad.reshape(-1)
    worst = 0.0
    for i in range(0, g.numel(), CHUNK):
        worst = max(worst, float((g[i : i + CHUNK].double() - r[i : i + CHUNK]).abs().max()))
    return worst / ref.grad_max if ref.grad_max else worst


# --------------------------------------------------------------------------------------------- memory
def _vm_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kib("VmHWM") is not None


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _set_threads(n: int | None) -> None:
    """torch's intra-op threads; bcelogits' CPU kernel follows torch's count."""
    import torch

    if n is not None:
        torch.set_num_threads(n)


def _memory_child(spec_json: str) -> int:
    """Run in a fresh interpreter: one call of ``spec['lib']`` on the spec's cell; prints JSON."""
    spec = json.loads(spec_json)
    _set_threads(spec.get("threads"))
    cell = Cell(tuple(spec["shape"]), spec["config"], spec["mode"], spec["dtype"])
    fn = _functions()[spec["lib"]]
    sync = lambda: None  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = Cell(_small_shape(cell.shape, MEM_WARM_ELEMENTS), cell.config, cell.mode, cell.dtype)
        warm = make_inputs(small)
        warm.x.requires_grad_(cell.mode == "fwd+bwd")
        call_once(fn, warm, _kwargs(warm, spec["lib"]), cell.mode, sync)
        del warm
        inp = make_inputs(cell, seed=1)
        inp.x.requires_grad_(cell.mode == "fwd+bwd")
        gc.collect()
        if _reset_peak():
            method = "VmHWM"
            base = _vm_kib("VmRSS") * 1024
            call_once(fn, inp, _kwargs(inp, spec["lib"]), cell.mode, sync)
            peak = _vm_kib("VmHWM") * 1024
        else:  # the high-water mark cannot be reset: the inputs were made without temporaries, so the
            # maximum so far is (about) what they hold
            method = "ru_maxrss"
            cur = _vm_kib("VmRSS")
            base = cur * 1024 if cur is not None else _maxrss_bytes()
            call_once(fn, inp, _kwargs(inp, spec["lib"]), cell.mode, sync)
            peak = _maxrss_bytes()
    item = inp.x.element_size()
    print(json.dumps({"extra_bytes": peak - base, "tensor_bytes": cell.numel * item, "method": method}))
    return 0


def measure_memory(cell: Cell, lib: str, threads: int | None = None) -> tuple[float, str]:
    """Peak extra resident memory of one call, in input-sized tensors, from a fresh subprocess."""
    from bcelogits import kernels

    spec = dict(
        shape=list(cell.shape), config=cell.config, mode=cell.mode, dtype=cell.dtype, lib=lib, threads=threads
    )
    code = "import sys; from bcelogits.bench import _memory_child; sys.exit(_memory_child(sys.argv[1]))"
    env = dict(os.environ, BCELOGITS_BACKEND=kernels.current())
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {cell} / {lib} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["extra_bytes"] / out["tensor_bytes"], out["method"]


def _cuda_memory(fn, inp: Inputs, kw: dict, cell: Cell, sync) -> float:
    import torch

    inp.x.grad = None
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, loss = call_once(fn, inp, kw, cell.mode, sync)
    peak = torch.cuda.max_memory_allocated() - base
    del loss
    inp.x.grad = None
    return peak / (cell.numel * inp.x.element_size())


# --------------------------------------------------------------------------------------------- progress
class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain one of our own."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True)

    def describe(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.tty:  # a log (not a terminal) gets one line per finished step only
            self._draw(text)

    def step(self, text: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            self._draw(text)

    def _draw(self, text: str) -> None:
        width = 24
        filled = round(width * self.done / max(self.total, 1))
        el = time.perf_counter() - self.t0
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {el:5.0f}s {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------- run
@dataclass
class RunResult:
    rows: list
    notes: list  # warnings worth printing (e.g. why the fused kernel did not serve)
    interrupted: bool = False


def run(
    cells: list[Cell],
    repeats: int | None = None,
    *,
    device: str = "cpu",
    memory: bool = True,
    threads: int | None = None,
    budget_s: float | None = CELL_BUDGET_S,
    min_s: float | None = None,
    progress: bool = True,
    seed: int = 0,
) -> RunResult:
    """Measure ``cells``. ``repeats`` rounds per cell (default by device); with ``min_s`` more rounds, up
    to :data:`MAX_ROUNDS`, until the cell has spent that many seconds; with ``budget_s`` a cell stops
    after :data:`MIN_ROUNDS` rounds once it has spent that many seconds."""
    import torch

    if repeats is None:
        repeats = DEFAULT_REPEATS["cuda" if device == "cuda" else "full"]
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    old_threads = torch.get_num_threads()
    _set_threads(threads)
    sync = _sync(device)
    fns = _functions()
    cpu_memory = memory and device == "cpu"
    bar = Progress(len(cells) * (1 + 2 * cpu_memory), enabled=progress)
    rows, measured, notes = [], [], []
    key, inp, ref = None, None, None
    interrupted = False
    try:
        if cells:  # load (on a cold cache: compile) the kernels before the first timing
            bar.describe("loading bcelogits kernels")
            backend_for(make_inputs(Cell((8,) * len(cells[0].shape), dtype=cells[0].dtype), device))
        for cell in cells:
            tag = f"{cell.size} {cell.config_label} {cell.mode}"
            bar.describe(tag)
            if key != (cell.shape, cell.config, cell.dtype):  # new inputs; the modes of a pair share them
                inp = ref = _collect(inp)
                key = (cell.shape, cell.config, cell.dtype)
                inp = make_inputs(cell, device, seed)
            backend, note = backend_for(inp)
            if note and note not in notes:
                notes.append(note)
            want_grad = cell.mode == "fwd+bwd"
            if cell.dtype in ("float32", "float16", "bfloat16") and (
                ref is None or (want_grad and ref.grad is None)
            ):
                ref = None
                try:
                    ref = reference(inp, want_grad)
                except _oom_errors() as exc:  # float64 copies of big GPU tensors: errors left blank
                    notes.append(f"{tag}: float64 reference skipped ({type(exc).__name__})")
                    _free_cuda(device)
            try:
                row = _measure_cell(cell, inp, ref, fns, (repeats, min_s, budget_s), device, sync, backend)
            except _oom_errors() as exc:
                notes.append(f"{tag}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                inp.x.grad = None
                _free_cuda(device)
                bar.step(tag)
                continue
            row.threads = torch.get_num_threads()
            rows.append(row)
            measured.append(cell)
            bar.step(tag)
        inp = ref = _collect(inp)
        if cpu_memory:
            for row, cell in zip(rows, measured):
                for lib in LIBS:
                    tag = f"memory: {cell.size} {cell.config_label} {cell.mode} {lib}"
                    bar.describe(tag)
                    value, method = measure_memory(cell, lib, threads=torch.get_num_threads())
                    setattr(row, f"{lib}_mem", value)
                    row.mem_method = method
                    bar.step(tag)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        inp = ref = _collect(inp)
        torch.set_num_threads(old_threads)
    return RunResult(rows, notes, interrupted)


def _oom_errors() -> tuple:
    import torch

    cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (cls,) if cls is not None else ()


def _free_cuda(device: str) -> None:
    if device == "cuda":
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _collect(inp: Inputs | None) -> None:
    """Drop ``inp``; collect cycles too when it was big."""
    big = inp is not None and inp.x.numel() >= 2**22
    del inp
    if big:
        gc.collect()


def median_round(ratios: list) -> int:
    """Index of the round whose ratio is the median (the lower of the two middle ones for an even count):
    a real round, whose times then agree with the ratio reported."""
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    return order[(len(order) - 1) // 2]


def _measure_cell(cell, inp, ref, fns, rule, device, sync, backend) -> Row:
    """One cell's rounds; ``rule = (repeats, min_s, budget_s)`` (see :func:`run`)."""
    repeats, min_s, budget_s = rule
    x = inp.x
    fb = cell.mode == "fwd+bwd"
    x.requires_grad_(fb)
    # Warm-up: JIT compilation and lazy initialisation happen here, not in round 0. On CUDA at full size
    # (Triton specialises on sizes); on CPU on a smaller tensor of the same kind.
    if device == "cuda" or cell.numel <= WARM_ELEMENTS:
        warm = inp
    else:
        warm = make_inputs(
            Cell(_small_shape(cell.shape, WARM_ELEMENTS), cell.config, cell.mode, cell.dtype), device
        )
        warm.x.requires_grad_(fb)
    for lib in LIBS:
        call_once(fns[lib], warm, _kwargs(warm, lib), cell.mode, sync)
        warm.x.grad = None
    del warm
    buf = None
    if device == "cuda":
        import torch

        buf = torch.empty(bytes_moved(cell) // 2, dtype=torch.uint8, device=device)
        _copy_once(buf, sync)

    rounds, errs = [], {}
    t_start = time.perf_counter()
    for r in range(max(repeats, MAX_ROUNDS) if min_s else repeats):
        spent = time.perf_counter() - t_start
        if r >= repeats and spent >= min_s:
            break
        times = {}
        for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
            t, loss = call_once(fns[lib], inp, _kwargs(inp, lib), cell.mode, sync)
            times[lib] = t
            if r == 0 and ref is not None:  # outside the timing: errors of the first timed call
                errs[lib] = (loss_error(loss, ref), grad_error(x.grad, ref) if fb else None)
            del loss
            x.grad = None
        if device == "cpu":
            times["floor"] = _floor_once(inp, sync) if fb else _read_floor_once(inp, sync)
        if buf is not None:
            times["copy"] = _copy_once(buf, sync)
        rounds.append(times)
        if budget_s is not None and r + 1 >= MIN_ROUNDS and time.perf_counter() - t_start > budget_s:
            break

    ratios = [t["torch"] / t["bcelogits"] for t in rounds]
    mid = median_round(ratios)
    times = rounds[mid]
    row = Row(
        size=cell.size,
        shape="x".join(map(str, cell.shape)),
        numel=cell.numel,
        config=cell.config_label,
        mode=cell.mode,
        dtype=cell.dtype,
        device=device,
        threads=0,
        backend=backend,
        rounds=len(rounds),
        torch_ms=times["torch"] * 1e3,
        bcelogits_ms=times["bcelogits"] * 1e3,
        speedup=ratios[mid],
        speedup_min=min(ratios),
        speedup_max=max(ratios),
    )
    if "floor" in times:
        row.floor_ms = times["floor"] * 1e3
        row.bcelogits_over_floor = times["bcelogits"] / times["floor"]
    if buf is not None:
        nbytes = bytes_moved(cell)
        row.floor_ms = times["copy"] * 1e3
        row.copy_gbps = 2 * buf.numel() / times["copy"] / 1e9
        row.torch_gbps = nbytes / times["torch"] / 1e9
        row.bcelogits_gbps = nbytes / times["bcelogits"] / 1e9
        row.bcelogits_over_floor = times["bcelogits"] / times["copy"]
        del buf
        for lib in LIBS:
            setattr(row, f"{lib}_mem", _cuda_memory(fns[lib], inp, _kwargs(inp, lib), cell, sync))
        row.mem_method = "cuda.max_memory_allocated"
    for lib, (le, ge) in errs.items():
        setattr(row, f"{lib}_loss_err", le)
        setattr(row, f"{lib}_grad_err", ge)
    x.grad = None
    x.requires_grad_(False)
    return row


# --------------------------------------------------------------------------------------------- output
def machine_line(device: str = "cpu") -> str:
    """CPU (or GPU) model, cores, memory, torch version and threads, the CPU kernel's target, date."""
    import torch

    parts = []
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        parts.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        model = m.group(1).strip() if m else model
        fl = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        have = set(fl.group(1).split()) if fl else set()
        flags = "AVX-512" if "avx512f" in have else "AVX2" if "avx2" in have else ""
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{model}{f' ({flags})' if flags else ''}, {cores} cores"
    try:
        cpu += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    parts.append(cpu)
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    from .kernels import cpu as cpu_kernel

    parts.append(f"CPU kernel {cpu_kernel.target()}" if cpu_kernel.available() else "no CPU kernel")
    parts.append(f"{platform.system()} {platform.release().split('-')[0]}")
    parts.append(datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    return " | ".join(parts)


def _ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _pair(a, b, fmt) -> str:
    if a is None and b is None:
        return ""
    return f"{'–' if a is None else fmt(a)} / {'–' if b is None else fmt(b)}"


def _mem(v) -> str:
    return f"{v:.1f}"


def _err(v) -> str:
    return "0" if v == 0 else f"{v:.0e}"


def format_table(rows: list, device: str = "cpu") -> str:
    """The rows as a markdown pipe table: every number of a row from the same (median) round; the memory
    column only when memory was measured."""
    cuda = device == "cuda"
    memory = any(r.torch_mem is not None or r.bcelogits_mem is not None for r in rows)
    head = ["size", "config", "mode", "torch ms", "bcelogits ms", "speed-up", "spread"]
    head += ["copy ms", "GB/s torch / ours / copy"] if cuda else ["floor ms", "ours / floor"]
    head += ["peak extra mem (torch / ours)"] if memory else []
    head += ["max err (torch / ours)", "backend"]
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 4) + ["---"]) + "|",
    ]
    for r in rows:
        cells = [
            f"{r.size} ({r.shape})",
            r.config,
            r.mode,
            _ms(r.torch_ms),
            _ms(r.bcelogits_ms),
            f"{r.speedup:.2f}x",
            f"{r.speedup_min:.2f}-{r.speedup_max:.2f}x",
        ]
        if cuda:
            gb = f"{r.torch_gbps:.0f} / {r.bcelogits_gbps:.0f} / {r.copy_gbps:.0f}" if r.copy_gbps else ""
            cells += [_ms(r.floor_ms), gb]
        else:
            cells += [_ms(r.floor_ms), _floor_ratio(r)]
        if memory:
            cells.append(_pair(r.torch_mem, r.bcelogits_mem, _mem))
        cells += [_pair(r.torch_err, r.bcelogits_err, _err), r.backend]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _floor_ratio(r) -> str:
    """``ours / floor``; a forward below its floor (a read of the inputs, which no loss can undercut) is
    timing noise and is marked with ``*``."""
    if r.bcelogits_over_floor is None:
        return ""
    mark = "*" if r.mode == "fwd" and r.bcelogits_over_floor < 1 else ""
    return f"{r.bcelogits_over_floor:.2f}x{mark}"


FOOTNOTES_CPU = """\
Every number of a row comes from one round: of the rounds measured (torch and bcelogits alternating which
goes first), the one whose ratio torch ms / bcelogits ms is the median. So 'speed-up' = torch ms /
bcelogits ms (> 1: bcelogits is faster), and 'spread' is the lowest-highest same-round ratio of the cell.
The machine may be shared: read the ratios, not the milliseconds.
fwd: the loss under torch.no_grad(). fwd+bwd: loss + loss.backward(), x.grad = None before each round.
floor, timed in every round after both libraries:
- fwd: one read of the inputs, torch.dot(x, y) (+ .sum() of an input-sized weight or pos_weight). No loss
  of these inputs can be faster, so torch ms / floor ms is the most any forward could gain here; an
  'ours / floor' below 1 (marked *) is timing noise of that round.
- fwd+bwd: torch.add(x, y) into a fresh input-sized tensor: what returning an input-sized result costs with
  torch's allocator (on big tensors mostly first-touch page faults). A reference, not a bound: bcelogits
  puts its own big gradients on huge pages, which fault less, so it can come in below 1.
max err vs torch's float64 evaluation of the same inputs: fwd rows the loss (relative), fwd+bwd rows the
gradient (max abs error / max abs gradient); the loss errors of fwd+bwd rows are in the CSV.
peak extra mem (full runs only): resident high-water mark of one call in a fresh process, above the
inputs, in input-sized tensors; the gradient itself is 1.
rounds per cell (in the CSV): by default at least 5, and more until the cell has measured for 2 s (at
most 60); --quick: 3; --repeats N: exactly N."""

FOOTNOTES_CUDA = """\
Every number of a row comes from one round: the one whose ratio torch ms / bcelogits ms is the median
(torch.cuda.synchronize around each call), so 'speed-up' = torch ms / bcelogits ms (> 1: bcelogits is
faster); 'spread' is the lowest-highest same-round ratio. GB/s: bytes a call must move (read logits,
targets, full weight; write the gradient for fwd+bwd) / time; copy: a clone of the same number of bytes
in the same round. peak extra mem: torch.cuda.max_memory_allocated above the inputs, in input-sized
tensors. max err vs torch float64 on the same inputs: fwd rows the loss (relative), fwd+bwd rows the
gradient (max abs error / max abs gradient)."""

QUICK_NOTE = (
    "quick mode: sizes {sizes} only (the full run has 4.1M, 16.8M and 84M elements) and 3 rounds per cell "
    "(the full run takes at least 5, and more until a cell has measured for 2 s); run without --quick for "
    "those"
)
NO_MEMORY_NOTE = (
    "peak memory not measured in this run ({why}: it needs a fresh process per cell and library), so its "
    "column is left out"
)


def report(result: RunResult, device: str, title: str, quick: bool = False) -> str:
    lines = [f"## {title}", "", f"machine: {machine_line(device)}", ""]
    backends = sorted({r.backend for r in result.rows})
    lines.append(f"bcelogits backend: {', '.join(backends) or 'n/a'}")
    if quick:
        sizes = ", ".join(dict.fromkeys(r.size for r in result.rows)) or "-"
        lines.append("note: " + QUICK_NOTE.format(sizes=sizes))
    if result.rows and all(r.torch_mem is None and r.bcelogits_mem is None for r in result.rows):
        why = "quick mode" if quick else "memory measurement off"
        lines.append("note: " + NO_MEMORY_NOTE.format(why=why))
    lines += [f"note: {n}" for n in result.notes]
    if result.interrupted:
        lines.append("note: interrupted; the rows measured so far follow")
    lines += ["", format_table(result.rows, device), ""]
    lines.append(FOOTNOTES_CUDA if device == "cuda" else FOOTNOTES_CPU)
    return "\n".join(lines)


def write_csv(rows: list, path: str, machine: str = "") -> None:
    names = [f.name for f in fields(Row)] + ["machine"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({**asdict(r), "machine": machine})


COLORS = {"no weights": "#4C72B0", "weight (full)": "#DD8452", "pos_weight": "#55A868"}


def _color(config_label: str) -> str:
    return COLORS.get(
        config_label, COLORS["pos_weight"] if config_label.startswith("pos_weight") else "#8172B3"
    )


def _at_floor(r) -> float | None:
    """``torch ms / floor ms``: the speed-up of a call that took the floor's time (None without a floor)."""
    return r.torch_ms / r.floor_ms if r.floor_ms else None


def plot(rows: list, path: str, title: str, subtitle: str = "") -> None:
    """Grouped horizontal bars of the speed-up per size and configuration, one panel per mode; a hollow
    diamond marks the speed-up a call taking the floor's time would have (see the table's floor column),
    drawn under the value labels, which stay readable where the two meet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    sizes = list(dict.fromkeys((r.size, r.shape) for r in rows))
    kinds = list(dict.fromkeys(r.config.split(" (")[0] for r in rows))  # no weights / weight / pos_weight
    vals = [r.speedup for r in rows] + [_at_floor(r) for r in rows if _at_floor(r)]
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    log = hi / lo > 6
    height = 0.8 / max(len(kinds), 1)
    fig, axes = plt.subplots(
        1, len(modes), figsize=(6.2 * len(modes), 1.6 + 1.15 * len(sizes)), squeeze=False, sharex=True
    )
    floor_label = "torch ms / floor ms: the speed-up of a call as fast as the floor"
    floor_labelled = False
    for ax, mode in zip(axes[0], modes):
        ax.axvspan(1.0, hi * 10, color="#2ca02c", alpha=0.06, lw=0)
        ax.axvspan(lo / 10 if log else 0, 1.0, color="#d62728", alpha=0.06, lw=0)
        for i, sz in enumerate(sizes):
            for j, kind in enumerate(kinds):
                match = [
                    r
                    for r in rows
                    if r.mode == mode and (r.size, r.shape) == sz and r.config.split(" (")[0] == kind
                ]
                if not match:
                    continue
                r = match[0]
                yv = i - 0.4 + height * (j + 0.5)
                ax.barh(
                    yv, r.speedup, height=height * 0.9, color=_color(r.config), label=kind if i == 0 else None
                )
                ax.errorbar(
                    r.speedup,
                    yv,
                    xerr=[[r.speedup - r.speedup_min], [r.speedup_max - r.speedup]],
                    fmt="none",
                    ecolor="#333",
                    elinewidth=0.8,
                    capsize=2,
                    alpha=0.6,
                )
                if _at_floor(r):
                    ax.plot(
                        _at_floor(r), yv, marker="D", ms=4.5, mfc="white", mec="#333", mew=1.0, ls="none",
                        label=floor_label if not floor_labelled else None, zorder=2.5,
                    )  # fmt: skip
                    floor_labelled = True
                ax.annotate(
                    f"{r.speedup:.2f}x",
                    (r.speedup, yv),
                    xytext=(5, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8.5,
                    fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
                )
        ax.axvline(1.0, ls="--", color="k", lw=1.2)
        ax.set_yticks(range(len(sizes)), [f"{s}\n{shape}" for s, shape in sizes])
        ax.set_ylim(len(sizes) - 0.5, -0.5)
        ax.set_title({"fwd+bwd": "forward + backward", "fwd": "forward only (no_grad)"}[mode])
        ax.set_xlabel(
            "speed-up vs torch (> 1: bcelogits faster)\nbar: median of same-round ratios; whisker: min-max"
        )
        ax.grid(axis="x", alpha=0.3)
    if log:
        axes[0][0].set_xscale("log")
        axes[0][0].set_xlim(lo / 1.6, hi * 2.2)
    else:
        axes[0][0].set_xlim(0, hi * 1.3)
    from matplotlib.ticker import FuncFormatter

    for ax in axes[0]:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    fig.legend(*_legend_entries(axes, floor_label), loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.16 if len(sizes) < 3 else 0.12, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _legend_entries(axes, floor_label: str) -> tuple[list, list]:
    """Every mark of the chart: the bar colours (configurations), the whisker, the floor diamond, the
    parity line and the two shaded halves."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = axes[0][0].get_legend_handles_labels()  # bars (and the diamond, if drawn)
    bars = [(h, lab) for h, lab in zip(handles, labels) if lab != floor_label]
    entries = [(h, f"bar: {lab}") for h, lab in bars]
    entries.append(
        (Line2D([], [], color="#333", lw=0.8, marker="|", ms=6), "whisker: lowest-highest same-round ratio")
    )
    if floor_label in labels:
        diamond = Line2D([], [], marker="D", ms=4.5, mfc="white", mec="#333", mew=1.0, ls="none")
        entries.append((diamond, floor_label))
    entries.append((Line2D([], [], ls="--", color="k", lw=1.2), "1x: as fast as torch"))
    entries.append((Patch(color="#2ca02c", alpha=0.15), "right of 1x: bcelogits faster"))
    entries.append((Patch(color="#d62728", alpha=0.15), "left of 1x: torch faster"))
    return [h for h, _ in entries], [lab for _, lab in entries]


# --------------------------------------------------------------------------------------------- main
def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _parse_shapes(spec) -> list[tuple]:
    """Shapes from a list (of shapes or element counts) or a string like '16M,84M,2**28,1x16777216'.

    An element count ``n`` becomes the shape ``(n // 1024, 1024)`` when 1024 divides it, else ``(n,)``;
    ``AxBxC`` is that shape exactly (the defaults' (1, 16777216) or (64, 80, 128, 128))."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if not spec:
        raise ValueError("no sizes given: use e.g. --sizes 4M,16M or --sizes 1x16777216")
    out = []
    for s in spec:
        if isinstance(s, (tuple, list)):
            shape = tuple(int(d) for d in s)
            if not shape or min(shape) < 1:
                raise ValueError(f"cannot use shape {s!r}: every dimension must be >= 1")
            out.append(shape)
            continue
        if isinstance(s, str):
            u = s.upper()
            if re.fullmatch(r"\d+(X\d+)+", u):
                shape = tuple(int(d) for d in u.split("X"))
                if min(shape) < 1:
                    raise ValueError(f"cannot use shape {s!r}: every dimension must be >= 1")
                out.append(shape)
                continue
            m = re.fullmatch(r"(\d+(?:\.\d*)?(?:E\d+)?)([KMG]?)", u)
            if m:
                v = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
            elif re.fullmatch(r"2\*\*\d+", s):
                v = 2 ** int(s[3:])
            else:
                raise ValueError(f"cannot read size {s!r}: use e.g. 16M, 1e6, 2**28 or a shape like 8x1024")
            if v != int(v) or v < 1:
                raise ValueError(f"cannot use size {s!r}: a size is a whole number of elements, at least 1")
            n = int(v)
        else:
            n = int(s)
            if n < 1:
                raise ValueError(f"cannot use size {s!r}: at least 1 element")
        out.append((n // 1024, 1024) if n % 1024 == 0 else (n,))
    return out


def _check_writable(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written (its folder is missing or read-only), or None: checked before
    minutes of measuring, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"{flag} {path}: the folder {folder} is not writable"
    if os.path.isdir(path):
        return f"{flag} {path}: that is a folder; give a file name"
    return None


def main(args) -> int:
    """``bcelogits bench``: args has quick, device, plot, csv, repeats (and optionally shapes / sizes,
    memory, threads, configs, modes for programmatic use)."""
    device = getattr(args, "device", "cpu") or "cpu"
    quick = bool(getattr(args, "quick", False))
    repeats = getattr(args, "repeats", None)
    if repeats is not None and repeats < 1:
        print(f"bcelogits bench: --repeats must be >= 1, got {repeats}", file=sys.stderr)
        return 2
    if getattr(args, "plot", None) and not _have_matplotlib():
        print(
            "bcelogits bench: --plot needs matplotlib, which is not installed: "
            "pip install 'bcelogits[bench]' (or drop --plot)",
            file=sys.stderr,
        )
        return 2
    for flag in ("csv", "plot"):
        why = getattr(args, flag, None) and _check_writable(getattr(args, flag), "--" + flag)
        if why:
            print(f"bcelogits bench: {why}", file=sys.stderr)
            return 2
    try:
        import torch
    except ImportError:
        print("bcelogits bench needs PyTorch: pip install 'bcelogits[torch]'", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"bcelogits bench: --device cuda, but CUDA is not available here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}; no GPU visible). Run on a CUDA machine or use "
            "--device cpu.",
            file=sys.stderr,
        )
        return 2

    shapes = getattr(args, "shapes", None) or getattr(args, "sizes", None)
    try:
        shapes = _parse_shapes(shapes) if shapes else None
    except ValueError as exc:
        print(f"bcelogits bench: {exc}", file=sys.stderr)
        return 2
    if shapes is None:
        shapes = CUDA_SHAPES if device == "cuda" else QUICK_SHAPES if quick else CPU_SHAPES
    cells = make_cells(
        shapes, getattr(args, "configs", None) or CONFIGS, getattr(args, "modes", None) or MODES
    )
    if repeats is None:
        repeats = DEFAULT_REPEATS["cuda" if device == "cuda" else "quick" if quick else "full"]
        full_cpu = device != "cuda" and not quick
        budget = CELL_BUDGET_S if full_cpu else None
        min_s = CELL_MIN_S if full_cpu else None
    else:  # exactly the rounds asked for
        budget = min_s = None
    memory = getattr(args, "memory", None)
    memory = (not quick) if memory is None else bool(memory)

    result = run(
        cells,
        repeats,
        device=device,
        memory=memory,
        threads=getattr(args, "threads", None),
        budget_s=budget,
        min_s=min_s,
        progress=getattr(args, "progress", True),
    )
    title = (
        f"bcelogits {_version()} vs torch.nn.functional.binary_cross_entropy_with_logits "
        f"({device}, float32, reduction='mean'{', quick' if quick else ''})"
    )
    print(report(result, device, title, quick=quick and device != "cuda"))
    machine = machine_line(device)
    if getattr(args, "csv", None):
        write_csv(result.rows, args.csv, machine)
        print(f"\nwrote {args.csv}")
    if getattr(args, "plot", None):
        backends = ", ".join(sorted({r.backend for r in result.rows}))
        plot(
            result.rows,
            args.plot,
            f"bcelogits vs torch BCEWithLogits ({device}, float32, mean; bcelogits backend: {backends})",
            machine,
        )
        print(f"wrote {args.plot}")
    return 130 if result.interrupted else 0


def _version() -> str:
    import bcelogits

    return bcelogits.__version__
