"""GGUF recipes: which codec each tensor gets, in llama.cpp's own mixtures (q4_k_m, q3_k_m, ...).

A recipe is data: a default codec and ordered first-match rules over tensor roles and layer indices,
plus llama.cpp's two shape rules applied after them (the output/tied-embedding rule and the fallback
for rows that are not a multiple of the block size). Mirrors `llama_tensor_get_type_impl`,
`tensor_type_fallback` and `llama_ftype_get_default_type` in llama.cpp src/llama-quant.cpp
(@ 0c1e57098, the copy in llama-cpp-python 0.3.36). Only what Llama-shaped decoders hit is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf

from smolconvert.errors import UnsupportedError

# (layer index, layer count, n_heads // n_kv_heads) -> bool
When = Callable[[int, int, int], bool]


def use_more_bits(i: int, n: int, _: int = 0) -> bool:
    """llama.cpp's `use_more_bits`: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def always(i: int, n: int, gqa: int) -> bool:
    return True


def first_eighth(i: int, n: int, _: int) -> bool:
    return i < n // 8


def first_sixteenth(i: int, n: int, _: int) -> bool:
    return i < n // 16


def first(k: int) -> When:
    return lambda i, n, _: i < k


def gqa_at_least(k: int) -> When:
    return lambda i, n, gqa: gqa >= k


@dataclass(frozen=True)
class Rule:
    role: str  # attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, token_embd
    when: When
    codec: str
    needs_imatrix: bool = False  # the rule applies only when quantizing with an imatrix


@dataclass(frozen=True)
class Recipe:
    name: str
    file_type: int  # general.file_type, llama.cpp's LLAMA_FTYPE_*
    default: str
    rules: tuple[Rule, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.default not in ("f32", "f16", "bf16")


def _plain(name: str, file_type: int, rules: tuple[Rule, ...] = ()) -> Recipe:
    return Recipe(name, file_type, name, rules)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _plain("f32", 0),
        _plain("f16", 1),
        _plain("bf16", 32),
        _plain("q8_0", 7),
        _plain("q4_0", 2, (Rule("ffn_down", first_eighth, "q4_1", needs_imatrix=True),)),
        _plain("q4_1", 3),
        _plain("q5_0", 8, (Rule("ffn_down", first_eighth, "q5_1", needs_imatrix=True),)),
        _plain("q5_1", 9),
        Recipe(
            "q2_k",
            10,
            "q2_k",
            (
                Rule("attn_v", gqa_at_least(4), "q4_k"),
                Rule("attn_v", always, "q3_k"),
                Rule("ffn_down", always, "q3_k"),
                Rule("attn_output", always, "q3_k"),
            ),
        ),
        Recipe("q3_k_s", 11, "q3_k"),
        Recipe(
            "q3_k_m",
            12,
            "q3_k",
            (
                Rule("attn_v", first(2), "q5_k"),
                Rule("attn_v", always, "q4_k"),
                Rule("ffn_down", first_sixteenth, "q5_k"),
                Rule("ffn_down", always, "q4_k"),
                Rule("attn_output", always, "q4_k"),
            ),
        ),
        Recipe(
            "q3_k_l",
            13,
            "q3_k",
            (
                Rule("attn_v", always, "q5_k"),
                Rule("ffn_down", always, "q5_k"),
                Rule("attn_output", always, "q5_k"),
            ),
        ),
        Recipe(
            "q4_k_s",
            14,
            "q4_k",
            (
                Rule("attn_v", first(4), "q5_k"),
                Rule("ffn_down", first_eighth, "q5_k"),
            ),
        ),
        Recipe(
            "q4_k_m",
            15,
            "q4_k",
            (
                Rule("attn_v", use_more_bits, "q6_k"),
                Rule("ffn_down", use_more_bits, "q6_k"),
            ),
        ),
        Recipe("q5_k_s", 16, "q5_k"),
        Recipe(
            "q5_k_m",
            17,
            "q5_k",
            (
                Rule("attn_v", use_more_bits, "q6_k"),
                Rule("ffn_down", use_more_bits, "q6_k"),
            ),
        ),
        Recipe("q6_k", 18, "q6_k"),
    )
}

# tensor_type_fallback: a 256-block type on rows that are not a multiple of 256.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def block_size(codec: str) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[codec.upper()]][0])


def _fallback(codec: str, cols: int) -> str:
    if cols % block_size(codec) == 0:
        return codec
    codec = FALLBACK.get(codec, codec)
    return codec if cols % block_size(codec) == 0 else "f16"


def role_of(name: str, tied: bool) -> tuple[str, int | None]:
    """(role, layer) of a canonical tensor name; the tied embedding plays the output's role."""
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return "output", None
    if name == "model.embed_tokens.weight":
        return "token_embd", None
    parts = name.split(".")
    if len(parts) == 6 and parts[1] == "layers":  # model.layers.{i}.self_attn.q_proj.weight
        roles = {
            "q_proj": "attn_q",
            "k_proj": "attn_k",
            "v_proj": "attn_v",
            "o_proj": "attn_output",
            "gate_proj": "ffn_gate",
            "up_proj": "ffn_up",
            "down_proj": "ffn_down",
        }
        return roles.get(parts[4], "norm"), int(parts[2])
    return "norm", None


def tensor_codec(
    recipe: Recipe,
    name: str,
    shape: tuple[int, ...],
    n_layers: int,
    gqa: int,
    tied: bool,
    has_imatrix: bool = False,
) -> str:
    """The codec llama.cpp's quantize picks for one tensor (HF shape: rows, cols)."""
    if len(shape) < 2:
        return "f32"  # norms and other 1-D tensors stay F32
    role, layer = role_of(name, tied)
    codec = recipe.default
    if not recipe.quantized:
        return codec
    cols = shape[-1]
    if role == "output":
        codec = "q8_0" if cols % block_size(codec) != 0 or codec == "q8_0" else "q6_k"
    else:
        for rule in recipe.rules:
            if rule.role != role or (rule.needs_imatrix and not has_imatrix):
                continue
            if rule.when(layer if layer is not None else 0, n_layers, gqa):
                codec = rule.codec
                break
    return _fallback(codec, cols)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnsupportedError(
            f"unknown GGUF scheme {name!r}; choose one of {', '.join(sorted(RECIPES))}"
        ) from None
