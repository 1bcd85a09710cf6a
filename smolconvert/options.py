"""Each target family's options: one frozen dataclass per family, parsed once (smolconvert.targets)
from `-O KEY=VALUE`, the API's `options` or a release config, and handed to its exporter.

A field's Literal type lists its values, the default first; `help` in its metadata is what
`smolconvert export --list` prints.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class GgufOptions:
    """GGUF has no layout choices: the scheme says it all."""


@dataclass(frozen=True)
class OnnxOptions:
    layout: Literal["transformers.js", "genai"] = field(
        default="transformers.js",
        metadata=_help("folder layout: Transformers.js (onnx/model*.onnx) or onnxruntime-genai"),
    )
    graph: Literal["fused", "plain"] = field(
        default="fused",
        metadata=_help(
            "fused: onnxruntime contrib ops (GroupQueryAttention, packed projections); "
            "plain: standard ops only (position_ids honoured, left padding works)"
        ),
    )
    kv_cache: Literal["auto", "float", "int8"] = field(
        default="auto",
        metadata=_help("auto: int8 for onnx:int8/int4 (fused graph), float otherwise"),
    )
    gptq: Literal["auto", "per-head", "pooled", "off"] = field(
        default="auto",
        metadata=_help(
            "int4's GPTQ: per-head (k and v on one Hessian per KV head), pooled (one for all "
            "heads: far less time with many KV heads), auto (per-head up to 8 KV heads, else "
            "pooled), off (round-to-nearest, fastest, lowest quality; docs/scaling.md)"
        ),
    )


@dataclass(frozen=True)
class CoremlOptions:
    kv_cache: Literal["stateful", "stateless"] = field(
        default="stateful",
        metadata=_help(
            "stateful: KV cache as Core ML state (iOS 18 / macOS 15); stateless: iOS 17"
        ),
    )


@dataclass(frozen=True)
class MlcOptions:
    mlc_scales: Literal["mlc", "search"] = field(
        default="mlc",
        metadata=_help("group scales: mlc (bit-identical to mlc_llm convert_weight) or search"),
    )


def option_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """Each option of an options dataclass with its allowed values, the default first."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        values = tuple(str(v) for v in typing.get_args(hints[f.name]))
        out[f.name] = (str(f.default), *(v for v in values if v != f.default))
    return out


def option_help(cls: type) -> dict[str, str]:
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
