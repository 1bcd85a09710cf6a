"""Tokenizer fuzz: `Tokenizer.from_folder` on folders whose tokenizer.json, tokenizer_config.json,
generation_config.json, chat_template.jinja or config.json is mutated, replaced or removed (the
tiny tokenizer and SmolLM2's published files). It either gives a tokenizer that encodes and decodes
with sane special ids, or raises a SmolconvertError. Long run: docs/fuzzing.md.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz import cases as C
from tests.fuzz import harness as H

BASES = ["tiny-llama", "tokenizer-SmolLM2-135M-Instruct", "tokenizer-SmolLM2-135M"]
LONG_BASES = ["tokenizer-SmolLM3-3B"]  # 128k tokens: 0.4 s a load, only in long runs


def _ops(file: str) -> st.SearchStrategy:
    if file == "chat_template.jinja":
        return C.file_ops(file)
    return st.one_of(C.json_ops(file), C.json_ops(file), C.file_ops(file))


def test_tokenizer_from_folder(bases) -> None:
    names = BASES + (LONG_BASES if H.fuzz_seconds() else [])
    ops = st.one_of(*[_ops(f) for f in C.TOKENIZER_FILES])
    strategy = C.cases([bases.get(n) for n in names], lambda b: ops)
    H.run("tokenizer", strategy, bases, 100)
