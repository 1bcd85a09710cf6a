"""The one codec type: a named way to store a float weight matrix, for any target.

A codec is data plus two pure functions: `quantize(w (rows, cols) float32, importance (cols,) |
None) -> encoded` and `dequantize(encoded, shape) -> float32 (rows, cols)`. What `encoded` is
belongs to the family that packs it (GGUF block bytes, MatMulNBits' packed levels and scales,
Core ML's constexpr op arrays, MLC's uint32 words and scales); the registry
(`quantizers.registry.CODECS`) keys every codec by its public name, unique across families, so
recipes of every target name codecs in one vocabulary and the registry-wide tests reach them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float32]

FAMILIES = ("gguf", "onnx", "coreml", "mlc")


@dataclass(frozen=True)
class Codec:
    name: str  # public name, unique across families: "q4_k", "int4_b32_none", "lut4", "q4f16_1"
    family: str  # the target family whose runtime decodes it
    block_size: int  # weights sharing one scale along a row (0: one per row; 1: none)
    bits_per_weight: float  # on rows that are whole blocks
    quantize: Callable[[Floats, Floats | None], Any]
    dequantize: Callable[[Any, tuple[int, ...]], Floats]
    uses_importance: bool  # the search weighs columns by an importance vector (imatrix)


def encoded_arrays(encoded: Any) -> list[NDArray[Any]]:
    """Every array of an encoded weight, in a fixed order: what decides its stored bytes."""
    if isinstance(encoded, np.ndarray):
        return [encoded]
    if isinstance(encoded, dict):
        return [a for key in sorted(encoded) for a in encoded_arrays(encoded[key])]
    if isinstance(encoded, (tuple, list)):
        return [a for item in encoded for a in encoded_arrays(item)]
    fields = getattr(encoded, "__dataclass_fields__", None)
    if fields is not None:  # by field name: reordering a dataclass must not change its bytes
        return [a for key in sorted(fields) for a in encoded_arrays(getattr(encoded, key))]
    return []
