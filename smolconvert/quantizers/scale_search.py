"""llama.cpp's scale searches, vectorised over groups and bit-exact in float32.

Mirrors the helpers of ggml/src/ggml-quants.c (llama.cpp @ 0c1e57098, the copy in llama-cpp-python
0.3.36): `nearest_int`, `make_qx_quants` (rmse_type 1), `make_q3_quants`, `make_qkx2_quants` /
`make_qkx3_quants` and `make_qp_quants`. Arrays are element-major: x has shape (n, groups), the n
values of one group down axis 0, so a C loop `for (i = 0; i < n; ++i) acc += f(x[i])` becomes n
float32 additions of whole rows in the same order (numpy's own sum pairs terms, rounding otherwise).
ggml-base is compiled without FMA, so every C expression is float32 operations left to right; each
expression below keeps its operand order. Loops run over the n elements of a group, the search steps
and the refinement passes, never over groups.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_ROUND_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low bits

Floats = NDArray[np.float32]
Ints = NDArray[np.int32]

# Lanes of groups that C skips (all-zero, flat, det <= 0) still compute here, then are masked out.
_masked_lanes = np.errstate(divide="ignore", invalid="ignore", over="ignore")


def nearest_int(v: Floats) -> Ints:
    """`nearest_int`: round half to even through the float trick, reproducing its bits everywhere.

    Inside |v| < 2**22 this is np.rint; outside (huge quotients by a tiny fp16 scale) llama.cpp
    returns whatever the mantissa holds, and so do we.
    """
    bits = (v + _ROUND_MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seqsum(t: Floats) -> Floats:
    """`float acc = 0; for (i...) acc += t[i];` over axis 0: (n, groups) -> (groups,)."""
    acc = t[0] + F32(0)
    for row in t[1:]:
        acc += row
    return acc


def _seqsum_from_first(t: Floats) -> Floats:
    """`float acc = t[0]; for (i = 1...) acc += t[i];` (the start of make_qkx2/3_quants)."""
    acc = t[0].copy()
    for row in t[1:]:
        acc += row
    return acc


def abs_max(x: Floats, axis: int = 0) -> tuple[Floats, Floats]:
    """(max |x|, the signed x holding it) along axis, as the C loop `if (ax > amax) {..}` finds.

    First occurrence wins, NaN never does, and a group with no |x| > 0 gives (0, 0).
    """
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), F32(0), ax)
    imax = np.expand_dims(np.argmax(ax, axis=axis), axis)
    amax = np.take_along_axis(ax, imax, axis=axis).squeeze(axis)
    vmax = np.take_along_axis(x, imax, axis=axis).squeeze(axis)
    return amax, np.where(amax > 0, vmax, F32(0))


def running_max(x: Floats) -> Floats:
    """`float max = 0; for (i...) max = MAX(max, x[i]);` over axis 0, NaN handling included."""
    acc = np.zeros(x.shape[1:], F32)
    for row in x:
        acc = np.where(acc > row, acc, row)
    return acc


@_masked_lanes
def make_qx_quants(
    x: Floats, nmax: int, qw: Floats | None = None, positive: bool = False
) -> tuple[Floats, Ints]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`: symmetric scale, 19-step sweep around nmax.

    x, qw (n, groups) -> (scale (groups,), L (n, groups) in [0, 2*nmax)); weights x*x without qw.
    llama.cpp maps the element of largest magnitude to -nmax, so a group whose largest element is
    positive gets a negative scale. `positive`: scales >= 0 (XNNPACK refuses negative ones); such
    a group's largest element maps to nmax - 1 instead, and its sweep runs around that.
    """
    amax, vmax = abs_max(x)
    w = x * x if qw is None else qw
    wx = w * x
    # the sweep's centre and direction: -nmax / vmax as llama.cpp, or (nmax - 1) / vmax
    flip = positive & (vmax > 0)
    centre = np.where(flip, F32(nmax - 1), F32(-nmax))
    direction = np.where(flip, F32(1), F32(-1))

    def candidate(iscale: Floats) -> tuple[Floats, Floats, Floats]:
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        return lv, seqsum(wx * lv), seqsum(w * lv * lv)

    lv, sumlx, suml2 = candidate(centre / vmax)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    levels = lv
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, slx, sl2 = candidate((centre + direction * F32(0.1) * F32(step)) / vmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = np.where(better, lv, levels)
        scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    zero = amax < GROUP_MAX_EPS
    out = levels.astype(np.int32) + nmax
    out[:, zero] = 0
    return np.where(zero, F32(0), scale), out


@_masked_lanes
def make_q3_quants(x: Floats, nmax: int) -> tuple[Floats, Ints]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)`: x*x weights, 5 coordinate-descent passes.

    A pass that changes nothing leaves the state as it was, so running all 5 passes on every group
    equals llama.cpp's early `break`.
    """
    amax, vmax = abs_max(x)
    levels = np.clip(nearest_int((F32(-nmax) / vmax) * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * levels)
    suml2 = seqsum(w * levels * levels)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = levels[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1).astype(F32)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + w[i] * new * new
            take = (
                (slx > 0)
                & (new != li)
                & (sl2_new > 0)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            levels[i] = np.where(take, new, li)
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
    zero = amax < GROUP_MAX_EPS
    out = levels.astype(np.int32) + nmax
    out[:, zero] = 0
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), out


@_masked_lanes
def make_qkx_quants(
    x: Floats,
    w: Floats,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[Floats, Ints, Floats]:
    """`make_qkx2_quants` / `make_qkx3_quants` (identical once weights are given): scale and min.

    Sweeps nstep + 1 scales (rmin + rdelta*is + nmax) / (max - min), fits scale and min by weighted
    least squares on each level set and keeps the lowest weighted error (|diff| when use_mad).
    x, w (n, groups) -> (scale, L (n, groups) in [0, nmax], the_min = -min >= 0).
    """
    vmin = x.min(axis=0)
    vmax = x.max(axis=0)
    sum_w = _seqsum_from_first(w)
    sum_x = _seqsum_from_first(w * x)
    vmin = np.where(vmin > 0, F32(0), vmin)

    def levels_for(scale_num: Floats | np.float32, mn: Floats) -> Floats:
        return np.clip(nearest_int(scale_num / (vmax - mn) * (x - mn)), 0, nmax).astype(F32)

    def error(scale: NDArray[Any], lv: NDArray[Any], mn: NDArray[Any]) -> NDArray[Any]:
        diff = scale * lv + mn - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    # C reuses `min` for the best fit so far: later steps measure span and offset from it.
    mn = vmin
    scale = F32(1) / (F32(nmax) / (vmax - vmin))
    levels = levels_for(F32(nmax), vmin)
    best = error(scale, levels, vmin)
    for step in range(nstep + 1):
        lv = levels_for(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax), mn)
        wl = w * lv
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lv), seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, lv, this_min)
        better = (det > 0) & (cur < best)
        levels = np.where(better, lv, levels)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    flat = vmax == vmin
    out = levels.astype(np.int32)
    out[:, flat] = 0
    return np.where(flat, F32(0), scale), out, -mn


@_masked_lanes
def make_qp_quants(x: Floats, nmax: int, qw: Floats) -> tuple[Floats, Ints]:
    """`make_qp_quants`: non-negative values (super-block scales or mins) -> scale, L in [0, nmax].

    Sweeps 8 scales around nmax / max by weighted squared error, then 5 coordinate-descent passes.
    L is kept as llama.cpp's uint8 holds it (values wrap modulo 256 where C wraps them).
    """
    vmax = running_max(x)
    iscale = F32(nmax) / vmax
    scale0 = F32(1) / iscale
    diff = x - scale0 * (nearest_int(iscale * x) & 0xFF).astype(F32)
    best = seqsum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / vmax
        scale_is = F32(1) / iscale_is
        diff = x - scale_is * np.minimum(nmax, nearest_int(iscale_is * x)).astype(F32)
        mse = seqsum(qw * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    lv = np.minimum(nmax, nearest_int(iscale * x))
    lvf = lv.astype(F32)
    sumlx = seqsum(qw * x * lvf)
    suml2 = seqsum(qw * lvf * lvf)
    stored = (lv & 0xFF).astype(F32)
    wx = qw * x
    for _ in range(5):
        for i in range(x.shape[0]):
            li = stored[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - qw[i] * li * li
            new_i = np.minimum(nmax, nearest_int(x[i] * sl2 / slx))
            new = new_i.astype(F32)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + qw[i] * new * new
            take = (
                (slx > 0)
                & (sl2 > 0)
                & (new != li)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            stored[i] = np.where(take, (new_i & 0xFF).astype(F32), li)
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
    zero = vmax < GROUP_MAX_EPS
    out = stored.astype(np.int32)
    out[:, zero] = 0
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), out
