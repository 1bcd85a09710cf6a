"""Lazy tensor sources under canonical (Hugging Face) names, read one tensor at a time.

Three sources: safetensors folders (single file or sharded with an index; memory-mapped), GGUF files
(dequantized with the gguf library, llama.cpp's Q/K row permutation undone) and, only when the user
opts in, PyTorch pickle checkpoints. Every source is checked for totality against the names the
ModelSpec implies, so a missing or stray tensor is reported before any conversion starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from smolconvert.errors import CorruptFileError, UnsupportedError
from smolconvert.model import gguf_layout
from smolconvert.model.spec import ModelSpec

LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def canonical_names(spec: ModelSpec) -> list[str]:
    """Every tensor of the model in canonical order (the order exporters stream them in)."""
    names = ["model.embed_tokens.weight"]
    for i in range(spec.n_layers):
        names += [f"model.layers.{i}.{t}" for t in LAYER_TENSORS]
    names.append("model.norm.weight")
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def expected_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    d, f, q = spec.hidden_size, spec.intermediate_size, spec.n_heads * spec.head_dim
    kv = spec.n_kv_heads * spec.head_dim
    suffix = name.split(".")[-2]  # "model.layers.3.self_attn.q_proj.weight" -> "q_proj"
    shapes = {
        "embed_tokens": (spec.vocab_size, d),
        "lm_head": (spec.vocab_size, d),
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }
    return shapes.get(suffix, (d,))


class WeightSource(Protocol):
    """Tensors under canonical names. `get` returns a CPU tensor in the stored float dtype."""

    description: str

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def storage_type(self, name: str) -> str: ...

    def files(self) -> list[Path]: ...


def check_totality(source: WeightSource, spec: ModelSpec) -> None:
    """Raise CorruptFileError naming every missing and unexpected tensor, and every wrong shape."""
    expected = canonical_names(spec)
    have = set(source.names())
    missing = [n for n in expected if n not in have]
    # A tied checkpoint may still store lm_head (transformers writes it sometimes); it is ignored.
    stray = sorted(have - set(expected) - {"lm_head.weight"})
    problems = []
    if missing:
        problems.append(
            f"missing tensors: {', '.join(missing[:8])}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if stray:
        problems.append(
            f"unexpected tensors: {', '.join(stray[:8])}"
            + (f" (+{len(stray) - 8} more)" if len(stray) > 8 else "")
        )
    if problems:
        raise CorruptFileError(f"{source.description}: " + "; ".join(problems))


def fingerprint(source: WeightSource) -> str:
    """sha256 over the source's files (name, size, content): the source model hash."""
    h = hashlib.sha256()
    for path in sorted(source.files()):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class SafetensorsSource:
    """A Hugging Face folder with model.safetensors or model.safetensors.index.json (+ shards)."""

    folder: Path
    description: str = ""
    _where: dict[str, Path] = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from safetensors import safe_open

        self.description = self.description or str(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{index}: not a safetensors index ({e})") from None
            shards = {self.folder / s for s in weight_map.values()}
            for shard in shards:
                if not shard.exists():
                    raise CorruptFileError(f"{index} names shard {shard.name}, which is missing")
        else:
            shards = set(self.folder.glob("*.safetensors"))
            if not shards:
                raise CorruptFileError(f"{self.folder}: no *.safetensors files")
        for shard in sorted(shards):
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CorruptFileError(f"{shard}: not a readable safetensors file ({e})") from None
            self._handles[shard] = handle
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name in self._where:
                    raise CorruptFileError(f"{self.folder}: tensor {name} appears in two shards")
                self._where[name] = shard

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)  # type: ignore[attr-defined]

    def storage_type(self, name: str) -> str:
        return str(self._handles[self._where[name]].get_slice(name).get_dtype())  # type: ignore[attr-defined]

    def files(self) -> list[Path]:
        return sorted(self._handles)


@dataclass
class PickleSource:
    """pytorch_model.bin checkpoints; unpickling can run code, so only loaded on explicit opt-in."""

    paths: list[Path]
    description: str = ""
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.description = self.description or str(self.paths[0].parent)
        for path in self.paths:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CorruptFileError(f"{path}: cannot load checkpoint ({e})") from None
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def storage_type(self, name: str) -> str:
        return str(self._tensors[name].dtype).removeprefix("torch.")

    def files(self) -> list[Path]:
        return sorted(self.paths)


@dataclass
class GGUFSource:
    """A GGUF file: each tensor dequantized to float32 and put back in Hugging Face row order."""

    path: Path
    reader: object  # gguf.GGUFReader, kept open (memory-mapped)
    spec: ModelSpec
    description: str = ""
    _tensors: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.description = self.description or str(self.path)
        unknown = []
        for t in self.reader.tensors:  # type: ignore[attr-defined]
            name = gguf_layout.canonical_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            want = expected_shape(self.spec, name)
            got = tuple(int(x) for x in reversed(t.shape))
            if got != want:
                raise CorruptFileError(
                    f"{self.path}: tensor {t.name} has shape {list(got)}, "
                    f"expected {list(want)} from the file's own metadata"
                )
            self._tensors[name] = t
        if unknown:
            raise UnsupportedError(
                f"{self.path}: tensors outside llama.cpp's Llama layout: {', '.join(unknown[:8])}"
            )

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape))  # type: ignore[attr-defined]
        values = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # type: ignore[attr-defined]
        values = values.reshape(shape)
        heads = gguf_layout.rope_heads(name, self.spec.n_heads, self.spec.n_kv_heads)
        if heads is not None:
            values = gguf_layout.unpermute_qk(values, heads)
        return torch.from_numpy(np.array(values, dtype=np.float32))  # owned, writable copy

    def storage_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name  # type: ignore[attr-defined]

    def files(self) -> list[Path]:
        return [self.path]
