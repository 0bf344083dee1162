"""Faults: corrupted or truncated checkpoints of a prepared QAT model give a clear error when loaded
(never a silently wrong model), and a checkpoint saved in the middle of QAT (model + optimizer)
resumes bit-identically to an uninterrupted run."""
import copy
import io
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatx

LOAD_ERRORS = (RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def batches(n, batch=8, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 10, 10, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def make(preset):
    model = qatx.prepare_qat(small_cnn(), getattr(qatx.presets, preset)).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def step(model, opt, x, t):
    loss = F.cross_entropy(model(x), t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def trained(preset, steps=2):
    model, opt = make(preset)
    for x, t in batches(steps):
        step(model, opt, x, t)
    return model, opt


def saved_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(data):
    return torch.load(io.BytesIO(data), weights_only=True)


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# --- file-level corruption -------------------------------------------------------------------------

def write(tmp_path, data, name="ckpt.pt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_refused(preset, fraction, tmp_path):
    model, opt = trained(preset)
    data = saved_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()})
    path = write(tmp_path, data[:int(len(data) * fraction)])
    with pytest.raises(RuntimeError, match="truncated or not a checkpoint|corrupted"):
        qatx.load_checkpoint(path)
    # torch.load refuses truncation too, but not always clearly (OSError "Invalid argument" for some lengths)
    with pytest.raises(LOAD_ERRORS + (OSError,)):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
def test_corrupted_checkpoint_bytes_are_refused(preset, tmp_path):
    """A byte flipped anywhere in the file, tensor data and pickle included, is refused by
    qatx.load_checkpoint (the archive's CRC-32s), or, where the byte carries no content (zip
    metadata such as timestamps), the checkpoint loads intact: never silently wrong weights,
    scales or flags. torch.load alone misses most of these flips (it does not verify the CRCs)."""
    model, _ = trained(preset)
    state = model.state_dict()
    data = saved_bytes(state)
    refused = silent_with_torch_load = 0
    positions = range(0, len(data), max(len(data) // 150, 1))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path = write(tmp_path, bytes(bad))
        try:
            loaded = qatx.load_checkpoint(path)
        except RuntimeError as e:
            assert str(path) in str(e)
            refused += 1
            try:
                loaded_by_torch = torch.load(path, weights_only=True)
                silent_with_torch_load += _differs(loaded_by_torch, state)
            except Exception:
                pass
            continue
        assert not _differs(loaded, state), f"byte {pos}: silently changed checkpoint"
    assert refused >= len(positions) // 2, f"only {refused} of {len(positions)} corruptions detected"
    assert silent_with_torch_load > 0  # what load_checkpoint adds over torch.load


def _differs(a, b):
    if a.keys() != b.keys():
        return True
    return any(not (torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k]) for k in a)


def test_garbage_and_wrong_format_files_are_refused(tmp_path):
    for i, data in enumerate((b"", b"\x00" * 100, b"not a checkpoint", pickle.dumps([1, 2, 3]))):
        with pytest.raises(RuntimeError, match="truncated or not a checkpoint"):
            qatx.load_checkpoint(write(tmp_path, data, f"f{i}.pt"))


def test_save_checkpoint_is_atomic(tmp_path):
    """A save that fails midway leaves the previous checkpoint loadable and no temporary file."""
    model, opt = trained("W8A8")
    path = tmp_path / "ckpt.pt"
    qatx.save_checkpoint({"model": model.state_dict()}, path)
    with pytest.raises(Exception):
        qatx.save_checkpoint({"model": model.state_dict(), "bad": lambda: None}, path)  # unpicklable
    assert not _differs(qatx.load_checkpoint(path)["model"], model.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# --- semantically corrupted state dicts -----------------------------------------------------------

def quantizer_keys(state, suffix):
    return [k for k in state if k.endswith(suffix)]


@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
def test_missing_or_unexpected_keys_are_refused(preset):
    model, _ = trained(preset)
    state = model.state_dict()
    fresh, _ = make(preset)
    for key in [k for k in state if "quantizer" in k][:6]:
        broken = dict(state)
        del broken[key]
        with pytest.raises(RuntimeError, match="Missing key"):
            fresh.load_state_dict(broken)
    broken = dict(state)
    broken["0.weight_quantizer.bogus"] = torch.ones(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(broken)


def test_learnable_scale_of_the_wrong_shape_is_refused():
    model, _ = trained("W4A4_LSQ")
    state = model.state_dict()
    key = quantizer_keys(state, "weight_quantizer.scale")[0]
    fresh, _ = make("W4A4_LSQ")
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({**state, key: torch.ones(state[key].numel() + 1)})


@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_invalid_scale_values_are_refused_on_load(preset, value):
    model, _ = trained(preset)
    state = model.state_dict()
    key = quantizer_keys(state, "weight_quantizer.scale")[0]
    bad = state[key].clone()
    bad.view(-1)[0] = value
    fresh, _ = make(preset)
    if preset == "W4A4_LSQ" and value in (0.0, -1.0):
        # A learned scale may legitimately be saved below eps (an optimizer step after the clamp):
        # it loads and is clamped to eps before the next use.
        fresh.load_state_dict({**state, key: bad})
        assert torch.isfinite(fresh(batches(1)[0][0])).all()
        return
    with pytest.raises(RuntimeError, match=r"scale"):
        fresh.load_state_dict({**state, key: bad})


def test_fixed_qparams_of_the_wrong_shape_or_dtype_are_refused():
    model, _ = trained("W8A8")
    state = model.state_dict()
    scale_key = quantizer_keys(state, "weight_quantizer.scale")[0]
    zp_key = quantizer_keys(state, "weight_quantizer.zero_point")[0]
    cases = [
        {scale_key: torch.ones(state[scale_key].numel() + 1)},            # scale and zero point disagree
        {scale_key: torch.ones(2, 4), zp_key: torch.zeros(2, 4, dtype=torch.int32)},  # per-channel but 2-D
        {zp_key: state[zp_key].float()},                                   # zero point not an integer tensor
        {scale_key: state[scale_key].to(torch.int32)},                     # scale not floating
    ]
    for change in cases:
        fresh, _ = make("W8A8")
        with pytest.raises(RuntimeError, match=r"scale|zero_point"):
            fresh.load_state_dict({**state, **change})
    fresh, _ = make("W8A8")
    bad_zp = state[zp_key].clone()
    bad_zp.view(-1)[0] = 1000  # outside the int8 range
    with pytest.raises(RuntimeError, match="zero_point"):
        fresh.load_state_dict({**state, zp_key: bad_zp})


def test_per_channel_qparams_for_another_channel_count_fail_clearly_at_the_first_forward():
    """A consistent per-channel scale / zero point of another length loads (the quantizer does not know
    its layer's channel count) and the first forward with the observer off names the mismatch."""
    model, _ = trained("W8A8")
    state = model.state_dict()
    scale_key = quantizer_keys(state, "weight_quantizer.scale")[0]
    zp_key = quantizer_keys(state, "weight_quantizer.zero_point")[0]
    n = state[scale_key].numel() + 1
    fresh, _ = make("W8A8")
    fresh.load_state_dict({**state, scale_key: torch.ones(n), zp_key: torch.zeros(n, dtype=torch.int32)})
    qatx.enable_observer(fresh, False)
    with pytest.raises(RuntimeError, match="per-channel scale and zero_point must have shape"):
        fresh(batches(1)[0][0])


@pytest.mark.parametrize("extra", [{"fake_quant_enabled": "yes", "observer_enabled": True},
                                   {"fake_quant_enabled": True},
                                   {"fake_quant_enabled": True, "observer_enabled": True, "forward": None},
                                   "garbage"])
def test_corrupted_quantizer_extra_state_is_refused(extra):
    model, _ = trained("W8A8")
    state = model.state_dict()
    key = quantizer_keys(state, "weight_quantizer._extra_state")[0]
    fresh, _ = make("W8A8")
    with pytest.raises((RuntimeError, ValueError, TypeError), match="extra state|_extra_state|fake_quant_enabled"):
        fresh.load_state_dict({**state, key: extra})


# --- resume mid-QAT --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["W8A8", "W4A4_LSQ"])
def test_resume_from_a_mid_training_checkpoint_is_bit_identical(preset, tmp_path):
    """Train 6 steps uninterrupted; train 3, save model + optimizer to a file, load both into a freshly
    prepared model and a new optimizer, train 3 more: identical losses, parameters, BN statistics,
    observer ranges, LSQ scales and optimizer state."""
    data = batches(6)
    model, opt = make(preset)
    losses = [step(model, opt, x, t) for x, t in data]

    first, first_opt = make(preset)
    resumed_losses = [step(first, first_opt, x, t) for x, t in data[:3]]
    path = tmp_path / "ckpt.pt"
    qatx.save_checkpoint({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, path)
    del first, first_opt

    ckpt = qatx.load_checkpoint(path)
    second, second_opt = make(preset)
    second.load_state_dict(ckpt["model"])
    second_opt.load_state_dict(ckpt["optimizer"])
    resumed_losses += [step(second, second_opt, x, t) for x, t in data[3:]]

    assert torch.equal(torch.stack(losses), torch.stack(resumed_losses))
    assert_state_equal(model.state_dict(), second.state_dict())
    a, b = opt.state_dict()["state"], second_opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def test_resume_keeps_the_lsq_initialisation_and_toggles():
    """The resumed LSQ quantizers are initialised (no re-initialisation from the next batch) and keep
    their observer / fake-quant toggles."""
    model, _ = trained("W4A4_LSQ")
    qatx.enable_observer(model, False)
    state = copy.deepcopy(model.state_dict())
    fresh, _ = make("W4A4_LSQ")
    fresh.load_state_dict(state)
    for q in (m for m in fresh.modules() if isinstance(m, qatx.LearnableFakeQuantize)):
        assert q.initialized and not q.observer_enabled
