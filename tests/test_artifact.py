"""Output folders and artifact.json: nothing we did not write is deleted, swaps survive SIGKILL,
concurrent exports queue, and nothing cached is trusted without its hash."""

from __future__ import annotations

import errno
import json
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import smolconvert
from smolconvert import artifact as A
from smolconvert.cli import cli
from smolconvert.errors import ConfigError, CorruptFileError
from tests import tiny
from tests.conftest import require_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _gguf() -> None:
    require_module("gguf", "gguf")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny.write_folder(tmp_path / "model", tiny.config("llama"))


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stderr.strip().splitlines()


def refused(code: int, lines: list[str], *words: str) -> bool:
    errors = [x for x in lines if x.startswith("error:")]
    return code == 2 and len(errors) == 1 and all(w in errors[0] for w in words)


def fake_export(out: Path, marker: str, n_files: int = 6) -> A.Artifact:
    """What every exporter does with staging() and finish(), without a model."""
    with A.staging(out) as stage:
        for i in range(n_files):
            (stage / f"part{i}.bin").write_bytes(marker.encode() * 1000 + bytes([i]))
        meta = A.finish(
            stage,
            {
                "format": "test",
                "target": "gguf",
                "scheme": marker,
                "source_sha256": "0" * 64,
                "entry_points": {"model": "part0.bin"},
            },
        )
    return A.Artifact(out, meta)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---- never delete what we did not write ----


