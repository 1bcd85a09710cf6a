"""MLC LLM group quantization (q4f16_1, q4f32_1, q3f16_1): pack, unpack and scale modes, in numpy.

Mirrors mlc-llm `python/mlc_llm/quantization/group_quantization.py` (`GroupQuantize._quantize`,
`_dequantize`) and `quantization/utils.py` (`pack_weight`, `convert_uint_to_float`) at commit
01ced331: weights are cast to the model dtype first and every step runs in that dtype (fp16
arithmetic for *f16 schemes), groups run along the last (input) axis, padded to whole groups.
Scale modes: "mlc" is MLC's own max|w|/max_int (bit-identical); "search" keeps the format and
picks, per group, the scale minimising the (importance-weighted) squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import ConfigError
from smolconvert.quantizers.codec import Codec, Floats

SCALE_MODES = ("mlc", "search")


@dataclass(frozen=True)
class GroupConfig:
    name: str
    bits: int  # quantize_dtype int<bits>
    group_size: int
    model_dtype: str  # "float16" | "float32": storage of scales and the arithmetic of both ways

    @property
    def elem_per_storage(self) -> int:  # values per uint32
        return 32 // self.bits

    @property
    def storage_per_group(self) -> int:
        return self.group_size // self.elem_per_storage

    @property
    def max_int(self) -> int:  # q in [0, 2*max_int], value (q - max_int) * scale
        return 2 ** (self.bits - 1) - 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.model_dtype)

    def n_groups(self, k: int) -> int:
        return -(-k // self.group_size)

    def packed_shape(self, rows: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(q_weight shape, q_scale shape) of a (rows, k) weight in MLC's NK layout."""
        g = self.n_groups(k)
        return (rows, g * self.storage_per_group), (rows, g)

    def bits_per_weight(self, k: int = 4096) -> float:
        g = self.n_groups(k)
        return (g * self.storage_per_group * 32 + g * self.dtype.itemsize * 8) / k


# mlc-llm `quantization/quantization.py` QUANTIZATION entries (all NK layout, uint32 storage).
GROUP_CONFIGS = {
    "q4f16_1": GroupConfig("q4f16_1", 4, 32, "float16"),
    "q4f32_1": GroupConfig("q4f32_1", 4, 32, "float32"),
    "q3f16_1": GroupConfig("q3f16_1", 3, 40, "float16"),
}


def _groups(w: NDArray, cfg: GroupConfig) -> NDArray:
    """(rows, k) -> (rows, n_groups, group_size), zero-padded past k."""
    rows, k = w.shape
    g = cfg.n_groups(k)
    padded = np.zeros((rows, g * cfg.group_size), dtype=w.dtype)
    padded[:, :k] = w
    return padded.reshape(rows, g, cfg.group_size)


def mlc_scales(w: NDArray, cfg: GroupConfig) -> NDArray:
    """MLC's scale: max|w| over the group / max_int, in the model dtype. (rows, n_groups)."""
    max_abs = np.abs(_groups(_in_dtype(w, cfg), cfg)).max(axis=-1)  # padding 0 never wins
    # A float32 quotient of fp16 values, cast to fp16, is the fp16 quotient.
    return (max_abs / np.float32(cfg.max_int)).astype(cfg.dtype)


def quantize_codes(w: NDArray, scale: NDArray, cfg: GroupConfig) -> NDArray[np.uint32]:
    """q = clip(round(w / scale + max_int), 0, 2*max_int) in the model dtype; (rows, k) uint32.

    np.rint rounds half to even like TVM's `tir.round`. A zero scale (all-zero group) gives code
    0, as MLC's quantize function built by TVM for CPU does; it dequantizes to -0.
    """
    return _codes(_in_dtype(w, cfg), _in_dtype(scale, cfg), cfg)


