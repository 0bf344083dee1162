r"""Typed Python wrappers of the ``torch.ops.qatx`` operators.

Every function here is a thin, scriptable call of the C++ operator of the same name; the
operators themselves also work from TorchScript, from C++ (``qatx::ops::...``) and under
``torch.compile``. qparams are tensors on the input's device: ``scale`` with a floating dtype
(used as float32), ``zero_point`` with an integer dtype.

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
from typing import Optional

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
