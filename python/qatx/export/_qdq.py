"""The QDQ form of a prepared (QAT) model, which the ONNX export translates node for node:

* every quantizer (``FakeQuantize``, ``LearnableFakeQuantize``, ``PACT``) becomes a
  :class:`FixedQuantize` that calls the affine fake-quantize op with its current qparams; this
  is bit-identical (LSQ/LSQ+ run the affine kernel with the zero point rounded half to even,
  PACT with ``s = fl32(alpha / n)`` and zero point 0, see docs/ops.md);
* every weight quantizer becomes a :class:`DequantizedWeight` holding the integer codes of the
  weight it sees (computed once with the qatx quantize op, so
  ``dequantize(codes) == fake_quantize(weight)`` bit for bit) and ignoring its input, so that
  the float weight (and its BN folding) drops out of the graph and the ONNX file stores
  integer weight initializers;
* every bias that the QAT layer puts on the int32 grid of ``s_in * s_w`` (input and weight
  fake-quantized) becomes a :class:`DequantizedBias` of its int32 codes, so the ONNX file
  holds ``DequantizeLinear(int32 bias, s_in * s_w, axis 0)`` as the INT8 layer does.
"""
import copy
import types
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quantizers
from ..nn.qat import modules as qat_modules
from ._common import inference_copy

__all__ = ["affine_qparams", "FixedQuantize", "DequantizedWeight", "DequantizedBias", "QDQLayer", "int8_qdq_form",
           "qdq_form"]


def affine_qparams(q: nn.Module) -> Optional[Tuple[Tensor, Tensor, str, int, int, int, int]]:
    """``(scale, zero_point int32, granularity, axis, group_size, quant_min, quant_max)`` of the
    affine fake-quantization a quantizer computes now, or None when it is switched off."""
    if not q.fake_quant_enabled:
        return None
    if isinstance(q, quantizers.FakeQuantize):
        return (q.scale.detach().float(), q.zero_point.detach().to(torch.int32), q.granularity, q.axis, q.group_size,
                q.quant_min, q.quant_max)
    if isinstance(q, quantizers.LearnableFakeQuantize):
        scale = q.scale.detach().float().clamp(min=q.eps)
        zero_point = torch.round(q.zero_point.detach().float().clamp(q.quant_min, q.quant_max)).to(torch.int32)
        return scale, zero_point, q.granularity, q.axis, q.group_size, q.quant_min, q.quant_max
    if isinstance(q, quantizers.PACT):
        n = 2 ** q.bits - 1 if not q.signed else 2 ** (q.bits - 1) - 1
        scale = q.alpha.detach().float().clamp(min=q.eps) / n  # one float32 division, as the op
        return scale, torch.zeros(1, dtype=torch.int32, device=scale.device), "per_tensor", 0, 0, \
            (0 if not q.signed else -n), n
    raise TypeError(f"no affine form for the quantizer {type(q).__name__}")


def code_dtype(quant_min: int, quant_max: int) -> torch.dtype:
    """The narrowest integer dtype holding ``[quant_min, quant_max]`` (int8, uint8, int16, int32)."""
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= quant_min and quant_max <= info.max:
            return dtype
    return torch.int32


class FixedQuantize(nn.Module):
    """Affine fake quantization with fixed qparams (the qatx affine ops)."""

    def __init__(self, scale: Tensor, zero_point: Tensor, granularity: str, axis: int, group_size: int,
                 quant_min: int, quant_max: int):
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.clone())
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.quant_min = quant_min
        self.quant_max = quant_max

    def forward(self, x: Tensor) -> Tensor:
        if self.granularity == "per_tensor":
            return torch.ops.qatx.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min,
                                                                  self.quant_max)
        if self.granularity == "per_channel":
            return torch.ops.qatx.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                                   self.quant_min, self.quant_max)
        return torch.ops.qatx.fake_quantize_per_group_affine(x, self.scale, self.zero_point, self.group_size,
                                                             self.quant_min, self.quant_max)


