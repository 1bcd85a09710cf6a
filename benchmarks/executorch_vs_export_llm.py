"""ExecuTorch 8da4w: smolconvert's export against ExecuTorch's own LLM recipe, same model, one run.

    python benchmarks/executorch_vs_export_llm.py [--source default] [--windows 4] [--work DIR]
        [--ours DIR] [--repeats 3] [--skip-embedding-size]

1. Writes the source as a Hugging Face folder (fp32 safetensors) and, from the same tensors, what
   ExecuTorch's recipe reads: a Meta-format checkpoint (the mapping of the wheel's
   examples/models/smollm2/convert_weights.py, done here because that script needs torchtune:
   names mapped, q/k rows permuted from HF's rotate-half layout to Meta's interleaved pairs as
   torchtune's hf_to_tune does, output.weight the tied embedding) and a params json written from
   the model's spec (the fields of ExecuTorch's examples/models/smollm2/135M_config.json).
2. Times ExecuTorch's recipe, `python -m executorch.extension.llm.export.export_llm`, in a child
   process: base.model_class=smollm2, quantization.qmode=8da4w with group_size=32 (the recipe's
   default 128 does not divide 576, and its filter silently leaves every linear whose input width
   is not whole groups float), the recipe's default HQQ scale search left on, KV cache, the custom
   sdpa_with_kv_cache op, XNNPACK, dynamic shape, max_seq_length = max_context_length = 2048 (our
   default cache) and debug.generate_full_logits (without it its program returns only the last
   position's logits, and quality could not be scored on every position), first with an fp32
   embedding. The same recipe with embedding_quantize=4,32 is exported too and, when the
   runtime has that kernel after `import executorch.kernels.quantized`, measured as a third
   program with its own table; otherwise its size only is printed (--skip-embedding-size skips
   it).
3. Times smolconvert's `executorch:8da4w` from the same folder, or reuses --ours DIR (a folder
   with artifact.json and model.pte).
4. Runs both programs in ExecuTorch's Python runtime (`executorch.runtime`, XNNPACK) in this
   process through the same harness, smolconvert's ExecutorchRunner: `forward(tokens (1, T) int64,
   input_pos (1,) int64)`, the convention of both programs, prefill at position 0 then one token a
   call. Quality: smolconvert's protocol (windows of --ctx tokens of the default evaluation text,
   second halves scored) against the fp32 reference decoder: mean KL divergence and top-1
   agreement. Speed: greedy decode tokens/s after a 128-token prompt, 128 steps, median of
   --repeats runs interleaved across the two programs. Prints a markdown table, ratios ours / peer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peer_run import measure, print_table, timed  # benchmarks/, this script's folder

import smolconvert
from smolconvert.model.hf_folder import save_hf_folder
from smolconvert.validators.executorch import ExecutorchRunner

GROUP = 32
MAX_SEQ = 2048
EMBEDDING_OP = "quantized_decomposed::embedding_4bit.out"
# Meta (llama_transformer) names of a layer's tensors, by HF name
LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def meta_checkpoint(hf: Path, spec: Any, out: Path) -> Path:
    """The Meta-format state dict ExecuTorch's llama model loads, from the HF folder's tensors."""
    import torch
    from safetensors.torch import load_file

    hf_sd = load_file(str(hf / "model.safetensors"))

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # HF's rotate-half rows -> Meta's interleaved (re, im) pairs, as torchtune's hf_to_tune
        return w.view(heads, 2, spec.head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd: dict[str, torch.Tensor] = {}
    for i in range(spec.n_layers):
        for hf_name, meta_name in LAYER_NAMES.items():
            w = hf_sd[f"model.layers.{i}.{hf_name}.weight"].float()
            if hf_name.endswith("q_proj"):
                w = permute(w, spec.n_heads)
            elif hf_name.endswith("k_proj"):
                w = permute(w, spec.n_kv_heads)
            sd[f"layers.{i}.{meta_name}.weight"] = w.contiguous()
    sd["tok_embeddings.weight"] = hf_sd["model.embed_tokens.weight"].float()
    sd["norm.weight"] = hf_sd["model.norm.weight"].float()
    sd["output.weight"] = hf_sd.get("lm_head.weight", sd["tok_embeddings.weight"])
    torch.save(sd, out)
    return out


def params_json(spec: Any, out: Path) -> Path:
    """ModelArgs fields as in ExecuTorch's examples/models/smollm2/135M_config.json."""
    params = {
        "dim": spec.hidden_size,
        "ffn_dim_multiplier": 1,
        "hidden_dim": spec.intermediate_size,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads,
        "n_layers": spec.n_layers,
        "norm_eps": round(spec.rms_norm_eps, 9),
        "rope_theta": spec.rope_theta,
        "use_scaled_rope": False,
        "vocab_size": spec.vocab_size,
        "use_hf_rope": False,
        "attention_qkv_bias": False,
    }
    if spec.head_dim != spec.hidden_size // spec.n_heads:
        params["head_dim"] = spec.head_dim
    out.write_text(json.dumps(params, indent=2) + "\n")
    return out


