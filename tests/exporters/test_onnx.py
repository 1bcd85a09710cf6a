"""ONNX export, proven by its consumers: onnxruntime, onnxruntime-genai and Transformers.js (Node)
run our files and agree with the reference decoder run on the same (dequantized) weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from smolconvert.artifact import Artifact
from smolconvert.exporters.onnx import TJS_DTYPES, TJS_FILES, export_onnx, stored_weights
from smolconvert.exporters.onnx_kv import stored_cache_scales
from smolconvert.exporters.onnx_quant import CODECS, RECIPES, dequantize, quantize
from smolconvert.model.reference import build_reference
from smolconvert.model.source import load_model
from tests import tiny
from tests.conftest import require, require_module

SCHEMES = sorted(RECIPES)
IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31, 8, 77, 150, 19]
JS_DIR = Path(__file__).resolve().parents[1] / "js"


def _export(
    folder: Path,
    scheme: str,
    out: Path,
    layout: str = "transformers.js",
    graph: str = "fused",
    kv_cache: str = "auto",
) -> Artifact:
    options = {"layout": layout, "graph": graph, "kv_cache": kv_cache}
    return export_onnx(load_model(folder), scheme, out, quiet=True, options=options)


def _stored_reference(art: Artifact, source: Path) -> torch.nn.Module:
    """The reference decoder on the weights the graph really holds, read back from its file, and
    with its int8 KV cache's rounding when it has one."""
    spec = load_model(source).spec
    tensors = {n: torch.from_numpy(w) for n, w in stored_weights(art.path("model"), spec).items()}
    dtype = torch.float16 if art.meta["scheme"] == "fp16" else torch.float32
    ref = build_reference(spec, tensors=tensors, dtype=dtype)
    scales = stored_cache_scales(art.path("model"))
    for layer, pair in zip(ref.model.layers, scales or [], strict=scales is not None):
        layer.self_attn.cache_scales = tuple(torch.tensor(s) for s in pair)
    return ref


def _greedy(ref: torch.nn.Module, ids: list[int], n_new: int, eos: int) -> list[int]:
    out = list(ids)
    for _ in range(n_new):
        token = int(ref.logits(out)[-1].argmax())
        out.append(token)
        if token == eos:
            break
    return out[len(ids) :]


