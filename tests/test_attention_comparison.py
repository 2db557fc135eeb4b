"""Chapter 04's model comparison (navil_utils.analysis.attention_comparison): the locality statistic on constructed
layouts and rows, the statistics bundle's save/load round trip and difference, its plot, and the shipped
statistics of both encoder sizes against the embedded model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from navil_utils.analysis.attention import TokenLayout
from navil_utils.analysis.attention_claims import AttentionQuestion, BlankingResult
from navil_utils.analysis.attention_comparison import (
    LOCALITY_STATISTICS,
    AttentionStatistics,
    locality_table,
    max_difference,
    summarise_attention,
    visual_locality,
)
from navil_utils.analysis.attention_maps import match_geometry, scale_geometries
from navil_utils.analysis.attention_report import PromptAttention
from navil_utils.errors import CheckpointError, ConfigError
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import preprocess_multiscale

ROOT = Path(__file__).resolve().parents[1]
IDS = {"<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<IMG_LINE_BREAK>": 4, "<IMG_FRAME_BREAK>": 5}
BUDGET = dict(min_pixels=2048, max_pixels=16384)   # 131 x 77: 4 scales


def _layout():
    inputs = preprocess_multiscale(np.zeros((77, 131, 3), dtype=np.uint8), **BUDGET)
    ids = [10] * 3 + image_span_ids(inputs.grids_of(0), IDS, 2) + [11] * 4
    layout = TokenLayout.build(ids, inputs.image_grid_thw, IDS, merge_size=2, window_size=4)
    return layout, tuple(match_geometry(layout, 0, scale_geometries(inputs)))


def _causal(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.tril()
    return matrix / matrix.sum(1, keepdim=True)


def _slow_locality(matrix: torch.Tensor, layout: TokenLayout, min_keys: int = 4) -> np.ndarray:
    """The definition, one query at a time."""
    out = []
    visual = [p for p in range(len(layout)) if layout.kinds[p] == "visual"]
    for q in visual:
        keys = [k for k in visual if k <= q and int(layout.scale[k]) == int(layout.scale[q])]
        weights = np.array([float(matrix[q, k]) for k in keys])
        if len(keys) < min_keys or weights.sum() == 0:
            continue
        dist = np.array([math.dist((int(layout.row[q]), int(layout.col[q])), (int(layout.row[k]), int(layout.col[k])))
                         for k in keys])
        out.append((float((weights * dist).sum() / weights.sum()), float(dist.mean())))
    return np.array(out)


def test_locality_matches_its_definition_on_a_random_causal_matrix():
    layout, _ = _layout()
    assert len(set(layout.scale[layout.kind_mask("visual")].tolist())) >= 3
    matrix = _causal(torch.rand(len(layout), len(layout), generator=torch.Generator().manual_seed(0)) ** 3)
    fast = visual_locality(matrix, layout)
    slow = _slow_locality(matrix, layout)
    assert fast.shape == slow.shape and len(fast) > 10
    np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_uniform_attention_has_ratio_one_and_self_attention_distance_zero():
    layout, _ = _layout()
    size = len(layout)
    pairs = visual_locality(_causal(torch.ones(size, size)), layout)
    np.testing.assert_allclose(pairs[:, 0], pairs[:, 1], rtol=1e-12)          # uniform over the same keys
    assert (pairs[:, 1] > 0).all()
    pairs = visual_locality(torch.eye(size), layout)
    assert (pairs[:, 0] == 0).all() and (pairs[:, 1] > 0).all()


def test_locality_of_attention_to_the_farthest_key_exceeds_uniform():
    layout, _ = _layout()
    visual = torch.nonzero(layout.kind_mask("visual")).flatten().tolist()
    scale = int(layout.scale[visual[-1]])
    same = [p for p in visual if int(layout.scale[p]) == scale]
    query = same[-1]
    coords = [(int(layout.row[p]), int(layout.col[p])) for p in same]
    far = same[int(np.argmax([math.dist(coords[-1], c) for c in coords]))]
    matrix = torch.eye(len(layout))
    matrix[query] = 0
    matrix[query, far] = 1
    pairs = visual_locality(matrix, layout)
    attended, uniform = pairs[-1]
    assert attended == pytest.approx(max(math.dist(coords[-1], c) for c in coords))
    assert attended > uniform


def test_locality_rejects_a_matrix_of_the_wrong_size():
    layout, _ = _layout()
    with pytest.raises(ConfigError, match="does not fit"):
        visual_locality(torch.eye(len(layout) - 1), layout)


def _prompt(seed: int, layers: int = 2) -> PromptAttention:
    layout, geometry = _layout()
    size = len(layout)
    generator = torch.Generator().manual_seed(seed)
    llm = torch.stack([torch.stack([_causal(torch.rand(size, size, generator=generator) ** 4) for _ in range(2)])
                       for _ in range(layers)])                                   # (layers, heads, T, T)
    return PromptAttention(layout, geometry, llm, tuple("x" * size), torch.zeros(size, dtype=torch.long), "x")


def test_locality_table_averages_per_prompt_ratios():
    prompts = [_prompt(seed) for seed in range(5)]
    table = locality_table(prompts, n_boot=200)
    assert list(dict.fromkeys(table["statistic"])) == list(LOCALITY_STATISTICS)
    for layer in (0, 1):
        ratios = []
        for prompt in prompts:
            attended, uniform = visual_locality(prompt.matrix(layer), prompt.layout).mean(0)
            ratios.append(attended / uniform)
        row = table[(table["layer"] == layer) & (table["statistic"] == "distance_ratio")].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(ratios)) and row["n"] == 5
        assert row["low"] <= row["mean"] <= row["high"]
    with pytest.raises(ConfigError, match="no prompts"):
        locality_table([])


def _statistics(label: str = "model A", seed: int = 0) -> AttentionStatistics:
    prompts = [_prompt(seed + k) for k in range(4)]
    layout, geometry = prompts[0].layout, prompts[0].geometry
    box = (20.0, 10.0, 60.0, 40.0)
    questions = [AttentionQuestion(p.layout, p.geometry, {layer: p.row(layer) for layer in range(2)}, box, 0, k)
                 for k, p in enumerate(prompts)]
    records = pd.DataFrame({"question": range(4), "index": range(4), "answer": ["red"] * 4,
                            **{f"{c}_prediction": ["red"] * 4 for c in ("intact", "inside_blanked", "outside_blanked")},
                            "intact_correct": [True, True, False, True], "inside_blanked_correct": [False] * 4,
                            "outside_blanked_correct": [True, False, False, True], "inside_tokens": [2] * 4,
                            "outside_tokens": [2] * 4, "matched": [True] * 4})
    del layout, geometry
    return summarise_attention(label, questions, BlankingResult(records), prompts, prompts[0],
                               groups=["color", "count", "color", "count"], n_boot=100, meta={"note": "test"})


def test_statistics_hold_every_table_and_the_example_matrices():
    stats = _statistics()
    assert stats.example.shape == (2, len(stats.example_kinds), len(stats.example_kinds))
    assert set(stats.pointing["scale"]) == {"all"}
    overall = stats.blanking[stats.blanking["group"] == "overall"].set_index("condition")["accuracy"]
    assert overall.to_dict() == {"intact": 0.75, "inside_blanked": 0.0, "outside_blanked": 0.5}
    summary = stats.summary()
    assert list(summary.index) == [0, 1] and not summary.isna().any().any()


def test_statistics_round_trip_through_files(tmp_path):
    stats = _statistics()
    stats.save(tmp_path / "a")
    loaded = AttentionStatistics.load(tmp_path / "a")
    assert loaded.label == "model A" and loaded.meta == {"note": "test"}
    assert loaded.example_kinds == stats.example_kinds
    assert max_difference(stats, loaded) < 1e-5                          # csv keeps 6 significant digits
    for name, table in stats.tables().items():
        pd.testing.assert_frame_equal(loaded.tables()[name], table, check_exact=False, rtol=1e-5, atol=1e-7,
                                      check_dtype=False)
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["label"] == "model A"


def test_max_difference_sees_changed_values_and_layouts(tmp_path):
    stats, other = _statistics(), _statistics()
    assert max_difference(stats, other) == 0.0
    other.locality.loc[2, "mean"] += 0.25
    assert max_difference(stats, other) == pytest.approx(0.25)
    other = _statistics()
    other.example_kinds = other.example_kinds[:-1] + ("padding",)
    assert max_difference(stats, other) == float("inf")
    assert max_difference(stats, _statistics(seed=7)) > 1e-3


def test_loading_names_missing_files(tmp_path):
    _statistics().save(tmp_path / "a")
    (tmp_path / "a" / "example_attention.safetensors").unlink()
    with pytest.raises(CheckpointError, match="example_attention.safetensors"):
        AttentionStatistics.load(tmp_path / "a")


def test_comparison_plot_has_four_labelled_panels():
    import matplotlib.pyplot as plt

    from navil_utils.plotting.attention import plot_attention_comparison, plot_token_attention

    a, b = _statistics("A"), _statistics("B", seed=3)
    fig = plot_attention_comparison([a, b])
    assert len(fig.axes) == 4 and all(ax.get_ylabel() for ax in fig.axes)
    assert "A vs B" in fig._suptitle.get_text()
    plt.close(fig)
    layout = _prompt(0).layout
    fig = plot_token_attention(list(a.example) + list(b.example), layout, labels=list("abcd"), ncols=2)
    panels = [ax for ax in fig.axes if ax.get_title() in list("abcd")]
    assert len(panels) == 4 and len({ax.get_subplotspec().rowspan.start for ax in panels}) == 2
    plt.close(fig)
    with pytest.raises(ConfigError):
        plot_attention_comparison([])


# ---------------------------------------------------------------------------------------------------
# the shipped statistics

SHIPPED = ROOT / "data" / "attention"


def test_shipped_statistics_of_the_embedded_model_reproduce_its_example_prompt():
    import navil_utils
    from navil_utils.analysis.attention_report import record_prompt
    from navil_utils.tiny.synthetic import SyntheticVQA

    stats = AttentionStatistics.load(SHIPPED / "navil-tiny")
    model, tokenizer = navil_utils.load_chat_model(ROOT / "data" / "models" / "navil-tiny")
    sample = SyntheticVQA(stats.meta["data_seed"]).sample(stats.meta["example_index"])
    with torch.inference_mode():
        prompt = record_prompt(model, tokenizer, sample.image, sample.question, vit=False)
    assert stats.example_kinds == tuple(prompt.layout.kinds)
    fresh = torch.stack([prompt.matrix(layer) for layer in range(prompt.num_layers)])
    torch.testing.assert_close(stats.example, fresh, atol=1e-6, rtol=0)
    assert stats.meta["encoder_parameters"] == sum(p.numel() for p in model.vision_model.parameters())


def test_require_names_every_mismatched_setting_and_the_table_sits_side_by_side():
    from navil_utils.analysis.attention_comparison import comparison_table

    stats = _statistics()
    stats.meta.update(data_seed=123, n_questions=400)
    stats.require(data_seed=123, n_questions=400)
    with pytest.raises(ConfigError, match=r"data_seed=123 \(wanted 5\).*n_questions=400 \(wanted 8\)"):
        stats.require(data_seed=5, n_questions=8)
    table = comparison_table([stats, _statistics("model B", seed=2)])
    assert list(table.columns.get_level_values(0).unique()) == ["model A", "model B"]
    assert table.shape == (2, 8)


def test_models_overview_reads_the_encoder_and_blanking_accuracy():
    from navil_utils.analysis.attention_comparison import models_overview

    stats = _statistics()
    stats.meta.update(vit_layers=2, vit_width=56, vit_heads=2, encoder_parameters=119_784, total_parameters=3_000_000)
    table = models_overview([stats])
    row = table.loc["model A"]
    assert row["ViT layers x width"] == "2 x 56" and row["encoder parameters"] == "119,784"
    assert row["exact match, intact"] == 0.75 and row["exact match, inside blanked"] == 0.0
    with pytest.raises(KeyError):
        models_overview([_statistics()])                      # no encoder recorded in meta


def test_shipped_small_encoder_statistics_share_the_questions_and_prompt_layout():
    large = AttentionStatistics.load(SHIPPED / "navil-tiny-gen1")             # the same (first-generation) recipe
    small = AttentionStatistics.load(SHIPPED / "navil-tiny-small-encoder")
    for key in ("data_seed", "n_questions", "example_index", "locality_questions", "n_boot", "seed"):
        assert small.meta[key] == large.meta[key], key
    assert small.example_kinds == large.example_kinds
    assert (small.meta["vit_layers"], small.meta["vit_width"]) == (2, 56)
    assert small.meta["encoder_parameters"] == 119_784 and large.meta["encoder_parameters"] == 891_520
    embedded = AttentionStatistics.load(SHIPPED / "navil-tiny")                 # same questions, own example
    for key in ("data_seed", "n_questions", "locality_questions", "n_boot", "seed"):
        assert embedded.meta[key] == large.meta[key], key
    # the answer-query uniform baseline depends only on the prompts, which both models share
    pd.testing.assert_frame_equal(large.visual_share[large.visual_share["statistic"] == "visual_uniform"],
                                  small.visual_share[small.visual_share["statistic"] == "visual_uniform"])
    # rows of the example's matrices are probability distributions over earlier positions
    sums = small.example.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert float(small.example.triu(1).abs().max()) == 0.0
