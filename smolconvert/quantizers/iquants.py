"""GGUF's 4-bit non-linear codecs iq4_nl and iq4_xs, bit-exact with llama.cpp.

Each weight becomes the index of the nearest of 16 fixed levels (gguf's IQ4_NL.kvalues) under a
scale per 32 weights, found by `quantize_row_iq4_nl_impl` with ntry = 7, the path `quantize_iq4_nl`
and `quantize_iq4_xs` take with and without importance (ggml/src/ggml-quants.c @ 0c1e57098).
The search runs element-major over all blocks at once, like `kquants`; nothing loops over blocks.
"""

from __future__ import annotations

import gguf
import numpy as np
from numpy.typing import NDArray

from smolconvert.quantizers.scale_search import (
    F32,
    GROUP_MAX_EPS,
    Floats,
    abs_max,
    nearest_int,
    seqsum,
)

Bytes = NDArray[np.uint8]
Indices = NDArray[np.intp]

KVALUES = np.asarray(gguf.quants.IQ4_NL.kvalues, dtype=F32)  # kvalues_iq4nl: -127 .. 113, sorted
NTRY = 7  # scale candidates (itry + kvalues[0]) / max for itry in -7..7
QK4_NL = 32
QK_K = 256

# block_iq4_nl (18 B): d fp16 | qs[16]   byte j: index of elem j low nibble, elem j+16 high
#   value = d * kvalues[q]
# block_iq4_xs (136 B): d fp16 | scales_h u16 | scales_l[4] | qs[128]
#   sub-block j (elems 32j..32j+31) has a 6-bit code c = l + 32: low 4 bits in nibble j % 2 of
#   scales_l[j // 2], high 2 bits at bits 2j of scales_h; qs[16j .. 16j+15] as in iq4_nl
#   value = d * l * kvalues[q]

# Lanes of blocks that C skips (all-zero, no positive weight) still compute here, then are masked.
_masked_lanes = np.errstate(divide="ignore", invalid="ignore", over="ignore")


# C's bisection ends at mu, the first level above x (kept in 1..15). The levels are integers, so
# for finite x that is the first level above floor(x): one table row per floor from just below
# the lowest level (-128) to the highest (113).
_FLOORS = np.arange(KVALUES[0] - 1, KVALUES[-1] + 1, dtype=F32)
_UPPER = np.clip(np.searchsorted(KVALUES, _FLOORS, side="right"), 1, 15)
_V_LOW, _V_HIGH = KVALUES[_UPPER - 1], KVALUES[_UPPER]


def _bracket(x: Floats) -> Indices:
    """Table row of each x: floor(x) clamped to the table; NaN takes the top row (fmin drops
    it), where C's bisection also ends."""
    floor = np.fmax(np.fmin(np.floor(x), _FLOORS[-1]), _FLOORS[0])
    return (floor - _FLOORS[0]).astype(np.intp)


def best_index(x: Floats) -> Indices:
    """`best_index_int8(16, kvalues_iq4nl, x)` elementwise: the index of the nearest level.

    Between levels v[m-1] <= x < v[m] C keeps m-1 only if `x - v[m-1] < v[m] - x` (a tie goes
    up); with m kept in 1..15 the same float32 test gives 0 below v[0] and 15 above v[15], and
    NaN, which passes no comparison, 15.
    """
    k = _bracket(x)
    return np.where(x - _V_LOW[k] < _V_HIGH[k] - x, _UPPER[k] - 1, _UPPER[k])


def nearest_level(x: Floats) -> Floats:
    """`kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, x)]`, without the index."""
    k = _bracket(x)
    low, high = _V_LOW[k], _V_HIGH[k]
    return np.where(x - low < high - x, low, high)


