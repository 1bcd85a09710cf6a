"""One tokenizer value for every exporter: a `tokenizers.Tokenizer`, special ids, chat template.

HF folders load as they are. A GGUF vocabulary is rebuilt into the byte-level BPE tokenizer.json
that its llama.cpp pre-tokenizer name stands for (`PRE_TOKENIZERS`, from the regexes in llama.cpp
src/llama-vocab.cpp @ 0c1e57098), so ids match llama.cpp and the GGUF exporter writes back what
was read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from smolconvert.errors import ConfigError, CorruptFileError, UnsupportedError
from smolconvert.files import write_atomic

if TYPE_CHECKING:
    import gguf

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's own tokenizer.json form; llama.cpp stores '[sS]... for std::regex and unicode.cpp sends
# both spellings to the same splitter (unicode_regex_split_custom_llama3).
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]")
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool, prefix: bool = False, trim: bool = True) -> dict[str, Any]:
    return dict(type="ByteLevel", add_prefix_space=prefix, trim_offsets=trim, use_regex=use_regex)


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


# llama.cpp splits with each regex in turn inside the pieces of the previous one and keeps unmatched
# text as pieces: HF's Split(Isolated). Its GPT-2 splitter (unicode.cpp) also takes \s+ at the end,
# which is HF ByteLevel's own regex; Digits(individual_digits) is its "\p{N}" step.
_DIGITS_GPT2 = _sequence({"type": "Digits", "individual_digits": True}, _byte_level(True))
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2,
    "gpt-2": _byte_level(True),
    "smaug-bpe": _sequence(_split(LLAMA3_REGEX), _byte_level(False)),
    "default": _sequence(*map(_split, DEFAULT_REGEXES), _byte_level(False)),
}

# The rest of SmolLM2's own tokenizer.json: no normalizer, no unk (a byte whose symbol is not in
# the vocabulary is dropped), merges always applied.
_TOKENIZER_JSON = {
    "version": "1.0",
    **dict.fromkeys(("truncation", "padding", "normalizer")),
    "post_processor": _byte_level(True, prefix=True, trim=False),
    "decoder": _byte_level(True, prefix=True),
}
_BPE = {
    "type": "BPE",
    **dict.fromkeys(("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix")),
    **dict.fromkeys(("fuse_unk", "byte_fallback", "ignore_merges"), False),
}
_ADDED_FLAGS = dict.fromkeys(("single_word", "lstrip", "rstrip", "normalized"), False)

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values
_SPECIAL_NAMES = ("bos", "eos", "unk", "pad")
_GGUF_NAMES = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    model: str
    pre: str | None


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` plus special ids and chat template."""

    backend: tokenizers.Tokenizer
    special: SpecialIds
    chat_template: str | None = None
    pre: str | None = None
    # tokenizer_config.json's add_prefix_space; llama.cpp's Llama converter writes it to GGUF as
    # tokenizer.ggml.add_space_prefix (None: the file does not say)
    add_space_prefix: bool | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            if (folder / "tokenizer.model").is_file():
                raise UnsupportedError(
                    f"{folder} has only a sentencepiece tokenizer.model, no tokenizer.json; "
                    "convert it once with transformers (needs sentencepiece): "
                    "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
                )
            raise ConfigError(f"no tokenizer.json in {folder}; pass a Hugging Face model folder")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise CorruptFileError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        config = read_json_object(folder / "tokenizer_config.json")
        # llama.cpp's converter (gguf-py vocab.py SpecialVocab): tokenizer_config.json's token
        # strings win, then config.json's ids; generation_config.json only fills what is left.
        fallbacks = [
            read_json_object(folder / name) for name in ("config.json", "generation_config.json")
        ]
        ids: dict[str, int | None] = {}
        unknown = []
        for name in _SPECIAL_NAMES:
            text = _token_text(config.get(f"{name}_token"))
            ids[name] = None if text is None else backend.token_to_id(text)
            if text is not None and ids[name] is None:
                unknown.append(f"{name}_token={text!r}")
            for fallback in fallbacks:
                if ids[name] is None and name != "unk":
                    ids[name] = _first_id(fallback.get(f"{name}_token_id"))
        if unknown:
            raise ConfigError(
                f"{folder / 'tokenizer_config.json'} names special tokens that tokenizer.json "
                f"lacks: {', '.join(unknown)}; fix the token strings or add the tokens"
            )
        tree = json.loads(backend.to_str())
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _template_adds_bos(
                tree.get("post_processor"), _token_text(config.get("bos_token"))
            )
        # As llama.cpp's converter: the template in tokenizer_config.json, else chat_template.jinja
        # (where transformers >= 4.47 and SmolLM3 keep it).
        template = _template(config)
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CorruptFileError(f"{jinja} cannot be read as UTF-8 text: {exc}") from None
        pre = next(
            (name for name, p in PRE_TOKENIZERS.items() if p == tree.get("pre_tokenizer")), None
        )
        prefix = config.get("add_prefix_space")
        prefix = prefix if isinstance(prefix, bool) else None
        return cls(backend, SpecialIds(add_bos=add_bos, **ids), template, pre, prefix)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        model = _field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedError(
                f"GGUF tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is rebuilt"
            )
        pre = _field(reader, "tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedError(
                f"GGUF tokenizer.ggml.pre is {pre!r}; known: {', '.join(PRE_TOKENIZERS)}"
            )
        tokens = _field(reader, "tokenizer.ggml.tokens")
        merges = _field(reader, "tokenizer.ggml.merges") or []
        types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens or ())
        if not tokens or len(types) != len(tokens) or len(set(tokens)) != len(tokens):
            raise CorruptFileError(
                f"GGUF vocabulary is inconsistent: {len(tokens or ())} tokens, "
                f"{len(set(tokens or ()))} distinct, {len(types)} token types; expected all equal"
            )
        pairs = [m.split(" ") for m in merges]
        if bad := [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]:
            raise CorruptFileError(f"GGUF merges not of the form 'a b': {bad[:5]}")
        added = [
            {"id": i, "content": t, "special": kind == CONTROL, **_ADDED_FLAGS}
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in (CONTROL, USER_DEFINED)
        ]
        vocab = {t: i for i, t in enumerate(tokens)}
        tree = {
            **_TOKENIZER_JSON,
            "added_tokens": added,
            "pre_tokenizer": PRE_TOKENIZERS[pre],
            "model": {**_BPE, "vocab": vocab, "merges": pairs},
        }
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(tree))
        except Exception as exc:
            raise CorruptFileError(f"GGUF vocabulary does not form a BPE tokenizer: {exc}") from exc
        ids = {n: _gguf_id(reader, f"tokenizer.ggml.{g}_token_id") for n, g in _GGUF_NAMES.items()}
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token"))
        template = _field(reader, "tokenizer.chat_template")
        prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
        prefix = bool(prefix) if prefix is not None else None
        return cls(backend, SpecialIds(add_bos=add_bos, **ids), template, pre, prefix)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.special.add_bos and self.special.bos is not None:
            return [self.special.bos, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def save(self, folder: str | Path, model_max_length: int | None = None) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {n: self._text(getattr(self.special, n)) for n in _SPECIAL_NAMES}
        config: dict[str, Any] = {
            "add_bos_token": self.special.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{n}_token": t for n, t in names.items()},
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.add_space_prefix is not None:
            config["add_prefix_space"] = self.add_space_prefix
        special_map = {f"{n}_token": t for n, t in names.items() if t is not None}
        files = {
            # compact: 1.5 MB for SmolLM2's vocabulary against 3.5 MB indented, in every artifact
            "tokenizer.json": self.backend.to_str() + "\n",
            "tokenizer_config.json": _dumps(config),
            "special_tokens_map.json": _dumps(special_map),
        }
        return [write_atomic(folder / name, text) for name, text in files.items()]

    def gguf_vocab(self) -> GGUFVocab:
        model = json.loads(self.backend.to_str())["model"]
        if model.get("type") != "BPE":
            raise UnsupportedError(
                f"GGUF export writes byte-level BPE vocabularies; this tokenizer is {model['type']}"
            )
        n = self.vocab_size
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [UNUSED] * n
        for text, i in self.backend.get_vocab(with_added_tokens=False).items():
            tokens[i], types[i] = text, UNUSED if text == f"[PAD{i}]" else NORMAL
        for i, token in self.backend.get_added_tokens_decoder().items():
            # llama.cpp conversion/base.py get_vocab_base: "<|...|>" added tokens are control too
            looks_special = token.content.startswith("<|") and token.content.endswith("|>")
            tokens[i] = token.content
            types[i] = CONTROL if token.special or looks_special else USER_DEFINED
        # gguf-py vocab.py: spaces inside merge pairs are written as chr(ord(" ") + 256)
        merges = [
            m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
            for m in model["merges"]
        ]
        return GGUFVocab(tokens, types, merges, "gpt2", self.pre)

    def _text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError as e:  # check_gguf bounds strings but does not decode values
        raise CorruptFileError(f"GGUF {key} is not UTF-8 text ({e.reason})") from None


def _gguf_id(reader: gguf.GGUFReader, key: str) -> int | None:
    """A special token id; llama.cpp refuses one stored as another type (a float, a negative)."""
    value = _field(reader, key)
    if value is not None and (type(value) is not int or value < 0):
        raise CorruptFileError(f"GGUF {key} is {value!r}, expected a token id (unsigned integer)")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise ConfigError(
            f'tokenizer_config.json: a special token must be a string or {{"content": string}}, '
            f"got {value!r:.80}"
        )
    return text


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    # a bool is no id; a negative one (Llama 1's pad_token_id -1) means there is none
    return value if type(value) is int and value >= 0 else None


def _template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {
            t.get("name"): t.get("template")
            for t in template
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ConfigError(
            "tokenizer_config.json: chat_template must be a string or a list of "
            f'{{"name": ..., "template": string}} objects, got {template!r:.80}'
        )
    return template


def _template_adds_bos(processor: dict[str, Any] | None, bos: str | None) -> bool:
    if not processor or bos is None:
        return False
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            return step["single"][0].get("SpecialToken", {}).get("id") == bos
    return False


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
