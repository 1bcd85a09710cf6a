"""ONNX export: one KV-cache decoder graph in fp32, fp16, int8 or int4, laid out for
Transformers.js (`onnx/model*.onnx` named by dtype, plus config/tokenizer files) or for
onnxruntime-genai (`model.onnx` + `genai_config.json`).

Quantize, then build: every quantized weight is computed first (onnx_weights.py; schemes in
quantizers/onnx_recipes.py, MatMulNBits codecs in quantizers/nbits.py), then the graph is laid out
(onnx_decoder.py over onnx_ops.py, with the layers of onnx_fused.py or onnx_plain.py) while its
weights stream to the data file. A tied embedding is stored once as a packed buffer shared by
GatherBlockQuantized and the MatMulNBits lm_head. Both layouts carry a genai_config.json, so one
Transformers.js folder also runs in onnxruntime-genai.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import ConfigError, MissingDependencyError
from smolconvert.exporters.onnx_ops import IR_VERSION, OPSET
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.options import OnnxOptions
from smolconvert.quantizers.nbits import FORMATS
from smolconvert.quantizers.onnx_recipes import SCHEMES, OnnxScheme, codec_plan, kv_hessians

INSTALL_HINT = "pip install 'smolconvert[onnx]'"
# Options (smolconvert/options.py OnnxOptions): the plain graph's cache is always float; an int8
# cache needs the fused graph of a float32-compute scheme (exporters/onnx_kv.py).
LAYOUT_NOTE = (
    "optimum/Transformers.js decoder IO (model.onnx with past_key_values, 2025); "
    "onnxruntime-genai 0.18 genai_config.json"
)
# Transformers.js file name per dtype (transformers.js src/utils/dtypes.js, v3/v4).
TJS_FILES = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_quantized.onnx",
    "int4": "model_q4.onnx",
}
TJS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}
# Weights always go to an external data file beside the graph (as the genai builder writes them):
# protobuf refuses files over 2 GiB, and onnxruntime holds a graph with inline weights twice after
# prepacking them (the default model's fp32 decodes at a peak RSS of 949 MB inline against 752 MB
# with external data; benchmarks/onnx_vs_genai_builder.py prints the peaks). Tensors under this
# many bytes (shapes, scalars) stay inline.
EXTERNAL_DATA_MIN_BYTES = 1024
# The oldest versions we ran these files in (tests/exporters/test_onnx.py); older may work (opset 21
# needs onnxruntime >= 1.20; MatMulNBits accuracy_level 4 needs its int8 kernel, or runs slowly).
MIN_RUNTIME = {
    "onnxruntime": "1.30",
    "onnxruntime-genai": "0.18",
    "onnxruntime-node (Transformers.js 4.x)": "1.30",
}


def describe_schemes() -> list[dict[str, Any]]:
    out = []
    for name, s in sorted(SCHEMES.items()):
        default = s.recipe.default
        float_bits = 16.0 if s.float_dtype == "float16" else 32.0
        out.append(
            {
                "target": f"onnx:{name}",
                "bits_per_weight": FORMATS[default].bits_per_weight if default else float_bits,
                "mixture": [f"{x.role}->{x.codec}" for x in s.recipe.rules]
                + ([f"default->{default}"] if default else [])
                + (["kv_cache->int8"] if s.kv_cache == "int8" else []),
                "float_dtype": s.float_dtype,
                "kv_cache": _cache_dtype(s.kv_cache, s),
                "transformers_js_dtype": TJS_DTYPES[name],
                "file": TJS_FILES[name],
            }
        )
    return out


def export_onnx(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: OnnxOptions | None = None,
) -> A.Artifact:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(f"ONNX export needs onnx: {INSTALL_HINT}") from None
    from smolconvert.exporters.onnx_decoder import build_decoder
    from smolconvert.exporters.onnx_ops import ExternalData, Weights
    from smolconvert.exporters.onnx_weights import quantize_weights

    opts = options or OnnxOptions()
    layout: str = opts.layout
    graph: str = opts.graph
    chosen = SCHEMES[scheme]
    spec = model.spec
    gptq_mode = None  # what GPTQ ran as: per-head, pooled or off; None when the scheme has none
    if chosen.gptq:
        gptq_mode = "off" if opts.gptq == "off" else kv_hessians(opts.gptq, spec.n_kv_heads)
        chosen = replace(chosen, gptq=gptq_mode != "off")
    kv_cache = _kv_cache(chosen, graph, opts.kv_cache)
    cache_dtype = _cache_dtype(kv_cache, chosen)
    step = progress.Steps(quiet)
    plan = codec_plan(chosen.recipe, spec)
    quantized, calibration = quantize_weights(
        model, plan, step, gptq=chosen.gptq, kv_hessians=gptq_mode or "per-head"
    )

    def fetch(name: str) -> np.ndarray:
        return model.weights.get(name).float().numpy()

    weights = Weights(fetch, plan, quantized)
    del quantized  # `weights` gives each up as it is packed
    rel = f"onnx/{TJS_FILES[scheme]}" if layout == "transformers.js" else "model.onnx"
    with A.staging(out) as stage:
        path = stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # the names each client looks for: Transformers.js model.onnx_data, the builder's .data
        data = path.with_name(path.name + ("_data" if layout == "transformers.js" else ".data"))
        step(
            f"building the {scheme} {graph} decoder graph ({spec.n_layers} layers), "
            f"its weights streamed to {data.name}"
        )
        # Each weight goes to the data file as it is laid out: the graph protobuf holds references
        # only, so the export never holds the model's bytes twice (DESIGN: one copy at most).
        with ExternalData(data, EXTERNAL_DATA_MIN_BYTES) as external:
            proto, tensor_types = build_decoder(
                spec, chosen, weights, fused=graph == "fused", external=external
            )
        del weights
        step(f"writing {rel}")
        onnx.save_model(proto, str(path))
        data.chmod(path.stat().st_mode & 0o777)  # as the graph's (onnx made its own file 0600)
        kv_meta = None
        if kv_cache == "int8":
            step("calibrating the int8 KV cache in onnxruntime")
            kv_meta = _int8_kv_cache(model, proto, path)
        del proto
        _write_side_files(stage, model, scheme, rel, graph == "fused", cache_dtype)
        meta = {
            "format": "onnx",
            "target": "onnx",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": rel, "genai_config": "genai_config.json"},
            "tensor_types": tensor_types,
            "options": {"layout": layout, "graph": graph, "kv_cache": kv_cache}
            | ({"gptq": gptq_mode} if gptq_mode else {}),
            "recipe": _describe_scheme(chosen),
            "imatrix": None,  # GPTQ (below) takes whole Hessians, not the diagonal an imatrix holds
            "calibration": calibration,
            "kv_cache": kv_meta or {"dtype": cache_dtype},
            "layout": f"{layout}: {LAYOUT_NOTE}",
            "opset": {"ai.onnx": OPSET, "com.microsoft": 1, "ir_version": IR_VERSION},
            "tool_versions": A.tool_versions("onnx", "numpy", "torch"),
            "min_runtime": MIN_RUNTIME,
        }
        meta = A.finish(stage, meta)
    return A.Artifact(out, meta)


def _kv_cache(scheme: OnnxScheme, graph: str, wanted: str) -> str:
    """The cache kind to build: "auto" resolves to the scheme's on the fused graph."""
    if wanted == "auto":
        return scheme.kv_cache if graph == "fused" else "float"
    if wanted == "int8" and (graph != "fused" or scheme.float_dtype != "float32"):
        raise ConfigError(
            "kv_cache=int8 needs the fused graph of a float32-compute scheme (fp32, int8, int4): "
            "it is GroupQueryAttention's quantized cache"
        )
    return wanted


