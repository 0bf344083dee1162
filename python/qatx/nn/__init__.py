"""qatx modules: QAT layers (:mod:`qatx.nn.qat`), INT8 modules (:mod:`qatx.nn.quantized`) and
quantized functional ops (:class:`QuantAdd`, :class:`QuantCat`, :class:`QuantMatmul`) and the
memory-lean :class:`ReLU` that prepared models use."""
from . import qat
from .activation import ReLU
from .quant_ops import QuantAdd, QuantCat, QuantMatmul

__all__ = ["qat", "quantized", "QuantAdd", "QuantCat", "QuantMatmul", "ReLU"]

# INT8 modules (after quant_ops: they refer to the op modules).
from . import quantized  # noqa: E402
