"""Ready-made :class:`qatx.QConfig` presets. Weights are signed and symmetric; activations
(the inputs of each quantized layer) are unsigned and asymmetric, with the moving-average range
of torch's QAT defaults."""
from .config import QConfig, QuantSpec

__all__ = ["W8A8", "W4A8", "W4A4_LSQ", "W8_DYNAMIC", "W4_WEIGHT_ONLY"]

_ACT8 = QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average")

#: int8 per-channel weights, uint8 per-tensor activations.
W8A8 = QConfig(weight=QuantSpec(bits=8, granularity="per_channel"), activation=_ACT8)
#: int4 per-channel weights, uint8 per-tensor activations.
W4A8 = QConfig(weight=QuantSpec(bits=4, granularity="per_channel"), activation=_ACT8)
#: int4 per-channel LSQ weights, uint4 per-tensor LSQ+ activations (learned scale and zero point).
W4A4_LSQ = QConfig(weight=QuantSpec(bits=4, granularity="per_channel", learnable="lsq"),
                   activation=QuantSpec(bits=4, signed=False, symmetric=False, learnable="lsq+"))
#: int8 per-channel weights; activations quantized with each batch's own range (averaging
#: constant 1), as dynamic quantization does at inference.
W8_DYNAMIC = QConfig(weight=QuantSpec(bits=8, granularity="per_channel"),
                     activation=QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average",
                                          averaging_constant=1.0))
#: int4 weights in groups of 32 input features, float activations (Linear/Embedding weights).
W4_WEIGHT_ONLY = QConfig(weight=QuantSpec(bits=4, granularity="per_group", group_size=32))
