"""Benchmark qatx fake-quantize ops against PyTorch's built-ins and a copy roofline.

Usage::

    PYTHONPATH=python python benchmarks/ops.py [--device cpu|cuda] [--json FILE]
        [--sizes 1M,16M,64M] [--repeats N] [--quick]

Ops (float32 input, qint8-style range quant_min=-128, quant_max=127):

* ``fake_quantize_per_tensor_affine``: scale float32 tensor [1], zero_point int32 tensor [1].
* ``fake_quantize_per_channel_affine``: a conv-weight-like tensor with C=256 output
  channels on axis 0, shaped [256, numel / (256*16), 4, 4] (4x4 kernels, because the
  power-of-two sizes are not divisible by 9 for 3x3; falls back to [256, numel/256] and
  then to [numel] with C=1 if the size does not divide), scale float32 [C],
  zero_point int32 [C].

Directions:

* ``forward``: under ``torch.no_grad()``, ``y = op(x)``.
* ``forward+backward``: ``x.requires_grad_()``, ``y = op(x); y.backward(g)`` with a
  pre-made ``g``; the whole forward plus backward is timed; ``x.grad`` is reset to None
  before every call.

Implementations, all fed the same inputs within a run:

* ``qatx``: ``torch.ops.qatx.fake_quantize_per_{tensor,channel}_affine``.
* ``torch``: ``torch.fake_quantize_per_{tensor,channel}_affine`` with the same tensor qparams.
* ``copy``: the bandwidth roofline. forward: ``torch.empty_like(x).copy_(x)`` (read x,
  write y); forward+backward: that copy plus ``torch.empty_like(g).copy_(g)`` (read dy,
  write dx). Like the ops, the copy allocates its outputs on every call.

"Useful bytes" and GB/s: GB/s = useful bytes / median time, with 1 GB = 1e9 bytes and
useful bytes = the minimum traffic of an elementwise op on float32 data, the same for
every impl so that the columns are comparable:

* forward: 8 bytes/element (read x, write y);
* forward+backward: 16 bytes/element (read x, write y, read dy, write dx).

Qparam reads are ignored, and so is any extra traffic an implementation actually makes
(e.g. torch saving a bool mask in forward and reading it in backward).

Timing: each (op, direction, size) first checks once, outside timing, that qatx's
forward output equals torch's (``torch.equal``; a WARNING row is printed if not), then
runs warm-up calls of each impl, then ``--repeats`` timed calls per impl with the impls
interleaved round-robin (to spread drift evenly), and reports the median. On CUDA every
timed call is bracketed by ``torch.cuda.synchronize()`` and all tensors stay on the
device. The thread count is left at torch's default and reported in the header.

Columns: ``torch/qatx`` = torch time / qatx time (the speed-up of qatx over torch; >1
means qatx is faster); ``qatx%copy`` = qatx GB/s as a percentage of copy GB/s.

Learnable (LSQ) ops, printed after the table above in a second table of their own and
written to the same JSON list with the same keys:

* ``fake_quantize_lsq_per_tensor``: x shaped [numel], scale a float32 tensor [1] (0.02).
* ``fake_quantize_lsq_per_channel``: x shaped like the per-channel rows above (C=256 on
  axis 0), scale float32 [C] drawn uniformly from [0.01, 0.03).

Both use the same 8-bit range quant_min=-128, quant_max=127, float32 input, a float32
zero_point of zeros that does not require grad (plain LSQ, no learned offset), and
grad_factor = 1 / sqrt(N_per_scale * quant_max), N_per_scale = numel / (number of scales).
In ``forward+backward`` both x and scale require grad; ``x.grad`` and ``scale.grad`` are
reset to None before every call, so each call computes dx and dscale.

LSQ implementations:

* ``qatx``: ``torch.ops.qatx.fake_quantize_lsq(x, scale, zero_point, 0, qmin, qmax,
  grad_factor)`` (axis 0; per-tensor because scale has one element).
* ``torch``: ``torch._fake_quantize_learnable_per_tensor_affine`` /
  ``torch._fake_quantize_learnable_per_channel_affine`` with the same arguments.
* ``composite``: the usual pure-PyTorch LSQ formulation, autograd through ATen ops:
  ``s_g = (s - s*gf).detach() + s*gf`` (gradient scaling), ``v = clamp(x / s_g, qmin, qmax)``
  (s_g viewed as [C, 1, ...] per channel), ``r = (v.round() - v).detach() + v``,
  ``y = r * s_g``. It omits the zero point, which is zero here.
* ``copy``: the roofline. forward: ``torch.empty_like(x).copy_(x)`` (read x, write y);
  forward+backward: that copy plus ``torch.add(x, g, out=torch.empty_like(x))`` (read x
  and dy, write dx), i.e. exactly the 20 useful bytes/element below. Outputs are
  allocated on every call.

LSQ useful bytes: forward 8 bytes/element (read x, write y); forward+backward
20 bytes/element: forward reads x and writes y, backward has to read x again (the saved
input, needed for the clamp mask and for dscale) and dy, and write dx. Reads and
writes of scale, zero_point and dscale are ignored. This is a floor; e.g. the composite
makes many more passes.

Checks (once per LSQ op and size, outside timing): qatx's forward output must equal
torch's learnable op (``torch.equal``) and so must the input gradient dx; dscale is
compared with a relative tolerance of 1e-3 (its reductions run in different orders).
A WARNING line is printed for each failed check.

Exit codes: 0 ok, 2 when ``--device cuda`` is asked for but CUDA is unavailable.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    import qatx  # noqa: F401  registers torch.ops.qatx.*
except ImportError:  # allow running without PYTHONPATH=python from the repo root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import qatx  # noqa: F401

QUANT_MIN, QUANT_MAX = -128, 127
CHANNELS = 256
IMPLS = ("qatx", "torch", "copy")
OPS = ("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine")
SHORT_OP = {
    "fake_quantize_per_tensor_affine": "per_tensor",
    "fake_quantize_per_channel_affine": "per_channel",
}
DIRECTIONS = ("forward", "forward+backward")
BYTES_PER_ELEM = {"forward": 8, "forward+backward": 16}

LSQ_IMPLS = ("qatx", "torch", "composite", "copy")
LSQ_OPS = ("fake_quantize_lsq_per_tensor", "fake_quantize_lsq_per_channel")
LSQ_SHORT_OP = {
    "fake_quantize_lsq_per_tensor": "lsq_tensor",
    "fake_quantize_lsq_per_channel": "lsq_channel",
}
LSQ_BYTES_PER_ELEM = {"forward": 8, "forward+backward": 20}
LSQ_COL = {"qatx": "qatx", "torch": "torch", "composite": "comp", "copy": "copy"}  # table headers

DEFAULT_SIZES = "1M,16M,64M"
QUICK_SIZES = "64K,256K"


def parse_size(text):
    text = text.strip().upper()
    mult = 1
    if text.endswith("K"):
        mult, text = 1 << 10, text[:-1]
    elif text.endswith("M"):
        mult, text = 1 << 20, text[:-1]
    elif text.endswith("G"):
        mult, text = 1 << 30, text[:-1]
    value = int(float(text) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return value


def fmt_size(n):
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def default_repeats(numel):
    if numel <= (1 << 22):
        return 20
    if numel <= (1 << 24):
        return 10
    return 5


def per_channel_shape(numel):
    if numel % (CHANNELS * 16) == 0:
        return (CHANNELS, numel // (CHANNELS * 16), 4, 4)
    if numel % CHANNELS == 0:
        return (CHANNELS, numel // CHANNELS)
    return (numel,)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(op, numel, device, gen):
    """Input x, upstream grad g and qparams; drawn on CPU from `gen`, then moved."""
    if op == "fake_quantize_per_tensor_affine":
        shape = (numel,)
        scale = torch.tensor([0.02], dtype=torch.float32)
        zero_point = torch.tensor([3], dtype=torch.int32)
    else:
        shape = per_channel_shape(numel)
        c = shape[0]
        scale = torch.rand(c, generator=gen) * 0.02 + 0.01
        zero_point = torch.randint(-8, 9, (c,), generator=gen, dtype=torch.int32)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    g = torch.randn(shape, generator=gen, dtype=torch.float32)
    return x.to(device), g.to(device), scale.to(device), zero_point.to(device)


def op_fn(op, impl, scale, zero_point):
    if op == "fake_quantize_per_tensor_affine":
        if impl == "qatx":
            return lambda t: torch.ops.qatx.fake_quantize_per_tensor_affine(
                t, scale, zero_point, QUANT_MIN, QUANT_MAX)
        return lambda t: torch.fake_quantize_per_tensor_affine(
            t, scale, zero_point, QUANT_MIN, QUANT_MAX)
    if impl == "qatx":
        return lambda t: torch.ops.qatx.fake_quantize_per_channel_affine(
            t, scale, zero_point, 0, QUANT_MIN, QUANT_MAX)
    return lambda t: torch.fake_quantize_per_channel_affine(
        t, scale, zero_point, 0, QUANT_MIN, QUANT_MAX)


def lsq_repeats(numel):
    # torch's learnable ops and the composite are slow at 64M; fewer repeats there keep
    # the default CPU run within a few minutes.
    if numel <= (1 << 22):
        return 20
    if numel <= (1 << 24):
        return 10
    return 3


def make_lsq_inputs(op, numel, device, gen):
    """Input x, upstream grad g, scale, zero_point (zeros), grad_factor."""
    if op == "fake_quantize_lsq_per_tensor":
        shape = (numel,)
        scale = torch.tensor([0.02], dtype=torch.float32)
    else:
        shape = per_channel_shape(numel)
        scale = torch.rand(shape[0], generator=gen) * 0.02 + 0.01
    zero_point = torch.zeros(scale.numel(), dtype=torch.float32)
    grad_factor = 1.0 / (numel // scale.numel() * QUANT_MAX) ** 0.5
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    g = torch.randn(shape, generator=gen, dtype=torch.float32)
    return x.to(device), g.to(device), scale.to(device), zero_point.to(device), grad_factor


def lsq_fn(op, impl, zero_point, grad_factor):
    """f(x, scale) -> y for one LSQ impl (not copy)."""
    per_channel = op == "fake_quantize_lsq_per_channel"
    if impl == "qatx":
        return lambda t, s: torch.ops.qatx.fake_quantize_lsq(
            t, s, zero_point, 0, QUANT_MIN, QUANT_MAX, grad_factor)
    if impl == "torch":
        if per_channel:
            return lambda t, s: torch._fake_quantize_learnable_per_channel_affine(
                t, s, zero_point, 0, QUANT_MIN, QUANT_MAX, grad_factor)
        return lambda t, s: torch._fake_quantize_learnable_per_tensor_affine(
            t, s, zero_point, QUANT_MIN, QUANT_MAX, grad_factor)

    def composite(t, s):
        s_g = (s - s * grad_factor).detach() + s * grad_factor
        if per_channel:
            s_g = s_g.view((-1,) + (1,) * (t.dim() - 1))
        v = torch.clamp(t / s_g, QUANT_MIN, QUANT_MAX)
        r = (v.round() - v).detach() + v
        return r * s_g
    return composite


def make_lsq_runner(op, impl, direction, x, g, scale, zero_point, grad_factor):
    """A zero-argument callable doing one measured unit of LSQ work."""
    if impl == "copy":
        if direction == "forward":
            def run():
                return torch.empty_like(x).copy_(x)
        else:
            def run():
                y = torch.empty_like(x).copy_(x)          # read x, write y
                dx = torch.add(x, g, out=torch.empty_like(x))  # read x and dy, write dx
                return y, dx
        return run

    f = lsq_fn(op, impl, zero_point, grad_factor)
    if direction == "forward":
        def run():
            with torch.no_grad():
                return f(x, scale)
    else:
        xg = x.detach().requires_grad_(True)
        sg = scale.detach().clone().requires_grad_(True)

        def run():
            xg.grad = None
            sg.grad = None
            y = f(xg, sg)
            y.backward(g)
            return xg.grad, sg.grad
    return run


def check_lsq(op, x, g, scale, zero_point, grad_factor):
    """Compare qatx with torch's learnable op: forward, dx (exact) and dscale (rtol 1e-3)."""
    problems = []
    outs = {}
    for impl in ("qatx", "torch"):
        xg = x.detach().requires_grad_(True)
        sg = scale.detach().clone().requires_grad_(True)
        y = lsq_fn(op, impl, zero_point, grad_factor)(xg, sg)
        y.backward(g)
        outs[impl] = (y.detach(), xg.grad, sg.grad)
        del y, xg, sg
    (ya, dxa, dsa), (yb, dxb, dsb) = outs["qatx"], outs["torch"]
    for name, a, b in (("forward", ya, yb), ("input gradient", dxa, dxb)):
        if not torch.equal(a, b):
            diff = (a - b).abs()
            problems.append(f"qatx {name} != torch {name} ({int((diff != 0).sum())} of {a.numel()} "
                            f"elements differ, max abs diff {float(diff.max()):.3g})")
    if not torch.allclose(dsa, dsb, rtol=1e-3, atol=1e-6):
        problems.append(f"qatx scale gradient !~ torch scale gradient (max abs diff "
                        f"{float((dsa - dsb).abs().max()):.3g}, max |torch| {float(dsb.abs().max()):.3g})")
    return problems


