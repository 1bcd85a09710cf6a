"""The target registry: every export family as one typed object.

A target is `family:scheme` (`gguf:q4_k_m`). A Family holds its exporter, its options as a frozen
dataclass (parsed once, from `-O KEY=VALUE` on the command line, the API's `options` or a release
config), how to open a runner on what it wrote, and the modules whose code decides its bytes (the
release cache rebuilds an artifact when one of them changes). Exporters and runners are imported
only when called: listing targets or timing a runtime in a fresh process must not pay for torch.
Adding a family is one entry here, its exporter and its runner.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolconvert.errors import ConfigError, UnsupportedError
from smolconvert.options import (
    CoremlOptions,
    ExecutorchOptions,
    GgufOptions,
    LitertOptions,
    MlcOptions,
    OnnxOptions,
    option_choices,
    option_texts,
    parse_option,
)

if TYPE_CHECKING:
    from smolconvert.artifact import Artifact
    from smolconvert.model.imatrix import Imatrix
    from smolconvert.model.source import CanonicalModel
    from smolconvert.validators.runner import Runner


ExportFn = Callable[..., "Artifact"]
OpenRunner = Callable[["Artifact", int, "int | None"], "Runner"]
CheckOptions = Callable[[str, Any], None]  # (scheme, options) -> None or a ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    options: type  # a frozen dataclass of Literal-typed fields with defaults
    exporter: Callable[[], ExportFn]  # imports and returns export_<family>
    describe: Callable[[], list[dict[str, Any]]]  # one row per scheme, for `export --list`
    runner: Callable[[], OpenRunner]  # imports and returns the runner's opener
    code: tuple[str, ...]  # smolconvert modules whose code decides the exported bytes
    libraries: tuple[str, ...]  # distributions whose version changes what is built or measured
    extra: str  # the pip extra that brings its runtime
    checker: Callable[[], CheckOptions] | None = None  # imports and returns its options check

    def schemes(self) -> list[str]:
        return [row["target"].partition(":")[2] for row in self.describe()]

    def parse_options(self, given: Mapping[str, Any] | Any | None = None) -> Any:
        """This family's options from a mapping of strings (or an instance, returned as is):
        unknown keys and values are errors that list what is allowed."""
        if isinstance(given, self.options):
            return given
        given = dict(given or {})
        allowed = option_choices(self.options)
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            have = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{self.name} exports have no option {', '.join(unknown)} (options: {have})"
            )
        values = {}
        for key, value in given.items():
            try:
                values[key] = parse_option(self.options, key, value)
            except ValueError as e:
                raise ConfigError(f"{self.name} option {key}={value!r} {e}") from None
        return self.options(**values)

    def resolve_options(self, given: Mapping[str, Any] | Any | None = None) -> dict[str, str]:
        """Every option with its value, as recorded in release configs and manifests (unset
        numbers left out)."""
        return option_texts(self.parse_options(given))

    def check_options(self, scheme: str, given: Mapping[str, Any] | Any | None = None) -> None:
        """Refuse options that do not fit the scheme, before any long work."""
        options = self.parse_options(given)
        if self.checker is not None:
            self.checker()(scheme, options)

    def export(
        self,
        model: CanonicalModel,
        scheme: str,
        out: Path,
        *,
        imatrix: Imatrix | None = None,
        options: Mapping[str, Any] | Any | None = None,
        quiet: bool = True,
    ) -> Artifact:
        """Run the family's exporter; returns the Artifact it wrote."""
        export = self.exporter()
        opts = self.parse_options(options)
        return export(model, scheme, out, imatrix=imatrix, quiet=quiet, options=opts)

    def open_runner(self, art: Artifact, n_ctx: int = 1024, threads: int | None = None) -> Runner:
        return self.runner()(art, n_ctx, threads)

    def code_sha256(self) -> str:
        """sha256 over the source of the modules that decide this family's bytes."""
        return modules_sha256(self.code)


