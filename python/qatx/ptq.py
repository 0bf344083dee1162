r"""Post-training quantization: static (calibrated), weight-only (no calibration) and the
hand-over to quantization-aware training.

Static PTQ::

    model = qatx.prepare_ptq(float_model, qconfig)   # QAT layers, eval mode, weights observed
    qatx.calibrate(model, loader, num_batches=32)    # activation ranges from data
    int8_model = qatx.convert(model)

:func:`prepare_ptq` builds the same layers as :func:`qatx.prepare_qat` (with Conv-BN folded using
the running statistics, since the model is in eval mode), observes every weight once (weights
need no data), and turns activation observers on and fake quantization off. :func:`calibrate`
runs batches through the model with observers on and fake quantization off — each observer sees
the float activations of the float model, as in torch.ao's and TensorRT's calibration — then
turns observers off and fake quantization on: the model is then the fake-quantized PTQ model.

Without calibration: a config whose ``activation`` is ``None`` (e.g. ``presets.W4_WEIGHT_ONLY``)
needs no data; :func:`prepare_ptq` returns a model that is ready. Activation ranges known in
advance are set with :func:`set_activation_ranges`.

QAT from PTQ: :func:`qatx.prepare_qat` accepts a prepared (e.g. calibrated) model and starts
from its ranges; see :func:`transfer_qparams` for the rule.
"""
import copy
import fnmatch
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import quantizers
from .config import QConfig
from .observers import MinMaxObserver, calculate_qparams
from .quantizers import FakeQuantize, LearnableFakeQuantize

__all__ = ["prepare_ptq", "calibrate", "set_activation_ranges", "transfer_qparams"]

_WEIGHT = "weight_quantizer"


def _check_ptq_config(name: str, qc: Optional[QConfig]) -> None:
    if qc is None:
        return
    for field in ("weight", "activation"):
        spec = getattr(qc, field)
        if spec is not None and spec.learnable is not None:
            raise ValueError(f"{name}.{field}.learnable={spec.learnable!r}: post-training quantization takes its "
                             f"qparams from observed ranges; use learnable=None (and prepare_qat to learn them)")


def _named_quantizers(model: nn.Module):
    for name, mod in model.named_modules():
        if isinstance(mod, quantizers._Toggles):
            yield name, mod


def _is_weight_quantizer(name: str) -> bool:
    return name.rpartition(".")[2] == _WEIGHT


def prepare_ptq(model: nn.Module, qconfig: QConfig, *, overrides: Optional[Dict[str, Optional[QConfig]]] = None,
                skip: Optional[Iterable[str]] = None, fuse: bool = True, inplace: bool = False) -> nn.Module:
    """The model prepared for static or weight-only post-training quantization (eval mode).

    Same arguments and layer rules as :func:`qatx.prepare_qat`. The specs must not be learnable
    (``ValueError``). Weight qparams are computed here from the weights' own range (so a
    weight-only config needs no calibration); activation quantizers observe (fake quantization
    off) until :func:`calibrate` has run.
    """
    from .prepare import prepare_qat  # prepare imports this module for the PTQ hand-over

    _check_ptq_config("qconfig", qconfig)
    for pattern, qc in (overrides or {}).items():
        _check_ptq_config(f"overrides[{pattern!r}]", qc)
    model = prepare_qat(model if inplace else copy.deepcopy(model).eval(), qconfig, overrides=overrides, skip=skip,
                        fuse=fuse, inplace=True)
    model.eval()
    with torch.no_grad():
        for name, q in _named_quantizers(model):
            if _is_weight_quantizer(name):
                owner = model.get_submodule(name.rpartition(".")[0])
                q.enable_observer(True)
                owner._quantized_weight()  # observes the (BN-folded) weight and sets its qparams
                q.enable_observer(False)
                q.enable_fake_quant(True)
            else:
                q.enable_observer(True)
                q.enable_fake_quant(False)
    return model


def _first_input(batch: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return (batch[0],), {}
    raise TypeError(f"calibrate: each batch must be a Tensor, a non-empty (inputs, targets, ...) tuple/list or a dict "
                    f"of keyword arguments, got {type(batch).__name__}")


def calibrate(model: nn.Module, data: Iterable, num_batches: Optional[int] = None, progress: bool = True) -> nn.Module:
    """Runs ``data`` through a model from :func:`prepare_ptq` to record activation ranges, then
    freezes them: observers off, fake quantization on.

    Args:
        data: an iterable of batches: a Tensor (the input), a tuple/list whose first element is
            the input (``(images, labels)``), or a dict of keyword arguments.
        num_batches: stop after this many batches (``None``: all of ``data``); positive.
        progress: show a tqdm progress bar.

    Runs in eval mode without gradients. If the loop is interrupted (``KeyboardInterrupt`` or an
    exception from ``data`` or the model), the ranges recorded so far are kept, the quantizers'
    toggles are restored to what they were before the call and the exception propagates: the
    model is usable and ``calibrate`` can be called again to continue.
    """
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    qs = [q for _, q in _named_quantizers(model)]
    if not qs:
        raise ValueError("calibrate: the model has no qatx quantizers; prepare it with qatx.prepare_ptq first")
    saved = [(q.observer_enabled, q.fake_quant_enabled) for q in qs]
    was_training = model.training
    activation_qs = [q for name, q in _named_quantizers(model) if not _is_weight_quantizer(name)]
    from tqdm import tqdm

    total = num_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)
    seen = 0
    completed = False
    model.eval()
    try:
        for q in activation_qs:
            q.enable_observer(True)
            q.enable_fake_quant(False)
        with torch.no_grad(), tqdm(total=total, desc="calibrate", unit="batch", disable=not progress) as bar:
            for batch in data:
                if num_batches is not None and seen >= num_batches:
                    break
                args, kwargs = _first_input(batch)
                model(*args, **kwargs)
                seen += 1
                bar.update(1)
        if seen == 0:
            raise ValueError("calibrate: data yielded no batches")
        completed = True
    finally:
        if completed:
            for q in qs:
                q.enable_observer(False)
                q.enable_fake_quant(True)
        else:
            for q, (observing, quantizing) in zip(qs, saved):
                q.enable_observer(observing)
                q.enable_fake_quant(quantizing)
        model.train(was_training)
    return model


