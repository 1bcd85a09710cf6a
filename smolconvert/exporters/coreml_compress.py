"""Compressed weights into the Core ML program: quantize first, then pack.

`quantize_weights` asks the scheme's codecs (quantizers/coreml_codecs.py) for every weight's
compressed form before any program exists; `compress` then replaces each weight const of the
converted program by the iOS 18 constexpr op holding those arrays (a coremltools graph pass).
Nothing here chooses a value: it names the ops and hands them the codecs' arrays as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smolconvert import progress
from smolconvert.errors import UnsupportedError
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.quantizers.coreml_codecs import CODECS, Encoded
from smolconvert.quantizers.coreml_recipes import CoremlScheme, tensor_codec


def const_names(spec: ModelSpec) -> dict[str, str]:
    """Program const name -> canonical name for every 2-D weight (the tied lm_head is the
    embedding's const). coremltools names a traced parameter by its path, '.' -> '_'."""
    out = {}
    for name in canonical_names(spec):
        if len(expected_shape(spec, name)) != 2:
            continue
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        out[name.replace(".", "_")] = name
    return out


def quantize_weights(model: CanonicalModel, scheme: CoremlScheme) -> dict[str, Encoded]:
    """Canonical name -> compressed form of every weight the scheme gives a codec, in canonical
    order. Codecs read the canonical fp32 weight, not the program's fp16 copy: one rounding, not
    two."""
    spec = model.spec
    encoded = {}
    for name in canonical_names(spec):
        codec = tensor_codec(scheme, name, spec)
        if codec is None:
            continue
        w = model.weights.get(name).float().numpy()
        encoded[name] = CODECS[codec].quantize(np.ascontiguousarray(w, np.float32), None)
    return encoded


def compress(
    mlmodel: Any,
    spec: ModelSpec,
    scheme: CoremlScheme,
    encoded: dict[str, Encoded],
    quiet: bool,
) -> tuple[Any, dict[str, str]]:
    """Replace each weight const by the constexpr op of its encoded form; returns (mlmodel,
    {canonical name: storage type}) over every 2-D weight."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    wanted = const_names(spec)
    types: dict[str, str] = {}
    found: set[str] = set()

    class WriteOurWeights(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for op in list(prog.functions["main"].operations):
                if op.op_type != "const":
                    continue
                base = op.outputs[0].name.removesuffix("_to_fp16")
                canonical = wanted.get(base)
                if canonical is None:
                    continue
                found.add(canonical)
                codec_name = tensor_codec(scheme, canonical, spec)
                if codec_name is None:
                    types[canonical] = scheme.compute
                    continue
                enc = encoded[canonical]
                types[canonical] = enc.storage
                with op.enclosing_block:
                    make = getattr(mb, f"constexpr_{enc.op}")
                    new = make(**enc.arrays, before_op=op, name=op.name + "_" + codec_name)
                op.enclosing_block.replace_uses_of_var_after_op(
                    anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
                )
                op.enclosing_block.remove_ops([op])

    stray = sorted(set(encoded) - set(wanted.values()))
    if stray:
        raise UnsupportedError(f"Core ML export: compressed weights with no program const: {stray}")
    step = progress.Steps(quiet)
    step(f"writing weights as {scheme.name}")
    out = mlmodel
    if scheme.default is not None:
        out = _apply_graph_pass(mlmodel, WriteOurWeights(), spec_version=9, skip_model_load=True)
    else:
        WriteOurWeights().apply(_program_of(mlmodel))
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise UnsupportedError(
            f"Core ML export: weights not found in the converted program: {missing}; consts "
            f"expected under the names {sorted(wanted)}"
        )
    return out, types


def _program_of(mlmodel: Any) -> Any:
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
    )
