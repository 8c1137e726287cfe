r"""SigLIP, the pairwise sigmoid loss of image and text features: in blocks on one device, and with the
text features passed around a ring of ranks over ``torch.distributed``.

For a batch of ``N`` pairs (row ``i`` of ``image_features`` belongs with row ``i`` of ``text_features``),

.. math::

    L = \frac{1}{N}\sum_{i=1}^{N}\sum_{j=1}^{N} -\log\sigma\big(z_{ij}\,(t\,x_i\cdot y_j + b)\big),
    \qquad z_{ij} = \begin{cases} +1 & i = j \\ -1 & i \ne j \end{cases}

(Zhai et al. 2023; the normalisation of open_clip's ``SigLipLoss``). Each term is the binary
cross-entropy of the logit :math:`\ell_{ij} = t\,x_i\cdot y_j + b` against the target
:math:`[i = j]`, so a block of logits goes through this package's fused elementwise pass
(:func:`bcelogits.loss_and_grad`), which gives the block's loss and :math:`G = \sigma(\ell) - [i=j]`
in one pass. The gradients follow from G:

.. math::

    \frac{\partial L}{\partial x_i} = \frac{t}{N}\sum_j G_{ij}\,y_j,\quad
    \frac{\partial L}{\partial y_j} = \frac{t}{N}\sum_i G_{ij}\,x_i,\quad
    \frac{\partial L}{\partial t} = \frac{1}{N}\sum_i x_i\cdot\sum_j G_{ij}\,y_j,\quad
    \frac{\partial L}{\partial b} = \frac{1}{N}\sum_{ij} G_{ij}.

The N×N logits never exist: the forward pass walks over ``block_size``-square blocks and accumulates
these four gradients as it goes, so what is kept for backward is two N×D tensors and two scalars, and the
working memory is a few blocks (docs/distributed.md gives the measurements, and why the gradient is
formed in the forward pass rather than recomputed in backward).

Across ranks (``process_group=``) each rank holds its own pairs. The text features travel once around
the ring of ranks, each rank's rows meeting every text of the global batch; the gradient of each text
block travels with it, every rank adding its part, and arrives back at its owner after the last step.
Nothing is exchanged in backward.
"""

from __future__ import annotations

import math

import torch

from . import _args
from .functional import binary_cross_entropy_with_logits, loss_and_grad

# Blocks of 1024 x 1024: a block's few temporaries (logits, gradient, target; 4 MiB each in float32) fit
# the 10 % goal at N = 16,384 beside the two N x D gradients, and are big enough that the matrix products
# run at full speed (benchmarks/siglip.py).
DEFAULT_BLOCK_SIZE = 1024


def siglip_loss(
    image_features, text_features, logit_scale, logit_bias, *, process_group=None, block_size=None
):
    r"""The SigLIP loss of ``N`` image-text pairs, exact, in O(N·D) memory (never the N×N logits).

    .. math::

        L = \frac{1}{N}\sum_{i,j} -\log\sigma\big(z_{ij}(t\,x_i\cdot y_j + b)\big),\quad z_{ii} = 1,\
        z_{i\ne j} = -1

    Args:
        image_features: ``(N, D)`` floating-point tensor ``x`` (usually L2-normalised).
        text_features: ``(N, D)`` tensor ``y`` of the same dtype and device; row ``i`` pairs with image ``i``.
        logit_scale: the multiplier ``t`` itself, a 0-dim tensor or a number (open_clip passes
            ``logit_scale.exp()``).
        logit_bias: ``b``, a 0-dim tensor, a number, or None (no bias).
        process_group: a ``torch.distributed`` group. Each rank passes its own ``N`` pairs (equal on every
            rank); its rows are scored against the texts of all ranks, and the result is its share, the sum
            over its rows divided by its own ``N``: the mean of the ranks' results is the loss of the global
            batch, and DDP's averaged gradients are the global batch's gradients. None: this batch only.
        block_size: side of the square blocks the logits are computed in (default 1024). Only memory and
            speed depend on it.

    Returns:
        The loss, a 0-dim tensor of the features' dtype, differentiable with respect to both feature sets,
        ``logit_scale`` and ``logit_bias``. 16-bit features are computed in float32.

    Raises:
        ValueError: features that are not 2-D, of different ``D`` or batch size, non-scalar scale or bias,
            and ranks of a group whose shapes or dtypes disagree (raised on every rank).
        bcelogits.DTypeError: non-floating or mismatched feature dtypes.
        RuntimeError: a process group while torch.distributed is not initialised.

    >>> import torch, bcelogits
    >>> img = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    >>> txt = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    >>> t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    >>> logits = t * img @ txt.T + b
    >>> z = 2 * torch.eye(6, dtype=torch.float64) - 1
    >>> direct = -torch.nn.functional.logsigmoid(z * logits).sum() / 6
    >>> bool(torch.isclose(bcelogits.siglip_loss(img, txt, t, b, block_size=4), direct, rtol=1e-14))
    True
    """
    block = _args.check_block_size(block_size) or DEFAULT_BLOCK_SIZE
    problem = _args.siglip_problem(image_features, text_features, logit_scale, logit_bias)
    if process_group is None:
        _args.raise_problem(problem)
        group = None
    else:
        _args.check_process_group(process_group, f"{_args.SIGLIP}()")
        _agree_across_ranks(image_features, text_features, problem, process_group)
        group = process_group
    img, txt = image_features, text_features
    scale = _as_tensor(logit_scale, img)
    bias = _as_tensor(0.0 if logit_bias is None else logit_bias, img)
    # (A Function's needs_input_grad does not see torch.no_grad(): the grad mode is passed on.)
    return _SigLIPFunction.apply(img, txt, scale, bias, group, block, torch.is_grad_enabled())


