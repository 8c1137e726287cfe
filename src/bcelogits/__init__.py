"""bcelogits: an exact, fused, drop-in ``BCEWithLogitsLoss`` for PyTorch and NumPy."""

from __future__ import annotations

from . import kernels
from ._args import ArgumentTypeError, DTypeError, LayoutError
from .distributed import loss_denominator
from .functional import binary_cross_entropy_with_logits, loss_and_grad, pos_weight_from_targets
from .kernels import PerformanceWarning

__version__ = "0.1.0"
__all__ = [
    "ArgumentTypeError",
    "BCEWithLogitsLoss",
    "DTypeError",
    "LayoutError",
    "LinearBCEWithLogitsLoss",
    "PerformanceWarning",
    "SigLIPLoss",
    "binary_cross_entropy_with_logits",
    "kernels",
    "linear_binary_cross_entropy_with_logits",
    "loss_and_grad",
    "loss_denominator",
    "pos_weight_from_targets",
    "siglip_loss",
]


def __getattr__(name: str):
    if name == "BCEWithLogitsLoss":
        try:
            from .modules import BCEWithLogitsLoss
        except ImportError as exc:  # torch is an optional extra
            raise ImportError(
                "bcelogits.BCEWithLogitsLoss needs PyTorch: pip install 'bcelogits[torch]' "
                "(the functional API works on NumPy arrays without it)"
            ) from exc
        return BCEWithLogitsLoss
    if name in ("linear_binary_cross_entropy_with_logits", "LinearBCEWithLogitsLoss"):
        try:
            from . import linear
        except ImportError as exc:  # torch is an optional extra
            raise ImportError(f"bcelogits.{name} needs PyTorch: pip install 'bcelogits[torch]'") from exc
        return getattr(linear, name)
    if name in ("SigLIPLoss", "siglip_loss"):
        try:
            from . import siglip
        except ImportError as exc:  # torch is an optional extra
            raise ImportError(f"bcelogits.{name} needs PyTorch: pip install 'bcelogits[torch]'") from exc
        return getattr(siglip, name)
    raise AttributeError(f"module 'bcelogits' has no attribute {name!r}")
