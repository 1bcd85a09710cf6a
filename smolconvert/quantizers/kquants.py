"""GGUF K-quants (q2_k .. q6_k): llama.cpp's reference and importance-weighted searches, bit-exact.

Each codec is a pair of block kernels: (n, 256) float32 [+ (n, 256) importance] -> (n, type_size)
uint8, and back. The searches mirror `quantize_row_qN_K_ref` (no importance) and
`quantize_row_qN_K_impl` (importance: llama.cpp's imatrix path) in ggml/src/ggml-quants.c
@ 0c1e57098; `scale_search` holds the shared helpers. Sub-block searches run element-major over all
sub-blocks at once, the re-quantization with the stored fp16 / 6-bit scales block-major; nothing
loops over blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert.quantizers.scale_search import (
    F32,
    GROUP_MAX_EPS,
    Floats,
    abs_max,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)

QK_K = 256
Bytes = NDArray[np.uint8]


def _groups(x: Floats, size: int) -> Floats:
    """(n, 256) -> (size, n * 256 // size), element-major: sub-block g = block * 256 // size + j."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _per_block(a: NDArray, n: int) -> NDArray:
    """(size, n * k) element-major -> (n, k, size) block-major."""
    return a.T.reshape(n, -1, a.shape[0])


def _superblock_sumsq(x: Floats) -> Floats:
    """`for (l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];` per super-block -> (n,)."""
    xt = _groups(x, QK_K)
    return seqsum(xt * xt)


def _imatrix_weights(x: Floats, qw: Floats, sigma2: Floats, size: int) -> Floats:
    """`qw[l] * sqrtf(sigma2 + x[l]*x[l])` element-major; sigma2 is per super-block."""
    xs = _groups(x, size)
    return _groups(qw, size) * np.sqrt(np.repeat(sigma2, QK_K // size) + xs * xs)


def _fp16_bytes(v: Floats) -> Bytes:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _fp16(b: Bytes) -> Floats:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _max_scales(scales: Floats, mins: Floats, n: int, levels: int) -> tuple[NDArray, ...]:
    """The _ref tail shared by q2_K/q4_K/q5_K: quantize sub-block scales and mins against their max.

    Returns (ls, lm) as the uint8 values C stores (before any clamp) and the float32 super-block
    scales (d, dmin) that become the block's fp16 fields.
    """
    s, m = scales.reshape(n, -1), mins.reshape(n, -1)
    # `if (scale > max_scale) max_scale = scale;` from 0: NaN never wins
    max_scale = np.fmax(np.fmax.reduce(s, axis=1), F32(0))
    max_min = np.fmax(np.fmax.reduce(m, axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(levels) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(levels) / max_min, F32(0))
    ls = nearest_int(inv_scale[:, None] * s) & 0xFF
    lm = nearest_int(inv_min[:, None] * m) & 0xFF
    return ls, lm, max_scale / F32(levels), max_min / F32(levels)


# --- q4_K / q5_K: 8 sub-blocks of 32, 6-bit scale and min each ------------------------------------
#
# block_q4_K (144 B)                      block_q5_K (176 B)
#   0  d     fp16  super-block scale        0  d, 2 dmin, 4 scales[12]   (same head)
#   2  dmin  fp16  super-block min scale   16  qh[32]  bit 2c+h of qh[l]: 5th bit of elem 64c+32h+l
#   4  scales[12]  6-bit sc[j], m[j]:      48  qs[128] low nibbles, as in q4_K
#        bytes 0-3 : sc[0..3] | (sc[4..7] >> 4) << 6
#        bytes 4-7 : m[0..3]  | (m[4..7]  >> 4) << 6
#        bytes 8-11: sc[4..7] & 15 | (m[4..7] & 15) << 4
#  16  qs[128]  byte 32c+l: low nibble elem 64c+l, high nibble elem 64c+32+l
# value = d*sc[j]*q - dmin*m[j] for element e in sub-block j = e // 32


def pack_k4_scales(ls: NDArray, lm: NDArray) -> Bytes:
    """(n, 8) scale and min codes -> (n, 12) as the quantizers write them (C uint8 truncation)."""
    return (
        np.concatenate(
            [
                ls[:, :4] | (ls[:, 4:] >> 4) << 6,
                lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4,
            ],
            axis=1,
        )
        & 0xFF
    ).astype(np.uint8)


def unpack_k4_scales(q: Bytes) -> tuple[NDArray, NDArray]:
    """`get_scale_min_k4` for all j: (n, 12) -> (sc, m), each (n, 8) in 0..63."""
    q = q.astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | (q[:, 0:4] >> 6) << 4], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | (q[:, 4:8] >> 6) << 4], axis=1)
    return sc, m


def _quantize_k45(x: Floats, qw: Floats | None, nmax: int) -> tuple[Bytes, NDArray]:
    """The search shared by q4_K (nmax 15) and q5_K (31): head bytes (n, 16), levels (n, 256)."""
    n = x.shape[0]
    xs = _groups(x, 32)  # (32, n * 8)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        av_x = np.sqrt(seqsum(xs * xs) / F32(32))
        weights = av_x + np.abs(xs)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, levels, mins = make_qkx_quants(xs, weights, nmax, rmin, rdelta, nstep, False)
        ls, lm, d, dmin = _max_scales(scales, mins, n, 63)
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = F32(2) * _superblock_sumsq(x) / F32(QK_K)
        weights = _imatrix_weights(x, qw, sigma2, 32)
        sw = seqsum(weights).reshape(n, 8).T
        scales, levels, mins = make_qkx_quants(xs, weights, nmax, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(n, 8).T), 63, sw)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(n, 8).T), 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # only q5_K_impl clamps here
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    scale_bytes = pack_k4_scales(ls, lm)
    head = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), scale_bytes], axis=1)
    sc, m = unpack_k4_scales(scale_bytes)
    d_sub = _fp16(head[:, 0:2]) * sc.astype(F32)  # (n, 8)
    m_sub = _fp16(head[:, 2:4]) * m.astype(F32)
    xb = x.reshape(n, 8, 32)
    requant = np.clip(nearest_int((xb + m_sub[..., None]) / d_sub[..., None]), 0, nmax)
    levels = np.where(d_sub[..., None] != 0, requant, _per_block(levels, n))
    return head, levels.reshape(n, QK_K)


