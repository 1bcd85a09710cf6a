"""The LiteRT runner: the .tflite run by LiteRT's own interpreter (`ai_edge_litert.interpreter`,
XNNPACK delegate), through the program's `prefill` and `decode` signatures.

The cache lives on our side, as LiteRT-LM keeps it: every call passes each layer's keys and
values in and takes the updated ones back. A prompt is prefilled in calls of the program's fixed
prefill length (the last one padded), then one token per decode call. A prefill call writes all
of its positions, so it is only used where they fit the cache; the tail of a prompt that would
overrun the cache goes through decode calls. Scoring a window is a prefill from position 0 with
a fresh cache.
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

INSTALL_HINT = "pip install 'smolconvert[litert]'"


class LitertRunner:
    runtime = "litert"

    def __init__(self, path: str | Path, threads: int | None = None, cache_axis: int = 2) -> None:
        """`cache_axis`: the cache's position axis (ours: (1, kv_heads, context, head_dim);
        litert-torch's own models: (1, context, kv_heads, head_dim), axis 1)."""
        try:
            with progress.native_stderr_off():
                from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise MissingDependencyError(
                f"the LiteRT runner needs ai-edge-litert: {INSTALL_HINT}"
            ) from None
        import importlib.metadata

        try:
            with progress.native_stderr_off():  # it announces the XNNPACK delegate
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
                # ours is `prefill`; litert-torch names one prefill length `prefill_<P>`
                names = sorted(self.interpreter.get_signature_list())
                prefill = [n for n in names if n == "prefill" or n.startswith("prefill_")]
                if not prefill or "decode" not in names:
                    raise ValueError(f"no prefill and decode signatures (it has {names})")
                self.prefill = self.interpreter.get_signature_runner(prefill[0])
                self.decode = self.interpreter.get_signature_runner("decode")
        except (ValueError, RuntimeError) as e:
            raise CorruptFileError(f"LiteRT could not load {path}: {e}") from None
        inputs = self.prefill.get_input_details()
        self.cache_inputs = sorted(n for n in inputs if n.startswith("kv_cache_"))
        if not self.cache_inputs or "tokens" not in inputs:
            raise CorruptFileError(f"{path} has no prefill signature with a KV cache")
        shape = tuple(int(x) for x in inputs[self.cache_inputs[0]]["shape"])
        self.cache_shape = shape
        self.context = shape[cache_axis]
        self.chunk = int(inputs["tokens"]["shape"][1])
        self.started = False
        version = importlib.metadata.version("ai-edge-litert")
        self.description = (
            f"ai-edge-litert {version} interpreter, XNNPACK, {Path(path).name}, prefill of "
            f"{self.chunk}, cache of {self.context} positions"
        )

    def _empty(self) -> dict[str, NDArray[np.float32]]:
        return {n: np.zeros(self.cache_shape, np.float32) for n in self.cache_inputs}

    def _call(
        self, runner: Any, ids: Sequence[int], start: int, cache: dict[str, Any]
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        n = len(ids)
        t = self.chunk if runner is self.prefill else 1
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = ids
        pos = np.arange(start, start + t, dtype=np.int32)
        if self.started:
            out = runner(tokens=tokens, input_pos=pos, **cache)
        else:  # the XNNPACK delegate announces itself on the first call
            with progress.native_stderr_off():
                out = runner(tokens=tokens, input_pos=pos, **cache)
            self.started = True
        return out["logits"][0, :n], {name: out[name] for name in self.cache_inputs}

    def _forward(
        self, ids: Sequence[int], start: int, cache: dict[str, Any]
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        """Logits (T, vocab) of `ids` at positions start.., and the cache after them."""
        if start + len(ids) > self.context:
            raise ConfigError(
                f"{start + len(ids)} positions do not fit the program's cache of "
                f"{self.context} (export with -O max_context_len=N)"
            )
        rows = []
        at = 0
        while at < len(ids):
            if len(ids) - at > 1 and start + at + self.chunk <= self.context:
                piece = ids[at : at + self.chunk]
                logits, cache = self._call(self.prefill, piece, start + at, cache)
            else:
                piece = ids[at : at + 1]
                logits, cache = self._call(self.decode, piece, start + at, cache)
            rows.append(logits)
            at += len(piece)
        return np.concatenate(rows) if len(rows) > 1 else rows[0], cache

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        logits, _ = self._forward(token_ids, 0, self._empty())
        return np.asarray(logits, np.float32)

    def greedy_steps(self, prompt_ids: Sequence[int]) -> Iterator[int]:
        logits, cache = self._forward(prompt_ids, 0, self._empty())
        position = len(prompt_ids)
        while True:
            token = int(logits[-1].argmax())
            yield token
            logits, cache = self._forward([token], position, cache)
            position += 1

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        return time_greedy(self.greedy_steps(prompt_ids), len(prompt_ids), n_new)


def open_litert_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> LitertRunner:
    return LitertRunner(art.path("model"), threads)
