"""Core ML weight codecs: a float weight as the inputs of one iOS 18 constexpr op.

Core ML decompresses weights at load with `constexpr_blockwise_shift_scale` (out = scale *
(data - offset), scale and offset repeated over blocks of data) and `constexpr_lut_to_dense` (out
= lut[indices], one table per block of rows). These codecs choose data, scales, offsets and tables
themselves (searched scales, k-means tables with pinned extremes) rather than coremltools'
min/max; exporters/coreml_compress.py only writes the arrays into the program. Codes narrower
than a byte are uint8/int8 arrays with coremltools' sub-byte dtype (its `np_uint4_dtype` and kin:
the true width in the dtype's metadata), which is what the program stores; coremltools is
imported only to quantize to them. `dequantize` mirrors coremltools 9.0
`converters/mil/mil/ops/defs/iOS18/compression.py` (`decompress` of both ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import UnsupportedError
from smolconvert.quantizers.codec import Codec, Floats
from smolconvert.quantizers.kmeans import kmeans_1d

BLOCK = 32  # weights per scale along a row in the int4 codecs


@dataclass(frozen=True)
class Encoded:
    op: str  # "blockwise_shift_scale" | "lut_to_dense": the constexpr_<op> that decodes it
    arrays: dict[str, NDArray]  # the op's inputs; sub-byte codes carry coremltools' dtype
    storage: str  # what artifact.json's tensor_types says
    nbytes: int  # payload bytes in weight.bin (before 64-byte blob alignment)


Quantize = Callable[[Floats, "Floats | None"], Encoded]


def _blocks(w: Floats, codec: str) -> NDArray[np.float32]:
    """(rows, cols) -> (rows, cols // 32, 32) float32; refuses widths that are not whole blocks."""
    if w.shape[1] % BLOCK:
        raise UnsupportedError(
            f"Core ML codec {codec} needs columns divisible by {BLOCK}; got shape {w.shape} "
            "(use int8_channel or a look-up table codec)"
        )
    rows, cols = w.shape
    return w.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)


def _sub_byte(codes: NDArray, kind: str) -> NDArray:
    """Integer codes as coremltools stores a `kind` ("uint4", "int4", "uint6") tensor."""
    from coremltools.converters.mil.mil import types

    byte = np.int8 if kind.startswith("int") else np.uint8
    return codes.astype(byte).astype(getattr(types, f"np_{kind}_dtype"))


def _safe_inverse(scale: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))


def int8_channel(w: Floats, importance: Floats | None = None) -> Encoded:
    """Symmetric int8, one fp16 scale per output row (Core ML's per-channel int8)."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = (amax / 127).astype(np.float16)
    q = np.clip(np.rint(w * _safe_inverse(scale.astype(np.float32))), -127, 127)
    arrays = {"data": q.astype(np.int8), "scale": scale}
    return Encoded("blockwise_shift_scale", arrays, "int8_channel", w.size + 2 * w.shape[0])


def _asym_blocks(
    w: Floats, integer_offset: bool, codec: str
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Asymmetric 4-bit blocks along cols with a searched scale: out = scale * (q - offset).

    For each block try scale = (max - min) / n for n = 15 .. 7 (the grid of a block that does not
    use all 16 levels, as in llama.cpp's make_qkx search), offset = -min / scale (rounded to an
    integer in 0..15 when `integer_offset`, since a uint4 offset must be), and keep the candidate
    with the least squared error. Vectorised over all blocks; the loop is over the 9 candidates.
    Returns q (rows, cols), scale and offset (rows, cols // 32), all float32.
    """
    x = _blocks(w, codec)  # (R, B, 32)
    rows, cols = w.shape
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)

    def candidate(n: int) -> list[NDArray[np.float32]]:
        scale = ((hi - lo) / n).astype(np.float16).astype(np.float32)
        inv = _safe_inverse(scale)
        offset = -lo * inv
        if integer_offset:
            offset = np.clip(np.rint(offset), 0, 15)
        else:
            offset = offset.astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x * inv + offset), 0, 15)
        err = ((scale * (q - offset) - x) ** 2).sum(-1, keepdims=True)
        return [err, q, scale, offset]

    best = candidate(15)
    for n in range(14, 6, -1):
        cand = candidate(n)
        better = cand[0] < best[0]
        best = [np.where(better, v, b) for v, b in zip(cand, best, strict=True)]
    _, q, scale, offset = best
    return q.reshape(rows, cols), scale[..., 0], offset[..., 0]


