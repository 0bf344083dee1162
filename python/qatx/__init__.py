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
from .observers import HistogramObserver, MinMaxObserver, calculate_qparams, power_of_two_scale, quant_range
from .quantizers import PACT, FakeQuantize, LearnableFakeQuantize

from . import config, nn, presets
from .config import QConfig, QuantSpec
from .prepare import enable_fake_quant, enable_observer, freeze_bn_stats, prepare_qat
from .ptq import calibrate, prepare_ptq, set_activation_ranges, transfer_qparams
from .report import report, sensitivity
from .distributed import sync_observers
from .checkpoint import load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ops",
    "observers",
    "quantizers",
    "MinMaxObserver",
    "HistogramObserver",
    "power_of_two_scale",
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
__all__ += ["prepare_ptq", "calibrate", "set_activation_ranges", "transfer_qparams"]

# INT8 inference: convert, parity report, size, dynamic quantization.
from .convert import compare, convert, model_size, quantize_dynamic  # noqa: E402
from .ops import add_int8, convolution_int8, linear_int8, linear_int8_dynamic  # noqa: E402

__all__ += ["convert", "compare", "model_size", "quantize_dynamic", "linear_int8", "convolution_int8",
            "linear_int8_dynamic", "add_int8"]
__all__ += ["save_checkpoint", "load_checkpoint"]

from .memory import cpu_cache_stats, empty_cpu_cache, set_cpu_cache_limit  # noqa: E402

__all__ += ["cpu_cache_stats", "set_cpu_cache_limit", "empty_cpu_cache"]

# ---- export: TorchScript, ONNX (QDQ), torch.export programs ----
from . import export  # noqa: E402

__all__ += ["export"]
