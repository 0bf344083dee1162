"""QAT layers through prepare_qat and from_float: swap coverage, exact numerics against the qatx
ops, per-output-channel ConvTranspose scales, to_float, repr, TorchScript, state_dict resume,
meta-device construction, AMP and torch.compile."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx
from qatx import QConfig, QuantSpec, presets
from qatx.nn import qat

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = presets.W8A8.activation

# (float layer, QAT class, input)
LAYERS = [
    (lambda: nn.Linear(12, 5), qat.Linear, lambda g: torch.randn(3, 12, generator=g)),
    (lambda: nn.Conv1d(4, 6, 3, groups=2), qat.Conv1d, lambda g: torch.randn(2, 4, 9, generator=g)),
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), qat.Conv2d, lambda g: torch.randn(2, 3, 8, 8, generator=g)),
    (lambda: nn.Conv3d(2, 4, 2, bias=False), qat.Conv3d, lambda g: torch.randn(2, 2, 4, 4, 4, generator=g)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), qat.ConvTranspose1d, lambda g: torch.randn(2, 4, 5, generator=g)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), qat.ConvTranspose2d, lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    (lambda: nn.ConvTranspose3d(2, 4, 2), qat.ConvTranspose3d, lambda g: torch.randn(2, 2, 3, 3, 3, generator=g)),
    (lambda: nn.Embedding(20, 8, padding_idx=0), qat.Embedding, lambda g: torch.randint(0, 20, (3, 4), generator=g)),
]
IDS = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding"]


def _out_channel_weight_rows(mod):
    """The weight as [out_channels, -1] rows (reference layout for per-output-channel scales)."""
    w = mod.weight.detach()
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        g = mod.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], -1).permute(0, 2, 1, 3)  # [g, out/g, in/g, k]
        return w.reshape(w.shape[0] * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("make_float,qat_cls,make_input", LAYERS, ids=IDS)
def test_swap_and_exact_numerics(make_float, qat_cls, make_input):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(make_float())
    prepared = qatx.prepare_qat(model, presets.W8A8)
    layer = prepared[0]
    assert type(layer) is qat_cls and isinstance(layer, type(model[0]))
    assert layer.weight is not model[0].weight and torch.equal(layer.weight, model[0].weight)  # deep copy
    x = make_input(gen)
    y = layer(x)
    # weight: symmetric int8 per output channel, scale = amax / 127, exactly as the reference rows say
    rows = _out_channel_weight_rows(layer)
    scale = torch.clamp(rows.abs().amax(1) / 127, min=torch.finfo(torch.float32).eps)
    assert torch.equal(layer.weight_quantizer.scale, scale)
    wq = layer._quantized_weight().detach()
    ref_rows = torch.fake_quantize_per_channel_affine(rows, scale, torch.zeros(len(scale), dtype=torch.int32), 0,
                                                      -128, 127)
    assert torch.equal(_rows_of(layer, wq), ref_rows)
    # output (training): the float op on the fake-quantized input and weight
    ref_layer = copy.deepcopy(model[0])
    with torch.no_grad():
        ref_layer.weight.copy_(wq)
    xq = x if qat_cls is qat.Embedding else layer.input_quantizer(x)
    assert torch.equal(y, ref_layer(xq))
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # eval: the bias rounded (half to even, float64) to the int32 grid of s_in * s_w[c], the bias
    # an INT8 layer adds; gradient straight through to the bias
    layer.eval()
    layer.zero_grad()
    y_eval = layer(x)
    if getattr(ref_layer, "bias", None) is not None:
        with torch.no_grad():
            grid = layer.input_quantizer.scale.double() * scale.double()
            ref_layer.bias.copy_((torch.round(ref_layer.bias.double() / grid) * grid).float())
            assert not torch.equal(ref_layer.bias, model[0].bias)  # the rounding is visible at this scale
    y_ref = ref_layer(xq)
    assert torch.equal(y_eval, y_ref)
    if getattr(ref_layer, "bias", None) is not None:
        ref_layer.zero_grad()
        y_eval.float().sum().backward()
        y_ref.float().sum().backward()
        assert torch.equal(layer.bias.grad, ref_layer.bias.grad)


def _rows_of(layer, w):
    probe = copy.copy(layer)
    probe._parameters = dict(layer._parameters)
    probe._parameters["weight"] = nn.Parameter(w)
    return _out_channel_weight_rows(probe)


@pytest.mark.parametrize("make_float,qat_cls,make_input", LAYERS, ids=IDS)
def test_from_float_to_float_repr_and_script(make_float, qat_cls, make_input):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    fl = make_float()
    q = qat_cls.from_float(fl, presets.W8A8)
    assert q.weight is fl.weight  # shares the parameters
    back = q.to_float()
    assert type(back) is type(fl) and back.weight is fl.weight
    x = make_input(gen)
    assert torch.equal(back(x), fl(x))
    text = repr(q)
    assert "weight=int8 per_channel sym" in text
    assert ("input=float" in text) if qat_cls is qat.Embedding else ("input=uint8 per_tensor asym" in text)
    scripted = torch.jit.script(copy.deepcopy(q))
    assert torch.equal(scripted(x), q(x))
    with pytest.raises(TypeError, match="from_float expects"):
        qat_cls.from_float(nn.ReLU(), presets.W8A8)


def test_conv_transpose_grouped_has_one_scale_per_output_channel():
    torch.manual_seed(2)
    ct = nn.ConvTranspose2d(6, 9, 3, groups=3)  # weight [6, 3, 3, 3], 9 output channels
    q = qat.ConvTranspose2d.from_float(ct, presets.W4A8)
    q(torch.randn(1, 6, 4, 4))
    assert q.weight_quantizer.scale.shape == (9,)
    w = ct.weight.detach()
    for o in range(9):
        g, j = divmod(o, 3)
        assert q.weight_quantizer.scale[o] == w[2 * g:2 * g + 2, j].abs().max() / 7


def test_weight_only_and_lsq_layers():
    torch.manual_seed(3)
    lin = qat.Linear.from_float(nn.Linear(64, 4), presets.W4_WEIGHT_ONLY)
    assert isinstance(lin.input_quantizer, nn.Identity)
    x = torch.randn(2, 64)
    assert torch.equal(lin(x), F.linear(x, qatx.fake_quantize_per_group_affine(
        lin.weight, lin.weight_quantizer.scale, lin.weight_quantizer.zero_point, 32, -8, 7), lin.bias))
    lsq = qat.Conv2d.from_float(nn.Conv2d(3, 5, 3), presets.W4A4_LSQ)
    assert lsq.weight_quantizer.scale.shape == (5,)
    lsq(torch.rand(2, 3, 6, 6)).sum().backward()
    assert lsq.weight_quantizer.scale.grad is not None and lsq.input_quantizer.zero_point.grad is not None


def test_layer_config_errors():
    with pytest.raises(ValueError, match="per_group weight quantization .* use per_channel for convolutions"):
        qat.Conv2d.from_float(nn.Conv2d(3, 4, 3), presets.W4_WEIGHT_ONLY)
    with pytest.raises(ValueError, match=r"group_size=32 must divide the last dimension .*\[4, 48\]"):
        qatx.prepare_qat(nn.Sequential(nn.Linear(48, 4)), presets.W4_WEIGHT_ONLY)
    with pytest.raises(ValueError, match="max_norm"):
        qat.Embedding.from_float(nn.Embedding(4, 4, max_norm=1.0), presets.W8A8)
    with pytest.raises(ValueError, match=r"axis=3 is out of range .* 2 dimensions"):
        qat.Linear.from_float(nn.Linear(4, 4), QConfig(QuantSpec(granularity="per_channel", axis=3)))
    with pytest.raises(TypeError, match="qconfig must be a qatx.QConfig"):
        qat.Linear.from_float(nn.Linear(4, 4), QuantSpec())


# --- whole models ---------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.add = qatx.nn.QuantAdd()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.add(x, self.relu(self.bn(self.conv(x))))
        return self.head(x.mean((2, 3)))


def _train(model, steps, seed, opt=None):
    gen = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, t = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("cfg", ["W8A8", "W4A4_LSQ"])
def test_state_dict_resume_mid_training_is_identical(cfg):
    torch.manual_seed(4)
    qc = getattr(presets, cfg)
    model = qatx.prepare_qat(SmallCNN(), qc, freeze_bn_after=5)
    opt = _train(model, 3, seed=10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, 4, seed=11, opt=opt)  # crosses freeze_bn_after
    model.eval()
    expected = model(torch.ones(2, 3, 8, 8))

    torch.manual_seed(123)  # a different float init: everything must come from the checkpoint
    fresh = qatx.prepare_qat(SmallCNN(), qc, freeze_bn_after=5)
    buf.seek(0)
    ckpt = torch.load(buf)
    fresh.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    _train(fresh, 4, seed=11, opt=opt2)
    fresh.eval()
    assert torch.equal(fresh(torch.ones(2, 3, 8, 8)), expected)
    assert fresh.stem[0].bn_frozen and model.stem[0].bn_frozen


@pytest.mark.parametrize("cfg", ["W8A8", "W4A4_LSQ"])
def test_scripted_prepared_model_trains_like_eager(cfg):
    torch.manual_seed(5)
    eager = qatx.prepare_qat(SmallCNN(), getattr(presets, cfg))
    _train(eager, 1, seed=0)  # initialise the quantizers
    eager.zero_grad()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(4, 3, 8, 8)
    ye, ys = eager(x), scripted(x)
    assert torch.equal(ye, ys)
    ye.sum().backward()
    ys.sum().backward()
    for (name, pe), ps in zip(eager.named_parameters(), scripted.parameters()):
        assert torch.equal(pe.grad, ps.grad), name


def test_meta_device_construction_then_load():
    torch.manual_seed(6)
    real = qatx.prepare_qat(SmallCNN(), presets.W4A4_LSQ)
    _train(real, 2, seed=1)
    with torch.device("meta"):
        meta = qatx.prepare_qat(SmallCNN(), presets.W4A4_LSQ)
    tensors = list(meta.parameters()) + list(meta.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    real.eval()
    meta.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(meta(x), real(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", ["W8A8", "W4A4_LSQ"])
def test_amp_autocast_training_step(cfg, dtype):
    torch.manual_seed(7)
    model = qatx.prepare_qat(SmallCNN(), getattr(presets, cfg))
    x = torch.randn(4, 3, 8, 8)
    ref = copy.deepcopy(model)(x)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.1)  # bf16 has 8 mantissa bits, fp16 11
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("cfg", ["W8A8", "W4A4_LSQ"])
def test_compile_fullgraph_training_matches_eager(cfg):
    torch._dynamo.reset()
    torch.manual_seed(8)
    eager = qatx.prepare_qat(SmallCNN(), getattr(presets, cfg))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        if step == 3:
            for m in (eager, model):  # the frozen-statistics path too
                qatx.freeze_bn_stats(m)
        x, t = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        losses = []
        for m, opt in ((eager, opt_e), (compiled, opt_c)):
            loss = F.cross_entropy(m(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
    for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(pc, pe, atol=1e-5, rtol=1e-5, msg=name)  # fused kernels: reduction order
    for (name, be), bc in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(bc, be, atol=1e-5, rtol=1e-5, msg=name)
