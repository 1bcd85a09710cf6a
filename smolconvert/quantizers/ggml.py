"""GGUF codecs: every GGUF tensor type we write, keyed by its lower-case ggml name.

quantize(w (rows, cols) float32, importance (cols,) | None) -> uint8 (rows, cols // block_size *
type_size) and dequantize(bytes, shape) -> float32. This module does the checks and the row
chunking (bounded memory, cache-sized work); the kernels in `legacy`, `kquants` and `iquants` do
the math.
Block geometry comes from gguf's GGML_QUANT_SIZES, the one table upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import gguf
import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import ConfigError, CorruptFileError, UnsupportedError, ValidationError
from smolconvert.quantizers import iquants, kquants, legacy
from smolconvert.quantizers.codec import Codec
from smolconvert.quantizers.legacy import RowKernel
from smolconvert.quantizers.scale_search import F32

Floats = NDArray[np.float32]
Bytes = NDArray[np.uint8]
BlockDecoder = Callable[[Bytes], Floats]  # (n_blocks, type_size) -> (n_blocks, block_size)

_CHUNK_ELEMENTS = 1 << 18  # rows per kernel call ~ 256k weights: fits in cache, bounds temporaries
_FLOAT_TYPES = ("f32", "f16", "bf16")


def _check_row(name: str, block_size: int, shape: tuple[int, ...]) -> None:
    if len(shape) == 0:
        raise UnsupportedError(f"{name}: cannot quantize a scalar; expected an array (rows, cols)")
    cols = shape[-1]
    if cols % block_size:
        fix = (
            " llama.cpp falls back to q4_0/q5_0/q5_1/q8_0/iq4_nl for such rows"
            " (quantizers.gguf_recipes)."
            if block_size == 256
            else " Store this tensor as f16 or f32."
        )
        raise UnsupportedError(
            f"{name} packs rows in blocks of {block_size} weights; got rows of {cols} "
            f"(shape {tuple(shape)}), which is not a multiple of {block_size}.{fix}"
        )


def _importance(name: str, importance: NDArray | None, cols: int) -> Floats | None:
    if importance is None:
        return None
    qw = np.asarray(importance, dtype=F32)
    problems = []
    if qw.shape != (cols,):
        problems.append(f"shape {qw.shape}, expected ({cols},) (one value per input column)")
    elif not np.isfinite(qw).all() or (qw < 0).any():
        problems.append("values that are negative, NaN or infinite")
    if problems:
        raise ConfigError(
            f"{name}: importance vector has {'; '.join(problems)}; was the imatrix computed for "
            "this model? Recompute it or quantize without importance."
        )
    return qw


def _codec(name: str, kernel: RowKernel, decode: BlockDecoder, uses_importance: bool) -> Codec:
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]

    def quantize(w: Floats, importance: Floats | None = None) -> Bytes:
        w = np.asarray(w)
        _check_row(name, block_size, w.shape)
        cols = w.shape[-1]
        x = np.ascontiguousarray(w.reshape(prod(w.shape[:-1]), cols), dtype=F32)
        qw = _importance(name, importance, cols) if uses_importance else None
        if name not in _FLOAT_TYPES and not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            raise ValidationError(
                f"{name}: the tensor of shape {w.shape} has {bad} NaN or infinite weights; "
                "a quantized type cannot represent them. Check the source checkpoint."
            )
        out = np.empty((x.shape[0], cols // block_size * type_size), np.uint8)
        step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
        with np.errstate(all="ignore"):  # masked lanes divide by zero, as the C code skips them
            for r in range(0, x.shape[0] if out.size else 0, step):
                out[r : r + step] = kernel(x[r : r + step], qw)
        return out.reshape(*w.shape[:-1], out.shape[-1])

    def dequantize(data: Bytes, shape: tuple[int, ...]) -> Floats:
        shape = tuple(int(s) for s in shape)
        _check_row(name, block_size, shape)
        raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        expected = prod(shape) // block_size * type_size
        if raw.size != expected:
            raise CorruptFileError(
                f"{name}: {raw.size} bytes for a tensor of shape {shape}, expected {expected} "
                f"({block_size} weights per {type_size}-byte block)"
            )
        blocks = raw.reshape(-1, type_size)
        out = np.empty((blocks.shape[0], block_size), F32)
        step = max(1, _CHUNK_ELEMENTS // block_size)
        with np.errstate(invalid="ignore", over="ignore"):  # inf scales decode to inf/NaN, as in C
            for b in range(0, blocks.shape[0], step):
                out[b : b + step] = decode(blocks[b : b + step])
        return out.reshape(shape)

    return Codec(
        name=name,
        family="gguf",
        block_size=block_size,
        bits_per_weight=type_size * 8 / block_size,
        quantize=quantize,
        dequantize=dequantize,
        uses_importance=uses_importance,
    )


def _superblocks(kernel: Callable[[Floats, Floats | None], Bytes]) -> RowKernel:
    """A (n, 256) block kernel as a row kernel; importance is repeated for every row."""

    def quantize(x: Floats, qw: Floats | None) -> Bytes:
        rows = x.shape[0]
        qwb = None if qw is None else np.tile(qw.reshape(-1, kquants.QK_K), (rows, 1))
        return kernel(x.reshape(-1, kquants.QK_K), qwb).reshape(rows, -1)

    return quantize


Q = gguf.GGMLQuantizationType
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        _codec("f32", legacy.quantize_f32, lambda b: b.view(F32), False),
        _codec("f16", legacy.quantize_f16, lambda b: b.view(np.float16).astype(F32), False),
        _codec("bf16", legacy.via_gguf(Q.BF16), legacy.dequantize_via_gguf(Q.BF16), False),
        _codec("q8_0", legacy.via_gguf(Q.Q8_0), legacy.dequantize_via_gguf(Q.Q8_0), False),
        _codec("q4_0", legacy.quantize_q4_0, legacy.dequantize_via_gguf(Q.Q4_0), True),
        _codec("q4_1", legacy.quantize_q4_1, legacy.dequantize_via_gguf(Q.Q4_1), True),
        _codec("q5_0", legacy.quantize_q5_0, legacy.dequantize_via_gguf(Q.Q5_0), True),
        _codec("q5_1", legacy.quantize_q5_1, legacy.dequantize_via_gguf(Q.Q5_1), True),
        _codec("q2_k", _superblocks(kquants.quantize_q2_k), kquants.dequantize_q2_k, True),
        _codec("q3_k", _superblocks(kquants.quantize_q3_k), kquants.dequantize_q3_k, True),
        _codec("q4_k", _superblocks(kquants.quantize_q4_k), kquants.dequantize_q4_k, True),
        _codec("q5_k", _superblocks(kquants.quantize_q5_k), kquants.dequantize_q5_k, True),
        _codec("q6_k", _superblocks(kquants.quantize_q6_k), kquants.dequantize_q6_k, True),
        _codec("iq4_nl", iquants.quantize_iq4_nl, legacy.dequantize_via_gguf(Q.IQ4_NL), True),
        _codec("iq4_xs", iquants.quantize_iq4_xs, legacy.dequantize_via_gguf(Q.IQ4_XS), True),
    )
}
