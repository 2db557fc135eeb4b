"""configs/attention: the embedded model's recipe with an 8x smaller vision encoder — and nothing else changed."""
from __future__ import annotations

import json

from navil_utils.models.presets import tiny_model_config
from navil_utils.paths import repo_root
from navil_utils.tiny.train import TrainConfig

CONFIGS = repo_root() / "configs"


def test_small_encoder_recipe_differs_from_the_embedded_one_only_in_the_encoder():
    for stage in (1, 2):
        embedded = json.loads((CONFIGS / f"tiny_stage{stage}.json").read_text())
        small = json.loads((CONFIGS / "attention" / f"small_encoder_stage{stage}.json").read_text())
        assert small.pop("model") == {**embedded.pop("model"), "vit_width": 56, "vit_layers": 2, "vit_heads": 2}
        assert small.pop("bf16") is True
        if stage == 2:
            assert small.pop("init_from") == "runs/navil-tiny-small-encoder/stage1/final"
            embedded.pop("init_from")
        assert small == embedded
        TrainConfig.from_dict({**json.loads((CONFIGS / "attention" / f"small_encoder_stage{stage}.json").read_text()),
                               "out": "unused"}).validate()


def test_the_encoder_is_eight_times_smaller():
    from navil_utils.analysis.parameters import count_parameters
    from navil_utils.models.configuration_navil import NaViLChatConfig
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
    from navil_utils.processing.tokenizers import navil_token_ids
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer(repo_root() / "data" / "models" / "navil-tiny")
    ids = navil_token_ids(tokenizer)
    counts = {}
    for name, sizes in {"embedded": {}, "small": {"vit_width": 56, "vit_layers": 2, "vit_heads": 2}}.items():
        config = NaViLChatConfig(**tiny_model_config(len(tokenizer), ids, llm_intermediate=384, **sizes))
        counts[name] = count_parameters(NaViLForConditionalGeneration(config))
    assert counts["embedded"].vision_encoder == 891_520  # the shipped model's
    ratio = counts["embedded"].vision_encoder / counts["small"].vision_encoder
    assert 7 <= ratio <= 9
    assert counts["small"].total - counts["small"].vision_encoder - counts["small"].components.get("connector", 0) == \
        counts["embedded"].total - counts["embedded"].vision_encoder - counts["embedded"].components.get("connector", 0)


def test_gen3_candidate_is_the_gen2b_recipe_with_8px_patches_and_glyphs():
    """configs/tiny_gen3_stage*.json: what configs/README.md says they change, nothing else; each stage starts
    from the previous one and validates."""
    for stage in range(1, 8):
        gen2b = json.loads((CONFIGS / f"tiny_gen2b_stage{stage}.json").read_text())
        gen3 = json.loads((CONFIGS / f"tiny_gen3_stage{stage}.json").read_text())
        TrainConfig.from_dict({**gen3, "out": "unused"}).validate()
        assert gen3.pop("model") == {**gen2b.pop("model"), "patch_size": 8}
        assert gen3.pop("init_from") == (f"runs/navil-tiny-gen3/stage{stage - 1}" + ("/final" if stage > 1 else ""))
        gen2b.pop("init_from")
        if "token_loss_weights" in gen2b:
            assert gen2b.pop("token_loss_weights")["glyph"] == 0
            assert gen3.pop("token_loss_weights") == {"kind": 1.0, "color": 0.1, "glyph": 0.5}
        if stage in (1, 2):
            assert (gen3.pop("position_loss"), gen3.pop("position_loss_layer")) == (1.0, 1)
        if stage in (2, 5, 7):
            weights, old_weights = gen3.pop("curriculum")[0][1], gen2b.pop("curriculum")[0][1]
            assert (weights.pop("text"), old_weights.pop("text")) == (1.5, 0.5)
            assert weights == old_weights
        assert gen3.pop("batch_size") == (256 if stage in (1, 2, 5, 7) else 64)
        gen2b.pop("threads", None)
        schedule = ("total_steps", "batch_size", "lr", "warmup_steps", "log_every", "eval_every", "eval_batches",
                    "checkpoint_every", "num_workers")
        for key in schedule:
            gen3.pop(key, None)
            gen2b.pop(key, None)
        assert gen3 == gen2b, stage
