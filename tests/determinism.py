"""Determinism check shared by the exporter tests: the same input exported in two fresh Python
processes with different hash seeds must give byte-identical folders, artifact.json included.

Two processes, not two calls in one: set iteration order (PYTHONHASHSEED) and protobuf's map order
(upb seeds its hash per process) only change between processes. That is how Core ML's
model.mlmodel (its user metadata map in a different order each run) passed an in-process test.
artifact.json records the input path but not the output path, so one input folder is shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_EXPORT = "import json, sys, smolconvert; smolconvert.export(**json.loads(sys.argv[1]))"


def export_in_fresh_process(source: Path, out: Path, hash_seed: int, **kwargs: Any) -> None:
    """`smolconvert.export(source, out=out, **kwargs)` in a new interpreter."""
    args = {"source": str(source), "out": str(out), **kwargs}
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_exports_identical(source: Path, tmp_path: Path, **kwargs: Any) -> dict[str, bytes]:
    """Export twice (hash seeds 1 and 2) and compare every file byte for byte; returns the files."""
    export_in_fresh_process(source, tmp_path / "run1", 1, **kwargs)
    export_in_fresh_process(source, tmp_path / "run2", 2, **kwargs)
    a, b = folder_bytes(tmp_path / "run1"), folder_bytes(tmp_path / "run2")
    assert sorted(a) == sorted(b)
    assert "artifact.json" in a
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"files that differ between two exports of the same input: {differ}"
    return a
