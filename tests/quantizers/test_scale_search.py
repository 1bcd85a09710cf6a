"""llama.cpp's scale-search helpers: rounding, summation order, exact fits, group independence."""

from __future__ import annotations

import numpy as np
import pytest

from smolconvert.quantizers.scale_search import (
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)

F32 = np.float32


def test_nearest_int_rounds_half_to_even() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999998, 4194303.0, -4194303.0], F32)
    np.testing.assert_array_equal(nearest_int(v), [0, 2, 2, 0, -2, -2, 3, 4194303, -4194303])
    w = np.random.default_rng(0).uniform(-1e6, 1e6, 10_000).astype(F32)
    np.testing.assert_array_equal(nearest_int(w), np.rint(w).astype(np.int32))


def test_nearest_int_keeps_the_c_trick_s_bits_out_of_range() -> None:
    # 1e7 + 12582912 = 22582912 = 2**24 * (1 + 2902848 / 2**23): mantissa 2902848 - 2**22
    assert nearest_int(np.array([1e7], F32))[0] == 2902848 - 4194304
    assert nearest_int(np.array([np.inf], F32))[0] == -4194304


def test_seqsum_adds_in_c_order() -> None:
    tiny = 2.0**-24  # half an ulp of 1.0: each addition to 1.0 rounds back to 1.0
    assert seqsum(np.array([[1.0], [tiny], [tiny]], F32))[0] == F32(1.0)
    assert seqsum(np.array([[tiny], [tiny], [1.0]], F32))[0] == F32(1.0) + F32(2.0**-23)


def test_make_qx_quants_finds_an_exact_grid() -> None:
    k = np.arange(-8, 8)
    x = np.stack([np.tile(k * 0.5, 2), np.zeros(32)], axis=1).astype(F32)  # (32, 2)
    scale, levels = make_qx_quants(x, 8)
    assert scale.tolist() == [0.5, 0.0]
    np.testing.assert_array_equal(levels[:, 0], np.tile(k + 8, 2))
    assert not levels[:, 1].any()


def test_make_q3_quants_finds_an_exact_grid() -> None:
    k = np.arange(-4, 4)
    x = np.stack([np.tile(k * 0.25, 2), np.zeros(16)], axis=1).astype(F32)
    scale, levels = make_q3_quants(x, 4)
    assert scale.tolist() == [0.25, 0.0]
    np.testing.assert_array_equal(levels[:, 0], np.tile(k + 4, 2))
    assert not levels[:, 1].any()


def test_make_qkx_quants_finds_scale_and_min() -> None:
    q = np.tile(np.arange(16), 2)
    x = np.stack([q * 0.25 - 1.0, np.full(32, -2.0)], axis=1).astype(F32)
    scale, levels, the_min = make_qkx_quants(x, np.ones_like(x), 15, -1.0, 0.1, 20, False)
    assert scale.tolist() == [0.25, 0.0]
    assert the_min.tolist() == [1.0, 2.0]  # a flat group keeps its value as the min
    np.testing.assert_array_equal(levels[:, 0], q)
    assert not levels[:, 1].any()


def test_make_qp_quants_quantizes_scales_on_a_grid() -> None:
    x = (np.arange(8) * 0.1).astype(F32).reshape(8, 1)
    scale, levels = make_qp_quants(x, 7, np.ones_like(x))
    np.testing.assert_array_equal(levels[:, 0], np.arange(8))
    assert scale[0] == pytest.approx(0.1, rel=1e-6)


def test_searches_treat_every_group_on_its_own() -> None:
    """Vectorised over 40 groups equals one group at a time (no state leaks between lanes)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_t(3, (32, 40)) * 0.1).astype(F32)
    w = rng.exponential(1.0, (32, 40)).astype(F32)
    searches = {
        "qx": lambda x, w: make_qx_quants(x, 16, w),
        "q3": lambda x, w: make_q3_quants(x, 4),
        "qkx": lambda x, w: make_qkx_quants(x, w, 15, -0.9, 0.05, 36, False),
        "qp": lambda x, w: make_qp_quants(np.abs(x), 63, w),
    }
    for name, search in searches.items():
        together = search(x, w)
        for g in (0, 17, 39):
            alone = search(x[:, g : g + 1].copy(), w[:, g : g + 1].copy())
            for a, b in zip(together, alone, strict=True):
                np.testing.assert_array_equal(a[..., g], b[..., 0], err_msg=name)


def test_make_qx_quants_positive_keeps_scales_non_negative() -> None:
    """`positive`: every scale >= 0, the fit as close as the signed sweep allows one level less on
    the largest element; groups whose largest element is negative are searched as before."""
    x = np.random.default_rng(3).standard_t(4, (32, 512)).astype(F32)
    signed_scale, signed_levels = make_qx_quants(x, 8)
    scale, levels = make_qx_quants(x, 8, positive=True)
    assert (scale >= 0).all() and (signed_scale < 0).any()
    negative_max = x[np.abs(x).argmax(0), np.arange(x.shape[1])] < 0
    np.testing.assert_array_equal(scale[negative_max], signed_scale[negative_max])
    np.testing.assert_array_equal(levels[:, negative_max], signed_levels[:, negative_max])

    def rmse(s: np.ndarray, lv: np.ndarray) -> float:
        return float(np.sqrt(np.mean(((lv.astype(F32) - 8) * s - x) ** 2)))

    assert rmse(scale, levels) < 1.1 * rmse(signed_scale, signed_levels)
