"""Core ML export, proven on the saved program: the evaluator runs every op of it, and its logits
equal the reference decoder's on the weights the program holds (decompressed by coremltools' own
constexpr implementations, not ours). On macOS, Core ML itself runs it too."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import smolconvert
from smolconvert.exporters.coreml_compress import const_names
from smolconvert.model.reference import build_reference
from smolconvert.quantizers.coreml_codecs import CODECS
from smolconvert.quantizers.coreml_recipes import SCHEMES, tensor_codec
from smolconvert.validators.coreml import causal_mask
from tests import tiny
from tests.conftest import read_json, require_module

require_module("coremltools", "coreml")

IDS = [
    int(x) for x in torch.randint(3, tiny.VOCAB, (40,), generator=torch.Generator().manual_seed(3))
]


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.as_tensor(p_logits).double(), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def _program_weights(package: Path, model) -> dict[str, torch.Tensor]:
    """The canonical tensors as the saved program holds them: float consts as stored, compressed
    ones decompressed by coremltools' own `materialized_val_inference` (the oracle)."""
    from tests.coreml_oracle import constexpr_value, load_program

    prog = load_program(package)
    names = const_names(model.spec)
    out = {n: model.weights.get(n).float() for n in model.weights.names()}  # 1-D norms
    found = set()
    for op in prog.functions["main"].operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            name = op.outputs[0].name
            base = next((b for b in names if name.startswith(b + "_") or name == b), None)
            if base is None:
                continue
            value = op.outputs[0].val if op.op_type == "const" else constexpr_value(op)
            out[names[base]] = torch.from_numpy(np.asarray(value, np.float32))
            found.add(names[base])
    assert found == set(names.values())
    if model.spec.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _export(tmp_path: Path, arch: str, scheme: str, kv_cache: str = "stateful"):
    folder = tiny.write_folder(tmp_path / f"tiny-{arch}", tiny.config(arch))
    art = smolconvert.export(
        folder,
        to=f"coreml:{scheme}",
        out=tmp_path / f"out-{scheme}",
        options={"kv_cache": kv_cache},
    )
    return smolconvert.load(folder), art


CASES = [("llama", s) for s in SCHEMES] + [("smollm3", s) for s in ("fp16", "int4", "mixed")]


