"""The CLI reaches the API, prints JSON on stdout, turns user mistakes into one line + exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import smolconvert
from smolconvert.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and smolconvert.__version__ in result.output


def test_inspect_json_on_a_tiny_folder(tiny_folder, arch) -> None:
    result = run("inspect", str(tiny_folder), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"] == arch and info["spec"]["hidden_size"] == 64
    assert info["no_rope_layers"] == ([3] if arch == "smollm3" else [])
    assert info["tokenizer"]["vocab_size"] == 320 and info["tokenizer"]["chat_template"]
    assert info["n_params"] == smolconvert.load(tiny_folder).spec.n_params


def test_validate_json_fp32_is_exact(tiny_folder) -> None:
    result = run(
        "validate",
        str(tiny_folder),
        "--dtype",
        "fp32",
        "--ctx",
        "64",
        "--windows",
        "2",
        "--no-latency",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quality"]["kld_mean"] == 0.0 and report["quality"]["top1"] == 1.0
    assert report["latency"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (("inspect", "/no/such/model"), "does not exist"),
        (("validate", "/no/such/model"), "does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message) -> None:
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_bad_config_exits_2(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run("inspect", str(tmp_path))
    assert result.exit_code == 2 and "model_type 'gpt2' is not supported" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("validate", "{folder}", "--dtype", "int3"), "--dtype"),
        (("export", "--foo"), "--foo"),
        (("export",), "give SOURCE"),
        (("nosuch",), "nosuch"),
        (("validate", "{folder}", "--ctx", "2"), "--ctx"),
        (("release", "run"), "CONFIG"),
    ],
)
def test_click_usage_errors_are_one_error_line_and_exit_2(tiny_folder, args, message) -> None:
    result = run(*(a.format(folder=tiny_folder) for a in args))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_pickle_refusal_and_library_errors_are_one_line(tmp_path) -> None:
    from tests import tiny

    folder = tiny.write_folder(tmp_path / "m", tiny.config("llama"))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all\nsecond line\n")
    for extra in ((), ("--allow-pickle",)):
        result = run("inspect", str(folder), *extra)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_bare_command_shows_help() -> None:
    result = run()
    assert result.exit_code == 0 and "Usage:" in result.stdout


@pytest.mark.slow
def test_inspect_default_json(default_model) -> None:
    info = json.loads(run("inspect", "default", "--json").stdout)
    assert info["architecture"] == "llama" and info["spec"]["n_layers"] == 30
    assert (info["spec"]["n_heads"], info["spec"]["n_kv_heads"]) == (9, 3)
    assert info["spec"]["vocab_size"] == 49152 and info["spec"]["tie_word_embeddings"]
    assert round(info["n_params"] / 1e6, 1) == 134.5 and "Q4_1" in info["origin"]
    assert info["tokenizer"]["bos"] == 1 and info["tokenizer"]["eos"] == 2
