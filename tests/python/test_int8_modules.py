"""qatx.convert and the INT8 modules: integer weights bit-exact with the QAT weight fake-quantize,
per-module parity (within one output step), whole-model parity (top-1 agreement) on a small CNN
and an MLP, state_dict round trip, TorchScript, torch.compile, model_size, compare, quantize_dynamic
and errors."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx
from qatx.nn import quantized as nnq


def calibrate(model, make_input, steps=4, train=True):
    """A few training-mode passes (observers and BN statistics), then eval with observers off."""
    model.train(train)
    with torch.no_grad():
        for _ in range(steps):
            model(*make_input())
    qatx.enable_observer(model, False)
    return model.eval()


def train_briefly(model, make_batch, steps=30, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = make_batch()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qatx.enable_observer(model, False)
    return model.eval()


def output_step(ref, bits=8):
    """The step of a bits-wide activation grid spanning the output's range."""
    return float(ref.max() - ref.min()) / (2 ** bits - 1)


def assert_within_one_step(out, ref, bits=8):
    err = float((out - ref).abs().max())
    assert err <= output_step(ref, bits), f"max error {err} exceeds one output step {output_step(ref, bits)}"


def fake_quantized_weight(qat_mod):
    with torch.no_grad():
        return qat_mod._quantized_weight()


def dequantized_int8_weight(mod):
    """(q - z) * s of the converted module's integer weight, in the QAT weight's shape."""
    q = mod.int_weight().float()
    s, z = mod.weight_scale, mod.weight_zero_point.float()
    if isinstance(mod, nnq.Linear):
        if s.dim() == 2 and s.shape[1] > 1:
            g = s.shape[1]
            return ((q.reshape(q.shape[0], g, -1) - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(q.shape)
        return (q - z.reshape(-1, 1)) * s.reshape(-1, 1)
    w = q.reshape(mod.weight_shape)
    s, z = s.expand(mod.out_channels), z.expand(mod.out_channels)
    if mod.transposed:
        g = mod.groups
        shp = list(w.shape)
        cs = [g, 1, shp[1]] + [1] * (w.dim() - 2)
        return ((w.reshape([g, shp[0] // g] + shp[1:]) - z.reshape(cs)) * s.reshape(cs)).reshape(shp)
    cs = [-1] + [1] * (w.dim() - 1)
    return (w - z.reshape(cs)) * s.reshape(cs)


LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), lambda: (torch.randn(8, 24),)),
    "linear_nobias": (lambda: nn.Linear(24, 16, bias=False), lambda: (torch.randn(2, 5, 24),)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: (torch.randn(2, 4, 10),)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), lambda: (torch.randn(2, 4, 9, 9),)),
    "conv2d_groups_reflect": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect"),
                              lambda: (torch.randn(2, 4, 7, 7),)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), lambda: (torch.randn(1, 3, 5, 5, 5),)),
    "conv2d_depthwise": (lambda: nn.Conv2d(20, 20, 3, stride=2, padding=1, groups=20),
                         lambda: (torch.randn(3, 20, 9, 9),)),
    "convT2d": (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
                lambda: (torch.randn(2, 6, 5, 5),)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 5, 4, stride=2), lambda: (torch.randn(2, 3, 6),)),
    "conv_bn_relu": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                     lambda: (torch.randn(4, 3, 8, 8),)),
    "conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)),
                lambda: (torch.randn(4, 3, 8, 8),)),
    "linear_bn": (lambda: nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10)), lambda: (torch.randn(16, 12),)),
}

CONFIGS = {
    "W8A8": qatx.presets.W8A8,
    "W4A8": qatx.presets.W4A8,
    "W8A8_per_tensor_signed_act": qatx.QConfig(weight=qatx.QuantSpec(bits=8),
                                              activation=qatx.QuantSpec(bits=8, signed=True)),
    "W8A8_asym_weight": qatx.QConfig(weight=qatx.QuantSpec(bits=8, symmetric=False, granularity="per_channel"),
                                     activation=qatx.QuantSpec(bits=8, signed=False, symmetric=False)),
    "W4A4_LSQ": qatx.presets.W4A4_LSQ,
}


