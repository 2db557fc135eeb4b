"""NVLM-D built from transformers' InternVL vision tower + Qwen2: config, pixel shuffle, embedding assembly,
tiling ↔ pad-token accounting, strict safetensors I/O in both key layouts, greedy generation.

No NVLM-D weights or reference outputs exist in this workbook: these tests check structure and bookkeeping
on tiny random models and on the 72B config built on the meta device.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLVisionConfig, Qwen2Config
from transformers.models.internvl.modeling_internvl import InternVLModel

from navil_utils.errors import (
    CheckpointNotFoundError,
    ConfigError,
    ModelInputError,
    WeightsMismatchError,
)
from navil_utils.models.configuration_nvlm_d import NVLMDConfig, nvlm_d_72b_config, tiny_nvlm_d_config
from navil_utils.models.modeling_nvlm_d import (
    INTERNVIT_KEY_MAP,
    NVLMDForConditionalGeneration,
    build_empty_nvlm_d,
    checkpoint_layout,
    from_published_state_dict,
    load_nvlm_d,
    pixel_shuffle,
    save_nvlm_d,
    to_published_state_dict,
)
from navil_utils.processing.tiling import (
    NVLM_IMAGE_CONTEXT_TOKEN,
    NVLM_TOKENS_PER_TILE,
    nvlm_image_span_ids,
    nvlm_image_span_text,
    nvlm_special_tokens,
    nvlm_token_count,
    plan_tiles,
    preprocess_tiles,
)

VOCAB = 128
SPECIAL = nvlm_special_tokens()                                    # 11 strings, the pad token last
TOKEN_IDS = {token: VOCAB - len(SPECIAL) + k for k, token in enumerate(SPECIAL)}
PAD_ID = TOKEN_IDS[NVLM_IMAGE_CONTEXT_TOKEN]                       # = 127


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = NVLMDForConditionalGeneration(tiny_nvlm_d_config(VOCAB, PAD_ID)).eval()
    # lift the zero-initialised class token / position embeddings so that every parameter matters
    with torch.no_grad():
        model.vision_model.embeddings.cls_token.normal_(std=0.02)
        model.vision_model.embeddings.position_embeddings.normal_(std=0.02)
    return model


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _prompt(num_tiles: int, tokens_per_tile: int, before: tuple[int, ...] = (5, 6, 7),
            after: tuple[int, ...] = (8, 9)) -> torch.Tensor:
    return torch.tensor([list(before) + nvlm_image_span_ids(num_tiles, TOKEN_IDS, tokens_per_tile) + list(after)])


def _sizes(config) -> dict:
    """``config.to_dict()`` without the bookkeeping fields loading fills in (dtype, source path)."""
    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("dtype", "_name_or_path")}
    return strip(config.to_dict())


# ----------------------------------------------------------------------------- config
def test_tiny_config_round_trips_through_to_dict_and_json(tmp_path):
    config = tiny_nvlm_d_config(VOCAB, PAD_ID)
    data = config.to_dict()
    assert data["model_type"] == "NVLM_D" and data["vision_config"]["model_type"] == "internvl_vision"
    assert "layer_types" not in data["llm_config"]                 # default list dropped, like NaViL's configs
    again = NVLMDConfig.from_dict(data)
    assert again.to_dict() == data
    assert isinstance(again.vision_config, InternVLVisionConfig) and isinstance(again.llm_config, Qwen2Config)
    assert (again.num_image_token, again.connector_input_size, again.connector_hidden_size) == (4, 128, 128)
    config.save_pretrained(str(tmp_path))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["image_token_id"] == PAD_ID and on_disk["llm_config"]["num_key_value_heads"] == 2
    assert NVLMDConfig.from_pretrained(str(tmp_path)).to_dict() == data


def test_published_internvit_vision_dict_is_translated():
    published_vision = {
        "model_type": "intern_vit_6b", "hidden_size": 3200, "num_attention_heads": 25, "intermediate_size": 12800,
        "num_hidden_layers": 45, "qk_normalization": True, "qkv_bias": False, "norm_type": "rms_norm",
        "layer_norm_eps": 1e-6, "image_size": 448, "patch_size": 14, "initializer_factor": 0.1,
        "use_flash_attn": True, "drop_path_rate": 0.4, "dropout": 0.0, "hidden_act": "gelu",
        "architectures": ["InternVisionModel"],
    }
    config = NVLMDConfig(vision_config=published_vision,
                         llm_config={**nvlm_d_72b_config().llm_config.to_dict(), "model_type": "qwen2"})
    vis = config.vision_config
    assert (vis.use_qk_norm, vis.attention_bias, vis.layer_scale_init_value, vis.use_mean_pooling) == (True, False, 0.1, True)
    assert vis.to_dict() | {"_name_or_path": ""} == nvlm_d_72b_config().vision_config.to_dict() | {"_name_or_path": ""}


def test_72b_config_and_meta_model_shapes():
    config = nvlm_d_72b_config()
    assert (config.tile_size, config.patches_per_side, config.merge_size) == (448, 32, 2)
    assert (config.num_image_token, config.connector_input_size, config.connector_hidden_size) == (256, 12800, 29568)
    assert config.num_image_token == NVLM_TOKENS_PER_TILE
    shapes = {k: tuple(v.shape) for k, v in build_empty_nvlm_d(config, torch.bfloat16).state_dict().items()}
    assert {k: v for k, v in shapes.items() if k.startswith("mlp1.")} == {
        "mlp1.0.weight": (12800,), "mlp1.0.bias": (12800,), "mlp1.1.weight": (29568, 12800), "mlp1.3.weight": (8192, 29568)}
    assert shapes["vision_model.embeddings.position_embeddings"] == (1, 1025, 3200)
    assert shapes["vision_model.encoder.layer.44.attention.q_proj.weight"] == (3200, 3200)
    assert shapes["vision_model.encoder.layer.44.attention.q_norm.weight"] == (3200,)
    assert "vision_model.encoder.layer.0.attention.q_proj.bias" not in shapes           # no qkv bias
    assert "vision_model.layernorm.weight" not in shapes                                # no final ViT norm
    assert shapes["language_model.model.layers.79.self_attn.k_proj.bias"] == (1024,)     # 8 KV heads × 128, qkv bias
    assert shapes["language_model.model.layers.79.mlp.gate_proj.weight"] == (29568, 8192)
    assert shapes["language_model.lm_head.weight"] == shapes["language_model.model.embed_tokens.weight"] == (152064, 8192)
    assert not any(k.startswith("language_model.model.layers.80.") for k in shapes)


@pytest.mark.parametrize("overrides, message", [
    ({"llm_config": {"architectures": ["LlamaForCausalLM"]}}, "Qwen2ForCausalLM"),
    ({"downsample_ratio": 0.3}, "1/m"),
    ({"vision_config": {"use_mean_pooling": False}}, "use_mean_pooling"),
    ({"image_token_id": 999}, "outside the vocabulary"),
    ({"vision_config": {"image_size": 60}}, "multiple of the patch size"),
    ({"ps_version": "v1"}, "ps_version"),
])
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_nvlm_d_config(VOCAB, **{"image_token_id": PAD_ID, **overrides})


# ----------------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_index_map_on_a_constructed_tensor():
    # value = 1000·n + 10·token + channel on a 4 × 4 grid of 3-channel tokens
    n, t, c = torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(3), indexing="ij")
    x = (1000 * n + 10 * t + c).float()
    out = pixel_shuffle(x, 2)
    assert out.shape == (2, 4, 12)
    # output token 0 = block (0, 0): tokens 0, 1 (top row), 4, 5 (bottom row), channels innermost
    assert out[0, 0].tolist() == [0, 1, 2, 10, 11, 12, 40, 41, 42, 50, 51, 52]
    # output token 3 = block (1, 1): tokens 10, 11, 14, 15 of image 1
    assert out[1, 3].tolist() == [1100, 1101, 1102, 1110, 1111, 1112, 1140, 1141, 1142, 1150, 1151, 1152]
    for i in range(2):
        for j in range(2):
            for dy in range(2):
                for dx in range(2):
                    source = (2 * i + dy) * 4 + 2 * j + dx
                    assert torch.equal(out[:, i * 2 + j, (dy * 2 + dx) * 3:(dy * 2 + dx + 1) * 3], x[:, source])
    # transformers' InternVL pixel shuffle (InternVL "v2", the released checkpoints' order) agrees
    features = torch.randn(3, 64, 5)
    reference = InternVLModel.pixel_shuffle(None, features.reshape(3, 8, 8, 5), 0.5).reshape(3, 16, 20)
    assert torch.equal(pixel_shuffle(features, 2), reference)
    # a 2 × 4 grid: two blocks side by side
    wide = torch.arange(8).float().reshape(1, 8, 1)
    assert pixel_shuffle(wide, 2, grid=(2, 4)).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]
    with pytest.raises(ModelInputError, match="not divisible"):
        pixel_shuffle(torch.zeros(1, 9, 2), 2)


# ----------------------------------------------------------------------------- embeddings and forward
def test_forward_shapes_loss_and_image_features(tiny):
    tiles = preprocess_tiles(_image(112, 168), image_size=56)
    assert tiles.grid == (3, 2) and tiles.pixel_values.shape == (7, 3, 56, 56)
    features = tiny.get_image_features(tiles.pixel_values)
    assert features.shape == (7, 4, 64)
    ids = _prompt(7, 4)
    assert ids.shape == (1, 3 + 1 + 7 * 5 + 1 + 2)
    out = tiny(input_ids=ids, pixel_values=tiles.pixel_values, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (1, ids.shape[1], VOCAB)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (1, ids.shape[1], 64)
    # loss = transformers' shifted CE with image-pad targets ignored
    targets = ids[0, 1:].masked_fill(ids[0, 1:] == PAD_ID, -100)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), targets, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert int((targets != -100).sum()) == ids.shape[1] - 1 - 28


def test_visual_tokens_land_exactly_at_the_pad_positions(tiny):
    tiles = preprocess_tiles(_image(112, 168, seed=1), image_size=56)
    ids = _prompt(tiles.num_tiles, 4)
    pads = (ids[0] == PAD_ID).nonzero().flatten()
    assert len(pads) == 28
    embeds = tiny.embed_inputs(ids, tiles.pixel_values)
    features = tiny.get_image_features(tiles.pixel_values).reshape(-1, 64)
    assert torch.equal(embeds[0, pads], features)                                   # in tile order, exactly
    others = (ids[0] != PAD_ID).nonzero().flatten()
    assert torch.equal(embeds[0, others], tiny.get_input_embeddings()(ids[0, others]))
    # the embeddings the decoder receives are these
    seen = {}
    hook = tiny.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        tiny(input_ids=ids, pixel_values=tiles.pixel_values)
    finally:
        hook.remove()
    assert torch.equal(seen["inputs_embeds"], embeds)
    # changing tile 2's pixels changes only slots 8..11 of the pad sequence
    changed = tiles.pixel_values.clone()
    changed[2] = torch.randn_like(changed[2])
    moved = (tiny.embed_inputs(ids, changed) != embeds).any(-1)[0]
    assert moved.nonzero().flatten().tolist() == pads[8:12].tolist()


def test_pad_count_mismatch_raises_model_input_error(tiny):
    tiles = preprocess_tiles(_image(112, 168), image_size=56)
    ids = _prompt(tiles.num_tiles, 4)
    one_short = torch.cat([ids[:, :5], ids[:, 6:]], dim=1)                      # drops one pad token
    with pytest.raises(ModelInputError, match=r"27 image pad tokens but the images give 28 visual tokens \(7 tiles × 4\)"):
        tiny(input_ids=one_short, pixel_values=tiles.pixel_values)
    with pytest.raises(ModelInputError, match="no pixel_values"):
        tiny(input_ids=ids)
    with pytest.raises(ModelInputError, match=r"pixel_values must be \[tiles, 3, 56, 56\]"):
        tiny(input_ids=ids, pixel_values=torch.zeros(7, 3, 448, 448))
    no_pad_id = NVLMDForConditionalGeneration(tiny_nvlm_d_config(VOCAB, PAD_ID))
    no_pad_id.config.image_token_id = None
    with pytest.raises(ConfigError, match="image_token_id is not set"):
        no_pad_id(input_ids=ids, pixel_values=tiles.pixel_values)


@pytest.mark.parametrize("height, width", [(112, 168), (56, 56), (448, 112), (600, 800), (1080, 1920)])
def test_pad_tokens_follow_the_tiling_plan(tiny, height, width):
    config = tiny.config
    plan = plan_tiles(height, width, max_num=6, image_size=config.tile_size)
    tiles = preprocess_tiles(_image(height, width), image_size=config.tile_size)
    assert tiles.num_tiles == plan.num_tiles <= 7
    ids = _prompt(plan.num_tiles, config.num_image_token)
    pads = int((ids == PAD_ID).sum())
    assert pads == config.num_image_token * plan.num_tiles
    assert pads == nvlm_token_count(height, width, image_size=config.tile_size, tokens_per_tile=config.num_image_token)
    # the ids are the tiling code's span text, token by token (each tag one token in the tiny vocabulary)
    pieces = re.findall("|".join(re.escape(s) for s in SPECIAL), nvlm_image_span_text(plan.num_tiles, 4))
    assert [TOKEN_IDS[p] for p in pieces] == ids[0, 3:-2].tolist()
    assert tiny(input_ids=ids, pixel_values=tiles.pixel_values).logits.shape == (1, ids.shape[1], VOCAB)


def test_72b_pad_tokens_for_a_1920x1080_image():
    config = nvlm_d_72b_config()
    plan = plan_tiles(1080, 1920, max_num=config.max_dynamic_patch, image_size=config.tile_size)
    assert (plan.grid, plan.num_tiles) == ((2, 1), 3)
    assert nvlm_token_count(1080, 1920) == 3 * config.num_image_token == 768


# ----------------------------------------------------------------------------- checkpoint layouts
def test_key_map_round_trips_and_fuses_qkv(tiny):
    state = tiny.state_dict()
    published = to_published_state_dict(state)
    layer0 = sorted(k for k in published if k.startswith("vision_model.encoder.layers.0."))
    assert layer0 == [f"vision_model.encoder.layers.0.{k}" for k in (
        "attn.k_norm.weight", "attn.proj.bias", "attn.proj.weight", "attn.q_norm.weight", "attn.qkv.weight",
        "ls1", "ls2", "mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "norm1.weight", "norm2.weight")]
    embeddings = sorted(k for k in published if k.startswith("vision_model.embeddings."))
    assert embeddings == ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.bias",
                          "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding"]
    qkv = published["vision_model.encoder.layers.1.attn.qkv.weight"]
    assert qkv.shape == (96, 32)
    prefix = "vision_model.encoder.layer.1.attention."
    assert torch.equal(qkv, torch.cat([state[prefix + "q_proj.weight"], state[prefix + "k_proj.weight"],
                                       state[prefix + "v_proj.weight"]]))
    assert {k for k in published if not k.startswith("vision_model.")} == {k for k in state if not k.startswith("vision_model.")}
    assert len(published) == len(state) - 2 * 2                      # 3 → 1 tensor per ViT layer
    back = from_published_state_dict(published)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert checkpoint_layout(published) == "published" and checkpoint_layout(state) == "native"
    assert len(INTERNVIT_KEY_MAP) == 18


@pytest.mark.parametrize("layout", ["native", "published"])
def test_safetensors_round_trip_in_both_layouts(tiny, tmp_path, layout):
    save_nvlm_d(tiny, tmp_path, layout)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("vision_model.encoder.layers.0.attn.qkv.weight" in names) == (layout == "published")
    assert ("vision_model.encoder.layer.0.attention.q_proj.weight" in names) == (layout == "native")
    loaded = load_nvlm_d(tmp_path)
    assert loaded.config._name_or_path == str(tmp_path)
    assert _sizes(loaded.config) == _sizes(tiny.config)
    reference = tiny.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.items())
    tiles = preprocess_tiles(_image(112, 168), image_size=56)
    ids = _prompt(tiles.num_tiles, 4)
    assert torch.equal(loaded(input_ids=ids, pixel_values=tiles.pixel_values).logits,
                       tiny(input_ids=ids, pixel_values=tiles.pixel_values).logits)
    assert isinstance(NVLMDForConditionalGeneration.from_pretrained(tmp_path), NVLMDForConditionalGeneration)


def test_transformers_save_pretrained_loads_strictly(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path))
    loaded = NVLMDForConditionalGeneration.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_strict_loading_raises_typed_errors(tiny, tmp_path):
    save_nvlm_d(tiny, tmp_path, "published")
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    qkv = "vision_model.encoder.layers.1.attn.qkv.weight"

    def write(state):
        save_file(state, str(file), metadata={"format": "pt"})

    write({k: v for k, v in tensors.items() if k != qkv})
    with pytest.raises(WeightsMismatchError, match="published NVLM-D layout.*1 missing key") as err:
        load_nvlm_d(tmp_path)
    assert err.value.missing == [qkv] and err.value.unexpected == []
    write({**tensors, "vision_model.encoder.layers.0.attn.extra": torch.zeros(2)})
    with pytest.raises(WeightsMismatchError, match="unexpected") as err:
        load_nvlm_d(tmp_path)
    assert err.value.unexpected == ["vision_model.encoder.layers.0.attn.extra"]
    write({**tensors, "mlp1.1.weight": torch.zeros(128, 127)})
    with pytest.raises(WeightsMismatchError, match="wrongly shaped") as err:
        NVLMDForConditionalGeneration.from_pretrained(tmp_path)
    assert err.value.mismatched == [("mlp1.1.weight", (128, 127), (128, 128))]
    with pytest.raises(CheckpointNotFoundError):
        load_nvlm_d(tmp_path / "nowhere")
    native = tmp_path / "native"
    save_nvlm_d(tiny, native, "native")
    native_tensors = load_file(str(native / "model.safetensors"))
    save_file({k: v for k, v in native_tensors.items() if k != "language_model.lm_head.weight"},
              str(native / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="native NVLM-D layout.*1 missing key") as err:
        NVLMDForConditionalGeneration.from_pretrained(native)
    assert err.value.missing == ["language_model.lm_head.weight"]
    write(tensors)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "navil_chat"}))
    with pytest.raises(ConfigError, match="expected 'NVLM_D'"):
        load_nvlm_d(tmp_path)


# ----------------------------------------------------------------------------- generation
def test_greedy_generate_matches_a_manual_argmax_loop(tiny):
    tiles = preprocess_tiles(_image(112, 168, seed=2), image_size=56)
    ids = _prompt(tiles.num_tiles, 4)
    generated = tiny.generate(input_ids=ids, pixel_values=tiles.pixel_values, attention_mask=torch.ones_like(ids),
                              max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5) and torch.equal(generated[:, :ids.shape[1]], ids)
    manual = ids
    with torch.no_grad():
        for _ in range(5):
            logits = tiny(input_ids=manual, pixel_values=tiles.pixel_values).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_left_padded_batch_generates_like_single_prompts(tiny):
    small = preprocess_tiles(_image(56, 56, seed=3), image_size=56)            # 1 tile
    wide = preprocess_tiles(_image(112, 168, seed=4), image_size=56)           # 7 tiles
    a, b = _prompt(small.num_tiles, 4), _prompt(wide.num_tiles, 4)
    singles = [tiny.generate(input_ids=p, pixel_values=t.pixel_values, max_new_tokens=3, do_sample=False)[0, p.shape[1]:]
               for p, t in ((a, small), (b, wide))]
    pad = b.shape[1] - a.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    out = tiny.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=False,
                        pixel_values=torch.cat([small.pixel_values, wide.pixel_values]))
    assert torch.equal(out[0, b.shape[1]:], singles[0]) and torch.equal(out[1, b.shape[1]:], singles[1])
