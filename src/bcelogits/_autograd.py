"""The torch autograd wrapper: one :class:`torch.autograd.Function` around the kernels.

- forward runs the chosen kernel once; when the input needs a gradient and the loss is reduced, the
  same pass also writes the gradient, which is kept until backward (one input-sized tensor);
- backward hands that tensor over, scaled in place only when ``grad_output`` is not 1; the 'none'
  reduction and the target's gradient are computed in backward;
- when backward itself is differentiated (``create_graph=True``) the gradients come from the
  :mod:`bcelogits._math` formulas in torch ops, so double backward is exact too;
- ``jvp`` gives forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``).
"""

from __future__ import annotations

import torch

from . import _math, kernels


def _elementwise_grad(call, which: str):
    """d loss_i / d (input or target)_i in differentiable torch ops, in the compute dtype."""
    x, y = call.input.to(call.compute_dtype), call.target.to(call.compute_dtype)
    o = call.options
    _, g, gy = _math.evaluate(
        torch,
        x,
        y,
        call.weight,
        call.pos_weight,
        label_smoothing=o.label_smoothing,
        ignore_index=o.ignore_index,
        focal_gamma=o.focal_gamma,
        want_loss=False,
        want_grad=which == "input",
        want_grad_target=which == "target",
    )
    return g if which == "input" else gy


def _chain(call, d, go):
    """Chain an elementwise derivative with grad_output through the reduction."""
    if call.reduction == "none":
        return d * go.to(d.dtype)
    s = kernels.reduced_scale(call)
    s = s.to(d.dtype) if isinstance(s, torch.Tensor) else s
    return d * (go.to(d.dtype) * s)


class BCEWithLogitsFunction(torch.autograd.Function):
    generate_vmap_rule = True  # under vmap the kernels see wrapped tensors and take the plain path

    @staticmethod
    def forward(x, y, w, p, call, fuse_grad):
        fwd = kernels.forward(call.with_arrays(x, y, w, p), want_grad=fuse_grad)
        return fwd.loss, fwd.grad, fwd.pending

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, p, call, _ = inputs
        _, grad, pending = output
        ctx.call = call.with_arrays(None, None, None, None)
        ctx.save_for_backward(x, y, w, p)
        ctx.save_for_forward(x, y, w, p)
        # Not saved with save_for_backward: backward scales it in place and hands it over.
        ctx.fused_grad, ctx.pending = grad, pending
        ctx.mark_non_differentiable(*(t for t in (grad, pending) if isinstance(t, torch.Tensor)))
        # No zero-filled input-sized tensor for the unused gradient of the non-differentiable outputs.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, go, _unused_grad, _unused_pending):
        if go is None:  # grads are not materialized: no gradient flowed into the loss
            return None, None, None, None, None, None
        x, y, w, p = ctx.saved_tensors
        call = ctx.call.with_arrays(x, y, w, p)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            if _differentiable_backward(go, x, y):
                gx = _chain(call, _elementwise_grad(call, "input"), go)
            elif call.reduction == "none":
                gx = kernels.backward_none(call, go)
            else:
                gx = _take_fused_grad(ctx, call, go)
            gx = gx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            gy = _chain(call, _elementwise_grad(call, "target"), go).to(y.dtype)
        return gx, gy, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dy, _dw, _dp, _dcall, _dfuse):
        x, y, w, p = ctx.saved_tensors
        call = ctx.call.with_arrays(x, y, w, p)
        t = torch.zeros(call.shape, dtype=call.compute_dtype, device=x.device)
        if dx is not None:
            t = t + _elementwise_grad(call, "input") * dx.to(call.compute_dtype)
        if dy is not None:
            t = t + _elementwise_grad(call, "target") * dy.to(call.compute_dtype)
        if call.reduction != "none":
            s = kernels.reduced_scale(call)
            t = t.sum(dtype=torch.float64) * s
        return t.to(call.out_dtype), None, None


def _differentiable_backward(*tensors) -> bool:
    """Backward must itself be differentiable or transformable: create_graph=True (double backward),
    vmap over backward (batched gradients), or forward-mode AD over backward (Hessian-vector products)."""
    return torch.is_grad_enabled() or not all(kernels.plain_tensor(t, torch) for t in tensors)


def _take_fused_grad(ctx, call, go):
    grad, pending = ctx.fused_grad, ctx.pending
    ctx.fused_grad = None  # handed over; a second backward (retain_graph) recomputes
    if grad is None:
        fwd = kernels.forward(call, want_grad=True)
        grad, pending = fwd.grad, fwd.pending
    if go.device.type == "cpu" and not isinstance(pending, torch.Tensor) and pending == 1.0:
        if go.item() == 1.0:
            return grad
    factor = go.to(grad.dtype) * (pending.to(grad.dtype) if isinstance(pending, torch.Tensor) else pending)
    return grad.mul_(factor)


def _needs_autograd(call, grad_enabled: bool) -> bool:
    """Does the loss need the autograd Function: the input or target requires grad (with grad mode on;
    weights that require grad are rejected in _args), or forward-mode AD is in use (a ``dual_level`` is
    open: tangents exist only inside one)?"""
    if kernels.forward_ad_active(torch):
        return True
    return grad_enabled and (call.input.requires_grad or call.target.requires_grad)


