"""Core ML codecs: hand-made blocks with known codes, coremltools' own decompression as the oracle
of `dequantize`, the outliers palettization must keep, and the shapes the codecs refuse."""

from __future__ import annotations

import numpy as np
import pytest

from smolconvert.errors import UnsupportedError
from smolconvert.quantizers.coreml_codecs import CODECS
from tests.conftest import require_module
from tests.quantizers.conftest import mixed_weights

require_module("coremltools", "coreml")  # the sub-byte dtypes the codes are stored in


def _ints(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.int64)


def _grid_blocks() -> np.ndarray:
    """(2, 64): four 32-blocks, each exactly on a 16-level grid (levels 0..15 twice over)."""
    levels = np.arange(32) % 16
    return np.array(
        [
            np.concatenate([(levels - 4) * 0.25, levels * 0.125]),
            np.concatenate([(levels - 4) * 0.5, (levels - 15) * 0.0625]),
        ],
        np.float32,
    )


@pytest.mark.parametrize("name", ["int4_block32", "int4_block32_zp"])
def test_asymmetric_int4_finds_the_exact_grid(name: str) -> None:
    w = _grid_blocks()
    enc = CODECS[name].quantize(w, None)
    assert enc.op == "blockwise_shift_scale"
    a = enc.arrays
    np.testing.assert_array_equal(_ints(a["data"]), np.tile(np.arange(64) % 16, (2, 1)))
    np.testing.assert_array_equal(a["scale"], np.array([[0.25, 0.125], [0.5, 0.0625]], np.float16))
    np.testing.assert_array_equal(np.asarray(a["offset"]).astype(np.float32), [[4, 0], [4, 15]])
    assert (a["offset"].dtype == np.float16) == (name == "int4_block32")
    np.testing.assert_array_equal(CODECS[name].dequantize(enc, w.shape), w)


def test_symmetric_int4_finds_the_exact_grid() -> None:
    w = np.tile((np.arange(32) % 16 - 8) * 0.25, (3, 2)).astype(np.float32)
    w[1] *= 4
    w[2] = 0
    enc = CODECS["int4_block32_sym"].quantize(w, None)
    assert "offset" not in enc.arrays
    np.testing.assert_array_equal(
        _ints(enc.arrays["data"])[:2], np.tile(np.arange(64) % 16 - 8, (2, 1))
    )
    np.testing.assert_array_equal(enc.arrays["scale"], np.array([[0.25] * 2, [1.0] * 2, [0] * 2]))
    np.testing.assert_array_equal(CODECS["int4_block32_sym"].dequantize(enc, w.shape), w)


def test_int8_channel_has_one_scale_per_row() -> None:
    q = np.arange(-127, 128)
    w = np.stack([q / 128, q / 32, q * 0]).astype(np.float32)
    enc = CODECS["int8_channel"].quantize(w, None)
    np.testing.assert_array_equal(enc.arrays["data"], np.stack([q, q, q * 0]))
    np.testing.assert_array_equal(enc.arrays["scale"], np.array([[1 / 128], [1 / 32], [0]]))
    np.testing.assert_array_equal(CODECS["int8_channel"].dequantize(enc, w.shape), w)


@pytest.mark.parametrize("name", ["lut4", "lut6", "lut8"])
def test_a_table_of_sixteen_values_is_found_exactly(name: str) -> None:
    """16 rows drawn from the same 16 values: one k-means table holds them all exactly."""
    values = (np.arange(16) - 8) / 8
    rng = np.random.default_rng(1)
    codes = np.stack([rng.permutation(np.arange(32) % 16) for _ in range(16)])
    w = values[codes].astype(np.float32)
    enc = CODECS[name].quantize(w, None)
    assert enc.op == "lut_to_dense"
    lut = enc.arrays["lut"][:, 0, :, 0]
    assert (np.diff(lut.astype(np.float32), axis=1) >= 0).all()  # sorted
    assert (lut[:, 0] == -1).all() and (lut[:, -1] == 0.875).all()  # min and max pinned
    np.testing.assert_array_equal(CODECS[name].dequantize(enc, w.shape), w)
    if name == "lut4":
        np.testing.assert_array_equal(_ints(enc.arrays["indices"]), codes)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_dequantize_is_coremltools_decompress(name: str) -> None:
    """What Core ML computes at load (coremltools' reference `decompress` of the iOS 18 ops), on
    rows that stress fp16 scales (tiny, huge, zero, constant)."""
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression

    w = mixed_weights(2, 96)
    with np.errstate(all="ignore"):  # the huge rows overflow fp16, in both decoders alike
        enc = CODECS[name].quantize(w, None)
        a = enc.arrays
        if enc.op == "lut_to_dense":
            ref = compression.constexpr_lut_to_dense.decompress(a["indices"], a["lut"], None)
        else:
            ref = compression.constexpr_blockwise_shift_scale.decompress(
                a["data"], a["scale"], a.get("offset")
            )
        got = CODECS[name].dequantize(enc, w.shape)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_array_equal(got, np.asarray(ref, np.float32))


@pytest.mark.parametrize("name", ["lut4", "lut6", "lut8"])
def test_palettization_keeps_outliers_and_resolves_typical_weights(name: str) -> None:
    """Rows with a few large weights (SmolLM2's o_proj/down_proj have them): plain k-means spends
    no table entry on them. The pinned extremes keep them, and the typical weights must still be
    resolved finely."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 96)) * 0.02).astype(np.float32)
    outliers = [(3, 5, 1.0), (20, 7, -0.8), (21, 50, 0.5)]
    for r, c, v in outliers:
        w[r, c] = v
    codec = CODECS[name]
    got = codec.dequantize(codec.quantize(w, None), w.shape)
    for r, c, v in outliers:
        assert abs(got[r, c] - v) < 1e-3 * abs(v), (r, c, got[r, c], v)
    clean = [r for r in range(w.shape[0]) if r not in {r for r, _, _ in outliers}]
    rel = np.sqrt(((got - w)[clean] ** 2).mean() / (w[clean] ** 2).mean())
    assert rel < {"lut4": 0.12, "lut6": 0.05, "lut8": 0.02}[name], rel


@pytest.mark.parametrize("name", ["int4_block32", "int4_block32_zp", "int4_block32_sym"])
def test_block_codecs_refuse_partial_blocks(name: str) -> None:
    with pytest.raises(UnsupportedError, match=f"{name} needs columns divisible by 32.*48"):
        CODECS[name].quantize(np.ones((4, 48), np.float32), None)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codecs_take_matrices_only(name: str) -> None:
    with pytest.raises(UnsupportedError, match=f"{name} takes a 2-D weight"):
        CODECS[name].quantize(np.ones(64, np.float32), None)
