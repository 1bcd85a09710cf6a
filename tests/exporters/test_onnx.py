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
from smolconvert.exporters.onnx import TJS_DTYPES, TJS_FILES, export_onnx
from smolconvert.exporters.onnx_kv import stored_cache_scales
from smolconvert.exporters.onnx_ops import Weights
from smolconvert.exporters.onnx_weights import quantize_weights, stored_weights
from smolconvert.model.reference import build_reference
from smolconvert.model.source import CanonicalModel, load_model
from smolconvert.options import OnnxOptions
from smolconvert.quantizers.nbits import CODECS, FORMATS, quantize
from smolconvert.quantizers.onnx_recipes import SCHEMES as ONNX_SCHEMES
from smolconvert.quantizers.onnx_recipes import OnnxScheme, codec_plan
from smolconvert.quantizers.recipe import Recipe, Rule
from tests import tiny
from tests.conftest import require, require_module

SCHEMES = sorted(ONNX_SCHEMES)
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
    options = OnnxOptions(layout=layout, graph=graph, kv_cache=kv_cache)
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


def _weights(model: CanonicalModel, chosen: OnnxScheme) -> Weights:
    """What a build reads: every quantized form computed first (round-to-nearest), float weights
    fetched from the model as they are written."""
    plan = codec_plan(chosen.recipe, model.spec)
    quantized, _ = quantize_weights(model, plan, lambda _: None, gptq=False)
    return Weights(lambda name: model.weights.get(name).float().numpy(), plan, quantized)


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

    chosen = ONNX_SCHEMES[scheme]
    if chosen.accuracy_level:  # int8 activations: the shipped graph is close, not exact ...
        shipped = _export(tiny_folder, scheme, tmp_path / "shipped", graph=graph)
        want = _stored_reference(shipped, tiny_folder).logits(IDS).float().numpy()
        approx = open_onnxruntime_runner(shipped, threads=2).logits(IDS)
        assert np.abs(approx - want).max() < 0.05 * np.abs(want).max()
        # ... so the stored weights and the graph's math are checked exactly with fp32 activations
        exact = dataclasses.replace(chosen, accuracy_level=0)
        monkeypatch.setitem(onnx_exporter.SCHEMES, scheme, exact)
    art = _export(tiny_folder, scheme, tmp_path / "art", graph=graph)
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    runner = open_onnxruntime_runner(art, threads=2)
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

    exact = dataclasses.replace(ONNX_SCHEMES["int8"], accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.SCHEMES, "int8", exact)
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

    got = open_onnxruntime_runner(art, threads=2).logits(IDS)
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
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    rules = (Rule("token_embd", "int4_b128_none"), Rule("output", "int4_b128_none"))
    recipe = Recipe("int4", "int4_b32_none", rules)  # output: the tied table, or lm_head
    chosen = dataclasses.replace(ONNX_SCHEMES["int4"], recipe=recipe, accuracy_level=0, gptq=False)
    monkeypatch.setitem(onnx_exporter.SCHEMES, "int4", chosen)
    art = _export(tiny_folder, "int4", tmp_path / "art")
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    got = open_onnxruntime_runner(art, threads=2).logits(IDS)
    assert np.abs(got - want).max() < 1e-4


