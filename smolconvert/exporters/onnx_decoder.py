"""The whole decoder as one ONNX graph: embedding, the layers (fused or plain), the head, and IO.

IO names are optimum's / Transformers.js': input_ids, attention_mask, position_ids (plain graph
only), past_key_values.N.key/value -> logits (fp32), present.N.key/value; one graph serves prefill
(empty past) and decode. A tied embedding is stored once and read by both ends of the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smolconvert.exporters.onnx_fused import fused_layers
from smolconvert.exporters.onnx_ops import (
    IR_VERSION,
    MS_DOMAIN,
    OPSET,
    ExternalData,
    Graph,
    Linear,
    Weights,
    add_linear,
    add_quantized,
    linear,
)
from smolconvert.exporters.onnx_plain import plain_layers
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names
from smolconvert.quantizers.onnx_recipes import OnnxScheme


def build_decoder(
    spec: ModelSpec,
    scheme: OnnxScheme,
    weights: Weights,
    fused: bool = True,
    external: ExternalData | None = None,
) -> tuple[Any, dict[str, str]]:
    """The ModelProto and {initializer: storage type}; every canonical weight of `spec` is
    written exactly once, as `weights` plans it.

    `fused`: the layers of onnx_fused.py (onnxruntime contrib ops, right-padded batches, no
    position_ids input); else those of onnx_plain.py (standard ops). `external`: the data file the
    weights are streamed to as they are built (the ModelProto then holds none of their bytes)."""
    from onnx import TensorProto, helper

    float_type = TensorProto.FLOAT16 if scheme.float_dtype == "float16" else TensorProto.FLOAT
    g = Graph(float_type, external=external)
    embed, lm_head = embedding_and_head(g, spec, weights, scheme.accuracy_level)
    layers = fused_layers if fused else plain_layers
    logits = lm_head(layers(g, spec, weights, scheme.accuracy_level, embed))
    if float_type != TensorProto.FLOAT:
        logits = g.op("Cast", [logits], "/lm_head/fp32", to=TensorProto.FLOAT)
    g.op("Identity", [logits], "logits")
    weights.check_written(canonical_names(spec))
    graph = helper.make_graph(
        g.nodes,
        "decoder",
        _inputs(spec, float_type, position_ids=not fused),
        _outputs(spec, float_type),
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="smolconvert",
        ir_version=IR_VERSION,
    )
    return model, g.tensor_types


def embedding_and_head(
    g: Graph, spec: ModelSpec, weights: Weights, accuracy_level: int
) -> tuple[str, Callable[[str], str]]:
    """The token embedding output and a function applying the lm_head. A tied embedding is stored
    once: float -> Gather + Gemm(transB) on the same tensor; quantized -> one packed buffer read by
    GatherBlockQuantized (rows) and MatMulNBits (the head), as onnxruntime-genai's builder does."""
    v, d = spec.vocab_size, spec.hidden_size
    name = "model.embed_tokens.weight"
    fmt = weights.format(name)
    if fmt is None:
        e = g.weight(name, weights.float32(name).astype(g.np_float, copy=False))
        embed = g.op("Gather", [e, "input_ids"], "/model/embed_tokens")
        tied_head = Linear((e,), v, d, None)
    else:
        qnames = add_quantized(g, name, weights.packed([name]))
        rows = g.op("Reshape", [qnames[0], g.const([v, -1])], "/model/embed_tokens/rows")
        inputs = [rows, "input_ids", qnames[1]] + list(qnames[2:])
        embed = g.op(
            "GatherBlockQuantized",
            inputs,
            "/model/embed_tokens",
            domain=MS_DOMAIN,
            bits=fmt.bits,
            block_size=fmt.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        if d % fmt.block_size:  # rows are dequantized whole, the zero padding included
            embed = g.op(
                "Slice",
                [embed, g.const([0]), g.const([d]), g.const([-1])],
                "/model/embed_tokens/unpad",
            )
        tied_head = Linear(qnames, v, d, fmt)
    if spec.tie_word_embeddings:
        head = tied_head
    elif weights.format("lm_head.weight") is None:  # (V, d) as stored, for Gemm(transB)
        w = weights.float32("lm_head.weight")
        head = Linear((g.weight("lm_head.weight", w.astype(g.np_float, copy=False)),), v, d, None)
        del w
    else:
        head = add_linear(g, weights, "lm_head.weight")

    def apply(h: str) -> str:
        if head.format is not None:
            return linear(g, h, head, "/lm_head", accuracy_level)
        # (V, d) stored as is: Gemm(transB) on (B*T, d) rows, reshaped back to (B, T, V).
        flat = g.op("Reshape", [h, g.const([-1, d])], "/lm_head/rows")
        y = g.op("Gemm", [flat, head.inputs[0]], "/lm_head/gemm", transB=1)
        shape = g.op(
            "Concat",
            [g.op("Shape", ["input_ids"], "/lm_head/bt"), g.const([v])],
            "/lm_head/shape",
            axis=0,
        )
        return g.op("Reshape", [y, shape], "/lm_head")

    return embed, apply


def _inputs(spec: ModelSpec, float_type: int, position_ids: bool) -> list[Any]:
    from onnx import TensorProto, helper

    out = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    if position_ids:
        out.append(
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            )
        )
    return out + _kv_cache(spec, float_type, "past_key_values", "past_sequence_length")


def _outputs(spec: ModelSpec, float_type: int) -> list[Any]:
    from onnx import TensorProto, helper

    out = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab_size]
        )
    ]
    return out + _kv_cache(spec, float_type, "present", "total_sequence_length")


def _kv_cache(spec: ModelSpec, float_type: int, prefix: str, length: str) -> list[Any]:
    """{prefix}.N.key/value value infos, (batch, kv_heads, `length`, head_dim) per layer."""
    from onnx import helper

    shape: list[str | int] = ["batch_size", spec.n_kv_heads, length, spec.head_dim]
    return [
        helper.make_tensor_value_info(f"{prefix}.{i}.{kind}", float_type, shape)
        for i in range(spec.n_layers)
        for kind in ("key", "value")
    ]
