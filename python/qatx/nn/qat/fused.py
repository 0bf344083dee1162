r"""Fused Conv+BN(+ReLU) and Linear+BN1d QAT modules with BatchNorm folding simulated in
training (Jacob et al. 2018, as in torch.ao's ``ConvBn2d``), so that the weights trained are
the ones a folded integer model runs.

With :math:`f = \gamma / \sqrt{\sigma^2_{run} + \epsilon}` per output channel:

.. math::

    y = \mathrm{BN}\Big(\frac{\mathrm{conv}(q_a(x),\ q_w(W f))}{f} + b\Big)

In training the BN uses the batch statistics (and updates the running ones) exactly as the
unfused ``conv -> bn`` would; in eval mode, or once the BN statistics are frozen, it uses the
running statistics and computes the folded layer itself,
``conv(q_a(x), q_w(W f)) + q_b((b - \mu_{run}) f + \beta)``, where in eval mode ``q_b`` puts
the bias on the int32 grid of the INT8 layer (:func:`qatx.nn.qat.modules.quantize_bias`) while
input and weight are fake-quantized (in training it is the identity). :meth:`to_float`
returns that folded float layer (``nn.Sequential(layer, nn.ReLU())`` for the ReLU variants).

Freezing the BN statistics: :meth:`freeze_bn_stats` (or :func:`qatx.freeze_bn_stats` on a
model); ``freeze_bn_after=N`` freezes them automatically once the BN has tracked ``N``
batches: the layer reads the BN's batch counter on the host once (its first training step, and
the first after ``load_state_dict``) and then counts the batches it normalises itself, so there
is no host synchronisation per step. Change ``bn.num_batches_tracked`` only through the layer
(or reload a state dict); under ``torch.compile`` prefer calling ``freeze_bn_stats`` from the
training loop.
"""
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import QConfig
from ..activation import relu
from . import modules as qat

