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


def mean_kld(p_logits, q_logits) -> float:
    """Mean KL(p || q) over rows of two logit arrays (T, vocab), in float64."""
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def tiny_exports(root: Path, family, options: dict):
    """get(arch, scheme) -> (model, reference, artifact): a tiny model of `arch` exported to
    `family:scheme` under `root`, once per (arch, scheme)."""
    import smolconvert
    from smolconvert.model.reference import build_reference

    cache: dict[tuple[str, str], tuple] = {}

    def get(arch: str, scheme: str):
        if (arch, scheme) not in cache:
            folder = root / f"tiny-{arch}"
            if not folder.exists():
                tiny.write_folder(folder, tiny.config(arch))
            model = smolconvert.load(str(folder))
            ref = build_reference(model.spec, source=model.weights)
            art = family.export(model, scheme, root / f"{arch}-{scheme}", options=options)
            cache[arch, scheme] = (model, ref, art)
        return cache[arch, scheme]

    return get


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
