"""Our codecs against llama.cpp itself: identical bytes, identical decoding, same use of importance.

The oracle is libggml from llama-cpp-python (see ggml_oracle.py); the end-to-end check runs
`llama_model_quantize` on a tiny f32 GGUF and compares every tensor it wrote with ours.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from smolconvert.quantizers import iquants
from smolconvert.quantizers.ggml import CODECS
from smolconvert.quantizers.legacy import RowKernel
from tests.quantizers.conftest import importances, mixed_weights
from tests.quantizers.ggml_oracle import Ggml
from tests.quantizers.test_registry import GOLDEN, digest, golden_weights

pytestmark = pytest.mark.needs_llama_cpp

COLS = 768  # three K-quant super-blocks, 24 legacy blocks per row
WEIGHTS = mixed_weights(24, COLS)
IMPORTANCE = {"none": None, "spread": importances(COLS)[0], "sparse": importances(COLS)[1]}


def _report(name: str, ours: np.ndarray, theirs: np.ndarray) -> str:
    codec = CODECS[name]
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]][1]
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
    diff = np.abs(codec.dequantize(ours, WEIGHTS.shape) - codec.dequantize(theirs, WEIGHTS.shape))
    return f"{same.mean():.2%} of blocks identical, max dequantized difference {np.nanmax(diff)}"


@pytest.mark.parametrize("importance", sorted(IMPORTANCE))
@pytest.mark.parametrize("name", sorted(CODECS))
def test_bytes_equal_llama_cpp_s(ggml: Ggml, name: str, importance: str) -> None:
    codec = CODECS[name]
    qw = IMPORTANCE[importance]
    ours = codec.quantize(WEIGHTS, qw)
    theirs = ggml.quantize(name, WEIGHTS, qw)
    assert np.array_equal(ours, theirs), _report(name, ours, theirs)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_dequantize_equals_llama_cpp_s(ggml: Ggml, name: str) -> None:
    codec = CODECS[name]
    data = ggml.quantize(name, WEIGHTS, IMPORTANCE["spread"])
    theirs = ggml.dequantize(name, data, WEIGHTS.size).reshape(WEIGHTS.shape)
    np.testing.assert_array_equal(codec.dequantize(data, WEIGHTS.shape), theirs)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_uses_importance_exactly_where_llama_cpp_does(ggml: Ggml, name: str) -> None:
    plain = ggml.quantize(name, WEIGHTS)
    weighted = ggml.quantize(name, WEIGHTS, IMPORTANCE["spread"])
    assert CODECS[name].uses_importance == (not np.array_equal(plain, weighted))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_golden_digests_are_llama_cpp_s(ggml: Ggml, name: str) -> None:
    """The pinned digests of test_registry are libggml's bytes, not a snapshot of our own."""
    assert digest(ggml.quantize(name, golden_weights())) == GOLDEN[name]


@pytest.mark.parametrize("importance", sorted(IMPORTANCE))
@pytest.mark.parametrize(
    ("name", "kernel"), [("iq4_nl", iquants.quantize_iq4_nl), ("iq4_xs", iquants.quantize_iq4_xs)]
)
def test_iq4_kernels_map_non_finite_weights_as_llama_cpp(
    ggml: Ggml, name: str, kernel: RowKernel, importance: str
) -> None:
    """The codecs refuse NaN and infinities, but the kernels below them follow C through them:
    a NaN is skipped by the max search, poisons its block's sums and takes the top level."""
    x = WEIGHTS[:8].copy()
    x[0, 3] = np.nan  # one NaN in a block
    x[1] = np.nan  # a whole row
    x[2, 5], x[2, 300] = np.inf, -np.inf
    x[3, ::3] = np.nan
    x[4] = 0.0
    x[4, 40] = np.nan  # NaN in an otherwise all-zero block
    x[5, :256] = 3e38  # finite, but x*x overflows
    x[6, :32] = -1e-40  # subnormal
    with np.errstate(all="ignore"):
        ours = kernel(x, IMPORTANCE[importance])
    theirs = ggml.quantize(name, x, IMPORTANCE[importance])
    same = (ours == theirs).all(axis=1)
    assert same.all(), f"rows {np.flatnonzero(~same).tolist()} differ"


def _tiny_f32_gguf(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 2-layer llama with 256-wide rows and the keys llama_model_quantize reads (no vocab)."""
    hidden, ffn, vocab, layers = 256, 512, 512, 2
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (hidden // 2, hidden),
            f"blk.{i}.attn_v.weight": (hidden // 2, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
        }
    shapes["output_norm.weight"] = (hidden,)
    data = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, tensor in data.items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


@pytest.mark.parametrize(
    ("ftype", "expected"),
    [
        ("Q4_K_M", {"q4_k", "q6_k"}),
        ("Q3_K_M", {"q3_k", "q4_k", "q5_k", "q6_k"}),
        ("Q2_K", {"q2_k", "q3_k", "q6_k"}),
        ("Q5_K_S", {"q5_k", "q6_k"}),
        ("Q4_0", {"q4_0", "q6_k"}),
        ("Q5_1", {"q5_1", "q6_k"}),
        ("IQ4_NL", {"iq4_nl", "q6_k"}),
        ("IQ4_XS", {"iq4_xs", "q6_k"}),
    ],
)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_llama_model_quantize_writes_our_bytes(
    ggml: Ggml, tmp_path: Path, ftype: str, expected: set[str], with_imatrix: bool
) -> None:
    import llama_cpp

    data = _tiny_f32_gguf(tmp_path / "f32.gguf", np.random.default_rng(5))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    # an imatrix as llama-imatrix writes it: every layer weight, not token_embd nor output
    covered = {n: t for n, t in data.items() if t.ndim == 2 and n.startswith("blk.")}
    qw = {n: importances(t.shape[1], seed=i)[0] for i, (n, t) in enumerate(covered.items())}
    entries = (llama_cpp.llama_model_imatrix_data * (len(qw) + 1))()  # NULL name ends the list
    for entry, (name, vector) in zip(entries, qw.items(), strict=False):
        entry.name = name.encode()
        entry.data = vector.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = vector.size
    if with_imatrix:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    out = tmp_path / f"{ftype}.gguf"
    assert (
        llama_cpp.llama_model_quantize(
            str(tmp_path / "f32.gguf").encode(), str(out).encode(), ctypes.byref(params)
        )
        == 0
    )
    seen = set()
    for t in gguf.GGUFReader(str(out)).tensors:
        name = t.tensor_type.name.lower()
        seen.add(name)
        ours = CODECS[name].quantize(data[t.name], qw.get(t.name) if with_imatrix else None)
        theirs = np.asarray(t.data).view(np.uint8).reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{t.name} as {name}")
    assert expected <= seen