def modules_sha256(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ConfigError(f"module {name} named in the target registry does not exist")
        h.update(name.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()


# --- the families ---------------------------------------------------------------------------------
# Code every export depends on: loading, canonical names, artifacts, calibration text.
COMMON_CODE = (
    "smolconvert.api",
    "smolconvert.artifact",
    "smolconvert.publish",  # which files count in an artifact's size
    "smolconvert.publish.card",  # every artifact's README.md
    "smolconvert.files",
    "smolconvert.options",
    "smolconvert.texts",
    "smolconvert.model.imatrix",
    "smolconvert.model.reference",
    "smolconvert.model.source",
    "smolconvert.model.spec",
    "smolconvert.model.tokenizer",
    "smolconvert.model.weights",
    "smolconvert.quantizers.codec",
    "smolconvert.quantizers.recipe",
    # the registry holds every family's codecs, so each export loads them all
    "smolconvert.quantizers.registry",
    "smolconvert.quantizers.coreml_codecs",
    "smolconvert.quantizers.ggml",
    "smolconvert.quantizers.group",
    "smolconvert.quantizers.kmeans",
    "smolconvert.quantizers.nbits",
    "smolconvert.quantizers.iquants",
    "smolconvert.quantizers.kquants",
    "smolconvert.quantizers.legacy",
    "smolconvert.quantizers.scale_search",
    "smolconvert.model.gguf_layout",
)


def _gguf_export() -> ExportFn:
    from smolconvert.exporters.gguf import export_gguf

    return export_gguf


def _gguf_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.gguf import describe_schemes

    return describe_schemes()


def _gguf_check() -> CheckOptions:
    from smolconvert.exporters.gguf import check_options

    return check_options


def _gguf_runner() -> OpenRunner:
    from smolconvert.validators.llamacpp import open_llamacpp_runner

    return open_llamacpp_runner


def _onnx_export() -> ExportFn:
    from smolconvert.exporters.onnx import export_onnx

    return export_onnx


def _onnx_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.onnx import describe_schemes

    return describe_schemes()


def _onnx_runner() -> OpenRunner:
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    return open_onnxruntime_runner


def _coreml_export() -> ExportFn:
    from smolconvert.exporters.coreml import export_coreml

    return export_coreml


def _coreml_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.coreml import describe_schemes

    return describe_schemes()


def _coreml_runner() -> OpenRunner:
    from smolconvert.validators.coreml import open_coreml_runner

    return open_coreml_runner


def _mlc_export() -> ExportFn:
    from smolconvert.exporters.mlc import export_mlc

    return export_mlc


def _mlc_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.mlc import describe_schemes

    return describe_schemes()


def _mlc_runner() -> OpenRunner:
    from smolconvert.validators.mlc import open_mlc_runner

    return open_mlc_runner


def _executorch_export() -> ExportFn:
    from smolconvert.exporters.executorch import export_executorch

    return export_executorch


def _executorch_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.executorch import describe_schemes

    return describe_schemes()


def _context_check(family: str) -> Callable[[], CheckOptions]:
    def make() -> CheckOptions:
        def check(scheme: str, options: ExecutorchOptions | LitertOptions) -> None:
            n = options.max_context_len
            if n is not None and (n != int(n) or n < 16):
                raise ConfigError(
                    f"{family} option max_context_len={n:g} must be a whole number >= 16"
                )

        return check

    return make


def _executorch_runner() -> OpenRunner:
    from smolconvert.validators.executorch import open_executorch_runner

    return open_executorch_runner


def _litert_export() -> ExportFn:
    from smolconvert.exporters.litert import export_litert

    return export_litert


def _litert_describe() -> list[dict[str, Any]]:
    from smolconvert.exporters.litert import describe_schemes

    return describe_schemes()


def _litert_runner() -> OpenRunner:
    from smolconvert.validators.litert import open_litert_runner

    return open_litert_runner


FAMILIES: dict[str, Family] = {
    "gguf": Family(
        "gguf",
        GgufOptions,
        _gguf_export,
        _gguf_describe,
        _gguf_runner,
        (
            *COMMON_CODE,
            "smolconvert.exporters.gguf",
            "smolconvert.publish.ollama",  # the Modelfile beside every GGUF
            "smolconvert.quantizers.gguf_auto",
            "smolconvert.quantizers.gguf_recipes",
        ),
        ("gguf", "numpy", "torch", "llama-cpp-python"),
        "gguf",
        _gguf_check,
    ),
    "onnx": Family(
        "onnx",
        OnnxOptions,
        _onnx_export,
        _onnx_describe,
        _onnx_runner,
        (
            *COMMON_CODE,
            "smolconvert.exporters.onnx",
            "smolconvert.exporters.onnx_decoder",
            "smolconvert.exporters.onnx_fused",
            "smolconvert.exporters.onnx_kv",
            "smolconvert.exporters.onnx_ops",
            "smolconvert.exporters.onnx_plain",
            "smolconvert.exporters.onnx_weights",
            "smolconvert.quantizers.gptq",
            "smolconvert.model.samples",
            "smolconvert.quantizers.onnx_recipes",
        ),
        ("onnx", "onnxruntime", "numpy", "torch"),
        "onnx",
    ),
    "coreml": Family(
        "coreml",
        CoremlOptions,
        _coreml_export,
        _coreml_describe,
        _coreml_runner,
        (
            *COMMON_CODE,
            "smolconvert.exporters.coreml",
            "smolconvert.exporters.coreml_compress",
            "smolconvert.exporters.coreml_program",
            "smolconvert.quantizers.coreml_recipes",
        ),
        ("coremltools", "numpy", "torch"),
        "coreml",
    ),
    "mlc": Family(
        "mlc",
        MlcOptions,
        _mlc_export,
        _mlc_describe,
        _mlc_runner,
        (*COMMON_CODE, "smolconvert.exporters.mlc", "smolconvert.model.mlc_layout"),
        ("apache-tvm", "numpy", "torch"),
        "mlc",
    ),
    "executorch": Family(
        "executorch",
        ExecutorchOptions,
        _executorch_export,
        _executorch_describe,
        _executorch_runner,
        (
            *COMMON_CODE,
            "smolconvert.exporters.executorch",
            "smolconvert.quantizers.executorch_recipes",
            # 8da4w's levels: GPTQ on the ONNX int4 calibration
            "smolconvert.exporters.onnx_kv",
            "smolconvert.exporters.onnx_weights",
            "smolconvert.model.samples",
            "smolconvert.quantizers.gptq",
            "smolconvert.quantizers.onnx_recipes",
        ),
        ("executorch", "torchao", "torch"),
        "executorch",
        _context_check("executorch"),
    ),
    "litert": Family(
        "litert",
        LitertOptions,
        _litert_export,
        _litert_describe,
        _litert_runner,
        (
            *COMMON_CODE,
            "smolconvert.exporters.litert",
            "smolconvert.quantizers.litert_recipes",
            "smolconvert.quantizers.smoothing",
            "smolconvert.exporters.onnx_kv",  # the calibration windows
        ),
        ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch"),
        "litert",
        _context_check("litert"),
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedError(
            f"unknown target family {name!r}; choose one of {', '.join(FAMILIES)}"
        ) from None


def parse_target(target: str) -> tuple[Family, str]:
    """`family:scheme` -> (Family, scheme), both checked against the registry."""
    family, _, scheme = target.partition(":")
    if family not in FAMILIES:
        raise UnsupportedError(
            f"unknown target {target!r}; targets look like gguf:q4_k_m "
            f"(families: {', '.join(FAMILIES)}; see `smolconvert export --list`)"
        )
    known = FAMILIES[family].schemes()
    if scheme not in known:
        raise UnsupportedError(
            f"unknown scheme {scheme!r} for {family}; choose one of {', '.join(sorted(known))}"
        )
    return FAMILIES[family], scheme
