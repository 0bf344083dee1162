"""Peak memory of one QAT training step: FP32 vs qatx W8A8 vs qatx W4A4-LSQ vs torch.ao QAT.

Usage::

    PYTHONPATH=python python benchmarks/qat_memory.py [--device cpu|cuda] [--json FILE] [--batch 128]
        [--configs fp32,qatx_w8a8,...] [--quick]

Model: the small ResNet-style CNN of ``benchmarks/qat_step.py`` (3x32x32 inputs, batch 128 by
default). One training step = forward, cross-entropy, backward, SGD step (momentum 0.9).

What is measured: tensor memory (bytes allocated through PyTorch's allocator, not the process's
RSS). Each config runs in a fresh subprocess, which builds the model, runs one warm-up step (so
the momentum buffers exist and the observers/LSQ scales are initialised) and then the measured
step, with gradients set to None between steps, as a training loop does.

* CPU: the whole subprocess runs under ``torch.profiler.profile(profile_memory=True)``, which
  records every allocation and free of PyTorch's CPU allocator with its size. Summing them in
  time order gives the bytes alive at every moment; ``peak`` is the maximum during the measured
  step, ``at_start`` the bytes alive when it begins (parameters, buffers, optimizer state, the
  batch). Memory that oneDNN or OpenMP allocate outside PyTorch's allocator (scratch space) is
  not counted.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start of
  the measured step; ``at_start`` is ``memory_allocated`` there.

``ratio_vs_fp32`` = peak / fp32 peak of the same run. ``step_mb`` = peak - at_start: the memory
the step itself adds (activations saved for backward, gradients, temporaries).

JSON rows: ``{"model", "config", "device", "batch", "peak_mb", "at_start_mb", "step_mb",
"ratio_vs_fp32"}``.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("fp32", "qatx_w8a8", "qatx_w4a4_lsq", "torch_ao_w8a8")
MB = 1 << 20


def make_model(config, example):
    sys.path.insert(0, HERE)
    import qatx
    from qat_step import SmallResNet, torch_ao_prepare

    torch.manual_seed(0)
    base = SmallResNet()
    if config == "fp32":
        return base
    if config == "qatx_w8a8":
        return qatx.prepare_qat(base, qatx.presets.W8A8)
    if config == "qatx_w4a4_lsq":
        return qatx.prepare_qat(base, qatx.presets.W4A4_LSQ)
    if config == "torch_ao_w8a8":
        return torch_ao_prepare(base, example)
    raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")


def measure(config, device, batch):
    """{"peak", "at_start"} in bytes for the second training step of config (this process)."""
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, 3, 32, 32, generator=gen)
    t_cpu = torch.randint(0, 10, (batch,), generator=gen)

    def setup_and_warm_up():
        model = make_model(config, x_cpu[:2])
        if model is None:
            return None
        model = model.to(device).train()
        x, t = x_cpu.to(device), t_cpu.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            loss = F.cross_entropy(model(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        return step

    if device.type == "cuda":
        step = setup_and_warm_up()
        if step is None:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        at_start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "at_start": at_start}

    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = setup_and_warm_up()
        if step is None:
            return None
        with record_function("measured_step"):
            step()
    events = list(prof.profiler.kineto_results.events())
    window = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "measured_step"]
    assert len(window) == 1, "the profiler lost the measured step's range"
    begin, end = window[0]
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    alive, at_start, peak = 0, None, 0
    for t, nbytes in memory:
        if t >= begin and at_start is None:
            at_start = peak = alive
        alive += nbytes
        if begin <= t <= end:
            peak = max(peak, alive)
    if at_start is None:
        at_start = peak = alive
    return {"peak": peak, "at_start": at_start}


def saved_tensor_breakdown(config, batch):
    """{autograd node name: bytes} of the tensors the forward saves for backward (each storage counted
    once, for the first node found saving it), read from the graph's ``_saved_*`` attributes. Nodes
    implemented in C++ extensions (qatx's own ops) do not expose theirs: qatx's affine ops save a
    1-bit-per-element mask, which is not listed."""
    model = make_model(config, torch.randn(2, 3, 32, 32))
    if model is None:
        return None
    model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    model(x)  # first batch: observers / LSQ initialisation
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=gen))
    seen, by_node, stack, visited = set(), {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.numel():
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        by_node[node.name()] = by_node.get(node.name(), 0) + t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return by_node


def run_config_in_subprocess(config, device, batch):
    env = dict(os.environ)
    python_dir = os.path.join(os.path.dirname(HERE), "python")
    env["PYTHONPATH"] = python_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", config, "--device", device,
                           "--batch", str(batch)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="write result rows as JSON to FILE")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--quick", action="store_true", help="batch 8 (smoke test)")
    p.add_argument("--breakdown", action="store_true",
                   help="also print, per config, the bytes saved for backward by each kind of autograd node")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config in this process
    args = p.parse_args(argv)
    if args.quick:
        args.batch = 8
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure(args.one, device, args.batch)))
        return None
    configs = args.configs.split(",")
    if configs[0] != "fp32":
        configs = ["fp32"] + [c for c in configs if c != "fp32"]
    print(f"torch {torch.__version__}, device {args.device}, batch {args.batch}; peak tensor memory of one training "
          f"step (forward + backward + SGD), each config in a fresh process")
    print(f"\n{'config':<16} {'peak MB':>9} {'at start':>9} {'step MB':>9} {'vs fp32':>8}")
    rows, fp32 = [], None
    for config in configs:
        r = run_config_in_subprocess(config, args.device, args.batch)
        if r is None:
            print(f"{config:<16} {'(not available with this torch)':>30}")
            continue
        fp32 = fp32 or r["peak"]
        row = {"model": "cnn", "config": config, "device": args.device, "batch": args.batch,
               "peak_mb": r["peak"] / MB, "at_start_mb": r["at_start"] / MB,
               "step_mb": (r["peak"] - r["at_start"]) / MB, "ratio_vs_fp32": r["peak"] / fp32}
        rows.append(row)
        print(f"{config:<16} {row['peak_mb']:>9.1f} {row['at_start_mb']:>9.1f} {row['step_mb']:>9.1f} "
              f"{row['ratio_vs_fp32']:>7.2f}x")
    if args.breakdown:
        for config in configs:
            by_node = saved_tensor_breakdown(config, args.batch)
            if by_node is None:
                continue
            total = sum(by_node.values())
            print(f"\nsaved for backward, {config}: {total / MB:.1f} MB")
            for name, nbytes in sorted(by_node.items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {name:<40} {nbytes / MB:>8.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
