r"""Quantization configs: :class:`QuantSpec` describes how one tensor is quantized,
:class:`QConfig` pairs the specs of a layer's weight and input activation.

Both are frozen dataclasses validated on construction; every error names the field, the value
and the allowed values. A spec builds its quantizer module with :meth:`QuantSpec.make_quantizer`:

* ``learnable=None`` → :class:`qatx.FakeQuantize` (qparams from the observed range),
* ``"lsq"`` / ``"lsq+"`` → :class:`qatx.LearnableFakeQuantize` (learned scale; LSQ+ also
  learns the zero point),
* ``"pact"`` → :class:`qatx.PACT` (learned clipping value, per tensor).
"""
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from .observers import GRANULARITIES, fake_quant_range, quant_range
from .quantizers import PACT, FakeQuantize, LearnableFakeQuantize

__all__ = ["QuantSpec", "QConfig", "OBSERVERS", "HISTOGRAM_OBSERVERS", "LEARNABLE"]

#: Observers a spec can build. ``moving_average`` uses ``averaging_constant`` (1.0 = each
#: batch's own range, i.e. dynamic quantization); ``histogram`` (= ``mse``), ``percentile`` and
#: ``entropy`` are :class:`qatx.HistogramObserver` range searches (per tensor or per channel).
OBSERVERS = ("minmax", "moving_average", "histogram", "mse", "percentile", "entropy")
HISTOGRAM_OBSERVERS = ("histogram", "mse", "percentile", "entropy")
LEARNABLE = (None, "lsq", "lsq+", "pact")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"QuantSpec.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: integer width, 2 to 16.
        signed: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]`` integers.
        symmetric: zero point fixed (0, or the midpoint for unsigned ranges) or asymmetric.
        narrow_range: drop the most negative code (e.g. int8 ``[-127, 127]``).
        granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
        axis: the per-channel axis; ``None`` = the layer's output-channel axis of the weight
            (0 for Linear, Conv and Embedding, 1 for ConvTranspose), 1 for activations.
        group_size: elements per group along the last dimension (``per_group`` only).
        observer: ``"minmax"`` (running min/max), ``"moving_average"``, or a calibration
            histogram (:class:`qatx.HistogramObserver`): ``"histogram"`` / ``"mse"`` (minimum
            expected L2 error, like torch.ao's ``HistogramObserver``), ``"percentile"``,
            ``"entropy"`` (KL divergence, TensorRT-style). Histogram observers need
            ``learnable=None`` and a per-tensor or per-channel granularity; their qparams are
            computed lazily (see :class:`qatx.FakeQuantize`).
        averaging_constant: the moving-average constant in ``(0, 1]`` (``moving_average`` only).
        learnable: ``None`` (observed qparams), ``"lsq"``, ``"lsq+"`` or ``"pact"``.
        percentile: the percentile in ``(0, 100]`` of ``observer="percentile"``.
        histogram_bins: bins of a histogram observer, in ``[16, 2^20]``.
        power_of_two_scale: round scales up to powers of two (fixed-point hardware);
            ``learnable=None`` only.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"
    axis: Optional[int] = None
    group_size: int = 0
    observer: str = "minmax"
    averaging_constant: float = 0.01
    learnable: Optional[str] = None
    percentile: float = 99.99
    histogram_bins: int = 2048
    power_of_two_scale: bool = False

    def __post_init__(self):
        for name in ("signed", "symmetric", "narrow_range"):  # first: quant_range uses them
            _check_bool(name, getattr(self, name))
        try:
            quant_range(self.bits, self.signed, self.narrow_range)
        except ValueError as e:
            raise ValueError(f"QuantSpec.bits: {e}") from None
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.axis is not None and (not isinstance(self.axis, int) or isinstance(self.axis, bool)):
            raise TypeError(f"QuantSpec.axis must be an int or None, got {self.axis!r}")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(f"QuantSpec.group_size must be a positive int for per_group, got {self.group_size!r}")
        elif self.group_size != 0:
            raise ValueError(f"QuantSpec.group_size is only used with granularity='per_group' "
                             f"(got group_size={self.group_size!r} with {self.granularity!r})")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if (isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float))
                or not 0.0 < self.percentile <= 100.0):
            raise ValueError(f"QuantSpec.percentile must be in (0, 100], got {self.percentile!r}")
        if (isinstance(self.histogram_bins, bool) or not isinstance(self.histogram_bins, int)
                or not 16 <= self.histogram_bins <= (1 << 20)):
            raise ValueError(f"QuantSpec.histogram_bins must be an int in [16, 1048576], got {self.histogram_bins!r}")
        _check_bool("power_of_two_scale", self.power_of_two_scale)
        if self.learnable != "pact":  # PACT's op takes 16-bit unsigned ranges
            try:
                fake_quant_range(self.bits, self.signed, self.narrow_range)
            except ValueError as e:
                raise ValueError(f"QuantSpec: {e}") from None
        if self.observer in HISTOGRAM_OBSERVERS:
            if self.granularity == "per_group":
                raise ValueError(f"QuantSpec: observer={self.observer!r} supports granularity 'per_tensor' or "
                                 f"'per_channel', got 'per_group'")
            if self.learnable is not None:
                raise ValueError(f"QuantSpec: observer={self.observer!r} chooses fixed qparams from a histogram; "
                                 f"it needs learnable=None, got learnable={self.learnable!r}")
        if self.power_of_two_scale and self.learnable is not None:
            raise ValueError(f"QuantSpec: power_of_two_scale needs learnable=None (observed qparams), got "
                             f"learnable={self.learnable!r}")
        if not (isinstance(self.averaging_constant, (int, float)) and 0.0 < self.averaging_constant <= 1.0):
            raise ValueError(f"QuantSpec.averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        if self.learnable not in LEARNABLE:
            raise ValueError(f"QuantSpec.learnable must be one of {LEARNABLE}, got {self.learnable!r}")
        if self.learnable == "lsq" and not self.symmetric:
            raise ValueError("QuantSpec: learnable='lsq' keeps the zero point fixed (symmetric=True); "
                             "use learnable='lsq+' for an asymmetric range with a learned zero point")
        if self.learnable == "lsq+" and self.symmetric:
            raise ValueError("QuantSpec: learnable='lsq+' learns the zero point, so it needs symmetric=False")
        if self.learnable == "pact":
            if self.granularity != "per_tensor":
                raise ValueError(f"QuantSpec: learnable='pact' learns one clipping value, so granularity must be "
                                 f"'per_tensor', got {self.granularity!r}")
            if not self.symmetric or self.narrow_range:
                raise ValueError("QuantSpec: learnable='pact' clips to [0, alpha] (unsigned) or [-alpha, alpha] "
                                 "(signed): use symmetric=True, narrow_range=False")

    @property
    def quant_min(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[0]

    @property
    def quant_max(self) -> int:
        return quant_range(self.bits, self.signed, self.narrow_range)[1]

    def resolved_axis(self, default_axis: int, ndim: Optional[int] = None) -> int:
        """The per-channel axis (``default_axis`` when ``axis`` is None), made non-negative and
        checked against ``ndim`` when known."""
        axis = default_axis if self.axis is None else self.axis
        if ndim is not None:
            if not -ndim <= axis < ndim:
                raise ValueError(f"QuantSpec.axis={axis} is out of range for a tensor with {ndim} dimensions "
                                 f"(allowed: [{-ndim}, {ndim - 1}])")
            axis %= ndim
        return axis

    def make_quantizer(self, shape: Optional[Sequence[int]] = None, channel_axis: int = 1) -> nn.Module:
        """The quantizer module for a tensor of ``shape`` (needed by learned per-channel and
        per-group scales; checked against the axis and group size whenever it is given).
        ``channel_axis`` is the per-channel axis used when ``axis`` is None."""
        ndim = None if shape is None else len(shape)
        axis = self.resolved_axis(channel_axis, ndim) if self.granularity == "per_channel" else 0
        if self.granularity == "per_group" and shape is not None and (ndim == 0 or shape[-1] % self.group_size):
            raise ValueError(f"QuantSpec.group_size={self.group_size} must divide the last dimension of the tensor "
                             f"(shape {list(shape)})")
        if self.learnable == "pact":
            return PACT(bits=self.bits, signed=self.signed)
        if self.learnable is None:
            return FakeQuantize(bits=self.bits, signed=self.signed, symmetric=self.symmetric,
                                narrow_range=self.narrow_range, granularity=self.granularity, axis=axis,
                                group_size=self.group_size,
                                averaging_constant=self.averaging_constant if self.observer == "moving_average" else None,
                                observer="minmax" if self.observer in ("minmax", "moving_average") else self.observer,
                                percentile=self.percentile, bins=self.histogram_bins,
                                power_of_two=self.power_of_two_scale)
        qparam_shape = [1]
        if self.granularity != "per_tensor":
            if shape is None:
                raise ValueError(f"a learned {self.granularity} scale needs the tensor shape: use a per_tensor spec for "
                                 f"activations or pass shape= to make_quantizer")
            qparam_shape = [shape[axis]] if self.granularity == "per_channel" else \
                list(shape[:-1]) + [shape[-1] // self.group_size]
            if 0 in qparam_shape:
                where = f"axis={axis}" if self.granularity == "per_channel" else f"group_size={self.group_size}"
                raise ValueError(f"a learned {self.granularity} scale for shape {list(shape)} ({where}) would have no "
                                 f"elements: the tensor must not be empty there")
        return LearnableFakeQuantize(bits=self.bits, signed=self.signed, learn_zero_point=self.learnable == "lsq+",
                                     narrow_range=self.narrow_range, granularity=self.granularity, axis=axis,
                                     group_size=self.group_size, qparam_shape=qparam_shape,
                                     init="minmax" if self.learnable == "lsq+" else "lsq")

    def describe(self) -> str:
        """Short text such as ``int8 per_channel sym`` for reprs and reports."""
        parts = [f"{'int' if self.signed else 'uint'}{self.bits}", self.granularity]
        if self.granularity == "per_group":
            parts.append(f"g{self.group_size}")
        parts.append(self.learnable or ("sym" if self.symmetric else "asym"))
        return " ".join(parts)


@dataclass(frozen=True)
class QConfig:
    """The specs of a layer: ``weight`` (required) and ``activation`` (its input; ``None``
    quantizes only the weight)."""

    weight: QuantSpec
    activation: Optional[QuantSpec] = None

    def __post_init__(self):
        if not isinstance(self.weight, QuantSpec):
            raise TypeError(f"QConfig.weight must be a QuantSpec, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, QuantSpec):
            raise TypeError(f"QConfig.activation must be a QuantSpec or None, got {type(self.activation).__name__}")
