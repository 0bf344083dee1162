"""Memory-lean activations for QAT training."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReLU", "relu"]


def relu(x: Tensor) -> Tensor:
    """``F.relu`` whose backward keeps a bool mask (1 byte per element) instead of the output (4
    for float32) when a gradient is wanted. In a QAT model a ReLU's output goes on to the next
    layer's input quantizer, which keeps one bit, so the float output need not outlive the
    forward. Same values and the same gradient as ``F.relu`` (0 at 0)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.where(x > 0, x, 0.0)
    return F.relu(x)


class ReLU(nn.ReLU):
    """``nn.ReLU`` computed by :func:`relu`; ``prepare_qat`` puts it in place of every
    (not in-place) ``nn.ReLU`` that was not fused into a Conv-BN-ReLU layer."""

    def __init__(self):
        super().__init__(inplace=False)

    def forward(self, input: Tensor) -> Tensor:
        return relu(input)
