"""The torch runner, latency in a child process, and validation end to end on a tiny model."""

from __future__ import annotations

import pytest

import smolconvert
from smolconvert.validators.latency import RunnerSpec, measure_latency
from smolconvert.validators.runner import open_torch_runner


def test_timed_generation_is_the_greedy_continuation(tiny_folder) -> None:
    runner = open_torch_runner(str(tiny_folder))
    prompt = list(range(5, 25))
    timing = runner.time_generation(prompt, 6)
    ids = list(prompt)
    for _ in range(7):
        ids.append(int(runner.decoder.logits(ids)[-1].argmax()))
    assert timing.tokens == tuple(ids[len(prompt) :])
    assert timing.ttft_ms > 0 and timing.decode_tok_s > 0


def test_latency_runs_in_a_child_process(tiny_folder) -> None:
    spec = RunnerSpec("torch", {"source": str(tiny_folder), "dtype": "fp32", "threads": 1})
    lat = measure_latency(spec, list(range(3, 35)), n_new=8)
    assert lat.prompt_tokens == 32 and lat.new_tokens == 8
    assert lat.ttft_ms > 0 and lat.decode_tok_s > 0 and lat.peak_rss_mb > 50
    assert "fp32" in lat.runner and "1 threads" in lat.runner


def test_fp32_against_itself_is_exact_and_fp16_is_close(tiny_folder) -> None:
    same = smolconvert.validate(tiny_folder, dtype="fp32", ctx=64, windows=3, latency=False)
    q = same.quality
    assert (q.kld_mean, q.kld_max, q.top1, q.ppl_ratio) == (0.0, 0.0, 1.0, 1.0)
    half = smolconvert.validate(tiny_folder, dtype="fp16", ctx=64, windows=3, latency=False)
    assert 0 < half.quality.kld_mean < 1e-3 and half.quality.top1 > 0.95
    assert half.size_bytes * 2 == same.size_bytes


def test_bad_dtype_is_a_config_error(tiny_folder) -> None:
    with pytest.raises(smolconvert.errors.ConfigError, match="dtype"):
        smolconvert.validate(tiny_folder, dtype="int3")
