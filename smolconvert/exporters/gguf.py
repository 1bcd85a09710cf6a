"""GGUF export for llama.cpp and Ollama: metadata, tokenizer and tensors as llama.cpp's converter
writes them, quantized by our codecs under llama.cpp's mixture rules (quantizers/gguf_recipes.py).

Tensors are streamed: the header and tensor table are written from the plan first, then each tensor
is read, permuted (Q/K rows), quantized and written before the next is read, so peak memory is one
tensor plus the output buffer. Keys follow llama.cpp `conversion/llama.py` and `conversion/base.py`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from smolconvert import artifact as A
from smolconvert import progress
from smolconvert.errors import ConfigError, UnsupportedError, ValidationError
from smolconvert.files import write_atomic
from smolconvert.model import gguf_layout
from smolconvert.model.imatrix import Imatrix
from smolconvert.model.source import CanonicalModel
from smolconvert.model.spec import ModelSpec
from smolconvert.model.weights import canonical_names, expected_shape
from smolconvert.options import GgufOptions
from smolconvert.publish import MODELFILE
from smolconvert.publish.ollama import modelfile_for
from smolconvert.quantizers.gguf_recipes import SCHEMES, get_scheme, tensor_codec
from smolconvert.quantizers.registry import get_codec

LAYOUT_NOTE = "llama.cpp @ 0c1e57098 (llama-cpp-python 0.3.36), gguf-py 0.19"
AUTO = "auto"  # the scheme whose types are chosen per tensor within a budget (quantizers/gguf_auto)
AUTO_TOKENS = 512  # calibration tokens gguf:auto measures sensitivity on

# general.file_type of a mixture chosen per tensor: llama.cpp's name for its dominant type, as its
# loader guesses one for files without the key (llama-model-loader.cpp, @ 0c1e57098).
FILE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k": 12,
    "q4_k": 15,
    "q5_k": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "bf16": 32,
}


@dataclass(frozen=True)
class TensorPlan:
    name: str  # canonical
    gguf_name: str
    shape: tuple[int, ...]  # HF order (rows, cols)
    codec: str

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.codec.upper()]

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * type_size


def plan(spec: ModelSpec, scheme: str, has_imatrix: bool = False) -> list[TensorPlan]:
    """Every tensor with the codec llama.cpp's quantize would choose for this scheme."""
    check_representable(spec)
    recipe = get_scheme(scheme)
    gqa = spec.n_heads // spec.n_kv_heads
    out = []
    for name in canonical_names(spec):
        shape = expected_shape(spec, name)
        codec = tensor_codec(
            recipe, name, shape, spec.n_layers, gqa, spec.tie_word_embeddings, has_imatrix
        )
        out.append(TensorPlan(name, gguf_layout.gguf_name(name), shape, codec))
    return out


def check_representable(spec: ModelSpec) -> None:
    if spec.architecture == "smollm3":
        hard_coded = tuple((i + 1) % 4 != 0 for i in range(spec.n_layers))
        if spec.rope_layers != hard_coded:
            raise UnsupportedError(
                "llama.cpp hard-codes SmolLM3's no-RoPE layers as every 4th layer (3, 7, ...); "
                f"this model's pattern {[int(r) for r in spec.rope_layers]} cannot be represented "
                "in GGUF"
            )


def check_options(scheme: str, options: GgufOptions) -> None:
    """Refuse a budget on a fixed scheme, or gguf:auto without exactly one, before any work."""
    budgets = [k for k in ("size_mb", "bpw") if getattr(options, k) is not None]
    if scheme == AUTO and len(budgets) != 1:
        raise ConfigError(
            "gguf:auto needs one budget: -O size_mb=MB (the whole file) or -O bpw=BITS "
            f"(bits per weight of the tensor data); got {' and '.join(budgets) or 'none'}"
        )
    if scheme != AUTO and budgets:
        raise ConfigError(
            f"-O {budgets[0]} is the budget of gguf:auto; gguf:{scheme} has fixed types "
            "(drop the option, or export --to gguf:auto)"
        )


