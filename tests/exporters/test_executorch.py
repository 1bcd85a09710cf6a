"""ExecuTorch export on tiny models, run in ExecuTorch's own runtime and its own LLM runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.model.weights import linear_shapes
from smolconvert.quantizers.executorch_recipes import (
    SCHEMES,
    WeightConfig,
    check_shapes,
    embedding_codes,
)
from smolconvert.targets import FAMILIES
from tests import tiny
from tests.conftest import mean_kld, read_json, require_module, tiny_exports

FAMILY = FAMILIES["executorch"]
# mean KLD against the fp32 reference on a tiny random model (logits of a random model are
# flat, so these are loose; the default model's figures are in docs/executorch.md)
KLD_BOUND = {"fp32": 1e-9, "int8": 5e-3, "8da4w": 0.15}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    """(arch, scheme) -> (model, reference, artifact), exported once per module."""
    require_module("executorch", "executorch")
    return tiny_exports(tmp_path_factory.mktemp("executorch"), FAMILY, {"max_context_len": 40})


TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 1, 64, 33, 128, 8, 19, 77, 300]


@pytest.mark.parametrize(
    "arch,scheme", [("llama", s) for s in SCHEMES] + [("smollm3", "8da4w"), ("smollm3", "fp32")]
)
def test_runtime_matches_reference(exports, arch: str, scheme: str) -> None:
    """The .pte in ExecuTorch's runtime against the torch reference on the same tokens; the
    prefill and one-token-at-a-time paths through the cache agree."""
    model, ref, art = exports(arch, scheme)
    runner = FAMILY.open_runner(art)
    got = runner.logits(TOKENS)
    want = ref.logits(TOKENS).numpy()
    assert got.shape == want.shape
    if scheme == "fp32":
        assert np.abs(got - want).max() < 1e-4
    assert mean_kld(want, got) < KLD_BOUND[scheme]
    # the cache path: prefill 6 tokens, then one per call
    rows = [runner._forward(TOKENS[:6], 0).numpy()]
    rows += [runner._forward([t], i).numpy() for i, t in enumerate(TOKENS[6:], start=6)]
    np.testing.assert_allclose(np.concatenate(rows), got, atol=2e-4, rtol=0)
    timing = runner.time_generation(TOKENS[:8], 4)
    assert timing.tokens[0] == int(np.argmax(runner.logits(TOKENS[:8])[-1]))
    assert timing.decode_tok_s > 0


def test_a_window_longer_than_one_call_is_scored_in_pieces(exports) -> None:
    """40 tokens through a program that takes 39 per call: two calls, the reference's logits."""
    _, ref, art = exports("llama", "fp32")
    tokens = [(7 * i + 3) % 320 for i in range(40)]
    got = FAMILY.open_runner(art).logits(tokens)
    assert np.abs(got - ref.logits(tokens).numpy()).max() < 1e-4


def test_artifact_records_every_weight(exports) -> None:
    _, _, art = exports("llama", "8da4w")
    meta = read_json(art.folder / "artifact.json")
    types = meta["tensor_types"]
    assert types["model.embed_tokens.weight"] == "w4_g32"
    assert types["lm_head.weight"] == "8da4_g32"
    projections = [n for n in types if n.endswith("proj.weight")]
    down = [n for n in projections if n.endswith("down_proj.weight")]
    assert down and all(types[n] == "8da8_channel" for n in down)
    assert all(types[n] == "8da4_g32" for n in projections if n not in down)
    assert meta["runner_metadata"]["get_max_context_len"] == 40
    assert meta["runner_metadata"]["get_max_seq_len"] == 39  # calls of up to 39 tokens
    assert meta["entry_points"]["model"] == "model.pte"
    assert (art.folder / "tokenizer.json").is_file()


