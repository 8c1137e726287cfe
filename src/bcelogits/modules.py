"""``BCEWithLogitsLoss``: the module form; ``forward`` is one line into the functional."""

from __future__ import annotations

import torch

from . import _args
from .functional import binary_cross_entropy_with_logits


class BCEWithLogitsLoss(torch.nn.modules.loss._Loss):
    r"""Drop-in for ``torch.nn.BCEWithLogitsLoss``, exact to a few ulps, with fused kernels.

    The module form of ``bcelogits.binary_cross_entropy_with_logits``; ``forward`` is one call into
    it. Each element's loss, for logit ``x``, target ``y``, weight ``w`` and positive weight ``p``, is:

        loss = w * [(1 - y) * softplus(x) + p * y * softplus(-x)]

    A ``torch.nn.modules.loss._Loss``, as torch's losses are (code that checks for one finds it).
    ``weight`` and ``pos_weight`` are persistent buffers under the same names as torch's, so state dicts
    load both ways, and ``.to()``, ``.double()``, ``torch.save`` and ``copy.deepcopy`` behave as torch's.
    ``process_group=`` (constructor) and ``normalizer=`` (``forward``, as it changes with each batch) give
    a mean over more than one batch (see ``bcelogits.binary_cross_entropy_with_logits``).

    Args:
        weight: Optional rescaling weight, broadcast to the input.
        size_average: Deprecated, as in torch (overrides ``reduction``, with torch's warning).
        reduce: Deprecated, as in torch (overrides ``reduction``, with torch's warning).
        reduction: ``'mean'`` (default), ``'sum'``, ``'none'`` or ``'weighted_mean'`` (sum of
            ``weight * loss`` over the sum of the weights).
        pos_weight: Optional weight of the positive term, broadcast along the last dimension of the
            input, or along ``class_dim``. Above 1 raises recall, below 1 precision.
        ignore_index: Target value of missing labels: no loss, no gradient, not counted in the mean.
        label_smoothing: ``eps`` in [0, 1]; targets become ``y * (1 - eps) + eps / 2``.
        class_dim: Input dimension a 1-D ``pos_weight`` applies along (1 for (N, C, H, W)).
        focal_gamma: Focal exponent ``gamma >= 0``: the loss is multiplied by ``(1 - p_t) ** gamma``.
        strict: Check target and weight values at every call (``ValueError``) and warn when the
            logits look like probabilities.
        process_group: A ``torch.distributed`` group: the mean's denominator is all-reduced over it
            (see ``bcelogits.binary_cross_entropy_with_logits``).

    ``forward(input, target, *, normalizer=None)``: ``normalizer`` is an explicit denominator of the sum
    for 'mean' and 'weighted_mean' (gradient accumulation).

    Raises:
        ValueError: an option out of range (at construction); at call time as
            ``bcelogits.binary_cross_entropy_with_logits`` raises.
        TypeError: an option of the wrong type (at construction).

    Shape:
        - input: ``(*)``, any number of dimensions.
        - target: ``(*)``, the same shape as the input.
        - output: scalar; ``(*)`` for ``reduction='none'``.

    Examples:
        >>> import torch
        >>> criterion = BCEWithLogitsLoss(pos_weight=torch.ones([64]))
        >>> criterion(torch.full([10, 64], 1.5), torch.ones([10, 64]))  # -log(sigmoid(1.5))
        tensor(0.2014)

        Segmentation with a per-class positive weight along dimension 1, and a focal term:

        >>> criterion = BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 4.0]), class_dim=1, focal_gamma=2.0)
        >>> criterion
        BCEWithLogitsLoss(class_dim=1, focal_gamma=2.0)
        >>> logits = torch.zeros(8, 2, 16, 16, requires_grad=True)
        >>> criterion(logits, torch.ones(8, 2, 16, 16)).backward()
        >>> logits.grad.shape
        torch.Size([8, 2, 16, 16])
    """

    reduction: str

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight: torch.Tensor | None = None,
        *,
        ignore_index: float | None = None,
        label_smoothing: float = 0.0,
        class_dim: int | None = None,
        focal_gamma: float = 0.0,
        strict: bool = False,
        process_group=None,
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = _args.legacy_reduction(size_average, reduce)
        super().__init__(reduction=reduction)  # (sets self.reduction; the legacy pair is resolved above)
        self.options = _args.check_options(ignore_index, label_smoothing, class_dim, focal_gamma, strict)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.process_group = process_group  # (not state: a group belongs to the running processes)

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, normalizer=None) -> torch.Tensor:
        return binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            reduction=self.reduction,
            pos_weight=self.pos_weight,
            **self.options.__dict__,
            process_group=self.process_group,
            normalizer=normalizer,
        )

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` (on this module, or on a model that contains it): the loss is
        Python (argument checks, kernel choice) that TorchScript cannot compile, so say what works."""
        raise RuntimeError(
            "bcelogits.BCEWithLogitsLoss cannot be compiled by torch.jit.script (TorchScript cannot "
            "compile its Python argument checks and kernel dispatch); use torch.compile, torch.export or "
            "torch.jit.trace, which support it, or script the model without the loss and apply the loss "
            "outside it"
        )

    def extra_repr(self) -> str:
        parts = [] if self.reduction == "mean" else [f"reduction={self.reduction!r}"]
        parts += [f"{k}={v!r}" for k, v in self.options.non_default().items()]
        return ", ".join(parts)