def export_gguf(
    model: CanonicalModel,
    scheme: str,
    out: Path,
    imatrix: Imatrix | None = None,
    quiet: bool = False,
    options: GgufOptions | None = None,
) -> A.Artifact:
    spec = model.spec
    options = options or GgufOptions()
    check_options(scheme, options)
    step = progress.Steps(quiet)
    auto_plan = None
    if scheme == AUTO:
        tensors, auto_plan = _auto_plan(model, imatrix, options, step, quiet)
        file_type = guess_file_type(tensors)
    else:
        tensors = plan(spec, scheme, imatrix is not None)
        file_type = get_scheme(scheme).file_type
    filename = f"{model.name}-{scheme}.gguf"
    with A.staging(out) as stage:
        writer = gguf.GGUFWriter(str(stage / filename), spec.architecture)
        _write_metadata(writer, model, file_type, imatrix)
        for t in tensors:
            writer.add_tensor_info(
                t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        step(f"writing {len(tensors)} tensors as {scheme}")
        with progress.bar(len(tensors), "tensors") as bar:
            for t in tensors:
                w = model.weights.get(t.name).float().numpy()
                heads = gguf_layout.rope_heads(t.name, spec.n_heads, spec.n_kv_heads)
                if heads is not None:
                    w = gguf_layout.permute_qk(w, heads)
                importance = imatrix.get(t.name) if imatrix is not None else None
                codec = get_codec(t.codec, "gguf")
                data = codec.quantize(np.ascontiguousarray(w, np.float32), importance)
                if data.nbytes != t.nbytes:  # the header already promised t.nbytes
                    raise ValidationError(
                        f"{t.name}: {t.codec} wrote {data.nbytes} bytes, the plan {t.nbytes}"
                    )
                writer.write_tensor_data(data)
                bar.update(1)
        writer.close()
        modelfile = modelfile_for(model, filename)
        write_atomic(stage / MODELFILE, modelfile.text())
        meta = {
            "format": "gguf",
            "target": "gguf",
            "scheme": scheme,
            **A.source_meta(model),
            "entry_points": {"model": filename},
            "tensor_types": {t.gguf_name: t.qtype.name for t in tensors},
            "imatrix": imatrix.describe() if imatrix is not None else None,
            "layout": LAYOUT_NOTE,
            "tool_versions": A.tool_versions("gguf", "numpy", "torch"),
            "min_runtime": {"llama.cpp": "b6000 (GGUF v3)"},
            "modelfile": {
                "template": modelfile.template is not None,
                "stop": list(modelfile.stop),
                "note": modelfile.note,
            },
        }
        if auto_plan is not None:
            meta["auto_plan"] = auto_plan
        meta = A.finish(stage, meta)
    return A.Artifact(out, meta)


def guess_file_type(tensors: list[TensorPlan]) -> int:
    """llama.cpp's file type named after the type that holds the most weights."""
    held: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            held[t.codec] = held.get(t.codec, 0) + int(np.prod(t.shape))
    return FILE_TYPES[max(sorted(held), key=lambda c: held[c])] if held else 0


def _auto_plan(
    model: CanonicalModel,
    imatrix: Imatrix | None,
    options: GgufOptions,
    step: progress.Steps,
    quiet: bool,
) -> tuple[list[TensorPlan], dict[str, Any]]:
    """gguf:auto's tensors: sensitivity measured on calibration text, then the budgeted choice
    (quantizers/gguf_auto.py). Refuses a budget too small for the model before measuring."""
    from smolconvert.quantizers import gguf_auto as auto
    from smolconvert.texts import default_calibration_text

    spec = model.spec
    check_representable(spec)
    names = canonical_names(spec)
    shapes = {n: expected_shape(spec, n) for n in names}
    norms = sum(auto.nbytes("f32", s) for s in shapes.values() if len(s) < 2)
    if options.size_mb is not None:
        asked = f"size_mb={options.size_mb:g}"
        header = _header_bytes(model, imatrix, shapes)
        budget = int(options.size_mb * 1e6) - header - norms
        need = f"{(auto.minimum_bytes(spec) + header + norms) / 1e6:.2f} MB"
    else:
        assert options.bpw is not None  # check_options
        asked = f"bpw={options.bpw:g}"
        n_weights = sum(int(np.prod(s)) for s in shapes.values())
        budget = int(options.bpw * n_weights / 8) - norms
        need = f"{(auto.minimum_bytes(spec) + norms) * 8 / n_weights:.2f} bits per weight"
    if auto.minimum_bytes(spec) > budget:
        raise ConfigError(
            f"gguf:auto {asked} is too small for {model.name}: it needs at least {need} "
            "(every matrix at its smallest type)"
        )
    text = default_calibration_text()
    ids = model.tokenizer.encode(text.text[: AUTO_TOKENS * 8])[:AUTO_TOKENS]
    step(f"gguf:auto {asked}: measuring each tensor on {len(ids)} tokens of {text.name}")
    start = time.perf_counter()
    costs = auto.measure(model, ids, imatrix, quiet)
    choice = auto.choose(costs, budget)
    seconds = time.perf_counter() - start
    tensors = [
        TensorPlan(n, gguf_layout.gguf_name(n), s, choice.get(n, "f32")) for n, s in shapes.items()
    ]
    described = {
        gguf_layout.gguf_name(c.name): {
            "type": choice[c.name],
            "bytes": c.nbytes[choice[c.name]],
            "kld": c.kld,  # predicted, per candidate type
        }
        for c in costs
    }
    info = {
        "budget": asked,
        "budget_bytes": budget,
        "calibration": {"text_name": text.name, "text_sha256": text.sha256, "tokens": len(ids)},
        "predicted_kld": float(f"{sum(c.kld[choice[c.name]] for c in costs):.4g}"),
        "seconds": round(seconds, 1),
        "method": "per-tensor error under each type, activation-weighted, times a per-layer "
        "KLD gain (quantizers/gguf_auto.py); greedy over convex hulls",
        "tensors": described,
    }
    return tensors, info


def _header_bytes(
    model: CanonicalModel, imatrix: Imatrix | None, shapes: dict[str, tuple[int, ...]]
) -> int:
    """Bytes before the tensor data: metadata and tensor table, padded, from a scratch file (the
    file type takes the same 4 bytes whatever its value). Writes the metadata twice: a second
    or so for a 50k-token vocabulary."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(str(path), model.spec.architecture)
        _write_metadata(writer, model, 0, imatrix)
        for name, shape in shapes.items():
            writer.add_tensor_info(
                gguf_layout.gguf_name(name),
                shape,
                np.dtype(np.float32),
                0,
                raw_dtype=gguf.GGMLQuantizationType.F32,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        size = path.stat().st_size
    return -(-size // 32) * 32


def _size_label(n_params: int) -> str:
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{round(n_params / 1e6)}M"


def _write_metadata(
    w: gguf.GGUFWriter, model: CanonicalModel, file_type: int, imatrix: Imatrix | None
) -> None:
    spec, meta = model.spec, model.metadata
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model.name)
    for key, adder in (
        ("general.basename", w.add_basename),
        ("general.finetune", w.add_finetune),
        ("general.license", w.add_license),
        ("general.organization", w.add_organization),
    ):
        if isinstance(meta.get(key), str):
            adder(meta[key])
    w.add_size_label(str(meta.get("general.size_label") or _size_label(spec.n_params)))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_vocab_size(spec.vocab_size)
    w.add_rope_dimension_count(spec.head_dim)
    # llama.cpp's converter writes these whenever config.json has head_dim (transformers 5 always).
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    _write_tokenizer(w, model)
    if imatrix is not None:
        info = imatrix.describe()
        w.add_string("quantize.imatrix.dataset", info["text_name"])
        w.add_string("quantize.imatrix.dataset_sha256", info["text_sha256"])
        w.add_uint32("quantize.imatrix.dataset_chars", info["text_chars"])
        w.add_uint32("quantize.imatrix.entries_count", info["entries"])
        w.add_uint32("quantize.imatrix.chunks_count", info["chunks"])


def _write_tokenizer(w: gguf.GGUFWriter, model: CanonicalModel) -> None:
    tok = model.tokenizer
    vocab = tok.gguf_vocab()
    if len(vocab.tokens) != model.spec.vocab_size:
        raise UnsupportedError(
            f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
            f"{model.spec.vocab_size}; llama.cpp needs them equal"
        )
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is None:  # llama.cpp's converter refuses such a tokenizer too
        raise UnsupportedError(
            "the tokenizer's pre-tokenizer matches none llama.cpp knows, and GGUF needs its "
            "name (tokenizer.ggml.pre); see model/tokenizer.py PRE_TOKENIZERS"
        )
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    special = tok.special
    for value, adder in (
        (special.bos, w.add_bos_token_id),
        (special.eos, w.add_eos_token_id),
        (special.unk, w.add_unk_token_id),
        (special.pad, w.add_pad_token_id),
    ):
        if value is not None:
            adder(value)
    # llama.cpp's converter forces add_bos_token=False for 49152-token vocabularies (all SmolLM).
    w.add_add_bos_token(bool(special.add_bos) and model.spec.vocab_size != 49152)
    w.add_add_eos_token(False)  # encode() never appends eos
    if tok.add_space_prefix is not None:  # llama.cpp conversion/llama.py set_vocab
        w.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def describe_schemes() -> list[dict[str, Any]]:
    auto = {
        "target": f"gguf:{AUTO}",
        "default_codec": None,
        "bits_per_weight": None,  # the budget's
        "block_size": None,
        "mixture": [
            "a type per tensor within -O size_mb= or -O bpw=, by measured KLD per byte "
            "(docs/gguf.md)"
        ],
    }
    return [auto] + [
        {
            "target": f"gguf:{name}",
            "default_codec": s.default,
            "bits_per_weight": get_codec(s.default, "gguf").bits_per_weight,
            "block_size": get_codec(s.default, "gguf").block_size,
            "mixture": [f"{x.role}->{x.codec}" for x in s.recipe.rules],
        }
        for name, s in sorted(SCHEMES.items())
    ]
