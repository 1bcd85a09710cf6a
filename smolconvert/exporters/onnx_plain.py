"""The decoder layers in standard ONNX ops only (the "plain" graph, `-O graph=plain`).

The math is the reference decoder's (model/reference.py): the same RoPE from position_ids, the
same finite additive mask, softmax in fp32, GQA by grouping queries per KV head instead of
repeating keys and values. Past and new keys are concatenated, so any padding works (left-padded
batches included); the fused graph (onnx_fused.py) does the same work in ~3x fewer nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smolconvert.exporters.onnx_ops import Graph, Linear, Weights, add_linear, linear
from smolconvert.model.reference import MASK_VALUE
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import LAYER_TENSORS


def rms_norm(g: Graph, x: str, weight: str, eps: float, name: str) -> str:
    """weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 as the reference does."""
    h = x if g.np_float is np.float32 else g.op("Cast", [x], f"{name}/cast_up", to=1)
    sq = g.op("Mul", [h, h], f"{name}/sq")
    ms = g.op("ReduceMean", [sq, g.const([-1])], f"{name}/mean", keepdims=1)
    rs = g.op(
        "Reciprocal",
        [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], f"{name}/eps")], f"{name}/s")],
        f"{name}/rsqrt",
    )
    h = g.op("Mul", [h, rs], f"{name}/normed")
    if g.np_float is not np.float32:
        h = g.op("Cast", [h], f"{name}/cast_down", to=g.float_type)
    return g.op("Mul", [h, weight], name)


def rope(g: Graph, x: str, cos: str, sin: str, name: str) -> str:
    """x * cos + rotate_half(x) * sin; x (B, h, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = g.op("Split", [x], f"{name}/split", n_out=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rot", axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, cos], f"{name}/xcos"), g.op("Mul", [rotated, sin], f"{name}/xsin")],
        name,
    )


@dataclass(frozen=True)
class Shared:
    """Graph-wide values every layer reads."""

    cos: str  # (B, 1, T, D)
    sin: str
    mask: str  # (B, 1, 1, T, S) fp32 additive
    split_shape: str  # [0, 0, groups, -1, S]: (B, kv, g*T, S) -> (B, kv, g, T, S)
    merge_shape: str  # [0, 0, -1, S]
    accuracy_level: int


def attention(
    g: Graph, spec: ModelSpec, i: int, x: str, w: dict[str, Linear], s: Shared
) -> tuple[str, str, str]:
    """GQA without repeating K/V: queries grouped per KV head, (B, kv, g*T, D) @ (B, kv, D, S)."""
    p = f"/model/layers.{i}/self_attn"
    nh, kv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim

    def heads(name: str, n: int) -> str:
        y = linear(g, x, w[name], f"{p}/{name}", s.accuracy_level)  # (B, T, n*D)
        y = g.op("Reshape", [y, g.const([0, 0, n, d])], f"{p}/{name}/split_heads")
        return g.op("Transpose", [y], f"{p}/{name}/bhtd", perm=[0, 2, 1, 3])

    q, k, v = heads("q_proj", nh), heads("k_proj", kv), heads("v_proj", kv)
    if spec.rope_layers[i]:
        q, k = rope(g, q, s.cos, s.sin, f"{p}/q_rope"), rope(g, k, s.cos, s.sin, f"{p}/k_rope")
    q = g.op("Mul", [q, g.const(d**-0.5, g.np_float)], f"{p}/q_scaled")
    q = g.op("Reshape", [q, g.const([0, kv, -1, d])], f"{p}/q_grouped")  # (B, kv, g*T, D)
    k = g.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
    v = g.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
    kt = g.op("Transpose", [k], f"{p}/k_t", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, kt], f"{p}/scores")  # (B, kv, g*T, S)
    if g.np_float is not np.float32:
        scores = g.op("Cast", [scores], f"{p}/scores_fp32", to=1)
    scores = g.op("Reshape", [scores, s.split_shape], f"{p}/scores5")  # (B, kv, g, T, S)
    probs = g.op("Softmax", [g.op("Add", [scores, s.mask], f"{p}/masked")], f"{p}/probs", axis=-1)
    if g.np_float is not np.float32:
        probs = g.op("Cast", [probs], f"{p}/probs_cast", to=g.float_type)
    probs = g.op("Reshape", [probs, s.merge_shape], f"{p}/probs4")  # (B, kv, g*T, S)
    out = g.op("MatMul", [probs, v], f"{p}/context")  # (B, kv, g*T, D)
    out = g.op("Reshape", [out, g.const([0, nh, -1, d])], f"{p}/context_heads")
    out = g.op("Transpose", [out], f"{p}/context_bthd", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.const([0, 0, nh * d])], f"{p}/context_flat")
    return linear(g, out, w["o_proj"], f"{p}/o_proj", s.accuracy_level), k, v


