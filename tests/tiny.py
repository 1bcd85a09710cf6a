"""Seeded tiny random Llama-shaped models, written as real Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 320


def config(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "SmolLM3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2 if arch == "llama" else 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": arch == "smollm3",
        "rope_theta": 10000.0 if arch == "llama" else 100000.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
    }
    if arch == "smollm3":
        cfg["no_rope_layers"] = [1, 1, 1, 0]
    cfg.update(overrides)
    return cfg


def hf_model(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """transformers' own model for `cfg`, with seeded weights large enough to matter."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in cfg.items() if k != "architectures"}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded canonical tensors without transformers (for tests that need no oracle)."""
    from smolconvert.model.spec import ModelSpec
    from smolconvert.model.weights import canonical_names, expected_shape

    spec = ModelSpec.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in canonical_names(spec):
        shape = expected_shape(spec, name)
        if len(shape) == 1:
            out[name] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * 0.08
    return out


def tokenizer_json() -> str:
    """A byte-level BPE tokenizer with VOCAB tokens, trained on CPython's docs (deterministic)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [topics[k] for k in sorted(topics)[:20]]
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def write_folder(
    folder: Path, cfg: dict[str, Any], seed: int = 0, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = tensors if tensors is not None else state_dict(cfg, seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                "{% endfor %}",
            }
        )
    )
    return folder
