r"""QAT modules: float layers whose weight (and input activation) are fake-quantized in the
forward, so training sees the quantization error while the float weights get the gradients.

Each class subclasses the float layer it replaces (a QAT ``Linear`` is an ``nn.Linear``), so
its parameters, ``state_dict`` keys and options are the float layer's, plus two quantizer
children: ``weight_quantizer`` and ``input_quantizer`` (``nn.Identity`` when the config has no
activation spec, and always for ``Embedding``, whose input is indices).

Per-channel weight scales are per output channel: axis 0 of Linear, Conv and Embedding
weights (per embedding row); for ConvTranspose, whose weight is ``[in, out/groups, *k]``, the
weight is viewed as ``[in/groups, out, *k]`` (output channel ``g*out/groups + j`` is column
``j`` of group ``g``) and quantized along axis 1, so every output channel has its own scale
for any ``groups``. Per-group weight quantization (groups along the last dimension) is for
Linear and Embedding weights; Conv weights refuse it.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import QConfig
from ...quantizers import FakeQuantize

__all__ = ["quantize_bias", "bias_codes", "QATModule", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
           "ConvTranspose2d", "ConvTranspose3d", "Embedding"]


def bias_codes(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tuple[Tensor, Tensor]:
    """The bias on the int32 grid of an INT8 layer: ``(codes, scale)`` in float64 with
    ``scale[c] = s_in * s_w[c]`` (``s_w[c, 0]`` for per-group weights) and
    ``codes = clamp(round_half_even(bias / scale), -2^31, 2^31 - 1)``."""
    s_w = weight_scale[:, 0] if weight_scale.dim() == 2 else weight_scale
    scale = input_scale.detach().double().reshape(-1)[0] * s_w.detach().double().reshape(-1)
    codes = torch.round(bias.detach().double() / scale).clamp(-2147483648.0, 2147483647.0)
    return codes, scale


def quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """``codes * scale`` of :func:`bias_codes` in the bias dtype: the bias the INT8 layer adds.
    Gradient: straight-through to ``bias`` (none to the scales)."""
    codes, scale = bias_codes(bias, input_scale, weight_scale)
    return (codes * scale).to(bias.dtype) + (bias - bias.detach())


def _codes_dtype(quantizer: nn.Module) -> Optional[torch.dtype]:
    """The integer dtype that holds the codes of a fixed-qparam per-tensor fake-quantize output
    (int8 or uint8), or None when the input is not such an output."""
    if type(quantizer) is not FakeQuantize or not quantizer.fake_quant_enabled or \
            quantizer.granularity != "per_tensor":
        return None
    if -128 <= quantizer.quant_min and quantizer.quant_max <= 127:
        return torch.int8
    if 0 <= quantizer.quant_min and quantizer.quant_max <= 255:
        return torch.uint8
    return None


@torch.jit.unused
def _saved_tensor_hooks_free() -> bool:
    """True when saved-tensor hooks may be installed and none are active (activation
    checkpointing, CPU offloading or the user's own hooks decide what is saved then)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return top is not None and enabled is not None and enabled() and top(False) is None


@torch.jit.unused
def _apply_saving_codes(apply, x: Tensor, weight: Tensor, bias: Optional[Tensor], quantizer: nn.Module,
                        dtype: torch.dtype) -> Tensor:
    """``apply(x, weight, bias)`` with ``x`` (a fake-quantize output, exactly ``(q - z) * s``)
    saved for the backward as its integer codes ``q``: 1 byte per element instead of 4, rebuilt
    bit for bit (``dequantize(quantize(y)) == y`` for any fake-quantize output ``y``). The
    scale and zero point are copied, so a later observer update cannot change the rebuilt x."""
    scale, zero_point = quantizer.scale.detach().clone(), quantizer.zero_point.detach().clone()
    qmin, qmax = quantizer.quant_min, quantizer.quant_max
    # x's identity as plain values: autograd keeps the pack hook alive with each saved tensor,
    # so a hook that referenced x would keep x too.
    key = (x.data_ptr(), x.dtype, x.shape, x.stride())

    def pack(t: Tensor):
        if (t.data_ptr(), t.dtype, t.shape, t.stride()) == key:
            return ("codes", torch.ops.qatx.quantize_per_tensor_affine(t.detach(), scale, zero_point, qmin, qmax,
                                                                       dtype))
        return t

    def unpack(saved):
        if isinstance(saved, tuple):
            if torch.is_grad_enabled():  # a backward with create_graph=True: the codes have no graph
                raise RuntimeError(
                    "double backward (create_graph=True) through a QAT layer that kept its input as integer "
                    "codes; run the forward inside torch.autograd.graph.saved_tensors_hooks(lambda t: t, "
                    "lambda t: t) so that the layers keep their float inputs")
            return torch.ops.qatx.dequantize_per_tensor_affine(saved[1], scale, zero_point, None)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return apply(x, weight, bias)


class QATModule:
    """Shared behaviour of the QAT layers (a mixin placed before the float class).

    ``__init__`` takes the float layer's arguments plus ``qconfig``; :meth:`from_float` swaps a
    float layer in, sharing its parameters (so meta-device models stay unallocated);
    :meth:`to_float` returns the float layer with the same (unquantized) parameters.
    """

    _FLOAT_MODULE: type = nn.Module
    _WEIGHT_AXIS = 0  # output-channel axis of the (viewed) weight
    _QUANTIZE_INPUT = True
    _ALLOW_PER_GROUP = True

    def __init__(self, *args, qconfig: QConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(qconfig)

    def _init_quantizers(self, qconfig: QConfig) -> None:
        if not isinstance(qconfig, QConfig):
            raise TypeError(f"qconfig must be a qatx.QConfig, got {type(qconfig).__name__}")
        if qconfig.weight.granularity == "per_group" and not self._ALLOW_PER_GROUP:
            raise ValueError(f"{type(self).__name__}: per_group weight quantization groups the last weight dimension; "
                             f"it is supported for Linear and Embedding weights, use per_channel for convolutions")
        self.qconfig = qconfig
        with torch.device(self.weight.device):  # quantizer state lives with the weight (meta included)
            self.weight_quantizer = qconfig.weight.make_quantizer(self._weight_view_shape(), self._WEIGHT_AXIS)
            act = qconfig.activation if self._QUANTIZE_INPUT else None
            self.input_quantizer = act.make_quantizer() if act is not None else nn.Identity()

    def _weight_view_shape(self) -> List[int]:
        return list(self.weight.shape)

    def _float_weight(self) -> Tensor:
        """The float weight the weight quantizer sees (the BN-folded one in fused layers)."""
        return self.weight

    def _quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self._float_weight())

    def _quantized_bias(self, bias: Optional[Tensor]) -> Optional[Tensor]:
        """In eval mode, the bias as the INT8 layer adds it: on the int32 grid of ``s_in * s_w``
        (:func:`quantize_bias`) while the input and the weight are fake-quantized; else the bias
        itself. Training keeps the float bias: the rounding (at most half an accumulator step)
        is far below the weight and activation quantization noise, and skipping it keeps the
        training step free of its small ops. Call it after both quantizers have run, so that it
        sees their current scales."""
        if bias is None or self.training:
            return bias
        if hasattr(self.input_quantizer, "grid_scale") and hasattr(self.weight_quantizer, "grid_scale"):
            if self.input_quantizer.fake_quant_enabled and self.weight_quantizer.fake_quant_enabled:
                return quantize_bias(bias, self.input_quantizer.grid_scale(), self.weight_quantizer.grid_scale())
        return bias

    @classmethod
    def _float_kwargs(cls, mod: nn.Module) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: QConfig):
        """The QAT layer for the float layer ``mod`` (an exact instance of the float class), sharing its parameters."""
        if type(mod) is not cls._FLOAT_MODULE:
            raise TypeError(f"{cls.__name__}.from_float expects a {cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}")
        # Built on the meta device (nothing allocated or initialised), then given mod's parameters.
        new = cls(**cls._float_kwargs(mod), qconfig=qconfig, device="meta", dtype=mod.weight.dtype)
        new.weight = mod.weight
        if getattr(mod, "bias", None) is not None:
            new.bias = mod.bias
        new._init_quantizers(qconfig)  # again, now on the weight's device
        return new.train(mod.training)

    def _make_float(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
        kwargs = self._float_kwargs(self)
        if "bias" in kwargs:
            kwargs["bias"] = bias is not None
        mod = self._FLOAT_MODULE(**kwargs, device="meta", dtype=weight.dtype)
        mod.weight = weight
        if bias is not None:
            mod.bias = bias
        return mod.train(self.training)

    def to_float(self) -> nn.Module:
        """The float layer with this layer's (shared, unquantized) parameters."""
        return self._make_float(self.weight, getattr(self, "bias", None))

    def _weighted(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """:meth:`_apply_weight`; in an eager training step whose input quantizer is a fixed
        per-tensor :class:`qatx.FakeQuantize`, the layer keeps its input for the backward as
        int8/uint8 codes rather than float32 (:func:`_apply_saving_codes`; same gradients, bit
        for bit). Not under TorchScript or torch.compile, not while other saved-tensor hooks are
        active (activation checkpointing, offloading), and not for other input dtypes."""
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled() and x.dtype == torch.float32 and (x.requires_grad or weight.requires_grad) \
                    and not torch.compiler.is_compiling() and _saved_tensor_hooks_free():
                dtype = _codes_dtype(self.input_quantizer)
                if dtype is not None:
                    return _apply_saving_codes(self._apply_weight, x, weight, bias, self.input_quantizer, dtype)
        return self._apply_weight(x, weight, bias)

    def forward(self, input: Tensor) -> Tensor:
        x = self.input_quantizer(input)
        weight = self._quantized_weight()
        return self._weighted(x, weight, self._quantized_bias(self.bias))

    def extra_repr(self) -> str:
        act = self.qconfig.activation if self._QUANTIZE_INPUT else None
        return (f"{super().extra_repr()}, weight={self.qconfig.weight.describe()}, "
                f"input={act.describe() if act is not None else 'float'}")


class Linear(QATModule, nn.Linear):
    _FLOAT_MODULE = nn.Linear

    @classmethod
    def _float_kwargs(cls, mod):
        return dict(in_features=mod.in_features, out_features=mod.out_features, bias=mod.bias is not None)

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)


class _Conv(QATModule):
    _ALLOW_PER_GROUP = False

    @classmethod
    def _float_kwargs(cls, mod):
        return dict(in_channels=mod.in_channels, out_channels=mod.out_channels, kernel_size=mod.kernel_size,
                    stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                    bias=mod.bias is not None, padding_mode=mod.padding_mode)

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self._conv_forward(x, weight, bias)


class Conv1d(_Conv, nn.Conv1d):
    _FLOAT_MODULE = nn.Conv1d


class Conv2d(_Conv, nn.Conv2d):
    _FLOAT_MODULE = nn.Conv2d


class Conv3d(_Conv, nn.Conv3d):
    _FLOAT_MODULE = nn.Conv3d


class _ConvTranspose(QATModule):
    _ALLOW_PER_GROUP = False
    _WEIGHT_AXIS = 1

    @classmethod
    def _float_kwargs(cls, mod):
        kwargs = _Conv._float_kwargs(mod)
        kwargs["output_padding"] = mod.output_padding
        return kwargs

    def _weight_view_shape(self) -> List[int]:
        shape = list(self.weight.shape)
        return [shape[0] // self.groups, shape[1] * self.groups] + shape[2:]

    def _quantized_weight(self) -> Tensor:
        # [in, out/g, *k] -> [in/g, out, *k], quantize per output channel (axis 1), and back.
        w = self.weight
        g = self.groups
        shape = list(w.shape)
        grouped = [g, shape[0] // g] + shape[1:]
        v = w.reshape(grouped).transpose(0, 1).reshape(self._weight_view_shape())
        v = self.weight_quantizer(v)
        return v.reshape([shape[0] // g, g] + shape[1:]).transpose(0, 1).reshape(shape)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        """Batched input only (``[N, C, *spatial]``)."""
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              len(self.kernel_size), self.dilation)
        x = self.input_quantizer(input)
        weight = self._quantized_weight()
        return torch.convolution(x, weight, self._quantized_bias(self.bias), self.stride, self.padding, self.dilation,
                                 True, output_padding, self.groups)


class ConvTranspose1d(_ConvTranspose, nn.ConvTranspose1d):
    _FLOAT_MODULE = nn.ConvTranspose1d


class ConvTranspose2d(_ConvTranspose, nn.ConvTranspose2d):
    _FLOAT_MODULE = nn.ConvTranspose2d


class ConvTranspose3d(_ConvTranspose, nn.ConvTranspose3d):
    _FLOAT_MODULE = nn.ConvTranspose3d


class Embedding(QATModule, nn.Embedding):
    """Weight-only: the input is indices. ``max_norm`` and ``sparse`` are not supported (both
    write to or differentiate the stored weight, not the fake-quantized one)."""

    _FLOAT_MODULE = nn.Embedding
    _QUANTIZE_INPUT = False

    def __init__(self, *args, qconfig: QConfig, **kwargs):
        super().__init__(*args, qconfig=qconfig, **kwargs)
        if self.max_norm is not None or self.sparse:
            raise ValueError(f"qatx.nn.qat.Embedding supports neither max_norm (got {self.max_norm}) nor "
                             f"sparse=True (got {self.sparse})")

    @classmethod
    def _float_kwargs(cls, mod):
        return dict(num_embeddings=mod.num_embeddings, embedding_dim=mod.embedding_dim, padding_idx=mod.padding_idx,
                    max_norm=mod.max_norm, norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq,
                    sparse=mod.sparse)

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self._quantized_weight(), self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, False)
