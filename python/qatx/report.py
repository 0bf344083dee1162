r"""Inspecting a prepared model: :func:`report` (per-layer quantization parameters and weight
SQNR) and :func:`sensitivity` (which layers hurt a metric most when quantized).

Weight SQNR in dB: :math:`10 \log_{10}(\sum w^2 / \sum (w - q(w))^2)` over the float weight the
quantizer sees (the BN-folded weight for fused layers); ``inf`` when quantization is exact.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import QuantAdd, QuantCat, QuantMatmul
from .nn.qat import QATModule
from .quantizers import PACT, FakeQuantize, LearnableFakeQuantize, _Toggles

__all__ = ["Table", "report", "sensitivity"]

_QUANTIZER_NAMES = ("weight_quantizer", "input_quantizer", "other_quantizer", "output_quantizer")


class Table:
    """Rows of a report: ``rows`` (list of dicts, the data) and ``str(table)`` (aligned text)."""

    def __init__(self, rows: List[Dict[str, Any]], columns: Sequence[str]):
        self.rows = rows
        self.columns = list(columns)

    def __str__(self) -> str:
        cells = [self.columns] + [[_fmt(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __repr__ = __str__

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.rows[i]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _calibrated(q: nn.Module) -> bool:
    if isinstance(q, FakeQuantize):
        return q.observer.min_val.numel() > 0
    if isinstance(q, LearnableFakeQuantize):
        return q.initialized
    return True


def _qparams(q: nn.Module) -> Optional[Dict[str, Any]]:
    """bits, granularity, scale/zero-point ranges and observed range of a quantizer; None for Identity."""
    if isinstance(q, PACT):
        s = (q.alpha.detach() / ((1 << (q.bits - 1)) - 1 if q.signed else (1 << q.bits) - 1)).float()
        return {"bits": q.bits, "granularity": "per_tensor (pact)", "scale": (s.min().item(), s.max().item()),
                "zero_point": (0.0, 0.0), "observed": None}
    if not isinstance(q, (FakeQuantize, LearnableFakeQuantize)):
        return None
    info = {"bits": q.bits, "granularity": q.granularity, "scale": None, "zero_point": None, "observed": None}
    if _calibrated(q):
        s, z = q.scale.detach().float(), q.zero_point.detach().float()
        info["scale"] = (s.min().item(), s.max().item())
        info["zero_point"] = (z.min().item(), z.max().item())
    obs = q.observer
    if obs.min_val.numel() > 0:
        info["observed"] = (obs.min_val.min().item(), obs.max_val.max().item())
    return info


def _sqnr_db(w: Tensor, wq: Tensor) -> float:
    signal = w.double().pow(2).sum().item()
    noise = (w.double() - wq.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _quantized_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QATModule, QuantAdd, QuantCat, QuantMatmul))]


REPORT_COLUMNS = ["module", "type", "weight_bits", "weight_granularity", "weight_scale", "weight_zero_point",
                  "weight_sqnr_db", "input_bits", "input_granularity", "input_scale", "input_zero_point",
                  "input_observed"]


def _check_not_sharded(model: nn.Module, what: str) -> None:
    """A clear error for parameters that are shards (FSDP2 DTensors) rather than whole tensors."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(f"qatx.{what}: the model's parameters are sharded ({sharded[0]} is a DTensor, e.g. after "
                         f"FSDP's fully_shard); call model.unshard() on every rank first (and model.reshard() after)")


