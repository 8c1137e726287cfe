r"""Fused linear + BCE-with-logits: the loss of a multi-label classifier head whose (N, C) logits never exist.

.. math::

    \mathcal{L} = \mathrm{reduce}_{n,c}\ \ell(z_{nc}, y_{nc}),\qquad z = x W^\top + b,

with :math:`\ell` the elementwise loss of :func:`bcelogits.binary_cross_entropy_with_logits` (pos_weight,
label smoothing, focal term, ignore_index). The classes (and the rows, when N is large) are cut into
blocks; for each block the logits are one matmul, the loss and :math:`G = \partial\mathcal{L}/\partial z`
come from the package's fused elementwise pass (:func:`bcelogits.kernels.forward`, the same pass the
plain loss runs), and the gradients are finished at once:
``grad_input += G @ W[blk]``, ``grad_weight[blk] = G.T @ input``, ``grad_bias[blk] = G.sum(0)``. Backward only
scales them by ``grad_output``. Memory beyond the inputs, their gradients and the target: a few
block-sized buffers (see :func:`plan_blocks`), not the 3-4 N×C tensors of the unfused computation.

Sparse targets (torch COO or CSR tensors, or the tuple ``(row_pointers, column_indices[, values])``) are
turned into CSR once; each row block sorts its entries by column once, and each class block's dense
target slice is written from the entries in its column range: no (N, C) tensor is built.

Under ``torch.compile`` the op is a custom op (``bcelogits::linear_loss``, opaque to the compiler, no graph
break); eager calls use an autograd Function around the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _args, kernels

__all__ = ["LinearBCEWithLogitsLoss", "linear_binary_cross_entropy_with_logits", "plan_blocks"]

# The chunking rule (plan_blocks). The per-block buffers get BUDGET_FRACTION of one N×C float32 tensor,
# clamped to [MIN_BUDGET, MAX_BUDGET]: at the top end a block is millions of elements, where the matmuls
# run at full speed; the fraction keeps the peak extra memory under 5 % of N×C float32 (the goal).
BUDGET_FRACTION = 1 / 25
MIN_BUDGET = 256 << 10
MAX_BUDGET = 64 << 20
# (4 %: the blocks are most of the extra memory, which the goal keeps under 5 %.)
# Fewer classes per block than this makes thin matmuls: below it the rows are split instead.
MIN_BLOCK_CLASSES = 256


def plan_blocks(
    n_rows: int,
    n_classes: int,
    input_bytes: int,
    compute_bytes: int,
    *,
    rows: int = 0,
    classes: int = 0,
    budget: int = 0,
    elementwise: bool = False,
) -> tuple[int, int]:
    """``(rows, classes)`` per block for a problem of ``n_rows`` x ``n_classes`` logits.

    Each block holds the logits (``input_bytes`` per element), the dense target slice and the gradient
    (``compute_bytes`` each), for 16-bit inputs also the float32 copy of the logits the kernel reads and
    the gradient cast back for the matmuls, and for ``elementwise`` ('none') the block's loss. ``budget``
    bytes of those (default: 4 % of one N×C float32 tensor, within [256 KiB, 64 MiB]) give the elements
    per block. All rows are kept in one block when that leaves at least ``MIN_BLOCK_CLASSES`` (256)
    classes per block, so the weight is read once; otherwise blocks are 256 classes wide and the rows are
    split. Sizes are then evened out (no small last block). ``rows`` / ``classes`` override the rule
    (``classes`` alone keeps all rows).

    >>> plan_blocks(512, 670_091, 4, 4)  # Amazon-670K: all rows, 4.5M-element blocks (55 MB)
    (512, 8817)
    >>> plan_blocks(512, 8192, 4, 4)  # small C: 671 KB, too few classes for all rows: rows split
    (171, 256)
    """
    if n_rows == 0 or n_classes == 0:
        return max(n_rows, 1), max(n_classes, 1)
    per_element = input_bytes + 2 * compute_bytes
    if input_bytes < 4:
        per_element += 4 + input_bytes
    if elementwise:
        per_element += compute_bytes
    if not budget:
        budget = min(max(int(BUDGET_FRACTION * 4 * n_rows * n_classes), MIN_BUDGET), MAX_BUDGET)
    elements = max(budget // per_element, 1)
    if rows or classes:
        classes = classes or max(1, min(n_classes, elements // max(rows, 1)))
        rows = rows or n_rows
    elif elements // n_rows >= min(n_classes, MIN_BLOCK_CLASSES):
        rows, classes = n_rows, elements // n_rows
    else:
        classes = min(n_classes, MIN_BLOCK_CLASSES)
        rows = max(1, elements // classes)
    return _even(n_rows, rows), _even(n_classes, classes)


def _even(total: int, size: int) -> int:
    """The block size that cuts ``total`` into as many blocks as ``size`` does, all but the last equal."""
    size = min(size, total)
    blocks = -(-total // size)
    return -(-total // blocks)


# --------------------------------------------------------------------------------------------- targets
class _Targets:
    """The dense target slice of each block, from a dense (N, C) target or from CSR positives."""

    def __init__(self, call: _args.LinearCall, kept):
        self.call, self.kept = call, kept
        self.crow, self.col, self.values = call.crow, call.col, call.values
        if call.form == _args.TargetForm.CSR and kept is not None:
            self._restrict_rows(kept)

    def _restrict_rows(self, kept):
        """CSR of the kept rows only (O(nnz))."""
        starts, lengths = self.crow[kept], (self.crow[1:] - self.crow[:-1])[kept]
        crow = torch.zeros(kept.numel() + 1, dtype=torch.int64, device=kept.device)
        torch.cumsum(lengths, 0, out=crow[1:])
        offsets = torch.arange(int(crow[-1]), device=kept.device) - torch.repeat_interleave(
            crow[:-1], lengths
        )
        pos = torch.repeat_interleave(starts, lengths) + offsets
        self.crow, self.col = crow, self.col[pos]
        self.values = None if self.values is None else self.values[pos]

    def row_block(self, r0: int, r1: int, rows, n_classes: int, block_classes: int):
        """Prepare rows ``r0:r1`` (of the kept rows; ``rows``: their indices, or None for a slice)."""
        self.r0, self.r1, self.rows = r0, r1, rows
        if self.call.form != _args.TargetForm.CSR:
            return
        e0, e1 = int(self.crow[r0]), int(self.crow[r1])
        cols = self.col[e0:e1]
        counts = self.crow[r0 + 1 : r1 + 1] - self.crow[r0:r1]
        local = torch.repeat_interleave(torch.arange(r1 - r0, device=cols.device), counts)
        order = torch.argsort(cols, stable=True)  # one bucketing per row block
        self.cols, self.local = cols[order], local[order]
        self.vals = None if self.values is None else self.values[e0:e1][order]
        edges = torch.arange(0, n_classes + block_classes, block_classes, device=cols.device)
        self.bounds = torch.searchsorted(self.cols, edges.clamp_(max=n_classes)).tolist()

    def block(self, k: int, c0: int, c1: int, buf):
        """The (rows, c1 - c0) target slice of class block ``k`` in the compute dtype, contiguous."""
        call = self.call
        if call.form == _args.TargetForm.DENSE:
            y = call.target[:, c0:c1]
            y = y[self.r0 : self.r1] if self.rows is None else y.index_select(0, self.rows)
            return y.to(call.compute_dtype).contiguous()
        # The buffer is all zeros between blocks: the entries written here are reset by clear() (O(nnz),
        # not a pass over the block).
        y = buf[: (self.r1 - self.r0) * (c1 - c0)].view(self.r1 - self.r0, c1 - c0)
        lo, hi = self.bounds[k], self.bounds[k + 1]
        self.written = None
        if hi > lo:
            v = self.vals[lo:hi] if self.vals is not None else torch.ones((), dtype=y.dtype, device=y.device)
            self.written = (self.local[lo:hi], self.cols[lo:hi] - c0)
            y.index_put_(self.written, v.expand(hi - lo), accumulate=True)
        return y

    def clear(self, y) -> None:
        """Reset the entries :meth:`block` wrote into the buffer view ``y``."""
        if self.call.form == _args.TargetForm.CSR and self.written is not None:
            y.index_put_(self.written, torch.zeros((), dtype=y.dtype, device=y.device))


# --------------------------------------------------------------------------------------------- the pass
@torch.compiler.disable  # opaque to dynamo: the custom op runs it under torch.compile (and a graph that broke
# on a sparse target runs it eagerly, not traced frame by frame)
def _run(call: _args.LinearCall, want_x: bool, want_w: bool, want_b: bool, go=None):
    """The blocked pass. Without ``go``: ``(loss, grad_input, grad_weight, grad_bias)``, the loss a float64
    0-d tensor (or (N, C) in the compute dtype for 'none') and the gradients of the reduced loss (None
    where not wanted). With ``go`` ('none' backward, (N, C)): the gradients of ``sum(go * loss)``."""
    _args.check_linear_values(call)
    x, w, b, opts = call.input, call.weight, call.bias, call.options
    n, d = x.shape
    c = w.shape[0]
    dev, cdt = x.device, call.compute_dtype
    low = x.element_size() < 4
    kept = None if call.ignore_rows is None else torch.nonzero(~call.ignore_rows).reshape(-1)
    n_kept = n if kept is None else kept.numel()
    elementwise = call.reduction == "none"
    rb, cb = plan_blocks(
        n_kept, c, x.element_size(), cdt.itemsize, rows=call.chunk_rows, classes=call.chunk_classes,
        budget=call.memory_budget, elementwise=elementwise,
    )  # fmt: skip
    want_grad = want_x or want_w or want_b
    gx = torch.zeros((n, d), dtype=torch.float32 if low else x.dtype, device=dev) if want_x else None
    gw = (torch.empty if n_kept else torch.zeros)((c, d), dtype=w.dtype, device=dev) if want_w else None
    gb = torch.zeros(c, dtype=cdt, device=dev) if want_b else None
    loss_out = None
    if elementwise and go is None:
        loss_out = torch.zeros((n, c), dtype=cdt, device=dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    counted = call.reduction == "mean" and opts.ignore_index is not None
    count = torch.zeros((), dtype=torch.int64, device=dev) if counted else None
    # The gradient scale of 'mean' goes into the matmuls (alpha) when the denominator is known now.
    alpha = 1.0 / (n_kept * c) if call.reduction == "mean" and not counted and n_kept * c else 1.0
    kernel_options = _args.Options(opts.ignore_index, opts.label_smoothing, None, opts.focal_gamma, False)
    reduction = "none" if elementwise else "sum"
    targets = _Targets(call, kept)
    logits_buf = torch.empty(rb * cb, dtype=x.dtype, device=dev)
    target_buf = torch.zeros(rb * cb, dtype=cdt, device=dev) if call.form == _args.TargetForm.CSR else None
    for r0 in range(0, n_kept, rb):
        r1 = min(r0 + rb, n_kept)
        rows = None if kept is None else kept[r0:r1]
        xr = x[r0:r1] if rows is None else x.index_select(0, rows)
        gxr = None
        if want_x:
            gxr = gx[r0:r1] if rows is None else torch.zeros((r1 - r0, d), dtype=gx.dtype, device=dev)
        targets.row_block(r0, r1, rows, c, cb)
        for k, c0 in enumerate(range(0, c, cb)):
            c1 = min(c0 + cb, c)
            wb = w[c0:c1]
            z = logits_buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            if b is None:  # what F.linear runs (addmm with a bias)
                torch.mm(xr, wb.t(), out=z)
            else:
                torch.addmm(b[c0:c1], xr, wb.t(), out=z)
            y = targets.block(k, c0, c1, target_buf)
            pw = None if call.pos_weight is None else call.pos_weight[c0:c1]
            kc = _args.parse(z, y, None, pw, reduction, kernel_options)
            if go is None:
                if not elementwise:
                    kc.out_dtype = torch.float64  # the block's sum, unrounded, for the float64 total
                fwd = kernels.forward(kc, want_grad=want_grad and not elementwise)
                if elementwise:
                    out = loss_out[:, c0:c1]
                    if rows is None:
                        out[r0:r1] = fwd.loss
                    else:
                        out.index_copy_(0, rows, fwd.loss.to(cdt))
                else:
                    total += fwd.loss
                g = fwd.final_grad() if want_grad and not elementwise else None
                del fwd
            else:
                gob = go[:, c0:c1]
                gob = gob[r0:r1] if rows is None else gob.index_select(0, rows)
                g = kernels.backward_none(kc, gob)
            if counted:
                count += (y != opts.ignore_index).sum()
            targets.clear(y)
            del y, kc  # (each block's buffers are freed before the next block allocates its own)
            if g is None:
                continue
            gm = g.to(x.dtype) if g.dtype != x.dtype else g  # the matmuls in the input's dtype, as autograd
            if want_x:
                if low:
                    gxr.add_(torch.mm(gm, wb), alpha=alpha)
                else:
                    gxr.addmm_(gm, wb, alpha=alpha)
            if want_w:
                gw[c0:c1].addmm_(gm.t(), xr, beta=0.0 if r0 == 0 else 1.0, alpha=alpha)
            if want_b:
                gb[c0:c1].add_(g.sum(0), alpha=alpha)
            del g, gm
        if want_x and rows is not None:
            gx.index_copy_(0, rows, gxr)
    if elementwise and go is None:
        return loss_out, None, None, None
    if call.reduction == "mean":
        denom = count if counted else torch.tensor(n_kept * c, device=dev)
        nan_if_empty = opts.ignore_index is None and call.ignore_rows is None
        safe = torch.where(denom == 0, 1, denom).to(torch.float64)
        loss = total / safe
        loss = torch.where(denom == 0, math.nan if nan_if_empty else 0.0, loss)
        if counted:  # the denominator is known only now
            scale = torch.where(denom == 0, 0.0, 1.0 / safe)
            for t in (gx, gw, gb):
                if t is not None:
                    t.mul_(scale.to(t.dtype))
    else:
        loss = total
    gx = None if gx is None else gx.to(x.dtype)
    gb = None if gb is None else gb.to(b.dtype)
    return loss, gx, gw, gb


def _double_backward_error():
    return RuntimeError(
        f"{_args.LINEAR_FUNCTION}(): double backward (create_graph=True, or a gradient of the gradient) is "
        "not supported: the gradients are computed in the forward pass. Use the unfused "
        "bcelogits.binary_cross_entropy_with_logits(F.linear(input, weight, bias), target) for that"
    )


# --------------------------------------------------------------------------------------------- eager autograd
class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, call, want):
        loss, gx, gw, gb = _run(call, *want)
        ctx.call = call
        ctx.grads = (gx, gw, gb)
        if call.reduction == "none":
            ctx.save_for_backward(x, w, b)
        return loss

    @staticmethod
    def backward(ctx, go):
        if torch.is_grad_enabled():
            raise _double_backward_error()
        call = ctx.call
        if call.reduction == "none":
            x, w, b = ctx.saved_tensors
            c = w.shape[0]
            _, gx, gw, gb = _run(call, *ctx.needs_input_grad[:3], go=go.reshape(-1, c))
            return gx, gw, gb, None, None
        if ctx.grads is None:
            raise RuntimeError(
                f"{_args.LINEAR_FUNCTION}(): a second backward through the same loss (retain_graph=True) is "
                "not supported: its gradients are computed in the forward pass and handed over by the first "
                "backward. Call the loss again for another backward"
            )
        grads, ctx.grads = ctx.grads, None  # handed over: AccumulateGrad takes them without a copy
        one = go.device.type == "cpu" and go.item() == 1.0
        if not one:
            for t in grads:
                if t is not None:
                    t.mul_(go.to(t.dtype))
        return grads[0], grads[1], grads[2], None, None


# --------------------------------------------------------------------------------------------- torch.compile
def _op_call(x, w, b, target, crow, col, values, pos_weight, ignore_rows, reduction, ignore_index,
             label_smoothing, focal_gamma, strict, chunk_rows, chunk_classes, memory_budget):  # fmt: skip
    options = _args.Options(ignore_index, label_smoothing, None, focal_gamma, strict)
    form = _args.TargetForm.DENSE if target is not None else _args.TargetForm.CSR
    cdt = values.dtype if values is not None else target.dtype if target is not None else x.dtype
    cdt = _args.compute_dtype(torch, x.dtype, cdt)
    return _args.LinearCall(
        x, w, b, form, target, crow, col, values, pos_weight, ignore_rows, reduction, options,
        chunk_rows, chunk_classes, memory_budget, cdt, cdt, (x.shape[0],),
    )  # fmt: skip


@torch.library.custom_op("bcelogits::linear_loss", mutates_args=())
def _linear_loss_op(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor | None, crow: Tensor | None, col: Tensor | None,
    values: Tensor | None, pos_weight: Tensor | None, ignore_rows: Tensor | None, reduction: str,
    ignore_index: float | None, label_smoothing: float, focal_gamma: float, strict: bool, chunk_rows: int,
    chunk_classes: int, memory_budget: int, want_x: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, grad_input, grad_weight, grad_bias); empty tensors for the gradients not wanted."""
    call = _op_call(
        x,
        w,
        b,
        target,
        crow,
        col,
        values,
        pos_weight,
        ignore_rows,
        reduction,
        ignore_index,
        label_smoothing,
        focal_gamma,
        strict,
        chunk_rows,
        chunk_classes,
        memory_budget,
    )
    loss, gx, gw, gb = _run(call, want_x, want_w, want_b)
    return loss, *(x.new_empty(0) if g is None else g for g in (gx, gw, gb))  # (outputs may not alias)


