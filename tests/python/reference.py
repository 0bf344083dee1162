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


# ---------------------------------------------------------------------------------------------
# Histogram observer references (docs/ops.md, "Histogram observer"): plain Python / numpy, one
# candidate at a time, no prefix sums.
# ---------------------------------------------------------------------------------------------
import math  # noqa: E402

import numpy as np  # noqa: E402


def hist_grid_fit(lo, hi, bins, min_e=-126):
    """(e, a) of the grid rule for finite data in [lo, hi] (float32 values)."""
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    amax = max(abs(lo), abs(hi))
    e = max(min_e, -126)
    if amax > 0:
        e = max(e, math.frexp(amax)[1] - 1 - 22)
    while True:
        w = 2.0 ** e
        if math.floor(hi / w) - math.floor(lo / w) < bins:
            return e, math.floor(lo / w)
        e += 1


def hist_counts(values, e, a, bins):
    """Counts of the finite values on the grid (e, a) (they must all fall inside)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.floor(v / 2.0 ** e).astype(np.int64) - a
    assert idx.min(initial=0) >= 0 and idx.max(initial=0) < bins
    return np.bincount(idx, minlength=bins).astype(np.int64)


def _steps_zero(qmin, qmax):
    if qmin < 0:
        return min(-qmin, qmax), 0
    z = (qmin + qmax + 1) // 2
    return min(z - qmin, qmax - z), z


def _bins(counts, e, a):
    w = 2.0 ** e
    return [((a + j) * w, (a + j + 1) * w, int(n)) for j, n in enumerate(counts) if n]


def hist_mse_error(counts, e, a, scale, clip_lo, clip_hi):
    """Expected squared error of a quantizer with step `scale` and clip [clip_lo, clip_hi]: each
    bin's count spread uniformly over the bin; s^2/12 inside, integral of (x - clip)^2 outside."""
    err = 0.0
    for left, right, n in _bins(counts, e, a):
        width = right - left
        density = n / width
        inside = max(0.0, min(right, clip_hi) - max(left, clip_lo))
        err += density * inside * scale * scale / 12.0
        if right > clip_hi:  # part above clip_hi
            l0 = max(left, clip_hi)
            err += density * ((right - clip_hi) ** 3 - (l0 - clip_hi) ** 3) / 3.0
        if left < clip_lo:
            r0 = min(right, clip_lo)
            err += density * ((clip_lo - left) ** 3 - (clip_lo - r0) ** 3) / 3.0
    return err


def hist_mse_search(counts, e, a, lo, hi, qmin, qmax, symmetric):
    """Brute-force MSE search over the documented candidates: (best range, best error, all errors)."""
    w = 2.0 ** e
    bins = len(counts)
    errors = []
    if symmetric:
        steps, z = _steps_zero(qmin, qmax)
        amax = max(abs(lo), abs(hi))
        if a >= 0:
            k0, k1 = a, a + bins
        elif a + bins <= 0:
            k0, k1 = -(a + bins), -a
        else:
            k0, k1 = 0, max(-a, a + bins)
        cands = [min(k * w, amax) for k in range(k0 + 1, k1 + 1)]
        for t in cands:
            s = t / steps
            errors.append(hist_mse_error(counts, e, a, s, (qmin - z) * s, (qmax - z) * s) / (w * w))
        best = int(np.argmin(errors))
        t = cands[best]
        return (max(-t, lo), min(t, hi)), errors[best], errors
    gl, gh = math.floor(lo / w), math.floor(hi / w) + 1
    if lo >= 0:
        los = [0.0]
    else:
        end = min(gh, 0)
        los = [max(g * w, lo) for g in range(gl, end + 1)] + ([0.0] if end < 0 else [])
    if hi <= 0:
        his = [0.0]
    else:
        start = max(gl, 0)
        his = ([0.0] if start > 0 else []) + [min(g * w, hi) for g in range(start, gh + 1)]
    pairs = []
    for cl in los:
        for ch in his:
            s = (ch - cl) / (qmax - qmin)
            if s <= 0:
                errors.append(math.inf)
            else:
                z = min(max(qmin - round(cl / s), qmin), qmax)
                errors.append(hist_mse_error(counts, e, a, s, (qmin - z) * s, (qmax - z) * s) / (w * w))
            pairs.append((cl, ch))
    best = int(np.argmin(errors))
    cl, ch = pairs[best]
    return (max(cl, lo), min(ch, hi)), errors[best], errors


def entropy_kl(abs_hist, i, levels):
    """KL(P || Q') of threshold bin i on an |x| histogram starting at 0 (TensorRT's calibration, Q smoothed)."""
    h = np.asarray(abs_hist, dtype=np.float64)
    p = h[:i].copy()
    p[i - 1] += h[i:].sum()
    q = np.zeros(i)
    merged = i // levels
    for g in range(levels):
        start = g * merged
        stop = i if g == levels - 1 else start + merged
        chunk = h[start:stop]
        nonzero = np.count_nonzero(chunk)
        if nonzero:
            q[start:stop] = np.where(chunk != 0, chunk.sum() / nonzero, 0.0)
    p /= p.sum()
    if q.sum() == 0:
        return math.inf
    q /= q.sum()
    q = (1 - 1e-4) * q + 1e-4 / i  # the documented smoothing: a little of the uniform distribution
    kl = 0.0
    for pk, qk in zip(p, q):
        if pk > 0:
            kl += pk * math.log(pk / qk)
    return kl


def abs_histogram(counts, a):
    """The |x| histogram (bin k = [k w, (k+1) w)) from index 0 to the last non-empty bin + 1."""
    size = max(abs(a), abs(a + len(counts))) + 1
    out = np.zeros(size, dtype=np.int64)
    for j, n in enumerate(counts):
        g = a + j
        out[g if g >= 0 else -g - 1] += n
    return out

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
        if dims:  # sum(dim=[]) would reduce every dimension
            term_s, term_z = term_s.sum(dims), term_z.sum(dims)
        gs, gz = term_s.reshape(scale.shape), term_z.reshape(scale.shape)
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
