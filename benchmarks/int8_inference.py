"""Inference latency and size: float32 vs qatx INT8 (eager and TorchScript).

Usage::

    PYTHONPATH=python python benchmarks/int8_inference.py [--device cpu|cuda] [--json FILE]
        [--iters N] [--threads N] [--quick] [--models mlp,cnn,mobilenet]

Models:

* ``mlp``: four Linear(1024, 1024) layers with ReLU between them, on float32 inputs of
  standard normal values;
* ``cnn``: the small ResNet-style CNN of ``benchmarks/qat_step.py`` (Conv-BN-ReLU stem, three
  residual blocks with ``qatx.nn.QuantAdd``, pooling, Linear) on 3x32x32 inputs;
* ``mobilenet``: a small MobileNetV2-style CNN (Conv-BN-ReLU stem with stride 2, four inverted
  residual blocks: 1x1 expansion x4, 3x3 depthwise, 1x1 projection, a ``QuantAdd`` where the
  shapes allow; pooling, Linear) on 3x64x64 inputs.

The INT8 model is ``qatx.convert`` of the model prepared with ``qatx.presets.W8A8`` and
calibrated on a few random batches (observers and BN statistics in training mode).

Implementations (``impl``):

* ``fp32``: the float model in eval mode;
* ``qatx_int8``: the converted INT8 model, eager;
* ``qatx_int8_script``: ``torch.jit.freeze(torch.jit.script(int8_model))``;
* ``onnxruntime_qdq`` (CPU, when onnxruntime is installed): ONNX Runtime with all graph
  optimisations (its QDQ fusion into integer QLinear kernels) on ``qatx.export.onnx`` of the
  same calibrated QAT model, with as many intra-op threads as torch (not spinning between
  calls, so that they leave the cores to the next implementation timed);
* more through :func:`register_impl` (for example an ONNX Runtime session on an exported
  model): ``register_impl(name, build)`` with ``build(model_name, float_model, int8_model,
  example_input, device)`` returning ``(run, size_bytes)`` (``run(x)`` computes one batch) or
  ``None`` to skip. Registered builders run after the built-in ones.

Batches 1 and 64. Each implementation runs warm-up calls, then the implementations take turns
(round-robin, so machine drift spreads evenly) for ``--iters`` timed calls each; the median is
reported, with the speed-up over fp32 of the same model and batch in the same run. On CUDA each
call is bracketed by ``torch.cuda.synchronize()``. ``size_bytes``: :func:`qatx.model_size`
(``torch.save`` of the state_dict), or the saved TorchScript file for ``qatx_int8_script``.

JSON rows: ``{"model", "impl", "device", "batch", "ms", "size_bytes"}``.
"""
import argparse
import io
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from torch import nn

import qatx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_step import SmallResNet  # noqa: E402  (the same small CNN as the QAT benchmark)

BATCHES = (1, 64)

# name -> build(model_name, float_model, int8_model, example_input, device) -> (run, size_bytes) or None
EXTRA_IMPLS: Dict[str, Callable] = {}


def register_impl(name: str, build: Callable) -> None:
    """Adds an implementation row (see the module docstring)."""
    EXTRA_IMPLS[name] = build


