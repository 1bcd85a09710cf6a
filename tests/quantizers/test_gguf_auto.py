"""gguf:auto's two halves: the budgeted choice (against brute force) and the sensitivity it is fed
(against the KLD the reference really shows)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from smolconvert.errors import ConfigError
from smolconvert.quantizers import gguf_auto as auto
from smolconvert.quantizers.registry import CODECS
from tests import tiny


def _random_costs(rng: random.Random, n: int, k: int) -> list[auto.TensorCost]:
    costs = []
    for t in range(n):
        sizes = sorted(rng.sample(range(100, 2000), k))
        klds = sorted((rng.uniform(0.001, 1.0) for _ in range(k)), reverse=True)
        if rng.random() < 0.5:  # a dominated point: more bytes, more KLD
            klds[-1] = klds[0] + 0.1
        names = [f"c{i}" for i in range(k)]
        costs.append(
            auto.TensorCost(
                f"t{t}", dict(zip(names, sizes, strict=True)), dict(zip(names, klds, strict=True))
            )
        )
    return costs


def _total(costs: list[auto.TensorCost], pick: dict[str, str]) -> tuple[int, float]:
    by = {c.name: c for c in costs}
    return (
        sum(by[n].nbytes[p] for n, p in pick.items()),
        sum(by[n].kld[p] for n, p in pick.items()),
    )


@pytest.mark.parametrize("seed", range(6))
def test_choice_fits_and_is_near_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    costs = _random_costs(rng, 4, 4)
    lo = sum(min(c.nbytes.values()) for c in costs)
    hi = sum(max(c.nbytes.values()) for c in costs)
    for budget in np.linspace(lo, hi, 7).astype(int):
        pick = auto.choose(costs, int(budget))
        size, kld = _total(costs, pick)
        assert size <= budget
        best = min(
            kld_
            for combo in itertools.product(*(sorted(c.nbytes) for c in costs))
            for size_, kld_ in [
                _total(costs, {c.name: p for c, p in zip(costs, combo, strict=True)})
            ]
            if size_ <= budget
        )
        # greedy on convex hulls is optimal up to the one upgrade it could not afford
        worst_step = max(max(c.kld.values()) - min(c.kld.values()) for c in costs)
        assert best <= kld <= best + worst_step
        for c in costs:  # a dominated point is never chosen
            chosen = pick[c.name]
            assert not any(
                c.nbytes[o] <= c.nbytes[chosen] and c.kld[o] < c.kld[chosen] for o in c.nbytes
            )


def test_more_budget_never_predicts_more_kld_and_too_little_is_refused() -> None:
    costs = _random_costs(random.Random(7), 12, 5)
    lo = sum(min(c.nbytes.values()) for c in costs)
    last = float("inf")
    for budget in range(lo, lo + 12000, 500):
        _, kld = _total(costs, auto.choose(costs, budget))
        assert kld <= last + 1e-12
        last = kld
    with pytest.raises(ConfigError, match="smallest types need"):
        auto.choose(costs, lo - 1)


def test_candidates_follow_the_row_width_and_leave_out_q4_1_q5_1() -> None:
    assert set(auto.AUTO_CODECS) <= set(CODECS)
    narrow, wide = auto.candidates(576), auto.candidates(1536)
    assert "q4_k" not in narrow and "iq4_xs" not in narrow and "iq4_nl" in narrow
    assert {"q2_k", "q3_k", "q4_k", "iq4_xs", "q6_k"} <= set(wide)
    assert not {"q4_1", "q5_1"} & set(narrow + wide)
    assert auto.nbytes("q4_0", (576, 576)) % auto.ALIGN == 0


def _model(tmp_path: Path):
    from smolconvert.model.source import load_model

    cfg = tiny.config("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3)
    return load_model(tiny.write_folder(tmp_path / "m", cfg))


def test_sensitivity_predicts_the_kld_the_reference_shows(tmp_path: Path) -> None:
    """Summed predictions for the whole model at one type land near the KLD of really running
    it, and smaller types are predicted worse."""
    model = _model(tmp_path)
    ids = list(range(1, 200))
    costs = auto.measure(model, ids, quiet=True)
    probe = auto._Probe(model, ids)
    for codec in ("q4_0", "q8_0"):
        swaps = {}
        for c in costs:
            w = model.weights.get(c.name).float().numpy()
            q = CODECS[codec]
            swaps[c.name] = q.dequantize(q.quantize(w, None), w.shape)
        with torch.inference_mode(), probe.swapped(swaps):
            actual = probe.kld(None)
        predicted = sum(c.kld[codec] for c in costs)
        assert 0.5 * actual <= predicted <= 2.0 * actual, (codec, predicted, actual)
    for c in costs:
        assert c.kld["q2_k"] > c.kld["q4_k"] > c.kld["q8_0"] >= 0


def test_measure_is_deterministic(tmp_path: Path) -> None:
    model = _model(tmp_path)
    ids = list(range(1, 120))
    assert auto.measure(model, ids, quiet=True) == auto.measure(model, ids, quiet=True)
