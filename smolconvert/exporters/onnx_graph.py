"""The decoder as an ONNX graph, built node by node with onnx.helper (one function per block).

Building by hand instead of tracing gives full control of the ops (MatMulNBits, GatherBlockQuantized
for a tied embedding stored once), stable node and tensor names (byte-identical output) and no
dependency on torch.export's shape specialisation. The math is the reference decoder's
(model/reference.py): same RoPE, the same finite additive mask, softmax in fp32. IO names are
optimum's / Transformers.js': input_ids, attention_mask, position_ids, past_key_values.N.key/value
-> logits (fp32), present.N.key/value; one graph serves prefill (empty past) and decode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from smolconvert.exporters.onnx_quant import (
    BlockCodec,
    QuantizedWeight,
    Recipe,
    quantize,
    role_of,
    stack_rows,
)
from smolconvert.model.reference import MASK_VALUE
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import LAYER_TENSORS

OPSET = 21  # onnxruntime >= 1.20 (and onnxruntime-node 1.20+, Transformers.js 3.1+) load it
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
TENSOR_FLOAT16 = 10  # onnx.TensorProto.FLOAT16 (onnx is imported lazily)

Fetch = Callable[[str], NDArray[np.float32]]  # canonical name -> float32 (rows, cols) weight


class ExternalData:
    """The external data file beside a graph, written as initializers are created, so the graph
    protobuf never holds weight bytes and the model is never held in memory twice (the graph with
    its raw data, then its serialization, took ~4x the fp32 weight bytes at 360M).

    The file is byte for byte what `onnx.save_model(save_as_external_data=True,
    all_tensors_to_one_file=True, size_threshold=min_bytes)` writes for the same initializers (onnx
    1.23): tensors in initializer order, each at the end of the file with no alignment padding, the
    entries location/offset/length, and onnx's size test, which compares `sys.getsizeof(raw_data)`
    (the bytes object's header included) with the threshold."""

    def __init__(self, path: Path, min_bytes: int) -> None:
        self.path = path
        self.location = path.name  # relative to the graph, which sits beside it
        self.min_bytes = min_bytes
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close() / __exit__)
        self._offset = 0

    def wants(self, array: NDArray) -> bool:
        """Whether onnx's save_model would have moved this array's raw data out of the graph."""
        numeric = array.dtype != object and not np.issubdtype(array.dtype, np.str_)
        return numeric and sys.getsizeof(b"") + array.nbytes >= self.min_bytes

    def tensor(self, array: NDArray, name: str) -> Any:
        """A TensorProto naming `array`'s bytes, which are appended to the file now."""
        from onnx import TensorProto, helper

        tensor = TensorProto()
        tensor.dims.extend(array.shape)
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        # numpy_helper.from_array stores the little-endian bytes of the C-ordered array
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        self._file.write(data.reshape(-1).view(np.uint8).data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", self._offset),
            ("length", data.nbytes),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += data.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class Graph:
    """Nodes and initializers in creation order; names are deterministic. With `external`, every
    initializer big enough goes to that file as it is created (the TensorProto only points at it);
    without, initializers keep their raw data."""

    float_type: int  # onnx.TensorProto.FLOAT or FLOAT16
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # initializer -> storage type
    # canonical weight name -> its quantized form computed beforehand (GPTQ); others are quantized
    # round-to-nearest as they are added
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    external: ExternalData | None = None
    _consts: dict[tuple[str, bytes], str] = field(default_factory=dict)

    def _initializer(self, array: NDArray, name: str) -> None:
        from onnx import numpy_helper

        if self.external is not None and self.external.wants(array):
            self.initializers.append(self.external.tensor(array, name))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        n_out: int = 1,
        outputs: list[str] | None = None,
        **attrs: Any,
    ) -> Any:
        """Append a node; its outputs are `outputs` ("" leaves an optional one out), else the
        node name (one output) or name:0, name:1, ..."""
        from onnx import helper

        domain = attrs.pop("domain", "")
        outs = outputs or ([name] if n_out == 1 else [f"{name}:{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: NDArray, storage: str | None = None) -> str:
        # ascontiguousarray also makes a 0-d array 1-d: weights have always been stored so
        self._initializer(np.ascontiguousarray(array), name)
        self.tensor_types[name] = storage or str(array.dtype)
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant, shared by value (never listed in tensor_types)."""
        arr = np.asarray(value, dtype=dtype)
        key = (str(arr.dtype) + str(arr.shape), arr.tobytes())
        if key not in self._consts:
            name = f"/const/{len(self._consts)}"
            self._initializer(arr, name)
            self._consts[key] = name
        return self._consts[key]

    def quantize(
        self, parts: list[str], w: NDArray[np.float32], codec: BlockCodec
    ) -> QuantizedWeight:
        """w: the weights named `parts` stacked along N; precomputed parts are used as they are."""
        if all(p in self.quantized for p in parts):
            qw = stack_rows([self.quantized[p] for p in parts])
            assert qw.codec == codec and qw.shape == w.shape, (parts, qw.codec, codec)
            return qw
        return quantize(w, codec)

    @property
    def np_float(self) -> Any:
        from onnx import TensorProto

        return np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32


@dataclass(frozen=True)
class Linear:
    """How one projection is stored: float (K, N) for MatMul, or MatMulNBits tensors."""

    inputs: tuple[str, ...]
    n: int
    k: int
    codec: BlockCodec | None


def add_quantized(g: Graph, prefix: str, qw: QuantizedWeight) -> tuple[str, ...]:
    c = qw.codec
    storage = f"{c.name} (MatMulNBits)"
    names = [
        g.weight(f"{prefix}.qweight", qw.packed, storage),
        g.weight(f"{prefix}.scales", qw.scales),
    ]
    if qw.zero_points is not None:
        names.append(g.weight(f"{prefix}.zero_points", qw.zero_points))
    return tuple(names)


def add_linear(
    g: Graph,
    name: str,
    w: NDArray[np.float32],
    codec: BlockCodec | None,
    parts: list[str] | None = None,
) -> Linear:
    """One projection; `parts`: the canonical weights stacked in w (default: just `name`)."""
    n, k = w.shape
    if codec is None:
        # one C-ordered copy (astype would copy once to the transposed order, weight() again)
        return Linear((g.weight(name, np.ascontiguousarray(w.T, dtype=g.np_float)),), n, k, None)
    return Linear(add_quantized(g, name, g.quantize(parts or [name], w, codec)), n, k, codec)


def linear(g: Graph, x: str, lin: Linear, name: str, accuracy_level: int) -> str:
    """x (B, T, K) @ W^T: MatMul on a float weight, or MatMulNBits (scales, optional uint8 zero
    points)."""
    if lin.codec is None:
        return g.op("MatMul", [x, lin.inputs[0]], name)  # type: ignore[no-any-return]
    return g.op(  # type: ignore[no-any-return]
        "MatMulNBits",
        [x, *lin.inputs],
        name,
        domain=MS_DOMAIN,
        K=lin.k,
        N=lin.n,
        bits=lin.codec.bits,
        block_size=lin.codec.block_size,
        accuracy_level=accuracy_level,
    )


def rms_norm(g: Graph, x: str, weight: str, eps: float, name: str) -> str:
    """weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 as the reference does."""
    h = x if g.np_float is np.float32 else g.op("Cast", [x], f"{name}/cast_up", to=1)
    sq = g.op("Mul", [h, h], f"{name}/sq")
    ms = g.op("ReduceMean", [sq, g.const([-1])], f"{name}/mean", keepdims=1)
    rs = g.op(
        "Reciprocal",
        [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], f"{name}/eps")], f"{name}/s")],
        f"{name}/rsqrt",
    )
    h = g.op("Mul", [h, rs], f"{name}/normed")
    if g.np_float is not np.float32:
        h = g.op("Cast", [h], f"{name}/cast_down", to=g.float_type)
    return g.op("Mul", [h, weight], name)  # type: ignore[no-any-return]


def rope(g: Graph, x: str, cos: str, sin: str, name: str) -> str:
    """x * cos + rotate_half(x) * sin; x (B, h, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = g.op("Split", [x], f"{name}/split", n_out=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rot", axis=-1)
    return g.op(  # type: ignore[no-any-return]
        "Add",
        [g.op("Mul", [x, cos], f"{name}/xcos"), g.op("Mul", [rotated, sin], f"{name}/xsin")],
        name,
    )


@dataclass(frozen=True)
class Shared:
    """Graph-wide values every layer reads."""

    cos: str  # (B, 1, T, D)
    sin: str
    mask: str  # (B, 1, 1, T, S) fp32 additive
    split_shape: str  # [0, 0, groups, -1, S]: (B, kv, g*T, S) -> (B, kv, g, T, S)
    merge_shape: str  # [0, 0, -1, S]
    accuracy_level: int


def attention(
    g: Graph, spec: ModelSpec, i: int, x: str, w: dict[str, Linear], s: Shared
) -> tuple[str, str, str]:
    """GQA without repeating K/V: queries grouped per KV head, (B, kv, g*T, D) @ (B, kv, D, S)."""
    p = f"/model/layers.{i}/self_attn"
    nh, kv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim

    def heads(name: str, n: int) -> str:
        y = linear(g, x, w[name], f"{p}/{name}", s.accuracy_level)  # (B, T, n*D)
        y = g.op("Reshape", [y, g.const([0, 0, n, d])], f"{p}/{name}/split_heads")
        return g.op("Transpose", [y], f"{p}/{name}/bhtd", perm=[0, 2, 1, 3])  # type: ignore[no-any-return]

    q, k, v = heads("q_proj", nh), heads("k_proj", kv), heads("v_proj", kv)
    if spec.rope_layers[i]:
        q, k = rope(g, q, s.cos, s.sin, f"{p}/q_rope"), rope(g, k, s.cos, s.sin, f"{p}/k_rope")
    q = g.op("Mul", [q, g.const(d**-0.5, g.np_float)], f"{p}/q_scaled")
    q = g.op("Reshape", [q, g.const([0, kv, -1, d])], f"{p}/q_grouped")  # (B, kv, g*T, D)
    k = g.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
    v = g.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
    kt = g.op("Transpose", [k], f"{p}/k_t", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, kt], f"{p}/scores")  # (B, kv, g*T, S)
    if g.np_float is not np.float32:
        scores = g.op("Cast", [scores], f"{p}/scores_fp32", to=1)
    scores = g.op("Reshape", [scores, s.split_shape], f"{p}/scores5")  # (B, kv, g, T, S)
    probs = g.op("Softmax", [g.op("Add", [scores, s.mask], f"{p}/masked")], f"{p}/probs", axis=-1)
    if g.np_float is not np.float32:
        probs = g.op("Cast", [probs], f"{p}/probs_cast", to=g.float_type)
    probs = g.op("Reshape", [probs, s.merge_shape], f"{p}/probs4")  # (B, kv, g*T, S)
    out = g.op("MatMul", [probs, v], f"{p}/context")  # (B, kv, g*T, D)
    out = g.op("Reshape", [out, g.const([0, nh, -1, d])], f"{p}/context_heads")
    out = g.op("Transpose", [out], f"{p}/context_bthd", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.const([0, 0, nh * d])], f"{p}/context_flat")
    return linear(g, out, w["o_proj"], f"{p}/o_proj", s.accuracy_level), k, v


def mlp(g: Graph, i: int, x: str, w: dict[str, Linear], s: Shared) -> str:
    p = f"/model/layers.{i}/mlp"
    gate = linear(g, x, w["gate_proj"], f"{p}/gate_proj", s.accuracy_level)
    up = linear(g, x, w["up_proj"], f"{p}/up_proj", s.accuracy_level)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
    return linear(
        g, g.op("Mul", [act, up], f"{p}/act_up"), w["down_proj"], f"{p}/down_proj", s.accuracy_level
    )


def rope_and_mask(g: Graph, spec: ModelSpec) -> tuple[str, str, str]:
    """cos/sin (B, 1, T, D) from position_ids; the causal+padding mask (B, 1, 1, T, S)."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    pos = g.op("Cast", ["position_ids"], "/rope/pos", to=1)
    freqs = g.op(
        "Mul",
        [g.op("Unsqueeze", [pos, g.const([-1])], "/rope/pos3"), g.const(inv_freq, np.float32)],
        "/rope/freqs",
    )
    emb = g.op("Concat", [freqs, freqs], "/rope/emb", axis=-1)
    emb = g.op("Unsqueeze", [emb, g.const([1])], "/rope/emb4")
    cos, sin = g.op("Cos", [emb], "/rope/cos"), g.op("Sin", [emb], "/rope/sin")
    if g.np_float is not np.float32:
        cos = g.op("Cast", [cos], "/rope/cos16", to=g.float_type)
        sin = g.op("Cast", [sin], "/rope/sin16", to=g.float_type)
    total = g.op(
        "Squeeze", [g.op("Shape", ["attention_mask"], "/mask/s1", start=1, end=2)], "/mask/S"
    )
    t = g.op("Squeeze", [g.op("Shape", ["input_ids"], "/mask/t1", start=1, end=2)], "/mask/T")
    key_pos = g.op("Range", [g.const(0), total, g.const(1)], "/mask/key_pos")
    query_pos = g.op(
        "Range", [g.op("Sub", [total, t], "/mask/P"), total, g.const(1)], "/mask/query_pos"
    )
    causal = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [key_pos, g.const([0])], "/mask/key_row"),
            g.op("Unsqueeze", [query_pos, g.const([1])], "/mask/query_col"),
        ],
        "/mask/causal",
    )  # (T, S)
    real = g.op("Greater", ["attention_mask", g.const(0)], "/mask/real")  # (B, S)
    real = g.op("Unsqueeze", [real, g.const([1, 2, 3])], "/mask/real5")  # (B, 1, 1, 1, S)
    allowed = g.op("And", [causal, real], "/mask/allowed")  # (B, 1, 1, T, S)
    mask = g.op(
        "Where",
        [allowed, g.const(0.0, np.float32), g.const(MASK_VALUE, np.float32)],
        "/mask/additive",
    )
    return cos, sin, mask


def build_decoder(
    spec: ModelSpec,
    fetch: Fetch,
    recipe: Recipe,
    fused: bool = True,
    quantized: dict[str, QuantizedWeight] | None = None,
    external: ExternalData | None = None,
) -> tuple[Any, dict[str, str]]:
    """The ModelProto and {initializer: storage type}. Weights are read one at a time.

    `fused`: the layers of onnx_fused.py (onnxruntime contrib ops, right-padded batches, no
    position_ids input); else the plain graph of standard ops below. `quantized`: weights already
    quantized (by canonical name), e.g. by GPTQ. `external`: the data file the weights are
    streamed to as they are built (the ModelProto then holds none of their bytes)."""
    from onnx import TensorProto, helper

    float_type = TensorProto.FLOAT16 if recipe.float_dtype == "float16" else TensorProto.FLOAT
    g = Graph(float_type, quantized=dict(quantized or {}), external=external)
    embed, lm_head = embedding_and_head(g, spec, fetch, recipe)
    if fused:
        from smolconvert.exporters.onnx_fused import build_layers

        h = build_layers(g, spec, fetch, recipe, embed)
    else:
        h = plain_layers(g, spec, fetch, recipe, embed)
    logits = lm_head(h)
    if float_type != TensorProto.FLOAT:
        logits = g.op("Cast", [logits], "/lm_head/fp32", to=TensorProto.FLOAT)
    g.op("Identity", [logits], "logits")
    graph = helper.make_graph(
        g.nodes,
        "decoder",
        _inputs(spec, float_type, position_ids=not fused),
        _outputs(spec, float_type),
        g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="smolconvert",
        ir_version=IR_VERSION,
    )
    return model, g.tensor_types


def plain_layers(g: Graph, spec: ModelSpec, fetch: Fetch, recipe: Recipe, embed: str) -> str:
    """The decoder layers and final norm in standard ops (honours position_ids and left padding)."""
    cos, sin, mask = rope_and_mask(g, spec)
    total = g.op("Shape", ["attention_mask"], "/attn/S", start=1, end=2)
    groups = spec.n_heads // spec.n_kv_heads
    split = g.op("Concat", [g.const([0, 0, groups, -1]), total], "/attn/split_shape", axis=0)
    merge = g.op("Concat", [g.const([0, 0, -1]), total], "/attn/merge_shape", axis=0)
    shared = Shared(cos, sin, mask, split, merge, recipe.accuracy_level)
    h = embed
    for i in range(spec.n_layers):
        p = f"model.layers.{i}"
        w = {
            t.split(".")[1]: add_linear(
                g, f"{p}.{t}", fetch(f"{p}.{t}"), recipe.codec_for(role_of(f"{p}.{t}"))
            )
            for t in LAYER_TENSORS
            if "proj" in t
        }
        norm1 = g.weight(
            f"{p}.input_layernorm.weight", fetch(f"{p}.input_layernorm.weight").astype(g.np_float)
        )
        norm2 = g.weight(
            f"{p}.post_attention_layernorm.weight",
            fetch(f"{p}.post_attention_layernorm.weight").astype(g.np_float),
        )
        a, _, _ = attention(
            g,
            spec,
            i,
            rms_norm(g, h, norm1, spec.rms_norm_eps, f"/model/layers.{i}/input_layernorm"),
            w,
            shared,
        )
        h = g.op("Add", [h, a], f"/model/layers.{i}/attn_residual")
        m = mlp(
            g,
            i,
            rms_norm(g, h, norm2, spec.rms_norm_eps, f"/model/layers.{i}/post_attention_layernorm"),
            w,
            shared,
        )
        h = g.op("Add", [h, m], f"/model/layers.{i}/mlp_residual")
    final = g.weight("model.norm.weight", fetch("model.norm.weight").astype(g.np_float))
    return rms_norm(g, h, final, spec.rms_norm_eps, "/model/norm")


def embedding_and_head(
    g: Graph, spec: ModelSpec, fetch: Fetch, recipe: Recipe
) -> tuple[str, Callable[[str], str]]:
    """The token embedding output and a function applying the lm_head. A tied embedding is stored
    once: float -> Gather + Gemm(transB) on the same tensor; quantized -> one packed buffer read by
    GatherBlockQuantized (rows) and MatMulNBits (the head), as onnxruntime-genai's builder does."""
    v, d = spec.vocab_size, spec.hidden_size
    name = "model.embed_tokens.weight"
    codec = recipe.codec_for("embedding")
    table = fetch(name)
    if codec is None:
        e = g.weight(name, table.astype(g.np_float, copy=False))
        embed = g.op("Gather", [e, "input_ids"], "/model/embed_tokens")
        tied_head = Linear((e,), v, d, None)
    else:
        qnames = add_quantized(g, name, g.quantize([name], table, codec))
        rows = g.op("Reshape", [qnames[0], g.const([v, -1])], "/model/embed_tokens/rows")
        inputs = [rows, "input_ids", qnames[1]] + list(qnames[2:])
        embed = g.op(
            "GatherBlockQuantized",
            inputs,
            "/model/embed_tokens",
            domain=MS_DOMAIN,
            bits=codec.bits,
            block_size=codec.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        if d % codec.block_size:  # rows are dequantized whole, the zero padding included
            embed = g.op(
                "Slice",
                [embed, g.const([0]), g.const([d]), g.const([-1])],
                "/model/embed_tokens/unpad",
            )
        tied_head = Linear(qnames, v, d, codec)
    del table
    if spec.tie_word_embeddings:
        head = tied_head
    else:
        w = fetch("lm_head.weight")
        hc = recipe.codec_for("lm_head")
        head = (
            Linear((g.weight("lm_head.weight", w.astype(g.np_float, copy=False)),), v, d, None)
            if hc is None
            else add_linear(g, "lm_head.weight", w, hc)
        )

    def apply(h: str) -> str:
        if head.codec is not None:
            return linear(g, h, head, "/lm_head", recipe.accuracy_level)
        # (V, d) stored as is: Gemm(transB) on (B*T, d) rows, reshaped back to (B, T, V).
        flat = g.op("Reshape", [h, g.const([-1, d])], "/lm_head/rows")
        y = g.op("Gemm", [flat, head.inputs[0]], "/lm_head/gemm", transB=1)
        shape = g.op(
            "Concat",
            [g.op("Shape", ["input_ids"], "/lm_head/bt"), g.const([v])],
            "/lm_head/shape",
            axis=0,
        )
        return g.op("Reshape", [y, shape], "/lm_head")  # type: ignore[no-any-return]

    return embed, apply


def _inputs(spec: ModelSpec, float_type: int, position_ids: bool) -> list[Any]:
    from onnx import TensorProto, helper

    out = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    if position_ids:
        out.append(
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            )
        )
    return out + _kv_cache(spec, float_type, "past_key_values", "past_sequence_length")


def _outputs(spec: ModelSpec, float_type: int) -> list[Any]:
    from onnx import TensorProto, helper

    out = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab_size]
        )
    ]
    return out + _kv_cache(spec, float_type, "present", "total_sequence_length")


def _kv_cache(spec: ModelSpec, float_type: int, prefix: str, length: str) -> list[Any]:
    """{prefix}.N.key/value value infos, (batch, kv_heads, `length`, head_dim) per layer."""
    from onnx import helper

    shape = ["batch_size", spec.n_kv_heads, length, spec.head_dim]
    return [
        helper.make_tensor_value_info(f"{prefix}.{i}.{kind}", float_type, shape)
        for i in range(spec.n_layers)
        for kind in ("key", "value")
    ]
