"""MLC-ready export: what `mlc_llm convert_weight` + `mlc_llm gen_config` write for a Llama model.

A tensor cache (tensor-cache.json, plus ndarray-cache.json for older MLC runtimes, and
params_shard_N.bin) under MLC's Llama parameter names (fused qkv_proj and gate_up_proj), group
quantized by quantizers/group.py, then mlc-chat-config.json and the tokenizer files. The compiled
model library is not built here: `mlc_llm compile` (or MLC's JIT) makes it from these files.
Layout follows mlc-llm at commit 01ced331 (model/llama/llama_model.py, quantization/*.py,
interface/convert_weight.py) and TVM 0.27 `tvm.contrib.tvmjs.dump_tensor_cache`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import UnsupportedError
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.quantizers import group

OPTIONS: dict[str, tuple[str, ...]] = {"mlc_scales": group.SCALE_MODES}
LAYOUT_NOTE = (
    "mlc-llm @ 01ced331 (model/llama/llama_model.py, quantization/group_quantization.py, "
    "interface/convert_weight.py, interface/gen_config.py); tensor cache as TVM 0.27 "
    "tvmjs.dump_tensor_cache (f32-to-bf16, 32 MiB shards)"
)
UNQUANTIZED = {"q0f16": "float16", "q0f32": "float32"}  # mlc-llm NoQuantize entries
SCHEMES = (*UNQUANTIZED, *group.GROUP_CONFIGS)
SHARD_CAP_BYTES = 32 << 20
CACHE_FILES = ("tensor-cache.json", "ndarray-cache.json")  # TVM >= 0.22 name, then the older one


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


# ----------------------------------------------------------------------------- tensor cache


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


class TensorCacheWriter:
    """TVM's TensorCacheShardingManager rule: a shard is committed when adding a tensor would
    reach the cap; a tensor of at least half the cap goes alone into its own shard at once.

    Streams: each tensor's bytes go to disk as they come (`add_chunks`), into a temporary file
    per open shard, md5 computed on the way; a shard gets its params_shard_N.bin name when it is
    committed, so the numbering is TVM's even when a lone tensor overtakes the open shard."""

    def __init__(self, folder: Path, cap: int = SHARD_CAP_BYTES) -> None:
        self.folder, self.cap = folder, cap
        self.shards: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self._open: tuple[BinaryIO, Any, Path] | None = None  # (file, md5, temporary path)
        self.n_params = 0
        self.param_bytes = 0

    def add(self, name: str, array: NDArray) -> None:
        self.add_chunks(name, tuple(array.shape), str(array.dtype), [array])

    def add_chunks(
        self, name: str, shape: tuple[int, ...], dtype: str, chunks: Iterable[NDArray]
    ) -> None:
        """One tensor of `shape` and `dtype`, given as consecutive row blocks (C order)."""
        size = math.prod(shape)
        self.n_params += 1
        self.param_bytes += size * np.dtype(dtype).itemsize
        nbytes = size * (2 if dtype == "float32" else np.dtype(dtype).itemsize)  # f32 as bf16
        rec = {
            "name": name,
            "shape": list(shape),
            "dtype": dtype,
            "format": "f32-to-bf16",
            "nbytes": nbytes,
        }
        if self.pending_bytes + nbytes >= self.cap:
            if 2 * nbytes >= self.cap:
                alone = self._new_file(f".{self._next_path()}.tmp")
                self._write(alone, chunks, dtype, nbytes)
                self._close(alone, nbytes, [dict(rec, byteOffset=0)])
                return
            self.commit()
        if self._open is None:
            self._open = self._new_file(".params_shard_open.tmp")
        self.pending.append(dict(rec, byteOffset=self.pending_bytes))
        self._write(self._open, chunks, dtype, nbytes)
        self.pending_bytes += nbytes

    def commit(self) -> None:
        if self._open is not None and self.pending_bytes:
            self._close(self._open, self.pending_bytes, self.pending)
            self._open, self.pending, self.pending_bytes = None, [], 0

    def _next_path(self) -> str:
        return f"params_shard_{len(self.shards)}.bin"

    def _new_file(self, name: str) -> tuple[BinaryIO, Any, Path]:
        tmp = self.folder / name
        return open(tmp, "wb"), hashlib.md5(), tmp  # noqa: SIM115 - closed in _close

    @staticmethod
    def _write(
        out: tuple[BinaryIO, Any, Path], chunks: Iterable[NDArray], dtype: str, nbytes: int
    ) -> None:
        fh, md5, _ = out
        written = 0
        try:
            for chunk in chunks:
                assert str(chunk.dtype) == dtype, (chunk.dtype, dtype)
                data = f32_to_bf16(chunk) if dtype == "float32" else np.ascontiguousarray(chunk)
                view = memoryview(data).cast("B")
                fh.write(view)
                md5.update(view)
                written += len(view)
            assert written == nbytes, f"tensor gave {written} bytes, its shape says {nbytes}"
        except BaseException:
            fh.close()  # the staging folder, temporary file included, is removed by the caller
            raise

    def _close(
        self, out: tuple[BinaryIO, Any, Path], nbytes: int, records: list[dict[str, Any]]
    ) -> None:
        fh, md5, tmp = out
        fh.close()
        path = self._next_path()
        os.replace(tmp, self.folder / path)
        self.shards.append(
            {
                "dataPath": path,
                "format": "raw-shard",
                "nbytes": nbytes,
                "records": records,
                "md5sum": md5.hexdigest(),
            }
        )

    def finish(self, total_params: int) -> list[str]:
        """Write the cache index under both names; returns the files written."""
        self.commit()
        meta = {
            "ParamSize": self.n_params,
            "ParamBytes": float(self.param_bytes),
            "BitsPerParam": self.param_bytes * 8.0 / total_params,
        }
        index = {"metadata": meta, "records": self.shards}
        written = []
        for name in CACHE_FILES:
            _write_json(self.folder / name, index, sort_keys=False)
            written.append(name)
        return written


