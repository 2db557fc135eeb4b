"""Configuration of NVLM-D (NVIDIA's decoder-only NVLM 1.0, arXiv 2409.11402), the comparison system.

:class:`NVLMDConfig` (``model_type = "NVLM_D"``, the published checkpoint's type) holds

* ``vision_config`` — a transformers :class:`~transformers.InternVLVisionConfig` describing
  InternViT-6B-448px-V1-5 (45 layers, width 3200, FFN 12800, 25 heads of 128, RMSNorm ε 1e-6, QK-norm,
  no qkv bias, layer scale, 14-px patches on 448² tiles, class token computed and dropped after the ViT);
* ``llm_config`` — a transformers :class:`~transformers.Qwen2Config` (Qwen2-72B-Instruct for NVLM-D-72B);
* the connector: pixel shuffle with ``downsample_ratio`` 0.5 (2×2 tokens → one token of 4× the width) and
  ``mlp1`` = LayerNorm(4·D) → Linear(4·D, ``connector_hidden_size``, no bias) → GELU → Linear(…, H, no bias).
  ``connector_hidden_size`` defaults to the LLM's FFN width (29,568 for the 72B model: 12800 → 29568 → 8192,
  NVLM paper §4.2);
* ``image_token_id`` — the id of the image pad token (``<|vision_pad|>`` in the released tokenizer) whose
  positions receive the visual tokens.

A ``vision_config`` written in InternViT's own format (the published checkpoint's ``config.json``:
``model_type = "intern_vit_6b"``, ``qk_normalization``, ``qkv_bias``, ``initializer_factor``, …) is translated
to the transformers fields by :func:`internvit_to_internvl_vision_config`; a Qwen2 ``llm_config`` is read
unchanged (``rope_theta`` becomes transformers-5 ``rope_parameters``).  Sizes: :func:`nvlm_d_72b_config`
(from the NVLM paper §4.5, the NVLM-D-72B model card and the public Qwen2-72B / InternViT-6B-448px-V1-5
configs — the checkpoint's own ``config.json`` was not available offline) and :func:`tiny_nvlm_d_config`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from transformers import InternVLVisionConfig, PreTrainedConfig, Qwen2Config

from navil_utils.errors import ConfigError

NVLM_D_MODEL_TYPE = "NVLM_D"
#: ``llm_config["architectures"][0]`` accepted for NVLM-D's decoder.
QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"

#: Keys of InternViT's own config that transformers' InternVLVisionConfig spells differently.
INTERNVIT_CONFIG_RENAMES: dict[str, str] = {
    "qk_normalization": "use_qk_norm",
    "qkv_bias": "attention_bias",
    "initializer_factor": "layer_scale_init_value",  # InternViT initialises ls1/ls2 with initializer_factor
    "dropout": "hidden_dropout_prob",
}
#: InternViT config keys with no counterpart (flash-attn switch, stochastic depth, remote-code metadata).
INTERNVIT_CONFIG_DROPPED: tuple[str, ...] = (
    "use_flash_attn", "drop_path_rate", "model_type", "architectures", "auto_map", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path",
)
_LLM_DROPPED: tuple[str, ...] = ("model_type", "attn_implementation", "_attn_implementation",
                                 "_attn_implementation_autoset", "use_flash_attn", "transformers_version",
                                 "_name_or_path", "auto_map")


def _is_internvit_dict(vision: Mapping[str, Any]) -> bool:
    return vision.get("model_type") == "intern_vit_6b" or any(k in vision for k in ("qk_normalization", "qkv_bias",
                                                                                       "use_flash_attn"))


def internvit_to_internvl_vision_config(vision: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an InternViT ``vision_config`` dict (published NVLM-D / InternVL-1.5 format) into
    :class:`~transformers.InternVLVisionConfig` keyword arguments.

    ``qk_normalization`` → ``use_qk_norm``, ``qkv_bias`` → ``attention_bias``, ``initializer_factor`` →
    ``layer_scale_init_value``, ``dropout`` → ``hidden_dropout_prob``; flash-attn / drop-path / remote-code
    keys are dropped; ``use_mean_pooling`` is forced True (InternViT has no final norm: with
    ``use_mean_pooling=True`` transformers' final ``layernorm`` is an identity).
    """
    out: dict[str, Any] = {}
    for key, value in vision.items():
        if key in INTERNVIT_CONFIG_DROPPED:
            continue
        out[INTERNVIT_CONFIG_RENAMES.get(key, key)] = value
    out["use_mean_pooling"] = True
    return out


