r"""Fake-quantizer modules: fixed qparams from an observer, learnable scales (LSQ, LSQ+) and
learnable clipping (PACT). Each is an ``nn.Module`` that scripts with ``torch.jit.script``,
round-trips through ``state_dict`` (including its toggles) and computes with the qatx ops.

Toggles: ``enable_fake_quant(flag)`` / ``enable_observer(flag)`` (``disable_*`` for False);
the flags are plain attributes (no tensor read, so no host synchronisation on CUDA) and are
saved in the ``state_dict`` as extra state.
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .observers import (HISTOGRAM_METHODS, HistogramObserver, MinMaxObserver, _check_granularity,
                        fake_quant_range, quant_range)

__all__ = ["FakeQuantize", "LearnableFakeQuantize", "PACT"]


class _Toggles(nn.Module):
    """Shared toggle handling: flags as attributes, persisted as extra state."""

    fake_quant_enabled: bool
    observer_enabled: bool

    def __init__(self):
        super().__init__()
        self.fake_quant_enabled = True
        self.observer_enabled = True

    @torch.jit.export
    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled = enabled

    @torch.jit.export
    def disable_fake_quant(self) -> None:
        self.fake_quant_enabled = False

    @torch.jit.export
    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled = enabled

    @torch.jit.export
    def disable_observer(self) -> None:
        self.observer_enabled = False

    def _extra_flags(self) -> Dict[str, Any]:
        return {}

    @torch.jit.unused
    def get_extra_state(self) -> Dict[str, Any]:
        state = {"fake_quant_enabled": self.fake_quant_enabled, "observer_enabled": self.observer_enabled}
        state.update(self._extra_flags())
        return state

    @torch.jit.unused
    def set_extra_state(self, state: Dict[str, Any]) -> None:
        # A checkpoint is data: accept exactly the flags get_extra_state writes, as bools.
        expected = self.get_extra_state()
        if not isinstance(state, dict) or set(state) != set(expected) or \
                not all(isinstance(v, bool) for v in state.values()):
            raise RuntimeError(f"{type(self).__name__}: corrupted extra state in the state_dict: expected a dict "
                               f"of bools with the keys {sorted(expected)}, got {state!r}")
        for key, value in state.items():
            setattr(self, key, value)

    # Loaded qparams are checked for what a corrupted checkpoint could hold (wrong dtype, shape,
    # non-finite values), so that load_state_dict fails instead of the first forward.
    _QPARAM_CHECKS = {}  # name -> rule of _qparam_problem (a class attribute, not scripted)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, rule in self._QPARAM_CHECKS.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                problem = _qparam_problem(value, rule, self)
                if problem:
                    error_msgs.append(f"{prefix}{name}: {problem}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _qparam_problem(t: Tensor, rule: str, module: nn.Module) -> str:
    """Why a loaded qparam is invalid for ``rule`` ("" when it is fine)."""
    if t.device.type == "meta":
        return ""
    if rule == "fixed_scale":  # what the affine ops accept: floating, finite, >= 2**-126
        if not t.is_floating_point():
            return f"scale must have a floating dtype, got {t.dtype}"
        s = t.detach().float()
        if not bool(((s >= 2.0 ** -126) & (s <= torch.finfo(torch.float32).max)).all()):
            return "scale must be finite and at least 2**-126, got " + str(s.reshape(-1)[:8].tolist())
        return ""
    if rule == "fixed_zero_point":
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            return f"zero_point must have an integer dtype, got {t.dtype}"
        if t.numel() and not bool(((t >= module.quant_min) & (t <= module.quant_max)).all()):
            return f"zero_point must lie inside [quant_min, quant_max] = [{module.quant_min}, {module.quant_max}]"
        return ""
    # "finite": learned parameters (LSQ scale / zero point, PACT alpha), clamped before use
    if not t.is_floating_point():
        return f"must have a floating dtype, got {t.dtype}"
    if not bool(torch.isfinite(t.detach()).all()):
        return "must be finite, got " + str(t.detach().reshape(-1)[:8].tolist())
    return ""


class FakeQuantize(_Toggles):
    """Fake quantization with fixed qparams computed from an observed range.

    While the observer is enabled, each forward records the input (range or histogram); while
    fake quantization is enabled, the input is fake-quantized with the qatx affine ops (round half
    to even, clamp to ``[quant_min, quant_max]``, straight-through gradient); otherwise the input
    passes through unchanged.

    When the qparams are computed (:func:`qatx.observers.calculate_qparams` of the observer's
    range): a min/max observer updates ``scale``/``zero_point`` in every observing forward. A
    :class:`~qatx.observers.HistogramObserver` only accumulates its histogram (a range search
    per batch would dominate calibration); its qparams are computed lazily, from the statistics
    seen so far, at the first of: a forward that fake-quantizes, ``enable_observer(False)`` /
    ``disable_observer()``, ``calculate_qparams()``, and ``state_dict()``. So the buffers are
    always current wherever they are read through the module.

    Args:
        bits, signed, narrow_range: the integer range (:func:`qatx.observers.quant_range`).
        symmetric: symmetric (zero point 0, or the midpoint for unsigned) or asymmetric qparams.
        granularity, axis, group_size: ``"per_tensor"``, ``"per_channel"`` (along ``axis``) or
            ``"per_group"`` (``group_size`` consecutive elements of the last dimension).
        averaging_constant: ``None`` for a running min/max, else the moving-average constant.
        observer: ``"minmax"`` (default; moving average with ``averaging_constant``), a histogram
            method (``"histogram"``/``"mse"``, ``"percentile"``, ``"entropy"``: a
            :class:`~qatx.observers.HistogramObserver` with ``percentile`` and ``bins``), or an
            observer module (anything with ``forward``, ``has_data`` and
            ``calculate_qparams(quant_min, quant_max, symmetric, power_of_two)``).
        power_of_two: round scales up to powers of two.

    While both are enabled and the observer (a :class:`~qatx.observers.MinMaxObserver`) has
    seen a batch whose qparams have this input's shape, the forward runs the fused
    ``qatx::observe_fake_quantize_*_affine`` ops: one read of the input for its range, the range
    and ``scale``/``zero_point`` updated in place on the input's device (no host
    synchronisation), one fake-quantize pass. The results, gradients and ``state_dict`` are
    bit-identical to the observer + :func:`~qatx.observers.calculate_qparams` + fake-quantize
    sequence, which the first batch (and any batch changing the qparam shape) runs.
    """

    qparams_stale: bool
    lazy_qparams: bool
    fusable_observer: bool

    def __init__(self, bits: int = 8, signed: bool = True, symmetric: bool = True, narrow_range: bool = False,
                 granularity: str = "per_tensor", axis: int = 0, group_size: int = 0,
                 averaging_constant: Optional[float] = None, observer: Union[str, nn.Module] = "minmax",
                 percentile: float = 99.99, bins: int = 2048, power_of_two: bool = False):
        super().__init__()
        self.quant_min, self.quant_max = fake_quant_range(bits, signed, narrow_range)
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.power_of_two = bool(power_of_two)
        if isinstance(observer, nn.Module):
            self.observer = observer
        elif observer == "minmax":
            self.observer = MinMaxObserver(granularity, axis, group_size, averaging_constant)
        elif observer in HISTOGRAM_METHODS:
            _check_granularity(granularity, axis, group_size)
            self.observer = HistogramObserver(observer, percentile, bins, granularity, axis)
        else:
            raise ValueError(f"observer must be 'minmax', one of {HISTOGRAM_METHODS} or an observer module, "
                             f"got {observer!r}")
        self.lazy_qparams = isinstance(self.observer, HistogramObserver)
        # Plain attributes, not isinstance checks in forward: TorchScript compiles every branch.
        self.fusable_observer = isinstance(self.observer, MinMaxObserver)
        self.observer_averaging_constant = float(self.observer.averaging_constant) if self.fusable_observer else -1.0
        self.qparams_stale = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    @torch.jit.export
    def update_qparams(self) -> None:
        """Recomputes ``scale``/``zero_point`` from the observer (which must have seen data)."""
        scale, zero_point = self.observer.calculate_qparams(self.quant_min, self.quant_max, self.symmetric,
                                                            self.power_of_two)
        self.scale = scale
        self.zero_point = zero_point
        self.qparams_stale = False

    @torch.jit.export
    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)``, first recomputed when observations arrived since the last time."""
        if self.qparams_stale:
            self.update_qparams()
        return self.scale, self.zero_point

    @torch.jit.export
    def grid_scale(self) -> Tensor:
        """The scale of the grid the last forward rounded to (``[1]`` or one per channel/group)."""
        return self.scale

    @torch.jit.export
    def enable_observer(self, enabled: bool = True) -> None:
        if not enabled and self.qparams_stale:
            self.update_qparams()
        self.observer_enabled = enabled

    @torch.jit.export
    def disable_observer(self) -> None:
        self.enable_observer(False)

    def _can_fuse(self, x: Tensor) -> bool:
        """Whether the fused observe + fake-quantize op applies: a min/max observer that has seen a
        batch giving qparams of this input's shape (the first batch, or one whose shape changes
        them, goes through the observer, which sets the range shapes and checks the input)."""
        if not self.fusable_observer or self.power_of_two:
            return False
        min_val = self.observer.min_val
        if min_val.numel() == 0 or x.numel() == 0 or self.scale.shape != min_val.shape:
            return False
        if self.granularity == "per_tensor":
            return True
        if x.dim() == 0:
            return False
        if self.granularity == "per_channel":
            return -x.dim() <= self.axis < x.dim() and min_val.shape == (x.shape[self.axis],)
        return x.shape[-1] % self.group_size == 0 and \
            min_val.shape == x.shape[:-1] + (x.shape[-1] // self.group_size,)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer_enabled and self.fake_quant_enabled and self._can_fuse(x):
            # One read of x for its range, qparams computed in place on x's device, one quantize
            # pass: the same results as the observer + calculate_qparams + fake-quantize below.
            obs = self.observer
            if self.granularity == "per_tensor":
                return torch.ops.qatx.observe_fake_quantize_per_tensor_affine(
                    x, obs.min_val, obs.max_val, self.scale, self.zero_point, self.observer_averaging_constant,
                    self.quant_min, self.quant_max, self.symmetric)
            if self.granularity == "per_channel":
                return torch.ops.qatx.observe_fake_quantize_per_channel_affine(
                    x, obs.min_val, obs.max_val, self.scale, self.zero_point, self.axis, self.observer_averaging_constant,
                    self.quant_min, self.quant_max, self.symmetric)
            return torch.ops.qatx.observe_fake_quantize_per_group_affine(
                x, obs.min_val, obs.max_val, self.scale, self.zero_point, self.group_size, self.observer_averaging_constant,
                self.quant_min, self.quant_max, self.symmetric)
        if self.observer_enabled:
            self.observer(x)
            if self.lazy_qparams:
                self.qparams_stale = True
            else:
                self.update_qparams()
        if not self.fake_quant_enabled:
            return x
        if self.qparams_stale:
            self.update_qparams()
        if self.granularity == "per_tensor":
            return torch.ops.qatx.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min,
                                                                  self.quant_max)
        if self.granularity == "per_channel":
            return torch.ops.qatx.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                                   self.quant_min, self.quant_max)
        return torch.ops.qatx.fake_quantize_per_group_affine(x, self.scale, self.zero_point, self.group_size,
                                                             self.quant_min, self.quant_max)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qparams_stale and self.observer.has_data():
            self.update_qparams()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    _QPARAM_CHECKS = {"scale": "fixed_scale", "zero_point": "fixed_zero_point"}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        s, z = state_dict.get(prefix + "scale"), state_dict.get(prefix + "zero_point")
        if isinstance(s, Tensor) and isinstance(z, Tensor) and (s.shape != z.shape or s.dim() != 1 and
                                                                 self.granularity == "per_channel"):
            error_msgs.append(f"{prefix}scale and {prefix}zero_point must have the same shape (1-D per channel), "
                              f"got {list(s.shape)} and {list(z.shape)}")
            return
        for name in ("scale", "zero_point"):  # per-channel/group shapes are set by the first batch
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return _describe(self.bits, self.quant_min, self.quant_max, self.granularity, self.axis, self.group_size,
                         "symmetric" if self.symmetric else "asymmetric", self.scale, self.fake_quant_enabled,
                         self.observer_enabled)


