"""The INT8 ops (linear_int8, convolution_int8, linear_int8_dynamic, add_int8): exact integer sums against an
obviously-right int64 reference, extreme values that would saturate u8*s8 kernels, the CPU's int16
route (grouped and odd channel counts, several panels, the fallback when an int32 sum could
overflow) and the reference route (per-group, transposed), layouts, opcheck, and every documented
error.

On the CPU every route computes the exact integer sum and the reference's float64 epilogue, so
outputs are compared bit for bit. On CUDA the comparison allows rtol=1e-5 and an absolute
tolerance of 1e-5 * max|y| (far below one accumulator step s_in * s_w)."""
import pytest
import torch
import torch.nn.functional as F

import qatx

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ref_quantize(x, s, z, qmin, qmax):
    return qatx.quantize_per_tensor_affine(x, s, z, qmin, qmax, torch.int32).long()


def ref_linear(x, s, z, qmin, qmax, w, sw, zw, bias=None, relu=False):
    """int64 sums, then the float64 epilogue rounded once to float32."""
    k = w.shape[1]
    a = (ref_quantize(x, s, z, qmin, qmax) - int(z)).reshape(-1, k)
    wc = w.long() - zw.long().reshape(-1, 1)
    acc = a @ wc.t()
    if bias is not None:
        acc = acc + bias.long()
    y = (acc.double() * (s.double() * sw.double().reshape(1, -1))).float()
    if relu:
        y = y.clamp_min(0)
    return y.reshape(*x.shape[:-1], w.shape[0])


