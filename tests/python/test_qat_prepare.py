"""prepare_qat: fusion detection, BN-folding numerics against a reference, freeze-BN, to_float
folding, overrides and skip, op modules, toggles."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx
from qatx import QConfig, QuantSpec, presets
from qatx.nn import qat

FUSED = [
    (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), qat.ConvBn1d, (4, 3, 10)),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()), qat.ConvBnReLU2d, (4, 3, 8, 8)),
    (lambda: nn.Sequential(nn.Conv3d(2, 4, 2, bias=False), nn.BatchNorm3d(4), nn.ReLU()), qat.ConvBnReLU3d,
     (2, 2, 4, 4, 4)),
    (lambda: nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6)), qat.LinearBn1d, (8, 10)),
]
FUSED_IDS = ["ConvBn1d", "ConvBnReLU2d", "ConvBnReLU3d", "LinearBn1d"]


def _randomise_bn(bn, gen):
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("make,fused_cls,shape", FUSED, ids=FUSED_IDS)
def test_bn_folding_matches_reference(make, fused_cls, shape):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = make()
    _randomise_bn(ref[1], gen)
    prepared = qatx.prepare_qat(ref, presets.W8A8)
    fused = prepared[0]
    assert type(fused) is fused_cls and all(type(m) is nn.Identity for m in prepared[1:])
    x = torch.randn(shape, generator=gen)

    # Training, quantizers on: reference computed step by step from the definition.
    layer, bn = copy.deepcopy(ref[0]), copy.deepcopy(ref[1])
    f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    view = [-1] + [1] * (layer.weight.dim() - 1)
    wq = torch.fake_quantize_per_channel_affine(
        layer.weight * f.reshape(view), *_symmetric_qparams(layer.weight * f.reshape(view)), 0, -128, 127)
    xq = fused.input_quantizer(x.clone())  # the input quantizer is checked in test_qat_modules
    fused.input_quantizer.disable_observer()
    c_shape = [1, -1] + [1] * (x.dim() - 2)
    y_ref = (layer._conv_forward(xq, wq, None) if isinstance(layer, nn.modules.conv._ConvNd) else F.linear(xq, wq)) \
        * torch.reciprocal(f).reshape(c_shape)
    if layer.bias is not None:
        y_ref = y_ref + layer.bias.reshape(c_shape)
    y_ref = bn(y_ref)
    if len(ref) == 3:
        y_ref = F.relu(y_ref)
    y = fused(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)  # the same ops; BN's reductions are ordered alike
    torch.testing.assert_close(fused.bn.running_var, bn.running_var, atol=0, rtol=0)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, atol=0, rtol=0)

    # Quantizers off, train mode: exactly the unfused conv -> bn up to rounding of the /f * f.
    qatx.enable_fake_quant(prepared, False)
    ref2 = copy.deepcopy(ref)
    prepared2 = qatx.enable_fake_quant(qatx.prepare_qat(ref2, presets.W8A8), False)
    torch.testing.assert_close(prepared2(x), ref2(x), atol=1e-5, rtol=1e-5)

    # Eval: running statistics; to_float() is the exactly folded float layer.
    prepared2.eval()
    ref2.eval()
    folded = prepared2[0].to_float()
    assert type(folded if len(ref) == 2 else folded[0]) is type(ref[0])
    torch.testing.assert_close(folded(x), ref2(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prepared2(x), ref2(x), atol=1e-5, rtol=1e-5)


def _symmetric_qparams(w):
    scale = torch.clamp(w.detach().reshape(w.shape[0], -1).abs().amax(1) / 127, min=torch.finfo(torch.float32).eps)
    return scale, torch.zeros(w.shape[0], dtype=torch.int32)


def _scale_channels_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.qatx._scale_channels(a, b)


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 4, 4), (2, 6, 2, 3, 3)])
def test_scale_channels_op(shape):
    """qatx::_scale_channels: input * scale along dim 1; the gradients of aten::mul, with the
    scale's gradient formed from the saved output (grad_scale = sum(g * out / s))."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    s = (torch.rand(shape[1], generator=gen) + 0.5).requires_grad_()
    g = torch.randn(shape, generator=gen)
    y = torch.ops.qatx._scale_channels(x, s)
    view = [1, -1] + [1] * (len(shape) - 2)
    x_ref, s_ref = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    y_ref = x_ref * s_ref.reshape(view)
    assert torch.equal(y, y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.jit.script(_scale_channels_fn)(x.detach(), s.detach()), y.detach())
    with pytest.raises(RuntimeError, match="scale must be 1-D with input.size"):
        torch.ops.qatx._scale_channels(x, torch.ones(shape[1] + 1))
    with pytest.raises(RuntimeError, match="input must have at least 2 dimensions"):
        torch.ops.qatx._scale_channels(torch.ones(3), torch.ones(3))