def build_vision_config(vision: dict | PreTrainedConfig | None) -> InternVLVisionConfig:
    """``vision_config`` (InternVLVisionConfig, its dict, or an InternViT-format dict) → InternVLVisionConfig."""
    if isinstance(vision, InternVLVisionConfig):
        return vision
    if isinstance(vision, PreTrainedConfig):
        raise ConfigError(f"vision_config must be an InternVLVisionConfig, got {type(vision).__name__}")
    if vision is None:
        vision = {}
    if not isinstance(vision, Mapping):
        raise ConfigError(f"vision_config must be a dict, got {type(vision).__name__}")
    if _is_internvit_dict(vision):
        kwargs = internvit_to_internvl_vision_config(vision)
    else:
        model_type = vision.get("model_type", InternVLVisionConfig.model_type)
        if model_type != InternVLVisionConfig.model_type:
            raise ConfigError(f"vision_config model_type {model_type!r} is neither "
                              f"{InternVLVisionConfig.model_type!r} nor 'intern_vit_6b'")
        kwargs = {k: v for k, v in vision.items() if k not in INTERNVIT_CONFIG_DROPPED}
    try:
        return InternVLVisionConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid vision_config: {err}") from err


def build_llm_config(llm: dict | PreTrainedConfig | None) -> Qwen2Config:
    """``llm_config`` (Qwen2Config or its dict; ``architectures[0]`` must be ``Qwen2ForCausalLM``) → Qwen2Config."""
    if isinstance(llm, Qwen2Config):
        return llm
    if isinstance(llm, PreTrainedConfig):
        raise ConfigError(f"llm_config must be a Qwen2Config, got {type(llm).__name__}")
    if llm is None:
        llm = {}
    if not isinstance(llm, Mapping):
        raise ConfigError(f"llm_config must be a dict, got {type(llm).__name__}")
    architectures = llm.get("architectures") or [QWEN2_ARCHITECTURE]
    if architectures[0] != QWEN2_ARCHITECTURE:
        raise ConfigError(f"NVLM-D's decoder must be {QWEN2_ARCHITECTURE}; llm_config names {architectures[0]!r}")
    kwargs = {k: v for k, v in llm.items() if k not in _LLM_DROPPED}
    kwargs["architectures"] = [QWEN2_ARCHITECTURE]
    try:
        return Qwen2Config(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid llm_config: {err}") from err


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class NVLMDConfig(PreTrainedConfig):
    """Composite NVLM-D config: InternViT (``vision_config``) + pixel shuffle + MLP connector + Qwen2.

    Fields kept for the preprocessing/chat side (not used by the model): ``min_dynamic_patch`` /
    ``max_dynamic_patch`` (tiles per image, the card's example uses 1…6), ``use_thumbnail``,
    ``dynamic_image_size``, ``template``, ``ps_version`` (only ``"v2"`` — InternVL's corrected pixel shuffle —
    is implemented).  ``select_layer`` picks the ViT hidden state fed to the connector (−1 = last layer).
    """

    model_type = NVLM_D_MODEL_TYPE
    sub_configs_defaults = {"vision_config": InternVLVisionConfig, "llm_config": Qwen2Config}

    vision_config: dict | InternVLVisionConfig | None = None
    llm_config: dict | Qwen2Config | None = None
    downsample_ratio: float = 0.5
    connector_hidden_size: int | None = None
    image_token_id: int | None = None
    select_layer: int = -1
    ps_version: str = "v2"
    force_image_size: int | None = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    template: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.vision_config = build_vision_config(self.vision_config)
        self.llm_config = build_llm_config(self.llm_config)
        if self.connector_hidden_size is None:
            self.connector_hidden_size = int(self.llm_config.intermediate_size)
        super().__post_init__(**kwargs)
        self.validate_nvlm_d()

    # ------------------------------------------------------------------ checks and derived sizes
    def validate_nvlm_d(self) -> None:
        """Raise :class:`ConfigError` if the sizes cannot build an NVLM-D model."""
        vis, llm = self.vision_config, self.llm_config
        if vis.hidden_size % vis.num_attention_heads:
            raise ConfigError(f"vision hidden_size {vis.hidden_size} is not divisible by "
                              f"num_attention_heads {vis.num_attention_heads}")
        if not vis.use_mean_pooling:
            raise ConfigError("vision_config.use_mean_pooling must be True: InternViT has no final norm "
                              "(transformers adds a LayerNorm when it is False)")
        ratio = float(self.downsample_ratio)
        if ratio <= 0 or abs(1 / ratio - round(1 / ratio)) > 1e-6:
            raise ConfigError(f"downsample_ratio must be 1/m for an integer m, got {self.downsample_ratio}")
        if self.ps_version != "v2":
            raise ConfigError(f"only ps_version 'v2' (InternVL's pixel shuffle) is implemented, got {self.ps_version!r}")
        (ih, iw), (ph, pw) = _pair(vis.image_size), _pair(vis.patch_size)
        if ih != iw or ph != pw:
            raise ConfigError(f"NVLM-D tiles are square: image_size {vis.image_size}, patch_size {vis.patch_size}")
        if ih % ph:
            raise ConfigError(f"tile size {ih} is not a multiple of the patch size {ph}")
        if (ih // ph) % self.merge_size:
            raise ConfigError(f"{ih // ph} patches per side cannot be merged in groups of {self.merge_size}")
        if self.force_image_size is not None and int(self.force_image_size) != ih:
            raise ConfigError(f"force_image_size {self.force_image_size} differs from vision image_size {ih}")
        if not -vis.num_hidden_layers - 1 <= self.select_layer < vis.num_hidden_layers + 1:
            raise ConfigError(f"select_layer {self.select_layer} out of range for {vis.num_hidden_layers} ViT layers")
        if llm.num_attention_heads % (llm.num_key_value_heads or llm.num_attention_heads):
            raise ConfigError(f"LLM heads {llm.num_attention_heads} not a multiple of KV heads {llm.num_key_value_heads}")
        if self.connector_hidden_size < 1:
            raise ConfigError(f"connector_hidden_size must be positive, got {self.connector_hidden_size}")
        if self.image_token_id is not None and not 0 <= int(self.image_token_id) < llm.vocab_size:
            raise ConfigError(f"image_token_id {self.image_token_id} outside the vocabulary [0, {llm.vocab_size})")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ConfigError(f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, "
                              f"{self.max_dynamic_patch}")

    @property
    def merge_size(self) -> int:
        """Side ``m`` of the square of ViT tokens merged by the pixel shuffle (2 for ratio 0.5)."""
        return round(1 / float(self.downsample_ratio))

    @property
    def tile_size(self) -> int:
        """Tile side in pixels (448 for NVLM-D-72B)."""
        return _pair(self.vision_config.image_size)[0]

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // _pair(self.vision_config.patch_size)[0]

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: ``(S/p)² / m²`` = 1024 / 4 = 256 for NVLM-D-72B."""
        return self.patches_per_side ** 2 // self.merge_size ** 2

    @property
    def connector_input_size(self) -> int:
        """Width after the pixel shuffle: ``m² · D`` (12,800 for NVLM-D-72B)."""
        return self.vision_config.hidden_size * self.merge_size ** 2

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The Qwen2 config (transformers uses it for caches and generation defaults)."""
        return self.llm_config

    def to_dict(self) -> dict[str, Any]:
        """Serialise; the LLM's ``layer_types`` is left out when it is the all-``full_attention`` default."""
        output = super().to_dict()
        llm = output.get("llm_config")
        if isinstance(llm, dict) and llm.get("layer_types") == ["full_attention"] * llm.get("num_hidden_layers", -1):
            llm.pop("layer_types")
        return output


# ---------------------------------------------------------------------------------------------------
# presets
#: InternViT-6B-448px-V1-5 as transformers fields (public InternViT config: qk_normalization true,
#: qkv_bias false, rms_norm ε 1e-6, initializer_factor 0.1; NVLM paper §3.1 / Megatron ``internvit``).
INTERNVIT_6B_448PX_V1_5: dict[str, Any] = {
    "model_type": "internvl_vision",
    "hidden_size": 3200,
    "num_hidden_layers": 45,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "attention_bias": False,
    "use_qk_norm": True,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "layer_scale_init_value": 0.1,
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
}

#: Qwen2-72B-Instruct (80 × 8192, FFN 29568, 64 heads / 8 KV groups, qkv bias, RoPE θ 1e6, untied;
#: NVLM paper §4.5 + Megatron SFT script; vocabulary 152,064 from the public Qwen2-72B config).
QWEN2_72B: dict[str, Any] = {
    "architectures": [QWEN2_ARCHITECTURE],
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

NVLM_D_72B: dict[str, Any] = {
    "architectures": ["NVLM_D"],
    "model_type": NVLM_D_MODEL_TYPE,
    "downsample_ratio": 0.5,
    "connector_hidden_size": 29568,
    "select_layer": -1,
    "ps_version": "v2",
    "force_image_size": 448,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "use_thumbnail": True,
    "vision_config": INTERNVIT_6B_448PX_V1_5,
    "llm_config": QWEN2_72B,
}


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key in ("vision_config", "llm_config") and isinstance(value, Mapping):
            config[key].update(copy.deepcopy(dict(value)))
        else:
            config[key] = value
    return config


def nvlm_d_72b_config(**overrides: Any) -> NVLMDConfig:
    """:class:`NVLMDConfig` of NVLM-D-72B (InternViT-6B-448px-V1-5 + 12800→29568→8192 MLP + Qwen2-72B).

    Keyword overrides replace top-level fields; ``vision_config={…}`` / ``llm_config={…}`` update the
    sub-dicts (e.g. ``llm_config={"num_hidden_layers": 2}``).  ``image_token_id`` is left unset (the
    released tokenizer's id of ``<|vision_pad|>`` is not part of this workbook).
    """
    return NVLMDConfig(**_merged(NVLM_D_72B, overrides))


def tiny_nvlm_d_config(vocab_size: int = 128, image_token_id: int | None = None, *, tile_size: int = 56,
                       patch_size: int = 14, vit_width: int = 32, vit_layers: int = 2, vit_heads: int = 2,
                       llm_width: int = 64, llm_layers: int = 2, llm_heads: int = 4, llm_kv_heads: int = 2,
                       llm_intermediate: int = 128, connector_hidden: int | None = None,
                       max_tiles: int = 6, **overrides: Any) -> NVLMDConfig:
    """A tiny NVLM-D with the 72B model's structure, for tests and CPU experiments.

    Defaults: 56-px tiles of 14-px patches → 16 ViT tokens → **4 LLM tokens per tile**; ViT 2 × 32 (QK-norm,
    RMSNorm, layer scale as InternViT-6B); Qwen2 2 × 64 with 4 heads / 2 KV heads; ``image_token_id`` defaults
    to the last vocabulary row.
    """
    config = {
        "architectures": ["NVLM_D"],
        "downsample_ratio": 0.5,
        "connector_hidden_size": connector_hidden if connector_hidden is not None else llm_intermediate,
        "image_token_id": vocab_size - 1 if image_token_id is None else image_token_id,
        "max_dynamic_patch": max_tiles,
        "vision_config": {
            **INTERNVIT_6B_448PX_V1_5,
            "hidden_size": vit_width, "num_hidden_layers": vit_layers, "num_attention_heads": vit_heads,
            "intermediate_size": 4 * vit_width, "image_size": tile_size, "patch_size": patch_size,
        },
        "llm_config": {
            **QWEN2_72B,
            "vocab_size": vocab_size, "hidden_size": llm_width, "intermediate_size": llm_intermediate,
            "num_hidden_layers": llm_layers, "num_attention_heads": llm_heads, "num_key_value_heads": llm_kv_heads,
            "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": None, "eos_token_id": None,
        },
    }
    return NVLMDConfig(**_merged(config, overrides))
