"""The reference decoder against transformers' own models, with and without the KV cache."""

from __future__ import annotations

import pytest
import torch

from smolconvert.model.reference import build_reference
from smolconvert.model.spec import ModelSpec
from tests import tiny

CASES = [
    ("llama", {}),  # untied, GQA 4/2
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),  # tied, MHA
    ("llama", {"num_key_value_heads": 1, "head_dim": 32}),  # MQA, explicit head_dim != hidden/heads
    ("smollm3", {}),  # tied, no-RoPE layer 3
]


def _pair(arch: str, overrides: dict):
    cfg = tiny.config(arch, **overrides)
    hf = tiny.hf_model(cfg)
    ours = build_reference(ModelSpec.from_config(cfg), tensors=hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("arch, overrides", CASES)
def test_full_sequence_matches_transformers(arch: str, overrides: dict) -> None:
    hf, ours = _pair(arch, overrides)
    ids = torch.randint(0, tiny.VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    got = ours.logits(ids[0].tolist())
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch, overrides", CASES)
def test_prefill_then_cached_decode_equals_full_sequence(arch: str, overrides: dict) -> None:
    hf, ours = _pair(arch, overrides)
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    full = ours.logits(ids[0].tolist())
    with torch.no_grad():
        hf_out = hf(ids[:, :16], use_cache=True)
        hf_steps = [hf_out.logits[0, -1]]
        cache = hf_out.past_key_values
        logits, past = ours(
            ids[:, :16],
            torch.ones(1, 16, dtype=torch.long),
            torch.arange(16)[None],
            ours.empty_past(),
        )
        steps = [logits[0, -1]]
        for t in range(16, 24):
            logits, past = ours(
                ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), past
            )
            steps.append(logits[0, -1])
            hf_out = hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = hf_out.past_key_values
            hf_steps.append(hf_out.logits[0, -1])
    assert (torch.stack(steps) - full[15:]).abs().max().item() <= 1e-4
    assert (torch.stack(hf_steps) - full[15:]).abs().max().item() <= 1e-4
    assert past[0].shape == (1, ours.spec.n_kv_heads, 24, ours.spec.head_dim)


def test_left_padded_batch_equals_single_sequences() -> None:
    _, ours = _pair("llama", {})
    g = torch.Generator().manual_seed(3)
    a = torch.randint(2, tiny.VOCAB, (12,), generator=g)
    b = torch.randint(2, tiny.VOCAB, (8,), generator=g)
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    pos = torch.stack([torch.arange(12), torch.clamp(torch.arange(12) - 4, min=0)])
    with torch.no_grad():
        logits, _ = ours(ids, mask, pos, ours.empty_past(batch=2))
    assert (logits[0] - ours.logits(a.tolist())).abs().max() <= 1e-4
    assert (logits[1, 4:] - ours.logits(b.tolist())).abs().max() <= 1e-4
    assert torch.isfinite(logits).all()


def test_wrong_rope_theta_would_be_caught() -> None:
    """The comparison is sensitive to the RoPE base: a 10x theta error exceeds the tolerance."""
    cfg = tiny.config("llama")
    hf = tiny.hf_model(cfg)
    wrong = build_reference(
        ModelSpec.from_config(dict(cfg, rope_theta=100000.0)), tensors=hf.state_dict()
    )
    ids = torch.randint(0, tiny.VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert (wrong.logits(ids[0].tolist()) - expected).abs().max().item() > 1e-3


def test_tied_embedding_is_one_tensor() -> None:
    _, ours = _pair("smollm3", {})
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
