"""ExecuTorch export: one .pte, lowered to XNNPACK, in the layout ExecuTorch's own LLM runner loads.

The runner's contract (executorch extension/llm/runner: text_decoder_runner.cpp, constants.h):
one method `forward(tokens int64 (1, T), input_pos int64 (1,)) -> logits`, the KV cache held
inside the program as mutable buffers, and constant methods that describe the model
(`get_max_seq_len`, `get_eos_ids`, `use_kv_cache`, ...). The cache is written and read with
ExecuTorch's own `llama::update_cache` and `llama::custom_sdpa` kernels, as its export_llama
does: attention then reads only the filled part of the cache and never copies it. Weights are
quantized by torchao (quantizers/executorch_recipes.py) before the graph is captured. The logits
cover every position of `tokens` (the runner takes the last row), so the validators can score
a whole window in one call. `tokenizer.json` beside the program is what the runner reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import MissingDependencyError, UnsupportedError
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import linear_shapes
from smolconvert.options import ExecutorchOptions, option_texts
from smolconvert.quantizers.executorch_recipes import (
    SCHEMES,
    ExecutorchScheme,
    check_shapes,
    embedding_codes,
    quantize_linears,
)
from smolconvert.quantizers.nbits import QuantizedWeight

INSTALL_HINT = "pip install 'smolconvert[executorch]'"
PROGRAM = "model.pte"
MAX_CONTEXT_LEN = 2048  # cache length when the options give none; capped by the model's positions
PREFILL_CHUNK = 128  # ExecuTorch's export_llm default max_seq_len
LAYOUT_NOTE = (
    "ExecuTorch LLM runner layout (extension/llm/runner): forward(tokens (1, T) int64, "
    "input_pos (1,) int64) -> logits (1, T, vocab) fp32; KV cache as mutable buffers "
    "(1, context_length, kv_heads, head_dim) written by llama::update_cache and read by "
    "llama::custom_sdpa; metadata as constant methods; XNNPACK delegate"
)


def describe_schemes() -> list[dict[str, Any]]:
    return [
        {
            "target": f"executorch:{s.name}",
            "bits_per_weight": s.linear.bits_per_weight if s.linear else 32.0,
            "linear": s.linear.name if s.linear else "fp32",
            "embedding": s.embedding.name if s.embedding else "fp32",
            "description": s.description,
        }
        for s in SCHEMES.values()
    ]


def context_length(spec: ModelSpec, options: ExecutorchOptions) -> int:
    wanted = int(options.max_context_len) if options.max_context_len else MAX_CONTEXT_LEN
    return min(wanted, spec.max_position_embeddings)


def prefill_chunk(context: int) -> int:
    """Tokens per call: the program plans memory for this many positions of logits (vocab
    floats each: 25 MB at SmolLM2's 49152 and 128 tokens, 400 MB at 2048)."""
    return min(PREFILL_CHUNK, context - 1)


def static_cache_decoder(reference: Any, context: int) -> Any:
    """The reference decoder's own modules behind ExecuTorch's runner contract (module doc)."""
    import torch
    from torch import nn

    spec = reference.spec

    class StaticCacheDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ref = reference
            shape = (1, context, spec.n_kv_heads, spec.head_dim)
            for i in range(spec.n_layers):
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape))
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape))

        def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
            t = tokens.shape[1]
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + t <= context)
            ref = self.ref
            h = ref.model.embed_tokens(tokens)  # (1, T, d)
            cos, sin = ref.rope((torch.arange(t) + start)[None], h.dtype)
            for i, layer in enumerate(ref.model.blocks()):
                attn = layer.self_attn
                q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)  # (1, heads, T, D)
                k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
                torch.ops.llama.update_cache(k.transpose(1, 2), k_cache, start)
                torch.ops.llama.update_cache(v.transpose(1, 2), v_cache, start)
                # causal over positions start..start+T, grouped query heads handled inside
                out = torch.ops.llama.custom_sdpa(
                    q.transpose(1, 2), k_cache, v_cache, start, None, 0, True
                )  # (1, T, heads, D)
                h = h + attn.o_proj(out.reshape(1, t, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            return ref.lm_head(ref.model.norm(h)).float()  # (1, T, vocab)

    return StaticCacheDecoder().eval().requires_grad_(False)


def quantized_embedding(codes: Any, scales: Any, bits: int) -> Any:
    """An embedding of biased codes (`embedding_codes` or nbits' symmetric blocks: uint8 (V, d),
    or (V, d / 2) two 4-bit codes per byte, low nibble first) and scales (V, groups), gathered
    and scaled with portable ops (index, float arithmetic): no kernel the PyPI runtime lacks."""
    import torch
    from torch import nn

    d = codes.shape[1] * (8 // bits)
    group = d // scales.shape[1]
    offset = 2 ** (bits - 1)

    class QuantizedEmbedding(nn.Module):
        codes: torch.Tensor  # buffers, registered in __init__
        scales: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("codes", codes)  # (V, d) or (V, d / 2) uint8
            self.register_buffer("scales", scales)  # (V, d / group) fp32

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            b, t = tokens.shape
            x = self.codes[tokens].float()  # (B, T, d or d / 2)
            if bits == 4:
                high = torch.floor(x / 16)
                x = torch.stack((x - 16 * high, high), dim=-1)  # low nibble first
            x = (x.reshape(b, t, d // group, group) - offset) * self.scales[tokens][..., None]
            return x.reshape(b, t, d)

    return QuantizedEmbedding()


def runner_metadata(model: CanonicalModel, max_len: int) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h):
    get_max_seq_len is the most tokens one call takes (the runner prefills longer prompts in
    pieces of it), get_max_context_len the cache's length."""
    special = model.tokenizer.special
    eos = [special.eos] if special.eos is not None else []
    return {
        "get_max_seq_len": prefill_chunk(max_len),
        "get_max_context_len": max_len,
        "get_vocab_size": model.spec.vocab_size,
        "get_bos_id": special.bos if special.bos is not None else -1,
        "get_eos_ids": eos,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_n_layers": model.spec.n_layers,
    }


def export_executorch(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: ExecutorchOptions | None = None,
) -> A.Artifact:
    if scheme not in SCHEMES:
        raise UnsupportedError(
            f"unknown ExecuTorch scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES))}"
        )
    if imatrix is not None:
        raise UnsupportedError("ExecuTorch schemes take no imatrix; drop --imatrix")
    sch = SCHEMES[scheme]
    opts = options or ExecutorchOptions()
    spec = model.spec
    check_shapes(sch, linear_shapes(spec))
    torch = _import_runtime()
    from smolconvert.model.reference import build_reference

    context = context_length(spec, opts)
    step = progress.Steps(quiet)
    levels, calibration = _levels(model, sch, opts, step)
    step("building the fp32 reference decoder")
    reference = build_reference(spec, source=model.weights)
    types = {"model.embed_tokens.weight": "fp32"}
    if sch.embedding is not None:
        # Tied: the embedding gathers the head's own levels (one quantization of the matrix;
        # torchao keeps the head's copy in XNNPACK's layout, so it is still stored twice).
        embed = "model.embed_tokens.weight"
        if embed in levels and sch.linear and sch.embedding.bits == sch.linear.bits:
            qw = levels[embed]
            codes = torch.from_numpy(qw.packed.reshape(spec.vocab_size, -1))
            scales = torch.from_numpy(qw.scales)
        else:
            codes, scales = embedding_codes(reference.model.embed_tokens.weight, sch.embedding)
        reference.model.embed_tokens = quantized_embedding(codes, scales, sch.embedding.bits)
        types[embed] = sch.embedding.name
    module = static_cache_decoder(reference, context)
    if sch.linear is not None:
        step(f"quantizing weights as {scheme} (torchao{', our levels' if levels else ''})")
    with progress.library_notes_off():
        linear_types = _canonical(quantize_linears(module, sch))
        _set_levels(module, levels, spec.tie_word_embeddings)
        types.update(linear_types)
        step(f"capturing the graph (torch.export, cache of {context} positions)")
        program = _lower(torch, module, runner_metadata(model, context), step)
    with A.staging(out) as stage:
        (stage / PROGRAM).write_bytes(program)
        model.tokenizer.save(stage)
        meta = {
            "format": "pte",
            "target": "executorch",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": PROGRAM, "tokenizer": "tokenizer.json"},
            "tensor_types": dict(sorted(types.items())),
            "options": option_texts(opts),
            "context_length": context,
            "runner_metadata": runner_metadata(model, context),
            "layout": LAYOUT_NOTE,
            "backend": "XNNPACK",
            "tool_versions": A.tool_versions("executorch", "torchao", "torch"),
        }
        if calibration is not None:
            meta["calibration"] = calibration
        meta = A.finish(stage, meta)
    return A.Artifact(out.resolve(), meta)


def _levels(
    model: CanonicalModel,
    scheme: ExecutorchScheme,
    options: ExecutorchOptions,
    step: progress.Steps,
) -> tuple[dict[str, QuantizedWeight], dict[str, Any] | None]:
    """Our levels and scales for the linears whose torchao format is one of our block codecs:
    GPTQ on the ONNX int4 calibration (exporters/onnx_weights.py) unless `gptq=off`, else
    round-to-nearest with the codec's scale search. Both beat torchao's own max|w| rounding
    (docs/executorch.md). Keys: canonical names; a tied head is `model.embed_tokens.weight`."""
    if scheme.codec is None:
        return {}, None
    from smolconvert.exporters.onnx_weights import quantize_weights
    from smolconvert.model.weights import canonical_names
    from smolconvert.quantizers.onnx_recipes import kv_hessians

    spec = model.spec
    plan: dict[str, str | None] = {}
    for name in canonical_names(spec):
        head = name == "lm_head.weight" or (
            name == "model.embed_tokens.weight" and spec.tie_word_embeddings
        )
        ours = head or (
            name.endswith("proj.weight")
            and scheme.config_for(name.removesuffix(".weight")) == scheme.linear
        )
        plan[name] = scheme.codec if ours else None
    mode = "off" if options.gptq == "off" else kv_hessians(options.gptq, spec.n_kv_heads)
    return quantize_weights(model, plan, step, gptq=mode != "off", kv_hessians=mode)


def _set_levels(module: Any, levels: dict[str, QuantizedWeight], tied: bool) -> None:
    """Write our levels and scales into the torchao tensors quantize_linears made: torchao
    dequantizes (qdata - zero_point) * scale, our symmetric blocks (level - 2^(b-1)) * scale."""
    import numpy as np
    import torch

    from smolconvert.quantizers.nbits import unpack

    for name, qw in levels.items():
        canonical = "lm_head.weight" if tied and name == "model.embed_tokens.weight" else name
        linear = module.get_submodule("ref." + canonical.removesuffix(".weight"))
        n, k = qw.shape
        fmt = qw.format
        codes = unpack(qw.packed, fmt.bits, fmt.block_size).reshape(n, -1)[:, :k]
        weight = linear.weight
        assert weight.qdata.shape == (n, k) and weight.scale.shape == qw.scales.shape, name
        offset = 1 << (fmt.bits - 1)
        weight.qdata = torch.from_numpy(codes.astype(np.int16) - offset).to(torch.int8)
        # XNNPACK refuses scales that are not positive: an all-zero block (scale 0, levels at
        # the zero point) reads 0 at any scale
        scales = np.where(qw.scales > 0, qw.scales, np.float32(2**-24))
        weight.scale = torch.from_numpy(scales).to(weight.scale.dtype)
        weight.zero_point = torch.zeros_like(weight.zero_point)


def _canonical(module_types: dict[str, str]) -> dict[str, str]:
    """Module names of the wrapper (`ref.model.layers.0.mlp.up_proj`) -> canonical weight names."""
    return {f"{n.removeprefix('ref.')}.weight": t for n, t in module_types.items()}


def _lower(torch: Any, module: Any, metadata: dict[str, Any], step: Any) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    # one dynamic length for prefill chunks and decode steps (below the cache length: at
    # T == context a reshape guard would specialise)
    seq = Dim("seq", min=1, max=metadata["get_max_seq_len"])
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        exported = export(module, example, dynamic_shapes=({1: seq}, None), strict=False)
    # torch.fx keeps each node's provenance as a chain of deep copies; lowering unlifts the
    # program once per delegate call and copies the chain each time, which made a 30-layer model
    # take more than ten minutes to lower. Nothing we ship reads it.
    for node in exported.graph.nodes:
        node.meta.pop("from_node", None)
    step("lowering to XNNPACK")
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
        constant_methods=metadata,
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    # as ExecuTorch's export_llm does (extension/llm/export/builder.py): quant fusion folds
    # torchao's dequantize + embedding into ExecuTorch's quantized embedding kernel
    config = ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    )
    return bytes(edge.to_executorch(config).buffer)


def _import_runtime() -> Any:
    try:
        import torch

        with progress.library_notes_off():
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
            from torchao.quantization import quantize_  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"executorch exports need executorch and torchao ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return torch