def mlp():
    layers = []
    for i in range(4):
        layers.append(nn.Linear(1024, 1024))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_bn(c_in, c_out, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*(layers + [nn.ReLU()] if relu else layers))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (stride), 1x1 projection without ReLU."""

    def __init__(self, c_in, c_out, stride, expand=4):
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(conv_bn(c_in, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, c_out, 1, relu=False))

    def forward(self, x):
        return self.body(x)


class ResidualInvertedResidual(InvertedResidual):
    """InvertedResidual plus its input (stride 1, as many channels out as in)."""

    def __init__(self, channels):
        super().__init__(channels, channels, 1)
        self.add = qatx.nn.QuantAdd()

    def forward(self, x):
        return self.add(x, self.body(x))


class SmallMobileNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), ResidualInvertedResidual(24),
                                    InvertedResidual(24, 32, 2), ResidualInvertedResidual(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


MODELS = {"mlp": (mlp, (1024,)), "cnn": (SmallResNet, (3, 32, 32)), "mobilenet": (SmallMobileNet, (3, 64, 64))}


def calibrated_qat_model(float_model: nn.Module, shape, device) -> nn.Module:
    qat = qatx.prepare_qat(float_model, qatx.presets.W8A8).to(device).train()
    with torch.no_grad():
        for _ in range(8):
            qat(torch.randn(64, *shape, device=device))
    qatx.enable_observer(qat, False)
    return qat.eval()


def onnxruntime_session(qat: nn.Module, shape):
    """(run, size_bytes) of ONNX Runtime (CPU, all graph optimisations, as many threads as torch)
    on the QDQ export of the QAT model, or None when onnx/onnxruntime are missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        qatx.export.onnx(qat, torch.randn(2, *shape), path, dynamic_batch=True)
        size = os.path.getsize(path)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # ONNX Runtime's workers spin after each call by default, which would steal the cores
        # from the implementation timed next in the round-robin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = qatx.export.load_onnx(path, session_options=options)
    name = sess.get_inputs()[0].name
    return (lambda x: sess.run(None, {name: x.numpy()})), size


def scripted(model: nn.Module):
    s = torch.jit.freeze(torch.jit.script(model).eval())
    buf = io.BytesIO()
    torch.jit.save(s, buf)
    return s, buf.getbuffer().nbytes


def timed(fn, x, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def run(device: str, iters: int, warmup: int, models, batches, skip_onnxruntime: bool = False):
    rows = []
    for name in models:
        make, shape = MODELS[name]
        torch.manual_seed(0)
        fp32 = make().to(device).eval()
        qat = calibrated_qat_model(fp32, shape, device)
        int8 = qatx.convert(qat)
        impls = {"fp32": (fp32, qatx.model_size(fp32)), "qatx_int8": (int8, qatx.model_size(int8))}
        impls["qatx_int8_script"] = scripted(int8)
        if device == "cpu" and not skip_onnxruntime:
            ort_impl = onnxruntime_session(qat, shape)
            if ort_impl is not None:
                impls["onnxruntime_qdq"] = ort_impl
        for impl, build in EXTRA_IMPLS.items():
            built = build(name, fp32, int8, torch.randn(1, *shape, device=device), device)
            if built is not None:
                impls[impl] = built
        for batch in batches:
            x = torch.randn(batch, *shape, device=device)
            times = {k: [] for k in impls}
            with torch.inference_mode():
                for fn, _ in impls.values():
                    for _ in range(warmup):
                        fn(x)
                for _ in range(iters):
                    for k, (fn, _) in impls.items():
                        times[k].append(timed(fn, x, device))
            base = statistics.median(times["fp32"])
            for k, (_, size) in impls.items():
                ms = statistics.median(times[k])
                rows.append({"model": name, "impl": k, "device": device, "batch": batch, "ms": ms, "size_bytes": size})
                print(f"{name:4s} batch {batch:3d}  {k:18s} {ms:9.3f} ms  x{base / ms:5.2f} vs fp32  "
                      f"{size / 1e6:7.2f} MB", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--iters", type=int, default=30, help="timed calls per implementation and batch")
    p.add_argument("--quick", action="store_true", help="a few iterations (smoke test)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-onnxruntime", action="store_true", help="leave out the ONNX Runtime rows")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU available")
    iters, warmup = (2, 1) if args.quick else (args.iters, 5)
    print(f"torch {torch.__version__}, qatx {qatx.__version__}, {torch.get_num_threads()} threads, {args.device}")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        p.error(f"--models: choose from {', '.join(MODELS)}, got {args.models!r}")
    rows = run(args.device, iters, warmup, models, BATCHES, skip_onnxruntime=args.no_onnxruntime)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
