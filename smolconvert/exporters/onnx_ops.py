"""Building blocks of the ONNX decoder graph: nodes, initializers streamed to the data file, and
the two ways a projection is stored (float MatMul or packed MatMulNBits).

Graphs are built node by node with onnx.helper instead of traced: full control of the ops
(MatMulNBits, GatherBlockQuantized for a tied embedding stored once), stable node and tensor
names (byte-identical output) and no dependency on torch.export's shape specialisation. Weights
arrive through `Weights`: quantized ones were computed before building, float ones are fetched
from the source as they are written, so the builders only lay out and pack.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from smolconvert.errors import ValidationError
from smolconvert.quantizers.nbits import FORMATS, BlockFormat, QuantizedWeight, stack_rows

OPSET = 21  # onnxruntime >= 1.20 (and onnxruntime-node 1.20+, Transformers.js 3.1+) load it
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"

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


class Weights:
    """The canonical weights as the builders take them: quantized ones from the mapping computed
    before building (given up as they are packed), float ones fetched from the source as they are
    written, so at most one float weight is held. Records what was taken, for `check_written`."""

    def __init__(
        self,
        fetch: Fetch,
        plan: Mapping[str, str | None],
        quantized: Mapping[str, QuantizedWeight] | None = None,
    ) -> None:
        self._fetch = fetch
        self.plan = dict(plan)  # canonical name -> codec name, None: float
        self._quantized = dict(quantized or {})
        self._written: set[str] = set()

    def format(self, name: str) -> BlockFormat | None:
        """The MatMulNBits format `name` is stored in; None: float."""
        codec = self.plan[name]
        return None if codec is None else FORMATS[codec]

    def float32(self, name: str) -> NDArray[np.float32]:
        self._written.add(name)
        return self._fetch(name)

    def packed(self, names: list[str]) -> QuantizedWeight:
        """The quantized weights `names`, stacked along N in that order."""
        missing = [n for n in names if n not in self._quantized]
        if missing:
            raise ValidationError(f"ONNX export: no quantized form was computed for {missing}")
        parts = [self._quantized.pop(n) for n in names]
        wrong = [
            f"{n} ({p.format.name}, planned {self.plan[n]})"
            for n, p in zip(names, parts, strict=True)
            if p.format.name != self.plan[n]
        ]
        if wrong:
            raise ValidationError(f"ONNX export: weights quantized off the plan: {wrong}")
        self._written.update(names)
        return stack_rows(parts)

    def check_written(self, expected: Iterable[str]) -> None:
        """Every expected tensor written exactly as planned, and nothing else."""
        expected = set(expected)
        missing = sorted(expected - self._written)
        stray = sorted((self._written - expected) | set(self._quantized))
        if missing or stray:
            raise ValidationError(
                f"ONNX export: tensors never written: {missing}; "
                f"written or quantized but not in the model: {stray}"
            )


@dataclass
class Graph:
    """Nodes and initializers in creation order; names are deterministic. With `external`, every
    initializer big enough goes to that file as it is created (the TensorProto only points at it);
    without, initializers keep their raw data."""

    float_type: int  # onnx.TensorProto.FLOAT or FLOAT16
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # initializer -> storage type
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
    format: BlockFormat | None


def add_quantized(g: Graph, prefix: str, qw: QuantizedWeight) -> tuple[str, ...]:
    """MatMulNBits' B, scales and (uint8 zero points only) zero_points, named `prefix`.*."""
    storage = f"{qw.format.name} (MatMulNBits)"
    names = [
        g.weight(f"{prefix}.qweight", qw.packed, storage),
        g.weight(f"{prefix}.scales", qw.scales),
    ]
    if qw.zero_points is not None:
        names.append(g.weight(f"{prefix}.zero_points", qw.zero_points))
    return tuple(names)


def add_linear(g: Graph, weights: Weights, name: str, parts: list[str] | None = None) -> Linear:
    """One projection stored as `name`: the canonical weights `parts` (default: just `name`),
    which share one codec, stacked along N."""
    parts = parts or [name]
    fmt = weights.format(parts[0])
    if fmt is None:
        ws = [weights.float32(p) for p in parts]
        w = ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)
        del ws
        n, k = w.shape
        # one C-ordered copy (astype would copy once to the transposed order, weight() again)
        return Linear((g.weight(name, np.ascontiguousarray(w.T, dtype=g.np_float)),), n, k, None)
    qw = weights.packed(parts)
    n, k = qw.shape
    return Linear(add_quantized(g, name, qw), n, k, fmt)


def linear(g: Graph, x: str, lin: Linear, name: str, accuracy_level: int) -> str:
    """x (B, T, K) @ W^T: MatMul on a float weight, or MatMulNBits (scales, optional uint8 zero
    points)."""
    if lin.format is None:
        return g.op("MatMul", [x, lin.inputs[0]], name)
    return g.op(
        "MatMulNBits",
        [x, *lin.inputs],
        name,
        domain=MS_DOMAIN,
        K=lin.k,
        N=lin.n,
        bits=lin.format.bits,
        block_size=lin.format.block_size,
        accuracy_level=accuracy_level,
    )
