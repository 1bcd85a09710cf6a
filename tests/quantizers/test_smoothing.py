"""SmoothQuant folding: the float model is unchanged, the activation ranges are evened out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smolconvert.quantizers.smoothing import activation_maxima, smooth
from tests import tiny

TOKENS = [[5, 17, 200, 3, 99, 42, 7, 250, 1, 64, 33, 128, 8, 19, 77, 300]]


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_smoothing_keeps_the_float_function(tmp_path: Path, arch: str) -> None:
    import smolconvert
    from smolconvert.model.reference import build_reference

    model = smolconvert.load(str(tiny.write_folder(tmp_path / arch, tiny.config(arch))))
    ref = build_reference(model.spec, source=model.weights)
    # an outlier channel, as SmolLM2 has: every layer's norm weight 30x on channel 5
    with torch.no_grad():
        for layer in ref.model.blocks():
            layer.input_layernorm.weight[5] *= 30
            layer.post_attention_layernorm.weight[5] *= 30
    want = ref.logits(TOKENS[0])
    before = activation_maxima(ref, TOKENS)
    assert smooth(ref, before) == 6 * model.spec.n_layers
    after = activation_maxima(ref, TOKENS)
    torch.testing.assert_close(ref.logits(TOKENS[0]), want, atol=1e-4, rtol=1e-4)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        spread = before[name].max() / before[name].median()
        assert after[name].max() / after[name].median() < spread / 3, name
