"""The mlprogram evaluator, checked op by op against coremltools' own reference implementations
(its constexpr decompressors), on small programs built with coremltools' MIL builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smolconvert.errors import UnsupportedError
from tests.conftest import require_module

require_module("coremltools", "coreml")


def _save(build, inputs, tmp_path: Path, name: str = "p") -> Path:
    """Convert a MIL builder function to a saved iOS 18 mlprogram (no model load: Linux)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    prog = mb.program(input_specs=inputs, opset_version=ct.target.iOS18)(build)
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return path


def _constexpr_oracle(path: Path) -> dict[str, np.ndarray]:
    """coremltools' own decompression of every constexpr op in the saved program."""
    from tests.coreml_oracle import constexpr_values

    return constexpr_values(path)


@pytest.mark.parametrize(
    "kind", ["uint4_fp16_offset", "int4_no_offset", "int8_channel", "uint4_uint4"]
)
def test_blockwise_shift_scale_equals_coremltools(tmp_path: Path, kind: str) -> None:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from smolconvert.validators.mil_eval import MilProgram

    rng = np.random.default_rng(0)
    rows, cols = 8, 64
    if kind == "int8_channel":
        data = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
        scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float16)
        offset = None
    elif kind == "int4_no_offset":
        data = rng.integers(-8, 8, (rows, cols)).astype(np.int8).astype(types.np_int4_dtype)
        scale = rng.uniform(0.01, 0.1, (rows, cols // 32)).astype(np.float16)
        offset = None
    else:
        data = rng.integers(0, 16, (rows, cols)).astype(np.uint8).astype(types.np_uint4_dtype)
        scale = rng.uniform(0.01, 0.1, (rows, cols // 32)).astype(np.float16)
        if kind == "uint4_uint4":
            offset = rng.integers(0, 16, scale.shape).astype(np.uint8).astype(types.np_uint4_dtype)
        else:
            offset = rng.uniform(0, 15, scale.shape).astype(np.float16)

    def build(x):
        w = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, name="w")
        return mb.linear(x=x, weight=mb.cast(x=w, dtype="fp32"), name="y")

    path = _save(build, [mb.TensorSpec(shape=(1, cols), dtype=types.fp32)], tmp_path)
    program = MilProgram(path)
    oracle = _constexpr_oracle(path)
    (name,) = oracle
    np.testing.assert_allclose(program.constants[name].numpy(), oracle[name], rtol=0, atol=1e-6)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    out = program.run({"x": x})
    (y,) = out.values()
    np.testing.assert_allclose(y.numpy(), x @ oracle[name].T, rtol=1e-4, atol=1e-4)
    del ct


@pytest.mark.parametrize("nbits", [4, 6, 8])
def test_lut_to_dense_equals_coremltools(tmp_path: Path, nbits: int) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from smolconvert.validators.mil_eval import MilProgram

    rng = np.random.default_rng(nbits)
    rows, cols, group = 32, 48, 16
    idx = rng.integers(0, 2**nbits, (rows, cols)).astype(np.uint8)
    if nbits != 8:
        idx = idx.astype(getattr(types, f"np_uint{nbits}_dtype"))
    lut = rng.standard_normal((rows // group, 1, 2**nbits, 1)).astype(np.float16)

    def build(x):
        w = mb.constexpr_lut_to_dense(indices=idx, lut=lut, name="w")
        return mb.linear(x=x, weight=mb.cast(x=w, dtype="fp32"), name="y")

    path = _save(build, [mb.TensorSpec(shape=(1, cols), dtype=types.fp32)], tmp_path)
    oracle = _constexpr_oracle(path)
    (name,) = oracle
    got = MilProgram(path).constants[name].numpy()
    np.testing.assert_array_equal(got, oracle[name])
    # and the lookup really is per group of 16 rows: a shared table would not give this
    assert not np.array_equal(got[:16], lut[1, 0, idx[:16].astype(np.int64), 0])


def test_int8_table_with_row_scale_equals_coremltools(tmp_path: Path) -> None:
    """The palettization our exporter writes: an int8 table per row, scaled per row by
    blockwise_shift_scale, then looked up by lut_to_dense."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from smolconvert.validators.mil_eval import MilProgram

    rng = np.random.default_rng(0)
    rows, cols = 32, 48
    idx = rng.integers(0, 16, (rows, cols)).astype(np.uint8).astype(types.np_uint4_dtype)
    table = rng.integers(-127, 128, (rows, 1, 16, 1)).astype(np.int8)
    scale = (rng.random((rows, 1, 1, 1)) + 0.5).astype(np.float16)

    def build(x):
        lut = mb.constexpr_blockwise_shift_scale(data=table, scale=scale, name="table")
        w = mb.constexpr_lut_to_dense(indices=idx, lut=lut, name="w")
        return mb.linear(x=x, weight=mb.cast(x=w, dtype="fp32"), name="y")

    path = _save(build, [mb.TensorSpec(shape=(1, cols), dtype=types.fp32)], tmp_path)
    oracle = _constexpr_oracle(path)
    got = MilProgram(path).constants["w"].numpy()
    np.testing.assert_array_equal(got, oracle["w"])
    row = np.arange(rows)[:, None]
    expect = (scale[:, 0, :, 0].astype(np.float32) * table[:, 0, :, 0]).astype(np.float16)
    np.testing.assert_array_equal(got, expect[row, idx.astype(np.int64)])


def test_fp16_ops_are_rounded_to_fp16(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from smolconvert.validators.mil_eval import MilProgram

    def build(x):
        h = mb.cast(x=x, dtype="fp16")
        y = mb.mul(x=h, y=np.float16(1.0 / 3.0), name="third")
        return mb.cast(x=y, dtype="fp32", name="out")

    path = _save(build, [mb.TensorSpec(shape=(4,), dtype=types.fp32)], tmp_path)
    x = np.array([1.0, 2.0, 1000.0, 1e-3], np.float32)
    (y,) = MilProgram(path).run({"x": x}).values()
    expected = (x.astype(np.float16) * np.float16(1.0 / 3.0)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(y.numpy(), expected)
    assert not np.array_equal(y.numpy(), x / 3)  # fp32 arithmetic would have been visible


def test_an_op_it_does_not_know_is_an_error_naming_it(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from smolconvert.validators.mil_eval import OPS, MilProgram

    assert "erf" not in OPS

    def build(x):
        return mb.erf(x=x, name="y")

    path = _save(build, [mb.TensorSpec(shape=(4,), dtype=types.fp32)], tmp_path)
    with pytest.raises(UnsupportedError, match="erf"):
        MilProgram(path)


def test_slice_update_in_place_does_not_change_an_earlier_read() -> None:
    from smolconvert.validators.mil_eval import _slice_by_index, _slice_update

    cache = torch.zeros(2, 3)
    read = _slice_by_index({"x": cache, "begin": [0, 0], "end": [1, 3]})
    _slice_update(
        {"x": cache, "update": torch.ones(1, 3), "begin": [0, 0], "end": [1, 3], "_in_place": True}
    )
    assert cache[0].sum() == 3 and read.sum() == 0
