r"""INT8 inference modules, made from trained QAT modules by :func:`qatx.convert` (or
``Cls.from_qat(qat_module)``).

The float interface: every module takes float32 input and returns float32 output. Inside, the
input is quantized with the layer's input qparams (what the QAT input quantizer used; per tensor),

.. math::

    q = \mathrm{clamp}(\mathrm{rint}(x \cdot (1/s_{in})) + z_{in},\ q_{min},\ q_{max}),

multiplied with the int8 weight with exact int32 accumulation, and dequantized in the GEMM
epilogue:

.. math::

    y_c = s_{in}\, s_w[c]\, \Big(\sum_k (q_k - z_{in})(w_{ck} - z_w[c]) + b_c\Big),
    \qquad b_c = \mathrm{clamp}\big(\mathrm{rint}(\mathrm{bias}_c / (s_{in} s_w[c])),\ -2^{31},\ 2^{31}-1\big),

(``rint``: half to even, in float64), the bias the QAT layer itself adds while its input and
weight are fake-quantized, so the two models differ only by float rounding; with the ReLU of a
fused ConvBnReLU applied in the same pass (``qatx::linear_int8`` and
``qatx::convolution_int8``, docs/ops.md).

State: plain tensors registered as buffers (``weight`` int8, or uint8 holding two 4-bit values
per byte; ``weight_scale``, ``weight_zero_point``; ``bias`` int32; ``input_scale``,
``input_zero_point``), so ``state_dict`` holds no ``torch.ao`` quantized tensors; the
configuration (shapes, quant ranges, convolution geometry) is given to the constructor.

Integer activations between layers: a Linear, convolution or Add whose output only feeds INT8
layers quantizing it to one grid can write that grid's integers instead of float32
(:meth:`_OutputGrid.quantize_output_to`, set by :func:`qatx.convert`): uint8 (or int8) tensors
holding :math:`\mathrm{clamp}(\mathrm{rint}(y \cdot (1/s)) + z, q_{min}, q_{max})`, exactly what
the consumer's input quantization makes of the float32 output, so the model's results do not
change. Every layer takes such integer tensors as input (its own grid's integers).

A QAT layer without an input quantizer (a weight-only config such as ``W4_WEIGHT_ONLY``)
becomes a weight-only module: integer weights dequantized to float in the forward, float
activations and a float bias, computing exactly what the QAT layer computes.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
           "Embedding", "Add", "Cat", "Matmul", "MaxPool2d", "DynamicLinear", "pack_int4", "unpack_int4"]


def pack_int4(q: Tensor) -> Tensor:
    """Packs signed 4-bit integers (int8 tensor with values in [-8, 7]) two per byte along the
    last dimension: element ``2j`` in the low nibble, ``2j + 1`` in the high nibble (an odd last
    dimension is padded with 0). Returns uint8 ``[..., ceil(n / 2)]``."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects an int8 tensor, got {q.dtype}")
    if q.numel() > 0 and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    u = q.to(torch.uint8) & 15
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., n]`` from uint8 ``[..., ceil(n / 2)]``
    (``qatx::unpack_int4``). On the CPU the same tensor comes back while ``packed`` and it are
    unchanged, so a 4-bit layer's packed weight stays cached between calls; after an in-place
    change to either, fresh values are made."""
    return torch.ops.qatx.unpack_int4(packed, n)


# ------------------------------------------------------------------------------------------
# Conversion helpers (not scripted).

def _weight_qparams(quantizer: nn.Module):
    """(scale float32, zero_point int32, quant_min, quant_max, granularity, axis, group_size) of a weight quantizer."""
    from ...quantizers import FakeQuantize, LearnableFakeQuantize
    if isinstance(quantizer, FakeQuantize):
        zp = quantizer.zero_point.detach().to(torch.int32)
    elif isinstance(quantizer, LearnableFakeQuantize):
        zp = torch.round(quantizer.zero_point.detach().float().clamp(quantizer.quant_min, quantizer.quant_max))
        zp = zp.to(torch.int32)
    else:
        raise TypeError(f"cannot convert a weight quantized by {type(quantizer).__name__}; "
                        f"supported: qatx.FakeQuantize, qatx.LearnableFakeQuantize")
    if quantizer.quant_min < -128 or quantizer.quant_max > 127:
        raise ValueError(f"INT8 modules need signed weights of at most 8 bits; the weight range is "
                         f"[{quantizer.quant_min}, {quantizer.quant_max}]")
    scale = quantizer.scale.detach().float()
    return scale, zp, quantizer.quant_min, quantizer.quant_max, quantizer.granularity, quantizer.axis, \
        quantizer.group_size


def _input_qparams(quantizer: nn.Module):
    """(scale [1] float32, zero_point [1] int32, quant_min, quant_max), or None for float input."""
    from ...quantizers import PACT, FakeQuantize, LearnableFakeQuantize
    if isinstance(quantizer, nn.Identity) or not getattr(quantizer, "fake_quant_enabled", True):
        return None
    if isinstance(quantizer, PACT):
        levels = 2 ** (quantizer.bits - 1) - 1 if quantizer.signed else 2 ** quantizer.bits - 1
        scale = (quantizer.alpha.detach().float() / levels).reshape(1)
        qmin = -levels if quantizer.signed else 0
        return scale, torch.zeros(1, dtype=torch.int32, device=scale.device), qmin, levels
    if isinstance(quantizer, (FakeQuantize, LearnableFakeQuantize)):
        if quantizer.granularity != "per_tensor":
            raise ValueError(f"INT8 modules quantize their input per tensor; the input quantizer is "
                             f"{quantizer.granularity}")
        scale = quantizer.scale.detach().float().reshape(1)
        zp = quantizer.zero_point.detach()
        if isinstance(quantizer, LearnableFakeQuantize):
            zp = torch.round(zp.float().clamp(quantizer.quant_min, quantizer.quant_max))
        if quantizer.quant_max - quantizer.quant_min > 255:
            raise ValueError(f"INT8 modules need activations of at most 8 bits; the input range is "
                             f"[{quantizer.quant_min}, {quantizer.quant_max}]")
        return scale, zp.to(torch.int32).reshape(1), quantizer.quant_min, quantizer.quant_max
    raise TypeError(f"cannot convert an input quantized by {type(quantizer).__name__}")


def _is_int8_input_range(quant_min: int, quant_max: int) -> bool:
    """At most 8 bits inside [-128, 255]: the input ranges the INT8 ops take."""
    return -128 <= quant_min < quant_max <= 255 and quant_max - quant_min <= 255


def _is_op_input(x: Tensor, quant_min: int, quant_max: int) -> bool:
    """Whether the INT8 ops take x on a grid with this range: float32, or integers of a dtype that holds it."""
    return (x.dtype == torch.float32 or (x.dtype == torch.uint8 and quant_min >= 0) or
            (x.dtype == torch.int8 and quant_max <= 127))


def _dequantized(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """An integer operand as float32 ``(q - z) * s`` (which its quantizer maps back to q); float as it is."""
    if x.is_floating_point():
        return x
    return (x.float() - zero_point.float()) * scale


def _check_calibrated(mod: nn.Module, name: str) -> None:
    from ...quantizers import FakeQuantize
    q = getattr(mod, name, None)
    if isinstance(q, FakeQuantize) and q.observer.min_val.numel() == 0:
        raise ValueError(f"{type(mod).__name__}.{name} has never observed data: run the QAT model on some batches "
                         f"(training or calibration) before qatx.convert")


def _int_bias(bias: Optional[Tensor], s_in: Tensor, s_w: Tensor) -> Optional[Tensor]:
    """The int32 bias codes, as the QAT layer rounds its bias (``qatx.nn.qat.modules.bias_codes``)."""
    if bias is None:
        return None
    from ..qat.modules import bias_codes
    return bias_codes(bias, s_in, s_w)[0].to(torch.int32)


def _describe_weight(bits: int, scale: Tensor) -> str:
    kind = "per_tensor" if scale.numel() == 1 else ("per_group" if scale.dim() == 2 else "per_channel")
    return f"int{bits} {kind}"


# ------------------------------------------------------------------------------------------
# Layers.

class _OutputGrid(nn.Module):
    """The optional output grid of an INT8 op: ``output_scale`` / ``output_zero_point`` buffers
    (``None`` for float32 output) and the range ``output_quant_min`` .. ``output_quant_max``."""

    output_quant_min: int
    output_quant_max: int

    def _init_output_grid(self) -> None:
        self.output_quant_min = 0
        self.output_quant_max = 255
        self.register_buffer("output_scale", None)
        self.register_buffer("output_zero_point", None)

    def quantize_output_to(self, scale: Optional[Tensor], zero_point: Optional[Tensor] = None, quant_min: int = 0,
                           quant_max: int = 255) -> None:
        """Makes the output the integers of this per-tensor grid (uint8 when ``quant_min >= 0``,
        else int8), or float32 again when ``scale`` is None."""
        if scale is None:
            self.output_scale = None
            self.output_zero_point = None
            return
        if not getattr(self, "quantize_input", True):
            raise ValueError(f"{type(self).__name__} computes in float (no input quantizer); its output stays float32")
        if zero_point is None or scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError("quantize_output_to needs a one-element scale and zero_point")
        if not (0 <= quant_min < quant_max <= 255 or -128 <= quant_min < quant_max <= 127):
            raise ValueError(f"quant_min={quant_min}, quant_max={quant_max}: the output range must lie inside "
                             f"[0, 255] (uint8) or [-128, 127] (int8)")
        self.output_scale = scale.detach().float().reshape(1).clone()
        self.output_zero_point = zero_point.detach().to(torch.int32).reshape(1).clone()
        self.output_quant_min = int(quant_min)
        self.output_quant_max = int(quant_max)

    def dequantize_output(self, y: Tensor) -> Tensor:
        """float32 values of an output: integer outputs dequantized, ``(q - z) * s``."""
        if self.output_scale is None or self.output_zero_point is None:
            return y
        return _dequantized(y, self.output_scale, self.output_zero_point)

    def _output_repr(self) -> str:
        if self.output_scale is None:
            return ""
        kind = "uint8" if self.output_quant_min >= 0 else "int8"
        return (f", output={kind} [{self.output_quant_min}, {self.output_quant_max}] "
                f"scale={self.output_scale.item():.4g} zero_point={int(self.output_zero_point.item())}")


class _QuantizedLayer(_OutputGrid):
    """Shared state of the weight layers: int weight (+4-bit packing), qparams, input qparams."""

    weight_bits: int
    weight_numel_last: int
    quantize_input: bool
    input_quant_min: int
    input_quant_max: int
    relu: bool

    def _init_state(self, weight_shape: List[int], scale_shape: List[int], bias: bool, weight_bits: int,
                    quantize_input: bool, input_quant_min: int, input_quant_max: int, relu: bool, device=None,
                    bias_size: int = -1, input_qparams: bool = True) -> None:
        if not 2 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be in [2, 8], got {weight_bits}")
        if quantize_input and not _is_int8_input_range(input_quant_min, input_quant_max):
            raise ValueError(f"input_quant_min={input_quant_min}, input_quant_max={input_quant_max}: the input range "
                             f"must be at most 8 bits inside [-128, 255]")
        self.weight_bits = weight_bits
        self.weight_numel_last = weight_shape[-1]
        self.quantize_input = quantize_input
        self.input_quant_min = input_quant_min
        self.input_quant_max = input_quant_max
        self.relu = relu
        self._init_output_grid()
        if weight_bits <= 4:
            stored = list(weight_shape[:-1]) + [(weight_shape[-1] + 1) // 2]
            self.register_buffer("weight", torch.zeros(stored, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.int32, device=device))
        bias_dtype = torch.int32 if quantize_input else torch.float32
        n_bias = weight_shape[0] if bias_size < 0 else bias_size
        self.register_buffer("bias", torch.zeros(n_bias, dtype=bias_dtype, device=device) if bias else None)
        if input_qparams:
            self.register_buffer("input_scale", torch.ones(1, device=device))
            self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32, device=device))

    def int_weight(self) -> Tensor:
        """The integer weight as int8 (4-bit weights unpacked)."""
        if self.weight_bits <= 4:
            return unpack_int4(self.weight, self.weight_numel_last)
        return self.weight

    def _set_weight(self, q: Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(pack_int4(q) if self.weight_bits <= 4 else q)

    def _input_repr(self) -> str:
        if not self.quantize_input:
            return "input=float"
        kind = "uint8" if self.input_quant_min >= 0 else "int8"
        return (f"input={kind} [{self.input_quant_min}, {self.input_quant_max}] "
                f"scale={self.input_scale.item():.4g} zero_point={int(self.input_zero_point.item())}")


def _set_qparams(new: _QuantizedLayer, scale: Tensor, zp: Tensor, inp, bias: Optional[Tensor]) -> None:
    with torch.no_grad():
        new.weight_scale.copy_(scale.reshape(new.weight_scale.shape))
        new.weight_zero_point.copy_(zp.reshape(new.weight_zero_point.shape))
        if inp is not None:
            new.input_scale.copy_(inp[0])
            new.input_zero_point.copy_(inp[1])
            if bias is not None:
                s_w = scale if scale.dim() < 2 else scale[:, 0]
                new.bias.copy_(_int_bias(bias, inp[0], s_w.expand(bias.shape[0]) if s_w.numel() == 1 else s_w))
        elif bias is not None:
            new.bias.copy_(bias.detach().float())


def _quantize_weight(w: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int, granularity: str, axis: int,
                     group_size: int) -> Tensor:
    """The integers the QAT weight fake-quantize produced (same op family, same qparams)."""
    w = w.detach()
    if granularity == "per_tensor":
        return torch.ops.qatx.quantize_per_tensor_affine(w, scale, zp, qmin, qmax, torch.int8)
    if granularity == "per_channel":
        return torch.ops.qatx.quantize_per_channel_affine(w, scale, zp, axis, qmin, qmax, torch.int8)
    return torch.ops.qatx.quantize_per_group_affine(w, scale, zp, group_size, qmin, qmax, torch.int8)


def _folded(qat: nn.Module):
    """(float weight the weight quantizer sees, float bias of the folded layer, relu)."""
    from ..qat.fused import _BnFolded
    if isinstance(qat, _BnFolded):
        with torch.no_grad():
            return qat._float_weight().detach(), qat._folded_bias().detach(), bool(qat.with_relu)
    return qat.weight.detach(), None if qat.bias is None else qat.bias.detach(), False


class Linear(_QuantizedLayer):
    """INT8 ``nn.Linear`` (``qatx::linear_int8``); per-tensor, per-channel or per-group int8 or 4-bit weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 weight_granularity: str = "per_channel", group_size: int = 0, quantize_input: bool = True,
                 input_quant_min: int = 0, input_quant_max: int = 255, relu: bool = False, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        scale_shape = {"per_tensor": [1], "per_channel": [out_features]}.get(weight_granularity)
        if weight_granularity == "per_group":
            if group_size < 1 or in_features % group_size:
                raise ValueError(f"group_size={group_size} must be positive and divide in_features={in_features}")
            scale_shape = [out_features, in_features // group_size]
        if scale_shape is None:
            raise ValueError(f"weight_granularity must be 'per_tensor', 'per_channel' or 'per_group', "
                             f"got {weight_granularity!r}")
        self._init_state([out_features, in_features], scale_shape, bias, weight_bits, quantize_input,
                         input_quant_min, input_quant_max, relu, device)

    @classmethod
    def from_qat(cls, qat: nn.Module) -> "Linear":
        """From a ``qatx.nn.qat.Linear`` or ``LinearBn1d`` (BN folded with its running statistics)."""
        from ..qat import Linear as QatLinear
        if not isinstance(qat, QatLinear):
            raise TypeError(f"Linear.from_qat expects a qatx.nn.qat.Linear or LinearBn1d, got {type(qat).__name__}")
        _check_calibrated(qat, "input_quantizer")
        w, bias, relu = _folded(qat)
        scale, zp, qmin, qmax, gran, axis, gs = _weight_qparams(qat.weight_quantizer)
        inp = _input_qparams(qat.input_quantizer)
        new = cls(qat.in_features, qat.out_features, bias is not None, 4 if qmin >= -8 and qmax <= 7 else 8,
                  gran, gs, inp is not None, inp[2] if inp else 0, inp[3] if inp else 255, relu, device=w.device)
        new._set_weight(_quantize_weight(w, scale, zp, qmin, qmax, gran, axis, gs))
        _set_qparams(new, scale, zp, inp, bias)
        return new.eval()

    def forward(self, input: Tensor) -> Tensor:
        w = self.int_weight()
        if self.quantize_input:
            return torch.ops.qatx.linear_int8(input, self.input_scale, self.input_zero_point, self.input_quant_min,
                                              self.input_quant_max, w, self.weight_scale, self.weight_zero_point,
                                              self.bias, self.relu, self.output_scale, self.output_zero_point,
                                              self.output_quant_min, self.output_quant_max)
        y = F.linear(input, self._dequantized_weight(w), self.bias)
        return F.relu(y) if self.relu else y

    def _dequantized_weight(self, w: Tensor) -> Tensor:
        if self.weight_scale.dim() == 2 and self.weight_scale.shape[1] > 1:
            return torch.ops.qatx.dequantize_per_group_affine(w, self.weight_scale, self.weight_zero_point,
                                                              self.in_features // self.weight_scale.shape[1], None)
        if self.weight_scale.numel() == 1:
            return torch.ops.qatx.dequantize_per_tensor_affine(w, self.weight_scale, self.weight_zero_point, None)
        return torch.ops.qatx.dequantize_per_channel_affine(w, self.weight_scale.reshape(-1),
                                                            self.weight_zero_point.reshape(-1), 0, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={_describe_weight(self.weight_bits, self.weight_scale)}, {self._input_repr()}"
                f"{', relu=True' if self.relu else ''}{self._output_repr()}")


class _ConvNd(_QuantizedLayer):
    """INT8 convolution (``qatx::convolution_int8``); per-tensor or per-output-channel weights."""

    _DIM = 2
    _TRANSPOSED = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: List[int], stride: List[int],
                 padding: List[int], dilation: List[int], groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", output_padding: Optional[List[int]] = None, weight_bits: int = 8,
                 weight_granularity: str = "per_channel", quantize_input: bool = True, input_quant_min: int = 0,
                 input_quant_max: int = 255, relu: bool = False, device=None):
        super().__init__()
        d = self._DIM
        if not quantize_input:
            raise ValueError("INT8 convolutions need an input quantizer (weight-only convolutions are not supported)")
        if weight_granularity not in ("per_tensor", "per_channel"):
            raise ValueError(f"convolution weights are per_tensor or per_channel, got {weight_granularity!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}")
        if self._TRANSPOSED and padding_mode != "zeros":
            raise ValueError("transposed convolutions support only padding_mode='zeros'")
        self.transposed: bool = self._TRANSPOSED
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = [int(k) for k in kernel_size]
        self.stride = [int(s) for s in stride]
        self.padding = [int(p) for p in padding]
        self.dilation = [int(v) for v in dilation]
        self.output_padding = [int(v) for v in output_padding] if output_padding is not None else [0] * d
        self.groups = groups
        self.padding_mode = padding_mode
        # F.pad order (last dimension first), for padding modes other than zeros.
        self._pad_amounts: List[int] = [p for p in reversed(self.padding) for _ in range(2)]
        if self._TRANSPOSED:
            shape = [in_channels, out_channels // groups] + self.kernel_size
        else:
            shape = [out_channels, in_channels // groups] + self.kernel_size
        self.weight_shape = shape
        scale_shape = [1] if weight_granularity == "per_tensor" else [out_channels]
        # The int4 packing runs along the flattened weight of each output row.
        self._init_state([shape[0], int(torch.tensor(shape[1:]).prod())], scale_shape, bias, weight_bits, True,
                         input_quant_min, input_quant_max, relu, device, bias_size=out_channels)

    def conv_weight(self) -> Tensor:
        return self.int_weight().reshape(self.weight_shape)

    @classmethod
    def from_qat(cls, qat: nn.Module):
        """From the QAT convolution of the same kind (fused ConvBn/ConvBnReLU included, BN folded)."""
        from .. import qat as q
        expected = {1: (q.Conv1d, q.ConvTranspose1d), 2: (q.Conv2d, q.ConvTranspose2d),
                    3: (q.Conv3d, q.ConvTranspose3d)}[cls._DIM][1 if cls._TRANSPOSED else 0]
        if not isinstance(qat, expected):
            raise TypeError(f"{cls.__name__}.from_qat expects a qatx.nn.qat.{expected.__name__} (or its fused "
                            f"ConvBn variants), got {type(qat).__name__}")
        _check_calibrated(qat, "input_quantizer")
        w, bias, relu = _folded(qat)
        scale, zp, qmin, qmax, gran, axis, gs = _weight_qparams(qat.weight_quantizer)
        inp = _input_qparams(qat.input_quantizer)
        if inp is None:
            raise ValueError(f"{type(qat).__name__} has no input quantizer: INT8 convolutions need quantized inputs")
        new = cls(qat.in_channels, qat.out_channels, list(qat.kernel_size), list(qat.stride), list(qat.padding),
                  list(qat.dilation), qat.groups, bias is not None, qat.padding_mode,
                  list(qat.output_padding) if cls._TRANSPOSED else None, 4 if qmin >= -8 and qmax <= 7 else 8, gran,
                  True, inp[2], inp[3], relu, device=w.device)
        if cls._TRANSPOSED:  # quantized as the QAT layer does: viewed [in/g, out, *k], per channel along axis 1
            g = qat.groups
            shape = list(w.shape)
            v = w.reshape([g, shape[0] // g] + shape[1:]).transpose(0, 1).reshape(qat._weight_view_shape())
            qv = _quantize_weight(v, scale, zp, qmin, qmax, gran, axis, gs)
            qw = qv.reshape([shape[0] // g, g] + shape[1:]).transpose(0, 1).reshape(shape)
        else:
            qw = _quantize_weight(w, scale, zp, qmin, qmax, gran, axis, gs)
        new._set_weight(qw.reshape(new.weight.shape[0], -1))
        _set_qparams(new, scale, zp, inp, bias)
        return new.eval()

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._pad_amounts, mode=self.padding_mode)
            padding = [0] * len(self.padding)
        return torch.ops.qatx.convolution_int8(input, self.input_scale, self.input_zero_point, self.input_quant_min,
                                               self.input_quant_max, self.conv_weight(), self.weight_scale,
                                               self.weight_zero_point, self.bias, self.stride, padding, self.dilation,
                                               self.transposed, self.output_padding, self.groups, self.relu,
                                               self.output_scale, self.output_zero_point, self.output_quant_min,
                                               self.output_quant_max)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
             f"stride={tuple(self.stride)}")
        if any(self.padding):
            s += f", padding={tuple(self.padding)}"
        if any(v != 1 for v in self.dilation):
            s += f", dilation={tuple(self.dilation)}"
        if any(self.output_padding):
            s += f", output_padding={tuple(self.output_padding)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return (f"{s}, bias={self.bias is not None}, weight={_describe_weight(self.weight_bits, self.weight_scale)}, "
                f"{self._input_repr()}{', relu=True' if self.relu else ''}{self._output_repr()}")


class Conv1d(_ConvNd):
    _DIM = 1


class Conv2d(_ConvNd):
    _DIM = 2


class Conv3d(_ConvNd):
    _DIM = 3


class ConvTranspose1d(_ConvNd):
    _DIM = 1
    _TRANSPOSED = True


class ConvTranspose2d(_ConvNd):
    _DIM = 2
    _TRANSPOSED = True


class ConvTranspose3d(_ConvNd):
    _DIM = 3
    _TRANSPOSED = True


class Embedding(nn.Module):
    r"""INT8 / 4-bit ``nn.Embedding``: the selected rows are dequantized,
    :math:`y = (q - z) s` (per-row, per-tensor or per-group qparams), exactly the rows of the
    QAT layer's fake-quantized weight."""

    weight_bits: int

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 weight_bits: int = 8, weight_granularity: str = "per_channel", group_size: int = 0, device=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight_bits = weight_bits
        if weight_granularity == "per_tensor":
            scale_shape = [1, 1]
        elif weight_granularity == "per_channel":
            scale_shape = [num_embeddings, 1]
        elif weight_granularity == "per_group":
            if group_size < 1 or embedding_dim % group_size:
                raise ValueError(f"group_size={group_size} must be positive and divide embedding_dim={embedding_dim}")
            scale_shape = [num_embeddings, embedding_dim // group_size]
        else:
            raise ValueError(f"weight_granularity must be 'per_tensor', 'per_channel' or 'per_group', "
                             f"got {weight_granularity!r}")
        stored = [num_embeddings, (embedding_dim + 1) // 2] if weight_bits <= 4 else [num_embeddings, embedding_dim]
        self.register_buffer("weight", torch.zeros(stored, dtype=torch.uint8 if weight_bits <= 4 else torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.int32, device=device))

    @classmethod
    def from_qat(cls, qat: nn.Module) -> "Embedding":
        from ..qat import Embedding as QatEmbedding
        if not isinstance(qat, QatEmbedding):
            raise TypeError(f"Embedding.from_qat expects a qatx.nn.qat.Embedding, got {type(qat).__name__}")
        scale, zp, qmin, qmax, gran, axis, gs = _weight_qparams(qat.weight_quantizer)
        if gran == "per_channel" and axis != 0:
            raise ValueError(f"embedding weights are quantized per row (axis 0), got axis={axis}")
        bits = 4 if qmin >= -8 and qmax <= 7 else 8
        new = cls(qat.num_embeddings, qat.embedding_dim, qat.padding_idx, bits, gran, gs, device=qat.weight.device)
        q = _quantize_weight(qat.weight, scale, zp, qmin, qmax, gran, axis, gs)
        with torch.no_grad():
            new.weight.copy_(pack_int4(q) if bits <= 4 else q)
            new.weight_scale.copy_(scale.reshape(new.weight_scale.shape) if gran != "per_tensor"
                                   else scale.reshape(1, 1))
            new.weight_zero_point.copy_(zp.reshape(new.weight_zero_point.shape) if gran != "per_tensor"
                                        else zp.reshape(1, 1))
        return new.eval()

    def forward(self, input: Tensor) -> Tensor:
        if input.dtype != torch.int64 and input.dtype != torch.int32:
            raise TypeError(f"Embedding input must be int64 or int32 indices, got {input.dtype}")
        idx = input.reshape(-1)
        rows = self.weight.index_select(0, idx)
        if self.weight_bits <= 4:
            rows = unpack_int4(rows, self.embedding_dim)
        if self.weight_scale.shape[0] == 1:
            s, z = self.weight_scale, self.weight_zero_point
        else:
            s, z = self.weight_scale.index_select(0, idx), self.weight_zero_point.index_select(0, idx)
        groups = s.shape[1]
        q = rows.reshape(rows.shape[0], groups, self.embedding_dim // groups).float()
        y = (q - z.float().unsqueeze(-1)) * s.unsqueeze(-1)
        return y.reshape(list(input.shape) + [self.embedding_dim])

    def extra_repr(self) -> str:
        kind = "per_tensor" if self.weight_scale.shape[0] == 1 else (
            "per_group" if self.weight_scale.shape[1] > 1 else "per_channel")
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=int{self.weight_bits} {kind}"


# ------------------------------------------------------------------------------------------
# Functional ops between layers: what the QAT op computes, with its frozen qparams.

class _FrozenQuant(nn.Module):
    """A frozen per-tensor fake-quantize (or the identity when ``enabled`` is False)."""

    enabled: bool
    quant_min: int
    quant_max: int

    def __init__(self, enabled: bool = True, quant_min: int = 0, quant_max: int = 255, device=None):
        super().__init__()
        self.enabled = enabled
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.register_buffer("scale", torch.ones(1, device=device))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32, device=device))

    @classmethod
    def from_quantizer(cls, quantizer: nn.Module) -> "_FrozenQuant":
        qp = _input_qparams(quantizer)
        if qp is None:
            return cls(False)
        new = cls(True, qp[2], qp[3], device=qp[0].device)
        with torch.no_grad():
            new.scale.copy_(qp[0])
            new.zero_point.copy_(qp[1])
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return torch.ops.qatx.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min,
                                                              self.quant_max)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "float"
        return (f"[{self.quant_min}, {self.quant_max}] scale={self.scale.item():.4g} "
                f"zero_point={int(self.zero_point.item())}")


class _TwoOperands(nn.Module):
    """A converted op of two operands, each with its frozen per-tensor quantizer."""

    def __init__(self):
        super().__init__()
        self.input_quant = _FrozenQuant(False)
        self.other_quant = _FrozenQuant(False)

    @classmethod
    def from_qat(cls, mod: nn.Module):
        new = cls()
        new.input_quant = _FrozenQuant.from_quantizer(mod.input_quantizer)
        new.other_quant = _FrozenQuant.from_quantizer(mod.other_quantizer)
        return new.eval()


class Add(_TwoOperands, _OutputGrid):
    """Converted :class:`qatx.nn.QuantAdd`: ``q_1(x) + q_2(y)`` with the frozen qparams, then a
    ReLU when ``relu`` (set by :func:`qatx.convert` when a ReLU alone reads the sum).

    When both operands are quantized to 8-bit grids and are tensors of the same shape, this is
    one :func:`qatx.ops.add_int8` pass (bit-identical to the three ops it replaces); otherwise the
    fake-quantize ops and ``+``. Operands may be integer tensors on their grids, and the output
    may be quantized (:meth:`quantize_output_to`), as for the layers.
    """

    relu: bool

    def __init__(self, relu: bool = False):
        super().__init__()
        self.relu = relu
        self._init_output_grid()

    def _fusable(self, x: Tensor, y: Tensor) -> bool:
        a, b = self.input_quant, self.other_quant
        return (a.enabled and b.enabled and _is_int8_input_range(a.quant_min, a.quant_max) and
                _is_int8_input_range(b.quant_min, b.quant_max) and _is_op_input(x, a.quant_min, a.quant_max) and
                _is_op_input(y, b.quant_min, b.quant_max) and x.shape == y.shape and x.device == y.device)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a, b = self.input_quant, self.other_quant
        if self._fusable(x, y):
            return torch.ops.qatx.add_int8(x, a.scale, a.zero_point, a.quant_min, a.quant_max, y, b.scale,
                                           b.zero_point, b.quant_min, b.quant_max, self.relu, self.output_scale,
                                           self.output_zero_point, self.output_quant_min, self.output_quant_max)
        out = self.input_quant(_dequantized(x, a.scale, a.zero_point)) + \
            self.other_quant(_dequantized(y, b.scale, b.zero_point))
        out = torch.relu(out) if self.relu else out
        scale, zero_point = self.output_scale, self.output_zero_point
        if scale is not None and zero_point is not None:
            dtype = torch.uint8 if self.output_quant_min >= 0 else torch.int8
            return torch.ops.qatx.quantize_per_tensor_affine(out, scale, zero_point, self.output_quant_min,
                                                             self.output_quant_max, dtype)
        return out

    def extra_repr(self) -> str:
        return ("relu=True" if self.relu else "") + self._output_repr()


class Matmul(_TwoOperands):
    """Converted :class:`qatx.nn.QuantMatmul`: ``q_1(a) @ q_2(b)`` with the frozen qparams."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.matmul(self.input_quant(x), self.other_quant(y))


class Cat(nn.Module):
    """Converted :class:`qatx.nn.QuantCat`: ``q(cat(xs, dim))`` with the frozen qparams."""

    def __init__(self, dim: int = 0):
        super().__init__()
        self.dim = dim
        self.output_quant = _FrozenQuant(False)

    @classmethod
    def from_qat(cls, mod: nn.Module) -> "Cat":
        new = cls(mod.dim)
        new.output_quant = _FrozenQuant.from_quantizer(mod.output_quantizer)
        return new.eval()

    def forward(self, xs: List[Tensor]) -> Tensor:
        return self.output_quant(torch.cat(xs, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _pooled_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output size (``pooling_output_shape``)."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that also pools integer activations (what :func:`qatx.convert` puts in
    place of a max pooling that integer activations pass through). Quantization is monotone, so
    the max of a grid's integers is the integer of the max: the pooled integers are exactly those
    of the pooled float values. Integers are pooled as the elementwise maximum of the window's
    ``kernel_size`` strided views of the input, padded with the dtype's lowest value (torch's own
    integer max pooling is limited to planes of at most 255 pixels for uint8 on the CPU, and
    CUDA has none). Float input: ``nn.MaxPool2d`` itself."""

    _window: List[int]  # kernel, stride, padding, dilation: (h, w) each

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        if return_indices:
            raise ValueError("qatx.nn.quantized.MaxPool2d does not return indices")
        self._window = _pair(kernel_size) + _pair(stride if stride is not None else kernel_size) + \
            _pair(padding) + _pair(dilation)

    @classmethod
    def from_float(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        if type(pool) is not nn.MaxPool2d or pool.return_indices:
            raise TypeError("MaxPool2d.from_float expects an nn.MaxPool2d without return_indices")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, False, pool.ceil_mode)

    def forward(self, input: Tensor) -> Tensor:
        if input.is_floating_point():
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode)
        k, st, p, d = self._window[0:2], self._window[2:4], self._window[4:6], self._window[6:8]
        h, w = input.shape[-2], input.shape[-1]
        oh = _pooled_size(h, k[0], st[0], p[0], d[0], self.ceil_mode)
        ow = _pooled_size(w, k[1], st[1], p[1], d[1], self.ceil_mode)
        # Padding on the right and bottom reaches the last window (ceil_mode may need more than p).
        bottom = max((oh - 1) * st[0] + d[0] * (k[0] - 1) + 1 - h - p[0], 0)
        right = max((ow - 1) * st[1] + d[1] * (k[1] - 1) + 1 - w - p[1], 0)
        lowest = 0 if input.dtype == torch.uint8 else -128
        x = input
        if p[0] > 0 or p[1] > 0 or bottom > 0 or right > 0:
            x = F.pad(input, [p[1], right, p[0], bottom], value=float(lowest))
        out = x[..., 0:(oh - 1) * st[0] + 1:st[0], 0:(ow - 1) * st[1] + 1:st[1]]
        for i in range(k[0]):
            for j in range(k[1]):
                if i + j > 0:
                    r, c = i * d[0], j * d[1]
                    out = torch.maximum(out, x[..., r:r + (oh - 1) * st[0] + 1:st[0], c:c + (ow - 1) * st[1] + 1:st[1]])
        return out


# ------------------------------------------------------------------------------------------
# Dynamic quantization.

class DynamicLinear(_QuantizedLayer):
    r"""``nn.Linear`` with int8 (or 4-bit) per-channel symmetric weights and activations quantized
    at run time from each call's range (``qatx::linear_int8_dynamic``): uint8 per tensor or per row,
    :math:`s = (\max(x, 0) - \min(x, 0)) / 255`. Made by :func:`qatx.quantize_dynamic`."""

    per_row: bool

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 per_row: bool = False, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_row = per_row
        self._init_state([out_features, in_features], [out_features], bias, weight_bits, False, 0, 255, False, device,
                         input_qparams=False)

    @classmethod
    def from_float(cls, mod: nn.Linear, bits: int = 8, per_row: bool = False) -> "DynamicLinear":
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"DynamicLinear.from_float expects an nn.Linear, got {type(mod).__name__}")
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        w = mod.weight.detach().float()
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, bits, per_row, device=w.device)
        new._set_weight(torch.ops.qatx.quantize_per_channel_affine(w, scale, zp, 0, -qmax - 1, qmax, torch.int8))
        with torch.no_grad():
            new.weight_scale.copy_(scale)
            if mod.bias is not None:
                new.bias.copy_(mod.bias.detach().float())
        return new.eval()

    def forward(self, input: Tensor) -> Tensor:
        return torch.ops.qatx.linear_int8_dynamic(input, self.int_weight(), self.weight_scale,
                                                  self.weight_zero_point, self.bias, self.per_row)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int{self.weight_bits} per_channel, input=dynamic uint8 "
                f"{'per_row' if self.per_row else 'per_tensor'}")
