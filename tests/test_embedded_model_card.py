"""The embedded model's card (data/models/navil-tiny/README.md) quotes what its shipped data files hold."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from navil_utils.paths import repo_root
from navil_utils.tiny.train import TrainConfig

CARD_DIR = repo_root() / "data" / "models" / "navil-tiny"
CARD = (CARD_DIR / "README.md").read_text()
#: Held-out teacher-forced count accuracy of the shipped weights on the more-counting run's evaluation images.
SHIPPED_TF_COUNT = 0.950
QTYPES = {"color": "colour", "count": "count", "position": "position", "relation": "relation", "text": "text"}


def _evaluations() -> dict[tuple[int, str], dict]:
    data = json.loads((CARD_DIR / "evaluation.json").read_text())
    return {(e["seed"], e["scales"]): e for e in data["evaluations"]}


def _table_after(header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with ``header_start`` (header and rule dropped)."""
    lines = CARD.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip(" *") for cell in line.strip("|").split("|")])
    return rows


def _log(name: str) -> list[dict]:
    return [json.loads(line) for line in (CARD_DIR / name).read_text().splitlines()]


def test_results_table_is_evaluation_json():
    runs = _evaluations()
    rows = {row[0]: row for row in _table_after("| question type | chance | all scales (NaViL)")}
    for qtype, name in QTYPES.items():
        quoted = [float(v) for v in rows[name][2:5]]
        measured = [runs[(1234, s)]["per_type"][qtype] for s in ("all", "largest", "smallest")]
        assert quoted == pytest.approx(measured, abs=6e-4), qtype
    assert [float(v) for v in rows["overall"][2:5]] == [runs[(1234, s)]["overall"] for s in ("all", "largest",
                                                                                             "smallest")]
    assert all(runs[(1234, s)]["n"] == 1000 for s in ("all", "largest", "smallest"))
    # the first generation's column is its own card's
    gen1 = (CARD_DIR / "gen1" / "README.md").read_text()
    assert "| **overall** | | **0.575** | 0.517 | 0.433 |" in gen1 and rows["overall"][5] == "0.575"
    words = runs[(1234, "all")]["per_relation"]
    quoted = ", ".join(f"*{w}* {words[w]['accuracy']:.3f}" for w in ("left of", "right of", "above", "below"))
    assert quoted in CARD.replace("\n", " ")
    unseen = runs[(2026, "all")]
    assert unseen["n"] == 200 and f"{unseen['overall']:.3f} overall" in CARD
    blank = json.loads((CARD_DIR / "evaluation.json").read_text())["blank_images"]
    assert f"falls from {blank['with_images']:.2f} to {blank['blank']:.2f}" in CARD.replace("\n", " ")


def test_multi_scale_gains_and_targets_quoted_are_measured():
    runs = _evaluations()
    full, largest = runs[(1234, "all")], runs[(1234, "largest")]
    assert round(100 * (full["overall"] - largest["overall"]), 1) == 9.2
    gains = [round(100 * (full["per_type"][q] - largest["per_type"][q])) for q in ("count", "position", "relation")]
    assert gains == [30, 13, 4]
    from navil_utils.tiny.synthetic import SyntheticVQA

    data = SyntheticVQA(1234)
    text_questions = sum(data.sample(i).qtype == "text" for i in range(1000))      # 190
    correct = round(1000 * full["overall"]) - round(text_questions * full["per_type"]["text"])
    assert f"{correct / (1000 - text_questions):.3f} over the four non-text types" in CARD
    assert full["per_type"]["color"] >= 0.95 and full["per_type"]["position"] >= 0.90
    assert full["per_type"]["relation"] >= 0.90 and full["per_type"]["count"] >= 0.90
    assert full["per_type"]["text"] < 0.70 and full["overall"] < 0.85                  # the unmet targets


