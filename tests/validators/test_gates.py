"""Gates: budgets checked for range when the config is read; NaN and infinite metrics always fail;
reports render a release whose metrics are not numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from smolconvert.cli import cli
from smolconvert.errors import ConfigError
from smolconvert.release_config import load_config
from smolconvert.validators import gates, report

NAN = math.nan
INF = math.inf


def config_with_budget(tmp_path: Path, budget: str) -> Path:
    path = tmp_path / "release.toml"
    path.write_text(
        '[release]\nsource = "model"\n\n[[targets]]\ntarget = "gguf:q8_0"\n'
        f"budget = {{ {budget} }}\n"
    )
    return path


@pytest.mark.parametrize(
    ("budget", "shown"),
    [
        ("size_max_mb = nan", "size_max_mb = nan"),
        ("kld_mean = nan", "kld_mean = nan"),
        ("kld_mean = inf", "kld_mean = inf"),
        ("ppl_ratio_max = -inf", "ppl_ratio_max = -inf"),
        ("kld_p99 = -0.1", "kld_p99 = -0.1"),
        ("size_max_mb = -1", "size_max_mb = -1"),
        ("size_max_mb = 0", "size_max_mb = 0"),
        ("ppl_ratio_max = 0", "ppl_ratio_max = 0"),
        ("top1_min = 1.5", "top1_min = 1.5"),
        ("top1_min = -0.2", "top1_min = -0.2"),
        ("decode_tok_s_min = nan", "decode_tok_s_min = nan"),
    ],
)
def test_budgets_out_of_range_are_refused_at_parse(tmp_path: Path, budget: str, shown: str) -> None:
    path = config_with_budget(tmp_path, budget)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert shown in message and "line 6" in message and "[[targets]] #1" in message
    result = CliRunner().invoke(cli, ["release", str(path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and shown in result.stderr


def test_budget_from_a_dict_is_range_checked_too() -> None:
    cfg = {"release": {"source": "m"}, "targets": [{"target": "gguf:q8_0", "budget": {}}]}
    cfg["targets"][0]["budget"] = {"kld_mean": NAN}
    with pytest.raises(ConfigError, match="kld_mean = nan must be a finite number >= 0"):
        load_config(cfg)


def test_budgets_in_range_are_kept(tmp_path: Path) -> None:
    path = config_with_budget(
        tmp_path, "kld_mean = 0, top1_min = 1, size_max_mb = 1e-3, ppl_ratio_max = 1.05"
    )
    (target,) = load_config(path).targets
    assert target.budget == {
        "kld_mean": 0.0,
        "top1_min": 1.0,
        "size_max_mb": 1e-3,
        "ppl_ratio_max": 1.05,
    }


def metrics(**overrides: float | None) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "kld_mean": 0.01,
        "kld_p99": 0.1,
        "top1": 0.95,
        "ppl_ratio": 1.01,
        "size_mb": 10.0,
        "decode_tok_s": None,
    }
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    ("key", "metric", "value"),
    [
        ("kld_mean", "kld_mean", NAN),
        ("kld_p99", "kld_p99", NAN),
        ("ppl_ratio_max", "ppl_ratio", NAN),
        ("ppl_ratio_max", "ppl_ratio", INF),
        ("top1_min", "top1", NAN),
        ("decode_tok_s_min", "decode_tok_s", INF),  # a min budget that inf would pass
        ("decode_tok_s_min", "decode_tok_s", NAN),
    ],
)
def test_non_finite_metric_fails_its_gate(key: str, metric: str, value: float) -> None:
    budget = {key: 0.5}
    (failure,) = gates.check("gguf:f16", budget, metrics(**{metric: value}))
    assert failure.metric == key and failure.budget == 0.5
    assert "not a finite number" in failure.message()
    assert failure.to_dict()["message"] == failure.message()


def test_non_finite_metric_fails_without_a_budget() -> None:
    failures = gates.check("gguf:f16", {}, metrics(kld_mean=NAN, top1=NAN, ppl_ratio=INF))
    assert sorted(f.metric for f in failures) == ["kld_mean", "ppl_ratio_max", "top1_min"]
    assert all(f.budget is None for f in failures)
    assert "kld_mean is nan, not a finite number" in failures[0].message()


def test_finite_metrics_still_gate_as_before() -> None:
    assert gates.check("t", {}, metrics()) == []
    assert gates.check("t", {"kld_mean": 0.02, "top1_min": 0.9}, metrics()) == []
    (over,) = gates.check("t", {"kld_mean": 0.001}, metrics())
    assert over.value == 0.01 and "kld_mean 0.01 > budget kld_mean = 0.001" in over.message()
    (unmeasured,) = gates.check("t", {"decode_tok_s_min": 5}, metrics())
    assert unmeasured.value is None and "not measured" in unmeasured.message()


def manifest(kld: float, top1: float, decode: float | None) -> dict[str, Any]:
    failures = gates.check("gguf:f16", {"size_max_mb": 50}, metrics(kld_mean=kld, top1=top1))
    entry = {
        "name": "gguf-f16",
        "target": "gguf:f16",
        "size_bytes": 10_000_000,
        "bits_per_weight": 16.0,
        "validation": {
            "quality": {
                "ppl_ratio": kld,
                "kld_mean": kld,
                "kld_p99": kld,
                "top1": top1,
                "n_windows": 2,
                "ctx": 64,
                "n_scored": 64,
                "ppl_reference": 12.0,
            },
            "latency": None
            if decode is None
            else {"ttft_ms": decode, "decode_tok_s": decode, "peak_rss_mb": 100.0},
            "runtime": "llama.cpp",
            "candidate": "llama.cpp gguf",
            "notes": [],
        },
        "gate": {"passed": not failures, "failures": [f.to_dict() for f in failures]},
    }
    return {
        "model": "tiny",
        "origin": "safetensors in tiny",
        "source_sha256": "0" * 64,
        "eval_text": {"name": "pydoc topics"},
        "host": "test host",
        "reference_latency": {"ttft_ms": 5.0, "decode_tok_s": NAN, "peak_rss_mb": 90.0},
        "artifacts": [entry],
    }


@pytest.mark.parametrize("bad", [NAN, INF])
def test_reports_render_non_finite_metrics(bad: float) -> None:
    m = manifest(kld=bad, top1=bad, decode=bad)
    assert m["artifacts"][0]["gate"]["passed"] is False
    rows = report.rows(m)
    assert rows[0]["passed"] is False and rows[0]["failures"]
    md = report.markdown(m, rows)
    assert "| FAIL |" in md and "not a finite number" in md
    page = report.html(m, rows)
    assert "No artifact has a finite KLD to plot" in page and "FAIL" in page
    json.dumps(rows)  # the rows stay serialisable