def prepared_layer(name, config):
    torch.manual_seed(hash((name, config)) % 1000)
    make, inp = LAYERS[name]
    model = qatx.prepare_qat(nn.Sequential(make()), CONFIGS[config])
    calibrate(model, inp)
    return model, inp


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_per_module_parity(name, config):
    if config == "W4A4_LSQ" and name.startswith("conv") and "T" in name:
        pytest.skip("covered by the other configs")
    model, inp = prepared_layer(name, config)
    int8 = qatx.convert(model)
    (name, qat_mod), = [(n, m) for n, m in model.named_modules() if isinstance(m, qatx.nn.qat.QATModule)]
    mod = int8.get_submodule(name)
    assert isinstance(mod, (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d, nnq.ConvTranspose2d))
    # The integers are those of the weight fake-quantize, bit for bit.
    assert torch.equal(dequantized_int8_weight(mod), fake_quantized_weight(qat_mod))
    # One step of the config's activation grid: the int32 bias is rounded to s_in * s_w[c], which
    # is coarse for 4-bit activations and weights.
    bits = CONFIGS[config].activation.bits
    for _ in range(3):
        x = inp()
        with torch.no_grad():
            ref, out = model(*x), int8(*x)
        assert out.shape == ref.shape
        assert_within_one_step(out, ref, bits)


def test_weight_only_per_group_linear_and_4bit_packing():
    torch.manual_seed(0)
    model = qatx.prepare_qat(nn.Sequential(nn.Linear(64, 8)), qatx.presets.W4_WEIGHT_ONLY)
    calibrate(model, lambda: (torch.randn(4, 64),))
    int8 = qatx.convert(model)
    assert int8[0].weight.dtype == torch.uint8 and int8[0].weight.shape == (8, 32)
    assert torch.equal(dequantized_int8_weight(int8[0]), fake_quantized_weight(model[0]))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(int8(x), model(x))  # weight-only: the same float computation


def test_pack_int4_round_trip_and_errors():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    p = nnq.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 4)
    assert torch.equal(nnq.unpack_int4(p, 7), q)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        nnq.pack_int4(torch.tensor([9], dtype=torch.int8))
    with pytest.raises(TypeError):
        nnq.pack_int4(q.float())


def test_4bit_layers_keep_their_unpacked_weight_and_run_under_inference_mode():
    """A 4-bit layer unpacks its weight on every call: the same int8 tensor comes back while the
    packed weight is unchanged (so its packed form stays cached), a loaded state dict takes
    effect, and the model runs the same under torch.inference_mode as under no_grad."""
    torch.manual_seed(3)
    model = qatx.prepare_qat(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(16 * 6 * 6, 10)), qatx.presets.W4A8)
    calibrate(model, lambda: (torch.randn(4, 16, 6, 6),))
    int8 = qatx.convert(model)
    conv = int8[0]
    assert conv.weight.dtype == torch.uint8
    assert conv.int_weight().data_ptr() == conv.int_weight().data_ptr()
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        y = int8(x)
    with torch.inference_mode():
        assert torch.equal(int8(x), y)
        assert torch.equal(int8(x), y)
    other = copy.deepcopy(int8)
    with torch.no_grad():
        other[0].weight.copy_(torch.randint(0, 256, other[0].weight.shape, dtype=torch.uint8))
    int8.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(int8(x), other(x)) and not torch.equal(int8(x), y)


@pytest.mark.parametrize("bits,gran", [(8, "per_channel"), (4, "per_group"), (8, "per_tensor")])
def test_embedding_exact(bits, gran):
    torch.manual_seed(1)
    spec = qatx.QuantSpec(bits=bits, granularity=gran, group_size=4 if gran == "per_group" else 0)
    model = qatx.prepare_qat(nn.Sequential(nn.Embedding(20, 8, padding_idx=0)), qatx.QConfig(weight=spec))
    idx = torch.randint(0, 20, (3, 5))
    calibrate(model, lambda: (idx,))
    int8 = qatx.convert(model)
    with torch.no_grad():
        assert torch.equal(int8(idx), model(idx))
    with pytest.raises(TypeError, match="indices"):
        int8(idx.float())


