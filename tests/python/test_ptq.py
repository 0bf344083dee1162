"""Post-training quantization flows: prepare_ptq + calibrate (static), weight-only without
calibration, fixed activation ranges, interrupted calibration, and QAT started from PTQ."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx
from qatx import QConfig, QuantSpec, presets
from qatx.nn import qat

PTQ_W8A8 = QConfig(weight=QuantSpec(bits=8, granularity="per_channel"),
                   activation=QuantSpec(bits=8, signed=False, symmetric=False))


def _task(n, gen):
    """A non-linear 4-class problem in 16 dimensions: the class is the quadrant of two random
    projections of the input, plus a little label noise from the data itself."""
    x = torch.randn(n, 16, generator=gen)
    proj = torch.randn(16, 2, generator=torch.Generator().manual_seed(123))
    p = torch.tanh(x @ proj) + 0.3 * torch.sin(3 * x[:, :2])
    y = (p[:, 0] > 0).long() * 2 + (p[:, 1] > 0).long()
    return x, y


def _mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = _task(4096, gen)
    xte, yte = _task(2048, gen)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(15):
        for i in range(0, len(xtr), 128):
            loss = F.cross_entropy(model(xtr[i:i + 128]), ytr[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), (xtr, ytr), (xte, yte)


def _batches(x, n=128):
    return [(x[i:i + n], None) for i in range(0, len(x), n)]


def test_prepare_ptq_observes_weights_and_sets_toggles(trained):
    model, _, _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    assert not ptq.training
    assert type(ptq[0]) is qat.LinearBn1d and type(ptq[3]) is qat.Linear
    w = ptq[3].weight.detach()
    lo, hi = torch.aminmax(w, dim=1)
    scale, zp = qatx.calculate_qparams(lo, hi, -128, 127, True)
    assert torch.equal(ptq[3].weight_quantizer.scale, scale) and torch.equal(ptq[3].weight_quantizer.zero_point, zp)
    wq = ptq[3].weight_quantizer
    assert not wq.observer_enabled and wq.fake_quant_enabled
    aq = ptq[3].input_quantizer
    assert aq.observer_enabled and not aq.fake_quant_enabled
    # the float model is untouched
    assert type(model[0]) is nn.Linear


def test_calibrate_records_float_ranges_then_quantizes(trained):
    model, (xtr, _), _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    calib = xtr[:512]
    qatx.calibrate(ptq, _batches(calib), progress=False)
    q = ptq[0].input_quantizer
    assert torch.equal(q.observer.min_val, calib.min().reshape(1))
    assert torch.equal(q.observer.max_val, calib.max().reshape(1))
    scale, zp = qatx.calculate_qparams(calib.min().reshape(1), calib.max().reshape(1), 0, 255, False)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)
    for m in ptq.modules():
        if isinstance(m, qatx.quantizers._Toggles):
            assert m.fake_quant_enabled and not m.observer_enabled
    # the calibrated model's output is the fake-quantized computation
    x = xtr[:64]
    with torch.no_grad():
        manual = ptq[0].input_quantizer(x)
        assert torch.equal(manual, torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255))


def test_num_batches_stops_early(trained):
    model, (xtr, _), _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    qatx.calibrate(ptq, _batches(xtr[:1024]), num_batches=2, progress=False)
    first_two = xtr[:256]
    assert torch.equal(ptq[0].input_quantizer.observer.max_val, first_two.max().reshape(1))


@pytest.mark.parametrize("batch_kind", ["tensor", "tuple", "dict"])
def test_calibrate_batch_forms(trained, batch_kind):
    model, (xtr, _), _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    x = xtr[:128]
    batch = {"tensor": x, "tuple": (x, None), "dict": {"input": x}}[batch_kind]
    qatx.calibrate(ptq, [batch], progress=False)
    assert torch.equal(ptq[0].input_quantizer.observer.max_val, x.max().reshape(1))


def test_static_ptq_w8a8_accuracy_within_one_point(trained):
    model, (xtr, _), (xte, yte) = trained
    acc_float = _accuracy(model, xte, yte)
    assert acc_float > 85, f"the float model should learn the task, got {acc_float:.2f}%"
    ptq = qatx.calibrate(qatx.prepare_ptq(model, PTQ_W8A8), _batches(xtr[:1024]), progress=False)
    acc_ptq = _accuracy(ptq, xte, yte)
    assert abs(acc_ptq - acc_float) <= 1.0, (acc_float, acc_ptq)
    # 2-bit activations are visibly worse: the flow really quantizes
    w2a2 = QConfig(weight=QuantSpec(bits=2, granularity="per_channel"),
                   activation=QuantSpec(bits=2, signed=False, symmetric=False))
    acc_2bit = _accuracy(qatx.calibrate(qatx.prepare_ptq(model, w2a2), _batches(xtr[:1024]), progress=False), xte, yte)
    assert acc_2bit < acc_float - 3, (acc_float, acc_2bit)


def test_weight_only_needs_no_calibration(trained):
    model, _, (xte, yte) = trained
    wq = QConfig(weight=QuantSpec(bits=4, granularity="per_group", group_size=16))
    ptq = qatx.prepare_ptq(model, wq, fuse=False)
    for m in ptq.modules():
        if isinstance(m, qat.Linear):
            assert isinstance(m.input_quantizer, nn.Identity)
            assert m.weight_quantizer.fake_quant_enabled and not m.weight_quantizer.observer_enabled
    x = xte[:256]
    with torch.no_grad():
        y = ptq(x)
        ref = x
        for m in ptq:
            if isinstance(m, qat.Linear):
                w = m.weight.detach()
                g = w.reshape(w.shape[0], -1, 16)
                lo, hi = g.amin(-1), g.amax(-1)
                s, z = qatx.calculate_qparams(lo, hi, -8, 7, True)
                wq_ref = qatx.fake_quantize_per_group_affine(w, s, z, 16, -8, 7)
                ref = F.linear(ref, wq_ref, m.bias)
            else:
                ref = m(ref)
    assert torch.equal(y, ref)
    assert _accuracy(ptq, xte, yte) > 80


def test_set_activation_ranges(trained):
    model, _, _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    qatx.set_activation_ranges(ptq, {"0": (-4.0, 4.0), "[35]": (0.0, 6.0)})
    q0, q3 = ptq[0].input_quantizer, ptq[3].input_quantizer
    s, z = qatx.calculate_qparams(torch.tensor([-4.0]), torch.tensor([4.0]), 0, 255, False)
    assert torch.equal(q0.scale, s) and torch.equal(q0.zero_point, z)
    assert q3.scale.item() == pytest.approx(6.0 / 255) and q3.zero_point.item() == 0
    assert q0.fake_quant_enabled and not q0.observer_enabled
    assert ptq[5].input_quantizer.fake_quant_enabled and not ptq[5].input_quantizer.observer_enabled
    with pytest.raises(ValueError, match="lo <= hi"):
        qatx.set_activation_ranges(ptq, {"0": (1.0, -1.0)})
    with pytest.raises(ValueError, match="finite"):
        qatx.set_activation_ranges(ptq, {"0": (float("nan"), 1.0)})
    with pytest.raises(ValueError, match="matches no module"):
        qatx.set_activation_ranges(ptq, {"nope": (0.0, 1.0)})
    with pytest.raises(TypeError, match="pair"):
        qatx.set_activation_ranges(ptq, {"0": 3.0})


def test_interrupted_calibration_leaves_model_usable(trained):
    model, (xtr, _), _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    before = [(m.observer_enabled, m.fake_quant_enabled) for m in ptq.modules()
              if isinstance(m, qatx.quantizers._Toggles)]

    def data():
        yield xtr[:128]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qatx.calibrate(ptq, data(), progress=False)
    after = [(m.observer_enabled, m.fake_quant_enabled) for m in ptq.modules()
             if isinstance(m, qatx.quantizers._Toggles)]
    assert before == after
    assert torch.equal(ptq[0].input_quantizer.observer.max_val, xtr[:128].max().reshape(1))
    # calibration continues where it stopped and the model runs
    qatx.calibrate(ptq, [xtr[128:256]], progress=False)
    assert torch.equal(ptq[0].input_quantizer.observer.max_val, xtr[:256].max().reshape(1))
    assert torch.isfinite(ptq(xtr[:8])).all()


def test_calibrate_errors(trained):
    model, (xtr, _), _ = trained
    ptq = qatx.prepare_ptq(model, PTQ_W8A8)
    with pytest.raises(ValueError, match="num_batches"):
        qatx.calibrate(ptq, [xtr[:8]], num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        qatx.calibrate(ptq, [], progress=False)
    with pytest.raises(TypeError, match="each batch"):
        qatx.calibrate(ptq, [3], progress=False)
    with pytest.raises(ValueError, match="no qatx quantizers"):
        qatx.calibrate(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="learnable"):
        qatx.prepare_ptq(model, presets.W4A4_LSQ)


def test_qat_from_ptq_same_config_keeps_ranges(trained):
    model, (xtr, ytr), _ = trained
    ptq = qatx.calibrate(qatx.prepare_ptq(model, PTQ_W8A8), _batches(xtr[:512]), progress=False)
    scale = ptq[3].input_quantizer.scale.clone()
    q_before = ptq[3].input_quantizer
    qat_model = qatx.prepare_qat(ptq, PTQ_W8A8)
    q_after = qat_model[3].input_quantizer
    assert torch.equal(q_after.scale, scale) and torch.equal(q_after.observer.max_val, q_before.observer.max_val)
    assert q_after.observer_enabled and q_after.fake_quant_enabled
    assert not q_before.observer_enabled  # a copy: the PTQ model is unchanged
    assert qatx.prepare_qat(ptq, PTQ_W8A8, inplace=True)[3].input_quantizer is q_before
    assert type(qat_model[0]) is qat.LinearBn1d


def test_qat_from_ptq_lsq_starts_from_calibrated_scales(trained):
    model, (xtr, ytr), (xte, yte) = trained
    w4a4 = QConfig(weight=QuantSpec(bits=4, granularity="per_channel"),
                   activation=QuantSpec(bits=4, signed=False, symmetric=False))
    ptq = qatx.calibrate(qatx.prepare_ptq(model, w4a4), _batches(xtr[:1024]), progress=False)
    acc_ptq = _accuracy(ptq, xte, yte)
    old_in = ptq[3].input_quantizer
    lo = (old_in.quant_min - old_in.zero_point.float()) * old_in.scale
    hi = (old_in.quant_max - old_in.zero_point.float()) * old_in.scale
    qat_model = qatx.prepare_qat(ptq, presets.W4A4_LSQ)
    new_in = qat_model[3].input_quantizer
    assert isinstance(new_in, qatx.LearnableFakeQuantize) and new_in.initialized
    s, z = qatx.calculate_qparams(lo, hi, 0, 15, False)
    assert torch.equal(new_in.scale.detach(), s) and torch.equal(new_in.zero_point.detach(), z.float())
    w_old = ptq[3].weight_quantizer.scale
    assert torch.equal(qat_model[3].weight_quantizer.scale.detach(),
                       qatx.calculate_qparams(-8 * w_old, 7 * w_old, -8, 7, True)[0])
    # a first training forward does not re-initialise, and fine-tuning improves on PTQ
    qat_model.train()
    opt = torch.optim.Adam(qat_model.parameters(), lr=1e-3)
    s_before = new_in.scale.detach().clone()
    qat_model(xtr[:128])
    assert torch.equal(new_in.scale.detach(), s_before)
    for epoch in range(3):
        for i in range(0, 2048, 128):
            loss = F.cross_entropy(qat_model(xtr[i:i + 128]), ytr[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert _accuracy(qat_model, xte, yte) >= acc_ptq - 0.5


def test_prepare_qat_none_override_makes_prepared_layer_float(trained):
    model, (xtr, _), _ = trained
    ptq = qatx.calibrate(qatx.prepare_ptq(model, PTQ_W8A8), _batches(xtr[:256]), progress=False)
    out = qatx.prepare_qat(ptq, PTQ_W8A8, overrides={"5": None})
    assert type(out[5]) is nn.Linear and torch.equal(out[5].weight, ptq[5].weight)
