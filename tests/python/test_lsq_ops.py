"""The learnable-quantizer ops (LSQ, LSQ+, PACT): outputs and input gradients exactly against
references written here with autograd, scale / zero-point / alpha gradients to a stated float32
reduction tolerance, agreement with torch's learnable fake-quantize ops, deterministic backward
passes, a small training run, TorchScript, torch.compile, opcheck and every documented error.

Tolerance of a qparam gradient (the only inexact comparison): the references sum float32 terms
with torch's reductions, qatx sums the same quantities in float64 in another order, and the
autograd reference forms rint(v) - v from two separately rounded paths. So both agree up to a
few float32 ulps of the sum of the magnitudes that enter the sum:
|qatx - ref| <= 1e-5 * grad_factor * sum(|g| * (|v| + |q - z_r|)) for grad_scale and
<= 1e-5 * grad_factor * sum(|g| * s) for grad_zero_point.
"""
import numpy as np
import pytest
import torch

import qatx
import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = 1e-5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- references ------------------------------------------------------------------------------------

def _qparam_view(t, x, granularity, axis):
    """scale / zero_point broadcastable against x (per-group: against x grouped as [..., groups, size])."""
    if granularity == "per_tensor":
        return t.reshape(())
    if granularity == "per_channel":
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)
    return t.unsqueeze(-1)


def _grouped(x, granularity, group_size):
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size) if granularity == "per_group" else x


def lsq_reference(x, scale, zero_point, qmin, qmax, granularity, axis=None, group_size=None):
    """LSQ / LSQ+ written as a differentiable graph whose autograd gradients are the documented ones
    (before grad_factor): rounding has a straight-through derivative, the clamp is a selection,
    the input's path is the mask. Returns (y, v, q - z_r, s broadcast) for tolerances."""
    s = _qparam_view(scale, x, granularity, axis)
    z = _qparam_view(zero_point, x, granularity, axis)
    xg = _grouped(x, granularity, group_size)
    v = xg.detach().float() * (1.0 / s)                  # x * (1/s): one float32 reciprocal
    r = v + (torch.round(v) - v).detach()                # value rint(v), derivative 1
    z_r = z + (torch.round(torch.clamp(z, qmin, qmax)) - z).detach()
    q_u = r + z_r
    below, above = (q_u < qmin).detach(), (q_u > qmax).detach()
    inside = ~(below | above)
    q = torch.where(below, torch.full_like(q_u, qmin), torch.where(above, torch.full_like(q_u, qmax), q_u))
    y = ((q - z_r) * s).to(x.dtype)
    x_inside = torch.where(inside, xg, torch.zeros_like(xg))
    y = y + (x_inside - x_inside.detach())              # d y / d x = 1 inside, 0 outside; value unchanged
    return y.reshape(x.shape), v.detach(), (q - z_r).detach(), s.detach().expand_as(v)


def reduce_like(t, qparam, granularity, axis):
    """Sums a per-element tensor (grouped shape) over the elements sharing each qparam."""
    if granularity == "per_tensor":
        return t.sum().reshape(qparam.shape)
    if granularity == "per_group":
        return t.sum(-1)
    return t.sum([d for d in range(t.dim()) if d != axis])


def lsq(x, s, z, axis, qmin, qmax, grad_factor, granularity, group_size):
    if granularity == "per_group":
        return qatx.fake_quantize_lsq_per_group(x, s, z, group_size, qmin, qmax, grad_factor)
    return qatx.fake_quantize_lsq(x, s, z, axis, qmin, qmax, grad_factor)


def affine_equivalent(x, s, z, qmin, qmax, granularity, axis, group_size):
    """qatx's fixed-qparam fake-quantize with the rounded zero point: the LSQ forward, bit for bit."""
    z_int = torch.round(torch.clamp(z.detach(), qmin, qmax)).to(torch.int32)
    s = s.detach()
    if granularity == "per_tensor":
        return qatx.fake_quantize_per_tensor_affine(x, s, z_int, qmin, qmax)
    if granularity == "per_channel":
        return qatx.fake_quantize_per_channel_affine(x, s, z_int, axis, qmin, qmax)
    return qatx.fake_quantize_per_group_affine(x, s, z_int, group_size, qmin, qmax)


