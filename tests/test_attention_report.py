"""Chapter 04's aggregations (navil_utils.analysis.attention_report): token blocks of a prompt, per-layer and
per-group tables with bootstrap intervals, sinks, blanking per group — on constructed layouts and rows, plus one
smoke test of ``record_prompt`` on the embedded tiny model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from navil_utils.analysis.attention import TokenLayout
from navil_utils.analysis.attention_claims import (
    AttentionQuestion,
    BlankingResult,
    attention_share,
    attention_sinks,
    pointing_table,
)
from navil_utils.analysis.attention_maps import scale_geometries
from navil_utils.analysis.attention_report import (
    SHARE_STATISTICS,
    answer_share_table,
    blanking_summary,
    box_centre_patches,
    grouped_pointing_summary,
    layout_table,
    pointing_by_group,
    pointing_by_layer,
    scale_roles,
    sink_pointing_summary,
    token_blocks,
    token_labels,
    top_visual_tokens,
    wide,
)
from navil_utils.errors import ConfigError, ModelInputError
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import preprocess_multiscale

IDS = {"<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<IMG_LINE_BREAK>": 4, "<IMG_FRAME_BREAK>": 5}
BUDGET = dict(min_pixels=2048, max_pixels=16384)   # 131 x 77: 4 scales


def _prompt(height: int = 77, width: int = 131, *, pad: int = 0, before: int = 3, after: int = 4):
    inputs = preprocess_multiscale(np.zeros((height, width, 3), dtype=np.uint8), **BUDGET)
    ids = [0] * pad + [10] * before + image_span_ids(inputs.grids_of(0), IDS, 2) + [11] * after
    mask = [0] * pad + [1] * (len(ids) - pad)
    layout = TokenLayout.build(ids, inputs.image_grid_thw, IDS, merge_size=2, window_size=4, attention_mask=mask)
    return layout, scale_geometries(inputs)


def _question(box, rows: dict[int, torch.Tensor] | None = None, *, index: int = 0, pad: int = 0, height: int = 77,
              width: int = 131, seed: int = 0) -> AttentionQuestion:
    layout, geometry = _prompt(height, width, pad=pad)
    if rows is None:  # random rows over the real (non-padding) keys, two layers
        generator = torch.Generator().manual_seed(seed)
        real = ~layout.kind_mask("padding")
        rows = {}
        for layer in (0, 1):
            row = torch.rand(len(layout), generator=generator) ** 4 * real
            rows[layer] = row / row.sum()
    return AttentionQuestion(layout, geometry, rows, box, 0, index)


# ---------------------------------------------------------------------------------------------------
# blocks


def test_token_blocks_partition_the_prompt_into_text_markers_and_scales():
    layout, geometry = _prompt(pad=2)
    blocks = token_blocks(layout)
    assert [b.label for b in blocks] == ["padding", "text", "<img>"] + [f"scale {g.scale}" for g in geometry] + [
        "</img>", "text"]
    assert blocks[0].start == 0 and blocks[-1].end == len(layout)
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    for block, geo in zip([b for b in blocks if b.kind == "scale"], geometry):
        kinds = layout.kinds[block.start:block.end]
        assert block.grid == (geo.rows, geo.cols)
        assert kinds.count("visual") == geo.rows * geo.cols and kinds.count("line_break") == geo.rows
        assert kinds[-1] == "frame_break" and kinds.count("frame_break") == 1
    table = layout_table(layout)
    assert list(table["block"]) == [b.label for b in blocks] + ["total"]
    total = table.iloc[-1]
    assert total["tokens"] == len(layout) == table["tokens"].iloc[:-1].sum()
    assert total["visual"] == sum(g.rows * g.cols for g in geometry)
    assert table.iloc[3]["grid"] == f"{geometry[0].rows}×{geometry[0].cols}"
    labels = token_labels(layout, [f"t{p}" for p in range(len(layout))])
    first_visual = int(layout.positions("visual")[0])
    assert labels[first_visual].startswith(f"{first_visual} visual · scale 0 (")
    assert labels[2] == "2 text 't2'"
    with pytest.raises(ModelInputError):
        token_labels(layout, ["x"])


def test_box_centre_patches_lie_under_the_box_centre():
    _, geometry = _prompt()
    box = (60, 20, 90, 50)
    for (scale, row, col), geo in zip(box_centre_patches(geometry, box, 2), geometry):
        x0, y0, x1, y1 = geo.at_patches(2).cell_box(row, col)
        assert scale == geo.scale and x0 <= 75 < x1 and y0 <= 35 < y1
    corner = box_centre_patches(geometry, (0, 0, 1, 1), 2)
    assert all((row, col) == (0, 0) for _, row, col in corner)


# ---------------------------------------------------------------------------------------------------
# statistics


def test_answer_share_table_matches_attention_share_per_question():
    questions = [_question((10, 10, 50, 40), index=i, seed=i, pad=i) for i in range(6)]
    table = answer_share_table(questions, n_boot=200)
    assert list(dict.fromkeys(table["statistic"])) == list(SHARE_STATISTICS)
    assert sorted(set(table["layer"])) == [0, 1] and (table["n"] == 6).all()
    for layer in (0, 1):
        visual, uniform = [], []
        for q in questions:
            shares = attention_share(q.rows[layer][None, None], torch.tensor([len(q.layout) - 1]), q.layout)
            visual.append(float(shares["visual"][0, 0]))
            uniform.append(float(shares["visual_uniform"][0]))
        here = table[table["layer"] == layer].set_index("statistic")
        assert here.loc["visual", "mean"] == pytest.approx(np.mean(visual))
        assert here.loc["visual_uniform", "mean"] == pytest.approx(np.mean(uniform))
        assert here.loc["visual - uniform", "mean"] == pytest.approx(np.mean(visual) - np.mean(uniform))
        parts = here.loc[["visual", "text", "markers"], "mean"].sum()
        assert parts == pytest.approx(1.0)
        assert (here["low"] <= here["mean"] + 1e-12).all() and (here["mean"] <= here["high"] + 1e-12).all()


def test_pointing_by_layer_roles_and_groups():
    questions = [_question((10 + i, 10, 60 + i, 50), index=i, seed=i) for i in range(6)]
    single = _question((0, 0, 40, 40), index=6, seed=6, height=64, width=64)
    questions.append(single)
    table = pointing_by_layer(questions)
    assert sorted(set(table["layer"])) == [0, 1]
    pd.testing.assert_frame_equal(table[table["layer"] == 1].reset_index(drop=True), pointing_table(questions, 1))
    roles = scale_roles(table)
    scales_of = {q: len(questions[q].geometry) for q in range(len(questions))}
    for role, question, scale in zip(roles, table["question"], table["scale"]):
        if scale == "all":
            assert role == "all"
        elif scales_of[question] == 1:
            assert role == "only"
        else:
            expected = "smallest" if scale == 0 else "largest" if scale == scales_of[question] - 1 else "middle"
            assert role == expected
    assert scales_of[6] == 1 and scales_of[0] == 4

    # groups: shuffled boxes come from the same group
    groups = ["a", "b", "a", "b", "a", "b", "a"]
    grouped = pointing_by_group(questions, groups, layers=[0])
    assert set(grouped["group"]) == {"a", "b"} and len(grouped) == len(pointing_table(questions, 0))
    members_a = [0, 2, 4, 6]
    direct = pointing_table([questions[q] for q in members_a], 0)
    mine = grouped[grouped["group"] == "a"]
    assert list(mine["question"].drop_duplicates()) == members_a
    np.testing.assert_allclose(mine["shuffled"].to_numpy(float), direct["shuffled"].to_numpy(float))
    summary = grouped_pointing_summary(grouped[grouped["scale"] == "all"], "group", n_boot=100)
    assert list(dict.fromkeys(summary["group"])) == ["a", "b"]
    assert set(summary[summary["group"] == "a"]["n"]) == {4}
    with pytest.raises(ConfigError, match="no column"):
        grouped_pointing_summary(table, "qtype")
    with pytest.raises(ModelInputError):
        pointing_by_group(questions, ["a"])


def test_sink_summary_agrees_with_attention_sinks():
    questions = [_question((20, 5, 100, 60), index=i, seed=10 + i, pad=i % 2) for i in range(5)]
    summary = sink_pointing_summary(questions, k=3, n_boot=100)
    reference = attention_sinks(questions, k=3).set_index("layer")
    for layer in (0, 1):
        here = summary[summary["layer"] == layer].set_index("statistic")
        assert here.loc["attention", "mean"] == pytest.approx(reference.loc[layer, "pointing"])
        assert here.loc["attention without sinks", "mean"] == pytest.approx(reference.loc[layer,
                                                                                          "pointing_without_sinks"])
        assert here.loc["uniform without sinks", "mean"] == pytest.approx(reference.loc[layer,
                                                                                        "uniform_without_sinks"])
        assert here.loc["sink mass", "mean"] == pytest.approx(reference.loc[layer, "topk_mass"])
    top = top_visual_tokens(questions[0], 0, 3)
    row = questions[0].rows[0]
    visual = questions[0].layout.kind_mask("visual")
    assert set(top.tolist()) == set(torch.topk(torch.where(visual, row, -1.0), 3).indices.tolist())
    with pytest.raises(ConfigError):
        sink_pointing_summary(questions, k=0)


def test_blanking_summary_per_group_and_wide_tables():
    records = pd.DataFrame({"question": range(6), "intact_correct": [1, 1, 1, 0, 1, 0],
                            "inside_blanked_correct": [0, 0, 1, 0, 0, 0],
                            "outside_blanked_correct": [1, 1, 1, 0, 0, 0]})
    result = BlankingResult(records)
    summary = blanking_summary(result, groups=["x", "x", "x", "y", "y", "y"], n_boot=100)
    assert list(dict.fromkeys(summary["group"])) == ["overall", "x", "y"]
    accuracy = summary.set_index(["group", "condition"])["accuracy"]
    assert accuracy["overall", "intact"] == pytest.approx(4 / 6) and accuracy["x", "intact"] == 1.0
    assert accuracy["y", "inside_blanked"] == 0.0 and accuracy["x", "outside_blanked"] == 1.0
    assert list(summary.drop_duplicates("group")["n"]) == [6, 3, 3]
    table = wide(summary, "group", columns="condition")
    assert list(table.index) == ["overall", "x", "y"]
    assert list(table.columns) == ["intact", "inside_blanked", "outside_blanked"]
    assert table.loc["x", "intact"] == "1.000 [1.000, 1.000]"


# ---------------------------------------------------------------------------------------------------
# the embedded tiny model


def test_record_prompt_on_the_tiny_model():
    from navil_utils.analysis.attention_claims import collect_answer_attention
    from navil_utils.analysis.attention_report import record_prompt
    from navil_utils.chatting import chat, load_chat_model
    from navil_utils.tiny.synthetic import SyntheticVQA

    model, tokenizer = load_chat_model("data/models/navil-tiny")
    model.eval()
    sample = SyntheticVQA(seed=1234).sample(3)
    prompt = record_prompt(model, tokenizer, sample.image, sample.question)
    layers, heads = model.config.llm_config.num_hidden_layers, model.config.llm_config.num_attention_heads
    size = len(prompt.layout)
    assert prompt.llm.shape == (layers, heads, size, size) and len(prompt.tokens) == size
    torch.testing.assert_close(prompt.llm.sum(-1), torch.ones(layers, heads, size), atol=1e-4, rtol=0)
    assert float(torch.triu(prompt.llm, diagonal=1).abs().max()) == 0.0            # causal
    assert prompt.tokens[prompt.layout.positions("img_start")[0]] == "<img>"
    answer, _ = chat(model, tokenizer, sample.image, sample.question)
    assert answer.startswith(prompt.next_token.strip())
    # the answer row is the one collect_answer_attention records
    collected = collect_answer_attention(model, tokenizer, [sample.image], [sample.question], [sample.evidence_box])
    for layer in range(layers):
        torch.testing.assert_close(prompt.row(layer), collected[0].rows[layer], atol=1e-5, rtol=0)
    maps = prompt.maps(layers - 1)
    assert [m.scale for m in maps] == [g.scale for g in prompt.geometry]
    visual = prompt.layout.kind_mask("visual")
    assert sum(float(m.mass) for m in maps) == pytest.approx(float(prompt.row(layers - 1)[visual].sum()), abs=1e-5)
    patches = box_centre_patches(prompt.geometry, sample.evidence_box, prompt.layout.merge_size)
    vit = prompt.vit_maps(patches[-1])
    assert sorted(vit) == list(range(model.config.vision_config.num_hidden_layers))
    assert all(m.query == patches[-1][1:] for m in vit.values())
    rollout = prompt.rollout(patches)
    assert [r.query for r in rollout] == [p[1:] for p in patches]
    for r in rollout:
        assert float(r.values.sum()) == pytest.approx(1.0, abs=1e-6)
    without = dataclasses.replace(prompt, recorder=None)
    with pytest.raises(ConfigError, match="without the ViT"):
        without.vit_maps(patches[-1])