def test_probe_tables_are_the_csv_files():
    probes = {(r["target"], r["features"], r["probe"]): float(r["accuracy"])
              for r in csv.DictReader((CARD_DIR / "probes.csv").open())}
    kind = next(r for r in _table_after("| target (chance*) |") if r[0].startswith("kind"))
    assert kind[3].startswith(f"{probes[('kind', 'vit', 'linear')]:.2f} / {probes[('kind', 'vit', 'mlp256')]:.2f}")
    assert kind[4].startswith(f"{probes[('kind', 'llm_input', 'linear')]:.2f} / "
                              f"{probes[('kind', 'llm_input', 'mlp256')]:.2f}")
    glyph = next(r for r in _table_after("| target (chance*) |") if r[0].startswith("glyph"))
    assert glyph[4].startswith(f"{probes[('glyph', 'llm_input', 'linear')]:.2f} / "
                               f"{probes[('glyph', 'llm_input', 'mlp256')]:.2f}")
    # glyphs (chance 0.06): barely readable at the LLM input after stage 8, not in the ViT's block
    assert probes[("glyph", "llm_input", "mlp256")] > 0.12 and probes[("glyph", "vit", "linear")] < 0.08

    def r2(path):
        return {(r["site"], r["axis"]): float(r["r2"]) for r in csv.DictReader(path.open())}

    new, old = r2(CARD_DIR / "positions.csv"), r2(CARD_DIR / "gen1" / "positions.csv")
    sites = ["llm_input"] + [f"after_layer_{k}" for k in range(1, 5)]
    rows = _table_after("| hidden state | row | column |")
    assert len(rows) == len(sites)
    for site, row in zip(sites, rows, strict=True):
        for axis, cell in zip(("row", "col"), row[1:3], strict=True):
            assert cell == f"{new[(site, axis)]:.2f} ({old[(site, axis)]:.2f})", (site, axis)
    assert max(old[(s, "col")] for s in sites) < 0.34 and new[("after_layer_2", "col")] > 0.85


def test_stage_configs_validate_and_logs_hold_the_quoted_training_numbers():
    configs = repo_root() / "configs"
    for stage in range(1, 9):
        config = json.loads((configs / f"tiny_gen2b_stage{stage}.json").read_text())
        TrainConfig.from_dict({**config, "out": "unused"}).validate()
        if stage > 1:
            assert config["init_from"] == f"runs/navil-tiny-gen2b/stage{stage - 1}/final"
        log = _log(f"training_log_stage{stage}.jsonl")
        assert max(r["step"] for r in log) == config["total_steps"], stage
    evals = {stage: [r for r in _log(f"training_log_stage{stage}.jsonl") if "eval_overall" in r] for stage in (3, 7)}
    assert round(evals[3][-1]["eval_loss"], 2) == 0.21 and round(evals[3][-1]["eval_overall"], 2) == 0.79
    final = evals[7][-1]["eval_per_type"]
    assert final["relation"] > 0.95 and final["position"] > 0.9                  # held-out, teacher-forced
    stage6 = [r for r in _log("training_log_stage6.jsonl") if "position_error" in r]
    assert round(stage6[0]["position_error"]["col"], 2) == 0.28 and stage6[0]["step"] == 25
    at200 = next(r for r in stage6 if r["step"] == 200)["position_error"]
    assert max(at200.values()) < 0.07                                            # "from 0.27 to 0.06 of the image"
    # stage 8: the token heads' glyph accuracy, quoted at steps 25, 300, 500 and 700
    glyph = {r["step"]: round(r["token_acc"]["glyph"], 3) for r in _log("training_log_stage8.jsonl") if "token_acc" in r}
    assert (glyph[25], glyph[300], glyph[500], glyph[700]) == (0.064, 0.184, 0.215, 0.231)
    assert "from 0.064 to 0.231 in 700 steps" in CARD.replace("\n", " ")
    # the two failed relation runs: flat at ln 2 / 2, and the relapse after the word subset
    flat = [r["loss"] for r in _log("relation_experiments/equal_words.jsonl") if "loss" in r]
    assert len(flat) == 12 and all(abs(v - 0.3466) < 0.006 for v in flat)
    relapse = {r["step"]: r["loss"] for r in _log("relation_experiments/subset_then_equal_words.jsonl") if "loss" in r}
    assert abs(relapse[50] - 0.347) < 0.002 and max(relapse) == 150
    # more counting from the shipped weights: held-out count stays where the shipped weights are (0.924)
    counting = {r["step"]: r["eval_per_type"]["count"] for r in _log("count_experiments/more_counting.jsonl")
                if "eval_per_type" in r}
    assert {step: round(v, 3) for step, v in counting.items()} == {100: 0.921, 200: 0.92}
    config = json.loads((CARD_DIR / "count_experiments" / "more_counting_config.json").read_text())
    assert config["init_from"] == "data/models/navil-tiny" and config["curriculum"][0][1]["count"] == 2.5


