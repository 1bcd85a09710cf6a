"""LiteRT int8: smolconvert's export against litert-torch's own SmolLM2 recipe, same model, one run.

    python benchmarks/litert_vs_litert_torch.py [--source default] [--windows 4] [--work DIR]
        [--ours DIR] [--repeats 3] [--scheme int8]

1. Writes the source as a Hugging Face folder (fp32 safetensors).
2. Converts it with litert-torch's own recipe in this process: the SmolLM2 model of its example
   (litert_torch/generative/examples/smollm: `build_model_v2`, loaded by its own loader from the
   folder), `converter.convert_to_tflite` with the example's defaults (kv_cache_max_len 1280,
   quantize dynamic_int8, or dynamic_int4_block32 for --scheme int4), one prefill length of 128
   (ours) instead of the example's six, and ExportConfig(output_logits_on_prefill=True): without
   it its prefill returns no logits and quality could not be scored on every position.
3. Converts the same folder with smolconvert's `litert:SCHEME`, or reuses --ours DIR.
4. Runs both files in LiteRT's interpreter (ai_edge_litert, XNNPACK) in this process through the
   same harness, smolconvert's LitertRunner (both programs have signatures prefill and decode with
   tokens, input_pos and kv_cache_k_<i>/kv_cache_v_<i>; litert-torch's cache is (1, context, kv,
   D), ours (1, kv, context, D)). Quality: smolconvert's protocol (windows of --ctx tokens of the
   default evaluation text, second halves scored) against the fp32 reference decoder. Speed:
   greedy decode tokens/s after a 128-token prompt, 128 steps, median of --repeats runs
   interleaved across the two files. Prints a markdown table, ratios ours / peer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from peer_run import measure, print_table, timed  # benchmarks/, this script's folder

import smolconvert
from smolconvert.model.hf_folder import save_hf_folder
from smolconvert.validators.litert import LitertRunner

CONTEXT = 1280  # litert-torch's default kv_cache_max_len, and ours
PREFILL = 128
PEER_QUANT = {"int8": "dynamic_int8", "int4": "dynamic_int4_block32"}


def _tensorflow_schema_shim() -> None:
    """litert-torch 0.10's generative converter imports the TFLite flatbuffer schema from
    tensorflow (layers/lora.py), which it does not depend on; ai_edge_litert ships the same
    generated module. Only the LoRA path uses it, and this run has no LoRA."""
    import importlib.machinery
    import types

    from ai_edge_litert import schema_py_generated

    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        sys.modules.setdefault(name, module)
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated


def litert_torch_recipe(hf: Path, out_dir: Path, quantize: str) -> Path:
    """litert-torch's SmolLM2 example conversion of the folder (module doc, step 2)."""
    _tensorflow_schema_shim()
    from litert_torch.generative.examples.smollm import smollm
    from litert_torch.generative.utilities import converter, export_config

    # the mask cache the example sizes from its flags (converter.get_mask_cache_size_from_flags)
    model = smollm.build_model_v2(str(hf), mask_cache_size=CONTEXT)
    config = export_config.ExportConfig(output_logits_on_prefill=True)
    with contextlib.redirect_stdout(io.StringIO()):
        path = converter.convert_to_tflite(
            model,
            output_path=str(out_dir),
            output_name_prefix="smollm2_litert_torch",
            prefill_seq_len=PREFILL,
            kv_cache_max_len=CONTEXT,
            quantize=quantize,
            export_config=config,
        )
    return Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--scheme", choices=sorted(PEER_QUANT), default="int8")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per file (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the fp32 reference)")
    ap.add_argument("--work", type=Path, default=None, help="keeps the exports (else a tmp dir)")
    ap.add_argument("--ours", type=Path, default=None, help="reuse this litert:SCHEME folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, (args.work or Path(tmp)).resolve())


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    model = smolconvert.load(args.source)
    spec = model.spec
    if spec.architecture != "llama":
        sys.exit("litert-torch's SmolLM2 example builds a llama-shaped SmolLM2 only")
    hf = save_hf_folder(model, work / "hf")
    peer_dir = work / "litert_torch"
    peer_dir.mkdir(exist_ok=True)
    peer, t_peer = timed(litert_torch_recipe, hf, peer_dir, PEER_QUANT[args.scheme])
    if args.ours is not None:
        if not (args.ours / "artifact.json").is_file():
            sys.exit(f"--ours {args.ours}: no artifact.json, not a finished export")
        ours_dir, t_ours = args.ours, float("nan")
    else:
        art, t_ours = timed(
            smolconvert.export, hf, to=f"litert:{args.scheme}", out=work / "ours", quiet=True
        )
        ours_dir = art.folder
    programs = {"ours": ours_dir / "model.tflite", "peer": peer}
    axis = {"ours": 2, "peer": 1}  # the cache's position axis (module doc)
    rows, tokens, text, prompt = measure(
        model,
        programs,
        lambda who, path: LitertRunner(path, args.threads, cache_axis=axis[who]),
        ctx=args.ctx,
        n_windows=args.windows,
        repeats=args.repeats,
        threads=args.threads,
    )
    rows["ours"]["export_s"], rows["peer"]["export_s"] = t_ours, t_peer

    import importlib.metadata

    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("litert-torch", "ai-edge-litert")
    )
    print(f"\nsource: {model.name} ({model.origin}); {versions}")
    print(f"ours: {programs['ours']}\npeer: {programs['peer']}")
    print(
        f"quality: {args.windows} windows of {args.ctx} tokens of {text.name}, second halves "
        f"scored against the fp32 reference; decode: {len(prompt)}-token prompt, 128 greedy "
        f"steps, median of {args.repeats}, both in ai_edge_litert's interpreter (XNNPACK, "
        f"{args.threads} threads), same process\n"
    )
    print_table(
        rows,
        tokens,
        ".tflite size (MB)",
        f"smolconvert litert:{args.scheme}",
        f"litert-torch SmolLM2, {PEER_QUANT[args.scheme]}",
    )
    if args.ours is not None:
        print(f"ours reused from {args.ours}: its export time was not measured here (nan)")
    print(json.dumps(rows, sort_keys=True))


if __name__ == "__main__":
    main()
