from __future__ import annotations

import json

import pytest

from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.model.spec import ModelSpec
from tests import tiny

SMOLLM2_135M = {  # SmolLM2-135M's config.json as transformers 4.x wrote it
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "transformers_version": "4.42.3",
}


def test_smollm2_135m_sizes() -> None:
    spec = ModelSpec.from_config(SMOLLM2_135M)
    assert (spec.n_layers, spec.hidden_size, spec.n_heads, spec.n_kv_heads) == (30, 576, 9, 3)
    assert spec.head_dim == 64 and spec.rope_theta == 100000.0 and spec.tie_word_embeddings
    # 28,311,552 embedding + 30 x 3,540,096 per layer + 576 final norm
    assert spec.n_params == 134_515_008


def test_transformers_5_spelling_reads_the_same_theta() -> None:
    v5 = dict(SMOLLM2_135M)
    del v5["rope_theta"], v5["rope_scaling"]
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    assert ModelSpec.from_config(v5) == ModelSpec.from_config(SMOLLM2_135M)


def test_conflicting_theta_spellings_are_refused() -> None:
    cfg = dict(SMOLLM2_135M, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="disagrees"):
        ModelSpec.from_config(cfg)


def test_smollm3_no_rope_layers_from_list_and_interval() -> None:
    listed = ModelSpec.from_config(tiny.config("smollm3"))
    assert listed.rope_layers == (True, True, True, False)
    cfg = tiny.config("smollm3", num_hidden_layers=8)
    del cfg["no_rope_layers"]
    cfg["no_rope_layer_interval"] = 4
    assert ModelSpec.from_config(cfg).rope_layers == (True, True, True, False) * 2


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"sliding_window": 4096}, "sliding"),
        ({"logit_softcapping": 30.0}, "logit_softcapping"),
        ({"model_type": "mistral"}, "mistral"),
    ],
)
def test_math_changing_fields_are_refused(override: dict, message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        ModelSpec.from_config(dict(SMOLLM2_135M, **override))


def test_smollm3_sliding_window_only_counts_when_enabled() -> None:
    ok = tiny.config("smollm3", sliding_window=4096, use_sliding_window=False)
    assert ModelSpec.from_config(ok).architecture == "smollm3"
    with pytest.raises(UnsupportedError, match="sliding"):
        ModelSpec.from_config(dict(ok, use_sliding_window=True))


def test_bad_values_name_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ModelSpec.from_config(dict(SMOLLM2_135M, num_hidden_layers=0))
    with pytest.raises(ConfigError, match="no_rope_layers"):
        ModelSpec.from_config(tiny.config("smollm3", no_rope_layers=[1, 0]))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.from_file(bad)


@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_hf_config_round_trips_through_transformers(arch: str) -> None:
    import transformers

    spec = ModelSpec.from_config(tiny.config(arch))
    written = spec.to_hf_config()
    assert ModelSpec.from_config(json.loads(json.dumps(written))) == spec
    hf = transformers.AutoConfig.for_model(
        **{k: v for k, v in written.items() if k != "architectures"}
    )
    assert hf.rope_parameters["rope_theta"] == spec.rope_theta
