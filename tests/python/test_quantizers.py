"""Observers and fake-quantizer modules through the public API: qparam formulas, observer
statistics, toggles, state_dict round trips, TorchScript, LSQ/LSQ+/PACT modules."""
import copy
import io
import math

import pytest
import torch

import qatx
from qatx.observers import calculate_qparams, quant_range


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, True, narrow_range=True) == (-127, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(4, False, narrow_range=True) == (1, 15)
    assert quant_range(2, True) == (-2, 1)
    assert quant_range(16, True) == (-32768, 32767)
    for bad in (1, 17, 0, 8.0, True):
        with pytest.raises(ValueError, match="bits must be an integer in \\[2, 16\\]"):
            quant_range(bad, True)


def test_calculate_qparams_formulas():
    lo, hi = torch.tensor([-1.0, 0.5, -3.0]), torch.tensor([2.0, 4.0, -1.0])
    s, z = calculate_qparams(lo, hi, -128, 127, symmetric=True)
    assert torch.equal(s, torch.tensor([2.0, 4.0, 3.0]) / 127) and z.tolist() == [0, 0, 0] and z.dtype == torch.int32
    s, z = calculate_qparams(lo, hi, 0, 255, symmetric=True)
    assert torch.equal(s, torch.tensor([2.0, 4.0, 3.0]) / 127) and z.tolist() == [128, 128, 128]
    s, z = calculate_qparams(lo, hi, 0, 255, symmetric=False)
    # the range is widened to contain 0: [-1, 2], [0, 4], [-3, 0]
    assert torch.equal(s, torch.tensor([3.0, 4.0, 3.0]) / 255)
    assert z.tolist() == [85, 0, 255]
    s, z = calculate_qparams(torch.zeros(1), torch.zeros(1), -8, 7, symmetric=False)
    assert s.item() == torch.finfo(torch.float32).eps and z.item() == -8  # zero range: eps, never 0 or NaN


def test_observer_statistics_per_granularity():
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 6, 8, generator=gen), torch.randn(4, 6, 8, generator=gen) * 3
    obs = qatx.MinMaxObserver()
    obs(x1)
    obs(x2)
    cat = torch.cat([x1, x2])
    assert obs.min_val.item() == cat.min().item() and obs.max_val.item() == cat.max().item()
    ch = qatx.MinMaxObserver("per_channel", axis=1)
    ch(x1)
    assert torch.equal(ch.min_val, x1.amin(dim=(0, 2))) and torch.equal(ch.max_val, x1.amax(dim=(0, 2)))
    gr = qatx.MinMaxObserver("per_group", group_size=4)
    gr(x1)
    assert torch.equal(gr.max_val, x1.reshape(4, 6, 2, 4).amax(-1)) and gr.min_val.shape == (4, 6, 2)
    ma = qatx.MinMaxObserver(averaging_constant=0.25)
    ma(x1)
    ma(x2)
    assert ma.max_val.item() == pytest.approx(x1.max().item() + 0.25 * (x2.max().item() - x1.max().item()), rel=1e-6)


