"""GGUF export, proven by its consumers: llama.cpp loads and runs it, gguf-py reads it back."""

from __future__ import annotations

import ctypes
import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import smolconvert
from smolconvert.errors import UnsupportedError
from smolconvert.exporters.gguf import plan
from smolconvert.model import gguf_layout
from smolconvert.model.reference import build_reference
from smolconvert.model.spec import ModelSpec
from tests import tiny

ALIGNED = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
}
# 8 layers and 4 query heads per kv head: where the first-eighth and n_gqa >= 4 rules choose
DEEP = ALIGNED | {"num_hidden_layers": 8, "num_attention_heads": 8}
SHAPES = {"aligned": ALIGNED, "unaligned": {}, "deep": DEEP}


def _folder(tmp_path: Path, arch: str, shape: str) -> Path:
    return tiny.write_folder(tmp_path / f"{arch}-{shape}", tiny.config(arch, **SHAPES[shape]))


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=0,  # GGML_TYPE_F32: llama.cpp's default f16 KV cache would blur the f32 check
        type_v=0,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.mark.parametrize("shape", ["aligned", "unaligned"])
@pytest.mark.parametrize(
    "scheme",
    [
        "f32",
        "f16",
        "bf16",
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q2_k",
        "q3_k_m",
        "q4_k_m",
        "q5_k_m",
        "q6_k",
        "iq4_nl",
        "iq4_xs",
    ],
)
def test_llama_cpp_runs_our_file_like_the_reference_on_our_weights(
    tmp_path: Path, scheme: str, shape: str
) -> None:
    from smolconvert.quantizers import CODECS

    folder = _folder(tmp_path, "llama", shape)
    types = {p.codec for p in plan(smolconvert.load(folder).spec, scheme)}
    missing = types - set(CODECS)
    if missing:
        pytest.fail(f"codecs not registered: {sorted(missing)}")
    art = smolconvert.export(folder, to=f"gguf:{scheme}", out=tmp_path / "out")
    path = art.path("model")
    # our own dequantized weights, read back through the GGUF importer, run by the reference
    back = smolconvert.load(path)
    ours = build_reference(back.spec, source=back.weights)
    ids = [
        int(x)
        for x in torch.randint(3, tiny.VOCAB, (96,), generator=torch.Generator().manual_seed(5))
    ]
    expected = ours.logits(ids).numpy()
    got = _llama_logits(path, ids)
    kld = _kld(expected, got)
    top1 = (expected.argmax(-1) == got.argmax(-1)).mean()
    if scheme == "f32":
        assert np.abs(got - expected).max() < 1e-3
        # negative control: the same weights with GGUF's Q/K row order left in place
        tensors = {n: back.weights.get(n) for n in back.weights.names()}
        for n in tensors:
            heads = gguf_layout.rope_heads(n, back.spec.n_heads, back.spec.n_kv_heads)
            if heads is not None:
                tensors[n] = torch.from_numpy(gguf_layout.permute_qk(tensors[n].numpy(), heads))
        wrong = build_reference(back.spec, tensors=tensors).logits(ids).numpy()
        assert _kld(wrong, got).mean() > 10 * _kld(expected, got).mean() + 0.01
    # llama.cpp quantizes activations to 8 bits inside quantized matmuls: on these tiny random
    # models (flat logits, many near-ties) that alone costs ~3e-3 KLD and a few top-1 flips, for
    # q8_0 as for q4_k. A wrong row order or block layout costs far more (see the f32 control).
    assert kld.mean() < (1e-5 if scheme == "f32" else 1e-2), kld.mean()
    assert top1 >= (0.99 if scheme == "f32" else 0.85)
    assert Counter(art.meta["tensor_types"].values()) == Counter(
        t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
    )


@pytest.mark.parametrize("scheme", ["f16", "q8_0", "q4_k_m"])
def test_smollm3_exports_and_matches(tmp_path: Path, scheme: str) -> None:
    folder = tiny.write_folder(tmp_path / "s3", tiny.config("smollm3", **ALIGNED))
    art = smolconvert.export(folder, to=f"gguf:{scheme}", out=tmp_path / "out")
    reader = gguf.GGUFReader(str(art.path("model")))
    assert reader.fields["general.architecture"].contents() == "smollm3"
    back = smolconvert.load(art.path("model"))
    assert back.spec.rope_layers == (True, True, True, False)
    ids = list(range(3, 99))
    expected = build_reference(back.spec, source=back.weights).logits(ids).numpy()
    assert _kld(expected, _llama_logits(art.path("model"), ids)).mean() < 1e-2


def test_smollm3_with_another_no_rope_pattern_is_refused(tmp_path: Path) -> None:
    cfg = tiny.config("smollm3", no_rope_layers=[1, 0, 1, 1])
    with pytest.raises(UnsupportedError, match="every 4th"):
        plan(ModelSpec.from_config(cfg), "q8_0")


