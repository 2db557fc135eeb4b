"""Parity of the native NaViL implementation with the reference outputs (golden fixtures), both backbones.

Reference numbers come from the official code run on tiny random models (tests/fixtures/golden).
Tolerances: atol = rtol = 1e-4 for float32 tensors (the golden README's suggestion).
"""
from __future__ import annotations

import pytest
import torch

from navil_utils.errors import ModelInputError
from navil_utils.models.configuration_navil import NaViLChatConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.models.vision import window_layout
from navil_utils.reference.golden import load_golden_case

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def forward(case):
    with torch.no_grad():
        return case.model(**case.image_inputs, labels=case.inputs["labels"], output_hidden_states=True)


def test_logits_match_reference(case, forward):
    torch.testing.assert_close(forward.logits, case.outputs["logits"], **TOL)


def test_every_hidden_state_matches_reference(case, forward):
    n_layers = case.model.config.llm_config.num_hidden_layers
    assert len(forward.hidden_states) == n_layers + 1
    for i, hidden in enumerate(forward.hidden_states):
        torch.testing.assert_close(hidden, case.outputs[f"hidden_states.{i:02d}"], **TOL)


def test_loss_matches_reference(case, forward):
    assert forward.loss.item() == pytest.approx(case.outputs["loss"].item(), abs=1e-5)
    assert forward.loss.item() == pytest.approx(case.meta["loss"], abs=1e-5)


def test_vision_intermediates_match_reference(case):
    px = case.pixel_inputs
    with torch.no_grad():
        vision = case.model.get_vision_outputs(px["pixel_values"], px["image_grid_thw"])
        features = case.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
    n = case.meta["num_img_context_tokens"]
    torch.testing.assert_close(vision.vision_last_hidden_state, case.outputs["vision_last_hidden_state"], **TOL)
    torch.testing.assert_close(vision.pixel_shuffled, case.outputs["vision_pixel_shuffled"].reshape(n, -1), **TOL)
    torch.testing.assert_close(vision.features, case.outputs["vision_mlp1_out"].reshape(n, -1), **TOL)
    assert features.shape == (n, case.model.config.llm_config.hidden_size)
    torch.testing.assert_close(features, vision.features, atol=0, rtol=0)


def test_window_index_matches_reference(case):
    grids = case.pixel_inputs["image_grid_thw"]
    vision_config = case.model.config.vision_config
    layout = window_layout(grids, vision_config.merge_size, vision_config.window_size)
    assert layout.window_index.tolist() == case.outputs["vision_window_index"].tolist()
    assert layout.cu_window_seqlens == case.outputs["vision_cu_window_seqlens"].tolist()
    assert layout.cu_seqlens == [0, 24, 56, 116]
    # a permutation of the 29 merge blocks that is NOT raster order: the 3x5 scale (blocks 14..28) is
    # emitted window by window (4-wide window first, then the 1-wide remainder column)
    assert sorted(layout.window_index.tolist()) == list(range(29))
    assert layout.window_index.tolist()[14:] == [14, 15, 16, 17, 19, 20, 21, 22, 24, 25, 26, 27, 18, 23, 28]


def test_sdpa_equals_eager(case, forward):
    eager = load_golden_case(case.variant, attn_implementation="eager").model
    assert eager.language_model.config._attn_implementation == "eager"
    assert eager.vision_model.config._attn_implementation == "eager"
    px = case.pixel_inputs
    with torch.no_grad():
        out = eager(**case.image_inputs, output_hidden_states=True)
        vit_eager = eager.get_vision_outputs(px["pixel_values"], px["image_grid_thw"]).vision_last_hidden_state
        vit_sdpa = case.model.get_vision_outputs(px["pixel_values"], px["image_grid_thw"]).vision_last_hidden_state
    torch.testing.assert_close(out.logits, forward.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.hidden_states, forward.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vit_eager, vit_sdpa, atol=1e-5, rtol=1e-5)


def test_output_attentions_are_causal_probabilities(case):
    with torch.no_grad():
        out = case.model(**case.image_inputs, output_attentions=True)
    config = case.model.config.llm_config
    seq = case.inputs["input_ids"].shape[1]
    assert len(out.attentions) == config.num_hidden_layers
    for probs in out.attentions:
        assert probs.shape == (1, config.num_attention_heads, seq, seq)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, config.num_attention_heads, seq))
        assert probs.triu(diagonal=1).abs().max().item() == 0.0
    # the sdpa model is unchanged by the eager fallback used for this one call
    assert case.model.config.llm_config._attn_implementation == "sdpa"


def test_vision_attention_maps_per_segment(case):
    px = case.pixel_inputs
    with torch.no_grad():
        vision = case.model.vision_model(px["pixel_values"], px["image_grid_thw"], output_attentions=True)
    config = case.model.config.vision_config
    full = config.fullatt_block_indexes
    for layer, maps in enumerate(vision.attentions):
        lengths = [m.shape[-1] for m in maps]
        # global layers: one segment per scale (24, 32, 60 patches); window layers: one per window
        assert lengths == ([24, 32, 60] if full is None or layer in full else [24, 32, 48, 12])
        for m in maps:
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_bfloat16_forward_tracks_float32(case):
    model = load_golden_case(case.variant, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(**case.image_inputs).logits.float()
    reference = case.outputs["logits"]
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max().item() < 1.0          # |logits| <= 15
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= 0.9


def test_image_token_count_mismatch_is_a_clear_error(case):
    ids = case.inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(case.model.img_context_token_id)] = 20
    with pytest.raises(ModelInputError, match="28 <IMG_CONTEXT> tokens but the images give 29"):
        case.model(input_ids=ids, pixel_values=case.pixel_inputs["pixel_values"],
                   image_grid_thw=case.pixel_inputs["image_grid_thw"])
    with pytest.raises(ModelInputError, match="no pixel_values"):
        case.model(input_ids=case.inputs["input_ids"])