def _cache_dtype(kv_cache: str, scheme: OnnxScheme) -> str:
    """The KV cache's element type: int8 for an int8 cache, else the scheme's float type."""
    return "int8" if kv_cache == "int8" else scheme.float_dtype


def _int8_kv_cache(model: CanonicalModel, proto: Any, path: Path) -> dict[str, Any]:
    """Calibrate the cache scales on the float-cache graph just written at `path`, then rewrite
    it with an int8 cache (exporters/onnx_kv.py)."""
    import onnx

    from smolconvert.exporters.onnx_kv import (
        cache_maxima,
        calibration_windows,
        kv_scales,
        quantize_kv_cache,
    )
    from smolconvert.texts import default_calibration_text

    text = default_calibration_text()
    windows = calibration_windows(model.tokenizer, text.text, model.spec)
    quantize_kv_cache(proto, kv_scales(cache_maxima(path, windows, model.spec), model.spec))
    # `proto` holds references to the data file, which stays as it is: this save rewrites the
    # graph and keeps the small scales inline.
    onnx.save_model(proto, str(path))
    return {
        "dtype": "int8",
        "scales": "per (kv head, channel), static: max |value|; keys by the max norm of their "
        "RoPE channel pair (exporters/onnx_kv.py)",
        "text_name": text.name,
        "text_sha256": text.sha256,
        "tokens": sum(len(w) for w in windows),
    }


