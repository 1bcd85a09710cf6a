"""Write a canonical model as a Hugging Face folder (config.json, safetensors, tokenizer files).

Used to hand a model to tools that read only Hugging Face folders (transformers, llama.cpp's own
converter in the benchmarks, Transformers.js layouts). Tensors go into one safetensors file, in
canonical order, in the dtype asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from smolconvert.model.weights import canonical_names


def save_hf_folder(model: Any, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.spec.to_hf_config()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(k) is not None
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {n: model.weights.get(n).to(dtype).contiguous() for n in canonical_names(model.spec)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save(folder)
    return folder
