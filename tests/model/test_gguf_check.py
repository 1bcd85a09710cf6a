"""The GGUF pre-check: hostile headers and tensor layouts refused before gguf-py reads them.

Each case starts from a valid tiny GGUF written by gguf.GGUFWriter, then patches bytes found with
gguf-py's own reader (offsets of the field or tensor info to change), so no layout is hand-written.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from smolconvert.errors import CorruptFileError
from smolconvert.model.gguf_check import check_gguf
from smolconvert.model.source import load_model
from tests import tiny
from tests.model.test_weights import write_gguf

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    cfg = tiny.config("llama")
    write_gguf(path, cfg, tiny.state_dict(cfg))
    return path


def tensor_info(path: Path, name: str) -> tuple[int, int, int]:
    """File offsets of a tensor info's type and offset fields, and its data offset."""
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    field = t.field
    type_at = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    return type_at, type_at + 4, int(field.parts[5][0])


def patched(valid: Path, tmp_path: Path, edits: dict[int, bytes], cut: int = 0) -> Path:
    data = bytearray(valid.read_bytes())
    for at, value in edits.items():
        data[at : at + len(value)] = value
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data[: len(data) - cut]))
    return out


def refused(path: Path) -> str:
    """The one-line message, from both the pre-check and the loader users reach."""
    with pytest.raises(CorruptFileError) as e:
        check_gguf(path)
    with pytest.raises(CorruptFileError) as loaded:
        load_model(path)
    assert str(loaded.value) == str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_a_valid_file_passes(valid: Path) -> None:
    check_gguf(valid)
    assert load_model(valid).spec.n_layers == 2


def test_overlapping_tensors(valid: Path, tmp_path: Path) -> None:
    _, _, first = tensor_info(valid, "blk.0.attn_q.weight")
    _, offset_at, _ = tensor_info(valid, "blk.0.attn_k.weight")
    message = refused(patched(valid, tmp_path, {offset_at: struct.pack("<Q", first)}))
    assert (
        "tensor blk.0.attn_k.weight" in message and "starts inside blk.0.attn_q.weight" in message
    )


def test_offset_shifted_by_three_bytes(valid: Path, tmp_path: Path) -> None:
    _, offset_at, offset = tensor_info(valid, "blk.1.ffn_up.weight")
    message = refused(patched(valid, tmp_path, {offset_at: struct.pack("<Q", offset + 3)}))
    assert f"blk.1.ffn_up.weight (offset {offset + 3}) is not aligned to 32 bytes" in message


@pytest.mark.parametrize(("qtype", "expect"), [(T.F16, "belong to no tensor"), (T.Q4_K, "block")])
def test_retyped_tensor(valid: Path, tmp_path: Path, qtype: T, expect: str) -> None:
    """An F32 tensor's type field changed: its data no longer matches shape x type."""
    type_at, _, _ = tensor_info(valid, "blk.0.ffn_gate.weight")
    message = refused(patched(valid, tmp_path, {type_at: struct.pack("<I", qtype)}))
    assert expect in message


def test_retyped_to_a_wider_type_overlaps_the_next(valid: Path, tmp_path: Path) -> None:
    type_at, _, _ = tensor_info(valid, "blk.0.ffn_gate.weight")
    message = refused(patched(valid, tmp_path, {type_at: struct.pack("<I", T.F64)}))
    assert "starts inside blk.0.ffn_gate.weight" in message


def test_last_tensor_retyped_leaves_trailing_bytes(valid: Path, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(valid))
    last = reader.tensors[-1]
    assert last.n_bytes >= 64  # retyping to F16 frees more than one alignment's padding
    type_at, _, _ = tensor_info(valid, last.name)
    message = refused(patched(valid, tmp_path, {type_at: struct.pack("<I", T.F16)}))
    assert "after the last tensor" in message


@pytest.mark.parametrize("cut", [1, 4096])
def test_truncated_file(valid: Path, tmp_path: Path, cut: int) -> None:
    message = refused(patched(valid, tmp_path, {}, cut=cut))
    assert "past the end of the file" in message and "truncated" in message


def test_truncated_inside_the_header(valid: Path, tmp_path: Path) -> None:
    out = tmp_path / "head.gguf"
    out.write_bytes(valid.read_bytes()[:3000])
    assert "truncated" in refused(out)


