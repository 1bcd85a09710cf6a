"""1-D k-means with pinned extremes: the look-up tables of palettized weights.

Any codec that stores a weight as indices into a small table of values may use it (Core ML's
lut4/lut6/lut8 do). Rows are clustered independently, all at once (torch over a (G, n) batch):
Lloyd's iterations, centroids started at quantiles, nearest centroid by a binary search on the
midpoints of the sorted centroids.
"""

from __future__ import annotations

import numpy as np

from smolconvert.quantizers.codec import Floats


def kmeans_1d(x: Floats, k: int, iters: int = 16) -> Floats:
    """k sorted centroids for each row of x (G, n) -> (G, k); the first and last centroid of a
    row are pinned at its min and max.

    Pinning matters: plain k-means spends no centroid on the few outlier weights of a group, yet
    in SmolLM2 those outliers (in o_proj and down_proj, which write the residual stream's massive
    activations) decide the output (measured: docs/coreml.md).
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    lo, hi = t.min(dim=1).values, t.max(dim=1).values
    qs = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    c = torch.quantile(t, qs, dim=1).T.contiguous()  # (G, k)
    for _ in range(iters + 1):
        c[:, 0], c[:, -1] = lo, hi
        c, _ = torch.sort(c, dim=1)
        mid = (c[:, 1:] + c[:, :-1]) / 2
        idx = torch.searchsorted(mid.contiguous(), t)
        sums = torch.zeros_like(c).scatter_add_(1, idx, t)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(t))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    c[:, 0], c[:, -1] = lo, hi
    centroids: Floats = torch.sort(c, dim=1).values.numpy()
    return centroids
