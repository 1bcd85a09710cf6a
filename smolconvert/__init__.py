"""smolconvert: one canonical small language model -> verified artifacts for every device runtime.

Public API (the CLI is a thin layer over these):

    >>> import smolconvert
    >>> model = smolconvert.load("default")            # HF folder, .gguf file, or "default"
    >>> model.spec.n_layers, model.spec.hidden_size
    (30, 576)
    >>> report = smolconvert.validate("default", dtype="bf16", latency=False)
    >>> report.quality.kld_mean < 0.01
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from smolconvert.model.source import CanonicalModel
    from smolconvert.validators.validate import ValidationReport

__all__ = ["__version__", "load", "validate"]


def load(source: str | Path, *, allow_pickle: bool = False) -> CanonicalModel:
    """Open a model: a Hugging Face folder, a .gguf file, or "default" (SmolLM2-135M-Instruct).

    Nothing is read beyond headers until a tensor is asked for. PyTorch pickle checkpoints are
    refused unless `allow_pickle=True`.
    """
    from smolconvert.model.source import load_model

    return load_model(source, allow_pickle=allow_pickle)


def validate(
    source: str | Path,
    *,
    dtype: str = "bf16",
    eval_text: str | Path | None = None,
    ctx: int = 512,
    windows: int = 8,
    latency: bool = True,
    threads: int | None = None,
    allow_pickle: bool = False,
    quiet: bool = True,
) -> ValidationReport:
    """Compare the model run in `dtype` (fp32, fp16, bf16) with its fp32 reference, same tokens.

    Quality: `windows` windows of `ctx` tokens of `eval_text` (default: CPython's pydoc topics),
    the second half of each scored. Latency (optional): measured in a fresh process.
    """
    from smolconvert.errors import ConfigError
    from smolconvert.validators.quality import load_eval_text
    from smolconvert.validators.runner import TORCH_DTYPES, RunnerSpec
    from smolconvert.validators.validate import ValidateOptions, validate_runner

    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    if windows < 1:
        raise ConfigError(f"windows must be at least 1, got {windows}")
    model = load(source, allow_pickle=allow_pickle)
    candidate = RunnerSpec(
        "smolconvert.validators.runner:open_torch_runner",
        {"source": str(source), "dtype": dtype, "threads": threads, "allow_pickle": allow_pickle},
    )
    elem = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    return validate_runner(
        model,
        candidate,
        load_eval_text(eval_text),
        ValidateOptions(ctx=ctx, windows=windows, latency=latency, threads=threads, quiet=quiet),
        size_bytes=model.spec.n_params * elem,
        notes=(f"size_bytes is the weights' size in {dtype} (no file is written for this check)",),
    )
