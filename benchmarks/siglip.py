"""Peak memory and time of ``bcelogits.siglip_loss`` vs open_clip's ``SigLipLoss`` (forward + backward), on
CPU, one process or several gloo ranks on 127.0.0.1.

    python benchmarks/siglip.py single --sizes 4096 8192 16384 32768 --dim 512
    python benchmarks/siglip.py blocks --sizes 8192 --blocks 256 512 1024 2048
    python benchmarks/siglip.py ranks --ranks 1 2 4 --sizes 4096 8192

Peak memory: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during one
forward + backward, minus the resident set before it, with the features (leaves that require grad) already
allocated; it therefore includes the two feature gradients every implementation returns (2 N D floats).
It is reported as a share of one N x N float32 matrix (open_clip keeps the N x N logits for backward).
Time: medians over alternated runs of the two (one of ours, one of theirs, ...), in one process. The machine
may be shared: read the ratios. open_clip's ``loss.py`` is loaded from an installed ``open_clip_torch``
(pip install --no-deps open_clip_torch; its loss needs only torch); without it, its formula restated
(``-logsigmoid(labels * logits).sum() / N``, labels = 2I - 1, the same operations) is used, and the table
says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import bcelogits


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def open_clip_loss():
    """(name, loss(img, txt, scale, bias, rank=0, world=1))."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        loader = importlib.util.spec_from_file_location(
            "_open_clip_loss", os.path.join(spec.submodule_search_locations[0], "loss.py")
        )
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
        version = _dist_version("open_clip_torch")

        def run(img, txt, t, b, rank=0, world=1):
            return mod.SigLipLoss(rank=rank, world_size=world)(img, txt, t, b)

        return f"open_clip {version} SigLipLoss", run

    def formula(img, txt, t, b, rank=0, world=1):
        if world != 1:
            raise SystemExit("the restated formula is single-process only: install open_clip_torch for ranks")
        n = img.shape[0]
        logits = t * img @ txt.T + b
        labels = 2 * torch.eye(n, dtype=img.dtype) - torch.ones(n, n, dtype=img.dtype)
        return -F.logsigmoid(labels * logits).sum() / n

    return "open_clip's formula restated (open_clip_torch not installed)", formula


