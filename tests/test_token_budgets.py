"""Encoder-side cost of an image: ViT tokens × encoder size (NaViL multi-scale vs NVLM-D tiles)."""
from __future__ import annotations

import pytest

import navil_utils
from navil_utils.analysis.token_budgets import (
    ENCODER_PARAMS,
    NVLM_VIT_TOKENS_PER_TILE,
    encoder_cost_table,
    encoder_flops,
    token_budget_table,
)


def test_encoder_flops_is_two_params_per_token():
    assert encoder_flops(0.6e9, 1000) == 1.2e12
    assert encoder_flops(5.5e9, 1025) == pytest.approx(1.1275e13)
    with pytest.raises(ValueError):
        encoder_flops(-1, 3)


def test_encoder_cost_table_vga_by_hand():
    # 640x480 at NaViL's defaults: 3 scales, 553 visual tokens = 2212 patches (4 per merged token);
    # NVLM-D: 6 tiles + thumbnail = 7 tiles of 1025 InternViT tokens.
    row = encoder_cost_table([(480, 640)]).iloc[0]
    assert row["navil_patches"] == 2212
    assert row["nvlm_tiles"] == 7 and row["nvlm_vit_tokens"] == 7 * 1025 == 7175
    assert row["NaViL-2B_encoder_tflops"] == pytest.approx(2 * 0.6e9 * 2212 / 1e12)  # 2.6544
    assert row["NaViL-9B_encoder_tflops"] == pytest.approx(2 * 1.2e9 * 2212 / 1e12)  # 5.3088
    assert row["NVLM-D-72B_encoder_tflops"] == pytest.approx(2 * 5.5e9 * 7175 / 1e12)  # 78.925
    assert ENCODER_PARAMS == {"NaViL-2B": 0.6e9, "NaViL-9B": 1.2e9, "NVLM-D-72B": 5.5e9}
    assert NVLM_VIT_TOKENS_PER_TILE == 1025


def test_encoder_patches_are_four_per_visual_token_over_all_scales():
    sizes = [(1080, 1920), (2000, 500), (3000, 4000), (100, 100)]
    costs = encoder_cost_table(sizes, encoder_params={"NaViL-x": 1e9, "other": 2e9})
    tokens = token_budget_table(sizes)
    assert (costs["navil_patches"] == 4 * tokens["navil_visual_tokens"]).all()
    assert (costs["nvlm_tiles"] == tokens["nvlm_tiles"]).all()
    assert list(costs.columns[-2:]) == ["NaViL-x_encoder_tflops", "other_encoder_tflops"]
    assert costs["other_encoder_tflops"].tolist() == pytest.approx((4e9 * costs["nvlm_vit_tokens"] / 1e12).tolist())
    assert navil_utils.encoder_cost_table is encoder_cost_table
