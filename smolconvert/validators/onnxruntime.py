"""The onnxruntime runner: per-position logits and timed greedy decoding with the KV cache.

It drives an exported decoder the way optimum / Transformers.js / onnxruntime-genai do: a prefill
run with empty past tensors, then one token per run with the presents fed back as past. Any graph
with those IO names works (ours, or the onnxruntime-genai builder's when it keeps position_ids).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert.artifact import Artifact
from smolconvert.errors import CorruptFileError, MissingDependencyError
from smolconvert.validators.runner import GenerationTiming, time_greedy

INSTALL_HINT = "pip install 'smolconvert[onnx]'"
# The KV cache element types: float, or int8 where GroupQueryAttention keeps a quantized cache.
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


class OnnxRuntimeRunner:
    runtime = "onnxruntime"

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError(
                f"the onnxruntime runner needs onnxruntime: {INSTALL_HINT}"
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CorruptFileError(f"onnxruntime could not load {path}: {e}") from None
        self.n_ctx = n_ctx
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.endswith("value")),
        )
        self.has_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        self.past_dtype = _NP_TYPES[first.type]
        self.kv_heads, self.head_dim = _kv_dims(Path(path), first.shape)
        self.outputs = ["logits"] + [
            n.replace("past_key_values", "present") for n in self.past_names
        ]
        self.description = (
            f"onnxruntime {ort.__version__} CPU, {Path(path).name}, "
            f"{opts.intra_op_num_threads} threads"
        )

    def _run(
        self, ids: list[int], start: int, past: list[NDArray]
    ) -> tuple[NDArray, list[NDArray]]:
        n = len(ids)
        feed: dict[str, Any] = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, start + n), np.int64),
        }
        if self.has_position_ids:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        feed.update(zip(self.past_names, past, strict=True))
        logits, *presents = self.session.run(self.outputs, feed)
        return logits[0], presents

    def empty_past(self) -> list[NDArray]:
        shape = (1, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.past_dtype) for _ in self.past_names]

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        out, _ = self._run(list(token_ids), 0, self.empty_past())
        return out.astype(np.float32)

    def greedy_steps(self, prompt_ids: Sequence[int]) -> Iterator[int]:
        """Greedy tokens, one per next(): the first after the prompt's prefill, then one decode
        step (with the cache) each, without end."""
        ids = list(prompt_ids)
        logits, past = self._run(ids, 0, self.empty_past())
        position = len(ids)
        while True:
            token = int(np.argmax(logits[-1]))
            yield token
            logits, past = self._run([token], position, past)
            position += 1

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        return time_greedy(self.greedy_steps(prompt_ids), len(prompt_ids), n_new)


def _kv_dims(path: Path, shape: list[Any]) -> tuple[int, int]:
    """KV heads and head size: from the graph, or (symbolic dims, as the onnxruntime-genai builder
    writes them) from a genai_config.json beside the graph or one folder up."""
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape[1], shape[3]
    for folder in (path.parent, path.parent.parent):
        config = folder / "genai_config.json"
        if config.is_file():
            decoder = json.loads(config.read_text(encoding="utf-8"))["model"]["decoder"]
            return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    raise CorruptFileError(
        f"{path}: past_key_values dims are symbolic {shape} and no genai_config.json says them"
    )


def open_onnxruntime_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(str(art.path("model")), n_ctx, threads)
