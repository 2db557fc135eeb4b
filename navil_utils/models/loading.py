"""``load_model`` and the transformers Auto-class registration of NaViL.

``load_model(path)`` builds :class:`~navil_utils.models.NaViLForConditionalGeneration` from a checkpoint
directory or hub id through ``from_pretrained``, which checks every weight strictly first
(:mod:`navil_utils.models.checkpoint`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from navil_utils.models.configuration_navil import (
    InternLM2VEConfig,
    NaViLChatConfig,
    NaViLVisionConfig,
    Qwen3VEConfig,
)


# ----------------------------------------------------------------------------- public API
def load_model(
    path: str | os.PathLike,
    special_token_ids: Mapping[str, int] | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """Load a NaViL checkpoint as :class:`~navil_utils.models.NaViLForConditionalGeneration` (eval mode).

    Args:
        path: local directory (``config.json`` + ``model.safetensors`` or a sharded index) or a hub id.
        special_token_ids: ``{"<IMG_CONTEXT>": id, "<img>": id, ...}`` when the checkpoint has no tokenizer
            (the golden fixtures' ``meta.json`` holds them).  Otherwise they are read from the tokenizer files
            next to the weights, then from ``config.special_token_ids``.  Stored as
            ``model.special_token_ids`` / ``model.img_context_token_id`` / ``model.img_start_token_id``.
        dtype: e.g. ``torch.bfloat16``; None keeps the transformers default (the checkpoint's dtype).
        device_map: passed to transformers/accelerate (``"auto"``, ``"cpu"``, ``{"": 0}``, ...).
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, or a name registered with
            ``transformers.AttentionInterface`` (e.g. an attention-capture function).
        kwargs: further ``from_pretrained`` arguments (``revision``, ``cache_dir``, ``token``, ...).
    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, WeightsMismatchError, ConfigError, OfflineError,
        InvalidWeightsError (NaN/Inf values, or an integer tensor where the model has floating weights).
    """
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration

    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return NaViLForConditionalGeneration.from_pretrained(path, special_token_ids=special_token_ids, **kwargs)


def register_auto_classes() -> None:
    """Register the NaViL configs with ``AutoConfig`` and the model with ``AutoModel`` /
    ``AutoModelForImageTextToText`` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration

    for cls in (NaViLChatConfig, NaViLVisionConfig, InternLM2VEConfig, Qwen3VEConfig):
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
    AutoModel.register(NaViLChatConfig, NaViLForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(NaViLChatConfig, NaViLForConditionalGeneration, exist_ok=True)
