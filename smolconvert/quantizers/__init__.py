"""Pure quantizers: float32 weights (+ optional importance) -> packed GGUF blocks, and back.

`CODECS` maps each GGUF tensor type (lower-case ggml name: "q4_k", "q8_0", "f16", ...) to a `Codec`;
`recipes` says which tensor gets which codec. Imports nothing of smolconvert but its errors.
"""

from __future__ import annotations

from smolconvert.quantizers.registry import CODECS, Codec, get_codec

__all__ = ["CODECS", "Codec", "get_codec"]
