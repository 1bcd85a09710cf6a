"""Core ML schemes: the compute precision of the program and which codec each weight gets.

Each scheme holds a recipe (quantizers/recipe.py: first-match rules over llama.cpp's tensor roles,
naming codecs of quantizers/coreml_codecs.py); a recipe without a default codec keeps every weight
float (fp16, fp32). Only 2-D weights take a codec; norms stay in the compute precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import expected_shape
from smolconvert.quantizers.recipe import Recipe, Rule, role_of, use_more_bits


@dataclass(frozen=True)
class CoremlScheme:
    name: str
    compute: str  # "fp16" | "fp32": the precision the program computes in
    recipe: Recipe
    description: str = ""

    @property
    def default(self) -> str | None:
        """Codec of every 2-D weight no rule matches; None: the scheme keeps weights float."""
        return self.recipe.default

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.recipe.rules


def _scheme(
    name: str, compute: str, default: str | None, rules: tuple[Rule, ...], description: str
) -> CoremlScheme:
    return CoremlScheme(name, compute, Recipe(name, default, rules), description)


# Our int4: an fp16 offset per block (5 bpw, exact on a Q4_1 grid) for the tensors llama.cpp's
# q4_k_m keeps at more bits (attn_v, and ffn_down in its use_more_bits layers); a searched uint4
# zero point (4.625 bpw) elsewhere and a searched symmetric int4 (4.5 bpw) for the tied
# embedding, so that SmolLM2-135M fits in 80 MB (sizes: docs/coreml.md).
_INT4_RULES = (
    Rule("output", "int4_block32_sym"),
    Rule("token_embd", "int4_block32_sym"),
    Rule("attn_v", "int4_block32"),
    Rule("ffn_down", "int4_block32", use_more_bits),
)
# Like llama.cpp's q4_k_m: more bits for the tied embedding/output, attn_v and ffn_down in the
# first and last eighth of layers and every third between (use_more_bits).
_MIXED_RULES = (
    Rule("output", "int8_channel"),
    Rule("token_embd", "int8_channel"),
    Rule("attn_v", "int8_channel", use_more_bits),
    Rule("ffn_down", "int8_channel", use_more_bits),
)
# The tied embedding/lm_head is the tensor SmolLM2 is most sensitive to, and one look-up table
# per row or per 16 rows does not serve it: it keeps int8 (measured: docs/coreml.md).
_PAL_RULES = (Rule("output", "int8_channel"), Rule("token_embd", "int8_channel"))

SCHEMES: dict[str, CoremlScheme] = {
    s.name: s
    for s in (
        _scheme("fp32", "fp32", None, (), "fp32 weights and compute"),
        _scheme("fp16", "fp16", None, (), "fp16 weights and compute"),
        _scheme("int8", "fp16", "int8_channel", (), "int8 per output channel"),
        _scheme(
            "int4",
            "fp16",
            "int4_block32_zp",
            _INT4_RULES,
            "asymmetric 4-bit per 32-block with searched scale and uint4 zero point; fp16 offsets "
            "for attn_v and ffn_down in use_more_bits layers; symmetric int4 tied embedding",
        ),
        _scheme(
            "pal4",
            "fp16",
            "lut4",
            _PAL_RULES,
            "4-bit k-means LUT per 16 output rows, scaled per row (stored per row); int8 tied "
            "embedding",
        ),
        _scheme(
            "pal6",
            "fp16",
            "lut6",
            _PAL_RULES,
            "6-bit k-means LUT per 16 output rows; int8 tied embedding",
        ),
        _scheme(
            "pal8",
            "fp16",
            "lut8",
            _PAL_RULES,
            "8-bit k-means LUT per 16 output rows; int8 tied embedding",
        ),
        _scheme(
            "mixed",
            "fp16",
            "int4_block32",
            _MIXED_RULES,
            "int4 (fp16 offsets) with int8 for the tied embedding, and attn_v/ffn_down in "
            "llama.cpp's use_more_bits layers",
        ),
    )
}


def tensor_codec(scheme: CoremlScheme, name: str, spec: ModelSpec) -> str | None:
    """The codec of one canonical tensor under `scheme` (None: stays float); 2-D weights only."""
    if len(expected_shape(spec, name)) != 2 or scheme.default is None:
        return None
    role, layer = role_of(name, spec.tie_word_embeddings)
    gqa = spec.n_heads // spec.n_kv_heads
    return scheme.recipe.codec_for(role, layer, spec.n_layers, gqa)
