"""qatx modules: QAT layers (:mod:`qatx.nn.qat`) and quantized functional ops
(:class:`QuantAdd`, :class:`QuantCat`, :class:`QuantMatmul`)."""
from . import qat
from .quant_ops import QuantAdd, QuantCat, QuantMatmul

__all__ = ["qat", "QuantAdd", "QuantCat", "QuantMatmul"]
