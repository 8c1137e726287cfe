"""Run the public API through the Triton kernels (interpreter on CPU tensors) and through the plain
path, for every reduction and option, and compare values and gradients. Exits non-zero on mismatch.
Run in its own process: TRITON_INTERPRET must be set before triton is imported."""

import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import bcelogits  # noqa: E402
from bcelogits import kernels  # noqa: E402

torch.manual_seed(0)
failures = []
shape = (3, 5, 7)
x0 = torch.randn(shape, dtype=torch.float64) * 4
y0 = torch.rand(shape, dtype=torch.float64)
y0[0, 0, :3] = -1.0  # ignored where ignore_index=-1
w = torch.rand(7, dtype=torch.float64) + 0.1
p = torch.rand(5, dtype=torch.float64) * 3 + 0.2
configs = [
    {},
    {"ignore_index": -1.0},
    {"label_smoothing": 0.1},
    {"focal_gamma": 2.0},
    {"class_dim": 1},
    {"ignore_index": -1.0, "focal_gamma": 0.5, "label_smoothing": 0.2, "class_dim": 1},
]
for dtype, red, opts in itertools.product(
    (torch.float32, torch.float64), ("none", "mean", "sum", "weighted_mean"), configs
):
    pw = p if opts.get("class_dim") == 1 else None
    results = {}
    for route in ("plain", "triton"):
        x = x0.to(dtype).requires_grad_(True)
        y = y0.to(dtype)
        if "ignore_index" not in opts:
            y = y.clamp(0, 1)
        with kernels.use(route):
            assert (
                route == "plain"
                or kernels.choose(
                    bcelogits._args.parse(x, y, w, pw, red, bcelogits._args.check_options(**opts))
                )
                is not None
            ), "triton route not taken"
            loss = bcelogits.binary_cross_entropy_with_logits(x, y, w, reduction=red, pos_weight=pw, **opts)
            (g,) = torch.autograd.grad(loss.sum() * 1.5, x)
        results[route] = (loss.detach().double(), g.double())
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for i, what in enumerate(("loss", "grad")):
        try:
            torch.testing.assert_close(results["triton"][i], results["plain"][i], **tol)
        except AssertionError as exc:
            failures.append(f"{dtype} {red} {opts} {what}: {exc}")
print(f"triton route: {len(failures)} mismatches")
for f in failures[:10]:
    print(f)
sys.exit(1 if failures else 0)
