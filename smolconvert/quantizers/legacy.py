"""GGUF float storage types and the 32-element ("legacy") codecs q8_0, q4_0, q4_1, q5_0, q5_1.

Without importance these delegate to the gguf library, whose q8_0..q5_1 quantizers are bit-exact
with llama.cpp's `quantize_row_*_ref`. With importance, q4_0/q4_1/q5_0/q5_1 follow llama.cpp's
imatrix path (`quantize_row_q4_0_impl` .. `quantize_row_q5_1_impl`, ggml/src/ggml-quants.c
@ 0c1e57098): one sigma2 per row, weights qw*sqrt(sigma2 + x^2), then `make_qx_quants` (symmetric)
or `make_qkx3_quants` (scale and min) per block. q8_0 and the float types ignore importance, as
llama.cpp does.

Kernels here take whole rows, (rows, cols) float32 [+ (cols,) importance] -> (rows, bytes), because
the imatrix path needs each row's mean square.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
from numpy.typing import NDArray

from smolconvert.quantizers.scale_search import (
    F32,
    Floats,
    make_qkx_quants,
    make_qx_quants,
    seqsum,
)

Q = gguf.GGMLQuantizationType
Bytes = NDArray[np.uint8]
RowKernel = Callable[[Floats, "Floats | None"], Bytes]  # (rows, cols), (cols,) -> (rows, bytes)

# block_q4_0 (18 B): d fp16 | qs[16]          byte j: elem j low nibble, elem j+16 high; d*(q-8)
# block_q4_1 (20 B): d fp16 | m fp16 | qs[16]  d*q + m
# block_q5_0 (22 B): d fp16 | qh u32 | qs[16]  bit j of qh: 5th bit of elem j; d*(q-16)
# block_q5_1 (24 B): d fp16 | m fp16 | qh u32 | qs[16]  d*q + m
# block_q8_0 (34 B): d fp16 | int8 qs[32]      d*q


def quantize_f32(x: Floats, qw: Floats | None) -> Bytes:
    return np.ascontiguousarray(x, dtype=F32).view(np.uint8)


def quantize_f16(x: Floats, qw: Floats | None) -> Bytes:
    return x.astype(np.float16).view(np.uint8)


def via_gguf(qtype: gguf.GGMLQuantizationType) -> RowKernel:
    """The gguf library's quantizer for qtype, as a row kernel that ignores importance."""

    def quantize(x: Floats, qw: Floats | None) -> Bytes:
        return gguf.quants.quantize(x, qtype)

    return quantize


def dequantize_via_gguf(qtype: gguf.GGMLQuantizationType) -> Callable[[Bytes], Floats]:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 through the gguf library."""

    def dequantize(b: Bytes) -> Floats:
        return gguf.quants.dequantize(np.ascontiguousarray(b), qtype).astype(F32, copy=False)

    return dequantize


def _weighted_blocks(x: Floats, qw: Floats) -> tuple[Floats, Floats]:
    """Element-major blocks (32, rows * cols // 32) of x and of `qw[j] * sqrtf(sigma2 + x[j]*x[j])`.

    sigma2 = sum_x2 / n_per_row over the whole row, summed in order like the C loop.
    """
    rows, cols = x.shape
    xt = np.ascontiguousarray(x.T)
    sigma2 = seqsum(xt * xt) / F32(cols)  # (rows,)
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)
    qws = np.tile(qw.reshape(-1, 32).T, (1, rows))
    return xs, qws * np.sqrt(np.repeat(sigma2, cols // 32) + xs * xs)


def _fp16_bytes(v: Floats) -> Bytes:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(levels: NDArray) -> Bytes:
    """(n, 32) levels -> qs (n, 16): byte j = elem j & 15 | (elem j+16 & 15) << 4."""
    return ((levels[:, :16] & 0xF) | (levels[:, 16:] & 0xF) << 4).astype(np.uint8)


def _high_bits(levels: NDArray) -> Bytes:
    """(n, 32) 5-bit levels -> qh (n, 4): little-endian uint32 with bit j = bit 4 of elem j."""
    qh = ((levels >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=1)
    return qh.astype("<u4").reshape(-1, 1).view(np.uint8)


def _imatrix_kernel(nmax: int, with_min: bool, fallback: gguf.GGMLQuantizationType) -> RowKernel:
    """Row kernel for q4_0 (nmax 8), q5_0 (16) or, with_min, q4_1 (15) and q5_1 (31)."""
    five_bit = nmax in (16, 31)
    plain = via_gguf(fallback)

    def quantize(x: Floats, qw: Floats | None) -> Bytes:
        if qw is None:
            return plain(x, None)
        xs, weights = _weighted_blocks(x, qw)
        if with_min:
            scale, levels, the_min = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, False)
            head = [_fp16_bytes(scale), _fp16_bytes(-the_min)]
        else:
            scale, levels = make_qx_quants(xs, nmax, weights)
            head = [_fp16_bytes(scale)]
        lv = levels.T
        parts = [*head, _high_bits(lv)] if five_bit else head
        return np.concatenate([*parts, _nibbles(lv)], axis=1).reshape(x.shape[0], -1)

    return quantize


quantize_q4_0 = _imatrix_kernel(8, False, Q.Q4_0)
quantize_q4_1 = _imatrix_kernel(15, True, Q.Q4_1)
quantize_q5_0 = _imatrix_kernel(16, False, Q.Q5_0)
quantize_q5_1 = _imatrix_kernel(31, True, Q.Q5_1)