def test_foreign_folder_is_refused_unless_overwrite(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, lines = run("export", str(model), "--to", "gguf:f16", "-o", str(out))
    assert refused(code, lines, str(out), "keep.txt", "--overwrite"), lines
    assert (out / "keep.txt").read_text() == "precious"
    assert os.listdir(out) == ["keep.txt"] and leftovers(out) == []

    code, lines = run("export", str(model), "--to", "gguf:f16", "-o", str(out), "--overwrite")
    assert code == 0, lines
    assert not (out / "keep.txt").exists()
    A.Artifact.load(out, hashes=True)
    assert leftovers(out) == []


def test_input_folder_and_its_ancestors_are_never_replaced(model: Path, tmp_path: Path) -> None:
    before = tree(model)
    for out in (model, tmp_path):
        for extra in ((), ("--overwrite",)):
            code, lines = run("export", str(model), "--to", "gguf:f16", "-o", str(out), *extra)
            assert refused(code, lines, "input model"), (out, extra, lines)
    assert tree(model) == before


def test_working_folder_and_folder_holding_the_input_gguf(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = smolconvert.export(model, to="gguf:f16", out=tmp_path / "first")
    work = tmp_path / "work"
    work.mkdir()
    gguf_file = work / "model.gguf"
    shutil.copy(art.path("model"), gguf_file)
    (work / "notes.txt").write_text("mine")
    before = tree(work)
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        for extra in ((), ("--overwrite",)):
            code, lines = run("export", "model.gguf", "--to", "gguf:q8_0", "-o", out, *extra)
            assert refused(code, lines), (out, extra, lines)
    assert tree(work) == before

    # the same folder, not the working folder: refused as holding the input, even with --overwrite
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--overwrite",)):
        code, lines = run("export", str(gguf_file), "--to", "gguf:q8_0", "-o", "work", *extra)
        assert refused(code, lines, "input model"), lines
    assert tree(work) == before


def test_empty_folder_and_previous_artifact_are_replaced(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    first = smolconvert.export(model, to="gguf:f16", out=out)
    assert first.path("model").name.endswith("-f16.gguf")
    second = smolconvert.export(model, to="gguf:q8_0", out=out)  # an artifact: ours to replace
    assert [p.name for p in out.glob("*.gguf")] == [second.path("model").name]
    assert A.Artifact.load(out, hashes=True).scheme == "q8_0"
    code, lines = run("export", str(model), "--to", "gguf:q4_0", "-o", str(out), "--overwrite")
    assert code == 0, lines
    assert [p.name for p in out.glob("*.gguf")] == [A.Artifact.load(out).path("model").name]
    assert A.Artifact.load(out, hashes=True).scheme == "q4_0"
    assert leftovers(out) == []


def test_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "art"
    with pytest.raises(ConfigError, match="No space left on device"):
        with A.staging(out) as stage:
            (stage / "part.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "part.bin"))
    assert sorted(os.listdir(tmp_path)) == []


def test_output_that_is_a_file_or_under_a_file(model: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        smolconvert.export(model, to="gguf:f16", out=a_file)
    with pytest.raises(ConfigError, match="is a file"):
        smolconvert.export(model, to="gguf:f16", out=a_file / "sub")
    assert a_file.read_text() == "x"
    proc = subprocess.run(
        [sys.executable, "-m", "smolconvert.cli", "export", str(model), "--to", "gguf:f16"]
        + ["-o", str(a_file / "sub")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_a_one_line_error(model: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, lines = run("export", str(model), "--to", "gguf:f16", "-o", str(locked / "out"))
    finally:
        locked.chmod(0o755)
    assert refused(code, lines, "Permission denied"), lines


# ---- the swap survives SIGKILL at every step ----


def _swap_then_die(out: Path, kill_at: int, exchange: bool) -> None:
    """Child: stage a "new" artifact over `out`, then SIGKILL itself before file-system step
    number `kill_at` of the swap (renames, the exchange, every unlink/rmdir of the old tree)."""
    steps = 0

    def trap(fn):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            nonlocal steps
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    if not exchange:
        A._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
    with A.staging(out) as stage:
        for i in range(6):
            (stage / f"part{i}.bin").write_bytes(b"new" * 1000 + bytes([i]))
        A.finish(
            stage,
            {
                "format": "test",
                "target": "gguf",
                "scheme": "new",
                "source_sha256": "0" * 64,
                "entry_points": {"model": "part0.bin"},
            },
        )
        A._exchange = trap(A._exchange)
        for name in ("rename", "replace", "unlink", "rmdir"):
            setattr(os, name, trap(getattr(os, name)))
    os._exit(0)


def _exchange_works(folder: Path) -> bool:
    a, b = folder / "xa", folder / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return A._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_every_step_of_the_swap(tmp_path: Path, exchange: bool) -> None:
    if exchange and not _exchange_works(tmp_path):
        pytest.skip("this file system has no atomic exchange (RENAME_EXCHANGE)")
    fork = multiprocessing.get_context("fork")
    outcomes = []
    for kill_at in range(1, 40):
        out = tmp_path / f"k{kill_at}" / "art"
        fake_export(out, "old")
        child = fork.Process(target=_swap_then_die, args=(out, kill_at, exchange))
        child.start()
        child.join()
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL
        if out.exists():
            art = A.Artifact.load(out, hashes=True)  # never artifact.json with files missing
            outcomes.append(art.scheme)
        else:  # only between the two renames, without the exchange; the old one waits aside
            assert not exchange
            outcomes.append("aside")
            A.clean_stale(out)
            assert A.Artifact.load(out, hashes=True).scheme == "old"
        assert fake_export(out, "next").scheme == "next"  # the next run cleans every leftover
        assert leftovers(out) == [] and A.Artifact.load(out, hashes=True).scheme == "next"
    else:
        pytest.fail("the swap never completed")
    assert outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) > 5, outcomes
    assert ("aside" in outcomes) == (not exchange)


def test_stale_leftovers_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "art"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for name in (
            f".art.partial-{dead.pid}",  # the name used before this change
            f".art.partial-{dead.pid}-abc123",
            f".art.old-{dead.pid}-abc123",
            f".art.partial-{alive.pid}-abc123",
        ):
            (tmp_path / name).mkdir()
            (tmp_path / name / "x").write_text("x")
        fake_export(out, "new")
        assert leftovers(out) == [f".art.partial-{alive.pid}-abc123"]
    finally:
        alive.kill()
        alive.wait()


# ---- concurrent exports into one folder ----


def _export_after(barrier: multiprocessing.synchronize.Barrier, args: list[str]) -> None:
    barrier.wait(timeout=120)  # every process starts exporting at the same moment
    cli.main(args=args, prog_name="smolconvert")


def test_parallel_exports_into_one_folder(model: Path, tmp_path: Path) -> None:
    # A fork server imports torch once and forks each exporter from it: eight real processes
    # without eight imports of torch (no fork of pytest itself, whose torch may hold threads).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_artifact", "smolconvert.exporters.gguf"])
    n = 8
    out = tmp_path / "out"
    barrier = ctx.Barrier(n)
    args = ["export", str(model), "--to", "gguf:f16", "-o", str(out)]
    procs = [ctx.Process(target=_export_after, args=(barrier, args)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * n
    art = A.Artifact.load(out, hashes=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [A.ARTIFACT_FILE, "Modelfile", "README.md", art.path("model").name]
    )
    assert leftovers(out) == []


# ---- artifact.json carries its own hash; files are checked ----


def test_artifact_json_is_sealed_and_checked(tmp_path: Path) -> None:
    out = tmp_path / "art"
    art = fake_export(out, "x")
    meta_path = out / A.ARTIFACT_FILE
    on_disk = json.loads(meta_path.read_text())
    assert on_disk == art.meta and on_disk[A.META_HASH] == A.meta_digest(on_disk)
    A.Artifact.load(out, hashes=True)

    good = meta_path.read_text()
    measured = dict(on_disk, validation={"quality": {"kld_mean": 0.0123}})
    A.write_json(meta_path, measured)  # a writer that adds metrics reseals
    assert A.Artifact.load(out).meta["validation"]["quality"]["kld_mean"] == 0.0123
    flipped = meta_path.read_text().replace("0.0123", "0.0122")  # "3" -> "2": one bit
    for text, words in (
        ("[]", "JSON list"),
        ('{"files": 5}', "not a list"),
        (flipped, "does not match"),
        (good[: len(good) // 2], "not valid JSON"),
        (json.dumps({k: v for k, v in on_disk.items() if k != A.META_HASH}), "no meta_sha256"),
    ):
        meta_path.write_text(text)
        with pytest.raises(CorruptFileError, match=words):
            A.Artifact.load(out)
    meta_path.write_text(good)

    part = out / "part3.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0x01
    part.write_bytes(bytes(data))
    A.Artifact.load(out)  # sizes only: a cheap load still opens it
    with pytest.raises(CorruptFileError, match="part3.bin does not match its sha256"):
        A.Artifact.load(out, hashes=True)


def test_artifact_json_paths_stay_inside_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "art"
    art = fake_export(out, "x")
    escaped = dict(art.meta, files=[dict(art.meta["files"][0], path="../../etc/passwd")])
    A.write_json(out / A.ARTIFACT_FILE, escaped)
    with pytest.raises(CorruptFileError, match="files\\[0\\]"):
        A.Artifact.load(out)


def test_validate_notices_a_flipped_byte_and_a_corrupt_artifact_json(
    model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    art = smolconvert.export(model, to="gguf:f16", out=out)
    path = art.path("model")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    code, lines = run("validate", str(out), "--no-latency", "--windows", "1", "--ctx", "16")
    assert refused(code, lines, "does not match its sha256"), lines
    for text in ("[]", '{"files": 5}'):
        (out / A.ARTIFACT_FILE).write_text(text)
        code, lines = run("validate", str(out), "--no-latency", "--windows", "1", "--ctx", "16")
        assert refused(code, lines, "artifact.json"), (text, lines)
