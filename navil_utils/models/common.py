"""Building blocks shared by the NaViL ViT and the two modality-expert decoders.

* :class:`NaViLRMSNorm` — both RMSNorm flavours of the reference (cast before / after the weight).
* :func:`eager_attention_forward` — the default attention function handed to transformers'
  ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` (the single attention seam of every NaViL module).
* :class:`ModalityRouter` — computes each modality expert only on its own tokens.
* :class:`NaViLTextRotaryEmbedding` — 1-D RoPE of the LLMs (default / linear / dynamic-NTK and every
  transformers rope type), stateless.
* :class:`NaViLCausalLMOutput` — output of :class:`~navil_utils.models.NaViLForConditionalGeneration`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the numerically sensitive steps (norms, softmax, RoPE) for a model of ``dtype``.

    float32 for float32/bf16/fp16 models, as in the reference code; float64 for a float64 model, so that a
    float64 run is float64 throughout (used to measure the reference's own float32 round-off).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


class NaViLRMSNorm(nn.Module):
    """RMSNorm over the last dim.

    ``weight_in_fp32=True``: ``(w · x̂_fp32).to(dtype)`` (InternLM2RMSNorm);
    ``weight_in_fp32=False``: ``w · x̂_fp32.to(dtype)`` (Qwen3RMSNorm, InternViT's InternRMSNorm).
    Both are identical in float32; they differ in the last bit in bf16.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_in_fp32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        shape = (hidden_states.shape[-1],)
        if input_dtype == compute_dtype(input_dtype) and self.weight.dtype == input_dtype:
            # one fused call, bit-identical to the steps below in this case (tests/test_fast_decode.py)
            return nn.functional.rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)
        x = nn.functional.rms_norm(hidden_states.to(compute_dtype(input_dtype)), shape, None, self.variance_epsilon)
        if self.weight_in_fp32:
            return (self.weight * x).to(input_dtype)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (RoPE "rotate-half" convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, Hkv, S, D) -> (B, Hkv·n_rep, S, D)`` (GQA key/value head repetition)."""
    if n_rep == 1:
        return hidden_states
    b, h, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention, transformers' attention-function signature.

    Args:
        query: ``(B, H, Lq, D)``; key, value: ``(B, Hkv, Lk, D)`` (GQA via ``module.num_key_value_groups``).
        attention_mask: None, a boolean mask (True = attend) or an additive float mask, broadcastable to
            ``(B, H, Lq, Lk)``.  With no mask and a causal module (``module.is_causal`` or ``is_causal``),
            the causal mask is applied here (queries are the last ``Lq`` of the ``Lk`` positions), so this
            function is also correct with the masks built for ``sdpa``.
    Returns:
        ``(attn_output (B, Lq, H, D), attn_probs (B, H, Lq, Lk))`` — softmax in float32 (float64 for a float64 model), cast back.
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if attention_mask is None and causal and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key_states.shape[2]
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
        attention_mask = q_pos >= torch.arange(k_len, device=query.device)[None, :]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=compute_dtype(query.dtype)).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return out, probs


def ensure_mask_function(name: str | None) -> None:
    """Give a custom attention implementation the padding/causal mask that ``sdpa`` gets.

    transformers builds masks per implementation name (``AttentionMaskInterface``); for a name registered
    only with ``AttentionInterface`` it builds *no* mask, so left-padded batches would silently attend to
    padding.  Our attention functions (and anything wrapping sdpa or eager) take sdpa's boolean masks,
    so an unregistered custom name gets ``sdpa_mask``.  Idempotent; built-in names are left alone.
    """
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        sdpa_mask,
    )

    if name and name not in ALL_MASK_ATTENTION_FUNCTIONS and name in ALL_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, sdpa_mask)


def register_attention_function(name: str, function: Callable[..., Any], mask_function: Callable[..., Any] | None = None
                                ) -> None:
    """Register ``function`` as attention implementation ``name`` together with its mask function.

    ``function(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` returns
    ``(output (B, Lq, H, D), probabilities or None)``; it sees ``module.layer_idx`` and, in the ViT, the
    segment keywords of :meth:`~navil_utils.models.vision.AttentionSegments.attend`.  Select it with
    ``load_model(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``.
    ``mask_function`` defaults to transformers' ``sdpa_mask`` (boolean, True = attend).
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    ALL_ATTENTION_FUNCTIONS.register(name, function)
    AttentionMaskInterface.register(name, mask_function or sdpa_mask)


def resolve_attention_implementation(config: PreTrainedConfig, output_attentions: bool) -> str:
    """The attention function name to use for one call.

    ``output_attentions=True`` under ``sdpa`` switches that call to ``eager`` (transformers would silently
    return no attentions); any other implementation (eager, custom registered capture functions) is
    used as configured.
    """
    name = config._attn_implementation or "sdpa"
    if output_attentions and name == "sdpa":
        return "eager"
    return name


class ModalityRouter:
    """Routes tokens to the text or the visual expert, computing each expert on its tokens only.

    Built once per forward from ``visual_token_mask`` ``(B, T)`` (True = visual expert); with no visual
    token (text-only prompts, every decode step) it is a no-op that calls the text expert on everything.
    """

    def __init__(self, visual_token_mask: torch.Tensor | None) -> None:
        self.visual_index: torch.Tensor | None = None
        self.text_index: torch.Tensor | None = None
        if visual_token_mask is not None:
            flat = visual_token_mask.reshape(-1).bool()
            if bool(flat.any()):
                self.visual_index = flat.nonzero().squeeze(1)
                self.text_index = (~flat).nonzero().squeeze(1)

    @property
    def has_visual(self) -> bool:
        return self.visual_index is not None

    def __call__(self, x: torch.Tensor, text_fn: Callable[[torch.Tensor], torch.Tensor],
                 visual_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply ``text_fn`` / ``visual_fn`` row-wise: ``x (..., Din) -> (..., Dout)``."""
        if self.visual_index is None:
            return text_fn(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        visual_out = visual_fn(flat.index_select(0, self.visual_index))
        out = visual_out.new_empty(flat.shape[0], visual_out.shape[-1]).index_copy(0, self.visual_index, visual_out)
        if self.text_index.numel():
            text_out = text_fn(flat.index_select(0, self.text_index))
            out = out.index_copy(0, self.text_index, text_out.to(out.dtype))
        return out.reshape(*lead, out.shape[-1])


class NaViLTextRotaryEmbedding(nn.Module):
    """1-D RoPE of the LLMs: ``cos, sin = f(position_ids)`` with shape ``(B, T, head_dim)``.

    Frequencies come from ``config.rope_parameters`` through transformers' ``ROPE_INIT_FUNCTIONS``
    (``default`` is ``1/θ^(2i/hd)``).  Stateless: dynamic-NTK recomputes the base from the largest position
    of the current call (the reference InternLM2 grows its base once and keeps it for later calls; within
    one generation both agree).
    """

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        self._static: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, float]] = {}

    def _default_parameters(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        base = self.config.rope_parameters["rope_theta"]
        dim = self.config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=dtype) / dim))
        return inv_freq, 1.0

    def _frequencies(self, device: torch.device, dtype: torch.dtype, seq_len: int) -> tuple[torch.Tensor, float]:
        if self.rope_type == "dynamic":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](self.config, device, seq_len=seq_len)
            return inv_freq.to(dtype), scaling
        key = (device, dtype)
        if key not in self._static:
            if self.rope_type == "default":
                self._static[key] = self._default_parameters(device, dtype)
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)
                self._static[key] = inv_freq.to(dtype), scaling
        return self._static[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(position_ids.max()) + 1 if self.rope_type == "dynamic" else 0
        dtype = compute_dtype(x.dtype)
        inv_freq, scaling = self._frequencies(x.device, dtype, seq_len)
        freqs = position_ids[..., None].to(dtype) * inv_freq                # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                              # (B, T, hd)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k ``(B, H, T, D)`` with cos/sin ``(B, T, D)`` (rotate-half convention)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class NaViLCausalLMOutput(ModelOutput):
    """Output of :class:`NaViLForConditionalGeneration`.

    Attributes:
        loss: mean next-token cross-entropy (reference convention, see ``loss_from_logits``) when ``labels``.
        logits: ``(B, T, V)``.
        cache: the updated KV cache (``use_cache``).
        hidden_states: ``L + 1`` tensors ``(B, T, H)``: the input embeddings after special-token and image
            substitution, the outputs of layers ``0 … L-2``, and the final-norm output (fixture convention).
        attentions: per layer ``(B, heads, T, T_total)`` probabilities when ``output_attentions``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class NaViLDecoderOutput(ModelOutput):
    """Output of the modality-expert decoders (``InternLM2VEForCausalLM`` / ``Qwen3VEForCausalLM``)."""

    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def build_on_meta(model_class: type, config: Any, dtype: torch.dtype | None = None):
    """``model_class(config)`` on the ``meta`` device (shapes, no memory), in eval mode; ``dtype`` sets the
    parameters' dtype (the default dtype is restored afterwards)."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with init_empty_weights(include_buffers=False):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
