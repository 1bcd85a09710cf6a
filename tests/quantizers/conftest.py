"""Fixtures for the codec tests: llama.cpp's quantizer as an oracle, and hard weight matrices."""

from __future__ import annotations

import numpy as np
import pytest

from tests.quantizers.ggml_oracle import Ggml


@pytest.fixture(scope="session")
def ggml() -> Ggml:
    return Ggml(pytest.importorskip("llama_cpp", reason="llama.cpp oracle needs llama-cpp-python"))


def mixed_weights(rows_per_kind: int, cols: int, seed: int = 0) -> np.ndarray:
    """(8 * rows_per_kind + 16, cols) float32: the kinds of rows that separate codecs.

    Gaussian, heavy tails, offsets, tiny magnitudes (fp16 scales turn subnormal or zero), values on
    a coarse grid (rounding ties), sparse non-negative rows, outliers, huge magnitudes; then zero,
    constant and nearly-zero rows.
    """
    rng = np.random.default_rng(seed)
    shape = (rows_per_kind, cols)
    kinds = [
        rng.standard_normal(shape) * 0.02,
        rng.standard_t(2, shape) * 0.01,
        rng.standard_normal(shape) * 0.01 + rng.uniform(-0.05, 0.05, (rows_per_kind, 1)),
        rng.standard_normal(shape) * 10.0 ** rng.uniform(-12, -4, (rows_per_kind, 1)),
        np.round(rng.standard_normal(shape) * 4) / 8,
        rng.exponential(1, shape) * (rng.random(shape) < 0.1),
        np.where(rng.random(shape) < 0.01, 3.0, rng.standard_normal(shape) * 0.01),
        rng.standard_normal(shape) * 10.0 ** rng.uniform(3, 20, (rows_per_kind, 1)),
    ]
    special = np.zeros((16, cols))
    special[1] = 1.0
    special[2] = -0.5
    special[3, ::7] = 1e-3
    special[4, 5] = 100.0
    special[5:] = rng.standard_normal((11, cols)) * 1e-30
    return np.concatenate([*kinds, special]).astype(np.float32)


def importances(cols: int, seed: int = 1) -> list[np.ndarray]:
    """Importance vectors as imatrix files hold them: spread over decades, and with zero columns."""
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.standard_normal(cols) * 1.5)
    sparse = np.where(rng.random(cols) < 0.3, 0.0, rng.exponential(1.0, cols))
    return [spread.astype(np.float32), sparse.astype(np.float32)]