@pytest.mark.parametrize("graph", ["fused", "plain"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnxruntime_matches_reference_on_stored_weights(
    tiny_folder: Path, tmp_path: Path, scheme: str, graph: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolconvert.exporters import onnx as onnx_exporter
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    recipe = RECIPES[scheme]
    if recipe.accuracy_level:  # int8 activations: the shipped graph is close, not exact ...
        shipped = _export(tiny_folder, scheme, tmp_path / "shipped", graph=graph)
        want = _stored_reference(shipped, tiny_folder).logits(IDS).float().numpy()
        approx = open_onnxruntime_runner(str(shipped.path("model")), threads=2).logits(IDS)
        assert np.abs(approx - want).max() < 0.05 * np.abs(want).max()
        # ... so the stored weights and the graph's math are checked exactly with fp32 activations
        exact = dataclasses.replace(recipe, accuracy_level=0)
        monkeypatch.setitem(onnx_exporter.RECIPES, scheme, exact)
    art = _export(tiny_folder, scheme, tmp_path / "art", graph=graph)
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    runner = open_onnxruntime_runner(str(art.path("model")), threads=2)
    got = runner.logits(IDS)
    tol = 2e-2 if scheme == "fp16" else 1e-4
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < tol
    if scheme == "fp32":  # and against the plain fp32 reference
        model = load_model(tiny_folder)
        plain = build_reference(model.spec, source=model.weights).logits(IDS).numpy()
        assert np.abs(got - plain).max() < 1e-4
    else:  # the stored weights really are quantized / rounded
        model = load_model(tiny_folder)
        plain = build_reference(model.spec, source=model.weights).logits(IDS).numpy()
        assert np.abs(want - plain).max() > 1e-4
    # prefill then cached decode steps give the full-sequence logits
    logits, past = runner._run(IDS[:9], 0, runner.empty_past())
    rows = [logits[-1]]
    for j in range(9, len(IDS) - 1):
        logits, past = runner._run([IDS[j]], j, past)
        rows.append(logits[-1])
    assert past[0].shape[2] == len(IDS) - 1
    assert np.abs(np.array(rows) - got[8:-1]).max() < max(tol, 1e-5)


def test_int8_kv_cache(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 and int4 keep the fused graph's cache as int8 with calibrated per-channel scales
    (RoPE keys share their rotation pair's); onnxruntime reads exactly that rounding (the
    reference with it matches to 1e-4, without it does not); `kv_cache=float` opts out."""
    import onnx
    from onnx import TensorProto

    from smolconvert.errors import ConfigError
    from smolconvert.exporters import onnx as onnx_exporter
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    exact = dataclasses.replace(RECIPES["int8"], accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.RECIPES, "int8", exact)
    art = _export(tiny_folder, "int8", tmp_path / "q")
    proto = onnx.load(str(art.path("model")), load_external_data=False)
    caches = [
        i
        for i in [*proto.graph.input, *proto.graph.output]
        if i.name.startswith(("past_key_values.", "present."))
    ]
    spec = load_model(tiny_folder).spec
    assert len(caches) == 4 * spec.n_layers
    assert all(i.type.tensor_type.elem_type == TensorProto.INT8 for i in caches)
    scales = stored_cache_scales(art.path("model"))
    assert scales is not None and len(scales) == spec.n_layers
    half = spec.head_dim // 2
    for rope, (k, v) in zip(spec.rope_layers, scales, strict=True):
        assert k.shape == v.shape == (spec.n_kv_heads, spec.head_dim)
        assert (k > 0).all() and (v > 0).all()
        assert np.array_equal(k[:, :half], k[:, half:]) == rope
    assert art.meta["kv_cache"]["dtype"] == "int8" and art.meta["kv_cache"]["tokens"] >= 512
    config = json.loads((art.folder / "config.json").read_text())
    assert config["transformers.js_config"]["kv_cache_dtype"] == {"q8": "int8"}

    got = open_onnxruntime_runner(str(art.path("model")), threads=2).logits(IDS)
    ref = _stored_reference(art, tiny_folder)
    assert np.abs(got - ref.logits(IDS).float().numpy()).max() < 1e-4
    for layer in ref.model.layers:
        layer.self_attn.cache_scales = None
    assert np.abs(got - ref.logits(IDS).float().numpy()).max() > 1e-4
    # the weights are in the data file written first; the second save (the int8 cache) kept it
    graph_file, data = art.path("model"), art.folder / "onnx" / "model_quantized.onnx_data"
    assert data.stat().st_size > graph_file.stat().st_size
    assert data.stat().st_mode & 0o777 == graph_file.stat().st_mode & 0o777  # not onnx's 0600

    flt = _export(tiny_folder, "int8", tmp_path / "f", kv_cache="float")
    assert stored_cache_scales(flt.path("model")) is None
    assert flt.meta["kv_cache"]["dtype"] == "float32"
    for scheme, graph in (("int8", "plain"), ("fp16", "fused")):
        with pytest.raises(ConfigError, match="kv_cache=int8"):
            _export(tiny_folder, scheme, tmp_path / f"bad-{scheme}", graph=graph, kv_cache="int8")
        assert not (tmp_path / f"bad-{scheme}").exists()


def test_embedding_blocks_wider_than_the_hidden_size(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 128 over the tiny model's 64-wide table: GatherBlockQuantized dequantizes whole
    padded rows, so the graph cuts the embedding back to the hidden size."""
    import smolconvert.exporters.onnx as onnx_exporter
    from smolconvert.exporters.onnx_quant import Rule
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    rules = (Rule("embedding", "int4_b128_none"), Rule("linear", "int4_b32_none"))
    recipe = dataclasses.replace(RECIPES["int4"], rules=rules, accuracy_level=0, gptq=False)
    monkeypatch.setitem(onnx_exporter.RECIPES, "int4", recipe)
    art = _export(tiny_folder, "int4", tmp_path / "art")
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    got = open_onnxruntime_runner(str(art.path("model")), threads=2).logits(IDS)
    assert np.abs(got - want).max() < 1e-4


def test_q_and_kv_in_different_codecs(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8-bit k/v beside 4-bit q: two MatMulNBits (q_proj, kv_proj) concatenated for
    GroupQueryAttention, GPTQ'd per run on the per-head Hessians; onnxruntime matches the
    reference on the weights read back from the file."""
    import onnx

    import smolconvert.exporters.onnx as onnx_exporter
    from smolconvert.exporters.onnx_quant import Rule
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    rules = (
        Rule("embedding", "int4_b32_none"),
        Rule("k", "int8_b32_none"),
        Rule("v", "int8_b32_none"),
        Rule("linear", "int4_b32_none"),
    )
    recipe = dataclasses.replace(RECIPES["int4"], rules=rules, accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.RECIPES, "int4", recipe)
    art = _export(tiny_folder, "int4", tmp_path / "art")
    proto = onnx.load(str(art.path("model")), load_external_data=False)
    bits = {
        n.name.rsplit("/", 1)[1]: next(a.i for a in n.attribute if a.name == "bits")
        for n in proto.graph.node
        if n.op_type == "MatMulNBits" and "/layers.0/self_attn/" in n.name
    }
    assert bits == {"q_proj": 4, "kv_proj": 8, "o_proj": 4}
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    got = open_onnxruntime_runner(str(art.path("model")), threads=2).logits(IDS)
    assert np.abs(got - want).max() < 1e-4


def _unpack_stored(packed: np.ndarray, bits: int, k_padded: int) -> np.ndarray:
    """MatMulNBits' B (N, n_blocks, bytes) -> levels (N, k_padded), low nibble first."""
    if bits == 8:
        return packed.reshape(packed.shape[0], -1).astype(np.float32)
    levels = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], k_padded)
    return levels.astype(np.float32)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codec_matches_onnxruntime_matmulnbits_and_gatherblockquantized(name: str) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from smolconvert.exporters.onnx_graph import Graph, Linear, add_quantized, linear

    codec = CODECS[name]
    rng = np.random.default_rng(len(name))
    n, k = 48, 80  # K not a multiple of any block: the last block is padded
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    qw = quantize(w, codec)
    deq = dequantize(qw)
    rel = np.sqrt(((deq - w) ** 2).mean() / (w**2).mean())
    assert rel < (0.12 if codec.bits == 4 else 0.008), rel
    # the graph's linear (MatMulNBits)
    g = Graph(TensorProto.FLOAT)
    inputs = add_quantized(g, "w", qw)
    g.op("Identity", [linear(g, "A", Linear(inputs, n, k, codec), "/linear", 0)], "Y")
    stored = {i.name: numpy_helper.to_array(i) for i in g.initializers}
    # dequantized independently from what the graph stores, in its stored precision
    nb = -(-k // codec.block_size)
    levels = _unpack_stored(stored["w.qweight"], codec.bits, nb * codec.block_size)
    if "w.zero_points" in stored:
        z = stored["w.zero_points"]
        zp = z if codec.bits == 8 else np.stack([z & 15, z >> 4], -1).reshape(n, -1)
        zp = zp[:, :nb].astype(np.float32)
    else:
        zp = np.full((n, nb), 1 << (codec.bits - 1), np.float32)
    from_file = (levels.reshape(n, nb, -1) - zp[..., None]) * stored["w.scales"][..., None]
    assert np.array_equal(from_file.reshape(n, -1)[:, :k], deq)
    nodes, inits = list(g.nodes), list(g.initializers)
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if k % codec.block_size == 0:
        rows = numpy_helper.from_array(qw.packed.reshape(n, -1), "R")
        inits.append(rows)
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                ["R", "I", inputs[1], *inputs[2:3]],
                ["E"],
                domain="com.microsoft",
                bits=codec.bits,
                block_size=codec.block_size,
                gather_axis=0,
                quantize_axis=1,
            )
        )
        outputs.append(helper.make_tensor_value_info("E", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, None, k]),
            helper.make_tensor_value_info("I", TensorProto.INT64, [None]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((1, 3, k)).astype(np.float32)
    idx = np.array([5, 0, 47], np.int64)
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), (a, idx), strict=False)}
    outs = sess.run(None, feeds)
    assert np.abs(outs[0] - a @ deq.T).max() < 1e-4
    if len(outs) > 1:
        assert np.abs(outs[1] - deq[idx]).max() < 1e-6


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_layouts_files_tied_embedding_once_and_determinism(tmp_path: Path, graph: str) -> None:
    import onnx

    folder = tiny.write_folder(tmp_path / "tiny-smollm3", tiny.config("smollm3"))
    n_layers = tiny.config("smollm3")["num_hidden_layers"]
    for scheme in ("fp32", "int4"):
        art = _export(folder, scheme, tmp_path / f"tjs-{scheme}", graph=graph)
        files = {f["path"] for f in art.meta["files"]}
        assert {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "genai_config.json",
        } <= files
        assert f"onnx/{TJS_FILES[scheme]}" in files and art.meta["entry_points"]["model"] in files
        config = json.loads((art.folder / "config.json").read_text())
        assert config["transformers.js_config"]["dtype"] == TJS_DTYPES[scheme]
        proto = onnx.load(str(art.path("model")))
        inits = [i.name for i in proto.graph.initializer]
        embed = [n for n in inits if n.startswith("model.embed_tokens")]
        assert not any("lm_head" in n for n in inits)
        assert len(embed) == (1 if scheme == "fp32" else 2)  # table, or qweight+scales
        ops = [n.op_type for n in proto.graph.node]
        inputs = [i.name for i in proto.graph.input]
        genai = json.loads((art.folder / "genai_config.json").read_text())
        if graph == "fused":  # packed q/k/v and gate/up; one attention and two norm kernels
            assert ops.count("GroupQueryAttention") == n_layers
            assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
            rotary = [
                next(a.i for a in n.attribute if a.name == "do_rotary")
                for n in proto.graph.node
                if n.op_type == "GroupQueryAttention"
            ]
            assert rotary == [int(r) for r in load_model(folder).spec.rope_layers]
            assert inputs[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
            assert genai["search"]["past_present_share_buffer"] is True
            projections = 4  # qkv, o, gate_up, down
        else:
            assert "GroupQueryAttention" not in ops
            assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
            assert genai["search"]["past_present_share_buffer"] is False
            projections = 7
        if scheme == "int4":  # symmetric 4-bit blocks: every projection and the tied head
            kernels = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
            assert len(kernels) == projections * n_layers + 1
            for n in kernels:
                assert next(a.i for a in n.attribute if a.name == "bits") == 4, n.name
                assert len(n.input) == 3, n.name  # no zero points
            assert art.meta["calibration"]["method"] == "gptq"
            assert "attention" in art.meta["calibration"]["hessians"]
        assert proto.graph.output[0].name == "logits"
        again = _export(folder, scheme, tmp_path / f"again-{scheme}", graph=graph)
        assert again.meta["files"] == art.meta["files"]  # byte-identical, sha256 per file
    genai = _export(folder, "int8", tmp_path / "genai", layout="genai")
    assert genai.meta["entry_points"]["model"] == "model.onnx"
    cfg = json.loads((genai.folder / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model.onnx" and cfg["model"]["type"] == "smollm3"


@pytest.mark.needs_node
@pytest.mark.parametrize(
    ("arch", "scheme", "graph"),
    [("llama", "fp32", "fused"), ("smollm3", "int4", "fused"), ("llama", "fp32", "plain")],
)
def test_transformers_js_in_node_continues_like_the_reference(
    tmp_path: Path, arch: str, scheme: str, graph: str
) -> None:
    node = shutil.which("node")
    require(node is not None, "needs node (Node.js 18+)")
    require(
        (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir(),
        f"needs Transformers.js: npm install --ignore-scripts --prefix {JS_DIR}",
    )
    folder = tiny.write_folder(tmp_path / f"tiny-{arch}", tiny.config(arch))
    art = _export(folder, scheme, tmp_path / "model-dir", graph=graph)
    prompt = IDS[:6]
    result = subprocess.run(
        [node, str(JS_DIR / "greedy.mjs"), str(art.folder), TJS_DTYPES[scheme], "12"]
        + [",".join(map(str, prompt))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS_DIR,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])["tokens"]
    ref = _stored_reference(art, folder)
    if not RECIPES[scheme].accuracy_level:
        assert got == _greedy(ref, prompt, 12, eos=2)
        return
    # int8 activations inside MatMulNBits: each of Node's tokens must be the reference's greedy
    # pick on Node's own prefix, up to the activation rounding (a tiny random model's logits are
    # nearly flat, so a near tie may go either way)
    assert len(got) == 12 or got[-1] == 2
    for i, token in enumerate(got):
        logits = ref.logits(prompt + got[:i])[-1].float()
        margin = 0.05 * float(logits.abs().max())
        assert float(logits.max() - logits[token]) <= margin, (i, token, int(logits.argmax()))


@pytest.mark.parametrize(
    ("arch", "scheme", "graph"),
    [("llama", "int8", "plain"), ("smollm3", "fp16", "fused"), ("llama", "int4", "fused")],
)
def test_onnxruntime_genai_runs_the_genai_layout_like_the_reference(
    tmp_path: Path, arch: str, scheme: str, graph: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("onnxruntime_genai", "onnx")
    import onnxruntime_genai as og

    from smolconvert.exporters import onnx as onnx_exporter

    # fp32 activations in MatMulNBits, so logits compare exactly (int8 ones: the test above)
    exact = dataclasses.replace(RECIPES[scheme], accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.RECIPES, scheme, exact)

    folder = tiny.write_folder(tmp_path / f"tiny-{arch}", tiny.config(arch))
    art = _export(folder, scheme, tmp_path / "genai", layout="genai", graph=graph)
    # onnxruntime's thread count (physical cores), not genai's default of half the logical CPUs
    config = json.loads((art.folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    prompt = IDS[:6]
    model = og.Model(str(art.folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    first = np.array(gen.get_output("logits"))[0]  # per-position logits of the prompt
    ref = _stored_reference(art, folder)
    tol = 2e-2 if scheme == "fp16" else 1e-4
    assert np.abs(first - ref.logits(prompt).float().numpy()).max() < tol
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == _greedy(ref, prompt, 10, eos=2)


def test_cli_export_and_validate(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smolconvert.cli import cli

    listed = CliRunner().invoke(cli, ["export", "--list"])
    assert listed.exit_code == 0 and "onnx:int4" in listed.output
    folder = tiny.write_folder(tmp_path / "tiny-llama", tiny.config("llama"))
    out = tmp_path / "art"
    made = CliRunner().invoke(
        cli, ["export", str(folder), "--to", "onnx:int8", "-o", str(out), "--layout", "genai"]
    )
    assert made.exit_code == 0, made.output
    assert (out / "model.onnx").is_file()
    result = CliRunner().invoke(
        cli, ["validate", str(out), "--ctx", "64", "--windows", "2", "--no-latency", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runtime"] == "onnxruntime" and report["quality"]["kld_mean"] < 1e-2
    bad = CliRunner().invoke(
        cli, ["export", str(folder), "--to", "onnx:int4", "-O", "layout=tflite"]
    )
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_default_model_int4_fits_100_mb_and_answers_paris(default_model, tmp_path: Path) -> None:
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    art = export_onnx(default_model, "int4", tmp_path / "int4", quiet=True)
    assert art.size_bytes <= 100_000_000
    runner = open_onnxruntime_runner(str(art.path("model")), threads=2)
    ids = default_model.tokenizer.encode("The capital of France is")
    timing = runner.time_generation(ids, 3)
    assert default_model.tokenizer.decode(timing.tokens[:2]).strip().startswith("Paris")


# --- determinism across processes (issue 23) ------------------------------------------------------


def test_export_is_byte_identical_across_processes(tmp_path: Path) -> None:
    from tests.determinism import assert_exports_identical

    folder = tiny.write_folder(tmp_path / "tiny", tiny.config("smollm3"))
    assert_exports_identical(folder, tmp_path, to="onnx:int4")


# --- streamed weights (issue 18, scale) -----------------------------------------------------------


@pytest.mark.parametrize("graph", ["fused", "plain"])
@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_weights_stream_to_the_data_file_onnx_save_would_write(
    tiny_folder: Path, tmp_path: Path, scheme: str, graph: str
) -> None:
    """The graph built with an ExternalData sink holds no weight bytes, and the data file and the
    graph are byte for byte what onnx.save_model(save_as_external_data=True) writes for the graph
    built in memory (the layout every export had before weights were streamed)."""
    import onnx

    from smolconvert.exporters.onnx import EXTERNAL_DATA_MIN_BYTES
    from smolconvert.exporters.onnx_graph import ExternalData, build_decoder

    model = load_model(tiny_folder)

    def fetch(name: str) -> np.ndarray:
        return model.weights.get(name).float().numpy()

    recipe, fused = RECIPES[scheme], graph == "fused"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole, _ = build_decoder(model.spec, fetch, recipe, fused=fused)
    onnx.save_model(
        whole,
        str(tmp_path / "a" / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=EXTERNAL_DATA_MIN_BYTES,
    )
    with ExternalData(tmp_path / "b" / "model.onnx_data", EXTERNAL_DATA_MIN_BYTES) as external:
        streamed, _ = build_decoder(model.spec, fetch, recipe, fused=fused, external=external)
    assert max(len(t.raw_data) for t in streamed.graph.initializer) < EXTERNAL_DATA_MIN_BYTES
    onnx.save_model(streamed, str(tmp_path / "b" / "model.onnx"))
    for name in ("model.onnx", "model.onnx_data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("name", ["int4_b32_none", "int4_b32_uint8", "int8_b32_uint8"])
def test_scale_search_in_row_chunks_gives_the_same_bytes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quantize searches block scales a few rows at a time (bounded memory on a 1.7B embedding);
    with and without a Hessian that must store exactly what one search over all rows stores."""
    from smolconvert.exporters import onnx_quant

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((67, 100)) * 0.02).astype(np.float32)
    w[3] = 0.0
    x = torch.from_numpy(rng.standard_normal((512, 100))).double()
    hessian = x.T @ x / len(x)
    whole = [quantize(w, CODECS[name]), quantize(w, CODECS[name], hessian)]
    monkeypatch.setattr(onnx_quant, "SEARCH_CHUNK_ELEMENTS", 7 * 128)  # 7 rows of 4 blocks
    chunked = [quantize(w, CODECS[name]), quantize(w, CODECS[name], hessian)]
    for a, b in zip(whole, chunked, strict=True):
        assert a.packed.tobytes() == b.packed.tobytes() and a.scales.tobytes() == b.scales.tobytes()
        assert (a.zero_points is None) == (b.zero_points is None)
        if a.zero_points is not None:
            assert a.zero_points.tobytes() == b.zero_points.tobytes()


def test_int4_without_gptq_rounds_to_nearest_and_says_so(tiny_folder: Path, tmp_path: Path) -> None:
    import smolconvert

    art = smolconvert.export(
        tiny_folder, to="onnx:int4", out=tmp_path / "rtn", options={"gptq": "off"}
    )
    assert art.meta["recipe"]["gptq"] is False and art.meta["options"]["gptq"] == "off"
    assert "calibration" not in art.meta or not art.meta["calibration"]
    q = smolconvert.validate(art.folder, ctx=64, windows=2, latency=False).quality
    assert q.kld_mean < 0.1  # a working 4-bit model, not garbage
    gptq = smolconvert.export(tiny_folder, to="onnx:int4", out=tmp_path / "gptq")
    assert gptq.meta["recipe"]["gptq"] is True and "gptq" not in gptq.meta["options"]
