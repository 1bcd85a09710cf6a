"""ModelSpec: the one place that reads config.json.

Every size the rest of smolconvert uses comes from here. Both transformers 4.x and 5.x spellings are
accepted (`rope_theta` at top level or inside `rope_parameters`), and every field that changes the
math but is not implemented (rope scaling, biases, sliding windows, other activations) is
refused, never silently ignored: a quietly dropped config field is the commonest way a converted
model goes wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError, UnsupportedError

ARCHITECTURES = ("llama", "smollm3")

# Fields that never change the forward pass; everything not listed here or handled below is refused.
_HARMLESS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tokenizer_class",
        "pretraining_tp",
        "layer_types",
        "no_rope_layer_interval",
        "tie_word_embeddings",
        "max_position_embeddings",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "no_rope_layers",
        "max_window_layers",
        "tf_legacy_loss",
        "use_bfloat16",
        "torchscript",
        "pruned_heads",
        "task_specific_params",
        "finetuning_task",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "is_decoder",
        "chat_template",
        "quantization_config_comment",
        "base_model_tp_plan",
        "base_model_pp_plan",
        "unsloth_version",
        "_attn_implementation_autoset",
        "embedding_multiplier_comment",
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and constants of a Llama-shaped decoder; rope_layers[i] is False on no-RoPE layers."""

    architecture: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_layers: tuple[bool, ...]
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def n_params(self) -> int:
        """Parameter count with a tied embedding counted once."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rope_layers"] = list(self.rope_layers)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{path} holds a JSON {type(config).__name__}, expected an object")
        return cls.from_config(config, origin=str(path))

    @classmethod
    def from_config(cls, config: dict[str, Any], origin: str = "config.json") -> ModelSpec:
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedError(
                f"{origin}: model_type {model_type!r} is not supported; "
                f"expected one of {', '.join(ARCHITECTURES)} (Llama-shaped decoders)"
            )
        problems = _refusals(config)
        if problems:
            raise UnsupportedError(f"{origin}: " + "; ".join(problems))
        n_layers = _int(config, "num_hidden_layers", origin)
        hidden = _int(config, "hidden_size", origin)
        n_heads = _int(config, "num_attention_heads", origin)
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        head_dim = int(config.get("head_dim") or hidden // n_heads)
        if n_heads % n_kv:
            raise ConfigError(
                f"{origin}: num_attention_heads {n_heads} is not a multiple of "
                f"num_key_value_heads {n_kv}"
            )
        if head_dim % 2:
            raise ConfigError(f"{origin}: head_dim {head_dim} is odd; RoPE needs an even head_dim")
        return cls(
            architecture=model_type,
            n_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size", origin),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=_int(config, "vocab_size", origin),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(config, origin),
            max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type == "smollm3")),
            rope_layers=_rope_layers(config, model_type, n_layers, origin),
            bos_token_id=_token_id(config.get("bos_token_id")),
            eos_token_id=_token_id(config.get("eos_token_id")),
            pad_token_id=_token_id(config.get("pad_token_id")),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json that transformers (4.x and 5.x) reads back into the same model."""
        config: dict[str, Any] = {
            "architectures": [
                "LlamaForCausalLM" if self.architecture == "llama" else "SmolLM3ForCausalLM"
            ],
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            # Both spellings, so neither transformers 4.x nor 5.x falls back to theta 10000.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.architecture == "smollm3":
            config["no_rope_layers"] = [int(r) for r in self.rope_layers]
            config["use_sliding_window"] = False
            config["sliding_window"] = None
        return config


def _int(config: dict[str, Any], key: str, origin: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{origin}: {key} must be a positive integer, got {value!r}")
    return value


def _token_id(value: Any) -> int | None:
    if isinstance(
        value, list
    ):  # generation configs may list several eos ids; the first is canonical
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _rope_theta(config: dict[str, Any], origin: str) -> float:
    params = config.get("rope_parameters") or {}
    nested = params.get("rope_theta") if isinstance(params, dict) else None
    top = config.get("rope_theta")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ConfigError(
            f"{origin}: rope_theta {top} disagrees with rope_parameters.rope_theta {nested}; "
            "fix config.json so both say the same"
        )
    theta = nested if nested is not None else top
    if theta is None:
        # transformers' own default for both architectures; said here, never assumed elsewhere.
        theta = 10000.0 if config["model_type"] == "llama" else 2000000.0
    if float(theta) <= 0:
        raise ConfigError(f"{origin}: rope_theta must be positive, got {theta}")
    return float(theta)


def _refusals(config: dict[str, Any]) -> list[str]:
    problems = []
    unknown = sorted(k for k in config if k not in _HARMLESS)
    if unknown:
        problems.append(
            f"unknown config field(s) {', '.join(unknown)}; smolconvert refuses fields it does not "
            "understand because they may change the model's math"
        )
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind != "default":
                problems.append(f"{key} of type {kind!r} is not supported (only plain RoPE)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}=true is not supported (Llama-shaped decoders have no biases)")
    # SmolLM3 configs carry `sliding_window`; transformers applies it only with use_sliding_window.
    window = (
        config.get("use_sliding_window")
        if config["model_type"] == "smollm3"
        else (config.get("sliding_window") is not None)
    )
    if window:
        problems.append("sliding-window attention is not supported")
    layer_types = config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types other than full_attention are not supported: {layer_types}")
    if int(config.get("pretraining_tp") or 1) != 1:
        problems.append("pretraining_tp > 1 is not supported")
    return problems


def _rope_layers(
    config: dict[str, Any], model_type: str, n_layers: int, origin: str
) -> tuple[bool, ...]:
    if model_type == "llama":
        if "no_rope_layers" in config:
            raise UnsupportedError(f"{origin}: no_rope_layers is only understood for smollm3")
        return (True,) * n_layers
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = int(config.get("no_rope_layer_interval") or 4)
        # transformers' SmolLM3Config: layer i uses RoPE unless (i + 1) % interval == 0.
        return tuple((i + 1) % interval != 0 for i in range(n_layers))
    if len(flags) != n_layers or any(f not in (0, 1) for f in flags):
        raise ConfigError(
            f"{origin}: no_rope_layers must list {n_layers} values of 0 or 1 "
            f"(1 = RoPE, 0 = no RoPE), got {flags}"
        )
    return tuple(bool(f) for f in flags)
