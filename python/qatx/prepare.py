r"""Preparing a float model for quantization-aware training.

:func:`prepare_qat` swaps supported layers for their QAT versions (:mod:`qatx.nn.qat`) and
gives the op modules (:class:`qatx.nn.QuantAdd`, ``QuantCat``, ``QuantMatmul``) their
quantizers. Which config a module gets: the first ``skip`` pattern that matches its name keeps
it float; else the first ``overrides`` pattern that matches (``fnmatch`` syntax over
``named_modules`` names, e.g. ``"features.0"``, ``"layer*.conv2"``) gives its QConfig, or
keeps it float when the value is ``None``; else ``qconfig``.

Fusion (``fuse=True``): a Conv1d/2d/3d followed by the BatchNorm1d/2d/3d of its output
(optionally then an ``nn.ReLU``), or a Linear followed by a BatchNorm1d, becomes one fused
module with simulated BN folding (:mod:`qatx.nn.qat.fused`); the BN and ReLU slots become
``nn.Identity``. "Followed by" is read from the model's ``torch.fx`` graph when the model
traces: each module in the chain is called once and its output is used only by the next one.
Models that do not trace fall back to consecutive children of ``nn.Sequential`` containers
(which run in order by construction). The config of a fused group is the config of its first
module.

Every other ``nn.ReLU`` (not in-place, not kept float by ``skip``/``overrides``) becomes a
:class:`qatx.nn.ReLU`: the same function, but its backward keeps a bool mask instead of its
output, which the next layer's input quantizer does not need (less memory per training step).

Already prepared models (e.g. calibrated by :func:`qatx.calibrate`) are accepted: each prepared
module keeps its quantizers when its config is unchanged, or gets the new config's quantizers
started from the old ranges (:func:`qatx.transfer_qparams`), so QAT fine-tunes the PTQ model.
"""
import copy
import fnmatch
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from . import quantizers
from .config import QConfig
from .nn import QuantAdd, QuantCat, QuantMatmul, ReLU
from .nn import qat
from .ptq import transfer_qparams

__all__ = ["prepare_qat", "enable_fake_quant", "enable_observer", "freeze_bn_stats", "QAT_MODULES"]

#: float class -> QAT class
QAT_MODULES = {
    nn.Linear: qat.Linear, nn.Conv1d: qat.Conv1d, nn.Conv2d: qat.Conv2d, nn.Conv3d: qat.Conv3d,
    nn.ConvTranspose1d: qat.ConvTranspose1d, nn.ConvTranspose2d: qat.ConvTranspose2d,
    nn.ConvTranspose3d: qat.ConvTranspose3d, nn.Embedding: qat.Embedding,
}
_OP_MODULES = (QuantAdd, QuantCat, QuantMatmul)
# (layer, bn) -> (fused class, fused class with ReLU or None)
_FUSIONS = {
    (nn.Conv1d, nn.BatchNorm1d): (qat.ConvBn1d, qat.ConvBnReLU1d),
    (nn.Conv2d, nn.BatchNorm2d): (qat.ConvBn2d, qat.ConvBnReLU2d),
    (nn.Conv3d, nn.BatchNorm3d): (qat.ConvBn3d, qat.ConvBnReLU3d),
    (nn.Linear, nn.BatchNorm1d): (qat.LinearBn1d, None),
}


def _fusable(layer: nn.Module, bn: nn.Module) -> bool:
    return (type(layer), type(bn)) in _FUSIONS and bn.affine and bn.track_running_stats and \
        bn.num_features == layer.weight.shape[0]