def _describe_scheme(scheme: OnnxScheme) -> dict[str, Any]:
    recipe = scheme.recipe
    return {
        "float_dtype": scheme.float_dtype,
        "accuracy_level": scheme.accuracy_level,
        "gptq": scheme.gptq,
        "default": recipe.default,
        "rules": {r.role: r.codec for r in recipe.rules},
        "codecs": {
            name: {
                "bits": FORMATS[name].bits,
                "block_size": FORMATS[name].block_size,
                "zero_point": FORMATS[name].zero_point,
                "bits_per_weight": FORMATS[name].bits_per_weight,
            }
            for name in sorted(recipe.codecs())
        },
    }


def _write_side_files(
    stage: Path,
    model: CanonicalModel,
    scheme: str,
    rel: str,
    fused: bool,
    cache_dtype: str,
) -> None:
    """config.json (+ transformers.js_config), generation_config.json, tokenizer files and
    genai_config.json pointing at the graph by its relative path."""
    spec = model.spec
    config = spec.to_hf_config()
    config["transformers.js_config"] = {
        "dtype": TJS_DTYPES[scheme],
        "use_external_data_format": True,
        "kv_cache_dtype": {TJS_DTYPES[scheme]: cache_dtype},
    }
    A.write_json(stage / "config.json", config)
    A.write_json(stage / "generation_config.json", _generation(spec))
    model.tokenizer.save(stage)
    A.write_json(stage / "genai_config.json", genai_config(spec, rel, fused))


def _generation(spec: ModelSpec) -> dict[str, Any]:
    ids = {
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def genai_config(spec: ModelSpec, filename: str, fused: bool) -> dict[str, Any]:
    """onnxruntime-genai's config (keys as its model builder writes them, v0.18). The fused graph's
    GroupQueryAttention writes in place into one max-length buffer per layer, so past and present
    share it; the plain graph concatenates past and new keys, so they cannot.

    `intra_op_num_threads: 0` hands the thread count to onnxruntime, which counts physical cores.
    Left unset (as the builder leaves it), genai takes half the logical CPUs, which assumes two
    hyperthreads per core: on a machine without them (Apple silicon, phones, many cloud VMs) it
    decodes on half the cores (measured on a 2-core VM: fp32 decode at 29 tokens/s against 45)."""
    eos = spec.eos_token_id if spec.eos_token_id is not None else 0
    inputs = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        **({} if fused else {"position_ids": "position_ids"}),
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos,
            "context_length": spec.max_position_embeddings,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [],
                    "intra_op_num_threads": 0,
                },
                "filename": filename,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else eos,
            "type": spec.architecture,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": fused,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
