"""The Runner role (one per runtime) and the torch runner for the reference decoder itself.

A runner answers two questions about a model on a given runtime: what are its logits for these
tokens (quality), and how fast does it answer a prompt and decode (latency). Runners are opened from
a RunnerSpec (validators/latency.py), so latency can be measured in a fresh process whose peak
memory belongs to the runner alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import ConfigError

# torch is imported only by the torch runner: a latency child running another runtime must not pay
# torch's ~200 MB in its peak RSS.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def torch_dtype(name: str) -> Any:
    import torch

    if name not in TORCH_DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return getattr(torch, TORCH_DTYPES[name])


@dataclass(frozen=True)
class GenerationTiming:
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float  # prompt processed and first token chosen
    decode_tok_s: float  # greedy steps with the cache, after the first token
    tokens: tuple[int, ...]  # the greedy continuation (first token included)


def time_greedy(steps: Iterator[int], prompt_tokens: int, n_new: int) -> GenerationTiming:
    """Time a greedy generator whose first next() prefills the prompt and yields the first
    token, and each later next() one decode step with the cache."""
    start = time.perf_counter()
    tokens = [next(steps)]
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    tokens += [next(steps) for _ in range(n_new)]
    decode = time.perf_counter() - start
    return GenerationTiming(prompt_tokens, n_new, ttft * 1e3, n_new / decode, tuple(tokens))


class Runner(Protocol):
    runtime: str  # "torch", "llama.cpp", "onnxruntime", ...
    description: str  # what exactly ran, e.g. "torch 2.13.0 reference decoder, bf16, 2 threads"
    # A runner may also carry `notes: tuple[str, ...]`, copied into every report it produces (say
    # what it is not, e.g. "weight-level: the MLC runtime did not run").

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        """(T, vocab) logits of one sequence; row t predicts token t+1."""
        ...

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming: ...


class TorchRunner:
    """The reference decoder in a chosen dtype, run with torch on the CPU."""

    runtime = "torch"

    def __init__(self, decoder: Any, dtype_name: str, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.decoder = decoder
        self.description = (
            f"torch {torch.__version__} reference decoder, {dtype_name}, "
            f"{torch.get_num_threads()} threads"
        )

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        return self.decoder.logits(token_ids).numpy()

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        import torch

        with torch.inference_mode():
            return self._time_generation(torch, prompt_ids, n_new)

    def _time_generation(
        self, torch: Any, prompt_ids: Sequence[int], n_new: int
    ) -> GenerationTiming:
        dec = self.decoder
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)[None]
        n = ids.shape[1]
        start = time.perf_counter()
        logits, past = dec(ids, torch.ones_like(ids), torch.arange(n)[None], dec.empty_past())
        token = int(logits[0, -1].argmax())
        ttft = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for step in range(n_new):
            pos = n + step
            step_ids = torch.tensor([[token]])
            logits, past = dec(
                step_ids, torch.ones(1, pos + 1, dtype=torch.long), torch.tensor([[pos]]), past
            )
            token = int(logits[0, -1].argmax())
            tokens.append(token)
        decode = time.perf_counter() - start
        return GenerationTiming(n, n_new, ttft * 1e3, n_new / decode, tuple(tokens))


def open_torch_runner(
    source: str, dtype: str = "fp32", threads: int | None = None, allow_pickle: bool = False
) -> TorchRunner:
    """A TorchRunner for a source ("default", HF folder, .gguf) in dtype fp32, fp16 or bf16."""
    from smolconvert.model.reference import build_reference
    from smolconvert.model.source import load_model

    dt = torch_dtype(dtype)
    model = load_model(source, allow_pickle=allow_pickle)
    decoder = build_reference(model.spec, source=model.weights, dtype=dt)
    return TorchRunner(decoder, dtype, threads)
