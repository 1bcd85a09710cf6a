"""Our ONNX exports (fp32, int4) against onnxruntime-genai's model builder, same model, one run.

Our rows: the shipped fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, packed
projections; int8 KV cache for int4 and int8) and the plain graph of standard ops, for fp32 and
int4, the int4 graph with a float KV cache ("f32kv"), plus int8. For each model:
size on disk, mean KLD against the fp32 reference decoder (same windows, scored second halves),
top-1 agreement, decode tokens/s (median of --repeats runs, interleaved across models) and the
peak RSS of a fresh process that loads the model and decodes, in two runtimes: plain onnxruntime
(our runner, the same harness for every graph) and onnxruntime-genai (the builder's home), both
on --threads intra-op threads (overlaid on each genai_config.json). The builder's and our fp32
and int4 are also timed in onnxruntime-genai as shipped, each folder's genai_config.json as
written: ours hands the thread count to onnxruntime (physical cores), the builder's leaves
genai's default (half the logical CPUs).
Prints ratios ours / builder: of the whole-run medians, and paired (`paired_ratios`: the
decoders alive together, taking turns of 16 steps, compared turn by turn), which on a shared
machine repeated within about 2-5% where the whole-run ratios moved by 10%, from a short and a
long prompt (--paired-contexts; the KV cache's share of a step grows with the context). The
paired group includes a second session of the builder's model: its ratio to the first (an A/A
control, 1.0 but for noise) shows what difference the run can resolve. Run on demand, never in
CI:

    python benchmarks/onnx_vs_genai_builder.py [--source default] [--windows 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: peak_rss_child's process must not carry it
    import torch


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix != ".json")


def kld_and_top1(
    ref_logits: list[torch.Tensor], runner, windows: list[list[int]]
) -> tuple[float, float]:
    import torch

    klds, agree = [], []
    for ref, win in zip(ref_logits, windows, strict=True):
        half = len(win) // 2
        q = torch.log_softmax(torch.from_numpy(runner.logits(win)[half:]).double(), -1)
        p = ref[half:]
        klds.append((p.exp() * (p - q)).sum(-1))
        agree.append((p.argmax(-1) == q.argmax(-1)).double())
    return float(torch.cat(klds).mean()), float(torch.cat(agree).mean())


def ort_decode_tok_s(graph: Path, threads: int, prompt: list[int], n_new: int) -> float:
    from smolconvert.validators.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(graph, threads=threads)
    return runner.time_generation(prompt, n_new).decode_tok_s


def genai_steps(
    folder: Path, prompt: list[int], max_length: int, threads: int | None
) -> Iterator[int]:
    """onnxruntime-genai's greedy tokens, one per next() (the first after the prefill), on
    `threads` intra-op threads, overlaid on the folder's genai_config.json so that every model
    runs on the same count; None: as the folder's own config says (ours hands the count to
    onnxruntime; the builder's names none, and genai then takes half the logical CPUs)."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads is not None:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while True:
        gen.generate_next_token()
        yield int(gen.get_next_tokens()[0])


def genai_decode_tok_s(folder: Path, prompt: list[int], n_new: int, threads: int | None) -> float:
    steps = genai_steps(folder, prompt, len(prompt) + n_new + 1, threads)
    next(steps)  # the prefill, untimed
    start = time.perf_counter()
    for _ in range(n_new):
        next(steps)
    return n_new / (time.perf_counter() - start)


def peak_rss_child(
    runtime: str, target: Path, prompt: list[int], threads: int, n_new: int = 16
) -> None:
    """In a fresh process (fresh_process_peak_rss_mb below): open `target` in `runtime` ("ort":
    a graph in our runner, "genai": a folder), prefill `prompt`, decode n_new steps, print the
    peak RSS in MB."""
    from smolconvert.validators.latency import peak_rss_mb

    if runtime == "ort":
        from smolconvert.validators.onnxruntime import OnnxRuntimeRunner

        steps = OnnxRuntimeRunner(target, threads=threads).greedy_steps(prompt)
    else:
        steps = genai_steps(target, prompt, len(prompt) + n_new + 2, threads)
    for _ in range(n_new + 1):
        next(steps)
    print(f"{peak_rss_mb():.1f}")