def test_training_from_scratch_inits_and_learns(case):
    torch.manual_seed(0)
    config = NaViLChatConfig.from_dict(case.model.config.to_dict())
    model = NaViLForConditionalGeneration(config)
    vit_config = config.vision_config
    layer = model.vision_model.encoder.layers[0]
    assert torch.all(layer.ls1 == vit_config.initializer_factor)
    assert torch.all(layer.norm1.weight == 1.0)
    llm_std = model.get_input_embeddings().weight.std().item()
    assert llm_std == pytest.approx(config.llm_config.initializer_range, rel=0.1)
    assert model.special_token_embedding.weight.std().item() == pytest.approx(llm_std, rel=0.2)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = dict(**case.image_inputs, labels=case.inputs["labels"])
    loss = model(**batch).loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Everything gets gradients except the last layer's visual experts that only feed visual positions
    # (queries, output projection, FFN): their outputs only reach the logits of visual positions, which the
    # reference loss excludes.  (InternLM2's fused wqkv_ve also makes keys/values, so it does get gradients.)
    last = config.llm_config.num_hidden_layers - 1
    if config.llm_architecture == "InternLM2VEForCausalLM":
        expected = ["attention.wo_ve.weight", "feed_forward_ve.w1.weight", "feed_forward_ve.w2.weight",
                    "feed_forward_ve.w3.weight"]
    else:
        expected = ["mlp_ve.down_proj.weight", "mlp_ve.gate_proj.weight", "mlp_ve.up_proj.weight",
                    "self_attn.o_proj_ve.weight", "self_attn.q_norm_ve.weight", "self_attn.q_proj_ve.weight"]
    assert sorted(no_grad) == sorted(f"language_model.model.layers.{last}.{name}" for name in expected)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        assert model(**batch).loss.item() < loss.item()


def test_qk_normalization_uses_intended_internvit_semantics(case):
    data = case.model.config.to_dict()
    data["vision_config"]["qk_normalization"] = True
    config = NaViLChatConfig.from_dict(data)
    model = NaViLForConditionalGeneration(config).eval()
    attn = model.vision_model.encoder.layers[0].attn
    width = config.vision_config.hidden_size
    assert attn.q_norm.weight.shape == (width,) and attn.k_norm.weight.shape == (width,)
    keys = model.state_dict().keys()
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in keys
    px = case.pixel_inputs
    with torch.no_grad():
        before = model.get_image_features(px["pixel_values"], px["image_grid_thw"])
        attn.q_norm.weight.mul_(3.0)
        after = model.get_image_features(px["pixel_values"], px["image_grid_thw"])
    assert torch.isfinite(before).all() and (before - after).abs().max().item() > 1e-3


def test_attention_function_seam_reaches_vit_and_llm(case, forward):
    """A function registered with transformers' AttentionInterface sees every ViT and LLM attention call."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.append((type(module).__name__, module.layer_idx, tuple(query.shape)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("navil_test_capture", capture)
    AttentionMaskInterface.register("navil_test_capture", sdpa_mask)
    model = load_golden_case(case.variant).model
    model.set_attn_implementation("navil_test_capture")
    with torch.no_grad():
        logits = model(**case.image_inputs).logits
    torch.testing.assert_close(logits, forward.logits, atol=1e-6, rtol=1e-6)
    llm_layers = sorted(i for name, i, _ in seen if name.endswith("VEAttention"))
    assert llm_layers == list(range(model.config.llm_config.num_hidden_layers))
    vit_calls = [(i, shape) for name, i, shape in seen if name == "NaViLVisionAttention"]
    assert {i for i, _ in vit_calls} == set(range(model.config.vision_config.num_hidden_layers))
    # segments of equal length are batched: (n_segments, heads, length, head_dim) per call
    assert all(shape[1] == model.config.vision_config.num_attention_heads for _, shape in vit_calls)


def test_visual_features_and_image_flags_inputs(case, forward):
    px = case.pixel_inputs
    with torch.no_grad():
        features = case.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
        from_features = case.model(input_ids=case.inputs["input_ids"], visual_features=features).logits
        flagged = case.model(**case.image_inputs, image_flags=case.inputs["image_flags"]).logits
        dropped = torch.cat([features, features[:1]])  # one extra token, flagged out
        flags = torch.ones(dropped.shape[0], 1, dtype=torch.long)
        flags[-1] = 0
        filtered = case.model(input_ids=case.inputs["input_ids"], visual_features=dropped, image_flags=flags).logits
    for logits in (from_features, flagged, filtered):
        torch.testing.assert_close(logits, forward.logits, atol=0, rtol=0)
