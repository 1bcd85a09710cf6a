"""Fuzz cases: a base input (a tiny model folder or GGUF file, built once per session) plus a short
list of mutations, and the hypothesis strategies that draw them (readers.py reads them).

A mutation ("op") is a small JSON-serialisable dict, so a failing case is kept as a recipe of a few
lines rather than a copy of a binary file. Ops name what they touch by meaning where they can (a
JSON path; a GGUF header field such as `kv:tokenizer.ggml.bos_token_id:part2`, its value type);
raw byte offsets are only used for patches, flips and truncation, resolved against the
deterministic base.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from smolconvert.model import spec as spec_module
from tests import published, tiny

# --- bases ----------------------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "config.json",
)


@dataclass
class Base:
    """A built input: `path` is what the reader opens (a folder, or the .gguf file)."""

    name: str
    path: Path
    files: dict[str, str]  # name in the folder -> kind: json, text, safetensors or gguf
    sites: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (offset, width)
    header_end: dict[str, int] = field(default_factory=dict)  # file -> bytes before tensor data
    type_sites: list[str] = field(default_factory=list)  # sites holding a value or tensor type

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def _tiny_tokenizer_files(folder: Path, cfg: dict[str, Any]) -> None:
    tiny.write_folder(folder, cfg, tensors={})
    (folder / "model.safetensors").unlink()


def build_base(name: str, dest: Path) -> Base:
    """Write base `name` under `dest` (deterministic: the same bytes every time)."""
    folder = dest / name
    if name in ("tiny-llama", "tiny-smollm3"):
        tiny.write_folder(folder, tiny.config(name.removeprefix("tiny-")))
        return _folder_base(name, folder)
    if name == "tiny-sharded":
        cfg = tiny.config("llama")
        _tiny_tokenizer_files(folder, cfg)
        published.write_weights(folder, cfg, shards=2)
        return _folder_base(name, folder)
    if name.startswith("published-"):
        # the published config.json (every quirky field kept) at tiny size, tiny vocabulary
        model = name.removeprefix("published-")
        cfg = {**published.tiny_config(model), "vocab_size": tiny.VOCAB}
        tiny.write_folder(folder, cfg)
        generation = published.GENERATION[published.TOKENIZERS[model]]
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        return _folder_base(name, folder)
    if name.startswith("tokenizer-"):
        # the published tokenizer files as they ship (padded vocabulary, specials, templates)
        model = name.removeprefix("tokenizer-")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(published.tiny_config(model), indent=2))
        published.write_tokenizer_files(folder, published.TOKENIZERS[model])
        return _folder_base(name, folder)
    if name.startswith("gguf-"):
        import smolconvert

        arch, scheme = name.removeprefix("gguf-").split("-")
        source = tiny.write_folder(dest / f"{name}-source", tiny.config(arch))
        art = smolconvert.export(source, to=f"gguf:{scheme}", out=dest / f"{name}-artifact")
        path = folder / "model.gguf"
        folder.mkdir(parents=True)
        shutil.copyfile(art.path("model"), path)
        return _gguf_base(name, path)
    raise KeyError(name)


def _folder_base(name: str, folder: Path) -> Base:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors":
            files[p.name] = "safetensors"
        elif p.suffix == ".json":
            files[p.name] = "json"
        else:
            files[p.name] = "text"
    files.setdefault("chat_template.jinja", "text")  # absent in most bases: ops may create it
    base = Base(name, folder, files)
    for file, kind in files.items():
        if kind == "safetensors":
            data = (folder / file).read_bytes()
            base.header_end[file] = 8 + struct.unpack_from("<Q", data)[0]
            base.sites[f"{file}:header_length"] = (0, 8)
    return base


def _gguf_base(name: str, path: Path) -> Base:
    """Every integer of the header (counts, lengths, value types, dims, tensor types and offsets)
    as a named site, from gguf-py's own parse of the file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    start = reader.data.ctypes.data
    sites: dict[str, tuple[int, int]] = {}

    def add(label: str, parts: list[Any]) -> None:
        for i, part in enumerate(parts):
            if part.dtype.kind not in "uib" or part.dtype.itemsize not in (1, 2, 4, 8):
                continue
            offset = part.ctypes.data - start
            width = part.dtype.itemsize
            n = part.size
            # short arrays (dims) element by element; long ones (token types) at both ends
            picks = range(n) if n <= 4 else (0, n - 1)
            for k in picks:
                suffix = "" if n == 1 else f"[{k}]"
                sites[f"{label}:part{i}{suffix}"] = (offset + k * width, width)

    types = []
    for key, f in reader.fields.items():
        parts = f.parts
        if len(parts) > 12:  # string arrays: their header parts, then the first and last strings
            parts = [*parts[:6], *parts[-2:]]
        add(f"kv:{key}", parts)
        if not key.startswith("GGUF."):  # parts: key length, key, value type[, item type]
            types.append(f"kv:{key}:part2")
            if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
                types.append(f"kv:{key}:part3")
    for t in reader.tensors:  # parts: name length, name, n_dims, dims, type, offset
        add(f"tensor:{t.name}", t.field.parts)
        types.append(f"tensor:{t.name}:part4")
    header_end = {"model.gguf": int(min(t.data_offset for t in reader.tensors))}
    assert set(types) <= set(sites), sorted(set(types) - set(sites))
    return Base(name, path, {"model.gguf": "gguf"}, sites, header_end, types)


