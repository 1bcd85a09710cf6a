"""The weights of an ONNX export: every quantized one computed before the graph is built, and
every one read back from a written graph.

`quantize_weights` asks quantizers/ for each weight the plan quantizes: GPTQ on calibration text
when the scheme says so (quantizers/gptq.py, layer by layer through the reference decoder), else
round-to-nearest with the codec's scale search (quantizers/nbits.py). The graph builders then only
pack. `stored_weights` is the inverse for tests and checks: what onnxruntime multiplies by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smolconvert.errors import ConfigError
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.quantizers.nbits import (
    FORMATS,
    QuantizedWeight,
    dequantize,
    quantize,
    split_rows,
)
from smolconvert.quantizers.onnx_recipes import codec_runs

if TYPE_CHECKING:
    import torch

    from smolconvert.quantizers.gptq import Segments

Plan = dict[str, str | None]  # canonical name -> codec name; None: stored float

# GPTQ's calibration: 16 windows, each half pydoc text, half tokens the model samples itself
# (docs/onnx.md, "int4 outside its calibration domain").
GPTQ_WINDOWS = 16


def quantize_weights(
    model: CanonicalModel,
    plan: Plan,
    step: Callable[[str], None],
    *,
    gptq: bool,
    kv_hessians: str = "per-head",
) -> tuple[dict[str, QuantizedWeight], dict[str, Any] | None]:
    """Every weight `plan` quantizes, by canonical name, and the calibration's description (None
    without GPTQ). The untied token embedding is never GPTQ'd: no layer's Hessian sees it.
    `kv_hessians`: GPTQ's k and v Hessians, "per-head" or "pooled" (quantizers/gptq.py). The
    ExecuTorch exporter asks for its 4-bit linears here too: XNNPACK's blocks are these."""
    quantized: dict[str, QuantizedWeight] = {}
    calibration = None
    if gptq:
        quantized, calibration = _gptq(model, plan, kv_hessians, step)
    rest = [(n, c) for n, c in plan.items() if c is not None and n not in quantized]
    if rest:
        step(f"quantizing {len(rest)} tensors round-to-nearest")
    for name, codec in rest:
        quantized[name] = quantize(model.weights.get(name).float().numpy(), FORMATS[codec])
    return quantized, calibration


