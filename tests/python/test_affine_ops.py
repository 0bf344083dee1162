"""The affine fake-quantize / quantize / dequantize ops: exact numerics against torch's ops and
the references in reference.py, STE gradients, layouts, TorchScript, torch.compile, opcheck and
every documented error."""
import itertools

import pytest
import torch

import qatx
import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_DTYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quant_range(bits, signed, narrow=False):
    if signed:
        return -(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def make_qparams(x, granularity, quant_min, quant_max, gen, axis=0, group_size=None):
    if granularity == "per_tensor":
        shape = (1,)
    elif granularity == "per_channel":
        shape = (x.shape[axis],)
    else:
        shape = (*x.shape[:-1], x.shape[-1] // group_size)
    scale = (torch.rand(shape, generator=gen) * 0.2 + 1e-3).to(x.device)
    zero_point = torch.randint(quant_min, quant_max + 1, shape, generator=gen, dtype=torch.int32).to(x.device)
    return scale, zero_point


def fake_quantize(x, s, z, qmin, qmax, granularity, axis=0, group_size=None):
    if granularity == "per_tensor":
        return qatx.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    if granularity == "per_channel":
        return qatx.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
    return qatx.fake_quantize_per_group_affine(x, s, z, group_size, qmin, qmax)


def quantize(x, s, z, qmin, qmax, dtype, granularity, axis=0, group_size=None):
    if granularity == "per_tensor":
        return qatx.quantize_per_tensor_affine(x, s, z, qmin, qmax, dtype)
    if granularity == "per_channel":
        return qatx.quantize_per_channel_affine(x, s, z, axis, qmin, qmax, dtype)
    return qatx.quantize_per_group_affine(x, s, z, group_size, qmin, qmax, dtype)


def dequantize(q, s, z, granularity, axis=0, group_size=None, output_dtype=None):
    if granularity == "per_tensor":
        return qatx.dequantize_per_tensor_affine(q, s, z, output_dtype)
    if granularity == "per_channel":
        return qatx.dequantize_per_channel_affine(q, s, z, axis, output_dtype)
    return qatx.dequantize_per_group_affine(q, s, z, group_size, output_dtype)


def random_input(shape, dtype, scale_hint, gen, device="cpu"):
    """Values spread over and beyond the quantization grid, with exact ties (k + 0.5) * s mixed in."""
    x = torch.randn(shape, generator=gen) * 3.0 * scale_hint * 40
    ties = (torch.randint(-60, 60, shape, generator=gen).float() + 0.5) * scale_hint
    pick = torch.rand(shape, generator=gen) < 0.2
    return torch.where(pick, ties, x).to(dtype).to(device)


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.element_size() == 1 else a, b)


CASES = [  # (shape, bits, signed, narrow)
    ((1000,), 8, True, False), ((17, 33), 8, False, False), ((4, 3, 5, 7), 4, True, True),
    ((2, 8, 6, 6), 2, True, False), ((64, 130), 16, True, False), ((3, 1, 9), 3, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_per_tensor_matches_torch_bit_for_bit(case, dtype):
    shape, bits, signed, narrow = case
    gen = torch.Generator().manual_seed(hash((shape, bits, signed)) % 2**31)
    qmin, qmax = quant_range(bits, signed, narrow)
    x = random_input(shape, dtype, 0.05, gen)
    s, z = make_qparams(x, "per_tensor", qmin, qmax, gen)
    expected = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    got = qatx.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert torch.equal(got, ref.fake_quantize(x, s, z, qmin, qmax))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_per_channel_matches_torch_bit_for_bit(case, dtype):
    shape, bits, signed, narrow = case
    gen = torch.Generator().manual_seed(1 + hash((shape, bits)) % 2**31)
    qmin, qmax = quant_range(bits, signed, narrow)
    x = random_input(shape, dtype, 0.05, gen)
    for axis in range(x.dim()):
        s, z = make_qparams(x, "per_channel", qmin, qmax, gen, axis=axis)
        expected = torch.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)
        assert torch.equal(qatx.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax), expected)
        assert torch.equal(qatx.fake_quantize_per_channel_affine(x, s, z, axis - x.dim(), qmin, qmax), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", [((8, 64), 32), ((3, 5, 48), 16), ((96,), 8), ((2, 7), 7), ((4, 1000), 1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_group_matches_reference(shape, group_size, bits, dtype):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    qmin, qmax = quant_range(bits, True)
    x = random_input(shape, dtype, 0.05, gen)
    s, z = make_qparams(x, "per_group", qmin, qmax, gen, group_size=group_size)
    got = qatx.fake_quantize_per_group_affine(x, s, z, group_size, qmin, qmax)
    assert torch.equal(got, ref.fake_quantize(x, s, z, qmin, qmax, "per_group", group_size=group_size))
    assert got.is_contiguous()


GRANULARITY_CASES = [("per_tensor", 0, None), ("per_channel", 1, None), ("per_channel", -1, None), ("per_group", 0, 12)]


@pytest.mark.parametrize("granularity,axis,group_size", GRANULARITY_CASES)
@pytest.mark.parametrize("int_dtype", list(INT_DTYPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_equals_fake_quantize(granularity, axis, group_size, int_dtype, dtype):
    gen = torch.Generator().manual_seed(7)
    lo, hi = INT_DTYPES[int_dtype]
    qmin, qmax = (lo, hi) if int_dtype != torch.int16 else (-2048, 2047)
    x = random_input((5, 6, 24), dtype, 0.02, gen)
    s, z = make_qparams(x, granularity, qmin, qmax, gen, axis=axis, group_size=group_size)
    q = quantize(x, s, z, qmin, qmax, int_dtype, granularity, axis, group_size)
    assert q.dtype == int_dtype
    assert torch.equal(q, ref.quantize(x, s, z, qmin, qmax, int_dtype, granularity, axis, group_size))
    y = dequantize(q, s, z, granularity, axis, group_size, output_dtype=dtype)
    assert y.dtype == dtype
    assert torch.equal(y, fake_quantize(x, s, z, qmin, qmax, granularity, axis, group_size))
    assert torch.equal(dequantize(q, s, z, granularity, axis, group_size),
                       ref.dequantize(q, s, z, torch.float32, granularity, axis, group_size))


def test_int32_bias_quantization_and_saturation():
    x = torch.tensor([1.5, -2.5, 1e3, -7.0, 3e9, -3e9])
    s, z = torch.tensor([0.5]), torch.tensor([0], dtype=torch.int32)
    q = qatx.quantize_per_tensor_affine(x, s, z, -(2**31), 2**31 - 1, torch.int32)
    assert q.tolist() == [3, -5, 2000, -14, 2**31 - 1, -(2**31)]
    q16 = qatx.quantize_per_tensor_affine(x[:4], s, z, -100, 100, torch.int16)
    assert q16.tolist() == [3, -5, 100, -14]


def test_rounding_is_half_to_even():
    s, z = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5, 127.5])
    y = qatx.fake_quantize_per_tensor_affine(x, s, z, -128, 127)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, 126.0, 127.0]


def test_nan_and_inf_semantics():
    s, z = torch.tensor([0.1]), torch.tensor([2], dtype=torch.int32)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], requires_grad=True)
    y = qatx.fake_quantize_per_tensor_affine(x, s, z, -128, 127)
    assert torch.isnan(y[0])
    assert y[1].item() == pytest.approx((127 - 2) * 0.1) and y[2].item() == pytest.approx((-128 - 2) * 0.1)
    y.backward(torch.ones(4))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]  # NaN and +/-Inf are outside the range: no gradient
    with pytest.raises(RuntimeError, match="NaN"):
        qatx.quantize_per_tensor_affine(x.detach(), s, z, -128, 127, torch.int8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity,axis,group_size", GRANULARITY_CASES)
def test_ste_gradient_is_exact(granularity, axis, group_size, dtype):
    gen = torch.Generator().manual_seed(3)
    qmin, qmax = quant_range(4, True)
    x = random_input((6, 10, 36), dtype, 0.05, gen).requires_grad_()
    s, z = make_qparams(x, granularity, qmin, qmax, gen, axis=axis, group_size=group_size)
    s.requires_grad_()
    y = fake_quantize(x, s, z, qmin, qmax, granularity, axis, group_size)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    mask = ref.ste_mask(x.detach(), s.detach(), z, qmin, qmax, granularity, axis, group_size)
    assert torch.equal(gx, torch.where(mask, g, torch.zeros_like(g)))
    assert 0 < mask.sum() < mask.numel()  # both branches exercised


def test_ste_double_backward():
    gen = torch.Generator().manual_seed(4)
    x = random_input((40,), torch.float32, 0.1, gen).requires_grad_()
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    g = torch.randn(40, generator=gen, requires_grad=True)
    y = qatx.fake_quantize_per_tensor_affine(x, s, z, -8, 7)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), g)
    mask = ref.ste_mask(x.detach(), s, z, -8, 7)
    assert torch.equal(gg, mask.float())