def _codes(w: NDArray[np.float32], scale: NDArray[np.float32], cfg: GroupConfig) -> NDArray:
    """quantize_codes on values already in the model dtype, held as float32.

    Each fp16 operation runs in float32 and is rounded to fp16 after: a float32 quotient or sum
    of two fp16 values rounds to the same fp16 as fp16 arithmetic. |w / scale| <= max_int, so the
    quotient is either a normal fp16 or too small to change `+ max_int`: `_round_half` is exact.
    """
    k = w.shape[1]
    s = np.repeat(scale, cfg.group_size, axis=1)[:, :k]
    safe = np.where(s == 0, np.float32(1), s)
    with np.errstate(over="ignore", invalid="ignore"):
        x = _round(_round(w / safe, cfg) + np.float32(cfg.max_int), cfg)
    q = np.clip(np.rint(x), 0, 2 * cfg.max_int)
    q[s == 0] = 0  # TVM's llvm build: 0/0 is NaN, max(NaN, 0) is 0
    return q.astype(np.uint32)


def _round(x: NDArray[Any], cfg: GroupConfig) -> NDArray[np.float32]:
    """Round float32 values to the nearest fp16 (ties to even) for normal-range fp16 values,
    by bit arithmetic (numpy's float16 casts are ~20x slower); no-op for float32 schemes."""
    if cfg.dtype == np.float32:
        return x
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (bits + (np.uint32(0xFFF) + ((bits >> 13) & np.uint32(1)))) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def _in_dtype(x: NDArray, cfg: GroupConfig) -> NDArray[np.float32]:
    """Values cast to the model dtype, held as float32."""
    return np.asarray(x).astype(cfg.dtype).astype(np.float32)


def pack(q: NDArray[np.uint32], cfg: GroupConfig) -> NDArray[np.uint32]:
    """(rows, k) codes -> (rows, n_groups * storage_per_group) uint32; element r of a word sits at
    bits [r*bits, (r+1)*bits) (low bits first); padding past k packs as 0 (MLC `pack_weight`)."""
    rows, k = q.shape
    g = cfg.n_groups(k)
    padded = np.zeros((rows, g * cfg.group_size), dtype=np.uint32)
    padded[:, :k] = q
    words = padded.reshape(rows, -1, cfg.elem_per_storage)
    shifts = (np.arange(cfg.elem_per_storage, dtype=np.uint32) * cfg.bits)[None, None, :]
    return np.bitwise_or.reduce(words << shifts, axis=-1).astype(np.uint32)


def unpack(q_weight: NDArray[np.uint32], k: int, cfg: GroupConfig) -> NDArray[np.uint32]:
    """(rows, n_words) uint32 -> (rows, k) codes (MLC `convert_uint_to_float`, no ft_reorder)."""
    shifts = (np.arange(cfg.elem_per_storage, dtype=np.uint32) * cfg.bits)[None, None, :]
    codes = (q_weight[:, :, None] >> shifts) & np.uint32((1 << cfg.bits) - 1)
    return codes.reshape(q_weight.shape[0], -1)[:, :k]


def dequantize(q_weight: NDArray[np.uint32], q_scale: NDArray, k: int, cfg: GroupConfig) -> NDArray:
    """As MLC's `_dequantize` kernel: (float(q) - max_int) * scale, in the model dtype (rows, k)."""
    return _dequantize_codes(unpack(q_weight, k, cfg), q_scale, k, cfg)


def _dequantize_codes(
    codes: NDArray[np.uint32], q_scale: NDArray, k: int, cfg: GroupConfig
) -> NDArray:
    s = np.repeat(_in_dtype(q_scale, cfg), cfg.group_size, axis=1)[:, :k]
    return ((codes.astype(np.float32) - np.float32(cfg.max_int)) * s).astype(cfg.dtype)


