"""Weight sources: safetensors (single, sharded), pickle opt-in, and GGUF import incl. Q/K order."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from smolconvert.errors import CorruptFileError, UnsupportedError
from smolconvert.model.reference import build_reference
from smolconvert.model.source import load_model
from smolconvert.model.spec import ModelSpec
from tests import tiny


def test_safetensors_folder_loads_every_tensor_lazily(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    model = load_model(tiny.write_folder(tmp_path / "m", cfg, tensors=tensors))
    assert sorted(model.weights.names()) == sorted(tensors)
    for name, value in tensors.items():
        assert torch.equal(model.weights.get(name), value)
    assert len(model.sha256) == 64


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_safetensors_reads_every_dtype_into_buffers_of_its_own(tmp_path: Path) -> None:
    """Every dtype and an empty tensor read back exactly; reading leaves no file pages in the
    process's RSS (safetensors' get_tensor keeps its memory map resident: docs/scaling.md)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from smolconvert.model.weights import SafetensorsSource

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 7, generator=gen).to(torch.float16),
        "f32": torch.randn(4, generator=gen),
        "f64": torch.randn(2, 2, generator=gen).double(),
        "i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(2048, 4096, generator=gen),  # 32 MB
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = SafetensorsSource(tmp_path)
    before = _rss_file_kb()
    for name, value in tensors.items():
        got = source.get(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert torch.equal(got, value), name
    grown_mb = (_rss_file_kb() - before) / 1024
    assert grown_mb < 8, f"reading 32 MB left {grown_mb:.0f} MB of the file in RSS"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(source.get("big"), handle.get_tensor("big"))


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=tensors)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].to(torch.bfloat16) for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(folder)
    assert model.weights.storage_type(names[0]) == "BF16"
    for name, value in tensors.items():
        assert torch.equal(model.weights.get(name), value.to(torch.bfloat16))


def test_missing_and_stray_tensors_are_listed(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=tensors)
    with pytest.raises(CorruptFileError) as e:
        load_model(folder)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "model.layers.0.self_attn.q_proj.bias" in str(e.value)


def test_pickle_checkpoints_need_opt_in(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=tensors)
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedError, match="allow-pickle"):
        load_model(folder)
    model = load_model(folder, allow_pickle=True)
    assert torch.equal(model.weights.get("model.norm.weight"), tensors["model.norm.weight"])


# --- GGUF import -------------------------------------------------------------------------------


