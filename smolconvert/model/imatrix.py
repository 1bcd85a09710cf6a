"""Importance matrices: the mean squared input activation of every linear layer, per input column.

Collected by running the reference decoder over calibration text, as llama.cpp's `llama-imatrix`
does (sum of x^2 over tokens / token count, per weight matrix). Q/K/V share their input, and so do
gate/up; each weight still gets its own entry, keyed by canonical name. The token embedding and a
tied output are not covered, as in llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from smolconvert import progress
from smolconvert.errors import ConfigError
from smolconvert.texts import EvalText


@dataclass
class Imatrix:
    values: dict[str, NDArray[np.float32]]  # canonical weight name -> (in_features,)
    text_name: str
    text_sha256: str
    text_chars: int
    chunks: int
    tokens: int

    def get(self, name: str) -> NDArray[np.float32] | None:
        return self.values.get(name)

    def describe(self) -> dict[str, Any]:
        return {
            "text_name": self.text_name,
            "text_sha256": self.text_sha256,
            "text_chars": self.text_chars,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "entries": len(self.values),
        }


@torch.inference_mode()
def collect_imatrix(
    model: Any, text: EvalText, ctx: int = 512, chunks: int = 16, quiet: bool = False
) -> Imatrix:
    """Run the fp32 reference over up to `chunks` windows of `ctx` tokens of `text`."""
    from smolconvert.model.reference import build_reference

    ids = model.tokenizer.encode(text.text[: ctx * chunks * 8])
    n = min(chunks, len(ids) // ctx)
    if n == 0:
        raise ConfigError(
            f"calibration text {text.name} has {len(ids)} tokens, fewer than one chunk of {ctx}"
        )
    decoder = build_reference(model.spec, source=model.weights)
    linears = {
        f"model.layers.{name}.weight": module
        for name, module in decoder.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    with input_square_sums(linears) as sums, progress.bar(n, "imatrix") as bar:
        for c in range(n):
            decoder.logits(ids[c * ctx : (c + 1) * ctx])
            bar.update(1)
    tokens = n * ctx
    values = {k: (v / tokens).float().numpy() for k, v in sorted(sums.items())}
    return Imatrix(values, text.name, text.sha256, len(text.text), n, tokens)


@contextmanager
def input_square_sums(
    linears: Mapping[str, torch.nn.Module],
) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward adds each module's input x^2, summed over tokens per input
    column (float64), into the yielded dict under that module's key."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for key, module in linears.items():

        def hook(mod: Any, args: tuple[torch.Tensor, ...], out: Any, key: str = key) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)

        hooks.append(module.register_forward_hook(hook))
    try:
        yield sums
    finally:
        for h in hooks:
            h.remove()
