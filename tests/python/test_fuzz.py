"""Property-based fuzzing (hypothesis) of every ``torch.ops.qatx`` operator and the public Python
entry points, with random shapes (empty, 0-dim, non-contiguous, sliced with large strides,
expanded with stride 0, channels-last, storage offsets), dtypes and parameters, valid and invalid.

The property of every call: if all arguments are valid it returns what the references in
reference.py say, exactly (``rtol=atol=0``, NaN equal to NaN; only the learnable qparam
gradients, which are sums, to a stated reduction tolerance); if any argument is invalid it
raises ValueError, TypeError or RuntimeError whose message names one of the invalid arguments.
A crash, an abort, a hang (guarded by ``faulthandler``), a silently accepted invalid argument,
an unexpected exception type or a NaN out of finite inputs fails the test.

Families (one test each, run in file order) and their call counts go into ``CALLS``;
``test_fuzz_total_call_count`` prints the total and requires at least 10,000 calls per run.
Runs are reproducible (``derandomize=True``: the examples are a function of the test's source)
and have no per-example deadline (CI machines vary); the whole file takes well under 2 minutes
on 2 cores.

Adding an op: the schema-driven family (``test_fuzz_every_op_schema``) already fuzzes every op
registered under ``torch.ops.qatx`` from its schema alone (no crash, clear errors, no NaN from
finite inputs). For a reference check, add a family here with a validity model and a reference.
"""
import collections
import faulthandler
import math
import os
import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qatx
import reference as ref

CALLS = collections.Counter()
SECONDS = collections.Counter()
ALLOWED = (RuntimeError, ValueError, TypeError)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QDTYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767),
           torch.int32: (-2 ** 31, 2 ** 31 - 1)}
HANG_GUARD_S = 120  # per call: no single call of these small tensors takes more than a fraction of a second
# QATX_FUZZ_SCALE multiplies every family's example count (e.g. 10 for a long local run, 0.1 while
# debugging); CI runs the default 1.
FUZZ_SCALE = float(os.environ.get("QATX_FUZZ_SCALE", "1"))


def fuzz_settings(examples):
    return settings(max_examples=max(int(examples * FUZZ_SCALE), 1), derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class Outcome:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


def call(family, fn, *args, **kwargs):
    """Calls fn, counting the call; an allowed exception is returned, anything else propagates. A call
    that hangs dumps every thread's stack and exits instead of blocking CI."""
    CALLS[family] += 1
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    try:
        return Outcome(value=fn(*args, **kwargs))
    except ALLOWED as e:
        return Outcome(error=e)
    finally:
        faulthandler.cancel_dump_traceback_later()


def expect(outcome, bad, what):
    """bad: the names of the invalid arguments. Valid calls must succeed; invalid ones must raise an
    allowed exception naming one of them."""
    if not bad:
        if outcome.error is not None:
            raise AssertionError(f"{what}: valid call raised {type(outcome.error).__name__}: {outcome.error}")
        return outcome.value
    assert outcome.error is not None, f"{what}: invalid {sorted(bad)} accepted"
    message = str(outcome.error)
    assert any(re.search(r"\b" + re.escape(name) + r"\b", message) for name in bad), \
        f"{what}: the error does not name any of {sorted(bad)}: {type(outcome.error).__name__}: {message}"
    return None


def assert_exact(got, expected, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, \
        f"{what}: {got.dtype}{list(got.shape)} vs {expected.dtype}{list(expected.shape)}"
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


# --- shapes, layouts and values ------------------------------------------------------------------

SIZES = [0, 1, 1, 2, 3, 4, 5, 6, 8, 12]


@st.composite
def shapes(draw, min_dim=0, max_dim=4):
    ndim = draw(st.integers(min_dim, max_dim))
    return tuple(draw(st.sampled_from(SIZES)) for _ in range(ndim))


LAYOUTS = ["contiguous", "transposed", "sliced", "strided", "offset", "expanded", "channels_last"]


def with_layout(t, layout):
    """t's values in another memory layout (same shape and values)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced" and t.dim() >= 1:  # every second element of a doubled last dimension
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "strided" and t.dim() >= 1:  # large strides: every 7th row of a bigger buffer
        big = torch.zeros(7 * t.shape[0], *t.shape[1:], dtype=t.dtype)
        big[::7] = t
        return big[::7]
    if layout == "offset":
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    if layout == "expanded" and t.dim() >= 1 and t.numel() > 0:  # stride 0 along dim 0 (overlapping memory)
        return t[:1].expand(t.shape)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def random_values(shape, dtype, seed, scale_hint=0.1, specials=False):
    """Floats spread over and beyond a grid of step ~scale_hint, with exact ties, zeros and -0.0, and
    (specials) NaN, +-inf and huge values; integers over the dtype's range."""
    gen = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        lo, hi = QDTYPES.get(dtype, (-1000, 1000))
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=gen).bool()
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).clamp(lo, hi).to(dtype)
    x = torch.randn(shape, generator=gen) * scale_hint * 40
    n = x.numel()
    if n:
        flat = x.view(-1)
        pick = torch.rand(n, generator=gen)
        ties = (torch.randint(-300, 300, (n,), generator=gen) + 0.5) * scale_hint
        flat.copy_(torch.where(pick < 0.15, ties, flat))
        flat.copy_(torch.where((pick >= 0.15) & (pick < 0.2), torch.zeros(n), flat))
        flat.copy_(torch.where((pick >= 0.2) & (pick < 0.22), torch.full((n,), -0.0), flat))
        if specials:
            flat.copy_(torch.where((pick >= 0.22) & (pick < 0.25), torch.full((n,), float("nan")), flat))
            flat.copy_(torch.where((pick >= 0.25) & (pick < 0.27), torch.full((n,), float("inf")), flat))
            flat.copy_(torch.where((pick >= 0.27) & (pick < 0.29), torch.full((n,), -float("inf")), flat))
            flat.copy_(torch.where((pick >= 0.29) & (pick < 0.3), torch.full((n,), 1e30), flat))
    return x.to(dtype)


@st.composite
def tensors(draw, shape, dtype, scale_hint=0.1, specials=None):
    specials = draw(st.booleans()) if specials is None else specials
    x = random_values(shape, dtype, draw(st.integers(0, 2 ** 31 - 1)), scale_hint, specials)
    return with_layout(x, draw(st.sampled_from(LAYOUTS)))