@_linear_loss_op.register_fake
def _(x, w, b, target, crow, col, values, pos_weight, ignore_rows, reduction, ignore_index, label_smoothing,
      focal_gamma, strict, chunk_rows, chunk_classes, memory_budget, want_x, want_w, want_b):  # fmt: skip
    cdt = values.dtype if values is not None else target.dtype if target is not None else x.dtype
    cdt = _args.compute_dtype(torch, x.dtype, cdt)
    c = w.shape[0]
    loss = (
        x.new_empty((x.shape[0], c), dtype=cdt)
        if reduction == "none"
        else x.new_empty((), dtype=torch.float64)
    )
    return (
        loss,
        x.new_empty(x.shape if want_x else (0,)),
        w.new_empty(w.shape if want_w else (0,)),
        x.new_empty((c,) if want_b else (0,)),
    )


@torch.library.custom_op("bcelogits::linear_loss_grad_none", mutates_args=())
def _linear_grad_none_op(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor | None, crow: Tensor | None, col: Tensor | None,
    values: Tensor | None, pos_weight: Tensor | None, ignore_rows: Tensor | None, go: Tensor,
    ignore_index: float | None, label_smoothing: float, focal_gamma: float, chunk_rows: int,
    chunk_classes: int, memory_budget: int, want_x: bool, want_w: bool, want_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of ``sum(go * loss)`` for reduction='none' (empty where not wanted)."""
    call = _op_call(
        x,
        w,
        b,
        target,
        crow,
        col,
        values,
        pos_weight,
        ignore_rows,
        "none",
        ignore_index,
        label_smoothing,
        focal_gamma,
        False,
        chunk_rows,
        chunk_classes,
        memory_budget,
    )
    _, gx, gw, gb = _run(call, want_x, want_w, want_b, go=go)
    return tuple(x.new_empty(0) if g is None else g for g in (gx, gw, gb))


@_linear_grad_none_op.register_fake
def _(x, w, b, target, crow, col, values, pos_weight, ignore_rows, go, ignore_index, label_smoothing,
      focal_gamma, chunk_rows, chunk_classes, memory_budget, want_x, want_w, want_b):  # fmt: skip
    c = w.shape[0]
    return (
        x.new_empty(x.shape if want_x else (0,)),
        w.new_empty(w.shape if want_w else (0,)),
        x.new_empty((c,) if want_b else (0,)),
    )


def _op_setup(ctx, inputs, output):
    ctx.args = inputs[9:17]  # reduction .. memory_budget
    ctx.save_for_backward(*inputs[:9], *output[1:])


def _op_backward(ctx, go, _g1, _g2, _g3):
    if torch.is_grad_enabled() and kernels.plain_tensor(go, torch):
        raise _double_backward_error()
    x, w, b, target, crow, col, values, pw, ignore_rows, gx, gw, gb = ctx.saved_tensors
    reduction, ii, ls, fg, _strict, rows, classes, budget = ctx.args
    want = ctx.needs_input_grad[:3]
    if reduction == "none":
        gx, gw, gb = _linear_grad_none_op(
            x, w, b, target, crow, col, values, pw, ignore_rows, go, ii, ls, fg, rows, classes, budget, *want
        )
    grads = []
    for need, g in zip(want, (gx, gw, gb)):
        grads.append(None if not need else g if reduction == "none" else g * go.to(g.dtype))
    return (*grads,) + (None,) * 17


torch.library.register_autograd("bcelogits::linear_loss", _op_backward, setup_context=_op_setup)


# --------------------------------------------------------------------------------------------- public API
def linear_binary_cross_entropy_with_logits(
    input: Tensor,
    weight: Tensor,
    target,
    bias: Tensor | None = None,
    *,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
    ignore_index: float | None = None,
    ignore_rows: Tensor | None = None,
    strict: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    r"""``binary_cross_entropy_with_logits(F.linear(input, weight, bias), target, ...)`` without the logits.

    .. math::

        \mathcal{L} = \mathrm{reduce}_{n,c}\,\ell(z_{nc}, y_{nc}),\quad z = x W^\top + b,\quad
        \ell(z, y) = (1 - y)\,\mathrm{softplus}(z) + p_c\,y\,\mathrm{softplus}(-z)

    (with label smoothing and the focal factor as in :func:`bcelogits.binary_cross_entropy_with_logits`).
    Classes, and rows when N is large, are processed in blocks (:func:`plan_blocks`); the gradients of
    input, weight and bias are computed in the forward pass, so backward only scales them. The elementwise
    part is the package's fused kernel (accurate to a few ulps); the matmuls are torch's (float32
    accumulation, as ``F.linear``). 16-bit input and weight: logits in that dtype as ``F.linear`` gives them,
    the elementwise part in float32, the gradient matmuls in the input dtype (grad_input accumulated over
    class blocks in float32).

    Args:
        input: features (..., D), floating point; the leading dimensions are the rows (N of them).
        weight: (C, D), as ``nn.Linear.weight``, of the input's dtype.
        target: the probabilities of the (..., C) logits: a dense tensor; a torch sparse COO or CSR (N, C)
            tensor (absent entries are 0, stored values may be soft; COO duplicates are summed); or the
            tuple ``(row_pointers, column_indices[, values])`` (CSR without a tensor; no values: every
            stored entry is 1). Sparse forms never build an (N, C) tensor.
        bias: (C,) or None.
        pos_weight: (C,) (or (1,)) weight of the positive term.
        reduction: 'mean' (over the N×C elements that count), 'sum' or 'none' ((..., C) losses: that
            allocates the N×C result, and backward recomputes the logits, a second forward's matmuls).
        label_smoothing: as in ``bcelogits.binary_cross_entropy_with_logits``.
        focal_gamma: as in ``bcelogits.binary_cross_entropy_with_logits``.
        ignore_index: leaves out the (row, class) pairs whose target equals it (a sparse target's stored
            values can carry it).
        ignore_rows: bool mask of input's leading shape, True for rows left out entirely (padding): the
            same as setting their targets to ``ignore_index``; they get zero gradient.
        strict: as in ``bcelogits.binary_cross_entropy_with_logits``, and also checks that sparse values and
            a dense target's values are in [0, 1] (one pass).
        chunk_size: classes per block (all rows in each block), or ``(rows, classes)``; default: the rule.
        memory_budget: bytes for the per-block buffers (default 4 % of one N×C float32 tensor, clamped
            to [256 KiB, 64 MiB]).

    Returns:
        The loss: 0-d for 'mean'/'sum', (..., C) for 'none', in the target's dtype (sparse: its values'
        dtype; the tuple without values: the input's dtype).

    Raises:
        ValueError: mismatched N, C or D between the arguments; sparse indices out of range or row pointers
            not sorted; under ``strict``, target values outside [0, 1].
        bcelogits.DTypeError: integer features, a target that is not floating point, weight and input of
            different dtypes. RuntimeError: double backward, tensors on different devices.

    >>> import torch
    >>> x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    >>> positives = torch.tensor([[0, 0, 2, 3], [1, 4, 0, 2]])  # (row, class) pairs
    >>> y = torch.sparse_coo_tensor(positives, torch.ones(4, dtype=torch.float64), (4, 5))
    >>> fused = linear_binary_cross_entropy_with_logits(x, w, y, chunk_size=2)
    >>> unfused = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T, y.to_dense())
    >>> bool(torch.isclose(fused, unfused, rtol=1e-14))
    True
    """
    options = _args.check_options(ignore_index, label_smoothing, None, focal_gamma, strict)
    chunking = _args.check_linear_chunking(chunk_size, memory_budget)
    call = _args.parse_linear(
        input, weight, target, bias, pos_weight, reduction, options, ignore_rows, chunking
    )
    grad = torch.is_grad_enabled()
    want = tuple(
        bool(grad and t is not None and t.requires_grad) for t in (call.input, call.weight, call.bias)
    )
    if torch.compiler.is_compiling():
        o = call.options
        loss = _linear_loss_op(
            call.input, call.weight, call.bias, call.target, call.crow, call.col, call.values,
            call.pos_weight, call.ignore_rows, call.reduction, o.ignore_index, o.label_smoothing,
            o.focal_gamma, o.strict, call.chunk_rows, call.chunk_classes, call.memory_budget, *want,
        )[0]  # fmt: skip
    elif any(want):
        loss = _LinearFunction.apply(call.input, call.weight, call.bias, call, want)
    else:
        with torch.no_grad():
            loss = _run(call, False, False, False)[0]
    if call.reduction == "none":
        loss = loss.reshape(call.lead_shape + (call.weight.shape[0],))
    return loss.to(call.out_dtype)


class LinearBCEWithLogitsLoss(torch.nn.modules.loss._Loss):
    r"""Module form of :func:`linear_binary_cross_entropy_with_logits`: a classifier head's loss that
    takes the classifier's parameters in ``forward``, ``loss(input, weight, target, bias)``, and never
    builds the (N, C) logits. ``pos_weight`` is a buffer (as in ``torch.nn.BCEWithLogitsLoss``); the
    keyword-only options are those of the function.

    >>> import torch
    >>> head = torch.nn.Linear(8, 1000)
    >>> criterion = LinearBCEWithLogitsLoss()
    >>> x = torch.randn(16, 8)
    >>> y = torch.sparse_coo_tensor(torch.tensor([[0, 5], [3, 999]]), torch.ones(2), (16, 1000))
    >>> loss = criterion(x, head.weight, y, head.bias)
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([1000, 8])
    """

    reduction: str

    def __init__(
        self,
        pos_weight: Tensor | None = None,
        reduction: str = "mean",
        *,
        label_smoothing: float = 0.0,
        focal_gamma: float = 0.0,
        ignore_index: float | None = None,
        strict: bool = False,
        chunk_size: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.options = dict(
            label_smoothing=label_smoothing,
            focal_gamma=focal_gamma,
            ignore_index=ignore_index,
            strict=strict,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
        )
        _args.check_options(ignore_index, label_smoothing, None, focal_gamma, strict)
        _args.check_linear_chunking(chunk_size, memory_budget)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, weight: Tensor, target, bias: Tensor | None = None, *, ignore_rows=None):
        return linear_binary_cross_entropy_with_logits(
            input, weight, target, bias, pos_weight=self.pos_weight, reduction=self.reduction,
            ignore_rows=ignore_rows, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        defaults = dict(
            label_smoothing=0.0,
            focal_gamma=0.0,
            ignore_index=None,
            strict=False,
            chunk_size=None,
            memory_budget=None,
        )
        parts = [] if self.reduction == "mean" else [f"reduction={self.reduction!r}"]
        parts += [f"{k}={v!r}" for k, v in self.options.items() if v != defaults[k]]
        return ", ".join(parts)
