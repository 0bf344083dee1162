"""QuantSpec / QConfig validation, presets, and the quantizer each spec builds."""
import pytest
import torch

import qatx
from qatx import QConfig, QuantSpec, presets


def test_spec_builds_the_matching_quantizer():
    fq = QuantSpec(bits=4, signed=False, symmetric=False, observer="moving_average", averaging_constant=0.5) \
        .make_quantizer()
    assert isinstance(fq, qatx.FakeQuantize) and (fq.quant_min, fq.quant_max) == (0, 15)
    assert fq.observer.averaging_constant == 0.5 and not fq.symmetric
    ch = QuantSpec(granularity="per_channel").make_quantizer((6, 3, 3, 3), channel_axis=0)
    assert ch.granularity == "per_channel" and ch.axis == 0
    lsq = QuantSpec(bits=4, granularity="per_channel", learnable="lsq").make_quantizer((6, 3, 3, 3), channel_axis=0)
    assert isinstance(lsq, qatx.LearnableFakeQuantize) and lsq.scale.shape == (6,) and not lsq.learn_zero_point
    lsqp = QuantSpec(bits=4, signed=False, symmetric=False, learnable="lsq+").make_quantizer()
    assert lsqp.learn_zero_point and lsqp.init == "minmax" and (lsqp.quant_min, lsqp.quant_max) == (0, 15)
    grp = QuantSpec(bits=4, granularity="per_group", group_size=8, learnable="lsq").make_quantizer((5, 32))
    assert grp.scale.shape == (5, 4)
    pact = QuantSpec(bits=4, signed=False, learnable="pact").make_quantizer()
    assert isinstance(pact, qatx.PACT) and pact.bits == 4
    assert QuantSpec(granularity="per_channel", axis=-1).make_quantizer((4, 5)).axis == 1
    assert QuantSpec(narrow_range=True).quant_min == -127


def test_presets():
    for name in ("W8A8", "W4A8", "W4A4_LSQ", "W8_DYNAMIC", "W4_WEIGHT_ONLY"):
        assert isinstance(getattr(presets, name), QConfig)
    assert presets.W8A8.weight.granularity == "per_channel" and presets.W8A8.activation.granularity == "per_tensor"
    assert presets.W4A4_LSQ.weight.learnable == "lsq" and presets.W4A4_LSQ.activation.learnable == "lsq+"
    assert presets.W4_WEIGHT_ONLY.activation is None and presets.W4_WEIGHT_ONLY.weight.granularity == "per_group"
    # dynamic: each batch's own range
    q = presets.W8_DYNAMIC.activation.make_quantizer()
    q(torch.full((4,), 10.0))
    q(torch.ones(4))
    assert q.observer.max_val.item() == 1.0


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"bits": 1, "symmetric": False}, ValueError, r"QuantSpec.bits: bits must be an integer in \[2, 16\]"),
    ({"bits": 17}, ValueError, "bits"),
    ({"bits": 8.0}, ValueError, "bits"),
    ({"signed": 1}, TypeError, "QuantSpec.signed must be a bool"),
    ({"granularity": "per_row"}, ValueError, "QuantSpec.granularity must be one of"),
    ({"granularity": "per_group", "group_size": 0}, ValueError, "QuantSpec.group_size must be a positive int"),
    ({"group_size": 8}, ValueError, "only used with granularity='per_group'"),
    ({"axis": "0", "granularity": "per_channel"}, TypeError, "QuantSpec.axis"),
    ({"observer": "kl"}, ValueError, "QuantSpec.observer must be one of"),
    ({"observer": "histogram", "granularity": "per_group", "group_size": 8}, ValueError, "'per_tensor' or"),
    ({"observer": "entropy", "learnable": "lsq"}, ValueError, "needs learnable=None"),
    ({"observer": "percentile", "percentile": 0.0}, ValueError, r"QuantSpec.percentile must be in \(0, 100\]"),
    ({"percentile": 100.5}, ValueError, "QuantSpec.percentile"),
    ({"histogram_bins": 8}, ValueError, r"QuantSpec.histogram_bins must be an int in \[16, 1048576\]"),
    ({"power_of_two_scale": 1}, TypeError, "QuantSpec.power_of_two_scale must be a bool"),
    ({"power_of_two_scale": True, "learnable": "lsq"}, ValueError, "power_of_two_scale needs learnable=None"),
    ({"averaging_constant": 0.0}, ValueError, r"averaging_constant must be in \(0, 1\]"),
    ({"learnable": "dorefa"}, ValueError, "QuantSpec.learnable must be one of"),
    ({"learnable": "lsq", "symmetric": False}, ValueError, "use learnable='lsq\\+'"),
    ({"learnable": "lsq+"}, ValueError, "needs symmetric=False"),
    ({"learnable": "pact", "granularity": "per_channel"}, ValueError, "'per_tensor'"),
])
def test_spec_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantSpec(**kwargs)


def test_make_quantizer_shape_errors():
    with pytest.raises(ValueError, match=r"axis=2 is out of range for a tensor with 2 dimensions \(allowed: \[-2, 1\]\)"):
        QuantSpec(granularity="per_channel", axis=2).make_quantizer((4, 5))
    with pytest.raises(ValueError, match=r"group_size=32 must divide the last dimension .*\[8, 48\]"):
        QuantSpec(granularity="per_group", group_size=32).make_quantizer((8, 48))
    with pytest.raises(ValueError, match="needs the tensor shape"):
        QuantSpec(granularity="per_channel", learnable="lsq").make_quantizer()


def test_qconfig_errors_and_immutability():
    with pytest.raises(TypeError, match="QConfig.weight must be a QuantSpec"):
        QConfig(weight=None)
    with pytest.raises(TypeError, match="QConfig.activation must be a QuantSpec or None"):
        QConfig(weight=QuantSpec(), activation="int8")
    with pytest.raises(Exception):
        presets.W8A8.weight.bits = 4  # frozen: presets cannot be changed by accident
