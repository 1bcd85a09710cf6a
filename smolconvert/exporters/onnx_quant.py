"""Weight-only block quantization for onnxruntime's MatMulNBits / GatherBlockQuantized, and recipes.

Codec: a (rows N, cols K) weight is cut into blocks of `block_size` along K (zero-padded to whole
blocks); each block keeps `bits`-bit levels q and a scale, dequantized as (q - zero_point) * scale,
the formula of onnxruntime's `contrib_ops/cpu/quantization/matmul_nbits.cc`. Zero points are either
the op's implicit 2**(bits-1) (symmetric), packed uint8 per block (asymmetric), or "offset16": the
symmetric kernel plus a float offset r per block, w = scale * (q - 2**(bits-1)) + r (fp16 r;
~exact on llama.cpp's Q4_1 scale+min grid, w = d*q + m). The offset is applied in the graph as
(block sums of x) @ R^T, because MatMulNBits' own float zero points run ~10x slower than none
(measured 6.1 ms vs 0.7 ms, K=576 N=1536 M=1, onnxruntime 1.32 CPU).
Weights only: activations stay float, unlike `quantize_dynamic` (the reason its KLD is poor).
Recipe: ordered first-match rules (role -> codec), kept apart from packing and graph building.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from smolconvert.quantizers.scale_search import make_qx_quants

Floats = NDArray[np.float32]


@dataclass(frozen=True)
class BlockCodec:
    name: str
    bits: int  # 4 or 8
    block_size: int  # 32, 64, 128
    zero_point: str  # "none" (implicit 2**(bits-1)), "uint8" (packed), "offset16" (fp16 r)

    @property
    def bits_per_weight(self) -> float:
        zp = {"none": 0, "uint8": self.bits, "offset16": 16}[self.zero_point]
        return self.bits + (32 + zp) / self.block_size  # fp32 scales: MatMulNBits wants A's type


@dataclass(frozen=True)
class QuantizedWeight:
    codec: BlockCodec
    shape: tuple[int, int]  # (N, K) logical
    packed: NDArray[np.uint8]  # (N, n_blocks, block_size * bits / 8), MatMulNBits' B
    scales: Floats  # (N, n_blocks)
    zero_points: NDArray[np.uint8] | None  # (N, ceil(n_blocks * bits / 8)) packed uint8
    offsets: NDArray[np.float16] | None = None  # (N, n_blocks) r, with the implicit zero point


CODECS = {
    c.name: c
    for c in (
        BlockCodec(f"int{bits}_b{bs}_{zp}", bits, bs, zp)
        for bits in (4, 8)
        for bs in (32, 64, 128)
        for zp in ("none", "uint8", "offset16")
    )
}


def _blocks(w: Floats, block_size: int) -> Floats:
    """(N, K) -> (N, n_blocks, block_size), zero-padded along K as MatMulNBits pads."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = np.pad(w, ((0, 0), (0, nb * block_size - k)))
    return np.ascontiguousarray(w, np.float32).reshape(n, nb, block_size)


def _pack(levels: NDArray, bits: int) -> NDArray[np.uint8]:
    """Levels along the last axis, low-order bits first (`matmul_nbits.cc` layout)."""
    levels = levels.astype(np.uint8)
    if bits == 8:
        return levels
    if levels.shape[-1] % 2:
        levels = np.concatenate([levels, np.zeros_like(levels[..., :1])], axis=-1)
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: NDArray[np.uint8], bits: int, n: int) -> NDArray[np.uint8]:
    if bits == 8:
        return packed[..., :n]
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


def _symmetric(x: Floats, bits: int) -> tuple[Floats, NDArray]:
    """llama.cpp's make_qx_quants sweep (weights x*x): levels [0, 2**bits), zero point 2**(b-1)."""
    nb_total = x.shape[0] * x.shape[1]
    flat = x.reshape(nb_total, -1).T  # (block_size, blocks): element-major, as scale_search wants
    scale, levels = make_qx_quants(np.ascontiguousarray(flat), 1 << (bits - 1))
    return scale.reshape(x.shape[:2]), levels.T.reshape(x.shape)


def _asymmetric_uint8(x: Floats, bits: int) -> tuple[Floats, NDArray, NDArray]:
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


