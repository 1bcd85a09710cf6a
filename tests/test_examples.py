"""The example release configs for downloaded checkpoints build every target they name, from a
folder laid out as that checkpoint is published (tiny shapes, same files and quirks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import smolconvert
from tests import published
from tests.conftest import require_module

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "config, name",
    [
        ("release-smollm2-1.7b.toml", "SmolLM2-1.7B-Instruct"),
        ("release-smollm3.toml", "SmolLM3-3B"),
    ],
)
def test_example_release_builds_every_target_from_the_published_layout(
    tmp_path: Path, config: str, name: str
) -> None:
    for module, extra in (
        ("llama_cpp", "gguf"),
        ("onnxruntime", "onnx"),
        ("coremltools", "coreml"),
    ):
        require_module(module, extra)
    from pydoc_data.topics import topics

    data = tomllib.loads((EXAMPLES / config).read_text(encoding="utf-8"))
    source = published.write_published(tmp_path / name, name)
    calibration = tmp_path / "calibration.txt"  # one imatrix chunk: the point is the layout
    calibration.write_text(topics["for"] + topics["while"] + topics["if"], encoding="utf-8")
    data["release"].update(
        source=str(source),
        out=str(tmp_path / "out"),
        ctx=64,
        windows=1,
        calibration_text=str(calibration),
    )
    data["release"]["latency"] = False
    for target in data["targets"]:
        target["latency"] = False
    result = smolconvert.release(data)
    built = {a["target"] for a in result.manifest["artifacts"]}
    assert built == {t["target"] for t in data["targets"]}
    assert all(a["metrics"]["kld_mean"] < 0.5 for a in result.manifest["artifacts"])
