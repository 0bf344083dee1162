"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) pairs.

The model is first turned into its QDQ form (:mod:`qatx.export._qdq`), then exported with
PyTorch's ``torch.export``-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``, the
default exporter since torch 2.9 and the one kept in 2.11-2.14; the TorchScript-based one is
deprecated) with translations of the qatx ops written in ONNX Script:

==========================================  =================================================
qatx op                                     ONNX
==========================================  =================================================
``fake_quantize_per_tensor_affine``         ``DequantizeLinear(QuantizeLinear(x))``, scalar qparams
``fake_quantize_per_channel_affine``        the same with ``axis``
``fake_quantize_per_group_affine``          the same with ``axis=-1, block_size`` (opset >= 21)
``dequantize_per_{tensor,channel}_affine``  ``DequantizeLinear`` of the integer initializer
``dequantize_per_group_affine``             ``DequantizeLinear`` with ``block_size`` (opset >= 21)
``add_int8``                                ``Add`` of two Q/DQ pairs, then ``Relu`` when fused
==========================================  =================================================

The integer type is the narrowest holding ``[quant_min, quant_max]``: uint8, int8, or
(opset >= 21) uint16/int16. A range narrower than its type (4-bit, narrow-range int8) gets a
``Clip`` between the pair, so ``DequantizeLinear(Clip(QuantizeLinear(x)))``.

