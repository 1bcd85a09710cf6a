"""The MLC runner, weight-level: read the tensor cache, dequantize as MLC's kernels do, run torch.

MLC LLM's runtime is not installable from PyPI, so this runner checks what can be checked here: the
shards are read back (with TVM's own `load_tensor_cache` when apache-tvm is installed, else our
reader of the same bytes), every name, dtype and shape is checked against MLC's Llama parameter
list, the weights are dequantized with MLC's formula in the model dtype and split back into
canonical tensors, and the fp32 reference decoder runs on them. Latency is torch's, not MLC's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from smolconvert.artifact import Artifact
from smolconvert.errors import CorruptFileError
from smolconvert.validators.runner import GenerationTiming

NOTES = (
    "weight-level: MLC runtime not run; logits from the reference decoder on MLC-dequantized "
    "weights",
    "latency is the torch reference decoder's on those weights, not MLC's",
)


def read_tensor_cache(folder: Path, prefer_tvm: bool = True) -> tuple[dict[str, NDArray], str]:
    """{name: numpy array} from tensor-cache.json (float32 records decoded from bf16), and which
    loader read it."""
    index = folder / "tensor-cache.json"
    if not index.is_file():
        index = folder / "ndarray-cache.json"
    if not index.is_file():
        raise CorruptFileError(f"{folder}: no tensor-cache.json (or ndarray-cache.json)")
    if prefer_tvm:
        try:
            import tvm
            from tvm.contrib import tvmjs
        except ImportError:
            pass
        else:
            tensors, _ = tvmjs.load_tensor_cache(str(index), tvm.cpu())
            return {k: v.numpy() for k, v in tensors.items()}, f"TVM {tvm.__version__} tvmjs"
    return _read_ourselves(index), "smolconvert's reader (apache-tvm not installed)"


def _read_ourselves(index: Path) -> dict[str, NDArray]:
    from smolconvert.model.mlc_layout import bf16_to_f32

    try:
        info = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{index}: not valid JSON ({e})") from None
    out: dict[str, NDArray] = {}
    for shard in info["records"]:
        raw = (index.parent / shard["dataPath"]).read_bytes()
        if len(raw) != shard["nbytes"]:
            raise CorruptFileError(
                f"{index.parent / shard['dataPath']}: {len(raw)} bytes, index says "
                f"{shard['nbytes']}; re-export"
            )
        for rec in shard["records"]:
            start, n = rec["byteOffset"], rec["nbytes"]
            if start + n > len(raw):
                raise CorruptFileError(f"{index}: record {rec['name']} runs past its shard")
            buf = raw[start : start + n]
            if rec["dtype"] == "float32" and rec["format"] == "f32-to-bf16":
                arr = bf16_to_f32(np.frombuffer(buf, np.uint16))
            else:
                arr = np.frombuffer(buf, np.dtype(rec["dtype"]))
            out[rec["name"]] = arr.reshape(rec["shape"]).copy()
    return out


def check_params(tensors: dict[str, NDArray], params: list[Any]) -> None:
    """Every expected MLC parameter present with its dtype and shape, and nothing else."""
    problems = []
    expected = {p.name: p for p in params}
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"missing {name}")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {name}")
    for name, p in expected.items():
        if name in tensors:
            a = tensors[name]
            if tuple(a.shape) != p.shape or str(a.dtype) != p.dtype:
                problems.append(
                    f"{name}: {a.dtype}{list(a.shape)}, expected {p.dtype}{list(p.shape)}"
                )
    if problems:
        raise CorruptFileError(
            "MLC tensor cache does not match MLC's Llama parameters: " + "; ".join(problems)
        )


def canonical_tensors(tensors: dict[str, NDArray], spec: Any, scheme: str) -> dict[str, Any]:
    """MLC parameters -> canonical torch tensors (float32), dequantized as MLC's kernels do."""
    import torch

    from smolconvert.model.mlc_layout import plan
    from smolconvert.model.weights import expected_shape
    from smolconvert.quantizers import group

    params = plan(spec, scheme)
    check_params(tensors, params)
    cfg = group.GROUP_CONFIGS.get(scheme)
    out = {}
    for p in params:
        if p.role == "q_scale":
            continue
        if p.role == "weight":
            w = tensors[p.name]
        else:
            k = expected_shape(spec, p.sources[0])[-1] if len(p.shape) == 2 else p.shape[0]
            base = p.name.removesuffix(".q_weight")
            if cfg is None:
                raise CorruptFileError(f"{p.name}: quantized, but {scheme!r} is no group scheme")
            w = group.dequantize(tensors[p.name], tensors[f"{base}.q_scale"], k, cfg)
        w = np.asarray(w, np.float32)
        rows = [expected_shape(spec, s)[0] for s in p.sources]
        for s, part in zip(p.sources, np.split(w, np.cumsum(rows)[:-1], axis=0), strict=True):
            out[s] = torch.from_numpy(np.ascontiguousarray(part))
    return out


class MLCWeightRunner:
    runtime = "mlc (weight-level)"
    notes = NOTES

    def __init__(self, art: Artifact, n_ctx: int = 1024, threads: int | None = None) -> None:
        import torch

        from smolconvert.model.reference import build_reference
        from smolconvert.model.spec import ModelSpec
        from smolconvert.validators.runner import TorchRunner

        folder = art.folder
        chat = json.loads(art.path("model").read_text(encoding="utf-8"))
        spec = ModelSpec.from_dict(art.meta["spec"])
        scheme = chat["quantization"]
        tensors, loader = read_tensor_cache(folder)
        weights = canonical_tensors(tensors, spec, scheme)
        del tensors
        decoder = build_reference(spec, tensors=weights, dtype=torch.float32)
        self.torch = TorchRunner(decoder, "fp32", threads)
        self.loader = loader
        self.description = (
            f"{scheme} tensor cache read by {loader}, dequantized as MLC's kernels, on the "
            f"{self.torch.description}"
        )

    def logits(self, token_ids: Sequence[int]) -> NDArray[np.float32]:
        return self.torch.logits(token_ids)

    def time_generation(self, prompt_ids: Sequence[int], n_new: int) -> GenerationTiming:
        return self.torch.time_generation(prompt_ids, n_new)


def open_mlc_runner(
    art: Artifact, n_ctx: int = 1024, threads: int | None = None
) -> MLCWeightRunner:
    return MLCWeightRunner(art, n_ctx, threads)