def _dist_version(name):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def features(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    return img, txt, t, b


def one_step(fn, leaves):
    """(seconds, peak extra MiB) of forward + backward."""
    for a in leaves:
        a.grad = None
    before = _status_mib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    loss = fn(*leaves)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = _status_mib("VmHWM") - before
    return dt, peak, float(loss.detach())


def cmd_single(args):
    name, theirs = open_clip_loss()
    threads = torch.get_num_threads()
    print(f"# single process, float32, D={args.dim}, torch {torch.__version__}, {threads} threads")
    print(f"# theirs: {name}")
    print("| N | N x N float32 | ours peak extra | % of N x N | theirs peak extra | ours s | theirs s | "
          "ours / theirs | loss-only s (ours) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    small = features(256, args.dim)
    one_step(bcelogits.siglip_loss, small)  # warm-up: kernels compiled, thread pool started
    one_step(theirs, small)
    for n in args.sizes:
        leaves = features(n, args.dim)
        nn_mib = n * n * 4 / 2**20
        run_theirs = nn_mib * 8 <= args.max_theirs_mib
        ours, their, fwd = [], [], []
        for _ in range(args.reps):
            ours.append(one_step(lambda *a: bcelogits.siglip_loss(*a, block_size=args.block), leaves))
            if run_theirs:
                their.append(one_step(theirs, leaves))
            with torch.no_grad():
                t0 = time.perf_counter()
                bcelogits.siglip_loss(*leaves, block_size=args.block)
                fwd.append(time.perf_counter() - t0)
        if run_theirs:  # the two agree (float32)
            rel = abs(ours[-1][2] - their[-1][2]) / abs(their[-1][2])
            assert rel < 1e-4, (ours[-1][2], their[-1][2])
        o_t, o_m = statistics.median(r[0] for r in ours), max(r[1] for r in ours)
        if run_theirs:
            t_t, t_m = statistics.median(r[0] for r in their), max(r[1] for r in their)
            th = f"{t_m:.0f} MiB | {o_t:.2f} | {t_t:.2f} | {o_t / t_t:.2f}x"
        else:
            th = f"(not run: ~{8 * nn_mib / 1024:.0f} GiB) | {o_t:.2f} | - | -"
        print(f"| {n} | {nn_mib:.0f} MiB | {o_m:.0f} MiB | {100 * o_m / nn_mib:.1f} % | {th} | "
              f"{statistics.median(fwd):.2f} |", flush=True)  # fmt: skip
        del leaves


def cmd_blocks(args):
    print(f"# block size, float32, D={args.dim}: median s of forward + backward, peak extra MiB")
    print("| N | block | s | peak extra |")
    print("|---|---|---|---|")
    one_step(bcelogits.siglip_loss, features(256, args.dim))
    for n in args.sizes:
        leaves = features(n, args.dim)
        rounds = {b: [] for b in args.blocks}
        for _ in range(args.reps):  # alternated: every block size once per round
            for b in args.blocks:
                rounds[b].append(one_step(lambda *a, b=b: bcelogits.siglip_loss(*a, block_size=b), leaves))
        for b in args.blocks:
            r = rounds[b]
            t, m = statistics.median(x[0] for x in r), max(x[1] for x in r)
            print(f"| {n} | {b} | {t:.2f} | {m:.0f} MiB |")


def _rank_main(rank, world, port, n_global, dim, reps, out):
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = n_global // world
    leaves = features(n, dim, seed=rank)
    group = dist.group.WORLD
    _, theirs = open_clip_loss()

    def ours(*a):
        return bcelogits.siglip_loss(*a, process_group=group)

    def their(*a):
        return theirs(*a, rank=rank, world=world)

    small = features(64, dim, seed=rank)
    one_step(ours, small)
    one_step(their, small)
    res = {"ours": [], "theirs": []}
    for _ in range(reps):
        for key, fn in (("ours", ours), ("theirs", their)):
            dist.barrier()
            res[key].append(one_step(fn, leaves))
    dist.barrier()
    if rank == 0:
        o, t = res["ours"], res["theirs"]
        with open(out, "w") as f:
            f.write(f"{statistics.median(x[0] for x in o)} {max(x[1] for x in o)} "
                    f"{statistics.median(x[0] for x in t)} {max(x[1] for x in t)}\n")  # fmt: skip
    dist.destroy_process_group()


def cmd_ranks(args):
    name, _ = open_clip_loss()
    print(f"# gloo ranks on 127.0.0.1, float32, D={args.dim}; rank 0's peak extra, median s; theirs: {name}")
    print("| global N | ranks | N per rank | ours peak extra | theirs peak extra | ours s | theirs s | "
          "ours / theirs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for world in args.ranks:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = f"/tmp/siglip_bench_{os.getpid()}.txt"
            env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
            procs = [
                subprocess.Popen([sys.executable, __file__, "_rank", str(r), str(world), str(port), str(n),
                                  str(args.dim), str(args.reps), out], env=env)  # fmt: skip
                for r in range(world)
            ]
            try:
                for p in procs:
                    p.wait(timeout=1800)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            if any(p.returncode for p in procs):
                raise SystemExit(f"a rank failed at N={n}, world={world}")
            o_t, o_m, t_t, t_m = (float(v) for v in open(out).read().split())
            os.unlink(out)
            print(f"| {n} | {world} | {n // world} | {o_m:.0f} MiB | {t_m:.0f} MiB | {o_t:.2f} | {t_t:.2f} | "
                  f"{o_t / t_t:.2f}x |", flush=True)  # fmt: skip


def main():
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc raises its mmap threshold after big frees and then keeps freed blocks in the heap, where the
        # resident set no longer shows what is in use; a fixed threshold returns every block >= 64 KiB on free
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        a = sys.argv[2:]
        return _rank_main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["single", "blocks", "ranks"])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-theirs-mib", type=float, default=12 * 1024, help="skip open_clip above this")
    args = p.parse_args()
    {"single": cmd_single, "blocks": cmd_blocks, "ranks": cmd_ranks}[args.mode](args)


if __name__ == "__main__":
    main()
