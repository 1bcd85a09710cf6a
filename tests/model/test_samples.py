"""Calibration tokens the model samples itself (model/samples.py): seeded, cached, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smolconvert.model.samples import cache_dir, self_samples, start_token
from smolconvert.model.source import CanonicalModel, load_model
from tests import tiny


@pytest.fixture
def model(tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch) -> CanonicalModel:
    """A tiny random model of `arch`, with a cache of the test's own."""
    monkeypatch.setenv("SMOLCONVERT_CACHE", str(tmp_path / "one"))
    return load_model(tiny.write_folder(tmp_path / "m", tiny.config(arch)))


def test_samples_are_seeded_cached_and_start_at_the_start_token(
    model: CanonicalModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = self_samples(model, 3, 20)
    assert not first.cached and len(first.windows) == 3
    assert all(len(w) == 20 and w[0] == start_token(model) for w in first.windows)
    assert all(0 <= t < model.spec.vocab_size for w in first.windows for t in w)
    assert len({tuple(w) for w in first.windows}) == 3  # sampled, not one greedy path
    again = self_samples(model, 3, 20)
    assert again.cached and again.windows == first.windows

    monkeypatch.setenv("SMOLCONVERT_CACHE", str(tmp_path / "two"))
    fresh = self_samples(model, 3, 20)  # sampled again from the seed: the same tokens
    assert not fresh.cached and fresh.sha256 == first.sha256
    other_seed = self_samples(model, 3, 20, seed=1)
    assert other_seed.windows != first.windows


def test_a_damaged_cache_entry_is_sampled_again(model: CanonicalModel) -> None:
    good = self_samples(model, 2, 16)
    (entry,) = (cache_dir() / "samples").iterdir()
    entry.write_text('{"windows": [[1, 2')
    assert not self_samples(model, 2, 16).cached
    entry.write_text(json.dumps({"windows": [[1, 2]]}))  # readable, the wrong shape
    redone = self_samples(model, 2, 16)
    assert not redone.cached and redone.windows == good.windows
