"""Native transformers 5.x implementation of NaViL (no remote code, no flash-attn).

Importing this package registers the NaViL classes with transformers' Auto classes
(``AutoConfig``: ``navil_chat``, ``navil_vit``, ``navil_internlm2_ve``, ``navil_qwen3_ve``;
``AutoModel`` / ``AutoModelForImageTextToText``: :class:`NaViLForConditionalGeneration`).
"""
from __future__ import annotations

from navil_utils.models.configuration_navil import (
    InternLM2VEConfig,
    NaViLChatConfig,
    NaViLVisionConfig,
    Qwen3VEConfig,
)
from navil_utils.models.internlm2_ve import InternLM2VEForCausalLM
from navil_utils.models.loading import load_model, register_auto_classes
from navil_utils.models.modeling_navil import (
    NaViLForConditionalGeneration,
    NaViLImageFeatures,
)
from navil_utils.models.configuration_nvlm_d import NVLMDConfig
from navil_utils.models.modeling_nvlm_d import NVLMDForConditionalGeneration, load_nvlm_d, save_nvlm_d
from navil_utils.models.qwen3_ve import Qwen3VEForCausalLM
from navil_utils.models.vision import NaViLVisionModel, NaViLVisionOutput, window_layout

register_auto_classes()

__all__ = [
    "InternLM2VEConfig", "InternLM2VEForCausalLM", "NaViLChatConfig", "NaViLForConditionalGeneration",
    "NaViLImageFeatures", "NaViLVisionConfig", "NaViLVisionModel", "NaViLVisionOutput", "NVLMDConfig",
    "NVLMDForConditionalGeneration", "Qwen3VEConfig", "Qwen3VEForCausalLM", "load_model", "load_nvlm_d",
    "register_auto_classes", "save_nvlm_d", "window_layout",
]
