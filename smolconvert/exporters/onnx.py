"""ONNX export: one KV-cache decoder graph (onnx_graph.py) in fp32, fp16, int8 or int4, laid out
for Transformers.js (`onnx/model*.onnx` named by dtype, plus config/tokenizer files) or for
onnxruntime-genai (`model.onnx` + `genai_config.json`).

Quantization is weight-only (onnx_quant.py): MatMulNBits for projections, a tied embedding stored
once as a packed buffer shared by GatherBlockQuantized and the MatMulNBits lm_head. Both layouts
carry a genai_config.json, so one Transformers.js folder also runs in onnxruntime-genai.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import ConfigError, MissingDependencyError
from smolconvert.exporters.onnx_graph import IR_VERSION, OPSET
from smolconvert.exporters.onnx_quant import (
    CODECS,
    RECIPES,
    QuantizedWeight,
    Recipe,
    codec_runs,
    dequantize,
    quantize,
    split_rows,
)
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape

INSTALL_HINT = "pip install 'smolconvert[onnx]'"
# graph: "fused" = onnxruntime contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization,
# packed projections; right-padded batches, no position_ids input), "plain" = standard ops only
# (position_ids honoured, left padding works). kv_cache: "auto" = the scheme's (int8 for int8 and
# int4, float otherwise; the plain graph's cache is always float), "float", or "int8" (fused graph
# of a float32-compute scheme; exporters/onnx_kv.py). Defaults are the first values.
OPTIONS: dict[str, tuple[str, ...]] = {
    "layout": ("transformers.js", "genai"),
    "graph": ("fused", "plain"),
    "kv_cache": ("auto", "float", "int8"),
    # GPTQ's cost grows with (heads + kv heads) x hidden^2 per layer (per-kv-head Hessians): at
    # SmolLM2-1.7B (32 kv heads) it runs for hours on 2 cores; "off" rounds to nearest with the
    # codec's scale search instead (docs/scaling.md has both).
    "gptq": ("auto", "off"),
}
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
    for name, r in sorted(RECIPES.items()):
        linear = r.codec_for("linear")
        bpw = linear.bits_per_weight if linear else (16.0 if r.float_dtype == "float16" else 32.0)
        out.append(
            {
                "target": f"onnx:{name}",
                "bits_per_weight": bpw,
                "mixture": [f"{x.role}->{x.codec}" for x in r.rules]
                + (["kv_cache->int8"] if r.kv_cache == "int8" else []),
                "float_dtype": r.float_dtype,
                "kv_cache": _cache_dtype(r.kv_cache, r),
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
    options: dict[str, str] | None = None,
) -> A.Artifact:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(f"ONNX export needs onnx: {INSTALL_HINT}") from None
    from smolconvert.exporters.onnx_graph import ExternalData, build_decoder

    layout = (options or {}).get("layout", OPTIONS["layout"][0])
    graph = (options or {}).get("graph", OPTIONS["graph"][0])
    recipe = RECIPES[scheme]
    gptq_option = (options or {}).get("gptq", OPTIONS["gptq"][0])
    if gptq_option == "off":
        recipe = replace(recipe, gptq=False)
    spec = model.spec
    kv_cache = _kv_cache(recipe, graph, (options or {}).get("kv_cache", OPTIONS["kv_cache"][0]))
    cache_dtype = _cache_dtype(kv_cache, recipe)
    step = progress.Steps(quiet)
    names = set(canonical_names(spec))

    def fetch(name: str) -> np.ndarray:
        names.discard(name)
        return model.weights.get(name).float().numpy()

    quantized, calibration = {}, None
    if recipe.gptq:
        step(f"GPTQ over {spec.n_layers} layers on calibration text")
        quantized, calibration = _gptq(model, recipe)
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
        # Each weight goes to the data file as it is built: the graph protobuf holds references
        # only, so the export never holds the model's bytes at all (DESIGN: one copy at most).
        with ExternalData(data, EXTERNAL_DATA_MIN_BYTES) as external:
            proto, tensor_types = build_decoder(
                spec, fetch, recipe, fused=graph == "fused", quantized=quantized, external=external
            )
        assert not names, f"tensors never written: {sorted(names)}"
        del quantized
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
            | ({"gptq": "off"} if gptq_option == "off" else {}),
            "recipe": _describe_recipe(recipe),
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


def _kv_cache(recipe: Recipe, graph: str, wanted: str) -> str:
    """The cache kind to build: "auto" resolves to the recipe's on the fused graph."""
    if wanted == "auto":
        return recipe.kv_cache if graph == "fused" else "float"
    if wanted == "int8" and (graph != "fused" or recipe.float_dtype != "float32"):
        raise ConfigError(
            "kv_cache=int8 needs the fused graph of a float32-compute scheme (fp32, int8, int4): "
            "it is GroupQueryAttention's quantized cache"
        )
    return wanted


def _cache_dtype(kv_cache: str, recipe: Recipe) -> str:
    """The KV cache's element type: int8 for an int8 cache, else the recipe's float type."""
    return "int8" if kv_cache == "int8" else recipe.float_dtype


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