__all__ = ["ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "LinearBn1d"]


class _BnFolded:
    """Mixin placed before a QAT layer class: adds ``bn`` and the folded forward."""

    _BN: type = nn.BatchNorm2d
    _WITH_RELU = False

    def __init__(self, *args, qconfig: QConfig, eps: float = 1e-5, momentum: float = 0.1, freeze_bn_after: int = -1,
                 **kwargs):
        super().__init__(*args, qconfig=qconfig, **kwargs)
        self.bn = self._BN(self.weight.shape[0], eps=eps, momentum=momentum, device=self.weight.device,
                           dtype=self.weight.dtype)
        self.with_relu = self._WITH_RELU
        self.freeze_bn_after = int(freeze_bn_after)
        self.bn_frozen = False
        self._bn_batches = -1  # host copy of bn.num_batches_tracked for freeze_bn_after; -1: not read yet

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: QConfig, freeze_bn_after: int = -1):
        """From ``nn.Sequential(layer, bn)`` (``(layer, bn, nn.ReLU())`` for the ReLU variants),
        sharing their parameters and buffers."""
        expected = [cls._FLOAT_MODULE, cls._BN] + ([nn.ReLU] if cls._WITH_RELU else [])
        if not isinstance(mod, nn.Sequential) or [type(m) for m in mod] != expected:
            raise TypeError(f"{cls.__name__}.from_float expects nn.Sequential of "
                            f"{', '.join(t.__name__ for t in expected)}, got {mod!r}")
        layer, bn = mod[0], mod[1]
        if not (bn.affine and bn.track_running_stats) or bn.num_features != layer.weight.shape[0]:
            raise ValueError(f"{cls.__name__}: the BatchNorm must be affine, track running statistics and have "
                             f"{layer.weight.shape[0]} features, got {bn!r}")
        new = super().from_float(layer, qconfig)  # the QAT layer class: swaps layer in, then bn is attached
        new.bn = bn
        new.freeze_bn_after = int(freeze_bn_after)
        return new.train(layer.training)

    @torch.jit.export
    def freeze_bn_stats(self, frozen: bool = True) -> None:
        """Use (and stop updating) the running statistics in training."""
        self.bn_frozen = frozen

    def _fold_factor(self) -> Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def _float_weight(self) -> Tensor:
        return self.weight * self._fold_factor().reshape([-1] + [1] * (self.weight.dim() - 1))

    def _folded_bias(self) -> Tensor:
        """``(b - mu_run) f + beta``: the bias of the folded layer."""
        bias = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)
        return (bias - self.bn.running_mean) * self._fold_factor() + self.bn.bias

    def _batch_statistics(self) -> bool:
        """Whether this forward normalises with the batch statistics (training, BN not frozen);
        counts the batches for ``freeze_bn_after``."""
        if not self.training:
            return False
        if not self.bn_frozen and self.freeze_bn_after >= 0:
            if self._bn_batches < 0:
                self._bn_batches = int(self.bn.num_batches_tracked)  # one host read, then counted below
            if self._bn_batches >= self.freeze_bn_after:
                self.bn_frozen = True
        return not self.bn_frozen

    def forward(self, input: Tensor) -> Tensor:
        x = self.input_quantizer(input)
        weight = self._quantized_weight()
        if self._batch_statistics():
            y = self._weighted(x, weight, None)
            # y * (1/f) with an autograd node that keeps its output (the batch norm's input, kept
            # by the batch norm anyway) rather than y: one activation-sized tensor less per layer.
            y = torch.ops.qatx._scale_channels(y, torch.reciprocal(self._fold_factor()))
            if self.bias is not None:
                y = y + self.bias.reshape([1, -1] + [1] * (y.dim() - 2))
            y = self._batch_norm_update(y)
        else:
            # Running statistics: the folded layer itself, its bias on the INT8 layer's int32 grid.
            y = self._weighted(x, weight, self._quantized_bias(self._folded_bias()))
        if self.with_relu:
            y = relu(y)  # keeps a bool mask for the backward, not the output
        return y

    def _batch_norm_update(self, y: Tensor) -> Tensor:
        # nn.BatchNorm's training step, but the running statistics are updated in copies that
        # then replace the buffers: the forward read running_var for the fold factor, and a
        # torch.compile backward may re-read it; an in-place update would change what it reads.
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        if self._bn_batches >= 0:
            self._bn_batches += 1
        momentum = bn.momentum
        factor = 1.0 / float(bn.num_batches_tracked) if momentum is None else momentum
        running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
        out = F.batch_norm(y, running_mean, running_var, bn.weight, bn.bias, True, factor, bn.eps)
        bn.running_mean, bn.running_var = running_mean, running_var
        return out

    def to_float(self) -> nn.Module:
        """The float layer with BN folded in exactly (running statistics)."""
        with torch.no_grad():
            weight = self._float_weight()
            bias = self._folded_bias()
        layer = self._make_float(nn.Parameter(weight), nn.Parameter(bias))
        return nn.Sequential(layer, nn.ReLU()) if self.with_relu else layer

    @torch.jit.unused
    def get_extra_state(self) -> Dict[str, Any]:
        return {"bn_frozen": self.bn_frozen, "freeze_bn_after": self.freeze_bn_after}

    @torch.jit.unused
    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.bn_frozen = state["bn_frozen"]
        self.freeze_bn_after = state["freeze_bn_after"]
        self._bn_batches = -1  # num_batches_tracked is loaded too: read it again

    def extra_repr(self) -> str:
        parts: List[str] = [super().extra_repr()]
        if self.freeze_bn_after >= 0:
            parts.append(f"freeze_bn_after={self.freeze_bn_after}")
        if self.bn_frozen:
            parts.append("bn_frozen=True")
        return ", ".join(parts)


class ConvBn1d(_BnFolded, qat.Conv1d):
    _BN = nn.BatchNorm1d


class ConvBn2d(_BnFolded, qat.Conv2d):
    _BN = nn.BatchNorm2d


class ConvBn3d(_BnFolded, qat.Conv3d):
    _BN = nn.BatchNorm3d


class ConvBnReLU1d(ConvBn1d):
    _WITH_RELU = True


class ConvBnReLU2d(ConvBn2d):
    _WITH_RELU = True


class ConvBnReLU3d(ConvBn3d):
    _WITH_RELU = True


class LinearBn1d(_BnFolded, qat.Linear):
    _BN = nn.BatchNorm1d
