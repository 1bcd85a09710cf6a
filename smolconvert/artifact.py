"""Artifacts: a folder a runtime loads as it is, plus `artifact.json` describing it.

artifact.json records the source model hash, spec, target, scheme, per-tensor storage types, every
file with its size and sha256, tool versions, and `meta_sha256`, the hash of everything else in it
(measured metrics included), so a damaged or edited artifact.json is never trusted. JSON is written
with sorted keys and no timestamps: the same input gives the same bytes.

Writing an output folder never deletes what smolconvert did not write: a folder that is not an
artifact, holds the input model or the working folder is refused (`overwrite` lifts only the first
refusal). An export is built in a hidden sibling (`.NAME.partial-PID-XXXX`) under a per-folder lock
(`.NAME.lock`), then swapped in with one atomic exchange, so a process killed at any point leaves
the old complete artifact or the new one, and at worst a hidden leftover the next export removes.
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolconvert.errors import ConfigError, CorruptFileError
from smolconvert.files import sha256_file, write_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent exports are not queued there
    fcntl = None  # type: ignore[assignment]

ARTIFACT_FILE = "artifact.json"
META_HASH = "meta_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every key but `meta_sha256` itself."""
    body = {k: v for k, v in meta.items() if k != META_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with its `meta_sha256` (re)computed; call after every change to artifact metadata."""
    return {**meta, META_HASH: meta_digest(meta)}


def write_json(path: Path, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """Atomic (write_atomic). An artifact.json is sealed here, so every writer (export,
    validate, release) leaves a hash that matches what it wrote."""
    if path.name == ARTIFACT_FILE and isinstance(obj, dict):
        obj = seal(obj)
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def file_entries(folder: Path) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ARTIFACT_FILE):
        entries.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "size_bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return entries


def tool_versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("smolconvert", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_meta(model: Any) -> dict[str, Any]:
    """The artifact.json keys every exporter writes about the model it exported from."""
    return {
        "model": model.name,
        "source": model.source,
        "source_sha256": model.sha256,
        "origin": model.origin,
        "spec": model.spec.to_dict(),
        "ignored_config_fields": list(model.ignored_config_fields),
        "base_model": model.base_model,
        "license": model.license,
    }


def _safe_relative(path: Any) -> bool:
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")):
        return False
    return ".." not in Path(path).parts and ":" not in Path(path).parts[0]


def meta_problems(meta: Any) -> list[str]:
    """Everything wrong with a parsed artifact.json (empty when it is sound and sealed)."""
    if not isinstance(meta, dict):
        return [f"it holds a JSON {type(meta).__name__}, not an object"]
    problems = []
    if META_HASH not in meta:
        problems.append(f"no {META_HASH} (written by an older smolconvert, or edited)")
    elif meta[META_HASH] != meta_digest(meta):
        problems.append(f"{META_HASH} does not match its content (damaged or edited)")
    for key in ("target", "scheme"):
        if not isinstance(meta.get(key), str):
            problems.append(f"{key!r} is not a string")
    files = meta.get("files")
    if not isinstance(files, list):
        problems.append("'files' is not a list")
        files = []
    for n, f in enumerate(files):
        if not (
            isinstance(f, dict)
            and _safe_relative(f.get("path"))
            and type(f.get("size_bytes")) is int
            and f["size_bytes"] >= 0
            and isinstance(f.get("sha256"), str)
            and _SHA256.fullmatch(f["sha256"])
        ):
            problems.append(f"files[{n}] is not a {{path, size_bytes, sha256}} entry")
    entry_points = meta.get("entry_points")
    if not isinstance(entry_points, dict) or not all(
        _safe_relative(p) for p in entry_points.values()
    ):
        problems.append("'entry_points' is not a map of relative paths")
    return problems


@dataclass
class Artifact:
    folder: Path
    meta: dict[str, Any]

    @property
    def target(self) -> str:
        return str(self.meta["target"])

    @property
    def scheme(self) -> str:
        return str(self.meta["scheme"])

    @property
    def size_bytes(self) -> int:
        """What a runtime loads: the model card and Modelfile are not counted."""
        from smolconvert.publish import runtime_bytes

        return runtime_bytes(self.meta["files"])

    def path(self, role: str) -> Path:
        return self.folder / self.meta["entry_points"][role]

    @classmethod
    def load(cls, folder: str | Path, *, hashes: bool = False) -> Artifact:
        """Read and check artifact.json (its own hash, its shape) and every file it lists: sizes
        always, sha256 too when `hashes` (validate and the release cache ask for it; hashing
        every file of a GB artifact on every load would cost seconds for nothing)."""
        folder = Path(folder)
        meta_path = folder / ARTIFACT_FILE
        if not meta_path.is_file():
            raise ConfigError(f"{folder} is not a smolconvert artifact (no {ARTIFACT_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{meta_path}: not valid JSON ({e}); re-export") from None
        problems = meta_problems(meta)
        if problems:
            raise CorruptFileError(f"{meta_path}: {'; '.join(problems)}; re-export the artifact")
        bad = []
        for f in meta["files"]:
            path = folder / f["path"]
            if not path.is_file() or path.stat().st_size != f["size_bytes"]:
                bad.append(f"{f['path']} is missing or not {f['size_bytes']} bytes")
            elif hashes and sha256_file(path) != f["sha256"]:
                bad.append(f"{f['path']} does not match its sha256")
        if bad:
            raise CorruptFileError(f"{folder}: {'; '.join(bad)}; re-export the artifact")
        return cls(folder, meta)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


# ---- output folders: what may be replaced, locking, the atomic swap ----


@dataclass(frozen=True)
class OutputPolicy:
    """What the current export may replace. `protect`: the input model's paths, never replaced
    nor any folder holding them; `replace_damaged`: the release's own folders whose artifact.json
    is unreadable (they are rebuilt); `note`: where "waiting for the lock" is said."""

    overwrite: bool = False
    protect: tuple[Path, ...] = ()
    replace_damaged: bool = False
    note: Callable[[str], None] | None = None


# Exporters call `staging(out)` without knowing who asked; export() and release() say what they
# allow here, so every exporter's signature stays as it is.
_POLICY: contextvars.ContextVar[OutputPolicy | None] = contextvars.ContextVar(
    "smolconvert_output_policy", default=None
)


@contextmanager
def output_policy(policy: OutputPolicy) -> Iterator[None]:
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def input_paths(model: Any) -> tuple[Path, ...]:
    """The files and folder a model was read from, as given and resolved (symlinks followed)."""
    paths = [Path(p) for p in model.weights.files()]
    if str(model.source) != "default" and Path(model.source).expanduser().exists():
        paths.append(Path(model.source).expanduser())
    both = {Path(os.path.abspath(p)) for p in paths} | {p.resolve() for p in paths}
    return tuple(sorted(both))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _folder_state(out: Path) -> str:
    """absent | empty | artifact | damaged (an artifact.json we cannot trust) | foreign."""
    if not os.path.lexists(out):
        return "absent"
    if not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder; choose a folder path")
    try:
        names = os.listdir(out)
    except OSError as e:
        raise ConfigError(f"cannot read output folder {out}: {e.strerror}") from None
    if not names:
        return "empty"
    meta_path = out / ARTIFACT_FILE
    if not meta_path.is_file():
        return "foreign"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "damaged"
    if not meta_problems(meta):
        return "artifact"
    legacy = isinstance(meta, dict) and META_HASH not in meta
    legacy = legacy and {"format", "target", "scheme", "files", "source_sha256"} <= set(meta)
    return "artifact" if legacy else "damaged"  # written by smolconvert before meta_sha256


def check_output(out: str | Path, policy: OutputPolicy = OutputPolicy()) -> None:
    """Raise ConfigError unless `out` may be (re)written under `policy`; nothing is changed."""
    out = Path(out).expanduser().resolve()
    for parent in out.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ConfigError(f"cannot create {out}: {parent} is a file, not a folder")
            break
    if out.parent == out:
        raise ConfigError(f"refusing to write to {out}: it is the root folder")
    for p in policy.protect:
        if _within(p, out):
            raise ConfigError(
                f"refusing to write to {out}: it is or holds the input model ({p}), which an "
                "export would replace; choose another output folder"
            )
    for name, where in (("the working folder", Path.cwd), ("the home folder", Path.home)):
        try:
            keep = where().resolve()
        except (OSError, RuntimeError):  # a deleted working folder, no home: nothing to protect
            continue
        if _within(keep, out):
            raise ConfigError(
                f"refusing to write to {out}: it is or holds {name}, which an export would "
                "replace; pass a new folder, e.g. -o out/my-model"
            )
    state = _folder_state(out)
    if state in ("absent", "empty", "artifact") or policy.overwrite:
        return
    if state == "damaged" and policy.replace_damaged:
        return
    held = sorted(os.listdir(out))
    shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    what = "an artifact.json smolconvert cannot verify" if state == "damaged" else shown
    raise ConfigError(
        f"{out} exists and is not a smolconvert artifact (it holds {what}); an export replaces "
        "its output folder: choose a new or empty folder, or pass --overwrite to replace it"
    )


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: Path, note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `.NAME.lock` beside `folder`; a second holder waits its turn.

    The holder removes the lock file when done; a waiter that then wins the lock on the removed
    file sees that it is gone and locks the new one, so two processes never both hold it."""
    if fcntl is None:
        yield
        return
    path = _lock_path(folder)
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write beside {folder}: {e.strerror} ({path})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if note is not None and not told:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    note(f"waiting for another smolconvert process (pid {holder}) using {folder}")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
                if (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but unreaped child is a zombie: it will never finish its staging folder
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _leftovers(out: Path) -> Iterator[tuple[Path, str, int]]:
    """Hidden siblings of `out` from staging (`partial`) or swapping (`old`), with their pid."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)(-[0-9a-f]+)?")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            yield out.parent / name, m.group(1), int(m.group(2))


def clean_stale(out: Path) -> None:
    """Remove staging and swap leftovers of dead processes (call under the folder's lock).

    Where the atomic exchange is unavailable the swap is two renames; a kill between them leaves
    no `out` but the old artifact aside, which is put back here before anything else happens."""
    stale = [(p, kind) for p, kind, pid in _leftovers(out) if not _alive(pid)]
    if not os.path.lexists(out):
        aside = [p for p, kind in stale if kind == "old" and (p / ARTIFACT_FILE).is_file()]
        if aside:
            os.rename(aside[0], out)
            stale = [(p, kind) for p, kind in stale if p != aside[0]]
    for p, _ in stale:
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP);
    False where the system or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, out: Path) -> None:
    """Put the complete `stage` at `out`; whatever was at `out` is removed only afterwards."""
    if not os.path.lexists(out):
        os.rename(stage, out)
    elif _exchange(stage, out):  # one step: `out` is the old or the new artifact, never neither
        shutil.rmtree(stage, ignore_errors=True)
    else:
        aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
        os.rename(out, aside)
        os.rename(stage, out)
        shutil.rmtree(aside, ignore_errors=True)


def _write_error(e: BaseException, out: Path) -> bool:
    """A full disk, a read-only file system or a folder we may not write in: the user's to fix."""
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if e.errno not in (errno.EACCES, errno.EPERM) or not isinstance(e.filename, (str, bytes)):
        return False
    return out.parent in Path(os.fsdecode(e.filename)).absolute().parents


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden sibling folder to build in; swapped in for `out` only if the block completes
    (and wrote artifact.json, via `finish`). Refuses `out` when the current output policy does."""
    policy = _POLICY.get() or OutputPolicy()
    out = Path(out).expanduser().resolve()
    check_output(out, policy)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out.parent}: {e.strerror}") from None
    with folder_lock(out, policy.note):
        clean_stale(out)
        check_output(out, policy)  # again under the lock: another process may have written it
        stage = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            stage.mkdir()
        except OSError as e:
            raise ConfigError(f"cannot write in {out.parent}: {e.strerror}") from None
        try:
            yield stage
            if not (stage / ARTIFACT_FILE).is_file():
                raise AssertionError(f"exporter left no {ARTIFACT_FILE} in {stage}")
            _swap_in(stage, out)
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            if _write_error(e, out):
                reason = getattr(e, "strerror", None) or e
                raise ConfigError(f"cannot write the artifact {out}: {reason}") from None
            raise


def finish(stage: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the model card, record every file of a staged artifact and write artifact.json
    (last), sealed."""
    from smolconvert.publish.card import CARD_FILE, artifact_card, has_card

    sizes = [  # the card lists sizes only: hashing every file twice would cost seconds per GB
        {"path": p.relative_to(stage).as_posix(), "size_bytes": p.stat().st_size}
        for p in sorted(stage.rglob("*"))
        if p.is_file() and p.name != ARTIFACT_FILE
    ]
    if has_card(meta):
        write_atomic(stage / CARD_FILE, artifact_card(dict(meta, files=sizes)))
    meta = seal(dict(meta, files=file_entries(stage)))
    write_json(stage / ARTIFACT_FILE, meta)
    return meta
