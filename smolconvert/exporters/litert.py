"""LiteRT export: one .tflite with a prefill and a decode signature, converted by litert-torch.

The layout is litert-torch's generative one (litert_torch/generative/utilities/converter.py),
which LiteRT-LM's runtime and ai_edge_litert's signature runners call:
- `prefill(tokens int32 (1, P), input_pos int32 (P,), kv_cache_k_0, kv_cache_v_0, ...)` and
  `decode(tokens (1, 1), input_pos (1,), kv_cache_*)`, both returning `logits` and the updated
  `kv_cache_*`. Unlike litert-torch's own models, prefill returns the logits of every position,
  so a window is scored in prefill calls (the validators need every row).
- The cache is functional: each layer's keys and values are inputs (1, kv_heads, context,
  head_dim) fp32 and come back as outputs, written at input_pos[0] with a dynamic_update_slice
  (litert-torch's own op, lowered to TFLite's DYNAMIC_UPDATE_SLICE). The causal mask is built
  inside the graph from input_pos, so there is no mask input.
- A prefill call writes P positions from input_pos[0]: a caller must keep input_pos[0] + P
  within the context (DYNAMIC_UPDATE_SLICE clamps the start otherwise) and pads a short prompt;
  positions past the prompt are masked for earlier queries and overwritten by later calls.

The graph is the reference decoder's own modules; ai-edge-quantizer quantizes the weights after
conversion (quantizers/litert_recipes.py), and the written file is checked for float leftovers.
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
from smolconvert.options import LitertOptions, option_texts
from smolconvert.quantizers.litert_recipes import SCHEMES, check_quantized, quant_config

INSTALL_HINT = (
    "pip install 'smolconvert[litert]' && "
    "pip install --no-deps litert-torch==0.10.0 litert-converter==0.5.0 xdsl==0.28.0"
)
PROGRAM = "model.tflite"
# litert-torch's own default kv_cache_max_len; every call passes the whole cache in and out,
# so a longer cache costs decode time (-O max_context_len)
MAX_CONTEXT_LEN = 1280
PREFILL_LEN = 128
SMOOTH_WINDOWS = 8  # calibration windows whose activation maxima set the smoothing factors
MASK_VALUE = -1e9
LAYOUT_NOTE = (
    "litert-torch generative layout: signatures prefill (tokens int32 (1, P), input_pos int32 "
    "(P,)) and decode (tokens (1, 1), input_pos (1,)), each with kv_cache_k_<i>/kv_cache_v_<i> "
    "fp32 (1, kv_heads, context, head_dim) in and out; outputs logits (1, T, vocab) fp32 for "
    "every position; causal mask built from input_pos"
)


def describe_schemes() -> list[dict[str, Any]]:
    return [
        {
            "target": f"litert:{s.name}",
            "bits_per_weight": s.bits_per_weight,
            "weights": s.storage,
            "description": s.description,
        }
        for s in SCHEMES.values()
    ]


def context_length(spec: ModelSpec, options: LitertOptions) -> int:
    wanted = int(options.max_context_len) if options.max_context_len else MAX_CONTEXT_LEN
    return min(wanted, spec.max_position_embeddings)


def prefill_length(context: int) -> int:
    """Tokens per prefill call: litert-torch's 128, at most half the cache (a call writes all of
    its positions, so a longer one would leave few starts where it fits)."""
    return min(PREFILL_LEN, max(1, context // 2))


def cache_names(n_layers: int) -> list[str]:
    """The cache's input and output names, in litert-torch's order (k_0, v_0, k_1, ...)."""
    return [f"kv_cache_{c}_{i}" for i in range(n_layers) for c in "kv"]


def functional_cache_decoder(reference: Any, context: int) -> Any:
    """The reference decoder's modules behind the signatures of the module doc."""
    import torch
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice
    from torch import nn

    class FunctionalCacheDecoder(nn.Module):
        key_pos: torch.Tensor  # a buffer, registered in __init__

        def __init__(self) -> None:
            super().__init__()
            self.ref = reference
            self.register_buffer("key_pos", torch.arange(context), persistent=False)

        def forward(
            self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: dict[str, torch.Tensor]
        ) -> dict[str, Any]:
            ref = self.ref
            h = ref.model.embed_tokens(tokens)  # (1, T, d)
            cos, sin = ref.rope(input_pos[None], h.dtype)
            allowed = self.key_pos[None, :] <= input_pos[:, None]  # (T, context)
            mask = torch.where(allowed, 0.0, MASK_VALUE)[None, None]
            zero = torch.zeros([], dtype=torch.int32)
            start = [zero, zero, input_pos[0].reshape([]), zero]
            out: dict[str, torch.Tensor] = {}
            for i, layer in enumerate(ref.model.blocks()):
                attn = layer.self_attn
                q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)  # (1, heads, T, D)
                keys = dynamic_update_slice(kv_cache[f"k_{i}"], k, start)
                values = dynamic_update_slice(kv_cache[f"v_{i}"], v, start)
                h = h + attn.o_proj(grouped_attention(q, keys, values, mask))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                out[f"k_{i}"], out[f"v_{i}"] = keys, values
            logits = ref.lm_head(ref.model.norm(h)).float()
            return {"logits": logits, "kv_cache": out}

    return FunctionalCacheDecoder().eval().requires_grad_(False)


