"""Exporters, one module per format family, and the registry of targets (`gguf:q4_k_m`, ...).

A target is `family:scheme`. Each family module defines `export_<family>(model, scheme, out, *,
imatrix, quiet, options)`, `describe_schemes()` and `OPTIONS` (option name -> allowed values, the
default first); the registry says how to open a runner on what it wrote. Adding a family is one
entry here and its module.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smolconvert.errors import ConfigError, UnsupportedError


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # smolconvert.exporters.<module>: export_<name>, describe_schemes, OPTIONS
    runner_factory: str  # "module:function" opening a runner on the artifact's "model" entry point
    install_hint: str  # the extra that brings its runtime
    libraries: tuple[str, ...] = ()  # distributions whose version changes what is built or measured

    def load(self) -> Any:
        return importlib.import_module(self.module)

    def schemes(self) -> list[dict[str, Any]]:
        return self.load().describe_schemes()  # type: ignore[no-any-return]

    def export(
        self,
        model: Any,
        scheme: str,
        out: Any,
        *,
        imatrix: Any = None,
        options: Mapping[str, Any] | None = None,
        quiet: bool = True,
    ) -> Any:
        """Run the family's exporter; returns the Artifact it wrote."""
        exporter = getattr(self.load(), f"export_{self.name}")
        return exporter(
            model, scheme, out, imatrix=imatrix, quiet=quiet, options=self.resolve_options(options)
        )

    def options(self) -> dict[str, tuple[str, ...]]:
        return dict(getattr(self.load(), "OPTIONS", {}))

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, str]:
        """Every option of this family with its value: `given` checked, defaults filled in."""
        allowed = self.options()
        given = dict(given or {})
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            have = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{self.name} exports have no option {', '.join(unknown)} (options: {have})"
            )
        out = {}
        for key, values in allowed.items():
            value = str(given.get(key, values[0]))
            if value not in values:
                raise ConfigError(
                    f"{self.name} option {key}={value!r} is not one of {', '.join(values)}"
                )
            out[key] = value
        return out


FAMILIES = {
    "gguf": Family(
        "gguf",
        "smolconvert.exporters.gguf",
        "smolconvert.validators.llamacpp:open_llamacpp_runner",
        "pip install 'smolconvert[gguf]'",
        ("gguf", "numpy", "torch", "llama-cpp-python"),
    ),
    "onnx": Family(
        "onnx",
        "smolconvert.exporters.onnx",
        "smolconvert.validators.onnxruntime:open_onnxruntime_runner",
        "pip install 'smolconvert[onnx]'",
        ("onnx", "onnxruntime", "numpy", "torch"),
    ),
    "coreml": Family(
        "coreml",
        "smolconvert.exporters.coreml",
        "smolconvert.validators.coreml:open_coreml_runner",
        "pip install 'smolconvert[coreml]'",
        ("coremltools", "numpy", "torch"),
    ),
    "mlc": Family(
        "mlc",
        "smolconvert.exporters.mlc",
        "smolconvert.validators.mlc:open_mlc_runner",
        "pip install 'smolconvert[mlc]'",
        ("apache-tvm", "numpy", "torch"),
    ),
}


def parse_target(target: str) -> tuple[Family, str]:
    family, _, scheme = target.partition(":")
    if family not in FAMILIES:
        raise UnsupportedError(
            f"unknown target {target!r}; targets look like gguf:q4_k_m "
            f"(families: {', '.join(sorted(FAMILIES))}; see `smolconvert export --list`)"
        )
    known = [s["target"].partition(":")[2] for s in FAMILIES[family].schemes()]
    if scheme not in known:
        raise UnsupportedError(
            f"unknown scheme {scheme!r} for {family}; choose one of {', '.join(sorted(known))}"
        )
    return FAMILIES[family], scheme
