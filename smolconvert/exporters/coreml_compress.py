"""Compressed weights into the Core ML program: quantize first, then pack.

`quantize_weights` asks the scheme's codecs (quantizers/coreml_codecs.py) for every weight's
compressed form before any program exists; `WeightWriter`, the first pass of coremltools'
pipeline, then replaces each weight const of the traced program by the iOS 18 constexpr op
holding those arrays. The traced consts of compressed weights are stride-0 zeros, so no float
copy of a compressed weight is ever made (at 1.7B the fp32 model alone is 6.8 GB). Nothing
here chooses a value: it names the ops and hands them the codecs' arrays as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


class WeightWriter:
    """The graph pass that writes our weights: each compressed weight's const in the traced fp32
    program becomes the constexpr op of its encoded form (cast to fp32 when the codec decodes to
    fp16, a cast the fp16 compute pass then cancels), before any other pass reads the const.
    `types` says how each 2-D weight is stored; `check` refuses a program missing any."""

    def __init__(self, spec: ModelSpec, scheme: CoremlScheme, encoded: dict[str, Encoded]):
        stray = sorted(set(encoded) - set(const_names(spec).values()))
        if stray:
            raise UnsupportedError(
                f"Core ML export: compressed weights with no program const: {stray}"
            )
        self.spec, self.scheme, self.encoded = spec, scheme, encoded
        self.types: dict[str, str] = {}

    @property
    def placeholders(self) -> frozenset[str]:
        """The canonical weights whose traced values are never read: every compressed one, and
        the tied lm_head (the embedding's const)."""
        names = set(self.encoded)
        if self.spec.tie_word_embeddings and "model.embed_tokens.weight" in names:
            names.add("lm_head.weight")
        return frozenset(names)

    def __call__(self, prog: Any) -> None:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        wanted = set(const_names(self.spec).values())  # first in the pipeline: names as traced
        for op in list(prog.functions["main"].operations):
            name = op.outputs[0].name if op.op_type == "const" else None
            canonical = name if name in wanted else None
            if canonical is None:
                continue
            codec_name = tensor_codec(self.scheme, canonical, self.spec)
            if codec_name is None:
                self.types[canonical] = self.scheme.compute
                continue
            enc = self.encoded.pop(canonical)  # the op holds the arrays from here on
            self.types[canonical] = enc.storage
            with op.enclosing_block:
                make = getattr(mb, f"constexpr_{enc.op}")
                new = make(**enc.arrays, before_op=op, name=op.name + "_" + codec_name)
                if new.dtype != op.outputs[0].dtype:
                    dtype = types.builtin_to_string(op.outputs[0].dtype)
                    new = mb.cast(x=new, dtype=dtype, before_op=op, name=op.name + "_cast")
            op.enclosing_block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new
            )
            op.enclosing_block.remove_ops([op])

    def check(self) -> dict[str, str]:
        """{canonical name: storage type} over every 2-D weight, once the pass has run."""
        wanted = const_names(self.spec)
        missing = sorted(set(wanted.values()) - set(self.types))
        if missing:
            raise UnsupportedError(
                f"Core ML export: weights not found in the converted program: {missing}; consts "
                f"expected under the names {sorted(wanted)}"
            )
        return self.types