@pytest.mark.parametrize("make,dense", [
    (lambda x: x.to(memory_format=torch.channels_last), True),
    (lambda x: x.permute(2, 0, 3, 1), True),
    (lambda x: x[:, ::2], False),
    (lambda x: x.transpose(0, 3)[..., 1:], False),
    (lambda x: x[:1].expand(3, *x.shape[1:]), False),
])
def test_layouts_non_contiguous_and_channels_last(make, dense):
    gen = torch.Generator().manual_seed(5)
    base = random_input((2, 6, 5, 7), torch.float32, 0.05, gen)
    x = make(base)
    for axis in range(x.dim()):
        s, z = make_qparams(x, "per_channel", -128, 127, gen, axis=axis)
        xg = x.detach().clone().requires_grad_()
        y = qatx.fake_quantize_per_channel_affine(xg, s, z, axis, -128, 127)
        assert torch.equal(y, torch.fake_quantize_per_channel_affine(x.contiguous(), s, z, axis, -128, 127))
        if dense:
            assert y.stride() == x.stride()  # layout kept: channels-last stays channels-last
        g = torch.randn(y.shape, generator=gen).contiguous()
        y.backward(g)
        mask = ref.ste_mask(x, s, z, -128, 127, "per_channel", axis)
        assert torch.equal(xg.grad, torch.where(mask, g, torch.zeros_like(g)))


