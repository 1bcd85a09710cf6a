"""Each target family's options: one frozen dataclass per family, parsed once (smolconvert.targets)
from `-O KEY=VALUE`, the API's `options` or a release config, and handed to its exporter.

A field's Literal type lists its values, the default first; a `float | None` field is a number
(unset by default). `help` in its metadata is what `smolconvert export --list` prints.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _help(text: str) -> Any:
    return {"help": text}


NUMBER = "<number>"  # what `export --list` shows for a numeric option's values


@dataclass(frozen=True)
class GgufOptions:
    """The budget of `gguf:auto` (one of the two); every other GGUF scheme is fixed by its name."""

    size_mb: float | None = field(
        default=None,
        metadata=_help("gguf:auto only: the file's size budget in MB (10^6 bytes)"),
    )
    bpw: float | None = field(
        default=None,
        metadata=_help(
            "gguf:auto only: bits per weight of the tensor data (as llama.cpp counts BPW)"
        ),
    )


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
            "pooled), off (round-to-nearest and no calibration sampling: fastest, lowest "
            "quality; docs/scaling.md)"
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
class ExecutorchOptions:
    max_context_len: float | None = field(
        default=None,
        metadata=_help(
            "KV cache length in tokens, prompt and reply together [default: 2048, capped by "
            "the model's max_position_embeddings]"
        ),
    )
    gptq: Literal["auto", "per-head", "pooled", "off"] = field(
        default="auto",
        metadata=_help("8da4w's GPTQ, as onnx's gptq option (off: round-to-nearest)"),
    )


@dataclass(frozen=True)
class LitertOptions:
    max_context_len: float | None = field(
        default=None,
        metadata=_help(
            "KV cache length in tokens, prompt and reply together; every call passes the whole "
            "cache in and out [default: 1280, litert-torch's; capped by the model's "
            "max_position_embeddings]"
        ),
    )
    smooth: Literal["on", "off"] = field(
        default="on",
        metadata=_help(
            "int8/int4: move activation outliers into the weights before quantizing "
            "(SmoothQuant, alpha 0.5, calibrated on the built-in text; off: litert-torch's "
            "recipe as is)"
        ),
    )


@dataclass(frozen=True)
class MlcOptions:
    mlc_scales: Literal["mlc", "search"] = field(
        default="mlc",
        metadata=_help("group scales: mlc (bit-identical to mlc_llm convert_weight) or search"),
    )


def _is_number(hint: Any) -> bool:
    return float in typing.get_args(hint)


def option_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """Each option of an options dataclass with its allowed values, the default first; a
    numeric option reads ("none", NUMBER)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if _is_number(hints[f.name]):
            out[f.name] = ("none", NUMBER)
            continue
        values = tuple(str(v) for v in typing.get_args(hints[f.name]))
        out[f.name] = (str(f.default), *(v for v in values if v != f.default))
    return out


def parse_option(cls: type, key: str, value: Any) -> Any:
    """One option's value from its text (or number): a choice of its Literal, or a positive
    finite number (or "none") for a numeric option. Raises ValueError with what is allowed."""
    hint = typing.get_type_hints(cls)[key]
    if not _is_number(hint):
        text = str(value)
        allowed = option_choices(cls)[key]
        if text not in allowed:
            raise ValueError(f"is not one of {', '.join(allowed)}")
        return text
    if value is None or str(value).strip().lower() == "none":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a positive number")
    return number


def option_texts(options: Any) -> dict[str, str]:
    """An options instance as text, leaving out unset numbers: adding an optional number to a
    family must not change what its existing targets record (release cache keys)."""
    return {
        k: v if isinstance(v, str) else f"{v:g}"
        for k, v in dataclasses.asdict(options).items()
        if v is not None
    }


def option_help(cls: type) -> dict[str, str]:
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
