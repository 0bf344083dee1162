"""``torch.export`` programs: the inference graph of a qatx model with its ``torch.ops.qatx``
ops (which have Meta kernels, so they trace), saved as ``.pt2``."""
from typing import Optional

import torch
from torch import nn

from ._common import (METADATA_KEY, ExportFormatError, check_inputs, check_load_path, check_metadata, check_model,
                      check_save_path, inference_copy, metadata, read_zip_metadata)

__all__ = ["program", "load_program"]


def program(model: nn.Module, example_inputs, path, dynamic_shapes=None, strict: bool = False
            ) -> torch.export.ExportedProgram:
    """Exports the inference graph of ``model`` with ``torch.export.export`` and saves it to
    ``path`` (``torch.export.save``, conventionally ``.pt2``); returns the program.

    The model is copied, put in eval mode and its observers are turned off, so the program
    computes with the trained qparams and mutates nothing. ``dynamic_shapes`` and ``strict``
    are passed to ``torch.export.export``. Run the loaded program with
    ``load_program(path).module()(*inputs)`` after ``import qatx``.
    """
    check_model(model)
    inputs = check_inputs(example_inputs)
    path = check_save_path(path)
    import json

    exported = torch.export.export(inference_copy(model), inputs, dynamic_shapes=dynamic_shapes, strict=strict)
    torch.export.save(exported, path, extra_files={METADATA_KEY: json.dumps(metadata("program"), sort_keys=True)})
    return exported


def load_program(path) -> torch.export.ExportedProgram:
    """Loads a file written by :func:`program`; ``.module()`` of the result runs it.

    Raises ``FileNotFoundError`` for a missing file and :class:`qatx.export.ExportFormatError`
    for a truncated or corrupt file, a program without qatx metadata, or one saved by an
    incompatible qatx version."""
    path = check_load_path(path)
    check_metadata(read_zip_metadata(path, ".pt2 program"), path, "program")
    try:
        return torch.export.load(path)
    except Exception as e:  # torch.export.load raises several types for damaged archives
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFormatError(f"{path}: not a loadable torch.export program (corrupt?): "
                                f"{type(e).__name__}: {first}") from e
