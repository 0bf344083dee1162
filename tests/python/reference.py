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
    # q is integer-valued float32; the integer clamp keeps int32 ranges beyond 2**24, whose float32
    # bounds may round outward, inside [quant_min, quant_max].
    return q.reshape(x.shape).to(torch.int64).clamp(quant_min, quant_max).to(dtype)


def dequantize(q, scale, zero_point, output_dtype=torch.float32, granularity="per_tensor", axis=None,
               group_size=None):
    s, z = broadcast_qparams(q, scale, zero_point, granularity, axis, group_size)
    qg = _grouped(q.float(), granularity, group_size)
    return ((qg - z) * s).reshape(q.shape).to(output_dtype)


# --- learnable quantizers (LSQ / LSQ+ / PACT): forward and documented gradients -----------------
# Used by the fuzz tests. The qparam gradients sum float32 terms in float64 like the kernels, but
# in another order, so they agree up to float64 rounding of the sum and the final float32 rounding.

def lsq_rounded_zero_point(zero_point, quant_min, quant_max):
    """z_r = rint(clamp(z, quant_min, quant_max)) in float32."""
    return torch.round(torch.clamp(zero_point.float(), quant_min, quant_max))


def lsq_forward_and_grads(x, scale, zero_point, quant_min, quant_max, grad_factor, grad_output, granularity="per_tensor",
                          axis=None, group_size=None):
    """(y, grad_input, grad_scale, grad_zero_point) of fake_quantize_lsq{,_per_group} by the formulas in
    docs/ops.md: v = x * (1/s), q_u = rint(v) + z_r, the STE mask qmin <= q_u <= qmax, and the scale /
    zero-point terms rint(v) - v (inside), qmin - z_r / qmax - z_r (below / above), 0 / -s."""
    z_r = lsq_rounded_zero_point(zero_point, quant_min, quant_max)
    s, z = broadcast_qparams(x, scale, z_r, granularity, axis, group_size)
    xg = _grouped(x.float(), granularity, group_size)
    g = _grouped(grad_output.float(), granularity, group_size)
    v = xg * (1.0 / s)
    r = torch.round(v)
    q_u = r + z
    below, above = q_u < quant_min, q_u > quant_max
    inside = ~(below | above)
    y = ((torch.clamp(q_u, quant_min, quant_max) - z) * s).reshape(x.shape).to(x.dtype)
    grad_input = torch.where(inside, g, torch.zeros_like(g)).reshape(x.shape).to(x.dtype)
    ts = torch.where(inside, r - v, torch.where(below, quant_min - z, quant_max - z).expand_as(v))
    tz = torch.where(inside, torch.zeros_like(v), (-s).expand_as(v))
    term_s, term_z = (g * ts).double(), (g * tz).double()
    if granularity == "per_tensor":
        gs, gz = term_s.sum().reshape(scale.shape), term_z.sum().reshape(scale.shape)
    elif granularity == "per_group":
        gs, gz = term_s.sum(-1), term_z.sum(-1)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        gs, gz = term_s.sum(dims).reshape(scale.shape), term_z.sum(dims).reshape(scale.shape)
    return y, grad_input, (gs * grad_factor).float(), (gz * grad_factor).float()


def pact_levels(bits, signed):
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def pact_forward_and_grads(x, alpha, bits, signed, grad_output):
    """(y, grad_input, grad_alpha) of fake_quantize_pact: fake-quantize with scale fl32(alpha / n), zero
    point 0 and range [-n, n] (signed) / [0, n]; d/dx = g on lo < x < alpha (unsigned: 0 <= x < alpha),
    d/dalpha = sum of g over x >= alpha minus (signed) the sum over x <= -alpha."""
    n = pact_levels(bits, signed)
    s = (alpha.double() / n).float().reshape(())
    lo = -n if signed else 0
    y = fake_quantize(x, s, torch.zeros((), dtype=torch.int32), lo, n)
    xf, g = x.float(), grad_output.float()
    a = alpha.float().reshape(())
    pass_x = ((xf > -a) if signed else (xf >= 0)) & (xf < a)
    grad_input = torch.where(pass_x, g, torch.zeros_like(g)).to(x.dtype)
    grad_alpha = torch.where(xf >= a, g, torch.zeros_like(g)).double().sum()
    if signed:
        grad_alpha = grad_alpha - torch.where(xf <= -a, g, torch.zeros_like(g)).double().sum()
    return y, grad_input, grad_alpha.float().reshape(alpha.shape)