def test_empty_and_zero_dim():
    s, z = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    e = torch.empty(0, 4, requires_grad=True)
    y = qatx.fake_quantize_per_tensor_affine(e, s, z, -128, 127)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert e.grad.shape == (0, 4)
    assert qatx.fake_quantize_per_channel_affine(torch.empty(0, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32),
                                                 1, -128, 127).shape == (0, 4)
    x0 = torch.tensor(0.26, requires_grad=True)
    y0 = qatx.fake_quantize_per_tensor_affine(x0, s, z, -128, 127)
    assert y0.shape == () and y0.item() == pytest.approx(0.3)
    y0.backward()
    assert x0.grad.item() == 1.0
    assert qatx.quantize_per_tensor_affine(x0.detach(), s, z, -128, 127, torch.int8).item() == 3


def test_qparams_of_other_dtypes_are_used_as_float32():
    gen = torch.Generator().manual_seed(6)
    x = random_input((50,), torch.float32, 0.1, gen)
    s64 = torch.tensor([0.1], dtype=torch.float64)
    z64 = torch.tensor([3], dtype=torch.int64)
    expected = qatx.fake_quantize_per_tensor_affine(x, s64.float(), z64.int(), -128, 127)
    assert torch.equal(qatx.fake_quantize_per_tensor_affine(x, s64, z64, -128, 127), expected)


def test_no_grad_path_equals_grad_path():
    gen = torch.Generator().manual_seed(8)
    x = random_input((3, 64), torch.float32, 0.05, gen)
    s, z = make_qparams(x, "per_channel", -8, 7, gen)
    with torch.no_grad():
        a = qatx.fake_quantize_per_channel_affine(x.requires_grad_(), s, z, 0, -8, 7)
    b = qatx.fake_quantize_per_channel_affine(x, s, z, 0, -8, 7)
    assert a.grad_fn is None and b.grad_fn is not None
    assert torch.equal(a, b)


# --- TorchScript -------------------------------------------------------------------------------

class FakeQuantNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16) * 0.3)
        self.register_buffer("w_scale", torch.rand(8) * 0.05 + 0.01)
        self.register_buffer("w_zp", torch.zeros(8, dtype=torch.int32))
        self.register_buffer("a_scale", torch.tensor([0.05]))
        self.register_buffer("a_zp", torch.tensor([3], dtype=torch.int32))

    def forward(self, x):
        w = qatx.ops.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zp, 0, -7, 7)
        x = qatx.ops.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zp, -128, 127)
        return torch.nn.functional.linear(x, w)


