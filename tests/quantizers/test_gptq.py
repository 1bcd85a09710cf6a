"""GPTQ against round-to-nearest on the same codec: lower output error on correlated inputs, and
output that is a valid point of the codec's grid (it packs and dequantizes like any other)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smolconvert.quantizers.nbits import FORMATS, dequantize, quantize


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
    codec = FORMATS[name]
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
    got = dequantize(quantize(w, FORMATS["int4_b32_uint8"], hessian))
    assert np.isfinite(got).all()
    live = np.r_[0:10, 20:64]
    rtn = dequantize(quantize(w, FORMATS["int4_b32_uint8"]))
    err = ((x[:, live] @ (got - w)[:, live].T) ** 2).mean()
    assert err < ((x[:, live] @ (rtn - w)[:, live].T) ** 2).mean()


def test_refit_scales_lowers_the_output_error_of_fixed_levels() -> None:
    """The least-squares scales beat the grid search's on the Hessian's objective; a block whose
    weights are all zero keeps its zero scale."""
    from smolconvert.quantizers.gptq import refit_scales

    rng = np.random.default_rng(3)
    codec = FORMATS["int4_b32_none"]
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


def _attention(seed: int, use_rope: bool = True):  # noqa: ANN202 - the reference's Attention
    """A reference attention (4 query heads on 2 kv heads of 16) with random weights, and its
    rope/mask for one window of 12 tokens."""
    from smolconvert.model.reference import ReferenceDecoder
    from smolconvert.model.spec import ModelSpec

    spec = ModelSpec("llama", 1, 64, 128, 4, 2, 16, 100, 1e-5, 10000.0, 64, True, (use_rope,))
    torch.manual_seed(seed)
    dec = ReferenceDecoder(spec)
    att = dec.model.layers[0].self_attn
    for lin in (att.q_proj, att.k_proj, att.v_proj):
        torch.nn.init.normal_(lin.weight, std=0.3)
    cos, sin, mask = dec.rope_and_mask(
        torch.ones((1, 12), dtype=torch.long), torch.arange(12)[None], torch.float32
    )
    return att, cos, sin, mask


def _mixed_values(att, x, cos, sin, mask) -> torch.Tensor:  # noqa: ANN001
    """The attention output before o_proj, (B, T, heads * head_dim)."""
    caught: list[torch.Tensor] = []
    hook = att.o_proj.register_forward_pre_hook(lambda _, a: caught.append(a[0]))
    empty = torch.zeros((len(x), att.n_kv, 0, att.head_dim))
    try:
        att(x, cos, sin, mask, empty, empty)
    finally:
        hook.remove()
    return caught[0]


@pytest.mark.parametrize("use_rope", [True, False])
@torch.inference_mode()
def test_v_hessian_is_exactly_the_attention_outputs_error(use_rope: bool) -> None:
    """Moving v's rows of kv head g by E moves g's query heads' outputs by exactly E's quadratic
    form on that head's Hessian (times tokens and group size, the normalisation)."""
    from smolconvert.quantizers.gptq import attention_hessians

    att, cos, sin, mask = _attention(1, use_rope)
    xs = [torch.randn(2, 12, 64), torch.randn(3, 12, 64)]
    hk, hv = attention_hessians(att, xs, cos, sin, mask)
    assert len(hk) == len(hv) == 2
    before = [_mixed_values(att, x, cos, sin, mask) for x in xs]
    g, group, hd = 1, 2, 16
    e = torch.randn(hd, 64) * 0.01
    att.v_proj.weight[g * hd : (g + 1) * hd] += e
    after = [_mixed_values(att, x, cos, sin, mask) for x in xs]
    cols = slice(g * group * hd, (g + 1) * group * hd)  # the group's query heads
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    moved = sum(float((d[..., cols].double() ** 2).sum()) for d in diffs)
    other = sum(float((d[..., : g * group * hd] ** 2).sum()) for d in diffs)
    predicted = float(torch.trace(e.double() @ hv[g] @ e.double().T)) * 5 * 12 * group
    assert other == 0.0
    assert abs(moved - predicted) < 1e-4 * predicted, (moved, predicted)


