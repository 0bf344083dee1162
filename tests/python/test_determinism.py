"""Determinism: outputs and gradients identical bit for bit across repeated runs and across 1 vs 2
CPU threads (``torch.set_num_threads``), for the ops with a backward or a reduction and for the
training steps of prepared QAT models; on CUDA across repeated runs.

The learnable ops' backward passes (LSQ, LSQ+, PACT: the only qatx reductions) are covered per
granularity in test_lsq_ops.py (``test_backward_is_deterministic_across_runs_and_thread_counts``);
this file covers the affine ops' forward and STE backward, the observers' ranges, the quantizer
modules and whole QAT training steps. Tensors are large enough (2**17+ elements) that
``at::parallel_for`` splits them between threads.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bits(t):
    """The raw bits of a tensor (NaN payloads and -0.0 included), as integers."""
    t = t.detach().contiguous()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view) if t.dtype != torch.bool else t


def assert_bits_equal(a, b, what=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_bits_equal(a[k], b[k], f"{what}.{k}")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bits_equal(x, y, f"{what}[{i}]")
        return
    if a is None or not isinstance(a, torch.Tensor):
        assert a == b, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), f"{what}: results differ"


def with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def check_runs_and_threads(fn, repeats=2):
    """fn() with 1 thread, repeated, and with 2 threads: all bit-identical."""
    first = with_threads(1, fn)
    for _ in range(repeats - 1):
        assert_bits_equal(with_threads(1, fn), first, "1 thread, repeated")
    assert_bits_equal(with_threads(2, fn), first, "2 threads vs 1")
    return first


def affine_case(name, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 48, 7, 7, generator=gen) * 3).to(dtype)
    x.view(-1)[::97] = float("nan")
    x.view(-1)[::89] = float("inf")
    g = torch.randn(x.shape, generator=gen).to(dtype)
    if name == "per_tensor":
        s, z, extra = torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32), ()
        fn = qatx.fake_quantize_per_tensor_affine
    elif name in ("per_channel", "channels_last"):
        s = torch.rand(48, generator=gen) * 0.1 + 0.01
        z = torch.randint(-5, 5, (48,), generator=gen, dtype=torch.int32)
        extra, fn = (1,), qatx.fake_quantize_per_channel_affine
        if name == "channels_last":
            x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    else:
        s = torch.rand(64, 48, 7, 1, generator=gen) * 0.1 + 0.01
        z = torch.randint(-5, 5, (64, 48, 7, 1), generator=gen, dtype=torch.int32)
        extra, fn = (7,), qatx.fake_quantize_per_group_affine
    return [t.to(device) for t in (x, g, s, z)], extra, fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["per_tensor", "per_channel", "channels_last", "per_group"])
def test_affine_fake_quantize_forward_and_ste_backward(name, dtype):
    (x, g, s, z), extra, fn = affine_case(name, dtype)

    def run():
        xr = x.clone().requires_grad_()
        y = fn(xr, s, z, *extra, -128, 127)
        y.backward(g)
        return y, xr.grad

    check_runs_and_threads(run)


@pytest.mark.parametrize("name", ["per_tensor", "per_channel", "per_group"])
def test_quantize_and_dequantize(name):
    (x, _, s, z), extra, _ = affine_case(name, torch.float32)
    x = torch.nan_to_num(x)
    q_fn = getattr(qatx, f"quantize_{name}_affine")
    dq_fn = getattr(qatx, f"dequantize_{name}_affine")

    def run():
        q = q_fn(x, s, z, *extra, -128, 127, torch.int8)
        return q, dq_fn(q, s, z, *extra, torch.bfloat16)

    check_runs_and_threads(run)


@pytest.mark.parametrize("granularity,axis,group_size", [("per_tensor", 0, 0), ("per_channel", 1, 0),
                                                         ("per_group", 0, 7)])
@pytest.mark.parametrize("averaging_constant", [None, 0.01])
def test_observer_ranges_and_qparams(granularity, axis, group_size, averaging_constant):
    (x, _, _, _), _, _ = affine_case("per_tensor", torch.float32)

    def run():
        obs = qatx.MinMaxObserver(granularity, axis, group_size, averaging_constant)
        for k in range(3):
            obs(x * (1 + k))
        return obs.min_val, obs.max_val, obs.calculate_qparams(0, 255, False)

    check_runs_and_threads(run)


@pytest.mark.parametrize("kind", ["fake", "lsq", "lsq+", "pact"])
def test_quantizer_modules_forward_backward(kind):
    (x, g, _, _), _, _ = affine_case("per_channel", torch.float32)
    x, g = torch.nan_to_num(x, posinf=9.0), g

    def make():
        if kind == "fake":
            return qatx.FakeQuantize(granularity="per_channel", axis=1, averaging_constant=0.1)
        if kind == "pact":
            return qatx.PACT(bits=4, alpha=3.0)
        return qatx.LearnableFakeQuantize(bits=4, learn_zero_point=kind == "lsq+", granularity="per_channel", axis=1,
                                          num_scales=48, signed=kind == "lsq", init="lsq" if kind == "lsq" else "minmax")

    def run():
        mod = make()
        out = []
        for _ in range(2):
            xr = x.clone().requires_grad_()
            y = mod(xr)
            y.backward(g)
            out += [y, xr.grad] + [p.grad.clone() for p in mod.parameters()] + list(mod.buffers())
        return out

    check_runs_and_threads(run)


# --- whole QAT training steps -----------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.add = qatx.nn.QuantAdd()

    def forward(self, x):
        return torch.relu(self.add(x, self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train_steps(model, steps, batch, device="cpu", opt_name="sgd"):
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(batch, 3, 12, 12, generator=gen).to(device),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(steps)]
    model = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for x, t in data:
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, model.state_dict()


@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ", "W4A8"])
def test_qat_training_steps_across_runs_and_threads(preset):
    """Three SGD steps of a prepared Conv-BN-ReLU + residual CNN: losses, every parameter, BN
    statistic, observer range and learned scale identical with 1 and 2 threads and when repeated."""
    model = qatx.prepare_qat(small_cnn(), getattr(qatx.presets, preset))
    check_runs_and_threads(lambda: train_steps(model, 3, 16))


def test_float_training_step_is_deterministic_too():
    """The float model itself trains deterministically on this CPU: the QAT tests above measure qatx,
    not a nondeterministic torch kernel."""
    check_runs_and_threads(lambda: train_steps(small_cnn(), 2, 16))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["per_tensor", "per_channel", "channels_last", "per_group"])
def test_cuda_affine_runs_are_identical(name):
    (x, g, s, z), extra, fn = affine_case(name, torch.float32, "cuda")

    def run():
        xr = x.clone().requires_grad_()
        y = fn(xr, s, z, *extra, -128, 127)
        y.backward(g)
        torch.cuda.synchronize()
        return y, xr.grad

    first = run()
    for _ in range(3):
        assert_bits_equal(run(), first, "CUDA repeated")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lsq", "lsq+", "pact"])
def test_cuda_learnable_backward_runs_are_identical(kind):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(256, 1024, generator=gen) * 2).cuda()
    g = torch.randn(x.shape, generator=gen).cuda()

    def run():
        xr = x.clone().requires_grad_()
        if kind == "pact":
            a = torch.tensor([1.5], device="cuda", requires_grad=True)
            qatx.fake_quantize_pact(xr, a, 4, True).backward(g)
            return xr.grad, a.grad
        s = torch.full((256,), 0.1, device="cuda", requires_grad=True)
        z = torch.zeros(256, device="cuda", requires_grad=kind == "lsq+")
        qatx.fake_quantize_lsq(xr, s, z, 0, -8, 7, 0.01).backward(g)
        return xr.grad, s.grad, z.grad

    first = run()
    for _ in range(3):
        assert_bits_equal(run(), first, "CUDA repeated")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
def test_cuda_qat_training_runs_are_identical(preset):
    """Repeated CUDA training runs of the prepared CNN match bit for bit (cuDNN in deterministic mode,
    so that only qatx's own determinism is under test)."""
    model = qatx.prepare_qat(small_cnn(), getattr(qatx.presets, preset))
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        first = train_steps(model, 3, 16, "cuda")
        assert_bits_equal(train_steps(model, 3, 16, "cuda"), first, "CUDA repeated")
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old
