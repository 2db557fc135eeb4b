"""Tests of the inference chapter's helpers: accuracy and chance levels (analysis), gallery/ablation figures (plotting), speed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from PIL import Image  # noqa: E402

import navil_utils  # noqa: E402
from navil_utils.analysis.accuracy import (  # noqa: E402
    accuracy_frame,
    accuracy_table,
    answer_space_size,
    chance_levels,
)
from navil_utils.analysis.speed import compare_kv_cache, measure_generation_speed, speed_frame  # noqa: E402
from navil_utils.errors import ConfigError  # noqa: E402
from navil_utils.plotting.evaluation import (  # noqa: E402
    OUTCOME_COLOURS,
    GalleryItem,
    plot_image_answers,
    plot_qa_gallery,
    plot_scale_ablation,
    success_failure_items,
)
from navil_utils.reference.fixtures import golden_dir  # noqa: E402
from navil_utils.tiny.synthetic import SyntheticVQA  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def record(index, qtype, correct, prediction="p"):
    return {"index": index, "qtype": qtype, "correct": correct, "prediction": prediction}


# --------------------------------------------------------------------------------------------- chance
def test_answer_space_sizes_follow_the_task_config():
    data = SyntheticVQA(0)
    sizes = {t: answer_space_size(data, t) for t in
             ("color", "count_color", "count_kind", "count_all", "position_kind", "position_region", "relation")}
    assert sizes == {"color": 6, "count_color": 5, "count_kind": 5, "count_all": 5, "position_kind": 5,
                     "position_region": 5, "relation": 2}
    assert answer_space_size(data, "text") == 16**2 + 16**3 + 16**4
    small = SyntheticVQA(0, colors=("red", "blue", "green"), count_range=(0, 2), text_length_range=(1, 1))
    assert answer_space_size(small, "color") == 3
    assert answer_space_size(small, "count_all") == 3
    assert answer_space_size(small, "text") == 16
    with pytest.raises(ConfigError, match="caption"):
        answer_space_size(data, "caption")


def test_chance_levels_average_over_the_evaluated_subtypes():
    data = SyntheticVQA(0, colors=("red", "blue", "green", "yellow"))  # 4 colours -> colour chance 1/4
    samples = [SimpleNamespace(qtype="position", template="position_kind"),  # 5 kinds
               SimpleNamespace(qtype="position", template="position_region"),  # 5 regions
               SimpleNamespace(qtype="relation", template="relation"),
               SimpleNamespace(qtype="color", template="color")]
    assert chance_levels(samples, data) == pytest.approx(
        {"color": 0.25, "position": 0.2, "relation": 0.5, "overall": (0.25 + 0.2 + 0.2 + 0.5) / 4})
    with pytest.raises(ConfigError):
        chance_levels([], data)


def test_chance_level_matches_a_constant_guess_on_real_samples():
    """Answers are drawn uniformly, so always answering one valid answer hits chance (within 4 s.e.)."""
    data = SyntheticVQA(99, question_types=("color", "relation"))
    samples = [data.sample(i) for i in range(1200)]
    chance = chance_levels(samples, data)
    for qtype, guess in (("color", "red"), ("relation", "yes")):
        hits = [s.answer == guess for s in samples if s.qtype == qtype]
        se = math.sqrt(chance[qtype] * (1 - chance[qtype]) / len(hits))
        assert abs(np.mean(hits) - chance[qtype]) < 4 * se


# ------------------------------------------------------------------------------------------- tables
def test_accuracy_frame_counts_and_standard_errors():
    results = {"all": [record(0, "color", True), record(1, "color", False), record(2, "count", True),
                       record(3, "count", True)],
               "largest": [record(0, "color", False), record(1, "color", False), record(2, "count", True),
                           record(3, "count", False)]}
    frame = accuracy_frame(results, qtypes=["count", "color"])
    assert list(frame["qtype"]) == ["count", "color", "overall"] * 2
    row = frame.set_index(["scales", "qtype"])
    assert row.loc[("all", "color"), "accuracy"] == 0.5
    assert row.loc[("all", "color"), "stderr"] == pytest.approx(math.sqrt(0.25 / 2))
    assert row.loc[("all", "overall"), ["n", "correct"]].tolist() == [4, 3]
    assert row.loc[("largest", "count"), "accuracy"] == 0.5
    assert row.loc[("largest", "color"), "stderr"] == 0.0
    kept = accuracy_frame(results, keep=[2, 3], qtypes=["color", "count"]).set_index(["scales", "qtype"])
    assert kept.loc[("all", "color"), "n"] == 0 and math.isnan(kept.loc[("all", "color"), "accuracy"])
    assert kept.loc[("largest", "overall"), "accuracy"] == 0.5


def test_accuracy_frame_accepts_eval_results_and_rejects_junk():
    result = SimpleNamespace(records=[record(0, "text", False), record(1, "text", True)])
    frame = accuracy_frame({"all": result})
    assert frame["accuracy"].tolist() == [0.5, 0.5]
    with pytest.raises(ConfigError):
        accuracy_frame({})
    with pytest.raises(ConfigError):
        accuracy_frame({"all": 3})


def test_accuracy_table_is_wide_with_chance():
    frame = accuracy_frame({"all": [record(0, "color", True), record(1, "count", False)],
                                      "smallest": [record(0, "color", False), record(1, "count", False)]})
    table = accuracy_table(frame, {"color": 1 / 6, "count": 0.2})
    assert list(table.columns) == ["n", "accuracy (all)", "accuracy (smallest)", "chance"]
    assert list(table.index) == ["color", "count", "overall"]
    assert table.loc["color", "accuracy (all)"] == 1.0 and table.loc["color", "chance"] == 0.167
    assert table.loc["overall", "n"] == 2 and math.isnan(table.loc["overall", "chance"])


# ------------------------------------------------------------------------------------------ figures
def test_scale_ablation_plot_has_one_bar_per_setting_and_type_and_chance_segments():
    rows = [record(i, q, (i % 3) > 0) for i, q in enumerate(["color", "count", "text"] * 4)]
    frame = accuracy_frame({"all": rows, "largest": rows[::-1], "smallest": rows[:6]},
                                     qtypes=["color", "count", "text"])
    fig = plot_scale_ablation(frame, {"color": 1 / 6, "count": 0.2, "text": 0.0})
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle) and p.get_width() > 0]
    assert len(bars) == 3 * 4  # 3 settings x (3 types + overall)
    heights = sorted(round(b.get_height(), 6) for b in bars)
    assert heights == sorted(round(v, 6) for v in frame["accuracy"])
    segments = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)
                and c.get_linestyle()[0][1] is not None]
    chance_y = sorted(round(float(seg[0][1]), 6) for c in segments for seg in c.get_segments())
    assert chance_y == [0.0, round(1 / 6, 6), 0.2]
    # colour is wrong in every record (index % 3 == 0), so only its group is marked as all zero
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("all 0", 0)]
    zero = accuracy_frame({"all": [record(0, "text", False)], "largest": [record(0, "text", False)]})
    zero_ax = plot_scale_ablation(zero).axes[0]
    assert [t.get_text() for t in zero_ax.texts] == ["all 0", "all 0"]  # text and overall
    assert ax.get_ylabel().startswith("exact-match accuracy")
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["color", "count", "text", "overall"]


def sample_like(qtype, answer, size=(96, 64)):
    return SimpleNamespace(image=Image.new("RGB", size, (200, 200, 200)), question=f"a {qtype} question?",
                           answer=answer, qtype=qtype, evidence_box=(2, 2, 20, 20))


def test_gallery_item_from_sample_normalises_the_prediction():
    sample = sample_like("color", "green")
    assert GalleryItem.from_sample(sample, "green.").correct is True
    assert GalleryItem.from_sample(sample, "Green").correct is False
    assert GalleryItem.from_sample(sample, "red", correct=True).correct is True


def test_success_failure_items_pick_the_first_of_each_kind():
    samples = {i: sample_like(q, "x") for i, q in enumerate(["color", "color", "count", "color"])}
    records = [record(0, "color", False, "a"), record(1, "color", True, "b"), record(2, "count", True, "c"),
               record(3, "color", False, "d")]
    items = success_failure_items(records, samples, ["color", "count"])
    assert len(items) == 4
    assert items[0].prediction == "b" and items[0].correct is True
    assert items[1].prediction == "c"
    assert items[2].prediction == "a" and items[2].correct is False
    assert isinstance(items[3], str) and "no wrong count" in items[3]
    items = success_failure_items(records, samples, ["color", "count"], exclude=[0, 1])
    assert isinstance(items[0], str) and "no correct color" in items[0]  # the only correct color is excluded
    assert items[1].prediction == "c"
    assert items[2].prediction == "d" and items[2].correct is False  # the next wrong color after index 0


def test_qa_gallery_frames_show_the_outcome():
    good = GalleryItem.from_sample(sample_like("color", "green"), "green")
    bad = GalleryItem.from_sample(sample_like("count", "3", size=(64, 192)), "2")
    photo = GalleryItem(Image.new("RGB", (50, 40)), "What is it?", "red")
    fig = plot_qa_gallery([good, bad, "nothing here", photo], ncols=2, title="gallery")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3
    colours = [to_hex(ax.spines["left"].get_edgecolor()) for ax in image_axes]
    assert colours == [OUTCOME_COLOURS[True], OUTCOME_COLOURS[False], to_hex("0.45")]
    texts = "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "truth: '3'" in texts and "A: '2'" in texts and "nothing here" in texts
    assert image_axes[1].images[0].get_array().shape[:2] == (192, 64)
    with pytest.raises(ConfigError):
        plot_qa_gallery([])


def test_image_answers_lists_every_pair_and_judges_truths():
    fig = plot_image_answers(Image.new("RGB", (30, 20)), [("Q1?", "a"), ("Q2?", "b", "b"), ("Q3?", "c", "d")],
                                       title="t")
    text = fig.axes[1].texts[0].get_text()
    assert "Q: Q1?\nA: 'a'\n" in text
    assert "Q: Q2?\nA: 'b'   truth: 'b' (match)" in text and "A: 'c'   truth: 'd' (wrong)" in text
    assert fig.axes[0].images[0].get_array().shape[:2] == (20, 30)
    with pytest.raises(ConfigError):
        plot_image_answers(Image.new("RGB", (3, 2)), [("only a question",)])


# -------------------------------------------------------------------------------------------- speed
@pytest.fixture(scope="module")
def fixture_model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = navil_utils.load_golden_chat_model("qwen3_ve")
    yield model.eval(), tokenizer
    torch.set_num_threads(previous)


def test_generation_speed_forces_the_token_count_and_cache_does_not_change_tokens(fixture_model):
    model, tokenizer = fixture_model
    image = golden_dir("common") / "image.png"
    speeds = compare_kv_cache(model, tokenizer, image, "Describe the image.", new_tokens=(3, 6), repeats=1)
    assert [(s.new_tokens, s.use_cache) for s in speeds] == [(3, True), (3, False), (6, True), (6, False)]
    for speed in speeds:
        assert tuple(speed.generated_ids.shape) == (1, speed.new_tokens)
        assert speed.tokens_per_second == pytest.approx(speed.new_tokens / speed.seconds)
        assert speed.prompt_tokens > speed.new_tokens
    assert torch.equal(speeds[2].generated_ids, speeds[3].generated_ids)
    assert torch.equal(speeds[0].generated_ids, speeds[2].generated_ids[:, :3])
    frame = speed_frame(speeds)
    assert frame.loc[0, "speed-up vs no cache"] == pytest.approx(frame.loc[0, "tokens/s"] / frame.loc[1, "tokens/s"])
    assert frame["speed-up vs no cache"].isna().tolist() == [False, True, False, True]
    with pytest.raises(ConfigError):
        measure_generation_speed(model, tokenizer, image, "q", new_tokens=0)