def _as_tensor(s, like):
    return (
        s if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=torch.float64, device=like.device)
    )


def _compute_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------------------------- the blocks
class _Targets:
    """Contiguous targets of the blocks (0 everywhere, 1 on the diagonal of a diagonal block), made once per
    shape: a view of one big tensor would be strided, and the fused pass would copy it every block."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.cache = dtype, device, {}

    def get(self, rows: int, cols: int, diagonal: bool):
        key = (rows, cols, diagonal)
        t = self.cache.get(key)
        if t is None:
            t = torch.zeros(rows, cols, dtype=self.dtype, device=self.device)
            if diagonal:
                t.fill_diagonal_(1.0)
            self.cache[key] = t
        return t


class _Sums:
    """What the blocks accumulate for one rank's rows: the loss sum (a float64 scalar, kept as a tensor so
    that a GPU never waits for the host) and, per row, ``[A_i, s_i]``: A = Σ_j G_ij y_j (the image gradient
    / t) and s_i = Σ_j G_ij (Σ_i s_i is the bias gradient), formed by one product with the texts and a
    column of ones (a separate sum over each block of G cost as much as the product on a loaded CPU)."""

    def __init__(self, img, want_grad: bool):
        self.loss = torch.zeros((), dtype=torch.float64, device=img.device)
        self.img_acc = img.new_zeros(img.shape[0], img.shape[1] + 1) if want_grad else None

    @property
    def image(self):
        return self.img_acc[:, :-1]

    @property
    def g_sum(self):
        return self.img_acc[:, -1].sum(dtype=torch.float64)


def _score(img, txt, scale, bias, sums: _Sums, txt_acc, diagonal: bool, block: int, targets: _Targets):
    """Add the blocks of ``img`` (rows) against ``txt`` (columns) to ``sums``, and Σ_i G_ij x_i to
    ``txt_acc`` (the text gradient / t) when gradients are wanted. ``diagonal``: row k of ``img`` and row k
    of ``txt`` are a pair (the positives are on the diagonal of the diagonal blocks)."""
    n, m = img.shape[0], txt.shape[0]
    want_grad = sums.img_acc is not None
    for j0 in range(0, m, block):  # a block of texts, scaled by t once, against every block of rows
        j1 = min(j0 + block, m)
        cols = txt[j0:j1]
        scaled_cols = cols * scale
        if want_grad:  # [y_j, 1]: G @ it gives [A_i, s_i] in one product
            cols_ones = torch.cat([cols, cols.new_ones(j1 - j0, 1)], dim=1)
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            rows = img[i0:i1]
            logits = torch.addmm(bias, rows, scaled_cols.T)
            target = targets.get(i1 - i0, j1 - j0, diagonal and i0 == j0)
            if not want_grad:
                sums.loss += binary_cross_entropy_with_logits(logits, target, reduction="sum")
                continue
            loss, g = loss_and_grad(logits, target, reduction="sum")  # g = sigmoid(logits) - target
            del logits
            sums.loss += loss
            sums.img_acc[i0:i1].addmm_(g, cols_ones)
            txt_acc[j0:j1].addmm_(g.T, rows)


def _local(img, txt, scale, bias, block: int, want_grad: bool):
    """(loss sum, Σ G, image acc, text acc) of one batch against itself."""
    sums = _Sums(img, want_grad)
    txt_acc = torch.zeros_like(txt) if want_grad else None
    _score(img, txt, scale, bias, sums, txt_acc, True, block, _Targets(img.dtype, img.device))
    return sums, txt_acc


def _ring(img, txt, scale, bias, block: int, want_grad: bool, group):
    """(loss sum, Σ G, image acc, text acc) of this rank's rows against the texts of every rank in
    ``group``. Step k: this rank holds the texts of rank r - k (and the gradient other ranks have added
    to them so far), sends them on to rank r + 1 while it scores its rows against them, adds its own part
    of their gradient, and sends that on too. After world_size steps every text block has met every
    rank's rows and its gradient has arrived back at its owner."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return _local(img, txt, scale, bias, block, want_grad)
    to_rank = dist.get_global_rank(group, (rank + 1) % world)
    from_rank = dist.get_global_rank(group, (rank - 1) % world)
    sums, targets = _Sums(img, want_grad), _Targets(img.dtype, img.device)
    held_txt = txt.contiguous()
    held_acc = torch.zeros_like(held_txt) if want_grad else None
    for step in range(world):
        last = step == world - 1
        pending = []
        if not last:  # the texts go on ahead; the scoring below overlaps with their transfer
            next_txt = torch.empty_like(held_txt)
            pending += _exchange(dist, group, held_txt, next_txt, to_rank, from_rank, 2 * step)
        _score(img, held_txt, scale, bias, sums, held_acc, step == 0, block, targets)
        if want_grad:
            next_acc = torch.empty_like(held_acc)
            pending += _exchange(dist, group, held_acc, next_acc, to_rank, from_rank, 2 * step + 1)
        for request in pending:
            request.wait()
        if not last:
            held_txt = next_txt
        if want_grad:
            held_acc = next_acc
    return sums, held_acc


