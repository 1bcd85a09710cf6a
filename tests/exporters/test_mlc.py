"""MLC export on tiny models: MLC's parameter list, TVM's loader, dequantization, logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smolconvert.errors import UnsupportedError
from smolconvert.exporters import mlc
from smolconvert.model import mlc_layout
from smolconvert.quantizers import group
from smolconvert.targets import FAMILIES
from tests import tiny
from tests.conftest import read_json, require_module

FIXTURE = Path(__file__).parent.parent / "fixtures" / "mlc_llama_params.json"
SCHEMES = [s["target"].partition(":")[2] for s in mlc.describe_schemes()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    import smolconvert

    folder = tiny.write_folder(tmp_path_factory.mktemp("mlc") / "tiny-llama", tiny.config("llama"))
    return smolconvert.load(str(folder))


def _export(model, scheme: str, out: Path, mode: str = "mlc"):
    return FAMILIES["mlc"].export(model, scheme, out, options={"mlc_scales": mode})


def _tvm_load(folder: Path) -> dict[str, np.ndarray]:
    import tvm
    from tvm.contrib import tvmjs

    tensors, _ = tvmjs.load_tensor_cache(str(folder / "tensor-cache.json"), tvm.cpu())
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_list_matches_mlc_llama(tiny_model, tmp_path: Path, scheme: str) -> None:
    require_module("tvm", "mlc")
    expected = read_json(FIXTURE)["params"][scheme]
    art = _export(tiny_model, scheme, tmp_path / scheme)
    cache = read_json(art.folder / "tensor-cache.json")
    records = [r for shard in cache["records"] for r in shard["records"]]
    assert [[r["name"], r["shape"], r["dtype"]] for r in records] == expected
    assert read_json(art.folder / "ndarray-cache.json") == cache
    loaded = _tvm_load(art.folder)  # TVM's own loader reads every tensor
    assert [[k, list(v.shape), str(v.dtype)] for k, v in loaded.items()] == expected


@pytest.mark.parametrize("mode", group.SCALE_MODES)
@pytest.mark.parametrize("scheme", sorted(group.GROUP_CONFIGS))
def test_tvm_load_unpack_equals_our_dequantized(
    tiny_model, tmp_path: Path, scheme: str, mode: str
) -> None:
    """pack -> TVM load -> unpack equals the weights we quantized, dequantized independently."""
    require_module("tvm", "mlc")
    from smolconvert.validators.mlc import canonical_tensors

    cfg = group.GROUP_CONFIGS[scheme]
    art = _export(tiny_model, scheme, tmp_path / scheme, mode)
    loaded = _tvm_load(art.folder)
    weights = canonical_tensors(loaded, tiny_model.spec, scheme)
    # Every canonical tensor comes back, within a quantization step of the source.
    assert sorted(weights) == sorted(tiny_model.weights.names())
    for name, w in weights.items():
        src = tiny_model.weights.get(name).float().numpy()
        if src.ndim == 1:  # norms: the model dtype, and bf16 on disk for float32 (f32-to-bf16)
            want = src.astype(cfg.dtype).astype(np.float32)
            if cfg.model_dtype == "float32":
                want = mlc_layout.bf16_round(want)
            assert torch.equal(w, torch.from_numpy(want)), name
            continue
        dtype_src = src.astype(cfg.dtype).astype(np.float32)
        err = np.abs(w.numpy() - dtype_src)
        step = np.abs(dtype_src).max(axis=1, keepdims=True) / cfg.max_int
        assert err.max() <= (step * 1.6).max(), name  # within the quantization step
    # The packed words and scales TVM read are the ones the codec makes from the source, and
    # unpacking them gives the same weights as our dequantization of those codes.
    store = mlc_layout.bf16_round if cfg.model_dtype == "float32" else None
    for p in mlc_layout.plan(tiny_model.spec, scheme):
        if p.role != "q_weight":
            continue
        w = np.concatenate([tiny_model.weights.get(s).float().numpy() for s in p.sources])
        qw, qs = group.quantize(w, cfg, mode, None, store)
        if store is not None:
            qs = store(qs)
        base = p.name.removesuffix(".q_weight")
        assert np.array_equal(loaded[p.name], qw), p.name
        assert np.array_equal(loaded[f"{base}.q_scale"], qs), p.name
        k = w.shape[1]
        dq = group.dequantize(loaded[p.name], loaded[f"{base}.q_scale"], k, cfg)
        rows = np.concatenate([weights[s].numpy() for s in p.sources])
        assert np.array_equal(rows, dq.astype(np.float32)), p.name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_runner_logits_track_reference(tiny_model, tmp_path: Path, scheme: str) -> None:
    from smolconvert.model.reference import build_reference
    from smolconvert.validators.mlc import open_mlc_runner

    art = _export(tiny_model, scheme, tmp_path / scheme)
    runner = open_mlc_runner(art)
    assert any("weight-level" in n for n in runner.notes)
    assert any("latency" in n for n in runner.notes)
    ids = list(range(3, 40))
    got = runner.logits(ids)
    want = build_reference(tiny_model.spec, source=tiny_model.weights).logits(ids).numpy()
    bound = {"q0f32": 0.05, "q0f16": 0.02}.get(scheme, 3.0)
    assert got.shape == want.shape and np.abs(got - want).max() < bound
    if scheme.startswith("q0"):
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
    else:  # a random tiny model's logits are flat: check they still follow the reference
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.8


def test_search_lowers_error_on_tiny(tiny_model, tmp_path: Path) -> None:
    from smolconvert.model.reference import build_reference
    from smolconvert.validators.mlc import open_mlc_runner

    ids = list(range(3, 60))
    ref = torch.log_softmax(
        build_reference(tiny_model.spec, source=tiny_model.weights).logits(ids), -1
    )
    kld = {}
    for mode in group.SCALE_MODES:
        art = _export(tiny_model, "q4f16_1", tmp_path / mode, mode)
        assert art.meta["options"]["mlc_scales"] == mode
        got = torch.log_softmax(torch.from_numpy(open_mlc_runner(art).logits(ids)), -1)
        kld[mode] = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kld["search"] < kld["mlc"]


def test_artifact_meta_and_chat_config(tiny_model, tmp_path: Path) -> None:
    a = _export(tiny_model, "q4f16_1", tmp_path / "a")
    b = _export(tiny_model, "q4f16_1", tmp_path / "b")
    files_a = {f["path"]: f["sha256"] for f in a.meta["files"]}
    assert files_a == {f["path"]: f["sha256"] for f in b.meta["files"]}  # deterministic
    assert "mlc-llm @" in a.meta["layout"] and a.meta["mlc_scales"]["mode"] == "mlc"
    assert a.meta["entry_points"]["model"] == "mlc-chat-config.json"
    chat = json.loads((a.folder / "mlc-chat-config.json").read_text())
    spec = tiny_model.spec
    assert chat["model_type"] == "llama" and chat["quantization"] == "q4f16_1"
    assert chat["model_config"]["num_key_value_heads"] == spec.n_kv_heads
    assert chat["vocab_size"] == spec.vocab_size
    assert chat["conv_template"]["name"] == "chatml_nosystem"
    for f in chat["tokenizer_files"]:
        assert (a.folder / f).is_file()
    # TVM's shard rule: md5 of each shard as recorded.
    import hashlib

    for shard in read_json(a.folder / "tensor-cache.json")["records"]:
        data = (a.folder / shard["dataPath"]).read_bytes()
        assert hashlib.md5(data).hexdigest() == shard["md5sum"] and len(data) == shard["nbytes"]


def test_shard_rule_matches_tvm(tmp_path: Path) -> None:
    require_module("tvm", "mlc")
    from tvm.contrib import tvmjs

    rng = np.random.default_rng(0)
    params = {
        "a": rng.standard_normal((300, 1000)).astype(np.float32),
        "b": rng.integers(0, 2**31, (700, 1000)).astype(np.uint32),
        "c": rng.standard_normal((100, 100)).astype(np.float16),
        "d": rng.standard_normal((1200, 1000)).astype(np.float16),
    }
    cap_mb = 4
    tvmjs.dump_tensor_cache(params, str(tmp_path / "tvm"), shard_cap_mb=cap_mb, show_progress=False)
    ours = tmp_path / "ours"
    ours.mkdir()
    writer = mlc.TensorCacheWriter(ours, cap=cap_mb << 20)
    for k, v in params.items():
        writer.add(k, v)
    writer.finish(total_params=1)
    want = read_json(tmp_path / "tvm" / "tensor-cache.json")["records"]
    assert read_json(ours / "tensor-cache.json")["records"] == want
    for shard in want:
        assert (ours / shard["dataPath"]).read_bytes() == (
            tmp_path / "tvm" / shard["dataPath"]
        ).read_bytes()


def test_smollm3_is_unsupported(tmp_path: Path) -> None:
    import smolconvert

    folder = tiny.write_folder(tmp_path / "tiny-smollm3", tiny.config("smollm3"))
    with pytest.raises(UnsupportedError, match="SmolLM3|smollm3"):
        _export(smolconvert.load(str(folder)), "q4f16_1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reaches_export(tiny_model, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "export",
            tiny_model.source,
            "--to",
            "mlc:q3f16_1",
            "-o",
            str(tmp_path / "o"),
            "--mlc-scales",
            "search",
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "o" / "artifact.json")["options"] == {"mlc_scales": "search"}


@pytest.mark.slow
def test_default_model_q4f16_1_is_mlc_bit_identical(default_model, tmp_path: Path) -> None:
    """The embedded model: TVM reads every tensor, and a layer's words and scales equal MLC's
    quantize function compiled by TVM (tests/quantizers/test_group.py's oracle)."""
    require_module("tvm", "mlc")
    from tests.quantizers.test_group import _tvm_mlc

    art = _export(default_model, "q4f16_1", tmp_path / "q4")
    loaded = _tvm_load(art.folder)
    params = mlc_layout.plan(default_model.spec, "q4f16_1")
    assert [(k, tuple(v.shape), str(v.dtype)) for k, v in loaded.items()] == [
        (p.name, p.shape, p.dtype) for p in params
    ]
    cfg = group.GROUP_CONFIGS["q4f16_1"]
    last = default_model.spec.n_layers - 1
    wanted = (
        "model.embed_tokens.q_weight",
        "model.layers.0.self_attn.qkv_proj.q_weight",
        f"model.layers.{last}.mlp.down_proj.q_weight",
    )
    for p in params:
        if p.name not in wanted:
            continue
        w = np.concatenate([default_model.weights.get(s).float().numpy() for s in p.sources])
        tw, ts, _ = _tvm_mlc(w[:4096], cfg)
        base = p.name.removesuffix(".q_weight")
        assert np.array_equal(loaded[p.name][:4096], tw), p.name
        assert np.array_equal(loaded[f"{base}.q_scale"][:4096], ts), p.name


def test_search_with_imatrix_is_recorded_and_changes_scales(tiny_model, tmp_path: Path) -> None:
    from smolconvert.model.imatrix import Imatrix
    from smolconvert.model.weights import canonical_names, expected_shape

    spec = tiny_model.spec
    rng = np.random.default_rng(0)
    values = {
        n: rng.uniform(0.01, 10.0, expected_shape(spec, n)[-1]).astype(np.float32)
        for n in canonical_names(spec)
        if len(expected_shape(spec, n)) == 2
    }
    imatrix = Imatrix(values, "synthetic", "0" * 64, 0, 1, 1)
    family = FAMILIES["mlc"]
    plain = family.export(tiny_model, "q4f16_1", tmp_path / "p", options={"mlc_scales": "search"})
    weighted = family.export(
        tiny_model, "q4f16_1", tmp_path / "w", imatrix=imatrix, options={"mlc_scales": "search"}
    )
    assert weighted.meta["imatrix"]["text_name"] == "synthetic"
    assert "imatrix-weighted" in weighted.meta["mlc_scales"]["rule"]
    assert plain.meta["imatrix"] is None
    a, b = _tvm_load(plain.folder), _tvm_load(weighted.folder)
    assert not np.array_equal(
        a["model.layers.0.mlp.down_proj.q_scale"], b["model.layers.0.mlp.down_proj.q_scale"]
    )


# --- determinism across processes (issue 23) ------------------------------------------------------


def test_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("llama"))
    assert_exports_identical(folder, tmp_path, to="mlc:q4f16_1", options={"mlc_scales": "search"})


