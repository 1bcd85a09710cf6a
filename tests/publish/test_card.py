"""Model cards: every artifact folder's README.md is a card the Hub reads (base_model_relation
quantized, the runtime's library_name), written at export and rewritten with the measurements."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

import smolconvert
from smolconvert.artifact import Artifact
from smolconvert.cli import cli
from smolconvert.model.source import guess_base_model
from smolconvert.publish import card
from smolconvert.targets import FAMILIES
from tests import published, tiny


def test_every_family_has_a_card() -> None:
    assert set(card.FAMILY_CARDS) == set(FAMILIES)


def _meta(family: str, scheme: str, **extra: object) -> dict:
    spec = tiny.config("llama")
    return {
        "target": family,
        "scheme": scheme,
        "model": "SmolLM2-360M-Instruct",
        "base_model": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "license": "apache-2.0",
        "source": "x",
        "source_sha256": "ab" * 32,
        "spec": {"architecture": "llama", "hidden_size": spec["hidden_size"]},
        "entry_points": {"model": "model.bin"},
        "files": [{"path": "model.bin", "size_bytes": 123456}],
        **extra,
    }


@pytest.mark.parametrize(
    ("family", "library"),
    [
        ("gguf", "gguf"),
        ("onnx", "transformers.js"),
        ("coreml", "coreml"),
        ("mlc", "mlc-llm"),
        ("executorch", "executorch"),
        ("litert", "litert"),
    ],
)
def test_card_of_each_family_is_read_by_the_hub(tmp_path: Path, family: str, library: str) -> None:
    path = tmp_path / "README.md"
    path.write_text(card.artifact_card(_meta(family, "int8")))
    data = ModelCard.load(path).data
    assert data.base_model_relation == "quantized"
    assert data.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert data.library_name == library
    assert data.license == "apache-2.0"
    assert family in data.tags


def test_onnx_genai_layout_is_an_onnxruntime_genai_card() -> None:
    text = card.artifact_card(_meta("onnx", "int4", options={"layout": "genai"}))
    assert "library_name: onnxruntime-genai" in text
    assert "Transformers.js" not in text and "onnxruntime_genai" in text


def test_numbers_have_no_negative_zero() -> None:
    assert card._num(-0.00001, ".4f") == "0.0000"
    assert card._num(-0.5, ".1f") == "-0.5"
    assert card._num(None, ".1f") == "–"


def test_export_writes_the_card_and_validate_rewrites_it(tmp_path: Path) -> None:
    folder = published.write_published(tmp_path / "SmolLM2-360M-Instruct", "SmolLM2-360M-Instruct")
    art = smolconvert.export(folder, to="gguf:q8_0", out=tmp_path / "out")
    readme = art.folder / "README.md"
    data = ModelCard.load(readme).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert data.base_model_relation == "quantized" and data.library_name == "gguf"
    assert "Not measured yet" in readme.read_text()
    assert "README.md" in {f["path"] for f in art.meta["files"]}

    report = smolconvert.validate(art.folder, ctx=64, windows=1, latency=False)
    text = readme.read_text()
    assert "Not measured yet" not in text
    assert f"| mean KL divergence | {card._num(report.quality.kld_mean, '.4f')} |" in text
    assert f"| runtime | {report.runtime} |" in text
    size = sum(f["size_bytes"] for f in art.meta["files"] if f["path"] != "README.md")
    n_params = art_spec_params(art)
    assert f"| bits per weight | {size * 8 / n_params:.2f} |" in text
    reloaded = Artifact.load(art.folder, hashes=True)  # the card's new hash is recorded
    assert reloaded.meta["validation"]["quality"]["kld_mean"] == report.quality.kld_mean


def art_spec_params(art: Artifact) -> int:
    from smolconvert.model.spec import ModelSpec

    return ModelSpec.from_dict(art.meta["spec"]).n_params


def test_base_model_from_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "my-finetune"
    tiny.write_folder(folder, tiny.config("llama"))
    result = CliRunner().invoke(
        cli,
        ["export", str(folder), "--to", "gguf:f16", "-o", str(tmp_path / "a")]
        + ["--base-model", "me/my-finetune"],
    )
    assert result.exit_code == 0, result.output
    assert ModelCard.load(tmp_path / "a" / "README.md").data.base_model == "me/my-finetune"


def test_base_model_and_license_from_the_source(tmp_path: Path) -> None:
    assert guess_base_model("anything", "/c/hub/models--Org--Name/snapshots/0a1b") == "Org/Name"
    assert guess_base_model("SmolLM3-3B", "/data/SmolLM3-3B") == "HuggingFaceTB/SmolLM3-3B"
    assert guess_base_model("my-finetune", "/data/my-finetune") is None
    folder = tmp_path / "my-finetune"
    tiny.write_folder(folder, tiny.config("llama"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    art = smolconvert.export(folder, to="gguf:f16", out=tmp_path / "a")
    data = ModelCard.load(art.folder / "README.md").data
    assert data.license == "mit" and data.base_model is None
    assert data.base_model_relation == "quantized"
