"""Folders laid out as the published SmolLM checkpoints, with their files' quirks, at any size.

The config.json, tokenizer_config.json and generation_config.json contents below are the
published ones (field for field, including the keys transformers does not define); only the shape
fields change when a folder is written at tiny size. Tokenizers are small trained byte-level BPEs
padded to the published vocabulary sizes, with the published special tokens at the published ids,
pre-tokenizers and post-processors. Weights are seeded random bf16, single-file or sharded with an
index as on the Hub. The scaling benchmark writes the same folders at full size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SMOLLM2_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM3's ids 128000-128255 (Llama 3's reserved block, partly renamed); special=False ones are
# the reasoning and tool markers, as its tokenizer_config.json says.
SMOLLM3_NAMED = {
    128000: ("<|begin_of_text|>", True),
    128001: ("<|end_of_text|>", True),
    128002: ("<think>", False),
    128003: ("</think>", False),
    128004: ("<|finetune_right_pad_id|>", True),
    128011: ("<|im_start|>", True),
    128012: ("<|im_end|>", True),
    128013: ("<tool_call>", False),
    128014: ("</tool_call>", False),
    128015: ("<code>", False),
    128016: ("</code>", False),
}
# The shape of SmolLM3's chat_template.jinja (a file of its own, not in tokenizer_config.json):
# a system block with reasoning mode flags, then ChatML turns.
SMOLLM3_TEMPLATE = (
    "{%- set reasoning_mode = '/think' -%}\n"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- if '/no_think' in system -%}{%- set reasoning_mode = '/no_think' -%}{%- endif -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}\n"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nReasoning Mode: ' + reasoning_mode + "
    "'\\n\\n## Custom Instructions\\n\\n' + system + '<|im_end|>\\n' -}}\n"
    "{%- for message in messages -%}{%- if message['role'] != 'system' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if reasoning_mode == '/no_think' -%}{{- '<think>\\n\\n</think>\\n' -}}{%- endif -%}"
    "{%- endif -%}\n"
)

_TJS = {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}}
_SMOLLM2_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 49152,
    "transformers.js_config": _TJS,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "SmolLM-135M": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 576,
        "initializer_range": 0.02,
        "intermediate_size": 1536,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.42.3",
        "use_cache": True,
        "vocab_size": 49152,
    },
    "SmolLM2-135M": {
        **{k: v for k, v in _SMOLLM2_BASE.items() if k not in ("pad_token_id", "mlp_bias")},
        "bos_token_id": 0,
        "eos_token_id": 0,
        "transformers_version": "4.40.1",
    },
    "SmolLM2-135M-Instruct": dict(_SMOLLM2_BASE),
    "SmolLM2-360M-Instruct": {
        **_SMOLLM2_BASE,
        "hidden_size": 960,
        "initializer_range": 0.02,
        "intermediate_size": 2560,
        "num_attention_heads": 15,
        "num_hidden_layers": 32,
        "num_key_value_heads": 5,
    },
    "SmolLM2-1.7B-Instruct": {
        **{
            k: v
            for k, v in _SMOLLM2_BASE.items()
            if k not in ("is_llama_config", "rope_interleaved")
        },
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_hidden_layers": 24,
        "num_key_value_heads": 32,
        "rope_theta": 130000,
        "transformers.js_config": {
            "dtype": "q4",
            **_TJS,
            "use_external_data_format": {"model.onnx": True, "model_fp16.onnx": True},
        },
    },
    "SmolLM3-3B": {
        "architectures": ["SmolLM3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128012,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "layer_types": ["full_attention"] * 36,
        "max_position_embeddings": 65536,
        "max_window_layers": 28,
        "mlp_bias": False,
        "model_type": "smollm3",
        "no_rope_layer_interval": 4,
        "no_rope_layers": [1, 1, 1, 0] * 9,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 4,
        "pad_token_id": 128004,
        "pretraining_tp": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 5000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0.dev0",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": 128256,
    },
}
# Which tokenizer files each checkpoint ships, and whether its weights are sharded on the Hub.
TOKENIZERS = {
    "SmolLM-135M": "smollm2-base",
    "SmolLM2-135M": "smollm2-base",
    "SmolLM2-135M-Instruct": "smollm2-instruct",
    "SmolLM2-360M-Instruct": "smollm2-instruct",
    "SmolLM2-1.7B-Instruct": "smollm2-instruct",
    "SmolLM3-3B": "smollm3",
}
SHARDS = {"SmolLM3-3B": 2}
GENERATION = {
    "smollm2-base": {"bos_token_id": 0, "eos_token_id": 0, "transformers_version": "4.40.1"},
    "smollm2-instruct": {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "transformers_version": "4.42.3",
    },
    "smollm3": {
        "bos_token_id": 128000,
        "eos_token_id": 128012,
        "pad_token_id": 128004,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "4.54.0.dev0",
    },
}

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


def tiny_config(name: str) -> dict[str, Any]:
    """The published config with only the shape fields made tiny (every other field kept)."""
    cfg = json.loads(json.dumps(CONFIGS[name]))
    mha = cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    layers = 4 if cfg["model_type"] == "smollm3" else 2
    cfg.update(TINY, num_hidden_layers=layers, num_key_value_heads=4 if mha else 2)
    if cfg["model_type"] == "smollm3":
        cfg["num_key_value_heads"] = 1  # 16 / 4 heads in the real model: groups of 4
        cfg["no_rope_layers"] = [1, 1, 1, 0]
        cfg["layer_types"] = ["full_attention"] * layers
        cfg["max_window_layers"] = 3
    return cfg


def write_published(
    folder: Path, name: str, *, size: str = "tiny", seed: int = 0, std: float = 0.08
) -> Path:
    """Write `name` as published (config, tokenizer files, bf16 safetensors) into `folder`."""
    cfg = tiny_config(name) if size == "tiny" else json.loads(json.dumps(CONFIGS[name]))
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / "config.json", cfg)
    write_tokenizer_files(folder, TOKENIZERS[name])
    write_weights(folder, cfg, shards=SHARDS.get(name, 1), seed=seed, std=std)
    return folder


def write_tokenizer_files(folder: Path, kind: str) -> None:
    tree, config = _tokenizer(kind)
    (folder / "tokenizer.json").write_text(tree, encoding="utf-8")
    _dump(folder / "tokenizer_config.json", config)
    _dump(folder / "generation_config.json", GENERATION[kind])
    if kind == "smollm3":
        (folder / "chat_template.jinja").write_text(SMOLLM3_TEMPLATE, encoding="utf-8")
    else:
        specials = {"bos_token": config["bos_token"], "eos_token": config["eos_token"]}
        specials["unk_token"] = config["unk_token"]
        if "pad_token" in config:
            specials["pad_token"] = config["pad_token"]
        _dump(folder / "special_tokens_map.json", specials)


def canonical_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    from smolconvert.model.spec import ModelSpec
    from smolconvert.model.weights import canonical_names, expected_shape

    spec = ModelSpec.from_config(cfg)
    for name in canonical_names(spec):
        yield name, expected_shape(spec, name)


def write_weights(
    folder: Path, cfg: dict[str, Any], *, shards: int = 1, seed: int = 0, std: float = 0.08
) -> None:
    """Seeded random bf16 weights; with shards > 1, `model-0000i-of-0000n.safetensors` files of
    about equal size plus model.safetensors.index.json, one shard in memory at a time."""
    from safetensors.torch import save_file

    shapes = list(canonical_shapes(cfg))
    total = sum(2 * _numel(s) for _, s in shapes)
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    done_bytes = 0
    index = 1

    def flush() -> None:
        nonlocal pending, index
        file = (
            "model.safetensors" if shards == 1 else f"model-{index:05d}-of-{shards:05d}.safetensors"
        )
        save_file(pending, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(pending, file))
        pending, index = {}, index + 1

    for name, shape in shapes:
        if len(shape) == 1:
            t = 0.5 + torch.rand(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * std
        pending[name] = t.to(torch.bfloat16)
        done_bytes += 2 * _numel(shape)
        if index < shards and done_bytes >= total * index / shards:
            flush()
    flush()
    if shards > 1:
        _dump(
            folder / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@lru_cache(maxsize=4)
def _tokenizer(kind: str) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json) for a SmolLM2 or SmolLM3-shaped tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    smollm3 = kind == "smollm3"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[] if smollm3 else list(SMOLLM2_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    tree = json.loads(tok.to_str())
    vocab = tree["model"]["vocab"]
    # Pad to the published size with tokens no pre-tokenized word can equal ("<" and digits are
    # always split apart), so they never change how text is tokenized.
    size = 128000 if smollm3 else 49152
    for i in range(len(vocab), size):
        vocab[f"<f{i}>"] = i
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False)
    if smollm3:
        named = {
            i: SMOLLM3_NAMED.get(i, (f"<|reserved_special_token_{i - 128000}|>", True))
            for i in range(128000, 128256)
        }
        added = [
            {"id": i, "content": text, "special": special, **flags}
            for i, (text, special) in named.items()
        ]
        tree["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {
                        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                    },
                    "behavior": "Isolated",
                    "invert": False,
                },
                _byte_level(False, True, False),
            ],
        }
        tree["model"]["ignore_merges"] = True
    else:
        added = [
            {"id": i, "content": t, "special": True, **flags}
            for i, t in enumerate(SMOLLM2_SPECIALS)
        ]
        tree["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                _byte_level(False, True, True),
            ],
        }
    tree["added_tokens"] = added
    tree["normalizer"] = None
    tree["post_processor"] = _byte_level(True, False, True)
    tree["decoder"] = _byte_level(True, True, True)
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    if kind == "smollm3":
        config: dict[str, Any] = {
            "added_tokens_decoder": decoder,
            "bos_token": None,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|im_end|>",
            "extra_special_tokens": {},
            "fast": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "pad_token": "<|im_end|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    elif kind == "smollm2-instruct":
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": "<|im_start|>",
            "chat_template": SMOLLM2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": 8192,
            "pad_token": "<|im_end|>",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
            "vocab_size": 49152,
        }
    else:
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": list(SMOLLM2_SPECIALS),
            "bos_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "model_max_length": 8192,
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
            "vocab_size": 49152,
        }
    return json.dumps(tree, ensure_ascii=False), config


def _byte_level(prefix: bool, trim: bool, regex: bool) -> dict[str, Any]:
    return {
        "type": "ByteLevel",
        "add_prefix_space": prefix,
        "trim_offsets": trim,
        "use_regex": regex,
    }
