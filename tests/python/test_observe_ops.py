"""The fused observe + fake-quantize ops (qatx::observe_fake_quantize_*_affine, qatx::_observe_min_max)
and FakeQuantize's use of them: bit-for-bit equality with the observer, calculate_qparams and the
affine fake-quantize ops they fuse (outputs, gradients, statistics, qparams, state_dict),
TorchScript, torch.compile, opcheck and every documented error."""
import io

import pytest
import torch

import qatx
from qatx.observers import MinMaxObserver, calculate_qparams

ops = torch.ops.qatx
INF = float("inf")
GRANULARITIES = [("per_tensor", {}), ("per_channel", {"axis": 1}), ("per_channel", {"axis": 0}),
                 ("per_channel", {"axis": -1}), ("per_group", {"group_size": 4})]
RANGES = [(-128, 127, True), (-128, 127, False), (0, 255, False), (0, 255, True), (-127, 127, True), (1, 15, False),
          (-8, 7, False), (-2, 1, True), (-32768, 32767, False)]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batches(shape, n, gen, dtype=torch.float32, device="cpu", nonfinite=True):
    """Batches whose ranges drift, with NaN / +-Inf sprinkled in (observers read them as 0)."""
    out = []
    for k in range(n):
        x = torch.randn(shape, generator=gen) * (0.5 + k) + 0.3 * k
        if nonfinite:
            x.view(-1)[torch.randint(0, x.numel(), (3,), generator=gen)] = torch.tensor([float("nan"), INF, -INF])
        out.append(x.to(dtype).to(device))
    return out


def reference_forward(fq, x):
    """The unfused FakeQuantize forward: observer, calculate_qparams, affine fake-quantize."""
    fq.observer(x)
    fq.scale, fq.zero_point = fq.observer.calculate_qparams(fq.quant_min, fq.quant_max, fq.symmetric)
    if fq.granularity == "per_tensor":
        return ops.fake_quantize_per_tensor_affine(x, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max)
    if fq.granularity == "per_channel":
        return ops.fake_quantize_per_channel_affine(x, fq.scale, fq.zero_point, fq.axis, fq.quant_min, fq.quant_max)
    return ops.fake_quantize_per_group_affine(x, fq.scale, fq.zero_point, fq.group_size, fq.quant_min, fq.quant_max)


def same(a, b):
    """Bit-equal values, NaN where the other has NaN."""
    return a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


def run_both(make, xs):
    """Trains a fused and a reference FakeQuantize on the same batches; returns both and checks
    outputs and input gradients bit for bit at every step."""
    fused, ref = make(), make()
    for x in xs:
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yr = fused(xf), reference_forward(ref, xr)
        assert same(yf, yr)
        g = torch.randn(yf.shape, generator=torch.Generator().manual_seed(1)).to(yf)
        yf.backward(g)
        yr.backward(g)
        assert torch.equal(xf.grad, xr.grad)
        assert_same_state(fused, ref)
    return fused, ref


@pytest.mark.parametrize("granularity,kw", GRANULARITIES)
@pytest.mark.parametrize("averaging_constant", [None, 0.01, 1.0])
@pytest.mark.parametrize("qmin,qmax,symmetric", RANGES[:4])
def test_fake_quantize_module_fused_equals_unfused(granularity, kw, averaging_constant, qmin, qmax, symmetric):
    bits = 8
    signed = qmin < 0

    def make():
        return qatx.FakeQuantize(bits=bits, signed=signed, symmetric=symmetric, granularity=granularity,
                                 averaging_constant=averaging_constant, **kw)
    gen = torch.Generator().manual_seed(0)
    run_both(make, batches((6, 5, 8), 4, gen))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_reduced_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    for granularity, kw in GRANULARITIES:
        run_both(lambda: qatx.FakeQuantize(bits=8, signed=False, symmetric=False, granularity=granularity,
                                           averaging_constant=0.1, **kw), batches((4, 3, 8), 3, gen, dtype))


def test_fused_path_is_taken_and_layouts():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 6, generator=gen).to(memory_format=torch.channels_last)
    fq = qatx.FakeQuantize(bits=8, signed=False, symmetric=False, averaging_constant=0.01)
    fq(x)  # the first batch sets the range through the observer
    with torch.profiler.profile() as prof:
        fq(x * 2)
    names = {e.name for e in prof.events()}
    assert "qatx::observe_fake_quantize_per_tensor_affine" in names and "aten::aminmax" not in names
    for granularity, kw in [("per_channel", {"axis": 1}), ("per_channel", {"axis": 3}), ("per_tensor", {})]:
        run_both(lambda: qatx.FakeQuantize(bits=4, signed=True, granularity=granularity, **kw),
                 [x, x * 3 - 1, x.permute(0, 2, 1, 3)] if granularity == "per_tensor" else [x, x * 3 - 1])


