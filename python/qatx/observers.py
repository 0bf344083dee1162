r"""Range observers and the conversion of observed ranges to quantization parameters.

An observer records the range of the tensors it sees; :func:`calculate_qparams` turns a range
into ``(scale, zero_point)``. Both work per tensor, per channel (any axis) and per group
(consecutive elements of the last dimension).

qparams from a range ``[lo, hi]`` (first widened to contain 0, so that 0 is exactly
representable — zero padding and ReLU outputs quantize without error):

* symmetric, signed range (``quant_min < 0``):
  :math:`s = \max(-lo, hi) / \min(-q_{min}, q_{max})`, :math:`z = 0`. Dividing by the smaller
  side (127 for int8, not 127.5) keeps both ends of the range inside the grid.
* symmetric, unsigned range (``quant_min >= 0``): :math:`z = \lfloor (q_{min} + q_{max} + 1) / 2 \rfloor`,
  :math:`s = \max(-lo, hi) / \min(z - q_{min}, q_{max} - z)`.
* asymmetric: :math:`s = (hi - lo) / (q_{max} - q_{min})`,
  :math:`z = \mathrm{clamp}(q_{min} - \mathrm{round}(lo / s), q_{min}, q_{max})`.

``s`` is clamped to at least ``eps`` (float32 machine epsilon by default), so a zero range
(an all-zero tensor) gives ``s = eps`` and never a NaN or zero scale. Non-finite values (NaN,
±Inf) are ignored by the observers: :class:`MinMaxObserver` replaces them by 0, which every
range contains; :class:`HistogramObserver` leaves them out of its counts.

Power-of-two scales (``power_of_two=True``, for fixed-point hardware): the scale above is rounded
**up** to :math:`2^{\lceil \log_2 s \rceil}` (exactly, through ``frexp``; a power of two stays
as it is), so the quantized range still covers ``[lo, hi]``; the asymmetric zero point is then
computed with the rounded scale.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["quant_range", "calculate_qparams", "power_of_two_scale", "MinMaxObserver", "HistogramObserver",
           "GRANULARITIES", "HISTOGRAM_METHODS"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
#: Range searches of :class:`HistogramObserver` (``"histogram"`` is an alias of ``"mse"``).
HISTOGRAM_METHODS = ("mse", "percentile", "entropy", "histogram")


def quant_range(bits: int, signed: bool, narrow_range: bool = False) -> Tuple[int, int]:
    """``(quant_min, quant_max)`` of a ``bits``-bit integer: signed ``[-2^(b-1) (+1 if narrow), 2^(b-1) - 1]``,
    unsigned ``[0 (+1 if narrow), 2^b - 1]``. ``bits`` in [2, 16]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    if signed:
        return -(1 << (bits - 1)) + int(narrow_range), (1 << (bits - 1)) - 1
    return int(narrow_range), (1 << bits) - 1


def fake_quant_range(bits: int, signed: bool, narrow_range: bool = False) -> Tuple[int, int]:
    """:func:`quant_range`, limited to what the fake-quantize ops take: ``[-32768, 32767]``
    (so 16-bit unsigned is refused)."""
    quant_min, quant_max = quant_range(bits, signed, narrow_range)
    if quant_max > 32767:
        raise ValueError(f"bits={bits} with signed=False gives [{quant_min}, {quant_max}], beyond the fake-quantize "
                         f"ops' [-32768, 32767]: use at most 15 bits unsigned, or signed=True")
    return quant_min, quant_max


def power_of_two_scale(scale: Tensor) -> Tensor:
    """The smallest power of two ``>= scale`` (positive float32 scales): ``2^ceil(log2(scale))``,
    computed exactly from ``frexp`` (``scale = m 2^e`` with ``m`` in ``[0.5, 1)``: ``2^(e-1)`` when
    ``m == 0.5``, else ``2^e``)."""
    mantissa, exponent = torch.frexp(scale)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


def calculate_qparams(min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, symmetric: bool,
                      eps: float = 1.1920928955078125e-07, power_of_two: bool = False) -> Tuple[Tensor, Tensor]:
    """``(scale float32, zero_point int32)`` for the observed range(s) ``[min_val, max_val]``
    (tensors of any shape; the qparams have that shape). ``power_of_two`` rounds the scale up
    to a power of two. Formulas: module docstring."""
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        if quant_min < 0:
            zero = 0
            steps = min(-quant_min, quant_max)
        else:
            zero = (quant_min + quant_max + 1) // 2
            steps = min(zero - quant_min, quant_max - zero)
        scale = torch.clamp(amax / steps, min=eps)
        if power_of_two:
            scale = power_of_two_scale(scale)
        zero_point = torch.full_like(scale, zero, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / float(quant_max - quant_min), min=eps)
        if power_of_two:
            scale = power_of_two_scale(scale)
        zero_point = torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max).to(torch.int32)
    return scale, zero_point


