"""qatx.report and qatx.sensitivity on prepared models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx
from qatx import QConfig, QuantSpec, presets


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_report_rows_and_values():
    model = qatx.prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(64, 4)), presets.W4A8,
                             overrides={"4": QConfig(QuantSpec(bits=8, granularity="per_channel"),
                                                     QuantSpec(bits=4, signed=False, learnable="pact"))})
    before = qatx.report(model)
    assert [r["module"] for r in before.rows] == ["0", "4"]
    assert before[0]["weight_scale"] is None and before[0]["weight_sqnr_db"] is None  # not calibrated yet
    x = torch.randn(8, 3, 6, 6)
    model(x)
    table = qatx.report(model)
    conv, lin = table[0], table[1]
    assert conv["type"] == "ConvBnReLU2d" and conv["weight_bits"] == 4 and conv["weight_granularity"] == "per_channel"
    s = model[0].weight_quantizer.scale
    assert conv["weight_scale"] == (s.min().item(), s.max().item()) and conv["weight_zero_point"] == (0.0, 0.0)
    # SQNR over the BN-folded weight
    w = model[0]._float_weight().detach()
    wq = qatx.fake_quantize_per_channel_affine(w, s, model[0].weight_quantizer.zero_point, 0, -8, 7)
    expected = 10 * math.log10(w.double().pow(2).sum().item() / (w - wq).double().pow(2).sum().item())
    assert conv["weight_sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert conv["input_observed"] == (x.min().item(), x.max().item()) and conv["input_bits"] == 8
    assert lin["weight_bits"] == 8 and lin["weight_sqnr_db"] > conv["weight_sqnr_db"]  # 8 bits beat 4 bits
    assert lin["input_granularity"] == "per_tensor (pact)" and lin["input_scale"][0] == pytest.approx(10.0 / 15)
    text = str(table)
    assert text.splitlines()[0].split()[:3] == ["module", "type", "weight_bits"] and "ConvBnReLU2d" in text
    # the report does not change the model
    assert torch.equal(model[0].weight_quantizer.scale, s)


def test_sensitivity_ranks_the_low_precision_layer_first_and_restores_state():
    two_bit = QConfig(QuantSpec(bits=2, granularity="per_channel"), presets.W8A8.activation)
    model = qatx.prepare_qat(_mlp(), presets.W8A8, overrides={"2": two_bit})
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(64, 16, generator=gen)
    model(data)  # calibrate
    model.train()
    qatx.enable_observer(model[0], False)
    with torch.no_grad():
        qatx.enable_fake_quant(model, False)
        target = model(data)
        qatx.enable_fake_quant(model, True)
    flags = [(q.fake_quant_enabled, q.observer_enabled) for q in model.modules() if isinstance(q, qatx.FakeQuantize)]
    scales = [q.scale.clone() for q in model.modules() if isinstance(q, qatx.FakeQuantize)]

    def metric(m, x):
        return F.mse_loss(m(x), target).item()

    table = qatx.sensitivity(model, data, metric)
    assert table[0]["module"] == "2" and [r["module"] for r in table.rows] == sorted(
        ["0", "2", "4"], key=lambda n: -abs(next(r["delta"] for r in table.rows if r["module"] == n)))
    assert table.baseline == 0.0 and table.quantized > table[0]["metric"] > 0
    assert all(r["delta"] == r["metric"] - table.baseline for r in table.rows)
    assert model.training
    assert flags == [(q.fake_quant_enabled, q.observer_enabled) for q in model.modules()
                     if isinstance(q, qatx.FakeQuantize)]
    assert all(torch.equal(a, q.scale) for a, q in zip(scales, [q for q in model.modules()
                                                                  if isinstance(q, qatx.FakeQuantize)]))
    assert "delta" in str(table).splitlines()[0]


def test_sensitivity_needs_calibration():
    model = qatx.prepare_qat(_mlp(), presets.W8A8)
    with pytest.raises(RuntimeError, match="calibrated"):
        qatx.sensitivity(model, torch.randn(2, 16), lambda m, x: m(x).sum().item())
