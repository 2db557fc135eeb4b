"""Custom attention functions selected by name: they get masks, the layer, and the ViT's segments."""
from __future__ import annotations

import uuid

import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from navil_utils.models.common import (
    eager_attention_forward,
    register_attention_function,
)


def _fresh_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _logits_batch_vs_single(model, case):
    """Logits of the text-only prompt left-padded next to the (longer) image prompt vs alone."""
    px = case.pixel_inputs
    image_prompt, text_prompt = case.inputs["input_ids"][0], case.inputs["text_only_input_ids"][0]
    width = len(image_prompt)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, width - len(text_prompt):], mask[0, width - len(text_prompt):] = text_prompt, 1
    ids[1], mask[1] = image_prompt, 1
    with torch.inference_mode():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=px["pixel_values"],
                      image_grid_thw=px["image_grid_thw"]).logits
        alone = model(input_ids=text_prompt[None]).logits
    return batch[0, width - len(text_prompt):], alone[0]


def test_a_name_registered_only_as_attention_still_gets_the_padding_mask(case):
    """transformers alone builds no mask for such a name (padding would be attended to); the model
    registers sdpa's mask for it, so a left-padded batch equals the prompt alone."""
    name = _fresh_name("attention_only")
    AttentionInterface.register(name, eager_attention_forward)
    assert name not in ALL_MASK_ATTENTION_FUNCTIONS
    model = case.model
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        llm_config = model.language_model.config
        assert llm_config._attn_implementation == name
        padded = torch.tensor([[0, 0, 1, 1, 1]])
        embeds = torch.zeros(1, 5, llm_config.hidden_size)
        # what transformers does with an unregistered name: no mask at all
        assert create_causal_mask(config=llm_config, inputs_embeds=embeds, attention_mask=padded,
                                  cache=None, position_ids=torch.arange(5)[None]) is None
        batch, alone = _logits_batch_vs_single(model, case)
        assert name in ALL_MASK_ATTENTION_FUNCTIONS
        assert create_causal_mask(config=llm_config, inputs_embeds=embeds, attention_mask=padded,
                                  cache=None, position_ids=torch.arange(5)[None]) is not None
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    finally:
        model.set_attn_implementation(previous)


def test_a_recording_function_sees_every_layer_and_the_vit_segments(case):
    """register_attention_function registers both interfaces; the function is called with the module
    (``layer_idx``), the ViT's segment keywords, and keywords passed to the decoder reach it."""
    seen: list[tuple[str, int, dict]] = []

    def recorder(module, query, key, value, attention_mask, **kwargs):
        kind = "vision" if "segment_starts" in kwargs else "llm"
        seen.append((kind, module.layer_idx, {k: kwargs[k] for k in kwargs if k not in ("scaling", "dropout")}))
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = _fresh_name("recorder")
    register_attention_function(name, recorder)
    assert name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
    model, px = case.model, case.pixel_inputs
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        with torch.inference_mode():
            reference = model(**case.image_inputs).logits
        vit_layers = model.config.vision_config.num_hidden_layers
        llm_layers = model.config.llm_config.num_hidden_layers
        assert sorted({i for kind, i, _ in seen if kind == "vision"}) == list(range(vit_layers))
        assert sorted({i for kind, i, _ in seen if kind == "llm"}) == list(range(llm_layers))
        total = int(px["pixel_values"].shape[0])
        for kind, _, kwargs in seen:
            if kind == "vision":
                bounds = kwargs["segment_bounds"]
                assert bounds[0][0] == 0 and bounds[-1][1] == total
                length = kwargs["segment_length"]
                assert all((start, start + length) in bounds for start in kwargs["segment_starts"])
        # extra keywords given to the decoder reach the attention function of every layer
        seen.clear()
        embeds, visual = model.embed_inputs(case.inputs["input_ids"], px["pixel_values"], px["image_grid_thw"])
        with torch.inference_mode():
            out = model.language_model(inputs_embeds=embeds, attention_mask=case.inputs["attention_mask"],
                                       visual_token_mask=visual, recorder_tag="probe")
        assert [kw.get("recorder_tag") for kind, _, kw in seen if kind == "llm"] == ["probe"] * llm_layers
        torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_builtin_names_keep_their_own_masks(attn):
    from navil_utils.models.common import ensure_mask_function

    before = ALL_MASK_ATTENTION_FUNCTIONS[attn]
    ensure_mask_function(attn)
    assert ALL_MASK_ATTENTION_FUNCTIONS[attn] is before
