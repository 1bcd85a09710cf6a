"""Core ML int4: smolconvert's coreml:int4 vs plain coremltools int4, same model, same run.

    python benchmarks/coreml_vs_coremltools.py [--source default] [--windows 2] [--ctx 512]
        [--work DIR] [--fp16-package X.mlpackage] [--ours ARTIFACT_DIR]

1. Exports coreml:fp16 (or reuses --fp16-package) and compresses it with coremltools'
   `linear_quantize_weights`, int4 per-block 32: symmetric (`linear_symmetric`, int4) and
   asymmetric (`linear`, uint4 with a uint4 zero point), the tied embedding included.
2. Exports coreml:int4 (or reuses --ours).
3. Scores all three with the same evaluator (smolconvert's mlprogram evaluator on Linux, Core ML
   on macOS) against the same fp32 reference windows; prints size, mean KLD and our KLD / theirs.

On the default model (SmolLM2-135M-Instruct from a Q4_1 GGUF) the weights already lie on a Q4_1
grid, which an asymmetric 4-bit block-32 code with an fp16 offset reproduces almost exactly: our
advantage there is larger than it would be on the original bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import smolconvert
from smolconvert.artifact import Artifact
from smolconvert.validators import quality as Q
from smolconvert.validators.coreml import CoreMLRunner
from smolconvert.validators.runner import TorchRunner


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def coremltools_int4(fp16_package: Path, out: Path, mode: str) -> Path:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    if (out / "Manifest.json").is_file():  # reuse a finished compression from an earlier run
        return out
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(
            mode=mode,
            dtype="int4" if mode == "linear_symmetric" else "uint4",
            granularity="per_block",
            block_size=32,
        )
    )
    model = ct.models.MLModel(str(fp16_package), skip_model_load=True)
    cto.linear_quantize_weights(model, config).save(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("bench-coreml"))
    ap.add_argument("--fp16-package", type=Path)
    ap.add_argument("--ours", type=Path, help="an existing coreml:int4 artifact folder")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = smolconvert.load(args.source)
    timings = {}

    fp16 = args.fp16_package
    if fp16 is None:
        start = time.perf_counter()
        art = smolconvert.export(model, to="coreml:fp16", out=args.work / "fp16")
        timings["export coreml:fp16"] = time.perf_counter() - start
        fp16 = art.path("model")
    candidates = {}
    for label, mode in (
        ("coremltools int4 symmetric", "linear_symmetric"),
        ("coremltools uint4 asymmetric", "linear"),
    ):
        start = time.perf_counter()
        candidates[label] = coremltools_int4(fp16, args.work / f"{mode}.mlpackage", mode)
        timings[label] = time.perf_counter() - start
    if args.ours is None:
        start = time.perf_counter()
        ours = smolconvert.export(model, to="coreml:int4", out=args.work / "int4")
        timings["smolconvert coreml:int4"] = time.perf_counter() - start
        candidates["smolconvert coreml:int4"] = ours.path("model")
    else:
        candidates["smolconvert coreml:int4"] = Artifact.load(args.ours).path("model")

    from smolconvert.model.reference import build_reference

    text = Q.load_eval_text(None)
    windows = Q.tokenize_windows(model.tokenizer, text, args.ctx, args.windows)
    reference = TorchRunner(build_reference(model.spec, source=model.weights), "fp32")
    ref = Q.reference_scores(("bench", text.sha256, str(args.ctx)), windows, reference.logits)
    del reference
    results = {}
    for label, path in candidates.items():
        runner = CoreMLRunner(str(path), n_ctx=args.ctx)
        start = time.perf_counter()
        metrics = Q.compare(ref, runner.logits)
        results[label] = {
            "size_bytes": package_bytes(Path(path)),
            "kld_mean": metrics.kld_mean,
            "kld_p99": metrics.kld_p99,
            "top1": metrics.top1,
            "ppl_ratio": metrics.ppl_ratio,
            "score_s": time.perf_counter() - start,
            "engine": runner.description,
        }
        del runner
    ours = results["smolconvert coreml:int4"]
    for label in ("coremltools int4 symmetric", "coremltools uint4 asymmetric"):
        results[f"ratio kld ours/{label}"] = ours["kld_mean"] / results[label]["kld_mean"]
    print(
        json.dumps(
            {"windows": len(windows), "ctx": args.ctx, "results": results, "timings_s": timings},
            indent=2,
            sort_keys=True,
        )
    )
    for label, r in results.items():
        if isinstance(r, dict):
            print(
                f"{label:32s} {r['size_bytes'] / 1e6:7.1f} MB  kld_mean {r['kld_mean']:.4f}  "
                f"top1 {r['top1']:.3f}"
            )
        else:
            print(f"{label:32s} {r:.3f}")


if __name__ == "__main__":
    main()