def make_runner(op, impl, direction, x, g, scale, zero_point):
    """A zero-argument callable doing one measured unit of work."""
    if impl == "copy":
        if direction == "forward":
            def run():
                return torch.empty_like(x).copy_(x)
        else:
            def run():
                y = torch.empty_like(x).copy_(x)
                dx = torch.empty_like(g).copy_(g)
                return y, dx
        return run

    f = op_fn(op, impl, scale, zero_point)
    if direction == "forward":
        def run():
            with torch.no_grad():
                return f(x)
    else:
        xg = x.detach().requires_grad_(True)

        def run():
            xg.grad = None
            y = f(xg)
            y.backward(g)
            return xg.grad
    return run


def time_call(fn, sync):
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    del out
    return t1 - t0


def print_table_header(columns, ratios):
    header = (f"{'op':<12} {'direction':<16} {'numel':>6} "
              + " ".join(f"{col + ' ms':>10} {col + ' GB/s':>11}" for col in columns)
              + f" {ratios[0]:>10} " + " ".join(f"{r:>9}" for r in ratios[1:]))
    print(header)
    print("-" * len(header))
    sys.stdout.flush()


def measure(runners, warmup, repeats, sync, nbytes, row, rows):
    """Times every impl in `runners` (warm-up first, then the impls interleaved round-robin to
    spread drift evenly), appends one JSON row per impl to `rows` and returns
    {impl: (median ms, GB/s)}."""
    for run in runners.values():
        for _ in range(warmup):
            time_call(run, sync)
    times = {impl: [] for impl in runners}
    for _ in range(repeats):
        for impl, run in runners.items():
            times[impl].append(time_call(run, sync))
    res = {}
    for impl, samples in times.items():
        sec = statistics.median(samples)
        res[impl] = (sec * 1e3, nbytes / sec / 1e9)
        rows.append(dict(row, impl=impl, ms=sec * 1e3, gbps=nbytes / sec / 1e9))
    return res