def quantize(w: Floats, codec: BlockCodec) -> QuantizedWeight:
    x = _blocks(np.asarray(w, np.float32), codec.block_size)
    nmax = (1 << codec.bits) - 1
    zero_points: NDArray | None
    offsets = None
    if codec.zero_point == "none":
        scales, levels = _symmetric(x, codec.bits)
        zero_points = None
    elif codec.zero_point == "uint8":
        scales, zp, levels = _asymmetric_uint8(x, codec.bits)
        zero_points = _pack(zp, codec.bits)
    else:
        # min/max: exact when a block already lies on a scale+min grid (llama.cpp Q4_1), then
        # s*q + lo = s*(q - 2**(b-1)) + r with r = lo + 2**(b-1)*s, stored fp16 (r is centred, so
        # its rounding is at most ~2**-11 of |lo + 8s|, below the old fp16 zero point's |lo|).
        lo, hi = x.min(-1), x.max(-1)
        scales = ((hi - lo) / nmax).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        levels = np.clip(np.rint((x - lo[..., None]) / safe[..., None]), 0, nmax)
        offsets = (lo + (1 << (codec.bits - 1)) * scales).astype(np.float16)
        zero_points = None
    packed = _pack(levels, codec.bits)
    return QuantizedWeight(
        codec, (w.shape[0], w.shape[1]), packed, scales.astype(np.float32), zero_points, offsets
    )


def dequantize(qw: QuantizedWeight) -> Floats:
    c = qw.codec
    n, k = qw.shape
    nb = qw.scales.shape[1]
    levels = _unpack(qw.packed, c.bits, c.block_size).astype(np.float32)  # (N, nb, bs)
    if qw.zero_points is None:
        zp = np.full((n, nb), 1 << (c.bits - 1), np.float32)
    else:
        zp = _unpack(qw.zero_points, c.bits, nb).astype(np.float32)
    w = (levels - zp[..., None]) * qw.scales[..., None]
    if qw.offsets is not None:
        w = w + qw.offsets.astype(np.float32)[..., None]
    return w.reshape(n, -1)[:, :k].astype(np.float32)


# Recipes: ordered first-match rules. Roles: "embedding" (the tied embedding + lm_head, one packed
# buffer read by GatherBlockQuantized and MatMulNBits, or the untied embedding), "lm_head" (untied),
# "linear" (every projection in the blocks). A role mapped to None stays float.
@dataclass(frozen=True)
class Rule:
    role: str
    codec: str | None


@dataclass(frozen=True)
class Recipe:
    name: str
    float_dtype: str  # "float32" | "float16": storage and compute of unquantized tensors
    rules: tuple[Rule, ...] = ()
    accuracy_level: int = 0  # MatMulNBits: 0 = fp32 activations, 4 = int8 activations

    def codec_for(self, role: str) -> BlockCodec | None:
        for rule in self.rules:
            if rule.role == role:
                return CODECS[rule.codec] if rule.codec else None
        return None


RECIPES = {
    "fp32": Recipe("fp32", "float32"),
    "fp16": Recipe("fp16", "float16"),
    "int8": Recipe(
        "int8",
        "float32",
        (
            Rule("embedding", "int8_b32_none"),  # = llama.cpp Q8_0's grid (fp16 scale, block 32)
            Rule("lm_head", "int8_b32_none"),
            Rule("linear", "int8_b32_uint8"),
        ),
        # 8-bit MatMulNBits has a fast CPU kernel only with int8 activations (onnxruntime 1.32,
        # K=576 N=1536 M=1: 0.15 ms at level 4 vs 6.7 ms at level 0).
        accuracy_level=4,
    ),
    "int4": Recipe(
        "int4",
        "float32",
        (
            # The tied table at 4 bits is what fits 100 MB for SmolLM2-135M (8-bit: 114 MB); it
            # costs most of the KLD (measured 0.084 vs 0.0004 with an 8-bit table).
            Rule("embedding", "int4_b32_uint8"),
            Rule("lm_head", "int4_b32_uint8"),
            # float offsets hold llama.cpp Q4_1's scale+min grid exactly; integer zero points
            # cannot (measured mean KLD 0.20 with our searched uint8 zero points vs 0.0004).
            Rule("linear", "int4_b32_offset16"),
        ),
        # int8 activations in MatMulNBits (as the onnxruntime-genai builder's CPU int4): measured
        # decode 28.5 vs 12.8 tok/s at level 0, mean KLD 0.0863 vs 0.0832 (SmolLM2-135M, 2 threads).
        accuracy_level=4,
    ),
}


def role_of(name: str) -> str:
    """The recipe role of a canonical tensor name ("norm" tensors always stay float)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    return "linear" if name.endswith("proj.weight") else "norm"


def stored_weight(recipe: Recipe, name: str, w: Floats) -> Floats:
    """The float32 weight the exported graph really multiplies by (quantized, then dequantized)."""
    codec = recipe.codec_for(role_of(name))
    return w if codec is None else dequantize(quantize(w, codec))