def _imatrix_entries(path: Path) -> tuple[ctypes.Array, list[np.ndarray]]:
    """An imatrix for llama_model_quantize: ones for every layer weight (llama-imatrix never
    covers token_embd or output), as a NULL-terminated llama_model_imatrix_data array."""
    import llama_cpp

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.")]
    vectors = [np.ones(int(t.shape[0]), np.float32) for t in tensors if len(t.shape) == 2]
    names = [t.name for t in tensors if len(t.shape) == 2]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for entry, name, vector in zip(entries, names, vectors, strict=False):
        entry.name = name.encode()
        entry.data = vector.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = vector.size
    return entries, vectors


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("shape", ["aligned", "unaligned", "deep"])
def test_mixtures_choose_llama_cpp_types(tmp_path: Path, shape: str, with_imatrix: bool) -> None:
    """Our plan for each mixture equals what llama.cpp's own quantizer picks for the same model,
    with and without an imatrix (llama.cpp then bends q4_0, q5_0, iq4_nl and iq4_xs)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = _folder(tmp_path, "llama", shape)
    art = smolconvert.export(folder, to="gguf:f32", out=tmp_path / "f32")
    spec = smolconvert.load(folder).spec
    entries, _vectors = _imatrix_entries(art.path("model"))
    for scheme in (
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
        "q4_0",
        "q5_0",
        "q8_0",
        "iq4_nl",
        "iq4_xs",
    ):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{scheme.upper()}")
        params.nthread = 2
        if with_imatrix:
            params.imatrix = ctypes.cast(
                entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)
            )
        dst = tmp_path / f"lc-{scheme}.gguf"
        assert (
            llama_cpp.llama_model_quantize(
                str(art.path("model")).encode(), str(dst).encode(), ctypes.byref(params)
            )
            == 0
        )
        theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
        ours = {t.gguf_name: t.qtype.name for t in plan(spec, scheme, with_imatrix)}
        assert ours == theirs, scheme


def test_metadata_and_tokenizer_keys(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama", "unaligned")
    art = smolconvert.export(folder, to="gguf:q8_0", out=tmp_path / "out")
    r = gguf.GGUFReader(str(art.path("model")))
    f = {
        k: v.contents()
        for k, v in r.fields.items()
        if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    }
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert f["general.quantization_version"] == 2 and f["llama.block_count"] == 2
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.bos_token_id"] == 0
    assert "tokenizer.chat_template" in f and "output.weight" in {t.name for t in r.tensors}
    assert len(r.fields["tokenizer.ggml.tokens"].data) == tiny.VOCAB
    # the tokenizer llama.cpp reads from our file tokenizes like ours
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(art.path("model")), vocab_only=True, verbose=False)
    text = "def f(x):\n    return x  + 42 # the answer"
    assert llm.tokenize(text.encode(), add_bos=False) == smolconvert.load(folder).tokenizer.encode(
        text
    )


def test_export_is_deterministic_and_atomic(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama", "unaligned")
    a = smolconvert.export(folder, to="gguf:q4_0", out=tmp_path / "a")
    b = smolconvert.export(folder, to="gguf:q4_0", out=tmp_path / "b")
    assert a.meta["files"] == b.meta["files"]
    assert json.loads((tmp_path / "a" / "artifact.json").read_text())["source_sha256"] == (
        smolconvert.load(folder).sha256
    )
    assert not list(tmp_path.glob(".*partial*"))


def test_interrupted_export_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch) -> None:
    import smolconvert.exporters.gguf as G

    folder = _folder(tmp_path, "llama", "unaligned")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "_write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        smolconvert.export(folder, to="gguf:q8_0", out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


def test_cli_export_list_and_validate_artifact(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    listed = CliRunner().invoke(cli, ["export", "--list"])
    assert (
        listed.exit_code == 0 and "gguf:q4_k_m" in listed.output and "bits/weight" in listed.output
    )
    folder = _folder(tmp_path, "llama", "unaligned")
    out = tmp_path / "art"
    made = CliRunner().invoke(cli, ["export", str(folder), "--to", "gguf:q8_0", "-o", str(out)])
    assert made.exit_code == 0, made.output
    pytest.importorskip("llama_cpp")
    result = CliRunner().invoke(
        cli, ["validate", str(out), "--ctx", "64", "--windows", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runtime"] == "llama.cpp" and report["quality"]["kld_mean"] < 1e-2
    assert report["latency"]["decode_tok_s"] > 0 and report["latency"]["peak_rss_mb"] > 0
    assert (
        json.loads((out / "artifact.json").read_text())["validation"]["quality"]
        == report["quality"]
    )


def test_cli_export_errors_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    folder = _folder(tmp_path, "llama", "unaligned")
    for args, message in (
        (["--to", "gguf:q9_k"], "unknown scheme"),
        (["--to", "tflite:int8"], "unknown target"),
    ):
        result = CliRunner().invoke(cli, ["export", str(folder), *args])
        assert result.exit_code == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --- determinism across processes (issue 23) ------------------------------------------------------


def test_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("smollm3"))
    assert_exports_identical(folder, tmp_path, to="gguf:q4_k_m", imatrix=True)
