"""LiteRT schemes: how ai-edge-quantizer rewrites the converted .tflite's weights.

litert-torch converts the fp32 graph, then hands the flatbuffer to ai-edge-quantizer with a
recipe (litert_torch.generative.quantize): every op it supports (FULLY_CONNECTED, the embedding
lookup, BATCH_MATMUL with a constant operand) gets symmetric integer weights. Dynamic range:
activations are quantized to int8 per call by the kernel (XNNPACK's qd8 kernels), weights stay
integer in memory. A scheme is data; `quant_config` turns it into litert-torch's QuantConfig,
and `check_quantized` proves on the written file that no projection was left float.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from smolconvert.errors import UnsupportedError


@dataclass(frozen=True)
class LitertScheme:
    name: str
    bits: int | None  # None: fp32
    block_size: int | None  # None: one scale per output channel
    description: str

    @property
    def storage(self) -> str:
        if self.bits is None:
            return "fp32"
        return f"int{self.bits}_{f'b{self.block_size}' if self.block_size else 'channel'}"

    @property
    def bits_per_weight(self) -> float:
        if self.bits is None:
            return 32.0
        # one fp32 scale per block (ai-edge-quantizer's blockwise) or per output row
        return self.bits + (32 / self.block_size if self.block_size else 0.0)


SCHEMES: dict[str, LitertScheme] = {
    s.name: s
    for s in (
        LitertScheme("fp32", None, None, "fp32 weights and compute"),
        LitertScheme(
            "int8",
            8,
            None,
            "dynamic range: int8 weights per output channel, int8 activations per call "
            "(litert-torch's default dynamic_int8 recipe)",
        ),
        LitertScheme(
            "int4",
            4,
            32,
            "dynamic range: int4 weights per 32-block, int8 activations per call "
            "(litert-torch's dynamic_int4_block32 recipe)",
        ),
    )
}


def quant_config(scheme: LitertScheme) -> Any:
    """litert-torch's QuantConfig for the scheme (None for fp32): one recipe for every op
    ai-edge-quantizer supports."""
    if scheme.bits is None:
        return None
    from litert_torch.generative.quantize import quant_attrs, quant_recipes

    dtype = {8: quant_attrs.Dtype.INT8, 4: quant_attrs.Dtype.INT4}[scheme.bits]
    granularity = (
        getattr(quant_attrs.Granularity, f"BLOCKWISE_{scheme.block_size}")
        if scheme.block_size
        else quant_attrs.Granularity.CHANNELWISE
    )
    return quant_recipes.full_dynamic_recipe(weight_dtype=dtype, granularity=granularity)


FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16", "BFLOAT16", "FLOAT64"})


def check_quantized(
    scheme: LitertScheme,
    constants: list[tuple[tuple[int, ...], str]],
    linears: dict[str, tuple[int, int]],
) -> dict[str, str]:
    """Every projection of the model stored as the scheme's integers, judged from the written
    file's constant tensors ((shape, TensorType name), one per buffer). Returns canonical weight
    name -> storage type. The converter's tensor names are not the module's, so weights are
    matched by shape: for each (out, in) the file must hold at least as many integer constants
    as the model has linears of that shape, and no float one. Raises UnsupportedError naming
    the linears of any shape left float."""
    if scheme.bits is None:
        return dict.fromkeys((f"{n}.weight" for n in linears), "fp32")
    want = Counter(linears.values())
    ints: Counter[tuple[int, ...]] = Counter()
    floats: Counter[tuple[int, ...]] = Counter()
    for shape, dtype in constants:
        if shape in want:
            (floats if dtype in FLOAT_TYPES else ints)[shape] += 1
    bad = [s for s in want if floats[s] or ints[s] < want[s]]
    if bad:
        names = [n for n, s in linears.items() if s in bad]
        raise UnsupportedError(
            f"litert:{scheme.name}: ai-edge-quantizer left weights float; shapes "
            f"{', '.join(str(s) for s in bad)} ({', '.join(names[:6])}"
            f"{', ...' if len(names) > 6 else ''})"
        )
    return dict.fromkeys((f"{n}.weight" for n in linears), scheme.storage)
