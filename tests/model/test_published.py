"""Folders laid out as the published SmolLM checkpoints (tests/published.py) load, warn only about
what nobody knows, and agree with transformers and llama.cpp on shapes, logits and token ids."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from smolconvert.cli import cli
from smolconvert.errors import ConfigError, ConfigWarning
from smolconvert.model.reference import build_reference
from smolconvert.model.source import load_model
from smolconvert.model.spec import ModelSpec
from tests import published

NAMES = sorted(published.CONFIGS)


def _load_quietly(folder: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # a warning here fails the test
        return load_model(folder, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_published_config_reads_at_full_size_without_warning(name: str) -> None:
    config = published.CONFIGS[name]
    spec = ModelSpec.from_config(config, strict_config=True)
    assert spec.n_layers == config["num_hidden_layers"]
    assert spec.hidden_size == config["hidden_size"]
    assert spec.rope_theta == float(config["rope_theta"])
    assert spec.tie_word_embeddings  # every SmolLM is tied; SmolLM3 by its class default
    if name == "SmolLM3-3B":
        assert [i for i, r in enumerate(spec.rope_layers) if not r] == list(range(3, 36, 4))
        assert (spec.n_heads, spec.n_kv_heads, spec.vocab_size) == (16, 4, 128256)


@pytest.mark.parametrize("name", NAMES)
def test_published_folder_inspects_strictly(tmp_path: Path, name: str) -> None:
    folder = published.write_published(tmp_path / name, name)
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--strict-config", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["ignored_config_fields"] == []
    generation = published.GENERATION[published.TOKENIZERS[name]]
    tok = info["tokenizer"]
    assert tok["eos"] == published.CONFIGS[name]["eos_token_id"] == generation["eos_token_id"]
    assert tok["vocab_size"] == published.CONFIGS[name]["vocab_size"]


def test_special_ids_follow_llama_cpp_precedence(tmp_path: Path) -> None:
    # SmolLM3: tokenizer_config says bos null and pad <|im_end|>; config.json says bos 128000 and
    # pad 128004. llama.cpp's converter takes tokenizer_config's strings first, then config ids.
    model = _load_quietly(published.write_published(tmp_path / "s3", "SmolLM3-3B"))
    special = model.tokenizer.special
    assert (special.bos, special.eos, special.pad, special.unk) == (128000, 128012, 128012, None)
    assert not special.add_bos
    assert model.tokenizer.chat_template == published.SMOLLM3_TEMPLATE  # from chat_template.jinja
    instruct = _load_quietly(published.write_published(tmp_path / "s2", "SmolLM2-135M-Instruct"))
    special = instruct.tokenizer.special
    assert (special.bos, special.eos, special.pad, special.unk) == (1, 2, 2, 0)
    assert instruct.tokenizer.chat_template == published.SMOLLM2_TEMPLATE


def test_unknown_field_warns_is_recorded_and_strict_refuses(tmp_path: Path) -> None:
    folder = published.write_published(tmp_path / "m", "SmolLM2-135M-Instruct")
    config = json.loads((folder / "config.json").read_text())
    config["some_new_knob"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(ConfigWarning, match="some_new_knob"):
        model = load_model(folder)
    assert model.ignored_config_fields == ("some_new_knob",)
    with pytest.raises(ConfigError, match="some_new_knob"):
        load_model(folder, strict_config=True)

    runner = CliRunner()
    refused = runner.invoke(cli, ["inspect", str(folder), "--strict-config"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error:") and "some_new_knob" in refused.stderr
    out = tmp_path / "out"
    done = runner.invoke(cli, ["export", str(folder), "--to", "gguf:f16", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert done.stderr.startswith("warning:") and "some_new_knob" in done.stderr
    meta = json.loads((out / "artifact.json").read_text())
    assert meta["ignored_config_fields"] == ["some_new_knob"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rope_interleaved": True}, "rope_interleaved"),
        ({"rope_scaling": "linear"}, "rope_scaling must be null or an object"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be null or an object"),
        ({"partial_rotary_factor": 0.5}, "partial"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_attention"),
    ],
)
def test_math_fields_of_published_configs_are_still_checked(override: dict, message: str) -> None:
    config = dict(published.tiny_config("SmolLM2-135M-Instruct"), **override)
    with pytest.raises(Exception, match=message):
        ModelSpec.from_config(config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", "abc"),
        ("rms_norm_eps", -1),
        ("head_dim", -16),
        ("head_dim", 16.7),
        ("head_dim", "abc"),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", -1),
        ("hidden_size", 1e12),
        ("hidden_size", 2**40),
        ("pretraining_tp", "two"),
        ("layer_types", 5),
        ("rope_theta", float("nan")),
        ("rope_theta", "100000"),
        ("tie_word_embeddings", "yes"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_one_line_errors(
    tmp_path: Path, field: str, value: object
) -> None:
    folder = published.write_published(tmp_path / "m", "SmolLM2-135M-Instruct")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and field in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "SmolLM2-1.7B-Instruct", "SmolLM3-3B"])
def test_transformers_reads_the_folder_like_we_do_and_its_save_reads_back(
    tmp_path: Path, name: str
) -> None:
    transformers = pytest.importorskip("transformers")
    folder = published.write_published(tmp_path / "published", name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = _load_quietly(folder)
    ours = build_reference(model.spec, source=model.weights)
    ids = torch.randint(0, 600, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    got = ours.logits(ids[0].tolist())
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max().item() <= 1e-4  # pretraining_tp 2 included: same math

    # What transformers writes today (its own spellings: dtype, rope_parameters, head_dim ...).
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(saved)
    again = _load_quietly(saved, strict_config=True)
    assert again.spec == model.spec
    assert again.tokenizer.special == model.tokenizer.special
    assert again.tokenizer.chat_template == model.tokenizer.chat_template


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "SmolLM3-3B"])
def test_token_ids_match_transformers_on_chat_and_prose(tmp_path: Path, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    folder = published.write_published(tmp_path / name, name)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = _load_quietly(folder).tokenizer
    chat = [{"role": "user", "content": "What is 12345 + 6789?\n  Answer in    French."}]
    prompt = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in (prompt, topics["for"][:3000], "  leading spaces\n\n\ttabs 3.14159 "):
        assert ours.encode(text) == theirs(text)["input_ids"]


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path) -> None:
    folder = published.write_published(tmp_path / "m", "SmolLM2-135M-Instruct")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 40000  # the tokenizer has 49152 tokens
    (folder / "config.json").write_text(json.dumps(config))
    published.write_weights(folder, config)
    result = CliRunner().invoke(cli, ["validate", str(folder), "--no-latency"])
    assert result.exit_code == 2, result.output
    assert "49152 tokens" in result.stderr and result.stderr.count("\n") == 1
