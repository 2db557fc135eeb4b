"""The design ablations of the scaling chapter: a dense LLM (no modality experts) and an LLM initialised
from text-only pretraining, in both backbones and through the sweep."""
from __future__ import annotations

import json

import pytest
import torch

from navil_utils.analysis.parameters import count_parameters, expected_parameter_counts
from navil_utils.models.configuration_navil import NaViLChatConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.reference.fixtures import GOLDEN_VARIANTS
from navil_utils.reference.golden import load_golden_case
from navil_utils.tiny.sweep import ScalingRun, read_results, run_sweep
from navil_utils.tiny.text_pretraining import copy_text_experts_to_visual


def _fixture_model(variant: str, **llm_overrides):
    """A freshly initialised model with the golden fixture's config (LLM fields overridden)."""
    case = load_golden_case(variant)
    config = case.model.config.to_dict()
    config["llm_config"].update(llm_overrides)
    torch.manual_seed(0)
    return NaViLForConditionalGeneration(NaViLChatConfig(**config)).eval(), case


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_dense_llm_has_no_visual_experts_and_round_trips(variant, tmp_path):
    from navil_utils.models.loading import load_model

    dense, case = _fixture_model(variant, visual_experts=False)
    assert not [n for n, _ in dense.named_parameters() if "_ve." in n]
    counts = count_parameters(dense)
    assert counts.total == counts.active == expected_parameter_counts(dense.config).total
    assert counts.active == count_parameters(case.model).active  # same active parameters as with experts
    with torch.no_grad():
        logits = dense(**case.image_inputs).logits
    assert torch.isfinite(logits).all()
    dense.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["llm_config"]["visual_experts"] is False
    reloaded = load_model(tmp_path, special_token_ids=case.meta["special_token_ids"]).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**case.image_inputs).logits, logits)
    # the official format never carries the field: experts-on configs serialise without it
    assert "visual_experts" not in case.model.config.llm_config.to_dict()


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_visual_experts_copied_from_text_experts_compute_the_dense_function(variant):
    """After the copy, routing tokens to the visual experts changes nothing: the model equals the dense
    model with the text weights (InternLM2-VE's ``wo_ve`` applied after ``wo`` starts as the identity)."""
    model, case = _fixture_model(variant)
    with torch.no_grad():
        before_routed = model(**case.image_inputs).logits
        copied = copy_text_experts_to_visual(model)
        routed = model(**case.image_inputs).logits
    dense, _ = _fixture_model(variant, visual_experts=False)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "_ve." not in k}, strict=True)
    with torch.no_grad():
        unrouted = dense(**case.image_inputs).logits
    assert copied == sum("_ve." in n for n, _ in model.language_model.named_parameters())
    assert (routed - unrouted).abs().max() < 1e-5
    assert (before_routed - unrouted).abs().max() > 1e-3  # random visual experts did differ


def test_sweep_runs_the_ablations(tmp_path):
    base = dict(llm_width=32, llm_layers=1, vit_width=32, vit_layers=1, samples=(64,), batch_size=16,
                eval_batches=2, warmup_samples=32, study="ablation")
    runs = [ScalingRun(**base), ScalingRun(**base, visual_experts=False),
            ScalingRun(**base, text_pretrain_samples=512)]
    assert [r.run_id.split("-")[3:-4] for r in runs] == [[], ["dense"], ["textinit512"]]
    records = run_sweep(runs, tmp_path / "r.jsonl", out_root=tmp_path / "runs", progress=False)
    experts, dense, textinit = records
    assert dense["params_total"] == dense["params_active"] == experts["params_active"] < experts["params_total"]
    assert "text_pretraining" not in experts
    summary = textinit["text_pretraining"]
    assert summary["text_loss_last"] < summary["text_loss_first"]  # the text LM learned something
    assert len({r["val_loss"] for r in records}) == 3
    again = run_sweep(runs, tmp_path / "r.jsonl", out_root=tmp_path / "runs", progress=False)
    assert again == records and len(read_results(tmp_path / "r.jsonl")) == 3
    with pytest.raises(Exception, match="text_pretrain_samples"):
        ScalingRun(**{**base, "text_pretrain_samples": -1})


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_expert_twins_are_registered_next_to_their_text_weights(variant):
    """Checkpoint order, and the order in which a seeded initialisation draws the weights: adding the dense
    option must not reorder it (that would silently change every seeded model)."""
    experts, _ = _fixture_model(variant)
    dense, _ = _fixture_model(variant, visual_experts=False)
    layer = experts.language_model.model.layers[0]
    attention = next(m for n, m in layer.named_children() if n in ("self_attn", "attention"))
    names = [n for n, _ in attention.named_children()]
    expected = {"qwen3_ve": ["q_proj", "q_proj_ve", "k_proj", "k_proj_ve", "v_proj", "v_proj_ve", "o_proj",
                             "o_proj_ve", "q_norm", "k_norm", "q_norm_ve", "k_norm_ve"],
                "internlm2_ve": ["wqkv", "wqkv_ve", "wo", "wo_ve"]}[variant]
    assert names == expected
    dense_attention = next(m for n, m in dense.language_model.model.layers[0].named_children()
                           if n in ("self_attn", "attention"))
    assert [n for n, _ in dense_attention.named_children()] == [n for n in expected if not n.endswith("_ve")]