def _gptq(
    model: CanonicalModel, recipe: Recipe
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Every quantized tensor of `recipe` by sequential GPTQ on the built-in calibration text (the
    half of pydoc's topics that the default evaluation never reads)."""
    import torch

    from smolconvert.quantizers.gptq import DAMP, Segments, sequential_gptq
    from smolconvert.texts import default_calibration_text

    text = default_calibration_text()
    done: dict[str, QuantizedWeight] = {}

    def quantize_group(
        parts: Sequence[str], ws: list[np.ndarray], hessians: list[Segments]
    ) -> dict[str, torch.Tensor]:
        """Parts that read one input, each on its Hessian segments; GPTQ is per row, so each run
        of one codec is quantized as one stacked weight."""
        weights = dict(zip(parts, ws, strict=True))
        segments = dict(zip(parts, hessians, strict=True))
        out: dict[str, torch.Tensor] = {}
        for codec, run in codec_runs(recipe, list(parts)):
            if codec is None:
                continue
            rows = [len(weights[p]) for p in run]
            stacked = np.concatenate([weights[p] for p in run], axis=0)
            qw = quantize(stacked, codec, [s for p in run for s in segments[p]])
            done.update(zip(run, split_rows(qw, rows), strict=True))
            deq = np.split(dequantize(qw), np.cumsum(rows)[:-1])
            out.update({p: torch.from_numpy(d) for p, d in zip(run, deq, strict=True)})
        return out

    tokens = sequential_gptq(model, text.text, quantize_group)
    meta = {
        "method": "gptq",
        "order": "act (descending Hessian diagonal), static block grids",
        "scales": "least-squares refit on the Hessian after the levels",
        "hessians": "k and v per kv head, weighed by attention (gptq.attention_hessians)",
        "damp": DAMP,
        "text_name": text.name,
        "text_sha256": text.sha256,
        "tokens": tokens,
    }
    return done, meta


def _describe_recipe(recipe: Recipe) -> dict[str, Any]:
    return {
        "float_dtype": recipe.float_dtype,
        "accuracy_level": recipe.accuracy_level,
        "gptq": recipe.gptq,
        "rules": {r.role: r.codec for r in recipe.rules},
        "codecs": {
            r.codec: {
                "bits": CODECS[r.codec].bits,
                "block_size": CODECS[r.codec].block_size,
                "zero_point": CODECS[r.codec].zero_point,
                "bits_per_weight": CODECS[r.codec].bits_per_weight,
            }
            for r in recipe.rules
            if r.codec
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


def _stored(name: str, init: dict[str, np.ndarray]) -> bool:
    return name in init or f"{name}.qweight" in init


def stored_weights(model_path: Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The canonical float32 weights a graph written by export_onnx holds, read back from the file
    and dequantized (packed q/k/v and gate/up split again): what onnxruntime multiplies by."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path))
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Reshape"}
    kernels = {}  # qweight name -> (bits, block_size), from MatMulNBits / GatherBlockQuantized
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            data = node.input[1]
        elif node.op_type == "GatherBlockQuantized":  # reads the buffer reshaped to rows
            data = alias.get(node.input[0], node.input[0])
        else:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        kernels[data] = (attrs["bits"], attrs["block_size"])

    def dequantized(prefix: str, shape: tuple[int, int]) -> np.ndarray:
        bits, block_size = kernels[f"{prefix}.qweight"]
        zp = init.get(f"{prefix}.zero_points")
        codec = CODECS[f"int{bits}_b{block_size}_{'none' if zp is None else 'uint8'}"]
        qw = QuantizedWeight(codec, shape, init[f"{prefix}.qweight"], init[f"{prefix}.scales"], zp)
        return dequantize(qw)

    # packed projections of the fused graph: canonical parts stacked along N, in this order
    packs = {
        "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "self_attn.qk_proj": ("q_proj", "k_proj"),  # when v has its own codec
        "self_attn.kv_proj": ("k_proj", "v_proj"),  # when q has its own codec
        "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    }
    out: dict[str, np.ndarray] = {}
    for name in canonical_names(spec):
        if name in init:  # float: projections are stored (K, N) for MatMul
            w = init[name].astype(np.float32)
            out[name] = w.T if name.endswith("proj.weight") else w
        elif f"{name}.qweight" in init:
            out[name] = dequantized(name, expected_shape(spec, name))  # type: ignore[arg-type]
        elif name not in out:  # a part of a packed projection
            layer, kind = name.split(".")[2], name.split(".")[-2]
            pack, kinds = next(
                (p, k)
                for p, k in packs.items()
                if kind in k and _stored(f"model.layers.{layer}.{p}", init)
            )
            parts = [f"model.layers.{layer}.{pack.split('.')[0]}.{k}.weight" for k in kinds]
            rows = [expected_shape(spec, p)[0] for p in parts]
            shape = (sum(rows), expected_shape(spec, name)[1])
            stored = f"model.layers.{layer}.{pack}"
            whole = (
                init[stored].astype(np.float32).T  # float, (K, N) for MatMul
                if stored in init
                else dequantized(stored, shape)
            )
            out.update(zip(parts, np.split(whole, np.cumsum(rows)[:-1]), strict=True))
    return {n: out[n] for n in canonical_names(spec)}
