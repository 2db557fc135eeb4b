"""Native transformers 5.x implementation of NaViL (no remote code, no flash-attn).

Importing this package registers the NaViL classes with transformers' Auto classes
(``AutoConfig``: ``navil_chat``, ``navil_vit``, ``navil_internlm2_ve``, ``navil_qwen3_ve``;
``AutoModel`` / ``AutoModelForImageTextToText``: :class:`NaViLForConditionalGeneration`).
"""
from __future__ import annotations

from .configuration_navil import InternLM2VEConfig, NaViLChatConfig, NaViLVisionConfig, Qwen3VEConfig
from .internlm2_ve import InternLM2VEForCausalLM
from .loading import load_model, register_auto_classes
from .modeling_navil import NaViLForConditionalGeneration, NaViLImageFeatures
from .qwen3_ve import Qwen3VEForCausalLM
from .vision import NaViLVisionModel, NaViLVisionOutput, window_layout

register_auto_classes()

__all__ = [
    "InternLM2VEConfig", "InternLM2VEForCausalLM", "NaViLChatConfig", "NaViLForConditionalGeneration",
    "NaViLImageFeatures", "NaViLVisionConfig", "NaViLVisionModel", "NaViLVisionOutput", "Qwen3VEConfig",
    "Qwen3VEForCausalLM", "load_model", "register_auto_classes", "window_layout",
]