def _weights(x: Floats, xs: Floats, qw: Floats | None, super_block: int) -> Floats:
    """The search weights, element-major like xs (32, G): x*x, or with importance
    `qw[j] * sqrtf(sigma2 + x[j]*x[j])`, sigma2 = 2 * sum(x^2) / super_block per super-block."""
    if qw is None:
        return xs * xs
    xt = np.ascontiguousarray(x.reshape(-1, super_block).T)
    sigma2 = seqsum(xt * xt) * F32(2 / super_block)  # (n_super,)
    qws = np.tile(qw.reshape(-1, QK4_NL).T, (1, x.shape[0]))
    return qws * np.sqrt(np.repeat(sigma2, super_block // QK4_NL) + xs * xs)


@_masked_lanes
def _block_scales(xs: Floats, w: Floats) -> Floats:
    """The per-block scale search: xs, w (32, G) -> d (G,), 0 for blocks with max |x| < 1e-15.

    Starts from d = -max / kvalues[0] (levels by nearest value, then the weighted least-squares
    scale), then tries the 15 inverse scales (itry + kvalues[0]) / max and keeps any whose fit
    beats the best so far (sumqx^2 / sumq2, compared without dividing).
    """
    amax, vmax = abs_max(xs)

    def fit(iscale: Floats) -> tuple[Floats, Floats]:
        q = nearest_level(iscale * xs)
        wq = w * q
        return seqsum(wq * xs), seqsum(wq * q)

    sumqx, sumq2 = fit(F32(1) / (-vmax / KVALUES[0]))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit((F32(itry) + KVALUES[0]) / vmax)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d)


@_masked_lanes
def _inverse(d: Floats) -> Floats:
    """`d ? 1/d : 0.f`"""
    return np.where(d != 0, F32(1) / d, F32(0))


def _fp16_bytes(v: Floats) -> Bytes:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(idx: Indices) -> Bytes:
    """(32, G) element-major indices -> qs (G, 16): byte j = idx[j] | idx[j + 16] << 4."""
    return (idx[:16] | idx[16:] << 4).T.astype(np.uint8)


def quantize_iq4_nl(x: Floats, qw: Floats | None) -> Bytes:
    """(rows, cols) float32 [+ (cols,) importance] -> (rows, cols // 32 * 18) block_iq4_nl.

    One block is its own super-block: the fp16 scale is the searched d, and the indices are
    re-picked with 1/d (unrounded), as `quantize_row_iq4_nl_impl` does for ntry > 0.
    """
    rows = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, QK4_NL).T)  # (32, rows * cols // 32)
    d = _block_scales(xs, _weights(x, xs, qw, QK4_NL))
    idx = best_index(_inverse(d) * xs)
    return np.concatenate([_fp16_bytes(d), _nibbles(idx)], axis=1).reshape(rows, -1)


def quantize_iq4_xs(x: Floats, qw: Floats | None) -> Bytes:
    """(rows, cols) float32 [+ (cols,) importance] -> (rows, cols // 256 * 136) block_iq4_xs.

    The 8 sub-block scales become l = nearest_int(scale / d), clamped to -32..31, against
    d = -max_scale / 32 (max_scale: the sub-block scale of largest magnitude; an all-zero
    super-block stores d = -0.0), and indices are re-picked with 1 / (d * l) in float32.
    """
    rows = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, QK4_NL).T)  # (32, 8 * n)
    scales = _block_scales(xs, _weights(x, xs, qw, QK_K)).reshape(-1, QK_K // QK4_NL)  # (n, 8)
    d = -abs_max(scales, axis=1)[1] / F32(32)
    ls = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
    idx = best_index(_inverse(d[:, None] * ls.astype(F32)).reshape(-1) * xs)
    codes = ls + 32
    scales_l = codes[:, 0::2] & 0xF | (codes[:, 1::2] & 0xF) << 4
    scales_h = ((codes >> 4) << 2 * np.arange(8)).sum(axis=1).astype("<u2")
    parts = [
        _fp16_bytes(d),
        scales_h.reshape(-1, 1).view(np.uint8),
        scales_l.astype(np.uint8),
        _nibbles(idx).reshape(-1, QK_K // 2),
    ]
    return np.concatenate(parts, axis=1).reshape(rows, -1)
