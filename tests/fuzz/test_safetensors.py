"""safetensors fuzz: `smolconvert.load` plus reading every tensor, on tiny folders whose
model.safetensors (header JSON, header length, bytes, length) or model.safetensors.index.json
(sharded) is mutated. Either the model loads with every tensor of the promised shape, or a
SmolconvertError is raised. Long run: docs/fuzzing.md.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz import cases as C
from tests.fuzz import harness as H

BASES = ["tiny-llama", "tiny-sharded", "tiny-smollm3"]


def _ops(base: C.Base) -> st.SearchStrategy:
    strategies = []
    for file, kind in base.files.items():
        if kind == "safetensors":
            sites = [s for s in base.sites if s.startswith(file + ":")]
            strategies.append(C.safetensors_ops(file, sites))
        elif file == "model.safetensors.index.json":
            strategies += [C.json_ops(file), C.json_ops(file), C.file_ops(file)]
    return st.one_of(*strategies)


def test_load_mutated_safetensors(bases) -> None:
    strategy = C.cases([bases.get(n) for n in BASES], _ops)
    H.run("safetensors", strategy, bases, 100)
