"""Resolve a source (HF folder, .gguf file or "default") into a CanonicalModel.

A CanonicalModel is spec + lazy weights + tokenizer + where it came from; everything downstream
(reference decoder, exporters, validators) starts from it. GGUF metadata is turned into the same
config.json vocabulary ModelSpec reads, so there is one code path for sizes and refusals.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError, ConfigWarning, CorruptFileError, UnsupportedError
from smolconvert.model import weights as W
from smolconvert.model.spec import ModelSpec, read_config, unknown_config_fields
from smolconvert.model.tokenizer import Tokenizer, read_json_object


@dataclass
class CanonicalModel:
    spec: ModelSpec
    weights: W.WeightSource
    tokenizer: Tokenizer
    source: str  # what the user passed
    origin: str  # where the weights really come from, said plainly
    name: str  # short name for artifact folders
    metadata: dict[str, Any] = field(default_factory=dict)
    # config.json fields no rule knows: warned about at load, recorded in artifact.json
    ignored_config_fields: tuple[str, ...] = ()
    # for model cards and Modelfiles: the Hub repository the source is (guessed from its path or
    # name, or given), its license, and generation_config.json's sampling defaults and eos ids
    base_model: str | None = None
    license: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def sha256(self) -> str:
        return W.fingerprint(self.weights)

    def storage_types(self) -> dict[str, str]:
        return {n: self.weights.storage_type(n) for n in self.weights.names()}

    def describe(self) -> dict[str, Any]:
        """What `smolconvert inspect` shows: architecture, sizes, tokenizer, special ids, files."""
        s = self.spec
        tok = self.tokenizer
        files = [{"path": str(p), "size_bytes": p.stat().st_size} for p in self.weights.files()]
        return {
            "source": self.source,
            "name": self.name,
            "origin": self.origin,
            "architecture": s.architecture,
            "n_params": s.n_params,
            "spec": s.to_dict(),
            "no_rope_layers": [i for i, r in enumerate(s.rope_layers) if not r],
            "tokenizer": {
                "model": "bpe",
                "pre": tok.pre,
                "vocab_size": tok.vocab_size,
                "bos": tok.special.bos,
                "eos": tok.special.eos,
                "unk": tok.special.unk,
                "pad": tok.special.pad,
                "add_bos": tok.special.add_bos,
                "chat_template": tok.chat_template is not None,
            },
            "storage_types": dict(sorted(Counter(self.storage_types().values()).items())),
            "files": files,
            "size_bytes": sum(f["size_bytes"] for f in files),
            "metadata": self.metadata,
            "ignored_config_fields": list(self.ignored_config_fields),
        }


def load_model(
    source: str | Path, allow_pickle: bool = False, strict_config: bool = False
) -> CanonicalModel:
    """Open a source without reading any tensor data yet.

    Unknown config.json fields are named in a ConfigWarning and kept on the model (refused with
    `strict_config`); GGUF metadata has no such fields.
    """
    if str(source) == "default":
        from smolconvert.model.default import ORIGIN_NOTE, default_gguf_path

        model = _load_gguf(default_gguf_path(), "default")
        model.name = "SmolLM2-135M-Instruct"
        model.origin = ORIGIN_NOTE
        model.base_model = guess_base_model(model.name, "")
        return model
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(
            f"source {str(source)!r} does not exist; pass a Hugging Face model folder, "
            "a .gguf file, or 'default'"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedError(
                f"{path} is a file but not .gguf; pass the model folder (with config.json) instead"
            )
        return _load_gguf(path, str(source))
    return _load_folder(path, str(source), allow_pickle, strict_config)


def _load_folder(
    folder: Path, source: str, allow_pickle: bool, strict_config: bool
) -> CanonicalModel:
    config = read_config(folder / "config.json")
    spec = ModelSpec.from_config(
        config, origin=str(folder / "config.json"), strict_config=strict_config
    )
    unknown = tuple(unknown_config_fields(config))
    if unknown:
        warnings.warn(
            ConfigWarning(
                f"{folder / 'config.json'}: ignoring unknown config field(s) {', '.join(unknown)} "
                "(recorded in artifact.json; --strict-config refuses them)"
            ),
            stacklevel=3,
        )
    if any(folder.glob("*.safetensors")):
        weights: W.WeightSource = W.SafetensorsSource(folder)
        origin = f"safetensors in {folder}"
    else:
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise CorruptFileError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
        if not allow_pickle:
            raise UnsupportedError(
                f"{folder} has only PyTorch pickle weights ({pickles[0].name}); unpickling can run "
                "code. Convert them to safetensors, or pass --allow-pickle if you trust the file"
            )
        weights = W.PickleSource(pickles)
        origin = f"PyTorch pickle checkpoint in {folder} (loaded with --allow-pickle)"
    W.check_totality(weights, spec)
    return CanonicalModel(
        spec=spec,
        weights=weights,
        tokenizer=_fits(Tokenizer.from_folder(folder), spec, str(folder)),
        source=source,
        origin=origin,
        name=folder.resolve().name,
        ignored_config_fields=unknown,
        base_model=guess_base_model(folder.resolve().name, str(folder.resolve())),
        license=source_license(folder),
        generation=_generation_config(folder),
    )


def _load_gguf(path: Path, source: str) -> CanonicalModel:
    import gguf

    from smolconvert.model.gguf_check import check_gguf

    check_gguf(path)  # bounds every count and offset first: the reader trusts them
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise CorruptFileError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e})"
        ) from None
    meta = _gguf_metadata(reader)
    spec = ModelSpec.from_config(_gguf_config(meta, reader, path), origin=str(path))
    weights = W.GGUFSource(path, reader, spec)
    W.check_totality(weights, spec)
    types = sorted({weights.storage_type(n) for n in weights.names()})
    name = str(meta.get("general.name") or path.stem).replace(" ", "-")
    return CanonicalModel(
        spec=spec,
        weights=weights,
        tokenizer=_fits(Tokenizer.from_gguf(reader), spec, str(path)),
        source=source,
        origin=f"dequantized from GGUF {path.name} (stored as {', '.join(types)})",
        name=name,
        metadata={k: v for k, v in meta.items() if k.startswith("general.")},
        base_model=guess_base_model(path.stem, str(path.resolve())),
        license=meta["general.license"] if isinstance(meta.get("general.license"), str) else None,
    )


# Published SmolLM checkpoints live under HuggingFaceTB with the folder names they download as.
_SMOLLM = re.compile(r"SmolLM[23]?-(135M|360M|1\.7B|3B)(-Instruct|-Base)?(-16k)?", re.IGNORECASE)
# A folder from the Hub's cache: .../models--ORG--NAME/snapshots/<commit>
_HUB_CACHE = re.compile(r"models--([\w.-]+)--([\w.-]+)")


def guess_base_model(name: str, source: str) -> str | None:
    """The Hub repository a source was downloaded from, where its path or name says it."""
    hit = _HUB_CACHE.search(str(source))
    if hit:
        return f"{hit.group(1)}/{hit.group(2)}"
    if _SMOLLM.fullmatch(name):
        return f"HuggingFaceTB/{name}"
    return None


def source_license(folder: Path) -> str | None:
    """The license in a source folder's own model card (its YAML header), if it has one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data
    except Exception:  # a README without a valid header: no license to take from it
        return None
    value = getattr(data, "license", None)
    return value if isinstance(value, str) else None