def maybe(draw, p_bad=0.12):
    """True with probability ~p_bad: make this argument invalid."""
    return draw(st.integers(0, 999)) < p_bad * 1000


GOOD_SCALES = [2.0 ** -20, 1e-3, 0.01, 0.1, 0.37, 1.0, 7.5, 1e4]
BAD_SCALES = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-40, 1e39, 2.0 ** -127]
HUGE_INTS = [2 ** 62, -2 ** 62, 2 ** 63 - 1, -2 ** 63]


@st.composite
def scale_tensor(draw, shape, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)):
    """(scale, bad): values from GOOD_SCALES, sometimes one invalid value; bad iff a value is invalid
    after the ops' conversion to float32 (below 2**-126, not finite, or NaN)."""
    dtype = draw(st.sampled_from(dtypes))
    n = math.prod(shape)
    vals = [draw(st.sampled_from(GOOD_SCALES)) for _ in range(min(n, 4))]
    vals = (vals * n)[:n] if vals else []
    if n and maybe(draw, 0.15):
        vals[draw(st.integers(0, n - 1))] = draw(st.sampled_from(BAD_SCALES))
    s = torch.tensor(vals, dtype=torch.float64).reshape(shape).to(dtype)
    s32 = s.float()
    bad = bool(((~torch.isfinite(s32)) | (s32 < 2.0 ** -126)).any())
    return s, bad


@st.composite
def quant_ranges(draw, limit=(-32768, 32767)):
    """(quant_min, quant_max, bad) for a limit such as the fake-quantize range or a dtype's range."""
    bits = draw(st.integers(2, 16))
    signed, narrow = draw(st.booleans()), draw(st.booleans())
    qmin, qmax = qatx.quant_range(bits, signed, narrow)
    if maybe(draw, 0.1):
        qmin, qmax = draw(st.sampled_from([(qmax, qmin), (qmin, qmin), (-32769, 0), (0, 32768), (-2 ** 31, 2 ** 31 - 1),
                                           (HUGE_INTS[3], HUGE_INTS[2]), (5, -5), (0, 65535)]))
    bad = not (limit[0] <= qmin < qmax <= limit[1])
    return qmin, qmax, bad