def grouped_attention(q: Any, k: Any, v: Any, mask: Any) -> Any:
    """Causal attention of q (1, heads, T, D) over k and v (1, kv_heads, S, D), mask (1, 1, T,
    S) additive: (1, T, heads * D), the reference's `attend` before o_proj. Each KV head's
    queries are stacked as rows of one matmul instead of the keys being repeated per query head:
    repeating them is a BROADCAST_TO of the whole cache, which TFLite runs with its reference
    kernel, on every layer of every call (it took most of the decode time)."""
    import torch

    _, heads, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    groups = heads // kv
    # query head h reads kv head h // groups (the reference's expand order)
    scores = torch.matmul(q.reshape(kv, groups * t, d), k[0].transpose(1, 2)) * (d**-0.5)
    scores = scores.reshape(kv, groups, t, s) + mask[0]  # mask (1, T, S) over (groups, T, S)
    probs = torch.softmax(scores, dim=-1).reshape(kv, groups * t, s)
    out = torch.matmul(probs, v[0])  # (kv, groups * T, D)
    return out.reshape(heads, t, d).transpose(0, 1).reshape(1, t, heads * d)


def _example(spec: ModelSpec, context: int, t: int) -> dict[str, Any]:
    import torch

    shape = (1, spec.n_kv_heads, context, spec.head_dim)
    return {
        "tokens": torch.zeros((1, t), dtype=torch.int32),
        "input_pos": torch.arange(t, dtype=torch.int32),
        "kv_cache": {f"{c}_{i}": torch.zeros(shape) for i in range(spec.n_layers) for c in "kv"},
    }


