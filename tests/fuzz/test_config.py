"""config.json fuzz: `ModelSpec.from_config` on mutated configs (the published ones, full size and
tiny, and the tiny test configs), and `smolconvert.load` on folders whose config.json is mutated or
replaced. Each either loads a spec that keeps ModelSpec's promises or raises a SmolconvertError.

CI runs a fixed, bounded set of examples; `SMOLCONVERT_FUZZ_SECONDS=300 pytest -s
tests/fuzz/test_config.py` runs each test for 300 s (docs/fuzzing.md).
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests import published
from tests.fuzz import cases as C
from tests.fuzz import harness as H
from tests.fuzz import readers as R

FOLDERS = ["tiny-llama", "tiny-smollm3", *(f"published-{n}" for n in published.CONFIGS)]


def test_model_spec_from_config() -> None:
    ops = st.lists(C.json_ops("config.json"), min_size=1, max_size=4)
    H.run("config_spec", st.tuples(st.sampled_from(sorted(R.SPEC_CONFIGS)), ops), None, 200)


def test_load_folder_with_mutated_config(bases) -> None:
    ops = st.one_of(C.json_ops("config.json"), C.json_ops("config.json"), C.file_ops("config.json"))
    H.run("config_load", C.cases([bases.get(n) for n in FOLDERS], lambda b: ops), bases, 100)
