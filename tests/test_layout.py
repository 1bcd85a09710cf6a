"""The package's shape: no import circle, no module over ~500 lines, nothing inside importing the
package's public face (issue 19)."""

from __future__ import annotations

import ast
from pathlib import Path

import smolconvert

ROOT = Path(smolconvert.__file__).parent
MAX_LINES = 500
PUBLIC = {"export", "load", "validate", "release", "merge_releases", "__version__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """smolconvert modules `path` imports anywhere (functions included), except under
    `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m and d.startswith(m + "."))}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_is_over_500_lines() -> None:
    long = {
        m: n
        for m, p in _modules().items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def test_nothing_inside_imports_the_public_face() -> None:
    offenders = []
    for m, path in _modules().items():
        if m == "smolconvert":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "smolconvert" for a in node.names):
                offenders.append(f"{m}: import smolconvert")
            if isinstance(node, ast.ImportFrom) and node.module == "smolconvert":
                names = {a.name for a in node.names} & PUBLIC
                if names:
                    offenders.append(f"{m}: from smolconvert import {', '.join(sorted(names))}")
    assert not offenders, offenders
