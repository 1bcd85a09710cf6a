"""onnxruntime's MatMulNBits / GatherBlockQuantized blocks: the codecs of the "onnx" family.

A (rows N, cols K) weight is cut into blocks of `block_size` along K (zero-padded to whole blocks);
each block keeps `bits`-bit levels q and a scale, dequantized as (q - zero_point) * scale, the
formula of onnxruntime's `contrib_ops/cpu/quantization/matmul_nbits.cc`. Zero points are either the
op's implicit 2**(bits-1) ("none") or packed uint8 per block ("uint8"); float zero points are left
out because MatMulNBits runs them about 10x slower (measured: docs/onnx.md). Levels come from
round-to-nearest with the format's scale search, or from GPTQ (quantizers/gptq.py) when the caller
has the layer's Hessians. Weights only: activations stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import CorruptFileError, UnsupportedError
from smolconvert.quantizers.codec import Codec
from smolconvert.quantizers.scale_search import make_qx_quants

if TYPE_CHECKING:
    import torch

    from smolconvert.quantizers.gptq import Segments

Floats = NDArray[np.float32]
Levels = NDArray[np.uint8]


@dataclass(frozen=True)
class BlockFormat:
    """The geometry of one MatMulNBits codec: what the packer and the op's attributes need."""

    name: str  # int{bits}_b{block_size}_{zero_point}, or _pos: none with scales >= 0
    bits: int  # 4 or 8
    block_size: int  # 32, 64, 128
    zero_point: str  # "none" (implicit 2**(bits-1)) or "uint8" (packed)
    positive: bool = False  # scales >= 0 (ExecuTorch's XNNPACK blocks); zero_point "none"

    @property
    def bits_per_weight(self) -> float:
        zp = {"none": 0, "uint8": self.bits}[self.zero_point]
        return self.bits + (32 + zp) / self.block_size  # fp32 scales: MatMulNBits wants A's type


@dataclass(frozen=True)
class QuantizedWeight:
    format: BlockFormat
    shape: tuple[int, int]  # (N, K) logical
    packed: Levels  # (N, n_blocks, block_size * bits / 8), MatMulNBits' B
    scales: Floats  # (N, n_blocks)
    zero_points: Levels | None  # (N, ceil(n_blocks * bits / 8)) packed uint8


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        *(
            BlockFormat(f"int{bits}_b{bs}_{zp}", bits, bs, zp)
            for bits in (4, 8)
            for bs in (32, 64, 128)
            for zp in ("none", "uint8")
        ),
        BlockFormat("int4_b32_pos", 4, 32, "none", positive=True),
    )
}

# elements of a weight whose block scales are searched at once (quantize)
SEARCH_CHUNK_ELEMENTS = 1 << 20


def _blocks(w: Floats, block_size: int) -> Floats:
    """(N, K) -> (N, n_blocks, block_size), zero-padded along K as MatMulNBits pads."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = np.pad(w, ((0, 0), (0, nb * block_size - k)))
    return np.ascontiguousarray(w, np.float32).reshape(n, nb, block_size)


def pack(levels: NDArray, bits: int) -> Levels:
    """Levels along the last axis, low-order bits first (`matmul_nbits.cc` layout); 4-bit levels
    two to a byte, an odd count padded with a zero level."""
    levels = levels.astype(np.uint8)
    if bits == 8:
        return levels
    if levels.shape[-1] % 2:
        levels = np.concatenate([levels, np.zeros_like(levels[..., :1])], axis=-1)
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: Levels, bits: int, n: int) -> Levels:
    """The first `n` levels along the last axis of `pack`'s output."""
    if bits == 8:
        return packed[..., :n]
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