@st.composite
def granularities(draw, shape):
    """(granularity, axis, group_size, qparam shape, bad names)."""
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    ndim = len(shape)
    bad = set()
    if gran == "per_tensor":
        return gran, 0, 0, draw(st.sampled_from([(1,), (), (1, 1)])), bad
    if gran == "per_channel":
        axis = draw(st.integers(-ndim - 1, ndim)) if not maybe(draw, 0.03) else draw(st.sampled_from(HUGE_INTS))
        if ndim == 0:
            bad |= {"axis", "input", "dimension"}
            return gran, axis, 0, (1,), bad
        if not -ndim <= axis < ndim:
            bad.add("axis")
            return gran, axis, 0, (1,), bad
        return gran, axis, 0, (shape[axis],), bad
    last = shape[-1] if ndim else 1
    divisors = [d for d in range(1, max(last, 1) + 1) if last % d == 0]
    group_size = draw(st.sampled_from(divisors)) if not maybe(draw, 0.15) else \
        draw(st.sampled_from([0, -1, -4, 7, 5, 1000] + HUGE_INTS))
    if ndim == 0:
        bad |= {"input", "group_size", "dimension"}
        return gran, 0, group_size, (1,), bad
    if group_size < 1 or last % group_size:
        bad.add("group_size")
        return gran, 0, group_size, (1,), bad
    return gran, 0, group_size, tuple(shape[:-1]) + (last // group_size,), bad


def wrong_shape(draw, qshape):
    options = [tuple(qshape) + (1,) if qshape else (2,), (sum(qshape) + 2,), (3, 2)]
    return draw(st.sampled_from(options))


# --- affine ops: fake-quantize (+ STE backward), quantize, dequantize ------------------------------

AFFINE = {(kind, gran): getattr(qatx, f"{kind}_{gran}_affine") for kind in ("fake_quantize", "quantize", "dequantize")
          for gran in ("per_tensor", "per_channel", "per_group")}


@fuzz_settings(2000)
@given(st.data())
def _fuzz_affine(data):
    draw = data.draw
    kind = draw(st.sampled_from(["fake_quantize", "fake_quantize", "quantize", "dequantize"]))
    shape = draw(shapes())
    bad = set()
    gran, axis, group_size, qshape, gbad = draw(granularities(shape))
    bad |= gbad
    # input
    if kind == "dequantize":
        dtype = draw(st.sampled_from(list(QDTYPES) + [torch.int64, torch.float32] if maybe(draw, 0.2) else list(QDTYPES)))
        if dtype not in QDTYPES:
            bad.add("input")
    else:
        dtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64, torch.int32] if maybe(draw, 0.2) else FLOAT_DTYPES))
        if dtype not in FLOAT_DTYPES:
            bad.add("input")
    scale, sbad = draw(scale_tensor(qshape, (torch.float32, torch.float64, torch.float16, torch.bfloat16)))
    x = draw(tensors(shape, dtype, scale_hint=float(scale.float().abs().reshape(-1)[:1].sum()) if scale.numel() else 0.1))
    # quant range / dtypes
    out_dtype = None
    if kind == "fake_quantize":
        qmin, qmax, rbad = draw(quant_ranges())
    elif kind == "quantize":
        out_dtype = draw(st.sampled_from(list(QDTYPES) + [torch.int64, torch.float32] if maybe(draw, 0.1)
                                         else list(QDTYPES)))
        qmin, qmax, rbad = draw(quant_ranges(QDTYPES.get(out_dtype, (0, -1))))
        if out_dtype == torch.int32 and maybe(draw, 0.3):  # int32 bounds that float32 cannot represent
            qmin, qmax, rbad = draw(st.sampled_from([(-2 ** 31 + 1, 2 ** 31 - 1), (-(2 ** 30 - 1), 2 ** 30 - 1),
                                                     (-2 ** 31, 2 ** 31 - 1), (-2 ** 25 - 1, 2 ** 25 + 1)])) + (False,)
        if out_dtype not in QDTYPES:
            bad.add("dtype")
            rbad = False
        if dtype in FLOAT_DTYPES and bool(torch.isnan(x).any()):
            bad.add("input")
    else:
        qmin, qmax, rbad = -128, 127, False
        out_dtype = draw(st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16] +
                                         ([torch.float64, torch.int32] if maybe(draw, 0.3) else [])))
        if out_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            bad.add("output_dtype")
    if rbad:
        bad |= {"quant_min", "quant_max"}
    if sbad:
        bad.add("scale")
    # zero point: integer dtype, inside [quant_min, quant_max] for (fake-)quantize
    zlo, zhi = (max(qmin, -2 ** 31), min(qmax, 2 ** 31 - 1)) if qmin < qmax else (0, 0)
    if kind == "dequantize":
        zlo, zhi = -300, 300
    n = math.prod(qshape)
    zvals = [draw(st.integers(zlo, zhi)) for _ in range(min(n, 3))]
    zvals = (zvals * n)[:n] if zvals else []
    zdtype = torch.int64 if kind != "dequantize" and (zlo < -32768 or zhi > 32767) else \
        draw(st.sampled_from([torch.int32, torch.int64, torch.int16]))
    if n and kind != "dequantize" and maybe(draw, 0.1):
        zvals[0] = draw(st.sampled_from([zlo - 1, zhi + 1, -40000, 40000]))
        if not (qmin <= zvals[0] <= qmax):
            bad.add("zero_point")
            if zdtype == torch.int16:  # an int16 tensor cannot hold the out-of-range value
                zdtype = torch.int32
    zero_point = torch.tensor(zvals, dtype=torch.int64).reshape(qshape).to(zdtype)
    if maybe(draw, 0.04):
        zero_point, bad = zero_point.float(), bad | {"zero_point"}
    if maybe(draw, 0.04):
        scale, bad = scale.to(torch.int32) if not sbad else scale.int(), bad | {"scale"}
    if not (bad & {"axis", "group_size", "input", "dimension"}) and maybe(draw, 0.06):
        which = draw(st.sampled_from(["scale", "zero_point", "both"]))
        ws = wrong_shape(draw, qshape)
        if which in ("scale", "both"):
            scale = torch.ones(ws, dtype=scale.dtype) if scale.dtype.is_floating_point else torch.ones(ws, dtype=torch.int32)
        if which in ("zero_point", "both"):
            zero_point = torch.zeros(ws, dtype=zero_point.dtype)
        if gran != "per_tensor" or math.prod(ws) != 1 or which != "both":
            bad |= {"scale", "zero_point"}
    if maybe(draw, 0.03):
        which = draw(st.sampled_from(["scale", "zero_point"]))
        if which == "scale":
            scale = scale.to("meta")
        else:
            zero_point = zero_point.to("meta")
        bad.add(which)
    requires_grad = kind == "fake_quantize" and dtype in FLOAT_DTYPES and draw(st.booleans())
    if requires_grad:
        x = x.detach().requires_grad_()
    fn = AFFINE[(kind, gran)]
    extra = [axis] if gran == "per_channel" else [group_size] if gran == "per_group" else []
    what = f"{fn.__name__}(shape={list(shape)}, {x.dtype}, stride={x.stride()}, extra={extra}, range=[{qmin}, {qmax}], " \
           f"scale={scale.dtype}{list(scale.shape)}, zp={zero_point.dtype}{list(zero_point.shape)}, out={out_dtype})"
    if kind == "fake_quantize":
        out = call("affine", fn, x, scale, zero_point, *extra, qmin, qmax)
    elif kind == "quantize":
        out = call("affine", fn, x, scale, zero_point, *extra, qmin, qmax, out_dtype)
    else:
        out = call("affine", fn, x, scale, zero_point, *extra, out_dtype)
    y = expect(out, bad, what)
    if y is None:
        return
    kw = dict(granularity=gran, axis=axis % max(len(shape), 1) if gran == "per_channel" else None,
              group_size=group_size if gran == "per_group" else None)
    xd = x.detach()
    if xd.numel() == 0:  # nothing to compare but the result's metadata
        expected_dtype = x.dtype if kind == "fake_quantize" else out_dtype or torch.float32
        assert y.shape == x.shape and y.dtype == expected_dtype, what
        return
    if kind == "fake_quantize":
        assert_exact(y, ref.fake_quantize(xd, scale, zero_point, qmin, qmax, **kw), what)
        if requires_grad:
            g = random_values(shape, dtype, 7, 1.0)
            CALLS["affine"] += 1
            y.backward(g)
            mask = ref.ste_mask(xd, scale, zero_point, qmin, qmax, **kw)
            assert_exact(x.grad, torch.where(mask, g, torch.zeros_like(g)), what + " grad")
    elif kind == "quantize":
        assert_exact(y, ref.quantize(xd, scale, zero_point, qmin, qmax, out_dtype, **kw), what)
    else:
        assert_exact(y, ref.dequantize(xd, scale, zero_point, out_dtype or torch.float32, **kw), what)


def test_fuzz_affine_ops():
    run_family("affine", _fuzz_affine)


# --- learnable quantizer ops: LSQ / LSQ+ (per tensor, channel, group) and PACT -------------------

