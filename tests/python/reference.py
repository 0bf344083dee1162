"""Slow, obviously-correct references for the qatx ops, written with plain torch ops.

Everything is computed in float32 exactly as the definitions in docs/ops.md say:
q = clamp(round_half_even(x * (1/s)) + z, qmin, qmax), y = (q - z) * s. torch.round rounds
half to even, and every step is a single IEEE float32 operation, so results are bit-exact.
"""
import torch


def broadcast_qparams(x, scale, zero_point, granularity, axis=None, group_size=None):
    """Returns (scale, zero_point) as float32 tensors broadcastable to x's shape (per-group: to
    x reshaped to [..., groups, group_size])."""
    s = scale.float()
    z = zero_point.float()
    if granularity == "per_tensor":
        return s.reshape(()), z.reshape(())
    if granularity == "per_channel":
        shape = [1] * x.dim()
        shape[axis] = -1
        return s.reshape(shape), z.reshape(shape)
    if granularity == "per_group":
        return s.unsqueeze(-1), z.unsqueeze(-1)
    raise ValueError(granularity)


def _grouped(x, granularity, group_size):
    if granularity == "per_group":
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return x


def quantize_unclamped(x, scale, zero_point, granularity, axis=None, group_size=None):
    s, z = broadcast_qparams(x, scale, zero_point, granularity, axis, group_size)
    xg = _grouped(x.float(), granularity, group_size)
    return torch.round(xg * (1.0 / s)) + z


def fake_quantize(x, scale, zero_point, quant_min, quant_max, granularity="per_tensor", axis=None, group_size=None):
    s, z = broadcast_qparams(x, scale, zero_point, granularity, axis, group_size)
    q = torch.clamp(quantize_unclamped(x, scale, zero_point, granularity, axis, group_size), quant_min, quant_max)
    return ((q - z) * s).reshape(x.shape).to(x.dtype)


def ste_mask(x, scale, zero_point, quant_min, quant_max, granularity="per_tensor", axis=None, group_size=None):
    q = quantize_unclamped(x, scale, zero_point, granularity, axis, group_size)
    return ((q >= quant_min) & (q <= quant_max)).reshape(x.shape)


def quantize(x, scale, zero_point, quant_min, quant_max, dtype, granularity="per_tensor", axis=None,
             group_size=None):
    q = torch.clamp(quantize_unclamped(x, scale, zero_point, granularity, axis, group_size), quant_min, quant_max)
    return q.reshape(x.shape).to(dtype)


def dequantize(q, scale, zero_point, output_dtype=torch.float32, granularity="per_tensor", axis=None,
               group_size=None):
    s, z = broadcast_qparams(q, scale, zero_point, granularity, axis, group_size)
    qg = _grouped(q.float(), granularity, group_size)
    return ((qg - z) * s).reshape(q.shape).to(output_dtype)
