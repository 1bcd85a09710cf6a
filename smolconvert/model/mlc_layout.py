"""MLC LLM's Llama parameter layout and tensor-cache float encoding: format facts shared by the
MLC exporter (which writes them) and the MLC runner (which reads them back).

Follows mlc-llm at commit 01ced331 (model/llama/llama_model.py, quantization/quantization.py) and
TVM 0.27 `tvm.contrib.tvmjs` (bf16 storage of float32 tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import UnsupportedError
from smolconvert.model.spec import ModelSpec
from smolconvert.quantizers import group

UNQUANTIZED = {"q0f16": "float16", "q0f32": "float32"}  # mlc-llm NoQuantize entries
SCHEMES = (*UNQUANTIZED, *group.GROUP_CONFIGS)


@dataclass(frozen=True)
class MLCParam:
    name: str  # MLC's parameter name
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[str, ...]  # canonical tensors concatenated on axis 0 (fused projections)
    role: str  # "weight" (unquantized), "q_weight" or "q_scale"


def model_dtype(scheme: str) -> str:
    return UNQUANTIZED.get(scheme) or group.GROUP_CONFIGS[scheme].model_dtype


def _linears(spec: ModelSpec) -> Iterator[tuple[str, tuple[str, ...], int, int]]:
    """(MLC module name, canonical sources, out_features, in_features) in declaration order,
    interleaved with the norms as None-free tuples; norms are yielded with in_features 0."""
    d, f = spec.hidden_size, spec.intermediate_size
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    yield "model.embed_tokens", ("model.embed_tokens.weight",), spec.vocab_size, d
    for i in range(spec.n_layers):
        p = f"model.layers.{i}"
        yield (
            f"{p}.self_attn.qkv_proj",
            tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"),
            q + 2 * kv,
            d,
        )
        yield f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj.weight",), d, q
        yield (
            f"{p}.mlp.gate_up_proj",
            (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
            2 * f,
            d,
        )
        yield f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj.weight",), d, f
        yield f"{p}.input_layernorm", (f"{p}.input_layernorm.weight",), d, 0
        yield f"{p}.post_attention_layernorm", (f"{p}.post_attention_layernorm.weight",), d, 0
    yield "model.norm", ("model.norm.weight",), d, 0
    if not spec.tie_word_embeddings:
        yield "lm_head", ("lm_head.weight",), spec.vocab_size, d


def plan(spec: ModelSpec, scheme: str) -> list[MLCParam]:
    """MLC's parameter list for LlamaForCausalLM under `scheme`, in declaration order."""
    check_supported(spec)
    dtype = model_dtype(scheme)
    cfg = group.GROUP_CONFIGS.get(scheme)
    out = []
    for module, sources, rows, k in _linears(spec):
        if k == 0:  # RMSNorm weight, never quantized
            out.append(MLCParam(f"{module}.weight", (rows,), dtype, sources, "weight"))
        elif cfg is None:
            out.append(MLCParam(f"{module}.weight", (rows, k), dtype, sources, "weight"))
        else:
            wshape, sshape = cfg.packed_shape(rows, k)
            out.append(MLCParam(f"{module}.q_weight", wshape, "uint32", sources, "q_weight"))
            out.append(MLCParam(f"{module}.q_scale", sshape, dtype, sources, "q_scale"))
    return out


def check_supported(spec: ModelSpec) -> None:
    if spec.architecture != "llama":
        raise UnsupportedError(
            f"MLC LLM has no {spec.architecture} model type (its Llama model applies RoPE on every "
            "layer, SmolLM3 skips it on some); export SmolLM3 to gguf, onnx or coreml instead"
        )


def f32_to_bf16(value: NDArray[np.float32]) -> NDArray[np.uint16]:
    """TVM tvmjs `_convert_f32_to_bf16`: round to nearest even inside bf16's range, truncate out."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    limit = np.array([np.finfo(np.float32).max]).astype(np.float32).view(np.uint32)
    limit = ((limit >> 16) << 16).view(np.float32)[0]
    bits = value.view(np.uint32)
    bias = np.where((value < limit) & (value > -limit), ((bits >> 16) & 1) + 0x7FFF, 0)
    return ((bits + bias.astype(np.uint32)) >> 16).astype(np.uint16)


def bf16_to_f32(value: NDArray[np.uint16]) -> NDArray[np.float32]:
    return (np.asarray(value, np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round(value: NDArray) -> NDArray[np.float32]:
    """What a float32 tensor becomes after a trip through the tensor cache."""
    return bf16_to_f32(f32_to_bf16(np.asarray(value, np.float32)))
