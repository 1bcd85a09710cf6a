"""LiteRT export on tiny models, run in LiteRT's own interpreter (ai_edge_litert, XNNPACK)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.quantizers.litert_recipes import SCHEMES, check_quantized
from smolconvert.targets import FAMILIES
from tests import tiny
from tests.conftest import mean_kld, read_json, require_module, tiny_exports

FAMILY = FAMILIES["litert"]
# mean KLD against the fp32 reference on a tiny random model (flat logits: loose bounds; the
# default model's figures are in docs/litert.md)
KLD_BOUND = {"fp32": 1e-9, "int8": 5e-3, "int4": 0.15}
CONTEXT = 40  # prefill calls of 20 tokens


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    """(arch, scheme) -> (model, reference, artifact), exported once per module."""
    require_module("litert_torch", "litert")
    require_module("ai_edge_litert", "litert")
    return tiny_exports(tmp_path_factory.mktemp("litert"), FAMILY, {"max_context_len": CONTEXT})


TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 1, 64, 33, 128, 8, 19, 77, 300]


@pytest.mark.parametrize(
    "arch,scheme", [("llama", s) for s in SCHEMES] + [("smollm3", "int8"), ("smollm3", "fp32")]
)
def test_runtime_matches_reference(exports, arch: str, scheme: str) -> None:
    """The .tflite in LiteRT's interpreter against the torch reference on the same tokens; the
    prefill and one-token-at-a-time paths through the cache agree."""
    model, ref, art = exports(arch, scheme)
    runner = FAMILY.open_runner(art)
    got = runner.logits(TOKENS)
    want = ref.logits(TOKENS).numpy()
    assert got.shape == want.shape
    if scheme == "fp32":
        assert np.abs(got - want).max() < 1e-4
    assert mean_kld(want, got) < KLD_BOUND[scheme]
    # the cache path: prefill 6 tokens (one padded call), then decode calls
    rows, cache = [], runner._empty()
    logits, cache = runner._forward(TOKENS[:6], 0, cache)
    rows.append(logits)
    for i, t in enumerate(TOKENS[6:], start=6):
        logits, cache = runner._forward([t], i, cache)
        rows.append(logits)
    np.testing.assert_allclose(np.concatenate(rows), got, atol=2e-4, rtol=0)
    timing = runner.time_generation(TOKENS[:8], 4)
    assert timing.tokens[0] == int(np.argmax(runner.logits(TOKENS[:8])[-1]))
    assert timing.decode_tok_s > 0


def test_prompts_longer_than_a_call_and_the_cache_end(exports) -> None:
    """40 tokens through prefill calls of 20 match the reference; near the cache's end, where a
    prefill call's positions would overrun it, the runner decodes one token per call."""
    _, ref, art = exports("llama", "fp32")
    tokens = [(7 * i + 3) % 320 for i in range(CONTEXT)]
    runner = FAMILY.open_runner(art)
    want = ref.logits(tokens).numpy()
    assert np.abs(runner.logits(tokens) - want).max() < 1e-4
    _, cache = runner._forward(tokens[:30], 0, runner._empty())
    tail, _ = runner._forward(tokens[30:], 30, cache)  # 30 + 20 > 40: decode calls
    assert np.abs(tail - want[30:]).max() < 1e-4


def test_artifact_records_signatures_and_every_weight(exports) -> None:
    _, _, art = exports("llama", "int8")
    meta = read_json(art.folder / "artifact.json")
    types = meta["tensor_types"]
    projections = [n for n in types if n.endswith("proj.weight")]
    assert projections and all(types[n] == "int8_channel" for n in projections)
    assert types["lm_head.weight"] == "int8_channel"
    assert meta["context_length"] == CONTEXT and meta["prefill_length"] == CONTEXT // 2
    n_layers = meta["spec"]["n_layers"]
    caches = {f"kv_cache_{c}_{i}" for i in range(n_layers) for c in "kv"}
    for name in ("prefill", "decode"):
        signature = meta["signatures"][name]
        assert set(signature["inputs"]) == {"tokens", "input_pos", *caches}
        assert set(signature["outputs"]) == {"logits", *caches}
    assert meta["entry_points"]["model"] == "model.tflite"
    assert (art.folder / "tokenizer.json").is_file()
    assert meta["smoothing"]["alpha"] == 0.5 and meta["options"]["smooth"] == "on"
    assert "smoothing" not in read_json(exports("llama", "fp32")[2].folder / "artifact.json")


def test_check_quantized_names_float_leftovers() -> None:
    linears = {"model.layers.0.mlp.up_proj": (128, 64), "lm_head": (320, 64)}
    good = [((128, 64), "INT8"), ((320, 64), "INT8"), ((320, 64), "INT8"), ((128,), "FLOAT32")]
    assert set(check_quantized(SCHEMES["int8"], good, linears).values()) == {"int8_channel"}
    with pytest.raises(UnsupportedError, match=r"\(320, 64\) \(lm_head\)"):
        check_quantized(SCHEMES["int8"], [((128, 64), "INT8"), ((320, 64), "FLOAT32")], linears)
    with pytest.raises(UnsupportedError, match="up_proj"):
        check_quantized(SCHEMES["int4"], [((320, 64), "INT4")], linears)


def test_max_context_len_option() -> None:
    with pytest.raises(ConfigError, match="litert option max_context_len=12.5"):
        FAMILY.check_options("int8", {"max_context_len": "12.5"})
    FAMILY.check_options("int8", {"max_context_len": "2048"})


def test_runner_refuses_more_than_the_cache(exports) -> None:
    _, _, art = exports("llama", "fp32")
    with pytest.raises(ConfigError, match="max_context_len"):
        FAMILY.open_runner(art).logits(list(range(CONTEXT + 1)))


def test_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    require_module("litert_torch", "litert")
    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    assert_exports_identical(folder, tmp_path, to="litert:int8")


def test_runner_refuses_a_file_that_is_not_a_program(tmp_path: Path) -> None:
    require_module("ai_edge_litert", "litert")
    from smolconvert.errors import CorruptFileError
    from smolconvert.validators.litert import LitertRunner

    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"TFL3" + bytes(60))
    with pytest.raises(CorruptFileError, match="LiteRT could not load"):
        LitertRunner(bad)
