"""One recipe vocabulary for every target: which codec each weight of a decoder gets.

A recipe is data: ordered rules, first match wins, over a weight's role and layer; a weight no
rule matches gets the recipe's default codec (None: it stays float). Roles are llama.cpp's tensor
roles, the names its quantizer's rules use: `token_embd`, `output` (lm_head, or the tied
embedding, which is stored once and read as both), `attn_q`, `attn_k`, `attn_v`, `attn_output`,
`ffn_gate`, `ffn_up`, `ffn_down`; 1-D weights (`norm`) never take a codec. Target-specific
settings (GGUF's file type, ONNX's accuracy level, Core ML's compute precision) live beside a
recipe in that target's scheme, never in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROLES = (
    "token_embd",
    "output",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)

# (layer index, layer count, n_heads // n_kv_heads) -> bool
When = Callable[[int, int, int], bool]


def always(i: int, n: int, gqa: int) -> bool:
    return True


def use_more_bits(i: int, n: int, gqa: int = 1) -> bool:
    """llama.cpp's `use_more_bits`: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def first_eighth(i: int, n: int, gqa: int) -> bool:
    return i < n // 8


def first_sixteenth(i: int, n: int, gqa: int) -> bool:
    return i < n // 16


def first(k: int) -> When:
    return lambda i, n, gqa: i < k


def gqa_at_least(k: int) -> When:
    return lambda i, n, gqa: gqa >= k


@dataclass(frozen=True)
class Rule:
    role: str  # one of ROLES
    codec: str | None  # a registered codec name; None keeps the weight float
    when: When = always
    needs_imatrix: bool = False  # applies only when quantizing with an importance matrix
    unless_imatrix: bool = False  # applies only when quantizing without one

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"rule role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.needs_imatrix and self.unless_imatrix:
            raise ValueError(f"rule for {self.role!r} cannot both need and exclude an imatrix")

    def applies(self, has_imatrix: bool) -> bool:
        """Whether the rule is in force when quantizing with (or without) an imatrix."""
        if self.needs_imatrix or self.unless_imatrix:
            return has_imatrix == self.needs_imatrix
        return True


@dataclass(frozen=True)
class Recipe:
    name: str
    default: str | None  # codec of every 2-D weight no rule matches; None keeps it float
    rules: tuple[Rule, ...] = ()

    def codec_for(
        self,
        role: str,
        layer: int | None = None,
        n_layers: int = 1,
        gqa: int = 1,
        has_imatrix: bool = False,
    ) -> str | None:
        """The codec of a weight in `role` (of `layer`, of `n_layers`): the first rule that
        matches, else the default; 1-D weights (`norm`) stay float."""
        if role == "norm":
            return None
        for rule in self.rules:
            if rule.role != role or not rule.applies(has_imatrix):
                continue
            if rule.when(layer if layer is not None else 0, n_layers, gqa):
                return rule.codec
        return self.default

    def codecs(self) -> set[str]:
        """Every codec this recipe can name."""
        named = {r.codec for r in self.rules} | {self.default}
        return {c for c in named if c is not None}


_LAYER_ROLES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def role_of(name: str, tied: bool) -> tuple[str, int | None]:
    """(role, layer) of a canonical tensor name; the tied embedding plays the output's role."""
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return "output", None
    if name == "model.embed_tokens.weight":
        return "token_embd", None
    parts = name.split(".")
    if len(parts) == 6 and parts[1] == "layers":  # model.layers.{i}.self_attn.q_proj.weight
        return _LAYER_ROLES.get(parts[4], "norm"), int(parts[2])
    return "norm", None
