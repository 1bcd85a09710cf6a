"""The float Core ML program: the reference decoder traced in Apple's LLM layout, converted by
coremltools to an mlprogram.

Default: a stateful KV cache (`keyCache`/`valueCache` states, iOS 18 / macOS 15), inputs
`inputIds` (1, T) int32 and `causalMask` (1, 1, T, past+T) additive, output `logits`
(1, T, vocab). Stateless: no cache, flexible T (iOS 17). The module reuses the reference
decoder's own submodules, so the program's weight consts are named after canonical tensors
(exporters/coreml_compress.py replaces them by compressed ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np

from smolconvert.errors import MissingDependencyError
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec

INSTALL_HINT = "pip install 'smolconvert[coreml]'"
MAX_CONTEXT = (
    2048  # cache length of the stateful program (and upper bound of T); capped by the model
)


def context_length(spec: ModelSpec) -> int:
    return min(MAX_CONTEXT, spec.max_position_embeddings)


def _decoder_module(reference: Any, context: int, stateful: bool) -> Any:
    """Apple's stateful pattern around the reference decoder's own submodules (same parameter
    names, so program constants are named after canonical tensors)."""
    import torch
    from torch import nn

    from smolconvert.model.reference import rotate_half

    spec: ModelSpec = reference.spec

    class CoreMLDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = reference.model
            self.lm_head = reference.lm_head
            # RoPE tables, not positions times frequencies: in fp16 the product of a position in
            # the thousands and a frequency loses whole radians; a table rounds only cos/sin.
            pos = torch.arange(context, dtype=torch.float64)[:, None]
            inv = reference._inv_freq().double()
            angles = torch.cat((pos * inv, pos * inv), -1)  # (ctx, D)
            self.register_buffer("ropeCos", angles.cos().float(), persistent=False)
            self.register_buffer("ropeSin", angles.sin().float(), persistent=False)
            if stateful:
                shape = (spec.n_layers, 1, spec.n_kv_heads, context, spec.head_dim)
                self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
                self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

        def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:
            t = inputIds.shape[-1]
            end = causalMask.shape[-1]
            past = end - t
            nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
            h = self.model.embed_tokens(inputIds)  # (1, T, d)
            # buffers read through `cast`: nn.Module types attributes as Tensor | Module
            cos = cast(torch.Tensor, self.ropeCos)[past:end]  # (T, D)
            sin = cast(torch.Tensor, self.ropeSin)[past:end]
            for i, layer in enumerate(self.model.layers):
                a = layer.self_attn
                x = layer.input_layernorm(h)
                q = a.q_proj(x).view(1, -1, nh, hd).transpose(1, 2)  # (1, nh, T, D)
                k = a.k_proj(x).view(1, -1, nkv, hd).transpose(1, 2)  # (1, kv, T, D)
                v = a.v_proj(x).view(1, -1, nkv, hd).transpose(1, 2)
                if a.use_rope:
                    q = q * cos + rotate_half(q) * sin
                    k = k * cos + rotate_half(k) * sin
                if stateful:
                    keys = cast(torch.Tensor, self.keyCache)
                    values = cast(torch.Tensor, self.valueCache)
                    keys[i : i + 1, :, :, past:end, :] = k.to(torch.float16)[None]
                    values[i : i + 1, :, :, past:end, :] = v.to(torch.float16)[None]
                    k = keys[i, :, :, :end, :].to(q.dtype)  # (1, kv, S, D)
                    v = values[i, :, :, :end, :].to(q.dtype)
                s = k.shape[2]
                g = nh // nkv
                k = k[:, :, None].expand(1, nkv, g, s, hd).reshape(1, nh, s, hd)
                v = v[:, :, None].expand(1, nkv, g, s, hd).reshape(1, nh, s, hd)
                scores = torch.matmul(q, k.transpose(2, 3)) * (hd**-0.5) + causalMask
                o = torch.matmul(torch.softmax(scores, -1), v)  # (1, nh, T, D)
                h = h + a.o_proj(o.transpose(1, 2).reshape(1, -1, nh * hd))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            return self.lm_head(self.model.norm(h))  # (1, T, vocab)

    return CoreMLDecoder().eval()


@contextmanager
def coremltools() -> Iterator[Any]:
    """coremltools, patched for numpy >= 2.4; a clear error when it is not installed."""
    try:
        import coremltools as ct
    except ImportError:
        raise MissingDependencyError(f"Core ML export needs coremltools: {INSTALL_HINT}") from None
    _patch_int_cast()
    yield ct


_PATCHED = False


def _patch_int_cast() -> None:
    """coremltools 9.0's `aten::Int` converter calls int() on a 1-element array, which numpy
    >= 2.4 refuses (coremltools issue 2633, fixed on main after 9.0). Same conversion, scalar
    taken first."""
    global _PATCHED
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context: Any, node: Any) -> None:
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const():
            value = np.int32(np.asarray(x.val).reshape(()))
            context.add(mb.const(val=value, name=node.name), node.name)
        else:
            ops._cast(context, node, int, "int32")

    _PATCHED = True


_NORM_OPS = frozenset({"pow", "reduce_mean", "rsqrt"})


def _fp16_op(op: Any) -> bool:
    """Which ops compute in fp16: all but RMSNorm's statistics. Squaring a hidden state overflows
    fp16 (SmolLM2-135M reaches |x| ~ 850, x**2 ~ 7e5 > 65504, and the norm turns to 0); the
    reference, like transformers, takes that mean in fp32."""
    if op.op_type in _NORM_OPS:
        return False
    if op.op_type == "add":  # mean(x**2) + eps
        return not any(
            getattr(v, "op", None) is not None and v.op.op_type == "reduce_mean"
            for v in (op.inputs.get("x"), op.inputs.get("y"))
        )
    return True


def _reference(model: CanonicalModel, placeholders: frozenset[str]) -> Any:
    """The reference decoder in fp32, each weight named in `placeholders` a zero that takes no
    memory (a stride-0 view of one element): the program's const for it is replaced before any
    pass reads its value (`convert`'s weights_pass), so the fp32 model is never materialised."""
    import torch

    from smolconvert.model.reference import ReferenceDecoder, build_reference
    from smolconvert.model.weights import canonical_names, expected_shape

    spec = model.spec
    if not placeholders:
        return build_reference(spec, source=model.weights)
    with torch.device("meta"):
        reference = ReferenceDecoder(spec)
    reference.inv_freq = reference._inv_freq()
    for name in canonical_names(spec):
        owner, _, leaf = name.rpartition(".")
        if name in placeholders:
            value = torch.zeros(()).expand(expected_shape(spec, name))
        else:
            value = model.weights.get(name).float()
        param = torch.nn.Parameter(value, requires_grad=False)
        setattr(reference.get_submodule(owner), leaf, param)
    reference.tie_weights()
    return reference.eval()


def convert(
    model: CanonicalModel,
    *,
    compute: str,
    kv_cache: str,
    context: int,
    ios18: bool,
    weights_pass: Callable[[Any], None] | None = None,
    placeholders: frozenset[str] = frozenset(),
) -> Any:
    """The mlprogram (`compute` precision) of the reference decoder; `ios18`: target iOS 18
    (states and the constexpr ops of compressed weights need it). `weights_pass(program)` runs
    first in coremltools' pass pipeline, on the fp32 program as traced: it must replace the
    weight const of every canonical name in `placeholders`, whose traced values are zeros."""
    import torch

    spec = model.spec
    stateful = kv_cache == "stateful"
    with coremltools() as ct:
        reference = _reference(model, placeholders)
        module = _decoder_module(reference, context, stateful)
        ids = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
        mask = torch.zeros(1, 1, 4, 6 if stateful else 4)
        with torch.no_grad():
            traced = torch.jit.trace(module, (ids, mask), check_trace=False)
        del module, reference
        seq = ct.RangeDim(1, context, 1)
        inputs = [
            ct.TensorType("inputIds", shape=(1, seq), dtype=np.int32),
            ct.TensorType(
                "causalMask",
                shape=(1, 1, ct.RangeDim(1, context, 1), ct.RangeDim(1, context, 1)),
                dtype=np.float16 if compute == "fp16" else np.float32,
            ),
        ]
        states = []
        if stateful:
            shape = (spec.n_layers, 1, spec.n_kv_heads, context, spec.head_dim)
            states = [
                ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=n)
                for n in ("keyCache", "valueCache")
            ]
        pipeline = ct.PassPipeline.DEFAULT
        if weights_pass is not None:
            pipeline.insert_pass(0, _register(weights_pass))
        return ct.convert(
            traced,
            pass_pipeline=pipeline,
            inputs=inputs,
            outputs=[ct.TensorType("logits")],
            states=states or None,
            minimum_deployment_target=ct.target.iOS18 if ios18 else ct.target.iOS17,
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=_fp16_op)
            if compute == "fp16"
            else ct.precision.FLOAT32,
            convert_to="mlprogram",
            skip_model_load=True,
        )


def _register(apply: Callable[[Any], None]) -> str:
    """`apply` as the coremltools graph pass "smolconvert::write_weights" (re-registered on each
    export: the pass registry is global and takes classes, so the class closes over `apply`)."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import register_pass

    @register_pass(namespace="smolconvert", override=True, name="write_weights")
    class WriteWeights(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            apply(prog)

    return "smolconvert::write_weights"
