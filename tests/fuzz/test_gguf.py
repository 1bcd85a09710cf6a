"""GGUF fuzz: `smolconvert.load` plus reading every tensor, on a tiny exported GGUF (f16 and q8_0)
whose header integers (counts, string lengths, value types, array counts, dims, tensor types and
offsets, each named) are set to interesting values or nudged, whose header bytes are patched or
flipped, or which is cut short or extended. Either it loads with every tensor of the promised
shape, or a SmolconvertError is raised, within 5 s and 256 MB each. Long run: docs/fuzzing.md.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz import cases as C
from tests.fuzz import harness as H

BASES = ["gguf-llama-f16", "gguf-smollm3-q8_0"]


def _ops(base: C.Base) -> st.SearchStrategy:
    ints = C.int_ops("model.gguf", sorted(base.sites), base.type_sites)
    return st.one_of(ints, ints, ints, *C.byte_ops("model.gguf", header=True))


def test_load_mutated_gguf(bases) -> None:
    strategy = C.cases([bases.get(n) for n in BASES], _ops)
    H.run("gguf", strategy, bases, 150, example_seconds=5, example_memory_mb=256)
