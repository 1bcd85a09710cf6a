"""The ExecuTorch runner: the .pte run by ExecuTorch's own runtime (`executorch.runtime`, XNNPACK).

It calls the program's `forward(tokens, input_pos)` as ExecuTorch's LLM runner does: the prompt
in pieces of at most `get_max_seq_len` tokens, then one token per call at the next position, the
cache living inside the program. Scoring a window is a prefill from position 0: the causal kernel
reads only the positions before each token, so what an earlier window left in the cache beyond
them is never seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert import progress
from smolconvert.artifact import Artifact
from smolconvert.errors import ConfigError, CorruptFileError, MissingDependencyError
from smolconvert.validators.runner import GenerationTiming, time_greedy

INSTALL_HINT = "pip install 'smolconvert[executorch]'"


class ExecutorchRunner:
    runtime = "executorch"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import torch

            with progress.library_notes_off(), progress.native_stderr_off():
                # the kernels a .pte of ours may call beyond the portable ones: llama:: cache and
                # attention, quantized_decomposed:: embeddings
                import executorch.kernels.quantized  # noqa: F401
                from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
                from executorch.runtime import Runtime
        except ImportError:
            raise MissingDependencyError(
                f"the ExecuTorch runner needs executorch: {INSTALL_HINT}"
            ) from None
        import executorch.version

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        try:
            with progress.native_stderr_off():  # its CPU probe prints what it could not read
                program = Runtime.get().load_program(Path(path))
            self.method = program.load_method("forward")
            self.chunk = int(program.load_method("get_max_seq_len").execute([])[0])
            self.context = int(program.load_method("get_max_context_len").execute([])[0])
        except Exception as e:  # the pybinding raises RuntimeError/ValueError of its own
            raise CorruptFileError(f"ExecuTorch could not load {path}: {e}") from None
        self.description = (
            f"executorch {executorch.version.__version__} runtime, XNNPACK, {Path(path).name}, "
            f"cache of {self.context} positions"
        )

    def _forward(self, ids: Sequence[int], start: int) -> Any:
        """Logits (T, vocab) of `ids` at positions start.., in calls of at most `chunk` tokens,
        as ExecuTorch's runner prefills."""
        torch = self.torch
        if start + len(ids) > self.context:
            raise ConfigError(
                f"{start + len(ids)} positions do not fit the program's cache of "
                f"{self.context} (export with -O max_context_len=N)"
            )
        rows = []
        for at in range(0, len(ids), self.chunk):
            piece = torch.tensor([list(ids[at : at + self.chunk])], dtype=torch.long)
            position = torch.tensor([start + at], dtype=torch.long)
            rows.append(self.method.execute([piece, position])[0][0])
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        return self._forward(token_ids, 0).numpy().astype(np.float32, copy=False)

    def greedy_steps(self, prompt_ids: Sequence[int]) -> Iterator[int]:
        logits = self._forward(prompt_ids, 0)
        position = len(prompt_ids)
        while True:
            token = int(logits[-1].argmax())
            yield token
            logits = self._forward([token], position)
            position += 1

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        return time_greedy(self.greedy_steps(prompt_ids), len(prompt_ids), n_new)


def open_executorch_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> ExecutorchRunner:
    return ExecutorchRunner(art.path("model"), threads)
