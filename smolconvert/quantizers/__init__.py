"""Pure quantizers for every target: codecs, recipes, and the searches they use.

`CODECS` (quantizers/registry.py) maps every codec's public name to a `Codec` (quantizers/codec.py),
whatever family packs it; `recipe` is the one Rule/Recipe vocabulary that says which weight gets
which codec, with each family's schemes in `gguf_recipes`, `onnx_recipes` and `coreml_recipes`.
GPTQ (`gptq`), llama.cpp's scale searches (`scale_search`) and k-means (`kmeans`) are methods any
codec may use. Imports nothing of smolconvert but its errors (and the reference decoder, which GPTQ
runs on calibration text).
"""

from __future__ import annotations

from smolconvert.quantizers.codec import Codec
from smolconvert.quantizers.registry import CODECS, get_codec

__all__ = ["CODECS", "Codec", "get_codec"]
