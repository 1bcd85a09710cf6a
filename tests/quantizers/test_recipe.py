"""Recipes: first-match rules, and the rules that hold only with (or only without) an imatrix."""

from __future__ import annotations

import pytest

from smolconvert.quantizers.recipe import Recipe, Rule, first_eighth


def test_imatrix_flags_choose_between_rules() -> None:
    recipe = Recipe(
        "r",
        "iq4_nl",
        (
            Rule("ffn_down", "q4_1", first_eighth, needs_imatrix=True),
            Rule("ffn_down", "q5_k", first_eighth, unless_imatrix=True),
        ),
    )
    assert recipe.codec_for("ffn_down", 0, 8, has_imatrix=True) == "q4_1"
    assert recipe.codec_for("ffn_down", 0, 8, has_imatrix=False) == "q5_k"
    assert recipe.codec_for("ffn_down", 1, 8, has_imatrix=False) == "iq4_nl"
    assert recipe.codec_for("attn_v", 0, 8, has_imatrix=True) == "iq4_nl"


def test_a_rule_cannot_need_and_exclude_an_imatrix() -> None:
    with pytest.raises(ValueError, match="both need and exclude"):
        Rule("ffn_down", "q5_k", needs_imatrix=True, unless_imatrix=True)