def copy_base(base: Base, dest: Path) -> Path:
    """A private copy of the base to mutate; returns the path the reader opens."""
    shutil.copytree(base.folder, dest / "in")
    return dest / "in" / base.path.relative_to(base.folder) if base.path.is_file() else dest / "in"


# --- values: what a hostile or careless file holds ------------------------------------------------

INTERESTING_INTS = (
    *(0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 63, 64, 255, 256, 320, 1024),
    *(2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63),
    *(2**64 - 1, 2**64, 10**12, -1, -2, -(2**31), -(2**63)),
)
KEYS = tuple(
    sorted(spec_module._READ | spec_module._CHECKED)
    + [
        "rope_type",
        "type",
        "factor",
        "content",
        "name",
        "template",
        "special",
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "add_bos_token",
        "add_prefix_space",
        "chat_template",
        "added_tokens_decoder",
        "weight_map",
        "metadata",
        "dtype",
        "shape",
        "data_offsets",
        "__metadata__",
        "model",
        "vocab",
        "merges",
        "pre_tokenizer",
        "post_processor",
        "added_tokens",
    ]
)
STRINGS = (
    *KEYS,
    *("silu", "gelu", "default", "linear", "dynamic", "yarn", "llama3", "llama", "smollm3"),
    *(
        "mistral",
        "full_attention",
        "sliding_attention",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>",
    ),
    *("F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "BPE", "WordPiece"),
    *("model.safetensors", "model-00001-of-00002.safetensors", "../model.safetensors"),
    *(
        "/etc/hostname",
        "",
        " ",
        "{{",
        "{% for x in y %}",
        "{{ raise_exception('x') }}",
        "\x00",
        "é",
    ),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTERESTING_INTS),
    st.integers(),
    st.floats(),  # NaN, infinities, -0.0 and subnormals included
    st.sampled_from(STRINGS),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)

# --- ops ------------------------------------------------------------------------------------------

_pick = st.lists(st.integers(0, 2**16), max_size=4)


def json_ops(file: str) -> st.SearchStrategy[dict[str, Any]]:
    """Edits inside a JSON document: replace or delete any node, add a known key anywhere."""
    return st.one_of(
        st.fixed_dictionaries(
            {"op": st.just("json_set"), "file": st.just(file), "pick": _pick, "value": json_values}
        ),
        st.fixed_dictionaries(
            {
                "op": st.just("json_set"),
                "file": st.just(file),
                "pick": _pick,
                "key": st.sampled_from(KEYS),
                "value": json_values,
            }
        ),
        st.fixed_dictionaries(
            {
                "op": st.just("json_delete"),
                "file": st.just(file),
                "pick": st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
            }
        ),
    )


def file_ops(file: str) -> st.SearchStrategy[dict[str, Any]]:
    """Whole-file accidents: other content, wrong encoding, gone, a folder, cut short."""
    f = st.just(file)
    return st.one_of(
        st.fixed_dictionaries({"op": st.just("write_json"), "file": f, "value": json_values}),
        st.fixed_dictionaries({"op": st.just("write_text"), "file": f, "text": st.text()}),
        st.fixed_dictionaries(
            {"op": st.just("write_hex"), "file": f, "hex": st.binary(max_size=64).map(bytes.hex)}
        ),
        st.fixed_dictionaries({"op": st.just("remove"), "file": f}),
        st.fixed_dictionaries({"op": st.just("mkdir"), "file": f}),
        *byte_ops(file, header=False),
    )


