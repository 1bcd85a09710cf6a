"""Validation: one candidate runner against the fp32 reference on the same tokens.

The candidate is described by a RunnerSpec so its latency can be measured in a fresh process; its
logits are taken in this process and compared with reference log-probabilities that are computed
once per (model, text, ctx, windows). The report names what ran, on which host, against what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolconvert import progress
from smolconvert.artifact import ARTIFACT_FILE, Artifact, seal, write_json
from smolconvert.errors import ConfigError
from smolconvert.files import sha256_file, write_atomic
from smolconvert.model.reference import build_reference
from smolconvert.model.source import CanonicalModel
from smolconvert.publish.card import CARD_FILE, artifact_card, has_card
from smolconvert.validators import latency as L
from smolconvert.validators import quality as Q
from smolconvert.validators.latency import RunnerSpec
from smolconvert.validators.runner import TorchRunner


@dataclass(frozen=True)
class ValidateOptions:
    ctx: int = 512
    windows: int = 8
    latency: bool = True
    threads: int | None = None
    quiet: bool = False
    reference_latency: bool = True  # a release times the reference once, not per artifact


@dataclass(frozen=True)
class ValidationReport:
    model: str
    origin: str
    candidate: str  # what ran, in the runner's own words
    runtime: str
    reference: str
    eval_text: dict[str, Any]
    quality: Q.QualityMetrics
    size_bytes: int | None
    latency: L.LatencyMetrics | None = None
    reference_latency: L.LatencyMetrics | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "origin": self.origin,
            "candidate": self.candidate,
            "runtime": self.runtime,
            "reference": self.reference,
            "eval_text": self.eval_text,
            "quality": self.quality.to_dict(),
            "size_bytes": self.size_bytes,
            "latency": self.latency.to_dict() if self.latency else None,
            "reference_latency": self.reference_latency.to_dict()
            if self.reference_latency
            else None,
            "notes": list(self.notes),
        }


def validate_runner(
    model: CanonicalModel,
    candidate: RunnerSpec,
    text: Q.EvalText,
    options: ValidateOptions = ValidateOptions(),
    size_bytes: int | None = None,
    notes: tuple[str, ...] = (),
) -> ValidationReport:
    step = progress.Steps(options.quiet)
    step(f"tokenizing {text.name} into {options.windows} windows of {options.ctx} tokens")
    windows = Q.tokenize_windows(model.tokenizer, text, options.ctx, options.windows)
    key = (model.sha256, text.sha256, str(options.ctx), str(len(windows)))
    ref_scores = Q.cached_reference_scores(key)
    if ref_scores is None:  # build the fp32 decoder only when this reference was never scored
        reference = TorchRunner(
            build_reference(model.spec, source=model.weights), "fp32", options.threads
        )
        step(f"scoring the reference ({reference.description})")
        with progress.bar(len(windows), "reference") as bar:
            ref_scores = Q.reference_scores(key, windows, reference.logits, bar.update)
        del reference
    runner = candidate.open()
    step(f"scoring the candidate ({runner.description})")
    with progress.bar(len(windows), "candidate") as bar:
        metrics = Q.compare(ref_scores, runner.logits, bar.update)
    description, runtime = runner.description, runner.runtime
    notes = (*notes, *getattr(runner, "notes", ()))  # e.g. "weight-level: MLC runtime not run"
    del runner
    lat = ref_lat = None
    if options.latency:
        prompt = latency_prompt(windows)
        step(f"timing the candidate: {L.PROMPT_TOKENS}-token prompt, {L.NEW_TOKENS} decode steps")
        lat = L.measure_latency(candidate, prompt)
        if options.reference_latency:
            step("timing the reference the same way")
            ref_lat = measure_reference_latency(model, windows, options.threads)
    step("done")
    return ValidationReport(
        model=model.name,
        origin=model.origin,
        candidate=description,
        runtime=runtime,
        reference=f"reference decoder, fp32, on {model.origin}",
        eval_text={"name": text.name, "sha256": text.sha256, "chars": len(text.text)},
        quality=metrics,
        size_bytes=size_bytes,
        latency=lat,
        reference_latency=ref_lat,
        notes=notes,
    )


def latency_prompt(windows: list[list[int]]) -> list[int]:
    return [t for w in windows for t in w][: L.PROMPT_TOKENS]


def measure_reference_latency(
    model: CanonicalModel, windows: list[list[int]], threads: int | None
) -> L.LatencyMetrics:
    """The fp32 reference decoder timed with the same protocol as every candidate."""
    ref_spec = RunnerSpec("torch", {"source": model.source, "dtype": "fp32", "threads": threads})
    return L.measure_latency(ref_spec, latency_prompt(windows))


def validate_artifact(
    art: Artifact,
    model: CanonicalModel,
    text: Q.EvalText,
    options: ValidateOptions = ValidateOptions(),
) -> ValidationReport:
    """Run an artifact in its own runtime against the model it was exported from; the report is
    also written into its artifact.json under "validation"."""
    if model.sha256 != art.meta["source_sha256"]:
        raise ConfigError(
            f"{art.folder} was exported from {art.meta['source']} with sha256 "
            f"{art.meta['source_sha256'][:12]}..., but that source now hashes to "
            f"{model.sha256[:12]}...; re-export the artifact"
        )
    runner = RunnerSpec.for_artifact(art, max(options.ctx, 512), options.threads)
    report = validate_runner(
        model,
        runner,
        text,
        options,
        size_bytes=art.size_bytes,
        notes=(f"target {art.target}:{art.scheme}",),
    )
    art.meta = _update_card(art.folder, dict(art.meta, validation=report.to_dict()))
    return report


def _update_card(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a finished artifact's model card from `meta` (e.g. with new measurements) and
    write artifact.json with the card's new size and hash; returns the sealed meta."""
    if not has_card(meta):
        return meta
    path = folder / CARD_FILE
    write_atomic(path, artifact_card(meta))
    entry = {"path": CARD_FILE, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
    files = [f for f in meta["files"] if f["path"] != CARD_FILE] + [entry]
    meta = seal(dict(meta, files=sorted(files, key=lambda f: f["path"])))
    write_json(folder / ARTIFACT_FILE, meta)
    return meta
