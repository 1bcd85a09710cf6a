"""smolconvert's version, read from the installed package's metadata: pyproject.toml is its one
source."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smolconvert")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