def byte_ops(file: str, header: bool) -> list[st.SearchStrategy[dict[str, Any]]]:
    """Patches, bit flips, truncation and appended bytes; with `header`, positions mostly fall
    in the header (where a wrong byte changes the structure, not a weight value)."""
    f = st.just(file)
    region = st.sampled_from(("header", "header", "header", "all")) if header else st.just("all")
    at = st.integers(0, 2**32)
    return [
        st.fixed_dictionaries(
            {
                "op": st.just("patch"),
                "file": f,
                "region": region,
                "at": at,
                "hex": st.binary(min_size=1, max_size=8).map(bytes.hex),
            }
        ),
        st.fixed_dictionaries(
            {"op": st.just("flip"), "file": f, "region": region, "at": at, "bit": st.integers(0, 7)}
        ),
        st.fixed_dictionaries({"op": st.just("truncate"), "file": f, "region": region, "at": at}),
        st.fixed_dictionaries(
            {"op": st.just("append"), "file": f, "hex": st.binary(max_size=64).map(bytes.hex)}
        ),
    ]


def int_ops(
    file: str, sites: list[str], type_sites: list[str] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """Set a named header integer to an interesting value, or move it by a little; retype a
    value or tensor (same size or not: a uint32 read as a float32 is the quiet kind)."""
    site = st.sampled_from(sites)
    f = st.just(file)
    retype = [
        st.fixed_dictionaries(
            {
                "op": st.just("put_int"),
                "file": f,
                "site": st.sampled_from(chosen),
                "value": st.integers(0, top),  # GGUF value types are 0-12, tensor types 0-39
            }
        )
        for chosen, top in (
            ([s for s in type_sites if s.startswith("kv:")], 13),
            ([s for s in type_sites if s.startswith("tensor:")], 40),
        )
        if chosen
    ]
    return st.one_of(
        *retype,
        st.fixed_dictionaries(
            {
                "op": st.just("put_int"),
                "file": f,
                "site": site,
                # small values reach every GGUF value type (0-12) and tensor type
                "value": st.integers(0, 40) | st.sampled_from(INTERESTING_INTS) | st.integers(),
            }
        ),
        st.fixed_dictionaries(
            {"op": st.just("add_int"), "file": f, "site": site, "delta": st.integers(-64, 64)}
        ),
    )


def safetensors_ops(file: str, sites: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    header = st.fixed_dictionaries(
        {
            "op": st.sampled_from(("header_set", "header_set", "header_delete")),
            "file": st.just(file),
            "pick": st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
            "value": json_values,
        }
    )
    return st.one_of(
        header, header, int_ops(file, sites), *byte_ops(file, header=True), _remove(file)
    )


def _remove(file: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"op": st.just("remove"), "file": st.just(file)})


def cases(
    bases: list[Base], ops_for: Callable[[Base], st.SearchStrategy[dict[str, Any]]]
) -> st.SearchStrategy[tuple[str, list[dict[str, Any]]]]:
    """(base name, ops): one to four mutations of one of `bases`."""
    return st.one_of(
        *[st.tuples(st.just(b.name), st.lists(ops_for(b), min_size=1, max_size=4)) for b in bases]
    )


# --- applying ops ---------------------------------------------------------------------------------


def apply_ops(base: Base, root: Path, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply `ops` to the copy of `base` under `root`; returns them resolved (JSON picks as key
    paths, byte positions as absolute offsets), the form a regression file keeps. Ops that no
    longer apply (a JSON edit after the file stopped being JSON) are dropped."""
    resolved = []
    for op in ops:
        done = _apply(base, root, dict(op))
        if done is not None:
            resolved.append(done)
    return resolved


def _apply(base: Base, root: Path, op: dict[str, Any]) -> dict[str, Any] | None:
    path = root / op["file"]
    kind = op["op"]
    if kind == "remove":
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return op
    if kind == "mkdir":
        _apply(base, root, {"op": "remove", "file": op["file"]})
        path.mkdir()
        return op
    if kind in ("write_json", "write_text", "write_hex"):
        if kind == "write_json":
            raw = json.dumps(op["value"]).encode()
        elif kind == "write_text":
            raw = op["text"].encode("utf-8", "surrogatepass")
        else:
            raw = bytes.fromhex(op["hex"])
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(raw)
        return op
    if not path.is_file():
        return None
    if kind in ("json_set", "json_delete"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        edited = _edit(doc, op)
        if edited is None:
            return None
        path.write_text(json.dumps(edited[0], indent=1), encoding="utf-8")
        return edited[1]
    data = bytearray(path.read_bytes())
    if kind in ("header_set", "header_delete"):
        return _edit_safetensors_header(path, data, op)
    if kind in ("put_int", "add_int"):
        if op["site"] not in base.sites:
            return None
        offset, width = base.sites[op["site"]]
        if offset + width > len(data):
            return None
        modulus = 2 ** (8 * width)
        if kind == "put_int":
            value = op["value"] % modulus
        else:
            value = (
                int.from_bytes(data[offset : offset + width], "little") + op["delta"]
            ) % modulus
        data[offset : offset + width] = value.to_bytes(width, "little")
    elif kind == "append":
        data += bytes.fromhex(op["hex"])
    else:  # patch, flip, truncate
        if "at" in op:  # as drawn: a position in the header or anywhere; kept absolute
            span = len(data)
            if op.pop("region") == "header":
                span = min(span, base.header_end.get(op["file"], span))
            at = op.pop("at")
            if kind == "truncate":
                op["size"] = at % (span + 1)
            elif span == 0:
                return None
            else:
                op["offset"] = at % span
        if kind == "truncate":
            del data[op["size"] :]
        elif kind == "patch":
            raw = bytes.fromhex(op["hex"])
            data[op["offset"] : op["offset"] + len(raw)] = raw
        elif op["offset"] < len(data):
            data[op["offset"]] ^= 1 << op["bit"]
        else:
            return None
    path.write_bytes(data)
    return op


def edit_json(doc: Any, ops: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """Apply JSON ops to an in-memory document (deep-copied first); returns it and the ops
    resolved. Ops whose path no longer exists are dropped."""
    doc = json.loads(json.dumps(doc))
    resolved = []
    for op in ops:
        edited = _edit(doc, op)
        if edited is not None:
            doc = edited[0]
            resolved.append(edited[1])
    return doc, resolved


def _resolve(doc: Any, pick: list[int]) -> list[Any]:
    """Follow child indices (modulo the number of children, dict keys sorted) to a key path."""
    path: list[Any] = []
    node = doc
    for i in pick:
        if isinstance(node, dict) and node:
            key: Any = sorted(node)[i % len(node)]
        elif isinstance(node, list) and node:
            key = i % len(node)
        else:
            break
        path.append(key)
        node = node[key]
    return path


def _edit(doc: Any, op: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """Set or delete the node at op's path (or pick); returns (new doc, resolved op)."""
    op = dict(op)
    if "pick" in op:
        path = _resolve(doc, op.pop("pick"))
        key = op.pop("key", None)
        if key is not None and isinstance(_get(doc, path), dict):
            path.append(key)
        op["path"] = path
    path = op["path"]
    if op["op"] in ("json_delete", "header_delete"):
        op.pop("value", None)
        if not path:
            return None
    try:
        if not path:
            return op["value"], op
        parent = _get(doc, path[:-1])
        last = path[-1]
        if op["op"] in ("json_delete", "header_delete"):
            del parent[last]
        elif isinstance(parent, list) and last >= len(parent):
            parent.append(op["value"])
        else:
            parent[last] = op["value"]
    except (KeyError, IndexError, TypeError):
        return None  # a recorded path that no longer exists in this document
    return doc, op


def _get(doc: Any, path: list[Any]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _edit_safetensors_header(
    path: Path, data: bytearray, op: dict[str, Any]
) -> dict[str, Any] | None:
    """Edit the JSON header of a safetensors file; a shorter header is padded with spaces so the
    tensor data stays where it was (as safetensors itself pads)."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        return None
    edited = _edit(header, op)
    if edited is None:
        return None
    raw = json.dumps(edited[0], separators=(",", ":")).encode()
    raw += b" " * max(0, n - len(raw))
    data[: 8 + n] = struct.pack("<Q", len(raw)) + raw
    path.write_bytes(data)
    return edited[1]
