"""The latency protocol, measured in a fresh Python process, and RunnerSpec: how to open a runner
there (kind "torch": the reference decoder on a model source; kind a target family: that family's
runner on an artifact folder), as JSON.

A 128-token prompt gives the time to first token; 128 greedy steps with the KV cache give decode
tokens/s; the child's peak RSS is the memory the runtime needed to do it (the parent has reference
logits and other models in memory, so its own peak would say nothing). One warm-up generation runs
first so one-time setup (thread pools, lazy weight packing) is not billed to the prompt.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from smolconvert.errors import SmolconvertError, ValidationError

if TYPE_CHECKING:
    from smolconvert.validators.runner import Runner

PROMPT_TOKENS = 128
NEW_TOKENS = 128


@dataclass(frozen=True)
class RunnerSpec:
    """How to open a runner in any process. kind "torch": `open_torch_runner(**kwargs)`; kind a
    target family: that family's runner on the artifact in kwargs["folder"], with n_ctx and
    threads."""

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_artifact(cls, art: Any, n_ctx: int, threads: int | None) -> RunnerSpec:
        folder = str(art.folder.resolve())
        return cls(art.target, {"folder": folder, "n_ctx": n_ctx, "threads": threads})

    def open(self) -> Runner:
        if self.kind == "torch":
            from smolconvert.validators.runner import open_torch_runner

            return open_torch_runner(**self.kwargs)
        from smolconvert.artifact import Artifact
        from smolconvert.targets import get_family

        kwargs = dict(self.kwargs)
        art = Artifact.load(kwargs.pop("folder"))
        return get_family(self.kind).open_runner(art, **kwargs)


@dataclass(frozen=True)
class LatencyMetrics:
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    decode_tok_s: float
    peak_rss_mb: float
    runner: str  # the runner's own description of what ran
    host: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_description() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()} {cpu}, {os.cpu_count()} cores".strip()


def measure_latency(
    spec: RunnerSpec, prompt_ids: Sequence[int], n_new: int = NEW_TOKENS
) -> LatencyMetrics:
    """Open the runner in a child process, warm it up, then time one prompt + n_new decode steps."""
    request = json.dumps(
        {"kind": spec.kind, "kwargs": spec.kwargs, "prompt": list(prompt_ids), "n_new": n_new}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "smolconvert.validators.latency"],
        input=request,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ValidationError(
            f"latency measurement failed (exit {proc.returncode}): "
            + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        )
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise ValidationError(f"latency measurement failed: {answer['error']}")
    return LatencyMetrics(**answer)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    # Linux keeps ru_maxrss across fork+exec, so a child's ru_maxrss starts at the parent's RSS at
    # fork time (2+ GB when the parent holds reference scores); VmHWM belongs to this image alone.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # macOS: bytes; Linux: KiB


def _child() -> None:
    request = json.loads(sys.stdin.read())
    try:
        runner = RunnerSpec(request["kind"], request["kwargs"]).open()
        prompt = request["prompt"]
        runner.time_generation(prompt[:16], 4)
        timing = runner.time_generation(prompt, request["n_new"])
    except SmolconvertError as e:
        print(json.dumps({"error": str(e)}))
        return
    print(
        json.dumps(
            asdict(
                LatencyMetrics(
                    prompt_tokens=timing.prompt_tokens,
                    new_tokens=timing.new_tokens,
                    ttft_ms=timing.ttft_ms,
                    decode_tok_s=timing.decode_tok_s,
                    peak_rss_mb=peak_rss_mb(),
                    runner=runner.description,
                    host=host_description(),
                )
            )
        )
    )


if __name__ == "__main__":
    _child()
