"""The readers a fuzz case is fed to, what each promises when it accepts an input, and `play`:
one case (a base plus mutations, cases.py) materialised and read.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import published, tiny
from tests.fuzz.cases import apply_ops, copy_base, edit_json

SAMPLE = "Hello, world! 12345 <|im_start|>user\nnaïve café 🙂<|im_end|>"


SPEC_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": tiny.config("llama"),
    "tiny-smollm3": tiny.config("smollm3"),
    **{f"published-{n}": published.tiny_config(n) for n in published.CONFIGS},
    **{f"published-full-{n}": c for n, c in published.CONFIGS.items()},
}


def read_spec(config: dict[str, Any]) -> None:
    from smolconvert.model.spec import ModelSpec

    check_spec(ModelSpec.from_config(config))


def read_model(path: Path) -> None:
    """Load as a user would, read every tensor, and check what loading promises."""
    import smolconvert
    from smolconvert.model.weights import canonical_names, check_finite, expected_shape

    model = smolconvert.load(path)
    spec = model.spec
    check_spec(spec)
    expected = set(canonical_names(spec))
    for name in model.weights.names():
        tensor = model.weights.get(name)
        if name in expected:
            assert tuple(tensor.shape) == expected_shape(spec, name), (name, tensor.shape)
    check_finite(model.weights, spec)
    assert model.tokenizer.vocab_size <= spec.vocab_size
    use_tokenizer(model.tokenizer)
    if path.suffix == ".gguf":
        check_gguf_kinds(path)


# The llama.* keys the GGUF loader reads and the kind llama.cpp requires of each (it refuses a key
# stored with another type; read anyway, a float's bits become a nonsense integer or back).
GGUF_KINDS = {
    **dict.fromkeys(
        (
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "rope.dimension_count",
            "vocab_size",
        ),
        "int",
    ),
    "attention.layer_norm_rms_epsilon": "float",
    "rope.freq_base": "float",
}


def check_gguf_kinds(path: Path) -> None:
    """A GGUF that loaded holds each key the loader read with the kind llama.cpp requires."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    floats = {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}
    ints = {getattr(gguf.GGUFValueType, f"{s}INT{b}") for s in ("", "U") for b in (8, 16, 32, 64)}
    for key, kind in GGUF_KINDS.items():
        f = reader.fields.get(f"{arch}.{key}")
        if f is not None:
            stored = f.types[0]
            assert stored in (ints if kind == "int" else floats), (key, stored.name)


def read_tokenizer(folder: Path) -> None:
    from smolconvert.model.tokenizer import Tokenizer

    use_tokenizer(Tokenizer.from_folder(folder))


def check_spec(spec: Any) -> None:
    """What ModelSpec promises every consumer (sizes the formats can hold, a valid GQA layout)."""
    sizes = (
        spec.n_layers,
        spec.hidden_size,
        spec.intermediate_size,
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.vocab_size,
        spec.max_position_embeddings,
    )
    assert all(type(v) is int and 0 < v < 2**31 for v in sizes), sizes
    assert spec.n_heads % spec.n_kv_heads == 0 and spec.head_dim % 2 == 0
    for v in (spec.rms_norm_eps, spec.rope_theta):
        assert type(v) is float and math.isfinite(v) and v > 0, v
    assert len(spec.rope_layers) == spec.n_layers
    assert all(type(r) is bool for r in spec.rope_layers)


def use_tokenizer(tok: Any) -> None:
    ids = tok.encode(SAMPLE)
    assert all(type(i) is int for i in ids)
    tok.decode(ids)
    for name in ("bos", "eos", "unk", "pad"):
        value = getattr(tok.special, name)
        assert value is None or (type(value) is int and value >= 0), (name, value)
    assert tok.chat_template is None or isinstance(tok.chat_template, str), tok.chat_template


READERS: dict[str, Callable[[Path], None]] = {
    "config_load": read_model,
    "tokenizer": read_tokenizer,
    "safetensors": read_model,
    "gguf": read_model,
}


def play(reader: str, bases: Any, base: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Run one case: mutate a private copy of `base` (for config_spec: the config dict) and read
    it. Returns the resolved recipe; whatever the reader raises propagates with the recipe
    attached as `exc.recipe`."""
    with tempfile.TemporaryDirectory(prefix="smolconvert-fuzz-") as tmp:
        if reader == "config_spec":
            config, resolved = edit_json(SPEC_CONFIGS[base], ops)
            recipe = {"base": base, "ops": resolved}
            if not isinstance(config, dict):
                return recipe  # read_config refuses anything else before from_config
            target: Any = config
            read: Callable[[Any], None] = read_spec
        else:
            b = bases.get(base)
            target = copy_base(b, Path(tmp))
            recipe = {"base": base, "ops": apply_ops(b, Path(tmp) / "in", ops)}
            read = READERS[reader]
        try:
            read(target)
        except BaseException as exc:
            exc.recipe = recipe  # type: ignore[attr-defined]
            raise
        return recipe
