"""Configurations of the NaViL models this workbook builds: the full-size NaViL-2B / NaViL-9B and the tiny one.

The released ``config.json`` files were not obtainable offline, so the two configurations below are
assembled from:

* the paper's Table 6 (ViT depth / width / MLP width / heads; LLM depth / width / MLP width / heads);
* the public configs of the base LLMs NaViL starts from — InternLM2-1.8B (NaViL-2B) and Qwen3-8B
  (NaViL-9B): vocabulary, KV heads, head dim, RoPE, norm eps, token ids;
* the official code's defaults (``patch_size`` 16 as in its demo, ``downsample_ratio`` 0.5,
  pixel budgets 256 / 24576 patches, ``scale_downsample_ratio`` 0.7071).

Assumptions that do not change the parameter count by more than 0.01 %: ViT ``qkv_bias`` false
(reference default), ``qk_normalization`` false (True crashes the reference ViT), no window attention;
NaViL-2B's vocabulary = InternLM2's 92 544 rows + one row per NaViL image token (12).
Parameter counts against the paper: :mod:`navil_utils.analysis.parameters`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from navil_utils.constants import (
    NAVIL_MAX_DYNAMIC_PATCH,
    NAVIL_MERGE_SIZE,
    NAVIL_MIN_DYNAMIC_PATCH,
    NAVIL_SCALE_DOWNSAMPLE_RATIO,
    NAVIL_WINDOW_SIZE,
    SPECIAL_TOKEN_LIST,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
)
from navil_utils.errors import ConfigError

#: NaViL-2B: ViT 24×1472 (Table 6) + InternLM2-1.8B with modality experts.
NAVIL_2B: dict[str, Any] = {
    "architectures": ["NaViL"],
    "model_type": "navil_chat",
    "template": "internlm2-chat",
    "downsample_ratio": 1 / NAVIL_MERGE_SIZE,
    "force_image_size": 32,
    "anyres_image_size": True,
    "scale_downsample_ratio": NAVIL_SCALE_DOWNSAMPLE_RATIO,
    "min_dynamic_patch": NAVIL_MIN_DYNAMIC_PATCH,
    "max_dynamic_patch": NAVIL_MAX_DYNAMIC_PATCH,
    "select_layer": -1,
    "ps_version": "v2",
    "vision_config": {
        "model_type": "navil_vit",
        "patch_size": 16,
        "image_size": 32,
        "hidden_size": 1472,
        "num_hidden_layers": 24,
        "num_attention_heads": 23,
        "intermediate_size": 5888,
        "qkv_bias": False,
        "qk_normalization": False,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 0.1,
        "window_size": 8,
        "fullatt_block_indexes": None,
    },
    "llm_config": {
        "architectures": ["InternLM2VEForCausalLM"],
        "vocab_size": 92544 + len(SPECIAL_TOKEN_LIST),
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rms_norm_eps": 1e-5,
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}


#: NaViL-9B: ViT 32×1792 (Table 6) + Qwen3-8B with modality experts.
NAVIL_9B: dict[str, Any] = {
    **{k: v for k, v in NAVIL_2B.items() if k not in ("vision_config", "llm_config")},
    "template": "qwen3-chat",
    "vision_config": {
        **NAVIL_2B["vision_config"],
        "hidden_size": 1792,
        "num_hidden_layers": 32,
        "num_attention_heads": 28,
        "intermediate_size": 7168,
    },
    "llm_config": {
        "architectures": ["Qwen3VEForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}


FULL_SIZE_CONFIGS: dict[str, dict[str, Any]] = {"NaViL-2B": NAVIL_2B, "NaViL-9B": NAVIL_9B}


def navil_config_dict(name: str) -> dict[str, Any]:
    """A deep copy of the ``config.json``-style dict of ``"NaViL-2B"`` or ``"NaViL-9B"``."""
    from navil_utils.errors import ConfigError

    if name not in FULL_SIZE_CONFIGS:
        raise ConfigError(f"unknown NaViL size {name!r}; known: {sorted(FULL_SIZE_CONFIGS)}")
    return copy.deepcopy(FULL_SIZE_CONFIGS[name])


def _chat_config(name: str, overrides: Mapping[str, Any] | None):
    from navil_utils.models.configuration_navil import NaViLChatConfig

    config = navil_config_dict(name)
    for key, value in (overrides or {}).items():
        if key in ("vision_config", "llm_config") and isinstance(value, Mapping):
            config[key].update(value)
        else:
            config[key] = value
    return NaViLChatConfig(**config)


def navil_2b_config(**overrides: Any):
    """:class:`~navil_utils.models.configuration_navil.NaViLChatConfig` of NaViL-2B (see module doc).

    Keyword overrides replace top-level fields; ``vision_config={…}`` / ``llm_config={…}`` update
    the sub-dicts (e.g. ``llm_config={"num_hidden_layers": 2}`` for a shallow test model).
    """
    return _chat_config("NaViL-2B", overrides)


def navil_9b_config(**overrides: Any):
    """:class:`~navil_utils.models.configuration_navil.NaViLChatConfig` of NaViL-9B (see module doc)."""
    return _chat_config("NaViL-9B", overrides)


# ---------------------------------------------------------------------------------------------------
# Building on the meta device
# ---------------------------------------------------------------------------------------------------
def build_empty_model(config, dtype=None):
    """Instantiate the native NaViL model on the ``meta`` device (no memory, ~1 s for 16B parameters).

    ``dtype`` (e.g. ``torch.bfloat16``) sets the parameters' dtype, which the device-map planner uses.
    """
    from navil_utils.models.common import build_on_meta
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration

    return build_on_meta(NaViLForConditionalGeneration, config, dtype)


# ---------------------------------------------------------------------------------------------------
# the embedded tiny NaViL (data/models/navil-tiny)
#: Conversation template of the tiny model (NaViL-9B's, with the Qwen3-VE backbone).
TINY_TEMPLATE = "qwen3-chat"
#: Default system message of the tiny model (short: every token costs training compute).
TINY_SYSTEM_MESSAGE = "You answer questions about images."


def tiny_model_config(vocab_size: int, special_token_ids: dict[str, int] | None = None, *,
                      vit_width: int = 128, vit_layers: int = 4, vit_heads: int = 4,
                      llm_width: int = 192, llm_layers: int = 4, llm_heads: int = 4, llm_kv_heads: int = 2,
                      llm_intermediate: int = 512, patch_size: int = 16, merge_size: int = NAVIL_MERGE_SIZE,
                      vit_layer_scale: float = 0.1, vit_stem_channels: list[int] | None = None,
                      vit_window_size: int = NAVIL_WINDOW_SIZE, vit_full_attention_layers: list[int] | None = None,
                      min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS,
                      system_message: str | None = None, visual_experts: bool = True) -> dict[str, Any]:
    """The tiny NaViL's ``config.json`` content, in the official NaViL format (Qwen3-VE backbone).

    ``visual_experts=False`` builds a dense LLM instead (one set of weights for every token; an ablation,
    not a NaViL): its ``llm_config`` then carries ``"visual_experts": false``.

    ``min_dynamic_patch``/``max_dynamic_patch`` encode the pixel budget in units of ``patch_size²``;
    ``merge_size`` is the pixel-shuffle block side (``downsample_ratio = 1 / merge_size``): one LLM token shows
    ``(patch_size · merge_size)²`` pixels. ``vit_layer_scale`` is the ViT's initial layer-scale value
    (``vision_config.initializer_factor``); ``vit_stem_channels`` puts a small per-patch CNN before the patch
    projection (``vision_config.stem_channels``, a workbook extension the reference cannot load).
    ``vit_window_size`` (patches per window side) and ``vit_full_attention_layers`` (``fullatt_block_indexes``)
    set NaViL's window attention: layers not listed attend only within their window (default: every layer
    global, as the shipped model).
    """
    if max_pixels % (patch_size * patch_size) or min_pixels % (patch_size * patch_size):
        raise ConfigError(f"pixel budget {min_pixels}..{max_pixels} must be a multiple of patch_size²")
    config = {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "template": TINY_TEMPLATE,
        "downsample_ratio": 1 / merge_size,
        "force_image_size": 32,
        "anyres_image_size": True,
        "min_dynamic_patch": min_pixels // (patch_size * patch_size),
        "max_dynamic_patch": max_pixels // (patch_size * patch_size),
        "scale_downsample_ratio": NAVIL_SCALE_DOWNSAMPLE_RATIO,
        "select_layer": -1,
        "ps_version": "v2",
        "vision_config": {
            "model_type": "navil_vit",
            "patch_size": patch_size,
            "hidden_size": vit_width,
            "num_attention_heads": vit_heads,
            "intermediate_size": 4 * vit_width,
            "num_hidden_layers": vit_layers,
            "qk_normalization": False,
            "qkv_bias": True,
            "norm_type": "rms_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": vit_layer_scale,
            "window_size": vit_window_size,
            "fullatt_block_indexes": None if vit_full_attention_layers is None else list(vit_full_attention_layers),
            **({"stem_channels": list(vit_stem_channels)} if vit_stem_channels else {}),
            "image_size": 32,
            "downsample_ratio": 1 / merge_size,
        },
        "llm_config": {
            "architectures": ["Qwen3VEForCausalLM"],
            "vocab_size": vocab_size,
            "hidden_size": llm_width,
            "intermediate_size": llm_intermediate,
            "num_hidden_layers": llm_layers,
            "num_attention_heads": llm_heads,
            "num_key_value_heads": llm_kv_heads,
            "head_dim": llm_width // llm_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            **({} if visual_experts else {"visual_experts": False}),
        },
    }
    if special_token_ids:
        config["special_token_ids"] = dict(special_token_ids)
    if system_message is not None:
        config["system_message"] = system_message
    return config


# ---------------------------------------------------------------------------------------------------
# NVLM-D (the comparison system): configs live in configuration_nvlm_d, re-exported here with the others
def nvlm_d_72b_config(**overrides: Any):
    """:class:`~navil_utils.models.configuration_nvlm_d.NVLMDConfig` of NVLM-D-72B (see
    :func:`navil_utils.models.configuration_nvlm_d.nvlm_d_72b_config`)."""
    from navil_utils.models import configuration_nvlm_d

    return configuration_nvlm_d.nvlm_d_72b_config(**overrides)


def tiny_nvlm_d_config(vocab_size: int = 128, image_token_id: int | None = None, **sizes: Any):
    """A tiny NVLM-D config for tests (see :func:`navil_utils.models.configuration_nvlm_d.tiny_nvlm_d_config`)."""
    from navil_utils.models import configuration_nvlm_d

    return configuration_nvlm_d.tiny_nvlm_d_config(vocab_size, image_token_id, **sizes)


def build_empty_nvlm_d(config, dtype=None):
    """NVLM-D on the ``meta`` device (see :func:`navil_utils.models.modeling_nvlm_d.build_empty_nvlm_d`)."""
    from navil_utils.models import modeling_nvlm_d

    return modeling_nvlm_d.build_empty_nvlm_d(config, dtype)
