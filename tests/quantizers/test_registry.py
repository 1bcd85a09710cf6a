"""Every codec of every family, from the one registry: names, geometry, round trips, golden bytes.

The golden digests (golden_codecs.json) were computed before the codecs moved into quantizers/
(issue 19), with the code that wrote the released artifacts; they pin every codec's bytes on one
seeded input. Codecs added since take libggml's bytes (iq4_nl, iq4_xs: `ggml_quantize_chunk`),
and test_oracle.py checks every GGUF digest against libggml. int4_b32_pos (ExecuTorch's XNNPACK
blocks) took its digest from the code that first wrote it: onnxruntime's kernel checks its
layout below and ExecuTorch's runtime its use (tests/exporters/test_executorch.py).
Family-specific oracles: GGUF against libggml (test_oracle.py), MatMulNBits below against
onnxruntime's own kernel, MLC against mlc-llm's arithmetic (test_group.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from smolconvert.errors import UnsupportedError
from smolconvert.quantizers import CODECS, get_codec
from smolconvert.quantizers.codec import FAMILIES, Codec, encoded_arrays
from smolconvert.quantizers.recipe import ROLES

GOLDEN = json.loads((Path(__file__).parent / "golden_codecs.json").read_text())
ALL = sorted(CODECS)
MANTISSA_BITS = {"f32": 24, "f16": 11, "bf16": 8}  # float codecs err by their mantissa


def golden_weights() -> np.ndarray:
    """The golden input: heavy-tailed like trained weights, one outlier, one all-zero row. Rows
    and columns fit every codec (rows % 16, cols % 256 and % 40)."""
    rng = np.random.default_rng(20261204)
    w = (rng.standard_t(4, (32, 1280)) * 0.02).astype(np.float32)
    w[3, 17] = 0.9
    w[5] = 0.0
    return w


def digest(encoded: object) -> str:
    h = hashlib.sha256()
    for a in encoded_arrays(encoded):
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def test_every_family_registers_codecs_under_unique_names() -> None:
    assert {c.family for c in CODECS.values()} == set(FAMILIES)
    assert all(name == c.name for name, c in CODECS.items())
    assert set(GOLDEN) == set(CODECS), "a codec without a golden digest, or a golden without codec"


@pytest.mark.parametrize("name", ALL)
def test_golden_bytes(name: str) -> None:
    codec = CODECS[name]
    assert digest(codec.quantize(golden_weights(), None)) == GOLDEN[name]


@pytest.mark.parametrize("name", ALL)
def test_round_trip_error_fits_the_bits(name: str) -> None:
    """quantize -> dequantize keeps the shape and roughly the values: relative RMS error below
    0.35 (floats: their mantissa's rounding), far above every codec's real error on these
    heavy-tailed weights (each family's own tests hold tight bounds), while a codec that decodes
    the wrong layout or scale lands near 1. Block codecs keep an all-zero row exactly zero."""
    codec: Codec = CODECS[name]
    w = golden_weights()
    back = codec.dequantize(codec.quantize(w, None), w.shape)
    assert back.shape == w.shape and back.dtype == np.float32
    rel = float(np.linalg.norm(back - w) / np.linalg.norm(w))
    bound = 2.0 ** -(MANTISSA_BITS[name] - 2.5) if name in MANTISSA_BITS else 0.35
    assert rel <= bound, rel
    if not name.startswith("lut"):  # a look-up table need not hold an exact zero
        assert not back[5].any(), "an all-zero row must decode to zeros"


def _stored_bits(a: np.ndarray) -> int:
    """Bits an array takes in its file: Core ML's sub-byte arrays are uint8 in numpy, with the
    real width in the dtype's metadata (coremltools' np_uint4_dtype and kin)."""
    true = (a.dtype.metadata or {}).get("true_dtype")
    return a.size * (true.get_bitwidth() if true is not None else 8 * a.dtype.itemsize)


@pytest.mark.parametrize("name", ALL)
def test_bits_per_weight_is_what_it_stores(name: str) -> None:
    """The stored arrays of a (32, 1280) weight hold bits_per_weight bits per weight (within 6%:
    Core ML's look-up tables, 0.2 bits a weight at lut4 on 1280 columns)."""
    codec = CODECS[name]
    w = golden_weights()
    stored = sum(_stored_bits(a) for a in encoded_arrays(codec.quantize(w, None)))
    assert stored / w.size == pytest.approx(codec.bits_per_weight, rel=0.06)


def test_get_codec_checks_the_family() -> None:
    assert get_codec("Q4_K").name == "q4_k"
    assert get_codec("q4_k", "gguf").family == "gguf"
    with pytest.raises(UnsupportedError, match="unknown onnx codec 'q4_k'.*int4_b32_none"):
        get_codec("q4_k", "onnx")


def test_roles_are_llama_cpp_s() -> None:
    assert ROLES[:2] == ("token_embd", "output") and "attn_v" in ROLES and "ffn_down" in ROLES