def export_litert(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: LitertOptions | None = None,
) -> A.Artifact:
    if scheme not in SCHEMES:
        raise UnsupportedError(
            f"unknown LiteRT scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES))}"
        )
    if imatrix is not None:
        raise UnsupportedError("LiteRT schemes take no imatrix; drop --imatrix")
    sch = SCHEMES[scheme]
    opts = options or LitertOptions()
    spec = model.spec
    litert_torch = _import_converter()
    from smolconvert.model.reference import build_reference

    context = context_length(spec, opts)
    prefill = prefill_length(context)
    step = progress.Steps(quiet)
    step("building the fp32 reference decoder")
    reference = build_reference(spec, source=model.weights)
    smoothing = None
    if sch.bits is not None and opts.smooth == "on":
        smoothing = _smooth(model, reference, step)
    module = functional_cache_decoder(reference, context)
    step(f"converting with litert-torch (prefill of {prefill}, decode; cache of {context})")
    with progress.library_notes_off(), progress.native_stderr_off(), _converter_quiet():
        converter = litert_torch.signature(
            "prefill", module, sample_kwargs=_example(spec, context, prefill)
        ).signature("decode", module, sample_kwargs=_example(spec, context, 1))
        if sch.bits is not None:
            step(f"quantizing weights as {sch.storage} (ai-edge-quantizer)")
        edge = converter.convert(quant_config=quant_config(sch))
    del module
    with A.staging(out) as stage:
        with progress.native_stderr_off(), _converter_quiet():
            edge.export(str(stage / PROGRAM))
        del edge
        step("checking the program in the LiteRT interpreter")
        tensors, signatures = _inspect(stage / PROGRAM)
        types = check_quantized(sch, tensors, linear_shapes(spec))
        model.tokenizer.save(stage)
        meta = {
            "format": "tflite",
            "target": "litert",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": PROGRAM, "tokenizer": "tokenizer.json"},
            "tensor_types": dict(sorted(types.items())),
            "options": option_texts(opts),
            **({"smoothing": smoothing} if smoothing else {}),
            "context_length": context,
            "prefill_length": prefill,
            "signatures": signatures,
            "kv_cache_shape": [1, spec.n_kv_heads, context, spec.head_dim],
            "layout": LAYOUT_NOTE,
            "tool_versions": A.tool_versions(
                "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch"
            ),
        }
        meta = A.finish(stage, meta)
    return A.Artifact(out.resolve(), meta)


def _smooth(model: CanonicalModel, reference: Any, step: progress.Steps) -> dict[str, Any]:
    """SmoothQuant on the reference's weights (quantizers/smoothing.py), its input maxima
    measured on the ONNX calibration windows (the part of pydoc the evaluation never reads)."""
    from smolconvert.exporters.onnx_kv import calibration_windows
    from smolconvert.quantizers.smoothing import ALPHA, activation_maxima, smooth
    from smolconvert.texts import default_calibration_text

    text = default_calibration_text()
    windows = calibration_windows(model.tokenizer, text.text, model.spec)[:SMOOTH_WINDOWS]
    step(f"smoothing activations (alpha {ALPHA}, maxima over {len(windows)} windows)")
    n = smooth(reference, activation_maxima(reference, windows), ALPHA)
    return {
        "method": "SmoothQuant: input channel j / s_j, weight column j * s_j, "
        "s_j = max|x_j|^a / max|w_j|^(1 - a)",
        "alpha": ALPHA,
        "linears": n,
        "text_name": text.name,
        "text_sha256": text.sha256,
        "windows": f"{len(windows)} x {len(windows[0])} tokens",
    }


def _inspect(path: Path) -> tuple[list[tuple[tuple[int, ...], str]], dict[str, Any]]:
    """The program's constant tensors ((shape, TensorType name), one per buffer, over every
    signature's subgraph) as its flatbuffer holds them, and its signatures as the LiteRT
    interpreter reads them (which proves the file loads)."""
    import mmap

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    constants: dict[int, tuple[tuple[int, ...], str]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        fb = schema.Model.GetRootAs(buf, 0)
        for g in range(fb.SubgraphsLength()):
            graph = fb.Subgraphs(g)
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                index = tensor.Buffer()
                data = fb.Buffers(index) if 0 < index < fb.BuffersLength() else None
                # small buffers hold their bytes inline, large ones an offset into the file
                if data is not None and (data.DataLength() > 0 or data.Offset() > 1):
                    shape = tuple(int(x) for x in tensor.ShapeAsNumpy())
                    constants[index] = (shape, type_names.get(tensor.Type(), str(tensor.Type())))
        del fb, graph, tensor, data  # release the mmap's buffer before it closes
    with progress.native_stderr_off():
        signatures = Interpreter(model_path=str(path)).get_signature_list()
    return list(constants.values()), signatures


def _converter_quiet() -> Any:
    """litert-torch prints a progress tree to stdout for every step; ours is enough."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def _import_converter() -> Any:
    try:
        with progress.library_notes_off(), progress.native_stderr_off():
            import litert_torch
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"litert exports need litert-torch and ai-edge-litert ({e.name} is missing): "
            f"{INSTALL_HINT}"
        ) from None
    return litert_torch
