"""Modules for the functional ops between layers, so that :func:`qatx.prepare_qat` can give
them activation quantizers: write ``self.add = qatx.nn.QuantAdd()`` in the model and
``self.add(x, y)`` in its forward instead of ``x + y``.

Before :func:`qatx.prepare_qat` (or with ``qconfig=None``) they compute the plain float op.
Prepared, they quantize with the config's activation spec:

* :class:`QuantAdd` ``q_1(x) + q_2(y)`` (residual add: both operands on their own grid),
* :class:`QuantMatmul` ``q_1(a) @ q_2(b)`` (both GEMM operands, e.g. attention scores),
* :class:`QuantCat` ``q(cat(xs, dim))`` (one grid for all parts, as an integer concat needs).
"""
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..config import QConfig

__all__ = ["QuantAdd", "QuantCat", "QuantMatmul"]


class _ActivationOp(nn.Module):
    _QUANTIZERS = ("input_quantizer", "other_quantizer")

    def __init__(self, qconfig: Optional[QConfig] = None, device=None):
        super().__init__()
        if qconfig is not None and not isinstance(qconfig, QConfig):
            raise TypeError(f"qconfig must be a qatx.QConfig or None, got {type(qconfig).__name__}")
        self.qconfig = qconfig
        spec = None if qconfig is None else qconfig.activation
        with torch.device(device if device is not None else torch.get_default_device()):
            for name in self._QUANTIZERS:
                setattr(self, name, spec.make_quantizer() if spec is not None else nn.Identity())

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Optional[QConfig], device=None):
        """A copy of ``mod`` with quantizers built from ``qconfig.activation``."""
        if not isinstance(mod, cls):
            raise TypeError(f"{cls.__name__}.from_float expects a {cls.__name__}, got {type(mod).__name__}")
        return cls(qconfig=qconfig, device=device, **mod._op_kwargs()).train(mod.training)

    def to_float(self) -> nn.Module:
        return type(self)(**self._op_kwargs())

    def _op_kwargs(self):
        return {}

    def extra_repr(self) -> str:
        spec = None if self.qconfig is None else self.qconfig.activation
        return f"input={spec.describe() if spec is not None else 'float'}"


class QuantAdd(_ActivationOp):
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.input_quantizer(x) + self.other_quantizer(y)


class QuantMatmul(_ActivationOp):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(self.input_quantizer(a), self.other_quantizer(b))


class QuantCat(_ActivationOp):
    _QUANTIZERS = ("output_quantizer",)

    def __init__(self, dim: int = 0, qconfig: Optional[QConfig] = None, device=None):
        super().__init__(qconfig, device)
        self.dim = dim

    def _op_kwargs(self):
        return {"dim": self.dim}

    def forward(self, xs: List[Tensor]) -> Tensor:
        return self.output_quantizer(torch.cat(xs, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, {super().extra_repr()}"
