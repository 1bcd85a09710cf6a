"""GGUF schemes: which codec each tensor gets, in llama.cpp's own mixtures (q4_k_m, q3_k_m, ...).

Each scheme is a recipe (quantizers/recipe.py: first-match rules over tensor roles and layer
indices) plus the file type it writes, and llama.cpp's two shape rules apply after the recipe
(the output/tied-embedding rule and the fallback for rows that are not a multiple of the block
size). Mirrors `llama_tensor_get_type_impl`, `tensor_type_fallback` and
`llama_ftype_get_default_type` in llama.cpp src/llama-quant.cpp (@ 0c1e57098, the copy in
llama-cpp-python 0.3.36). Only what Llama-shaped decoders hit is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from smolconvert.errors import UnsupportedError
from smolconvert.quantizers.recipe import (
    Recipe,
    Rule,
    always,
    first,
    first_eighth,
    first_sixteenth,
    gqa_at_least,
    role_of,
    use_more_bits,
)

FLOAT_CODECS = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GgufScheme:
    name: str
    file_type: int  # general.file_type, llama.cpp's LLAMA_FTYPE_*
    recipe: Recipe

    @property
    def default(self) -> str:
        return self.recipe.default or "f32"

    @property
    def quantized(self) -> bool:
        return self.default not in FLOAT_CODECS


def _scheme(name: str, file_type: int, default: str, rules: tuple[Rule, ...] = ()) -> GgufScheme:
    return GgufScheme(name, file_type, Recipe(name, default, rules))


def _plain(name: str, file_type: int, rules: tuple[Rule, ...] = ()) -> GgufScheme:
    return _scheme(name, file_type, name, rules)


# llama.cpp's rules for LLAMA_FTYPE_MOSTLY_IQ4_NL and _IQ4_XS: its guard for the first ffn_down
# layers applies only without an imatrix (the opposite of q4_0's and q5_0's).
_IQ4_RULES = (
    Rule("attn_v", "q5_k", gqa_at_least(4)),
    Rule("ffn_down", "q5_k", first_eighth, unless_imatrix=True),
)

SCHEMES: dict[str, GgufScheme] = {
    r.name: r
    for r in (
        _plain("f32", 0),
        _plain("f16", 1),
        _plain("bf16", 32),
        _plain("q8_0", 7),
        _plain("q4_0", 2, (Rule("ffn_down", "q4_1", first_eighth, needs_imatrix=True),)),
        _plain("q4_1", 3),
        _plain("q5_0", 8, (Rule("ffn_down", "q5_1", first_eighth, needs_imatrix=True),)),
        _plain("q5_1", 9),
        _scheme(
            "q2_k",
            10,
            "q2_k",
            (
                Rule("attn_v", "q4_k", gqa_at_least(4)),
                Rule("attn_v", "q3_k", always),
                Rule("ffn_down", "q3_k", always),
                Rule("attn_output", "q3_k", always),
            ),
        ),
        _scheme("q3_k_s", 11, "q3_k"),
        _scheme(
            "q3_k_m",
            12,
            "q3_k",
            (
                Rule("attn_v", "q5_k", first(2)),
                Rule("attn_v", "q4_k", always),
                Rule("ffn_down", "q5_k", first_sixteenth),
                Rule("ffn_down", "q4_k", always),
                Rule("attn_output", "q4_k", always),
            ),
        ),
        _scheme(
            "q3_k_l",
            13,
            "q3_k",
            (
                Rule("attn_v", "q5_k", always),
                Rule("ffn_down", "q5_k", always),
                Rule("attn_output", "q5_k", always),
            ),
        ),
        _scheme(
            "q4_k_s",
            14,
            "q4_k",
            (
                Rule("attn_v", "q5_k", first(4)),
                Rule("ffn_down", "q5_k", first_eighth),
            ),
        ),
        _scheme(
            "q4_k_m",
            15,
            "q4_k",
            (
                Rule("attn_v", "q6_k", use_more_bits),
                Rule("ffn_down", "q6_k", use_more_bits),
            ),
        ),
        _scheme("q5_k_s", 16, "q5_k"),
        _scheme(
            "q5_k_m",
            17,
            "q5_k",
            (
                Rule("attn_v", "q6_k", use_more_bits),
                Rule("ffn_down", "q6_k", use_more_bits),
            ),
        ),
        _scheme("q6_k", 18, "q6_k"),
        _plain("iq4_nl", 25, _IQ4_RULES),
        _plain("iq4_xs", 30, _IQ4_RULES),
    )
}

# tensor_type_fallback: a 256-block type on rows that are not a multiple of 256. A type without an
# entry (32-block types) stays as it is; rows that its blocks do not divide either become f16.
FALLBACK = {
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
    "iq4_xs": "iq4_nl",
}


def block_size(codec: str) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[codec.upper()]][0])


def _fallback(codec: str, cols: int) -> str:
    if cols % block_size(codec) == 0:
        return codec
    codec = FALLBACK.get(codec, codec)
    return codec if cols % block_size(codec) == 0 else "f16"


def tensor_codec(
    scheme: GgufScheme,
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
    codec = scheme.default
    if not scheme.quantized:
        return codec
    cols = shape[-1]
    if role == "output":
        codec = "q8_0" if cols % block_size(codec) != 0 or codec == "q8_0" else "q6_k"
    else:
        codec = scheme.recipe.codec_for(role, layer, n_layers, gqa, has_imatrix) or codec
    return _fallback(codec, cols)


def get_scheme(name: str) -> GgufScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UnsupportedError(
            f"unknown GGUF scheme {name!r}; choose one of {', '.join(sorted(SCHEMES))}"
        ) from None