def fresh_process_peak_rss_mb(runtime: str, target: Path, prompt: list[int], threads: int) -> float:
    """Peak resident memory of a fresh process that loads `target` and decodes with it: what the
    runtime needs for the model (weights as it holds them after load, prepacked copies, cache)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from pathlib import Path; from onnx_vs_genai_builder import peak_rss_child; "
        f"peak_rss_child({runtime!r}, Path({str(target)!r}), {prompt!r}, {threads})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


TURN = 16  # decode steps per turn in the paired timing


def paired_ratios(
    steps: dict[str, Iterator[int]], rounds: int, block: int = TURN, drop: int = 2
) -> dict[str, float]:
    """Decode speed relative to the first decoder, paired: every decoder stays alive and they
    take turns decoding `block` steps (order reversed every round, so each sees the same context
    lengths); a step's latency is timed alone, the first `drop` of each turn are dropped (the
    switch), and each round compares the turns' median step latencies. Returns the median over
    rounds of first / each (above 1: faster than the first). Slow machine-wide drift, which
    whole-run medians cannot separate from the models, cancels inside a round."""
    names = list(steps)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        next(steps[name])  # the prefill, untimed
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            lat = []
            for _ in range(block):
                start = time.perf_counter()
                next(steps[name])
                lat.append(time.perf_counter() - start)
            medians[name].append(float(np.median(lat[drop:])))
    base = np.array(medians[names[0]])
    return {name: float(np.median(base / np.array(medians[name]))) for name in names}


def variants() -> dict[str, tuple[str, object, str]]:
    """Row name -> (scheme, recipe, graph) for our exports: the shipped fused graph, the plain
    one (standard ops) and the int4 graph with a float KV cache, so the fused ops' and the int8
    cache's gains are measured here, next to the builder."""
    import dataclasses

    from smolconvert.quantizers.onnx_recipes import SCHEMES

    return {
        "ours fp32": ("fp32", SCHEMES["fp32"], "fused"),
        "ours fp32 plain": ("fp32", SCHEMES["fp32"], "plain"),
        "ours int4": ("int4", SCHEMES["int4"], "fused"),
        "ours int4 f32kv": (
            "int4",
            dataclasses.replace(SCHEMES["int4"], kv_cache="float"),
            "fused",
        ),
        "ours int4 plain": ("int4", SCHEMES["int4"], "plain"),
        "ours int8": ("int8", SCHEMES["int8"], "fused"),
    }


def export_variant(model, scheme: str, recipe, graph: str, out: Path) -> Path:
    import smolconvert.exporters.onnx as onnx_exporter

    saved = onnx_exporter.SCHEMES[scheme]
    onnx_exporter.SCHEMES[scheme] = recipe
    try:
        art = onnx_exporter.export_onnx(model, scheme, out, quiet=True, options={"graph": graph})
        return art.folder
    finally:
        onnx_exporter.SCHEMES[scheme] = saved


