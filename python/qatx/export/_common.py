"""What every qatx export format shares: the metadata saved with each file, the version rule
applied when loading, the inference copy of a model, and argument checks."""
import copy
import json
import os
from typing import Any, Dict, Tuple

import torch
from torch import nn

__all__ = ["ExportFormatError", "FORMAT_VERSION", "METADATA_KEY"]

#: Version of the layout of qatx's export files (the metadata keys and their meaning).
FORMAT_VERSION = 1
#: Name of the metadata entry (TorchScript extra file, .pt2 extra file, ONNX metadata_props).
METADATA_KEY = "qatx_metadata.json"


class ExportFormatError(ValueError):
    """A file that qatx cannot load: truncated or corrupt, not written by ``qatx.export``, or
    written by an incompatible qatx version. The message names the file and the fix."""


def _version_tuple(version: str) -> Tuple[int, int, int]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3])  # type: ignore[return-value]


def metadata(kind: str) -> Dict[str, Any]:
    import qatx

    return {"format": "qatx-export", "format_version": FORMAT_VERSION, "kind": kind,
            "qatx_version": qatx.__version__, "torch_version": torch.__version__}


def metadata_bytes(kind: str) -> bytes:
    return json.dumps(metadata(kind), sort_keys=True).encode()


def check_metadata(raw, path: str, kind: str) -> Dict[str, Any]:
    """Parses and checks the metadata read from ``path``. Compatible: the same format version
    and the same qatx MAJOR.MINOR (qatx 0.x may change its ops between minor versions)."""
    import qatx

    if raw is None or len(raw) == 0:
        raise ExportFormatError(f"{path}: no qatx metadata ({METADATA_KEY}): the file was not written by "
                                f"qatx.export.{kind}; load it with the plain torch loader instead")
    try:
        meta = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ExportFormatError(f"{path}: the qatx metadata ({METADATA_KEY}) is unreadable ({e}): the file is corrupt") \
            from None
    if meta.get("format") != "qatx-export" or meta.get("kind") != kind:
        raise ExportFormatError(f"{path}: the metadata says format={meta.get('format')!r}, kind={meta.get('kind')!r}; "
                                f"expected a 'qatx-export' file of kind {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportFormatError(f"{path}: export format version {meta.get('format_version')!r}, but qatx "
                                f"{qatx.__version__} reads version {FORMAT_VERSION}: re-export the model with this qatx")
    saved = str(meta.get("qatx_version", ""))
    try:
        compatible = _version_tuple(saved)[:2] == _version_tuple(qatx.__version__)[:2]
    except ValueError:
        compatible = False
    if not compatible:
        raise ExportFormatError(f"{path}: saved by qatx {saved or '(unknown)'}, which is incompatible with the "
                                f"installed qatx {qatx.__version__} (the MAJOR.MINOR versions must match): re-export "
                                f"the model with qatx {qatx.__version__}, or load it with qatx {saved}")
    return meta


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_inputs(example_inputs) -> Tuple[Any, ...]:
    """``example_inputs`` as a tuple of positional arguments (a single tensor is allowed)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tensor or a tuple of positional arguments, "
                        f"got {type(example_inputs).__name__}")
    return example_inputs


def check_save_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path {path!r}: the directory {parent!r} does not exist")
    return path


def check_load_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    return path


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every observer off, so that the qparams stay as trained
    and a forward changes nothing, and with parameters that need no gradient (no autograd
    nodes are recorded, whose saved sizes would fix a dynamic batch size in torch.export)."""
    from ..prepare import enable_observer

    model = copy.deepcopy(model).eval()
    enable_observer(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def outputs_equal(a, b) -> bool:
    """Exact equality of (nested) outputs; NaNs compare equal to NaNs."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(outputs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(outputs_equal(a[k], b[k]) for k in a)
    return a == b


def read_zip_metadata(path: str, what: str):
    """The bytes of ``<archive>/extra/qatx_metadata.json`` in the zip archive ``path`` (TorchScript
    and .pt2 files are zip archives), or None when absent; read before the model is
    deserialised, so that an incompatible file is reported as such and not as a missing op."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC for {bad}")
            for name in z.namelist():
                if name.endswith("/extra/" + METADATA_KEY) or name == "extra/" + METADATA_KEY:
                    return z.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ExportFormatError(f"{path}: not a valid {what} file (truncated or corrupt zip archive: {e})") from None
    return None
