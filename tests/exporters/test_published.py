"""Published-layout folders through every family, proven by the runtimes and by llama.cpp's own
converter: SmolLM2-Instruct and SmolLM3 (Llama-3-shaped tokenizer, no-RoPE layers, pretraining_tp 2,
chat_template.jinja) as users download them, at tiny size."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest

import smolconvert
from tests import published
from tests.conftest import require, require_module

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # the llama.cpp that llama-cpp-python pins


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """convert_hf_to_gguf.py from the llama.cpp source llama-cpp-python 0.3.36 builds."""
    cache = Path(os.environ.get("SMOLCONVERT_TEST_CACHE", Path.home() / ".cache/smolconvert"))
    root = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not root.exists():
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + [LLAMA_CPP_SDIST, "-d", str(cache), "-q"],
            capture_output=True,
            text=True,
        )
        require(got.returncode == 0, f"needs the {LLAMA_CPP_SDIST} sdist: {got.stderr[-300:]}")
        with tarfile.open(cache / "llama_cpp_python-0.3.36.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return root / "convert_hf_to_gguf.py"


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "SmolLM3-3B"])
def test_gguf_matches_llama_cpp_converter(
    tmp_path: Path, name: str, llama_cpp_converter: Path
) -> None:
    """Every tokenizer key (ids, template, types, merges, pre) and model key as llama.cpp writes
    them from the same folder, and the same f32 tensor bytes."""
    folder = published.write_published(tmp_path / name, name)
    theirs = tmp_path / "theirs.gguf"
    # The converter names the pre-tokenizer by hashing how a known checkpoint tokenizes a probe
    # text; a fixture's small trained vocabulary has no known hash, so the name the real
    # checkpoint gets is handed to it. Everything else is the converter's own code.
    pre = "smaug-bpe" if name.startswith("SmolLM3") else "smollm"
    driver = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(llama_cpp_converter.parent)!r}, "
        f"{str(llama_cpp_converter.parent / 'gguf-py')!r}]\n"
        "import conversion.base\n"
        f"conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
        f"sys.argv = [{str(llama_cpp_converter)!r}, {str(folder)!r}, '--outtype', 'f32', "
        f"'--outfile', {str(theirs)!r}]\n"
        f"runpy.run_path({str(llama_cpp_converter)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = smolconvert.export(folder, to="gguf:f32", out=tmp_path / "ours")
    mine, want = _fields(ours.path("model")), _fields(theirs)
    arch = want["general.architecture"]
    assert mine["general.architecture"] == arch == ("smollm3" if "3" in name[:7] else "llama")
    compared = [k for k in want if k.startswith(("tokenizer.", f"{arch}."))]
    assert len(compared) >= 15
    assert {k: mine.get(k) for k in compared} == {k: want[k] for k in compared}
    assert mine["tokenizer.chat_template"] == (
        published.SMOLLM3_TEMPLATE if arch == "smollm3" else published.SMOLLM2_TEMPLATE
    )
    theirs_t = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    for t in gguf.GGUFReader(str(ours.path("model"))).tensors:
        assert t.tensor_type == theirs_t[t.name].tensor_type
        assert np.array_equal(t.data, theirs_t[t.name].data), t.name


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "SmolLM3-3B"])
def test_llama_cpp_tokenizes_like_the_reference(tmp_path: Path, name: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from pydoc_data.topics import topics

    folder = published.write_published(tmp_path / name, name)
    art = smolconvert.export(folder, to="gguf:q8_0", out=tmp_path / "q8")
    model = smolconvert.load(folder)
    llm = llama_cpp.Llama(model_path=str(art.path("model")), n_ctx=64, verbose=False)
    template = model.tokenizer.chat_template
    import jinja2

    chat = [{"role": "user", "content": "What is 12345 + 6789?\n  Answer in    French."}]
    prompt = jinja2.Template(template).render(messages=chat, add_generation_prompt=True)
    for text in (prompt, topics["for"][:3000], "  leading spaces\n\n\ttabs 3.14159 "):
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == model.tokenizer.encode(text)
    assert llm.token_bos() == model.tokenizer.special.bos
    assert llm.token_eos() == model.tokenizer.special.eos
    llm.close()


@pytest.mark.parametrize(
    "target, options, kld_max",
    [
        ("gguf:f32", {}, 1e-6),
        ("gguf:q8_0", {}, 5e-3),
        ("onnx:fp32", {"layout": "transformers.js"}, 1e-6),
        ("onnx:fp32", {"layout": "genai"}, 1e-6),
        ("coreml:fp16", {}, 5e-3),
    ],
)
def test_tiny_smollm3_as_published_runs_in_each_runtime_like_the_reference(
    tmp_path: Path, target: str, options: dict, kld_max: float
) -> None:
    family = target.partition(":")[0]
    require_module(
        {"gguf": "llama_cpp", "onnx": "onnxruntime", "coreml": "coremltools"}[family], family
    )
    folder = published.write_published(tmp_path / "SmolLM3-3B", "SmolLM3-3B")
    art = smolconvert.export(folder, to=target, out=tmp_path / "art", options=options)
    report = smolconvert.validate(art.folder, ctx=64, windows=2, latency=False)
    q = report.quality
    assert q.n_scored == 2 * 31  # llama-perplexity: positions ctx/2 .. ctx-2 of each window
    assert q.kld_mean <= kld_max, (target, q.kld_mean)
    if kld_max <= 1e-6:  # a random model's logits are nearly flat: top-1 only where exact
        assert q.top1 == 1.0