def mlp(g: Graph, i: int, x: str, w: dict[str, Linear], s: Shared) -> str:
    p = f"/model/layers.{i}/mlp"
    gate = linear(g, x, w["gate_proj"], f"{p}/gate_proj", s.accuracy_level)
    up = linear(g, x, w["up_proj"], f"{p}/up_proj", s.accuracy_level)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
    return linear(
        g, g.op("Mul", [act, up], f"{p}/act_up"), w["down_proj"], f"{p}/down_proj", s.accuracy_level
    )


def rope_and_mask(g: Graph, spec: ModelSpec) -> tuple[str, str, str]:
    """cos/sin (B, 1, T, D) from position_ids; the causal+padding mask (B, 1, 1, T, S)."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    pos = g.op("Cast", ["position_ids"], "/rope/pos", to=1)
    freqs = g.op(
        "Mul",
        [g.op("Unsqueeze", [pos, g.const([-1])], "/rope/pos3"), g.const(inv_freq, np.float32)],
        "/rope/freqs",
    )
    emb = g.op("Concat", [freqs, freqs], "/rope/emb", axis=-1)
    emb = g.op("Unsqueeze", [emb, g.const([1])], "/rope/emb4")
    cos, sin = g.op("Cos", [emb], "/rope/cos"), g.op("Sin", [emb], "/rope/sin")
    if g.np_float is not np.float32:
        cos = g.op("Cast", [cos], "/rope/cos16", to=g.float_type)
        sin = g.op("Cast", [sin], "/rope/sin16", to=g.float_type)
    total = g.op(
        "Squeeze", [g.op("Shape", ["attention_mask"], "/mask/s1", start=1, end=2)], "/mask/S"
    )
    t = g.op("Squeeze", [g.op("Shape", ["input_ids"], "/mask/t1", start=1, end=2)], "/mask/T")
    key_pos = g.op("Range", [g.const(0), total, g.const(1)], "/mask/key_pos")
    query_pos = g.op(
        "Range", [g.op("Sub", [total, t], "/mask/P"), total, g.const(1)], "/mask/query_pos"
    )
    causal = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [key_pos, g.const([0])], "/mask/key_row"),
            g.op("Unsqueeze", [query_pos, g.const([1])], "/mask/query_col"),
        ],
        "/mask/causal",
    )  # (T, S)
    real = g.op("Greater", ["attention_mask", g.const(0)], "/mask/real")  # (B, S)
    real = g.op("Unsqueeze", [real, g.const([1, 2, 3])], "/mask/real5")  # (B, 1, 1, 1, S)
    allowed = g.op("And", [causal, real], "/mask/allowed")  # (B, 1, 1, T, S)
    mask = g.op(
        "Where",
        [allowed, g.const(0.0, np.float32), g.const(MASK_VALUE, np.float32)],
        "/mask/additive",
    )
    return cos, sin, mask


def plain_layers(
    g: Graph, spec: ModelSpec, weights: Weights, accuracy_level: int, embed: str
) -> str:
    """All decoder layers and the final norm: embeddings (B, T, d) -> normed hidden states."""
    cos, sin, mask = rope_and_mask(g, spec)
    total = g.op("Shape", ["attention_mask"], "/attn/S", start=1, end=2)
    groups = spec.n_heads // spec.n_kv_heads
    split = g.op("Concat", [g.const([0, 0, groups, -1]), total], "/attn/split_shape", axis=0)
    merge = g.op("Concat", [g.const([0, 0, -1]), total], "/attn/merge_shape", axis=0)
    shared = Shared(cos, sin, mask, split, merge, accuracy_level)

    def norm_weight(name: str) -> str:
        return g.weight(name, weights.float32(name).astype(g.np_float))

    h = embed
    for i in range(spec.n_layers):
        p, q = f"model.layers.{i}", f"/model/layers.{i}"
        w = {
            t.split(".")[1]: add_linear(g, weights, f"{p}.{t}")
            for t in LAYER_TENSORS
            if "proj" in t
        }
        norm1 = norm_weight(f"{p}.input_layernorm.weight")
        norm2 = norm_weight(f"{p}.post_attention_layernorm.weight")
        x = rms_norm(g, h, norm1, spec.rms_norm_eps, f"{q}/input_layernorm")
        a, _, _ = attention(g, spec, i, x, w, shared)
        h = g.op("Add", [h, a], f"{q}/attn_residual")
        x = rms_norm(g, h, norm2, spec.rms_norm_eps, f"{q}/post_attention_layernorm")
        h = g.op("Add", [h, mlp(g, i, x, w, shared)], f"{q}/mlp_residual")
    final = norm_weight("model.norm.weight")
    return rms_norm(g, h, final, spec.rms_norm_eps, "/model/norm")
