"""InternLM2 decoder with modality experts (the LLM of NaViL-2B), native transformers 5.x.

Checkpoint keys (prefix ``language_model.``): ``model.tok_embeddings``, ``model.layers.{l}.attention.
{wqkv,wqkv_ve,wo,wo_ve}``, ``model.layers.{l}.feed_forward{,_ve}.w{1,2,3}``, ``attention_norm``,
``ffn_norm``, ``model.norm``, ``output``.

Behaviour of the official code reproduced on purpose:

* **visual tokens get ``wo_ve(wo(a))``** — the visual output projection is applied *on top of* the text
  one (reference bug, present in its eager and flash paths; the released weights were presumably
  trained with it).  ``wo`` is computed once for every token, ``wo_ve`` only on visual tokens.
* ``wqkv`` rows are interleaved per KV group: group ``j`` holds query heads ``j·g … j·g+g-1``, then key
  head ``j``, then value head ``j`` (``g = heads / kv_heads``).
* RMSNorm multiplies by the weight in float32 before casting back; logits are returned in float32.
* Routing is by ``visual_token_mask`` only (``<IMG_CONTEXT>`` and ``<img>`` in the prompt); during
  decoding the wrapper passes no mask, so generated tokens always use the text experts.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from navil_utils.models.common import (
    ModalityRouter,
    NaViLRMSNorm,
    apply_rotary,
    eager_attention_forward,
)
from navil_utils.models.configuration_navil import InternLM2VEConfig
from navil_utils.models.decoder import VEDecoderForCausalLM, build_rotary


class InternLM2VEMLP(nn.Module):
    """SwiGLU FFN ``w2(silu(w1 x) · w3 x)`` (w1 = gate, w3 = up, w2 = down; no bias)."""

    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2VEAttention(nn.Module):
    """Joint causal attention with per-modality fused ``wqkv`` and output projections."""

    is_causal = True

    def __init__(self, config: InternLM2VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        qkv_out = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        out = self.num_heads * self.head_dim
        # registration order = checkpoint order (see Qwen3VEAttention); no visual twins in a dense LLM
        self.wqkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.wqkv_ve = nn.Linear(config.hidden_size, qkv_out, bias=config.bias) if config.visual_experts else None
        self.wo = nn.Linear(out, config.hidden_size, bias=config.bias)
        self.wo_ve = nn.Linear(out, config.hidden_size, bias=config.bias) if config.visual_experts else None

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpack the interleaved ``(B, T, (nh + 2·nkv)·hd)`` projection into q ``(B, nh, T, hd)``, k, v."""
        batch, length, _ = qkv.shape
        groups = self.num_key_value_groups
        qkv = qkv.view(batch, length, self.num_key_value_heads, groups + 2, self.head_dim)
        query = qkv[..., :groups, :].reshape(batch, length, self.num_heads, self.head_dim)
        key = qkv[..., groups, :]
        value = qkv[..., groups + 1, :]
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def _visual_output(self, attn: torch.Tensor) -> torch.Tensor:
        # Reference behaviour: the visual expert's projection is applied after the text one.
        return self.wo_ve(self.wo(attn))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        router: ModalityRouter,
        attention_name: str,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        query, key, value = self._split_heads(router(hidden_states, self.wqkv, self.wqkv_ve))
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention_name, eager_attention_forward)
        attn, probs = attention_interface(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0,
                                          **kwargs)
        attn = attn.reshape(batch, length, self.num_heads * self.head_dim)
        return router(attn, self.wo, self._visual_output), probs


class InternLM2VEDecoderLayer(GradientCheckpointingLayer):
    """``h = x + MHA_MMoE(attention_norm(x)); out = h + FFN_MMoE(ffn_norm(h))`` (norms shared)."""

    def __init__(self, config: InternLM2VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2VEAttention(config, layer_idx)
        self.feed_forward = InternLM2VEMLP(config)
        self.feed_forward_ve = InternLM2VEMLP(config) if config.visual_experts else None
        self.attention_norm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.ffn_norm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        router: ModalityRouter | None = None,
        attention_name: str = "sdpa",
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        router = router if router is not None else ModalityRouter(None)
        attn, probs = self.attention(self.attention_norm(hidden_states), attention_mask, position_embeddings,
                                     cache, router, attention_name, **kwargs)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + router(self.ffn_norm(hidden_states), self.feed_forward, self.feed_forward_ve)
        return hidden_states, probs


class InternLM2VEModel(nn.Module):
    """Embedding table, decoder layers, final norm and rotary embedding (``language_model.model``)."""

    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([InternLM2VEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        self.rotary_emb = build_rotary(config)


class InternLM2VEForCausalLM(VEDecoderForCausalLM):
    """InternLM2-VE decoder + ``output`` head (float32 logits, like the reference)."""

    config: InternLM2VEConfig
    config_class = InternLM2VEConfig
    _no_split_modules = ["InternLM2VEDecoderLayer"]
    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}
    upcast_logits = True

    def __init__(self, config: InternLM2VEConfig) -> None:
        super().__init__(config)
        self.model = InternLM2VEModel(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def embedding_module(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def lm_head_module(self) -> nn.Linear:
        return self.output
