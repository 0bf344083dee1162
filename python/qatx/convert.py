r"""From a trained QAT model to an INT8 model: :func:`convert`, the parity check :func:`compare`,
:func:`model_size`, and post-training dynamic quantization :func:`quantize_dynamic`.

Parity report (:func:`compare`): for every converted layer (matched by name) and for the model
output, with ``ref`` the QAT module's output and ``out`` the INT8 module's:

* ``max_err_lsb`` = :math:`\max|out - ref| / \Delta` with the output step
  :math:`\Delta = (\max ref - \min ref) / 255` (the step of an 8-bit grid spanning the
  layer's output range over the inputs given),
* ``sqnr_db`` = :math:`10 \log_{10}(\sum ref^2 / \sum (out - ref)^2)` (``inf`` when equal),
* ``top1_agree`` (model output only, for ``[N, classes]`` logits): the fraction of rows whose
  argmax agrees.

A layer that writes its consumers' integers (``integer_activations``) is compared on that grid:
its integers dequantized against the QAT output fake-quantized to the same grid, which is what
the consumers see in both models.
"""
import copy
import io
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Type

import torch
from torch import Tensor, nn

from .nn import QuantAdd, QuantCat, QuantMatmul
from .nn import qat
from .nn import quantized as nnq
from .quantizers import _Toggles
from .report import Table

__all__ = ["convert", "compare", "model_size", "quantize_dynamic", "CONVERSIONS"]

#: QAT module type -> INT8 module type used by :func:`convert`.
CONVERSIONS: Dict[Type[nn.Module], Type[nn.Module]] = {
    qat.Linear: nnq.Linear,
    qat.LinearBn1d: nnq.Linear,
    qat.Conv1d: nnq.Conv1d,
    qat.Conv2d: nnq.Conv2d,
    qat.Conv3d: nnq.Conv3d,
    qat.ConvBn1d: nnq.Conv1d,
    qat.ConvBn2d: nnq.Conv2d,
    qat.ConvBn3d: nnq.Conv3d,
    qat.ConvBnReLU1d: nnq.Conv1d,
    qat.ConvBnReLU2d: nnq.Conv2d,
    qat.ConvBnReLU3d: nnq.Conv3d,
    qat.ConvTranspose1d: nnq.ConvTranspose1d,
    qat.ConvTranspose2d: nnq.ConvTranspose2d,
    qat.ConvTranspose3d: nnq.ConvTranspose3d,
    qat.Embedding: nnq.Embedding,
    QuantAdd: nnq.Add,
    QuantCat: nnq.Cat,
    QuantMatmul: nnq.Matmul,
}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_prepared_op(mod: nn.Module) -> bool:
    return isinstance(mod, (QuantAdd, QuantCat, QuantMatmul)) and mod.qconfig is not None


# INT8 modules whose op applies a ReLU to its output itself (a ``relu`` flag).
_RELU_FUSABLE = (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Add)


class _LayerTracer(torch.fx.Tracer):
    """Keeps the INT8 layers, adds, ReLUs and poolings as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _RELU_FUSABLE or isinstance(m, (nn.ReLU, nnq.MaxPool2d)) or \
            super().is_leaf_module(m, qualname)


def _fuse_relus(model: nn.Module) -> None:
    """Gives an INT8 Linear/Conv/Add whose output only feeds a ReLU that ReLU (the op's ``relu``
    flag, one pass fewer) and makes the ReLU an ``nn.Identity``. Read from the torch.fx graph;
    a model that does not trace is left as it is."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # data-dependent control flow: no fusion
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if type(layer) not in _RELU_FUSABLE or layer.relu or \
                calls[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules[user.target], nn.ReLU) and calls[user.target] == 1:
            layer.relu = True
            _set_module(model, user.target, nn.Identity())


# Nodes that only move or relabel a tensor's elements, or take maxima of them (quantization is
# monotone, so the max of the integers is the integer of the max): integer activations pass
# through them. An nn.MaxPool2d becomes qatx.nn.quantized.MaxPool2d, which pools integers on
# CUDA too.
_PASS_THROUGH_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nnq.MaxPool2d)
_PASS_THROUGH_FUNCTIONS = {torch.flatten, torch.reshape}
_PASS_THROUGH_METHODS = {"flatten", "reshape", "view"}


