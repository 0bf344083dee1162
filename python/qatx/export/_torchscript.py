"""TorchScript export: a scripted (or traced and checked) module saved with qatx metadata,
loadable with ``torch.jit.load`` after ``import qatx`` and from C++ with libqatx linked."""
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ._common import (METADATA_KEY, ExportFormatError, check_inputs, check_load_path, check_metadata, check_model,
                      check_save_path, inference_copy, metadata_bytes, outputs_equal, read_zip_metadata)

__all__ = ["torchscript", "load_torchscript"]


def _script_or_trace(model: nn.Module, inputs, method: str):
    """(module, traced)"""
    if method in ("auto", "script"):
        try:
            return torch.jit.script(model), False
        except Exception as e:  # torch.jit raises many error types for unscriptable Python
            if method == "script":
                raise RuntimeError(f"torch.jit.script failed on {type(model).__name__}: {e}") from e
            warnings.warn(f"qatx.export.torchscript: torch.jit.script failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); tracing with the example inputs instead",
                          stacklevel=3)
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs, check_trace=False)
    return traced, True


def torchscript(model: nn.Module, example_inputs, path, freeze: bool = True, method: str = "auto"
                ) -> torch.jit.ScriptModule:
    """Compiles ``model`` to TorchScript and saves it to ``path``; returns the saved module.

    The model is copied (``model`` itself is left as it is). ``method="auto"`` scripts it with
    ``torch.jit.script`` and falls back to ``torch.jit.trace`` with ``example_inputs`` when
    scripting fails (with a warning); a traced module is accepted only if its outputs on
    ``example_inputs`` equal the eager model's bit for bit (else ``RuntimeError``: the model has
    input-dependent control flow that a trace cannot capture). ``"script"`` / ``"trace"`` force one.

    Eval-mode models are exported for inference: their observers are turned off (the qparams
    stay as trained) and, with ``freeze=True``, the module is frozen (``torch.jit.freeze``:
    parameters and attributes inlined as constants). Training-mode models are saved unfrozen,
    with observers as they are, so that they can be fine-tuned (e.g. from C++ with
    ``torch::jit::load`` and ``torch::optim``).

    The file holds an extra file ``qatx_metadata.json`` (qatx and torch versions, format
    version) checked by :func:`load_torchscript`.
    """
    check_model(model)
    inputs = check_inputs(example_inputs)
    path = check_save_path(path)
    if method not in ("auto", "script", "trace"):
        raise ValueError(f"method must be 'auto', 'script' or 'trace', got {method!r}")
    if not isinstance(freeze, bool):
        raise TypeError(f"freeze must be a bool, got {freeze!r}")
    import copy

    training = model.training
    model = copy.deepcopy(model) if training else inference_copy(model)
    # The reference outputs come from a copy: a training-mode forward updates observers and BN statistics.
    with torch.no_grad():
        expected = copy.deepcopy(model)(*inputs)
    module, traced = _script_or_trace(copy.deepcopy(model), inputs, method)
    if traced:
        with torch.no_grad():
            got = copy.deepcopy(module)(*inputs) if training else module(*inputs)
        if not outputs_equal(got, expected):
            raise RuntimeError(f"qatx.export.torchscript: the traced {type(model).__name__} does not reproduce the "
                               f"eager outputs on example_inputs (input-dependent control flow?); make the model "
                               f"scriptable instead")
    if freeze and not training:
        module = torch.jit.freeze(module)
    torch.jit.save(module, path, _extra_files={METADATA_KEY: metadata_bytes("torchscript")})
    return module


def load_torchscript(path, map_location: Optional[Any] = None) -> torch.jit.ScriptModule:
    """Loads a file written by :func:`torchscript` (``import qatx`` has registered the ops).

    Raises ``FileNotFoundError`` for a missing file and :class:`qatx.export.ExportFormatError`
    (a ``ValueError``) for a truncated or corrupt file, a TorchScript file without qatx metadata,
    or one saved by an incompatible qatx version (MAJOR.MINOR differ)."""
    path = check_load_path(path)
    check_metadata(read_zip_metadata(path, "TorchScript"), path, "torchscript")
    extra = {METADATA_KEY: ""}
    try:
        module = torch.jit.load(path, map_location=map_location, _extra_files=extra)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFormatError(f"{path}: not a loadable TorchScript archive (truncated or corrupt?): {first}") from e
    return module
