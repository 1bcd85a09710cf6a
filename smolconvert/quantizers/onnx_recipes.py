"""ONNX schemes: which MatMulNBits codec each weight gets, and what onnxruntime needs beside it.

A scheme holds a recipe (quantizers/recipe.py: first-match rules over llama.cpp's tensor roles,
codecs from quantizers/nbits.py) and the settings that are not per tensor: the float type of the
unquantized tensors and of compute, MatMulNBits' accuracy level, whether levels come from GPTQ on
calibration text, and the fused graph's KV cache type. The measurements behind each choice are in
docs/onnx.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolconvert.errors import ConfigError
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names
from smolconvert.quantizers.nbits import FORMATS
from smolconvert.quantizers.recipe import Recipe, Rule, role_of


@dataclass(frozen=True)
class OnnxScheme:
    name: str
    float_dtype: str  # "float32" | "float16": storage and compute of unquantized tensors
    accuracy_level: int  # MatMulNBits: 0 = fp32 activations, 4 = int8 activations
    gptq: bool  # levels by GPTQ on calibration text (quantizers/gptq.py), else round-to-nearest
    kv_cache: str  # "float" | "int8": the fused graph's cache (exporters/onnx_kv.py)
    recipe: Recipe


SCHEMES: dict[str, OnnxScheme] = {
    s.name: s
    for s in (
        OnnxScheme("fp32", "float32", 0, False, "float", Recipe("fp32", None)),
        OnnxScheme("fp16", "float16", 0, False, "float", Recipe("fp16", None)),
        OnnxScheme(
            "int8",
            "float32",
            # 8-bit MatMulNBits has a fast CPU kernel only with int8 activations
            accuracy_level=4,
            gptq=False,
            kv_cache="int8",
            recipe=Recipe(
                "int8",
                "int8_b32_uint8",
                (
                    # the embedding and the head symmetric in blocks of 32, as llama.cpp's Q8_0
                    Rule("token_embd", "int8_b32_none"),
                    Rule("output", "int8_b32_none"),
                ),
            ),
        ),
        OnnxScheme(
            "int4",
            "float32",
            # int8 activations in MatMulNBits, as the onnxruntime-genai builder's CPU int4
            accuracy_level=4,
            # act order, scales refit, k and v on attention-weighted Hessians
            gptq=True,
            kv_cache="int8",
            # Symmetric blocks of 32: MatMulNBits' fastest kernels (no zero points), and with
            # one codec q/k/v share one MatMulNBits, as in the onnxruntime-genai builder's graph
            # (every extra MatMulNBits, and the Concat GroupQueryAttention then needs, costs
            # decode time). down_proj in 8 bits: of all projections it loses the most on text
            # unlike the calibration (docs/onnx.md), for 13 MB more on the default model.
            recipe=Recipe("int4", "int4_b32_none", (Rule("ffn_down", "int8_b32_none"),)),
        ),
    )
}


def codec_plan(recipe: Recipe, spec: ModelSpec) -> dict[str, str | None]:
    """Every canonical tensor of `spec` -> its MatMulNBits codec name (None: stored float).

    The tied embedding plays the output's role: it is stored once, as the head's codec."""
    gqa = spec.n_heads // spec.n_kv_heads
    plan = {}
    for name in canonical_names(spec):
        role, layer = role_of(name, spec.tie_word_embeddings)
        plan[name] = recipe.codec_for(role, layer, spec.n_layers, gqa)
    unknown = sorted({c for c in plan.values() if c is not None and c not in FORMATS})
    if unknown:
        raise ConfigError(
            f"ONNX recipe {recipe.name!r} names codecs MatMulNBits cannot run: "
            f"{', '.join(unknown)}; choose among {', '.join(FORMATS)}"
        )
    return plan


def codec_runs(plan: dict[str, str | None], parts: list[str]) -> list[tuple[str | None, list[str]]]:
    """Weights that read one input, in order, cut into runs of one codec: each run is one
    projection stacked along N (q/k/v as one when they share a codec)."""
    runs: list[tuple[str | None, list[str]]] = []
    for part in parts:
        codec = plan[part]
        if runs and runs[-1][0] == codec:
            runs[-1][1].append(part)
        else:
            runs.append((codec, [part]))
    return runs


# Per-KV-head Hessians cost two hidden x hidden grams and GPTQ runs per KV head and layer: cheap
# at SmolLM2-135M/360M's 3-5 heads and SmolLM3's 4, hours at SmolLM2-1.7B's 32 (docs/scaling.md).
PER_HEAD_MAX_KV_HEADS = 8


def kv_hessians(option: str, n_kv_heads: int) -> str:
    """'per-head' or 'pooled' for the `gptq` option's auto, per-head and pooled."""
    if option == "auto":
        return "per-head" if n_kv_heads <= PER_HEAD_MAX_KV_HEADS else "pooled"
    if option not in ("per-head", "pooled"):
        raise ValueError(f"no GPTQ Hessian mode {option!r}")
    return option