def quantize_q4_k(x: Floats, qw: Floats | None) -> Bytes:
    n = x.shape[0]
    head, levels = _quantize_k45(x, qw, 15)
    lv = levels.reshape(n, 4, 2, 32)
    qs = lv[:, :, 0] | lv[:, :, 1] << 4
    return np.concatenate([head, qs.reshape(n, 128).astype(np.uint8)], axis=1)


def quantize_q5_k(x: Floats, qw: Floats | None) -> Bytes:
    n = x.shape[0]
    head, levels = _quantize_k45(x, qw, 31)
    lv = levels.reshape(n, 4, 2, 32)
    qs = (lv[:, :, 0] & 0xF) | (lv[:, :, 1] & 0xF) << 4
    high = (levels.reshape(n, 8, 32) >> 4) << np.arange(8).reshape(1, 8, 1)
    qh = high.sum(axis=1)
    return np.concatenate([head, qh.astype(np.uint8), qs.reshape(n, 128).astype(np.uint8)], axis=1)


def dequantize_q4_k(b: Bytes) -> Floats:
    n = b.shape[0]
    sc, m = unpack_k4_scales(b[:, 4:16])
    d1 = (_fp16(b[:, 0:2]) * sc.astype(F32))[..., None]
    m1 = (_fp16(b[:, 2:4]) * m.astype(F32))[..., None]
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0xF).reshape(n, 8, 32).astype(F32)
    return (d1 * q - m1).reshape(n, QK_K)


