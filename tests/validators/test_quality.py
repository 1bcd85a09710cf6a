"""The quality protocol: windows, scored rows and metrics against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from smolconvert import texts
from smolconvert.errors import ConfigError
from smolconvert.validators import quality as Q


def test_windows_are_non_overlapping_and_start_with_bos_when_asked() -> None:
    ids = list(range(100))
    assert Q.make_windows(ids, 16, 3) == [ids[0:16], ids[16:32], ids[32:48]]
    assert len(Q.make_windows(ids, 16, 99)) == 6  # only whole windows
    assert [w[0] for w in Q.make_windows(ids, 16, 2, bos=7)] == [7, 7]
    with pytest.raises(ConfigError, match="fewer than one window"):
        Q.make_windows(ids[:10], 16, 1)


def test_scored_rows_follow_llama_perplexity() -> None:
    rows = range(512)[Q.scored_rows(512)]
    assert (rows[0], rows[-1], len(rows)) == (256, 510, 255)  # row t predicts token t+1


def _fixed_logits(table: dict[tuple[int, ...], np.ndarray]):
    return lambda ids: table[tuple(ids)]


def test_identical_logits_give_zero_kld_and_full_agreement() -> None:
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(0, 50, 32)) for _ in range(3)]
    table = {tuple(w): rng.normal(size=(32, 50)).astype(np.float32) * 3 for w in windows}
    ref = Q.reference_scores(("t", "0"), windows, _fixed_logits(table))
    m = Q.compare(ref, _fixed_logits(table))
    assert m.kld_mean == 0.0 and m.kld_max == 0.0 and m.top1 == 1.0 and m.ppl_ratio == 1.0
    assert m.n_scored == 3 * 15


def test_metrics_equal_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    windows = [list(rng.integers(0, 40, 16)) for _ in range(2)]
    ref_table = {tuple(w): rng.normal(size=(16, 40)).astype(np.float32) * 2 for w in windows}
    cand_table = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in ref_table.items()}
    m = Q.compare(
        Q.reference_scores(("t", "1"), windows, _fixed_logits(ref_table)), _fixed_logits(cand_table)
    )

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return (
            x
            - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - x.max(-1, keepdims=True)
        )

    kl, nll_c, nll_r, agree = [], [], [], []
    for w in windows:
        p, q = log_softmax(ref_table[tuple(w)][8:15]), log_softmax(cand_table[tuple(w)][8:15])
        kl += list((np.exp(p) * (p - q)).sum(-1))
        nll_c += [-q[i, w[9 + i]] for i in range(7)]
        nll_r += [-p[i, w[9 + i]] for i in range(7)]
        agree += list(p.argmax(-1) == q.argmax(-1))
    assert m.kld_mean == pytest.approx(np.mean(kl), rel=1e-5)
    assert m.kld_max == pytest.approx(np.max(kl), rel=1e-5)
    assert m.kld_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-5)
    assert m.ppl == pytest.approx(np.exp(np.mean(nll_c)), rel=1e-5)
    assert m.ppl_ratio == pytest.approx(np.exp(np.mean(nll_c) - np.mean(nll_r)), rel=1e-5)
    assert m.top1 == pytest.approx(np.mean(agree))
    assert 0 < m.top1 < 1 and m.kld_mean > 0.01


def test_default_text_is_stable_and_sizeable() -> None:
    a, b = texts.default_eval_text(), texts.default_eval_text()
    assert a.sha256 == b.sha256 and len(a.text) > 100_000
    calib = texts.default_calibration_text()
    assert calib.text not in a.text[: len(a.text) // 2] and a.text.endswith(calib.text)


def test_eval_text_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Q.load_eval_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        Q.load_eval_text(empty)
