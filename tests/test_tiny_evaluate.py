"""Evaluation CLI and the shipped tiny model's accuracy on a fixed question set."""
from __future__ import annotations

import json

import pytest
import torch

from navil_utils.errors import ConfigError
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.tiny.evaluate import EvalResult, evaluate_model, main, select_scales
from navil_utils.tiny.synthetic import SyntheticVQA
from navil_utils.paths import repo_root

TINY = repo_root() / "data" / "models" / "navil-tiny"

#: Measured on seed 2026, n=200 (0.740 overall; colour 1.000, count 0.886, position 0.976, relation 0.949:
#: data/models/navil-tiny/evaluation.json) minus a margin of ~2.5 binomial standard errors (colour and position:
#: of p = 0.95), so that only a real regression (or a broken pipeline) fails the test.
SHIPPED_FLOORS = {"overall": 0.66, "color": 0.88, "count": 0.76, "position": 0.88, "relation": 0.86}


@pytest.fixture(scope="module")
def tiny_model():
    from navil_utils.chatting import load_chat_model

    model, tokenizer = load_chat_model(TINY)
    return model.eval(), tokenizer


def test_select_scales_keeps_the_requested_scale_of_every_image():
    images = [SyntheticVQA(seed=3).sample(i).image for i in range(3)]
    inputs = preprocess_multiscale(images, min_pixels=32 * 32, max_pixels=128 * 128)
    assert select_scales(inputs, "all") is inputs
    for which, pick in (("largest", -1), ("smallest", 0)):
        kept = select_scales(inputs, which)
        assert kept.num_scales == [1, 1, 1]
        expected = [inputs.scales_of(i)[pick] for i in range(3)]
        assert [tuple(g) for g in kept.image_grid_thw.tolist()] == [s.grid_thw for s in expected]
        ranges = inputs.patch_ranges()
        rows = [inputs.scales.index(s) for s in expected]
        assert torch.equal(kept.pixel_values, torch.cat([inputs.pixel_values[slice(*ranges[r])] for r in rows]))
    with pytest.raises(ConfigError):
        select_scales(inputs, "middle")


def test_eval_result_accounting():
    records = [{"qtype": "color", "correct": True}, {"qtype": "color", "correct": False},
               {"qtype": "count", "correct": True}]
    result = EvalResult(records, seed=5, scales="all", seconds=0.0)
    assert result.per_type == {"color": 0.5, "count": 1.0}
    assert result.overall == pytest.approx(2 / 3)
    assert result.summary()["n"] == 3 and result.summary()["seed"] == 5
    assert result.per_relation == {}
    relations = [{"qtype": "relation", "question": f"Is the red star {w} the blue cross?", "correct": ok}
                 for w, ok in (("left of", True), ("left of", False), ("below", True), ("above", False))]
    assert EvalResult(records + relations, seed=5, scales="all", seconds=0.0).per_relation == {
        "left of": (0.5, 2), "above": (0.0, 1), "below": (1.0, 1)}
    texts = [{"qtype": "text", "answer": answer, "prediction": prediction, "correct": correct, "text_size": size}
             for answer, prediction, correct, size in (("K7RA", "K7RA", True, 34), ("K7RA", "K7AR", False, 34),
                                                       ("XY", " XY.", True, 8), ("XY", "", False, 8),
                                                       ("AC", "CA", False, 12))]
    # exact match, characters in place (K7AR has 2 of 4; " XY." normalises to "XY"), questions
    assert EvalResult(records + texts, seed=5, scales="all", seconds=0.0).per_text_size == {
        8: (0.5, 0.5, 2), 12: (0.0, 0.0, 1), 34: (0.5, 0.75, 2)}


def test_cli_prints_table_and_json_last_line(capsys):
    assert main(["--model", str(TINY), "--n", "12", "--seed", "99", "--batch-size", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"overall", "per_type", "n", "seed", "scales"}
    assert summary["n"] == 12 and summary["seed"] == 99 and summary["scales"] == "all"
    assert set(summary["per_type"]) <= {"color", "count", "position", "relation", "text"}
    assert any(line.startswith("overall") for line in lines)
    assert "relation" in summary["per_type"]                              # seed 99 asks two
    assert sum(line.startswith("relation by word: ") for line in lines) == 1


def test_shipped_model_accuracy_on_fixed_questions(tiny_model):
    model, tokenizer = tiny_model
    result = evaluate_model(model, tokenizer, n=200, seed=2026, batch_size=50)
    assert result.n == 200
    assert result.overall >= SHIPPED_FLOORS["overall"], result.summary()
    for qtype in ("color", "count", "position", "relation"):
        assert result.per_type[qtype] >= SHIPPED_FLOORS[qtype], result.summary()
    # the answers are grounded in the image: blanking every image drops accuracy towards chance
    data = SyntheticVQA(seed=2026)
    samples = [data.sample(i) for i in range(100)]
    from PIL import Image

    blank = [type(s)(**{**s.__dict__, "image": Image.new("RGB", s.image.size, (200, 200, 200))}) for s in samples]
    with_images = evaluate_model(model, tokenizer, samples=samples, batch_size=50).overall
    without = evaluate_model(model, tokenizer, samples=blank, batch_size=50).overall
    assert with_images > without + 0.15, (with_images, without)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n .* must be a positive integer, got 0"),
    ({"n": -5}, "n .* must be a positive integer, got -5"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
    ({"samples": []}, "samples is empty"),
    ({"scales": "middle"}, "scales must be one of"),
])
def test_evaluate_model_refuses_to_score_nothing(kwargs, message):
    with pytest.raises(ConfigError, match=message):  # checked before the model is touched
        evaluate_model(None, None, **kwargs)


@pytest.mark.parametrize("argv, fragment", [
    (["--n", "0"], "argument --n: must be a positive integer (>= 1), got '0'"),
    (["--n", "-5"], "argument --n: must be a positive integer (>= 1), got '-5'"),
    (["--n", "ten"], "argument --n: expected an integer, got 'ten'"),
    (["--batch-size", "-1"], "argument --batch-size: must be a positive integer"),
    (["--seed", "-3"], "argument --seed: must be a non-negative integer"),
    (["--threads", "0"], "argument --threads: must be a positive integer"),
    (["--device", "toaster"], "argument --device: not a torch device: 'toaster'"),
])
def test_cli_rejects_bad_arguments_in_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        main(["--model", str(TINY), *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], captured.err


def test_cli_reports_a_missing_model_in_one_line(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert main(["--model", str(missing), "--n", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no score at all, so no JSON line
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m navil_utils.evaluate: error: ")
    assert str(missing) in lines[0]