def test_fused_training_step_keeps_less_for_backward():
    """A Conv-BN-ReLU training step keeps no float copy of the conv output (the un-scaling keeps
    the batch norm's input) nor of the ReLU output (a bool mask)."""
    torch.manual_seed(0)
    model = qatx.prepare_qat(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
                             presets.W8A8)
    x = torch.randn(4, 3, 10, 10)
    packed = []

    def pack(t):
        packed.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    big = {ptr for dtype, n, ptr in packed if dtype == torch.float32 and n == y.numel()}
    assert len(big) == 1, packed  # the batch norm's input, shared by the un-scaling
    assert any(dtype == torch.bool and n == y.numel() for dtype, n, _ in packed)  # the ReLU mask
    y.sum().backward()
    assert model[0].bn.weight.grad is not None and model[0].weight.grad is not None



class _ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1))
        self.shortcut = nn.Conv2d(8, 16, 1, 2)
        self.add = qatx.nn.QuantAdd()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.add(self.conv(x), self.shortcut(x)))
        return self.fc(y.mean((2, 3)))


def _train_steps(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_layers_keep_their_quantized_input_as_integer_codes(monkeypatch):
    """A W8A8 training step keeps each layer's fake-quantized input as uint8/int8 codes (the float
    copy is freed after the forward) and rebuilds it exactly: losses and updated parameters equal,
    bit for bit, those of a step that keeps the float input."""
    import weakref

    from qatx.nn.qat import modules as qat_modules
    torch.manual_seed(0)
    base = _ResBlock()
    x = torch.randn(6, 3, 12, 12)
    reference = _train_steps(qatx.prepare_qat(base, presets.W8A8), x)

    inputs = []
    original = qat_modules._apply_saving_codes

    def recording(apply, x, *args):
        inputs.append(weakref.ref(x))
        return original(apply, x, *args)

    monkeypatch.setattr(qat_modules, "_apply_saving_codes", recording)
    model = qatx.prepare_qat(base, presets.W8A8)
    losses, params = _train_steps(model, x)
    assert all(torch.equal(a, b) for a, b in zip(losses, reference[0]))
    assert all(torch.equal(a, b) for a, b in zip(params, reference[1]))
    assert len(inputs) == 2 * 5  # stem, two convs, shortcut, fc; two steps
    y = model(x)
    assert all(ref() is None for ref in inputs)  # no float input kept alive by the backward
    del y

    # Other saved-tensor hooks (here activation checkpointing) decide alone: the float path.
    inputs.clear()
    model = qatx.prepare_qat(base, presets.W8A8)
    model(x)
    torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
    assert len(inputs) == 5  # the plain forward's layers only
    # Double backward needs the float inputs: a clear error, and the documented way around it.
    model = qatx.prepare_qat(base, presets.W8A8)
    model(x)
    qatx.freeze_bn_stats(qatx.enable_observer(model, False))  # the same function in each forward
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xg).sum(), xg, create_graph=False)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) through a QAT layer"):
        torch.autograd.grad(model(xg).sum(), xg, create_graph=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = model(xg)
    (g2,) = torch.autograd.grad(y.sum(), xg, create_graph=True)
    assert torch.equal(g, g2.detach()) and g2.requires_grad
    # Codes in int8 when the range fits it, else uint8; none beyond 8 bits or for a learnable
    # (LSQ) input quantizer.
    def codes(**spec):
        return qat_modules._codes_dtype(QuantSpec(observer="minmax", **spec).make_quantizer())

    assert codes(bits=4, signed=False) == torch.int8 and codes(bits=8, signed=False) == torch.uint8
    assert codes(bits=8, signed=True) == torch.int8 and codes(bits=12, signed=True) is None
    assert qat_modules._codes_dtype(presets.W4A4_LSQ.activation.make_quantizer()) is None


def test_standalone_relu_keeps_a_mask_and_matches_nn_relu():
    torch.manual_seed(0)
    relu = qatx.nn.ReLU()
    x = torch.randn(64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    x.data[:4] = 0.0
    x_ref.data[:4] = 0.0  # the gradient at 0 is 0, as nn.ReLU's
    g = torch.randn(64)
    y, y_ref = relu(x), nn.ReLU()(x_ref)
    assert torch.equal(y, y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
        relu(x)
    assert kept == [torch.bool]  # the mask, not the float output
    # inplace ReLUs and skipped regions stay nn.ReLU
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4),
                          nn.ReLU())
    prepared = qatx.prepare_qat(model, presets.W8A8, skip=["5"])
    assert [type(m) for m in prepared][1::2] == [qatx.nn.ReLU, nn.ReLU, nn.ReLU]
    assert torch.jit.script(prepared.eval())(torch.ones(2, 4)).shape == (2, 4)


def test_freeze_bn_after_steps_and_explicit_freeze():
    torch.manual_seed(1)
    model = qatx.prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), presets.W8A8, freeze_bn_after=2)
    x = torch.randn(4, 3, 6, 6)
    model(x)
    model(x)
    assert not model[0].bn_frozen and model[0].bn.num_batches_tracked.item() == 2
    frozen_var = model[0].bn.running_var.clone()
    model(x * 3)
    assert model[0].bn_frozen and torch.equal(model[0].bn.running_var, frozen_var)
    assert "freeze_bn_after=2" in repr(model[0]) and "bn_frozen=True" in repr(model[0])
    # A prepared (e.g. calibrated PTQ) model takes freeze_bn_after too: its BN has tracked 3 batches.
    again = qatx.prepare_qat(qatx.prepare_ptq(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), presets.W8A8),
                             presets.W8A8, freeze_bn_after=4)
    again[0].bn.num_batches_tracked.fill_(3)
    again.train()
    again(x)
    assert not again[0].bn_frozen and again[0].freeze_bn_after == 4
    again(x)
    assert again[0].bn_frozen
    other = qatx.prepare_qat(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), presets.W8A8)
    qatx.freeze_bn_stats(other)
    before = other[0].bn.running_mean.clone()
    other(torch.randn(5, 3))
    assert torch.equal(other[0].bn.running_mean, before)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()  # shared: used twice, so never fused
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.unused_bn = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.add = qatx.nn.QuantAdd()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = self.conv3(x)  # conv3 -> add, never into a BN
        return self.relu(self.add(x, y + z))