def _passes_through(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, _PASS_THROUGH_MODULES) or (type(mod) is nn.MaxPool2d and not mod.return_indices)
    return (node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS)


def _input_grid(user: torch.fx.Node, value: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[tuple]:
    """The grid (scale, zero point, quant_min, quant_max) the INT8 module `user` quantizes
    `value` to, or None when it does not take it as integers."""
    mod = modules.get(user.target) if user.op == "call_module" else None
    if isinstance(mod, (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)):
        if not mod.quantize_input or getattr(mod, "padding_mode", "zeros") != "zeros" or \
                len(user.args) != 1 or user.args[0] is not value or user.kwargs:
            return None
        return (float(mod.input_scale), int(mod.input_zero_point), mod.input_quant_min, mod.input_quant_max)
    if isinstance(mod, nnq.Add) and len(user.args) == 2 and not user.kwargs:
        grids = {(float(q.scale), int(q.zero_point), q.quant_min, q.quant_max) if q.enabled else None
                 for arg, q in zip(user.args, (mod.input_quant, mod.other_quant)) if arg is value}
        return grids.pop() if len(grids) == 1 else None
    return None


def _chain_integer_activations(model: nn.Module) -> int:
    """Gives every INT8 Linear/Conv/Add whose output reaches only INT8 layers (directly or through
    reshapes), all quantizing it to the same grid, that grid as its output grid: the layers then
    pass uint8/int8 tensors instead of float32. Read from the torch.fx graph; a model that does
    not trace is left as it is. Returns the number of layers changed."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # data-dependent control flow: float32 between layers
        return 0
    modules = dict(model.named_modules(remove_duplicate=False))
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed = 0
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if type(layer) not in _RELU_FUSABLE or calls[node.target] != 1 or \
                not getattr(layer, "quantize_input", True) or layer.output_scale is not None:
            continue
        if next(iter(layer.buffers())).device.type != "cpu":
            continue  # the CUDA kernels read and write float32: a chain would add conversion passes
        grids, frontier, ok, pools = set(), [node], True, []
        while frontier and ok:
            value = frontier.pop()
            for user in value.users:
                if _passes_through(user, modules) and user.args and user.args[0] is value and \
                        value not in user.args[1:] and value not in user.kwargs.values():
                    frontier.append(user)
                    if user.op == "call_module" and type(modules[user.target]) is nn.MaxPool2d:
                        pools.append(user.target)
                    continue
                grid = _input_grid(user, value, modules)
                ok = grid is not None
                if not ok:
                    break
                grids.add(grid)
        if ok and len(grids) == 1:
            scale, zero_point, qmin, qmax = grids.pop()
            if 0 <= qmin or qmax <= 127:
                device = next(iter(layer.buffers())).device
                layer.quantize_output_to(torch.tensor([scale], device=device),
                                         torch.tensor([zero_point], dtype=torch.int32, device=device), qmin, qmax)
                for name in pools:
                    if type(modules[name]) is nn.MaxPool2d:
                        modules[name] = nnq.MaxPool2d.from_float(modules[name])
                        _set_module(model, name, modules[name])
                changed += 1
    return changed


def convert(model: nn.Module, inplace: bool = False, integer_activations: bool = True) -> nn.Module:
    """The INT8 model of a QAT model prepared by :func:`qatx.prepare_qat` and trained (or calibrated).

    Every QAT layer (``qatx.nn.qat``, fused Conv-BN(-ReLU) and Linear-BN folded with the BN's
    running statistics) and every prepared ``QuantAdd`` / ``QuantCat`` / ``QuantMatmul`` is
    replaced by its :mod:`qatx.nn.quantized` module (:data:`CONVERSIONS`); shared modules stay
    shared. A ReLU module that alone consumes an INT8 Linear/Conv/Add output (read from the
    torch.fx graph when the model traces) becomes that module's fused ReLU and an ``nn.Identity``. The
    integer weights are exactly those the weight fake-quantize produced. The result is in eval
    mode.

    ``integer_activations`` (default True): an INT8 Linear/Conv/Add whose output only feeds INT8
    layers that quantize it to one grid (directly, or through ``nn.Identity``, ``nn.Flatten``,
    ``nn.Dropout``, ``nn.MaxPool2d`` (made a :class:`qatx.nn.quantized.MaxPool2d`), ``flatten``,
    ``reshape``, ``view``) writes that grid's integers (uint8 / int8)
    instead of float32, and the consumers read them as they are: the same results bit for bit,
    without a float32 tensor and a quantization pass between the layers. The model's outputs
    and everything else stay float32. Layers on CUDA keep float32 (their kernels read and write
    float32, so integers would add conversion passes); a model chained on the CPU still runs on
    CUDA after ``.cuda()``, converting the integers there.

    Raises ``TypeError`` for a non-module, ``ValueError`` when the model has no QAT module
    (call :func:`qatx.prepare_qat` first) or a layer's input quantizer never observed data.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
               if type(m) in CONVERSIONS and (not isinstance(m, (QuantAdd, QuantCat, QuantMatmul)) or
                                              _is_prepared_op(m))]
    if not any(isinstance(m, qat.QATModule) for _, m in targets):
        raise ValueError("convert: the model has no qatx QAT layer; prepare it with qatx.prepare_qat and train or "
                         "calibrate it first")
    if not inplace:
        model = copy.deepcopy(model)
    converted: Dict[int, nn.Module] = {}
    for name, _ in targets:
        mod = model.get_submodule(name) if name else model
        if id(mod) not in converted:
            converted[id(mod)] = CONVERSIONS[type(mod)].from_qat(mod)
        if name == "":
            return converted[id(mod)].eval()
        _set_module(model, name, converted[id(mod)])
    _fuse_relus(model)
    if integer_activations:
        _chain_integer_activations(model)
    return model.eval()


