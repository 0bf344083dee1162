"""examples/fashion_mnist.py end to end on small synthetic IDX files, and its IDX reader's errors."""
import gzip
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import fashion_mnist  # noqa: E402


def write_idx(path, tensor):
    header = struct.pack(">BBBB", 0, 0, 0x08, tensor.dim()) + struct.pack(">" + "I" * tensor.dim(), *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.to(torch.uint8).numpy().tobytes())


def make_dataset(directory, n_train=512, n_test=256):
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=gen)
        # Class-dependent bright square plus noise: learnable, so accuracies are meaningful.
        images = torch.randint(0, 60, (n, 28, 28), generator=gen)
        for i, c in enumerate(labels.tolist()):
            r, col = divmod(c, 5)
            images[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * col:6 + 5 * col] = 250
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def test_example_runs_end_to_end(tmp_path):
    data, out_dir = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    make_dataset(data)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "fashion_mnist.py"), "--quick",
                          "--data", str(data), "--out", str(out_dir)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(out_dir / "demo.json") as f:
        results = json.load(f)
    assert (out_dir / "accuracy_vs_bits.png").stat().st_size > 1000
    assert results["fp32"]["accuracy"] > 50.0  # the synthetic classes are easy: training must have worked
    runs = {(r["method"], r["config"]): r for r in results["runs"]}
    assert set(runs) == {("ptq", c) for c in ("W8A8", "W8A8-hist", "W4A8", "W4A4", "W3A3")} | \
        {("qat", c) for c in ("W8A8", "W4A4-LSQ", "W3A3-LSQ+")}
    for r in results["runs"]:
        assert r["delta_pt"] == pytest.approx(r["accuracy"] - results["fp32"]["accuracy"])
        assert 0 <= r["int8_accuracy"] <= 100 and r["size_bytes"] > 0 and r["latency_ms"] > 0
    assert abs(runs["ptq", "W8A8"]["accuracy"] - results["fp32"]["accuracy"]) < 5.0
    assert results["int8_agreement"] >= 90.0
    assert runs["ptq", "W8A8"]["size_bytes"] * 3.0 < results["fp32"]["size_bytes"]
    assert results["export"]["python_reload_equal"] is True
    assert "method" in out.stdout and "W4A4-LSQ" in out.stdout


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "x-idx1-ubyte.gz"
    write_idx(good, torch.arange(10))
    assert fashion_mnist.read_idx(str(good)).tolist() == list(range(10))
    truncated = tmp_path / "t-idx1-ubyte"
    truncated.write_bytes(gzip.decompress(good.read_bytes())[:-3])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(str(truncated))
    foreign = tmp_path / "f-idx1-ubyte"
    foreign.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fashion_mnist.read_idx(str(foreign))


def test_missing_data_directory_gives_a_clear_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "fashion_mnist.py"), "--data",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "dataset-fashion-mnist" in out.stderr
