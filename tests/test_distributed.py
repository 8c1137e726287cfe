"""Beyond one device: siglip_loss across ranks and the global mean (process_group= / normalizer=), against the
single-process result on the concatenated batch.

The multi-rank tests start 1, 2, 3 and 4 processes once per group size (this file run as a script with
``--worker``), on gloo over 127.0.0.1 only (a free port; GLOO_SOCKET_IFNAME=lo), with a timeout on
init_process_group and on the wait for the processes, which are killed on any failure. Every rank runs every
scenario and saves what it computed; the checks here compare that with references computed in this process
from the definitions (torch's own operators and autograd on the whole batch), never with our own code.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bcelogits
from bcelogits import binary_cross_entropy_with_logits as bce
from bcelogits import loss_denominator, siglip_loss

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
N_LOCAL, DIM = 5, 6  # siglip: pairs per rank, feature dimension
IGNORE = -100.0
WORLDS = [1, 2, 3, 4]
MAX_WORLD = WORLDS[-1]
GROUP_TIMEOUT_S = 300  # all 4 processes together (they start torch at once on 2 loaded cores)


# --------------------------------------------------------------------------------------------- shared data
def siglip_data(world: int, dtype=torch.float64):
    """The global batch: image and text features (world * N_LOCAL pairs), scale, bias."""
    g = torch.Generator().manual_seed(1234)
    n = world * N_LOCAL
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64) + 1.5 * img, dim=1)
    return img.to(dtype), txt.to(dtype), torch.tensor(8.0, dtype=dtype), torch.tensor(-4.0, dtype=dtype)


def siglip_reference(img, txt, scale, bias, rows=None):
    """The definition on the whole batch (unchunked, torch's logsigmoid); ``rows``: only those rows' terms,
    divided by their count (one rank's share, as open_clip returns it)."""
    n = img.shape[0]
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(n, dtype=logits.dtype) - 1
    terms = -F.logsigmoid(z * logits)
    if rows is None:
        return terms.sum() / n
    return terms[rows].sum() / (rows.stop - rows.start)


def mean_data(world: int):
    """Per rank: inputs (n_r, 5) with n_r = 4 + 2r (unequal batches), targets (n_r, 3) with 2r + 1 ignored
    elements (unequal ignore counts), positive weights."""
    g = torch.Generator().manual_seed(99)
    out = []
    for r in range(world):
        n = 4 + 2 * r
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        y = (torch.rand(n, 3, generator=g, dtype=torch.float64) > 0.5).double()
        y.view(-1)[: 2 * r + 1] = IGNORE
        w = 0.2 + torch.rand(n, 3, generator=g, dtype=torch.float64) * 3
        out.append((x, y, w))
    return out


POS_WEIGHT = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
MEAN_CASES = {
    "mean_ignore": dict(reduction="mean", ignore_index=IGNORE),
    "weighted_ignore": dict(reduction="weighted_mean", ignore_index=IGNORE, use_weight=True),
    "mean_smoothing_pos_weight": dict(reduction="mean", label_smoothing=0.1, pos_weight=True, no_ignore=True),
    "weighted_no_ignore": dict(reduction="weighted_mean", use_weight=True, no_ignore=True),
}


def _case_args(case, x, y, w):
    kw = dict(MEAN_CASES[case])
    weight = w if kw.pop("use_weight", False) else None
    pos_weight = POS_WEIGHT if kw.pop("pos_weight", False) else None
    if kw.pop("no_ignore", False):
        y = y.clamp(min=0.0)
    return y, dict(kw, weight=weight, pos_weight=pos_weight)


def mean_reference(case, world):
    """The mean over the concatenated batch with torch's loss ('none') and torch autograd."""
    model = _linear()
    parts = mean_data(world)
    terms, denoms = [], []
    for x, y, w in parts:
        y, kw = _case_args(case, x, y, w)
        ls = kw.get("label_smoothing", 0.0)
        keep = (y != IGNORE) if kw.get("ignore_index") is not None else torch.ones_like(y, dtype=torch.bool)
        ys = torch.where(keep, y, 0.0) * (1 - ls) + ls / 2
        wt = kw["weight"] if kw["weight"] is not None else torch.ones_like(y)
        el = F.binary_cross_entropy_with_logits(model(x), ys, reduction="none", pos_weight=kw["pos_weight"])
        kept = torch.where(keep, wt if kw["reduction"] == "weighted_mean" else 1.0, 0.0)
        el = el * (wt if kw["reduction"] == "weighted_mean" else 1.0)
        terms.append(torch.where(keep, el, 0.0).sum())
        denoms.append(kept.sum())
    loss = sum(terms) / sum(denoms)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


def _linear():
    torch.manual_seed(7)
    return torch.nn.Linear(5, 3).double()


class _Towers(torch.nn.Module):
    """Two linear towers and SigLIP's learnable scale (as a log) and bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.image = torch.nn.Linear(7, DIM).double()
        self.text = torch.nn.Linear(9, DIM).double()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0, dtype=torch.float64))

    def forward(self, a, c):
        img = F.normalize(self.image(a), dim=1)
        txt = F.normalize(self.text(c), dim=1)
        return img, txt, self.log_scale.exp(), self.bias


def towers_data(world):
    g = torch.Generator().manual_seed(5)
    n = world * N_LOCAL
    f64 = dict(generator=g, dtype=torch.float64)
    return torch.randn(n, 7, **f64), torch.randn(n, 9, **f64)


def _open_clip_loss_module():
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    loader = importlib.util.spec_from_file_location(
        "_open_clip_loss", os.path.join(spec.submodule_search_locations[0], "loss.py")
    )
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------- the worker
def _worker(rank: int, port: int, out_dir: str) -> None:
    """One process of MAX_WORLD: runs the scenarios of every group size w on the group of ranks 0..w-1
    (w = MAX_WORLD: the default group), and the 2-rank SigLIP case once more on ranks 2, 3 (group ranks that
    are not the global ones)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=MAX_WORLD,
        timeout=timedelta(seconds=60),
    )
    res: dict = {}
    for world in WORLDS:
        group = dist.group.WORLD if world == MAX_WORLD else dist.new_group(list(range(world)))  # (all ranks)
        if rank < world:
            res[world] = _scenarios(dist, rank, world, group)
        dist.barrier()
    top = dist.new_group([MAX_WORLD - 2, MAX_WORLD - 1])
    if rank >= MAX_WORLD - 2:
        grank = dist.get_rank(top)
        rows = slice(grank * N_LOCAL, (grank + 1) * N_LOCAL)
        img, txt, t, b = siglip_data(2)
        xs = [a.detach().clone().requires_grad_() for a in (img[rows], txt[rows], t, b)]
        loss = siglip_loss(*xs, process_group=top, block_size=4)
        res["top2"] = (grank, loss.detach(), torch.autograd.grad(loss, xs))
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    del res
    gc.collect()  # (DDP models freed while their group still exists)
    dist.barrier()
    dist.destroy_process_group()


def _scenarios(dist, rank: int, world: int, group) -> dict:
    """What one rank computes in a group of ``world`` ranks (``rank``: its rank in the group)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    # SigLIP: float64 and float32, the default group and one made with new_group, two block sizes
    for dtype in (torch.float64, torch.float32):
        img, txt, t, b = siglip_data(world, dtype)
        for name, block in (("block3", 3), ("default_block", None)):
            xs = leaves(img[rows], txt[rows], t, b)
            loss = siglip_loss(*xs, process_group=group, block_size=block)
            res[f"siglip/{dtype}/{name}"] = (loss.detach(), torch.autograd.grad(loss, xs))

    oc = _open_clip_loss_module()
    if oc is not None:
        img, txt, t, b = siglip_data(world)
        for impl in ("bidir", "shift"):
            xs = leaves(img[rows], txt[rows], t, b)
            loss = oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(*xs)
            res[f"open_clip/{impl}"] = (loss.detach(), torch.autograd.grad(loss, xs))

    # SigLIP under DDP
    a, c = towers_data(world)
    model = DDP(_Towers(), process_group=group)
    loss = siglip_loss(*model(a[rows], c[rows]), process_group=group, block_size=2)
    loss.backward()
    res["ddp_siglip"] = (loss.detach(), [p.grad.clone() for p in model.module.parameters()])

    # the global mean under DDP, each case; and through the module, and normalizer + process_group
    x, y, w = mean_data(world)[rank]
    model = DDP(_linear(), process_group=group)
    for case in MEAN_CASES:
        yc, kw = _case_args(case, x, y, w)
        model.zero_grad()
        loss = bce(model(x), yc, **kw, process_group=group)
        loss.backward()
        res[f"mean/{case}"] = (loss.detach(), [p.grad.clone() for p in model.module.parameters()])
    model.zero_grad()
    crit = bcelogits.BCEWithLogitsLoss(ignore_index=IGNORE, process_group=group)
    loss = crit(model(x), y)
    loss.backward()
    res["mean/module"] = (loss.detach(), [p.grad.clone() for p in model.module.parameters()])
    model.zero_grad()
    total = loss_denominator(y, ignore_index=IGNORE, process_group=group)
    res["denominator"] = total
    loss = bce(model(x), y, ignore_index=IGNORE, normalizer=total, process_group=group)
    loss.backward()
    res["mean/normalizer_and_group"] = (loss.detach(), [p.grad.clone() for p in model.module.parameters()])

    # bad input on some ranks: every rank raises, none hangs
    def attempt(key, fn):
        try:
            fn()
            res[key] = None
        except Exception as exc:  # noqa: BLE001 - the type and message are what the test checks
            res[key] = (type(exc).__name__, str(exc))
        dist.barrier(group=group)  # proof that no rank is left waiting in the exchange

    img, txt, t, b = siglip_data(world)
    mine_img, mine_txt = img[rows], txt[rows]
    if world > 1:
        n_mine = N_LOCAL + (1 if rank == world - 1 else 0)
        big_img, big_txt = siglip_data(world + 1)[:2]
        unequal = big_img[:n_mine], big_txt[:n_mine]
        attempt("error/unequal_n", lambda: siglip_loss(*unequal, t, b, process_group=group))
    bad_txt = torch.randn(N_LOCAL, DIM + 1, dtype=torch.float64) if rank == 0 else mine_txt
    attempt("error/local_d", lambda: siglip_loss(mine_img, bad_txt, t, b, process_group=group))
    bad_img = mine_img.long() if rank == world - 1 else mine_img
    attempt("error/int_features", lambda: siglip_loss(bad_img, mine_txt, t, b, process_group=group))
    attempt("error/not_a_group", lambda: siglip_loss(mine_img, mine_txt, t, b, process_group="WORLD"))
    attempt(
        "error/sum_with_group",
        lambda: bce(torch.zeros_like(y), y.clamp(min=0), reduction="sum", process_group=group),
    )

    def twice():
        xs = leaves(mine_img, mine_txt, t, b)
        loss = siglip_loss(*xs, process_group=group)
        loss.backward(retain_graph=True)
        loss.backward()

    attempt("error/second_backward", twice)
    return res


# --------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    return env


def run_ranks(args_for_rank, world: int, log_dir: str, timeout_s: float) -> None:
    """Start ``world`` processes (``args_for_rank(rank)``), wait for all of them at most ``timeout_s`` in all,
    and kill every one still running on any failure; raise with their logs if one failed."""
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(os.path.join(log_dir, f"log{rank}.txt"), "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args_for_rank(rank)],
                    env=_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = []
        for r, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- rank {r} (exit {procs[r].returncode}):\n{log.read()[-3000:]}")
        for log in logs:
            log.close()
        head = f"ranks {failed} failed or timed out (-9: killed after {timeout_s} s)\n"
        pytest.fail(head + "\n".join(text))
    for log in logs:
        log.close()


@pytest.fixture(scope="module")
def all_ranks(tmp_path_factory):
    """Each of the MAX_WORLD processes' results (started once for every group size)."""
    out = tmp_path_factory.mktemp("ranks")
    port = _free_port()
    run_ranks(lambda r: [HERE, "--worker", str(r), str(port), str(out)], MAX_WORLD, str(out), GROUP_TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(MAX_WORLD)]


@pytest.fixture(params=WORLDS, ids=[f"{w}ranks" for w in WORLDS])
def ranks(request, all_ranks):
    """(world size, each group rank's results) of the group of ranks 0..world-1."""
    world = request.param
    return world, [all_ranks[r][world] for r in range(world)]


# --------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", ["block3", "default_block"])
def test_siglip_matches_single_process(ranks, dtype, group):
    world, res = ranks
    img, txt, t, b = (a.requires_grad_() for a in siglip_data(world))
    full = siglip_reference(img, txt, t, b)
    g_img, g_txt, g_t, g_b = torch.autograd.grad(full, [img, txt, t, b])
    loss_tol, grad_tol = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-5)
    losses = []
    for r in range(world):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        loss, (gi, gt, gs, gb) = res[r][f"siglip/{dtype}/{group}"]
        assert loss.dtype == dtype
        losses.append(loss.double())
        # each rank's own share (its rows against every text, over its N) ...
        share = siglip_reference(img.detach(), txt.detach(), t.detach(), b.detach(), rows)
        torch.testing.assert_close(loss.double(), share, rtol=loss_tol, atol=0)
        # ... and its feature gradients are world x those of the global loss: DDP's average divides by world
        torch.testing.assert_close(gi.double(), world * g_img[rows], rtol=grad_tol, atol=grad_tol)
        torch.testing.assert_close(gt.double(), world * g_txt[rows], rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(sum(losses) / world, full.detach(), rtol=loss_tol, atol=0)
    # the shared scale and bias: the mean over ranks of their local gradients is the global gradient
    for k, want in ((2, g_t), (3, g_b)):
        mean = sum(res[r][f"siglip/{dtype}/{group}"][1][k].double() for r in range(world)) / world
        torch.testing.assert_close(mean, want, rtol=grad_tol, atol=grad_tol)


def test_siglip_on_a_group_whose_ranks_are_not_the_global_ones(all_ranks):
    img, txt, t, b = (a.requires_grad_() for a in siglip_data(2))
    full = siglip_reference(img, txt, t, b)
    g_img, g_txt, g_t, g_b = torch.autograd.grad(full, [img, txt, t, b])
    got = sorted(all_ranks[r]["top2"] for r in (MAX_WORLD - 2, MAX_WORLD - 1))
    assert [g[0] for g in got] == [0, 1]
    torch.testing.assert_close((got[0][1] + got[1][1]) / 2, full.detach(), rtol=1e-12, atol=0)
    for grank, _, (gi, gt, _, _) in got:
        rows = slice(grank * N_LOCAL, (grank + 1) * N_LOCAL)
        torch.testing.assert_close(gi, 2 * g_img[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gt, 2 * g_txt[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((got[0][2][2] + got[1][2][2]) / 2, g_t, rtol=1e-10, atol=1e-12)


def test_siglip_matches_open_clip_distributed(ranks):
    world, res = ranks
    if "open_clip/bidir" not in res[0]:
        pytest.skip(
            "open_clip_torch is not installed (pip install --no-deps open_clip_torch); the single-process "
            "reference above is its formula"
        )
    for r in range(world):
        ours, our_g = res[r]["siglip/torch.float64/block3"]
        for impl in ("bidir", "shift"):
            theirs, their_g = res[r][f"open_clip/{impl}"]
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
            for a, b in zip(our_g, their_g):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_siglip_ddp_gradients_equal_single_process(ranks):
    world, res = ranks
    model = _Towers()
    a, c = towers_data(world)
    img, txt, t, b = model(a, c)
    loss = siglip_reference(img, txt, t, b)
    want = torch.autograd.grad(loss, list(model.parameters()))
    losses = [res[r]["ddp_siglip"][0] for r in range(world)]
    torch.testing.assert_close(sum(losses) / world, loss.detach(), rtol=1e-12, atol=0)
    for r in range(world):
        for got, w in zip(res[r]["ddp_siglip"][1], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [*MEAN_CASES, "module", "normalizer_and_group"])
def test_global_mean_ddp_equals_single_process(ranks, case):
    world, res = ranks
    loss, want = mean_reference("mean_ignore" if case in ("module", "normalizer_and_group") else case, world)
    losses = [res[r][f"mean/{case}"][0] for r in range(world)]
    # the mean over ranks of what each rank returns is the global mean ...
    torch.testing.assert_close(sum(losses) / world, loss.detach(), rtol=1e-12, atol=0)
    # ... and DDP's averaged gradients are its gradients, on every rank
    for r in range(world):
        for got, w in zip(res[r][f"mean/{case}"][1], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-13)
    if world > 1 and case == "mean_ignore":  # the ranks' plain means would not have given it
        plain = [bce(_linear()(x), y, ignore_index=IGNORE) for x, y, _ in mean_data(world)]
        assert abs(float(sum(plain).detach() / world - loss.detach())) > 1e-4


def test_denominator_all_reduced(ranks):
    world, res = ranks
    want = sum(int((y != IGNORE).sum()) for _, y, _ in mean_data(world))
    for r in range(world):
        assert res[r]["denominator"].dtype == torch.float64 and float(res[r]["denominator"]) == want


def test_errors_reach_every_rank(ranks):
    world, res = ranks
    for r in range(world):
        if world > 1:
            kind, msg = res[r]["error/unequal_n"]
            assert kind == "ValueError" and "of one shape and dtype" in msg, msg
            assert f"rank {world - 1}: ({N_LOCAL + 1}, {DIM})" in msg and f"rank 0: ({N_LOCAL}, {DIM})" in msg
        kind, msg = res[r]["error/local_d"]
        assert kind == "ValueError", msg
        assert ("same feature dimension D" if r == 0 else "arguments on rank(s) [0] of process_group") in msg
        kind, msg = res[r]["error/int_features"]
        if r == world - 1:
            assert kind == "DTypeError" and "must be floating-point" in msg
        else:
            assert kind == "ValueError" and f"rank(s) [{world - 1}]" in msg
        kind, msg = res[r]["error/not_a_group"]
        assert kind == "TypeError" and "must be a torch.distributed ProcessGroup" in msg
        kind, msg = res[r]["error/sum_with_group"]
        assert kind == "ValueError" and "needs reduction='mean' or 'weighted_mean'" in msg
        kind, msg = res[r]["error/second_backward"]
        assert kind == "RuntimeError" and "differentiated once" in msg


# --------------------------------------------------------------------------------------------- one process
def _micro_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, k in ((6, 1), (3, 5), (8, 0)):  # unequal sizes and ignore counts
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        y = (torch.rand(n, 4, generator=g, dtype=torch.float64) > 0.4).double()
        y.view(-1)[:k] = IGNORE
        out.append((x, y, 0.5 + torch.rand(n, 4, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean"])
def test_gradient_accumulation_with_normalizer(backend, reduction):
    """Hugging Face's num_items_in_batch recipe: the micro-batches' losses with normalizer = the step's
    denominator add up to the mean over the step's concatenated batch, and so do their gradients."""
    parts = _micro_batches()
    weighted = reduction == "weighted_mean"
    total = sum(loss_denominator(y, w if weighted else None, reduction=reduction, ignore_index=IGNORE)
                for _, y, w in parts)  # fmt: skip
    x_all = torch.cat([x for x, _, _ in parts]).requires_grad_()
    y_all, w_all = torch.cat([y for _, y, _ in parts]), torch.cat([w for _, _, w in parts])
    keep = y_all != IGNORE
    el = F.binary_cross_entropy_with_logits(x_all, torch.where(keep, y_all, 0.0), reduction="none")
    wt = w_all if weighted else torch.ones_like(w_all)
    want = torch.where(keep, el * wt, 0.0).sum() / torch.where(keep, wt, 0.0).sum()
    (want_g,) = torch.autograd.grad(want, [x_all])
    xs = [x.clone().requires_grad_() for x, _, _ in parts]
    got = sum(
        bce(x, y, w if weighted else None, reduction=reduction, ignore_index=IGNORE, normalizer=total)
        for x, (_, y, w) in zip(xs, parts)
    )
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.cat([x.grad for x in xs]), want_g, rtol=1e-12, atol=1e-15)


def test_normalizer_forms_and_module(backend):
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.rand(5, 3, dtype=torch.float64)
    total = F.binary_cross_entropy_with_logits(x, y, reduction="sum")
    for c in (7, 7.0, np.float32(7.0), torch.tensor(7.0), torch.tensor(7, dtype=torch.int64)):
        torch.testing.assert_close(bce(x, y, normalizer=c), total / 7, rtol=1e-15, atol=0)
    crit = bcelogits.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    want = F.binary_cross_entropy_with_logits(x, y, reduction="sum", pos_weight=crit.pos_weight) / 4
    torch.testing.assert_close(crit(x, y, normalizer=4), want, rtol=1e-15, atol=0)
    # float32: rounded once from float64; 16-bit targets give a 16-bit loss (no overflow of a 16-bit sum)
    x32, y32 = x.float(), y.float()
    got = bce(x32, y32, normalizer=3.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), total / 3, rtol=1e-6, atol=0)
    big = torch.zeros(300, 300)
    got16 = bce(big, torch.zeros(300, 300, dtype=torch.float16), normalizer=90000.0)
    assert got16.dtype == torch.float16 and abs(float(got16) - math.log(2)) < 1e-3
    # NumPy
    got_np = bce(x.numpy(), y.numpy(), normalizer=7)
    assert isinstance(got_np, np.ndarray) and abs(float(got_np) - float(total) / 7) < 1e-15
    # zero denominators: an all-ignored step gives 0 with a zero gradient
    xg = x.clone().requires_grad_()
    zero = bce(xg, torch.full_like(y, IGNORE), ignore_index=IGNORE, normalizer=0)
    zero.backward()
    assert float(zero.detach()) == 0.0 and bool((xg.grad == 0).all())


def test_loss_denominator_counts():
    y = torch.tensor([[1.0, IGNORE, 0.0], [IGNORE, IGNORE, 1.0]])
    w = torch.tensor([2.0, 3.0, 5.0])
    assert float(loss_denominator(y)) == 6
    assert float(loss_denominator(y, ignore_index=IGNORE)) == 3
    assert float(loss_denominator(y, w, reduction="weighted_mean", ignore_index=IGNORE)) == 2 + 5 + 5
    assert float(loss_denominator(y, w, reduction="weighted_mean")) == 2 * (2 + 3 + 5)
    assert float(loss_denominator(y, w, reduction="mean")) == 6  # a weight does not change a mean's count
    assert float(loss_denominator(y.numpy(), w.numpy(), reduction="weighted_mean", ignore_index=IGNORE)) == 12


def test_global_mean_bad_input():
    x, y = torch.randn(4, 2), torch.rand(4, 2)
    with pytest.raises(ValueError, match="normalizer= sets the denominator of a mean.*reduction='sum'"):
        bce(x, y, reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="process_group= sets the denominator.*reduction='none'"):
        bce(x, y, reduction="none", process_group=object())
    with pytest.raises(ValueError, match="normalizer must be a finite number >= 0"):
        bce(x, y, normalizer=-1.0)
    with pytest.raises(ValueError, match="normalizer must be a finite number >= 0"):
        bce(x, y, normalizer=float("nan"))
    with pytest.raises(ValueError, match=r"0-dim tensor .*got shape \(2,\)"):
        bce(x, y, normalizer=torch.ones(2))
    with pytest.raises(TypeError, match="normalizer must be a number or a 0-dim tensor"):
        bce(x, y, normalizer="8")
    with pytest.raises(bcelogits.ArgumentTypeError, match="needs torch tensors"):
        bce(x.numpy(), y.numpy(), process_group=object())
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'weighted_mean'"):
        loss_denominator(y, reduction="sum")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            bce(x, y, process_group=object())
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            loss_denominator(y, process_group=object())


def test_import_stays_free_of_torch():
    code = "import sys, bcelogits; bcelogits.loss_denominator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_env())  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_example_runs(tmp_path):
    """examples/05_distributed.py: the DDP + global-mean recipe and a SigLIP step on 2 gloo ranks."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "05_distributed.py")],
        capture_output=True, text=True, timeout=180, env=_env(), cwd=str(tmp_path), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "global mean" in out.stdout and "siglip" in out.stdout.lower(), out.stdout


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
