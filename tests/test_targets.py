"""The target registry: typed options, target parsing, the code lists the release cache hashes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from smolconvert.cli import cli
from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.options import OnnxOptions, option_choices
from smolconvert.targets import FAMILIES, modules_sha256, parse_target
from tests import tiny

# Modules an export loads that cannot change its bytes: the package faces, errors, progress output
# and the registry itself.
INFRA = {
    "smolconvert",
    "smolconvert.errors",
    "smolconvert.exporters",
    "smolconvert.model",
    "smolconvert.progress",
    "smolconvert.quantizers",
    "smolconvert.targets",
    "smolconvert.validators",
    "smolconvert.version",
}
# One quantized scheme per family, fast on a tiny model, so the quantizers load too.
SCHEMES = {
    "gguf": "q4_k_m",
    "onnx": "int8",
    "coreml": "int4",
    "mlc": "q4f16_1",
    "executorch": "8da4w",
    "litert": "int8",
}

_CHILD = """
import json, sys
import smolconvert
smolconvert.export(sys.argv[1], to=sys.argv[2], out=sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("smolconvert"))))
"""


def test_options_parse_once_with_errors_that_list_the_choices() -> None:
    onnx = FAMILIES["onnx"]
    assert onnx.parse_options({"layout": "genai"}) == OnnxOptions(layout="genai")
    assert onnx.parse_options(None) == OnnxOptions()
    assert onnx.resolve_options({"gptq": "off"})["gptq"] == "off"
    with pytest.raises(ConfigError, match=r"no option colour \(options: gptq, graph, kv_cache"):
        onnx.parse_options({"colour": "red"})
    with pytest.raises(ConfigError, match="layout='x' is not one of transformers.js, genai"):
        onnx.parse_options({"layout": "x"})
    assert option_choices(OnnxOptions)["kv_cache"] == ("auto", "float", "int8")


def test_targets_are_checked_against_the_registry() -> None:
    family, scheme = parse_target("gguf:q4_k_m")
    assert family is FAMILIES["gguf"] and scheme == "q4_k_m"
    with pytest.raises(
        UnsupportedError, match="families: gguf, onnx, coreml, mlc, executorch, litert"
    ):
        parse_target("tflite:int8")
    with pytest.raises(UnsupportedError, match="choose one of .*q0f16"):
        parse_target("mlc:q9")
    for f in FAMILIES.values():
        assert f.schemes() and all(row["target"].startswith(f"{f.name}:") for row in f.describe())


def test_old_family_flags_are_aliases_of_options_with_a_warning(tmp_path: Path) -> None:
    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    result = CliRunner().invoke(
        cli, ["export", str(folder), "--to", "mlc:q4f16_1", "--mlc-scales", "search", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: --mlc-scales is now -O mlc_scales=search" in result.stderr
    assert json.loads(result.stdout)["options"] == {"mlc_scales": "search"}
    listed = CliRunner().invoke(cli, ["export", "--list"])
    assert "-O layout=  (onnx) transformers.js | genai (default transformers.js)" in listed.stdout


def test_every_module_an_export_loads_is_in_its_family_code(tmp_path: Path) -> None:
    """The release cache rebuilds a target when a module in its family's `code` changes: every
    smolconvert module an export actually loads must be listed there (or be infrastructure)."""
    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    for name, family in FAMILIES.items():
        target = f"{name}:{SCHEMES[name]}"
        out = tmp_path / name
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder), target, str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert child.returncode == 0, child.stderr[-2000:]
        loaded = set(json.loads(child.stdout.strip().splitlines()[-1]))
        missing = sorted(loaded - set(family.code) - INFRA)
        assert not missing, f"{target} loads modules its family's code list lacks: {missing}"
        assert modules_sha256(family.code)  # every listed module exists


def test_a_renamed_module_in_a_code_list_is_an_error() -> None:
    with pytest.raises(ConfigError, match="smolconvert.exporters.nope"):
        modules_sha256(("smolconvert.exporters.nope",))
