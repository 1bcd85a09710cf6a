"""K-quants: golden blocks from llama.cpp, and the 6-bit scale packing."""

from __future__ import annotations

import numpy as np
import pytest

from smolconvert.quantizers import CODECS
from smolconvert.quantizers.kquants import pack_k4_scales, unpack_k4_scales


def hand_block() -> np.ndarray:
    """(1, 256): four 64-wide ramps of growing amplitude, an all-zero sub-block, one outlier."""
    e = np.arange(256)
    x = ((e * 37) % 61 - 30) / 32 * (1 + e // 64)
    x[96:112] = 0.0
    x[200] = 9.0
    return x.astype(np.float32).reshape(1, 256)


# hand_block() quantized by llama.cpp itself (ggml_quantize_chunk without imatrix, i.e.
# quantize_row_qN_K_ref, llama-cpp-python 0.3.36 / llama.cpp 0c1e57098), recorded once.
GOLDEN = {
    "q2_k": (
        "4131413173630073a4c5a4c4cfe5c5f538130d271e38130d271e38130d2b1f3dd38d279e78d38d27"
        "9e78238d67d24827c249178d58d28917ae58d28917ce58d28d77deb9269d7bd289269d78e28927dd"
        "2c36c633"
    ),
    "q3_k": (
        "54e19275a256e59235a356e59275a356fc0fe03f03f80fc07e03f01fc0fc0ff03c31051b2f300116"
        "1b2c30021a2b3c30c63aac9cc3fa79ac9fc77969ac9737794516fb9cb14516ff8c71061bff8c6106"
        "796cdfc736696cd3f6396d9fc33639acb36db3a4072930c82a556aaa832c"
    ),
    "q4_k": (
        "bb22742b4949d29390d0dfdffc0cbff3700aa34dd7701ab44ee7811bb45ee8822bc55ff8922cc56f"
        "f9933cd66f09a33d7d77707a747d77717b747e78717b757ee8822cb55fe9822cc66f09933dc6600a"
        "1aa44dd7711ab45ee7812bb55ee8822bc56ff8923cc66f09933cd67009a34dd7e48016b258f48126"
        "cf58f49126c368f59137d36905a137d37005a247e47016b2"
    ),
    "q5_k": (
        "d91ea82b4949d29290d0dfe0fb0aeff39ca91aad6a9ca91afd6a9ca91abd6b9ead1ab56b16ad1a95"
        "2b16a50a952912a5d014478abee125589bcff23669acd003477abde114588bcef226699cdf03477a"
        "0a0d0104080b0e0205090c0f03060a0de014578bcef125689cdf034679ade01424689bdf023579ac"
        "e013468abdf124579bcef23568acdf034679bde114578acec8013c75a0d9124d8eb1f9225d96c1fa"
        "336ea7d20b437eb7e01b548fc8f12c65"
    ),
    "q6_k": (
        "70b70ea5fc92ea20d71ec40c42f930e7e26c149e37c04af27c15ae27d05ae38c0b01080f060d030b"
        "01080f060d030a01c83fb50d83ea51d82fa51c73fa40c73e1bbeba6e610da1ac1054ff93af4246e2"
        "5ae27c05ae37c05af38c15af38d15af3711bb03adf53fe921db136d075ff931851c83fa51c73ea50"
        "c73e950c72ea50b7341208230d341209271d342209271e38d1ba14ed4bd1be04ed4b10be04e17b10"
        "22a8d76d942269d74e98126dd72e9813be04ed4b10be04e17b10be47e17b14ae0df30d0d18e5001b"
        "23d9242780cccd35a618"
    ),
}
# Max |error| of each golden block against hand_block() (its largest value is 9.0).
# Measured: q2_k 2.87, q3_k 1.13, q4_k 0.39, q5_k 0.20, q6_k 0.14.
MAX_ABS_ERROR = {"q2_k": 3.0, "q3_k": 1.2, "q4_k": 0.42, "q5_k": 0.22, "q6_k": 0.15}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_hand_made_block_gives_llama_cpp_s_bytes(name: str) -> None:
    codec = CODECS[name]
    ours = codec.quantize(hand_block(), None)
    assert ours.shape == (1, codec.bits_per_weight * codec.block_size // 8)
    assert ours[0].tobytes().hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_block_decodes_near_the_hand_made_block(name: str) -> None:
    codec = CODECS[name]
    golden = np.frombuffer(bytes.fromhex(GOLDEN[name]), np.uint8)
    back = codec.dequantize(golden, (1, 256))
    assert np.abs(back - hand_block()).max() <= MAX_ABS_ERROR[name]
    if name in ("q3_k", "q6_k"):  # symmetric types give the all-zero sub-block a zero scale
        assert not back[0, 96:112].any()


def test_k4_scale_packing_round_trips_every_6_bit_value() -> None:
    codes = np.arange(64)
    sc = np.stack([np.roll(codes, k)[:8] for k in range(0, 64, 4)])  # (16, 8)
    m = sc[::-1] ^ 0x2A
    unpacked_sc, unpacked_m = unpack_k4_scales(pack_k4_scales(sc, m))
    np.testing.assert_array_equal(unpacked_sc, sc)
    np.testing.assert_array_equal(unpacked_m, m)
