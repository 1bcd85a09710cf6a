"""The Core ML runner: coremltools' real predict on macOS, our mlprogram evaluator elsewhere.

Both drive the program the same way an app does (see the exporter's coreml_config.json): `inputIds`
(1, T) and an additive `causalMask` (1, 1, T, past+T); a stateful program keeps its KV cache in the
`keyCache`/`valueCache` states, a stateless one is re-run on the whole sequence. Quality scores one
window per call; generation is timed with the state. Which engine ran is in `description`, and on
Linux `notes` says plainly that its latency is not a Core ML device's.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert.artifact import Artifact
from smolconvert.errors import ConfigError, MissingDependencyError
from smolconvert.model.spec import MASK_VALUE
from smolconvert.validators.runner import GenerationTiming

INSTALL_HINT = "pip install 'smolconvert[coreml]'"


def causal_mask(past: int, t: int) -> NDArray[np.float32]:
    """(1, 1, t, past + t): query i (at position past + i) may see keys 0 .. past + i."""
    keys = np.arange(past + t)[None, :]
    queries = past + np.arange(t)[:, None]
    return np.where(keys <= queries, 0.0, MASK_VALUE).astype(np.float32)[None, None]


class _Evaluator:
    """smolconvert.validators.mil_eval on the saved program."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import torch

        from smolconvert.validators.mil_eval import MilProgram

        if threads:
            torch.set_num_threads(threads)
        self.program = MilProgram(path)
        self.stateful = bool(self.program.states)
        self.context = min(s.shape[3] for s in self.program.states.values()) if self.stateful else 0
        self.engine = (
            f"smolconvert mlprogram evaluator (torch {torch.__version__}, fp16 ops emulated "
            "in fp32 "
            f"with fp16-rounded outputs, {torch.get_num_threads()} threads), not Core ML"
        )

    def make_state(self) -> Any:
        return self.program.make_state()

    def predict(self, ids: NDArray[np.int32], mask: NDArray[np.float32], state: Any) -> Any:
        out = self.program.run({"inputIds": ids, "causalMask": mask}, state)["logits"]
        return out[0].numpy()


class _CoreML:
    """coremltools' MLModel.predict (macOS only): the real Core ML runtime."""

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self.model = ct.models.MLModel(str(path))
        spec = self.model.get_spec()
        self.stateful = len(spec.description.state) > 0
        self.context = (
            min(s.type.multiArrayType.shape[3] for s in spec.description.state)
            if self.stateful
            else 0
        )
        self.engine = f"Core ML via coremltools {ct.__version__} predict (compute units: all)"

    def make_state(self) -> Any:
        return self.model.make_state() if self.stateful else None

    def predict(self, ids: NDArray[np.int32], mask: NDArray[np.float32], state: Any) -> Any:
        inputs = {"inputIds": ids, "causalMask": mask.astype(np.float16)}
        out = (
            self.model.predict(inputs, state=state)
            if state is not None
            else self.model.predict(inputs)
        )
        return np.asarray(out["logits"], np.float32)[0]


class CoreMLRunner:
    runtime = "coreml"

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None) -> None:
        path = Path(path)
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                f"the Core ML runner needs coremltools: {INSTALL_HINT}"
            ) from None
        on_mac = sys.platform == "darwin" and not os.environ.get("SMOLCONVERT_COREML_EVALUATOR")
        self.engine: _Evaluator | _CoreML = _CoreML(path) if on_mac else _Evaluator(path, threads)
        if self.engine.stateful and n_ctx > self.engine.context:
            raise ConfigError(
                f"{path} holds a KV cache of {self.engine.context} tokens but {n_ctx} were asked "
                f"for; validate with a context of at most {self.engine.context}"
            )
        kind = "stateful KV cache" if self.engine.stateful else "stateless"
        self.description = f"{path.name} ({kind}) on {self.engine.engine}"
        self.notes: tuple[str, ...] = ()
        if isinstance(self.engine, _Evaluator):
            self.runtime = "coreml-evaluator"
            self.notes = (
                "Core ML cannot run on this OS: quality comes from smolconvert's evaluator of the "
                "saved mlprogram (every op of the program, fp16 emulated), not from Core ML itself",
                "latency figures are the evaluator's on this CPU, not a Core ML device's",
            )

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        ids = np.asarray([list(token_ids)], np.int32)
        out = self.engine.predict(ids, causal_mask(0, ids.shape[1]), self.engine.make_state())
        return np.asarray(out, np.float32)

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        engine = self.engine
        seq = list(prompt_ids)
        state = engine.make_state()
        start = time.perf_counter()
        out = engine.predict(np.asarray([seq], np.int32), causal_mask(0, len(seq)), state)
        token = int(np.argmax(out[-1]))
        ttft = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(n_new):
            if engine.stateful:  # one new token against the cached past
                out = engine.predict(
                    np.asarray([[token]], np.int32), causal_mask(len(seq), 1), state
                )
                seq.append(token)
            else:  # no cache: the whole sequence again, as an iOS 17 app would
                seq.append(token)
                out = engine.predict(np.asarray([seq], np.int32), causal_mask(0, len(seq)), None)
            token = int(np.argmax(out[-1]))
            tokens.append(token)
        decode = time.perf_counter() - start
        return GenerationTiming(len(prompt_ids), n_new, ttft * 1e3, n_new / decode, tuple(tokens))


def open_coreml_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> CoreMLRunner:
    return CoreMLRunner(str(art.path("model")), n_ctx, threads)