def test_observer_ignores_non_finite_values():
    obs = qatx.MinMaxObserver()
    obs(torch.tensor([1.0, float("nan"), -2.0, float("inf"), -float("inf")]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 1.0
    s, _ = obs.calculate_qparams(-128, 127, True)
    assert torch.isfinite(s).all()


def test_observer_errors():
    with pytest.raises(ValueError, match="granularity"):
        qatx.MinMaxObserver("per_row")
    with pytest.raises(ValueError, match="group_size"):
        qatx.MinMaxObserver("per_group", group_size=0)
    with pytest.raises(ValueError, match="averaging_constant"):
        qatx.MinMaxObserver(averaging_constant=1.5)
    with pytest.raises(RuntimeError, match="not seen any data"):
        qatx.MinMaxObserver().calculate_qparams(-128, 127, True)
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        qatx.MinMaxObserver("per_group", group_size=5)(torch.randn(3, 8))


@pytest.mark.parametrize("granularity,kwargs", [("per_tensor", {}), ("per_channel", {"axis": 1}),
                                                ("per_group", {"group_size": 4})])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_module_equals_op_with_observed_qparams(granularity, kwargs, symmetric):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 8, generator=gen, requires_grad=True)
    fq = qatx.FakeQuantize(bits=4, signed=symmetric, symmetric=symmetric, granularity=granularity, **kwargs)
    y = fq(x)
    obs = qatx.MinMaxObserver(granularity, **kwargs)
    obs(x)
    s, z = obs.calculate_qparams(fq.quant_min, fq.quant_max, symmetric)
    assert torch.equal(fq.scale, s) and torch.equal(fq.zero_point, z)
    if granularity == "per_tensor":
        expected = qatx.fake_quantize_per_tensor_affine(x, s, z, fq.quant_min, fq.quant_max)
    elif granularity == "per_channel":
        expected = qatx.fake_quantize_per_channel_affine(x, s, z, 1, fq.quant_min, fq.quant_max)
    else:
        expected = qatx.fake_quantize_per_group_affine(x, s, z, 4, fq.quant_min, fq.quant_max)
    assert torch.equal(y, expected)
    y.sum().backward()
    assert x.grad is not None and (x.grad == 1).any()


def test_fake_quantize_toggles_and_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, generator=gen)
    fq = qatx.FakeQuantize(bits=8, granularity="per_channel", axis=0)
    fq(x)
    fq.disable_observer()
    frozen = fq.scale.clone()
    fq(x * 10)
    assert torch.equal(fq.scale, frozen)  # observer off: qparams frozen
    fq.disable_fake_quant()
    assert torch.equal(fq(x), x)  # fake quant off: identity
    fq.enable_fake_quant()
    buffer = io.BytesIO()
    torch.save(fq.state_dict(), buffer)
    buffer.seek(0)
    fresh = qatx.FakeQuantize(bits=8, granularity="per_channel", axis=0)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.observer_enabled is False and fresh.fake_quant_enabled is True
    assert torch.equal(fresh(x * 3), fq(x * 3))
    assert "bits=8" in repr(fq) and "per_channel" in repr(fq) and "axis=0" in repr(fq)


def test_fake_quantize_scripted_matches_eager():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen)
    eager = qatx.FakeQuantize(bits=6, symmetric=False, signed=False, averaging_constant=0.1)
    scripted = torch.jit.script(qatx.FakeQuantize(bits=6, symmetric=False, signed=False, averaging_constant=0.1))
    for k in range(3):
        xe = (x * (k + 1)).requires_grad_()
        xs = xe.detach().clone().requires_grad_()
        ye, ys = eager(xe), scripted(xs)
        assert torch.equal(ye, ys)
        ye.sum().backward()
        ys.sum().backward()
        assert torch.equal(xe.grad, xs.grad)
    scripted.disable_fake_quant()
    assert torch.equal(scripted(x), x)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="bits"):
        qatx.FakeQuantize(bits=1)
    with pytest.raises(ValueError, match="granularity"):
        qatx.FakeQuantize(granularity="channel")
    with pytest.raises(ValueError, match="init"):
        qatx.LearnableFakeQuantize(init="kaiming")
    with pytest.raises(ValueError, match="grad_factor"):
        qatx.LearnableFakeQuantize(grad_factor=-1.0)
    with pytest.raises(ValueError, match="one scale"):
        qatx.LearnableFakeQuantize(num_scales=4)
    with pytest.raises(ValueError, match="alpha"):
        qatx.PACT(alpha=0.0)
    with pytest.raises(ValueError, match="bits"):
        qatx.PACT(bits=20)


# --- learnable quantizers ---------------------------------------------------------------------------

