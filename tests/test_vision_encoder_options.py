"""Encoder options of the tiny model: the per-patch convolutional stem (``vision_config.stem_channels``, a
workbook extension for small encoders trained from scratch; off by default, so every official checkpoint keeps
its exact key set) and NaViL's window attention as tiny-model options."""
from __future__ import annotations

import pytest
import torch

from navil_utils.errors import ConfigError
from navil_utils.models import load_model
from navil_utils.models.configuration_navil import NaViLChatConfig, NaViLVisionConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.models.presets import tiny_model_config
from navil_utils.models.vision import NaViLVisionEmbeddings
from navil_utils.paths import repo_root
from navil_utils.processing.tokenizers import navil_token_ids
from navil_utils.tiny.tokenizer import load_tiny_tokenizer

SMALL_VIT = {"vit_width": 32, "vit_layers": 1, "vit_heads": 2}


def _model(**options) -> NaViLForConditionalGeneration:
    tokenizer = load_tiny_tokenizer(repo_root() / "data/models/navil-tiny")
    torch.manual_seed(0)
    return NaViLForConditionalGeneration(NaViLChatConfig(**tiny_model_config(
        len(tokenizer), navil_token_ids(tokenizer), **SMALL_VIT, **options)))


def test_without_a_stem_the_keys_are_the_reference_ones():
    keys = [k for k in _model().state_dict() if ".embeddings." in k]
    assert keys == ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias"]
    assert "stem_channels" not in _model().config.vision_config.to_dict()      # config.json unchanged too


def test_the_stem_is_a_small_cnn_applied_to_each_patch_alone():
    config = NaViLVisionConfig(patch_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                               num_hidden_layers=1, stem_channels=[8, 16], downsample_ratio=0.5)
    embeddings = NaViLVisionEmbeddings(config)
    assert [type(m).__name__ for m in embeddings.stem] == ["Conv2d", "GELU", "Conv2d", "GELU"]
    assert embeddings.patch_embedding.kernel_size == (4, 4) and embeddings.patch_embedding.in_channels == 16
    torch.manual_seed(0)
    patches = torch.randn(5, 3, 16, 16)
    out = embeddings(patches)
    assert out.shape == (5, 32)
    # patches are independent: each row equals the embedding of that patch alone; flat input is accepted
    torch.testing.assert_close(out[2:3], embeddings(patches[2:3]))
    torch.testing.assert_close(out, embeddings(patches.reshape(5, -1)))
    expected = embeddings.patch_embedding(embeddings.stem[3](embeddings.stem[2](embeddings.stem[1](
        embeddings.stem[0](patches))))).flatten(1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("stem, patch", [([0], 16), ([8, 8, 8, 8, 8], 16), ([8, 8], 14)])
def test_a_stem_that_cannot_fit_the_patch_is_a_config_error(stem, patch):
    with pytest.raises(ConfigError, match="stem_channels"):
        NaViLVisionConfig(patch_size=patch, hidden_size=32, num_attention_heads=2, stem_channels=stem,
                          downsample_ratio=0.5)


def test_a_model_with_a_stem_saves_and_reloads_strictly(tmp_path):
    model = _model(vit_stem_channels=[8, 16]).eval()
    assert {k for k in model.state_dict() if ".stem." in k} == {
        f"vision_model.embeddings.stem.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.config.vision_config.stem_channels == [8, 16]
    pixels = torch.randn(8, 3, 16, 16)
    grid = torch.tensor([[1, 2, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again.get_image_features(pixels, grid), model.get_image_features(pixels, grid))


def test_window_attention_options_keep_windows_apart_until_a_global_layer():
    """8 x 8 patches, windows of 4 x 4 patches: with no global layer a change inside one window leaves every
    other window's visual tokens unchanged; with the last layer global it reaches them."""
    pixels = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 8, 8]])
    changed = pixels.clone()
    changed[0] += 1.0                                  # patch (0, 0): window 0 (patches are in merge-block order)
    for layers, expect_isolated in (([], True), ([0], False)):
        model = _model(vit_window_size=4, vit_full_attention_layers=layers).eval()
        assert model.config.vision_config.fullatt_block_indexes == layers
        with torch.no_grad():
            out = model.get_vision_outputs(pixels, grid)
            moved = (model.get_vision_outputs(changed, grid).features - out.features).abs().amax(-1)
        window = model.config.vision_config.window_size // model.config.merge_size        # 2 x 2 tokens
        first_window = out.window_index[: window * window]
        assert bool((moved[: window * window] > 0).all())
        others = moved[window * window:]
        assert bool((others == 0).all()) == expect_isolated, (layers, others)
        assert sorted(first_window.tolist()) == [0, 1, 4, 5]                    # tokens (0,0),(0,1),(1,0),(1,1)
