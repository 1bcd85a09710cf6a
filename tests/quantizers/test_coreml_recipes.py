"""Core ML schemes: which codec each tensor of a 30-layer SmolLM2-shaped model gets."""

from __future__ import annotations

import dataclasses

import pytest

from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names
from smolconvert.quantizers.coreml_codecs import CODECS
from smolconvert.quantizers.coreml_recipes import SCHEMES, tensor_codec
from tests import tiny

# llama.cpp's use_more_bits over 30 layers: the first and last eighth (0-2, 26-29) and every
# third layer between, from the fourth on.
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def _spec(tied: bool = True) -> ModelSpec:
    spec = ModelSpec.from_config(tiny.config("llama"))
    return dataclasses.replace(spec, n_layers=30, tie_word_embeddings=tied)


def test_every_scheme_names_registered_codecs() -> None:
    for scheme in SCHEMES.values():
        assert scheme.recipe.codecs() <= set(CODECS), scheme.name
        assert scheme.compute in ("fp16", "fp32")


def test_int4_keeps_more_bits_where_q4_k_m_does() -> None:
    spec, scheme = _spec(), SCHEMES["int4"]
    codec = {n: tensor_codec(scheme, n, spec) for n in canonical_names(spec)}
    assert codec["model.embed_tokens.weight"] == "int4_block32_sym"  # tied: the output
    assert codec["model.norm.weight"] is None
    for i in range(30):
        layer = f"model.layers.{i}"
        assert codec[f"{layer}.self_attn.v_proj.weight"] == "int4_block32"
        down = "int4_block32" if i in MORE_BITS_30 else "int4_block32_zp"
        assert codec[f"{layer}.mlp.down_proj.weight"] == down, i
        assert codec[f"{layer}.self_attn.q_proj.weight"] == "int4_block32_zp"
        assert codec[f"{layer}.input_layernorm.weight"] is None


def test_mixed_gives_int8_to_the_more_bits_layers_only() -> None:
    spec, scheme = _spec(tied=False), SCHEMES["mixed"]
    assert tensor_codec(scheme, "lm_head.weight", spec) == "int8_channel"
    assert tensor_codec(scheme, "model.embed_tokens.weight", spec) == "int8_channel"
    for i in range(30):
        want = "int8_channel" if i in MORE_BITS_30 else "int4_block32"
        assert tensor_codec(scheme, f"model.layers.{i}.self_attn.v_proj.weight", spec) == want
        assert tensor_codec(scheme, f"model.layers.{i}.mlp.up_proj.weight", spec) == "int4_block32"


@pytest.mark.parametrize("name", ["fp16", "fp32"])
def test_float_schemes_compress_nothing(name: str) -> None:
    spec = _spec()
    assert all(tensor_codec(SCHEMES[name], n, spec) is None for n in canonical_names(spec))