def _quantizer_range(q: nn.Module) -> Tuple[Tensor, Tensor]:
    """The float range ``[lo, hi]`` a quantizer's current qparams represent."""
    if isinstance(q, FakeQuantize):
        scale, zero_point = q.calculate_qparams()  # current even when the qparams are computed lazily
        zero_point = zero_point.float()
    elif isinstance(q, LearnableFakeQuantize):
        scale, zero_point = q.scale.detach(), q.zero_point.detach().float()
    else:
        raise TypeError(f"no qparams to read from a {type(q).__name__}")
    return (q.quant_min - zero_point) * scale, (q.quant_max - zero_point) * scale


def _has_qparams(q: nn.Module) -> bool:
    if isinstance(q, FakeQuantize):
        return q.observer.has_data()
    if isinstance(q, LearnableFakeQuantize):
        return q.initialized
    return False


def transfer_qparams(old: nn.Module, new: nn.Module) -> bool:
    r"""Starts quantizer ``new`` from the range that ``old``'s qparams represent,
    :math:`[(q_{min} - z) s, (q_{max} - z) s]` (per channel or group when the shapes agree),
    so that QAT continues from a calibrated PTQ model even with another config:

    * :class:`~qatx.FakeQuantize`: its observer starts from that range (and keeps updating it
      in training as its config says); the qparams are recomputed for its own integer range;
    * :class:`~qatx.LearnableFakeQuantize`: the scale (and, for LSQ+, the zero point) are set
      from :func:`qatx.calculate_qparams` of that range for its integer range, and marked
      initialised, so the first forward does not re-initialise them.

    Returns whether anything was transferred (not when ``old`` has no qparams yet, for a
    :class:`~qatx.PACT` on either side, or when the numbers of scales differ).
    """
    if not _has_qparams(old) or not isinstance(new, (FakeQuantize, LearnableFakeQuantize)):
        return False
    lo, hi = _quantizer_range(old)
    with torch.no_grad():
        if isinstance(new, FakeQuantize):
            if not isinstance(new.observer, MinMaxObserver) or new.granularity != old.granularity or \
                    lo.numel() != max(old.scale.numel(), 1):
                return False
            device = new.scale.device
            new.observer.min_val = lo.detach().reshape(-1).to(device).clone()
            new.observer.max_val = hi.detach().reshape(-1).to(device).clone()
            if new.granularity == "per_group":  # the observer keeps the group shape of the qparams
                new.observer.min_val = new.observer.min_val.reshape(old.scale.shape)
                new.observer.max_val = new.observer.max_val.reshape(old.scale.shape)
            new.update_qparams()
            return True
        if lo.numel() != new.scale.numel():
            return False
        scale, zero_point = calculate_qparams(lo, hi, new.quant_min, new.quant_max, not new.learn_zero_point)
        new.scale.copy_(scale.reshape(new.scale.shape).clamp(min=new.eps))
        if new.learn_zero_point:
            new.zero_point.copy_(zero_point.float().reshape(new.zero_point.shape))
        new.initialized = True
    return True


def set_activation_ranges(model: nn.Module, ranges: Dict[str, Tuple[float, float]]) -> nn.Module:
    """Fixes the input ranges of prepared layers without calibration: ``{pattern: (lo, hi)}``
    (``fnmatch`` over module names, e.g. ``"features.*"``) sets every activation quantizer of the
    matching modules (``input_quantizer``, ``other_quantizer``, ``output_quantizer``) to the range
    ``[lo, hi]``, turns its observer off and its fake quantization on.

    ``ValueError`` when ``lo > hi``, a bound is not finite, or a pattern matches no quantizer.
    """
    targets = [(name, q) for name, q in _named_quantizers(model)
               if not _is_weight_quantizer(name) and isinstance(q, FakeQuantize)]
    for pattern, bounds in ranges.items():
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"ranges[{pattern!r}] must be a (lo, hi) pair of numbers, got {bounds!r}") from None
        if not (torch.isfinite(torch.tensor([lo, hi])).all() and lo <= hi):
            raise ValueError(f"ranges[{pattern!r}] must be finite with lo <= hi, got ({lo}, {hi})")
        matched = [q for name, q in targets if fnmatch.fnmatchcase(name.rpartition(".")[0], pattern)]
        if not matched:
            raise ValueError(f"ranges: pattern {pattern!r} matches no module with an activation quantizer; "
                             f"candidates: {sorted({n.rpartition('.')[0] for n, _ in targets})[:8]}")
        for q in matched:
            if q.granularity != "per_tensor" or not isinstance(q.observer, MinMaxObserver):
                raise ValueError(f"ranges[{pattern!r}]: a fixed range needs a per_tensor activation quantizer with "
                                 f"a min/max observer")
            device = q.scale.device
            q.observer.min_val = torch.tensor([lo], device=device)
            q.observer.max_val = torch.tensor([hi], device=device)
            q.update_qparams()
            q.enable_observer(False)
            q.enable_fake_quant(True)
    return model