class Branchy(Block):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: does not trace, so only Sequential children fuse
            return super().forward(x)
        return x


def test_fusion_detection_from_the_graph():
    model = qatx.prepare_qat(nn.Sequential(Block(), Block()), presets.W8A8)
    blk = model[0]
    # the reused ReLU is not fused; it becomes the mask-keeping qatx.nn.ReLU (one module, still shared)
    assert type(blk.conv1) is qat.ConvBn2d and type(blk.bn1) is nn.Identity and type(blk.relu) is qatx.nn.ReLU
    assert type(blk.conv2) is qat.ConvBn2d and type(blk.conv3) is qat.Conv2d
    assert type(blk.unused_bn) is nn.BatchNorm2d
    assert blk.add.input_quantizer is not None and isinstance(blk.add.other_quantizer, qatx.FakeQuantize)
    assert model(torch.randn(2, 4, 6, 6)).shape == (2, 4, 6, 6)


def test_fusion_falls_back_to_sequential_children_when_untraceable():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), Branchy())
    prepared = qatx.prepare_qat(model, presets.W8A8)
    assert type(prepared[0]) is qat.ConvBnReLU2d
    assert type(prepared[3].conv1) is qat.Conv2d and type(prepared[3].bn1) is nn.BatchNorm2d
    unfused = qatx.prepare_qat(model, presets.W8A8, fuse=False)
    assert type(unfused[0]) is qat.Conv2d and type(unfused[1]) is nn.BatchNorm2d