def test_q_and_kv_in_different_codecs(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8-bit k/v beside 4-bit q: two MatMulNBits (q_proj, kv_proj) concatenated for
    GroupQueryAttention, GPTQ'd per run on the per-head Hessians; onnxruntime matches the
    reference on the weights read back from the file."""
    import onnx

    import smolconvert.exporters.onnx as onnx_exporter
    from smolconvert.validators.onnxruntime import open_onnxruntime_runner

    rules = (Rule("attn_k", "int8_b32_none"), Rule("attn_v", "int8_b32_none"))
    recipe = Recipe("int4", "int4_b32_none", rules)
    chosen = dataclasses.replace(ONNX_SCHEMES["int4"], recipe=recipe, accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.SCHEMES, "int4", chosen)
    # a float cache: an int8 one can round a value on the other side of .5 in onnxruntime than in
    # torch (summation order), which moves later logits by ~1e-3 (test_int8_kv_cache covers it)
    art = _export(tiny_folder, "int4", tmp_path / "art", kv_cache="float")
    proto = onnx.load(str(art.path("model")), load_external_data=False)
    bits = {
        n.name.rsplit("/", 1)[1]: next(a.i for a in n.attribute if a.name == "bits")
        for n in proto.graph.node
        if n.op_type == "MatMulNBits" and "/layers.0/self_attn/" in n.name
    }
    assert bits == {"q_proj": 4, "kv_proj": 8, "o_proj": 4}
    want = _stored_reference(art, tiny_folder).logits(IDS).float().numpy()
    got = open_onnxruntime_runner(art, threads=2).logits(IDS)
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

    from smolconvert.exporters.onnx_ops import Graph, Linear, add_quantized, linear

    codec = FORMATS[name]
    rng = np.random.default_rng(len(name))
    n, k = 48, 80  # K not a multiple of any block: the last block is padded
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    qw = CODECS[name].quantize(w, None)  # the registry's interface: importance is not used
    deq = CODECS[name].dequantize(qw, (n, k))
    assert CODECS[name].family == "onnx" and qw.format == codec
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
        if scheme == "int4":  # symmetric blocks: 4 bits but down_proj's 8, the tied head too
            kernels = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
            assert len(kernels) == projections * n_layers + 1
            for n in kernels:
                bits = next(a.i for a in n.attribute if a.name == "bits")
                assert bits == (8 if "down_proj" in n.name else 4), n.name
                assert len(n.input) == 3, n.name  # no zero points
            calibration = art.meta["calibration"]
            assert calibration["method"] == "gptq" and "attention" in calibration["hessians"]
            # each window half pydoc, half the model's own samples (model/samples.py)
            sampled = calibration["sampled"]
            assert sampled["windows"] == 16 and calibration["tokens"] == 16 * 2 * sampled["length"]
            assert len(sampled["sha256"]) == 64 and sampled["seed"] == 0
            assert sampled["dtype"] == "bfloat16"
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
    if not ONNX_SCHEMES[scheme].accuracy_level:
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
    exact = dataclasses.replace(ONNX_SCHEMES[scheme], accuracy_level=0)
    monkeypatch.setitem(onnx_exporter.SCHEMES, scheme, exact)

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
    runner = open_onnxruntime_runner(art, threads=2)
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
    from smolconvert.exporters.onnx_decoder import build_decoder
    from smolconvert.exporters.onnx_ops import ExternalData

    model = load_model(tiny_folder)
    chosen, fused = ONNX_SCHEMES[scheme], graph == "fused"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole, _ = build_decoder(model.spec, chosen, _weights(model, chosen), fused=fused)
    onnx.save_model(
        whole,
        str(tmp_path / "a" / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=EXTERNAL_DATA_MIN_BYTES,
    )
    with ExternalData(tmp_path / "b" / "model.onnx_data", EXTERNAL_DATA_MIN_BYTES) as external:
        weights = _weights(model, chosen)
        streamed, _ = build_decoder(model.spec, chosen, weights, fused=fused, external=external)
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
    from smolconvert.quantizers import nbits

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((67, 100)) * 0.02).astype(np.float32)
    w[3] = 0.0
    x = torch.from_numpy(rng.standard_normal((512, 100))).double()
    hessian = x.T @ x / len(x)
    whole = [quantize(w, FORMATS[name]), quantize(w, FORMATS[name], hessian)]
    monkeypatch.setattr(nbits, "SEARCH_CHUNK_ELEMENTS", 7 * 128)  # 7 rows of 4 blocks
    chunked = [quantize(w, FORMATS[name]), quantize(w, FORMATS[name], hessian)]
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
    assert gptq.meta["recipe"]["gptq"] is True and gptq.meta["options"]["gptq"] == "per-head"
    assert gptq.meta["calibration"]["hessians"].startswith("k and v per kv head")


# --- recipes on llama.cpp's roles; quantize, then build (issue 19) -------------------------------


def test_recipe_roles_are_llama_cpp_s(tiny_folder: Path) -> None:
    """The tied embedding takes the output's codec (one table, read as both); an untied one is
    token_embd and lm_head the output; projections take their attn_/ffn_ role, else the default;
    norms stay float. A codec MatMulNBits cannot run is refused, by name."""
    from smolconvert.errors import ConfigError

    spec = load_model(tiny_folder).spec
    rules = (Rule("token_embd", "int8_b32_none"), Rule("attn_v", "int8_b64_uint8"))
    recipe = Recipe("t", "int4_b32_none", rules)
    plan = codec_plan(recipe, spec)
    embed = "model.embed_tokens.weight"
    if spec.tie_word_embeddings:
        assert plan[embed] == "int4_b32_none" and "lm_head.weight" not in plan
    else:
        assert plan[embed] == "int8_b32_none" and plan["lm_head.weight"] == "int4_b32_none"
    assert plan["model.layers.1.self_attn.v_proj.weight"] == "int8_b64_uint8"
    assert plan["model.layers.1.self_attn.k_proj.weight"] == "int4_b32_none"
    assert (
        plan["model.layers.0.input_layernorm.weight"] is None and plan["model.norm.weight"] is None
    )
    int8 = codec_plan(ONNX_SCHEMES["int8"].recipe, spec)
    assert int8[embed] == "int8_b32_none" and int8.get("lm_head.weight", "int8_b32_none") == (
        "int8_b32_none"
    )
    assert int8["model.layers.0.mlp.up_proj.weight"] == "int8_b32_uint8"
    with pytest.raises(ConfigError, match="q4_k"):
        codec_plan(Recipe("bad", "q4_k"), spec)


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_builders_pack_the_weights_quantized_before_building(tiny_folder: Path, graph: str) -> None:
    """Quantize, then build: the builders never fetch a weight the plan quantizes; they store the
    precomputed levels byte for byte, and fetch each float weight once."""
    from onnx import numpy_helper

    from smolconvert.exporters.onnx_decoder import build_decoder

    model = load_model(tiny_folder)
    chosen = ONNX_SCHEMES["int8"]
    plan = codec_plan(chosen.recipe, model.spec)
    quantized, calibration = quantize_weights(model, plan, lambda _: None, gptq=chosen.gptq)
    assert calibration is None and set(quantized) == {n for n, c in plan.items() if c}
    fetched: list[str] = []

    def fetch(name: str) -> np.ndarray:
        fetched.append(name)
        return model.weights.get(name).float().numpy()

    proto, _ = build_decoder(model.spec, chosen, Weights(fetch, plan, quantized), graph == "fused")
    assert sorted(fetched) == sorted(n for n, c in plan.items() if c is None)
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    name = "model.layers.1.self_attn.o_proj.weight"
    assert np.array_equal(init[f"{name}.qweight"], quantized[name].packed)
    assert np.array_equal(init[f"{name}.scales"], quantized[name].scales)


def test_missing_and_stray_weights_are_named(tiny_folder: Path) -> None:
    from smolconvert.errors import ValidationError
    from smolconvert.exporters.onnx_decoder import build_decoder

    model = load_model(tiny_folder)
    chosen = ONNX_SCHEMES["int8"]
    plan = codec_plan(chosen.recipe, model.spec)
    quantized, _ = quantize_weights(model, plan, lambda _: None, gptq=chosen.gptq)

    def fetch(name: str) -> np.ndarray:
        return model.weights.get(name).float().numpy()

    up = "model.layers.0.mlp.up_proj.weight"
    stray = {**quantized, "model.layers.7.mlp.up_proj.weight": quantized[up]}
    with pytest.raises(ValidationError, match=r"not in the model: \['model.layers.7.mlp.up_proj"):
        build_decoder(model.spec, chosen, Weights(fetch, plan, stray))
    short = {n: q for n, q in quantized.items() if n != up}
    with pytest.raises(ValidationError, match=r"no quantized form was computed for \[.*up_proj"):
        build_decoder(model.spec, chosen, Weights(fetch, plan, short))
    off_plan = {**quantized, up: quantize(fetch(up), FORMATS["int4_b32_none"])}
    with pytest.raises(ValidationError, match="off the plan.*up_proj.*int4_b32_none"):
        build_decoder(model.spec, chosen, Weights(fetch, plan, off_plan))
    with pytest.raises(ValidationError, match=r"never written: \['model.norm.weight'\]"):
        Weights(fetch, plan).check_written(["model.norm.weight"])
