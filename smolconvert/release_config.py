"""The release config: one TOML file naming the source, the texts, and every target with its budget.

Parsing is strict: an unknown key anywhere is an error that names the key and its line, because a
misspelt budget (`kld_mea = 0.01`) silently ignored would let any artifact through. Paths are
relative to the config file. Sharding picks a stable subset: targets sorted by name, dealt
round-robin.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError
from smolconvert.validators.gates import BUDGET_KEYS, check_budget_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RELEASE_KEYS = {
    "source": "model: a Hugging Face folder, a .gguf file or 'default'",
    "out": "output folder (default: release)",
    "eval_text": "evaluation text file, or 'default' (CPython's pydoc topics)",
    "calibration_text": "imatrix calibration text file, or 'default'",
    "ctx": "window length in tokens (default 512)",
    "windows": "windows scored per artifact (default 8)",
    "latency": "time every artifact (default true)",
    "threads": "CPU threads for runners (default: all)",
    "strict_config": "refuse config.json fields smolconvert does not know (default false: warn)",
    "allow_nonfinite": "convert weights holding NaN or infinities (default false: refuse)",
    "base_model": "Hub repository the model cards name (default: guessed from source)",
}
TARGET_KEYS = {
    "target": "family:scheme, e.g. gguf:q4_k_m",
    "name": "artifact name (default family-scheme)",
    "options": "exporter options, e.g. { layout = 'genai' }",
    "imatrix": "importance-weighted quantization from the calibration text",
    "latency": "time this artifact (default: the release's latency setting)",
    "budget": "quality budget: kld_mean, kld_p99, top1_min, ppl_ratio_max, size_max_mb, "
    "decode_tok_s_min",
}


@dataclass(frozen=True)
class TargetConfig:
    name: str
    target: str  # family:scheme
    options: dict[str, str] = field(default_factory=dict)
    imatrix: bool = False
    budget: dict[str, float] = field(default_factory=dict)
    latency: bool = True

    @property
    def family(self) -> str:
        return self.target.partition(":")[0]

    @property
    def scheme(self) -> str:
        return self.target.partition(":")[2]


@dataclass(frozen=True)
class ReleaseConfig:
    source: str
    out: Path
    targets: tuple[TargetConfig, ...]
    eval_text: str | None = None  # None: the built-in default
    calibration_text: str | None = None
    ctx: int = 512
    windows: int = 8
    latency: bool = True
    threads: int | None = None
    strict_config: bool = False
    allow_nonfinite: bool = False
    base_model: str | None = None

    def sha256(self) -> str:
        """What the release builds and measures (not where it writes)."""
        d = asdict(self)
        d.pop("out")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    def shard(self, index: int, count: int) -> tuple[TargetConfig, ...]:
        """Targets of shard `index` (1-based) of `count`: sorted by name, dealt round-robin."""
        if not 1 <= index <= count:
            raise ConfigError(f"shard {index}/{count}: the index must be between 1 and {count}")
        ordered = sorted(self.targets, key=lambda t: t.name)
        return tuple(t for k, t in enumerate(ordered) if k % count == index - 1)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1:
        raise ConfigError(f"--shard takes i/n such as 1/2, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def load_config(config: str | Path | Mapping[str, Any]) -> ReleaseConfig:
    """A ReleaseConfig from a TOML file, or from a dict shaped like one (paths relative to cwd)."""
    if isinstance(config, Mapping):
        return _from_dict(dict(config), Path.cwd(), _Lines(""), "config")
    path = Path(config)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"release config {path} does not exist") from None
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return _from_dict(data, path.resolve().parent, _Lines(raw), str(path))


class _Lines:
    """Finds the line of a key in the raw TOML, for error messages (tomllib keeps no positions)."""

    def __init__(self, raw: str) -> None:
        self.lines = raw.splitlines()

    def _section(self, header: str, nth: int = 0) -> int:
        seen = -1
        for i, line in enumerate(self.lines):
            if line.strip().replace(" ", "") == header:
                seen += 1
                if seen == nth:
                    return i
        return -1

    def find(self, key: str, header: str | None = None, nth: int = 0) -> str:
        """ " (line N)" for `key` inside the nth table `header` (None: the top level), else ""."""
        start = 0
        if header is not None:
            start = self._section(header, nth) + 1
            if start == 0:
                return ""
        pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
        for i in range(start, len(self.lines)):
            head = self.lines[i].strip()
            if head.startswith("[") and not head.startswith("[targets."):
                break  # the next table (sub-tables [targets.budget] belong to the entry)
            if pattern.search(self.lines[i]):
                return f" line {i + 1}"
        return ""


def _unknown(where: str, table: str, key: str, known: Mapping[str, str], line: str) -> ConfigError:
    return ConfigError(
        f"{where}{line}: unknown key {key!r} in {table}; known keys: {', '.join(known)}"
    )


def _from_dict(data: dict[str, Any], base: Path, lines: _Lines, where: str) -> ReleaseConfig:
    for key in data:
        if key not in ("release", "targets"):
            raise _unknown(
                where, "the top level", key, {"release": "", "targets": ""}, lines.find(key)
            )
    rel = data.get("release")
    if not isinstance(rel, dict):
        raise ConfigError(f"{where}: needs a [release] table with at least source = ...")
    for key in rel:
        if key not in RELEASE_KEYS:
            raise _unknown(where, "[release]", key, RELEASE_KEYS, lines.find(key, "[release]"))
    if "source" not in rel:
        raise ConfigError(
            f"{where} [release]: source is required (a model folder, .gguf or default)"
        )

    def path_or_default(key: str) -> str | None:
        value = rel.get(key, "default")
        if not isinstance(value, str):
            raise ConfigError(f"{where} [release]: {key} must be a string, got {value!r}")
        return None if value == "default" else str((base / value).resolve())

    source = str(rel["source"])
    if source != "default":
        source = str((base / source).resolve())

    def integer(key: str, default: int | None, low: int) -> int | None:
        value = rel.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"{where} [release]{lines.find(key, '[release]')}: {key} must be an integer "
                f">= {low}, got {value!r}"
            )
        return int(value)

    def flag(key: str, default: bool) -> bool:
        value = rel.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where} [release]{lines.find(key, '[release]')}: {key} must be true or false, "
                f"got {value!r}"
            )
        return value

    latency = flag("latency", True)
    targets = _targets(data.get("targets"), lines, where, latency)
    return ReleaseConfig(
        source=source,
        out=(base / str(rel.get("out", "release"))).resolve(),
        targets=targets,
        eval_text=path_or_default("eval_text"),
        calibration_text=path_or_default("calibration_text"),
        ctx=integer("ctx", 512, 16) or 512,
        windows=integer("windows", 8, 1) or 8,
        latency=latency,
        threads=integer("threads", None, 1),
        strict_config=flag("strict_config", False),
        allow_nonfinite=flag("allow_nonfinite", False),
        base_model=_optional_text(rel, "base_model", where),
    )


def _optional_text(rel: dict[str, Any], key: str, where: str) -> str | None:
    value = rel.get(key)
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise ConfigError(f"{where} [release]: {key} must be a non-empty string, got {value!r}")
    return value


def _targets(raw: Any, lines: _Lines, where: str, latency: bool) -> tuple[TargetConfig, ...]:
    from smolconvert.targets import parse_target

    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{where}: needs at least one [[targets]] table with target = 'family:scheme'"
        )
    out: list[TargetConfig] = []
    for n, t in enumerate(raw):
        here = f"{where} [[targets]] #{n + 1}"
        if not isinstance(t, dict):
            raise ConfigError(f"{here}: must be a table")
        for key in t:
            if key not in TARGET_KEYS:
                raise _unknown(
                    where,
                    f"[[targets]] #{n + 1}",
                    key,
                    TARGET_KEYS,
                    lines.find(key, "[[targets]]", n),
                )
        if "target" not in t:
            raise ConfigError(f"{here}: target = 'family:scheme' is required")
        family, scheme = parse_target(str(t["target"]))
        options = t.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{here}: options must be a table, got {options!r}")
        try:
            resolved = family.resolve_options(options)
            family.check_options(scheme, resolved)
        except ConfigError as e:
            raise ConfigError(f"{here}{lines.find('options', '[[targets]]', n)}: {e}") from None
        budget_raw = t.get("budget", {})
        if not isinstance(budget_raw, dict):
            raise ConfigError(f"{here}: budget must be a table, got {budget_raw!r}")
        for key in budget_raw:
            if key not in BUDGET_KEYS:
                line = lines.find(key, "[[targets]]", n)
                raise _unknown(
                    where, f"[[targets]] #{n + 1} budget", key, dict.fromkeys(BUDGET_KEYS, ""), line
                )
        budget = check_budget_keys(
            budget_raw, here, line=partial(lines.find, header="[[targets]]", nth=n)
        )
        timed = t.get("latency", latency)
        if not isinstance(timed, bool):
            raise ConfigError(f"{here}: latency must be true or false, got {timed!r}")
        if "decode_tok_s_min" in budget and not timed:
            raise ConfigError(f"{here}: a decode_tok_s_min budget needs latency = true")
        imatrix = t.get("imatrix", False)
        if not isinstance(imatrix, bool):
            raise ConfigError(f"{here}: imatrix must be true or false, got {imatrix!r}")
        name = str(t.get("name", f"{family.name}-{scheme}"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ConfigError(f"{here}: name {name!r} must be letters, digits, '.', '_' or '-'")
        if any(o.name == name for o in out):
            raise ConfigError(
                f"{here}: two targets are named {name!r}; give one of them name = '...'"
            )
        out.append(TargetConfig(name, f"{family.name}:{scheme}", resolved, imatrix, budget, timed))
    return tuple(out)
