"""The release pipeline: one config -> every target exported, validated against one reference,
gated on its budget, and described in manifest.json and reports.

Everything is cached by content. An artifact folder records the key it was built from (source hash,
target, options, calibration text, smolconvert's code and the family's library versions) and the
key it was validated with (plus the evaluation text and protocol); a run that finds both keys equal
does no work for that target, so a re-run with nothing changed exports nothing, and an interrupted
run resumes at the first target without a finished artifact. Nothing cached is trusted without its
hash: an artifact whose artifact.json or files do not match their sha256, or an unreadable timing
cache, is rebuilt or re-measured with a note. One release at a time writes an output folder (a lock
beside it; a second run waits). Shards build stable subsets of the targets; an empty shard writes
nothing; merge joins shard outputs into one release.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolconvert import artifact as A
from smolconvert.artifact import ARTIFACT_FILE, Artifact, tool_versions, write_json
from smolconvert.errors import ConfigError, CorruptFileError
from smolconvert.files import write_atomic
from smolconvert.publish.card import CARD_FILE, release_card
from smolconvert.release_config import ReleaseConfig, TargetConfig, load_config
from smolconvert.validators import gates, report
from smolconvert.version import __version__

MANIFEST_FILE = "manifest.json"
REFERENCE_FILE = ".reference-latency.json"

Emit = Callable[[dict[str, Any]], None]


@dataclass
class ReleaseResult:
    out: Path
    manifest: dict[str, Any]
    failures: list[gates.GateFailure] = field(default_factory=list)
    wall_s: float = 0.0
    built: list[str] = field(default_factory=list)  # targets exported in this run
    validated: list[str] = field(default_factory=list)  # targets measured in this run

    @property
    def passed(self) -> bool:
        return not self.failures


# The parts of smolconvert whose code decides an artifact's bytes (plus the family's own modules),
# and the parts that decide its measurements (every runner, as runners share helpers such as the
# Core ML evaluator): a change there rebuilds or re-measures; a change elsewhere (the CLI, another
# family's exporter) does not.
VALIDATE_CODE = ("validators/*.py", "model/*.py", "texts.py")  # runners share helpers


def code_sha256(*patterns: str) -> str:
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in root.glob(pattern)}):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _Progress:
    """One line per step on stderr (elapsed time, what runs, what is next); JSON lines if asked."""

    def __init__(self, quiet: bool, events: Emit | None) -> None:
        self.start = time.perf_counter()
        self.quiet, self.events = quiet, events

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, event: str, message: str, **fields: Any) -> None:
        if self.events is not None:
            self.events({"event": event, "elapsed_s": round(self.elapsed(), 2), **fields})
        if not self.quiet:
            print(f"[{self.elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)


def release(
    config: str | Path | dict[str, Any] | ReleaseConfig,
    *,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    quiet: bool = True,
    events: Emit | None = None,
) -> ReleaseResult:
    """Build, validate and gate every target of `config` (or of one shard), then write the manifest
    and reports into the config's output folder. Gate failures are in the result, not raised."""
    cfg = config if isinstance(config, ReleaseConfig) else load_config(config)
    targets = cfg.targets if shard is None else cfg.shard(*shard)
    progress = _Progress(quiet, events)
    if shard is not None and not targets:
        # A manifest written now would list no artifacts and replace a real release's manifest.
        progress(
            "empty_shard",
            f"shard {shard[0]}/{shard[1]} has no targets ({len(cfg.targets)} targets in "
            f"{shard[1]} shards): nothing built, nothing written",
        )
        return ReleaseResult(cfg.out, {}, wall_s=progress.elapsed())
    progress(
        "start",
        f"release of {cfg.source}: {len(targets)} targets into {cfg.out}"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else ""),
        targets=[t.name for t in targets],
    )
    _prepare_out(cfg.out)
    with A.folder_lock(cfg.out, lambda message: progress("wait", message)):
        return _run(cfg, targets, shard, force, progress)


