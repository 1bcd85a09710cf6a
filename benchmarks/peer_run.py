"""What the side-by-side benchmarks share: quality of each program against the fp32 reference on
the same windows, decode speed interleaved across programs, and the ratio table.

Imported by benchmarks/*_vs_*.py, which run as scripts (this folder is on their sys.path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smolconvert.validators import quality as Q

METRICS = (
    ("mean KLD vs fp32", "kld_mean", "{:.5f}"),
    ("KLD p99", "kld_p99", "{:.4f}"),
    ("top-1 agreement", "top1", "{:.4f}"),
    ("perplexity ratio vs fp32", "ppl_ratio", "{:.4f}"),
    ("decode tok/s", "tok_s", "{:.1f}"),
    ("export time (s)", "export_s", "{:.0f}"),
)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def measure(
    model: Any,
    programs: dict[str, Path],
    open_runner: Callable[[str, Path], Any],
    *,
    ctx: int,
    n_windows: int,
    repeats: int,
    threads: int,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, ...]], Any, list[int]]:
    """Rows by program name (size, quality against the fp32 reference, median decode tok/s), the
    greedy tokens each decoded, the evaluation text and the prompt. `open_runner(name, path)`
    opens a runner with `logits` and `time_generation`; one runner is alive at a time."""
    from smolconvert.model.reference import build_reference
    from smolconvert.texts import default_eval_text
    from smolconvert.validators.runner import TorchRunner

    text = default_eval_text()
    windows = Q.tokenize_windows(model.tokenizer, text, ctx, n_windows)
    key = (model.sha256, text.sha256, str(ctx), str(len(windows)))
    reference = TorchRunner(build_reference(model.spec, source=model.weights), "fp32", threads)
    ref = Q.reference_scores(key, windows, reference.logits)
    del reference
    rows: dict[str, dict[str, float]] = {}
    for who, path in programs.items():
        runner = open_runner(who, path)
        q = Q.compare(ref, runner.logits)
        rows[who] = {
            "size_mb": path.stat().st_size / 1e6,
            "kld_mean": q.kld_mean,
            "kld_p99": q.kld_p99,
            "top1": q.top1,
            "ppl_ratio": q.ppl_ratio,
        }
        del runner
    prompt, n_new = [t for w in windows for t in w][:128], 128
    speeds: dict[str, list[float]] = {who: [] for who in programs}
    tokens: dict[str, tuple[int, ...]] = {}
    for _ in range(repeats):  # interleaved, one program loaded at a time
        for who, path in programs.items():
            timing = open_runner(who, path).time_generation(prompt, n_new)
            speeds[who].append(timing.decode_tok_s)
            tokens[who] = timing.tokens
    for who in programs:
        rows[who]["tok_s"] = statistics.median(speeds[who])
    return rows, tokens, text, prompt


def print_table(
    rows: dict[str, dict[str, float]],
    tokens: dict[str, tuple[int, ...]],
    size_label: str,
    ours: str,
    peer: str,
) -> None:
    """The markdown table of ours against peer, with the ratio ours / peer per metric."""
    print(f"| metric | ours ({ours}) | peer ({peer}) | ours / peer |")
    print("|---|---:|---:|---:|")
    for label, k, fmt in ((size_label, "size_mb", "{:.1f}"), *METRICS):
        a, b = rows["ours"][k], rows["peer"][k]
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.3f} |")
    same = sum(x == y for x, y in zip(tokens["ours"], tokens["peer"], strict=True))
    print(f"\ngreedy continuations agree on {same}/{len(tokens['ours'])} tokens")