def apply(call):
    if torch.compiler.is_compiling():
        return _apply_op(call)
    x = call.input
    grad_enabled = torch.is_grad_enabled()
    fuse = grad_enabled and x.requires_grad and call.reduction != "none"
    args = (x, call.target, call.weight, call.pos_weight, call, fuse)
    if not all(kernels.plain_tensor(t, torch) for t in (call.weight, call.pos_weight) if t is not None):
        # weight or pos_weight under a torch.func transform (vmap over stacked weights, grad or jvp with
        # respect to them) or with a forward-mode tangent: the plain formulas in torch operators, which
        # the transform batches and differentiates itself (the Function differentiates input and target).
        return kernels.forward(call).loss
    if torch._C._are_functorch_transforms_active():
        loss, _, _ = BCEWithLogitsFunction.apply(*args)
    elif not _needs_autograd(call, grad_enabled) or torch.jit.is_tracing():
        # Evaluation (torch.no_grad(), or nothing requires grad): the same kernel call without the
        # Function's bookkeeping, about 40 us less per call. torch.jit.trace: kernels.choose picks the
        # plain formulas in torch operators, which the tracer records and autograd differentiates (a
        # Function would be recorded as an opaque Python call that the traced graph cannot replay).
        loss = kernels.forward(call).loss
    else:
        # What Function.apply does when no torch.func transform is active, minus its per-call
        # inspect.signature binding of default arguments (~50 us; we pass every argument).
        loss, _, _ = _FUNCTION_BASE_APPLY(*args)
    return loss


# ------------------------------------------------------------------------------------ torch.compile
# Dynamo cannot trace an autograd.Function that defines jvp, and cannot look inside a numba or Triton
# kernel. Under torch.compile the loss therefore goes through custom ops: opaque to the compiler, with
# fake (shape-only) implementations for tracing and an autograd formula for backward. Eager calls keep
# the Function above (which also gives forward-mode AD and exact double backward).
from torch import Tensor  # noqa: E402

from . import _args  # noqa: E402


def _op_call(x, y, w, p, reduction, ignore_index, label_smoothing, focal_gamma):
    options = _args.Options(ignore_index, label_smoothing, None, focal_gamma, False)
    compute = _args.compute_dtype(torch, x.dtype, y.dtype)
    return _args.Call(torch, x, y, w, p, reduction, options, compute, y.dtype)


@torch.library.custom_op("bcelogits::loss", mutates_args=())
def _loss_op(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    p: Tensor | None,
    reduction: str,
    ignore_index: float | None,
    label_smoothing: float,
    focal_gamma: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d x) — the gradient only when ``want_grad`` (else an empty tensor)."""
    call = _op_call(x, y, w, p, reduction, ignore_index, label_smoothing, focal_gamma)
    fwd = kernels.forward(call, want_grad=want_grad)
    # Outputs are C-contiguous, as the fake implementations promise: eager results follow the input
    # layouts (channels_last, ...), and inductor may hand the op other layouts than it traced.
    if not want_grad:
        return fwd.loss.contiguous(), x.new_empty(0)
    return fwd.loss.contiguous(), fwd.final_grad().to(x.dtype).contiguous()


@_loss_op.register_fake
def _(x, y, w, p, reduction, ignore_index, label_smoothing, focal_gamma, want_grad):
    loss = x.new_empty(x.shape if reduction == "none" else (), dtype=y.dtype)
    return loss, x.new_empty(x.shape if want_grad else (0,))


@torch.library.custom_op("bcelogits::grad_none", mutates_args=())
def _grad_none_op(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    p: Tensor | None,
    go: Tensor,
    ignore_index: float | None,
    label_smoothing: float,
    focal_gamma: float,
) -> Tensor:
    """``go * d loss_i / d x_i`` for reduction='none'."""
    call = _op_call(x, y, w, p, "none", ignore_index, label_smoothing, focal_gamma)
    return kernels.backward_none(call, go).to(x.dtype).contiguous()


@_grad_none_op.register_fake
def _(x, y, w, p, go, ignore_index, label_smoothing, focal_gamma):
    return x.new_empty(x.shape)


def _op_setup(ctx, inputs, output):
    x, y, w, p, reduction, ii, ls, fg, want_grad = inputs
    ctx.args = (reduction, ii, ls, fg)
    ctx.save_for_backward(x, y, w, p, output[1] if want_grad else None)


def _op_backward(ctx, go, _go_grad):
    x, y, w, p, g = ctx.saved_tensors
    reduction, ii, ls, fg = ctx.args
    gx = gy = None
    if ctx.needs_input_grad[0]:
        if reduction == "none":
            gx = _grad_none_op(x, y, w, p, go, ii, ls, fg)
        else:
            if g is None:
                g = _loss_op(x, y, w, p, reduction, ii, ls, fg, True)[1]
            gx = g * go.to(g.dtype)
    if ctx.needs_input_grad[1]:
        call = _op_call(x, y, w, p, reduction, ii, ls, fg)
        gy = _chain(call, _elementwise_grad(call, "target"), go).to(y.dtype)
    return gx, gy, None, None, None, None, None, None, None


torch.library.register_autograd("bcelogits::loss", _op_backward, setup_context=_op_setup)


def _apply_op(call):
    x, o = call.input, call.options
    want = torch.is_grad_enabled() and x.requires_grad and call.reduction != "none"
    loss, _ = _loss_op(
        x, call.target, call.weight, call.pos_weight, call.reduction,
        o.ignore_index, o.label_smoothing, o.focal_gamma, want,
    )  # fmt: skip
    return loss


_FUNCTION_BASE_APPLY = super(torch.autograd.Function, BCEWithLogitsFunction).apply