# generation_config.json keys a Modelfile carries (Ollama's names differ only for the penalty)
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "eos_token_id")


def _generation_config(folder: Path) -> dict[str, Any]:
    data = read_json_object(folder / "generation_config.json")  # {} when absent
    return {k: data[k] for k in _GENERATION_KEYS if k in data}


def _fits(tokenizer: Tokenizer, spec: ModelSpec, where: str) -> Tokenizer:
    """A token id past the embedding would index out of range in every runtime; fewer tokens than
    rows (padding rows) are fine."""
    if tokenizer.vocab_size > spec.vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding has "
            f"{spec.vocab_size} rows (vocab_size); token ids past it cannot be run. Use the "
            "tokenizer that belongs to these weights"
        )
    return tokenizer


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for key, f in reader.fields.items():
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.scores",
        ):
            continue  # large arrays; the tokenizer reads them itself
        try:
            meta[key] = f.contents()
        except Exception:
            continue
    return meta


def _gguf_config(meta: dict[str, Any], reader: Any, path: Path) -> dict[str, Any]:
    """Translate llama.cpp's metadata keys into config.json fields (FORMATS.md, GGUF keys)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "smollm3"):
        raise UnsupportedError(f"{path}: GGUF architecture {arch!r}; expected llama or smollm3")

    def key(name: str, required: bool = True, kind: type = int) -> Any:
        value = meta.get(f"{arch}.{name}")
        if value is None and required:
            raise CorruptFileError(f"{path}: GGUF metadata lacks {arch}.{name}")
        # llama.cpp refuses a key stored with another type; read anyway, a float's bits would
        # become a nonsense integer (or back), an array would not be a number at all
        if value is not None and type(value) is not kind:
            raise CorruptFileError(
                f"{path}: GGUF {arch}.{name} is {value!r:.40} ({type(value).__name__}), "
                f"expected {kind.__name__}"
            )
        return value

    scaling = key("rope.scaling.type", required=False, kind=str)
    if scaling not in (None, "none"):
        raise UnsupportedError(f"{path}: rope scaling {scaling!r} is not supported")
    n_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = key("attention.key_length", required=False) or (hidden // n_heads if n_heads else 0)
    rope_dims = key("rope.dimension_count", required=False)
    if rope_dims is not None and int(rope_dims) != int(head_dim):
        raise UnsupportedError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims)")
    vocab = key("vocab_size", required=False)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    n_layers = int(key("block_count"))
    names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "model_type": arch,
        "num_hidden_layers": n_layers,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", required=False) or n_heads),
        "head_dim": int(head_dim),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": float(key("rope.freq_base", required=False, kind=float) or 10000.0),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
    }
    for field_name, gguf_key in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
    ):
        value = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if value is not None:
            config[field_name] = int(value)
    if arch == "smollm3":
        # llama.cpp hard-codes SmolLM3's no-RoPE layers: every 4th (3, 7, 11, ...).
        config["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(n_layers)]
    return config