def test_shape_change_falls_back_to_the_observer():
    gen = torch.Generator().manual_seed(3)
    make = lambda: qatx.FakeQuantize(granularity="per_channel", axis=0, averaging_constant=0.5)  # noqa: E731
    run_both(make, [torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen),
                    torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)])


def test_toggles_and_state_dict_resume():
    gen = torch.Generator().manual_seed(4)
    xs = batches((8, 16), 6, gen)
    make = lambda: qatx.FakeQuantize(bits=8, signed=False, symmetric=False, averaging_constant=0.1)  # noqa: E731
    fused, ref = run_both(make, xs[:3])
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for x in xs[3:]:
        assert same(resumed(x), reference_forward(ref, x))
        assert_same_state(resumed, ref)
    resumed.disable_observer()
    ref.disable_observer()
    assert same(resumed(xs[0]), ref(xs[0]))
    assert_same_state(resumed, ref)


def test_torchscript_fused_module():
    gen = torch.Generator().manual_seed(5)
    xs = batches((4, 8), 4, gen)
    eager = qatx.FakeQuantize(granularity="per_channel", axis=1, averaging_constant=0.2)
    scripted = torch.jit.script(qatx.FakeQuantize(granularity="per_channel", axis=1, averaging_constant=0.2))
    for x in xs:
        assert same(scripted(x), eager(x))
    assert torch.equal(scripted.scale, eager.scale) and torch.equal(scripted.observer.min_val, eager.observer.min_val)


@pytest.mark.parametrize("granularity,kw", GRANULARITIES[:2] + GRANULARITIES[-1:])
def test_qparams_bit_identical_to_calculate_qparams(granularity, kw):
    """An unset range takes the batch as is (averaging_constant 1 too), so the written qparams are
    calculate_qparams of the batch range, for many ranges and integer ranges."""
    gen = torch.Generator().manual_seed(6)
    for qmin, qmax, symmetric in RANGES:
        for shape, mult in [((5, 7, 8), 1.0), ((3, 4, 8), 1e-30), ((2, 2, 4), 1e30), ((9, 3, 4), 0.0)]:
            x = (torch.randn(shape, generator=gen) * mult + torch.rand(1, generator=gen) * mult)
            obs = MinMaxObserver(granularity, group_size=kw.get("group_size", 0), axis=kw.get("axis", 0))
            obs(x)
            s_ref, z_ref = calculate_qparams(obs.min_val, obs.max_val, qmin, qmax, symmetric)
            lo, hi = torch.full_like(obs.min_val, INF), torch.full_like(obs.max_val, -INF)
            s, z = torch.empty_like(s_ref), torch.empty_like(z_ref)
            for c in (-1.0, 1.0, 0.3):
                lo.fill_(INF), hi.fill_(-INF)
                ops._observe_min_max(x, lo, hi, s, z, kw.get("axis"), kw.get("group_size", 0), c, qmin, qmax,
                                     symmetric)
                assert torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val)
                assert torch.equal(s, s_ref) and torch.equal(z, z_ref), (qmin, qmax, symmetric, mult)


def test_running_range_updates_match_the_observer():
    gen = torch.Generator().manual_seed(7)
    for c in (None, 0.01, 0.37, 1.0):
        obs = MinMaxObserver("per_channel", axis=0, averaging_constant=c)
        xs = batches((33, 70), 5, gen)
        obs(xs[0])
        lo, hi = obs.min_val.clone(), obs.max_val.clone()
        s, z = torch.empty(33), torch.empty(33, dtype=torch.int32)
        for x in xs[1:]:
            obs(x)
            ops._observe_min_max(x, lo, hi, s, z, 0, 0, -1.0 if c is None else c, 0, 255, False)
            assert torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val)


def test_nonfinite_only_and_large_inputs():
    for x in [torch.full((10,), float("nan")), torch.tensor([INF, -INF]), torch.zeros(3)]:
        lo, hi, s, z = torch.full((1,), INF), torch.full((1,), -INF), torch.empty(1), torch.empty(1, dtype=torch.int32)
        y = ops.observe_fake_quantize_per_tensor_affine(x, lo, hi, s, z, -1.0, 0, 255, False)
        assert lo.item() == 0.0 and hi.item() == 0.0 and s.item() == torch.finfo(torch.float32).eps and z.item() == 0
        assert same(y, ops.fake_quantize_per_tensor_affine(x, s, z, 0, 255))
    # several parallel chunks, and per-channel with long runs
    gen = torch.Generator().manual_seed(8)
    for granularity, kw, shape in [("per_tensor", {}, (3, 100_003)), ("per_channel", {"axis": 0}, (3, 70_001)),
                                   ("per_channel", {"axis": 1}, (70_001, 3))]:
        run_both(lambda: qatx.FakeQuantize(granularity=granularity, **kw), batches(shape, 2, gen))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    xs = batches((4, 6), 3, gen, nonfinite=False)

    def f(x, lo, hi, s, z):
        return ops.observe_fake_quantize_per_channel_affine(x, lo, hi, s, z, 1, 0.1, 0, 255, False) * 2

    state_e = [torch.full((6,), INF), torch.full((6,), -INF), torch.empty(6), torch.empty(6, dtype=torch.int32)]
    state_c = [t.clone() for t in state_e]
    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x in xs:
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = f(xe, *state_e), fc(xc, *state_c)
        ye.sum().backward()
        yc.sum().backward()
        assert torch.equal(ye, yc) and torch.equal(xe.grad, xc.grad)
        assert all(torch.equal(a, b) for a, b in zip(state_e, state_c))


