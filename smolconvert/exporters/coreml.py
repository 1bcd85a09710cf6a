"""Core ML export: a .mlpackage (mlprogram) of the reference decoder, compressed by our codecs.

Three steps, quantize then build: every weight's compressed form from the scheme's codecs
(quantizers/coreml_recipes.py and coreml_codecs.py, asked by exporters/coreml_compress.py), the
float program of the decoder in Apple's stateful LLM layout (exporters/coreml_program.py), then
the compressed weights written into that program as iOS 18 constexpr ops. This module runs them,
saves the package with deterministic bytes, and writes `coreml_config.json` and the tokenizer
files beside it so an app knows how to drive the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import UnsupportedError
from smolconvert.exporters.coreml_compress import WeightWriter, quantize_weights
from smolconvert.exporters.coreml_program import context_length, convert
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.options import CoremlOptions
from smolconvert.quantizers.coreml_codecs import CODECS
from smolconvert.quantizers.coreml_recipes import SCHEMES, CoremlScheme, tensor_codec

LAYOUT_NOTE = (
    "Apple's stateful LLM pattern (WWDC24 'Deploy machine learning models on-device with Core ML'; "
    "swift-transformers): states keyCache/valueCache (layers, 1, kv_heads, ctx, head_dim), "
    "inputs inputIds + causalMask, output logits; coremltools 9.0 mlprogram"
)
PACKAGE = "model.mlpackage"


def describe_schemes() -> list[dict[str, Any]]:
    return [
        {
            "target": f"coreml:{s.name}",
            "bits_per_weight": 16.0
            if s.default is None and s.compute == "fp16"
            else 32.0
            if s.default is None
            else CODECS[s.default].bits_per_weight,
            "compute_precision": s.compute,
            "mixture": [f"{r.role}->{r.codec}" for r in s.rules],
            "description": s.description,
        }
        for s in SCHEMES.values()
    ]


def export_coreml(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: CoremlOptions | None = None,
) -> A.Artifact:
    if scheme not in SCHEMES:
        raise UnsupportedError(
            f"unknown Core ML scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES))}"
        )
    if imatrix is not None:
        raise UnsupportedError("Core ML schemes take no imatrix; drop --imatrix for coreml targets")
    sch = SCHEMES[scheme]
    kv_cache: str = (options or CoremlOptions()).kv_cache
    spec = model.spec
    _check_shapes(spec, sch)
    context = context_length(spec)
    ios18 = kv_cache == "stateful" or sch.default is not None  # our constexpr ops are iOS 18's
    step = progress.Steps(quiet)
    if sch.default is not None:
        step(f"quantizing weights as {scheme}")
    with _quiet_progress(quiet):
        encoded = quantize_weights(model, sch)
    writer = WeightWriter(spec, sch, encoded)
    del encoded  # the writer hands each to its op
    step(f"converting with coremltools ({kv_cache} KV cache, {sch.compute} compute)")
    with _quiet_progress(quiet):
        mlmodel = convert(
            model,
            compute=sch.compute,
            kv_cache=kv_cache,
            context=context,
            ios18=ios18,
            weights_pass=writer,
            placeholders=writer.placeholders,
        )
    types = writer.check()
    mlmodel.short_description = f"{model.name} ({scheme}) converted by smolconvert"
    mlmodel.user_defined_metadata["co.huggingface.exporters.name"] = model.name
    mlmodel.user_defined_metadata["smolconvert.scheme"] = scheme
    mlmodel.user_defined_metadata["smolconvert.kv_cache"] = kv_cache
    # a date in the file would make today's export differ from tomorrow's
    mlmodel.user_defined_metadata.pop("com.github.apple.coremltools.conversion_date", None)
    with A.staging(out) as stage:
        step("saving the .mlpackage")
        mlmodel.save(str(stage / PACKAGE))
        _normalise_manifest(stage / PACKAGE)
        _write_spec_deterministically(stage / PACKAGE, mlmodel)
        model.tokenizer.save(stage)
        A.write_json(stage / "coreml_config.json", _app_config(model, kv_cache, context, sch))
        import coremltools as ct

        meta = {
            "format": "mlpackage",
            "target": "coreml",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": PACKAGE, "config": "coreml_config.json"},
            "tensor_types": dict(sorted(types.items())),
            "options": {"kv_cache": kv_cache},
            "context_length": context,
            "layout": LAYOUT_NOTE,
            "tool_versions": A.tool_versions("coremltools", "numpy", "torch"),
            "min_runtime": {
                "iOS": "18" if ios18 else "17",
                "macOS": "15" if ios18 else "14",
                "coremltools": ct.__version__,
            },
        }
        meta = A.finish(stage, meta)
    return A.Artifact(out.resolve(), meta)


def _check_shapes(spec: ModelSpec, scheme: CoremlScheme) -> None:
    """Every block codec's weights must be whole blocks wide; all offenders in one message."""
    bad, blocks = [], set()
    for name in canonical_names(spec):
        codec = tensor_codec(scheme, name, spec)
        block = CODECS[codec].block_size if codec else 0
        if block > 1 and expected_shape(spec, name)[1] % block:
            bad.append(f"{name} {expected_shape(spec, name)}")
            blocks.add(block)
    if bad:
        raise UnsupportedError(
            f"coreml:{scheme.name} needs columns divisible by "
            f"{' or '.join(map(str, sorted(blocks)))}; these are not: {', '.join(bad)} "
            "(use coreml:int8 or a palettized scheme)"
        )