def llama_cpp_row_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Oracle, written from llama.cpp's convention rather than our code: within each head of D
    rows, GGUF row 2i+s holds Hugging Face row s*D/2 + i."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            for s in (0, 1):
                out[h * d + 2 * i + s] = w[h * d + s * d // 2 + i]
    return out


def write_gguf(
    path: Path,
    cfg: dict,
    tensors: dict[str, torch.Tensor],
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> None:
    """A GGUF as llama.cpp's converter lays it out, written with the gguf library."""
    spec = ModelSpec.from_config(cfg)
    arch = spec.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    tok = json.loads(tiny.tokenizer_json())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in tensors.items():
        if name in names:
            gname = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{block[rest.removesuffix('.weight')]}.weight"
        a = value.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_row_order(a, spec.n_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_row_order(a, spec.n_kv_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_gguf_import_restores_values_and_row_order(tmp_path: Path, arch: str) -> None:
    cfg = tiny.config(arch)
    tensors = tiny.state_dict(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, tensors)
    model = load_model(tmp_path / "m.gguf")
    want = ModelSpec.from_config(cfg)
    for field in (
        "architecture",
        "n_layers",
        "hidden_size",
        "intermediate_size",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "vocab_size",
        "rope_theta",
        "tie_word_embeddings",
        "rope_layers",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(model.spec, field) == getattr(want, field), field
    assert model.spec.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as f32
    assert sorted(model.weights.names()) == sorted(tensors)
    for name, value in tensors.items():
        assert torch.equal(model.weights.get(name), value), name


def test_gguf_import_runs_like_transformers(tmp_path: Path) -> None:
    """End to end: the imported GGUF, run by the reference decoder, gives transformers' logits."""
    cfg = tiny.config("llama")
    hf = tiny.hf_model(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, hf.state_dict())
    model = load_model(tmp_path / "m.gguf")
    ours = build_reference(model.spec, source=model.weights)
    ids = torch.randint(0, tiny.VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert (ours.logits(ids[0].tolist()) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "qtype",
    [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1],
)
def test_gguf_import_of_quantized_types(tmp_path: Path, qtype) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, tensors, qtype)
    model = load_model(tmp_path / "m.gguf")
    q = model.weights.get("model.layers.0.self_attn.q_proj.weight")
    original = tensors["model.layers.0.self_attn.q_proj.weight"]
    rel = ((q - original).norm() / original.norm()).item()
    assert model.weights.storage_type("model.layers.0.self_attn.q_proj.weight") == qtype.name
    assert rel < {"F16": 1e-3, "Q8_0": 1e-2, "Q4_1": 0.15}[qtype.name]
    # the quantization error is spread evenly over heads: a wrong row order would not be
    assert rel > 0 and ((q - original).abs().mean(1) < 0.05).all()


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(CorruptFileError, match="not a readable GGUF"):
        load_model(bad)


# --- shapes, dtypes and values checked before export -------------------------------------------


def test_transposed_tensor_with_the_right_element_count_is_refused(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    gate = "model.layers.0.mlp.gate_proj.weight"
    tensors[gate] = tensors[gate].T.contiguous()  # [64, 128]: same 8192 values as [128, 64]
    down = "model.layers.1.mlp.down_proj.weight"
    tensors[down] = tensors[down].reshape(128, 64).contiguous()
    with pytest.raises(CorruptFileError) as e:
        load_model(tiny.write_folder(tmp_path / "m", cfg, tensors=tensors))
    message = str(e.value)
    assert f"{gate} is [64, 128], expected [128, 64] (intermediate_size, hidden_size)" in message
    assert f"{down} is [128, 64], expected [64, 128]" in message
    assert "shapes that differ from the config's in 2 tensors:" in message and "\n" not in message


@pytest.mark.parametrize(
    ("field", "value", "wrong"),
    [
        ("head_dim", 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("num_key_value_heads", 4, ["k_proj", "v_proj"]),
    ],
)
def test_config_that_disagrees_with_the_tensors_lists_them(
    tmp_path: Path, field: str, value: int, wrong: list[str]
) -> None:
    """Tensors of the tiny model (head_dim 16, 2 KV heads) under a config claiming otherwise:
    one error naming every tensor, not an AssertionError inside the reference decoder."""
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    folder = tiny.write_folder(tmp_path / "m", {**cfg, field: value}, tensors=tensors)
    with pytest.raises(CorruptFileError) as e:
        load_model(folder)
    message = str(e.value)
    assert f"shapes that differ from the config's in {len(wrong) * 2} tensors:" in message
    for layer in (0, 1):
        for proj in wrong:
            assert f"model.layers.{layer}.self_attn.{proj}.weight is [" in message
    assert "*head_dim" in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.uint8])
def test_integer_weights_are_refused_not_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(128, 64, dtype=dtype)
    tensors["model.norm.weight"] = torch.ones(64, dtype=dtype)
    with pytest.raises(CorruptFileError) as e:
        load_model(tiny.write_folder(tmp_path / "m", cfg, tensors=tensors))
    stored = {torch.int32: "I32", torch.int8: "I8", torch.bool: "BOOL", torch.uint8: "U8"}[dtype]
    assert "not stored as floats: 2 tensors," in str(e.value)
    assert f"model.layers.0.mlp.up_proj.weight ({stored})" in str(e.value)
    assert f"model.norm.weight ({stored})" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_are_accepted(tmp_path: Path, dtype: torch.dtype) -> None:
    cfg = tiny.config("llama")
    tensors = {k: v.to(dtype) for k, v in tiny.state_dict(cfg).items()}
    model = load_model(tiny.write_folder(tmp_path / "m", cfg, tensors=tensors))
    ref = build_reference(model.spec, source=model.weights)
    assert torch.isfinite(ref.logits([1, 2, 3])).all()


def test_gguf_shape_mismatches_are_all_listed(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    tensors = tiny.state_dict(cfg)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        tensors[name] = tensors[name].T.contiguous()
    write_gguf(tmp_path / "m.gguf", cfg, tensors)
    with pytest.raises(CorruptFileError) as e:
        load_model(tmp_path / "m.gguf")
    assert "shapes that differ from the config's in 2 tensors:" in str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight is [64, 128]" in str(e.value)
    assert "model.layers.1.mlp.up_proj.weight is [64, 128]" in str(e.value)


def with_non_finite(cfg: dict) -> dict[str, torch.Tensor]:
    tensors = tiny.state_dict(cfg)
    tensors["model.layers.0.mlp.gate_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.post_attention_layernorm.weight"][7] = float("inf")
    tensors["model.norm.weight"][0] = float("-inf")
    return tensors


@pytest.mark.parametrize("to", ["gguf:f32", "gguf:f16"])
def test_export_refuses_non_finite_weights_and_names_them(tmp_path: Path, to: str) -> None:
    import smolconvert

    cfg = tiny.config("llama")
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=with_non_finite(cfg))
    with pytest.raises(CorruptFileError) as e:
        smolconvert.export(folder, to=to, out=tmp_path / "out")
    message = str(e.value)
    assert "NaN or infinite values in 3 tensors:" in message
    assert "model.layers.0.mlp.gate_proj.weight (1 NaN, 0 Inf of 8192)" in message
    assert "model.layers.1.post_attention_layernorm.weight (0 NaN, 1 Inf of 64)" in message
    assert "model.norm.weight (0 NaN, 1 Inf of 64)" in message
    assert "--allow-nonfinite" in message
    assert not (tmp_path / "out").exists()
    art = smolconvert.export(folder, to=to, out=tmp_path / "out", allow_nonfinite=True)
    assert (art.folder / "artifact.json").is_file()


def test_cli_allow_nonfinite(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    cfg = tiny.config("llama")
    folder = tiny.write_folder(tmp_path / "m", cfg, tensors=with_non_finite(cfg))
    out = tmp_path / "out"
    refused = CliRunner().invoke(cli, ["export", str(folder), "--to", "gguf:f32", "-o", str(out)])
    assert refused.exit_code == 2
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "model.norm.weight" in refused.stderr
    allowed = CliRunner().invoke(
        cli, ["export", str(folder), "--to", "gguf:f32", "-o", str(out), "--allow-nonfinite"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert (out / "artifact.json").is_file()


def test_non_finite_values_in_a_gguf_source_are_named(tmp_path: Path) -> None:
    from smolconvert.model.weights import check_finite

    cfg = tiny.config("llama")
    write_gguf(tmp_path / "m.gguf", cfg, with_non_finite(cfg), gguf.GGMLQuantizationType.F16)
    model = load_model(tmp_path / "m.gguf")
    with pytest.raises(CorruptFileError, match="NaN or infinite values in 3 tensors") as e:
        check_finite(model.weights, model.spec)
    assert "model.layers.0.mlp.gate_proj.weight (1 NaN" in str(e.value)
    clean = tmp_path / "clean.gguf"
    write_gguf(clean, cfg, tiny.state_dict(cfg), gguf.GGMLQuantizationType.F16)
    check_finite(load_model(clean).weights, load_model(clean).spec)


def test_large_finite_values_are_not_mistaken_for_infinities(tmp_path: Path) -> None:
    """The check sums each tensor first; a sum that overflows float16 must not be a refusal."""
    from smolconvert.model.weights import check_finite

    cfg = tiny.config("llama")
    tensors = {k: v.half() for k, v in tiny.state_dict(cfg).items()}
    tensors["model.embed_tokens.weight"].fill_(60000.0)  # finite in f16; the sum is not
    tensors["model.norm.weight"][:2] = torch.tensor([float("inf"), float("-inf")])
    model = load_model(tiny.write_folder(tmp_path / "m", cfg, tensors=tensors))
    with pytest.raises(CorruptFileError) as e:
        check_finite(model.weights, model.spec)
    assert "NaN or infinite values in 1 tensor:" in str(
        e.value
    ) and "model.norm.weight (0 NaN, 2 Inf of 64)" in str(e.value)


def test_index_shard_names_cannot_leave_the_folder(tmp_path: Path) -> None:
    cfg = tiny.config("llama")
    folder = tiny.write_folder(tmp_path / "m", cfg)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    names = list(tiny.state_dict(cfg))
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../outside.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="shard names must be file names"):
        load_model(folder)
