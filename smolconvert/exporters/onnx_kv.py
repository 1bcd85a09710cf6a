"""An int8 KV cache for the fused graph.

GroupQueryAttention can keep its cache as int8 with one static scale per (kv head, channel)
(`k_quant_type`/`v_quant_type` PER_CHANNEL, `kv_cache_bit_width` 8): it quantizes each new key and
value as it appends them (round to nearest, saturating) and reads the cache dequantized, in
prefill and decode alike. A decode step then moves a quarter of the cache's bytes. The scales
come from running the float-cache graph itself in onnxruntime on the built-in calibration text:

- values: the per-channel maximum |v| over the calibration tokens;
- keys: the cache holds them after RoPE, which turns channel i and i + D/2 into each other by a
  position-dependent angle, so a per-channel maximum seen at the calibration positions can be
  exceeded at later ones. The pair's norm sqrt(k_i^2 + k_{i+D/2}^2) bounds both channels at every
  angle; its maximum over the calibration tokens is the scale of both (layers without RoPE keep
  the per-channel maximum).

It costs a little quality and speeds decoding up most at long contexts, where the cache is most
of the bytes a step reads; the figures, against a float cache and other scale choices, are in
docs/onnx.md (measured with benchmarks/onnx_vs_genai_builder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smolconvert.errors import ConfigError, MissingDependencyError, ValidationError
from smolconvert.model.spec import ModelSpec

QMAX = 127  # int8 levels used on each side (GroupQueryAttention saturates to [-128, 127])
CALIBRATION_CTX = 512  # tokens per calibration window (as GPTQ's)
CALIBRATION_WINDOWS = 16

KvScales = list[tuple[np.ndarray, np.ndarray]]  # per layer: k and v scales, (kv_heads, head_dim)


def calibration_windows(tokenizer: Any, text: str, spec: ModelSpec) -> list[list[int]]:
    """Consecutive windows of the calibration text's tokens, as many as fit (at most 16)."""
    ctx = min(CALIBRATION_CTX, spec.max_position_embeddings)
    ids = tokenizer.encode(text[: ctx * CALIBRATION_WINDOWS * 8])  # ~4 characters a token
    n = min(CALIBRATION_WINDOWS, len(ids) // ctx)
    if n == 0:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than one window")
    return [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


def cache_maxima(
    model_path: Path, windows: list[list[int]], spec: ModelSpec, threads: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, max |key| and max |value| per (kv head, channel) that the float-cache graph at
    `model_path` writes into its cache over `windows` (each a prefill from an empty cache)."""
    import os

    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError(
            "the int8 KV cache is calibrated in onnxruntime: pip install 'smolconvert[onnx]' "
            "(or export with --kv-cache float)"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    first = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    past_type = np.float16 if first.type == "tensor(float16)" else np.float32
    names = [(f"present.{i}.key", f"present.{i}.value") for i in range(spec.n_layers)]
    empty = np.zeros((1, spec.n_kv_heads, 0, spec.head_dim), past_type)
    maxima = [
        (np.zeros((spec.n_kv_heads, spec.head_dim)), np.zeros((spec.n_kv_heads, spec.head_dim)))
        for _ in range(spec.n_layers)
    ]
    for ids in windows:
        feed: dict[str, Any] = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
        }
        for i in range(spec.n_layers):
            feed[f"past_key_values.{i}.key"] = empty
            feed[f"past_key_values.{i}.value"] = empty
        out = session.run([n for pair in names for n in pair], feed)
        for i, (k_max, v_max) in enumerate(maxima):
            k, v = out[2 * i][0], out[2 * i + 1][0]  # (kv_heads, T, D)
            np.maximum(k_max, np.abs(k).max(axis=1), out=k_max)
            np.maximum(v_max, np.abs(v).max(axis=1), out=v_max)
    return maxima


def kv_scales(maxima: list[tuple[np.ndarray, np.ndarray]], spec: ModelSpec) -> KvScales:
    """The int8 scales from the cache maxima: keys of RoPE layers by their rotation pair's norm
    (see the module doc), everything else by its own maximum. A channel never seen nonzero gets a
    tiny scale (its zeros stay exact)."""
    out: KvScales = []
    half = spec.head_dim // 2
    for i, (k_max, v_max) in enumerate(maxima):
        if spec.rope_layers[i]:
            pair = np.sqrt(k_max[:, :half] ** 2 + k_max[:, half:] ** 2)
            k_max = np.concatenate([pair, pair], axis=1)
        k_scale = (np.maximum(k_max, 1e-6) / QMAX).astype(np.float32)
        v_scale = (np.maximum(v_max, 1e-6) / QMAX).astype(np.float32)
        out.append((k_scale, v_scale))
    return out


def quantize_kv_cache(proto: Any, scales: KvScales) -> None:
    """Give the fused graph `proto` an int8 KV cache in place: past/present tensors become int8,
    each GroupQueryAttention gets its layer's scales as (1, kv_heads, 1, head_dim) initializers and
    the PER_CHANNEL quantization attributes."""
    from onnx import TensorProto, helper, numpy_helper

    for info in [*proto.graph.input, *proto.graph.output]:
        if info.name.startswith(("past_key_values.", "present.")):
            info.type.tensor_type.elem_type = TensorProto.INT8
    layers = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    if len(layers) != len(scales):
        raise ValidationError(
            f"int8 KV cache: {len(scales)} layers of scales for {len(layers)} GroupQueryAttention "
            "nodes (the cache is quantized on the fused graph only)"
        )
    for node, (k_scale, v_scale) in zip(layers, scales, strict=True):
        prefix = node.name.rsplit("/", 1)[0]  # /model/layers.N/self_attn
        names = (f"{prefix}/k_cache_scale", f"{prefix}/v_cache_scale")
        for name, scale in zip(names, (k_scale, v_scale), strict=True):
            proto.graph.initializer.append(numpy_helper.from_array(scale[None, :, None, :], name))
        # inputs 9-11 (position_ids, attention_bias, head_sink) stay absent; 12-13 are the scales
        inputs = [*node.input, *[""] * (12 - len(node.input)), *names]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )


def stored_cache_scales(model_path: Path) -> KvScales | None:
    """The int8 cache scales a graph written by export_onnx holds, per layer as (kv_heads,
    head_dim) arrays; None for a float cache."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path), load_external_data=False)
    init = {i.name: i for i in proto.graph.initializer if i.name.endswith("_cache_scale")}
    if not init:
        return None
    out = []
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            k, v = (numpy_helper.to_array(init[node.input[j]])[0, :, 0, :] for j in (12, 13))
            out.append((k, v))
    return out
