"""The architecture schematic draws the numbers of the config it is given (not fixed text)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import navil_utils  # noqa: E402
from navil_utils.plotting.architecture import architecture_labels, plot_architecture  # noqa: E402


def _drawn_text(ax) -> str:
    return "\n".join([t.get_text() for t in ax.texts] + [ax.get_title()])


@pytest.mark.parametrize("make, expected", [
    (navil_utils.navil_2b_config,
     ["24 layers × 1472", "23 heads, 2-D RoPE", "MLP 5888", "Conv2d 16×16", "3 → 1472", "2×2 pixel",
      "1472 → 5888 ch", "5888 → 2048", "LLM: InternLM2-VE", "24 layers × 2048", "16 heads (8 KV)", "FFN 8192",
      "× 24 layers", "vocab 92,556", "5 scales", "6320 patches", "6320 → 1580", "1580 visual tokens",
      "5: 768×1024 → 48×64", "1: 224×320 → 14×20"]),
    (navil_utils.navil_9b_config,
     ["32 layers × 1792", "28 heads, 2-D RoPE", "MLP 7168", "3 → 1792", "1792 → 7168 ch", "7168 → 4096",
      "LLM: Qwen3-VE", "36 layers × 4096", "32 heads (8 KV)", "FFN 12288", "× 36 layers", "vocab 151,936",
      "1580 visual tokens"]),
])
def test_labels_carry_the_config_numbers(make, expected):
    config = make()
    fig, ax = plt.subplots(figsize=(12, 5))
    assert plot_architecture(config, image_size=(768, 1024), ax=ax) is ax
    text = _drawn_text(ax)
    for label in expected:
        assert label in text, label
    assert "text\nexpert" in text and "visual\nexpert" in text
    plt.close(fig)


def test_small_config_draws_its_own_numbers_and_dense_ablation():
    config = navil_utils.navil_2b_config(
        vision_config={"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 4,
                       "intermediate_size": 200, "patch_size": 14},
        llm_config={"architectures": ["Qwen3VEForCausalLM"], "num_hidden_layers": 5, "hidden_size": 64,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 130,
                    "vocab_size": 500, "visual_experts": False},
        min_dynamic_patch=4, max_dynamic_patch=64)
    labels = architecture_labels(config, (100, 300))
    assert (labels.vit_layers, labels.vit_width, labels.llm_layers, labels.llm_width) == (3, 96, 5, 64)
    assert labels.visual_tokens == sum(s.visual_tokens for s in labels.scales)
    fig, ax = plt.subplots()
    plot_architecture(config, image_size=(100, 300), ax=ax)
    text = _drawn_text(ax)
    for label in ["3 layers × 96", "4 heads, 2-D RoPE", "Conv2d 14×14", "5 layers × 64", "4 heads (2 KV)",
                  "FFN 130", "vocab 500", "96 → 384 ch", "384 → 64", "100×300 px", "dense FFN",
                  f"{labels.visual_tokens} visual tokens", f"{len(labels.scales)} scale"]:
        assert label in text, label
    assert "visual\nexpert" not in text
    plt.close(fig)