def _check_granularity(granularity: str, axis: int, group_size: int) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_group" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer for per-group quantization, got {group_size!r}")
    if not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")


class MinMaxObserver(nn.Module):
    """Records the running minimum and maximum (or their exponential moving average when
    ``averaging_constant`` is set: ``m <- m + c (x_m - m)``, the first batch taken as is).

    Args:
        granularity: ``"per_tensor"``, ``"per_channel"`` (along ``axis``) or ``"per_group"``
            (``group_size`` consecutive elements of the last dimension).
        averaging_constant: ``None`` for the plain running min/max, else ``c`` in ``(0, 1]``.
    """

    def __init__(self, granularity: str = "per_tensor", axis: int = 0, group_size: int = 0,
                 averaging_constant: Optional[float] = None):
        super().__init__()
        _check_granularity(granularity, axis, group_size)
        if averaging_constant is not None and not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.averaging_constant = -1.0 if averaging_constant is None else float(averaging_constant)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def _check_input(self, x: Tensor) -> None:
        # Checked for empty inputs too, so a misconfigured observer fails on its first batch.
        if self.granularity == "per_channel":
            if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                raise ValueError(f"axis={self.axis} is out of range for an input with {x.dim()} dimensions")
        elif self.granularity == "per_group":
            if x.dim() == 0 or x.shape[-1] % self.group_size != 0:
                raise ValueError(f"group_size={self.group_size} must divide the last dimension of the input "
                                 f"(shape {list(x.shape)})")

    def _reduce(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)  # one pass; 0 is in every range
        if self.granularity == "per_tensor":
            lo, hi = torch.aminmax(x)
            return lo.reshape(1), hi.reshape(1)
        if self.granularity == "per_channel":
            rows = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            return torch.aminmax(rows, dim=1)
        groups = x.reshape(list(x.shape[:-1]) + [x.shape[-1] // self.group_size, self.group_size])
        return torch.aminmax(groups, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Records ``x``'s range and returns ``x`` unchanged (an empty ``x`` records nothing)."""
        self._check_input(x)
        if x.numel() == 0:
            return x
        with torch.no_grad():
            lo, hi = self._reduce(x.detach())
            if self.min_val.numel() == 0 or self.min_val.shape != lo.shape:
                self.min_val = lo.clone()
                self.max_val = hi.clone()
            elif self.averaging_constant > 0.0:
                self.min_val.add_(lo - self.min_val, alpha=self.averaging_constant)
                self.max_val.add_(hi - self.max_val, alpha=self.averaging_constant)
            else:
                torch.minimum(self.min_val, lo, out=self.min_val)
                torch.maximum(self.max_val, hi, out=self.max_val)
        return x

    @torch.jit.export
    def has_data(self) -> bool:
        return self.min_val.numel() > 0

    @torch.jit.export
    def calculate_qparams(self, quant_min: int, quant_max: int, symmetric: bool,
                          power_of_two: bool = False) -> Tuple[Tensor, Tensor]:
        if self.min_val.numel() == 0:
            raise RuntimeError("the observer has not seen any data yet: run a forward pass before asking for qparams")
        return calculate_qparams(self.min_val, self.max_val, quant_min, quant_max, symmetric,
                                 power_of_two=power_of_two)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The ranges' shape is only known after the first batch: take the saved one.
        for name in ("min_val", "max_val"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        parts = [self.granularity]
        if self.granularity == "per_channel":
            parts.append(f"axis={self.axis}")
        if self.granularity == "per_group":
            parts.append(f"group_size={self.group_size}")
        if self.averaging_constant > 0:
            parts.append(f"averaging_constant={self.averaging_constant}")
        return ", ".join(parts)


class HistogramObserver(nn.Module):
    r"""Accumulates a histogram of the values it sees (per tensor, or per channel along ``axis``)
    and chooses the clip range from it when qparams are asked for.

    Collection (``qatx::histogram_observe``, C++/CUDA, no host synchronisation): ``bins`` bins of
    width :math:`2^e` aligned to multiples of the width; when new data fall outside, the width
    grows by a power of two and the old bins merge exactly (no interpolation), so the result does
    not depend on how the data were split into batches beyond the final grid. NaN and ±Inf are
    left out of the counts (and of ``min_val``/``max_val``). Counts are int64 and exact.

    Range (``qatx::histogram_range``), ``method``:

    * ``"percentile"``: symmetric, the ``percentile``-th percentile of :math:`|x|` (upper edge of
      its bin); asymmetric, the ``percentile``-th and ``(100 - percentile)``-th percentiles of
      ``x`` (outer edges of their bins). Clipped to the observed ``[min_val, max_val]``.
    * ``"mse"`` (alias ``"histogram"``): the clip range minimising the expected squared
      quantization error (rounding noise :math:`s^2/12` inside, the integral of the clipping
      error outside, values spread uniformly inside their bins) over the bin edges, for the given
      ``quant_min``/``quant_max``/``symmetric``.
    * ``"entropy"``: the threshold :math:`t` on :math:`|x|` minimising the KL divergence between
      the clipped histogram and its quantized version (TensorRT's calibration).

    Exact definitions: docs/ops.md. Args:
        method: ``"mse"``, ``"histogram"``, ``"percentile"`` or ``"entropy"``.
        percentile: in ``(0, 100]`` (``"percentile"`` only).
        bins: number of bins, in ``[16, 2^20]``.
        granularity: ``"per_tensor"`` or ``"per_channel"`` (along ``axis``).
    """

    def __init__(self, method: str = "mse", percentile: float = 99.99, bins: int = 2048,
                 granularity: str = "per_tensor", axis: int = 0):
        super().__init__()
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"method must be one of {HISTOGRAM_METHODS}, got {method!r}")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or not 16 <= bins <= (1 << 20):
            raise ValueError(f"bins must be an integer in [16, 1048576], got {bins!r}")
        if granularity not in ("per_tensor", "per_channel"):
            raise ValueError(f"granularity must be 'per_tensor' or 'per_channel' for a histogram observer, "
                             f"got {granularity!r}")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.method = "mse" if method == "histogram" else method
        self.percentile = float(percentile)
        self.bins = bins
        self.granularity = granularity
        self.axis = axis
        # State, shaped by the first batch: counts [C, bins], grid [C, 2] = (exponent, offset),
        # observed finite range per channel (min > max for a channel without finite values yet).
        self.register_buffer("hist", torch.empty(0, dtype=torch.int64))
        self.register_buffer("grid", torch.empty(0, dtype=torch.int32))
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def forward(self, x: Tensor) -> Tensor:
        """Adds ``x`` to the histogram and returns it unchanged."""
        with torch.no_grad():
            x = x.detach()
            axis: Optional[int] = None
            channels = 1
            if self.granularity == "per_channel":
                if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                    raise ValueError(f"axis={self.axis} is out of range for an input with {x.dim()} dimensions")
                axis = self.axis
                channels = x.shape[self.axis]
            if self.hist.numel() == 0:
                self.hist = torch.zeros([channels, self.bins], dtype=torch.int64, device=x.device)
                self.grid = torch.zeros([channels, 2], dtype=torch.int32, device=x.device)
                self.min_val = torch.full([channels], float("inf"), device=x.device)
                self.max_val = torch.full([channels], float("-inf"), device=x.device)
            hist, grid, bounds = torch.ops.qatx.histogram_observe(
                x, self.hist, self.grid, torch.stack([self.min_val, self.max_val], 1), axis)
            self.hist = hist
            self.grid = grid
            self.min_val = bounds[:, 0].contiguous()
            self.max_val = bounds[:, 1].contiguous()
        return x

    @torch.jit.export
    def has_data(self) -> bool:
        return self.hist.numel() > 0

    @torch.jit.export
    def calculate_range(self, quant_min: int, quant_max: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
        """The chosen clip range ``(min_val, max_val)`` per channel (both 0 for a channel that saw
        no finite value)."""
        if self.hist.numel() == 0:
            raise RuntimeError("the observer has not seen any data yet: run a forward pass before asking for qparams")
        return torch.ops.qatx.histogram_range(self.hist, self.grid, torch.stack([self.min_val, self.max_val], 1),
                                              self.method, self.percentile, quant_min, quant_max, symmetric)

    @torch.jit.export
    def calculate_qparams(self, quant_min: int, quant_max: int, symmetric: bool,
                          power_of_two: bool = False) -> Tuple[Tensor, Tensor]:
        """:func:`calculate_qparams` of the chosen range (one search per call)."""
        lo, hi = self.calculate_range(quant_min, quant_max, symmetric)
        return calculate_qparams(lo, hi, quant_min, quant_max, symmetric, power_of_two=power_of_two)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("hist", "grid", "min_val", "max_val"):  # shaped by the first batch
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        parts = [self.method]
        if self.method == "percentile":
            parts.append(f"percentile={self.percentile}")
        parts.append(f"bins={self.bins}")
        parts.append(self.granularity)
        if self.granularity == "per_channel":
            parts.append(f"axis={self.axis}")
        return ", ".join(parts)
