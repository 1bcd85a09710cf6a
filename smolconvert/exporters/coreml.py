"""Core ML export: the reference decoder traced and converted by coremltools to an mlprogram.

Default: a stateful KV cache (`keyCache`/`valueCache` states, iOS 18 / macOS 15), inputs
`inputIds` (1, T) int32 and `causalMask` (1, 1, T, past+T) additive fp16, output `logits`
(1, T, vocab): Apple's pattern for LLMs on Core ML. `kv_cache=stateless` gives the iOS 17 variant
(no cache, flexible T). Weights are compressed by our own codecs (below) and written into the
program as the iOS 18 constexpr ops Core ML decompresses at load (`constexpr_blockwise_shift_scale`,
`constexpr_lut_to_dense`): data, scales and offsets are ours, not coremltools' min/max. A recipe
(ordered first-match rules, as data) says which tensor gets which codec. Tokenizer files and
`coreml_config.json` sit beside the .mlpackage so an app knows how to drive it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import MissingDependencyError, UnsupportedError
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.quantizers.recipes import role_of, use_more_bits

OPTIONS: dict[str, tuple[str, ...]] = {"kv_cache": ("stateful", "stateless")}
INSTALL_HINT = "pip install 'smolconvert[coreml]'"
LAYOUT_NOTE = (
    "Apple's stateful LLM pattern (WWDC24 'Deploy machine learning models on-device with Core ML'; "
    "swift-transformers): states keyCache/valueCache (layers, 1, kv_heads, ctx, head_dim), "
    "inputs inputIds + causalMask, output logits; coremltools 9.0 mlprogram"
)
MAX_CONTEXT = (
    2048  # cache length of the stateful program (and upper bound of T); capped by the model
)
PACKAGE = "model.mlpackage"

Floats = NDArray[np.float32]


# --- codecs: float32 (rows, cols) -> the arrays of one constexpr op -------------------------------


@dataclass(frozen=True)
class Encoded:
    op: str  # "blockwise_shift_scale" | "lut_to_dense"
    arrays: dict[str, np.ndarray]  # op inputs; sub-byte dtypes carry coremltools' metadata
    storage: str  # what artifact.json's tensor_types says
    nbytes: int  # payload bytes in weight.bin (before 64-byte blob alignment)


@dataclass(frozen=True)
class Codec:
    name: str
    bits_per_weight: float  # for (rows, cols) with cols % 32 == 0, rows % 16 == 0
    encode: Callable[[Floats], Encoded]


def _sub_byte(values: np.ndarray, kind: str) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    dtype = {"uint4": types.np_uint4_dtype, "int4": types.np_int4_dtype}
    if kind in dtype:
        return values.astype(np.uint8 if kind == "uint4" else np.int8).astype(dtype[kind])
    return values.astype(np.uint8 if kind == "uint8" else np.int8)


def int8_channel(w: Floats) -> Encoded:
    """Symmetric int8, one fp16 scale per output row (Core ML's per-channel int8)."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = (amax / 127).astype(np.float16)
    inv = np.where(scale == 0, 0, 1 / scale.astype(np.float32))
    q = np.clip(np.rint(w * inv), -127, 127)
    arrays = {"data": _sub_byte(q, "int8"), "scale": scale}
    return Encoded("blockwise_shift_scale", arrays, "int8_channel", w.size + 2 * w.shape[0])


def _asym_blocks(w: Floats, block: int, integer_offset: bool) -> tuple[np.ndarray, ...]:
    """Asymmetric 4-bit blocks along cols with a searched scale: out = scale * (q - offset).

    For each block try scale = (max - min) / n for n = 15 .. 7 (the grid of a block that does not
    use all 16 levels, as in llama.cpp's make_qkx search), offset = -min / scale (rounded to an
    integer in 0..15 when `integer_offset`, since a uint4 offset must be), and keep the candidate
    with the least squared error. Vectorised over all blocks; the loop is over the 9 candidates.
    """
    rows, cols = w.shape
    x = w.reshape(rows, cols // block, block).astype(np.float32)  # (R, B, 32)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    best = None
    for n in range(15, 6, -1):
        scale = ((hi - lo) / n).astype(np.float16).astype(np.float32)
        inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
        offset = -lo * inv
        if integer_offset:
            offset = np.clip(np.rint(offset), 0, 15)
        else:
            offset = offset.astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x * inv + offset), 0, 15)
        err = ((scale * (q - offset) - x) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, scale, offset]
            continue
        better = err < best[0]
        for i, v in enumerate((err, q, scale, offset)):
            best[i] = np.where(better, v, best[i])
    assert best is not None
    _, q, scale, offset = best
    return q.reshape(rows, cols), scale[..., 0], offset[..., 0]