def test_torchscript_matches_eager_outputs_and_gradients(tmp_path):
    torch.manual_seed(0)
    eager = FakeQuantNet()
    scripted = torch.jit.script(FakeQuantNet())
    scripted.load_state_dict(eager.state_dict())
    x = torch.randn(4, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ye, ys = eager(x), scripted(x2)
    assert torch.equal(ye, ys)
    ye.sum().backward()
    ys.sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(eager.weight.grad, scripted.weight.grad)
    path = tmp_path / "fq.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    assert torch.equal(loaded(x.detach()), ye.detach())


def test_scripted_functions_match_eager():
    f = torch.jit.script(qatx.ops.fake_quantize_per_group_affine)
    gen = torch.Generator().manual_seed(9)
    x = random_input((4, 32), torch.float32, 0.05, gen)
    s, z = make_qparams(x, "per_group", -8, 7, gen, group_size=8)
    assert torch.equal(f(x, s, z, 8, -8, 7), qatx.fake_quantize_per_group_affine(x, s, z, 8, -8, 7))
    dq = torch.jit.script(qatx.ops.dequantize_per_tensor_affine)
    q = torch.tensor([-3, 0, 5], dtype=torch.int8)
    assert dq(q, torch.tensor([0.5]), torch.tensor([1], dtype=torch.int32), None).tolist() == [-2.0, -0.5, 2.0]


# --- torch.compile and opcheck ------------------------------------------------------------------

def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(10)
    x = random_input((8, 3, 6, 6), torch.float32, 0.05, gen)
    s, z = make_qparams(x, "per_channel", -8, 7, gen, axis=1)
    st, zt = torch.tensor([0.03]), torch.tensor([0], dtype=torch.int32)

    def f(x):
        y = qatx.fake_quantize_per_channel_affine(x, s, z, 1, -8, 7)
        return qatx.fake_quantize_per_tensor_affine(y * 2.0, st, zt, -128, 127)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = f(xe), compiled(xc)
    assert torch.equal(ye, yc)
    ye.sum().backward()
    yc.sum().backward()
    assert torch.equal(xe.grad, xc.grad)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(11)
    x = random_input((4, 6, 8), torch.float32, 0.05, gen)
    st, zt = make_qparams(x, "per_tensor", -128, 127, gen)
    sc, zc = make_qparams(x, "per_channel", -128, 127, gen, axis=1)
    sg, zg = make_qparams(x, "per_group", -128, 127, gen, group_size=4)
    q = torch.randint(-128, 128, x.shape, dtype=torch.int8, generator=gen)
    xg = x.clone().requires_grad_()
    ops = torch.ops.qatx
    return [
        (ops.fake_quantize_per_tensor_affine, (xg, st, zt, -128, 127)),
        (ops.fake_quantize_per_channel_affine, (xg, sc, zc, 1, -128, 127)),
        (ops.fake_quantize_per_group_affine, (xg, sg, zg, 4, -128, 127)),
        (ops.fake_quantize_per_channel_affine, (x.to(memory_format=torch.contiguous_format).transpose(0, 2), sc, zc, 1, -128, 127)),
        (ops._fake_quantize_per_tensor_affine_with_mask, (x, st, zt, -128, 127)),
        (ops._fake_quantize_ste_backward, (x, torch.randint(0, 256, (24,), dtype=torch.uint8, generator=gen))),
        (ops.quantize_per_tensor_affine, (x, st, zt, -128, 127, torch.int8)),
        (ops.quantize_per_channel_affine, (x, sc, zc, 1, -128, 127, torch.int8)),
        (ops.quantize_per_group_affine, (x, sg, zg, 4, -128, 127, torch.int8)),
        (ops.dequantize_per_tensor_affine, (q, st, zt, None)),
        (ops.dequantize_per_channel_affine, (q, sc, zc, 1, torch.float16)),
        (ops.dequantize_per_group_affine, (q, sg, zg, 4, None)),
    ]


@pytest.mark.parametrize("index", range(12))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


# --- errors ---------------------------------------------------------------------------------------

def _qp(n=1):
    return torch.full((n,), 0.1), torch.zeros(n, dtype=torch.int32)


ERROR_CASES = [
    ("quant_min", lambda x: qatx.fake_quantize_per_tensor_affine(x, *_qp(), 5, 5)),
    ("quant_min", lambda x: qatx.fake_quantize_per_tensor_affine(x, *_qp(), 10, -10)),
    (r"\[-32768, 32767\]", lambda x: qatx.fake_quantize_per_tensor_affine(x, *_qp(), -40000, 10)),
    (r"\[-32768, 32767\]", lambda x: qatx.fake_quantize_per_tensor_affine(x, *_qp(), 0, 65535)),
    ("scale", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([0.0]), _qp()[1], -128, 127)),
    ("scale", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([-0.1]), _qp()[1], -128, 127)),
    ("scale", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([float("nan")]), _qp()[1], -128, 127)),
    ("scale", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([float("inf")]), _qp()[1], -128, 127)),
    ("scale", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([1e-40]), _qp()[1], -128, 127)),
    ("zero_point", lambda x: qatx.fake_quantize_per_tensor_affine(x, _qp()[0], torch.tensor([200], dtype=torch.int32), -128, 127)),
    ("zero_point", lambda x: qatx.fake_quantize_per_tensor_affine(x, _qp()[0], torch.tensor([-1], dtype=torch.int32), 0, 255)),
    ("zero_point must have an integer dtype", lambda x: qatx.fake_quantize_per_tensor_affine(x, _qp()[0], torch.tensor([0.0]), -128, 127)),
    ("scale must have a floating dtype", lambda x: qatx.fake_quantize_per_tensor_affine(x, torch.tensor([1]), _qp()[1], -128, 127)),
    ("one element", lambda x: qatx.fake_quantize_per_tensor_affine(x, *_qp(2), -128, 127)),
    ("axis=4", lambda x: qatx.fake_quantize_per_channel_affine(x, *_qp(3), 4, -128, 127)),
    ("axis=-5", lambda x: qatx.fake_quantize_per_channel_affine(x, *_qp(3), -5, -128, 127)),
    (r"shape \[5\]", lambda x: qatx.fake_quantize_per_channel_affine(x, *_qp(3), 1, -128, 127)),
    ("same shape", lambda x: qatx.fake_quantize_per_channel_affine(x, _qp(5)[0], _qp(4)[1], 1, -128, 127)),
    ("group_size=5 must divide", lambda x: qatx.fake_quantize_per_group_affine(x, *_qp(1), 5, -128, 127)),
    ("group_size=0", lambda x: qatx.fake_quantize_per_group_affine(x, *_qp(1), 0, -128, 127)),
    ("per-group scale", lambda x: qatx.fake_quantize_per_group_affine(x, torch.full((3, 5, 1), 0.1), torch.zeros(3, 5, 1, dtype=torch.int32), 1, -128, 127)),
    ("input must be float32", lambda x: qatx.fake_quantize_per_tensor_affine(x.int(), *_qp(), -128, 127)),
    ("input must be float32", lambda x: qatx.quantize_per_tensor_affine(x.double(), *_qp(), -128, 127, torch.int8)),
    ("dtype torch.int8", lambda x: qatx.quantize_per_tensor_affine(x, *_qp(), -128, 200, torch.int8)),
    ("dtype must be", lambda x: qatx.quantize_per_tensor_affine(x, *_qp(), -128, 127, torch.int64)),
    ("input must be torch.int8, torch.uint8, torch.int16 or torch.int32", lambda x: qatx.dequantize_per_tensor_affine(x, *_qp())),
    ("output_dtype", lambda x: qatx.dequantize_per_tensor_affine(x.to(torch.int8), *_qp(), torch.float64)),
    ("scale", lambda x: qatx.dequantize_per_tensor_affine(x.to(torch.int8), torch.tensor([0.0]), _qp()[1])),
    ("mask must have", lambda x: torch.ops.qatx._fake_quantize_ste_backward(x, torch.zeros(3, dtype=torch.uint8))),
    ("0-dim", lambda x: qatx.fake_quantize_per_channel_affine(torch.tensor(1.0), *_qp(1), 0, -128, 127)),
]