def bits(t):
    """Exact bit pattern (tells -0 from +0 and compares NaN payloads)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def assert_reduction_close(got, expected, magnitude):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    err = (got.double() - expected.double()).abs()
    bound = RTOL * magnitude.double() + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}, bound {bound.min().item():.3e}"


# --- inputs ----------------------------------------------------------------------------------------

def random_input(shape, dtype, scale_hint, gen):
    """Values over and beyond the grid, with ties (k + 1/2) * scale_hint mixed in."""
    x = torch.randn(shape, generator=gen) * scale_hint * 12
    ties = (torch.randint(-20, 20, shape, generator=gen).float() + 0.5) * scale_hint
    return torch.where(torch.rand(shape, generator=gen) < 0.2, ties, x).to(dtype)


def make_qparams(shape, qmin, qmax, gen, integer_zero_point=False):
    """Scales in [0.02, 0.12), a third of them powers of two (so that ties are exact); zero points
    fractional, at .5 ties and beyond the range (clamped), or integers inside it."""
    scale = torch.rand(shape, generator=gen) * 0.1 + 0.02
    powers = 2.0 ** -torch.randint(4, 6, shape, generator=gen).float()
    scale = torch.where(torch.rand(shape, generator=gen) < 0.33, powers, scale)
    if integer_zero_point:
        zero_point = torch.randint(qmin, qmax + 1, shape, generator=gen).float()
    else:
        span = qmax - qmin
        zero_point = torch.rand(shape, generator=gen) * (1.4 * span) + qmin - 0.2 * span
        zero_point = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.round(zero_point) + 0.5, zero_point)
    return scale, zero_point


def lsq_input(shape, dtype, scale, granularity, axis, group_size, qmin, qmax, gen, layout=lambda t: t, ties=0.2):
    """Inputs for a quantizer with these scales: spread over and beyond [quant_min, quant_max] and
    with a fraction `ties` exactly (power-of-two scales) or nearly at ties (k + 1/2) * s."""
    s = _qparam_view(scale, torch.empty(shape), granularity, axis)
    spread = torch.randn(_grouped(torch.empty(shape), granularity, group_size).shape, generator=gen)
    x = spread * s * (0.35 * (qmax - qmin + 1))
    k = torch.randint(-(qmax - qmin) // 2 - 2, (qmax - qmin) // 2 + 2, x.shape, generator=gen).float()
    k_ties = (k + 0.5) * s
    x = torch.where(torch.rand(x.shape, generator=gen) < ties, k_ties, x).reshape(shape).to(dtype)
    return layout(x)


def qparam_shape(shape, granularity, axis, group_size):
    if granularity == "per_tensor":
        return (1,)
    if granularity == "per_channel":
        return (shape[axis],)
    return (*shape[:-1], shape[-1] // group_size)


def check_lsq_against_reference(shape, dtype, granularity, axis, group_size, qmin, qmax, learn_zero_point, gen,
                                layout=lambda t: t, grad_factor=0.37):
    scale, zero_point = make_qparams(qparam_shape(shape, granularity, axis, group_size), qmin, qmax, gen)
    x = lsq_input(shape, dtype, scale, granularity, axis, group_size, qmin, qmax, gen, layout)
    g = layout(torch.randn(shape, generator=gen).to(dtype))

    xq, sq, zq = x.clone().requires_grad_(), scale.clone().requires_grad_(), zero_point.clone()
    zq.requires_grad_(learn_zero_point)
    y = lsq(xq, sq, zq, axis, qmin, qmax, grad_factor, granularity, group_size)
    y.backward(g)
    dense = x.untyped_storage().nbytes() == x.numel() * x.element_size()
    if granularity != "per_group" and dense:
        assert y.stride() == x.stride() and xq.grad.stride() == x.stride()  # the input's layout is kept

    xr, sr, zr = x.clone().requires_grad_(), scale.clone().requires_grad_(), zero_point.clone().requires_grad_()
    yr, v, q_minus_z, s_b = lsq_reference(xr, sr, zr, qmin, qmax, granularity, axis, group_size)
    yr.backward(g)

    # outputs: bit-identical to the affine op with the rounded zero point, equal to the reference
    assert_bits_equal(y.detach(), affine_equivalent(x, scale, zero_point, qmin, qmax, granularity, axis, group_size))
    assert torch.equal(y, yr)
    # grad_input: exactly g inside, 0 outside; both cases occur
    assert_bits_equal(xq.grad, xr.grad)
    inside = (xr.grad != 0) | (g == 0)
    assert 0 < int(inside.sum()) < inside.numel()
    # qparam gradients: reduction tolerance
    gg = _grouped(g.float(), granularity, group_size).abs()
    assert_reduction_close(sq.grad, grad_factor * sr.grad,
                           grad_factor * reduce_like(gg * (v.abs() + q_minus_z.abs()), scale, granularity, axis))
    if learn_zero_point:
        assert_reduction_close(zq.grad, grad_factor * zr.grad,
                               grad_factor * reduce_like(gg * s_b, zero_point, granularity, axis))
    else:
        assert zq.grad is None


# --- LSQ / LSQ+ gradients against the reference -----------------------------------------------------

RANGES = [(-128, 127), (0, 15), (-2, 1)]


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["lsq", "lsq+"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1000,), (17, 33), (3, 5, 2, 7)])
@pytest.mark.parametrize("qrange", RANGES)
def test_lsq_per_tensor_matches_reference(shape, qrange, dtype, learn_zero_point):
    gen = torch.Generator().manual_seed(hash((shape, qrange)) % 2**31)
    check_lsq_against_reference(shape, dtype, "per_tensor", -1, None, *qrange, learn_zero_point, gen)


def test_lsq_zero_dim_input():
    s, z = torch.tensor([0.1], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    for value, y_expected, gx, gs, gz in [(0.26, 0.3, 1.0, 3.0 - 2.6, 0.0), (5.0, 0.5, 0.0, 7.0 - 2.0, -0.1)]:
        s.grad = z.grad = None
        x = torch.tensor(value, requires_grad=True)
        y = qatx.fake_quantize_lsq(x, s, z, 0, -8, 7, 1.0)
        y.backward()
        assert y.shape == () and y.item() == pytest.approx(y_expected)
        assert x.grad.item() == gx and s.grad.item() == pytest.approx(gs) and z.grad.item() == pytest.approx(gz)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "permuted": lambda t: t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),  # dense, not contiguous
    "strided": lambda t: torch.cat([t, t], 3)[..., ::2],  # not dense: copied
}


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["lsq", "lsq+"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qrange", RANGES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lsq_per_channel_matches_reference(layout, qrange, dtype, learn_zero_point):
    gen = torch.Generator().manual_seed(hash((layout, qrange)) % 2**31)
    for axis in range(4):
        check_lsq_against_reference((4, 6, 5, 7), dtype, "per_channel", axis, None, *qrange, learn_zero_point, gen,
                                    layout=LAYOUTS[layout])
    assert qatx.fake_quantize_lsq(torch.ones(2, 3), torch.ones(3), torch.zeros(3), -1, -8, 7, 1.0).shape == (2, 3)


@pytest.mark.parametrize("learn_zero_point", [False, True], ids=["lsq", "lsq+"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", [((8, 64), 32), ((3, 5, 48), 16), ((96,), 8), ((4, 600), 1),
                                              ((2, 1536), 768)])
def test_lsq_per_group_matches_reference(shape, group_size, dtype, learn_zero_point):
    gen = torch.Generator().manual_seed(group_size * 7 + len(shape))
    check_lsq_against_reference(shape, dtype, "per_group", None, group_size, -8, 7, learn_zero_point, gen)
    if len(shape) > 1:  # a transposed input: groups still run along its logical last dimension
        transposed = lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)  # noqa: E731
        check_lsq_against_reference(shape, dtype, "per_group", None, group_size, 0, 255, learn_zero_point, gen,
                                    layout=transposed)


def test_lsq_large_tensors_span_many_tiles():
    """Long runs cut into chunks, short runs of many channels, several rows per tile."""
    gen = torch.Generator().manual_seed(21)
    shape = (3, 40, 33, 17)
    check_lsq_against_reference(shape, torch.float32, "per_tensor", 0, None, -128, 127, True, gen)
    check_lsq_against_reference(shape, torch.float32, "per_channel", 1, None, -8, 7, True, gen)
    check_lsq_against_reference(shape, torch.float32, "per_channel", 1, None, -8, 7, True, gen,
                                layout=LAYOUTS["channels_last"])
    check_lsq_against_reference(shape, torch.float32, "per_channel", 3, None, 0, 15, True, gen)
    check_lsq_against_reference((700, 300), torch.float32, "per_channel", 1, None, -8, 7, True, gen)
    check_lsq_against_reference((700, 300), torch.float32, "per_group", None, 100, -8, 7, True, gen)
    check_lsq_against_reference((5, 8, 300), torch.float32, "per_channel", 1, None, -8, 7, True, gen)  # 2 rows/tile
    check_lsq_against_reference((3, 2048), torch.float32, "per_group", None, 512, -8, 7, True, gen)


def test_lsq_zero_point_is_clamped_then_rounded_half_even():
    x = torch.tensor([0.0, 1.0, -1.0, 10.0])
    s = torch.tensor([1.0])
    for z, z_r in [(2.5, 2.0), (3.5, 4.0), (-0.5, -0.0), (200.0, 7.0), (-200.0, -8.0), (1.4999, 1.0)]:
        y = qatx.fake_quantize_lsq(x, s, torch.tensor([z]), 0, -8, 7, 1.0)
        expected = (torch.clamp(torch.round(x) + z_r, -8, 7) - z_r) * 1.0
        assert torch.equal(y, expected), (z, y, expected)


def test_lsq_nan_and_inf_inputs():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3], requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    z = torch.tensor([1.0], requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, z, 0, -8, 7, 1.0)
    assert torch.isnan(y[0]) and y[1].item() == pytest.approx(0.6) and y[2].item() == pytest.approx(-0.9)
    y.backward(torch.ones(4))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert torch.isnan(s.grad).all()  # a NaN input makes its scale's gradient NaN, like the output


def test_empty_input_gives_zero_qparam_gradients():
    x = torch.empty(0, 3, requires_grad=True)
    s = torch.full((3,), 0.1, requires_grad=True)
    z = torch.zeros(3, requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, z, 1, -8, 7, 1.0)
    y.sum().backward()
    assert y.shape == (0, 3) and torch.equal(s.grad, torch.zeros(3)) and torch.equal(z.grad, torch.zeros(3))
    a = torch.tensor([1.0], requires_grad=True)
    qatx.fake_quantize_pact(x.detach().requires_grad_(), a, 4, False).sum().backward()
    assert torch.equal(a.grad, torch.zeros(1))


def test_only_the_qparams_requiring_grad_get_one():
    gen = torch.Generator().manual_seed(22)
    x = random_input((5, 8), torch.float32, 0.05, gen)
    s = torch.full((8,), 0.05, requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, torch.zeros(8), 1, -8, 7, 1.0)  # input and zero point fixed
    y.sum().backward()
    assert s.grad is not None and s.grad.shape == (8,)
    xg = x.clone().requires_grad_()
    s2 = torch.full((8,), 0.05)
    qatx.fake_quantize_lsq(xg, s2, torch.zeros(8), 1, -8, 7, 1.0).sum().backward()
    assert xg.grad is not None and s2.grad is None
    with torch.no_grad():
        assert qatx.fake_quantize_lsq(xg, s, torch.zeros(8), 1, -8, 7, 1.0).grad_fn is None


def test_double_backward_is_refused_with_a_clear_error():
    x = torch.randn(20, requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, torch.zeros(1), 0, -8, 7, 1.0)
    (gs,) = torch.autograd.grad(y.sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="fake_quantize_lsq: double backward is not supported"):
        gs.backward()
    a = torch.tensor([1.0], requires_grad=True)
    (ga,) = torch.autograd.grad(qatx.fake_quantize_pact(x, a, 4, True).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="fake_quantize_pact: double backward is not supported"):
        ga.backward()


# --- agreement with torch's learnable fake-quantize ops ---------------------------------------------
#
# The definitions coincide for integer zero points inside the range, except in torch's backward,
# which (a) forms the gradient mask from rint(x / s + z) instead of the forward's rint(x / s) + z
# (they differ at ties of x / s when z is odd) and (b) uses the zero point trunc(z + 0.5), which
# is z + 1 for a negative integer z. Both make torch's backward disagree with its own forward;
# qatx uses the forward's values. So the comparisons below use zero points >= 0 and inputs
# without ties, and test_torch_learnable_differences pins the two cases down.

def torch_comparable_qparams(shape, qmin, qmax, gen):
    scale, _ = make_qparams(shape, qmin, qmax, gen)
    zero_point = torch.randint(max(qmin, 0), qmax + 1, shape, generator=gen).float()
    return scale, zero_point


@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-8, 7), (0, 3)])
@pytest.mark.parametrize("grad_factor", [1.0, 0.01])
def test_lsq_matches_torch_learnable_per_tensor(qrange, grad_factor):
    qmin, qmax = qrange
    gen = torch.Generator().manual_seed(qmax + int(grad_factor * 100))
    for shape in [(1000,), (8, 3, 5, 5)]:
        s, z = torch_comparable_qparams((1,), qmin, qmax, gen)
        x = lsq_input(shape, torch.float32, s, "per_tensor", 0, None, qmin, qmax, gen, ties=0.0)
        g = torch.randn(shape, generator=gen)
        grads = []
        for f in (qatx.fake_quantize_lsq, None):
            xi, si, zi = x.clone().requires_grad_(), s.clone().requires_grad_(), z.clone().requires_grad_()
            if f is None:
                y = torch._fake_quantize_learnable_per_tensor_affine(xi, si, zi, qmin, qmax, grad_factor)
            else:
                y = f(xi, si, zi, 0, qmin, qmax, grad_factor)
            y.backward(g)
            grads.append((y.detach(), xi.grad, si.grad, zi.grad))
        (y, gx, gs, gz), (ty, tgx, tgs, tgz) = grads
        assert torch.equal(y, ty)
        assert torch.equal(gx, tgx)
        v = x * (1.0 / s)
        q = torch.clamp(torch.round(v) + z, qmin, qmax)
        assert_reduction_close(gs, tgs, grad_factor * (g.abs() * (v.abs() + (q - z).abs())).sum().reshape(1))
        assert_reduction_close(gz, tgz, grad_factor * (g.abs() * s).sum().reshape(1))


@pytest.mark.parametrize("qrange", [(-128, 127), (0, 15)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_lsq_matches_torch_learnable_per_channel(qrange, layout):
    qmin, qmax = qrange
    gen = torch.Generator().manual_seed(qmax + len(layout))
    for axis in range(4):
        s, z = torch_comparable_qparams(((4, 6, 5, 7)[axis],), qmin, qmax, gen)
        x = lsq_input((4, 6, 5, 7), torch.float32, s, "per_channel", axis, None, qmin, qmax, gen, LAYOUTS[layout],
                      ties=0.0)
        g = torch.randn(x.shape, generator=gen)
        results = []
        for use_torch in (False, True):
            xi, si, zi = x.clone().requires_grad_(), s.clone().requires_grad_(), z.clone().requires_grad_()
            op = torch._fake_quantize_learnable_per_channel_affine if use_torch else qatx.fake_quantize_lsq
            y = op(xi, si, zi, axis, qmin, qmax, 0.5)
            y.backward(g)
            results.append((y.detach(), xi.grad, si.grad, zi.grad))
        (y, gx, gs, gz), (ty, tgx, tgs, tgz) = results
        assert torch.equal(y, ty) and torch.equal(gx, tgx)
        shape = [1] * 4
        shape[axis] = -1
        sb, zb = s.reshape(shape), z.reshape(shape)
        v = x * (1.0 / sb)
        q = torch.clamp(torch.round(v) + zb, qmin, qmax)
        dims = [d for d in range(4) if d != axis]
        assert_reduction_close(gs, tgs, 0.5 * (g.abs() * (v.abs() + (q - zb).abs())).sum(dims))
        assert_reduction_close(gz, tgz, 0.5 * (g.abs() * sb).sum(dims))


def test_torch_learnable_differences():
    """Where torch's learnable backward disagrees with its own forward, qatx follows the forward."""
    s = torch.tensor([1.0])
    # (a) a tie with an odd zero point: q_u = rint(4.5) + 11 = 15 is inside [0, 15] (y = 4 = x - 0.5,
    # slope 1), but torch's backward rounds 4.5 + 11 = 15.5 to 16 and drops the gradient.
    x = torch.tensor([4.5, 2.0], requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, torch.tensor([11.0]), 0, 0, 15, 1.0)
    y.sum().backward()
    xt = x.detach().clone().requires_grad_()
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, s, torch.tensor([11.0]), 0, 15, 1.0)
    yt.sum().backward()
    assert torch.equal(y, yt) and y.tolist() == [4.0, 2.0]
    assert x.grad.tolist() == [1.0, 1.0] and xt.grad.tolist() == [0.0, 1.0]
    # (b) zero point -2: x = 9 gives q_u = 7 (inside, y = 9), x = -7 gives q_u = -9 (clamped, y = -6);
    # torch's backward uses trunc(-2 + 0.5) = -1 and swaps both.
    x = torch.tensor([9.0, -7.0], requires_grad=True)
    y = qatx.fake_quantize_lsq(x, s, torch.tensor([-2.0]), 0, -8, 7, 1.0)
    y.sum().backward()
    xt = x.detach().clone().requires_grad_()
    yt = torch._fake_quantize_learnable_per_tensor_affine(xt, s, torch.tensor([-2.0]), -8, 7, 1.0)
    yt.sum().backward()
    assert torch.equal(y, yt) and y.tolist() == [9.0, -6.0]
    assert x.grad.tolist() == [1.0, 0.0] and xt.grad.tolist() == [0.0, 1.0]


