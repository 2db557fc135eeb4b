"""data/lr_stall: the study's runs and geometry say what its README says."""
from __future__ import annotations

import json

from navil_utils.paths import repo_root
from navil_utils.tiny.train import TrainConfig

DATA = repo_root() / "data" / "lr_stall"
CONFIGS = repo_root() / "configs" / "lr_stall"
ARMS = ("lr4e-4", "lr2e-3", "lr2e-3_connector0.125", "long_lr4e-4", "long_lr2e-3")


def _geometry() -> dict[str, dict]:
    lines = (DATA / "geometry.jsonl").read_text().splitlines()
    return {record["model"]: record for record in map(json.loads, lines)}


def _evals(arm: str) -> list[dict]:
    lines = (DATA / f"{arm}.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "eval_per_type" in record]


def test_the_arms_differ_only_in_what_they_are_named_for():
    base = json.loads((CONFIGS / "lr4e-4.json").read_text())
    for arm in ARMS:
        config = json.loads((CONFIGS / f"{arm}.json").read_text())
        TrainConfig.from_dict({**config, "out": "unused"}).validate()
        differences = {k for k in set(base) | set(config) if base.get(k) != config.get(k)}
        allowed = {"lr", "connector_init_scale"} | ({"total_steps", "warmup_steps", "eval_every", "eval_batches"}
                                                     if arm.startswith("long") else set())
        assert differences <= allowed, arm
        assert max(r["step"] for r in _evals(arm)) == config["total_steps"]


def test_every_run_collapses_its_visual_tokens_and_higher_rates_inflate_them():
    geometry = _geometry()
    start, end = ({arm: geometry[f"runs/lr_stall/{arm}/{at}"] for arm in ARMS} for at in ("step0", "final"))
    for arm in ARMS:
        assert round(start[arm]["effective_rank"], 1) == 10.4
        if arm != "long_lr4e-4":
            assert end[arm]["effective_rank"] < 1.6
            assert end[arm]["mean_cosine"] > 0.55 > start[arm]["mean_cosine"]
            assert _evals(arm)[-1]["eval_per_type"]["color"] < 0.2              # colour still at chance
    # over 800 steps the low rate starts to spread its tokens out again; the high one does not
    assert end["long_lr4e-4"]["effective_rank"] > 3.5 and end["long_lr4e-4"]["mean_cosine"] < 0.35
    assert _evals("long_lr4e-4")[-1]["eval_loss"] < _evals("long_lr2e-3")[-1]["eval_loss"] - 0.015
    assert round(start["lr2e-3_connector0.125"]["norm_ratio"], 1) == 1.2
    assert round(start["lr2e-3"]["norm_ratio"], 1) == 9.3
    assert end["lr2e-3"]["norm_ratio"] > 2.5 * end["lr4e-4"]["norm_ratio"]      # 118 vs 39
    assert end["lr2e-3_connector0.125"]["norm_ratio"] > 50                     # normalising at init does not hold
    assert end["long_lr2e-3"]["visual_norm"] > end["lr2e-3"]["visual_norm"]      # and it keeps growing
    shipped = geometry["data/models/navil-tiny"]
    assert shipped["effective_rank"] > 20 and shipped["mean_cosine"] < 0.2
