"""How llama.cpp lays out a Llama-shaped model in GGUF: tensor names and the Q/K row permutation.

Shared by the GGUF importer (model/weights.py) and the GGUF exporter. Mirrors llama.cpp's converter
(`conversion/llama.py`, `LlamaModel.permute`) and `gguf-py/gguf/tensor_mapping.py`.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import NDArray

# GGUF name -> canonical (Hugging Face) name; `{i}` is the block index.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_CANON_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TO_GGUF_GLOBAL = {v: k for k, v in GLOBAL_TENSORS.items()}
_TO_GGUF_BLOCK = {v: k for k, v in BLOCK_TENSORS.items()}


def canonical_name(gguf_name: str) -> str | None:
    """The canonical name of a GGUF tensor; None when llama.cpp's Llama layout has none."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{BLOCK_TENSORS[m.group(2)]}"
    return None


def gguf_name(name: str) -> str:
    """The GGUF name of a canonical tensor (KeyError for names outside the Llama layout)."""
    if name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[name]
    m = _CANON_BLOCK.fullmatch(name)
    if m is None:
        raise KeyError(name)
    return f"blk.{m.group(1)}.{_TO_GGUF_BLOCK[m.group(2)]}"


def rope_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Heads a tensor's rows are permuted over in GGUF (q: all, k: KV heads), else None."""
    if name.endswith("self_attn.q_proj.weight"):
        return n_heads
    if name.endswith("self_attn.k_proj.weight"):
        return n_kv_heads
    return None


def permute_qk(w: NDArray[np.floating], n_heads: int) -> NDArray[np.floating]:
    """HF rotate-half rows -> ggml adjacent pairs: per head, new row 2i+s = old row s*D/2+i."""
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: NDArray[np.floating], n_heads: int) -> NDArray[np.floating]:
    """Inverse of `permute_qk`: GGUF rows back to Hugging Face order."""
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