def _write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=4, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- export


# Row block size for reading, quantizing and writing: every step is row-local (groups run
# along the input axis), so blocks give the same bytes as whole tensors while the float32
# temporaries of the quantizer stay a few tens of MB instead of ~10x the embedding table.
BLOCK_ELEMENTS = 1 << 20


def mlc_blocks(
    model: CanonicalModel,
    scheme: str,
    scale_mode: str = "mlc",
    imatrix: Imatrix | None = None,
    bar: Any = None,
    block_elements: int | None = None,
) -> Iterator[tuple[MLCParam, Iterator[NDArray]]]:
    """Each MLC parameter with an iterator over its row blocks, in plan order. A parameter's
    blocks must be consumed before asking for the next parameter (a q_scale is gathered while
    its q_weight's blocks are made); only one source tensor is held at a time."""
    params = plan(model.spec, scheme)
    cfg = group.GROUP_CONFIGS.get(scheme)
    dtype = np.dtype(model_dtype(scheme))
    # Scales of float32 schemes are stored bf16; the search judges them as stored.
    store = bf16_round if dtype == np.float32 else None
    block = block_elements or BLOCK_ELEMENTS

    def rows(p: MLCParam) -> Iterator[NDArray]:
        # Cast each source to the model dtype first, as MLC's loader does; fusion on axis 0 is
        # the sources' blocks one after another.
        for s in p.sources:
            src = model.weights.get(s)
            step = max(1, block // max(1, math.prod(src.shape[1:])))
            for r in range(0, src.shape[0], step):
                yield np.ascontiguousarray(src[r : r + step].float().numpy().astype(dtype))
            del src

    def q_weights(
        p: MLCParam, importance: NDArray[np.float32] | None, scales: list[NDArray]
    ) -> Iterator[NDArray]:
        for w in rows(p):
            q_weight, q_scale = group.quantize(w, cfg, scale_mode, importance, store)
            scales.append(q_scale)
            yield q_weight

    i = 0
    while i < len(params):
        p = params[i]
        if p.role == "weight":
            yield p, rows(p)
            i += 1
        else:
            importance = _importance(imatrix, p.sources) if scale_mode == "search" else None
            scales: list[NDArray] = []
            yield p, q_weights(p, importance, scales)
            yield params[i + 1], iter([np.concatenate(scales, axis=0)])
            i += 2
        if bar is not None:
            bar.update(1)


def mlc_tensors(
    model: CanonicalModel,
    scheme: str,
    scale_mode: str = "mlc",
    imatrix: Imatrix | None = None,
    bar: Any = None,
) -> Iterator[tuple[MLCParam, NDArray]]:
    """Each MLC parameter with its whole array (mlc_blocks joined), one fused tensor at a time."""
    for p, blocks in mlc_blocks(model, scheme, scale_mode, imatrix, bar):
        yield p, np.concatenate(list(blocks), axis=0)


def _importance(imatrix: Imatrix | None, sources: tuple[str, ...]) -> NDArray[np.float32] | None:
    if imatrix is None:
        return None
    vectors = [v for v in (imatrix.get(s) for s in sources) if v is not None]
    return np.mean(vectors, axis=0).astype(np.float32) if vectors else None


def export_mlc(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: dict[str, str] | None = None,
) -> A.Artifact:
    options = {k: v[0] for k, v in OPTIONS.items()} | dict(options or {})
    scale_mode = options["mlc_scales"]
    if scheme not in SCHEMES:
        raise UnsupportedError(f"unknown MLC scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    spec = model.spec
    params = plan(spec, scheme)
    if scale_mode == "search" and scheme in UNQUANTIZED:
        scale_mode = "mlc"  # nothing to search in an unquantized scheme
    step = progress.Steps(quiet)
    with A.staging(out) as stage:
        step(f"writing {len(params)} MLC parameters as {scheme} (scales: {scale_mode})")
        writer = TensorCacheWriter(stage)
        seen = []
        n_modules = len({p.name.rsplit(".", 1)[0] for p in params})
        with progress.bar(n_modules, "tensors") as bar:
            for p, blocks in mlc_blocks(model, scheme, scale_mode, imatrix, bar):
                writer.add_chunks(p.name, p.shape, p.dtype, _checked(p, blocks))
                seen.append(p.name)
        missing = sorted({p.name for p in params} - set(seen))
        assert not missing, f"unwritten MLC parameters: {missing}"
        cache_files = writer.finish(spec.n_params)
        tokenizer_files = _save_tokenizer(model, stage)
        _write_json(stage / "mlc-chat-config.json", chat_config(model, scheme, tokenizer_files))
        meta = {
            "format": "mlc",
            "target": "mlc",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": "mlc-chat-config.json", "tensor_cache": cache_files[0]},
            "tensor_types": {p.name: p.dtype for p in params},
            "options": {"mlc_scales": scale_mode},
            "mlc_scales": {
                "mode": scale_mode,
                "rule": "max|w|/max_int (MLC convert_weight, bit-identical)"
                if scale_mode == "mlc"
                else "per-group search minimising "
                + ("imatrix-weighted" if imatrix is not None else "x^2-weighted (no imatrix)")
                + " squared error; same format, MLC kernels dequantize it unchanged",
            },
            "imatrix": imatrix.describe()
            if imatrix is not None and scale_mode == "search"
            else None,
            "bits_per_weight": writer.param_bytes * 8.0 / spec.n_params,
            "layout": LAYOUT_NOTE,
            "tool_versions": A.tool_versions("numpy", "torch", "apache-tvm"),
            "min_runtime": {"mlc-llm": "2025-09 (tensor-cache.json); ndarray-cache.json for older"},
            "notes": [
                "weights + mlc-chat-config only: build the model library with `mlc_llm compile "
                "mlc-chat-config.json --device <dev>` (or MLC's JIT) before running"
            ],
        }
        meta = A.finish(stage, meta)
    return A.Artifact(out, meta)


def _checked(p: MLCParam, blocks: Iterator[NDArray]) -> Iterator[NDArray]:
    """The blocks, each checked against the plan's shape (rows aside) and dtype."""
    for block in blocks:
        assert tuple(block.shape[1:]) == p.shape[1:] and str(block.dtype) == p.dtype, p
        yield block


def _save_tokenizer(model: CanonicalModel, stage: Path) -> list[str]:
    return sorted(Path(p).name for p in model.tokenizer.save(stage))


# mlc-llm conversation_template/*.py "chatml_nosystem" (SmolLM's template in gen_config), as
# Conversation.to_json_dict serialises it.
CHATML_NOSYSTEM: dict[str, Any] = {
    "name": "chatml_nosystem",
    "system_template": "{system_message}",
    "system_message": "",
    "system_prefix_token_ids": None,
    "add_role_after_system_message": True,
    "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
    "role_templates": {
        "user": "{user_message}",
        "assistant": "{assistant_message}",
        "tool": "{tool_message}",
    },
    "messages": [],
    "seps": ["<|im_end|>\n"],
    "role_content_sep": "\n",
    "role_empty_sep": "\n",
    "stop_str": ["<|im_end|>"],
    "stop_token_ids": [2],
    "function_string": "",
    "use_function_calling": False,
}


def chat_config(model: CanonicalModel, scheme: str, tokenizer_files: list[str]) -> dict[str, Any]:
    """mlc-chat-config.json as `mlc_llm gen_config --conv-template chatml_nosystem` writes it."""
    spec = model.spec
    context = spec.max_position_embeddings
    prefill = min(context, 8192)  # LlamaConfig.__post_init__ default
    model_config = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.n_heads,
        "num_hidden_layers": spec.n_layers,
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "position_embedding_base": spec.rope_theta,
        "rope_scaling": None,
        "context_window_size": context,
        "prefill_chunk_size": prefill,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": 128,
        "disaggregation": False,
    }
    conv = dict(CHATML_NOSYSTEM)
    if spec.eos_token_id is not None:
        conv["stop_token_ids"] = [spec.eos_token_id]
    return {
        "version": "0.1.0",
        "model_type": "llama",
        "quantization": scheme,
        "model_config": model_config,
        "vocab_size": spec.vocab_size,
        "context_window_size": context,
        "sliding_window_size": -1,
        "prefill_chunk_size": prefill,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": spec.vocab_size,
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": sorted(
            f
            for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
            if f in tokenizer_files
        ),
        "tokenizer_info": {
            "token_postproc_method": "byte_level",
            "prepend_space_in_encode": False,
            "strip_space_in_decode": False,
        },
        "conv_template": conv,
        "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else 0,
        "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else 1,
        "eos_token_id": spec.eos_token_id if spec.eos_token_id is not None else 2,
        "model_task": "chat",
    }


def describe_schemes() -> list[dict[str, Any]]:
    out = []
    for name in SCHEMES:
        cfg = group.GROUP_CONFIGS.get(name)
        out.append(
            {
                "target": f"mlc:{name}",
                "bits_per_weight": cfg.bits_per_weight(576)
                if cfg
                else 8.0 * np.dtype(UNQUANTIZED[name]).itemsize,
                "mixture": []
                if cfg is None
                else [f"linear+embedding->{name}", "norms->" + cfg.model_dtype],
                "group_size": cfg.group_size if cfg else None,
                "model_dtype": model_dtype(name),
                "scale_modes": list(group.SCALE_MODES) if cfg else ["mlc"],
            }
        )
    return out