@torch.inference_mode()
def test_k_hessian_weighs_each_token_by_the_attention_it_receives() -> None:
    """Identical tokens: both Hessians are that token's x x^T (mean weight 1). A loud first token
    that every query attends to dominates k's Hessian more than the input's."""
    from smolconvert.quantizers.gptq import attention_hessians, gram

    att, cos, sin, mask = _attention(2)
    u = torch.randn(64)
    hk, hv = attention_hessians(att, [u.expand(2, 12, 64).clone()], cos, sin, mask)
    for h in (*hk, *hv):
        assert torch.allclose(h, torch.outer(u, u).double(), rtol=1e-4, atol=1e-5)
    x = torch.randn(1, 12, 64)
    sink = torch.randn(64)
    x[:, 0] = 3 * sink
    att.k_proj.weight.zero_()  # equal scores: query i attends 1/(i+1) to each earlier key
    hk, _ = attention_hessians(att, [x], cos, sin, mask)
    weights = torch.tensor([sum(1 / (i + 1) for i in range(t, 12)) for t in range(12)])
    expected = gram(x[0] * weights[:, None].sqrt()) / 12
    assert torch.allclose(hk[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(hk[1], expected, rtol=1e-5, atol=1e-6)
    plain = gram(x[0]) / 12
    share = float(sink @ hk[0].float() @ sink) / float(sink @ plain.float() @ sink)
    assert share > 2.0, share  # the first key gets 3.1x the mean attention here


def test_quantize_takes_one_hessian_per_row_range() -> None:
    """Segments: each row range is GPTQ'd on its own Hessian, exactly as alone."""
    rng = np.random.default_rng(5)
    codec = FORMATS["int4_b32_none"]
    w = (rng.standard_normal((40, 64)) * 0.05).astype(np.float32)
    h1, h2 = (
        torch.from_numpy((x.T @ x / len(x)).astype(np.float64))
        for x in (_inputs(rng, 512, 64), _inputs(rng, 512, 64))
    )
    both = quantize(w, codec, [(16, h1), (24, h2)])
    parts = [quantize(w[:16], codec, h1), quantize(w[16:], codec, h2)]
    assert np.array_equal(both.packed, np.concatenate([p.packed for p in parts]))
    assert np.array_equal(both.scales, np.concatenate([p.scales for p in parts]))
    assert not np.array_equal(both.packed, quantize(w, codec, h1).packed)


@pytest.mark.parametrize("use_rope", [True, False])
@torch.inference_mode()
def test_pooled_hessians_are_the_mean_of_the_per_head_ones(use_rope: bool) -> None:
    """Pooled k and v Hessians, computed without a gram per head, equal the per-head ones
    averaged over kv heads; so moving all of v's rows by E costs E's form on the pooled one."""
    from smolconvert.quantizers.gptq import attention_hessians

    att, cos, sin, mask = _attention(4, use_rope)
    xs = [torch.randn(2, 12, 64), torch.randn(3, 12, 64)]
    hk, hv = attention_hessians(att, xs, cos, sin, mask)
    pk, pv = attention_hessians(att, xs, cos, sin, mask, pooled=True)
    assert len(pk) == len(pv) == 1
    for pooled, per_head in ((pk[0], sum(hk) / 2), (pv[0], sum(hv) / 2)):
        assert (pooled - per_head).abs().max() < 1e-6 * per_head.abs().max()  # fp32 sums
    assert not torch.allclose(hv[0], hv[1], rtol=1e-2)  # the heads differ: pooling is a choice


def test_gptq_option_pools_kv_hessians_above_eight_kv_heads() -> None:
    from smolconvert.quantizers.onnx_recipes import kv_hessians

    published = {"SmolLM2-135M": 3, "SmolLM2-360M": 5, "SmolLM3-3B": 4, "SmolLM2-1.7B": 32}
    auto = {name: kv_hessians("auto", heads) for name, heads in published.items()}
    assert auto == {
        "SmolLM2-135M": "per-head",
        "SmolLM2-360M": "per-head",
        "SmolLM3-3B": "per-head",
        "SmolLM2-1.7B": "pooled",
    }
    assert kv_hessians("per-head", 32) == "per-head" and kv_hessians("pooled", 3) == "pooled"
