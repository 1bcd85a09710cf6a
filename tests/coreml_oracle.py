"""coremltools' own decompression of a saved program's constexpr ops: the oracle our evaluator and
exporter tests compare with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_program(package: Path) -> Any:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    m = ct.models.MLModel(str(package), skip_model_load=True)
    spec = m.get_spec()
    return load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=m.weights_dir
    )


def constexpr_value(op: Any) -> np.ndarray:
    """The op's decompressed value. coremltools' `materialized_val_inference` follows a chained
    `data` input but not a chained `lut` (an int8 table scaled by blockwise_shift_scale), so that
    one input is materialized first and the op's own `decompress` applied."""
    if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
        axis = None if op.vector_axis is None else op.vector_axis.val
        value = type(op).decompress(op.indices.val, constexpr_value(op.lut.op), axis)
    else:
        value = op.materialized_val_inference()
    return np.asarray(value, np.float32)


def constexpr_values(package: Path) -> dict[str, np.ndarray]:
    """{output name: value} of every constexpr op in the saved program."""
    return {
        op.outputs[0].name: constexpr_value(op)
        for op in load_program(package).functions["main"].operations
        if op.op_type.startswith("constexpr_")
    }