def ref_conv(x, s, z, qmin, qmax, w, sw, zw, bias, stride, padding, dilation, transposed, output_padding, groups,
             relu=False):
    a = (ref_quantize(x, s, z, qmin, qmax) - int(z)).double()
    d = x.dim() - 2
    zw = zw.expand(w.shape[1] * groups if transposed else w.shape[0])
    if transposed:
        g = groups
        shp = list(w.shape)
        wc = (w.long().reshape([g, shp[0] // g] + shp[1:]) -
              zw.long().reshape([g, 1, shp[1]] + [1] * d)).reshape(shp).double()
    else:
        wc = (w.long() - zw.long().reshape([-1] + [1] * (d + 1))).double()
    acc = torch.convolution(a, wc, None, stride, padding, dilation, transposed, output_padding, groups)
    cs = [1, -1] + [1] * d
    if bias is not None:
        acc = acc + bias.double().reshape(cs)
    y = (acc * (s.double() * sw.double().reshape(cs))).float()
    return y.clamp_min(0) if relu else y


def assert_close_epilogue(y, ref, device="cpu"):
    if device == "cpu":
        assert torch.equal(y, ref), f"max difference {float((y - ref).abs().max())}"
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-30)


def qparams(gen, n, per_channel, asymmetric=False, device="cpu"):
    sw = (torch.rand(n if per_channel else 1, generator=gen) * 0.02 + 0.005).to(device)
    zw = (torch.randint(-20, 20, sw.shape, generator=gen, dtype=torch.int32) if asymmetric
          else torch.zeros(sw.shape, dtype=torch.int32)).to(device)
    return sw, zw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("irange", [(0, 255), (-128, 127), (0, 15)])
def test_linear_int8_matches_integer_reference(device, per_channel, asym, irange):
    gen = torch.Generator().manual_seed(hash((per_channel, asym, irange)) % 1000)
    qmin, qmax = irange
    m, k, n = 37, 70, 24
    x = (torch.randn(3, m, k, generator=gen) * 2).to(device)
    s = torch.tensor([0.03]).to(device)
    z = torch.tensor([(qmin + qmax) // 3], dtype=torch.int32).to(device)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    sw, zw = qparams(gen, n, per_channel, asym, device)
    bias = torch.randint(-5000, 5000, (n,), generator=gen, dtype=torch.int32).to(device)
    for b, relu in [(bias, False), (None, True), (bias, True)]:
        y = qatx.linear_int8(x, s, z, qmin, qmax, w, sw, zw, b, relu)
        assert y.dtype == torch.float32 and y.shape == (3, m, n)
        assert_close_epilogue(y.cpu(), ref_linear(x.cpu(), s.cpu(), z.cpu(), qmin, qmax, w.cpu(), sw.cpu(), zw.cpu(),
                                                  None if b is None else b.cpu(), relu), device)


def _check_linear_exact_at_1_and_2_threads(m, k, n, z, qrange, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    s, z = torch.tensor([0.02]), torch.tensor([z], dtype=torch.int32)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    sw, zw = qparams(gen, n, True, True)
    bias = torch.randint(-500, 500, (n,), generator=gen, dtype=torch.int32)
    old = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            y = qatx.linear_int8(x, s, z, *qrange, w, sw, zw, bias, relu)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(y, ref_linear(x, s, z, *qrange, w, sw, zw, bias, relu))


@pytest.mark.parametrize("m", [1, 7, 13])
@pytest.mark.parametrize("k", [5, 70])
def test_linear_int8_row_counts(m, k):
    """A single row (its own kernel), a lone last row after full tiles, and odd K (a zero column)."""
    _check_linear_exact_at_1_and_2_threads(m, k, 20, -3, (-128, 127), True, m * 100 + k)


@pytest.mark.parametrize("weight_zero_point", [0, -1, 1])
@pytest.mark.parametrize("m", [1, 7])
def test_linear_int8_one_row_tiles_with_int8_and_int16_panels(m, weight_zero_point):
    """One-row tiles (batch 1, a lone last row) read the weight panels as int8 when every
    centered weight fits int8 (zero point 0, weights at -128 and 127), and as int16 when one is
    128 (zero point -1) or -129 (zero point 1): exact either way, at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(m * 10 + weight_zero_point)
    k, n = 301, 40
    x = torch.randn(m, k, generator=gen) * 3
    s, z = torch.tensor([0.02]), torch.tensor([128], dtype=torch.int32)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w[:, 0], w[:, 1] = -128, 127
    sw, zw = torch.rand(n, generator=gen) * 0.01 + 0.001, torch.full((n,), weight_zero_point, dtype=torch.int32)
    bias = torch.randint(-500, 500, (n,), generator=gen, dtype=torch.int32)
    old = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            y = qatx.linear_int8(x, s, z, 0, 255, w, sw, zw, bias, False)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(y, ref_linear(x, s, z, 0, 255, w, sw, zw, bias, False))


@pytest.mark.parametrize("m", [1, 100, 250])
def test_linear_int8_weight_larger_than_l2(m):
    """A weight whose packed form exceeds the L2 cache (512 x 601: 616 KB packed) takes the
    panel-major loop order: still exact, at 1 and 2 threads."""
    _check_linear_exact_at_1_and_2_threads(m, 601, 512, 7, (0, 255), False, m)


@pytest.mark.parametrize("high_fraction", [0.0, 0.02, 0.5, 1.0])
def test_linear_int8_no_int16_saturation(high_fraction):
    """Large activations meeting large same-sign weights, where a u8*s8 kernel's int16 pair sums
    would saturate: the sums stay exact."""
    gen = torch.Generator().manual_seed(7)
    m, k, n = 64, 256, 48
    s, z = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    q = torch.randint(0, 100, (m, k), generator=gen).float()
    high = torch.rand(m, k, generator=gen) < high_fraction
    q[high] = 255.0
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[n // 2:] = -128
    w[:, ::3] = torch.randint(-128, 128, (k // 3 + 1,), generator=gen, dtype=torch.int8)[:w[:, ::3].shape[1]]
    sw, zw = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    y = qatx.linear_int8(q, s, z, 0, 255, w, sw, zw)
    expected = (q.long() @ w.long().t()).double()
    assert torch.equal(y.double(), expected.float().double())  # integers below 2^24: exact in float32


@pytest.mark.parametrize("k", [33025, 33026])
def test_linear_int8_long_reduction_falls_back_exactly(k):
    """K * 255 * 255 just inside and just beyond int32: the int16 route takes the first, the
    float64 reference route the second; both exact."""
    gen = torch.Generator().manual_seed(k)
    s, z = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    q = torch.full((3, k), 255.0)
    q[1] = torch.randint(0, 256, (k,), generator=gen).float()
    w = torch.full((2, k), 127, dtype=torch.int8)
    zw = torch.tensor([-128, 0], dtype=torch.int32)  # centered weights up to 255
    sw = torch.ones(2)
    y = qatx.linear_int8(q, s, z, 0, 255, w, sw, zw)
    assert torch.equal(y, ref_linear(q, s, z, 0, 255, w, sw, zw))


def test_linear_int8_per_group_and_4bit_values():
    gen = torch.Generator().manual_seed(3)
    n, k, gs = 10, 64, 16
    x = torch.randn(5, k, generator=gen)
    s, z = torch.tensor([0.02]), torch.tensor([128], dtype=torch.int32)
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    sw = torch.rand(n, k // gs, generator=gen) * 0.1 + 0.01
    zw = torch.zeros(n, k // gs, dtype=torch.int32)
    bias = torch.randint(-100, 100, (n,), generator=gen, dtype=torch.int32)
    y = qatx.linear_int8(x, s, z, 0, 255, w, sw, zw, bias)
    a = (ref_quantize(x, s, z, 0, 255) - 128).double().reshape(5, k // gs, gs)
    acc = torch.einsum("mgk,ngk->mng", a, w.double().reshape(n, k // gs, gs))
    expected = ((acc * sw.double()).sum(-1) + bias.double() * sw[:, 0].double()) * s.double()
    assert_close_epilogue(y, expected.float())


CONV_CASES = [
    # (dim, transposed, c_in, c_out, kernel, stride, padding, dilation, output_padding, groups)
    (2, False, 8, 16, 3, 1, 1, 1, 0, 1),
    (2, False, 6, 9, 3, 2, 0, 1, 0, 3),
    (2, False, 4, 8, (3, 1), (2, 1), (2, 0), (2, 1), 0, 1),
    (2, False, 16, 16, 3, 1, 1, 1, 0, 16),    # depthwise: one block of 16 channels
    (2, False, 37, 37, 3, 2, 1, 1, 0, 37),    # depthwise, a partial last block, stride 2
    (1, False, 7, 7, 5, 1, 4, 2, 0, 7),       # depthwise, odd taps, dilated
    (2, False, 6, 12, 3, 1, 1, 1, 0, 6),      # one input channel per group, two outputs: not depthwise
    (1, False, 5, 7, 3, 2, 1, 1, 0, 1),
    (3, False, 4, 6, 3, 1, 1, 1, 0, 2),
    (2, False, 3, 40, 3, 1, 1, 1, 0, 1),      # odd C (a padded channel), three panels of 16
    (2, False, 9, 36, (3, 2), 1, (1, 0), 1, 0, 3),  # odd C/G, per-group panels
    (2, False, 8, 8, 1, 2, 0, 1, 0, 1),       # 1x1, stride 2
    (2, False, 4, 6, 3, 1, 2, (1, 2), 0, 1),  # dilated along the last dim: one run per tap
    (3, False, 3, 5, (2, 3, 3), (1, 2, 2), (1, 1, 2), 1, 0, 1),  # a kernel row's taps as one run
    (2, False, 4, 4, 3, 2, 3, 1, 0, 1),       # padding wider than the kernel: windows of padding only
    (2, True, 6, 4, 3, 2, 1, 1, 1, 2),
    (1, True, 4, 5, 4, 2, 1, 1, 0, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("per_channel", [False, True])
def test_convolution_int8_matches_integer_reference(device, case, per_channel):
    d, tr, cin, cout, k, stride, pad, dil, opad, g = CONV_CASES[case]
    gen = torch.Generator().manual_seed(case)
    tup = (lambda v: list(v) if isinstance(v, tuple) else [v] * d)
    k, stride, pad, dil, opad = tup(k), tup(stride), tup(pad), tup(dil), tup(opad)
    x = torch.randn([2, cin] + [7] * d, generator=gen).to(device)
    wshape = [cin, cout // g] + k if tr else [cout, cin // g] + k
    w = torch.randint(-128, 128, wshape, generator=gen, dtype=torch.int8).to(device)
    sw, zw = qparams(gen, cout, per_channel, asymmetric=True, device=device)
    s, z = torch.tensor([0.02]).to(device), torch.tensor([90], dtype=torch.int32).to(device)
    bias = torch.randint(-3000, 3000, (cout,), generator=gen, dtype=torch.int32).to(device)
    for b, relu in [(bias, False), (None, True)]:
        y = qatx.convolution_int8(x, s, z, 0, 255, w, sw, zw, b, stride, pad, dil, tr, opad, g, relu)
        ref = ref_conv(x.cpu(), s.cpu(), z.cpu(), 0, 255, w.cpu(), sw.cpu(), zw.cpu(),
                       None if b is None else b.cpu(), stride, pad, dil, tr, opad, g, relu)
        assert y.shape == ref.shape
        assert_close_epilogue(y.cpu(), ref, device)
        if not tr:  # channels-last output (what the im2col GEMM writes)
            assert y.permute([0] + list(range(2, d + 2)) + [1]).is_contiguous()


@pytest.mark.parametrize("zero_point", [0, 200])
def test_convolution_int8_saturation_and_padding_residual(zero_point):
    """Activations near 255 (and a zero point above the no-saturation bound, so padding itself
    carries a residual) with extreme weights: still the exact sums."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 256, (2, 8, 6, 6), generator=gen).float()
    w = torch.where(torch.rand(16, 8, 3, 3, generator=gen) < 0.5, 127, -128).to(torch.int8)
    s, z = torch.tensor([1.0]), torch.tensor([zero_point], dtype=torch.int32)
    sw, zw = torch.ones(16), torch.zeros(16, dtype=torch.int32)
    y = qatx.convolution_int8(q - 0.0, s, z, 0, 255, w, sw, zw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    ref = ref_conv(q, s, z, 0, 255, w, sw, zw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert torch.equal(y, ref)


WINOGRAD_CASES = [
    # (batch, c_in, c_out, height, width, padding): 3x3, stride 1, one group, >= 16 input channels
    (2, 16, 16, 7, 7, 1),     # odd output: the last 2x2 blocks hang over the edge
    (1, 17, 5, 4, 6, 1),     # odd C (a padded channel), fewer outputs than a panel
    (3, 33, 40, 9, 8, 0),    # no padding; C and N not multiples of 16
    (2, 16, 16, 5, 6, 2),    # padding wider than the patch overlap
    (1, 20, 16, 1, 1, 1),    # one output pixel
    (1, 16, 8, 3, 5, 0),     # one output row
    (8, 64, 48, 12, 12, 1),  # 576 blocks: several chunks on every thread
]


@pytest.mark.parametrize("case", range(len(WINOGRAD_CASES)))
@pytest.mark.parametrize("input_kind", ["float", "uint8", "int8"])
def test_convolution_int8_winograd_shapes_are_exact(case, input_kind):
    """3x3 stride-1 convolutions with 16 or more input channels take the CPU's Winograd F(2x2, 3x3)
    route: the same bits as the exact integer reference at every edge case of its 2x2 blocks, for
    float and integer inputs and a quantized output."""
    b, cin, cout, h, w_, pad = WINOGRAD_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    qmin, qmax, zero = {"float": (0, 255, 77), "uint8": (0, 255, 255), "int8": (-128, 127, -128)}[input_kind]
    s, z = torch.tensor([0.03]), torch.tensor([zero], dtype=torch.int32)
    if input_kind == "float":
        x = torch.randn(b, cin, h, w_, generator=gen) * 3
        q = x
    else:
        dtype = torch.uint8 if input_kind == "uint8" else torch.int8
        q = torch.randint(qmin, qmax + 1, (b, cin, h, w_), generator=gen, dtype=dtype)
        x = (q.float() - zero) * s  # the real values the integers encode
    w = torch.randint(-128, 128, (cout, cin, 3, 3), generator=gen, dtype=torch.int8)
    sw, zw = qparams(gen, cout, True, asymmetric=True)
    bias = torch.randint(-3000, 3000, (cout,), generator=gen, dtype=torch.int32)
    args = (s, z, qmin, qmax, w, sw, zw, bias, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, True)
    ref = ref_conv(x, s, z, qmin, qmax, w, sw, zw, bias, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, True)
    assert_close_epilogue(qatx.convolution_int8(q, *args), ref)
    out_s, out_z = torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32)
    y = qatx.convolution_int8(q, *args, out_s, out_z, 0, 255)
    assert y.dtype == torch.uint8
    assert torch.equal(y.long(), ref_quantize(ref, out_s, out_z, 0, 255))


POINTWISE_STRIDED_CASES = [
    # (dim, c_in, c_out, spatial size, stride, groups): 1x1 kernels, no padding
    (2, 32, 40, (9, 8), (2, 2), 1),
    (2, 6, 9, (7, 7), (3, 2), 3),   # odd C/G: a padded channel per group
    (1, 5, 7, (11,), (4,), 1),
    (3, 4, 6, (5, 6, 7), (2, 1, 3), 2),
    (2, 16, 16, (1, 5), (2, 2), 1),  # one input row
]


@pytest.mark.parametrize("case", range(len(POINTWISE_STRIDED_CASES)))
@pytest.mark.parametrize("input_kind", ["float", "uint8"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convolution_int8_strided_pointwise_is_exact(case, input_kind, layout):
    """A strided 1x1 convolution without padding quantizes only the pixels it reads, in place from
    a channels-last input: the same bits as the exact integer reference."""
    d, cin, cout, size, stride, g = POINTWISE_STRIDED_CASES[case]
    gen = torch.Generator().manual_seed(300 + case)
    s, z = torch.tensor([0.03]), torch.tensor([41], dtype=torch.int32)
    if input_kind == "float":
        x = torch.randn((3, cin) + size, generator=gen) * 3
        q = x
    else:
        q = torch.randint(0, 256, (3, cin) + size, generator=gen, dtype=torch.uint8)
        x = (q.float() - 41) * s
    if layout == "channels_last":
        q = q.permute([0] + list(range(2, d + 2)) + [1]).contiguous().permute([0, d + 1] + list(range(1, d + 1)))
    w = torch.randint(-128, 128, (cout, cin // g) + (1,) * d, generator=gen, dtype=torch.int8)
    sw, zw = qparams(gen, cout, True, asymmetric=True)
    bias = torch.randint(-3000, 3000, (cout,), generator=gen, dtype=torch.int32)
    args = (s, z, 0, 255, w, sw, zw, bias, list(stride), [0] * d, [1] * d, False, [0] * d, g, True)
    assert_close_epilogue(qatx.convolution_int8(q, *args), ref_conv(x, *args))


DEPTHWISE_CODES_CASES = [
    # (dim, channels, spatial size, kernel, stride, padding, dilation)
    (2, 32, (9, 10), 3, 2, 1, 1),     # stride 2: read in place
    (2, 16, (7, 11), (3, 5), (2, 1), (2, 0), (1, 2)),  # padding in one dimension only, dilation
    (1, 48, (13,), 5, 3, 2, 1),
    (3, 16, (4, 5, 6), 3, (1, 2, 1), 1, 1),
    (2, 16, (2, 2), 3, 2, 2, 1),      # windows mostly in the padding
    (2, 16, (9, 8), 3, 1, 1, 1),      # stride 1: the int16 copy
]


@pytest.mark.parametrize("case", range(len(DEPTHWISE_CODES_CASES)))
@pytest.mark.parametrize("codes", ["uint8", "int8", "uint8_narrow"])
def test_convolution_int8_depthwise_reads_codes_in_place(case, codes):
    """Strided depthwise layers over 16k channels whose quant range is the codes' whole type read
    channels-last integer codes in place (no int16 copy; the zero point comes off through the bias,
    taps in the padding read a pixel of zero-point codes): the same bits as the exact integer
    reference, also as a quantized output. A narrower range (codes outside it are clamped) or
    stride 1 takes the int16 copy instead, with the same bits."""
    d, c, size, k, stride, pad, dil = DEPTHWISE_CODES_CASES[case]
    tup = (lambda v: list(v) if isinstance(v, tuple) else [v] * d)
    k, stride, pad, dil = tup(k), tup(stride), tup(pad), tup(dil)
    gen = torch.Generator().manual_seed(500 + case)
    qmin, qmax, zero, dtype = {"uint8": (0, 255, 130, torch.uint8), "int8": (-128, 127, -7, torch.int8),
                               "uint8_narrow": (3, 250, 251 // 2, torch.uint8)}[codes]
    s, z = torch.tensor([0.03]), torch.tensor([zero], dtype=torch.int32)
    info = torch.iinfo(dtype)
    q = torch.randint(info.min, info.max + 1, (3, c) + size, generator=gen, dtype=dtype)
    q = q.permute([0] + list(range(2, d + 2)) + [1]).contiguous().permute([0, d + 1] + list(range(1, d + 1)))
    x = (q.long().clamp(qmin, qmax).float() - zero) * s  # the real values the (clamped) codes encode
    w = torch.randint(-128, 128, [c, 1] + k, generator=gen, dtype=torch.int8)
    sw, zw = qparams(gen, c, True, asymmetric=True)
    bias = torch.randint(-3000, 3000, (c,), generator=gen, dtype=torch.int32)
    for relu in (False, True):
        args = (s, z, qmin, qmax, w, sw, zw, bias, stride, pad, dil, False, [0] * d, c, relu)
        ref = ref_conv(x, *args)
        assert_close_epilogue(qatx.convolution_int8(q, *args), ref)
        out_s, out_z = torch.tensor([0.2]), torch.tensor([-5], dtype=torch.int32)
        y = qatx.convolution_int8(q, *args, out_s, out_z, -128, 127)
        assert torch.equal(y.long(), ref_quantize(ref, out_s, out_z, -128, 127))


@pytest.mark.parametrize("weight_zero_point", [0, 127])
def test_convolution_int8_winograd_extremes_and_bound(weight_zero_point):
    """The Winograd route at its largest transformed values (inputs and weights at the ends of
    their ranges, |w - z| up to 255), and a layer whose 4y could pass int32 (36 * C * max|a| *
    max|w - z| >= 2^31) but whose direct sum cannot: exact on the implicit GEMM instead."""
    gen = torch.Generator().manual_seed(7)
    s, z = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    for cin in (16, 1900):
        q = torch.where(torch.rand(1, cin, 4, 4, generator=gen) < 0.5, 255, 0).float()
        w = torch.where(torch.rand(2, cin, 3, 3, generator=gen) < 0.5, 127, -128).to(torch.int8)
        sw, zw = torch.ones(2), torch.full((2,), weight_zero_point, dtype=torch.int32)
        args = (s, z, 0, 255, w, sw, zw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        assert torch.equal(qatx.convolution_int8(q, *args), ref_conv(q, *args))


def ref_dynamic(x, w, sw, zw, bias, per_row):
    k = w.shape[1]
    x2 = x.reshape(-1, k)
    if per_row:
        lo, hi = x2.amin(1).clamp_max(0), x2.amax(1).clamp_min(0)
    else:
        lo, hi = x2.min().clamp_max(0).reshape(1), x2.max().clamp_min(0).reshape(1)
    s = (hi - lo) / 255.0
    s = torch.where(s >= 2.0 ** -126, s, torch.ones_like(s))
    z = torch.clamp(torch.round(-lo * s.reciprocal()), 0, 255).to(torch.int32)
    if per_row:
        q = qatx.quantize_per_channel_affine(x2, s, z, 0, 0, 255, torch.int32).long() - z.long().reshape(-1, 1)
    else:
        q = qatx.quantize_per_tensor_affine(x2, s, z, 0, 255, torch.int32).long() - int(z)
    acc = q @ (w.long() - zw.long().reshape(-1, 1)).t()
    y = acc.double() * (s.double().reshape(-1, 1) * sw.double().reshape(1, -1))
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
def test_linear_int8_dynamic_matches_reference(device, per_row):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 9, 48, generator=gen) * torch.rand(4, 9, 1, generator=gen)).to(device)
    w = torch.randint(-127, 128, (32, 48), generator=gen, dtype=torch.int8).to(device)
    sw, zw = qparams(gen, 32, True, device=device)
    bias = torch.randn(32, generator=gen).to(device)
    y = qatx.linear_int8_dynamic(x, w, sw, zw, bias, per_row)
    assert_close_epilogue(y.cpu(), ref_dynamic(x.cpu(), w.cpu(), sw.cpu(), zw.cpu(), bias.cpu(), per_row), device)
    zero = qatx.linear_int8_dynamic(torch.zeros(3, 48, device=device), w, sw, zw, bias, per_row)
    torch.testing.assert_close(zero.cpu(), bias.cpu().expand(3, 32))


def test_packed_weight_cache_follows_in_place_updates():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, generator=gen)
    s, z = torch.tensor([0.05]), torch.tensor([128], dtype=torch.int32)
    w = torch.randint(-100, 100, (16, 32), generator=gen, dtype=torch.int8)
    sw, zw = torch.full((16,), 0.01), torch.zeros(16, dtype=torch.int32)
    y1 = qatx.linear_int8(x, s, z, 0, 255, w, sw, zw)
    w.copy_(torch.randint(-100, 100, (16, 32), generator=gen, dtype=torch.int8))  # bumps the version counter
    y2 = qatx.linear_int8(x, s, z, 0, 255, w, sw, zw)
    assert_close_epilogue(y2, ref_linear(x, s, z, 0, 255, w, sw, zw))
    assert not torch.equal(y1, y2)
    for _ in range(3):  # fresh weights at possibly reused addresses
        w2 = torch.randint(-100, 100, (16, 32), generator=gen, dtype=torch.int8)
        assert_close_epilogue(qatx.linear_int8(x, s, z, 0, 255, w2, sw, zw), ref_linear(x, s, z, 0, 255, w2, sw, zw))
        del w2


def test_weights_made_under_inference_mode_are_packed_every_call():
    """Tensors created under torch.inference_mode have no version counter, so an in-place change
    cannot be seen: such weights (and zero points) are packed on every call, never cached."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 32, generator=gen)
    s, z = torch.tensor([0.05]), torch.tensor([128], dtype=torch.int32)
    with torch.inference_mode():
        w = torch.randint(-100, 100, (16, 32), generator=gen, dtype=torch.int8)
        sw, zw = torch.full((16,), 0.01), torch.zeros(16, dtype=torch.int32)
        wc = torch.randint(-100, 100, (16, 32, 3, 3), generator=gen, dtype=torch.int8)
        xc = torch.randn(2, 32, 6, 6, generator=gen)
        conv_args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        for _ in range(2):
            assert_close_epilogue(qatx.linear_int8(x, s, z, 0, 255, w, sw, zw), ref_linear(x, s, z, 0, 255, w, sw, zw))
            y = qatx.convolution_int8(xc, s, z, 0, 255, wc, sw, zw, None, *conv_args)
            assert_close_epilogue(y, ref_conv(xc, s, z, 0, 255, wc, sw, zw, None, *conv_args))
            w.copy_(torch.randint(-100, 100, (16, 32), generator=gen, dtype=torch.int8))  # no version to bump
            wc.neg_()
            zw.fill_(3)


def _nibbles(packed, n):
    """The 4-bit values of packed bytes, element 2j from the low nibble, as int8 [..., n]."""
    u = packed.long()
    both = torch.stack([u % 16, u // 16], -1).flatten(-2)[..., :n]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_int4_values_and_errors(device):
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64).to(device)  # all 16 x 16 nibble pairs
    for n in (128, 127):
        y = torch.ops.qatx.unpack_int4(every_byte, n)
        assert y.dtype == torch.int8 and y.shape == (4, n) and y.device == every_byte.device
        assert torch.equal(y.cpu(), _nibbles(every_byte.cpu(), n))
    q = torch.randint(-8, 8, (2, 3, 5), dtype=torch.int8)
    assert torch.equal(torch.ops.qatx.unpack_int4(qatx.nn.quantized.pack_int4(q).to(device), 5).cpu(), q)
    strided = every_byte.t()[:, ::2]  # not contiguous: 64 rows of 2 bytes
    assert torch.equal(torch.ops.qatx.unpack_int4(strided, 3).cpu(), _nibbles(strided.cpu().contiguous(), 3))
    for empty, n in (((0, 4), 8), ((3, 0), 0)):
        y = torch.ops.qatx.unpack_int4(torch.zeros(empty, dtype=torch.uint8, device=device), n)
        assert y.shape == (empty[0], n) and y.dtype == torch.int8
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        torch.ops.qatx.unpack_int4(q.to(device), 5)
    for n in (9, 6, -1):
        with pytest.raises(RuntimeError, match=r"n must be 2 \* packed.size\(-1\) - 1 or 2 \* packed.size\(-1\)"):
            torch.ops.qatx.unpack_int4(every_byte[:, :4], n)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        torch.ops.qatx.unpack_int4(torch.tensor(7, dtype=torch.uint8, device=device), 1)


def test_unpack_int4_is_kept_while_unchanged():
    """The CPU kernel hands back the same tensor while the packed weight and the result are
    unchanged (a 4-bit layer's packed int16 weight then stays cached); an in-place change to
    either gives freshly unpacked values."""
    gen = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, (16, 16), generator=gen, dtype=torch.uint8)
    first = torch.ops.qatx.unpack_int4(packed, 31)
    assert torch.ops.qatx.unpack_int4(packed, 31).data_ptr() == first.data_ptr()
    assert torch.equal(torch.ops.qatx.unpack_int4(packed, 32)[:, :31], first)  # another n: its own entry
    packed.copy_(torch.randint(0, 256, (16, 16), generator=gen, dtype=torch.uint8))
    assert torch.equal(torch.ops.qatx.unpack_int4(packed, 31), _nibbles(packed, 31))
    kept = torch.ops.qatx.unpack_int4(packed, 31)
    kept.zero_()  # a caller writing into the result
    assert torch.equal(torch.ops.qatx.unpack_int4(packed, 31), _nibbles(packed, 31))
    with torch.inference_mode():  # made as a normal tensor, so it can be kept
        y = torch.ops.qatx.unpack_int4(packed[:8], 31)
        assert not y.is_inference() and torch.ops.qatx.unpack_int4(packed[:8], 31).data_ptr() == y.data_ptr()
        assert torch.equal(y, _nibbles(packed[:8], 31))


def test_empty_and_scripted():
    w = torch.randint(-5, 5, (4, 8), dtype=torch.int8)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    sw, zw = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    assert qatx.linear_int8(torch.empty(0, 8), s, z, 0, 255, w, sw, zw).shape == (0, 4)
    fn = torch.jit.script(qatx.ops.linear_int8)
    x = torch.rand(3, 8)
    assert torch.equal(fn(x, s, z, 0, 255, w, sw, zw, None, False), qatx.linear_int8(x, s, z, 0, 255, w, sw, zw))


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    s, z = torch.tensor([0.05]), torch.tensor([100], dtype=torch.int32)
    w = torch.randint(-128, 128, (12, 16), generator=gen, dtype=torch.int8)
    sw, zw = torch.rand(12, generator=gen) * 0.1 + 0.01, torch.zeros(12, dtype=torch.int32)
    b = torch.randint(-100, 100, (12,), generator=gen, dtype=torch.int32)
    x = torch.randn(5, 16, generator=gen)
    wc = torch.randint(-128, 128, (6, 4, 3, 3), generator=gen, dtype=torch.int8)
    wt = torch.randint(-128, 128, (4, 3, 3, 3), generator=gen, dtype=torch.int8)
    xc = torch.randn(2, 4, 6, 6, generator=gen)
    sc, zc = torch.rand(6, generator=gen) * 0.1 + 0.01, torch.zeros(6, dtype=torch.int32)
    return [
        (torch.ops.qatx.linear_int8.default, (x, s, z, 0, 255, w, sw, zw, b, True)),
        (torch.ops.qatx.linear_int8.default, (x, s, z, 0, 255, w, sw[:1], zw[:1], None, False)),
        (torch.ops.qatx.convolution_int8.default,
         (xc, s, z, 0, 255, wc, sc, zc, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, True)),
        (torch.ops.qatx.convolution_int8.default,
         (xc, s, z, 0, 255, wt, sw[:3], zw[:3], None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1, False)),
        (torch.ops.qatx.linear_int8_dynamic.default, (x, w, sw, zw, None, False)),
        (torch.ops.qatx.linear_int8_dynamic.default, (x, w, sw, zw, torch.randn(12, generator=gen), True)),
        (torch.ops.qatx.add_int8.default, (xc, s, z, 0, 255, xc.flip(0), torch.tensor([0.03]),
                                           torch.tensor([-3], dtype=torch.int32), -128, 127, True)),
        (torch.ops.qatx.unpack_int4.default, (torch.randint(0, 256, (3, 4), generator=gen, dtype=torch.uint8), 7)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_errors():
    x = torch.randn(4, 8)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    w = torch.randint(-5, 5, (3, 8), dtype=torch.int8)
    sw, zw = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    op = qatx.linear_int8
    with pytest.raises(RuntimeError, match="input must be torch.float32"):
        op(x.double(), s, z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="weight must be torch.int8"):
        op(x, s, z, 0, 255, w.float(), sw, zw)
    with pytest.raises(RuntimeError, match="in_features"):
        op(x[:, :5], s, z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="at most 8 bits"):
        op(x, s, z, 0, 511, w, sw, zw)
    with pytest.raises(RuntimeError, match="zero_point"):
        op(x, s, torch.tensor([300], dtype=torch.int32), 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(x, torch.tensor([0.0]), z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="weight_scale must have shape"):
        op(x, s, z, 0, 255, w, torch.ones(2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, s, z, 0, 255, w, sw, zw, torch.ones(3))
    with pytest.raises(RuntimeError, match="NaN"):
        op(torch.full((2, 8), float("nan")), s, z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="input must be finite"):
        qatx.linear_int8_dynamic(torch.full((2, 8), float("inf")), w, sw, zw)
    xc = torch.randn(1, 4, 5, 5)
    wc = torch.randint(-5, 5, (6, 4, 3, 3), dtype=torch.int8)
    sc, zc = torch.ones(6), torch.zeros(6, dtype=torch.int32)
    conv = qatx.convolution_int8
    with pytest.raises(RuntimeError, match="weight must have 3 dimensions"):
        conv(xc[0], s, z, 0, 255, wc, sc, zc, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        conv(xc, s, z, 0, 255, wc, sc, zc, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 3)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        conv(xc, s, z, 0, 255, wc, sc, zc, None, [0, 1], [0, 0], [1, 1], False, [0, 0], 1)
    with pytest.raises(RuntimeError, match="empty"):
        conv(xc, s, z, 0, 255, torch.randint(-5, 5, (6, 4, 7, 7), dtype=torch.int8), sc, zc, None, [1, 1], [0, 0],
             [1, 1], False, [0, 0], 1)


def ref_add(x, sx, zx, xmin, xmax, y, sy, zy, ymin, ymax, relu):
    """The three ops add_int8 replaces."""
    out = qatx.fake_quantize_per_tensor_affine(x, sx, zx, xmin, xmax) + \
        qatx.fake_quantize_per_tensor_affine(y, sy, zy, ymin, ymax)
    return torch.relu(out) if relu else out


def assert_equal_with_nan(a, b):
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("ranges", [((0, 255), (0, 255)), ((-128, 127), (0, 255)), ((-8, 7), (-127, 127))])
@pytest.mark.parametrize("layouts", ["contiguous", "channels_last", "mixed", "strided"])
def test_add_int8_equals_fake_quantize_add_relu(device, relu, ranges, layouts):
    gen = torch.Generator().manual_seed(7)
    (xmin, xmax), (ymin, ymax) = ranges
    shape = (3, 5, 7, 9)  # 945 elements: not a multiple of any vector width
    x = torch.randn(shape, generator=gen) * 4
    y = torch.randn(shape, generator=gen) * 4
    # NaN, infinities, values far outside both ranges and exact half-steps (ties round to even).
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.125])
    y.view(-1)[6:9] = torch.tensor([float("nan"), 0.25, -0.375])
    if layouts in ("channels_last", "mixed"):
        x = x.to(memory_format=torch.channels_last)
    if layouts == "channels_last":
        y = y.to(memory_format=torch.channels_last)
    if layouts == "strided":
        x, y = x.transpose(1, 3), y.transpose(1, 3)[..., :1].expand(3, 9, 7, 5)  # y not dense
    sx, zx = torch.tensor([0.25]), torch.tensor([xmin + (xmax - xmin) // 3], dtype=torch.int32)
    sy, zy = torch.tensor([0.125], dtype=torch.float64), torch.tensor([ymax - 1], dtype=torch.int64)
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in (x, sx, zx, xmin, xmax, y, sy, zy, ymin, ymax, relu)]
    for threads in (1, 2):
        with _threads(threads):
            out = qatx.add_int8(*args)
        assert_equal_with_nan(out.cpu(), ref_add(x, sx, zx, xmin, xmax, y, sy, zy, ymin, ymax, relu))
    assert out.stride() == x.stride()  # the output keeps the input's (dense) layout
    if relu:
        assert not (out < 0).any()


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def test_add_int8_large_parallel_and_empty():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 64, 33, 33, generator=gen), torch.randn(2, 64, 33, 33, generator=gen)
    s, z = torch.tensor([0.04]), torch.tensor([128], dtype=torch.int32)
    assert torch.equal(qatx.add_int8(x, s, z, 0, 255, y, s, z, 0, 255, True), ref_add(x, s, z, 0, 255, y, s, z, 0, 255, True))
    e = torch.empty(0, 3)
    assert qatx.add_int8(e, s, z, 0, 255, e, s, z, 0, 255).shape == (0, 3)
    fn = torch.jit.script(qatx.ops.add_int8)
    assert torch.equal(fn(x, s, z, 0, 255, y, s, z, 0, 255, False), ref_add(x, s, z, 0, 255, y, s, z, 0, 255, False))


def test_add_int8_errors():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    op = qatx.add_int8
    with pytest.raises(RuntimeError, match="other must have input's shape"):
        op(x, s, z, 0, 255, y[:, :4], s, z, 0, 255)
    with pytest.raises(RuntimeError, match="other must be torch.float32"):
        op(x, s, z, 0, 255, y.half(), s, z, 0, 255)
    with pytest.raises(RuntimeError, match="input must be torch.float32"):
        op(x.double(), s, z, 0, 255, y, s, z, 0, 255)
    with pytest.raises(RuntimeError, match="other_quant_min=0 and other_quant_max=511 must describe at most 8 bits"):
        op(x, s, z, 0, 255, y, s, z, 0, 511)
    with pytest.raises(RuntimeError, match="other_scale must be a floating tensor with one element"):
        op(x, s, z, 0, 255, y, torch.ones(2), z, 0, 255)
    with pytest.raises(RuntimeError, match="input_zero_point must be an integer tensor"):
        op(x, s, s, 0, 255, y, s, z, 0, 255)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(x, s, z, 0, 255, y, torch.tensor([0.0]), z, 0, 255)
    with pytest.raises(RuntimeError, match="zero_point"):
        op(x, s, z, 0, 255, y, s, torch.tensor([-1], dtype=torch.int32), 0, 255)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_opcheck_and_int_mm_route():
    for op, args in _opcheck_cases():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=gen)
    w = torch.randint(-128, 128, (128, 256), generator=gen, dtype=torch.int8)
    s, z = torch.tensor([0.02]), torch.tensor([77], dtype=torch.int32)
    sw, zw = torch.rand(128, generator=gen) * 0.01 + 0.001, torch.randint(-3, 3, (128,), dtype=torch.int32)
    b = torch.randint(-999, 999, (128,), generator=gen, dtype=torch.int32)
    y = qatx.linear_int8(x.cuda(), s.cuda(), z.cuda(), 0, 255, w.cuda(), sw.cuda(), zw.cuda(), b.cuda(), True)
    assert_close_epilogue(y.cpu(), ref_linear(x, s, z, 0, 255, w, sw, zw, b, True))


# ---- integer activations: uint8 / int8 inputs and quantized outputs ----

INTEGER_GRIDS = [  # (input range, output range)
    ((0, 255), (0, 255)),
    ((-128, 127), (-128, 127)),
    ((0, 15), (3, 100)),
]


def _integer_case(gen, irange, orange, device):
    s, z = torch.tensor([0.03]), torch.tensor([(irange[0] + irange[1]) // 3], dtype=torch.int32)
    so, zo = torch.tensor([0.11]), torch.tensor([(orange[0] + orange[1]) // 2], dtype=torch.int32)
    return s.to(device), z.to(device), so.to(device), zo.to(device)


def _codes(x, s, z, qrange):
    dtype = torch.uint8 if qrange[0] >= 0 else torch.int8
    return torch.ops.qatx.quantize_per_tensor_affine(x, s, z, qrange[0], qrange[1], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grids", range(len(INTEGER_GRIDS)))
@pytest.mark.parametrize("m", [1, 7, 40])
def test_linear_int8_integer_input_and_output_equal_the_float_route(device, grids, m):
    irange, orange = INTEGER_GRIDS[grids]
    gen = torch.Generator().manual_seed(grids * 10 + m)
    s, z, so, zo = _integer_case(gen, irange, orange, device)
    x = (torch.randn(m, 37, generator=gen) * 2).to(device)
    w = torch.randint(-128, 128, (19, 37), generator=gen, dtype=torch.int8).to(device)
    sw, zw = qparams(gen, 19, True, device=device)
    b = torch.randint(-2000, 2000, (19,), generator=gen, dtype=torch.int32).to(device)
    q = _codes(x, s, z, irange)
    for relu in (False, True):
        y = qatx.linear_int8(x, s, z, *irange, w, sw, zw, b, relu)
        # Integer input: the same bits as the float input it came from.
        assert torch.equal(qatx.linear_int8(q, s, z, *irange, w, sw, zw, b, relu), y)
        # Quantized output: quantize_per_tensor_affine of the float output, from either input.
        expected = _codes(y, so, zo, orange)
        for inp in (x, q):
            out = qatx.linear_int8(inp, s, z, *irange, w, sw, zw, b, relu, so, zo, *orange)
            assert out.dtype == expected.dtype and torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_convolution_int8_integer_input_and_output_equal_the_float_route(device, case):
    d, tr, cin, cout, k, stride, pad, dil, opad, g = CONV_CASES[case]
    irange, orange = INTEGER_GRIDS[case % len(INTEGER_GRIDS)]
    gen = torch.Generator().manual_seed(case)
    tup = (lambda v: list(v) if isinstance(v, tuple) else [v] * d)
    k, stride, pad, dil, opad = tup(k), tup(stride), tup(pad), tup(dil), tup(opad)
    s, z, so, zo = _integer_case(gen, irange, orange, device)
    x = torch.randn([2, cin] + [7] * d, generator=gen).to(device)
    wshape = [cin, cout // g] + k if tr else [cout, cin // g] + k
    w = torch.randint(-128, 128, wshape, generator=gen, dtype=torch.int8).to(device)
    sw, zw = qparams(gen, cout, True, asymmetric=True, device=device)
    b = torch.randint(-3000, 3000, (cout,), generator=gen, dtype=torch.int32).to(device)
    geometry = (stride, pad, dil, tr, opad, g)
    y = qatx.convolution_int8(x, s, z, *irange, w, sw, zw, b, *geometry, True)
    q = _codes(x, s, z, irange)
    assert torch.equal(qatx.convolution_int8(q, s, z, *irange, w, sw, zw, b, *geometry, True), y)
    # A channels-last integer input (what a chained convolution writes) gives the same bits.
    cl = q.permute([0] + list(range(2, d + 2)) + [1]).contiguous().permute([0, d + 1] + list(range(1, d + 1)))
    assert torch.equal(qatx.convolution_int8(cl, s, z, *irange, w, sw, zw, b, *geometry, True), y)
    expected = _codes(y, so, zo, orange)
    out = qatx.convolution_int8(q, s, z, *irange, w, sw, zw, b, *geometry, True, so, zo, *orange)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    assert out.stride() == y.stride()  # the float output's layout (channels-last unless transposed)


@pytest.mark.parametrize("codes,qrange", [(torch.uint8, (0, 15)), (torch.int8, (-8, 7))])
def test_integer_input_is_clamped_to_the_quant_range(codes, qrange):
    gen = torch.Generator().manual_seed(3)
    info = torch.iinfo(codes)
    q = torch.randint(info.min, info.max + 1, (6, 40), generator=gen, dtype=codes)
    w = torch.randint(-128, 128, (16, 40), generator=gen, dtype=torch.int8)
    sw, zw = qparams(gen, 16, True)
    s, z = torch.tensor([0.1]), torch.tensor([qrange[0] + 4], dtype=torch.int32)
    clamped = q.clamp(*qrange)
    # A 4-bit grid: codes outside it count as its ends, as the float route's clamp would make them.
    assert torch.equal(qatx.linear_int8(q, s, z, *qrange, w, sw, zw), qatx.linear_int8(clamped, s, z, *qrange, w,
                                                                                     sw, zw))
    ref = ref_linear(((clamped.float() - int(z)) * 0.1), s, z, *qrange, w, sw, zw)
    assert_close_epilogue(qatx.linear_int8(q, s, z, *qrange, w, sw, zw), ref)
    # A convolution's padded, channels-last input buffer: 40 channels, 16 at a time and the rest.
    qc = q.reshape(6, 40, 1, 1).expand(6, 40, 3, 4).contiguous(memory_format=torch.channels_last)
    wc = torch.randint(-128, 128, (8, 40, 3, 3), generator=gen, dtype=torch.int8)
    args = (s, z, *qrange, wc, sw[:8], zw[:8], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    ref = ref_conv((qc.clamp(*qrange).float() - int(z)) * 0.1, *args)
    assert_close_epilogue(qatx.convolution_int8(qc, *args), ref)


@pytest.mark.parametrize("orange", [(0, 255), (-128, 127)])
@pytest.mark.parametrize("layer", ["linear", "linear_cancelling_bias", "conv3x3", "depthwise"])
def test_integer_output_at_rounding_ties_equals_the_float_route(orange, layer):
    """Outputs at or a few float32 ulps from a half-integer of the output grid: the integer output
    is still quantize_per_tensor_affine of the float output (the CPU computes integer outputs in
    float32 and defers to the float64 epilogue near such points). Channel j's multiplier
    s * sw[j] / so is 0.5 * (1 + k * 2^-23) with k = (j - 32) // 4, up to sw's float32 rounding,
    so an odd sum (bias included) lands about k * 2^-23 * |t| from a half-integer: within a few
    ulps of the result t for small k. With a cancelling bias, sums near 10^6 and a bias near
    -10^6 leave small results whose float32 terms carry errors near 0.03."""
    gen = torch.Generator().manual_seed(orange[0] + len(layer))
    s, z = torch.tensor([0.3]), torch.tensor([1], dtype=torch.int32)
    so, zo = torch.tensor([0.1]), torch.tensor([(orange[0] + orange[1] + 1) // 2], dtype=torch.int32)
    n = 64
    k = torch.div(torch.arange(n) - 32, 4, rounding_mode="floor").double()
    sw = (float(so) / float(s) * 0.5 * (1 + k * 2.0 ** -23)).float()
    zw = torch.zeros(n, dtype=torch.int32)
    b = torch.randint(-100, 100, (n,), generator=gen, dtype=torch.int32)
    if layer == "linear":
        x = torch.randint(0, 21, (300, 3), generator=gen, dtype=torch.uint8)
        w = torch.randint(-5, 6, (n, 3), generator=gen, dtype=torch.int8)
        if layer == "linear_cancelling_bias":
            x = torch.cat([torch.full((300, 32), 255, dtype=torch.uint8), x[:, :1]], 1)
            w = torch.cat([torch.full((n, 32), 127, dtype=torch.int8), w[:, :1]], 1)
            b = b - 254 * 127 * 32
        run = lambda relu, *out: qatx.linear_int8(x, s, z, 0, 255, w, sw, zw, b, relu, *out)
    else:
        groups = n if layer == "depthwise" else 1
        high = 21 if layer == "depthwise" else 4  # sums of 9 or 576 products, mostly inside the grid
        x = torch.randint(0, high, (2, n, 6, 7), generator=gen, dtype=torch.uint8)
        w = torch.randint(-5 if groups > 1 else -2, 6 if groups > 1 else 3, (n, n // groups, 3, 3), generator=gen,
                          dtype=torch.int8)
        x = x.contiguous(memory_format=torch.channels_last)
        run = lambda relu, *out: qatx.convolution_int8(x, s, z, 0, 255, w, sw, zw, b, [1, 1], [1, 1], [1, 1],
                                                       False, [0, 0], groups, relu, *out)
    for relu in (False, True):
        y = run(relu)
        on_grid = y.double() / float(so) + float(zo)
        inside = (on_grid > orange[0]) & (on_grid < orange[1])
        near_tie = (on_grid - on_grid.floor() - 0.5).abs() < 1e-3
        assert int((inside & near_tie).sum()) > 100
        expected = _codes(y, so, zo, orange)
        out = run(relu, so, zo, *orange)
        assert out.dtype == expected.dtype and torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layouts", ["contiguous", "channels_last", "mixed"])
def test_add_int8_integer_operands_and_output(device, relu, layouts):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 6, 7, generator=gen).to(device)
    y = torch.randn(3, 5, 6, 7, generator=gen).to(device)
    if layouts != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    if layouts == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    gx = (torch.tensor([0.02]).to(device), torch.tensor([100], dtype=torch.int32).to(device), 0, 255)
    gy = (torch.tensor([0.03]).to(device), torch.tensor([-3], dtype=torch.int32).to(device), -128, 127)
    go = (torch.tensor([0.05]).to(device), torch.tensor([20], dtype=torch.int32).to(device), 0, 200)
    ref = qatx.add_int8(x, *gx, y, *gy, relu)
    qx, qy = _codes(x, gx[0], gx[1], gx[2:]), _codes(y, gy[0], gy[1], gy[2:])
    expected = _codes(ref, go[0], go[1], go[2:])
    for a, b in [(qx, y), (x, qy), (qx, qy)]:
        assert torch.equal(qatx.add_int8(a, *gx, b, *gy, relu), ref)
        out = qatx.add_int8(a, *gx, b, *gy, relu, *go)
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
        assert out.stride() == ref.stride()
    # uint8 operands and output (the chained residual add's one-pass route), codes outside
    # the operands' ranges clamped
    gu = (torch.tensor([0.03]).to(device), torch.tensor([7], dtype=torch.int32).to(device), 0, 250)
    qu = torch.randint(0, 256, y.shape, generator=gen, dtype=torch.uint8).to(device)
    qu = qu.contiguous(memory_format=torch.channels_last) if layouts == "channels_last" else qu
    u_real = (qu.clamp(0, 250).float() - 7) * gu[0]
    out = qatx.add_int8(qx, *gx, qu, *gu, relu, *go)
    assert out.dtype == torch.uint8
    assert torch.equal(out, _codes(qatx.add_int8(x, *gx, u_real, *gu, relu), go[0], go[1], go[2:]))
    signed = qatx.add_int8(x, *gx, y, *gy, relu, go[0], go[1], -100, 100)
    assert signed.dtype == torch.int8 and torch.equal(signed, _codes(ref, go[0], go[1], (-100, 100)))
    if device == "cpu":
        with pytest.raises(RuntimeError, match="NaN"):
            qatx.add_int8(torch.full_like(x, float("nan")), *gx, y, *gy, relu, *go)


def test_integer_activation_errors():
    x = torch.randn(4, 8)
    q = torch.zeros(4, 8, dtype=torch.uint8)
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    w = torch.randint(-5, 5, (3, 8), dtype=torch.int8)
    sw, zw = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    op = qatx.linear_int8
    with pytest.raises(RuntimeError, match="torch.uint8 input needs input_quant_min >= 0"):
        op(q, s, z, -128, 127, w, sw, zw)
    with pytest.raises(RuntimeError, match="torch.int8 input needs input_quant_max <= 127"):
        op(q.to(torch.int8), s, z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="input must be torch.float32, or torch.uint8 / torch.int8"):
        op(q.to(torch.int32), s, z, 0, 255, w, sw, zw)
    with pytest.raises(RuntimeError, match="output_scale and output_zero_point must be given together"):
        op(x, s, z, 0, 255, w, sw, zw, None, False, s, None)
    with pytest.raises(RuntimeError, match=r"inside \[0, 255\] \(uint8 output\) or \[-128, 127\]"):
        op(x, s, z, 0, 255, w, sw, zw, None, False, s, z, -1, 254)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(x, s, z, 0, 255, w, sw, zw, None, False, torch.tensor([0.0]), z, 0, 255)
    with pytest.raises(RuntimeError, match="output_zero_point must be an integer tensor"):
        op(x, s, z, 0, 255, w, sw, zw, None, False, s, s, 0, 255)
    with pytest.raises(RuntimeError, match="zero_point"):
        op(x, s, z, 0, 255, w, sw, zw, None, False, s, torch.tensor([300], dtype=torch.int32), 0, 255)
    with pytest.raises(RuntimeError, match="torch.uint8 other needs other_quant_min >= 0"):
        qatx.add_int8(x, s, z, 0, 255, q, s, z, -128, 127)
    with pytest.raises(RuntimeError, match="input must be torch.float32"):
        qatx.linear_int8_dynamic(q, w, sw, zw)


def test_integer_activation_opcheck():
    gen = torch.Generator().manual_seed(1)
    s, z = torch.tensor([0.05]), torch.tensor([100], dtype=torch.int32)
    so, zo = torch.tensor([0.07]), torch.tensor([-5], dtype=torch.int32)
    q = torch.randint(0, 256, (5, 16), generator=gen, dtype=torch.uint8)
    w = torch.randint(-128, 128, (12, 16), generator=gen, dtype=torch.int8)
    sw, zw = torch.rand(12, generator=gen) * 0.1 + 0.01, torch.zeros(12, dtype=torch.int32)
    qc = torch.randint(0, 256, (2, 4, 6, 6), generator=gen, dtype=torch.uint8)
    wc = torch.randint(-128, 128, (6, 4, 3, 3), generator=gen, dtype=torch.int8)
    for op, args in [
        (torch.ops.qatx.linear_int8.default, (q, s, z, 0, 255, w, sw, zw, None, True, so, zo, -128, 127)),
        (torch.ops.qatx.convolution_int8.default,
         (qc, s, z, 0, 255, wc, sw[:6], zw[:6], None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, True, so, zo, -128,
          127)),
        (torch.ops.qatx.add_int8.default, (qc, s, z, 0, 255, qc.flip(0), s, z, 0, 255, True, s, z, 0, 255)),
    ]:
        torch.library.opcheck(op, args)
