"""Every GGUF codec, tested alike: geometry, shapes, errors, round trips, gguf's decoder."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from smolconvert.errors import ConfigError, CorruptFileError, UnsupportedError, ValidationError
from smolconvert.quantizers import Codec, get_codec, iquants
from smolconvert.quantizers.ggml import CODECS

ALL = sorted(CODECS)
QUANTIZED = [n for n in ALL if n not in ("f32", "f16", "bf16")]
WEIGHTED = [n for n in ALL if CODECS[n].uses_importance]

# Relative RMS error of quantize -> dequantize on N(0, 1) weights, about 1.25x what llama.cpp's own
# searches reach (measured: q8_0 0.0054, q6_k 0.0178, q5_k 0.036, q4_k 0.071, q3_k 0.151, q2_k
# 0.296, q4_0 0.086, q4_1 0.078, q5_0 0.043, q5_1 0.038, iq4_nl 0.076, iq4_xs 0.077). A codec
# missing here gets a bound from its bits per weight, which every K-quant and legacy type meets
# with room to spare.
REL_ERROR = {
    "f32": 0.0,
    "f16": 3e-4,
    "bf16": 2.5e-3,
    "q8_0": 0.007,
    "q6_k": 0.023,
    "q5_k": 0.045,
    "q5_1": 0.048,
    "q5_0": 0.054,
    "q4_k": 0.09,
    "iq4_nl": 0.095,
    "iq4_xs": 0.096,
    "q4_1": 0.098,
    "q4_0": 0.108,
    "q3_k": 0.19,
    "q2_k": 0.37,
}


def _bound(codec: Codec) -> float:
    return REL_ERROR.get(codec.name, 3.0 * 2.0**-codec.bits_per_weight)


def _type_size(codec: Codec) -> int:
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[codec.name.upper()]][1])


def _shapes(codec: Codec) -> list[tuple[int, ...]]:
    bs = max(codec.block_size, 32)
    return [(1, bs), (3, 5 * bs), (2, 3, 2 * bs), (3 * bs,), (17, bs)]


def test_every_gguf_type_the_recipes_use_is_registered() -> None:
    legacy = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}
    assert legacy | {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"} <= set(CODECS)
    assert {n for n in CODECS if CODECS[n].uses_importance} == {
        "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"
    }  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_geometry_is_gguf_s(name: str) -> None:
    codec = get_codec(name)
    qtype = gguf.GGMLQuantizationType[name.upper()]
    assert codec.family == "gguf"
    assert (codec.block_size, _type_size(codec)) == gguf.GGML_QUANT_SIZES[qtype]
    assert codec.bits_per_weight == pytest.approx(8 * _type_size(codec) / codec.block_size)
    assert get_codec(name.upper()) is codec


@pytest.mark.parametrize("name", ALL)
def test_round_trip_within_bound_on_every_shape(name: str) -> None:
    codec = CODECS[name]
    rng = np.random.default_rng(0)
    for shape in _shapes(codec):
        w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0)
        data = codec.quantize(w, None)
        assert data.dtype == np.uint8
        assert data.shape == (*shape[:-1], shape[-1] // codec.block_size * _type_size(codec))
        back = codec.dequantize(data, shape)
        assert back.dtype == np.float32 and back.shape == shape
        rel = np.linalg.norm(back - w) / np.linalg.norm(w)
        assert rel <= _bound(codec) * (1.5 if w.size < 4096 else 1.0), (shape, rel)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_bound_is_tight_on_a_large_matrix(name: str) -> None:
    codec = CODECS[name]
    w = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    rel = np.linalg.norm(codec.dequantize(codec.quantize(w, None), w.shape) - w) / np.linalg.norm(w)
    assert rel <= _bound(codec)
    if name != "f32":  # a codec far better than its bound means the bound no longer tests anything
        assert rel >= _bound(codec) / 2


@pytest.mark.parametrize("name", ALL)
def test_zero_rows_stay_zero(name: str) -> None:
    codec = CODECS[name]
    w = np.zeros((2, 2 * max(codec.block_size, 32)), np.float32)
    assert not codec.dequantize(codec.quantize(w, None), w.shape).any()


@pytest.mark.parametrize("name", ALL)
def test_our_bytes_decode_identically_in_gguf(name: str) -> None:
    """gguf-py's dequantizer (used by every GGUF reader in Python) reads our blocks as we do."""
    codec = CODECS[name]
    bs = max(codec.block_size, 32)
    rng = np.random.default_rng(2)
    w = (rng.standard_t(3, (8, 4 * bs)) * 0.02).astype(np.float32)
    qw = rng.exponential(1.0, 4 * bs).astype(np.float32)
    for importance in (None, qw):
        data = codec.quantize(w, importance)
        ours = codec.dequantize(data, w.shape)
        theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name.upper()])
        np.testing.assert_array_equal(ours, theirs.reshape(w.shape))


