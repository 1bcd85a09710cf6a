"""The public API's implementation: load, export, validate, release, merge_releases.

`smolconvert/__init__.py` re-exports these; modules inside the package (the CLI included) import
them from here, never from the package's face.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smolconvert.artifact import Artifact
    from smolconvert.model.source import CanonicalModel
    from smolconvert.release_config import ReleaseConfig
    from smolconvert.release_pipeline import ReleaseResult
    from smolconvert.validators.validate import ValidationReport

__all__ = ["export", "load", "merge_releases", "release", "validate"]


def load(
    source: str | Path, *, allow_pickle: bool = False, strict_config: bool = False
) -> CanonicalModel:
    """Open a model: a Hugging Face folder, a .gguf file, or "default" (SmolLM2-135M-Instruct).

    Nothing is read beyond headers until a tensor is asked for. PyTorch pickle checkpoints are
    refused unless `allow_pickle=True`. config.json fields smolconvert does not know are named in
    a `ConfigWarning` and recorded in artifact.json; `strict_config=True` refuses them instead.
    """
    from smolconvert.model.source import load_model

    return load_model(source, allow_pickle=allow_pickle, strict_config=strict_config)


def export(
    source: str | Path,
    *,
    to: str,
    out: str | Path | None = None,
    imatrix_text: str | Path | None = None,
    imatrix: bool = False,
    options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    strict_config: bool = False,
    base_model: str | None = None,
    quiet: bool = True,
) -> Artifact:
    """Export `source` to a target such as "gguf:q4_k_m" into the folder `out`.

    `out` defaults to `<model>-<family>-<scheme>` in the current folder. With `imatrix=True` (or an
    `imatrix_text` file) quantizers weight their error by activation importance collected from
    calibration text (default: the second half of CPython's pydoc topics). `options` are the
    family's own choices, e.g. {"layout": "genai"} for ONNX or {"mlc_scales": "search"} for MLC
    (`smolconvert export --list` shows them all); unknown keys or values are errors. Weights
    holding NaN or infinities are refused (every such tensor named) unless `allow_nonfinite=True`.
    An existing `out` that smolconvert did not write is refused unless `overwrite=True`; the input
    model, the working folder and any folder holding them are never replaced. `base_model` is
    the Hub repository the model card names (default: guessed from the source's path or name).
    """
    from smolconvert import artifact as A
    from smolconvert.progress import Steps
    from smolconvert.targets import parse_target
    from smolconvert.texts import default_calibration_text, load_text

    family, scheme = parse_target(to)
    resolved = family.resolve_options(options)
    family.check_options(scheme, resolved)
    model = load(source, allow_pickle=allow_pickle, strict_config=strict_config)
    if base_model is not None:
        model.base_model = base_model
    folder = Path(out) if out is not None else Path(f"{model.name}-{family.name}-{scheme}")
    policy = A.OutputPolicy(overwrite=overwrite, protect=A.input_paths(model), note=Steps(quiet))
    A.check_output(folder, policy)  # refuse a bad folder before any long work
    if not allow_nonfinite:
        from smolconvert.model.weights import check_finite

        check_finite(model.weights, model.spec)
    matrix = None
    if imatrix or imatrix_text is not None:
        from smolconvert.model.imatrix import collect_imatrix

        text = load_text(imatrix_text, default_calibration_text())
        matrix = collect_imatrix(model, text, quiet=quiet)
    with A.output_policy(policy):
        return family.export(model, scheme, folder, imatrix=matrix, options=resolved, quiet=quiet)


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
    """Measure an artifact folder in its runtime, or a model run in `dtype`, against the reference.

    For an artifact (a folder with artifact.json) the reference is the fp32 model it was exported
    from; for a model source, the same model run in `dtype` (fp32, fp16, bf16) is compared with its
    fp32 self. Quality: `windows` windows of `ctx` tokens of `eval_text` (default: CPython's pydoc
    topics), the second half of each scored. Latency (optional): measured in a fresh process.
    """
    from smolconvert.artifact import Artifact, is_artifact
    from smolconvert.errors import ConfigError
    from smolconvert.validators.latency import RunnerSpec
    from smolconvert.validators.quality import load_eval_text
    from smolconvert.validators.runner import DTYPE_BYTES, TORCH_DTYPES
    from smolconvert.validators.validate import ValidateOptions, validate_runner

    if windows < 1:
        raise ConfigError(f"windows must be at least 1, got {windows}")
    options = ValidateOptions(
        ctx=ctx, windows=windows, latency=latency, threads=threads, quiet=quiet
    )
    text = load_eval_text(eval_text)
    if is_artifact(source):
        from smolconvert.validators.validate import validate_artifact

        art = Artifact.load(source, hashes=True)  # a flipped byte must not be measured as ours
        model = load(art.meta["source"], allow_pickle=allow_pickle)
        return validate_artifact(art, model, text, options)
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    model = load(source, allow_pickle=allow_pickle)
    candidate = RunnerSpec(
        "torch",
        {"source": str(source), "dtype": dtype, "threads": threads, "allow_pickle": allow_pickle},
    )
    return validate_runner(
        model,
        candidate,
        text,
        options,
        size_bytes=model.spec.n_params * DTYPE_BYTES[dtype],
        notes=(f"size_bytes is the weights' size in {dtype} (no file is written for this check)",),
    )


def release(
    config: str | Path | dict[str, Any] | ReleaseConfig,
    *,
    shard: tuple[int, int] | str | None = None,
    force: bool = False,
    quiet: bool = True,
    events: Any = None,
) -> ReleaseResult:
    """Build, validate and gate every target of a release config (a TOML path or a dict).

    Writes manifest.json, report.json, report.md and report.html into the config's `out` folder
    and returns a ReleaseResult; `result.failures` lists every missed budget (nothing is raised
    for those). Cached by content: unchanged targets are neither rebuilt nor re-measured.
    `shard=(i, n)` or "i/n" builds a stable subset; `events` is called with one dict per step.

    >>> result = smolconvert.release("examples/release-default.toml")
    >>> result.passed, [a["name"] for a in result.manifest["artifacts"]]
    """
    from smolconvert.release_config import parse_shard
    from smolconvert.release_pipeline import release as run

    if isinstance(shard, str):
        shard = parse_shard(shard)
    return run(config, shard=shard, force=force, quiet=quiet, events=events)


def merge_releases(dirs: list[str | Path], out: str | Path) -> ReleaseResult:
    """Join the outputs of release shards into one release (manifest and reports) in `out`."""
    from smolconvert.release_pipeline import merge

    return merge(dirs, out)
