"""qatx modules: QAT layers (:mod:`qatx.nn.qat`), INT8 modules (:mod:`qatx.nn.quantized`) and
quantized functional ops (:class:`QuantAdd`, :class:`QuantCat`, :class:`QuantMatmul`)."""
from . import qat
from .quant_ops import QuantAdd, QuantCat, QuantMatmul

__all__ = ["qat", "quantized", "QuantAdd", "QuantCat", "QuantMatmul"]

# INT8 modules (after quant_ops: they refer to the op modules).
from . import quantized  # noqa: E402
