"""Weight-only block quantization for onnxruntime's MatMulNBits / GatherBlockQuantized, and recipes.

Codec: a (rows N, cols K) weight is cut into blocks of `block_size` along K (zero-padded to whole
blocks); each block keeps `bits`-bit levels q and a scale, dequantized as (q - zero_point) * scale,
the formula of onnxruntime's `contrib_ops/cpu/quantization/matmul_nbits.cc`. Zero points are either
the op's implicit 2**(bits-1) (symmetric) or packed uint8 per block (asymmetric); float zero points
are left out: MatMulNBits runs them ~10x slower than none (measured 6.1 ms vs 0.7 ms, K=576
N=1536 M=1, onnxruntime 1.32 CPU). Levels come from round-to-nearest with the codec's scale
search, or from GPTQ on calibration Hessians (quantizers/gptq.py) when the recipe asks for it.
Weights only: activations stay float, unlike `quantize_dynamic` (the reason its KLD is poor).
Recipe: ordered first-match rules (role -> codec), kept apart from packing and graph building.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from smolconvert.quantizers.gptq import gptq
from smolconvert.quantizers.scale_search import make_qx_quants

if TYPE_CHECKING:
    import torch

    from smolconvert.quantizers.gptq import Segments

Floats = NDArray[np.float32]


@dataclass(frozen=True)
class BlockCodec:
    name: str
    bits: int  # 4 or 8
    block_size: int  # 32, 64, 128
    zero_point: str  # "none" (implicit 2**(bits-1)) or "uint8" (packed)

    @property
    def bits_per_weight(self) -> float:
        zp = {"none": 0, "uint8": self.bits}[self.zero_point]
        return self.bits + (32 + zp) / self.block_size  # fp32 scales: MatMulNBits wants A's type


@dataclass(frozen=True)
class QuantizedWeight:
    codec: BlockCodec
    shape: tuple[int, int]  # (N, K) logical
    packed: NDArray[np.uint8]  # (N, n_blocks, block_size * bits / 8), MatMulNBits' B
    scales: Floats  # (N, n_blocks)
    zero_points: NDArray[np.uint8] | None  # (N, ceil(n_blocks * bits / 8)) packed uint8


CODECS = {
    c.name: c
    for c in (
        BlockCodec(f"int{bits}_b{bs}_{zp}", bits, bs, zp)
        for bits in (4, 8)
        for bs in (32, 64, 128)
        for zp in ("none", "uint8")
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


def quantize(
    w: Floats, codec: BlockCodec, hessian: torch.Tensor | Segments | None = None
) -> QuantizedWeight:
    """Round-to-nearest with the codec's scale search, or GPTQ against `hessian` (K, K) on that
    search's grid; given segments [(rows, H), ...], each row range on its own Hessian."""
    x = _blocks(np.asarray(w, np.float32), codec.block_size)
    # The scale searches hold ~10 float temporaries of their input; every row block is searched on
    # its own (the sums are sequential per block), so chunks of rows give the same bytes while
    # bounding that to a few MB (the whole 1.7B embedding took GBs).
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))
    chunks = [x[i : i + step] for i in range(0, max(len(x), 1), step)]
    zero_points: NDArray | None
    if codec.zero_point == "none":
        found = [_symmetric(c, codec.bits) for c in chunks]
        scales, levels = (np.concatenate(parts) for parts in zip(*found, strict=True))
        zeros = np.full(scales.shape, 1 << (codec.bits - 1), np.float32)
        zero_points = None
    else:
        found3 = [_asymmetric_uint8(c, codec.bits) for c in chunks]
        scales, zp, levels = (np.concatenate(parts) for parts in zip(*found3, strict=True))
        zeros = zp.astype(np.float32)
        zero_points = _pack(zp, codec.bits)
    del chunks, x
    scales = scales.astype(np.float32)
    if hessian is not None:
        segments = hessian if isinstance(hessian, list) else [(len(w), hessian)]
        assert sum(n for n, _ in segments) == len(w), ([n for n, _ in segments], len(w))
        w32, parts, start = np.asarray(w, np.float32), [], 0
        for n, h in segments:
            rows = slice(start, start + n)
            r = gptq(w32[rows], h, codec.bits, codec.block_size, scales[rows], zeros[rows])
            parts.append(r)
            start += n
        levels = np.concatenate([r.levels for r in parts]).reshape(levels.shape)
        scales = np.concatenate([r.scales for r in parts])
    return QuantizedWeight(
        codec, (w.shape[0], w.shape[1]), _pack(levels, codec.bits), scales, zero_points
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
    return w.reshape(n, -1)[:, :k].astype(np.float32)


# Recipes: ordered first-match rules. Roles: "embedding" (the tied embedding + lm_head, one packed
# buffer read by GatherBlockQuantized and MatMulNBits, or the untied embedding), "lm_head" (untied),
# "q", "k", "v" (the attention input projections, each else as "linear"), and "linear" (every
# other projection). A role mapped to None stays float.
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
    gptq: bool = False  # quantize every tensor with GPTQ on calibration text (quantizers/gptq.py)
    kv_cache: str = "float"  # "int8": the fused graph's cache is int8 (exporters/onnx_kv.py)

    def codec_for(self, role: str) -> BlockCodec | None:
        """The first rule for `role`; "q", "k" and "v" fall back to "linear" when no rule names
        them."""
        for want in (role, "linear") if role in ("q", "k", "v") else (role,):
            for rule in self.rules:
                if rule.role == want:
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
        kv_cache="int8",  # mean KLD 0.0035 -> 0.0051; decode 1.19x in onnxruntime (paired)
    ),
    "int4": Recipe(
        "int4",
        "float32",
        (
            # Symmetric blocks of 32 (MatMulNBits' fastest kernels, no zero points) everywhere,
            # GPTQ'd on calibration text (act order, scales refit, k and v on attention-weighted
            # Hessians). All of q/k/v then share one MatMulNBits, as the onnxruntime-genai
            # builder's graph does: each extra MatMulNBits plus the Concat for
            # GroupQueryAttention cost ~13 us per layer on 2 threads, ~4% of a decode step.
            # Measured on SmolLM2-135M in onnxruntime (mean KLD, 4 windows): 0.0635 at 84.3 MB
            # (plain Hessians 0.0905; 8-bit k and v as a second MatMulNBits 0.0538 at 87.6 MB,
            # 5% slower; integer zero points on q/k/v 0.0854 on plain Hessians). Blocks of 64:
            # 0.086 at 77.6 MB and decoded no faster (int8 activations are quantized per block
            # too); the tied table in blocks of 128: 0.0795. Earlier, weight-level: GPTQ took
            # the 4-bit tied table from 0.084 (round-to-nearest) to 0.013.
            Rule("embedding", "int4_b32_none"),
            Rule("lm_head", "int4_b32_none"),
            Rule("linear", "int4_b32_none"),
        ),
        # int8 activations in MatMulNBits (as the onnxruntime-genai builder's CPU int4): measured
        # decode 28.5 vs 12.8 tok/s at level 0, mean KLD 0.0863 vs 0.0832 (SmolLM2-135M, 2 threads).
        accuracy_level=4,
        gptq=True,
        # Keys and values as int8 with calibrated per-channel scales: mean KLD 0.0635 -> 0.0655,
        # decode ~1.2x faster in onnxruntime and ~1.05x in onnxruntime-genai at 128-608 tokens
        # of context, ~1.6x and ~1.2x at 2048-2528 (see onnx_kv.py).
        kv_cache="int8",
    ),
}