@pytest.mark.parametrize("name", ALL)
def test_rows_are_independent_across_chunks(name: str) -> None:
    """~600k weights, more than one kernel call takes: chunking must not change or reorder rows."""
    codec = CODECS[name]
    cols = 2 * max(codec.block_size, 32)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((600_000 // cols + 3, cols)).astype(np.float32)
    qw = rng.exponential(1.0, cols).astype(np.float32)
    whole = codec.quantize(w, qw)
    for r in (0, w.shape[0] // 2, w.shape[0] - 1):
        np.testing.assert_array_equal(whole[r], codec.quantize(w[r : r + 1], qw)[0])


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_lowers_the_weighted_error(name: str) -> None:
    codec = CODECS[name]
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 1024)).astype(np.float32)
    qw = np.exp(rng.standard_normal(1024) * 1.5).astype(np.float32)

    def weighted_error(importance: np.ndarray | None) -> float:
        back = codec.dequantize(codec.quantize(w, importance), w.shape)
        return float(np.sum(qw * (back - w) ** 2))

    assert weighted_error(qw) < 0.9 * weighted_error(None)


@pytest.mark.parametrize("name", [n for n in ALL if CODECS[n].block_size > 1])
def test_rows_off_the_block_grid_are_refused(name: str) -> None:
    codec = CODECS[name]
    cols = 576 if codec.block_size == 256 else 48
    with pytest.raises(UnsupportedError, match=rf"blocks of {codec.block_size}.*{cols}"):
        codec.quantize(np.ones((2, cols), np.float32), None)
    with pytest.raises(UnsupportedError):
        codec.dequantize(np.zeros(100, np.uint8), (2, cols))


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_must_match_the_row(name: str) -> None:
    codec = CODECS[name]
    w = np.ones((2, 512), np.float32)
    with pytest.raises(ConfigError, match=r"\(512,\)"):
        codec.quantize(w, np.ones(256, np.float32))
    with pytest.raises(ConfigError, match="negative"):
        codec.quantize(w, np.full(512, -1.0, np.float32))


@pytest.mark.parametrize("name", QUANTIZED)
def test_non_finite_weights_are_refused(name: str) -> None:
    w = np.ones((2, 512), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(ValidationError, match="1 NaN or infinite"):
        CODECS[name].quantize(w, None)


def test_float_types_keep_non_finite_values() -> None:
    w = np.array([[np.inf, -np.inf, np.nan, 1.0]], np.float32)
    for name in ("f32", "f16", "bf16"):
        back = CODECS[name].dequantize(CODECS[name].quantize(w, None), w.shape)
        np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("name", ALL)
def test_truncated_bytes_are_refused(name: str) -> None:
    codec = CODECS[name]
    shape = (3, 2 * max(codec.block_size, 32))
    data = codec.quantize(np.ones(shape, np.float32), None)
    with pytest.raises(CorruptFileError, match="expected"):
        codec.dequantize(data.reshape(-1)[:-1], shape)
    np.testing.assert_array_equal(
        codec.dequantize(data.tobytes(), shape), codec.dequantize(data, shape)
    )


# kvalues_iq4nl: -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113
BEST_INDEX = [
    (-1e30, 0),
    (-127.0, 0),
    (-115.6, 0),
    (-115.5, 1),  # halfway between -127 and -104: a tie goes to the upper level
    (-4.6, 7),
    (-4.5, 8),  # halfway between -10 and 1
    (0.0, 8),
    (100.9, 14),
    (101.0, 15),  # halfway between 89 and 113
    (113.0, 15),
    (np.inf, 15),
    (-np.inf, 0),
    (np.nan, 15),  # no comparison holds: C's bisection ends on the top level
]


def test_iq4_best_index_is_llama_cpp_s() -> None:
    """`best_index_int8` on hand-picked points: edges, exact ties and non-finite values."""
    x = np.array([v for v, _ in BEST_INDEX], np.float32)
    with np.errstate(invalid="ignore"):
        got = iquants.best_index(x)
        levels = iquants.nearest_level(x)
    assert got.tolist() == [i for _, i in BEST_INDEX]
    np.testing.assert_array_equal(levels, iquants.KVALUES[got])


def test_iq4_golden_blocks() -> None:
    """Blocks worked out by hand from `quantize_row_iq4_nl_impl`: weights that sit exactly on
    the levels at scale 2^-7 (d = 2^-7 = fp16 0x2000, indices j % 16), the same as an iq4_xs
    super-block (d = -max_scale / 32 = -2^-12 = 0x8c00, every sub-block l = -32, code 0), and all
    zeros (iq4_nl d = 0 with index 8, the level nearest 0; iq4_xs d = -0.0 and code 32)."""
    on_levels = np.tile(iquants.KVALUES / 128, 2)[None]  # (1, 32)
    qs = bytes(17 * i for i in range(16))  # 00 11 22 .. ff
    assert CODECS["iq4_nl"].quantize(on_levels).tobytes() == bytes.fromhex("0020") + qs
    expected_xs = bytes.fromhex("008c000000000000") + qs * 8
    assert CODECS["iq4_xs"].quantize(np.tile(on_levels, 8)).tobytes() == expected_xs
    zeros = np.zeros((1, 256), np.float32)
    assert CODECS["iq4_nl"].quantize(zeros[:, :32]).tobytes() == b"\0\0" + b"\x88" * 16
    zero_xs = bytes.fromhex("0080aaaa00000000") + b"\x88" * 128
    assert CODECS["iq4_xs"].quantize(zeros).tobytes() == zero_xs


def test_unknown_codec_lists_the_known_ones() -> None:
    with pytest.raises(UnsupportedError, match="q4_k"):
        get_codec("q4_k_m")
