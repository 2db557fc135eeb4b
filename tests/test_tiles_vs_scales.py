"""Tiles vs scales (chapter 06 §5): the tables over the comparison runs, the image-blind baseline, the
figures, and the committed runs themselves (same data, budget and evaluation for both architectures)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from navil_utils.analysis.tiles_vs_scales import (  # noqa: E402
    accuracy_summary,
    accuracy_table,
    blind_baseline,
    cost_table,
    read_compare_results,
)
from navil_utils.errors import ConfigError  # noqa: E402
from navil_utils.paths import repo_root  # noqa: E402
from navil_utils.tiny.compare import evaluation_sets  # noqa: E402

ROOT = repo_root()
RESULTS = ROOT / "data" / "nvlm_d" / "compare.jsonl"
SPEC = ROOT / "configs" / "nvlm_d" / "compare.json"


def _record(architecture, seed, color, count, train=100.0, infer=0.01):
    return {"architecture": architecture, "seed": seed, "accuracy": {"overall": (color + count) / 2, "color": color,
                                                                     "count": count},
            "accuracy_subsets": {"small_text": {"overall": 0.0, "text": 0.0}}, "params_total": 10, "params_active": 8,
            "params_encoder": 3, "visual_tokens_mean": 5.0, "visual_tokens_max": 9, "train_seconds": train,
            "inference_seconds_per_sample": infer}


RECORDS = [_record("navil", 0, 0.2, 0.4, 100, 0.010), _record("navil", 1, 0.3, 0.4, 300, 0.020),
           _record("nvlm_d", 0, 0.1, 0.5)]


def test_summary_mean_and_range_over_seeds():
    summary = accuracy_summary(RECORDS).set_index(["architecture", "subset", "qtype"])
    row = summary.loc[("navil", "all", "color")]
    assert row["mean"] == pytest.approx(0.25) and row["low"] == 0.2 and row["high"] == 0.3 and row["seeds"] == 2
    assert summary.loc[("nvlm_d", "all", "count"), "seeds"] == 1
    assert summary.loc[("navil", "small_text", "text"), "high"] == 0.0


def test_accuracy_table_formats_the_spread_and_puts_overall_last():
    table = accuracy_table(RECORDS, blind={"color": 0.28, "count": 0.26, "overall": 0.27})
    assert list(table.index) == ["color", "count", "overall"]
    assert table.loc["color", "NaViL (multi-scale)"] == "0.250 (0.200–0.300)"
    assert table.loc["count", "NaViL (multi-scale)"] == "0.400"  # no spread: one number
    assert table.loc["color", "NVLM-D (tiles + thumbnail)"] == "0.100"
    assert table.loc["overall", "image-blind baseline"] == "0.270"
    with pytest.raises(ConfigError, match="no results for subset 'nope'"):
        accuracy_table(RECORDS, "nope")


def test_cost_table_averages_times_over_seeds():
    costs = cost_table(RECORDS)
    assert costs.loc["NaViL (multi-scale)", "training s (range)"] == "200 (100–300)"
    assert costs.loc["NaViL (multi-scale)", "inference ms / question (range)"] == "15.0 (10.0–20.0)"
    assert costs.loc["NaViL (multi-scale)", "ViT patches / image"] == 20.0  # 2×2 merge
    assert costs.loc["NVLM-D (tiles + thumbnail)", "seeds"] == 1


def _sample(qtype, template, answer):
    return SimpleNamespace(qtype=qtype, template=template, answer=answer)


def test_blind_baseline_is_the_most_frequent_answer_per_template():
    samples = ([_sample("count", "kind", "2")] * 3 + [_sample("count", "kind", "3")] +
               [_sample("count", "all", "5")] * 2 +
               [_sample("relation", "left", "yes")] * 2 + [_sample("relation", "left", "no")] * 2)
    blind = blind_baseline(samples)
    assert blind["count"] == pytest.approx(5 / 6)      # "2" for 3 of 4, "5" for 2 of 2
    assert blind["relation"] == pytest.approx(0.5)
    assert blind["overall"] == pytest.approx(7 / 10)
    with pytest.raises(ConfigError):
        blind_baseline([])


def test_committed_runs_compare_like_with_like():
    records = read_compare_results(RESULTS)
    spec = json.loads(SPEC.read_text())
    runs = {(r["architecture"], r["seed"]) for r in records}
    assert runs == {(a, s) for a in spec["architectures"] for s in spec["seeds"]}
    for record in records:
        assert record["samples"] == spec["samples"] and record["batch_size"] == spec["batch_size"]
        assert record["eval"] == {"seed": spec["eval"]["seed"], "n": spec["eval"]["n"]}
        assert set(record["subsets"]) == set(spec["subsets"])
        assert record["spec"]["train"] == spec["train"]
    by_arch = {r["architecture"]: r for r in records}
    totals = [by_arch[a]["params_total"] for a in ("navil", "nvlm_d")]
    assert abs(totals[0] - totals[1]) / max(totals) < 0.01  # similar parameter counts (within 1 %)
    # the summary spans each record's own overall accuracy
    summary = accuracy_summary(records)
    for record in records:
        same = summary[(summary["architecture"] == record["architecture"]) & (summary["subset"] == "all") &
                       (summary["qtype"] == "overall")]
        assert float(same["low"].iloc[0]) <= record["accuracy"]["overall"] <= float(same["high"].iloc[0])


def test_evaluation_sets_and_blind_baselines_of_the_spec():
    sets = evaluation_sets(json.loads(SPEC.read_text()))
    assert {k: len(v) for k, v in sets.items()} == {"all": 500, "extreme_aspect": 200, "small_text": 100,
                                                     "small_objects": 200}
    for sample in sets["extreme_aspect"]:
        w, h = sample.image.size
        assert max(w / h, h / w) >= 2.5
    assert {s.qtype for s in sets["small_text"]} == {"text"}
    blind = blind_baseline(sets["all"])
    assert 0.5 <= blind["relation"] <= 0.6 and blind["text"] < 0.05  # yes/no; 16^n strings


def test_figures():
    from navil_utils.plotting.tiles_vs_scales import plot_tiles_vs_scales, plot_two_views
    from navil_utils.processing.multiscale import preprocess_multiscale
    from navil_utils.processing.tiling import preprocess_tiles
    from navil_utils.tiny.synthetic import SyntheticVQA

    fig = plot_tiles_vs_scales(accuracy_summary(RECORDS), {"all": {"color": 0.3}})
    assert [ax.get_title() for ax in fig.axes] == ["held-out questions", "small text (8–12 px)"]
    sample = SyntheticVQA(seed=3, aspect_ratios=[4.0]).sample(0)
    scales = preprocess_multiscale(sample.image, min_pixels=1024, max_pixels=128 * 128)
    tiles = preprocess_tiles(sample.image, max_num=6, image_size=64)
    fig = plot_two_views(sample.image, scales, tiles)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[1] == f"NaViL: {len(scales.scales)} scales, {scales.num_visual_tokens} visual tokens"
    assert titles[2].endswith(f"{4 * tiles.num_tiles} visual tokens")


def test_blind_answer_loss_is_the_entropy_of_the_flat_answers():
    import math

    from navil_utils.tiny.evaluate import blind_answer_nll
    from navil_utils.tiny.synthetic import SyntheticVQA

    data = SyntheticVQA(seed=0)
    assert blind_answer_nll(data, "color") == pytest.approx(math.log(6))
    assert blind_answer_nll(data, "relation") == pytest.approx(math.log(2))
    assert blind_answer_nll(data, "text", "K7R") == pytest.approx(math.log(3) + 3 * math.log(16))


def test_answer_loss_agrees_with_greedy_answers():
    """If the whole answer has probability > 1/2, every token is the arg-max, so the greedy answer (the chat
    path's own prompt) must be right: ties the teacher-forced loss to the evaluation's prompts."""
    import math

    import torch

    from navil_utils.tiny.evaluate import answer_log_loss, evaluate_model, load_eval_model
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    torch.set_num_threads(1)
    samples = [SyntheticVQA(seed=1234, question_types=QUESTION_TYPES).sample(i) for i in range(40)]
    for directory in (ROOT / "data/models/navil-tiny", ROOT / "data/models/nvlm-d-tiny"):
        model, tokenizer = load_eval_model(directory, dtype=torch.float32)
        losses = answer_log_loss(model, tokenizer, samples, batch_size=20)
        greedy = evaluate_model(model, tokenizer, samples=samples, batch_size=20).records
        assert [r["answer"] for r in losses] == [s.answer for s in samples]
        confident = [i for i, r in enumerate(losses) if r["nll"] < math.log(2)]
        assert all(greedy[i]["correct"] for i in confident)
        if directory.name == "navil-tiny":
            assert len(confident) >= 10  # the trained model is confident and right on many of them


def test_committed_answer_information_is_reproduced_for_the_shipped_models():
    from navil_utils.analysis.tiles_vs_scales import information_table
    from navil_utils.tiny.compare import answer_information

    committed = json.loads((ROOT / "data/nvlm_d/answer_information.json").read_text())
    label = "NVLM-D, seed 1 (16,384 images)"
    again = answer_information({label: ROOT / "data/models/nvlm-d-tiny"}, json.loads(SPEC.read_text()))
    expected = [r for r in committed["rows"] if r["model"] == label]
    assert [(r["qtype"], r["n"]) for r in again] == [(r["qtype"], r["n"]) for r in expected]
    for new, old in zip(again, expected):
        assert new["nll"] == pytest.approx(old["nll"], abs=2e-4)
        assert new["blind_nll"] == old["blind_nll"]
    table = information_table(committed["rows"])
    assert table.shape == (5, 3)
    # the embedded model takes information from the image on colour, count and position; the 16k-image ones do not
    embedded = {r["qtype"]: r for r in committed["rows"] if r["model"].startswith("navil-tiny")}
    assert all(embedded[q]["information_nats"] > 3 * embedded[q]["stderr"] for q in ("color", "count", "position"))
    assert all(r["information_nats"] < 0 for r in committed["rows"] if "16,384" in r["model"])
