"""Artifacts: a folder a runtime loads as it is, plus `artifact.json` describing it.

artifact.json records the source model hash, spec, target, scheme, per-tensor storage types, every
file with its size and sha256, and tool versions. Exports are staged in a hidden sibling folder and
renamed into place only when complete, so an interrupted export never leaves a folder that looks
finished. JSON is written with sorted keys and no timestamps: the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError, CorruptFileError

ARTIFACT_FILE = "artifact.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a temporary name in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_entries(folder: Path) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ARTIFACT_FILE):
        entries.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "size_bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return entries


def tool_versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("smolconvert", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_meta(model: Any) -> dict[str, Any]:
    """The artifact.json keys every exporter writes about the model it exported from."""
    return {
        "model": model.name,
        "source": model.source,
        "source_sha256": model.sha256,
        "origin": model.origin,
        "spec": model.spec.to_dict(),
    }


@dataclass
class Artifact:
    folder: Path
    meta: dict[str, Any]

    @property
    def target(self) -> str:
        return str(self.meta["target"])

    @property
    def scheme(self) -> str:
        return str(self.meta["scheme"])

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size_bytes"]) for f in self.meta["files"])

    def path(self, role: str) -> Path:
        return self.folder / self.meta["entry_points"][role]

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        folder = Path(folder)
        meta_path = folder / ARTIFACT_FILE
        if not meta_path.is_file():
            raise ConfigError(f"{folder} is not a smolconvert artifact (no {ARTIFACT_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{meta_path}: not valid JSON ({e})") from None
        for f in meta.get("files", []):
            path = folder / f["path"]
            if not path.is_file() or path.stat().st_size != f["size_bytes"]:
                raise CorruptFileError(
                    f"{folder}: file {f['path']} is missing or not the size artifact.json records "
                    f"({f['size_bytes']} bytes); re-export the artifact"
                )
        return cls(folder, meta)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden sibling folder to build in; renamed to `out` only if the block completes."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def finish(stage: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Record every file of a staged artifact and write artifact.json (last)."""
    meta = dict(meta, files=file_entries(stage))
    write_json(stage / ARTIFACT_FILE, meta)
    return meta