def dequantize_q5_k(b: Bytes) -> Floats:
    n = b.shape[0]
    sc, m = unpack_k4_scales(b[:, 4:16])
    d1 = (_fp16(b[:, 0:2]) * sc.astype(F32))[..., None]
    m1 = (_fp16(b[:, 2:4]) * m.astype(F32))[..., None]
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qs = b[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = ((qs & 0xF).reshape(n, 8, 32) | (qh & 1) << 4).astype(F32)
    return (d1 * q - m1).reshape(n, QK_K)


# --- q6_K: 16 sub-blocks of 16, int8 scales ------------------------------------------------------
#
# block_q6_K (210 B)
#    0  ql[128]  half h (elements 128h..128h+127), l < 32:
#                  byte 64h+l    = q[128h+l] & 15    | (q[128h+64+l] & 15) << 4
#                  byte 64h+32+l = q[128h+32+l] & 15 | (q[128h+96+l] & 15) << 4
#  128  qh[64]   byte 32h+l = q[128h+l] >> 4 | q[128h+32+l] >> 4 << 2 | ..64.. << 4 | ..96.. << 6
#  192  scales[16] int8
#  208  d fp16
# value = d * scales[e // 16] * (q - 32), q in 0..63


def quantize_q6_k(x: Floats, qw: Floats | None) -> Bytes:
    """`quantize_row_q6_K_ref` / `_impl` (the imatrix weights replace x*x; no sigma term)."""
    n = x.shape[0]
    scales, levels = make_qx_quants(_groups(x, 16), 32, None if qw is None else _groups(qw, 16))
    s = scales.reshape(n, 16)
    max_abs, max_scale = abs_max(s, axis=1)
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / max_scale
    d = _fp16_bytes(F32(1) / iscale)
    sc = np.minimum(127, nearest_int(iscale[:, None] * s)).astype(np.int8)
    d_sub = _fp16(d) * sc.astype(F32)  # (n, 16)
    requant = np.clip(nearest_int(x.reshape(n, 16, 16) / d_sub[..., None]), -32, 31) + 32
    lv = np.where(d_sub[..., None] != 0, requant, _per_block(levels, n)).reshape(n, 2, 4, 32)
    ql = np.concatenate(
        [
            (lv[:, :, 0] & 0xF) | (lv[:, :, 2] & 0xF) << 4,
            (lv[:, :, 1] & 0xF) | (lv[:, :, 3] & 0xF) << 4,
        ],
        axis=2,
    )
    qh = ((lv >> 4) << (2 * np.arange(4)).reshape(1, 1, 4, 1)).sum(axis=2)
    out = np.concatenate(
        [
            ql.reshape(n, 128).astype(np.uint8),
            qh.reshape(n, 64).astype(np.uint8),
            sc.view(np.uint8),
            d,
        ],
        axis=1,
    )
    out[zero] = 0  # all-zero super-block: memset
    return out


def dequantize_q6_k(b: Bytes) -> Floats:
    n = b.shape[0]
    nibble = np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql: NDArray[Any] = b[:, :128].reshape(n, 2, 1, 64) >> nibble
    ql = (ql & 0xF).reshape(n, 2, 4, 32)  # element 128h + 32k + l
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> shifts
    q = (ql | (qh & 3) << 4).astype(np.int8) - np.int8(32)
    d = _fp16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(F32)
    return (d[..., None] * q.reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)


# --- q2_K / q3_K: 16 sub-blocks of 16, 2-bit low quants ------------------------------------------
#
# 2-bit planes (qs[64], both types): byte 32h+l holds elements 128h+32k+l at bits 2k (k = 0..3)
# block_q2_K (84 B)                          block_q3_K (110 B)
#   0  scales[16]  sc & 15 | m << 4            0  hmask[32]  bit k of byte l: 3rd bit of elem 32k+l
#  16  qs[64]                                 32  qs[64]
#  80  d    fp16                              96  scales[12] 6-bit codes c[j] (sc = c - 32):
#  82  dmin fp16                                   bytes 0-7 : c[0..7] & 15 | (c[8..15] & 15) << 4
# value = d*sc*q - dmin*m                          bytes 8-11: byte 8+r = sum_k (c[4k+r] >> 4) << 2k
#                                            108  d fp16;  value = d*sc*(q - (hbit ? 0 : 4))


def _pack_2bit(levels: NDArray) -> Bytes:
    lv = levels.reshape(-1, 2, 4, 32) << (2 * np.arange(4)).reshape(1, 1, 4, 1)
    return lv.sum(axis=2).reshape(-1, 64).astype(np.uint8)


def _unpack_2bit(qs: Bytes) -> NDArray:
    """(n, 64) -> (n, 16, 16): element e at [e // 16, e % 16]."""
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 16, 16)