def _graph_chains(model: nn.Module) -> List[List[str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def next_module(node):  # the only user of node, if it is a module called once
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1:
            return users[0]
        return None

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = next_module(node)
        if bn is None or not _fusable(modules[node.target], modules[bn.target]):
            continue
        chain = [node.target, bn.target]
        relu = next_module(bn)
        if relu is not None and type(modules[relu.target]) is nn.ReLU:
            chain.append(relu.target)
        chains.append(chain)
    return chains


def _sequential_chains(model: nn.Module) -> List[List[str]]:
    chains = []
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        names = [n for n, _ in mod.named_children()]
        i = 0
        while i + 1 < len(names):
            layer, bn = mod[i], mod[i + 1]
            if not _fusable(layer, bn):
                i += 1
                continue
            chain = [f"{prefix}.{names[i]}" if prefix else names[i], f"{prefix}.{names[i + 1]}" if prefix else names[i + 1]]
            if i + 2 < len(names) and type(mod[i + 2]) is nn.ReLU:
                chain.append(f"{prefix}.{names[i + 2]}" if prefix else names[i + 2])
            chains.append(chain)
            i += len(chain)
    return chains


def _fusion_chains(model: nn.Module) -> List[List[str]]:
    try:
        return _graph_chains(model)
    except Exception:  # models with data-dependent control flow do not trace: Sequential rule only
        return _sequential_chains(model)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.get_default_device()


def prepare_qat(model: nn.Module, qconfig: QConfig, *, overrides: Optional[Dict[str, Optional[QConfig]]] = None,
                skip: Optional[Iterable[str]] = None, fuse: bool = True, inplace: bool = False,
                freeze_bn_after: int = -1) -> nn.Module:
    """The model with QAT layers swapped in (see the module docstring for the rules).

    Args:
        qconfig: the default :class:`qatx.QConfig`.
        overrides: ``{pattern: QConfig or None}``; the first matching pattern wins, ``None`` keeps float.
        skip: patterns of modules to keep float.
        fuse: fuse Conv+BN(+ReLU) and Linear+BN1d with simulated BN folding.
        inplace: modify ``model`` instead of a deep copy.
        freeze_bn_after: freeze the BN statistics of fused layers after this many batches (-1: never).

    Raises ``TypeError`` for a bad config and ``ValueError`` for a pattern that matches no module.
    """
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"qconfig must be a qatx.QConfig, got {type(qconfig).__name__}")
    overrides = dict(overrides or {})
    for pattern, qc in overrides.items():
        if qc is not None and not isinstance(qc, QConfig):
            raise TypeError(f"overrides[{pattern!r}] must be a qatx.QConfig or None, got {type(qc).__name__}")
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    for pattern in list(overrides) + skip:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"pattern {pattern!r} matches no module name; names look like {names[1:6]}")
    if not inplace:
        model = copy.deepcopy(model)

    def config_of(name: str) -> Optional[QConfig]:
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            return None
        for pattern, qc in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return qc
        return qconfig

    if fuse:
        for chain in _fusion_chains(model):
            qc = config_of(chain[0])
            if qc is None:
                continue
            mods = [model.get_submodule(n) for n in chain]
            variants = _FUSIONS[(type(mods[0]), type(mods[1]))]
            if variants[len(chain) - 2] is None:  # no fused ReLU variant (Linear-BN): the ReLU stays
                chain, mods = chain[:2], mods[:2]
            fused = variants[len(chain) - 2]
            _set_module(model, chain[0], fused.from_float(nn.Sequential(*mods), qc, freeze_bn_after=freeze_bn_after))
            for name in chain[1:]:
                _set_module(model, name, nn.Identity())

    # The ReLUs left (after residual adds, or reused ones) keep a bool mask for the backward
    # instead of their output (qatx.nn.ReLU): the next layer's quantizer keeps its own copy.
    relus: Dict[int, nn.Module] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if type(mod) is nn.ReLU and not mod.inplace and name and config_of(name) is not None:
            _set_module(model, name, relus.setdefault(id(mod), ReLU()))

    device = _model_device(model)
    swapped: Dict[int, nn.Module] = {}  # shared modules stay shared
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        prepared = isinstance(mod, qat.QATModule) or (isinstance(mod, _OP_MODULES) and mod.qconfig is not None)
        if type(mod) not in QAT_MODULES and not isinstance(mod, _OP_MODULES) and not prepared:
            continue
        qc = config_of(name)
        if qc is None and not prepared:
            continue
        if id(mod) not in swapped:
            if prepared:
                swapped[id(mod)] = _reprepare(mod, qc, device, freeze_bn_after)
            else:
                swapped[id(mod)] = QAT_MODULES[type(mod)].from_float(mod, qc) if type(mod) in QAT_MODULES else \
                    type(mod).from_float(mod, qc, device=device)
        if name == "":
            return swapped[id(mod)]
        _set_module(model, name, swapped[id(mod)])
    return model


def _reprepare(mod: nn.Module, qc: Optional[QConfig], device: torch.device, freeze_bn_after: int = -1) -> nn.Module:
    """An already prepared module (e.g. from a calibrated PTQ model) under config ``qc``: kept
    with its quantizers when ``qc`` is its config, given new quantizers that start from the old
    ones' ranges (:func:`qatx.ptq.transfer_qparams`) when it differs, made float when ``qc`` is None.
    Observation and fake quantization are turned on, as in a freshly prepared model; a fused
    layer takes ``freeze_bn_after`` when it is given (>= 0)."""
    if qc is None:
        return mod.to_float()
    names = [n for n, child in mod.named_children() if isinstance(child, quantizers._Toggles)]
    old = {n: getattr(mod, n) for n in names}
    if qc != mod.qconfig:
        if isinstance(mod, qat.QATModule):
            mod._init_quantizers(qc)
        else:
            mod = type(mod).from_float(mod, qc, device=device)
        for n, q in old.items():
            transfer_qparams(q, getattr(mod, n))
    for q in mod.modules():
        if isinstance(q, quantizers._Toggles):
            q.enable_observer(True)
            q.enable_fake_quant(True)
    if freeze_bn_after >= 0 and hasattr(mod, "freeze_bn_after"):
        mod.freeze_bn_after = int(freeze_bn_after)
        mod._bn_batches = -1  # read bn.num_batches_tracked again at the next training step
    return mod


def _quantizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, quantizers._Toggles)]


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns fake quantization of every quantizer in ``model`` on or off."""
    for q in _quantizers(model):
        q.enable_fake_quant(enabled)
    return model


def enable_observer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns range observation (qparam updates) of every quantizer in ``model`` on or off."""
    for q in _quantizers(model):
        q.enable_observer(enabled)
    return model


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Makes every fused Conv/Linear+BN layer use (and stop updating) its running statistics."""
    for m in model.modules():
        if isinstance(m, qat.fused._BnFolded):
            m.freeze_bn_stats(frozen)
    return model
