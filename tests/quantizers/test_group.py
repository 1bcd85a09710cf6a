"""MLC group quantization: golden words, round trips, and TVM-built MLC math as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from smolconvert.quantizers import group
from tests.conftest import require_module

CONFIGS = sorted(group.GROUP_CONFIGS)


def test_golden_q4f16_1_group() -> None:
    # One group of 32 with max|w| = 7: scale 1, q = w + 7, eight codes per word, low bits first.
    w = np.zeros((1, 32), np.float32)
    w[0, :15] = np.arange(-7, 8)
    qw, qs = group.quantize(w, group.GROUP_CONFIGS["q4f16_1"])
    assert qs.dtype == np.float16 and qs.tolist() == [[1.0]]
    assert qw.dtype == np.uint32 and qw.shape == (1, 4)
    assert [hex(x) for x in qw[0]] == ["0x76543210", "0x7edcba98", "0x77777777", "0x77777777"]


def test_round_half_to_even_and_clip() -> None:
    cfg = group.GROUP_CONFIGS["q4f16_1"]
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, 0.5, 1.5, -0.5]  # scale 1: 7.5 -> 8, 8.5 -> 8, 6.5 -> 6
    codes = group.quantize_codes(w, group.mlc_scales(w, cfg), cfg)
    assert codes[0, :4].tolist() == [14, 8, 8, 6]


@pytest.mark.parametrize("scheme", CONFIGS)
@pytest.mark.parametrize("shape", [(3, 64), (5, 100), (2, 40)])
def test_round_trip(scheme: str, shape: tuple[int, int]) -> None:
    cfg = group.GROUP_CONFIGS[scheme]
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    qw, qs = group.quantize(w, cfg)
    assert (qw.shape, qs.shape) == cfg.packed_shape(*shape)
    dq = group.dequantize(qw, qs, shape[1], cfg).astype(np.float32)
    step = np.repeat(qs.astype(np.float32), cfg.group_size, axis=1)[:, : shape[1]]
    # Within half a step (plus fp16 rounding of w and the product).
    assert np.all(np.abs(dq - w) <= 0.5 * step + 2e-3 * np.abs(w) + 1e-3)
    codes = group.unpack(qw, shape[1], cfg)
    assert codes.max() <= 2 * cfg.max_int
    assert np.array_equal(group.pack(codes, cfg), qw)


@pytest.mark.parametrize("scheme", CONFIGS)
def test_search_never_worse_than_mlc(scheme: str) -> None:
    cfg = group.GROUP_CONFIGS[scheme]
    w = (np.random.default_rng(2).standard_t(4, (64, 120)) * 0.05).astype(np.float32)
    err = {}
    for mode in group.SCALE_MODES:
        qw, qs = group.quantize(w, cfg, mode)
        dq = group.dequantize(qw, qs, 120, cfg).astype(np.float32)
        err[mode] = float((w * w * (dq - w) ** 2).sum())  # the x^2-weighted error it minimises
    assert err["search"] < 0.95 * err["mlc"]


def test_search_uses_importance() -> None:
    cfg = group.GROUP_CONFIGS["q4f16_1"]
    w = (np.random.default_rng(3).standard_normal((32, 64)) * 0.05).astype(np.float32)
    imp = np.ones(64, np.float32)
    imp[::2] = 100.0

    def weighted_err(qs_qw: tuple) -> float:
        qw, qs = qs_qw
        dq = group.dequantize(qw, qs, 64, cfg).astype(np.float32)
        return float((imp * (dq - w) ** 2).sum())

    assert weighted_err(group.quantize(w, cfg, "search", imp)) < weighted_err(
        group.quantize(w, cfg, "search")
    )


def _tvm_mlc(w: np.ndarray, cfg: group.GroupConfig) -> tuple[np.ndarray, ...]:
    """MLC's GroupQuantize._quantize, pack_weight and _dequantize (group_quantization.py,
    utils.py @ 01ced331) as TVM tensor expressions, compiled by TVM for llvm: the oracle."""
    import tvm
    from tvm import te
    from tvm import tirx as tir

    rows, k = w.shape
    dt, gs, epg, bits = cfg.model_dtype, cfg.group_size, cfg.elem_per_storage, cfg.bits
    ng = cfg.n_groups(k)
    nstore = ng * cfg.storage_per_group
    mi = tir.const(cfg.max_int, dt)
    W = te.placeholder((rows, k), dt, name="w")
    r = te.reduce_axis((0, gs), name="r")
    max_abs = te.compute(
        (rows, ng),
        lambda i, g: te.max(
            tir.if_then_else(g * gs + r < k, te.abs(W[i, g * gs + r]), te.min_value(dt)), axis=r
        ),
    )
    scale = te.compute((rows, ng), lambda i, g: max_abs[i, g] / mi)
    q = te.compute(
        (rows, k),
        lambda i, j: tir.min(
            tir.max(tir.round(W[i, j] / scale[i, j // gs] + mi), tir.const(0, dt)), mi * 2
        ).astype("uint32"),
    )
    rr = te.reduce_axis((0, epg), name="rr")
    packed = te.compute(
        (rows, nstore),
        lambda i, s: tir.sum(
            tir.if_then_else(
                s * epg + rr < k,
                q[i, s * epg + rr] << (rr * bits).astype("uint32"),
                tir.const(0, "uint32"),
            ),
            axis=rr,
        ),
    )
    mask = tir.const((1 << bits) - 1, "uint32")
    deq = te.compute(
        (rows, k),
        lambda i, j: (
            (
                tir.bitwise_and(
                    tir.shift_right(packed[i, j // epg], ((j % epg) * bits).astype("uint32")), mask
                ).astype(dt)
                - mi
            )
            * scale[i, j // gs]
        ),
    )
    f = tvm.build(te.create_prim_func([W, packed, scale, deq]), target="llvm")
    outs = [
        tvm.runtime.empty((rows, nstore), "uint32"),
        tvm.runtime.empty((rows, ng), dt),
        tvm.runtime.empty((rows, k), dt),
    ]
    f(tvm.runtime.tensor(w.astype(dt)), *outs)
    return tuple(o.numpy() for o in outs)


@pytest.mark.parametrize("scheme", CONFIGS)
def test_bit_identical_to_mlc_math_built_by_tvm(scheme: str) -> None:
    require_module("tvm", "mlc")
    cfg = group.GROUP_CONFIGS[scheme]
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((40, 100)) * 0.05).astype(np.float32)
    w[0, :32] = np.arange(32) * 0.25  # exact .5 ties after the divide
    w[1, :40] = 0.0  # an all-zero group (TVM: 0/0; both dequantize to 0)
    qw, qs = group.quantize(w, cfg)
    tw, ts, tdq = _tvm_mlc(w, cfg)
    assert np.array_equal(qs, ts)
    assert np.array_equal(qw, tw)
    dq = group.dequantize(qw, qs, 100, cfg)
    assert np.array_equal(dq.view(np.uint8), tdq.view(np.uint8))  # bitwise, -0 included
