"""1-D k-means with pinned extremes (the tables of palettized weights)."""

from __future__ import annotations

import numpy as np

from smolconvert.quantizers.kmeans import kmeans_1d


def test_separated_clusters_are_found_per_row() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[-3.0, -1.0, 0.5, 2.0], [10.0, 20.0, 30.0, 40.0]])
    x = np.stack([c[rng.integers(0, 4, 400)] + rng.normal(0, 1e-3, 400) for c in centres])
    got = kmeans_1d(x.astype(np.float32), 4)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, centres, atol=1e-2)


def test_extremes_are_pinned_and_centroids_sorted() -> None:
    """A lone outlier gets its own centroid; plain k-means would merge it into the nearest."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.02, (3, 500)).astype(np.float32)
    x[0, 17], x[1, 3], x[2, 99] = 1.0, -0.7, 0.4
    got = kmeans_1d(x, 16)
    np.testing.assert_array_equal(got[:, 0], x.min(axis=1))
    np.testing.assert_array_equal(got[:, -1], x.max(axis=1))
    assert (np.diff(got, axis=1) >= 0).all()
    # the rest of the table serves the bulk: no second entry spent near the outlier
    assert (np.abs(got[:, 1:-1]) < 0.1).all()