def check_forward(op, x, scale, zero_point):
    with torch.no_grad():
        a = op_fn(op, "qatx", scale, zero_point)(x)
        b = op_fn(op, "torch", scale, zero_point)(x)
    if torch.equal(a, b):
        return None
    diff = (a - b).abs()
    return (f"{int((diff != 0).sum())} of {a.numel()} elements differ, "
            f"max abs diff {float(diff.max()):.3g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="write result rows as JSON to FILE")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated numels, K/M suffixes = 2^10/2^20 (default {DEFAULT_SIZES})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per impl (default: 20 up to 4M, 10 up to 16M, 5 above; 3 above 16M for LSQ)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per impl (default 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: sizes {QUICK_SIZES}, 3 repeats, 1 warm-up")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: --device cuda requested but CUDA is not available "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        return 2
    device = torch.device(args.device)
    sync = device.type == "cuda"

    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",") if s.strip()]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    fixed_repeats = args.repeats if args.repeats is not None else (3 if args.quick else None)
    if fixed_repeats is not None and fixed_repeats < 1:
        p.error("--repeats must be >= 1")

    print(f"torch {torch.__version__} | qatx {getattr(qatx, '__version__', '?')} | "
          f"device {args.device}: {device_name(device)} | threads {torch.get_num_threads()} | "
          f"python {platform.python_version()}")
    print("GB/s = useful bytes / median time; useful bytes per element: forward 8 "
          "(read x, write y), forward+backward 16 (read x, write y, read dy, write dx)")
    print(f"torch/qatx = speed-up of qatx over torch; qatx%copy = qatx GB/s as % of copy GB/s; "
          f"per_channel: C={CHANNELS} on axis 0")
    try:
        load = os.getloadavg()
        ncpu = os.cpu_count() or 1
        print(f"load average (1/5/15 min) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {ncpu} CPUs"
              + ("  WARNING: machine busy, CPU timings will be noisy" if load[0] > 0.5 * ncpu else ""))
    except OSError:
        pass
    print(f"warm-up {warmup}, repeats {fixed_repeats if fixed_repeats is not None else 'per size (20/10/5)'}")
    print()

    print_table_header(IMPLS, ("torch/qatx", "qatx%copy"))

    rows = []
    gen = torch.Generator().manual_seed(0)
    for numel in sizes:
        repeats = fixed_repeats if fixed_repeats is not None else default_repeats(numel)
        for op in OPS:
            x, g, scale, zero_point = make_inputs(op, numel, device, gen)
            mismatch = check_forward(op, x, scale, zero_point)
            if mismatch:
                print(f"WARNING {SHORT_OP[op]:<12} numel {fmt_size(numel)}: qatx forward != torch forward "
                      f"({mismatch})")
            for direction in DIRECTIONS:
                runners = {impl: make_runner(op, impl, direction, x, g, scale, zero_point)
                           for impl in IMPLS}
                res = measure(runners, warmup, repeats, sync, BYTES_PER_ELEM[direction] * numel,
                              {"op": op, "device": args.device, "numel": numel, "direction": direction}, rows)
                speedup = res["torch"][0] / res["qatx"][0]
                pct = 100.0 * res["qatx"][1] / res["copy"][1]
                print(f"{SHORT_OP[op]:<12} {direction:<16} {fmt_size(numel):>6} "
                      + " ".join(f"{res[i][0]:>10.3f} {res[i][1]:>11.2f}" for i in IMPLS)
                      + f" {speedup:>9.2f}x {pct:>8.1f}%")
                sys.stdout.flush()
                del runners
            del x, g, scale, zero_point

    print()
    print("LSQ (learnable scale; zero_point zeros, no grad; grad_factor = 1/sqrt(N_per_scale*quant_max)); "
          f"range [{QUANT_MIN}, {QUANT_MAX}]")
    print("useful bytes per element: forward 8 (read x, write y), forward+backward 20 "
          "(read x, write y; read x, read dy, write dx); fwd+bwd computes dx and dscale")
    print("comp = composite (pure-PyTorch LSQ through autograd); copy fwd+bwd = copy x->y plus "
          "add(x, g) -> dx; X/qatx = X time / qatx time (speed-up of qatx over X)")
    if fixed_repeats is None:
        print("repeats per size (20/10/3)")
    print()
    print_table_header([LSQ_COL[impl] for impl in LSQ_IMPLS], ("torch/qatx", "comp/qatx", "qatx%copy"))

    for numel in sizes:
        repeats = fixed_repeats if fixed_repeats is not None else lsq_repeats(numel)
        for op in LSQ_OPS:
            x, g, scale, zero_point, grad_factor = make_lsq_inputs(op, numel, device, gen)
            for problem in check_lsq(op, x, g, scale, zero_point, grad_factor):
                print(f"WARNING {LSQ_SHORT_OP[op]:<12} numel {fmt_size(numel)}: {problem}")
            for direction in DIRECTIONS:
                runners = {impl: make_lsq_runner(op, impl, direction, x, g, scale, zero_point, grad_factor)
                           for impl in LSQ_IMPLS}
                res = measure(runners, warmup, repeats, sync, LSQ_BYTES_PER_ELEM[direction] * numel,
                              {"op": op, "device": args.device, "numel": numel, "direction": direction}, rows)
                q = res["qatx"][0]
                print(f"{LSQ_SHORT_OP[op]:<12} {direction:<16} {fmt_size(numel):>6} "
                      + " ".join(f"{res[i][0]:>10.3f} {res[i][1]:>11.2f}" for i in LSQ_IMPLS)
                      + f" {res['torch'][0] / q:>9.2f}x {res['composite'][0] / q:>8.2f}x"
                      + f" {100.0 * res['qatx'][1] / res['copy'][1]:>8.1f}%")
                sys.stdout.flush()
                del runners
            del x, g, scale, zero_point

    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