# --- streaming export (issue 18, scale) -----------------------------------------------------------


def _file_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("scheme", "mode"), [("q4f16_1", "search"), ("q4f32_1", "mlc"), ("q0f32", "mlc")]
)
def test_row_blocks_write_the_same_bytes_as_whole_tensors(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, mode: str
) -> None:
    monkeypatch.setattr(mlc, "BLOCK_ELEMENTS", 1 << 30)  # every tensor in one block
    whole = _file_hashes(_export(tiny_model, scheme, tmp_path / "whole", mode).folder)
    monkeypatch.setattr(mlc, "BLOCK_ELEMENTS", 100)  # one or two rows per block
    assert _file_hashes(_export(tiny_model, scheme, tmp_path / "rows", mode).folder) == whole


def test_chunked_writer_matches_tvm_shards(tmp_path: Path) -> None:
    """Tensors given in row blocks shard and hash as TVM's dump of the whole tensors, including
    a lone big tensor that takes its shard number before the open shard is committed."""
    require_module("tvm", "mlc")
    from tvm.contrib import tvmjs

    rng = np.random.default_rng(1)
    params = {
        "a": rng.standard_normal((300, 1000)).astype(np.float32),
        "big": rng.integers(0, 2**31, (700, 1000)).astype(np.uint32),
        "c": rng.standard_normal((100, 100)).astype(np.float16),
        "d": rng.standard_normal((1200, 1000)).astype(np.float16),
        "e": rng.standard_normal((10,)).astype(np.float32),
    }
    tvmjs.dump_tensor_cache(params, str(tmp_path / "tvm"), shard_cap_mb=4, show_progress=False)
    ours = tmp_path / "ours"
    ours.mkdir()
    writer = mlc.TensorCacheWriter(ours, cap=4 << 20)
    for k, v in params.items():
        writer.add_chunks(k, v.shape, str(v.dtype), (v[r : r + 7] for r in range(0, len(v), 7)))
    writer.finish(total_params=1)
    want = read_json(tmp_path / "tvm" / "tensor-cache.json")["records"]
    assert read_json(ours / "tensor-cache.json")["records"] == want
    assert sorted(p.name for p in ours.iterdir() if p.name.endswith(".bin")) == sorted(
        s["dataPath"] for s in want
    )
    assert not [p for p in ours.iterdir() if p.name.endswith(".tmp")]
    for shard in want:
        assert (ours / shard["dataPath"]).read_bytes() == (
            tmp_path / "tvm" / shard["dataPath"]
        ).read_bytes()


def test_export_holds_blocks_not_whole_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python-side memory (numpy, traced) during an export stays well under one fp32 copy of the
    embedding table: the quantizer's ~6x-the-tensor float32 temporaries were the peak before."""
    import tracemalloc

    import smolconvert

    cfg = tiny.config(
        "llama",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = smolconvert.load(str(tiny.write_folder(tmp_path / "wide-vocab", cfg)))
    embed_fp32 = 8192 * 512 * 4
    monkeypatch.setattr(mlc, "BLOCK_ELEMENTS", 1 << 16)
    for scheme in ("q4f16_1", "q0f32"):
        tracemalloc.start()
        try:
            _export(model, scheme, tmp_path / scheme)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # ~8 MiB of it is artifact.json's file hashing (4 MiB reads), whatever the model size.
        assert peak < embed_fp32, (scheme, peak, embed_fp32)