@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_evaluator_runs_the_program_like_the_reference_on_its_weights(
    tmp_path: Path, arch: str, scheme: str
) -> None:
    from smolconvert.validators.mil_eval import MilProgram

    model, art = _export(tmp_path, arch, scheme)
    package = art.path("model")
    assert package.name.endswith(".mlpackage") and (package / "Manifest.json").is_file()
    program = MilProgram(package)
    assert set(program.states) == {"keyCache", "valueCache"}
    weights = _program_weights(package, model)
    expected = build_reference(model.spec, tensors=weights).logits(IDS).numpy()
    t = len(IDS)
    got = program.run(
        {"inputIds": np.array([IDS], np.int32), "causalMask": causal_mask(0, t)},
        program.make_state(),
    )["logits"][0].numpy()
    kld = _kld(expected, got)
    if scheme == "fp32":  # fp32 compute; only the KV cache state is fp16 (Core ML states are)
        assert np.abs(got - expected).max() < 5e-3
        assert kld.mean() < 1e-6
    else:  # fp16 activations: each op rounded to 11 significant bits
        assert kld.mean() < 2e-4, kld.mean()
        assert np.abs(got - expected).max() < 0.05
    assert (expected.argmax(-1) == got.argmax(-1)).mean() >= 0.95
    if SCHEMES[scheme].default is not None:
        # the check can fail: the same program against the uncompressed weights is far off
        original = build_reference(model.spec, source=model.weights).logits(IDS).numpy()
        assert _kld(original, got).mean() > 5 * kld.mean()
    assert set(art.meta["tensor_types"]) == set(const_names(model.spec).values())
    # the program holds exactly what the codecs chose: packing adds no arithmetic of its own
    for name in const_names(model.spec).values():
        codec_name = tensor_codec(SCHEMES[scheme], name, model.spec)
        if codec_name is None:
            continue
        codec = CODECS[codec_name]
        w = model.weights.get(name).float().numpy()
        decoded = codec.dequantize(codec.quantize(w, None), w.shape)
        np.testing.assert_array_equal(weights[name].numpy(), decoded, err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_sixteen_stateful_decode_steps_equal_the_full_sequence(tmp_path: Path, arch: str) -> None:
    from smolconvert.validators.coreml import open_coreml_runner

    _, art = _export(tmp_path, arch, "int4")
    runner = open_coreml_runner(art, n_ctx=256)
    full = runner.logits(IDS[:24])
    program, state = runner.engine.program, runner.engine.make_state()
    rows = [
        program.run(
            {"inputIds": np.array([IDS[:8]], np.int32), "causalMask": causal_mask(0, 8)}, state
        )["logits"][0].numpy()
    ]
    for pos in range(8, 24):
        out = program.run(
            {"inputIds": np.array([[IDS[pos]]], np.int32), "causalMask": causal_mask(pos, 1)}, state
        )
        rows.append(out["logits"][0].numpy())
    stepped = np.concatenate(rows)
    assert stepped.shape == full.shape
    assert _kld(full, stepped).max() < 1e-3
    assert (full.argmax(-1) == stepped.argmax(-1)).all()
    # a cache that was never written (fresh state for the last step) gives other logits
    lone = program.run(
        {"inputIds": np.array([[IDS[23]]], np.int32), "causalMask": causal_mask(23, 1)},
        program.make_state(),
    )["logits"][0].numpy()
    assert _kld(full[-1:], lone).max() > 10 * _kld(full[-1:], stepped[-1:]).max() + 1e-3


def test_stateless_variant_matches_and_generates(tmp_path: Path) -> None:
    from smolconvert.validators.coreml import open_coreml_runner

    model, art = _export(tmp_path, "llama", "int8", kv_cache="stateless")
    assert art.meta["options"] == {"kv_cache": "stateless"}
    runner = open_coreml_runner(art)
    assert not runner.engine.stateful and runner.engine.program.states == {}
    weights = _program_weights(art.path("model"), model)
    expected = build_reference(model.spec, tensors=weights).logits(IDS).numpy()
    assert _kld(expected, runner.logits(IDS)).mean() < 2e-4
    timing = runner.time_generation(IDS[:10], 4)
    greedy = [int(expected[9].argmax())]
    assert timing.tokens[0] == greedy[0] and len(timing.tokens) == 5


def test_artifact_folder_and_meta(tmp_path: Path) -> None:
    model, art = _export(tmp_path, "smollm3", "mixed")
    meta = art.meta
    assert meta["target"] == "coreml" and meta["scheme"] == "mixed"
    assert meta["entry_points"]["model"] == "model.mlpackage"
    assert meta["min_runtime"]["iOS"] == "18"
    config = json.loads((art.folder / "coreml_config.json").read_text())
    assert config["states"] == ["keyCache", "valueCache"] and config["context_length"] == 1024
    assert (art.folder / "tokenizer.json").is_file()
    types = meta["tensor_types"]
    assert types["model.embed_tokens.weight"] == "int8_channel"  # tied embedding keeps more bits
    assert types["model.layers.1.mlp.gate_proj.weight"].startswith("uint4_block32")
    assert "lm_head.weight" not in types  # tied: one tensor in the program


def test_export_is_deterministic(tmp_path: Path) -> None:
    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    a = smolconvert.export(folder, to="coreml:pal4", out=tmp_path / "a")
    b = smolconvert.export(folder, to="coreml:pal4", out=tmp_path / "b")
    assert [(f["path"], f["sha256"]) for f in a.meta["files"]] == [
        (f["path"], f["sha256"]) for f in b.meta["files"]
    ]


def test_cli_export_and_validate(tmp_path: Path) -> None:
    from smolconvert.cli import cli

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    out = tmp_path / "art"
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(folder), "--to", "coreml:int4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli, ["validate", str(out), "--no-latency", "--ctx", "64", "--windows", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert "evaluator" in report["candidate"]
    assert any("not a Core ML device" in n for n in report["notes"])
    assert report["quality"]["kld_mean"] < 0.5
    # measuring must not touch the artifact (coremltools' MLModel rewrites Manifest.json)
    from smolconvert.artifact import sha256_file

    for f in read_json(out / "artifact.json")["files"]:
        assert sha256_file(out / f["path"]) == f["sha256"], f["path"]


def test_unknown_option_value_is_a_clear_error(tmp_path: Path) -> None:
    from smolconvert.errors import ConfigError

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    with pytest.raises(ConfigError, match="kv_cache"):
        smolconvert.export(folder, to="coreml:fp16", out=tmp_path / "x", options={"kv_cache": "x"})


def test_module_imports_without_coremltools() -> None:
    import subprocess

    code = (
        "import sys; import smolconvert.exporters.coreml as m, smolconvert.validators.coreml; "
        "import smolconvert.quantizers.coreml_codecs, smolconvert.quantizers.coreml_recipes; "
        "m.describe_schemes(); assert 'coremltools' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.needs_macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict needs macOS")
def test_core_ml_itself_agrees_with_the_evaluator(tmp_path: Path) -> None:
    import coremltools as ct

    from smolconvert.validators.mil_eval import MilProgram

    _, art = _export(tmp_path, "llama", "int4")
    mlmodel = ct.models.MLModel(str(art.path("model")))
    inputs = {"inputIds": np.array([IDS], np.int32), "causalMask": causal_mask(0, len(IDS))}
    real = mlmodel.predict(
        {**inputs, "causalMask": inputs["causalMask"].astype(np.float16)},
        state=mlmodel.make_state(),
    )["logits"][0]
    program = MilProgram(art.path("model"))
    ours = program.run(inputs, program.make_state())["logits"][0].numpy()
    assert _kld(ours, np.asarray(real, np.float32)).mean() < 1e-3


@pytest.mark.slow
def test_default_model_int4_converts_and_scores(default_model, default_reference, tmp_path) -> None:
    from smolconvert.validators.coreml import open_coreml_runner

    art = smolconvert.export("default", to="coreml:int4", out=tmp_path / "int4")
    size = sum(f.stat().st_size for f in art.path("model").rglob("*") if f.is_file())
    assert size <= 80e6, size
    ids = default_model.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    expected = default_reference.logits(ids).numpy()
    got = open_coreml_runner(art).logits(ids)
    assert _kld(expected, got).mean() < 0.3
    assert expected[-1].argmax() == got[-1].argmax()


# --- determinism across processes (issue 23) ------------------------------------------------------


def test_int4_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    from coremltools.proto import Model_pb2

    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    files = assert_exports_identical(folder, tmp_path, to="coreml:int4")
    spec = Model_pb2.Model.FromString(files["model.mlpackage/Data/com.apple.CoreML/model.mlmodel"])
    metadata = dict(spec.description.metadata.userDefined)
    assert metadata["smolconvert.scheme"] == "int4"
    assert not any("date" in key for key in metadata)  # a date differs from one day to the next
