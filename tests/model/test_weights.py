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
