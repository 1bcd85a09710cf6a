"""The codec registry: every codec of every target family, keyed by its public name.

GGUF's block types (quantizers/ggml.py: "q4_k", "q8_0", "f16", ...), onnxruntime's MatMulNBits
blocks (quantizers/nbits.py: "int4_b32_none", ...), Core ML's blockwise and look-up-table
compression (quantizers/coreml_codecs.py: "int4_block32_zp", "lut4", ...) and MLC's groups
(quantizers/group.py: "q4f16_1", ...). Recipes of every target name codecs from this one table.
"""

from __future__ import annotations

from smolconvert.errors import UnsupportedError
from smolconvert.quantizers import coreml_codecs, ggml, group, nbits
from smolconvert.quantizers.codec import Codec


def _merge(*tables: dict[str, Codec]) -> dict[str, Codec]:
    merged: dict[str, Codec] = {}
    for table in tables:
        for name, codec in table.items():
            if name in merged or name != codec.name:
                raise ValueError(f"codec name {name!r} registered twice or under another name")
            merged[name] = codec
    return merged


CODECS: dict[str, Codec] = _merge(ggml.CODECS, nbits.CODECS, coreml_codecs.CODECS, group.CODECS)


def get_codec(name: str, family: str | None = None) -> Codec:
    """The codec registered as `name` (e.g. "q4_k"; case-insensitive), of `family` if given."""
    codec = CODECS.get(name.lower())
    if codec is None or (family is not None and codec.family != family):
        known = [n for n, c in CODECS.items() if family is None or c.family == family]
        what = f"{family} codec" if family else "codec"
        raise UnsupportedError(f"unknown {what} {name!r}; choose one of {', '.join(known)}")
    return codec