def int4_block32(w: Floats) -> Encoded:
    """uint4 data, fp16 scale and fp16 offset per 32-block (5.0 bpw): reproduces a Q4_1 grid."""
    q, scale, offset = _asym_blocks(w, 32, integer_offset=False)
    arrays = {
        "data": _sub_byte(q, "uint4"),
        "scale": scale.astype(np.float16),
        "offset": offset.astype(np.float16),
    }
    return Encoded("blockwise_shift_scale", arrays, "uint4_block32_fp16_offset", w.size * 5 // 8)


def int4_block32_zp(w: Floats) -> Encoded:
    """uint4 data, fp16 scale and uint4 zero point per 32-block (4.625 bpw), searched."""
    q, scale, offset = _asym_blocks(w, 32, integer_offset=True)
    arrays = {
        "data": _sub_byte(q, "uint4"),
        "scale": scale.astype(np.float16),
        "offset": _sub_byte(offset, "uint4"),
    }
    return Encoded("blockwise_shift_scale", arrays, "uint4_block32_uint4_offset", w.size * 37 // 64)


def int4_block32_sym(w: Floats) -> Encoded:
    """int4 data and an fp16 scale per 32-block, no offset (4.5 bpw); scale searched among
    amax / n for n in 7 .. 8 (steps of 1/8), the least squared error kept."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // 32, 32).astype(np.float32)
    amax = np.abs(x).max(-1, keepdims=True)
    best = None
    for n in np.arange(7.0, 8.01, 0.125):
        scale = (amax / n).astype(np.float16).astype(np.float32)
        inv = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
        q = np.clip(np.rint(x * inv), -8, 7)
        err = ((scale * q - x) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, scale]
            continue
        better = err < best[0]
        for i, v in enumerate((err, q, scale)):
            best[i] = np.where(better, v, best[i])
    assert best is not None
    arrays = {
        "data": _sub_byte(best[1].reshape(rows, cols), "int4"),
        "scale": best[2][..., 0].astype(np.float16),
    }
    return Encoded("blockwise_shift_scale", arrays, "int4_block32_sym", w.size * 9 // 16)


def _kmeans_1d(x: Floats, k: int, iters: int = 16) -> Floats:
    """Lloyd's k-means on each row of x (G, n) at once; centroids start at quantiles, and the
    first and last stay pinned at the row's min and max.

    Pinning matters: plain k-means spends no centroid on the few outlier weights of a group, yet in
    SmolLM2 those outliers (in o_proj and down_proj, which write the residual stream's massive
    activations) decide the output: unpinned 4-bit tables measured a weight-level KLD of 13.8 on
    the default model. 1-D: with sorted centroids the nearest is found by searchsorted on the
    midpoints.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    lo, hi = t.min(dim=1).values, t.max(dim=1).values
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    c = torch.quantile(t, qs, dim=1).T.contiguous()  # (G, k)
    for _ in range(iters + 1):
        c[:, 0], c[:, -1] = lo, hi
        c, _ = torch.sort(c, dim=1)
        mid = (c[:, 1:] + c[:, :-1]) / 2
        idx = torch.searchsorted(mid.contiguous(), t)
        sums = torch.zeros_like(c).scatter_add_(1, idx, t)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(t))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    c[:, 0], c[:, -1] = lo, hi
    return torch.sort(c, dim=1).values.numpy()  # (G, k) centroids


def palettize(nbits: int, group: int = 16, row_scaled: bool = False) -> Callable[[Floats], Encoded]:
    """An fp16 look-up table of 2**nbits entries, found by k-means over `group` output rows at a
    time (per grouped channel), the group's min and max pinned as entries (see `_kmeans_1d`).

    `row_scaled`: the k-means runs on the rows normalised by their max |w| and each row's table
    is the shared one times the row's max, so one clustering serves rows of different ranges.
    Core ML before iOS 26 takes a per-channel scale only on the table itself (coremltools'
    canonicalize_quantized_lut_pattern rewrites a scale after the lookup into a per-row table), so
    such tables are stored per row: 32 bytes per row at 4 bits, where 4-bit tables most need the
    row scales; at 6 and 8 bits a per-row table would cost 128 and 512 bytes a row, and one table
    per group is kept. Indices are assigned to the fp16 tables the program holds."""

    def encode(w: Floats) -> Encoded:
        import torch

        rows, cols = w.shape
        g = group if rows % group == 0 else 1
        if row_scaled:
            amax = np.abs(w).max(axis=1, keepdims=True)
            amax[amax == 0] = 1
            lut = _kmeans_1d((w / amax).reshape(rows // g, g * cols), 2**nbits)
            table = (np.repeat(lut, g, axis=0) * amax).astype(np.float16)  # (rows, K), sorted
            values = w
        else:
            lut = _kmeans_1d(w.reshape(rows // g, g * cols), 2**nbits)
            table = lut.astype(np.float16)  # (rows // g, K), sorted
            values = w.reshape(rows // g, g * cols)
        wide = table.astype(np.float32)
        mid = torch.from_numpy((wide[:, 1:] + wide[:, :-1]) / 2)
        idx = torch.searchsorted(mid.contiguous(), torch.from_numpy(values)).numpy()
        kind = {4: "uint4", 8: "uint8"}.get(nbits, f"uint{nbits}")
        arrays = {
            "indices": _indices(idx.reshape(rows, cols), nbits, kind),
            "lut": table.reshape(table.shape[0], 1, 2**nbits, 1),
        }
        nbytes = w.size * nbits // 8 + table.size * 2
        per = "row" if row_scaled or g == 1 else f"group{g}"
        return Encoded("lut_to_dense", arrays, f"lut{nbits}_per_{per}_fp16", nbytes)

    return encode


def _indices(idx: np.ndarray, nbits: int, kind: str) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    if nbits == 8:
        return idx.astype(np.uint8)
    dtype = getattr(types, f"np_uint{nbits}_dtype")
    return idx.astype(np.uint8).astype(dtype)


CODECS: dict[str, Codec] = {
    "int8_channel": Codec("int8_channel", 8.0, int8_channel),
    "int4_block32": Codec("int4_block32", 5.0, int4_block32),
    "int4_block32_zp": Codec("int4_block32_zp", 4.625, int4_block32_zp),
    "int4_block32_sym": Codec("int4_block32_sym", 4.5, int4_block32_sym),
    "lut4": Codec("lut4", 4.0, palettize(4, row_scaled=True)),
    "lut6": Codec("lut6", 6.0, palettize(6)),
    "lut8": Codec("lut8", 8.0, palettize(8)),
}


# --- recipes: which tensor gets which codec -------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    role: str  # a quantizers.recipes role: output (the tied embedding), token_embd, attn_v, ...
    when: Callable[[int, int], bool]  # (layer, n_layers) -> applies
    codec: str


def _any(i: int, n: int) -> bool:
    return True


def _more_bits(i: int, n: int) -> bool:
    return use_more_bits(i, n)


@dataclass(frozen=True)
class Scheme:
    name: str
    compute: str  # "fp16" | "fp32": the precision the program computes in
    default: str | None  # codec of every 2-D weight no rule matches; None keeps the float weight
    rules: tuple[Rule, ...] = ()
    description: str = ""


# Our int4: an fp16 offset per block (5 bpw, exact on a Q4_1 grid) for the tensors llama.cpp's
# q4_k_m keeps at more bits (attn_v, and ffn_down in its use_more_bits layers); a searched uint4
# zero point (4.625 bpw) elsewhere and a searched symmetric int4 (4.5 bpw) for the tied
# embedding, so SmolLM2-135M fits in 80 MB (fp16 offsets everywhere would be 84 MB).
_INT4_RULES = (
    Rule("output", _any, "int4_block32_sym"),
    Rule("token_embd", _any, "int4_block32_sym"),
    Rule("attn_v", _any, "int4_block32"),
    Rule("ffn_down", _more_bits, "int4_block32"),
)
# Like llama.cpp's q4_k_m: more bits for the tied embedding/output, attn_v and ffn_down in the
# first and last eighth of layers and every third between (use_more_bits).
_MIXED_RULES = (
    Rule("output", _any, "int8_channel"),
    Rule("token_embd", _any, "int8_channel"),
    Rule("attn_v", _more_bits, "int8_channel"),
    Rule("ffn_down", _more_bits, "int8_channel"),
)
# The tied embedding/lm_head is the tensor SmolLM2 is most sensitive to, and one look-up table per
# row or per 16 rows does not serve it: on the default model (weight-level, 2 windows) pal4 layers
# with an int8 embedding scored KLD 0.37, with a 6-bit LUT embedding 0.84-0.97, with a 4-bit 1.80.
_PAL_RULES = (Rule("output", _any, "int8_channel"), Rule("token_embd", _any, "int8_channel"))
SCHEMES: dict[str, Scheme] = {
    "fp32": Scheme("fp32", "fp32", None, description="fp32 weights and compute"),
    "fp16": Scheme("fp16", "fp16", None, description="fp16 weights and compute"),
    "int8": Scheme("int8", "fp16", "int8_channel", description="int8 per output channel"),
    "int4": Scheme(
        "int4",
        "fp16",
        "int4_block32_zp",
        _INT4_RULES,
        "asymmetric 4-bit per 32-block with searched scale and uint4 zero point; fp16 offsets "
        "for attn_v and ffn_down in use_more_bits layers; symmetric int4 tied embedding",
    ),
    "pal4": Scheme(
        "pal4",
        "fp16",
        "lut4",
        _PAL_RULES,
        "4-bit k-means LUT per 16 output rows, scaled per row (stored per row); int8 tied "
        "embedding",
    ),
    "pal6": Scheme(
        "pal6",
        "fp16",
        "lut6",
        _PAL_RULES,
        "6-bit k-means LUT per 16 output rows; int8 tied embedding",
    ),
    "pal8": Scheme(
        "pal8",
        "fp16",
        "lut8",
        _PAL_RULES,
        "8-bit k-means LUT per 16 output rows; int8 tied embedding",
    ),
    "mixed": Scheme(
        "mixed",
        "fp16",
        "int4_block32",
        _MIXED_RULES,
        "int4 (fp16 offsets) with int8 for the tied embedding, and attn_v/ffn_down in "
        "llama.cpp's use_more_bits layers",
    ),
}


def tensor_codec(scheme: Scheme, name: str, spec: ModelSpec) -> str | None:
    """The codec of one canonical tensor under `scheme` (None: stays float)."""
    if len(expected_shape(spec, name)) != 2 or scheme.default is None:
        return None
    role, layer = role_of(name, spec.tie_word_embeddings)
    for rule in scheme.rules:
        if rule.role == role and rule.when(layer if layer is not None else 0, spec.n_layers):
            return rule.codec
    return scheme.default


def describe_schemes() -> list[dict[str, Any]]:
    return [
        {
            "target": f"coreml:{s.name}",
            "bits_per_weight": 16.0
            if s.default is None and s.compute == "fp16"
            else 32.0
            if s.default is None
            else CODECS[s.default].bits_per_weight,
            "compute_precision": s.compute,
            "mixture": [f"{r.role}->{r.codec}" for r in s.rules],
            "description": s.description,
        }
        for s in SCHEMES.values()
    ]


# --- the traced module ----------------------------------------------------------------------------


def _decoder_module(reference: Any, context: int, stateful: bool) -> Any:
    """Apple's stateful pattern around the reference decoder's own submodules (same parameter
    names, so program constants are named after canonical tensors)."""
    import torch
    from torch import nn

    from smolconvert.model.reference import rotate_half

    spec: ModelSpec = reference.spec

    class CoreMLDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = reference.model
            self.lm_head = reference.lm_head
            # RoPE tables, not positions times frequencies: in fp16 the product of a position in
            # the thousands and a frequency loses whole radians; a table rounds only cos/sin.
            pos = torch.arange(context, dtype=torch.float64)[:, None]
            inv = reference._inv_freq().double()
            angles = torch.cat((pos * inv, pos * inv), -1)  # (ctx, D)
            self.register_buffer("ropeCos", angles.cos().float(), persistent=False)
            self.register_buffer("ropeSin", angles.sin().float(), persistent=False)
            if stateful:
                shape = (spec.n_layers, 1, spec.n_kv_heads, context, spec.head_dim)
                self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
                self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

        def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:
            t = inputIds.shape[-1]
            end = causalMask.shape[-1]
            past = end - t
            nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
            h = self.model.embed_tokens(inputIds)  # (1, T, d)
            cos, sin = self.ropeCos[past:end], self.ropeSin[past:end]  # (T, D)
            for i, layer in enumerate(self.model.layers):
                a = layer.self_attn
                x = layer.input_layernorm(h)
                q = a.q_proj(x).view(1, -1, nh, hd).transpose(1, 2)  # (1, nh, T, D)
                k = a.k_proj(x).view(1, -1, nkv, hd).transpose(1, 2)  # (1, kv, T, D)
                v = a.v_proj(x).view(1, -1, nkv, hd).transpose(1, 2)
                if a.use_rope:
                    q = q * cos + rotate_half(q) * sin
                    k = k * cos + rotate_half(k) * sin
                if stateful:
                    self.keyCache[i : i + 1, :, :, past:end, :] = k.to(torch.float16)[None]
                    self.valueCache[i : i + 1, :, :, past:end, :] = v.to(torch.float16)[None]
                    k = self.keyCache[i, :, :, :end, :].to(q.dtype)  # (1, kv, S, D)
                    v = self.valueCache[i, :, :, :end, :].to(q.dtype)
                s = k.shape[2]
                g = nh // nkv
                k = k[:, :, None].expand(1, nkv, g, s, hd).reshape(1, nh, s, hd)
                v = v[:, :, None].expand(1, nkv, g, s, hd).reshape(1, nh, s, hd)
                scores = torch.matmul(q, k.transpose(2, 3)) * (hd**-0.5) + causalMask
                o = torch.matmul(torch.softmax(scores, -1), v)  # (1, nh, T, D)
                h = h + a.o_proj(o.transpose(1, 2).reshape(1, -1, nh * hd))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            return self.lm_head(self.model.norm(h))  # (1, T, vocab)

    return CoreMLDecoder().eval()


@contextmanager
def _coremltools() -> Iterator[Any]:
    try:
        import coremltools as ct
    except ImportError:
        raise MissingDependencyError(f"Core ML export needs coremltools: {INSTALL_HINT}") from None
    _patch_int_cast()
    yield ct


_PATCHED = False


def _patch_int_cast() -> None:
    """coremltools 9.0's `aten::Int` converter calls int() on a 1-element array, which numpy
    >= 2.4 refuses (coremltools issue 2633, fixed on main after 9.0). Same conversion, scalar
    taken first."""
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context: Any, node: Any) -> None:
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const():
            value = np.int32(np.asarray(x.val).reshape(()))
            context.add(mb.const(val=value, name=node.name), node.name)
        else:
            ops._cast(context, node, int, "int32")

    _PATCHED = True


_NORM_OPS = frozenset({"pow", "reduce_mean", "rsqrt"})


def _fp16_op(op: Any) -> bool:
    """Which ops compute in fp16: all but RMSNorm's statistics. Squaring a hidden state overflows
    fp16 (SmolLM2-135M reaches |x| ~ 850, x**2 ~ 7e5 > 65504, and the norm turns to 0); the
    reference, like transformers, takes that mean in fp32."""
    if op.op_type in _NORM_OPS:
        return False
    if op.op_type == "add":  # mean(x**2) + eps
        return not any(
            getattr(v, "op", None) is not None and v.op.op_type == "reduce_mean"
            for v in (op.inputs.get("x"), op.inputs.get("y"))
        )
    return True


def context_length(spec: ModelSpec) -> int:
    return min(MAX_CONTEXT, spec.max_position_embeddings)


def convert(model: CanonicalModel, scheme: Scheme, kv_cache: str, context: int) -> Any:
    """The float mlprogram (fp16 or fp32 weights) of the reference decoder."""
    import torch

    from smolconvert.model.reference import build_reference

    spec = model.spec
    stateful = kv_cache == "stateful"
    with _coremltools() as ct:
        reference = build_reference(spec, source=model.weights)
        module = _decoder_module(reference, context, stateful)
        ids = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
        mask = torch.zeros(1, 1, 4, 6 if stateful else 4)
        with torch.no_grad():
            traced = torch.jit.trace(module, (ids, mask), check_trace=False)
        del module, reference
        seq = ct.RangeDim(1, context, 1)
        inputs = [
            ct.TensorType("inputIds", shape=(1, seq), dtype=np.int32),
            ct.TensorType(
                "causalMask",
                shape=(1, 1, ct.RangeDim(1, context, 1), ct.RangeDim(1, context, 1)),
                dtype=np.float16 if scheme.compute == "fp16" else np.float32,
            ),
        ]
        states = []
        if stateful:
            shape = (spec.n_layers, 1, spec.n_kv_heads, context, spec.head_dim)
            states = [
                ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=n)
                for n in ("keyCache", "valueCache")
            ]
        needs_ios18 = stateful or scheme.default is not None  # our constexpr ops are iOS 18's
        return ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType("logits")],
            states=states or None,
            minimum_deployment_target=ct.target.iOS18 if needs_ios18 else ct.target.iOS17,
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=_fp16_op)
            if scheme.compute == "fp16"
            else ct.precision.FLOAT32,
            convert_to="mlprogram",
            skip_model_load=True,
        )


# --- compression: our arrays into the program as constexpr ops ------------------------------------


def const_names(spec: ModelSpec) -> dict[str, str]:
    """Program const name -> canonical name for every 2-D weight (the tied lm_head is the
    embedding's const). coremltools names a traced parameter by its path, '.' -> '_'."""
    out = {}
    for name in canonical_names(spec):
        if len(expected_shape(spec, name)) != 2:
            continue
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        out[name.replace(".", "_")] = name
    return out


def compress(mlmodel: Any, model: CanonicalModel, scheme: Scheme, quiet: bool) -> tuple[Any, dict]:
    """Replace each weight const by the constexpr op of its codec; returns (mlmodel, types)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    spec = model.spec
    wanted = const_names(spec)
    types: dict[str, str] = {}
    found: set[str] = set()

    class WriteOurWeights(AbstractGraphPass):  # type: ignore[misc]
        def apply(self, prog: Any) -> None:
            for op in list(prog.functions["main"].operations):
                if op.op_type != "const":
                    continue
                base = op.outputs[0].name.removesuffix("_to_fp16")
                canonical = wanted.get(base)
                if canonical is None:
                    continue
                found.add(canonical)
                codec_name = tensor_codec(scheme, canonical, spec)
                if codec_name is None:
                    types[canonical] = scheme.compute
                    continue
                # the canonical fp32 weight, not the program's fp16 copy: one rounding, not two
                w = model.weights.get(canonical).float().numpy()
                enc = CODECS[codec_name].encode(np.ascontiguousarray(w, np.float32))
                types[canonical] = enc.storage
                with op.enclosing_block:
                    make = getattr(mb, f"constexpr_{enc.op}")
                    new = make(**enc.arrays, before_op=op, name=op.name + "_" + codec_name)
                op.enclosing_block.replace_uses_of_var_after_op(
                    anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
                )
                op.enclosing_block.remove_ops([op])

    step = progress.Steps(quiet)
    step(f"writing weights as {scheme.name}")
    out = mlmodel
    if scheme.default is not None:
        out = _apply_graph_pass(mlmodel, WriteOurWeights(), spec_version=9, skip_model_load=True)
    else:
        WriteOurWeights().apply(_program_of(mlmodel))
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise UnsupportedError(
            f"Core ML export: weights not found in the converted program: {missing}; consts "
            f"expected under the names {sorted(wanted)}"
        )
    return out, types


def _program_of(mlmodel: Any) -> Any:
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
    )


# --- export ---------------------------------------------------------------------------------------


def export_coreml(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: dict[str, str] | None = None,
) -> A.Artifact:
    if scheme not in SCHEMES:
        raise UnsupportedError(
            f"unknown Core ML scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES))}"
        )
    if imatrix is not None:
        raise UnsupportedError("Core ML schemes take no imatrix; drop --imatrix for coreml targets")
    sch = SCHEMES[scheme]
    kv_cache = (options or {}).get("kv_cache", OPTIONS["kv_cache"][0])
    spec = model.spec
    _check_shapes(spec, sch)
    context = context_length(spec)
    ios18 = kv_cache == "stateful" or sch.default is not None
    step = progress.Steps(quiet)
    step(f"converting with coremltools ({kv_cache} KV cache, {sch.compute} compute)")
    with _quiet_progress(quiet):
        mlmodel = convert(model, sch, kv_cache, context)
        mlmodel, types = compress(mlmodel, model, sch, quiet)
    mlmodel.short_description = f"{model.name} ({scheme}) converted by smolconvert"
    mlmodel.user_defined_metadata["co.huggingface.exporters.name"] = model.name
    mlmodel.user_defined_metadata["smolconvert.scheme"] = scheme
    mlmodel.user_defined_metadata["smolconvert.kv_cache"] = kv_cache
    # a date in the file would make today's export differ from tomorrow's
    mlmodel.user_defined_metadata.pop("com.github.apple.coremltools.conversion_date", None)
    with A.staging(out) as stage:
        step("saving the .mlpackage")
        mlmodel.save(str(stage / PACKAGE))
        _normalise_manifest(stage / PACKAGE)
        _write_spec_deterministically(stage / PACKAGE, mlmodel)
        model.tokenizer.save(stage)
        A.write_json(stage / "coreml_config.json", _app_config(model, kv_cache, context, sch))
        import coremltools as ct

        meta = {
            "format": "mlpackage",
            "target": "coreml",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": PACKAGE, "config": "coreml_config.json"},
            "tensor_types": dict(sorted(types.items())),
            "options": {"kv_cache": kv_cache},
            "context_length": context,
            "layout": LAYOUT_NOTE,
            "tool_versions": A.tool_versions("coremltools", "numpy", "torch"),
            "min_runtime": {
                "iOS": "18" if ios18 else "17",
                "macOS": "15" if ios18 else "14",
                "coremltools": ct.__version__,
            },
        }
        meta = A.finish(stage, meta)
    return A.Artifact(out.resolve(), meta)


def _check_shapes(spec: ModelSpec, scheme: Scheme) -> None:
    bad = []
    for name in canonical_names(spec):
        codec = tensor_codec(scheme, name, spec)
        if codec and codec.startswith("int4") and expected_shape(spec, name)[1] % 32:
            bad.append(f"{name} {expected_shape(spec, name)}")
    if bad:
        raise UnsupportedError(
            f"coreml:{scheme.name} needs columns divisible by 32; these are not: {', '.join(bad)} "
            "(use coreml:int8 or a palettized scheme)"
        )


def _app_config(model: CanonicalModel, kv_cache: str, context: int, scheme: Scheme) -> dict:
    spec, special = model.spec, model.tokenizer.special
    return {
        "model": model.name,
        "package": PACKAGE,
        "kv_cache": kv_cache,
        "context_length": context,
        "inputs": {
            "inputIds": "int32 (1, T): the new tokens, 1 <= T <= context_length",
            "causalMask": (
                f"{'fp16' if scheme.compute == 'fp16' else 'fp32'} (1, 1, T, past + T): additive, "
                "0 where query t may attend key s (s <= past + t), -1e4 elsewhere"
                + ("; past = tokens already in the state" if kv_cache == "stateful" else "")
            ),
        },
        "states": ["keyCache", "valueCache"] if kv_cache == "stateful" else [],
        "outputs": {"logits": "(1, T, vocab): row t predicts the token after inputIds[t]"},
        "vocab_size": spec.vocab_size,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"],
        "scheme": scheme.name,
    }


def _normalise_manifest(package: Path) -> None:
    """coremltools writes random UUIDs as item ids in Manifest.json; derive them from the paths so
    the same export gives the same bytes."""
    import hashlib

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    items = manifest.get("itemInfoEntries", {})
    renamed = {}
    for old, info in items.items():
        new = hashlib.sha256(info.get("path", old).encode()).hexdigest()[:32].upper()
        new = f"{new[:8]}-{new[8:12]}-{new[12:16]}-{new[16:20]}-{new[20:]}"
        renamed[new] = info
        if manifest.get("rootModelIdentifier") == old:
            manifest["rootModelIdentifier"] = new
    manifest["itemInfoEntries"] = dict(sorted(renamed.items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_spec_deterministically(package: Path, mlmodel: Any) -> None:
    """Rewrite model.mlmodel with its map fields (user metadata, op inputs and attributes) in key
    order. coremltools saves `spec.SerializeToString()`, and protobuf's upb backend orders map
    entries by a hash seeded per process, so the same spec gave different bytes in each run."""
    path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    assert path.is_file(), path  # coremltools 9.0's package layout
    path.write_bytes(mlmodel.get_spec().SerializeToString(deterministic=True))


@contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """coremltools draws tqdm bars for every pass and warns about untested torch versions; keep
    them off non-terminal logs (errors still raise)."""
    import contextlib
    import io
    import logging
    import warnings

    if not quiet and sys.stderr.isatty():
        yield
        return
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
