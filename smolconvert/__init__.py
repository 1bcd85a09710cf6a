"""smolconvert: one canonical small language model -> verified artifacts for every device runtime.

Public API (the CLI is a thin layer over these):

    >>> import smolconvert
    >>> model = smolconvert.load("default")            # HF folder, .gguf file, or "default"
    >>> model.spec.n_layers, model.spec.hidden_size
    (30, 576)
    >>> report = smolconvert.validate("default", dtype="bf16", latency=False)
    >>> report.quality.kld_mean < 0.01
    True
    >>> art = smolconvert.export("default", to="gguf:q4_k_m", out="out/q4km")
    >>> smolconvert.validate(art.folder).quality.kld_mean < 0.1
    True
"""

from __future__ import annotations

from smolconvert.api import export, load, merge_releases, release, validate
from smolconvert.version import __version__

__all__ = ["__version__", "export", "load", "merge_releases", "release", "validate"]