@torch.no_grad()
def report(model: nn.Module) -> Table:
    """One row per quantized module (QAT layers and op modules), in model order.

    Columns: ``module``, ``type``; for the weight: ``weight_bits``, ``weight_granularity``,
    ``weight_scale`` and ``weight_zero_point`` (min, max over channels/groups),
    ``weight_sqnr_db``; for the input activation (the first operand for op modules):
    ``input_bits``, ``input_granularity``, ``input_scale``, ``input_zero_point`` and
    ``input_observed`` (the observed range). ``None`` where not quantized or not calibrated yet
    (qparams are set by the first forward). A model sharded with FSDP2 must be unsharded first
    (``model.unshard()`` on every rank)."""
    _check_not_sharded(model, "report")
    rows = []
    for name, mod in _quantized_layers(model):
        row: Dict[str, Any] = dict.fromkeys(REPORT_COLUMNS)
        row.update({"module": name, "type": type(mod).__name__})
        w = _qparams(getattr(mod, "weight_quantizer", nn.Identity()))
        if w is not None:
            row.update({"weight_bits": w["bits"], "weight_granularity": w["granularity"], "weight_scale": w["scale"],
                        "weight_zero_point": w["zero_point"]})
            if _calibrated(mod.weight_quantizer):
                row["weight_sqnr_db"] = _sqnr_db(mod._float_weight(), _weight_as_quantized(mod))
        first = getattr(mod, "input_quantizer", None) or getattr(mod, "output_quantizer", None)
        a = _qparams(first) if first is not None else None
        if a is not None:
            row.update({"input_bits": a["bits"], "input_granularity": a["granularity"], "input_scale": a["scale"],
                        "input_zero_point": a["zero_point"], "input_observed": a["observed"]})
        rows.append(row)
    return Table(rows, REPORT_COLUMNS)


def _weight_as_quantized(mod: nn.Module) -> Tensor:
    """The fake-quantized weight with the current qparams (quantizer on, observer off, restored after)."""
    q = mod.weight_quantizer
    saved = (q.fake_quant_enabled, q.observer_enabled)
    q.fake_quant_enabled, q.observer_enabled = True, False
    try:
        return mod._quantized_weight()
    finally:
        q.fake_quant_enabled, q.observer_enabled = saved


def _layer_quantizers(mod: nn.Module) -> List[_Toggles]:
    return [q for n in _QUANTIZER_NAMES for q in [getattr(mod, n, None)] if isinstance(q, _Toggles)]


def sensitivity(model: nn.Module, data: Any, metric: Callable[[nn.Module, Any], float]) -> Table:
    """Per-layer sensitivity: ``metric(model, data)`` with every quantizer off (the float
    baseline), then with only one quantized module's quantizers on, for each module in turn.

    Returns rows ``{"module", "type", "metric", "delta"}`` (``delta`` = metric - float baseline),
    ranked by ``|delta|``, largest first: the layers at the top are the ones to keep at higher
    precision. The float baseline and the fully quantized value are in ``table.baseline`` and
    ``table.quantized``. The model runs in eval mode under ``torch.no_grad()`` with the
    observers off (qparams are not changed: calibrate or train first); every toggle and the
    training mode are restored afterwards.
    """
    layers = _quantized_layers(model)
    quantizers = [m for m in model.modules() if isinstance(m, _Toggles)]
    for q in quantizers:
        if not _calibrated(q):
            raise RuntimeError("sensitivity needs calibrated quantizers: run a few training or calibration batches "
                               "through the prepared model first")
    saved = [(q, q.fake_quant_enabled, q.observer_enabled) for q in quantizers]
    was_training = model.training
    rows = []
    try:
        model.eval()
        for q in quantizers:
            q.observer_enabled = False
            q.fake_quant_enabled = False
        with torch.no_grad():
            baseline = float(metric(model, data))
            for name, mod in layers:
                own = _layer_quantizers(mod)
                for q in own:
                    q.fake_quant_enabled = True
                value = float(metric(model, data))
                for q in own:
                    q.fake_quant_enabled = False
                rows.append({"module": name, "type": type(mod).__name__, "metric": value, "delta": value - baseline})
            for q in quantizers:
                q.fake_quant_enabled = True
            quantized = float(metric(model, data))
    finally:
        for q, fq, obs in saved:
            q.fake_quant_enabled, q.observer_enabled = fq, obs
        model.train(was_training)
    rows.sort(key=lambda r: -abs(r["delta"]))
    table = Table(rows, ["module", "type", "metric", "delta"])
    table.baseline = baseline
    table.quantized = quantized
    return table
