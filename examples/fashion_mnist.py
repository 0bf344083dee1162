"""End-to-end example on Fashion-MNIST with the qatx ops: float training, post-training
fake quantization (W8A8, W4A4), a short quantization-aware fine-tune (W4A4) with the
straight-through estimator, and the integer weights produced by qatx's quantize op.

    python examples/fashion_mnist.py [--data DIR] [--epochs N] [--qat-epochs N] [--quick]

DIR holds the four IDX files (Debian's dataset-fashion-mnist installs them under
/usr/share/datasets/fashion-mnist). Prints a results table.
"""
import argparse
import gzip
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import qatx

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path):
    """Reads an IDX file (optionally gzip-compressed) into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes for shape {dims}, found {len(data)} (truncated?)")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(directory):
    tensors = {}
    for key, name in FILES.items():
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.exists(path):
                tensors[key] = read_idx(path)
                break
        else:
            sys.exit(f"missing {name}[.gz] in {directory}: install Debian's dataset-fashion-mnist or pass --data DIR")
    def norm(x):  # Fashion-MNIST's mean and standard deviation
        return ((x.float() / 255.0) - 0.2860) / 0.3530

    return (norm(tensors["train_images"]).unsqueeze(1), tensors["train_labels"].long(),
            norm(tensors["test_images"]).unsqueeze(1), tensors["test_labels"].long())


class FakeQuant(nn.Module):
    """Fake-quantizes weights (symmetric, per output channel, range from the weights) and the
    layer input (per tensor, range fixed by calibration) with qatx's STE ops."""

    def __init__(self, layer, w_bits, a_bits):
        super().__init__()
        self.layer = layer
        self.w_qmax = 2 ** (w_bits - 1) - 1
        self.a_qmin, self.a_qmax = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
        self.register_buffer("a_scale", torch.ones(1))
        self.register_buffer("a_zero_point", torch.zeros(1, dtype=torch.int32))
        self.calibrating = False

    def weight_qparams(self):
        w = self.layer.weight.detach()
        scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / self.w_qmax
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def forward(self, x):
        if self.calibrating:  # running max of |x| sets the activation range
            self.a_scale.copy_(torch.maximum(self.a_scale, x.detach().abs().amax().reshape(1) / self.a_qmax))
            return self.layer(x)
        x = qatx.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero_point, self.a_qmin, self.a_qmax)
        scale, zp = self.weight_qparams()
        w = qatx.fake_quantize_per_channel_affine(self.layer.weight, scale, zp, 0, -self.w_qmax, self.w_qmax)
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(x, w, self.layer.bias, self.layer.stride, self.layer.padding)
        return F.linear(x, w, self.layer.bias)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def quantized_copy(model, w_bits, a_bits):
    import copy
    q = copy.deepcopy(model)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        setattr(q, name, FakeQuant(getattr(q, name), w_bits, a_bits))
    return q


def calibrate(model, images, batch=500):
    fqs = [m for m in model.modules() if isinstance(m, FakeQuant)]
    for m in fqs:
        m.a_scale.fill_(1e-8)
        m.calibrating = True
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    for m in fqs:
        m.calibrating = False


def train(model, images, labels, epochs, lr, batch, desc):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(images))
        bar = tqdm(range(0, len(images), batch), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=None)  # no bar when the output is not a terminal
        for i in bar:
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def accuracy(model, images, labels, batch=1000):
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return 100.0 * correct / len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="10k training images, 1 epoch each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("epochs", "qat_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.manual_seed(args.seed)

    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    if args.quick:
        xtr, ytr, args.epochs, args.qat_epochs = xtr[:10000], ytr[:10000], 1, 1
    calib = xtr[torch.randperm(len(xtr))[:1000]]
    rows = []

    t = time.time()
    model = SmallCNN()
    train(model, xtr, ytr, args.epochs, 1e-3, 128, "float32")
    fp32 = accuracy(model, xte, yte)
    rows.append(("float32", "-", fp32, time.time() - t))

    for bits in (8, 4):
        t = time.time()
        q = quantized_copy(model, bits, bits)
        calibrate(q, calib)
        rows.append(("PTQ", f"W{bits}A{bits}", accuracy(q, xte, yte), time.time() - t))

    t = time.time()
    q4 = quantized_copy(model, 4, 4)
    calibrate(q4, calib)
    train(q4, xtr, ytr, args.qat_epochs, 2e-4, 128, "QAT W4A4")
    rows.append(("QAT", "W4A4", accuracy(q4, xte, yte), time.time() - t))

    # The integer weights of the QAT model, and a check that they dequantize to exactly the
    # weights the fake-quantized model computed with.
    fc1 = q4.fc1
    scale, zp = fc1.weight_qparams()
    w_int = qatx.quantize_per_channel_affine(fc1.layer.weight.detach(), scale, zp, 0, -7, 7, torch.int8)
    exact = torch.equal(qatx.dequantize_per_channel_affine(w_int, scale, zp, 0),
                        qatx.fake_quantize_per_channel_affine(fc1.layer.weight.detach(), scale, zp, 0, -7, 7))

    print(f"\nFashion-MNIST, {len(xtr)} training / {len(xte)} test images, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<8} {'bits':<6} {'accuracy %':>10} {'vs float32':>10} {'seconds':>8}")
    for method, bits, acc, sec in rows:
        print(f"{method:<8} {bits:<6} {acc:>10.2f} {acc - fp32:>+10.2f} {sec:>8.1f}")
    print(f"\nfc1 int4 weights: {tuple(w_int.shape)} in [{w_int.min().item()}, {w_int.max().item()}], "
          f"dequantize(quantize(w)) == fake_quantize(w): {exact}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
