"""ModelSpec: the one place that reads config.json.

Every size the rest of smolconvert uses comes from here. Both transformers 4.x and 5.x spellings are
accepted (`rope_theta` at top level or inside `rope_parameters`). Fields that would change the math
but are not implemented (rope scaling, biases, sliding windows, other activations) are refused,
fields known to be harmless are ignored, and unknown ones pass with a warning (refused under
strict_config): a silently ignored math field breaks a model, a refused harmless one the tool.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError, UnsupportedError

ARCHITECTURES = ("llama", "smollm3")
# The additive attention mask of every graph we build and run: finite, fp16-representable, and
# exp(-1e4) is exactly 0 in fp32, so masked keys get no weight and a fully masked row (a padding
# query) stays finite instead of turning into NaN.
MASK_VALUE = -1e4

# The config policy (README "Config policy"). Three kinds of field:
# - read: the fields ModelSpec is built from, each type- and range-checked;
# - checked: fields that would change the math; their plain value passes, any other is refused;
# - ignored: fields known not to change the forward pass (bookkeeping, training, other tools' keys).
# Anything else is unknown: named in a warning and recorded in artifact.json, or refused with
# strict_config. transformers' Llama code splits each matmul into `pretraining_tp` slices and sums
# them, the same math, so it is ignored (type-checked only).
_READ = frozenset(
    {
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "max_position_embeddings",
        "tie_word_embeddings",
        "no_rope_layers",
        "no_rope_layer_interval",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "pretraining_tp",
    }
)
_CHECKED = frozenset(
    {
        "rope_scaling",
        "rope_interleaved",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "partial_rotary_factor",
        "logit_softcapping",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "logit_scale",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "query_pre_attn_scalar",
        "qk_layernorm",
        "use_qk_norm",
    }
)
_IGNORED = frozenset(
    {
        "architectures",
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
        "unk_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "tf_legacy_loss",
        "use_bfloat16",
        "torchscript",
        "pruned_heads",
        "task_specific_params",
        "finetuning_task",
        "prefix",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "is_decoder",
        "chat_template",
        "base_model_tp_plan",
        "base_model_pp_plan",
        "unsloth_version",
        "is_llama_config",  # SmolLM2's configs: a nanotron conversion marker
        "transformers.js_config",  # Transformers.js' own export hints
        "quantization_config_comment",
        "embedding_multiplier_comment",
        "output_router_logits",
        "router_aux_loss_coef",
        "typical_p",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "max_length",
        "min_length",
        "do_sample",
        "num_beams",
        "num_return_sequences",
        "early_stopping",
        "length_penalty",
        "no_repeat_ngram_size",
        "bad_words_ids",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "output_scores",
        "return_dict_in_generate",
        "num_beam_groups",
        "diversity_penalty",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)
_LIMIT = 1 << 31  # larger sizes are typos (or hostile) and would overflow the formats' counts


def unknown_config_fields(config: dict[str, Any]) -> list[str]:
    """Fields of `config` the policy does not know (keys starting with "_" are bookkeeping)."""
    known = _READ | _CHECKED | _IGNORED
    return sorted(k for k in config if k not in known and not str(k).startswith("_"))


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
    def from_file(cls, path: str | Path, strict_config: bool = False) -> ModelSpec:
        return cls.from_config(read_config(path), origin=str(path), strict_config=strict_config)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The inverse of `to_dict` (artifact.json's "spec")."""
        fields = dict(data)
        fields["rope_layers"] = tuple(bool(r) for r in fields["rope_layers"])
        return cls(**fields)

    @classmethod
    def from_config(
        cls, config: dict[str, Any], origin: str = "config.json", strict_config: bool = False
    ) -> ModelSpec:
        """Read a config.json dict; refuse what would change the math, type-check what is read.

        Unknown fields pass (the loader warns and records them) unless `strict_config`.
        """
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedError(
                f"{origin}: model_type {model_type!r} is not supported; "
                f"expected one of {', '.join(ARCHITECTURES)} (Llama-shaped decoders)"
            )
        unknown = unknown_config_fields(config)
        if strict_config and unknown:
            raise ConfigError(
                f"{origin}: unknown config field(s) {', '.join(unknown)}; --strict-config refuses "
                "fields smolconvert does not know (drop the option to convert with a warning)"
            )
        problems = _refusals(config)
        if problems:
            raise UnsupportedError(f"{origin}: " + "; ".join(problems))
        bad: list[str] = []
        n_layers = _int(config, "num_hidden_layers", bad)
        hidden = _int(config, "hidden_size", bad)
        n_heads = _int(config, "num_attention_heads", bad)
        n_kv = _int(config, "num_key_value_heads", bad, default=n_heads)
        head_dim = _int(config, "head_dim", bad, default=hidden // n_heads if n_heads else 0)
        ffn = _int(config, "intermediate_size", bad)
        vocab = _int(config, "vocab_size", bad)
        max_pos = _int(config, "max_position_embeddings", bad, default=2048)
        _int(config, "pretraining_tp", bad, default=1)
        eps = _positive_float(config, "rms_norm_eps", bad, default=1e-6)
        theta = _rope_theta(config, model_type, bad)
        tie = config.get("tie_word_embeddings", model_type == "smollm3")
        if not isinstance(tie, bool):
            bad.append(f"tie_word_embeddings must be true or false, got {tie!r}")
        if not bad and n_heads % n_kv:
            bad.append(
                f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
            )
        if not bad and head_dim == 0:  # the default, hidden_size // num_attention_heads
            bad.append(
                f"num_attention_heads {n_heads} exceeds hidden_size {hidden}, which makes "
                "head_dim 0; set head_dim in config.json"
            )
        if not bad and head_dim % 2:
            bad.append(f"head_dim {head_dim} is odd; RoPE needs an even head_dim")
        rope_layers = _rope_layers(config, model_type, n_layers, bad) if not bad else ()
        if bad:
            raise ConfigError(f"{origin}: " + "; ".join(bad))
        return cls(
            architecture=model_type,
            n_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=ffn,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=eps,
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(tie),
            rope_layers=rope_layers,
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


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json as a dict, with a one-line error for a missing or malformed file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except OSError as e:  # a folder named config.json, no permission to read it
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    return config


def _int(config: dict[str, Any], key: str, bad: list[str], default: int | None = None) -> int:
    """A positive integer field (JSON integers only: 16.7 or "16" are refused, not rounded)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _LIMIT:
        bad.append(f"{key} must be a positive integer below 2^31, got {value!r}")
        return 0
    return value


def _positive_float(config: dict[str, Any], key: str, bad: list[str], default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if not _positive_number(value):
        bad.append(f"{key} must be a finite number above 0, got {value!r}")
        return default
    return float(value)


def _positive_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite and above 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _token_id(value: Any) -> int | None:
    if isinstance(value, list):  # generation configs may list several eos ids; the first leads
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _rope_theta(config: dict[str, Any], model_type: str, bad: list[str]) -> float:
    params = config.get("rope_parameters")
    nested = params.get("rope_theta") if isinstance(params, dict) else None
    values = {}
    for key, value in (("rope_theta", config.get("rope_theta")), ("rope_parameters", nested)):
        if value is None:
            continue
        if not _positive_number(value):
            bad.append(f"{key} must be a finite number above 0, got {value!r}")
            return 0.0
        values[key] = float(value)
    if len(set(values.values())) > 1:
        bad.append(
            f"rope_theta {values['rope_theta']:g} disagrees with rope_parameters.rope_theta "
            f"{values['rope_parameters']:g}; fix config.json so both say the same"
        )
    if values:
        return next(iter(values.values()))
    # transformers' own default for both architectures; said here, never assumed elsewhere.
    return 10000.0 if model_type == "llama" else 2000000.0


def _refusals(config: dict[str, Any]) -> list[str]:
    """Every field whose value would change the math away from a plain Llama / SmolLM3."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        scaling = config.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            problems.append(f"{key} must be null or an object, got {scaling!r}")
            continue
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            problems.append(f"{key} of type {kind!r} is not supported (only plain RoPE)")
        factor = scaling.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            problems.append(f"{key}.partial_rotary_factor {factor!r} is not supported")
    if config.get("rope_interleaved", False) is not False:
        problems.append(
            f"rope_interleaved={config['rope_interleaved']!r} is not supported (only the "
            "rotate-half RoPE of transformers' Llama)"
        )
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {config['partial_rotary_factor']!r}: partial RoPE")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias", "qk_layernorm", "use_qk_norm"):
        if config.get(key, False) is not False:
            problems.append(f"{key}={config[key]!r} is not supported (plain Llama layers only)")
    for key in (
        "logit_softcapping",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
    ):
        if config.get(key) is not None:
            problems.append(f"{key}={config[key]!r} is not supported")
    for key in ("logit_scale", "embedding_multiplier", "residual_multiplier"):
        if config.get(key, 1.0) not in (None, 1, 1.0):
            problems.append(f"{key}={config[key]!r} is not supported (only 1)")
    if config.get("attention_multiplier") is not None:
        problems.append(f"attention_multiplier={config['attention_multiplier']!r} is not supported")
    # SmolLM3 configs carry `sliding_window`; transformers applies it only with use_sliding_window
    # (and then only from max_window_layers on). Llama has no sliding window at all.
    if config["model_type"] == "smollm3":
        window = config.get("use_sliding_window", False)
        if window is not False:
            problems.append(f"use_sliding_window={window!r}: sliding-window attention")
    elif config.get("sliding_window") is not None:
        problems.append(f"sliding_window={config['sliding_window']!r}: sliding-window attention")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            problems.append(f"layer_types must be a list, got {layer_types!r}")
        elif any(t != "full_attention" for t in layer_types):
            kinds = sorted({str(t) for t in layer_types} - {"full_attention"})
            problems.append(
                f"layer_types {', '.join(kinds)} are not supported (only full_attention)"
            )
    return problems


def _rope_layers(
    config: dict[str, Any], model_type: str, n_layers: int, bad: list[str]
) -> tuple[bool, ...]:
    flags = config.get("no_rope_layers")
    if model_type == "llama":
        if flags is not None:
            bad.append("no_rope_layers is only understood for smollm3")
        return (True,) * n_layers
    if flags is None:
        interval = _int(config, "no_rope_layer_interval", bad, default=4)
        # transformers' SmolLM3Config: layer i uses RoPE unless (i + 1) % interval == 0.
        return tuple((i + 1) % interval != 0 for i in range(n_layers)) if interval else ()
    if (
        not isinstance(flags, list)
        or len(flags) != n_layers
        or any(f not in (0, 1) or isinstance(f, float) for f in flags)
    ):
        bad.append(
            f"no_rope_layers must list {n_layers} values of 0 or 1 "
            f"(1 = RoPE, 0 = no RoPE), got {flags!r}"
        )
        return ()
    return tuple(bool(f) for f in flags)
