"""DDP and FSDP2 training of a prepared model: 2 CPU ranks (gloo) train a few steps on different
data and end with identical weights, learnable scales, observer ranges and qparams."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import ddp_qat  # noqa: E402  (examples/ddp_qat.py: the recipe under test)

TIMEOUT_S = 180


def _worker(rank, world_size, store, config, save_dir, fsdp=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        ddp_qat.train(rank, world_size, steps=4, config=config, save_dir=save_dir, fsdp=fsdp)
    finally:
        dist.destroy_process_group()


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _check_identical(save_dir):
    s0, s1 = (torch.load(os.path.join(save_dir, f"rank{r}.pt")) for r in (0, 1))
    assert s0.keys() == s1.keys()
    compared = []
    for key, v0 in s0.items():
        if not isinstance(v0, torch.Tensor) or key.rsplit(".", 1)[-1] in BN_STATS:
            continue  # BN running statistics: each rank's last batch (DDP broadcasts rank 0's at the next forward)
        assert torch.equal(v0, s1[key]), key
        compared.append(key)
    return compared


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_ddp_two_ranks_stay_identical(tmp_path, fsdp):
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path / "store"), "W4A4_LSQ", str(tmp_path), fsdp), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP ranks did not finish in {TIMEOUT_S} s")
    compared = _check_identical(str(tmp_path))
    assert "0.weight_quantizer.scale" in compared and "0.input_quantizer.scale" in compared  # learned scales
    assert "0.input_quantizer.observer.max_val" in compared and "0.weight" in compared
    s0 = torch.load(os.path.join(str(tmp_path), "rank0.pt"))
    torch.manual_seed(0)
    initial = ddp_qat.make_model().state_dict()
    assert not torch.equal(s0["0.weight"], initial["0.weight"])  # it trained


def test_ddp_example_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join("examples", "ddp_qat.py"), "--steps", "3", "--config", "W8A8", "--save-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step   2" in proc.stdout and "weight_sqnr_db" in proc.stdout
    compared = _check_identical(str(tmp_path))
    assert "0.input_quantizer.scale" in compared and "3.input_quantizer.observer.min_val" in compared  # observed qparams
