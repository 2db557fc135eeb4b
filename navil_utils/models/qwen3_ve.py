"""Qwen3 decoder with modality experts (the LLM of NaViL-9B), native transformers 5.x.

Checkpoint keys (prefix ``language_model.``): ``model.embed_tokens``, ``model.layers.{l}.self_attn.
{q,k,v,o}_proj{,_ve}``, ``self_attn.{q,k}_norm{,_ve}``, ``model.layers.{l}.mlp{,_ve}.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``.

Per token: visual tokens use ``q_norm_ve(q_proj_ve(x))``, ``k_norm_ve(k_proj_ve(x))``, ``v_proj_ve(x)`` and
``o_proj_ve`` (no composition, unlike InternLM2-VE); text tokens the plain versions.  q/k norms are
per-head RMSNorms over ``head_dim`` applied before RoPE; ``head_dim`` is independent of
``hidden_size / heads``.  Logits keep the model dtype (as in the reference).
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
from navil_utils.models.configuration_navil import Qwen3VEConfig
from navil_utils.models.decoder import VEDecoderForCausalLM, build_rotary


class Qwen3VEMLP(nn.Module):
    """SwiGLU FFN ``down(silu(gate x) · up x)`` (no bias)."""

    def __init__(self, config: Qwen3VEConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen3VEAttention(nn.Module):
    """Joint causal attention; q/k/v/o projections and q/k norms exist per modality."""

    is_causal = True

    def __init__(self, config: Qwen3VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        bias = config.attention_bias
        # registration order = checkpoint order (text expert, then its visual twin); it also fixes the order in
        # which a seeded initialisation draws the weights.  A dense LLM (visual_experts=False) has no twins.
        def twin(make):
            return make() if config.visual_experts else None

        self.q_proj, self.q_proj_ve = nn.Linear(hidden, q_out, bias=bias), twin(lambda: nn.Linear(hidden, q_out, bias=bias))
        self.k_proj, self.k_proj_ve = nn.Linear(hidden, kv_out, bias=bias), twin(lambda: nn.Linear(hidden, kv_out, bias=bias))
        self.v_proj, self.v_proj_ve = nn.Linear(hidden, kv_out, bias=bias), twin(lambda: nn.Linear(hidden, kv_out, bias=bias))
        self.o_proj, self.o_proj_ve = nn.Linear(q_out, hidden, bias=bias), twin(lambda: nn.Linear(q_out, hidden, bias=bias))
        self.q_norm = NaViLRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = NaViLRMSNorm(self.head_dim, config.rms_norm_eps)
        self.q_norm_ve = twin(lambda: NaViLRMSNorm(self.head_dim, config.rms_norm_eps))
        self.k_norm_ve = twin(lambda: NaViLRMSNorm(self.head_dim, config.rms_norm_eps))

    def _project(self, x: torch.Tensor, proj: nn.Linear, norm: NaViLRMSNorm | None) -> torch.Tensor:
        out = proj(x)
        if norm is None:
            return out
        return norm(out.view(*out.shape[:-1], -1, self.head_dim)).flatten(-2)

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
        heads = (batch, length, -1, self.head_dim)
        query = router(hidden_states, lambda x: self._project(x, self.q_proj, self.q_norm),
                       lambda x: self._project(x, self.q_proj_ve, self.q_norm_ve)).view(heads).transpose(1, 2)
        key = router(hidden_states, lambda x: self._project(x, self.k_proj, self.k_norm),
                     lambda x: self._project(x, self.k_proj_ve, self.k_norm_ve)).view(heads).transpose(1, 2)
        value = router(hidden_states, self.v_proj, self.v_proj_ve).view(heads).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention_name, eager_attention_forward)
        attn, probs = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0, sliding_window=self.sliding_window,
            **kwargs,
        )
        attn = attn.reshape(batch, length, self.num_heads * self.head_dim)
        return router(attn, self.o_proj, self.o_proj_ve), probs


class Qwen3VEDecoderLayer(GradientCheckpointingLayer):
    """``h = x + MHA_MMoE(input_layernorm(x)); out = h + FFN_MMoE(post_attention_layernorm(h))``."""

    def __init__(self, config: Qwen3VEConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3VEAttention(config, layer_idx)
        self.mlp = Qwen3VEMLP(config)
        self.mlp_ve = Qwen3VEMLP(config) if config.visual_experts else None
        self.input_layernorm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps)

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
        attn, probs = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings,
                                     cache, router, attention_name, **kwargs)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + router(self.post_attention_layernorm(hidden_states), self.mlp, self.mlp_ve)
        return hidden_states, probs


class Qwen3VEModel(nn.Module):
    """Embedding table, decoder layers, final norm and rotary embedding (``language_model.model``)."""

    def __init__(self, config: Qwen3VEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Qwen3VEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NaViLRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = build_rotary(config)


class Qwen3VEForCausalLM(VEDecoderForCausalLM):
    """Qwen3-VE decoder + ``lm_head`` (logits in the model dtype, like the reference)."""

    config: Qwen3VEConfig
    config_class = Qwen3VEConfig
    _no_split_modules = ["Qwen3VEDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Qwen3VEConfig) -> None:
        super().__init__(config)
        self.model = Qwen3VEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def embedding_module(self) -> nn.Embedding:
        return self.model.embed_tokens

    def lm_head_module(self) -> nn.Linear:
        return self.lm_head
