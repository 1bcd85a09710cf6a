"""The llama.cpp runner, through llama-cpp-python: per-position logits and timed greedy decoding.

llama.cpp's CPU kernels quantize activations inside quantized dot products, so its logits differ
slightly from an fp32 run of the same dequantized weights; that is the runtime users get, and what
the quality protocol measures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from smolconvert.artifact import Artifact
from smolconvert.errors import CorruptFileError, MissingDependencyError
from smolconvert.validators.runner import GenerationTiming

INSTALL_HINT = (
    "pip install 'smolconvert[gguf]' (on CPUs with AMX build it with the CMAKE_ARGS in the README)"
)


class LlamaCppRunner:
    runtime = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise MissingDependencyError(
                f"the llama.cpp runner needs llama-cpp-python: {INSTALL_HINT}"
            ) from None
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                logits_all=True,
                verbose=False,
                n_threads=threads or os.cpu_count(),
                seed=0,
            )
        except ValueError as e:
            raise CorruptFileError(f"llama.cpp could not load {path}: {e}") from None
        self.n_ctx = n_ctx
        self.description = (
            f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {self.llm.n_threads} threads"
        )

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        ids = list(token_ids)
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(list(prompt_ids))
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(n_new):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
        decode = time.perf_counter() - start
        return GenerationTiming(len(prompt_ids), n_new, ttft * 1e3, n_new / decode, tuple(tokens))


def open_llamacpp_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> LlamaCppRunner:
    return LlamaCppRunner(str(art.path("model")), n_ctx, threads)