def _prepare_out(out: Path) -> None:
    for folder in (out, *out.parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise ConfigError(f"release output {out}: {folder} is a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the release folder {out}: {e.strerror}") from None


def _run(
    cfg: ReleaseConfig,
    targets: tuple[TargetConfig, ...],
    shard: tuple[int, int] | None,
    force: bool,
    progress: _Progress,
) -> ReleaseResult:
    from smolconvert.model.source import load_model
    from smolconvert.targets import FAMILIES
    from smolconvert.texts import default_calibration_text, load_text
    from smolconvert.validators.quality import load_eval_text

    model = load_model(cfg.source, strict_config=cfg.strict_config)
    if cfg.base_model is not None:
        model.base_model = cfg.base_model
    eval_text = load_eval_text(cfg.eval_text)
    calibration = load_text(cfg.calibration_text, default_calibration_text())
    policy = A.OutputPolicy(
        protect=A.input_paths(model),
        replace_damaged=True,  # the release's own folder whose artifact.json is unreadable
        note=lambda message: progress("wait", message),
    )
    validate_code = code_sha256(*VALIDATE_CODE)
    result = ReleaseResult(cfg.out, {})
    imatrix = None
    finite_checked = False
    entries = []
    for n, t in enumerate(targets, 1):
        family = FAMILIES[t.family]
        label = f"[{n}/{len(targets)}] {t.name}"
        folder = cfg.out / f"{model.name}-{t.name}"
        build_key = _key(
            {
                "source_sha256": model.sha256,
                "target": t.target,
                "options": t.options,
                "imatrix": calibration.sha256 if t.imatrix else None,
                "code": family.code_sha256(),
                "libraries": tool_versions(*family.libraries),
                "card": [model.base_model, model.license],  # the README.md's header
            }
        )
        art, why = (None, "") if force else _cached(folder, build_key)
        if why:
            progress(
                "cache_invalid",
                f"{label}: rebuilding, the cached one is damaged: {why}",
                target=t.name,
            )
        if art is None:
            if not (finite_checked or cfg.allow_nonfinite):  # once, when building
                from smolconvert.model.weights import check_finite

                check_finite(model.weights, model.spec)
                finite_checked = True
            if t.imatrix and imatrix is None:
                from smolconvert.model.imatrix import collect_imatrix

                progress(
                    "imatrix",
                    f"{label}: collecting the importance matrix from "
                    f"{calibration.name} (next: export)",
                    target=t.name,
                )
                imatrix = collect_imatrix(model, calibration, quiet=True)
            progress("export", f"{label}: exporting {t.target} (next: validate)", target=t.name)
            with A.output_policy(policy):
                art = family.export(
                    model,
                    t.scheme,
                    folder,
                    imatrix=imatrix if t.imatrix else None,
                    options=t.options,
                    quiet=True,
                )
            art.meta = A.seal(dict(art.meta, build_key=build_key))
            write_json(folder / ARTIFACT_FILE, art.meta)
            result.built.append(t.name)
        else:
            progress(
                "export_cached", f"{label}: artifact up to date (next: validate)", target=t.name
            )
        validation_key = _key(
            {
                "build_key": build_key,
                "eval_text": eval_text.sha256,
                "ctx": cfg.ctx,
                "windows": cfg.windows,
                "latency": t.latency,
                "threads": cfg.threads,
                "code": validate_code,
            }
        )
        if art.meta.get("validation_key") != validation_key or "validation" not in art.meta:
            progress(
                "validate",
                f"{label}: validating in its runtime against the reference",
                target=t.name,
            )
            _validate(art, model, eval_text, cfg, t.latency)
            art.meta = A.seal(dict(art.meta, validation_key=validation_key))
            write_json(folder / ARTIFACT_FILE, art.meta)
            result.validated.append(t.name)
        else:
            progress("validate_cached", f"{label}: measurements up to date", target=t.name)
        entry = _entry(art, t, model.spec.n_params, cfg.out)
        entries.append(entry)
        result.failures += [
            gates.GateFailure(**{k: f[k] for k in ("target", "metric", "budget", "value")})
            for f in entry["gate"]["failures"]
        ]
        progress(
            "target_done",
            f"{label}: {'passed' if entry['gate']['passed'] else 'FAILED'} its budget"
            + (f" (next: {targets[n].name})" if n < len(targets) else ""),
            target=t.name,
            passed=entry["gate"]["passed"],
        )
    reference_latency = None
    if any(t.latency for t in targets):
        reference_latency = _reference_latency(cfg, model, eval_text, validate_code, progress)
    result.manifest = _manifest(
        cfg, model, eval_text, calibration, entries, shard, reference_latency
    )
    result.wall_s = progress.elapsed()
    write_outputs(cfg.out, result.manifest, result.wall_s)
    progress(
        "done",
        f"release written to {cfg.out}: {len(entries)} artifacts, "
        f"{len(result.failures)} gate failures, built {len(result.built)}, "
        f"validated {len(result.validated)}",
        failures=[f.to_dict() for f in result.failures],
        manifest=str(cfg.out / MANIFEST_FILE),
    )
    return result


def _cached(folder: Path, build_key: str) -> tuple[Artifact | None, str]:
    """The artifact in `folder` if it was built from `build_key` and artifact.json and every file
    match their sha256; else None and, when something was there but unusable, why."""
    if not (folder / ARTIFACT_FILE).is_file():
        return None, ""
    try:
        art = Artifact.load(folder, hashes=True)
    except (CorruptFileError, ConfigError) as e:
        return None, str(e)
    if art.meta.get("build_key") != build_key:
        return None, ""  # built from other inputs: an ordinary rebuild
    return art, ""


def _validate(art: Artifact, model: Any, text: Any, cfg: ReleaseConfig, latency: bool) -> None:
    from smolconvert.validators.validate import ValidateOptions, validate_artifact

    options = ValidateOptions(
        ctx=cfg.ctx,
        windows=cfg.windows,
        latency=latency,
        threads=cfg.threads,
        quiet=True,
        reference_latency=False,
    )
    validate_artifact(art, model, text, options)


def _reference_latency(
    cfg: ReleaseConfig, model: Any, text: Any, code: str, progress: _Progress
) -> dict[str, Any]:
    """The fp32 reference timed once per release (cached beside the artifacts)."""
    from smolconvert.validators.quality import tokenize_windows
    from smolconvert.validators.validate import measure_reference_latency

    key = _key(
        {
            "source": model.sha256,
            "text": text.sha256,
            "ctx": cfg.ctx,
            "threads": cfg.threads,
            "code": code,
            "torch": tool_versions("torch"),
        }
    )
    path = cfg.out / REFERENCE_FILE
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            sound = isinstance(cached, dict) and isinstance(cached.get("latency"), dict)
            sound = sound and cached.get("sha256") == _key(cached["latency"])
        except (OSError, ValueError):
            sound = False
        if not sound:
            progress("cache_invalid", f"{path.name} is damaged or edited; timing again")
        elif cached.get("key") == key:
            return cached["latency"]
    progress("reference_latency", "timing the fp32 reference decoder (next: manifest and report)")
    windows = tokenize_windows(model.tokenizer, text, cfg.ctx, 1)
    latency = measure_reference_latency(model, windows, cfg.threads).to_dict()
    write_json(path, {"key": key, "latency": latency, "sha256": _key(latency)})
    return latency


def _entry(art: Artifact, t: TargetConfig, n_params: int, out: Path) -> dict[str, Any]:
    meta = art.meta
    validation = meta["validation"]
    size = art.size_bytes
    metrics = gates.flat_metrics(validation, size)
    failures = gates.check(t.target, t.budget, metrics)
    return {
        "name": t.name,
        "target": t.target,
        "family": t.family,
        "scheme": t.scheme,
        "options": t.options,
        "imatrix": meta.get("imatrix"),
        "folder": os.path.relpath(art.folder, out),
        "build_key": meta["build_key"],
        "files": meta["files"],
        "size_bytes": size,
        "bits_per_weight": size * 8 / n_params,
        "tensor_types": meta.get("tensor_types", {}),
        "tool_versions": meta.get("tool_versions", {}),
        "layout": meta.get("layout"),
        "min_runtime": meta.get("min_runtime"),
        "source_sha256": meta["source_sha256"],
        "validation": validation,
        "metrics": metrics,
        "budget": t.budget,
        "gate": {"passed": not failures, "failures": [f.to_dict() for f in failures]},
    }


def _manifest(
    cfg: ReleaseConfig,
    model: Any,
    eval_text: Any,
    calibration: Any,
    entries: list[dict[str, Any]],
    shard: tuple[int, int] | None,
    reference_latency: dict[str, Any] | None,
) -> dict[str, Any]:
    from smolconvert.validators.latency import host_description

    return {
        "smolconvert": __version__,
        "config_sha256": cfg.sha256(),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "model": model.name,
        "source": cfg.source,
        "source_sha256": model.sha256,
        "origin": model.origin,
        "base_model": model.base_model,
        "license": model.license,
        "spec": model.spec.to_dict(),
        "n_params": model.spec.n_params,
        "eval_text": {"name": eval_text.name, "sha256": eval_text.sha256},
        "calibration_text": {"name": calibration.name, "sha256": calibration.sha256},
        "protocol": {"ctx": cfg.ctx, "windows": cfg.windows, "latency": cfg.latency},
        "host": host_description(),
        "tool_versions": tool_versions("numpy", "torch"),
        "reference_latency": reference_latency,
        "artifacts": sorted(entries, key=lambda e: e["name"]),
    }


def write_outputs(out: Path, manifest: dict[str, Any], wall_s: float) -> None:
    """manifest.json, report.json, report.md and report.html, each written atomically."""
    write_json(out / MANIFEST_FILE, manifest)
    rows = report.rows(manifest)
    write_json(
        out / "report.json",
        {"wall_s": round(wall_s, 1), "rows": rows, **{k: manifest[k] for k in report.HEADER_KEYS}},
    )
    table = report.markdown(manifest, rows)
    for name, text in (
        ("report.md", table),
        ("report.html", report.html(manifest, rows)),
        (CARD_FILE, release_card(manifest, table)),
    ):
        write_atomic(out / name, text)


def merge(dirs: list[str | Path], out: str | Path) -> ReleaseResult:
    """Join shard outputs (folders holding a manifest.json) into one release in `out`; artifact
    folders are hard-linked (copied across file systems)."""
    start = time.perf_counter()
    out = Path(out).resolve()
    manifests = []
    for d in dirs:
        path = Path(d) / MANIFEST_FILE
        if not path.is_file():
            raise ConfigError(f"{d} holds no {MANIFEST_FILE}; pass folders written by a release")
        manifests.append((Path(d).resolve(), json.loads(path.read_text())))
    first = manifests[0][1]
    for d, m in manifests[1:]:
        for key in ("config_sha256", "source_sha256"):
            if m[key] != first[key]:
                raise ConfigError(
                    f"cannot merge {d}: its {key} {m[key][:12]}... differs from "
                    f"{manifests[0][0]}'s {first[key][:12]}... (different config or model)"
                )
    _prepare_out(out)
    with A.folder_lock(out), A.output_policy(A.OutputPolicy(replace_damaged=True)):
        entries: dict[str, dict[str, Any]] = {}
        for d, m in manifests:
            for e in m["artifacts"]:
                if e["name"] in entries and entries[e["name"]]["build_key"] != e["build_key"]:
                    raise ConfigError(
                        f"artifact {e['name']} is in two shards with different builds"
                    )
                src = (d / e["folder"]).resolve()
                dst = out / Path(e["folder"]).name
                if src != dst.resolve():
                    with A.staging(dst) as stage:  # swapped in whole; a foreign dst is refused
                        _link_tree(src, stage)
                entries[e["name"]] = dict(e, folder=dst.name)
        reference = next(
            (m["reference_latency"] for _, m in manifests if m["reference_latency"]), None
        )
        manifest = dict(
            first,
            shard=None,
            reference_latency=reference,
            artifacts=sorted(entries.values(), key=lambda e: e["name"]),
        )
        wall = time.perf_counter() - start
        write_outputs(out, manifest, wall)
    failures = [
        gates.GateFailure(**{k: f[k] for k in ("target", "metric", "budget", "value")})
        for e in manifest["artifacts"]
        for f in e["gate"]["failures"]
    ]
    return ReleaseResult(out, manifest, failures, wall)


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)