def _opcheck_cases():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 6, 8, generator=gen)
    xg = x.clone().requires_grad_()

    def state(shape):
        return (torch.full(shape, INF), torch.full(shape, -INF), torch.empty(shape), torch.empty(shape, dtype=torch.int32))
    return [
        (ops.observe_fake_quantize_per_tensor_affine, (xg, *state((1,)), 0.1, 0, 255, False)),
        (ops.observe_fake_quantize_per_channel_affine, (xg, *state((6,)), 1, -1.0, -128, 127, True)),
        (ops.observe_fake_quantize_per_group_affine, (xg, *state((4, 6, 2)), 4, 1.0, -8, 7, False)),
        (ops._observe_min_max, (x, *state((6,)), 1, 0, 0.5, 0, 255, True)),
        (ops._observe_min_max, (x, *state((1,)), None, 0, -1.0, 0, 255, False)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_errors():
    x = torch.randn(4, 6)

    def st(shape=(1,), dtype=torch.float32, zdtype=torch.int32):
        return [torch.full(shape, INF, dtype=dtype), torch.full(shape, -INF, dtype=dtype),
                torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=zdtype)]
    pt = ops.observe_fake_quantize_per_tensor_affine
    for c in (0.0, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match="averaging_constant=.* must be in \\(0, 1\\]"):
            pt(x, *st(), c, 0, 255, False)
    with pytest.raises(RuntimeError, match="quant_min=5 must be smaller than quant_max=5"):
        pt(x, *st(), -1.0, 5, 5, False)
    with pytest.raises(RuntimeError, match="input must be float32, float16 or bfloat16"):
        pt(x.double(), *st(), -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="the input is empty"):
        pt(torch.empty(0, 3), *st(), -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="scale must be torch.float32 and zero_point torch.int32"):
        pt(x, *st(zdtype=torch.int64), -1.0, 0, 255, False)
    bad = st()
    bad[0] = torch.zeros(2)
    with pytest.raises(RuntimeError, match="min_val and max_val must be torch.float32 on the input's device with"):
        pt(x, *bad, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="per-channel scale and zero_point must have shape \\[6\\]"):
        ops.observe_fake_quantize_per_channel_affine(x, *st((4,)), 1, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="axis=2 is out of range"):
        ops.observe_fake_quantize_per_channel_affine(x, *st((4,)), 2, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="group_size=4 must divide the last dimension"):
        ops.observe_fake_quantize_per_group_affine(x, *st((4, 1)), 4, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="group_size=0 must be at least 1"):
        ops.observe_fake_quantize_per_group_affine(x, *st((4, 1)), 0, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="give either axis"):
        ops._observe_min_max(x, *st((4, 3)), 0, 2, -1.0, 0, 255, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops._observe_min_max(x, *[t.expand(6) for t in st((1,))], 1, 0, -1.0, 0, 255, False)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("granularity,kw", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_equals_unfused(granularity, kw, dtype):
    gen = torch.Generator().manual_seed(11)
    for qmin, qmax, symmetric in RANGES[:4]:
        for c in (None, 0.01):
            run_both(lambda: qatx.FakeQuantize(bits=8, signed=qmin < 0, symmetric=symmetric, granularity=granularity,
                                               averaging_constant=c, **kw).cuda(),
                     batches((6, 5, 8), 3, gen, dtype, "cuda") + batches((64, 40, 36), 2, gen, dtype, "cuda"))


@pytest.mark.cuda
@cuda
def test_cuda_qparams_bit_identical_and_no_sync():
    gen = torch.Generator().manual_seed(12)
    for qmin, qmax, symmetric in RANGES:
        x = torch.randn(7, 9, 8, generator=gen).cuda()
        obs = MinMaxObserver("per_channel", axis=1).cuda()
        obs(x)
        s_ref, z_ref = calculate_qparams(obs.min_val, obs.max_val, qmin, qmax, symmetric)
        lo, hi = torch.full_like(obs.min_val, INF), torch.full_like(obs.max_val, -INF)
        s, z = torch.empty_like(s_ref), torch.empty_like(z_ref)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.observe_fake_quantize_per_channel_affine(x, lo, hi, s, z, 1, 1.0, qmin, qmax, symmetric)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
