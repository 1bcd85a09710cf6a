"""GPTQ against round-to-nearest on the same codec: lower output error on correlated inputs, and
output that is a valid point of the codec's grid (it packs and dequantizes like any other)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smolconvert.exporters.onnx_quant import CODECS, dequantize, quantize


def _inputs(rng: np.random.Generator, samples: int, k: int) -> np.ndarray:
    """Activations with correlated channels and a few loud ones, as a norm's output has."""
    x = rng.standard_normal((samples, 8)) @ rng.standard_normal((8, k))
    x += 0.3 * rng.standard_normal((samples, k))
    x[:, rng.choice(k, 3, replace=False)] *= 6.0
    return x.astype(np.float32)


@pytest.mark.parametrize("name", ["int4_b32_uint8", "int4_b32_none", "int8_b32_none"])
@pytest.mark.parametrize("k", [96, 80])  # 80: the last block is zero-padded
def test_gptq_beats_round_to_nearest_on_the_layer_output(name: str, k: int) -> None:
    rng = np.random.default_rng(k)
    codec = CODECS[name]
    w = (rng.standard_normal((40, k)) * 0.05).astype(np.float32)
    x = _inputs(rng, 2048, k)
    hessian = torch.from_numpy(x.T.astype(np.float64) @ x / len(x))

    def output_error(deq: np.ndarray) -> float:
        return float(((x @ (deq - w).T) ** 2).mean())

    rtn = dequantize(quantize(w, codec))
    qw = quantize(w, codec, hessian)
    got = dequantize(qw)
    assert got.shape == w.shape and qw.packed.shape == quantize(w, codec).packed.shape
    assert output_error(got) < 0.7 * output_error(rtn), (output_error(got), output_error(rtn))
    # every block is scale * (level - zero) with levels in range: the codec's own grid
    nb = qw.scales.shape[1]
    blocks = np.pad(got, ((0, 0), (0, nb * codec.block_size - k))).reshape(40, nb, -1)
    if qw.zero_points is None:
        zero = np.full((40, nb), 1 << (codec.bits - 1), np.float32)
    else:
        z = qw.zero_points
        zero = np.stack([z & 15, z >> 4], -1).reshape(40, -1)[:, :nb].astype(np.float32)
    scale = np.where(qw.scales == 0, 1, qw.scales)[..., None]
    levels = blocks / scale + zero[..., None]
    assert np.abs(levels - np.rint(levels)).max() < 1e-3
    assert levels.min() > -1e-3 and levels.max() < (1 << codec.bits) - 1 + 1e-3


def test_gptq_ignores_inputs_that_never_fire() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    x = _inputs(rng, 512, 64)
    x[:, 10:20] = 0.0  # dead channels: a singular Hessian
    hessian = torch.from_numpy(x.T.astype(np.float64) @ x / len(x))
    got = dequantize(quantize(w, CODECS["int4_b32_uint8"], hessian))
    assert np.isfinite(got).all()
    live = np.r_[0:10, 20:64]
    rtn = dequantize(quantize(w, CODECS["int4_b32_uint8"]))
    err = ((x[:, live] @ (got - w)[:, live].T) ** 2).mean()
    assert err < ((x[:, live] @ (rtn - w)[:, live].T) ** 2).mean()


def test_refit_scales_lowers_the_output_error_of_fixed_levels() -> None:
    """The least-squares scales beat the grid search's on the Hessian's objective; a block whose
    weights are all zero keeps its zero scale."""
    from smolconvert.quantizers.gptq import refit_scales

    rng = np.random.default_rng(3)
    codec = CODECS["int4_b32_none"]
    w = (rng.standard_normal((24, 96)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # row 0, block 0: every level at the zero point
    x = _inputs(rng, 2048, 96)
    hessian = torch.from_numpy(x.T.astype(np.float64) @ x / len(x))
    plain = quantize(w, codec)  # round-to-nearest levels and scales
    levels = np.stack([plain.packed & 15, plain.packed >> 4], -1).reshape(24, 96)
    zeros = np.full((24, 3), 8, np.float32)
    scales = refit_scales(torch.from_numpy(w), hessian, levels, plain.scales, zeros, 32)

    def output_error(s: np.ndarray) -> float:
        deq = (levels.reshape(24, 3, 32) - 8.0) * s[..., None]
        return float(((x @ (deq.reshape(24, 96) - w).T) ** 2).mean())

    assert output_error(scales) < 0.8 * output_error(plain.scales)
    assert np.isfinite(scales).all() and scales[0, 0] == plain.scales[0, 0] == 0.0