class DequantizedWeight(nn.Module):
    """A constant weight as integer codes and qparams; ``forward`` ignores its input (the float
    weight) and returns ``dequantize(codes)`` in the input's dtype."""

    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor, granularity: str, axis: int,
                 group_size: int, quant_min: int, quant_max: int):
        super().__init__()
        dtype = code_dtype(quant_min, quant_max)
        w = weight.detach()
        if granularity == "per_tensor":
            codes = torch.ops.qatx.quantize_per_tensor_affine(w, scale, zero_point, quant_min, quant_max, dtype)
        elif granularity == "per_channel":
            codes = torch.ops.qatx.quantize_per_channel_affine(w, scale, zero_point, axis, quant_min, quant_max, dtype)
        else:
            codes = torch.ops.qatx.quantize_per_group_affine(w, scale, zero_point, group_size, quant_min, quant_max,
                                                             dtype)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.clone())
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero_point: Tensor, granularity: str, axis: int,
                   group_size: int) -> "DequantizedWeight":
        """From integer codes as they are (an INT8 layer's weight)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.register_buffer("codes", codes.clone())
        new.register_buffer("scale", scale.clone())
        new.register_buffer("zero_point", zero_point.clone())
        new.granularity, new.axis, new.group_size = granularity, axis, group_size
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.granularity == "per_tensor":
            return torch.ops.qatx.dequantize_per_tensor_affine(self.codes, self.scale, self.zero_point, x.dtype)
        if self.granularity == "per_channel":
            return torch.ops.qatx.dequantize_per_channel_affine(self.codes, self.scale, self.zero_point, self.axis,
                                                                x.dtype)
        return torch.ops.qatx.dequantize_per_group_affine(self.codes, self.scale, self.zero_point, self.group_size,
                                                          x.dtype)


class DequantizedBias(nn.Module):
    """A QAT layer's bias as the INT8 layer holds it: int32 codes with the per-channel scale
    ``s_in * s_w[c]`` (float32); ``forward`` ignores its input and returns the dequantized bias."""

    def __init__(self, codes: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("scale", scale.float().expand(codes.shape).contiguous())
        self.register_buffer("zero_point", torch.zeros(codes.shape, dtype=torch.int32, device=codes.device))

    def forward(self, bias: Tensor) -> Tensor:
        return torch.ops.qatx.dequantize_per_channel_affine(self.codes, self.scale, self.zero_point, 0, bias.dtype)


class QDQLayer(nn.Module):
    """An INT8 Linear or convolution (``qatx.nn.quantized``) in QDQ form: its input quantizer as
    :class:`FixedQuantize`, its integer weight and int32 bias as :class:`DequantizedWeight` /
    :class:`DequantizedBias`, then the float op and ReLU, which is what the INT8 layer computes
    (up to float rounding)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        from ..nn import quantized as nnq

        self.kind = "linear" if isinstance(layer, nnq.Linear) else ("transposed" if layer.transposed else "conv")
        self.relu = bool(layer.relu)
        s_w = layer.weight_scale
        if self.kind == "linear":
            codes = layer.int_weight()
            if s_w.dim() == 2 and s_w.shape[1] > 1:
                gran, axis, group_size = "per_group", 0, layer.in_features // s_w.shape[1]
            else:
                gran, axis, group_size = ("per_tensor" if s_w.numel() == 1 else "per_channel"), 0, 0
                s_w = s_w.reshape(-1)
        else:
            codes = layer.conv_weight()
            gran, group_size = ("per_tensor" if s_w.numel() == 1 else "per_channel"), 0
            axis = 1 if self.kind == "transposed" else 0  # ConvTranspose weight [in, out/groups, *k]
            if self.kind == "transposed" and layer.groups != 1 and gran == "per_channel":
                raise ValueError("qatx.export.onnx: a converted grouped ConvTranspose with per-channel weights has no "
                                 "per-axis ONNX form; export the QAT model it was converted from instead")
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.output_padding, self.groups, self.dim = layer.output_padding, layer.groups, len(layer.kernel_size)
            self.padding_mode, self._pad_amounts = layer.padding_mode, layer._pad_amounts
        z_w = layer.weight_zero_point if gran == "per_group" else layer.weight_zero_point.reshape(s_w.shape)
        self.weight = DequantizedWeight.from_codes(codes, s_w, z_w, gran, axis, group_size)
        self.input_quantizer: nn.Module = nn.Identity()
        self.bias: Optional[nn.Module] = None
        if layer.quantize_input:
            self.input_quantizer = FixedQuantize(layer.input_scale, layer.input_zero_point, "per_tensor", 0, 0,
                                                 layer.input_quant_min, layer.input_quant_max)
            if layer.bias is not None:
                s_b = layer.weight_scale if layer.weight_scale.dim() < 2 else layer.weight_scale[:, 0]
                scale = layer.input_scale.double() * s_b.double().reshape(-1)
                self.bias = DequantizedBias(layer.bias, scale.expand(layer.bias.shape))
        elif layer.bias is not None:
            self.register_buffer("float_bias", layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        w = self.weight(x)
        b = self.bias(x) if self.bias is not None else getattr(self, "float_bias", None)
        if self.kind == "linear":
            y = F.linear(x, w, b)
        else:
            padding = self.padding
            if self.padding_mode != "zeros":
                x = F.pad(x, self._pad_amounts, mode=self.padding_mode)
                padding = [0] * self.dim
            y = torch.convolution(x, w, b, self.stride, padding, self.dilation, self.kind == "transposed",
                                  self.output_padding, self.groups)
        return F.relu(y) if self.relu else y


def int8_qdq_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every INT8 Linear / convolution of ``qatx.nn.quantized`` in QDQ
    form (:class:`QDQLayer`); other modules are kept. Layers that pass integer activations
    (``quantize_output_to``) return float32 again: their consumers' QuantizeLinear makes the same
    integers, so the graph is the one of float32 activations."""
    from ..nn import quantized as nnq
    from ..nn.quantized.modules import _OutputGrid

    layers = (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d, nnq.ConvTranspose2d,
              nnq.ConvTranspose3d)
    if not any(type(m) in layers or (isinstance(m, _OutputGrid) and m.output_scale is not None)
               for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(mod, _OutputGrid):
            mod.quantize_output_to(None)
    for name, mod in list(model.named_modules()):
        if type(mod) in layers:
            parent, _, child = name.rpartition(".")
            new = QDQLayer(mod)
            if not parent and not child:
                return new
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _quantized_biases(model: nn.Module) -> Dict[str, DequantizedBias]:
    """The bias each QAT layer adds now on its int32 grid, by layer name (layers whose bias stays float are left out)."""
    from ..nn.qat.fused import _BnFolded
    from ..nn.qat.modules import bias_codes

    found = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, qat_modules.QATModule):
            continue
        bias = mod._folded_bias() if isinstance(mod, _BnFolded) else getattr(mod, "bias", None)
        iq, wq = mod.input_quantizer, mod.weight_quantizer
        if bias is None or not (hasattr(iq, "grid_scale") and hasattr(wq, "grid_scale")):
            continue
        if iq.fake_quant_enabled and wq.fake_quant_enabled:
            codes, scale = bias_codes(bias.detach(), iq.grid_scale(), wq.grid_scale())
            found[name] = DequantizedBias(codes, scale)
    return found


def qdq_form(model: nn.Module, inputs) -> nn.Module:
    """The QDQ form of ``model`` (an inference copy; see the module docstring). One forward with
    ``inputs`` records the tensor each weight quantizer sees."""
    model = inference_copy(model)
    seen: Dict[int, Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] == "weight_quantizer" and isinstance(mod, quantizers._Toggles):
            hooks.append(mod.register_forward_pre_hook(lambda m, args: seen.__setitem__(id(m), args[0].detach())))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    biases = _quantized_biases(model)
    replaced: Dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(mod, quantizers._Toggles):
            continue
        if id(mod) not in replaced:
            params = affine_qparams(mod)
            if params is None:
                replaced[id(mod)] = nn.Identity()
            elif id(mod) in seen:
                replaced[id(mod)] = DequantizedWeight(seen[id(mod)], *params)
            else:
                replaced[id(mod)] = FixedQuantize(*params)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replaced[id(mod)])
    for name, dequantized in biases.items():
        # The int32 bias codes replace the bias computation (and, in fused layers, the BN folding).
        mod = model.get_submodule(name)
        mod.bias_dequantize = dequantized
        mod._quantized_bias = types.MethodType(lambda self, bias: self.bias_dequantize(bias), mod)
    for mod in model.modules():
        # With groups=1 the ConvTranspose weight view [in/g, out, *k] is the weight itself: read the
        # codes directly (axis 1), without the reshapes and transposes that would sit between
        # DequantizeLinear and ConvTranspose in the ONNX graph.
        if isinstance(mod, qat_modules._ConvTranspose) and mod.groups == 1 and \
                isinstance(mod.weight_quantizer, DequantizedWeight):
            mod._quantized_weight = types.MethodType(lambda self: self.weight_quantizer(self.weight), mod)
    return model
