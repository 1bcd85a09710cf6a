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
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import UnsupportedError, ValidationError
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.mlc_layout import (
    SCHEMES,
    UNQUANTIZED,
    MLCParam,
    bf16_round,
    f32_to_bf16,
    model_dtype,
    plan,
)
from smolconvert.model.source import CanonicalModel
from smolconvert.options import MlcOptions
from smolconvert.quantizers import group

LAYOUT_NOTE = (
    "mlc-llm @ 01ced331 (model/llama/llama_model.py, quantization/group_quantization.py, "
    "interface/convert_weight.py, interface/gen_config.py); tensor cache as TVM 0.27 "
    "tvmjs.dump_tensor_cache (f32-to-bf16, 32 MiB shards)"
)
SHARD_CAP_BYTES = 32 << 20
CACHE_FILES = ("tensor-cache.json", "ndarray-cache.json")  # TVM >= 0.22 name, then the older one


# ----------------------------------------------------------------------------- tensor cache


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
                if str(chunk.dtype) != dtype:
                    raise ValidationError(f"a {chunk.dtype} block for a {dtype} parameter")
                data = f32_to_bf16(chunk) if dtype == "float32" else np.ascontiguousarray(chunk)
                view = data.data.cast("B")
                fh.write(view)
                md5.update(view)
                written += len(view)
            if written != nbytes:
                raise ValidationError(f"tensor gave {written} bytes, its shape says {nbytes}")
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
            A.write_json(self.folder / name, index, indent=4, sort_keys=False)
            written.append(name)
        return written


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
        if cfg is None:
            raise UnsupportedError(f"{p.name}: {scheme!r} quantizes nothing")
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
    options: MlcOptions | None = None,
) -> A.Artifact:
    scale_mode: str = (options or MlcOptions()).mlc_scales
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
        stray = sorted(set(seen) - {p.name for p in params})
        if missing or stray:
            raise ValidationError(f"MLC parameters unwritten: {missing}; not in the plan: {stray}")
        cache_files = writer.finish(spec.n_params)
        tokenizer_files = _save_tokenizer(model, stage)
        A.write_json(
            stage / "mlc-chat-config.json", chat_config(model, scheme, tokenizer_files), indent=4
        )
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
        if tuple(block.shape[1:]) != p.shape[1:] or str(block.dtype) != p.dtype:
            raise ValidationError(
                f"{p.name}: a {block.dtype} block of shape {block.shape}, the plan says "
                f"{p.dtype} rows of {p.shape[1:]}"
            )
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
