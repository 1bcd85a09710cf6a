"""Exporters, one module per format family, and the registry of targets (`gguf:q4_k_m`, ...).

A target is `family:scheme`. Each family says which schemes it has, how to export one, and how to
open a runner for what it wrote; adding a family is one entry here and its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smolconvert.errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # smolconvert.exporters.<module> with export_<name>, describe_schemes
    runner_factory: str  # "module:function" opening a runner on the artifact's entry point

    def schemes(self) -> list[dict[str, Any]]:
        import importlib

        return importlib.import_module(self.module).describe_schemes()  # type: ignore[no-any-return]


FAMILIES = {
    "gguf": Family(
        "gguf", "smolconvert.exporters.gguf", "smolconvert.validators.llamacpp:open_llamacpp_runner"
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
