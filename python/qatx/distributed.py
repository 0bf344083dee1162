"""Data-parallel QAT helpers.

With ``DistributedDataParallel`` the learnable quantizer parameters (LSQ scales and zero
points, PACT clipping values) are ordinary parameters, so DDP all-reduces their gradients
and they stay identical on every rank. Observer statistics and observed qparams are buffers:
DDP (``broadcast_buffers=True``, its default) copies rank 0's buffers to every rank at the
start of each forward, and during that forward each rank adds its own batch to them. To end
a step (or training) with identical observers everywhere, call :func:`sync_observers`.

The recipe (``examples/ddp_qat.py``)::

    model = qatx.prepare_qat(model, qconfig)
    model(calibration_batch)      # first forward: initialises LSQ scales and observer shapes
    ddp = DDP(model)              # broadcasts rank 0's parameters and buffers: all ranks equal
    ... train ...
    qatx.sync_observers(model)    # global ranges before saving or converting

FSDP2 works the same way with ``fully_shard`` on every QAT layer and on the root in place of
``DDP``; FSDP does not broadcast buffers, so the observers see each rank's data until
``sync_observers`` (``examples/ddp_qat.py --fsdp``).
"""
import torch
import torch.distributed as dist
from torch import nn

from .observers import HistogramObserver
from .quantizers import FakeQuantize, LearnableFakeQuantize

__all__ = ["sync_observers"]


@torch.no_grad()
def sync_observers(model: nn.Module, group=None) -> nn.Module:
    """All-reduces every observer's range across the ranks of ``group`` (MIN of the minima,
    MAX of the maxima, so a running min/max becomes the range over all ranks' data) and
    recomputes the qparams of the observer-based quantizers from it. Every rank must call it,
    after every quantizer has seen data."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_observers needs an initialised torch.distributed process group")
    for q in model.modules():
        if not isinstance(q, (FakeQuantize, LearnableFakeQuantize)):
            continue
        obs = q.observer
        if isinstance(obs, HistogramObserver):
            raise ValueError("sync_observers: histogram observers cannot be merged across ranks; calibrate them on "
                             "one rank and broadcast the model (e.g. load its state_dict everywhere)")
        if obs.min_val.numel() == 0:
            raise RuntimeError("sync_observers: a quantizer has not seen data yet; run a forward pass on every rank "
                               "first")
        dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX, group=group)
        if isinstance(q, FakeQuantize):
            q.update_qparams()
    return model
