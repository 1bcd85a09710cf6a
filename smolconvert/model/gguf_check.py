"""A bounded walk over a GGUF file's header, run before gguf-py's reader sees the file.

gguf-py's GGUFReader trusts the counts it reads: a uint8 array claiming 2**40 items in a 467 KB
file makes it append an empty value per item past the end of the file, for hours. This walk checks
every count, length and offset against the bytes that remain before it loops or allocates, and
lays the tensors out the way llama.cpp's loader does (ggml/src/gguf.cpp, gguf_init_from_file_impl,
as vendored in llama-cpp-python 0.3.36): in header order, back to back, each at an aligned offset
and as long as its shape and type imply. A file it accepts cannot make the reader run away, and no
tensor's bytes can be read as another's. Work and memory are bounded by the header's size.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.gguf_reader import GGUFReader

from smolconvert.errors import CorruptFileError

SUPPORTED_VERSIONS = (2, GGUF_VERSION)  # version 1 used 32-bit counts; gguf-py reads 2 and 3
MAX_DIMS = 4  # GGML_MAX_DIMS
# Item sizes of the scalar value types, from the numpy types gguf-py reads them as.
SCALAR_SIZES = {
    t: np.dtype(np_type).itemsize for t, np_type in GGUFReader.gguf_scalar_to_np.items()
}
# The fewest bytes a key/value pair (key length, empty key, type, 1-byte value) and a tensor info
# (name length, n_dims, type, offset) can take: bounds the counts before any loop starts.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


class _Bad(Exception):
    """A problem found at a byte offset; turned into one CorruptFileError line by check_gguf."""


class _Walk:
    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0
        self.order = "<"

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Bad(
                f"{what} needs {n} bytes at byte {self.pos} but only {self.size - self.pos} remain "
                "(truncated or corrupt)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = struct.unpack_from(self.order + "I", self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = struct.unpack_from(self.order + "Q", self.buf, self.pos)
        self.pos += 8
        return int(value)

    def skip_string(self, what: str) -> int:
        n = self.u64(f"{what} length")
        self.need(n, f"{what} ({n} bytes)")
        self.pos += n
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings back to back; the hot loop of a vocabulary (~100k strings), kept lean."""
        unpack = struct.Struct(self.order + "Q").unpack_from
        buf, size, pos = self.buf, self.size, self.pos
        for k in range(count):
            end = pos + 8
            if end <= size:
                end += unpack(buf, pos)[0]
            if end > size:
                raise _Bad(f"{what}[{k}] runs past the end of the file (truncated or corrupt)")
            pos = end
        self.pos = pos

    def text(self, what: str) -> str:
        start = self.pos + 8
        n = self.skip_string(what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {start} is not UTF-8") from None


def check_gguf(path: str | Path) -> None:
    """Raise CorruptFileError (one line) unless `path` is a GGUF file that gguf-py and llama.cpp
    can read without running past its end: header counts, strings, arrays and tensor layout."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 4 + 4 + 8 + 8:
            raise _Bad(f"{size} bytes, shorter than a GGUF header")
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check(_Walk(buf, size))
    except _Bad as e:
        raise CorruptFileError(f"{path}: not a readable GGUF file: {e}") from None
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read it ({e.strerror or e})") from None


def _check(w: _Walk) -> None:
    (magic,) = struct.unpack_from("<I", w.buf, 0)
    if magic != GGUF_MAGIC:
        raise _Bad(f"magic {bytes(w.buf[:4])!r} is not b'GGUF'")
    w.pos = 4
    version = w.u32("version")
    if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py reads those too)
        w.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("metadata count")
    rest = w.size - w.pos
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > rest:
        raise _Bad(
            f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the "
            f"{rest} bytes left can hold"
        )
    alignment = _metadata(w, n_kv)
    infos = _tensor_infos(w, n_tensors)
    if infos:
        _layout(w, infos, alignment)


def _metadata(w: _Walk, n_kv: int) -> int:
    """Walk the key/value pairs; return general.alignment (or the default)."""
    seen: set[str] = set()
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        start = w.pos
        key = w.text(f"metadata key #{i}")
        if not key:
            raise _Bad(f"metadata key #{i} at byte {start} is empty")
        if key in seen:
            raise _Bad(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = _value_type(w, key)
        if vtype == GGUFValueType.ARRAY:
            item = _value_type(w, key)
            count = w.u64(f"{key} array count")
            if item == GGUFValueType.ARRAY:
                raise _Bad(f"{key} is an array of arrays, which llama.cpp does not read")
            if item == GGUFValueType.STRING:
                # Each string takes at least its 8-byte length: bound the loop before it runs.
                w.need(count * 8, f"{key}: array of {count} strings")
                w.skip_strings(count, key)
            else:
                w.need(count * SCALAR_SIZES[item], f"{key}: array of {count} {item.name}")
                w.pos += count * SCALAR_SIZES[item]
        elif vtype == GGUFValueType.STRING:
            w.skip_string(key)
        else:
            w.need(SCALAR_SIZES[vtype], key)
            if key == "general.alignment":
                if vtype != GGUFValueType.UINT32:
                    raise _Bad(f"general.alignment is {vtype.name}, expected UINT32")
                alignment = w.u32(key)
                if alignment == 0 or alignment & (alignment - 1):
                    raise _Bad(f"general.alignment {alignment} is not a power of two")
            else:
                w.pos += SCALAR_SIZES[vtype]
    return alignment


def _value_type(w: _Walk, key: str) -> GGUFValueType:
    raw = w.u32(f"{key} value type")
    try:
        vtype = GGUFValueType(raw)
    except ValueError:
        raise _Bad(f"{key} has unknown value type {raw}") from None
    if vtype not in SCALAR_SIZES and vtype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
        raise _Bad(f"{key} has unsupported value type {vtype.name}")
    return vtype


def _tensor_infos(w: _Walk, n_tensors: int) -> list[tuple[str, int, int]]:
    """(name, offset, n_bytes) of every tensor, its shape and type checked against each other."""
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = w.text(f"tensor name #{i}")
        if name in seen:
            raise _Bad(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = w.u32(f"{name} n_dims")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [w.u64(f"{name} dimension") for _ in range(n_dims)]
        raw = w.u32(f"{name} type")
        try:
            qtype = GGMLQuantizationType(raw)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name} has unknown type {raw}") from None
        offset = w.u64(f"{name} offset")
        n = 1
        for d in dims:
            n *= d
        if any(d >= 2**63 for d in dims) or n >= 2**63:
            raise _Bad(f"tensor {name} shape {dims} overflows")
        if dims and dims[0] % block:
            raise _Bad(
                f"tensor {name} of type {qtype.name} has rows of {dims[0]} values, "
                f"not a multiple of its block of {block}"
            )
        infos.append((name, offset, n // block * type_size))
    return infos


def _layout(w: _Walk, infos: list[tuple[str, int, int]], alignment: int) -> None:
    """Tensors back to back in header order, each at an aligned offset, all inside the file."""
    data = -(-w.pos // alignment) * alignment  # the data section starts at the next aligned byte
    expected = 0  # where the next tensor must start, relative to the data section
    previous = None
    for name, offset, n_bytes in infos:
        where = f"tensor {name} (offset {offset}"
        if offset % alignment:
            raise _Bad(f"{where}) is not aligned to {alignment} bytes")
        if offset < expected:
            raise _Bad(
                f"{where}) starts inside {previous}, which ends at {expected}: the tensors "
                f"overlap, or {previous}'s type or shape does not match its data"
            )
        if offset > expected:
            gap = f"after {previous}" if previous else "before it"
            raise _Bad(
                f"{where}) leaves {offset - expected} bytes {gap} that belong to no tensor: "
                "a tensor's type or shape does not match its data"
            )
        end = data + offset + n_bytes
        if end > w.size:
            raise _Bad(
                f"{where}, {n_bytes} bytes) ends at byte {end}, past the end of the file "
                f"({w.size} bytes): truncated"
            )
        expected = offset + -(-n_bytes // alignment) * alignment
        previous = name
    trailing = w.size - (data + expected)
    if trailing > 0:
        raise _Bad(
            f"{trailing} bytes after the last tensor belong to no tensor: a tensor's type or "
            "shape does not match its data"
        )