def test_executorch_llm_runner_loads_and_generates(exports) -> None:
    """ExecuTorch's own C++ LLM runner (TextLLMRunner) reads our metadata, tokenizer.json and
    program, and decodes greedily the tokens our runner decodes."""
    model, _, art = exports("llama", "fp32")
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(art.path("model")), str(art.folder / "tokenizer.json"))
    stats: list = []
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, echo=False)
    # no token callback: a random model's tokens need not be whole UTF-8 characters
    runner.generate("hello world", config, stats_callback=stats.append)
    # its stats count the tokens after the first, which the prefill yields
    assert stats and stats[-1].num_generated_tokens == 5
    assert stats[-1].num_prompt_tokens == len(model.tokenizer.encode("hello world"))


def test_embedding_codes_golden() -> None:
    """One row, two 4-bit groups of 4: codes biased by 8, low nibble first, torchao's scale."""
    w = torch.tensor([[1.5, -1.5, 0.0, 0.75, 3.0, 0.0, -3.0, 1.0]])
    codes, scales = embedding_codes(w, WeightConfig(4, 4, False))
    np.testing.assert_allclose(scales.numpy(), [[1.5 / 7.5, 3.0 / 7.5]])
    # group 1: w / 0.2 -> 7.5, -7.5, 0, 3.75 -> round half even 8 (clamped 7), -8, 0, 4
    # group 2: w / 0.4 -> 7.5, 0, -7.5, 2.5 -> 7, 0, -8, 2; +8 -> codes
    q = [15, 0, 8, 12, 15, 8, 0, 10]
    packed = [q[i] | (q[i + 1] << 4) for i in range(0, 8, 2)]
    assert codes.tolist() == [packed]


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_quantized_embedding_gathers_dequantized_rows(bits: int, group: int | None) -> None:
    from smolconvert.exporters.executorch import quantized_embedding

    torch.manual_seed(0)
    w = torch.randn(50, 64) * 0.02
    emb = quantized_embedding(*embedding_codes(w, WeightConfig(bits, group, False)), bits)
    tokens = torch.tensor([[3, 49, 0, 3]])
    got = emb(tokens)
    step = (w.reshape(50, -1, group or 64).abs().amax(-1) / (2**bits / 2 - 0.5))[tokens[0]]
    err = (got[0] - w[tokens[0]]).reshape(4, -1, group or 64).abs().amax(-1)
    assert torch.all(err <= step / 2 + 1e-7)
    assert torch.all(err > 0) or bits == 8


def test_refuses_widths_that_are_not_whole_groups(tmp_path: Path) -> None:
    import smolconvert

    cfg = tiny.config("llama", intermediate_size=80)  # gate/up: 80 rows; down_proj: 80 columns
    model = smolconvert.load(str(tiny.write_folder(tmp_path / "odd", cfg)))
    shapes = linear_shapes(model.spec)
    check_shapes(SCHEMES["8da4w"], shapes)  # down_proj is per channel: any width will do
    odd = {n: (s[0], 80) if n.endswith("up_proj") else s for n, s in shapes.items()}
    with pytest.raises(UnsupportedError, match=r"up_proj.*executorch:int8"):
        check_shapes(SCHEMES["8da4w"], odd)
    cfg = tiny.config("llama", hidden_size=80)  # every projection but down_proj: 80 columns
    model = smolconvert.load(str(tiny.write_folder(tmp_path / "wide", cfg)))
    with pytest.raises(UnsupportedError, match=r"q_proj.*executorch:int8"):
        FAMILY.export(model, "8da4w", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_max_context_len_option() -> None:
    with pytest.raises(ConfigError, match="whole number"):
        FAMILY.check_options("fp32", {"max_context_len": "12.5"})
    with pytest.raises(ConfigError, match="whole number"):
        FAMILY.check_options("fp32", {"max_context_len": "8"})
    FAMILY.check_options("fp32", {"max_context_len": "4096"})


def test_runner_refuses_more_than_the_cache(exports) -> None:
    _, _, art = exports("llama", "fp32")
    runner = FAMILY.open_runner(art)
    with pytest.raises(ConfigError, match="max_context_len"):
        runner.logits(list(range(41)))


def test_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    require_module("executorch", "executorch")
    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    assert_exports_identical(folder, tmp_path, to="executorch:8da4w")
