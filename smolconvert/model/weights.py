"""Lazy tensor sources under canonical (Hugging Face) names, read one tensor at a time.

Three sources: safetensors folders (single file or sharded with an index; each tensor read into
its own buffer, see SafetensorsSource.get), GGUF files
(dequantized with the gguf library, llama.cpp's Q/K row permutation undone) and, only when the user
opts in, PyTorch pickle checkpoints. Every source is checked against the ModelSpec before any
conversion starts: names, shapes (from headers, no data read) and dtypes, all problems in one error,
because a tensor stored transposed has the right element count and would convert into garbage.
Non-finite values need a pass over the data, so exporters ask for that check separately.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from smolconvert.errors import CorruptFileError, UnsupportedError
from smolconvert.model import gguf_layout
from smolconvert.model.spec import ModelSpec

if TYPE_CHECKING:
    import torch  # imported where tensors are made: opening or refusing a file needs no torch

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


# Stored dtypes that hold real-valued weights, as safetensors and torch spell them. Integers and
# bools are refused, not cast: they are token ids, masks or quantized codes without their scales.
# float64 is accepted: every target stores at most fp32, to which it rounds like any wider float.
FLOAT_STORAGE = frozenset(
    {"F32", "F16", "BF16", "F64", "float32", "float16", "bfloat16", "float64"}
)

# What each tensor's dimensions are made of, for messages (ModelSpec field names).
SHAPE_RULES = {
    "embed_tokens": "vocab_size, hidden_size",
    "lm_head": "vocab_size, hidden_size",
    "q_proj": "num_attention_heads*head_dim, hidden_size",
    "k_proj": "num_key_value_heads*head_dim, hidden_size",
    "v_proj": "num_key_value_heads*head_dim, hidden_size",
    "o_proj": "hidden_size, num_attention_heads*head_dim",
    "gate_proj": "intermediate_size, hidden_size",
    "up_proj": "intermediate_size, hidden_size",
    "down_proj": "hidden_size, intermediate_size",
}


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


def linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every linear layer's module name (`model.layers.0.mlp.up_proj`, `lm_head`, tied or not)
    -> its weight's (out, in)."""
    names = [n for n in canonical_names(spec) if n.endswith("proj.weight")]
    shapes = {n.removesuffix(".weight"): expected_shape(spec, n) for n in names}
    shapes["lm_head"] = (spec.vocab_size, spec.hidden_size)
    return {n: (s[0], s[1]) for n, s in shapes.items()}


class WeightSource(Protocol):
    """Tensors under canonical names. `get` returns a CPU tensor in the stored float dtype."""

    description: str

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def storage_type(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the header (no tensor data is read)."""
        ...

    def is_float(self, name: str) -> bool:
        """Whether the stored type holds real values (a float or a GGUF block codec)."""
        ...

    def nonfinite(self, name: str) -> tuple[int, int]:
        """How many NaN and infinite values the tensor holds."""
        ...

    def files(self) -> list[Path]: ...


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_totality(source: WeightSource, spec: ModelSpec) -> None:
    """Raise CorruptFileError naming every missing and unexpected tensor, every stored shape that
    differs from the spec's and every non-float dtype, all in one message."""
    expected = canonical_names(spec)
    have = set(source.names())
    missing = [n for n in expected if n not in have]
    # A tied checkpoint may still store lm_head (transformers writes it sometimes); it is ignored.
    stray = sorted(have - set(expected) - {"lm_head.weight"})
    present = [n for n in expected if n in have]
    shapes = []
    for name in present:
        got, want = tuple(source.shape(name)), expected_shape(spec, name)
        if got != want:
            rule = SHAPE_RULES.get(name.split(".")[-2], "hidden_size")
            shapes.append(f"{name} is {list(got)}, expected {list(want)} ({rule})")
    dtypes = [f"{n} ({source.storage_type(n)})" for n in present if not source.is_float(n)]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if stray:
        problems.append(f"unexpected tensors: {_listing(stray)}")
    if shapes:
        problems.append(
            f"shapes that differ from the config's in {_tensors(len(shapes))}: {_listing(shapes)}"
        )
    if dtypes:
        problems.append(
            f"not stored as floats: {_tensors(len(dtypes))}, {_listing(dtypes)} (weights must be "
            "F32, F16, BF16 or F64; integer tensors are not cast)"
        )
    if problems:
        raise CorruptFileError(f"{source.description}: " + "; ".join(problems))


def check_finite(source: WeightSource, spec: ModelSpec) -> None:
    """Raise CorruptFileError naming every tensor of the model that holds NaN or an infinity.

    Reads one tensor at a time in its stored dtype (GGUF: dequantized), so peak memory is one tensor
    plus its mask; a model that computes with NaN gives an artifact that outputs garbage.
    """
    bad = []
    for name in canonical_names(spec):
        n_nan, n_inf = source.nonfinite(name)
        if n_nan or n_inf:
            size = math.prod(source.shape(name))
            bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf of {size})")
    if bad:
        raise CorruptFileError(
            f"{source.description}: NaN or infinite values in {_tensors(len(bad))}: "
            f"{_listing(bad, 5)}; an artifact made from them computes garbage. Fix the "
            "checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) to convert it anyway"
        )


