"""gguf:auto end to end: the file fits its budget, llama.cpp runs it, and at the size of a fixed
mixture it is closer to the reference than that mixture."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import smolconvert
from smolconvert.errors import ConfigError
from smolconvert.model.reference import build_reference
from tests import tiny
from tests.exporters.test_gguf import ALIGNED, _kld, _llama_logits

IDS = [
    int(x) for x in torch.randint(3, tiny.VOCAB, (128,), generator=torch.Generator().manual_seed(9))
]


def _folder(tmp_path: Path) -> Path:
    cfg = tiny.config("llama", **dict(ALIGNED, num_hidden_layers=6))
    return tiny.write_folder(tmp_path / "m", cfg)


def _llama_kld(folder: Path, art) -> float:
    """Mean KLD of llama.cpp running the artifact against the fp32 reference of the source."""
    model = smolconvert.load(folder)
    expected = build_reference(model.spec, source=model.weights).logits(IDS).numpy()
    return float(_kld(expected, _llama_logits(art.path("model"), IDS)).mean())


def test_auto_fits_its_budget_and_beats_a_fixed_mixture_of_the_same_size(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    fixed = smolconvert.export(folder, to="gguf:q3_k_m", out=tmp_path / "q3")
    size_mb = fixed.size_bytes / 1e6
    art = smolconvert.export(
        folder, to="gguf:auto", options={"size_mb": size_mb}, out=tmp_path / "auto"
    )
    path = art.path("model")
    assert path.stat().st_size <= size_mb * 1e6
    plan = art.meta["auto_plan"]
    assert plan["budget"] == f"size_mb={size_mb:g}"
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}
    for name, row in plan["tensors"].items():
        assert types[name] == row["type"] and row["type"] in row["kld"]
    assert len({row["type"] for row in plan["tensors"].values()}) > 1  # a real mixture
    ours, theirs = _llama_kld(folder, art), _llama_kld(folder, fixed)
    assert ours < theirs, (ours, theirs)


def test_auto_with_a_bpw_budget_and_an_imatrix_is_deterministic(tmp_path: Path) -> None:
    folder = tiny.write_folder(tmp_path / "m", tiny.config("llama"))  # 64 wide: 32-blocks only
    runs = [
        smolconvert.export(
            folder, to="gguf:auto", options={"bpw": 5}, imatrix=True, out=tmp_path / f"a{i}"
        )
        for i in range(2)
    ]
    a, b = (r.path("model").read_bytes() for r in runs)
    assert a == b
    reader = gguf.GGUFReader(str(runs[0].path("model")))
    data = sum(int(t.n_bytes) for t in reader.tensors)
    weights = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert data * 8 / weights <= 5
    assert reader.fields["quantize.imatrix.chunks_count"].contents() > 0
    assert _llama_kld(folder, runs[0]) < 0.1  # tiny random models are sensitive: q4_k_m ~0.05


@pytest.mark.parametrize(
    ("to", "options", "message"),
    [
        ("gguf:auto", {}, "gguf:auto needs one budget"),
        ("gguf:auto", {"size_mb": 1, "bpw": 4}, "gguf:auto needs one budget"),
        ("gguf:q4_k_m", {"size_mb": 90}, "is the budget of gguf:auto"),
        ("gguf:auto", {"size_mb": "ninety"}, "is not a number"),
        ("gguf:auto", {"bpw": -1}, "must be a positive number"),
        ("gguf:auto", {"size_mb": 0.01}, "needs at least"),
    ],
)
def test_budget_errors_are_one_line(tmp_path: Path, to: str, options: dict, message: str) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    folder = _folder(tmp_path)
    with pytest.raises(ConfigError, match=message):
        smolconvert.export(folder, to=to, options=options, out=tmp_path / "api")
    args = [a for k, v in options.items() for a in ("-O", f"{k}={v}")]
    out = str(tmp_path / "cli")
    result = CliRunner().invoke(cli, ["export", str(folder), "--to", to, *args, "-o", out])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_export_list_names_auto_and_its_options() -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    out = CliRunner().invoke(cli, ["export", "--list"]).output
    assert "gguf:auto" in out and "the budget you set" in out
    assert "-O size_mb=" in out and "-O bpw=" in out
