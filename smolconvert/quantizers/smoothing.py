"""Activation smoothing for int8 dynamic-range kernels (SmoothQuant, Xiao et al. 2022).

A dynamic-range kernel rounds each token's activations to int8 with one scale per token, so a few
channels that are always large (SmolLM2 has them) take the whole range and the rest round to a
handful of levels. Dividing input channel j by s_j and multiplying the weight column j by s_j
leaves the float product unchanged and moves that range into the weights, which are quantized per
output channel and have room for it. With s_j = max|x_j|^a / max|w_j|^(1 - a) (a = `alpha`) the
two ranges meet halfway.

The division is folded into what produces the input, so the float model computes the same thing:
- q, k, v and gate, up: into the RMSNorm weight before them;
- down_proj: into up_proj's output rows (down's input is silu(gate) * up, linear in up);
- o_proj: into v_proj's output rows (attention output is linear in v), one factor per (KV head,
  channel) shared by the query heads that read that KV head.
The head is left alone: tied to the embedding, its columns cannot change without the embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ALPHA = 0.5


def activation_maxima(reference: Any, windows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """max |x_j| over the calibration windows of the input of every linear of the reference
    decoder, by module name (`model.layers.0.self_attn.q_proj`), fp32 (in_features,)."""
    import torch

    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x

        return hook

    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with torch.inference_mode():
            for w in windows:
                reference.logits(w)
    finally:
        for h in hooks:
            h.remove()
    return maxima


def smooth(reference: Any, maxima: dict[str, Any], alpha: float = ALPHA) -> int:
    """Rescale the reference decoder in place (module doc); the float function is unchanged up to
    rounding. Returns how many linears were smoothed."""
    import torch

    spec = reference.spec

    def factor(act: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """s from input maxima and weight-column maxima, kept within 100x either way"""
        s = act.clamp_min(1e-5) ** alpha / w.clamp_min(1e-5) ** (1 - alpha)
        return s.clamp(1e-2, 1e2)

    def factors(act: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return factor(act, torch.stack([x.abs().amax(0) for x in weights]).amax(0))

    done = 0
    with torch.no_grad():
        for i, layer in enumerate(reference.model.blocks()):
            p = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            s = factors(maxima[f"{p}.self_attn.q_proj"], *(m.weight for m in qkv))
            layer.input_layernorm.weight.div_(s)
            for m in qkv:
                m.weight.mul_(s)
            s = factors(maxima[f"{p}.mlp.gate_proj"], mlp.gate_proj.weight, mlp.up_proj.weight)
            layer.post_attention_layernorm.weight.div_(s)
            mlp.gate_proj.weight.mul_(s)
            mlp.up_proj.weight.mul_(s)
            s = factors(maxima[f"{p}.mlp.down_proj"], mlp.down_proj.weight)
            mlp.up_proj.weight.div_(s[:, None])
            mlp.down_proj.weight.mul_(s)
            # o_proj's input channel (head h, dim d) reads v's row (h // groups, d): one factor
            # per KV head channel, from the largest over the query heads that share it
            groups = spec.n_heads // spec.n_kv_heads
            act = maxima[f"{p}.self_attn.o_proj"].reshape(spec.n_kv_heads, groups, -1).amax(1)
            w = attn.o_proj.weight.abs().amax(0).reshape(spec.n_kv_heads, groups, -1).amax(1)
            s_kv = factor(act, w)
            attn.v_proj.weight.div_(s_kv.reshape(-1)[:, None])
            attn.o_proj.weight.mul_(s_kv[:, None, :].expand(-1, groups, -1).reshape(-1))
            done += 6
    return done