def quantize_q2_k(x: Floats, qw: Floats | None) -> Bytes:
    n = x.shape[0]
    xs = _groups(x, 16)  # (16, n * 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, levels, mins = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        ls, lm, d, dmin = _max_scales(scales, mins, n, 15)
    else:  # quantize_row_q2_K_impl
        weights = _imatrix_weights(x, qw, _superblock_sumsq(x) / F32(QK_K), 16)
        sw = seqsum(weights).reshape(n, 16).T
        scales, levels, mins = make_qkx_quants(xs, weights, 3, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 15, sw)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(n, 16).T), 15, sw)
        ls, lm = ls.T, lm.T
    sc = ((ls | lm << 4) & 0xFF).astype(np.uint8)
    tail = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin)], axis=1)
    d_sub = _fp16(tail[:, 0:2]) * (sc & 0xF).astype(F32)
    m_sub = _fp16(tail[:, 2:4]) * (sc >> 4).astype(F32)
    xb = x.reshape(n, 16, 16)
    requant = np.clip(nearest_int((xb + m_sub[..., None]) / d_sub[..., None]), 0, 3)
    levels = np.where(d_sub[..., None] != 0, requant, _per_block(levels, n))
    return np.concatenate([sc, _pack_2bit(levels), tail], axis=1)


def dequantize_q2_k(b: Bytes) -> Floats:
    n = b.shape[0]
    dl = _fp16(b[:, 80:82]) * (b[:, :16] & 0xF).astype(F32)
    ml = _fp16(b[:, 82:84]) * (b[:, :16] >> 4).astype(F32)
    q = _unpack_2bit(b[:, 16:80]).astype(F32)
    return (dl[..., None] * q - ml[..., None]).reshape(n, QK_K)


def _pack_q3_scales(codes: NDArray) -> Bytes:
    low, high = codes & 0xF, codes >> 4
    hi = (high.reshape(-1, 4, 4) << (2 * np.arange(4)).reshape(1, 4, 1)).sum(axis=1)
    return np.concatenate([low[:, :8] | low[:, 8:] << 4, hi], axis=1).astype(np.uint8)


def _unpack_q3_scales(s: Bytes) -> NDArray:
    """(n, 12) -> (n, 16) signed sub-block scales in -32..31."""
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
    return (low | hi.reshape(-1, 16) << 4).astype(np.int32) - 32


def quantize_q3_k(x: Floats, qw: Floats | None) -> Bytes:
    n = x.shape[0]
    xs = _groups(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, levels = make_q3_quants(xs, 4)
        s = scales.reshape(n, 16)
        max_scale = abs_max(s, axis=1)[1]
        iscale = F32(-32) / max_scale
        codes = nearest_int(iscale[:, None] * s)
        codes = np.clip(((codes + 128) & 0xFF) - 128, -32, 31) + 32  # through C's int8_t
        codes = np.where((max_scale != 0)[:, None], codes, 0)
        d = np.where(max_scale != 0, F32(1) / iscale, F32(0))
    else:  # quantize_row_q3_K_impl
        weights = _imatrix_weights(x, qw, F32(2) * _superblock_sumsq(x) / F32(QK_K), 16)
        sw = seqsum(weights).reshape(n, 16).T
        scales, levels = make_qx_quants(xs, 4, weights)
        d, codes = make_qx_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 32, sw)
        codes = codes.T
    scale_bytes = _pack_q3_scales(codes)
    d_bytes = _fp16_bytes(d)
    d_sub = _fp16(d_bytes) * _unpack_q3_scales(scale_bytes).astype(F32)
    requant = np.clip(nearest_int(x.reshape(n, 16, 16) / d_sub[..., None]), -4, 3) + 4
    levels = np.where(d_sub[..., None] != 0, requant, _per_block(levels, n)).reshape(n, QK_K)
    high = levels > 3
    hmask = (high.reshape(n, 8, 32) << np.arange(8).reshape(1, 8, 1)).sum(axis=1)
    low = levels - 4 * high
    return np.concatenate([hmask.astype(np.uint8), _pack_2bit(low), scale_bytes, d_bytes], axis=1)


def dequantize_q3_k(b: Bytes) -> Floats:
    n = b.shape[0]
    dl = _fp16(b[:, 108:110]) * _unpack_q3_scales(b[:, 96:108]).astype(F32)
    hbit = (b[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = _unpack_2bit(b[:, 32:96]).astype(np.int8) - ((hbit ^ 1) << 2).reshape(n, 16, 16).astype(
        np.int8
    )
    return (dl[..., None] * q.astype(F32)).reshape(n, QK_K)