def _symmetric(x: Floats, bits: int, positive: bool = False) -> tuple[Floats, NDArray]:
    """llama.cpp's make_qx_quants sweep (weights x*x): levels [0, 2**bits), zero point 2**(b-1)."""
    nb_total = x.shape[0] * x.shape[1]
    flat = x.reshape(nb_total, -1).T  # (block_size, blocks): element-major, as scale_search wants
    scale, levels = make_qx_quants(np.ascontiguousarray(flat), 1 << (bits - 1), positive=positive)
    return scale.reshape(x.shape[:2]), levels.T.reshape(x.shape)


def _asymmetric_uint8(x: Floats, bits: int) -> tuple[Floats, Levels, Levels]:
    """Integer zero point: sweep the span's divisor, round the zero point, refit the scale by least
    squares on the chosen levels, keep the lowest squared error per block."""
    nmax = (1 << bits) - 1
    lo = np.minimum(x.min(-1), 0.0)
    hi = np.maximum(x.max(-1), 0.0)
    span = np.maximum(hi - lo, 1e-30)
    best_err = np.full(x.shape[:2], np.inf, np.float32)
    best_s = np.zeros(x.shape[:2], np.float32)
    best_z = np.zeros(x.shape[:2], np.float32)
    best_q = np.zeros(x.shape, np.float32)
    for step in np.linspace(-1.0, 1.0, 21, dtype=np.float32):
        s = span / (nmax + step)
        z = np.clip(np.rint(-lo / s), 0, nmax)
        q = np.clip(np.rint(x / s[..., None]) + z[..., None], 0, nmax)
        c = q - z[..., None]
        c2 = (c * c).sum(-1)
        s = np.where(c2 > 0, (c * x).sum(-1) / np.where(c2 > 0, c2, 1), s).astype(np.float32)
        err = ((c * s[..., None] - x) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
        best_q = np.where(better[..., None], q, best_q)
    return best_s, best_z.astype(np.uint8), best_q.astype(np.uint8)


def quantize(
    w: Floats, fmt: BlockFormat, hessian: torch.Tensor | Segments | None = None
) -> QuantizedWeight:
    """Round-to-nearest with the format's scale search, or GPTQ against `hessian` (K, K) on that
    search's grid; given segments [(rows, H), ...], each row range on its own Hessian."""
    if np.ndim(w) != 2:
        raise UnsupportedError(f"{fmt.name} packs 2-D weights (rows, cols); got {np.shape(w)}")
    x = _blocks(np.asarray(w, np.float32), fmt.block_size)
    # The scale searches hold ~10 float temporaries of their input; every row block is searched on
    # its own (the sums are sequential per block), so chunks of rows give the same bytes while
    # bounding that to a few MB (the whole 1.7B embedding took GBs).
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))
    chunks = [x[i : i + step] for i in range(0, max(len(x), 1), step)]
    zero_points: Levels | None
    if fmt.zero_point == "none":
        found = [_symmetric(c, fmt.bits, fmt.positive) for c in chunks]
        scales, levels = (np.concatenate(parts) for parts in zip(*found, strict=True))
        zeros = np.full(scales.shape, 1 << (fmt.bits - 1), np.float32)
        zero_points = None
    else:
        found3 = [_asymmetric_uint8(c, fmt.bits) for c in chunks]
        scales, zp, levels = (np.concatenate(parts) for parts in zip(*found3, strict=True))
        zeros = zp.astype(np.float32)
        zero_points = pack(zp, fmt.bits)
    del chunks, x
    scales = scales.astype(np.float32)
    if hessian is not None:
        levels, scales = _gptq(np.asarray(w, np.float32), fmt, hessian, scales, zeros, levels)
    return QuantizedWeight(
        fmt, (w.shape[0], w.shape[1]), pack(levels, fmt.bits), scales, zero_points
    )


