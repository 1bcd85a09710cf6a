"""Quality gates: a budget per target, checked against the metrics a validation measured.

A budget is data (`kld_mean <= 0.06`, `top1_min >= 0.9`, ...); every metric it names is checked and
every miss is reported, so one run shows all that failed rather than the first. Budgets are checked
for range when the config is read, and a metric that is not a finite number fails whether or not a
budget names it: `nan > limit` is false, so a plain comparison would let a broken artifact through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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

# budget key -> (lowest, highest, whether the lowest itself is allowed, what the key means)
BUDGET_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "kld_mean": (0.0, math.inf, True, "a KL divergence in nats"),
    "kld_p99": (0.0, math.inf, True, "a KL divergence in nats"),
    "top1_min": (0.0, 1.0, True, "a fraction: 0.9 means 90% agreement"),
    "ppl_ratio_max": (0.0, math.inf, False, "perplexity over the reference's, e.g. 1.05"),
    "size_max_mb": (0.0, math.inf, False, "megabytes on disk"),
    "decode_tok_s_min": (0.0, math.inf, False, "decode tokens per second"),
}


@dataclass(frozen=True)
class GateFailure:
    target: str
    metric: str  # the budget key, as written in the config (or the key that would name it)
    budget: float | None  # None: no budget names it, but the metric is not a finite number
    value: float | None  # None: the metric was not measured

    def message(self) -> str:
        metric, kind, unit = BUDGET_KEYS[self.metric]
        if self.value is None:
            return (
                f"{self.target}: {self.metric} has a budget of {self.budget:g}{unit} but was "
                "not measured"
            )
        if not math.isfinite(self.value):
            limit = "" if self.budget is None else f" (budget {self.metric} = {self.budget:g})"
            return (
                f"{self.target}: {metric} is {self.value}, not a finite number{limit}; the "
                "artifact's outputs are broken (non-finite weights or an overflow in its runtime)"
            )
        sign = ">" if kind == "max" else "<"
        return (
            f"{self.target}: {metric} {self.value:.6g}{unit} {sign} budget "
            f"{self.metric} = {self.budget:g}{unit}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), message=self.message())


def check_budget_keys(
    budget: dict[str, Any], where: str, line: Callable[[str], str] | None = None
) -> dict[str, float]:
    """A budget table from a config: known keys, finite numbers in each key's range.

    `line(key)` gives " line N" for messages (empty when unknown)."""
    out = {}
    for key, value in budget.items():
        here = where + (line(key) if line is not None else "")
        if key not in BUDGET_KEYS:
            raise ConfigError(
                f"{here}: unknown budget key {key!r} (known: {', '.join(BUDGET_KEYS)})"
            )
        low, high, low_ok, meaning = BUDGET_RANGES[key]
        rule = f"{'>=' if low_ok else '>'} {low:g}" + (
            f" and <= {high:g}" if math.isfinite(high) else ""
        )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{here}: budget {key} must be a number {rule}, got {value!r}")
        number = float(value)
        in_range = (number >= low if low_ok else number > low) and number <= high
        if not math.isfinite(number) or not in_range:
            raise ConfigError(
                f"{here}: budget {key} = {value!r} must be a finite number {rule} ({meaning}); "
                "remove the key for no budget"
            )
        out[key] = number
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
    """Every budget missed, plus every measured metric that is NaN or infinite (budget or not)."""
    failures = []
    for key in sorted(BUDGET_KEYS):
        metric, kind, _ = BUDGET_KEYS[key]
        value = metrics.get(metric)
        limit = budget.get(key)
        if value is not None and not math.isfinite(value):
            failures.append(GateFailure(target, key, limit, float(value)))
        elif limit is None:
            continue
        elif value is None:
            failures.append(GateFailure(target, key, limit, None))
        elif (kind == "max" and value > limit) or (kind == "min" and value < limit):
            failures.append(GateFailure(target, key, limit, float(value)))
    return failures
