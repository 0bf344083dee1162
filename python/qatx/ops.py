r"""Typed Python wrappers of the ``torch.ops.qatx`` operators.

Every function here is a thin, scriptable call of the C++ operator of the same name; the
operators themselves also work from TorchScript, from C++ (``qatx::ops::...``) and under
``torch.compile``. qparams are tensors on the input's device: ``scale`` with a floating dtype
(used as float32), ``zero_point`` with an integer dtype. The learnable quantizers
(:func:`fake_quantize_lsq`, :func:`fake_quantize_lsq_per_group`, :func:`fake_quantize_pact`, at
the end) take float32 parameters instead and return gradients for them too.

Numerics, identical on CPU and CUDA and for float32, float16 and bfloat16 inputs (the math
runs in float32, the result is rounded once to the input dtype):

.. math::

    q = \mathrm{clamp}\big(\mathrm{rint}(x \cdot (1/s)) + z,\ q_{min},\ q_{max}\big), \qquad
    y = (q - z)\, s

``rint`` rounds half to even; ``1/s`` is one float32 division, as in
``torch.fake_quantize_per_tensor_affine``, so outputs match torch's ops bit for bit. NaN inputs
give NaN outputs (fake-quantize) or an error (quantize); :math:`\pm\infty` saturate to
:math:`q_{max}` / :math:`q_{min}`.

Gradient (straight-through estimator) of the fake-quantize ops:

.. math::

    \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\cdot
    \mathbb{1}\big[q_{min} \le \mathrm{rint}(x/s) + z \le q_{max}\big]

and no gradient for ``scale`` or ``zero_point``. The forward keeps one bit per element for the
backward, never the input.

Granularities: per-tensor (``scale`` has one element), per-channel (``scale`` has shape
``[input.shape[axis]]``), per-group (groups of ``group_size`` consecutive elements of the last
dimension; ``scale`` has shape ``input.shape[:-1] + [input.shape[-1] // group_size]``).

Errors (``RuntimeError`` naming the argument and the allowed range): ``quant_min >= quant_max``
or outside ``[-32768, 32767]`` (fake-quantize) or the dtype's range (quantize); scale not in
``[2**-126, FLT_MAX]`` or NaN; ``zero_point`` outside ``[quant_min, quant_max]``; axis out of
range; qparam shape mismatch; ``group_size`` not dividing the last dimension; integer input
to fake-quantize/quantize; tensors on different devices. On CUDA the qparam *values* are
checked on the device (a device-side assertion), so no host synchronisation is needed.
"""
from typing import List, Optional

import torch
from torch import Tensor

__all__ = [
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_group_affine",
    "quantize_per_tensor_affine",
    "quantize_per_channel_affine",
    "quantize_per_group_affine",
    "dequantize_per_tensor_affine",
    "dequantize_per_channel_affine",
    "dequantize_per_group_affine",
    "fake_quantize_lsq",
    "fake_quantize_lsq_per_group",
    "fake_quantize_pact",
    "linear_int8",
    "convolution_int8",
    "linear_int8_dynamic",
    "add_int8",
]


def fake_quantize_per_tensor_affine(input: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                                    quant_max: int) -> Tensor:
    """Fake-quantize with one scale and zero point: ``dequantize(quantize(input))`` in the input's dtype.

    ``quant_min < quant_max`` inside ``[-32768, 32767]`` covers 2- to 16-bit, signed and unsigned,
    symmetric, asymmetric and narrow ranges. Gradient: the straight-through estimator above.
    """
    return torch.ops.qatx.fake_quantize_per_tensor_affine(input, scale, zero_point, quant_min, quant_max)


def fake_quantize_per_channel_affine(input: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int,
                                     quant_max: int) -> Tensor:
    """Fake-quantize with one scale and zero point per slice along ``axis`` (``-dim <= axis < dim``)."""
    return torch.ops.qatx.fake_quantize_per_channel_affine(input, scale, zero_point, axis, quant_min, quant_max)