def test_functional_ops_exact():
    torch.manual_seed(2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.add = qatx.nn.QuantAdd()
            self.cat = qatx.nn.QuantCat(dim=1)
            self.mm = qatx.nn.QuantMatmul()

        def forward(self, x):
            y = self.fc(x)
            z = self.add(x, y)
            return self.mm(self.cat([z, y]), self.cat([y, z]).t())

    model = qatx.prepare_qat(M(), qatx.presets.W8A8)
    calibrate(model, lambda: (torch.randn(4, 8),))
    int8 = qatx.convert(model)
    assert isinstance(int8.add, nnq.Add) and isinstance(int8.cat, nnq.Cat) and isinstance(int8.mm, nnq.Matmul)
    x = torch.randn(4, 8)
    with torch.no_grad():
        # The ops themselves are exact: feed both the same (QAT) intermediate values.
        y = model.fc(x)
        assert torch.equal(int8.add(x, y), model.add(x, y))
        assert torch.equal(int8.cat([x, y]), model.cat([x, y]))
        assert torch.equal(int8.mm(x, y.t()), model.mm(x, y.t()))
        assert_within_one_step(int8(x), model(x))


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.add = qatx.nn.QuantAdd()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.add(y, self.relu2(self.bn2(self.conv2(y))))
        return self.fc(torch.flatten(self.pool(F.max_pool2d(y, 2)), 1))


def mlp(width=64, classes=10):
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def _trained(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        model, shape = SmallCNN(), (3, 12, 12)
    else:
        model, shape = mlp(), (32,)
    proto = torch.randn(10, *shape)  # a learnable toy task: noisy class prototypes

    def batch(n=32):
        y = torch.randint(0, 10, (n,))
        return proto[y] + 0.5 * torch.randn(n, *shape), y

    qat_model = qatx.prepare_qat(model, qatx.presets.W8A8)
    train_briefly(qat_model, batch)
    return qat_model, batch


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_whole_model_parity_and_top1(kind):
    qat_model, batch = _trained(kind)
    int8 = qatx.convert(qat_model)
    types = {type(m) for m in int8.modules()}
    assert not any(issubclass(t, qatx.nn.qat.QATModule) for t in types)
    xs = [batch(250)[0] for _ in range(4)]
    report = qatx.compare(qat_model, int8, xs)
    rows = {r["layer"]: r for r in report.rows}
    assert rows["(model output)"]["top1_agree"] >= 0.995
    assert rows["(model output)"]["max_err_lsb"] <= 1.0, str(report)
    for r in report.rows:
        # Fed the INT8 model's own (slightly different) activations, a later quantizer may round
        # a value at a grid boundary to the neighbouring code: one input step, so up to ~2 steps.
        assert r["max_err_lsb"] <= 2.0, str(report)
        assert r["sqnr_db"] > 30, str(report)
    text = str(report)
    assert "max_err_lsb" in text and "(model output)" in text
    # Integer activations (the default) change no bit of the output.
    chained = [n for n, m in int8.named_modules() if getattr(m, "output_scale", None) is not None]
    assert chained
    with torch.no_grad():
        assert torch.equal(int8(xs[0]), qatx.convert(qat_model, integer_activations=False)(xs[0]))
    if kind == "cnn":
        assert isinstance(int8.conv1, nnq.Conv2d) and int8.conv1.relu and isinstance(int8.add, nnq.Add)
        assert "relu=True" in repr(int8.conv1)
    else:  # each ReLU that alone consumes a Linear's output is fused into it
        linears = [m for m in int8 if isinstance(m, nnq.Linear)]
        assert [m.relu for m in linears] == [True] * (len(linears) - 1) + [False]
        assert not any(isinstance(m, nn.ReLU) for m in int8)


class _TwoUses(nn.Module):
    """A Linear whose output feeds a ReLU and the output too: the ReLU must stay separate."""

    def __init__(self):
        super().__init__()
        self.fc, self.relu, self.out = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc(x)
        return self.out(self.relu(y)) + y[:, :3]


def test_convert_fuses_a_relu_only_when_it_alone_reads_the_layer():
    torch.manual_seed(0)
    qat_model = qatx.prepare_qat(_TwoUses(), qatx.presets.W8A8)
    qat_model(torch.randn(64, 8))
    int8 = qatx.convert(qat_model)
    assert not int8.fc.relu and isinstance(int8.relu, nn.ReLU)
    x = torch.randn(16, 8)
    assert torch.equal(int8(x), int8.out(int8.relu(int8.fc(x))) + int8.fc(x)[:, :3])


class _Residual(nn.Module):
    """Two residual adds followed by ReLU modules: the first sum feeds only its ReLU (fused by
    convert), the second sum also feeds the output (its ReLU stays a module)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.add, self.relu = qatx.nn.QuantAdd(), nn.ReLU()
        self.add2, self.relu2 = qatx.nn.QuantAdd(), nn.ReLU()

    def forward(self, x):
        y = self.relu(self.add(self.conv(x), x))
        z = self.add2(y, x)
        return self.relu2(z) + z


def test_convert_fuses_the_relu_after_an_add_into_one_add_int8():
    torch.manual_seed(0)
    qat_model = calibrate(qatx.prepare_qat(_Residual(), qatx.presets.W8A8), lambda: (torch.randn(8, 4, 6, 6),))
    int8 = qatx.convert(qat_model, integer_activations=False)  # float32 between layers
    assert int8.add.relu and isinstance(int8.relu, nn.Identity) and "relu=True" in repr(int8.add)
    assert not int8.add2.relu and isinstance(int8.relu2, nn.ReLU)
    x = torch.randn(5, 4, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        # The fused op gives the bits of the three ops it replaces.
        a, b = int8.conv(x), x
        unfused = torch.relu(int8.add.input_quant(a) + int8.add.other_quant(b))
        assert torch.equal(int8.add(a, b), unfused)
        # Operands of different shapes (broadcast) take the unfused path, as the QAT op computes.
        assert torch.equal(int8.add(a, b[:1]), torch.relu(qat_model.add(a, b[:1])))
        y = int8(x)
        assert_within_one_step(y, qat_model(x))
        # TorchScript, torch.compile and torch.export run the same op.
        assert torch.equal(torch.jit.script(int8)(x), y)
        assert torch.equal(torch.compile(int8, fullgraph=True, backend="eager")(x), y)
        assert torch.equal(torch.export.export(int8, (x,)).module()(x), y)
        # With integer activations (convert's default) the conv writes the add's uint8 codes and the
        # fused add those of add2's first operand (through the Identity left by the ReLU); add2
        # also feeds the output and stays float32. The model's bits do not change.
        chained = qatx.convert(qat_model)
        assert chained.conv.output_scale is not None and chained.add.output_scale is not None
        assert chained.add2.output_scale is None
        codes = chained.conv(x)
        assert codes.dtype == torch.uint8 and torch.equal(chained.add(codes, b), chained.add(a, b))
        assert torch.equal(chained.conv.dequantize_output(codes), int8.add.input_quant(a))
        assert "output=uint8 [0, 255]" in repr(chained.conv)
        assert torch.equal(chained(x), y)
        assert torch.equal(torch.jit.script(chained)(x), y)
        assert torch.equal(torch.compile(chained, fullgraph=True, backend="eager")(x), y)
        assert torch.equal(torch.export.export(chained, (x,)).module()(x), y)
    rows = {r["layer"]: r for r in qatx.compare(qat_model, int8, [x]).rows}
    assert rows["add"]["max_err_lsb"] <= 1.0 and rows["(model output)"]["max_err_lsb"] <= 1.0
    chained_rows = {r["layer"]: r for r in qatx.compare(qat_model, chained, [x]).rows}
    assert chained_rows["(model output)"] == rows["(model output)"]
    assert chained_rows["conv"]["max_err_lsb"] <= 1.0 and chained_rows["add"]["max_err_lsb"] <= 1.0


class _Chains(nn.Module):
    """conv1 feeds conv2 through a view-free path, conv2 a Linear through flatten; conv3's output
    is read by two consumers on different grids and by nothing else."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.scaled = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.fc(torch.flatten(self.conv2(self.relu1(self.conv1(x))), 1))
        z = self.conv3(x)
        return y + self.scaled(z.reshape(z.shape[0], -1)) + self.scaled(2 * z.reshape(z.shape[0], -1))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        y = self.a(x)
        if float(y.sum()) > 1e9:  # control flow on values: torch.fx cannot trace it
            y = y * 2
        return self.b(y)


def test_integer_activations_follow_the_graph():
    torch.manual_seed(0)
    qat_model = calibrate(qatx.prepare_qat(_Chains(), qatx.presets.W8A8), lambda: (torch.randn(8, 3, 8, 8),))
    int8 = qatx.convert(qat_model)
    plain = qatx.convert(qat_model, integer_activations=False)
    assert int8.conv1.output_scale is not None and int8.conv2.output_scale is not None
    assert isinstance(int8.relu1, nn.Identity)  # fused into conv1, then passed through
    assert int8.conv3.output_scale is None  # one of its consumers reads 2 * z: float32
    assert int8.fc.output_scale is None and plain.conv1.output_scale is None
    assert torch.equal(int8.conv1.output_scale, int8.conv2.input_scale)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert int8.conv2(int8.conv1(x)).dtype == torch.uint8
        assert torch.equal(int8(x), plain(x))
        assert torch.equal(torch.jit.script(int8)(x), plain(x))
    # A model torch.fx cannot trace keeps float32 between its layers.
    qat_dd = calibrate(qatx.prepare_qat(_DataDependent(), qatx.presets.W8A8), lambda: (torch.randn(8, 6),))
    dd = qatx.convert(qat_dd)
    assert dd.a.output_scale is None
    # The grid is set and cleared through the public method; bad grids are refused.
    layer = int8.conv3
    layer.quantize_output_to(torch.tensor([0.1]), torch.tensor([-3]), -128, 127)
    assert layer(x).dtype == torch.int8
    assert torch.equal(layer(x), torch.ops.qatx.quantize_per_tensor_affine(
        plain.conv3(x), torch.tensor([0.1]), torch.tensor([-3], dtype=torch.int32), -128, 127, torch.int8))
    layer.quantize_output_to(None)
    assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="output range must lie inside"):
        layer.quantize_output_to(torch.tensor([0.1]), torch.tensor([0]), -1, 254)
    with pytest.raises(ValueError, match="one-element scale and zero_point"):
        layer.quantize_output_to(torch.tensor([0.1, 0.2]), torch.tensor([0]))
    weight_only = qatx.nn.quantized.Linear(4, 4, quantize_input=False)
    with pytest.raises(ValueError, match="computes in float"):
        weight_only.quantize_output_to(torch.tensor([0.1]), torch.tensor([0]))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_concurrent_inference_from_four_threads_matches_serial(kind):
    """One converted model shared by 4 threads (eager and TorchScript), started together on a
    fresh model so that the first calls also race to build the packed-weight cache."""
    import threading

    qat_model, batch = _trained(kind)
    inputs = [batch(16 + 3 * i)[0] for i in range(4)]
    for script in (False, True):
        int8 = qatx.convert(qat_model)
        model = torch.jit.script(int8) if script else int8
        start = threading.Barrier(4)
        results, errors = [[] for _ in range(4)], []

        def work(i):
            try:
                start.wait()
                with torch.no_grad():
                    for r in range(20):
                        results[i].append(model(inputs[(i + r) % 4]))
            except BaseException as e:  # reported below, on the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        with torch.no_grad():
            serial = [qatx.convert(qat_model)(x) for x in inputs]
        for i in range(4):
            for r, y in enumerate(results[i]):
                assert torch.equal(y, serial[(i + r) % 4]), (script, i, r)


def test_state_dict_round_trip_scripting_and_size():
    qat_model, batch = _trained("cnn")
    int8 = qatx.convert(qat_model)
    x = batch(8)[0]
    with torch.no_grad():
        y = int8(x)
    sd = int8.state_dict()
    assert all(not t.is_quantized for t in sd.values())
    assert {sd["conv1.weight"].dtype, sd["conv1.bias"].dtype} == {torch.int8, torch.int32}
    # A freshly converted model of another initialisation takes the state and then agrees exactly.
    torch.manual_seed(123)
    other = qatx.prepare_qat(SmallCNN(), qatx.presets.W8A8)
    calibrate(other, lambda: (batch(8)[0],))
    other = qatx.convert(other)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(other(x), y)
    scripted = torch.jit.script(int8)
    with torch.no_grad():
        assert torch.equal(scripted(x), y)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(buf)(x), y)