def test_the_shipped_weights_know_where_their_tokens_are():
    """position_readout on the shipped model itself (a few images): columns readable after two decoder layers."""
    import navil_utils
    from navil_utils.tiny.probes import position_readout
    from navil_utils.tiny.synthetic import SyntheticVQA

    torch.set_num_threads(1)
    model, tokenizer = navil_utils.load_chat_model(CARD_DIR)
    table = position_readout(model, tokenizer, SyntheticVQA(11), range(120))
    r2 = {(r.site, r.axis): r.r2 for r in table.itertuples()}
    assert set(r2) == {(s, a) for s in ["llm_input"] + [f"after_layer_{k}" for k in range(1, 5)]
                       for a in ("row", "col")}
    assert r2[("after_layer_2", "col")] > 0.7 and r2[("after_layer_2", "row")] > 0.7
    assert r2[("llm_input", "row")] < 0.3                          # rows are computed by the decoder
    assert (CARD_DIR / "model.safetensors").stat().st_size < 20e6


def test_the_shipped_weights_count_on_the_more_counting_runs_images():
    """The more-counting experiment (from stage 7's weights, whose held-out teacher-forced count was 0.924 on that
    run's own evaluation images) beside the shipped stage-8 weights on the same images (the card quotes both)."""
    from navil_utils.tiny.evaluate import load_eval_model
    from navil_utils.tiny.train import StepBatches, _tokenizer_for, evaluate_teacher_forced

    torch.set_num_threads(1)
    config = TrainConfig.from_dict({**json.loads((CARD_DIR / "count_experiments" / "more_counting_config.json")
                                                 .read_text()), "out": "unused"})
    tokenizer, _ = _tokenizer_for(config)
    data = StepBatches(config, tokenizer, seed=config.eval_seed)
    batches = [data[config.total_steps - 1 - i] for i in range(config.eval_batches)]
    model, _ = load_eval_model(CARD_DIR)
    result = evaluate_teacher_forced(model, batches, torch.device("cpu"))
    assert abs(result["eval_per_type"]["count"] - SHIPPED_TF_COUNT) < 0.004   # ~500 questions: an argmax or two
    assert f"{SHIPPED_TF_COUNT:.3f} for the shipped (stage-8) weights" in CARD.replace("\n", " ")


def test_stage_8_comparison_is_the_two_evaluation_files():
    """"What stage 8 changed": shipped numbers from evaluation.json, stage 7's (in brackets) from
    evaluation_stage7.json (the same evaluation of the weights shipped before stage 8)."""
    now = _evaluations()
    before = {(e["seed"], e["scales"]): e for e in json.loads((CARD_DIR / "evaluation_stage7.json").read_text())
              ["evaluations"]}
    text = CARD.replace("\n", " ")
    a, b = now[(1234, "all")], before[(1234, "all")]
    quoted = (f"overall {a['overall']:.3f} ({b['overall']:.3f}), count {a['per_type']['count']:.3f} "
              f"({b['per_type']['count']:.3f}), position {a['per_type']['position']:.3f} "
              f"({b['per_type']['position']:.3f}), relation {a['per_type']['relation']:.3f} "
              f"({b['per_type']['relation']:.3f}), colour {a['per_type']['color']:.3f} ({b['per_type']['color']:.3f}), "
              f"text {a['per_type']['text']:.3f} ({b['per_type']['text']:.3f}); seed 2026: "
              f"{now[(2026, 'all')]['overall']:.3f} ({before[(2026, 'all')]['overall']:.3f})")
    assert quoted in text
    assert b["overall"] == 0.769 and b["per_type"]["count"] == 0.8691     # the stage-7 card's own numbers
    rows = _table_after("| font size (ink height) |")
    sizes = a["per_text_size"]
    assert [row[0].split()[0] for row in rows] == list(sizes) == ["8", "12", "18", "26", "34"]
    for row in rows:
        size = row[0].split()[0]
        new, old = sizes[size], b["per_text_size"][size]
        assert int(row[1]) == new["n"] == old["n"]
        assert row[2] == f"{new['characters']:.3f} ({old['characters']:.3f})"
        exact = [float(v.strip("()")) for v in row[3].split()]
        assert exact == pytest.approx([new["exact"], old["exact"]], abs=6e-4)