def test_lsq_init_rule_and_default_grad_factor():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 10, generator=gen, requires_grad=True)
    q = qatx.LearnableFakeQuantize(bits=4, granularity="per_channel", axis=0, num_scales=6)
    y = q(x)
    expected_scale = 2 * x.detach().abs().mean(1) / math.sqrt(7)
    assert torch.equal(q.scale.detach(), expected_scale)
    g = torch.randn(6, 10, generator=gen)
    y.backward(g)
    # the module's default grad_factor is 1/sqrt(N_per_scale * quant_max), N_per_scale = 10
    s = q.scale.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = torch.ops.qatx.fake_quantize_lsq(xr, s, torch.zeros(6), 0, -8, 7, 1.0 / math.sqrt(10 * 7))
    yr.backward(g)
    assert torch.equal(y, yr) and torch.equal(q.scale.grad, s.grad) and torch.equal(x.grad, xr.grad)


def test_lsq_plus_learns_zero_point_and_minmax_init():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(256, generator=gen) * 3 + 0.5  # positive, far from zero: the zero point matters
    q = qatx.LearnableFakeQuantize(bits=4, signed=False, learn_zero_point=True, init="minmax")
    q(x).sum().backward()
    s, z = calculate_qparams(x.min().reshape(1), x.max().reshape(1), 0, 15, symmetric=False)
    assert torch.equal(q.scale.detach(), s) and torch.equal(q.zero_point.detach(), z.float())
    assert q.zero_point.grad is not None and q.scale.grad is not None


def test_lsq_training_lowers_quantization_error():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4096, generator=gen) ** 3  # heavy tails: the initial scale is not optimal
    q = qatx.LearnableFakeQuantize(bits=3, init="minmax")
    with torch.no_grad():
        before = torch.mean((q(x) - x) ** 2).item()
    opt = torch.optim.Adam([q.scale], lr=0.02 * q.scale.item())  # steps relative to the initial scale
    for _ in range(300):
        loss = torch.mean((q(x) - x) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.mean((q(x) - x) ** 2).item()
    assert after < 0.8 * before


def test_learnable_state_dict_round_trip_keeps_initialisation():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, generator=gen)
    q = qatx.LearnableFakeQuantize(bits=4, granularity="per_group", group_size=8, qparam_shape=(2, 4))
    y = q(x)
    fresh = qatx.LearnableFakeQuantize(bits=4, granularity="per_group", group_size=8, qparam_shape=(2, 4))
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialized
    assert torch.equal(fresh(x * 5), q(x * 5))  # no re-initialisation from the new data
    assert torch.equal(fresh(x), y)


def test_learnable_scripted_matches_eager_outputs_and_all_gradients():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 8, generator=gen)
    eager = qatx.LearnableFakeQuantize(bits=4, learn_zero_point=True, granularity="per_channel", axis=1,
                                       num_scales=5, init="minmax")
    eager(x)  # initialise (the usual flow: train or calibrate, then script)
    scripted = torch.jit.script(copy.deepcopy(eager))
    assert scripted.initialized
    xe, xs = (x * 1.5).requires_grad_(), (x * 1.5).requires_grad_()
    ye, ys = eager(xe), scripted(xs)
    assert torch.equal(ye, ys)
    g = torch.randn(ye.shape, generator=gen)
    ye.backward(g)
    ys.backward(g)
    assert torch.equal(xe.grad, xs.grad)
    assert torch.equal(eager.scale.grad, scripted.scale.grad)
    assert torch.equal(eager.zero_point.grad, scripted.zero_point.grad)


def test_pact_module():
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(64, generator=gen) * 4).requires_grad_()
    p = qatx.PACT(bits=4, alpha=2.0)
    y = p(x)
    assert torch.equal(y, torch.ops.qatx.fake_quantize_pact(x.detach(), torch.tensor([2.0]), 4, False))
    assert y.min().item() >= 0.0 and y.max().item() <= 2.0
    y.sum().backward()
    assert p.alpha.grad.item() == float((x.detach() >= 2.0).sum())
    scripted = torch.jit.script(qatx.PACT(bits=4, alpha=2.0))
    assert torch.equal(scripted(x.detach()), y.detach())
    p.disable_fake_quant()
    assert torch.equal(p(x), x)