def fake_quantize_per_group_affine(input: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                                   quant_min: int, quant_max: int) -> Tensor:
    """Fake-quantize with one scale and zero point per ``group_size`` consecutive elements of the last dimension.

    The output is contiguous.
    """
    return torch.ops.qatx.fake_quantize_per_group_affine(input, scale, zero_point, group_size, quant_min, quant_max)


def quantize_per_tensor_affine(input: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                               dtype: torch.dtype) -> Tensor:
    """Quantize to integers ``clamp(rint(input / scale) + zero_point, quant_min, quant_max)`` as ``dtype``.

    ``dtype`` is ``torch.int8``, ``torch.uint8``, ``torch.int16`` or ``torch.int32`` (bias), and
    ``[quant_min, quant_max]`` must fit in it. For int32 the float32 math represents integers
    exactly up to 2**24 in magnitude. Not differentiable.
    """
    return torch.ops.qatx.quantize_per_tensor_affine(input, scale, zero_point, quant_min, quant_max, dtype)


def quantize_per_channel_affine(input: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int,
                                quant_max: int, dtype: torch.dtype) -> Tensor:
    """Per-channel :func:`quantize_per_tensor_affine` along ``axis``."""
    return torch.ops.qatx.quantize_per_channel_affine(input, scale, zero_point, axis, quant_min, quant_max, dtype)


def quantize_per_group_affine(input: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, quant_min: int,
                              quant_max: int, dtype: torch.dtype) -> Tensor:
    """Per-group :func:`quantize_per_tensor_affine` over the last dimension; the output is contiguous."""
    return torch.ops.qatx.quantize_per_group_affine(input, scale, zero_point, group_size, quant_min, quant_max,
                                                    dtype)