def test_model_size_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    qat_model = qatx.prepare_qat(model, qatx.presets.W8A8)
    calibrate(qat_model, lambda: (torch.randn(16, 256),))
    int8 = qatx.convert(qat_model)
    ratio = qatx.model_size(model) / qatx.model_size(int8)
    assert ratio >= 3.5, ratio
    w4 = qatx.prepare_qat(model, qatx.presets.W4A8)
    calibrate(w4, lambda: (torch.randn(16, 256),))
    assert qatx.model_size(qatx.convert(w4)) < qatx.model_size(int8)


def test_torch_compile_fullgraph():
    qat_model, batch = _trained("mlp")
    int8 = qatx.convert(qat_model)
    x = batch(16)[0]
    compiled = torch.compile(int8, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), int8(x))


@pytest.mark.parametrize("bits,gran", [(8, "per_tensor"), (8, "per_row"), (4, "per_tensor")])
def test_quantize_dynamic(bits, gran):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    dyn = qatx.quantize_dynamic(model, bits=bits, granularity=gran)
    assert isinstance(dyn[0], nnq.DynamicLinear) and isinstance(model[0], nn.Linear)
    x = torch.randn(32, 256)
    with torch.no_grad():
        ref, out = model(x), dyn(x)
    noise = ((out - ref) ** 2).sum() / (ref ** 2).sum()
    assert 10 * torch.log10(1 / noise) > (25 if bits == 8 else 10)
    scripted = torch.jit.script(dyn)
    with torch.no_grad():
        assert torch.equal(scripted(x), out)
    assert qatx.model_size(dyn) < qatx.model_size(model) / (3 if bits == 8 else 5)
    assert "dynamic uint8" in repr(dyn[0])


