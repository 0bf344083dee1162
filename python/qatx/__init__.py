"""qatx: quantization-aware training and post-training quantization for PyTorch.

Importing qatx loads its operator library, which registers the ``torch.ops.qatx`` ops.
"""
import torch  # noqa: F401  (the extension needs torch's libraries loaded first)

from . import _C  # noqa: F401  registers torch.ops.qatx.*
from . import ops
from .ops import (
    dequantize_per_channel_affine,
    dequantize_per_group_affine,
    dequantize_per_tensor_affine,
    fake_quantize_lsq,
    fake_quantize_lsq_per_group,
    fake_quantize_pact,
    fake_quantize_per_channel_affine,
    fake_quantize_per_group_affine,
    fake_quantize_per_tensor_affine,
    quantize_per_channel_affine,
    quantize_per_group_affine,
    quantize_per_tensor_affine,
)

from . import observers, quantizers
from .observers import MinMaxObserver, calculate_qparams, quant_range
from .quantizers import PACT, FakeQuantize, LearnableFakeQuantize

from . import config, nn, presets
from .config import QConfig, QuantSpec
from .prepare import enable_fake_quant, enable_observer, freeze_bn_stats, prepare_qat
from .report import report, sensitivity
from .distributed import sync_observers

__version__ = "0.1.0"

__all__ = [
    "ops",
    "observers",
    "quantizers",
    "MinMaxObserver",
    "calculate_qparams",
    "quant_range",
    "FakeQuantize",
    "LearnableFakeQuantize",
    "PACT",
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_group_affine",
    "quantize_per_tensor_affine",
    "quantize_per_channel_affine",
    "quantize_per_group_affine",
    "dequantize_per_tensor_affine",
    "dequantize_per_channel_affine",
    "dequantize_per_group_affine",
    "fake_quantize_lsq",
    "fake_quantize_lsq_per_group",
    "fake_quantize_pact",
]

__all__ += ["config", "nn", "presets", "QuantSpec", "QConfig", "prepare_qat", "enable_fake_quant",
            "enable_observer", "freeze_bn_stats", "report", "sensitivity", "sync_observers"]

# ---- export: TorchScript, ONNX (QDQ), torch.export programs ----
from . import export  # noqa: E402

__all__ += ["export"]
