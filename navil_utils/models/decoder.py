"""The decoder loop shared by the InternLM2-VE and Qwen3-VE language models.

Both backbones are a stack of pre-norm decoder layers whose attention projections and FFN exist twice
(text expert, visual expert); the expert of a token is chosen by ``visual_token_mask``.  This module
holds everything that does not depend on the backbone: the causal (+ padding) mask, positions,
the KV cache, routing, hidden-state collection and the LM head.  The backbone files only define the
layers and the parameter names of their checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from navil_utils.models.common import (
    ModalityRouter,
    NaViLDecoderOutput,
    NaViLTextRotaryEmbedding,
    compute_dtype,
    ensure_mask_function,
    resolve_attention_implementation,
)
from navil_utils.models.fast_decode import CPU_DECODE_ATTENTION, PreallocatedCache, uses_cpu_decode_attention


class VEDecoderForCausalLM(PreTrainedModel):
    """Base class of ``InternLM2VEForCausalLM`` / ``Qwen3VEForCausalLM`` (language model + LM head).

    Subclasses set ``self.model`` (with ``embedding``, ``layers``, ``norm``) and the head, and name
    them like the checkpoint keys.  ``forward`` takes *embeddings* (assembled by the NaViL wrapper) and
    the routing mask; it is not a text-only LLM API.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    upcast_logits = False  # InternLM2 returns float32 logits, Qwen3 logits keep the model dtype
    #: bf16/fp16 one-token steps on CPU under ``sdpa`` use :func:`~navil_utils.models.fast_decode.cpu_decode_attention`.
    cpu_decode_attention: bool = True

    def lm_head_module(self) -> nn.Linear:
        raise NotImplementedError

    def embedding_module(self) -> nn.Embedding:
        raise NotImplementedError

    def new_cache(self) -> Cache:
        """An empty KV cache for this decoder: :class:`~navil_utils.models.fast_decode.PreallocatedCache` (a step
        copies only its own keys/values), or transformers' ``DynamicCache`` when some layer uses a sliding window."""
        if all(kind == "full_attention" for kind in self.config.layer_types):
            return PreallocatedCache(self.config.num_hidden_layers)
        return DynamicCache(config=self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding_module()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head_module()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        visual_token_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **attention_kwargs: Any,
    ) -> NaViLDecoderOutput:
        """Run the decoder on assembled embeddings.

        Args:
            inputs_embeds: ``(B, T, H)``.
            attention_mask: ``(B, past + T)`` 1/0 padding mask (or a prepared 4-D mask), optional.
            position_ids: ``(B, T)``; default ``past + arange(T)``.
            cache: a transformers ``Cache`` (created when ``use_cache`` and None).
            visual_token_mask: ``(B, T)`` bool, True → visual experts; None → text experts for all (also
                ignored by a dense LLM, ``config.visual_experts=False``).
            logits_to_keep: 0 = all positions, k = last k positions.
            attention_kwargs: passed unchanged to every layer's attention function (with the module, whose
                ``layer_idx`` names the layer), e.g. options of a registered attention-recording function.
        Returns:
            :class:`NaViLDecoderOutput` (logits ``(B, T', V)``, cache, hidden states, attentions).
        """
        model = self.model
        batch, length, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = self.new_cache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None].expand(batch, -1)

        ensure_mask_function(self.config._attn_implementation)
        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           cache=cache, position_ids=position_ids)
        layer_types = self.config.layer_types      # read once: config attribute access is slow in transformers 5
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        attention_name = resolve_attention_implementation(self.config, output_attentions)
        if self.cpu_decode_attention and uses_cpu_decode_attention(attention_name, inputs_embeds):
            attention_name = CPU_DECODE_ATTENTION     # bf16/fp16 CPU sdpa is slow for one query (fast_decode)
        router = ModalityRouter(visual_token_mask if self.config.visual_experts else None)
        position_embeddings = model.rotary_emb(inputs_embeds, position_ids)

        hidden = inputs_embeds
        all_hidden: list[torch.Tensor] = [hidden] if output_hidden_states else []
        all_attentions: list[torch.Tensor] = []
        for index, layer in enumerate(model.layers):
            hidden, probs = layer(hidden, attention_mask=masks[layer_types[index]],
                                  position_embeddings=position_embeddings, cache=cache, router=router,
                                  attention_name=attention_name, **attention_kwargs)
            if output_hidden_states and index < len(model.layers) - 1:
                all_hidden.append(hidden)
            if output_attentions and probs is not None:
                all_attentions.append(probs)
        hidden = model.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)

        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head_module()(kept)
        if self.upcast_logits:
            logits = logits.to(compute_dtype(logits.dtype))
        return NaViLDecoderOutput(
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


def build_rotary(config) -> NaViLTextRotaryEmbedding:
    """The LLM's rotary embedding (a module, so that it is part of ``model``)."""
    return NaViLTextRotaryEmbedding(config)