def int4_block32(w: Floats, importance: Floats | None = None) -> Encoded:
    """uint4 data, fp16 scale and fp16 offset per 32-block (5.0 bpw): reproduces a Q4_1 grid."""
    q, scale, offset = _asym_blocks(w, integer_offset=False, codec="int4_block32")
    arrays = {
        "data": _sub_byte(q, "uint4"),
        "scale": scale.astype(np.float16),
        "offset": offset.astype(np.float16),
    }
    return Encoded("blockwise_shift_scale", arrays, "uint4_block32_fp16_offset", w.size * 5 // 8)


def int4_block32_zp(w: Floats, importance: Floats | None = None) -> Encoded:
    """uint4 data, fp16 scale and uint4 zero point per 32-block (4.625 bpw), searched."""
    q, scale, offset = _asym_blocks(w, integer_offset=True, codec="int4_block32_zp")
    arrays = {
        "data": _sub_byte(q, "uint4"),
        "scale": scale.astype(np.float16),
        "offset": _sub_byte(offset, "uint4"),
    }
    return Encoded("blockwise_shift_scale", arrays, "uint4_block32_uint4_offset", w.size * 37 // 64)


def int4_block32_sym(w: Floats, importance: Floats | None = None) -> Encoded:
    """int4 data and an fp16 scale per 32-block, no offset (4.5 bpw); scale searched among
    amax / n for n in 7 .. 8 (steps of 1/8), the least squared error kept."""
    x = _blocks(w, "int4_block32_sym")
    rows, cols = w.shape
    amax = np.abs(x).max(-1, keepdims=True)

    def candidate(n: float) -> list[NDArray[np.float32]]:
        scale = (amax / n).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x * _safe_inverse(scale)), -8, 7)
        err = ((scale * q - x) ** 2).sum(-1, keepdims=True)
        return [err, q, scale]

    steps = np.arange(7.0, 8.01, 0.125)
    best = candidate(steps[0])
    for n in steps[1:]:
        cand = candidate(n)
        better = cand[0] < best[0]
        best = [np.where(better, v, b) for v, b in zip(cand, best, strict=True)]
    arrays = {
        "data": _sub_byte(best[1].reshape(rows, cols), "int4"),
        "scale": best[2][..., 0].astype(np.float16),
    }
    return Encoded("blockwise_shift_scale", arrays, "int4_block32_sym", w.size * 9 // 16)


def palettize(nbits: int, group: int = 16, row_scaled: bool = False) -> Quantize:
    """An fp16 look-up table of 2**nbits entries, found by k-means over `group` output rows at a
    time (per grouped channel), the group's min and max pinned as entries (see `kmeans_1d`).

    `row_scaled`: the k-means runs on the rows normalised by their max |w| and each row's table
    is the shared one times the row's max, so one clustering serves rows of different ranges.
    Core ML before iOS 26 takes a per-channel scale only on the table itself (coremltools'
    canonicalize_quantized_lut_pattern rewrites a scale after the lookup into a per-row table), so
    such tables are stored per row: 32 bytes per row at 4 bits, where 4-bit tables most need the
    row scales; at 6 and 8 bits a per-row table would cost 128 and 512 bytes a row, and one table
    per group is kept. Indices are assigned to the fp16 tables the program holds."""

    def quantize(w: Floats, importance: Floats | None = None) -> Encoded:
        import torch

        rows, cols = w.shape
        g = group if rows % group == 0 else 1
        if row_scaled:
            amax = np.abs(w).max(axis=1, keepdims=True)
            amax[amax == 0] = 1
            lut = kmeans_1d((w / amax).reshape(rows // g, g * cols), 2**nbits)
            table = (np.repeat(lut, g, axis=0) * amax).astype(np.float16)  # (rows, K), sorted
            values = w
        else:
            lut = kmeans_1d(w.reshape(rows // g, g * cols), 2**nbits)
            table = lut.astype(np.float16)  # (rows // g, K), sorted
            values = w.reshape(rows // g, g * cols)
        wide = table.astype(np.float32)
        mid = torch.from_numpy((wide[:, 1:] + wide[:, :-1]) / 2)
        idx = torch.searchsorted(mid.contiguous(), torch.from_numpy(values)).numpy()
        indices = idx.reshape(rows, cols)
        codes = indices.astype(np.uint8) if nbits == 8 else _sub_byte(indices, f"uint{nbits}")
        arrays = {"indices": codes, "lut": table.reshape(table.shape[0], 1, 2**nbits, 1)}
        nbytes = w.size * nbits // 8 + table.size * 2
        per = "row" if row_scaled or g == 1 else f"group{g}"
        return Encoded("lut_to_dense", arrays, f"lut{nbits}_per_{per}_fp16", nbytes)

    return quantize


def dequantize(encoded: Encoded, shape: tuple[int, ...]) -> Floats:
    """What Core ML decompresses at load, in its fp16 arithmetic: (rows, cols) float32."""
    a = encoded.arrays
    if encoded.op == "lut_to_dense":
        lut = a["lut"][:, 0, :, 0]  # (tables, K): one table per block of rows
        indices = np.asarray(a["indices"], np.int64)
        table = np.arange(indices.shape[0]) // (indices.shape[0] // lut.shape[0])
        out = lut[table[:, None], indices]
    elif encoded.op == "blockwise_shift_scale":
        scale = a["scale"]
        data = a["data"].astype(scale.dtype)
        offset = a.get("offset")
        for axis, (n, m) in enumerate(zip(data.shape, scale.shape, strict=True)):
            scale = np.repeat(scale, n // m, axis)
            if offset is not None:
                offset = np.repeat(offset, n // m, axis)
        if offset is not None:
            data = data - offset
        out = scale * data
    else:
        raise UnsupportedError(f"no Core ML decoder for constexpr_{encoded.op}")
    return np.asarray(out, np.float32).reshape(shape)


def _codec(name: str, block_size: int, bits_per_weight: float, encode: Quantize) -> Codec:
    def quantize(w: Floats, importance: Floats | None = None) -> Encoded:
        if w.ndim != 2:
            raise UnsupportedError(f"Core ML codec {name} takes a 2-D weight; got shape {w.shape}")
        return encode(w, importance)

    return Codec(name, "coreml", block_size, bits_per_weight, quantize, dequantize, False)


# bits_per_weight: of the codes and scales, for cols % 32 == 0 and rows % 16 == 0; look-up tables
# add 16 * 2**bits bits per table (lut4: one per row, 512 / cols; lut6, lut8: one per 16 rows).
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        _codec("int8_channel", 0, 8.0, int8_channel),
        _codec("int4_block32", BLOCK, 5.0, int4_block32),
        _codec("int4_block32_zp", BLOCK, 4.625, int4_block32_zp),
        _codec("int4_block32_sym", BLOCK, 4.5, int4_block32_sym),
        _codec("lut4", 0, 4.0, palettize(4, row_scaled=True)),
        _codec("lut6", 0, 6.0, palettize(6)),
        _codec("lut8", 0, 8.0, palettize(8)),
    )
}
