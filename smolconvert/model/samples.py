"""Token windows sampled from the model itself: the part of GPTQ's calibration that no text
domain chooses.

GPTQ fits each weight's levels to the inputs its calibration shows it. Calibrated on CPython's
documentation alone, ONNX int4 of the default model lost on general prose most of what it won on
documentation (mean KLD 0.290 against 0.076; docs/onnx.md, "int4 outside its calibration
domain"). Text the model writes from its start token, at temperature 1, follows what the model
itself finds likely, in every domain it knows, and needs no dataset.

Sampling is seeded, so the same weights give the same tokens on one machine. Across machines a
float difference in a matmul can flip a token where two are nearly tied, so the tokens are cached
on disk (keyed by the weights' sha256 and the settings) and their sha256 goes into artifact.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smolconvert import progress
from smolconvert.files import write_atomic

if TYPE_CHECKING:
    from smolconvert.model.source import CanonicalModel

SEED = 0
TEMPERATURE = 1.0
DTYPE = "bfloat16"  # the sampler's: _sample says why


@dataclass(frozen=True)
class Samples:
    windows: list[list[int]]  # each starts with the start token
    seed: int
    temperature: float
    cached: bool  # read from the cache, not sampled in this process

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.windows).encode()).hexdigest()

    def describe(self) -> dict[str, object]:
        return {
            "windows": len(self.windows),
            "length": len(self.windows[0]),
            "seed": self.seed,
            "temperature": self.temperature,
            "dtype": DTYPE,
            "sha256": self.sha256,
        }


def cache_dir() -> Path:
    """$SMOLCONVERT_CACHE, else $XDG_CACHE_HOME/smolconvert, else ~/.cache/smolconvert."""
    if explicit := os.environ.get("SMOLCONVERT_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smolconvert"


def self_samples(
    model: CanonicalModel,
    count: int,
    length: int,
    seed: int = SEED,
    temperature: float = TEMPERATURE,
    announce: Callable[[str], None] | None = None,
) -> Samples:
    """`count` windows of `length` tokens the model samples from its start token (the cached
    ones when this model was sampled with these settings before). `announce` is told when the
    sampling really runs (it takes a full forward pass per token: minutes above 1B)."""
    key = f"{model.sha256[:32]}-n{count}-t{length}-s{seed}-T{temperature:g}-{DTYPE}"
    path = cache_dir() / "samples" / f"{key}.json"
    try:
        windows = json.loads(path.read_text())["windows"]
        if len(windows) == count and all(len(w) == length for w in windows):
            return Samples(windows, seed, temperature, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: sample again, and replace it
    if announce is not None:
        announce(f"sampling {count} windows of {length} tokens from the model (cached in {path})")
    windows = _sample(model, count, length, seed, temperature)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": key, "windows": windows}))
    except OSError:
        pass  # a read-only home costs the sampling time again, nothing else
    return Samples(windows, seed, temperature, cached=False)


def start_token(model: CanonicalModel) -> int:
    """The tokenizer's bos, else config.json's (SmolLM3's tokenizer has none), else eos."""
    for candidate in (
        model.tokenizer.special.bos,
        model.spec.bos_token_id,
        model.tokenizer.special.eos,
    ):
        if candidate is not None:
            return candidate
    return 0


def _sample(
    model: CanonicalModel, count: int, length: int, seed: int, temperature: float
) -> list[list[int]]:
    """All windows in one batch through the reference with its KV cache, in bf16: half the
    memory of fp32 (the whole model is held: 1.36x SmolLM3-3B's fp32 bytes in fp32, over the
    ONNX export's bound), and on CPUs with bf16 instructions several times faster."""
    import torch

    from smolconvert.model.reference import build_reference

    with torch.inference_mode():
        dec = build_reference(model.spec, source=model.weights, dtype=getattr(torch, DTYPE))
        gen = torch.Generator().manual_seed(seed)
        token = torch.full((count, 1), start_token(model), dtype=torch.long)
        out = [token]
        past = dec.empty_past(count)
        with progress.bar(length - 1, "sampling calibration tokens") as bar:
            for t in range(length - 1):
                mask = torch.ones((count, t + 1), dtype=torch.long)
                logits, presents = dec(token, mask, torch.full((count, 1), t), past)
                past = list(presents)
                # float64: the cumulative sum behind multinomial must not depend on its rounding
                probs = torch.softmax(logits[:, -1].double() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=gen)
                out.append(token)
                bar.update(1)
    return torch.cat(out, dim=1).tolist()