Rounding: ONNX's QuantizeLinear computes ``rint(x / s)``, qatx ``rint(x * (1/s))`` (as
PyTorch); the two differ only where ``x / s`` lies within one float32 rounding error of a
half-integer, and there by one quantization step.
"""
import json
from typing import Optional

import torch
from torch import nn

from ._common import (METADATA_KEY, ExportFormatError, check_inputs, check_load_path, check_metadata, check_model,
                      check_save_path, metadata)
from ._qdq import int8_qdq_form, qdq_form

__all__ = ["onnx", "load_onnx"]

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
BLOCKED_OPSET = 21  # blocked (per-group) quantization, 16-bit integer types


def _translations(opset: int):
    import onnx as onnx_pkg
    from onnxscript import opset18 as op18
    import onnxscript

    op = onnxscript.values.Opset("", opset)  # the default domain at the requested version
    types = {torch.int8: onnx_pkg.TensorProto.INT8, torch.uint8: onnx_pkg.TensorProto.UINT8,
             torch.int16: onnx_pkg.TensorProto.INT16, torch.uint16: onnx_pkg.TensorProto.UINT16}

    def integer_type(quant_min: int, quant_max: int):
        if 0 <= quant_min and quant_max <= 255:
            dtype = torch.uint8
        elif -128 <= quant_min and quant_max <= 127:
            dtype = torch.int8
        elif opset >= BLOCKED_OPSET and 0 <= quant_min and quant_max <= 65535:
            dtype = torch.uint16
        elif opset >= BLOCKED_OPSET:
            dtype = torch.int16
        else:
            raise ValueError(f"the quantization range [{quant_min}, {quant_max}] needs a 16-bit ONNX integer type: "
                             f"use opset >= {BLOCKED_OPSET}")
        info = torch.iinfo(dtype)
        return types[dtype], (info.min, info.max)

    def scalar(t):
        return op18.Reshape(t, op18.Constant(value=onnx_pkg.helper.make_tensor("shape", onnx_pkg.TensorProto.INT64,
                                                                               [0], [])))

    def qdq(x, scale, zero_point, quant_min: int, quant_max: int, **axis_attrs):
        onnx_type, (lo, hi) = integer_type(quant_min, quant_max)
        z = op18.Cast(zero_point, to=onnx_type)
        q = op.QuantizeLinear(x, scale, z, **axis_attrs)
        if (quant_min, quant_max) != (lo, hi):  # narrower than the integer type
            q = op18.Clip(q, op18.Constant(value=onnx_pkg.helper.make_tensor("min", onnx_type, [], [quant_min])),
                          op18.Constant(value=onnx_pkg.helper.make_tensor("max", onnx_type, [], [quant_max])))
        return op.DequantizeLinear(q, scale, z, **axis_attrs)

    def fq_per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
        return qdq(x, scalar(scale), scalar(zero_point), quant_min, quant_max)

    def fq_per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
        return qdq(x, scale, zero_point, quant_min, quant_max, axis=axis)

    def fq_per_group(x, scale, zero_point, group_size: int, quant_min: int, quant_max: int):
        _need_blocked()
        return qdq(x, scale, zero_point, quant_min, quant_max, axis=-1, block_size=group_size)

    def _need_blocked():
        if opset < BLOCKED_OPSET:
            raise ValueError(f"per-group quantization is ONNX blocked quantization: use opset >= {BLOCKED_OPSET}, "
                             f"got {opset}")

    def dq_per_tensor(codes, scale, zero_point, output_dtype: Optional[int] = None):
        return op.DequantizeLinear(codes, scalar(scale), op18.CastLike(scalar(zero_point), codes))

    def dq_per_channel(codes, scale, zero_point, axis: int, output_dtype: Optional[int] = None):
        return op.DequantizeLinear(codes, scale, op18.CastLike(zero_point, codes), axis=axis)

    def dq_per_group(codes, scale, zero_point, group_size: int, output_dtype: Optional[int] = None):
        _need_blocked()
        return op.DequantizeLinear(codes, scale, op18.CastLike(zero_point, codes), axis=-1, block_size=group_size)

    def add_int8(x, x_scale, x_zero_point, x_min: int, x_max: int, y, y_scale, y_zero_point, y_min: int,
                 y_max: int, relu: bool = False):
        out = op18.Add(fq_per_tensor(x, x_scale, x_zero_point, x_min, x_max),
                       fq_per_tensor(y, y_scale, y_zero_point, y_min, y_max))
        return op18.Relu(out) if relu else out

    ops = torch.ops.qatx
    return {
        ops.fake_quantize_per_tensor_affine.default: fq_per_tensor,
        ops.fake_quantize_per_channel_affine.default: fq_per_channel,
        ops.fake_quantize_per_group_affine.default: fq_per_group,
        ops.dequantize_per_tensor_affine.default: dq_per_tensor,
        ops.dequantize_per_channel_affine.default: dq_per_channel,
        ops.dequantize_per_group_affine.default: dq_per_group,
        ops.add_int8.default: add_int8,
    }


def onnx(model: nn.Module, example_inputs, path, opset: int = 21, dynamic_batch: bool = False,
         input_names=None, output_names=None):
    """Exports ``model`` (a float, prepared QAT, partly quantized, or converted INT8 model) to an
    ONNX file at ``path`` with QuantizeLinear/DequantizeLinear pairs; returns the ``onnx.ModelProto``.

    A converted model's INT8 layers are written in QDQ form (:class:`qatx.export._qdq.QDQLayer`):
    their input qparams as a Q/DQ pair, their integer weights and int32 biases as initializers,
    the same file the QAT model it came from exports to (a grouped ConvTranspose with per-channel
    weights has no per-axis form there: export the QAT model).

    Activation quantizers become Q/DQ pairs (per-tensor scalar qparams, per-channel ``axis``);
    weights are stored as integer initializers (int8 for 8-bit and narrower signed ranges) read
    through ``DequantizeLinear`` with the weight's per-channel axis: 0 for Linear and Conv, 1 for
    ConvTranspose (whose weight is ``[in, out/groups, *k]``). Biases that the QAT layer rounds to
    the int32 grid of ``s_in * s_w[c]`` are int32 initializers read through ``DequantizeLinear``
    (axis 0), as the INT8 layer holds them. See the module docstring for the translation and the rounding
    difference from qatx (at most one quantization step, only at float32 rounding ties).

    Args:
        example_inputs: a tensor or a tuple of positional inputs; the graph's input shapes.
        opset: ONNX opset, 13 to 23 (default 21: per-group blocked quantization and 16-bit
            integer ranges need >= 21).
        dynamic_batch: make dimension 0 of every tensor input dynamic.
        input_names, output_names: names of the graph's inputs and outputs.

    Needs the ``onnx`` and ``onnxscript`` packages (``onnxruntime`` to run the file).
    """
    check_model(model)
    inputs = check_inputs(example_inputs)
    path = check_save_path(path)
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= 23:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, 23], got {opset!r}")
    try:
        import onnx as onnx_pkg
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"qatx.export.onnx needs the packages onnx and onnxscript ({e}): pip install onnx onnxscript") \
            from e
    qdq = qdq_form(int8_qdq_form(model), inputs)
    grouped = [n for n, m in qdq.named_modules() if getattr(m, "granularity", None) == "per_group"]
    if grouped and opset < BLOCKED_OPSET:
        raise ValueError(f"per-group quantization ({', '.join(grouped[:3])}) is ONNX blocked quantization: "
                         f"use opset >= {BLOCKED_OPSET}, got opset={opset}")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) else None for t in inputs)
    program = torch.onnx.export(qdq, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                input_names=input_names, output_names=output_names,
                                custom_translation_table=_translations(opset), verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "qatx_metadata.json", json.dumps(metadata("onnx"), sort_keys=True)
    onnx_pkg.save(proto, path)
    return proto


def load_onnx(path, providers=None, optimize: bool = True, session_options=None):
    """Loads a file written by :func:`onnx` into an ``onnxruntime.InferenceSession``.

    The file is parsed and checked (``onnx.checker``) before ONNX Runtime sees it, and its qatx
    metadata is checked as for the other formats. Raises ``FileNotFoundError`` for a missing
    file and :class:`qatx.export.ExportFormatError` (a ``ValueError``) for a truncated or corrupt
    file, an ONNX file without qatx metadata, or one saved by an incompatible qatx version.

    Args:
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).
        optimize: ONNX Runtime's graph optimisations (on by default: QDQ pairs around
            MatMul/Conv become integer QLinear kernels); ``False`` runs the graph node for node.
        session_options: an ``onnxruntime.SessionOptions`` (threads, ...); ``optimize=False``
            overrides its graph optimisation level.
    """
    path = check_load_path(path)
    if not isinstance(optimize, bool):
        raise TypeError(f"optimize must be a bool, got {optimize!r}")
    try:
        import onnx as onnx_pkg
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"qatx.export.load_onnx needs the packages onnx and onnxruntime ({e}): "
                          f"pip install onnx onnxruntime") from e
    try:
        proto = onnx_pkg.load(path)
        onnx_pkg.checker.check_model(proto)
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFormatError(f"{path}: not a valid ONNX model (truncated or corrupt?): {first}") from None
    raw = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    check_metadata(raw, path, "onnx")
    options = session_options if session_options is not None else ort.SessionOptions()
    if not isinstance(options, ort.SessionOptions):
        raise TypeError(f"session_options must be an onnxruntime.SessionOptions, got {type(options).__name__}")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=list(providers) if providers is not None else ["CPUExecutionProvider"])