def _app_config(
    model: CanonicalModel, kv_cache: str, context: int, scheme: CoremlScheme
) -> dict[str, Any]:
    spec, special = model.spec, model.tokenizer.special
    return {
        "model": model.name,
        "package": PACKAGE,
        "kv_cache": kv_cache,
        "context_length": context,
        "inputs": {
            "inputIds": "int32 (1, T): the new tokens, 1 <= T <= context_length",
            "causalMask": (
                f"{'fp16' if scheme.compute == 'fp16' else 'fp32'} (1, 1, T, past + T): additive, "
                "0 where query t may attend key s (s <= past + t), -1e4 elsewhere"
                + ("; past = tokens already in the state" if kv_cache == "stateful" else "")
            ),
        },
        "states": ["keyCache", "valueCache"] if kv_cache == "stateful" else [],
        "outputs": {"logits": "(1, T, vocab): row t predicts the token after inputIds[t]"},
        "vocab_size": spec.vocab_size,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"],
        "scheme": scheme.name,
    }


def _normalise_manifest(package: Path) -> None:
    """coremltools writes random UUIDs as item ids in Manifest.json; derive them from the paths so
    the same export gives the same bytes."""
    import hashlib

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    items = manifest.get("itemInfoEntries", {})
    renamed = {}
    for old, info in items.items():
        new = hashlib.sha256(info.get("path", old).encode()).hexdigest()[:32].upper()
        new = f"{new[:8]}-{new[8:12]}-{new[12:16]}-{new[16:20]}-{new[20:]}"
        renamed[new] = info
        if manifest.get("rootModelIdentifier") == old:
            manifest["rootModelIdentifier"] = new
    manifest["itemInfoEntries"] = dict(sorted(renamed.items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_spec_deterministically(package: Path, mlmodel: Any) -> None:
    """Rewrite model.mlmodel with its map fields (user metadata, op inputs and attributes) in key
    order. coremltools saves `spec.SerializeToString()`, and protobuf's upb backend orders map
    entries by a hash seeded per process, so the same spec gave different bytes in each run."""
    path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not path.is_file():
        import coremltools as ct

        raise UnsupportedError(
            f"coremltools {ct.__version__} saved no {path.relative_to(package)} in the package; "
            "smolconvert writes coremltools 9.0's .mlpackage layout: pip install coremltools~=9.0"
        )
    path.write_bytes(mlmodel.get_spec().SerializeToString(deterministic=True))


@contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """coremltools draws tqdm bars for every pass and warns about untested torch versions; keep
    them off non-terminal logs (errors still raise)."""
    import contextlib
    import io
    import logging
    import warnings

    if not quiet and sys.stderr.isatty():
        yield
        return
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
