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
