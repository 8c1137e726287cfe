"""``BCEWithLogitsLoss``: the module form; ``forward`` is one line into the functional."""

from __future__ import annotations

import torch

from . import _args
from .functional import binary_cross_entropy_with_logits


class BCEWithLogitsLoss(torch.nn.modules.loss._Loss):
    r"""Drop-in for :class:`torch.nn.BCEWithLogitsLoss`, exact to a few ulps, with fused kernels.

    A ``torch.nn.modules.loss._Loss``, as torch's losses are (code that checks for one finds it).
    ``weight`` and ``pos_weight`` are persistent buffers under the same names as torch's, so state
    dicts load both ways. The keyword-only options (all off by default) are described in
    :func:`bcelogits.binary_cross_entropy_with_logits` and the README. ``process_group=`` (constructor)
    and ``normalizer=`` (``forward``, as it changes with each batch) give a mean over more than one batch
    (docs/distributed.md).

    >>> import torch
    >>> criterion = BCEWithLogitsLoss(pos_weight=torch.ones([64]))
    >>> criterion(torch.full([10, 64], 1.5), torch.ones([10, 64]))  # -log(sigmoid(1.5))
    tensor(0.2014)
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