def _exchange(dist, group, send, recv, to_rank: int, from_rank: int, tag: int):
    ops = [
        dist.P2POp(dist.isend, send, to_rank, group, tag),
        dist.P2POp(dist.irecv, recv, from_rank, group, tag),
    ]
    return dist.batch_isend_irecv(ops)


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _agree_across_ranks(img, txt, problem, group) -> None:
    """Every rank learns every rank's local problem and shapes (one small all_gather), and every rank
    raises the same error when any rank has a problem or the ranks' shapes or dtypes differ: a rank that
    raised alone would leave the others waiting in the exchange."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    if problem is None:
        dt = _DTYPES.index(img.dtype) if img.dtype in _DTYPES else len(_DTYPES)
        mine = [0, img.shape[0], img.shape[1], dt]
    else:
        mine = [1, -1, -1, -1]
    world = dist.get_world_size(group)
    mine_t = torch.tensor(mine, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine_t) for _ in range(world)]
    dist.all_gather(everyone, mine_t, group=group)
    rows = [t.tolist() for t in everyone]
    if problem is not None:
        raise problem[0](problem[1])
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(
            f"{_args.SIGLIP}: the arguments on rank(s) {failed} of process_group are invalid (their "
            f"error says "
            "why); every rank of the group raises, so that none waits for the others"
        )
    if len({tuple(row[1:]) for row in rows}) > 1:
        shapes = ", ".join(
            f"rank {r}: ({row[1]}, {row[2]}) {_DTYPES[row[3]] if row[3] < len(_DTYPES) else '?'}"
            for r, row in enumerate(rows)
        )
        raise ValueError(
            f"{_args.SIGLIP}: every rank of process_group must pass features of one shape and dtype (the "
            f"same "
            f"local batch size N and dimension D), got {shapes}; pad or drop pairs so that the local batches "
            "are equal (e.g. drop_last=True in the DataLoader)"
        )


# --------------------------------------------------------------------------------------------- autograd
class _SigLIPFunction(torch.autograd.Function):
    """Forward forms the loss and, when anything needs one, all four gradients (the blocks' G is used at
    once and dropped); backward scales them by the incoming gradient. Distributed: the text gradient holds
    every rank's part, each formed for a grad_output of 1, so every rank must scale its loss alike (as
    ``loss.backward()`` on every rank, or a GradScaler, does)."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, group, block, grad_enabled):
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:4])
        want_grad = any(needs)
        dtype = _compute_dtype(img.dtype)
        x, y = img.to(dtype), txt.to(dtype)
        t, b = scale.detach().to(dtype).reshape(()), bias.detach().to(dtype).reshape(())
        n = x.shape[0]
        if group is None:
            sums, txt_acc = _local(x, y, t, b, block, want_grad)
        else:
            sums, txt_acc = _ring(x, y, t, b, block, want_grad, group)
        loss = (sums.loss / n if n else sums.loss * math.nan).to(img.dtype)
        ctx.grads = None
        if want_grad:
            inv_n = 1.0 / n if n else 0.0
            grads = [None] * 4
            if needs[2]:  # dL/dt = (1/N) sum_i x_i . A_i, a block of rows at a time (no N x D temporary)
                acc = sums.image
                grads[2] = (
                    sum(
                        (x[i : i + block] * acc[i : i + block]).sum(dtype=torch.float64)
                        for i in range(0, n, block)
                    )
                    * inv_n
                    if n
                    else torch.zeros((), dtype=torch.float64, device=x.device)
                )
            if needs[0]:
                grads[0] = sums.image.mul_(t * inv_n)
            if needs[1]:
                grads[1] = txt_acc.mul_(t * inv_n)
            if needs[3]:
                grads[3] = sums.g_sum * inv_n
            for k, like in enumerate((img, txt, scale, bias)):
                if grads[k] is not None:
                    grads[k] = grads[k].to(like.dtype).reshape(like.shape)
            ctx.grads = grads
        ctx.distributed = group is not None
        if not ctx.distributed:
            ctx.block = block
            ctx.save_for_backward(img, txt, scale, bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        grads, ctx.grads = ctx.grads, None  # handed over (and scaled in place): no copy of N x D tensors
        if grads is None:  # a second backward through the same graph (retain_graph=True)
            if ctx.distributed:
                raise RuntimeError(
                    f"{_args.SIGLIP}: a distributed loss can be differentiated once (its gradients were "
                    f"formed "
                    "with the other ranks in forward); run the forward pass again for another backward"
                )
            img, txt, scale, bias = ctx.saved_tensors
            with torch.enable_grad():
                again = [
                    a.detach().requires_grad_(ctx.needs_input_grad[k])
                    for k, a in enumerate(ctx.saved_tensors)
                ]
                loss = _SigLIPFunction.apply(*again, None, ctx.block, True)
            grads = list(torch.autograd.grad(loss, [a for a in again if a.requires_grad]))
            grads = [grads.pop(0) if a.requires_grad else None for a in again]
        unit = go.device.type == "cpu" and float(go) == 1.0
        out = []
        for g in grads:
            if g is not None and not unit:
                g = g.mul_(go.to(g.dtype)) if g.ndim else g * go.to(g.dtype)
            out.append(g)
        return (*out, None, None, None)


class SigLIPLoss(torch.nn.Module):
    r"""The SigLIP loss as a module: ``SigLIPLoss(process_group=None, block_size=None)(image_features,
    text_features, logit_scale, logit_bias)`` is :func:`bcelogits.siglip_loss` of the four tensors.

    >>> import torch, bcelogits
    >>> img, txt = torch.eye(3), torch.eye(3)
    >>> bcelogits.SigLIPLoss()(img, txt, torch.tensor(10.0), torch.tensor(-5.0))
    tensor(0.0201)
    """

    def __init__(self, *, process_group=None, block_size: int | None = None) -> None:
        super().__init__()
        self.process_group = process_group
        self.block_size = _args.check_block_size(block_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):
        return siglip_loss(
            image_features, text_features, logit_scale, logit_bias,
            process_group=self.process_group, block_size=self.block_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return "" if self.block_size is None else f"block_size={self.block_size}"