def _nonfinite_counts(values: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """(NaN count, infinity count) of a tensor or array, computed in its own dtype."""
    # NaN and infinities survive a sum, so a finite sum proves every value finite, ~20x faster
    # than isfinite().all() with torch 2.13 here; a non-finite sum (or an overflow) is counted.
    if isinstance(values, np.ndarray):
        if np.isfinite(values.sum()):
            return 0, 0
        return int(np.isnan(values).sum()), int(np.isinf(values).sum())
    import torch

    if bool(torch.isfinite(values.sum())):
        return 0, 0
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def fingerprint(source: WeightSource) -> str:
    """sha256 over the source's files (name, size, content): the source model hash."""
    h = hashlib.sha256()
    for path in sorted(source.files()):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes (on first use: opening a file needs no torch)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def _safetensors_extents(shard: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's absolute byte offset and length in a safetensors file, from its header
    (8-byte little-endian length, then JSON; data_offsets count from the header's end). Only
    called after safe_open has accepted the file, which checks the same offsets."""
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        start = 8 + n
        extents = {}
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                extents[name] = (start + int(begin), int(end) - int(begin))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFileError(f"{shard}: unreadable safetensors header ({e})") from None
    return extents


@dataclass
class SafetensorsSource:
    """A Hugging Face folder with model.safetensors or model.safetensors.index.json (+ shards)."""

    folder: Path
    description: str = ""
    _where: dict[str, Path] = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict)
    _extents: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> file offset, bytes

    def __post_init__(self) -> None:
        from safetensors import safe_open

        self.description = self.description or str(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:  # ValueError: not JSON, not UTF-8; OSError: a folder, unreadable
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{index}: not a safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(s, str) for s in weight_map.values()
            ):
                raise CorruptFileError(
                    f"{index}: weight_map must map tensor names to shard file names, "
                    f"got {weight_map!r:.80}"
                )
            outside = sorted(
                {s for s in weight_map.values() if Path(s).name != s or s in ("", ".", "..")}
            )
            if outside:  # a shard name is a file beside the index, never a path out of the folder
                raise CorruptFileError(
                    f"{index}: shard names must be file names in {self.folder}, got "
                    f"{', '.join(map(repr, outside[:3]))}"
                )
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
            extents = _safetensors_extents(shard)
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name in self._where:
                    raise CorruptFileError(f"{self.folder}: tensor {name} appears in two shards")
                self._where[name] = shard
                self._extents[name] = extents[name]

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, read with pread into a buffer of its own.

        safetensors' get_tensor copies out of a memory map whose pages stay resident, and counted
        in the process's RSS, until the kernel needs them back: a streaming export of a 1.7B
        model then holds the whole 3.4 GB file in its RSS (docs/scaling.md). Reading each tensor
        into its own buffer leaves the file in the page cache, which is not the process's."""
        import torch

        dtype = _torch_dtypes().get(self.storage_type(name))
        if dtype is None:  # a dtype outside the table (fp8, ...): safetensors' own reader
            return self._handles[self._where[name]].get_tensor(name)  # type: ignore[attr-defined]
        offset, nbytes = self._extents[name]
        shape = self.shape(name)
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy().data)
        got = 0
        with open(self._where[name], "rb", buffering=0) as f:
            while got < nbytes:  # one read returns at most ~2 GB on Linux
                n = os.preadv(f.fileno(), [view[got:]], offset + got)
                if n == 0:
                    raise CorruptFileError(
                        f"{self._where[name]}: tensor {name} is cut short ({got} of {nbytes} bytes)"
                    )
                got += n
        return out.view(dtype).reshape(shape)

    def storage_type(self, name: str) -> str:
        return str(self._handles[self._where[name]].get_slice(name).get_dtype())  # type: ignore[attr-defined]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())  # type: ignore[attr-defined]

    def is_float(self, name: str) -> bool:
        return self.storage_type(name) in FLOAT_STORAGE

    def nonfinite(self, name: str) -> tuple[int, int]:
        return _nonfinite_counts(self.get(name))

    def files(self) -> list[Path]:
        return sorted(self._handles)


@dataclass
class PickleSource:
    """pytorch_model.bin checkpoints; unpickling can run code, so only loaded on explicit opt-in."""

    paths: list[Path]
    description: str = ""
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def is_float(self, name: str) -> bool:
        return self.storage_type(name) in FLOAT_STORAGE

    def nonfinite(self, name: str) -> tuple[int, int]:
        return _nonfinite_counts(self.get(name))

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
        # Shapes and types are checked by check_totality, with every other source's.
        for t in self.reader.tensors:  # type: ignore[attr-defined]
            name = gguf_layout.canonical_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            self._tensors[name] = t
        if unknown:
            raise UnsupportedError(
                f"{self.path}: tensors outside llama.cpp's Llama layout: {', '.join(unknown[:8])}"
            )

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        import torch
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

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first (ggml's ne[0] is the row length).
        return tuple(int(x) for x in reversed(self._tensors[name].shape))  # type: ignore[attr-defined]

    def is_float(self, name: str) -> bool:
        from gguf import GGMLQuantizationType as T

        # Every GGUF block codec stores real values; only the plain integer types do not.
        return self._tensors[name].tensor_type not in (T.I8, T.I16, T.I32, T.I64)  # type: ignore[attr-defined]

    def nonfinite(self, name: str) -> tuple[int, int]:
        from gguf.quants import dequantize

        # Row order does not change what is finite: no un-permuting or copying, unlike get().
        t = self._tensors[name]
        return _nonfinite_counts(dequantize(t.data, t.tensor_type))  # type: ignore[attr-defined]

    def files(self) -> list[Path]:
        return [self.path]
