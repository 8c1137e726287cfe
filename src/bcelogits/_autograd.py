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

from dataclasses import replace

import torch

from . import _math, kernels


def _bind(call, x, y, w, p):
    return replace(call, input=x, target=y, weight=w, pos_weight=p)


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
    @staticmethod
    def forward(x, y, w, p, call, fuse_grad):
        fwd = kernels.forward(_bind(call, x, y, w, p), want_grad=fuse_grad)
        return fwd.loss, fwd.grad, fwd.pending

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, p, call, _ = inputs
        _, grad, pending = output
        ctx.call = replace(call, input=None, target=None, weight=None, pos_weight=None)
        ctx.save_for_backward(x, y, w, p)
        ctx.save_for_forward(x, y, w, p)
        # Not saved with save_for_backward: backward scales it in place and hands it over.
        ctx.fused_grad, ctx.pending = grad, pending
        ctx.mark_non_differentiable(*(t for t in (grad, pending) if isinstance(t, torch.Tensor)))

    @staticmethod
    def backward(ctx, go, _unused_grad, _unused_pending):
        x, y, w, p = ctx.saved_tensors
        call = _bind(ctx.call, x, y, w, p)
        gx = gy = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph=True: differentiable formulas
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
        call = _bind(ctx.call, x, y, w, p)
        t = torch.zeros(call.shape, dtype=call.compute_dtype, device=x.device)
        if dx is not None:
            t = t + _elementwise_grad(call, "input") * dx.to(call.compute_dtype)
        if dy is not None:
            t = t + _elementwise_grad(call, "target") * dy.to(call.compute_dtype)
        if call.reduction != "none":
            s = kernels.reduced_scale(call)
            t = t.sum(dtype=torch.float64) * s
        return t.to(call.out_dtype), None, None


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


def apply(call):
    x = call.input
    fuse = torch.is_grad_enabled() and x.requires_grad and call.reduction != "none"
    loss, _, _ = BCEWithLogitsFunction.apply(x, call.target, call.weight, call.pos_weight, call, fuse)
    return loss