def _describe(bits: int, quant_min: int, quant_max: int, granularity: str, axis: int, group_size: int, kind: str,
              scale: Tensor, enabled: bool, observing: bool) -> str:
    parts = [f"bits={bits}", f"range=[{quant_min}, {quant_max}]", granularity]
    if granularity == "per_channel":
        parts.append(f"axis={axis}")
    if granularity == "per_group":
        parts.append(f"group_size={group_size}")
    parts.append(kind)
    if scale.numel() > 0:
        s = scale.detach()
        parts.append(f"scale={s.min().item():.4g}" if s.numel() == 1 else
                     f"scale=[{s.min().item():.4g}, {s.max().item():.4g}]")
    parts.append(f"enabled={enabled}")
    parts.append(f"observer={observing}")
    return ", ".join(parts)


class LearnableFakeQuantize(_Toggles):
    r"""Fake quantization with a learned scale (LSQ, Esser et al. 2020) and optionally a
    learned zero point (LSQ+, Bhalgat et al. 2020), computed by ``qatx::fake_quantize_lsq``
    (per-tensor, per-channel) or ``qatx::fake_quantize_lsq_per_group``.

    Gradients (with :math:`v = x/s`, :math:`z_r` the zero point rounded half to even):
    :math:`\partial/\partial x` is the straight-through estimator; :math:`\partial/\partial s`
    sums :math:`g(\mathrm{round}(v) - v)` inside the range and :math:`g(q_{min/max} - z_r)`
    outside, times ``grad_factor``; :math:`\partial/\partial z` sums :math:`-g s` outside the
    range, times ``grad_factor`` (LSQ+ only). Default ``grad_factor`` is
    :math:`1/\sqrt{N q_{max}}` with :math:`N` the number of elements sharing one scale, as in
    the LSQ paper; pass ``grad_factor`` to override.

    Initialisation on the first forward (while the observer is enabled and the scale has not
    been initialised or loaded): ``init="lsq"`` sets :math:`s = 2\,\mathrm{mean}(|x|)/\sqrt{q_{max}}`
    per scale; ``init="minmax"`` uses the observed range and
    :func:`qatx.observers.calculate_qparams` (and the zero point, for LSQ+).

    Positivity: before each forward the scale is clamped in place to at least ``eps``
    (default 1e-6); the gradient itself is untouched.

    Args:
        bits, signed, narrow_range: the integer range.
        learn_zero_point: LSQ+ (a learned float zero point) instead of LSQ (zero point fixed
            at 0, or the midpoint for symmetric unsigned ranges).
        granularity, axis, group_size: as for :class:`FakeQuantize`.
        num_scales: how many scales: 1 per-tensor, the channel count per-channel, the number
            of groups per-group (``qparam_shape`` gives the full per-group shape instead).
    """

    def __init__(self, bits: int = 4, signed: bool = True, learn_zero_point: bool = False,
                 narrow_range: bool = False, granularity: str = "per_tensor", axis: int = 0, group_size: int = 0,
                 num_scales: int = 1, qparam_shape: Optional[Sequence[int]] = None, init: str = "lsq",
                 grad_factor: Optional[float] = None, eps: float = 1e-6):
        super().__init__()
        _check_granularity(granularity, axis, group_size)
        if init not in ("lsq", "minmax"):
            raise ValueError(f"init must be 'lsq' or 'minmax', got {init!r}")
        if grad_factor is not None and not (math.isfinite(grad_factor) and grad_factor > 0):
            raise ValueError(f"grad_factor must be a positive finite float, got {grad_factor!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        shape = list(qparam_shape) if qparam_shape is not None else [num_scales]
        if any(d < 1 for d in shape):
            raise ValueError(f"qparam_shape must be positive (one scale per channel or group), got {shape}")
        if granularity == "per_tensor" and math.prod(shape) != 1:
            raise ValueError(f"a per-tensor quantizer has one scale, got shape {shape}")
        self.quant_min, self.quant_max = fake_quant_range(bits, signed, narrow_range)
        self.bits = bits
        self.learn_zero_point = learn_zero_point
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.init = init
        self.grad_factor = -1.0 if grad_factor is None else float(grad_factor)
        self.eps = float(eps)
        self.initialized = False
        self.scale = nn.Parameter(torch.ones(shape))
        if learn_zero_point:
            self.zero_point = nn.Parameter(torch.zeros(shape))
        else:  # LSQ: zero point 0 (signed ranges, and unsigned ranges for non-negative inputs)
            self.register_buffer("zero_point", torch.zeros(shape))
        self.observer = MinMaxObserver(granularity, axis, group_size)

    _QPARAM_CHECKS = {"scale": "finite", "zero_point": "finite"}

    def _extra_flags(self) -> Dict[str, Any]:
        return {"initialized": self.initialized}

    def _initialize(self, x: Tensor) -> None:
        with torch.no_grad():
            if self.init == "lsq":
                self.observer(x)  # keeps the observed range for reports
                a = x.detach().abs().float()
                if self.granularity == "per_channel":
                    mean = a.movedim(self.axis, 0).reshape(a.shape[self.axis], -1).mean(1)
                elif self.granularity == "per_group":
                    mean = a.reshape(list(a.shape[:-1]) + [a.shape[-1] // self.group_size, self.group_size]).mean(-1)
                else:
                    mean = a.mean()
                self.scale.copy_((2.0 * mean / math.sqrt(self.quant_max)).reshape(self.scale.shape))
            else:
                self.observer(x)
                scale, zero_point = self.observer.calculate_qparams(self.quant_min, self.quant_max,
                                                                    not self.learn_zero_point)
                self.scale.copy_(scale.reshape(self.scale.shape))
                if self.learn_zero_point:
                    self.zero_point.copy_(zero_point.float().reshape(self.zero_point.shape))
            self.scale.clamp_(min=self.eps)
        self.initialized = True

    def forward(self, x: Tensor) -> Tensor:
        if self.observer_enabled and not self.initialized:
            self._initialize(x)
        if not self.fake_quant_enabled:
            return x
        with torch.no_grad():
            self.scale.clamp_(min=self.eps)
        grad_factor = self.grad_factor
        if grad_factor <= 0.0:
            per_scale = max(x.numel() // max(self.scale.numel(), 1), 1)
            grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)
        if self.granularity == "per_group":
            return torch.ops.qatx.fake_quantize_lsq_per_group(x, self.scale, self.zero_point, self.group_size,
                                                              self.quant_min, self.quant_max, grad_factor)
        axis = self.axis if self.granularity == "per_channel" else -1  # one scale: any axis of x will do
        return torch.ops.qatx.fake_quantize_lsq(x, self.scale, self.zero_point, axis, self.quant_min,
                                                self.quant_max, grad_factor)

    @torch.jit.export
    def grid_scale(self) -> Tensor:
        """The scale of the grid the last forward rounded to (``[1]`` or one per channel/group), detached."""
        return self.scale.detach()

    def extra_repr(self) -> str:
        return _describe(self.bits, self.quant_min, self.quant_max, self.granularity, self.axis, self.group_size,
                         "lsq+" if self.learn_zero_point else "lsq", self.scale, self.fake_quant_enabled,
                         self.observer_enabled)


class PACT(_Toggles):
    r"""PACT activation quantization (Choi et al. 2018): clip to a learned ``[0, alpha]``
    (``[-alpha, alpha]`` when ``signed``), then fake-quantize with ``scale = alpha / (2^bits - 1)``
    (``alpha / (2^(bits-1) - 1)`` signed), computed by ``qatx::fake_quantize_pact``.
    ``d/d alpha`` is the paper's: the sum of the incoming gradient over inputs clipped at
    ``alpha`` (minus the sum over inputs clipped at ``-alpha``). ``alpha`` is clamped in place
    to at least ``eps`` before each forward.
    """

    def __init__(self, bits: int = 4, signed: bool = False, alpha: float = 10.0, eps: float = 1e-6):
        super().__init__()
        quant_range(bits, signed)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite float, got {alpha!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite float, got {eps!r}")
        self.bits = bits
        self.signed = signed
        self.eps = float(eps)
        self.alpha = nn.Parameter(torch.tensor([float(alpha)]))

    _QPARAM_CHECKS = {"alpha": "finite"}

    def forward(self, x: Tensor) -> Tensor:
        if not self.fake_quant_enabled:
            return x
        with torch.no_grad():
            self.alpha.clamp_(min=self.eps)
        return torch.ops.qatx.fake_quantize_pact(x, self.alpha, self.bits, self.signed)

    @torch.jit.export
    def grid_scale(self) -> Tensor:
        """The scale of the grid the last forward rounded to, ``fl32(alpha / levels)``, detached."""
        levels = 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1
        return self.alpha.detach() / levels

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, alpha={self.alpha.item():.4g}, "
                f"enabled={self.fake_quant_enabled}")