def export_llm(checkpoint: Path, params: Path, out_dir: Path, name: str, extra: list[str]) -> Path:
    """ExecuTorch's recipe (hydra CLI) in a child process; returns the .pte it wrote."""
    cmd = [
        sys.executable,
        "-m",
        "executorch.extension.llm.export.export_llm",
        "base.model_class=smollm2",
        f"base.checkpoint={checkpoint}",
        f"base.params={params}",
        "model.use_kv_cache=True",
        "model.use_sdpa_with_kv_cache=True",
        "model.enable_dynamic_shape=True",
        "backend.xnnpack.enabled=True",
        "quantization.qmode=8da4w",
        f"quantization.group_size={GROUP}",
        f"export.max_seq_length={MAX_SEQ}",
        f"export.max_context_length={MAX_SEQ}",
        f"export.output_dir={out_dir}",
        f"export.output_name={name}",
        "debug.generate_full_logits=True",
        *extra,
    ]
    # cwd: hydra writes its outputs/ log folder there
    done = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise RuntimeError(f"export_llm failed ({done.returncode}):\n{tail}")
    return out_dir / f"{name}.pte"


def runtime_has_embedding_kernel() -> bool:
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    return EMBEDDING_OP in _get_operator_names()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per program (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the fp32 reference)")
    ap.add_argument("--work", type=Path, default=None, help="keeps the exports (else a tmp dir)")
    ap.add_argument("--ours", type=Path, default=None, help="reuse this executorch:8da4w folder")
    ap.add_argument(
        "--skip-embedding-size",
        action="store_true",
        help="skip the size-only export of the recipe with embedding_quantize=4,32",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, (args.work or Path(tmp)).resolve())


def run(args: argparse.Namespace, work: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    model = smolconvert.load(args.source)
    spec = model.spec
    if spec.architecture != "llama" or spec.hidden_size % GROUP:
        sys.exit(f"ExecuTorch's smollm2 recipe needs a llama model with width % {GROUP} == 0")
    hf = save_hf_folder(model, work / "hf")
    peer_dir = work / "export_llm"
    peer_dir.mkdir(exist_ok=True)
    ckpt = meta_checkpoint(hf, spec, peer_dir / "model_meta.pth")
    params = params_json(spec, peer_dir / "params.json")

    peer, t_peer = timed(export_llm, ckpt, params, peer_dir, "peer_8da4w_g32", [])
    peer_emb, t_peer_emb = None, float("nan")
    if not args.skip_embedding_size:
        peer_emb, t_peer_emb = timed(
            export_llm,
            ckpt,
            params,
            peer_dir,
            "peer_8da4w_g32_emb4",
            ["quantization.embedding_quantize='4,32'"],
        )
    if args.ours is not None:
        if not (args.ours / "artifact.json").is_file():
            sys.exit(f"--ours {args.ours}: no artifact.json, not a finished export")
        ours_dir, t_ours = args.ours, float("nan")
    else:
        art, t_ours = timed(smolconvert.export, hf, to="executorch:8da4w", out=work / "ours")
        ours_dir = art.folder
    programs = {"ours": ours_dir / "model.pte", "peer": peer}
    kernel = runtime_has_embedding_kernel()
    if peer_emb is not None and kernel:  # the recipe as shipped, when this runtime can run it
        programs["peer_emb4"] = peer_emb
    rows, tokens, text, prompt = measure(
        model,
        programs,
        lambda _who, path: ExecutorchRunner(path),
        ctx=args.ctx,
        n_windows=args.windows,
        repeats=args.repeats,
        threads=args.threads,
    )
    rows["ours"]["export_s"], rows["peer"]["export_s"] = t_ours, t_peer
    if "peer_emb4" in rows:
        rows["peer_emb4"]["export_s"] = t_peer_emb

    import executorch.version

    print(f"\nsource: {model.name} ({model.origin}); executorch {executorch.version.__version__}")
    print(f"ours: {programs['ours']}\npeer: {programs['peer']}")
    print(
        f"quality: {args.windows} windows of {args.ctx} tokens of {text.name}, second halves "
        f"scored against the fp32 reference; decode: {len(prompt)}-token prompt, 128 greedy "
        f"steps, median of {args.repeats}, both in executorch.runtime (XNNPACK), same process\n"
    )
    print_table(
        rows,
        tokens,
        ".pte size (MB)",
        "smolconvert executorch:8da4w",
        "export_llm 8da4w g32, fp32 embedding",
    )
    if "peer_emb4" in rows:
        print()
        print_table(
            {"ours": rows["ours"], "peer": rows["peer_emb4"]},
            {"ours": tokens["ours"], "peer": tokens["peer_emb4"]},
            ".pte size (MB)",
            "smolconvert executorch:8da4w",
            "export_llm 8da4w g32, embedding 4-bit g32",
        )
    if args.ours is not None:
        print(f"ours reused from {args.ours}: its export time was not measured here (nan)")
    print(
        f"{EMBEDDING_OP} {'is' if kernel else 'is NOT'} in this runtime's operators (after "
        "importing executorch.kernels.quantized)"
    )
    if peer_emb is not None and not kernel:
        mb = peer_emb.stat().st_size / 1e6
        print(
            f"peer with embedding_quantize=4,32 (size only, not runnable here): {mb:.1f} MB, "
            f"ours / it {rows['ours']['size_mb'] / mb:.3f}; exported in {t_peer_emb:.0f} s"
        )
    print(json.dumps(rows, sort_keys=True))


if __name__ == "__main__":
    main()
