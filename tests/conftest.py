"""Shared fixtures: seeded tiny random models (written as real HF folders) and the default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests import tiny


@pytest.fixture(params=["llama", "smollm3"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_folder(tmp_path: Path, arch: str) -> Path:
    """A tiny random model of `arch` as a Hugging Face folder (config, safetensors, tokenizer)."""
    return tiny.write_folder(tmp_path / f"tiny-{arch}", tiny.config(arch))


@pytest.fixture(scope="session")
def default_model():
    from smolconvert.errors import MissingDependencyError
    from smolconvert.model.default import default_gguf_path

    try:
        default_gguf_path()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    import smolconvert

    return smolconvert.load("default")


@pytest.fixture(scope="session")
def default_reference(default_model):
    from smolconvert.model.reference import build_reference

    return build_reference(default_model.spec, source=default_model.weights)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def require(ok: bool, reason: str) -> None:
    """Skip when a runtime or tool is missing (reason printed); in CI (CI=true) fail instead,
    because CI installs everything and a silent skip there would hide a broken install."""
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(reason)


def require_module(name: str, extra: str) -> None:
    import importlib.util

    require(
        importlib.util.find_spec(name) is not None,
        f"needs {name}: pip install 'smolconvert[{extra}]'",
    )


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """smolconvert's on-disk cache (model/samples.py) in a folder of this session's, also for the
    export processes tests start: tests neither read nor leave anything in the user's cache."""
    os.environ["SMOLCONVERT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
