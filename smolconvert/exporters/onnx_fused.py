"""The decoder layers with onnxruntime's fused contrib ops (the "fused" graph, the default).

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm in one kernel), one projection
for q/k/v packed along N (two, concatenated, when k and v keep more bits than q),
GroupQueryAttention (RoPE from cos/sin tables, the KV cache append, GQA and softmax in one
kernel), one projection for gate/up, and the down projection. That is the shape of the
onnxruntime-genai builder's CPU graph; the plain graph (onnx_plain.py) needs ~3x the nodes,
and at decode time node overhead is most of the work (measured in
benchmarks/onnx_vs_genai_builder.py).

GroupQueryAttention takes positions from the attention mask (seqlens_k = mask sum - 1): a
sequence's tokens are its first seqlens_k + 1 cache rows, so batches are right-padded or unpadded,
as for every onnxruntime-genai model. The graph therefore has no position_ids input; the plain
graph keeps it for left-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smolconvert.exporters.onnx_ops import MS_DOMAIN, Graph, Linear, Weights, add_linear, linear
from smolconvert.model.spec import ModelSpec
from smolconvert.quantizers.onnx_recipes import codec_runs


@dataclass(frozen=True)
class GqaInputs:
    seqlens_k: str  # (B,) int32: tokens in the cache after this step, minus one
    total: str  # () int32: the mask's length
    cos: str  # (max positions, D/2) in the graph's float type, folded to a constant at load
    sin: str


def gqa_inputs(g: Graph, spec: ModelSpec) -> GqaInputs:
    from onnx import TensorProto

    mask_sum = g.op("ReduceSum", ["attention_mask", g.const([1])], "/gqa/mask_sum", keepdims=0)
    seqlens = g.op("Sub", [mask_sum, g.const(1)], "/gqa/seqlens_k64")
    seqlens = g.op("Cast", [seqlens], "/gqa/seqlens_k", to=TensorProto.INT32)
    total = g.op("Shape", ["attention_mask"], "/gqa/total64", start=1, end=2)
    total = g.op("Squeeze", [g.op("Cast", [total], "/gqa/total1", to=TensorProto.INT32)], "/gqa/S")
    # cos/sin tables from a few constants: onnxruntime folds them once at session load, so the
    # file does not carry max_position_embeddings * head_dim floats.
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    positions = g.op(
        "Range",
        [
            g.const(0.0, np.float32),
            g.const(float(spec.max_position_embeddings), np.float32),
            g.const(1.0, np.float32),
        ],
        "/gqa/positions",
    )
    freqs = g.op(
        "Mul",
        [
            g.op("Unsqueeze", [positions, g.const([1])], "/gqa/positions2"),
            g.const(inv_freq[None], np.float32),
        ],
        "/gqa/freqs",
    )
    cos, sin = g.op("Cos", [freqs], "/gqa/cos32"), g.op("Sin", [freqs], "/gqa/sin32")
    if g.np_float is not np.float32:
        cos = g.op("Cast", [cos], "/gqa/cos", to=g.float_type)
        sin = g.op("Cast", [sin], "/gqa/sin", to=g.float_type)
    return GqaInputs(seqlens, total, cos, sin)


def _packed(g: Graph, weights: Weights, name: str, parts: list[str]) -> list[tuple[str, Linear]]:
    """Projections for several weights that read the same input: one per run of parts with one
    codec, stacked along N (rows), as (node name, Linear). Quantization is per row block, so this
    stores exactly what separate projections would. One run is stored as `name` (e.g.
    `...self_attn.qkv_proj`); several by their parts (`...self_attn.q_proj.weight` and
    `...self_attn.kv_proj` when k and v keep more bits than q)."""
    runs = codec_runs(weights.plan, parts)
    out = []
    for _, run in runs:
        kinds = [p.split(".")[-2].removesuffix("_proj") for p in run]  # "q", "gate", ...
        short = ("".join(kinds) if all(len(k) == 1 for k in kinds) else "_".join(kinds)) + "_proj"
        if len(runs) == 1:
            stored = name
        else:
            stored = run[0] if len(run) == 1 else f"{run[0].rsplit('.', 2)[0]}.{short}"
        out.append((short, add_linear(g, weights, stored, run)))
    return out


def _projected(g: Graph, x: str, runs: list[tuple[str, Linear]], prefix: str, acc: int) -> str:
    """The runs of one packed projection applied to x, concatenated along the last axis."""
    outs = [linear(g, x, lin, f"{prefix}/{short}", acc) for short, lin in runs]
    return outs[0] if len(outs) == 1 else g.op("Concat", outs, f"{prefix}/packed", axis=-1)


def fused_layers(
    g: Graph, spec: ModelSpec, weights: Weights, accuracy_level: int, embed: str
) -> str:
    """All decoder layers and the final norm: embeddings (B, T, d) -> normed hidden states."""
    nh, kv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
    acc = accuracy_level
    gi = gqa_inputs(g, spec)

    def norm_weight(name: str) -> str:
        return g.weight(name, weights.float32(name).astype(g.np_float))

    first = norm_weight("model.layers.0.input_layernorm.weight")
    x = g.op(  # onnxruntime's RMSNorm kernel (stash_type 1: fp32 statistics for fp16 graphs)
        "SimplifiedLayerNormalization",
        [embed, first],
        "/model/layers.0/input_layernorm",
        axis=-1,
        epsilon=spec.rms_norm_eps,
        stash_type=1,
    )
    residual = embed
    for i in range(spec.n_layers):
        p, q = f"model.layers.{i}", f"/model/layers.{i}"
        qkv_runs = _packed(
            g, weights, f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{t}_proj.weight" for t in "qkv"]
        )
        o_w = add_linear(g, weights, f"{p}.self_attn.o_proj.weight")
        post = norm_weight(f"{p}.post_attention_layernorm.weight")
        gate_up_runs = _packed(
            g,
            weights,
            f"{p}.mlp.gate_up_proj",
            [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
        )
        down_w = add_linear(g, weights, f"{p}.mlp.down_proj.weight")
        qkv = _projected(g, x, qkv_runs, f"{q}/self_attn", acc)
        rotary = spec.rope_layers[i]
        context = f"{q}/self_attn/gqa"
        g.op(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                gi.seqlens_k,
                gi.total,
                *((gi.cos, gi.sin) if rotary else ()),
            ],
            context,
            outputs=[context, f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=nh,
            kv_num_heads=kv,
            scale=float(d**-0.5),
            do_rotary=int(rotary),
            rotary_interleaved=0,
        )
        attn = linear(g, context, o_w, f"{q}/self_attn/o_proj", acc)
        name = f"{q}/post_attention_layernorm"
        x, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [attn, residual, post],
            name,
            outputs=[name, "", "", f"{q}/attn_residual"],
            domain=MS_DOMAIN,
            epsilon=spec.rms_norm_eps,
        )[::3]
        gate_up = _projected(g, x, gate_up_runs, f"{q}/mlp", acc)
        gate, up = g.op("Split", [gate_up], f"{q}/mlp/split", n_out=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{q}/mlp/sigmoid")], f"{q}/mlp/silu")
        mlp = linear(
            g,
            g.op("Mul", [act, up], f"{q}/mlp/act_up"),
            down_w,
            f"{q}/mlp/down_proj",
            acc,
        )
        last = i == spec.n_layers - 1
        gamma = norm_weight(
            "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        )
        name = "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm"
        x, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [mlp, residual, gamma],
            name,
            outputs=[name, "", "", "" if last else f"{q}/mlp_residual"],
            domain=MS_DOMAIN,
            epsilon=spec.rms_norm_eps,
        )[::3]
    return x