def _gptq(
    w: Floats,
    fmt: BlockFormat,
    hessian: torch.Tensor | Segments,
    scales: Floats,
    zeros: Floats,
    levels: NDArray,
) -> tuple[NDArray, Floats]:
    """GPTQ's levels and refit scales on the round-to-nearest grid (scales, zeros), row range by
    row range when `hessian` is a list of segments."""
    from smolconvert.quantizers.gptq import gptq  # torch: imported only when a Hessian is given

    segments: list[tuple[int, torch.Tensor]] = []
    for n, h in hessian if isinstance(hessian, list) else [(len(w), hessian)]:
        if segments and segments[-1][1] is h:  # rows on one Hessian: one factorization
            segments[-1] = (segments[-1][0] + n, h)
        else:
            segments.append((n, h))
    if sum(n for n, _ in segments) != len(w):
        raise ValueError(
            f"Hessian segments cover {[n for n, _ in segments]} rows; the weight has {len(w)}"
        )
    parts, start = [], 0
    for n, h in segments:
        rows = slice(start, start + n)
        parts.append(gptq(w[rows], h, fmt.bits, fmt.block_size, scales[rows], zeros[rows]))
        start += n
    return (
        np.concatenate([r.levels for r in parts]).reshape(levels.shape),
        np.concatenate([r.scales for r in parts]),
    )


def dequantize(qw: QuantizedWeight) -> Floats:
    f = qw.format
    n, k = qw.shape
    nb = qw.scales.shape[1]
    levels = unpack(qw.packed, f.bits, f.block_size).astype(np.float32)  # (N, nb, bs)
    if qw.zero_points is None:
        zp = np.full((n, nb), 1 << (f.bits - 1), np.float32)
    else:
        zp = unpack(qw.zero_points, f.bits, nb).astype(np.float32)
    w = (levels - zp[..., None]) * qw.scales[..., None]
    return w.reshape(n, -1)[:, :k].astype(np.float32)


def split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """A weight quantized as stacked rows -> its parts' weights (quantization is per row)."""
    if sum(rows) != qw.shape[0]:
        raise ValueError(f"rows {rows} do not add up to the weight's {qw.shape[0]}")
    out, start = [], 0
    for n in rows:
        sl = slice(start, start + n)
        zp = None if qw.zero_points is None else qw.zero_points[sl]
        out.append(QuantizedWeight(qw.format, (n, qw.shape[1]), qw.packed[sl], qw.scales[sl], zp))
        start += n
    return out


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The inverse of split_rows: parts of one format and K stacked along N."""
    first = parts[0]
    odd = [p.shape for p in parts if p.format != first.format or p.shape[1] != first.shape[1]]
    if odd:
        raise ValueError(f"cannot stack {first.format.name} rows of K={first.shape[1]} with {odd}")
    if len(parts) == 1:
        return first
    zps = [p.zero_points for p in parts if p.zero_points is not None]  # all or none: one format
    return QuantizedWeight(
        first.format,
        (sum(p.shape[0] for p in parts), first.shape[1]),
        np.concatenate([p.packed for p in parts], axis=0),
        np.concatenate([p.scales for p in parts], axis=0),
        np.concatenate(zps, axis=0) if zps else None,
    )


def _codec(fmt: BlockFormat) -> Codec:
    def encode(w: Floats, importance: Floats | None = None) -> QuantizedWeight:
        return quantize(w, fmt)  # round-to-nearest: the scale search weighs by x*x, not importance

    def decode(qw: QuantizedWeight, shape: tuple[int, ...]) -> Floats:
        if tuple(shape) != qw.shape or qw.format != fmt:
            raise CorruptFileError(
                f"{fmt.name}: asked to decode shape {tuple(shape)}, the weight holds "
                f"{qw.format.name} of shape {qw.shape}"
            )
        return dequantize(qw)

    return Codec(
        name=fmt.name,
        family="onnx",
        block_size=fmt.block_size,
        bits_per_weight=fmt.bits_per_weight,
        quantize=encode,
        dequantize=decode,
        uses_importance=False,
    )


CODECS: dict[str, Codec] = {name: _codec(f) for name, f in FORMATS.items()}
