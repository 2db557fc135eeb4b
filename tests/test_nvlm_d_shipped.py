"""The shipped tiny NVLM-D (data/models/nvlm-d-tiny): small, bf16, in the published key layout, opened by the
strict loader — and it still answers as recorded: CI re-evaluates a subset of the held-out questions."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from navil_utils.paths import repo_root
from navil_utils.tiny.compare import REFERENCE_ANSWERS, reference_answers
from navil_utils.tiny.nvlm_d import load_tiny_nvlm_d

SHIPPED = repo_root() / "data" / "models" / "nvlm-d-tiny"
RESULTS = repo_root() / "data" / "nvlm_d" / "compare.jsonl"


def test_checkpoint_is_small_bf16_and_in_the_published_layout():
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        dtypes = {handle.get_slice(k).get_dtype() for k in keys}
    assert {k.split(".")[0] for k in keys} == {"vision_model", "mlp1", "language_model"}
    assert dtypes == {"BF16"}
    model, tokenizer = load_tiny_nvlm_d(SHIPPED, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == _committed_run()["params_total"]
    assert len(tokenizer) == model.config.llm_config.vocab_size


def _committed_run():
    reference = json.loads((SHIPPED / REFERENCE_ANSWERS).read_text())
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    (run,) = [r for r in runs if r["run_id"] == reference["run_id"]]
    return run


@pytest.fixture(scope="module")
def recorded():
    return json.loads((SHIPPED / REFERENCE_ANSWERS).read_text())


def test_reference_answers_are_reproduced(recorded):
    n = 50
    again = reference_answers(SHIPPED, seed=recorded["eval_seed"], n=n)
    assert again["predictions"] == recorded["predictions"][:n]
    # the shipped bf16 copy answers (almost) like the float32 model whose accuracy compare.jsonl records
    assert recorded["float32_original"]["same_answers"] >= 0.95 * recorded["n"]
    assert _committed_run()["architecture"] == "nvlm_d"
