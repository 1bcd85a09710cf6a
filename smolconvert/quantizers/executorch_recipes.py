"""ExecuTorch schemes: which torchao config each weight of the decoder gets.

ExecuTorch's XNNPACK backend runs what torchao's `quantize_` leaves in the graph: int8 dynamic
activations with 4-bit group weights (8da4w, XNNPACK's qd8-qb4w kernels) or int8 weights per
output channel. A scheme is data (frozen configs per role). `quantize_linears` turns it into
`quantize_` calls and then checks that every linear really was quantized, because torchao skips
a linear whose input width is not a multiple of the group size without a word. Embeddings are
not torchao's: ExecuTorch's PyPI runtime has no quantized embedding kernel, so their codes and
scales come from `embedding_codes` and the exporter gathers and scales them with plain ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smolconvert.errors import UnsupportedError


@dataclass(frozen=True)
class WeightConfig:
    bits: int  # 4 or 8
    group_size: int | None  # None: one scale per output channel
    dynamic_activations: bool  # int8 activations quantized per token at run time (linears only)

    @property
    def name(self) -> str:
        grain = f"g{self.group_size}" if self.group_size else "channel"
        return f"{'8da' if self.dynamic_activations else 'w'}{self.bits}_{grain}"

    @property
    def bits_per_weight(self) -> float:
        # an fp32 scale per group or per row (torchao keeps scales in the weight's dtype)
        return self.bits + (32 / self.group_size if self.group_size else 0.0)


@dataclass(frozen=True)
class ExecutorchScheme:
    name: str
    # every nn.Linear, the (untied) lm_head included; `codec`: the nbits codec whose levels
    # and scales replace torchao's rounding (GPTQ unless the gptq option is off)
    linear: WeightConfig | None
    embedding: WeightConfig | None  # the token embedding (our codes, gathered by plain ops)
    description: str
    codec: str | None = None
    # linears whose module name ends with the key take that config instead of `linear`, and
    # keep torchao's rounding (no codec of ours has one scale per row)
    overrides: tuple[tuple[str, WeightConfig], ...] = ()

    def config_for(self, module_name: str) -> WeightConfig | None:
        for suffix, cfg in self.overrides:
            if module_name.endswith(suffix):
                return cfg
        return self.linear


SCHEMES: dict[str, ExecutorchScheme] = {
    s.name: s
    for s in (
        ExecutorchScheme("fp32", None, None, "fp32 weights and compute"),
        ExecutorchScheme(
            "8da4w",
            WeightConfig(4, 32, True),
            WeightConfig(4, 32, False),
            "int8 dynamic activations, symmetric int4 weights per 32-block by GPTQ (XNNPACK "
            "qd8-f32-qb4w), down_proj int8 per output channel (qd8-f32-qc8w); the embedding "
            "gathers the same 4-bit blocks",
            codec="int4_b32_pos",
            # as ONNX int4: of all projections down_proj loses the most on text at 4 bits
            overrides=(("mlp.down_proj", WeightConfig(8, None, True)),),
        ),
        # Weight-only int8 (torchao IntxWeightOnlyConfig) lowers to XNNPACK without an error in
        # executorch 1.4 and computes garbage (max |logit error| 1556 on a tiny model); int8
        # weights with int8 dynamic activations is the path XNNPACK runs right (qd8-f32-qc8w).
        ExecutorchScheme(
            "int8",
            WeightConfig(8, None, True),
            WeightConfig(8, None, False),
            "int8 dynamic activations, int8 weights per output channel (XNNPACK qd8-f32-qc8w); "
            "int8 per-row embedding",
        ),
    )
}


def check_shapes(scheme: ExecutorchScheme, linears: dict[str, tuple[int, int]]) -> None:
    """Refuse, before any work, linears whose input width is not whole groups: torchao would
    leave them float. `linears`: module name -> (out, in)."""
    bad, group = [], 0
    for n, shape in linears.items():
        cfg = scheme.config_for(n)
        if cfg is not None and cfg.group_size and shape[1] % cfg.group_size:
            bad.append(f"{n} {shape}")
            group = cfg.group_size
    if bad:
        raise UnsupportedError(
            f"executorch:{scheme.name} quantizes in groups of {group} input columns; "
            f"these linears are not whole groups wide: {', '.join(bad)} (use executorch:int8)"
        )


def _torchao_config(cfg: WeightConfig) -> Any:
    import torch
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = {4: torch.int4, 8: torch.int8}[cfg.bits]  # type: ignore[attr-defined]
    granularity = PerGroup(cfg.group_size) if cfg.group_size else PerAxis(0)
    if cfg.dynamic_activations:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=granularity
        )
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def quantize_linears(module: Any, scheme: ExecutorchScheme) -> dict[str, str]:
    """Quantize every nn.Linear of `module` in place with torchao; returns module name -> storage
    type. Raises UnsupportedError naming every linear torchao left float."""
    import torch
    from torchao.quantization import quantize_

    def is_linear(m: Any, _name: str = "") -> bool:
        return isinstance(m, torch.nn.Linear)

    names = [n for n, m in module.named_modules() if is_linear(m)]
    configs = {n: scheme.config_for(n) for n in names}
    if all(cfg is None for cfg in configs.values()):
        return dict.fromkeys(names, "fp32")
    for cfg in dict.fromkeys(configs.values()):  # one quantize_ per distinct config
        if cfg is None:
            continue
        chosen = {n for n, c in configs.items() if c == cfg}

        def pick(m: Any, name: str, chosen: set[str] = chosen) -> bool:
            return is_linear(m) and name in chosen

        quantize_(module, _torchao_config(cfg), filter_fn=pick)
    plain = (torch.Tensor, torch.nn.Parameter)
    left = [
        n
        for n, m in module.named_modules()
        if is_linear(m) and configs[n] is not None and type(m.weight) in plain
    ]
    if left:
        raise UnsupportedError(
            f"executorch:{scheme.name}: torchao left these linears float: {', '.join(left)}"
        )
    return {n: cfg.name if cfg else "fp32" for n, cfg in configs.items()}


def embedding_codes(weight: Any, cfg: WeightConfig) -> tuple[Any, Any]:
    """Symmetric codes of an embedding table (V, d) as torchao maps linears (scale = max|w| /
    ((2^bits - 1) / 2), codes clamped to the signed range), and their scales: (uint8 (V, d) for
    8 bits stored as int8 + 128, or (V, d / 2) two 4-bit codes + 8 per byte, low nibble first;
    fp32 scales (V, groups))."""
    import torch

    v, d = weight.shape
    group = cfg.group_size or d
    w = weight.detach().float().reshape(v, d // group, group)
    qmin, qmax = -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1
    scale = w.abs().amax(-1) / ((qmax - qmin) / 2)  # (V, groups)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe[..., None]), qmin, qmax).reshape(v, d) - qmin
    q = q.to(torch.uint8)  # biased: 0 .. 2^bits - 1
    if cfg.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.contiguous(), scale.contiguous()
