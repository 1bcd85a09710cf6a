"""Texts for evaluation and calibration: the user's file, or English text that ships with CPython.

The default evaluation text is `pydoc_data.topics` in key order; the default calibration text (for
importance matrices) is the second half of the same text, so a default imatrix never sees the
tokens the default evaluation scores (that uses the first few dozen KB).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from smolconvert.errors import ConfigError


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_eval_text() -> EvalText:
    """The English reference topics that ship with every CPython, in a stable order."""
    return EvalText("pydoc_data.topics", _topics())


def default_calibration_text() -> EvalText:
    text = _topics()
    return EvalText("pydoc_data.topics (second half)", text[len(text) // 2 :])


def load_text(path: str | Path | None, default: EvalText | None = None) -> EvalText:
    if path is None:
        return default if default is not None else default_eval_text()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"text file {path} is not UTF-8 ({e})") from None
    if not text.strip():
        raise ConfigError(f"text file {path} is empty")
    return EvalText(path.name, text)