def _gptq(
    model: CanonicalModel, plan: Plan, kv_hessians: str, step: Callable[[str], None]
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Every quantized projection and the head by sequential GPTQ on the built-in calibration:
    each window half the part of pydoc's topics that the default evaluation never reads, half
    tokens the model samples itself (model/samples.py), so the levels fit more than one domain."""
    import torch

    from smolconvert.exporters.onnx_kv import CALIBRATION_CTX, calibration_windows
    from smolconvert.model.samples import self_samples
    from smolconvert.quantizers.gptq import DAMP, sequential_gptq
    from smolconvert.texts import default_calibration_text

    text = default_calibration_text()
    half = min(CALIBRATION_CTX, model.spec.max_position_embeddings) // 2
    prose = [t for w in calibration_windows(model.tokenizer, text.text, model.spec) for t in w]
    if len(prose) < GPTQ_WINDOWS * half:
        raise ConfigError(f"calibration text has {len(prose)} tokens, fewer than GPTQ needs")
    samples = self_samples(model, GPTQ_WINDOWS, half, announce=step)
    # each window: consecutive pydoc tokens, then one sample from the start token
    windows = [prose[i * half : (i + 1) * half] + s for i, s in enumerate(samples.windows)]
    step(
        f"GPTQ over {model.spec.n_layers} layers on {len(windows)} windows of {2 * half} tokens, "
        f"half pydoc text, half sampled (k and v Hessians {kv_hessians})"
    )
    pooled = kv_hessians == "pooled"
    done: dict[str, QuantizedWeight] = {}

    def quantize_group(
        parts: Sequence[str], ws: list[np.ndarray], hessians: list[Segments]
    ) -> dict[str, torch.Tensor]:
        """Parts that read one input, each on its Hessian segments; GPTQ is per row, so each run
        of one codec is quantized as one stacked weight."""
        weights = dict(zip(parts, ws, strict=True))
        segments = dict(zip(parts, hessians, strict=True))
        out: dict[str, torch.Tensor] = {}
        for codec, run in codec_runs(plan, list(parts)):
            if codec is None:
                continue
            rows = [len(weights[p]) for p in run]
            stacked = np.concatenate([weights[p] for p in run], axis=0)
            qw = quantize(stacked, FORMATS[codec], [s for p in run for s in segments[p]])
            done.update(zip(run, split_rows(qw, rows), strict=True))
            deq = np.split(dequantize(qw), np.cumsum(rows)[:-1])
            out.update({p: torch.from_numpy(d) for p, d in zip(run, deq, strict=True)})
        return out

    tokens = sequential_gptq(model, windows, quantize_group, pooled=pooled)
    meta = {
        "method": "gptq",
        "order": "act (descending Hessian diagonal), static block grids",
        "scales": "least-squares refit on the Hessian after the levels",
        "hessians": f"k and v {'pooled over' if pooled else 'per'} kv head"
        f"{'s' if pooled else ''}, weighed by attention (gptq.attention_hessians)",
        "damp": DAMP,
        "text_name": text.name,
        "text_sha256": text.sha256,
        "windows": f"{len(windows)} x {2 * half} tokens: {half} of the text, then {half} sampled",
        "sampled": samples.describe(),
        "tokens": tokens,
    }
    return done, meta


def _stored(name: str, init: dict[str, np.ndarray]) -> bool:
    return name in init or f"{name}.qweight" in init


def stored_weights(model_path: Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The canonical float32 weights a graph written by export_onnx holds, read back from the file
    and dequantized (packed q/k/v and gate/up split again): what onnxruntime multiplies by."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model_path))
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Reshape"}
    kernels = {}  # qweight name -> (bits, block_size), from MatMulNBits / GatherBlockQuantized
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            data = node.input[1]
        elif node.op_type == "GatherBlockQuantized":  # reads the buffer reshaped to rows
            data = alias.get(node.input[0], node.input[0])
        else:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        kernels[data] = (attrs["bits"], attrs["block_size"])

    def dequantized(prefix: str, shape: tuple[int, int]) -> np.ndarray:
        bits, block_size = kernels[f"{prefix}.qweight"]
        zp = init.get(f"{prefix}.zero_points")
        fmt = FORMATS[f"int{bits}_b{block_size}_{'none' if zp is None else 'uint8'}"]
        qw = QuantizedWeight(fmt, shape, init[f"{prefix}.qweight"], init[f"{prefix}.scales"], zp)
        return dequantize(qw)

    # packed projections of the fused graph: canonical parts stacked along N, in this order
    packs = {
        "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "self_attn.qk_proj": ("q_proj", "k_proj"),  # when v has its own codec
        "self_attn.kv_proj": ("k_proj", "v_proj"),  # when q has its own codec
        "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    }
    out: dict[str, np.ndarray] = {}
    for name in canonical_names(spec):
        if name in init:  # float: projections are stored (K, N) for MatMul
            w = init[name].astype(np.float32)
            out[name] = w.T if name.endswith("proj.weight") else w
        elif f"{name}.qweight" in init:
            out[name] = dequantized(name, expected_shape(spec, name))  # type: ignore[arg-type]
        elif name not in out:  # a part of a packed projection
            layer, kind = name.split(".")[2], name.split(".")[-2]
            pack, kinds = next(
                (p, k)
                for p, k in packs.items()
                if kind in k and _stored(f"model.layers.{layer}.{p}", init)
            )
            parts = [f"model.layers.{layer}.{pack.split('.')[0]}.{k}.weight" for k in kinds]
            rows = [expected_shape(spec, p)[0] for p in parts]
            shape = (sum(rows), expected_shape(spec, name)[1])
            stored = f"model.layers.{layer}.{pack}"
            whole = (
                init[stored].astype(np.float32).T  # float, (K, N) for MatMul
                if stored in init
                else dequantized(stored, shape)
            )
            out.update(zip(parts, np.split(whole, np.cumsum(rows)[:-1]), strict=True))
    return {n: out[n] for n in canonical_names(spec)}
