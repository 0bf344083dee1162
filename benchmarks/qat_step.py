"""Training-step time of QAT models: FP32 vs qatx W8A8 vs qatx W4A4-LSQ vs torch.ao QAT.

Usage::

    PYTHONPATH=python python benchmarks/qat_step.py [--device cpu|cuda] [--json FILE]
        [--batch 128] [--steps N] [--quick] [--profile CONFIG]

Models (batch 128 by default):

* ``cnn``: a small ResNet-style CNN on 3x32x32 inputs: a Conv-BN-ReLU stem (32 channels),
  three residual blocks (Conv-BN-ReLU, Conv-BN, residual add through ``qatx.nn.QuantAdd``,
  ReLU; the second and third halve the resolution and double the channels with a strided
  1x1 Conv-BN shortcut), global average pooling and a Linear classifier.
* ``mlp``: Linear(784, 1024)-ReLU-Linear(1024, 1024)-ReLU-Linear(1024, 10).

Configs: ``fp32`` (the float model), ``qatx_w8a8`` (``qatx.prepare_qat`` with
``qatx.presets.W8A8``: Conv-BN folded, int8 per-channel weights, uint8 activations),
``qatx_w4a4_lsq`` (``presets.W4A4_LSQ``) and ``torch_ao_w8a8`` (``prepare_qat_fx`` with
torch's default x86 QAT qconfig mapping, when the installed torch still ships
``torch.ao.quantization``).

One training step = forward, cross-entropy, backward, SGD step (momentum 0.9), on fixed
random inputs. Each config runs warm-up steps, then the configs take turns (round-robin,
so machine drift spreads evenly) for ``--steps`` timed steps each; the median step time is
reported, with ``ratio_vs_fp32`` = median / fp32 median of the same model in the same run.
On CUDA every timed step is bracketed by ``torch.cuda.synchronize()``.

JSON rows: ``{"model", "config", "device", "ms_per_step", "ratio_vs_fp32"}``.

``--profile CONFIG`` (e.g. ``qatx_w8a8``) times nothing: it prints torch.profiler's table of
that config's training step, sorted by self time, to see where the overhead over FP32 goes.
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import qatx


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.add = qatx.nn.QuantAdd()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(self.shortcut(x), y))


class SmallResNet(nn.Module):
    def __init__(self, width=32, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


MODELS = {"cnn": (SmallResNet, (3, 32, 32)), "mlp": (mlp, (784,))}


def torch_ao_prepare(model, example):
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx
    except ImportError:
        return None
    return prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), (example,))


def build(model_name, device, batch, gen):
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    base = make()
    x = torch.randn((batch,) + shape, generator=gen).to(device)
    t = torch.randint(0, 10, (batch,), generator=gen).to(device)
    configs = {"fp32": copy.deepcopy(base), "qatx_w8a8": qatx.prepare_qat(base, qatx.presets.W8A8),
               "qatx_w4a4_lsq": qatx.prepare_qat(base, qatx.presets.W4A4_LSQ)}
    ao = torch_ao_prepare(base, x[:2].cpu())
    if ao is not None:
        configs["torch_ao_w8a8"] = ao
    runners = {}
    for name, model in configs.items():
        model = model.to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        runners[name] = step
    return runners


def profile(model_name, run, steps, warmup, device):
    for _ in range(warmup):
        run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{model_name}: {steps} steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="write result rows as JSON to FILE")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default="cnn,mlp")
    p.add_argument("--quick", action="store_true", help="batch 8, 1 timed step, 1 warm-up (smoke test)")
    p.add_argument("--profile", metavar="CONFIG", help="instead of timing, print torch.profiler's table of CONFIG's "
                   "training step (the ops taking the most self time over --steps steps)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup = 8, 1, 1
    steps = args.steps or (50 if args.device == "cuda" else 20)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{steps} timed steps per config (median)")
    rows = []
    for model_name in args.models.split(","):
        runners = build(model_name, device, args.batch, torch.Generator().manual_seed(0))
        if args.profile:
            profile(model_name, runners[args.profile], steps, args.warmup, device)
            continue
        for run in runners.values():
            for _ in range(args.warmup):
                run()
        times = {name: [] for name in runners}
        for _ in range(steps):
            for name, run in runners.items():
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
        fp32 = statistics.median(times["fp32"])
        print(f"\n{model_name:<6} {'config':<16} {'ms/step':>9} {'vs fp32':>8}")
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"model": model_name, "config": name, "device": args.device, "ms_per_step": ms,
                         "ratio_vs_fp32": ms / fp32})
            print(f"{'':<6} {name:<16} {ms:>9.2f} {ms / fp32:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
