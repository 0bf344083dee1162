"""Data-parallel quantization-aware training with qatx on CPU (gloo) or GPUs (nccl).

    torchrun --standalone --nproc_per_node 2 examples/ddp_qat.py [--steps 20] [--config W4A4_LSQ]
        [--fsdp] [--save-dir DIR]

Each rank trains a small Conv-BN-ReLU CNN (prepared with ``qatx.prepare_qat``) on its own
random batches; DDP all-reduces the gradients of the weights and of the learnable scales,
broadcasts rank 0's observer buffers at each forward, and ``qatx.sync_observers`` makes the
observed ranges global at the end. With ``--fsdp`` the model is sharded instead
(``torch.distributed.fsdp.fully_shard`` on every QAT layer and on the root): weights and
learnable scales are sharded across the ranks, all-gathered for each layer's forward and
backward and their gradients reduce-scattered; observer buffers stay per rank until
``sync_observers``. With ``--save-dir`` each rank writes its final (full) ``state_dict`` to
``DIR/rank{N}.pt`` (the tests compare them).
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import qatx


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def train(rank, world_size, steps, config, save_dir=None, fsdp=False):
    """The per-rank training loop; the process group must be initialised."""
    torch.manual_seed(0)  # same initial float model everywhere (DDP would broadcast rank 0's anyway)
    model = qatx.prepare_qat(make_model(), getattr(qatx.presets, config))
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data

    def batch():
        return torch.randn(16, 1, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    model(batch()[0])  # initialise LSQ scales and observer shapes before wrapping
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size,))
        for layer in model.modules():
            if isinstance(layer, qatx.nn.qat.QATModule):
                fully_shard(layer, mesh=mesh)  # one all-gather per layer, resharded after its use
        ddp = fully_shard(model, mesh=mesh)
    else:
        ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, t = batch()
        loss = F.cross_entropy(ddp(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    qatx.sync_observers(model)
    if save_dir is not None:
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(save_dir, f"rank{rank}.pt"))
    sharded = [m for m in model.modules() if hasattr(m, "unshard")] if fsdp else []
    for m in sharded:
        m.unshard()  # whole weights for the report (collectives: every rank calls them)
    if rank == 0:
        print(qatx.report(model))
    for m in sharded:
        m.reshard()
    # No rank tears the process group down while another still has collectives in flight (a gloo
    # rank that left early aborted its peer once, on a loaded 2-core machine).
    dist.barrier()
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--config", default="W4A4_LSQ", help="a qatx.presets name")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--save-dir")
    args = p.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(dist.get_rank(), dist.get_world_size(), args.steps, args.config, args.save_dir, args.fsdp)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
