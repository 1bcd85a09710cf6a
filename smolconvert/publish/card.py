"""Model cards: the README.md of every artifact folder and of a release, as the Hub reads them.

A card is a pure function of artifact.json (or of a release manifest): the YAML header comes from
huggingface_hub's `ModelCardData` (base_model, `base_model_relation: quantized`, library_name,
tags, license), the body says what the files are, how they were quantized, what was measured in
which runtime, and how to run them. `smolconvert validate` and a release rewrite the card with the
measurements; until then it says it is unmeasured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smolconvert.publish import CARD_FILE, runtime_bytes

REPO = "<user>/<repo>"  # where the folder is uploaded: unknown here, so a placeholder


@dataclass(frozen=True)
class FamilyCard:
    library_name: str
    runtime: str
    usage: Callable[[dict[str, Any]], str]  # artifact.json -> a Markdown how-to-run section


def _gguf_usage(meta: dict[str, Any]) -> str:
    gguf_file, name = meta["entry_points"]["model"], meta["model"].lower()
    return (
        "With llama.cpp:\n\n```\n"
        f"llama-cli -m {gguf_file} -cnv\n"
        f"llama-server -m {gguf_file} --port 8080\n```\n\n"
        "With Ollama, from this folder (the Modelfile carries the chat template, stop tokens "
        "and sampling defaults):\n\n```\n"
        f"ollama create {name} -f Modelfile\nollama run {name}\n```\n"
    )


def _onnx_usage(meta: dict[str, Any]) -> str:
    dtype = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}.get(meta["scheme"], "fp32")
    text = ""
    if meta.get("options", {}).get("layout", "optimum") == "optimum":
        text += (
            "With Transformers.js (the `onnx/` folder and configs in optimum's layout):\n\n"
            "```js\n"
            'import { pipeline } from "@huggingface/transformers";\n'
            f'const generator = await pipeline("text-generation", "{REPO}", '
            f'{{ dtype: "{dtype}" }});\n'
            'const out = await generator([{ role: "user", content: "Hello!" }], '
            "{ max_new_tokens: 64 });\n```\n\n"
        )
    return text + (
        "With onnxruntime-genai (`genai_config.json`):\n\n```python\n"
        "import onnxruntime_genai as og\n\n"
        'model = og.Model("path/to/this/folder")\n'
        "tokenizer = og.Tokenizer(model)\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(max_length=256)\n"
        "generator = og.Generator(model, params)\n"
        'generator.append_tokens(tokenizer.encode("The capital of France is"))\n'
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "print(tokenizer.decode(generator.get_sequence(0)))\n```\n"
    )


def _coreml_usage(meta: dict[str, Any]) -> str:
    package = meta["entry_points"]["model"]
    return (
        "With Core ML (macOS 15 / iOS 18 or later: the KV cache is model state; input and "
        "output names are in `coreml_config.json`):\n\n```swift\n"
        "import CoreML\n\n"
        f'let url = URL(fileURLWithPath: "{package}")\n'
        "let compiled = try await MLModel.compileModel(at: url)\n"
        "let model = try MLModel(contentsOf: compiled)\n"
        "let state = model.makeState()  // the KV cache, kept between calls\n"
        "// per call: inputIds (1, T) and causalMask, as coreml_config.json describes\n"
        "let out = try await model.prediction(from: inputs, using: state)\n```\n"
    )


def _mlc_usage(meta: dict[str, Any]) -> str:
    return (
        "With MLC LLM (compile the model library for your device once, then chat):\n\n```\n"
        "mlc_llm compile mlc-chat-config.json --device metal -o model-lib.so\n"
        "mlc_llm chat . --model-lib model-lib.so\n```\n\n"
        f"or, once uploaded: `mlc_llm chat HF://{REPO}` (the runtime compiles what it needs).\n"
    )


def _executorch_usage(meta: dict[str, Any]) -> str:
    program = meta["entry_points"]["model"]
    return (
        "With ExecuTorch's LLM runner (Python binding; the C++ `llama_main` takes the same "
        "files):\n\n```python\n"
        "from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner\n\n"
        f'runner = TextLLMRunner("{program}", "tokenizer.json")\n'
        'runner.generate("The capital of France is", GenerationConfig(max_new_tokens=32))\n'
        "```\n"
    )


def _litert_usage(meta: dict[str, Any]) -> str:
    program = meta["entry_points"]["model"]
    return (
        "With LiteRT (`prefill` and `decode` signatures; the KV cache is passed in and out as "
        "`kv_cache_k_i` / `kv_cache_v_i`):\n\n```python\n"
        "from ai_edge_litert.interpreter import Interpreter\n\n"
        f'interpreter = Interpreter(model_path="{program}")\n'
        'prefill = interpreter.get_signature_runner("prefill")\n'
        'decode = interpreter.get_signature_runner("decode")\n```\n'
    )


FAMILY_CARDS: dict[str, FamilyCard] = {
    "gguf": FamilyCard("gguf", "llama.cpp / Ollama", _gguf_usage),
    "onnx": FamilyCard("transformers.js", "ONNX Runtime", _onnx_usage),
    "coreml": FamilyCard("coreml", "Core ML", _coreml_usage),
    "mlc": FamilyCard("mlc-llm", "MLC LLM", _mlc_usage),
    "executorch": FamilyCard("executorch", "ExecuTorch (XNNPACK)", _executorch_usage),
    "litert": FamilyCard("litert", "LiteRT (XNNPACK)", _litert_usage),
}


def _library(meta: dict[str, Any]) -> str:
    family = meta["target"]
    if family == "onnx" and meta.get("options", {}).get("layout") == "genai":
        return "onnxruntime-genai"
    return FAMILY_CARDS[family].library_name


def _num(x: Any, fmt: str) -> str:
    """A number for a table: '–' when absent, never a negative zero."""
    if not isinstance(x, (int, float)):
        return "–"
    text = format(x, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _mb(n_bytes: int) -> str:
    if n_bytes < 100_000:  # a config or the Modelfile: "0.0 MB" would say nothing
        return f"{n_bytes / 1e3:.1f} kB"
    return f"{n_bytes / 1e6:.1f} MB"


def _n_params(spec: dict[str, Any]) -> int | None:
    from smolconvert.model.spec import ModelSpec

    try:
        return ModelSpec.from_dict(spec).n_params
    except Exception:  # a spec written by another version: leave bits per weight out
        return None


def measured_table(meta: dict[str, Any]) -> str:
    v = meta.get("validation")
    if not v:
        return (
            "Not measured yet: `smolconvert validate FOLDER` runs this artifact in its runtime "
            "against the fp32 reference and writes the figures here.\n"
        )
    q, lat = v["quality"], v.get("latency") or {}
    n_params = _n_params(meta["spec"])
    size = runtime_bytes(meta["files"])
    bpw = size * 8 / n_params if n_params else None
    rows = [
        ("size", _mb(size)),
        ("bits per weight", _num(bpw, ".2f")),
        ("perplexity ratio to the reference", _num(q.get("ppl_ratio"), ".4f")),
        ("mean KL divergence", _num(q.get("kld_mean"), ".4f")),
        ("top-1 agreement", _num(100 * q["top1"], ".1f") + "%" if "top1" in q else "–"),
        ("time to first token (128 tokens)", _num(lat.get("ttft_ms"), ".0f") + " ms"),
        ("decode", _num(lat.get("decode_tok_s"), ".1f") + " tokens/s"),
        ("peak memory", _num(lat.get("peak_rss_mb"), ".0f") + " MB"),
        ("runtime", v["runtime"]),
        ("host", lat.get("host", "–")),
    ]
    lines = [
        f"Measured by smolconvert: {q.get('n_windows')} windows of {q.get('ctx')} tokens of "
        f"{v['eval_text']['name']} ({q.get('n_scored')} scored tokens), run in "
        f"{v['runtime']} against {v['reference']} on the same tokens.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {val} |" for k, val in rows],
    ]
    return "\n".join(lines) + "\n"


def _recipe(meta: dict[str, Any]) -> str:
    lines = [f"- target `{meta['target']}:{meta['scheme']}`"]
    types = Counter((meta.get("tensor_types") or {}).values())
    if types:
        shown = ", ".join(f"{t} × {n}" for t, n in sorted(types.items(), key=lambda x: -x[1]))
        lines.append(f"- tensor storage: {shown}")
    if meta.get("imatrix"):
        lines.append(f"- importance matrix from {meta['imatrix'].get('text_name', 'text')}")
    calibration = meta.get("calibration")
    if isinstance(calibration, dict) and calibration:
        what = calibration.get("text") or calibration.get("name") or calibration.get("source")
        if what:
            lines.append(f"- calibration: {what}")
    if meta.get("options"):
        opts = ", ".join(f"{k}={v}" for k, v in sorted(meta["options"].items()))
        lines.append(f"- options: {opts}")
    if meta.get("layout"):
        lines.append(f"- layout: {meta['layout']}")
    return "\n".join(lines) + "\n"


def card_data(meta: dict[str, Any]) -> Any:
    from huggingface_hub import ModelCardData

    family = meta["target"]
    tags = ["smolconvert", family, meta["scheme"], meta["spec"].get("architecture", "llama")]
    if family == "onnx":
        tags.append("onnx")
    return ModelCardData(
        base_model=meta.get("base_model"),
        base_model_relation="quantized",
        library_name=_library(meta),
        license=meta.get("license"),
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
    )


CARD_KEYS = ("model", "target", "scheme", "spec", "source_sha256", "entry_points")


def has_card(meta: dict[str, Any]) -> bool:
    """Whether `meta` describes an exported model (every exporter's artifact.json does); a
    folder sealed with less, as the artifact tests do, gets no card."""
    return all(k in meta for k in CARD_KEYS) and meta["target"] in FAMILY_CARDS


def artifact_card(meta: dict[str, Any]) -> str:
    """The README.md of an artifact folder, from its artifact.json."""
    from huggingface_hub import ModelCard

    family = FAMILY_CARDS[meta["target"]]
    base = meta.get("base_model")
    files = [f for f in meta.get("files", []) if f["path"] != CARD_FILE]
    body = [
        f"# {meta['model']} for {family.runtime} ({meta['target']}:{meta['scheme']})",
        "",
        f"{meta['model']} "
        + (f"([{base}](https://huggingface.co/{base})) " if base else "")
        + f"converted by smolconvert {meta.get('tool_versions', {}).get('smolconvert', '')} "
        f"for {family.runtime}. Source: {meta.get('origin', meta.get('source'))} "
        f"(weights sha256 `{meta['source_sha256'][:16]}…`).",
        "",
        "## Quantization",
        "",
        _recipe(meta),
        "## Measured",
        "",
        measured_table(meta),
        "## Run it",
        "",
        family.usage(meta),
        "## Files",
        "",
        *[f"- `{f['path']}` ({_mb(f['size_bytes'])})" for f in files],
        "",
        "`artifact.json` lists every file with its sha256 and how it was built.",
    ]
    card = ModelCard(f"---\n{card_data(meta).to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    return str(card)


def release_card(manifest: dict[str, Any], table_markdown: str) -> str:
    """The README.md of a release folder: one card for the whole set."""
    from huggingface_hub import ModelCard, ModelCardData

    artifacts = manifest.get("artifacts", [])
    base = manifest.get("base_model")
    families = sorted({a["family"] for a in artifacts})
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized",
        license=manifest.get("license"),
        pipeline_tag="text-generation",
        tags=["smolconvert", *families],
    )
    folders = [f"- `{a['folder']}/`: {a['target']}" for a in artifacts]
    body = table_markdown.rstrip() + "\n\n## Folders\n\n" + "\n".join(folders) + "\n"
    body += "\nEach folder has its own README.md with the recipe and how to run it.\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
