"""Every failure the fuzzers found, replayed as a plain test (tests/fuzz/regressions/<reader>/).

Each file is a recipe: the base input, the mutations applied to it (resolved: JSON key paths, named
GGUF header fields, absolute byte offsets), what it raised when found, and its status. A fixed case
must load or raise a SmolconvertError; an open one (a crash in a file another change owns, not
fixed yet) is an expected failure that turns into an error the day it is fixed, so its status is
updated then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smolconvert.errors import SmolconvertError
from tests.fuzz import harness as H
from tests.fuzz import readers as R

FILES = sorted(H.REGRESSIONS.glob("*/*.json"))


def _param(path: Path) -> Any:
    record = json.loads(path.read_text())
    marks = []
    if record["status"] != "fixed":
        marks.append(
            pytest.mark.xfail(strict=True, reason=f"{record['status']}: {record['found']}")
        )
    return pytest.param(path, id=f"{path.parent.name}/{path.stem}", marks=marks)


def replay(record: dict[str, Any], bases: Any) -> None:
    """Run one recipe; SmolconvertError is a pass, anything else propagates."""
    with H.bounded():
        try:
            recipe = R.play(record["reader"], bases, record["base"], record["ops"])
        except SmolconvertError as exc:
            recipe = exc.recipe  # type: ignore[attr-defined]
        assert recipe["ops"] == record["ops"], "the recipe no longer applies to its base"


@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_regression(path: Path, bases) -> None:
    replay(json.loads(path.read_text()), bases)


def test_regression_files_are_small_and_complete() -> None:
    assert FILES, "no regression files found"
    for path in FILES:
        assert path.stat().st_size < 50_000, path
        record = json.loads(path.read_text())
        assert record["reader"] == path.parent.name, path
        assert {"base", "ops", "signature", "found", "status"} <= set(record), path