def main(
    source: str,
    windows: int,
    threads: int,
    work: Path,
    precisions: tuple[str, ...] = ("fp32", "int4"),
    reference_speed: bool = True,
    repeats: int = 3,
    paired_rounds: int = 30,
    paired_contexts: tuple[int, ...] = (128, 2048),
) -> None:
    import torch

    import smolconvert
    from smolconvert.model.hf_folder import save_hf_folder
    from smolconvert.model.reference import build_reference
    from smolconvert.validators.onnxruntime import OnnxRuntimeRunner
    from smolconvert.validators.quality import load_eval_text, make_windows
    from smolconvert.validators.runner import TorchRunner

    torch.set_num_threads(threads)
    model = smolconvert.load(source)
    ids = model.tokenizer.encode(load_eval_text(None).text[:400_000])
    wins = make_windows(ids, 512, windows, model.spec.bos_token_id)
    prompt, n_new = wins[0][:128], 128
    ref = build_reference(model.spec, source=model.weights)
    ref_logits = [torch.log_softmax(ref.logits(w).double(), -1) for w in wins]
    ref_tok_s = (
        TorchRunner(ref, "fp32", threads).time_generation(prompt, n_new).decode_tok_s
        if reference_speed
        else float("nan")
    )
    del ref

    hf = save_hf_folder(model, work / "hf")
    folders: dict[str, Path] = {}
    for precision in precisions:
        out = work / f"builder-{precision}"
        if not (out / "genai_config.json").is_file():  # reuse a --work folder's builds
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(hf),
                    "-o",
                    str(out),
                    "-p",
                    precision,
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "cache"),
                ],
                check=True,
                capture_output=True,
            )
        folders[f"builder {precision}"] = out
    for name, (scheme, recipe, graph) in variants().items():
        if scheme == "fp32" and "fp32" not in precisions:
            continue
        out = work / name.replace(" ", "-")
        folders[name] = export_variant(model, scheme, recipe, graph, out)

    rows: dict[str, dict[str, float]] = {}
    graphs = {name: next(iter(sorted(folder.rglob("*.onnx")))) for name, folder in folders.items()}
    for name, folder in folders.items():
        runner = OnnxRuntimeRunner(graphs[name], threads=threads)
        kld, top1 = kld_and_top1(ref_logits, runner, wins)
        rows[name] = {"size_mb": folder_size(folder) / 1e6, "kld_mean": kld, "top1": top1}
        del runner
    # Timings interleaved round by round, so drifting machine load hits every model alike; one
    # session alive at a time (an idle session's spinning threads would slow the next one).
    ort_runs: dict[str, list[float]] = {name: [] for name in folders}
    genai_runs: dict[str, list[float]] = {name: [] for name in folders}
    # onnxruntime-genai with each folder's genai_config.json as written, thread count included
    as_shipped: dict[str, list[float]] = {
        f"{who} {p}": [] for p in precisions for who in ("builder", "ours")
    }
    for _ in range(repeats):
        for name in folders:
            ort_runs[name].append(ort_decode_tok_s(graphs[name], threads, prompt, n_new))
            genai_runs[name].append(genai_decode_tok_s(folders[name], prompt, n_new, threads))
            if name in as_shipped:
                as_shipped[name].append(genai_decode_tok_s(folders[name], prompt, n_new, None))
    for name in folders:
        rows[name]["ort_tok_s"] = float(np.median(ort_runs[name]))
        rows[name]["genai_tok_s"] = float(np.median(genai_runs[name]))
        rows[name]["ort_rss_mb"] = fresh_process_peak_rss_mb("ort", graphs[name], prompt, threads)
        rows[name]["genai_rss_mb"] = fresh_process_peak_rss_mb(
            "genai", folders[name], prompt, threads
        )
    print(f"reference (torch fp32) decode {ref_tok_s:.1f} tok/s, {threads} threads")
    print("peak RSS: a fresh process that loads the model, prefills 128 tokens, decodes 16")
    print(
        f"{'model':17} {'MB':>7} {'kld_mean':>9} {'top1':>6} {'ort tok/s':>10} "
        f"{'genai tok/s':>12} {'ort RSS MB':>11} {'genai RSS MB':>13}"
    )
    for name, r in rows.items():
        print(
            f"{name:17} {r['size_mb']:7.1f} {r['kld_mean']:9.5f} {r['top1']:6.3f} "
            f"{r['ort_tok_s']:10.1f} {r['genai_tok_s']:12.1f} "
            f"{r['ort_rss_mb']:11.0f} {r['genai_rss_mb']:13.0f}"
        )
    for mine, precision in (
        ("fp32", "fp32"),
        ("fp32 plain", "fp32"),
        ("int4", "int4"),
        ("int4 f32kv", "int4"),
        ("int4 plain", "int4"),
    ):
        if precision not in precisions:
            continue
        ours, theirs = rows[f"ours {mine}"], rows[f"builder {precision}"]
        print(
            f"{mine}: speed ours/builder onnxruntime "
            f"{ours['ort_tok_s'] / theirs['ort_tok_s']:.2f}x, "
            f"genai {ours['genai_tok_s'] / theirs['genai_tok_s']:.2f}x; "
            f"kld {ours['kld_mean']:.5f} vs {theirs['kld_mean']:.5f}; "
            f"size {ours['size_mb']:.1f} vs {theirs['size_mb']:.1f} MB; peak RSS "
            f"{ours['ort_rss_mb']:.0f} vs {theirs['ort_rss_mb']:.0f} MB (onnxruntime), "
            f"{ours['genai_rss_mb']:.0f} vs {theirs['genai_rss_mb']:.0f} MB (genai)"
        )
    for precision in precisions:
        builder, ours = (
            float(np.median(as_shipped[f"{w} {precision}"])) for w in ("builder", "ours")
        )
        print(
            f"{precision} in onnxruntime-genai as shipped (each folder's own genai_config.json, "
            f"{os.cpu_count()} CPUs): ours {ours:.1f} tok/s, builder {builder:.1f} tok/s, "
            f"{ours / builder:.2f}x"
        )
    for ctx in paired_contexts if paired_rounds else ():
        # the eval text's first ctx tokens: the cache's share of a step grows with the context
        start = ids[:ctx]
        print(
            f"paired ({paired_rounds} rounds of {TURN}-step turns, all decoders alive, "
            f"context {len(start)} -> {len(start) + paired_rounds * TURN}):"
        )
        for precision in precisions:
            # A/A control: a second session of the builder's model, timed like the others; its
            # ratio (1.0 but for noise) is the resolution of every ratio beside it
            builder, again = f"builder {precision}", f"builder {precision} again"
            names = [builder, f"ours {precision}"]
            names += [n for n in graphs if n.startswith(f"ours {precision} ") and "kv" in n]
            names.append(again)

            of = {n: builder if n == again else n for n in names}  # whose files each runs
            ort_steps = {
                n: OnnxRuntimeRunner(graphs[of[n]], threads=threads).greedy_steps(start)
                for n in names
            }
            ort_ratio = paired_ratios(ort_steps, paired_rounds)
            del ort_steps
            max_length = len(start) + paired_rounds * TURN + 2
            genai = {n: genai_steps(folders[of[n]], start, max_length, threads) for n in names}
            genai_ratio = paired_ratios(genai, paired_rounds)
            del genai
            for n in names[1:]:
                label = (
                    f"{precision} A/A, the builder against itself"
                    if n == again
                    else f"{n.removeprefix('ours ')}: speed ours/builder"
                )
                print(f"{label}: onnxruntime {ort_ratio[n]:.3f}x, genai {genai_ratio[n]:.3f}x")
    np.set_printoptions()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="default")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="intra-op threads for onnxruntime, onnxruntime-genai and the torch reference",
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--skip-fp32", action="store_true", help="builder and ours int4/int8 only")
    parser.add_argument("--no-reference-speed", action="store_true", help="skip timing torch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median)")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=30,
        help="rounds of the paired ours/builder timing (0: skip it)",
    )
    parser.add_argument(
        "--paired-contexts",
        default="128,2048",
        help="prompt lengths (tokens) the paired timing starts from, comma-separated",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(
            args.source,
            args.windows,
            args.threads,
            args.work or Path(tmp),
            ("int4",) if args.skip_fp32 else ("fp32", "int4"),
            not args.no_reference_speed,
            args.repeats,
            args.paired_rounds,
            tuple(int(x) for x in args.paired_contexts.split(",")),
        )
