"""qatx.export: TorchScript (fresh-process round trip, freezing, trace fallback, C++ fixtures),
torch.export programs, ONNX QDQ files run with onnxruntime, and load errors."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import qatx
import qatx.export
from qatx import QConfig, QuantSpec, presets
from qatx.export import ExportFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Where the C++ tests (ctest: qatx_example_run, finetune.*) read the models written here.
FIXTURES = os.environ.get("QATX_FIXTURE_DIR", os.path.join(ROOT, "build", "fixtures"))

PACT_A8 = QConfig(weight=QuantSpec(bits=8, granularity="per_channel"), activation=QuantSpec(bits=8, signed=False,
                                                                                           learnable="pact"))
NARROW = QConfig(weight=QuantSpec(bits=8, narrow_range=True, granularity="per_channel"),
                 activation=QuantSpec(bits=8, signed=True, symmetric=False))
CONFIGS = {"W8A8": presets.W8A8, "W4A8": presets.W4A8, "W4A4_LSQ": presets.W4A4_LSQ, "PACT": PACT_A8,
           "narrow": NARROW}


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a residual add, pooling, a ConvTranspose and a Linear head."""

    def __init__(self, transpose_groups=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.add = qatx.nn.QuantAdd()
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=transpose_groups)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.add(y, self.conv(y)))
        y = self.up(self.pool(y))
        return self.head(y.flatten(1))


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def trained(model, qconfig, x, steps=4):
    """A prepared model after a few training steps (observers and learned scales have moved)."""
    torch.manual_seed(0)
    q = qatx.prepare_qat(model, qconfig)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    for _ in range(steps):
        loss = q(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q


def frozen_reference(q, x):
    """Outputs of the eval model with observers off (what every export computes)."""
    q = qatx.export._common.inference_copy(q)
    with torch.no_grad():
        return q(x)


def run_python(code, *args):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


# ---------------------------------------------------------------- TorchScript

@pytest.mark.parametrize("name", ["W8A8", "W4A4_LSQ", "PACT"])
def test_torchscript_round_trip_in_a_fresh_process(tmp_path, name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    q = trained(SmallCNN(), CONFIGS[name], x).eval()
    path = tmp_path / "model.pt"
    module = qatx.export.torchscript(q, x, path)
    expected = frozen_reference(q, x)
    assert torch.equal(module(x), expected)
    assert not any(True for _ in module.parameters())  # frozen: parameters became constants
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    run_python("import sys, torch, qatx, qatx.export\n"
               "io = torch.load(sys.argv[2])\n"
               "for m in (torch.jit.load(sys.argv[1]), qatx.export.load_torchscript(sys.argv[1])):\n"
               "    assert torch.equal(m(io['x']), io['y'])\n", str(path), str(tmp_path / "io.pt"))


def test_torchscript_training_model_is_saved_unfrozen_and_trains(tmp_path):
    x = torch.randn(8, 32)
    q = trained(mlp(), presets.W4A4_LSQ, x)
    module = qatx.export.torchscript(q, x, tmp_path / "train.pt")
    loaded = qatx.export.load_torchscript(tmp_path / "train.pt")
    assert loaded.training
    names = [n for n, _ in loaded.named_parameters()]
    assert "0.weight_quantizer.scale" in names and "0.weight" in names
    before = dict(loaded.named_parameters())["0.weight_quantizer.scale"].detach().clone()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = loaded(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(dict(loaded.named_parameters())["0.weight_quantizer.scale"], before)
    assert isinstance(module, torch.jit.ScriptModule)
    assert q.training  # the model passed in is untouched


def test_torchscript_freeze_false_keeps_parameters(tmp_path):
    x = torch.randn(2, 32)
    q = trained(mlp(), presets.W8A8, x).eval()
    module = qatx.export.torchscript(q, x, tmp_path / "m.pt", freeze=False)
    assert any(True for _ in module.parameters())
    assert torch.equal(qatx.export.load_torchscript(tmp_path / "m.pt")(x), frozen_reference(q, x))


class Unscriptable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        parts = {k: v for k, v in zip(("a", "b"), x.chunk(2, dim=1))}  # dict comprehension over zip: not scriptable
        return self.fc(torch.cat([parts["b"], parts["a"]], dim=1))


def test_torchscript_falls_back_to_a_checked_trace(tmp_path):
    x = torch.randn(3, 8)
    q = trained(Unscriptable(), presets.W8A8, x).eval()
    with pytest.warns(UserWarning, match="tracing"):
        module = qatx.export.torchscript(q, x, tmp_path / "t.pt")
    assert torch.equal(module(x), frozen_reference(q, x))
    assert torch.equal(qatx.export.load_torchscript(tmp_path / "t.pt")(x), frozen_reference(q, x))
    with pytest.raises(RuntimeError, match="torch.jit.script failed"):
        qatx.export.torchscript(q, x, tmp_path / "s.pt", method="script")


def test_torchscript_fixtures_for_the_cpp_tests():
    """Writes the models the C++ tests read (ctest runs after pytest in `make test`)."""
    os.makedirs(FIXTURES, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    q = trained(SmallCNN(), presets.W8A8, x).eval()
    qatx.export.torchscript(q, x, os.path.join(FIXTURES, "cnn_w8a8.pt"))
    expected = frozen_reference(q, x)
    torch.save(x, os.path.join(FIXTURES, "cnn_w8a8_input.pt"))
    torch.save(expected, os.path.join(FIXTURES, "cnn_w8a8_expected.pt"))
    # A training-mode LSQ model for fine-tuning from C++.
    xm = torch.randn(16, 32)
    qm = trained(mlp(), presets.W4A4_LSQ, xm)
    qatx.export.torchscript(qm, xm, os.path.join(FIXTURES, "mlp_lsq_train.pt"))
    assert qatx.export.load_torchscript(os.path.join(FIXTURES, "mlp_lsq_train.pt")).training
    assert torch.equal(torch.load(os.path.join(FIXTURES, "cnn_w8a8_expected.pt")),
                       qatx.export.load_torchscript(os.path.join(FIXTURES, "cnn_w8a8.pt"))(x))


# ---------------------------------------------------------------- torch.export

@pytest.mark.parametrize("name", ["W8A8", "W4A4_LSQ"])
def test_program_round_trip_in_a_fresh_process(tmp_path, name):
    x = torch.randn(4, 3, 8, 8)
    q = trained(SmallCNN(), CONFIGS[name], x).eval()
    path = tmp_path / "model.pt2"
    exported = qatx.export.program(q, x, path)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("qatx.") for t in targets), targets
    expected = frozen_reference(q, x)
    assert torch.equal(exported.module()(x), expected)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    run_python("import sys, torch, qatx, qatx.export\n"
               "io = torch.load(sys.argv[2])\n"
               "assert torch.equal(qatx.export.load_program(sys.argv[1]).module()(io['x']), io['y'])\n",
               str(path), str(tmp_path / "io.pt"))


def test_program_dynamic_batch(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    q = trained(SmallCNN(), presets.W8A8, x).eval()
    qatx.export.program(q, x, tmp_path / "m.pt2", dynamic_shapes=({0: torch.export.Dim("batch")},))
    run = qatx.export.load_program(tmp_path / "m.pt2").module()
    for b in (1, 7):
        xb = torch.randn(b, 3, 8, 8)
        assert torch.equal(run(xb), frozen_reference(q, xb))


# ---------------------------------------------------------------- load errors

def _rewrite_zip(src, dst, metadata):
    """Copies the zip archive src to dst with qatx_metadata.json replaced by `metadata` (None: dropped)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename.endswith("/extra/qatx_metadata.json"):
                if metadata is not None:
                    zout.writestr(item, metadata)
                continue
            zout.writestr(item, zin.read(item.filename))


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    x = torch.randn(2, 32)
    q = trained(mlp(), presets.W8A8, x).eval()
    qatx.export.torchscript(q, x, d / "m.pt")
    qatx.export.program(q, x, d / "m.pt2")
    return d


@pytest.mark.parametrize("kind", ["torchscript", "program"])
def test_load_errors(saved_files, tmp_path, kind):
    load = {"torchscript": qatx.export.load_torchscript, "program": qatx.export.load_program}[kind]
    good = saved_files / ("m.pt" if kind == "torchscript" else "m.pt2")
    load(good)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "missing.pt")
    data = good.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        load(tmp_path / "truncated")
    (tmp_path / "garbage").write_bytes(b"not a model" * 100)
    with pytest.raises(ExportFormatError, match="truncated or corrupt"):
        load(tmp_path / "garbage")
    meta = json.loads(zipfile.ZipFile(good).read(next(n for n in zipfile.ZipFile(good).namelist()
                                                       if n.endswith("qatx_metadata.json"))))
    assert meta["qatx_version"] == qatx.__version__ and meta["torch_version"] == torch.__version__
    _rewrite_zip(good, tmp_path / "future", json.dumps(dict(meta, qatx_version="9.4.0")))
    with pytest.raises(ExportFormatError, match=r"saved by qatx 9\.4\.0, which is incompatible"):
        load(tmp_path / "future")
    _rewrite_zip(good, tmp_path / "format", json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ExportFormatError, match="export format version 99"):
        load(tmp_path / "format")
    _rewrite_zip(good, tmp_path / "plain", None)
    with pytest.raises(ExportFormatError, match="not written by qatx.export"):
        load(tmp_path / "plain")
    _rewrite_zip(good, tmp_path / "badjson", "{not json")
    with pytest.raises(ExportFormatError, match="unreadable"):
        load(tmp_path / "badjson")
    # A plausible-looking file of the other kind is refused by name.
    other = saved_files / ("m.pt2" if kind == "torchscript" else "m.pt")
    with pytest.raises(ExportFormatError, match="kind"):
        load(other)


def test_export_argument_errors(tmp_path):
    x = torch.randn(2, 32)
    q = trained(mlp(), presets.W8A8, x).eval()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qatx.export.torchscript(lambda t: t, x, tmp_path / "a.pt")
    with pytest.raises(TypeError, match="example_inputs"):
        qatx.export.program(q, 3, tmp_path / "a.pt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qatx.export.torchscript(q, x, tmp_path / "no" / "dir" / "a.pt")
    with pytest.raises(ValueError, match="method must be"):
        qatx.export.torchscript(q, x, tmp_path / "a.pt", method="compile")
    with pytest.raises(ValueError, match=r"opset must be an int in \[13, 23\]"):
        qatx.export.onnx(q, x, tmp_path / "a.onnx", opset=11)