def test_overrides_skip_inplace_and_shared_modules():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), shared, shared, nn.Linear(8, 8), nn.Linear(8, 2))
    w4 = QConfig(QuantSpec(bits=4, granularity="per_channel"), presets.W8A8.activation)
    prepared = qatx.prepare_qat(model, w4, overrides={"0": presets.W8A8, "4": presets.W8A8}, skip=["3"])
    assert type(model[0]) is nn.Linear  # not in place
    assert prepared[0].weight_quantizer.bits == 8 and prepared[4].weight_quantizer.bits == 8
    assert prepared[1].weight_quantizer.bits == 4 and prepared[1] is prepared[2]
    assert type(prepared[3]) is nn.Linear
    keep = qatx.prepare_qat(model, w4, overrides={"[34]": None}, inplace=True)
    assert keep is model and type(model[3]) is nn.Linear and type(model[4]) is nn.Linear
    assert type(model[0]) is qat.Linear
    with pytest.raises(ValueError, match="pattern 'head' matches no module name"):
        qatx.prepare_qat(nn.Sequential(nn.Linear(2, 2)), w4, skip="head")
    with pytest.raises(TypeError, match=r"overrides\['0'\] must be a qatx.QConfig or None"):
        qatx.prepare_qat(nn.Sequential(nn.Linear(2, 2)), w4, overrides={"0": QuantSpec()})
    with pytest.raises(TypeError, match="qconfig must be a qatx.QConfig"):
        qatx.prepare_qat(nn.Sequential(nn.Linear(2, 2)), presets)


def test_op_modules_float_until_prepared():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 4, 5, generator=gen)
    mm, cat, add = qatx.nn.QuantMatmul(), qatx.nn.QuantCat(dim=1), qatx.nn.QuantAdd()
    assert torch.equal(mm(a, b), a @ b) and torch.equal(cat([a, a]), torch.cat([a, a], 1))
    model = qatx.prepare_qat(nn.ModuleDict({"mm": mm, "cat": cat, "add": add}), presets.W8A8)
    y = model["mm"](a, b)
    q1, q2 = model["mm"].input_quantizer, model["mm"].other_quantizer
    assert torch.equal(y, torch.matmul(q1(a), q2(b)))
    y = model["cat"]([a, a * 2])
    assert model["cat"].dim == 1 and y.shape == (2, 6, 4) and "dim=1" in repr(model["cat"])
    assert torch.equal(y, model["cat"].output_quantizer(torch.cat([a, a * 2], 1)))
    assert type(model["add"].to_float()) is qatx.nn.QuantAdd and "input=float" in repr(model["add"].to_float())


def test_toggles_reach_every_quantizer():
    model = qatx.prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(4 * 36, 3)), presets.W4A8)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    qatx.enable_observer(model, False)
    scales = [q.scale.clone() for q in model.modules() if isinstance(q, qatx.FakeQuantize)]
    model(x * 5)
    assert all(torch.equal(s, q.scale) for s, q in zip(scales, [q for q in model.modules()
                                                                if isinstance(q, qatx.FakeQuantize)]))
    qatx.enable_fake_quant(model, False)
    qatx.freeze_bn_stats(model)
    model.eval()
    ref = nn.Sequential(model[0].to_float(), nn.Flatten(), model[4].to_float())
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