def role_of(name: str) -> str:
    """The recipe role of a canonical tensor name ("norm" tensors always stay float)."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    for role in ("q", "k", "v"):
        if name.endswith(f"{role}_proj.weight"):
            return role
    return "linear" if name.endswith("proj.weight") else "norm"


def codec_runs(recipe: Recipe, parts: list[str]) -> list[tuple[BlockCodec | None, list[str]]]:
    """Weights that read one input, in order, cut into runs of one codec: each run is one
    projection stacked along N (q/k/v as one when they share a codec)."""
    runs: list[tuple[BlockCodec | None, list[str]]] = []
    for part in parts:
        codec = recipe.codec_for(role_of(part))
        if runs and runs[-1][0] == codec:
            runs[-1][1].append(part)
        else:
            runs.append((codec, [part]))
    return runs


def split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """A weight quantized as stacked rows -> its parts' weights (quantization is per row)."""
    out, start = [], 0
    for n in rows:
        sl = slice(start, start + n)
        zp = None if qw.zero_points is None else qw.zero_points[sl]
        out.append(QuantizedWeight(qw.codec, (n, qw.shape[1]), qw.packed[sl], qw.scales[sl], zp))
        start += n
    assert start == qw.shape[0], (rows, qw.shape)
    return out


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The inverse of split_rows: parts of one codec and K stacked along N."""
    first = parts[0]
    assert all(p.codec == first.codec and p.shape[1] == first.shape[1] for p in parts)

    zps = [p.zero_points for p in parts]
    return QuantizedWeight(
        first.codec,
        (sum(p.shape[0] for p in parts), first.shape[1]),
        np.concatenate([p.packed for p in parts], axis=0),
        np.concatenate([p.scales for p in parts], axis=0),
        None if zps[0] is None else np.concatenate(zps, axis=0),
    )
