"""Checkpoints that fail loudly: :func:`save_checkpoint` writes atomically, :func:`load_checkpoint`
verifies every record of the file before unpickling it.

``torch.save`` writes a zip archive with a CRC-32 per record, but ``torch.load`` does not verify
them: a flipped byte in a tensor's data (or in an integer of the pickle) loads silently as a
wrong weight, scale or flag. :func:`load_checkpoint` checks all CRC-32s first and raises a
``RuntimeError`` naming the file and the damaged record; a truncated or non-checkpoint file
raises a ``RuntimeError`` too. It then loads with ``weights_only=True`` (tensors, containers and
plain values only), which is all a state_dict or an optimizer state needs.
"""
import os
import zipfile
from typing import Any, Optional

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same directory, flushed to disk
    and renamed over ``path``: a crash while saving leaves the previous checkpoint intact, never a
    truncated one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location: Optional[Any] = None) -> Any:
    """Loads what :func:`save_checkpoint` (or ``torch.save``) wrote, after verifying the CRC-32 of
    every record. Raises ``RuntimeError`` for a truncated, corrupted or non-checkpoint file."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise RuntimeError(f"load_checkpoint: {path} is truncated or not a checkpoint written by torch.save "
                           f"({type(e).__name__}: {e})") from None
    except Exception as e:  # zlib / struct errors from a damaged header
        raise RuntimeError(f"load_checkpoint: {path} is corrupted ({type(e).__name__}: {e})") from None
    if damaged is not None:
        raise RuntimeError(f"load_checkpoint: {path} is corrupted: the CRC-32 of record {damaged!r} does not match "
                           f"its data")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"load_checkpoint: {path} could not be loaded ({type(e).__name__}: {e})") from e
