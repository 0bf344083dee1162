"""The CPU output cache of the qatx ops.

Freshly mapped memory costs a page fault per 4 KiB page on first touch, and glibc returns large
freed blocks to the system, so an op whose output is new memory on every call pays for faulting
it in every time (on virtual machines several microseconds per page: more than computing an INT8
layer's output). The qatx ops therefore take CPU outputs of 128 KiB or more from a cache of freed
blocks: a freed output waits there for the next output of the same size, which a model's forward
asks for on every call. The cache holds at most its limit (512 MiB by default); past it, the
oldest blocks are freed first. Outputs are ordinary tensors; only where their memory comes from
differs.
"""
from typing import Dict

from . import _C

__all__ = ["cpu_cache_stats", "set_cpu_cache_limit", "empty_cpu_cache"]


def cpu_cache_stats() -> Dict[str, int]:
    """``{"cached_bytes", "limit_bytes", "reused", "allocated"}``: bytes held by freed blocks,
    the limit, and how many outputs of at least 128 KiB were served from the cache or needed new
    memory since the process started."""
    return dict(zip(("cached_bytes", "limit_bytes", "reused", "allocated"), _C.cpu_cache_stats()))


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Sets the most bytes the cache holds (``0`` turns it off) and frees what exceeds it.
    Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    return _C.set_cpu_cache_limit(limit_bytes)


def empty_cpu_cache() -> int:
    """Frees every cached block (outputs still in use are not touched); returns the bytes freed."""
    return _C.empty_cpu_cache()
