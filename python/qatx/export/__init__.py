"""Exporting qatx models: TorchScript (:func:`torchscript`, runs from C++ with libqatx), ONNX
with QuantizeLinear/DequantizeLinear pairs (:func:`onnx`) and ``torch.export`` programs
(:func:`program`). Every file carries qatx metadata; the loaders raise
:class:`ExportFormatError` (a ``ValueError``) for truncated, corrupt or incompatible files."""
from ._common import FORMAT_VERSION, ExportFormatError
from ._torchscript import load_torchscript, torchscript

__all__ = ["ExportFormatError", "FORMAT_VERSION", "torchscript", "load_torchscript"]
from ._program import load_program, program

__all__ += ["program", "load_program"]
from ._onnx import load_onnx, onnx

__all__ += ["onnx", "load_onnx"]
