"""Benchmark the histogram observer: collection throughput and range-search time, against
torch.ao.quantization.HistogramObserver when the installed torch has it.

Usage::

    PYTHONPATH=python python benchmarks/calibration.py [--device cpu|cuda] [--json FILE]
        [--numel N] [--bins B] [--repeats R] [--quick]

Collection (``observe``): one float32 tensor of ``--numel`` elements (default 16M = 2^24,
standard normal) is fed to a fresh per-tensor observer once outside timing (first batch:
range set), then ``--repeats`` timed forwards follow on freshly drawn batches of the same
distribution (so the range may still grow, as in calibration). Implementations:

* ``qatx``: ``qatx.HistogramObserver(bins=B)`` (``qatx::histogram_observe``);
* ``torch.ao``: ``torch.ao.quantization.HistogramObserver(bins=B)``.

GB/s = 4 bytes * numel / median time (the input read once; 1 GB = 1e9 bytes).

Range search (``range/<method>``): the time to choose the clip range from the collected
histogram, qint8 symmetric (``quant_min=-128, quant_max=127``):

* ``qatx``: ``HistogramObserver.calculate_range`` for ``percentile`` (99.99), ``mse`` and
  ``entropy`` (one C++/CUDA search per call);
* ``torch.ao``: ``HistogramObserver.calculate_qparams`` (its L2 search), compared with ``mse``.

Timing: medians of ``--repeats`` calls, implementations interleaved; on CUDA each call is
bracketed by ``torch.cuda.synchronize()``. Columns ``torch.ao/qatx``: the speed-up of qatx.
Every row is also written to ``--json`` (keys: bench, impl, device, numel, bins, ms, gbps).
"""
import argparse
import json
import statistics
import time

import torch

import qatx

try:
    from torch.ao.quantization import HistogramObserver as AoHistogramObserver
except ImportError:  # a torch without torch.ao.quantization
    AoHistogramObserver = None


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench_observe(numel, bins, repeats, device, gen):
    batches = [torch.randn(numel, generator=gen).to(device) for _ in range(repeats + 1)]
    impls = {"qatx": qatx.HistogramObserver(bins=bins).to(device)}
    if AoHistogramObserver is not None:
        impls["torch.ao"] = AoHistogramObserver(bins=bins).to(device)
    for obs in impls.values():
        obs(batches[0])
    times = {name: [] for name in impls}
    for x in batches[1:]:
        for name, obs in impls.items():
            times[name].append(timed(lambda: obs(x), device))
    return {name: statistics.median(t) for name, t in times.items()}, impls


def bench_range(impls, repeats, device):
    out = {}
    obs = impls["qatx"]
    for method in ("percentile", "mse", "entropy"):
        obs.method = method
        times = [timed(lambda: obs.calculate_range(-128, 127, True), device) for _ in range(repeats)]
        out[("qatx", method)] = statistics.median(times)
    obs.method = "mse"
    if "torch.ao" in impls:
        ao = impls["torch.ao"]
        times = [timed(ao.calculate_qparams, device) for _ in range(repeats)]
        out[("torch.ao", "mse")] = statistics.median(times)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="write result rows as JSON to FILE")
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--bins", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.numel, args.repeats = 1 << 16, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"numel {args.numel}, bins {args.bins}, repeats {args.repeats}"
          + ("" if AoHistogramObserver is not None else " (torch.ao HistogramObserver not available)"))

    rows = []

    def row(bench, impl, ms, gbps=None):
        rows.append({"bench": bench, "impl": impl, "device": args.device, "numel": args.numel, "bins": args.bins,
                     "ms": ms, "gbps": gbps})

    observe, impls = bench_observe(args.numel, args.bins, args.repeats, args.device, gen)
    print(f"\n{'bench':<18}{'impl':<10}{'ms':>12}{'GB/s':>10}{'torch.ao/qatx':>16}")
    for impl, ms in observe.items():
        gbps = 4.0 * args.numel / (ms * 1e-3) / 1e9
        ratio = f"{observe['torch.ao'] / observe['qatx']:.1f}x" if "torch.ao" in observe and impl == "qatx" else ""
        print(f"{'observe':<18}{impl:<10}{ms:>12.3f}{gbps:>10.2f}{ratio:>16}")
        row("observe", impl, ms, gbps)
    ranges = bench_range(impls, args.repeats, args.device)
    for (impl, method), ms in ranges.items():
        ratio = ""
        if impl == "qatx" and method == "mse" and ("torch.ao", "mse") in ranges:
            ratio = f"{ranges[('torch.ao', 'mse')] / ms:.1f}x"
        print(f"{'range/' + method:<18}{impl:<10}{ms:>12.3f}{'':>10}{ratio:>16}")
        row("range/" + method, impl, ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"\nwrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
