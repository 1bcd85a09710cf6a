"""Importance vectors equal the mean squared inputs transformers' own model feeds its layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import smolconvert
from smolconvert.errors import ConfigError
from smolconvert.model.imatrix import collect_imatrix
from smolconvert.texts import EvalText, default_calibration_text
from tests import tiny


def test_imatrix_matches_transformers_activations(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    hf = tiny.hf_model(cfg)
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=hf.state_dict())
    model = smolconvert.load(folder)
    text = default_calibration_text()
    matrix = collect_imatrix(model, text, ctx=64, chunks=3, quiet=True)
    assert matrix.chunks == 3 and matrix.tokens == 192 and len(matrix.values) == 2 * 7

    ids = model.tokenizer.encode(text.text[: 64 * 3 * 8])[:192]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, n=n: seen.setdefault(n, []).append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for n, m in hf.model.layers.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for c in range(3):
            hf(torch.tensor([ids[c * 64 : (c + 1) * 64]]))
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        expected = torch.cat(xs).pow(2).mean(0).numpy()
        got = matrix.get(f"model.layers.{name}.weight")
        assert got is not None and got.shape == expected.shape
        assert abs(got - expected).max() <= 1e-4 * max(1.0, float(expected.max())), name
    assert matrix.get("model.embed_tokens.weight") is None  # not covered, as in llama.cpp
    info = matrix.describe()
    assert info["text_sha256"] == text.sha256 and info["entries"] == 14


def test_too_short_calibration_text_is_a_clear_error(tiny_folder: Path) -> None:
    with pytest.raises(ConfigError, match="fewer than one chunk"):
        collect_imatrix(smolconvert.load(tiny_folder), EvalText("short", "hello"), ctx=64)