def test_errors():
    with pytest.raises(ValueError, match="prepare_qat"):
        qatx.convert(mlp())
    with pytest.raises(TypeError):
        qatx.convert("model")
    prepared = qatx.prepare_qat(mlp(), qatx.presets.W8A8)
    with pytest.raises(ValueError, match="never observed"):
        qatx.convert(prepared)
    with pytest.raises(TypeError, match="Linear"):
        nnq.Linear.from_qat(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="granularity"):
        qatx.quantize_dynamic(mlp(), granularity="per_channel")
    with pytest.raises(ValueError, match="bits"):
        qatx.quantize_dynamic(mlp(), bits=3)
    with pytest.raises(ValueError, match="modules"):
        qatx.quantize_dynamic(mlp(), modules={nn.Conv2d})
    with pytest.raises(ValueError, match="8 bits"):
        nnq.Linear(4, 4, input_quant_min=0, input_quant_max=511)
    calibrate(prepared, lambda: (torch.randn(4, 32),))
    int8 = qatx.convert(prepared)
    with pytest.raises(RuntimeError, match="float32"):
        int8(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="no layer"):
        qatx.compare(mlp(), mlp(), torch.randn(2, 32))
    with pytest.raises(TypeError, match="inputs"):
        qatx.compare(prepared, int8, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_converted_model_matches_cpu():
    qat_model, batch = _trained("cnn")
    int8 = qatx.convert(qat_model)
    x = batch(64)[0]
    with torch.no_grad():
        y_cpu = int8(x)
        y_cuda = copy.deepcopy(int8).cuda()(x.cuda()).cpu()
    assert_within_one_step(y_cuda, y_cpu)


class _Pooled(nn.Module):
    """A ResNet-style stem: Conv-BN-ReLU, max pooling, then convolutions and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool2(self.conv(self.pool(self.stem(x)))), 1))


def test_integer_activations_pass_through_max_pooling():
    torch.manual_seed(0)
    qat_model = calibrate(qatx.prepare_qat(_Pooled(), qatx.presets.W8A8), lambda: (torch.randn(8, 3, 10, 10),))
    int8 = qatx.convert(qat_model)
    plain = qatx.convert(qat_model, integer_activations=False)
    assert isinstance(int8.pool, nnq.MaxPool2d) and isinstance(int8.pool2, nnq.MaxPool2d)
    assert type(plain.pool) is nn.MaxPool2d  # nothing to pass through: left as it is
    stem = int8.stem[0]
    assert stem.output_scale is not None and int8.conv.output_scale is not None
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        assert int8.pool(stem(x)).dtype == torch.uint8
        # Pooling the integers gives the integers of the pooled floats.
        pooled = int8.pool(plain.stem[0](x))
        assert torch.equal(int8.pool(stem(x)), torch.ops.qatx.quantize_per_tensor_affine(
            pooled, stem.output_scale, stem.output_zero_point, 0, 255, torch.uint8))
        y = plain(x)
        assert torch.equal(int8(x), y)
        assert torch.equal(torch.jit.script(int8)(x), y)
        assert torch.equal(torch.export.export(int8, (x,)).module()(x), y)
    rows = {r["layer"]: r for r in qatx.compare(qat_model, int8, [x]).rows}
    assert rows["(model output)"]["max_err_lsb"] <= 1.0
    with pytest.raises(TypeError, match="without return_indices"):
        nnq.MaxPool2d.from_float(nn.MaxPool2d(2, return_indices=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_max_pooling_of_integer_activations():
    pool = nnq.MaxPool2d(3, stride=2, padding=1)
    q = torch.randint(0, 256, (2, 4, 9, 9), dtype=torch.uint8)
    assert torch.equal(pool(q.cuda()).cpu(), pool(q))
    s = torch.randint(-128, 128, (2, 4, 9, 9), dtype=torch.int8)
    assert torch.equal(pool(s.cuda()).cpu(), pool(s))


@pytest.mark.parametrize("config", [(2, None, 0, 1, False), (3, 2, 1, 1, False), (2, 2, 0, 1, True),
                                    (3, 2, 1, 2, True), ((3, 2), (2, 1), (1, 0), 1, False)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_max_pool2d_of_integers_equals_float_pooling(config, dtype):
    kernel, stride, padding, dilation, ceil_mode = config
    pool = nnq.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    for shape in [(2, 3, 9, 11), (1, 4, 64, 64)]:  # 64 x 64: beyond torch's own uint8 pooling limit
        q = torch.randint(lo, hi, shape, dtype=dtype)
        for x in (q, q.contiguous(memory_format=torch.channels_last)):
            expected = F.max_pool2d(x.float(), kernel, stride, padding, dilation, ceil_mode=ceil_mode)
            out = pool(x)
            assert out.dtype == dtype and torch.equal(out.float(), expected)
    scripted = torch.jit.script(pool)
    assert torch.equal(scripted(q), pool(q))
