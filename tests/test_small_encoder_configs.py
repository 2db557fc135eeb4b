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