def search_scales(
    w: NDArray,
    cfg: GroupConfig,
    importance: NDArray[np.float32] | None = None,
    stored_scale: Callable[[NDArray], NDArray] | None = None,
) -> NDArray:
    """Per group, the scale minimising sum(weight * (w - dequant(w))^2) (llama.cpp
    make_qx_quants style): candidates max|w| / (max_int + i/10), i in -10, -6, .., 10, each
    refined once by the weighted least-squares scale of its codes; evaluated as MLC quantizes and
    dequantizes (model dtype, and the on-disk rounding `stored_scale` when given, e.g. bf16)."""
    w32 = _in_dtype(w, cfg)
    rows, k = w32.shape
    # Element weights as llama.cpp's quantizers choose them: x^2 without an imatrix
    # (make_qx_quants rmse_type 1), imatrix * sqrt(sigma2 + x^2) with one (quantize_row_q4_0_impl).
    # Plain MSE shrinks scales and clips the large weights this model depends on.
    if importance is None:
        imp = w32 * w32 + 1e-12
    else:
        col = np.asarray(importance, np.float32)
        if col.shape != (k,):
            raise ConfigError(f"importance has shape {col.shape}, expected ({k},)")
        sigma2 = (w32 * w32).sum(axis=1, keepdims=True) / k
        imp = np.maximum(col, 1e-12)[None, :] * np.sqrt(sigma2 + w32 * w32)
    store = stored_scale or (lambda s: s)

    def err_of(scale: NDArray) -> tuple[NDArray, NDArray]:
        scale = store(scale.astype(cfg.dtype))
        s32 = scale.astype(np.float32)
        x = _codes(w32, s32, cfg).astype(np.float32) - np.float32(cfg.max_int)
        dq = x * np.repeat(s32, cfg.group_size, axis=1)[:, :k]  # fp16 rounding left out: tiny
        e = imp * (w32 - dq) ** 2
        return scale, _groups(e, cfg).sum(axis=-1)

    max_abs = np.abs(_groups(w32, cfg)).max(axis=-1)
    best, best_err = err_of(mlc_scales(w32, cfg))
    wg, ig = _groups(w32, cfg), _groups(imp, cfg)
    for i in range(-10, 11, 4):
        cand = max_abs / (cfg.max_int + i / 10)
        for scale in (cand, _refit(wg, ig, w32, cand, cfg, store)):
            scale, err = err_of(scale)
            better = err < best_err
            best = np.where(better, scale, best)
            best_err = np.where(better, err, best_err)
    return best.astype(cfg.dtype)


def _refit(
    wg: NDArray, ig: NDArray, w: NDArray, scale: NDArray, cfg: GroupConfig, store
) -> NDArray:
    """Least-squares scale for the codes `scale` gives: sum(i*w*x) / sum(i*x*x), x = q - max_int."""
    s = store(scale.astype(cfg.dtype)).astype(np.float32)
    x = _groups(_codes(w, s, cfg).astype(np.float32) - cfg.max_int, cfg)
    num, den = (ig * wg * x).sum(-1), (ig * x * x).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), scale)


def quantize(
    w: NDArray,
    cfg: GroupConfig,
    scale_mode: str = "mlc",
    importance: NDArray[np.float32] | None = None,
    stored_scale: Callable[[NDArray], NDArray] | None = None,
) -> tuple[NDArray[np.uint32], NDArray]:
    """(rows, k) float weight -> (q_weight uint32, q_scale model dtype), MLC's NK layout.

    Row-local in both scale modes (each row's codes and scales depend on that row, `importance`
    and the config only): exporters/mlc.py quantizes in row blocks and relies on it for output
    byte-identical to quantizing whole tensors."""
    if scale_mode not in SCALE_MODES:
        raise ConfigError(f"scale mode {scale_mode!r} is not one of {', '.join(SCALE_MODES)}")
    w = np.asarray(w, dtype=cfg.dtype)  # MLC casts to the model dtype before quantizing
    if scale_mode == "mlc":
        scale = mlc_scales(w, cfg)
    else:
        scale = search_scales(w, cfg, importance, stored_scale)
    return pack(quantize_codes(w, scale, cfg), cfg), scale


def _codec(cfg: GroupConfig) -> Codec:
    """MLC's own quantizer (scale mode "mlc") as a registry codec: encoded = (q_weight, q_scale)."""

    def encode(w: Floats, importance: Floats | None) -> tuple[NDArray[np.uint32], NDArray]:
        return quantize(np.asarray(w, np.float32), cfg)

    def decode(encoded: tuple[NDArray[np.uint32], NDArray], shape: tuple[int, ...]) -> Floats:
        q_weight, q_scale = encoded
        return dequantize(q_weight, q_scale, int(shape[-1]), cfg).astype(np.float32)

    return Codec(cfg.name, "mlc", cfg.group_size, cfg.bits_per_weight(), encode, decode, False)


CODECS: dict[str, Codec] = {name: _codec(cfg) for name, cfg in GROUP_CONFIGS.items()}
