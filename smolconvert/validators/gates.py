"""Quality gates: a budget per target, checked against the metrics a validation measured.

A budget is data (`kld_mean <= 0.06`, `top1_min >= 0.9`, ...); every metric it names is checked and
every miss is reported, so one run shows all that failed rather than the first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from smolconvert.errors import ConfigError

# budget key -> (metric in the flat metrics dict, "max" or "min", unit for messages)
BUDGET_KEYS: dict[str, tuple[str, str, str]] = {
    "kld_mean": ("kld_mean", "max", ""),
    "kld_p99": ("kld_p99", "max", ""),
    "top1_min": ("top1", "min", ""),
    "ppl_ratio_max": ("ppl_ratio", "max", ""),
    "size_max_mb": ("size_mb", "max", " MB"),
    "decode_tok_s_min": ("decode_tok_s", "min", " tok/s"),
}


@dataclass(frozen=True)
class GateFailure:
    target: str
    metric: str  # the budget key, as written in the config
    budget: float
    value: float | None  # None: the metric was not measured

    def message(self) -> str:
        metric, kind, unit = BUDGET_KEYS[self.metric]
        if self.value is None:
            return (
                f"{self.target}: {self.metric} has a budget of {self.budget:g}{unit} but was "
                "not measured"
            )
        sign = ">" if kind == "max" else "<"
        return (
            f"{self.target}: {metric} {self.value:.6g}{unit} {sign} budget "
            f"{self.metric} = {self.budget:g}{unit}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), message=self.message())


def check_budget_keys(budget: dict[str, Any], where: str) -> dict[str, float]:
    """A budget table from a config: known keys, numeric values."""
    out = {}
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise ConfigError(
                f"{where}: unknown budget key {key!r} (known: {', '.join(BUDGET_KEYS)})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: budget {key} must be a number, got {value!r}")
        out[key] = float(value)
    return out


def flat_metrics(validation: dict[str, Any], size_bytes: int) -> dict[str, float | None]:
    """The numbers a budget can name, from a ValidationReport.to_dict()."""
    q = validation["quality"]
    lat = validation.get("latency") or {}
    return {
        "kld_mean": q["kld_mean"],
        "kld_p99": q["kld_p99"],
        "top1": q["top1"],
        "ppl_ratio": q["ppl_ratio"],
        "size_mb": size_bytes / 1e6,
        "decode_tok_s": lat.get("decode_tok_s"),
    }


def check(
    target: str, budget: dict[str, float], metrics: dict[str, float | None]
) -> list[GateFailure]:
    failures = []
    for key, limit in sorted(budget.items()):
        metric, kind, _ = BUDGET_KEYS[key]
        value = metrics.get(metric)
        if value is None:
            failures.append(GateFailure(target, key, limit, None))
        elif (kind == "max" and value > limit) or (kind == "min" and value < limit):
            failures.append(GateFailure(target, key, limit, float(value)))
    return failures