@fuzz_settings(1000)
@given(st.data())
def _fuzz_lsq(data):
    draw = data.draw
    shape = draw(shapes())
    gran, axis, group_size, qshape, bad = draw(granularities(shape))
    if gran == "per_tensor" and len(shape) and maybe(draw, 0.05):
        axis, bad = draw(st.sampled_from([len(shape), -len(shape) - 1] + HUGE_INTS)), bad | {"axis"}
    elif gran == "per_tensor":
        axis = draw(st.integers(-len(shape), len(shape) - 1)) if len(shape) else draw(st.integers(-3, 3))
    if gran == "per_channel" and not bad and shape[axis] == 1:
        qshape = (1,)  # one channel: the per-tensor path, any axis in range
    if gran == "per_channel" and not shape:
        bad = set()  # a 0-dim input with one scale: per-tensor, the axis is not used (documented)
    dtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64] if maybe(draw, 0.1) else FLOAT_DTYPES))
    if dtype not in FLOAT_DTYPES:
        bad.add("input")
    qmin, qmax, rbad = draw(quant_ranges())
    if rbad:
        bad |= {"quant_min", "quant_max"}
    scale, sbad = draw(scale_tensor(qshape, (torch.float32,)))
    if sbad:
        bad.add("scale")
    zero_point = torch.tensor([draw(st.floats(-40000, 40000, allow_nan=False)) if maybe(draw, 0.5) else
                               float(draw(st.integers(qmin, qmax))) if qmin < qmax else 0.0
                               for _ in range(math.prod(qshape))], dtype=torch.float32).reshape(qshape)
    if zero_point.numel() and maybe(draw, 0.05):
        zero_point.view(-1)[0] = float("nan")
        bad.add("zero_point")
    if maybe(draw, 0.04):
        which = draw(st.sampled_from(["scale", "zero_point"]))
        if which == "scale":
            scale = scale.double()
        else:
            zero_point = zero_point.to(torch.int32) if not bool(torch.isnan(zero_point).any()) else zero_point.double()
        bad.add(which)
    grad_factor = draw(st.sampled_from([1.0, 0.01, 1e-4, 3.0]))
    if maybe(draw, 0.06):
        grad_factor = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
        bad.add("grad_factor")
    x = draw(tensors(shape, dtype, scale_hint=float(scale.reshape(-1)[:1].sum()) if scale.numel() else 0.1))
    learn_zp = draw(st.booleans())
    xr = x.detach().requires_grad_(dtype.is_floating_point)
    s = scale.detach().requires_grad_(scale.dtype.is_floating_point)
    z = zero_point.detach().requires_grad_(learn_zp and zero_point.dtype.is_floating_point)
    what = f"lsq {gran}(shape={list(shape)}, {dtype}, stride={x.stride()}, axis={axis}, group_size={group_size}, " \
           f"range=[{qmin}, {qmax}], gf={grad_factor}, scale{list(scale.shape)}, zp{list(zero_point.shape)})"
    if gran == "per_group":
        out = call("lsq", qatx.fake_quantize_lsq_per_group, xr, s, z, group_size, qmin, qmax, grad_factor)
    else:
        out = call("lsq", qatx.fake_quantize_lsq, xr, s, z, axis, qmin, qmax, grad_factor)
    y = expect(out, bad, what)
    if y is None:
        return
    kw = dict(granularity="per_tensor" if scale.numel() == 1 else gran, axis=axis % max(len(shape), 1),
              group_size=group_size if gran == "per_group" and scale.numel() != 1 else None)
    if gran == "per_group" and scale.numel() == 1:
        kw["granularity"] = "per_group"
        kw["group_size"] = group_size
    g = random_values(shape, dtype, 11, 1.0)
    ry, rgx, rgs, rgz = ref.lsq_forward_and_grads(x.detach(), scale, zero_point, qmin, qmax, grad_factor, g, **kw)
    assert_exact(y, ry, what)
    CALLS["lsq"] += 1
    y.backward(g)
    finite = bool(torch.isfinite(x.float()).all()) and bool(torch.isfinite(g.float()).all())
    if not finite:  # documented: NaN/inf inputs get no input gradient beyond the STE mask
        assert xr.grad is not None
        return
    assert_exact(xr.grad, rgx, what + " grad_input")
    # Reduction tolerance: float32 terms summed in float64 in another order.
    if x.numel() == 0:
        assert not bool(s.grad.any()), what  # no elements: zero qparam gradients
        return
    tol = 1e-5 * grad_factor * (g.float().abs().sum() * (x.float().abs().max() / scale.min() + qmax - qmin + 1)).item() + 1e-30
    assert torch.isfinite(s.grad).all(), what
    assert (s.grad - rgs).abs().max().item() <= tol if s.grad.numel() else True, f"{what}: grad_scale {s.grad} vs {rgs}"
    if learn_zp:
        ztol = 1e-5 * grad_factor * (g.float().abs().sum() * scale.max()).item() + 1e-30
        assert (z.grad - rgz).abs().max().item() <= ztol if z.grad.numel() else True, f"{what}: grad_zero_point"
    else:
        assert z.grad is None


def test_fuzz_lsq_ops():
    run_family("lsq", _fuzz_lsq)


@fuzz_settings(600)
@given(st.data())
def _fuzz_pact(data):
    draw = data.draw
    shape = draw(shapes())
    bad = set()
    bits = draw(st.integers(2, 16)) if not maybe(draw, 0.1) else draw(st.sampled_from([0, 1, 17, 64, -3] + HUGE_INTS))
    if not 2 <= bits <= 16:
        bad.add("bits")
    signed = draw(st.booleans())
    alpha_value = draw(st.sampled_from([0.5, 1.0, 6.0, 1e-3, 100.0]))
    if maybe(draw, 0.1):
        alpha_value = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e-38]))
        if "bits" not in bad and not (math.isfinite(alpha_value) and alpha_value > 0 and
                                      torch.tensor(alpha_value / ref.pact_levels(bits, signed)).float() >= 2.0 ** -126):
            bad.add("alpha")
        elif "bits" in bad:
            bad.add("alpha")
    alpha = torch.tensor([alpha_value]).reshape(draw(st.sampled_from([(1,), (), (1, 1)])))
    if maybe(draw, 0.04):
        alpha, bad = draw(st.sampled_from([torch.ones(2), alpha.double(), torch.ones(0)])), bad | {"alpha"}
    dtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.float64, torch.int32] if maybe(draw, 0.1) else FLOAT_DTYPES))
    if dtype not in FLOAT_DTYPES:
        bad.add("input")
    x = draw(tensors(shape, dtype, scale_hint=alpha_value / 10 if math.isfinite(alpha_value) and alpha_value > 0 else 0.1))
    xr = x.detach().requires_grad_(dtype.is_floating_point)
    a = alpha.detach().requires_grad_(alpha.dtype.is_floating_point)
    what = f"pact(shape={list(shape)}, {dtype}, stride={x.stride()}, bits={bits}, signed={signed}, alpha={alpha_value})"
    y = expect(call("pact", qatx.fake_quantize_pact, xr, a, bits, signed), bad, what)
    if y is None:
        return
    g = random_values(shape, dtype, 13, 1.0)
    ry, rgx, rga = ref.pact_forward_and_grads(x.detach(), alpha, bits, signed, g)
    assert_exact(y, ry, what)
    CALLS["pact"] += 1
    y.backward(g)
    assert_exact(xr.grad, rgx, what + " grad_input")
    tol = 1e-6 * g.float().abs().sum().item()
    assert abs(a.grad.sum().item() - rga.sum().item()) <= tol or (math.isnan(a.grad.sum().item()) and
                                                                   math.isnan(rga.sum().item())), what


def test_fuzz_pact_op():
    run_family("pact", _fuzz_pact)


# --- every op from its schema alone (private backward ops included) ------------------------------

def qatx_schemas():
    return sorted((s for s in torch._C._jit_get_all_schemas() if s.name.startswith("qatx::")), key=lambda s: s.name)