def token_type_count_at(path: Path) -> tuple[int, int]:
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.token_type"]
    item_type_at = field.offset + sum(int(p.nbytes) for p in field.parts[:3])
    return item_type_at, item_type_at + 4


def test_huge_array_count_is_refused_fast_and_in_bounded_memory(
    valid: Path, tmp_path: Path
) -> None:
    """The issue's file: token_type as uint8 with 2**40 items. gguf-py alone appends an empty
    value per item past the end of the file (~50 MB/s, for hours); run in a fresh process so its
    peak RSS is measurable, with a timeout so the old behaviour fails instead of hanging."""
    item_at, count_at = token_type_count_at(valid)
    bad = patched(
        valid,
        tmp_path,
        {item_at: struct.pack("<I", gguf.GGUFValueType.UINT8), count_at: struct.pack("<Q", 2**40)},
    )
    probe = (
        "import json, resource, sys, time\n"
        "def peak_kb():\n"
        "    # VmHWM: this process image's peak. ru_maxrss also counts the parent's memory when\n"
        "    # subprocess starts the child with vfork (Linux keeps it across exec).\n"
        "    try:\n"
        "        with open('/proc/self/status') as f:\n"
        "            return next(int(x.split()[1]) for x in f if x.startswith('VmHWM:'))\n"
        "    except OSError:\n"
        "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "from smolconvert.errors import CorruptFileError\n"
        "from smolconvert.model.source import load_model\n"
        "before = peak_kb()\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_model(sys.argv[1])\n"
        "    message = None\n"
        "except CorruptFileError as e:\n"
        "    message = str(e)\n"
        "print(json.dumps({'s': time.perf_counter() - t, 'message': message, 'before_kb': before,\n"
        "    'peak_kb': peak_kb()}))\n"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["message"] and "tokenizer.ggml.token_type" in result["message"]
    assert str(2**40) in result["message"]
    assert result["s"] < 1.0, result
    assert result["peak_kb"] - result["before_kb"] < 20 * 1024, result  # the check itself
    # The whole process: refusing a file must not import torch (~220 MB by itself).
    assert result["peak_kb"] < 200 * 1024, result
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        ("string_count", "array of 1099511627776 strings"),
        ("item_type_array", "array of arrays"),
        ("item_type_unknown", "unknown value type 99"),
        ("tensor_count", "more than the"),
        ("n_dims", "has 5 dimensions"),
        ("tensor_type_unknown", "unknown type 250"),
        ("magic", "is not b'GGUF'"),
        ("version", "version 7"),
    ],
)
def test_other_hostile_headers(valid: Path, tmp_path: Path, edit: str, expect: str) -> None:
    reader = gguf.GGUFReader(str(valid))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    tokens_count_at = tokens.offset + sum(int(p.nbytes) for p in tokens.parts[:4])
    item_at, _ = token_type_count_at(valid)
    t = reader.tensors[0].field
    n_dims_at = t.offset + sum(int(p.nbytes) for p in t.parts[:2])
    type_at, _, _ = tensor_info(valid, reader.tensors[0].name)
    edits = {
        "string_count": {tokens_count_at: struct.pack("<Q", 2**40)},
        "item_type_array": {item_at: struct.pack("<I", gguf.GGUFValueType.ARRAY)},
        "item_type_unknown": {item_at: struct.pack("<I", 99)},
        "tensor_count": {8: struct.pack("<Q", 2**62)},
        "n_dims": {n_dims_at: struct.pack("<I", 5)},
        "tensor_type_unknown": {type_at: struct.pack("<I", 250)},
        "magic": {0: b"GGUX"},
        "version": {4: struct.pack("<I", 7)},
    }[edit]
    assert expect in refused(patched(valid, tmp_path, edits))


def test_default_model_passes_quickly() -> None:
    from smolconvert.errors import MissingDependencyError
    from smolconvert.model.default import default_gguf_path

    try:
        path = default_gguf_path()
    except MissingDependencyError as e:
        pytest.skip(str(e))
    check_gguf(path)  # warm the page cache: the figure below is the walk, not the disk
    start = time.perf_counter()
    check_gguf(path)
    assert time.perf_counter() - start < 0.2