# --- determinism -------------------------------------------------------------------------------------

def _backward_bits(x, s, z, g, **kw):
    if "group_size" in kw:
        out = torch.ops.qatx._fake_quantize_lsq_per_group_backward(g, x, s, z, kw["group_size"], -8, 7, 0.1, True)
    elif "alpha" in kw:
        out = torch.ops.qatx._fake_quantize_pact_backward(g, x, kw["alpha"], 4, True)
    else:
        out = torch.ops.qatx._fake_quantize_lsq_backward(g, x, s, z, kw["axis"], -8, 7, 0.1, True)
    return [bits(t) for t in out]


@pytest.mark.parametrize("case", ["per_tensor", "per_channel", "channels_last", "per_group", "pact"])
def test_backward_is_deterministic_across_runs_and_thread_counts(case):
    gen = torch.Generator().manual_seed(23)
    x = random_input((16, 32, 24, 24), torch.float32, 0.05, gen)  # 295k elements: many tiles, many tasks
    g = torch.randn(x.shape, generator=gen)
    if case == "per_tensor":
        s, z = make_qparams((1,), -8, 7, gen)
        kw = {"axis": 0}
    elif case in ("per_channel", "channels_last"):
        s, z = make_qparams((32,), -8, 7, gen)
        kw = {"axis": 1}
        if case == "channels_last":
            x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    elif case == "per_group":
        s, z = make_qparams((16, 32, 24, 3), -8, 7, gen)
        kw = {"group_size": 8}
    else:
        s = z = None
        kw = {"alpha": torch.tensor([0.5])}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _backward_bits(x, s, z, g, **kw)
        again = _backward_bits(x, s, z, g, **kw)
        torch.set_num_threads(1)
        single = _backward_bits(x, s, z, g, **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- PACT ---------------------------------------------------------------------------------------------

def pact_scale_reference(alpha, bits, signed):
    levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return torch.tensor([np.float32(alpha.item()) / np.float32(levels)], dtype=torch.float32), levels


def pact_reference(x, alpha, bits, signed):
    """Clip with learnable bounds (autograd: d/dalpha = 1 above, -1 below when signed), then
    fake-quantize the clipped value with a straight-through rounding."""
    s, levels = pact_scale_reference(alpha.detach(), bits, signed)
    lo_q = -levels if signed else 0
    xf = x.float()
    a = alpha.reshape(())
    above = (xf >= a).detach()
    below = ((xf <= -a) if signed else (xf < 0)).detach()
    lower = -a if signed else torch.zeros_like(a)
    clipped = torch.where(above, a.expand_as(xf), torch.where(below, lower.expand_as(xf), xf))
    q = torch.clamp(torch.round(clipped.detach() * (1.0 / s)), lo_q, levels)
    y = clipped + ((q * s) - clipped).detach()
    return y.to(x.dtype), s, levels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits_", [2, 4, 8, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_pact_matches_reference(bits_, signed, dtype):
    gen = torch.Generator().manual_seed(bits_ * 2 + int(signed))
    x = (torch.randn(3, 500, generator=gen) * 1.5).to(dtype)
    alpha = torch.tensor([1.25])
    g = torch.randn(x.shape, generator=gen).to(dtype)

    xq, aq = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    y = qatx.fake_quantize_pact(xq, aq, bits_, signed)
    y.backward(g)
    xr, ar = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    yr, s, levels = pact_reference(xr, ar, bits_, signed)
    yr.backward(g)

    assert torch.equal(y, yr)  # equal values; -0.0 for inputs just below 0 where clipping gives +0.0
    z0 = torch.zeros(1, dtype=torch.int32)
    if levels <= 32767:  # the affine op's range check stops at int16
        assert_bits_equal(y.detach(), qatx.fake_quantize_per_tensor_affine(x, s, z0, -levels if signed else 0, levels))
    assert_bits_equal(xq.grad, xr.grad)
    gf = g.float()
    edge = (x.float() >= 1.25) | ((x.float() <= -1.25) & signed)
    assert_reduction_close(aq.grad, ar.grad, (gf.abs() * edge).sum().reshape(1))


@pytest.mark.parametrize("signed", [False, True])
def test_pact_boundaries(signed):
    a = 0.75
    below_a, above_a = np.nextafter(np.float32(a), np.float32(0)), np.nextafter(np.float32(a), np.float32(2))
    values = [a, below_a, above_a, 0.0, -0.0, -1e-30, -a, -below_a, -above_a, 3.0, -3.0]
    x = torch.tensor(values, dtype=torch.float32, requires_grad=True)
    alpha = torch.tensor([a], requires_grad=True)
    y = qatx.fake_quantize_pact(x, alpha, 3, signed)
    g = torch.arange(1.0, len(values) + 1)
    y.backward(g)
    if signed:  # inside: -alpha < x < alpha
        inside = [False, True, False, True, True, True, False, True, False, False, False]
        alpha_grad = g[0] + g[2] + g[9] - g[6] - g[8] - g[10]
    else:       # inside: 0 <= x < alpha (-0.0 == 0 is inside)
        inside = [False, True, False, True, True, False, False, False, False, False, False]
        alpha_grad = g[0] + g[2] + g[9]
    assert x.grad.tolist() == [gi if i else 0.0 for gi, i in zip(g.tolist(), inside)]
    assert alpha.grad.item() == alpha_grad.item()
    levels = 3 if signed else 7
    s = np.float32(a) / np.float32(levels)
    assert y[0].item() == np.float32(levels) * s  # x == alpha: the top of the grid
    assert y[9].item() == y[0].item() and y[3].item() == 0.0
    assert y[10].item() == (-y[0].item() if signed else 0.0)


def test_pact_nan_input_has_no_gradient():
    x = torch.tensor([float("nan"), 0.5, 2.0], requires_grad=True)
    a = torch.tensor([1.0], requires_grad=True)
    y = qatx.fake_quantize_pact(x, a, 4, True)
    y.backward(torch.ones(3))
    assert torch.isnan(y[0]) and x.grad.tolist() == [0.0, 1.0, 0.0] and a.grad.item() == 1.0


# --- training ----------------------------------------------------------------------------------------

def test_lsq_learns_a_scale_that_lowers_the_quantization_error():
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(4096, generator=gen)
    qmin, qmax = -8, 7
    zero_point = torch.zeros(1)
    scale = torch.nn.Parameter(torch.tensor([1.0]))  # far too coarse: the 4-bit grid spans [-8, 7]
    grad_factor = 1.0 / (x.numel() * qmax) ** 0.5

    def mse():
        return torch.mean((qatx.fake_quantize_lsq(x, scale, zero_point, 0, qmin, qmax, grad_factor) - x) ** 2)

    with torch.no_grad():
        initial = mse().item()
    optimizer = torch.optim.Adam([scale], lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        loss = mse()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = mse().item()
    assert final < 0.25 * initial, (initial, final, scale.item())
    assert 0.15 < scale.item() < 0.6  # near the MSE-optimal 4-bit step for N(0, 1) (about 0.34)


# --- TorchScript, torch.compile, opcheck --------------------------------------------------------------

class LearnableNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16) * 0.3)
        self.w_scale = torch.nn.Parameter(torch.full((8,), 0.05))
        self.w_zero_point = torch.nn.Parameter(torch.zeros(8))
        self.g_scale = torch.nn.Parameter(torch.full((8, 2), 0.04))
        self.g_zero_point = torch.nn.Parameter(torch.ones(8, 2))
        self.alpha = torch.nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        w = qatx.ops.fake_quantize_lsq(self.weight, self.w_scale, self.w_zero_point, 0, -8, 7, 0.1)
        w = qatx.ops.fake_quantize_lsq_per_group(w, self.g_scale, self.g_zero_point, 8, -128, 127, 0.2)
        x = qatx.ops.fake_quantize_pact(x, self.alpha, 8, True)
        return torch.nn.functional.linear(x, w)