def model_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (the on-disk size of the weights and buffers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_size expects an nn.Module, got {type(model).__name__}")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _as_batches(inputs: Any) -> List[tuple]:
    if isinstance(inputs, Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    if isinstance(inputs, list) and inputs:
        return [b if isinstance(b, tuple) else (b,) for b in inputs]
    raise TypeError("inputs must be a tensor, a tuple of tensors (one call) or a non-empty list of those (one call each)")


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def compare(qat_model: nn.Module, int8_model: nn.Module, inputs: Any) -> Table:
    """Per-layer parity of an INT8 model with the QAT model it came from (see the module docstring).

    ``inputs``: a tensor, a tuple of tensors (one call), or a list of those. Both models run in
    eval mode without gradients (their modes are restored afterwards). Returns a
    :class:`qatx.report.Table`: ``rows`` (one dict per layer: ``layer``, ``type``,
    ``max_err_lsb``, ``sqnr_db``, and ``top1_agree`` on the model-output row) and ``str(table)``.
    """
    if not isinstance(qat_model, nn.Module) or not isinstance(int8_model, nn.Module):
        raise TypeError("compare expects two nn.Modules (the QAT model and its converted INT8 model)")
    batches = _as_batches(inputs)
    int8_layers = {n: m for n, m in int8_model.named_modules() if type(m) in set(CONVERSIONS.values())}
    qat_layers = dict(qat_model.named_modules())
    names = [n for n in int8_layers if n in qat_layers and type(qat_layers[n]) in CONVERSIONS]
    if not names:
        raise ValueError("compare: no layer of int8_model matches a QAT layer of qat_model by name; pass the model "
                         "qatx.convert was given and its result")
    records: Dict[str, Dict[str, List[Tensor]]] = {n: {"ref": [], "out": []} for n in names + [""]}
    hooks = []

    def hook(name: str, key: str, relu: bool = False, grid: Optional[nn.Module] = None):
        def fn(mod, _inp, out):
            t = _first_tensor(out)
            if t is not None:
                t = t.detach().relu() if relu else t.detach()
                if not t.is_floating_point() and hasattr(mod, "dequantize_output"):
                    t = mod.dequantize_output(t)  # a layer writing its consumers' integers
                if grid is not None:  # the QAT output as those consumers see it
                    t = torch.ops.qatx.fake_quantize_per_tensor_affine(
                        t.float(), grid.output_scale.to(t.device), grid.output_zero_point.to(t.device),
                        grid.output_quant_min, grid.output_quant_max)
                records[name][key].append(t.float().cpu())
        return fn

    for n in names:
        # A ReLU that convert fused into the INT8 layer is applied to the QAT layer's output too.
        fused_relu = bool(getattr(int8_layers[n], "relu", False)) and not getattr(qat_layers[n], "with_relu", False)
        grid = int8_layers[n] if getattr(int8_layers[n], "output_scale", None) is not None else None
        hooks.append(qat_layers[n].register_forward_hook(hook(n, "ref", fused_relu, grid)))
        hooks.append(int8_layers[n].register_forward_hook(hook(n, "out")))
    modes = (qat_model.training, int8_model.training)
    # Observers would move the QAT model's qparams while it is being compared.
    observing = [(q, q.observer_enabled) for q in qat_model.modules() if isinstance(q, _Toggles)]
    try:
        for q, _ in observing:
            q.observer_enabled = False
        qat_model.eval()
        int8_model.eval()
        with torch.no_grad():
            for b in batches:
                records[""]["ref"].append(_first_tensor(qat_model(*b)).detach().float().cpu())
                records[""]["out"].append(_first_tensor(int8_model(*b)).detach().float().cpu())
    finally:
        for h in hooks:
            h.remove()
        for q, flag in observing:
            q.observer_enabled = flag
        qat_model.train(modes[0])
        int8_model.train(modes[1])

    rows = []
    for n in names + [""]:
        ref = torch.cat([t.reshape(-1) for t in records[n]["ref"]])
        out = torch.cat([t.reshape(-1) for t in records[n]["out"]])
        step = float(ref.max() - ref.min()) / 255 if ref.numel() else 0.0
        err = float((out - ref).abs().max()) if ref.numel() else 0.0
        noise = float(((out.double() - ref.double()) ** 2).sum())
        signal = float((ref.double() ** 2).sum())
        row = {"layer": n or "(model output)",
               "type": type(int8_layers[n]).__name__ if n else type(int8_model).__name__,
               "max_err_lsb": err / step if step > 0 else (0.0 if err == 0 else math.inf),
               "sqnr_db": math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf),
               "top1_agree": None}
        if not n:
            r, o = records[""]["ref"], records[""]["out"]
            if all(t.dim() == 2 for t in r):
                agree = sum(int((a.argmax(1) == b.argmax(1)).sum()) for a, b in zip(r, o))
                row["top1_agree"] = agree / sum(t.shape[0] for t in r)
        rows.append(row)
    return Table(rows, ["layer", "type", "max_err_lsb", "sqnr_db", "top1_agree"])


def quantize_dynamic(model: nn.Module, bits: int = 8, granularity: str = "per_tensor",
                     modules: Optional[Set[Type[nn.Module]]] = None, inplace: bool = False) -> nn.Module:
    """Post-training dynamic quantization: every module whose type is in ``modules`` (default
    ``{nn.Linear}``, the only type supported) becomes a :class:`qatx.nn.quantized.DynamicLinear`:
    per-output-channel symmetric int``bits`` weights (``bits`` 8 or 4, max-abs scale, computed
    once), activations quantized to uint8 from each call's range (``granularity``
    ``"per_tensor"`` or ``"per_row"``), int32 accumulation. Returns the model in eval mode (a
    copy unless ``inplace``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_dynamic expects an nn.Module, got {type(model).__name__}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if granularity not in ("per_tensor", "per_row"):
        raise ValueError(f"granularity must be 'per_tensor' or 'per_row', got {granularity!r}")
    modules = {nn.Linear} if modules is None else set(modules)
    unsupported = [t for t in modules if t is not nn.Linear]
    if unsupported:
        raise ValueError(f"quantize_dynamic supports modules={{nn.Linear}}, got {[t.__name__ for t in unsupported]}")
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in modules:
        return nnq.DynamicLinear.from_float(model, bits, granularity == "per_row")
    done: Dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if type(mod) in modules:
            if id(mod) not in done:
                done[id(mod)] = nnq.DynamicLinear.from_float(mod, bits, granularity == "per_row")
            _set_module(model, name, done[id(mod)])
    return model.eval()