@pytest.mark.parametrize("pattern,call", ERROR_CASES)
def test_bad_arguments_raise_clear_errors(pattern, call):
    x = torch.randn(3, 5, 6, 2)
    with pytest.raises(RuntimeError, match=pattern):
        call(x)


def test_error_on_mixed_devices_is_clear():
    if not torch.cuda.is_available():
        x = torch.randn(3, device="meta")
        with pytest.raises(RuntimeError, match="scale must be on the input's device"):
            qatx.fake_quantize_per_tensor_affine(x, *_qp(), -128, 127)
    else:
        with pytest.raises(RuntimeError, match="must be on the input's device"):
            qatx.fake_quantize_per_tensor_affine(torch.randn(3, device="cuda"), *_qp(), -128, 127)


def test_meta_tensors_give_shapes_and_strides():
    x = torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last)
    s, z = torch.empty(3, device="meta"), torch.empty(3, dtype=torch.int32, device="meta")
    y, mask = torch.ops.qatx._fake_quantize_per_channel_affine_with_mask(x, s, z, 1, -128, 127)
    assert y.shape == x.shape and y.stride() == x.stride() and y.device.type == "meta"
    assert mask.shape == (15,) and mask.dtype == torch.uint8


# --- CUDA ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity,axis,group_size", GRANULARITY_CASES)
def test_cuda_matches_cpu_bit_for_bit(granularity, axis, group_size, dtype):
    gen = torch.Generator().manual_seed(12)
    qmin, qmax = quant_range(4, True)
    for shape in [(5, 7, 24), (33, 3, 48), (1, 1, 12)]:
        x = random_input(shape, dtype, 0.05, gen)
        s, z = make_qparams(x, granularity, qmin, qmax, gen, axis=axis, group_size=group_size)
        xc = x.cuda().requires_grad_()
        xh = x.clone().requires_grad_()
        yc = fake_quantize(xc, s.cuda(), z.cuda(), qmin, qmax, granularity, axis, group_size)
        yh = fake_quantize(xh, s, z, qmin, qmax, granularity, axis, group_size)
        assert torch.equal(yc.cpu(), yh)
        g = torch.randn(yh.shape, generator=gen).to(dtype)
        yc.backward(g.cuda())
        yh.backward(g)
        assert torch.equal(xc.grad.cpu(), xh.grad)
        for int_dtype in INT_DTYPES:
            lo, hi = INT_DTYPES[int_dtype]
            lo, hi = max(lo, qmin), min(hi, qmax) if int_dtype != torch.uint8 else (0, 15)
            s2, z2 = make_qparams(x, granularity, lo, hi, gen, axis=axis, group_size=group_size)
            qc = quantize(x.cuda(), s2.cuda(), z2.cuda(), lo, hi, int_dtype, granularity, axis, group_size)
            qh = quantize(x, s2, z2, lo, hi, int_dtype, granularity, axis, group_size)
            assert torch.equal(qc.cpu(), qh)
            assert torch.equal(dequantize(qc, s2.cuda(), z2.cuda(), granularity, axis, group_size).cpu(),
                               dequantize(qh, s2, z2, granularity, axis, group_size))


@cuda
@pytest.mark.cuda
def test_cuda_large_tensor_channels_last_and_unaligned():
    gen = torch.Generator().manual_seed(13)
    x = random_input((8, 32, 33, 35), torch.float32, 0.05, gen)
    s, z = make_qparams(x, "per_channel", -128, 127, gen, axis=1)
    xc = x.cuda().to(memory_format=torch.channels_last)
    y = qatx.fake_quantize_per_channel_affine(xc, s.cuda(), z.cuda(), 1, -128, 127)
    assert y.stride() == xc.stride()
    assert torch.equal(y.cpu(), torch.fake_quantize_per_channel_affine(x, s, z, 1, -128, 127))
    flat = x.reshape(-1)[3:].cuda()  # storage offset breaks 16-byte alignment
    st, zt = torch.tensor([0.05]), torch.tensor([1], dtype=torch.int32)
    assert torch.equal(qatx.fake_quantize_per_tensor_affine(flat, st.cuda(), zt.cuda(), -128, 127).cpu(),
                       torch.fake_quantize_per_tensor_affine(x.reshape(-1)[3:], st, zt, -128, 127))


@cuda
@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    for op, args in _opcheck_cases():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