def _grads(module, x):
    module.zero_grad()
    xg = x.clone().requires_grad_()
    y = module(xg)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return [y.detach(), xg.grad] + [p.grad for p in module.parameters()]


def test_torchscript_matches_eager_outputs_and_all_gradients(tmp_path):
    torch.manual_seed(0)
    eager = LearnableNet()
    scripted = torch.jit.script(LearnableNet())
    scripted.load_state_dict(eager.state_dict())
    x = torch.randn(4, 16) * 1.2
    for a, b in zip(_grads(eager, x), _grads(scripted, x)):
        assert_bits_equal(a, b)
    path = tmp_path / "learnable.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    for a, b in zip(_grads(eager, x), _grads(loaded, x)):
        assert_bits_equal(a, b)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(1)
    net = LearnableNet()
    x = torch.randn(4, 16) * 1.2
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for a, b in zip(_grads(net, x), _grads(compiled, x)):
        assert_bits_equal(a, b)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(25)
    x = random_input((4, 6, 8), torch.float32, 0.05, gen)
    st, zt = make_qparams((1,), -8, 7, gen)
    sc, zc = make_qparams((6,), -8, 7, gen)
    sg, zg = make_qparams((4, 6, 2), -8, 7, gen)
    g = torch.randn(x.shape, generator=gen)
    alpha = torch.tensor([0.7])
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    ops = torch.ops.qatx
    return [
        (ops.fake_quantize_lsq, (req(x), req(st), zt, 0, -8, 7, 0.5)),
        (ops.fake_quantize_lsq, (req(x), req(sc), req(zc), 1, -8, 7, 0.5)),
        (ops.fake_quantize_lsq, (req(x).transpose(0, 2), req(sc), req(zc), 1, -8, 7, 0.5)),
        (ops.fake_quantize_lsq_per_group, (req(x), req(sg), req(zg), 4, -8, 7, 0.5)),
        (ops.fake_quantize_pact, (req(x), req(alpha), 4, True)),
        (ops.fake_quantize_pact, (req(x), req(alpha), 16, False)),
        (ops._fake_quantize_lsq_backward, (g, x, sc, zc, 1, -8, 7, 0.5, True)),
        (ops._fake_quantize_lsq_backward, (g, x, st, zt, -1, -8, 7, 0.5, False)),
        (ops._fake_quantize_lsq_per_group_backward, (g, x, sg, zg, 4, -8, 7, 0.5, True)),
        (ops._fake_quantize_pact_backward, (g, x, alpha, 8, False)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_meta_shapes_and_strides():
    x = torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last)
    s, z = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    y = torch.ops.qatx.fake_quantize_lsq(x, s, z, 1, -8, 7, 1.0)
    assert y.shape == x.shape and y.stride() == x.stride() and y.device.type == "meta"
    gx, gs, gz = torch.ops.qatx._fake_quantize_lsq_backward(x, x, s, z, 1, -8, 7, 1.0, True)
    assert gx.stride() == x.stride() and gs.shape == (3,) and gz.shape == (3,)
    gx, gs, gz = torch.ops.qatx._fake_quantize_lsq_backward(x, x, s, z, 1, -8, 7, 1.0, False)
    assert gz is None
    gx, ga = torch.ops.qatx._fake_quantize_pact_backward(x, x, torch.empty(1, device="meta"), 4, False)
    assert gx.shape == x.shape and ga.shape == (1,)


# --- errors -------------------------------------------------------------------------------------------

def _lsq(x, s=None, z=None, axis=1, qmin=-8, qmax=7, gf=1.0):
    s = torch.full((1,), 0.1) if s is None else s
    z = torch.zeros(s.shape) if z is None else z
    return qatx.fake_quantize_lsq(x, s, z, axis, qmin, qmax, gf)


ERROR_CASES = [
    ("quant_min=5 must be smaller than quant_max=5", lambda x: _lsq(x, qmin=5, qmax=5)),
    (r"\[-32768, 32767\]", lambda x: _lsq(x, qmin=0, qmax=65535)),
    ("scale must be finite", lambda x: _lsq(x, s=torch.tensor([0.0]))),
    ("scale must be finite", lambda x: _lsq(x, s=torch.tensor([-0.1]))),
    ("scale must be finite", lambda x: _lsq(x, s=torch.tensor([float("nan")]))),
    ("scale must be finite", lambda x: _lsq(x, s=torch.tensor([float("inf")]))),
    ("scale must be finite.*index 2", lambda x: _lsq(x, s=torch.tensor([0.1, 0.1, 1e-40, 0.1, 0.1]))),
    ("zero_point must not be NaN", lambda x: _lsq(x, z=torch.tensor([float("nan")]))),
    ("scale must be torch.float32", lambda x: _lsq(x, s=torch.tensor([0.1], dtype=torch.float64))),
    ("zero_point must be torch.float32", lambda x: _lsq(x, z=torch.tensor([0], dtype=torch.int32))),
    ("axis=4 is out of range", lambda x: _lsq(x, s=torch.full((5,), 0.1), axis=4)),
    ("axis=-5 is out of range", lambda x: _lsq(x, axis=-5)),
    (r"per-channel scale and zero_point must have shape \[5\]", lambda x: _lsq(x, s=torch.full((3,), 0.1))),
    ("same shape", lambda x: _lsq(x, s=torch.full((5,), 0.1), z=torch.zeros(4))),
    ("grad_factor=0 must be finite and positive", lambda x: _lsq(x, gf=0.0)),
    ("grad_factor=-1 must be finite and positive", lambda x: _lsq(x, gf=-1.0)),
    ("grad_factor=inf must be finite and positive", lambda x: _lsq(x, gf=float("inf"))),
    ("grad_factor=nan must be finite and positive", lambda x: _lsq(x, gf=float("nan"))),
    ("input must be float32", lambda x: _lsq(x.double())),
    ("input must be float32", lambda x: _lsq(x.int())),
    ("0-dim input needs a scale with one element", lambda x: _lsq(torch.tensor(1.0), s=torch.full((2,), 0.1))),
    ("group_size=7 must divide", lambda x: qatx.fake_quantize_lsq_per_group(
        x, torch.full((3, 5, 1), 0.1), torch.zeros(3, 5, 1), 7, -8, 7, 1.0)),
    ("group_size=0 must be at least 1", lambda x: qatx.fake_quantize_lsq_per_group(
        x, torch.full((3, 5, 1), 0.1), torch.zeros(3, 5, 1), 0, -8, 7, 1.0)),
    ("per-group scale and zero_point must have shape", lambda x: qatx.fake_quantize_lsq_per_group(
        x, torch.full((3, 5, 6, 1), 0.1), torch.zeros(3, 5, 6, 1), 1, -8, 7, 1.0)),
    ("bits=1 must lie inside \\[2, 16\\]", lambda x: qatx.fake_quantize_pact(x, torch.tensor([1.0]), 1, False)),
    ("bits=17 must lie inside \\[2, 16\\]", lambda x: qatx.fake_quantize_pact(x, torch.tensor([1.0]), 17, True)),
    ("alpha=0 must be positive and finite", lambda x: qatx.fake_quantize_pact(x, torch.tensor([0.0]), 8, True)),
    ("alpha=-1 must be positive and finite", lambda x: qatx.fake_quantize_pact(x, torch.tensor([-1.0]), 8, True)),
    ("alpha=nan must be positive", lambda x: qatx.fake_quantize_pact(x, torch.tensor([float("nan")]), 8, True)),
    ("alpha=inf must be positive", lambda x: qatx.fake_quantize_pact(x, torch.tensor([float("inf")]), 8, True)),
    ("alpha / 65535 .* at least 2\\^-126", lambda x: qatx.fake_quantize_pact(x, torch.tensor([1e-35]), 16, False)),
    ("alpha must have one element", lambda x: qatx.fake_quantize_pact(x, torch.ones(2), 8, True)),
    ("alpha must be torch.float32", lambda x: qatx.fake_quantize_pact(x, torch.ones(1, dtype=torch.float64), 8, True)),
    ("input must be float32", lambda x: qatx.fake_quantize_pact(x.double(), torch.ones(1), 8, True)),
    ("grad_output must have the input's shape", lambda x: torch.ops.qatx._fake_quantize_lsq_backward(
        x[:1], x, torch.full((1,), 0.1), torch.zeros(1), 0, -8, 7, 1.0, True)),
    ("grad_output must have the input's dtype", lambda x: torch.ops.qatx._fake_quantize_pact_backward(
        x.half(), x, torch.ones(1), 8, True)),
]


@pytest.mark.parametrize("pattern,call", ERROR_CASES, ids=[c[0][:40] for c in ERROR_CASES])
def test_bad_arguments_raise_clear_errors(pattern, call):
    x = torch.randn(3, 5, 6, 2)
    with pytest.raises(RuntimeError, match=pattern):
        call(x)


def test_errors_name_the_op_and_devices():
    x = torch.randn(3, device="meta")
    with pytest.raises(RuntimeError, match="qatx::fake_quantize_lsq: scale must be on the input's device"):
        qatx.fake_quantize_lsq(x, torch.ones(1), torch.zeros(1), 0, -8, 7, 1.0)
    with pytest.raises(RuntimeError, match="qatx::fake_quantize_pact: alpha must be on the input's device"):
        qatx.fake_quantize_pact(x, torch.ones(1), 8, True)
    with pytest.raises(RuntimeError, match="qatx::fake_quantize_lsq_per_group: zero_point must be on"):
        qatx.fake_quantize_lsq_per_group(x, torch.ones(1, device="meta"), torch.zeros(1), 3, -8, 7, 1.0)


# --- CUDA ---------------------------------------------------------------------------------------------

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["per_tensor", "per_channel", "channels_last", "last_axis", "per_group", "pact"])
def test_cuda_matches_cpu(case, dtype):
    gen = torch.Generator().manual_seed(26)
    x = random_input((6, 40, 17, 13), dtype, 0.05, gen)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    if case == "pact":
        params = [torch.tensor([0.6])]
        call = lambda x, a: qatx.fake_quantize_pact(x, a, 4, True)  # noqa: E731
    else:
        granularity = "per_group" if case == "per_group" else ("per_tensor" if case == "per_tensor" else "per_channel")
        axis = 3 if case == "last_axis" else 1
        if case == "channels_last":
            x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        params = list(make_qparams(qparam_shape(x.shape, granularity, axis, 13), -8, 7, gen))
        call = lambda x, s, z: lsq(x, s, z, axis, -8, 7, 0.3, granularity, 13)  # noqa: E731
    results = []
    for device in ("cpu", "cuda"):
        xi = x.to(device).requires_grad_()
        pi = [p.to(device).requires_grad_() for p in params]
        y = call(xi, *pi)
        y.backward(g.to(device))
        results.append([y.detach().cpu(), xi.grad.cpu()] + [p.grad.cpu() for p in pi])
    (cpu_y, cpu_gx, *cpu_p), (cuda_y, cuda_gx, *cuda_p) = results
    assert_bits_equal(cpu_y, cuda_y)
    assert_bits_equal(cpu_gx, cuda_gx)
    for a, b in zip(cpu_p, cuda_p):  # both sum the same float32 terms in float64, in different orders
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()) + 1e-12)


@cuda
@pytest.mark.cuda
def test_cuda_backward_is_deterministic_and_opchecks():
    gen = torch.Generator().manual_seed(27)
    x = random_input((16, 32, 24, 24), torch.float32, 0.05, gen).cuda()
    g = torch.randn(x.shape, generator=gen).cuda()
    s, z = (t.cuda() for t in make_qparams((32,), -8, 7, gen))
    for xx, gg in [(x, g), (x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))]:
        a = _backward_bits(xx, s, z, gg, axis=1)
        b = _backward_bits(xx, s, z, gg, axis=1)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for op, args in _opcheck_cases():
        args = tuple(t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                     for t in args)
        torch.library.opcheck(op, args)