ANY_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.bool]


@st.composite
def schema_tensor(draw, base_shape):
    kind = draw(st.sampled_from(["base", "base", "one", "channel", "bytes", "random", "scalar"]))
    if kind == "base":
        shape = base_shape
    elif kind == "one":
        shape = (1,)
    elif kind == "channel":
        shape = (base_shape[0] if base_shape else 1,)
    elif kind == "bytes":  # the size of a bit mask for base_shape
        shape = ((math.prod(base_shape) + 7) // 8,)
    elif kind == "scalar":
        shape = ()
    else:
        shape = draw(shapes())
    dtype = draw(st.sampled_from(ANY_DTYPES))
    t = draw(tensors(shape, dtype, scale_hint=draw(st.sampled_from([0.01, 0.1, 1.0]))))
    if dtype.is_floating_point and kind in ("one", "channel", "scalar") and draw(st.booleans()):
        t = t.abs() + 0.05  # plausible scales / alphas
    return t


def schema_value(draw, arg, base_shape):
    ty = str(arg.real_type)
    if ty == "Tensor":
        return draw(schema_tensor(base_shape))
    if ty == "int":
        return draw(st.one_of(st.integers(-4, 4), st.sampled_from([-128, 127, 0, 255, -32768, 32767, 15, -8, 7]),
                              st.sampled_from(HUGE_INTS + [2 ** 31, -2 ** 31 - 1])))
    if ty == "float":
        return draw(st.sampled_from([1.0, 0.5, 1e-3, 0.0, -1.0, float("nan"), float("inf"), 1e308]))
    if ty == "bool":
        return draw(st.booleans())
    if ty in ("ScalarType", "Optional[ScalarType]"):
        return draw(st.sampled_from(ANY_DTYPES + ([None] if ty.startswith("Optional") else [])))
    if ty.startswith("Optional[") and draw(st.booleans()):
        return None
    if ty == "Optional[Tensor]":
        return draw(schema_tensor(base_shape))
    if ty == "Optional[int]":
        return draw(st.one_of(st.integers(-4, 4), st.sampled_from(HUGE_INTS)))
    if ty == "str":
        return draw(st.sampled_from(["mse", "percentile", "entropy", "histogram", "", "bogus"]))
    if ty in ("List[int]", "int[]"):
        return draw(st.lists(st.one_of(st.integers(-2, 4), st.sampled_from(HUGE_INTS)), min_size=0, max_size=4))
    raise AssertionError(f"the schema fuzzer does not know argument type {ty} yet: teach schema_value about it")


@fuzz_settings(3000)
@given(st.data())
def _fuzz_schemas(data):
    draw = data.draw
    schema = draw(st.sampled_from(qatx_schemas()))
    base_shape = draw(shapes(max_dim=3))
    args = [schema_value(draw, a, base_shape) for a in schema.arguments]
    op = getattr(torch.ops.qatx, schema.name.split("::")[1])
    what = f"{schema.name}({', '.join(type(a).__name__ if not isinstance(a, torch.Tensor) else f'{a.dtype}{list(a.shape)}' for a in args)})"
    out = call("schema", op, *args)
    if out.error is not None:
        names = [a.name for a in schema.arguments]
        assert any(re.search(r"\b" + re.escape(n) + r"\b", str(out.error)) for n in names), \
            f"{what}: the error names none of the arguments {names}: {out.error}"
        return
    results = out.value if isinstance(out.value, (tuple, list)) else (out.value,)
    inputs_finite = all(bool(torch.isfinite(a).all()) for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    # Finite inputs never give NaN (inf may come from an overflowing product, never NaN).
    if inputs_finite:
        for r in results:
            if isinstance(r, torch.Tensor) and r.is_floating_point():
                assert not bool(torch.isnan(r).any()), f"{what}: NaN output from finite inputs"


def test_fuzz_every_op_schema():
    run_family("schema", _fuzz_schemas)
    assert len(qatx_schemas()) >= 19


def test_every_op_has_a_reference_family_or_is_internal():
    """The public ops are covered by a reference family above; the internal ``_`` ops (the forward
    with mask and the backward passes) by the schema family and through autograd."""
    public = {s.name.split("::")[1] for s in qatx_schemas() if not s.name.split("::")[1].startswith("_")}
    covered = {f"{kind}_{gran}_affine" for kind, gran in AFFINE} | \
        {"fake_quantize_lsq", "fake_quantize_lsq_per_group", "fake_quantize_pact"}
    missing = public - covered - set(SCHEMA_ONLY)
    assert not missing, f"ops without a reference family in test_fuzz.py: {sorted(missing)}"


# Public ops fuzzed here by the schema family only (valid or clearly refused, never a crash or a
# NaN from finite input); their values are checked exactly against references in their own files:
# test_int8_ops.py (INT8 GEMM/convolution/add, 4-bit unpacking), test_observers.py (histograms and range searches),
# test_observe_ops.py (fused observe + fake-quantize).
SCHEMA_ONLY = ("convolution_int8", "linear_int8", "linear_int8_dynamic", "add_int8", "unpack_int4", "histogram_observe",
               "histogram_range",
               "observe_fake_quantize_per_tensor_affine", "observe_fake_quantize_per_channel_affine",
               "observe_fake_quantize_per_group_affine")


# --- Python entry points: QuantSpec / QConfig, calculate_qparams, observers, quantizers, prepare_qat --

def spec_kwargs(draw):
    kw, bad = {}, set()
    if draw(st.booleans()):
        kw["bits"] = draw(st.integers(2, 16)) if not maybe(draw, 0.15) else \
            draw(st.sampled_from([0, 1, 17, 32, -8, True, 4.0, "8", None]))
        if not (isinstance(kw["bits"], int) and not isinstance(kw["bits"], bool) and 2 <= kw["bits"] <= 16):
            bad.add("bits")
    for name in ("signed", "symmetric", "narrow_range"):
        if draw(st.booleans()):
            kw[name] = draw(st.booleans()) if not maybe(draw, 0.05) else draw(st.sampled_from([1, "yes", None]))
            if not isinstance(kw[name], bool):
                bad.add(name)
    kw["granularity"] = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"])) if not maybe(draw, 0.05) \
        else draw(st.sampled_from(["per_row", "", None, 3]))
    if kw["granularity"] not in ("per_tensor", "per_channel", "per_group"):
        bad.add("granularity")
    if draw(st.booleans()):
        kw["axis"] = draw(st.one_of(st.none(), st.integers(-3, 3))) if not maybe(draw, 0.05) else \
            draw(st.sampled_from([1.5, "0", True]))
        if kw["axis"] is not None and (not isinstance(kw["axis"], int) or isinstance(kw["axis"], bool)):
            bad.add("axis")
    if kw["granularity"] == "per_group" or maybe(draw, 0.05):
        kw["group_size"] = draw(st.sampled_from([1, 4, 8, 32, 128])) if not maybe(draw, 0.1) else \
            draw(st.sampled_from([0, -1, 2.5, True]))
        gs = kw["group_size"]
        if kw["granularity"] == "per_group" and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 1):
            bad.add("group_size")
        elif kw["granularity"] != "per_group" and gs != 0:
            bad.add("group_size")
    if draw(st.booleans()):
        kw["observer"] = draw(st.sampled_from(["minmax", "moving_average"])) if not maybe(draw, 0.1) else \
            draw(st.sampled_from(["histogram", "mse", "kl", ""]))
        if kw["observer"] not in ("minmax", "moving_average", "histogram", "mse"):
            bad.add("observer")
    if draw(st.booleans()):
        kw["averaging_constant"] = draw(st.sampled_from([0.01, 0.5, 1.0])) if not maybe(draw, 0.1) else \
            draw(st.sampled_from([0.0, -0.1, 1.5, float("nan"), float("inf"), "0.1"]))
        ac = kw["averaging_constant"]
        if not (isinstance(ac, (int, float)) and 0.0 < ac <= 1.0):
            bad.add("averaging_constant")
    if draw(st.booleans()):
        kw["learnable"] = draw(st.sampled_from([None, "lsq", "lsq+", "pact"])) if not maybe(draw, 0.05) else \
            draw(st.sampled_from(["LSQ", "dorefa", 1]))
        if kw["learnable"] not in (None, "lsq", "lsq+", "pact"):
            bad.add("learnable")
    learnable, symmetric = kw.get("learnable"), kw.get("symmetric", True)
    if kw.get("bits") == 16 and not isinstance(kw.get("bits"), bool) and kw.get("signed") is False and \
            learnable != "pact":
        bad |= {"bits", "signed"}  # [0, 65535] is beyond the fake-quantize ops' [-32768, 32767]
    if kw.get("observer") in ("histogram", "mse") and (kw["granularity"] == "per_group" or learnable is not None):
        bad.add("observer")  # histogram observers: per tensor or per channel, observed qparams only
    if isinstance(symmetric, bool) and learnable in ("lsq", "lsq+"):
        if (learnable == "lsq") != symmetric:
            bad |= {"learnable", "symmetric"}
    if learnable == "pact" and (kw["granularity"] != "per_tensor" or symmetric is not True or
                                kw.get("narrow_range", False) is not False):
        bad |= {"learnable", "granularity", "symmetric", "narrow_range"}
    return kw, bad


@fuzz_settings(1500)
@given(st.data())
def _fuzz_quantspec(data):
    draw = data.draw
    kw, bad = spec_kwargs(draw)
    out = call("python", lambda: qatx.QuantSpec(**kw))
    if out.error is None and isinstance(out.value, qatx.QuantSpec) and not bad:
        spec = out.value
        qmin, qmax = qatx.quant_range(spec.bits, spec.signed, spec.narrow_range)
        assert (spec.quant_min, spec.quant_max) == (qmin, qmax) and qmin < qmax
        act = call("python", lambda: qatx.QConfig(weight=spec, activation=spec if draw(st.booleans()) else None))
        expect(act, set(), f"QConfig({kw})")
        wrong = call("python", lambda: qatx.QConfig(weight=draw(st.sampled_from([None, kw, 8])), activation=spec))
        expect(wrong, {"weight"}, "QConfig(weight=not a spec)")
        shape = draw(shapes(min_dim=0, max_dim=3))
        made = call("python", spec.make_quantizer, shape=shape, channel_axis=draw(st.integers(-1, 1)))
        if made.error is not None:  # axis out of range for the shape, group_size not dividing, 0-dim
            assert re.search(r"\b(axis|group_size)\b", str(made.error)), f"make_quantizer({kw}, {shape}): {made.error}"
        return
    if out.error is None and bad:
        raise AssertionError(f"QuantSpec({kw}) accepted invalid {sorted(bad)}")
    expect(out, bad, f"QuantSpec({kw})")


def _quantspec_family():
    try:
        _fuzz_quantspec()
    except NotImplementedError as e:  # raised outside call(): make it a failure with context
        raise AssertionError(e) from e


def test_fuzz_quantspec_and_qconfig():
    run_family("python", _quantspec_family)


@fuzz_settings(500)
@given(st.data())
def _fuzz_calculate_qparams(data):
    draw = data.draw
    shape = draw(shapes(max_dim=2))
    lo = random_values(shape, torch.float32, draw(st.integers(0, 2 ** 20)), 1.0)
    hi = torch.maximum(lo, random_values(shape, torch.float32, draw(st.integers(0, 2 ** 20)), 1.0))
    bits, signed, narrow = draw(st.integers(2, 16)), draw(st.booleans()), draw(st.booleans())
    qmin, qmax = qatx.quant_range(bits, signed, narrow)
    symmetric = draw(st.booleans())
    out = call("python", qatx.calculate_qparams, lo, hi, qmin, qmax, symmetric)
    scale, zero_point = expect(out, set(), "calculate_qparams")
    eps = torch.finfo(torch.float32).eps
    assert scale.shape == shape and zero_point.shape == shape and scale.dtype == torch.float32
    assert bool((scale >= eps).all()) and bool(torch.isfinite(scale).all())
    assert bool((zero_point >= qmin).all()) and bool((zero_point <= qmax).all())
    # Both ends of the (0-widened) range are representable: they quantize without clamping beyond half a step.
    lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
    for end in (lo0, hi0):
        q = torch.round(end / scale) + zero_point
        assert bool((q >= qmin - 1).all()) and bool((q <= qmax + 1).all())
    # The fake-quantize ops accept what calculate_qparams returns.
    if scale.numel() == 1 and qmax <= 32767:  # the fake-quantize ops take at most 16-bit ranges
        x = random_values((5,), torch.float32, 3, 1.0)
        y = expect(call("python", qatx.fake_quantize_per_tensor_affine, x, scale.reshape(1), zero_point.reshape(1),
                        qmin, qmax), set(), "fake_quantize with calculated qparams")
        assert bool(torch.isfinite(y).all())


def test_fuzz_calculate_qparams():
    run_family("python", _fuzz_calculate_qparams)


@st.composite
def observer_config(draw, shape):
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    bad = set()
    axis = draw(st.integers(-3, 3))
    group_size = draw(st.sampled_from([1, 2, 3, 4])) if gran == "per_group" else 0
    if gran == "per_group" and maybe(draw, 0.1):
        group_size = draw(st.sampled_from([0, -2]))
        bad.add("group_size")
    if gran == "per_channel" and (len(shape) == 0 or not -len(shape) <= axis < len(shape)):
        bad.add("axis")
    if gran == "per_group" and not bad and (len(shape) == 0 or shape[-1] % group_size):
        bad.add("group_size")
    return gran, axis, group_size, bad


@fuzz_settings(400)
@given(st.data())
def _fuzz_observer(data):
    draw = data.draw
    shape = draw(shapes(max_dim=3))
    gran, axis, group_size, bad = draw(observer_config(shape))
    averaging = draw(st.sampled_from([None, 0.1, 1.0])) if not maybe(draw, 0.1) else \
        draw(st.sampled_from([0.0, 2.0, float("nan"), -1.0]))
    ctor_bad = {"group_size"} & bad if group_size < 1 and gran == "per_group" else set()
    if averaging is not None and not 0.0 < averaging <= 1.0:
        ctor_bad.add("averaging_constant")
    made = call("python", qatx.MinMaxObserver, gran, axis, group_size, averaging)
    obs = expect(made, ctor_bad, f"MinMaxObserver({gran}, {axis}, {group_size}, {averaging})")
    if obs is None:
        return
    lo_ref = hi_ref = None
    for i in range(draw(st.integers(1, 3))):
        x = draw(tensors(shape, draw(st.sampled_from(FLOAT_DTYPES + [torch.float64])), scale_hint=0.5, specials=None))
        out = expect(call("python", obs, x), bad, f"MinMaxObserver({gran}, axis={axis}, gs={group_size})({list(shape)})")
        if out is None:
            return
        assert out is x
        if x.numel() == 0:
            return  # an empty input has no range (aminmax of nothing): checked below only for non-empty
        xf = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if gran == "per_tensor":
            lo, hi = xf.min().reshape(1), xf.max().reshape(1)
        elif gran == "per_channel":
            rows = xf.movedim(axis, 0).reshape(xf.shape[axis], -1)
            lo, hi = rows.min(1).values, rows.max(1).values
        else:
            grp = xf.reshape(*xf.shape[:-1], xf.shape[-1] // group_size, group_size)
            lo, hi = grp.min(-1).values, grp.max(-1).values
        if lo_ref is None:
            lo_ref, hi_ref = lo, hi
        elif averaging is not None:
            lo_ref, hi_ref = lo_ref + averaging * (lo - lo_ref), hi_ref + averaging * (hi - hi_ref)
        else:
            lo_ref, hi_ref = torch.minimum(lo_ref, lo), torch.maximum(hi_ref, hi)
        tol = 0 if averaging is None else 1e-6  # the moving average's rounding order differs from this one's
        torch.testing.assert_close(obs.min_val, lo_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(obs.max_val, hi_ref, rtol=tol, atol=tol)


def test_fuzz_minmax_observer():
    run_family("python", _fuzz_observer)


@fuzz_settings(400)
@given(st.data())
def _fuzz_quantizer_modules(data):
    draw = data.draw
    shape = tuple(max(d, 1) for d in draw(shapes(min_dim=1, max_dim=3)))  # empty inputs: see docs/reliability.md
    kind = draw(st.sampled_from(["fake", "lsq", "pact"]))
    bits = draw(st.integers(2, 16)) if not maybe(draw, 0.05) else draw(st.sampled_from([1, 17]))
    ctor_bad = set() if 2 <= bits <= 16 else {"bits"}
    gran, axis, group_size, fwd_bad = draw(observer_config(shape))
    ctor_bad |= {"group_size"} & fwd_bad if group_size < 1 and gran == "per_group" else set()
    signed = draw(st.booleans())
    if kind in ("fake", "lsq") and bits == 16 and not signed:
        ctor_bad |= {"bits", "signed"}  # [0, 65535] is beyond the fake-quantize ops' [-32768, 32767]
    if kind == "fake":
        make = lambda: qatx.FakeQuantize(bits=bits, signed=signed, symmetric=draw(st.booleans()), granularity=gran,
                                         axis=axis, group_size=group_size)
    elif kind == "lsq":
        eps = 1e-6 if not maybe(draw, 0.1) else draw(st.sampled_from([0.0, -1.0, float("nan")]))
        if not (math.isfinite(eps) and eps > 0):
            ctor_bad.add("eps")
        qshape = None
        if gran != "per_tensor" and not fwd_bad:
            qshape = [shape[axis]] if gran == "per_channel" else list(shape[:-1]) + [shape[-1] // group_size]
        elif gran != "per_tensor":
            qshape = [1]
        if qshape is not None and 0 in qshape:
            ctor_bad.add("shape")
        make = lambda: qatx.LearnableFakeQuantize(bits=bits, signed=signed, learn_zero_point=draw(st.booleans()),
                                                  granularity=gran, axis=axis, group_size=group_size,
                                                  qparam_shape=qshape, eps=eps)
    else:
        gran, fwd_bad = "per_tensor", set()
        ctor_bad.discard("group_size")
        alpha = draw(st.sampled_from([1.0, 4.0])) if not maybe(draw, 0.1) else draw(st.sampled_from([0.0, -1.0, float("nan")]))
        eps = 1e-6 if not maybe(draw, 0.1) else draw(st.sampled_from([0.0, -1.0, float("nan")]))
        if not (math.isfinite(alpha) and alpha > 0):
            ctor_bad.add("alpha")
        if not (math.isfinite(eps) and eps > 0):
            ctor_bad.add("eps")
        make = lambda: qatx.PACT(bits=bits, signed=signed, alpha=alpha, eps=eps)
    mod = expect(call("python", make), ctor_bad, f"{kind} quantizer ctor")
    if mod is None:
        return
    if kind == "lsq" and gran != "per_tensor" and fwd_bad:
        return  # its qparam shape was made up for an invalid config; nothing meaningful to run
    x = draw(tensors(shape, draw(st.sampled_from(FLOAT_DTYPES)), scale_hint=0.2, specials=False)).requires_grad_()
    y = expect(call("python", mod, x), fwd_bad, f"{mod}({list(shape)})")
    if y is None:
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not bool(torch.isnan(y).any()), f"{mod}: NaN output from a finite input"
    CALLS["python"] += 1
    y.float().sum().backward()
    assert not bool(torch.isnan(x.grad).any())
    for p in mod.parameters():
        assert p.grad is None or not bool(torch.isnan(p.grad).any()), f"{mod}: NaN parameter gradient"
    if kind == "fake":
        kw = dict(granularity=gran, axis=axis % len(shape) if gran == "per_channel" else None,
                  group_size=group_size if gran == "per_group" else None)
        assert_exact(y.detach(), ref.fake_quantize(x.detach(), mod.scale, mod.zero_point, mod.quant_min, mod.quant_max,
                                                   **kw), f"{mod}")


def test_fuzz_quantizer_modules():
    run_family("python", _fuzz_quantizer_modules)


class _TwoBranch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.add = qatx.nn.QuantAdd()

    def forward(self, x):
        return self.add(x, torch.relu(self.bn(self.conv(x))))


def small_model(draw):
    kind = draw(st.sampled_from(["mlp", "mlp_bn", "cnn", "residual"]))
    c = draw(st.sampled_from([1, 2, 4]))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 4 * c), nn.ReLU(), nn.Linear(4 * c, 3)), (draw(st.integers(1, 4)), 6)
    if kind == "mlp_bn":
        return nn.Sequential(nn.Linear(6, 4 * c), nn.BatchNorm1d(4 * c), nn.Linear(4 * c, 3)), (draw(st.integers(2, 4)), 6)
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Flatten(),
                             nn.Linear(c * 16, 3)), (draw(st.integers(1, 3)), 2, 4, 4)
    return nn.Sequential(nn.Conv2d(2, c, 1), _TwoBranch(c), nn.Flatten()), (draw(st.integers(1, 3)), 2, 3, 3)


@fuzz_settings(40)
@given(st.data())
def _fuzz_prepare_qat(data):
    draw = data.draw
    torch.manual_seed(draw(st.integers(0, 1000)))
    model, in_shape = small_model(draw)
    preset = draw(st.sampled_from(["W8A8", "W4A4_LSQ", "custom"]))
    if preset == "custom":
        kw, bad = spec_kwargs(draw)
        spec = call("python", lambda: qatx.QuantSpec(**kw))
        if spec.error is not None or bad:
            return
        qconfig = qatx.QConfig(weight=spec.value, activation=spec.value if draw(st.booleans()) else None)
    else:
        qconfig = getattr(qatx.presets, preset)
    if maybe(draw, 0.1):
        expect(call("python", qatx.prepare_qat, model, draw(st.sampled_from([None, "W8A8", qconfig.weight]))),
               {"qconfig"}, "prepare_qat(bad qconfig)")
        return
    if maybe(draw, 0.1):
        expect(call("python", qatx.prepare_qat, model, qconfig, skip=["no_such_layer"]), {"pattern"},
               "prepare_qat(bad skip pattern)")
        return
    prepared = call("python", qatx.prepare_qat, model, qconfig, fuse=draw(st.booleans()))
    if prepared.error is not None:  # a spec that cannot apply to these layers (axis, group size)
        assert re.search(r"\b(axis|group_size|group size|per_group)\b", str(prepared.error)), prepared.error
        return
    qat = prepared.value.train()
    x = torch.randn(in_shape)
    out = call("python", qat, x)
    if out.error is not None:
        assert re.search(r"\b(axis|group_size)\b", str(out.error)), out.error
        return
    y = out.value
    assert y.shape == model(x).shape
    assert bool(torch.isfinite(y).all()), f"{qconfig}: non-finite output"
    CALLS["python"] += 1
    y.square().mean().backward()
    for name, p in qat.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient"


def test_fuzz_prepare_qat():
    run_family("python", _fuzz_prepare_qat)


# --- regressions found by fuzzing ----------------------------------------------------------------

def test_int32_quantize_stays_inside_ranges_float32_cannot_represent():
    """float32(2**30 - 1) == 2**30: the float clamp alone let q reach 2**30 > quant_max (and -2**31 <
    quant_min = -2**31 + 1); the kernels now clamp the integer too."""
    x = torch.tensor([3e9, -3e9, 1073741824.0, -1073741824.0, 5.0])
    one, zero = torch.tensor([1.0]), torch.tensor([0])
    for qmin, qmax in [(-(2 ** 30 - 1), 2 ** 30 - 1), (-2 ** 31 + 1, 2 ** 31 - 1)]:
        q = qatx.quantize_per_tensor_affine(x, one, zero, qmin, qmax, torch.int32)
        assert q.tolist() == [qmax, qmin, min(2 ** 30, qmax), max(-2 ** 30, qmin), 5]


def test_ste_backward_dtype_error_names_grad_output():
    with pytest.raises(RuntimeError, match="grad_output must be float32"):
        torch.ops.qatx._fake_quantize_ste_backward(torch.ones(3, dtype=torch.float64), torch.zeros(1, dtype=torch.uint8))


# --- the count ------------------------------------------------------------------------------------

FAMILIES = {}


def run_family(name, fn):
    t0 = time.perf_counter()
    fn()
    SECONDS[name] += time.perf_counter() - t0
    FAMILIES.setdefault(name, []).append(fn)


def test_fuzz_total_call_count():
    """At least 10,000 fuzzed calls per run (the families above run first, in file order; run alone,
    this test runs them itself)."""
    if not CALLS:
        for test in (test_fuzz_affine_ops, test_fuzz_lsq_ops, test_fuzz_pact_op, test_fuzz_every_op_schema,
                     test_fuzz_quantspec_and_qconfig, test_fuzz_calculate_qparams, test_fuzz_minmax_observer,
                     test_fuzz_quantizer_modules, test_fuzz_prepare_qat):
            test()
    total = sum(CALLS.values())
    print(f"\nfuzz: {total} calls in {sum(SECONDS.values()):.1f} s: " +
          ", ".join(f"{k} {v} ({SECONDS[k]:.1f} s)" for k, v in sorted(CALLS.items())))
    assert total >= 10_000 * min(FUZZ_SCALE, 1), f"only {total} fuzzed calls"
