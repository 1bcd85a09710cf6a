"""The numerical reference: a plain torch Llama/SmolLM3 decoder written to be exported.

No data-dependent Python control flow; explicit `position_ids`, `attention_mask` and past key/value
tensors in, logits and present key/values out (a flat tuple k0, v0, k1, v1, ...), so the same module
traces to ONNX and Core ML. Parameter names equal HF's, so a canonical state dict loads as is.
It must match transformers' own model (fp32, max |delta logit| <= 1e-4); tests hold it to that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from smolconvert.model.spec import MASK_VALUE, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, use_rope: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.use_rope = use_rope
        d, q, kv = spec.hidden_size, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)
        # An int8 KV cache (exporters/onnx_kv.py): (k, v) scales, each (kv, D); attention then
        # reads keys and values rounded to int8 levels, as onnxruntime's quantized cache holds them.
        self.cache_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        cos: torch.Tensor,  # (B, 1, T, D)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, 1, T, P+T) additive, fp32
        past_k: torch.Tensor,  # (B, kv, P, D)
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # (B, kv, S, D), S = P + T
        v = torch.cat([past_v, v], dim=2)
        if self.cache_scales is not None:
            ks, vs = (x[None, :, None, :] for x in self.cache_scales)
            k = torch.clamp(torch.round(k / ks), -128, 127) * ks
            v = torch.clamp(torch.round(v / vs), -128, 127) * vs
        return self.attend(q, k, v, mask), k, v

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, D), keys and values (B, kv, T, D) of x, RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,  # (B, nh, T, D)
        k: torch.Tensor,  # (B, kv, S, D): every key a query may see, cached ones first
        v: torch.Tensor,
        mask: torch.Tensor,  # (B, 1, T, S) additive, fp32
    ) -> torch.Tensor:
        """The attention output projected back to (B, T, d)."""
        b, _, t, _ = q.shape
        groups = self.n_heads // self.n_kv
        s = k.shape[2]
        k_all = (
            k[:, :, None]
            .expand(b, self.n_kv, groups, s, self.head_dim)
            .reshape(b, self.n_heads, s, self.head_dim)
        )
        v_all = (
            v[:, :, None]
            .expand(b, self.n_kv, groups, s, self.head_dim)
            .reshape(b, self.n_heads, s, self.head_dim)
        )
        scores = torch.matmul(q, k_all.transpose(2, 3)) * (self.head_dim**-0.5)  # (B, nh, T, S)
        probs = torch.softmax(scores.float() + mask, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v_all).transpose(1, 2).reshape(b, t, -1)  # (B, T, nh*D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, use_rope: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, use_rope)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, r) for r in spec.rope_layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def blocks(self) -> list[DecoderLayer]:
        """The decoder layers, typed (an nn.ModuleList yields plain Modules to a type checker)."""
        return cast("list[DecoderLayer]", list(self.layers))


class ReferenceDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, presents)."""

    inv_freq: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.tie_weights()

    def _inv_freq(self) -> torch.Tensor:
        dim = self.spec.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        return 1.0 / (self.spec.rope_theta**exponent)  # (D/2,)

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, P+T) int64, 1 = real token
        position_ids: torch.Tensor,  # (B, T) int64
        past: Sequence[torch.Tensor],  # 2 * n_layers tensors (B, kv, P, D): k0, v0, k1, v1, ...
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        cos, sin, mask = self.rope_and_mask(attention_mask, position_ids, h.dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.blocks()):
            a, k, v = layer.self_attn(
                layer.input_layernorm(h), cos, sin, mask, past[2 * i], past[2 * i + 1]
            )
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            presents += [k, v]
        logits = self.lm_head(self.model.norm(h)).float()  # (B, T, vocab)
        return logits, tuple(presents)

    def rope_and_mask(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, T, D) in `dtype` and the causal + padding mask (B, 1, T, S), additive
        fp32, for queries at the last T of the mask's S positions."""
        t, s = position_ids.shape[1], attention_mask.shape[1]
        key_pos = torch.arange(s, device=position_ids.device)
        query_pos = torch.arange(t, device=position_ids.device) + (s - t)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (
            attention_mask[:, None, None, :] > 0
        )  # (B, 1, T, S)
        mask = torch.where(allowed, 0.0, MASK_VALUE).to(torch.float32)
        return *self.rope(position_ids, dtype), mask

    def rope(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, D) in `dtype` for positions (B, T)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def empty_past(self, batch: int = 1) -> list[torch.Tensor]:
        dtype = self.model.embed_tokens.weight.dtype
        shape = (batch, self.spec.n_kv_heads, 0, self.spec.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.spec.n_layers)]

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits (T, vocab) of one sequence, no cache: row t predicts token t+1."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)[None]
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1])[None]
        out, _ = self(ids, mask, pos, self.empty_past())
        return out[0]


def build_reference(
    spec: ModelSpec,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    source: object = None,
    dtype: torch.dtype = torch.float32,
) -> ReferenceDecoder:
    """A ReferenceDecoder in `dtype` with weights from `source` (a WeightSource) or `tensors`.

    Parameters are allocated once and filled tensor by tensor: peak memory is one model plus one
    tensor, whatever the source's dtype.
    """
    from smolconvert.model.weights import canonical_names

    with torch.device("meta"):
        model = ReferenceDecoder(spec)
    model = model.to_empty(device="cpu").to(dtype)
    model.inv_freq = model._inv_freq()
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in canonical_names(spec):
        value = tensors[name] if tensors is not None else source.get(name)  # type: ignore[attr-defined]
        with torch.no_grad():
            params[name].copy_(value.to(dtype))
    model.eval()
    return model
