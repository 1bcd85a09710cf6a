"""The fuzz bases (tiny folders and GGUF files), built once per session on first use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import cases as C


class Bases:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, C.Base] = {}

    def get(self, name: str) -> C.Base:
        if name not in self._built:
            self._built[name] = C.build_base(name, self.root)
        return self._built[name]


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    return Bases(tmp_path_factory.mktemp("fuzz-bases"))