def dequantize_per_tensor_affine(input: Tensor, scale: Tensor, zero_point: Tensor,
                                 output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dequantize integers: ``(input - zero_point) * scale`` in float32, returned as ``output_dtype``
    (float32 when None; float16 and bfloat16 allowed). ``input`` is int8, uint8, int16 or int32.

    ``dequantize(quantize(x))`` equals ``fake_quantize(x)`` bit for bit.
    """
    return torch.ops.qatx.dequantize_per_tensor_affine(input, scale, zero_point, output_dtype)


def dequantize_per_channel_affine(input: Tensor, scale: Tensor, zero_point: Tensor, axis: int,
                                  output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-channel :func:`dequantize_per_tensor_affine` along ``axis``."""
    return torch.ops.qatx.dequantize_per_channel_affine(input, scale, zero_point, axis, output_dtype)


def dequantize_per_group_affine(input: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
                                output_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-group :func:`dequantize_per_tensor_affine` over the last dimension; the output is contiguous."""
    return torch.ops.qatx.dequantize_per_group_affine(input, scale, zero_point, group_size, output_dtype)


# --- learnable quantizers ---------------------------------------------------------------------

def fake_quantize_lsq(input: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int, quant_max: int,
                      grad_factor: float) -> Tensor:
    r"""Fake-quantize with a learnable scale (LSQ) and, when ``zero_point`` requires grad, a learnable
    zero point (LSQ+).

    ``scale`` and ``zero_point`` are float32 tensors on the input's device: one element for
    per-tensor quantization, shape ``[input.shape[axis]]`` for per-channel quantization along
    ``axis`` (``axis`` must lie in ``[-dim, dim)`` whenever the input has a dimension). In float32,
    whatever the input dtype (float32, float16, bfloat16; the output has the input's dtype):

    .. math::

        z_r = \mathrm{rint}(\mathrm{clamp}(z, q_{min}, q_{max})), \quad
        v = x \cdot (1/s), \quad q_u = \mathrm{rint}(v) + z_r, \quad
        y = (\mathrm{clamp}(q_u, q_{min}, q_{max}) - z_r)\, s

    ``rint`` rounds half to even; ``1/s`` is one float32 division. ``y`` is bit-identical to
    :func:`fake_quantize_per_tensor_affine` / :func:`fake_quantize_per_channel_affine` with zero
    point :math:`z_r`, and to ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``
    for integer-valued zero points. ``quant_min < quant_max`` inside ``[-32768, 32767]``.

    Gradients (:math:`g = \partial L/\partial y`; sums over the elements sharing the qparam):

    .. math::

        \frac{\partial L}{\partial x} = g\cdot\mathbb{1}[q_{min} \le q_u \le q_{max}], \qquad
        \frac{\partial L}{\partial s} = \gamma \sum g \cdot
            \begin{cases} \mathrm{rint}(v) - v & q_{min} \le q_u \le q_{max} \\
                          q_{min} - z_r & q_u < q_{min} \\ q_{max} - z_r & q_u > q_{max} \end{cases},
        \qquad
        \frac{\partial L}{\partial z} = \gamma \sum g \cdot
            \begin{cases} 0 & q_{min} \le q_u \le q_{max} \\ -s & \text{otherwise} \end{cases}

    with :math:`\gamma` = ``grad_factor`` (finite, positive; LSQ suggests
    ``1 / sqrt(numel_per_scale * quant_max)``). The zero-point gradient is computed only when
    ``zero_point`` requires grad. The backward is one pass over the input; its sums are
    deterministic (float32 terms summed in float64 in an order fixed by the shape, not by the
    thread count). Double backward raises an error.

    Errors (``RuntimeError`` naming the argument and the allowed range): bad quant range, scale
    not in ``[2**-126, FLT_MAX]`` or NaN zero point (CPU; a device-side assertion on CUDA),
    scale / zero point not float32 or of the wrong shape or device, axis out of range,
    ``grad_factor`` not finite or not positive, input not float32/float16/bfloat16.
    """
    return torch.ops.qatx.fake_quantize_lsq(input, scale, zero_point, axis, quant_min, quant_max, grad_factor)


def fake_quantize_lsq_per_group(input: Tensor, scale: Tensor, zero_point: Tensor, group_size: int, quant_min: int,
                                quant_max: int, grad_factor: float) -> Tensor:
    r""":func:`fake_quantize_lsq` with one learnable scale and zero point per ``group_size`` consecutive
    elements of the last dimension: ``scale`` and ``zero_point`` have shape
    ``input.shape[:-1] + [input.shape[-1] // group_size]`` (float32), ``group_size`` divides the
    last dimension. Same formula, rounding, gradients and errors; the output (and grad_input) is
    contiguous.
    """
    return torch.ops.qatx.fake_quantize_lsq_per_group(input, scale, zero_point, group_size, quant_min, quant_max,
                                                      grad_factor)


def fake_quantize_pact(input: Tensor, alpha: Tensor, bits: int, is_signed: bool) -> Tensor:
    r"""PACT: fake-quantize the input clipped to a learnable range (Choi et al. 2018).

    ``alpha`` is a one-element float32 tensor (> 0) on the input's device; ``bits`` in
    ``[2, 16]``. With :math:`n = 2^{bits} - 1` (unsigned) or :math:`2^{bits-1} - 1` (signed,
    symmetric), scale :math:`s = \mathrm{fl}_{32}(\alpha / n)` and zero point 0:

    .. math::

        y = \mathrm{rint}\big(\mathrm{clip}(x, lo, \alpha) \cdot (1/s)\big)\, s, \qquad
        lo = \begin{cases} -\alpha & \text{signed} \\ 0 & \text{unsigned} \end{cases}

    computed as :func:`fake_quantize_per_tensor_affine` with that scale, zero point 0 and range
    ``[-n, n]`` / ``[0, n]`` (the same values: :math:`\mathrm{rint}(\alpha / s) = n`; an input
    just below 0 gives -0.0 where clipping first would give +0.0). Gradients (straight-through
    rounding, as in the paper, which ignores the scale's dependence on alpha):

    .. math::

        \frac{\partial L}{\partial x} = g \cdot \mathbb{1}[lo < x < \alpha]
            \ (\text{unsigned: } 0 \le x < \alpha), \qquad
        \frac{\partial L}{\partial \alpha} = \sum_{x \ge \alpha} g - \sum_{x \le -\alpha} g
            \ (\text{the second sum only when signed})

    At ``x == alpha`` the gradient goes to alpha, at ``x == 0`` (unsigned) to the input, at
    ``x == -alpha`` (signed) to alpha with a minus sign. NaN inputs give NaN and no gradient.
    The backward is one deterministic pass (float64 sums, fixed order). Double backward raises
    an error.

    Errors: ``bits`` outside ``[2, 16]``; alpha not positive and finite or alpha / n below
    2**-126 (CPU; a device-side assertion on CUDA); alpha not float32, not one element, or on
    another device; input not float32/float16/bfloat16.
    """
    return torch.ops.qatx.fake_quantize_pact(input, alpha, bits, is_signed)


# ---- INT8 inference ops (float in, float out; integer arithmetic inside) ----

def linear_int8(input: Tensor, input_scale: Tensor, input_zero_point: Tensor, input_quant_min: int,
                input_quant_max: int, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor,
                bias: Optional[Tensor] = None, relu: bool = False, output_scale: Optional[Tensor] = None,
                output_zero_point: Optional[Tensor] = None, output_quant_min: int = 0,
                output_quant_max: int = 255) -> Tensor:
    r"""INT8 linear layer: float32 ``input [..., K]`` → float32 ``[..., N]``.

    .. math::

        q = \mathrm{clamp}(\mathrm{rint}(x \cdot (1/s_{in})) + z_{in},\ q_{min},\ q_{max}), \quad
        y_{c} = \big(\textstyle\sum_k (q_k - z_{in})(w_{ck} - z_w[c]) + b_c\big)\, s_{in}\, s_w[c]

    ``input_scale`` / ``input_zero_point``: one element each; the input range at most 8 bits
    inside ``[-128, 255]``. ``weight``: int8 ``[N, K]``; ``weight_scale`` / ``weight_zero_point``
    shape ``[1]``, ``[N]`` or ``[N, K // group_size]`` (per group: one exact sum per group, each
    scaled by its group's scale; the bias then uses the first group's scale). ``bias``: int32
    ``[N]`` at scale :math:`s_{in} s_w[c]`. ``relu`` clamps the output at 0. The integer sum is
    exact (int32 in the CPU int16 GEMM and cuBLASLt, float64 in the reference route); the
    epilogue is computed in float64 and rounded once to float32, so the CPU routes give the same
    bits. See docs/ops.md.

    Integer activations (what :func:`qatx.convert` chains between INT8 layers): ``input`` may be
    uint8 (``input_quant_min >= 0``) or int8 (``input_quant_max <= 127``) holding :math:`q`
    itself, clamped to ``[input_quant_min, input_quant_max]``. With ``output_scale`` and
    ``output_zero_point`` (one element each; the range inside ``[0, 255]``, uint8 output, or
    ``[-128, 127]``, int8 output) the output is
    :math:`\mathrm{clamp}(\mathrm{rint}(y \cdot (1/s_{out})) + z_{out},\ q_{min}, q_{max})`,
    bit-identical to ``quantize_per_tensor_affine`` of the float32 output.
    """
    return torch.ops.qatx.linear_int8(input, input_scale, input_zero_point, input_quant_min, input_quant_max, weight,
                                      weight_scale, weight_zero_point, bias, relu, output_scale, output_zero_point,
                                      output_quant_min, output_quant_max)


def convolution_int8(input: Tensor, input_scale: Tensor, input_zero_point: Tensor, input_quant_min: int,
                     input_quant_max: int, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor,
                     bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                     transposed: bool, output_padding: List[int], groups: int, relu: bool = False,
                     output_scale: Optional[Tensor] = None, output_zero_point: Optional[Tensor] = None,
                     output_quant_min: int = 0, output_quant_max: int = 255) -> Tensor:
    r"""INT8 convolution (1-3 spatial dimensions, transposed or not) with the arguments of
    ``torch.convolution``; quantization and epilogue as :func:`linear_int8`, with per-tensor or
    per-output-channel weight qparams. The input is zero-padded in real terms (the padded
    integer is :math:`z_{in}`). Non-transposed outputs are channels-last tensors. Integer input
    and output as :func:`linear_int8`.
    """
    return torch.ops.qatx.convolution_int8(input, input_scale, input_zero_point, input_quant_min, input_quant_max,
                                           weight, weight_scale, weight_zero_point, bias, stride, padding, dilation,
                                           transposed, output_padding, groups, relu, output_scale, output_zero_point,
                                           output_quant_min, output_quant_max)


def linear_int8_dynamic(input: Tensor, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor,
                        bias: Optional[Tensor] = None, per_row: bool = False) -> Tensor:
    r"""INT8 linear layer whose input qparams come from the call's own range (uint8):
    :math:`lo = \min(\min x, 0)`, :math:`hi = \max(\max x, 0)`, :math:`s = (hi - lo)/255` (1 when
    that is below :math:`2^{-126}`), :math:`z = \mathrm{clamp}(\mathrm{rint}(-lo \cdot (1/s)), 0, 255)`,
    over the whole input or per row (``per_row``); then
    :math:`y_{rc} = s[r]\, s_w[c] \sum_k (q_{rk} - z[r])(w_{ck} - z_w[c]) + bias_c` with a float32
    ``bias``. Weight qparams per tensor or per output channel. Non-finite input is an error (CPU).
    """
    return torch.ops.qatx.linear_int8_dynamic(input, weight, weight_scale, weight_zero_point, bias, per_row)


def add_int8(input: Tensor, input_scale: Tensor, input_zero_point: Tensor, input_quant_min: int, input_quant_max: int,
             other: Tensor, other_scale: Tensor, other_zero_point: Tensor, other_quant_min: int, other_quant_max: int,
             relu: bool = False, output_scale: Optional[Tensor] = None, output_zero_point: Optional[Tensor] = None,
             output_quant_min: int = 0, output_quant_max: int = 255) -> Tensor:
    r"""INT8 add (a converted :class:`qatx.nn.QuantAdd`): each float32 input quantized per tensor
    to its own grid of at most 8 bits inside ``[-128, 255]``, dequantized, and summed in float32:

    .. math::

        y = (q_x - z_x)\, s_x + (q_y - z_y)\, s_y, \qquad
        q = \mathrm{clamp}(\mathrm{rint}(v \cdot (1/s)) + z,\ q_{min},\ q_{max})

    then ``max(y, 0)`` when ``relu`` (NaN stays NaN). One pass over both inputs, bit-identical to
    ``fake_quantize_per_tensor_affine(input, ...) + fake_quantize_per_tensor_affine(other, ...)``
    (then ``torch.relu``). ``other`` must have ``input``'s shape and device (no broadcasting); the
    output has ``input``'s memory layout (channels-last stays channels-last). Not differentiable.
    Either input may be uint8 / int8 holding its integers, and the output may be quantized, as in
    :func:`linear_int8` (a NaN sum is then an error).
    """
    return torch.ops.qatx.add_int8(input, input_scale, input_zero_point, input_quant_min, input_quant_max, other,
                                   other_scale, other_zero_point, other_quant_min, other_quant_max, relu, output_scale,
                                   output_zero_point, output_quant_min, output_quant_max)
