"""NaViL as an ordinary transformers 5.x model: ViT → pixel shuffle → MLP connector → MMoE LLM.

:class:`NaViLForConditionalGeneration` loads the official checkpoint format (same keys as the
reference ``NaViL`` class: ``vision_model.*``, ``mlp1.*``, ``special_token_embedding.weight``,
``language_model.*``) without remote code or flash-attn, and offers ``forward`` (logits, loss, hidden
states, attentions), ``generate`` (``GenerationMixin`` + ``DynamicCache``: greedy, sampling, beam search,
batched with left padding) and ``get_image_features``.

Behaviour of the official code kept on purpose:

* Embedding assembly: the 12 NaViL special tokens take rows of ``special_token_embedding`` instead of the
  LLM table; ``<IMG_CONTEXT>`` positions take the visual tokens in row-major order (all images, each
  image's scales smallest → largest, each scale in *window order*).
* Expert routing: ``visual_token_mask = <IMG_CONTEXT> | <img>``; ``</img>`` and the break tokens use the
  text experts.  Without an image input (``pixel_values``/``visual_features``) every token uses the
  text experts.
* Decoding: tokens produced by ``generate`` are embedded with the **plain LLM table** and routed to the
  **text experts**, even when they are special tokens such as ``<img>`` (the reference's
  prefill/decode inconsistency, which the golden generations depend on).  With and without KV cache the
  same rule holds: prompt positions use the assembled prompt embeddings, generated positions do not.
  A direct ``forward`` call with a non-empty ``cache`` is treated as such a decode step.

Deliberate differences: ``generate`` returns the prompt **followed by** the new tokens (the reference
returns only the new tokens); ``forward`` works without ``labels``; position ids follow the attention
mask (``cumsum − 1``) in ``forward`` too, so left-padded batches match one-by-one runs (the reference's
``forward`` ignores padding); ``pixel_values`` are cast to the ViT dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    SPECIAL_TOKEN_LIST,
)
from navil_utils.errors import ConfigError, ModelInputError, WeightsMismatchError
from navil_utils.models.checkpoint import (
    check_finite_weights,
    prepare_pretrained,
    special_token_ids_from_tokenizer_files,
)
from navil_utils.models.common import NaViLCausalLMOutput, compute_dtype
from navil_utils.models.fast_decode import prepare_cpu_decode
from navil_utils.models.configuration_navil import (
    INTERNLM2_VE_ARCHITECTURE,
    QWEN3_VE_ARCHITECTURE,
    NaViLChatConfig,
)
from navil_utils.models.internlm2_ve import InternLM2VEForCausalLM
from navil_utils.models.qwen3_ve import Qwen3VEForCausalLM
from navil_utils.models.vision import NaViLVisionModel

LLM_CLASSES: dict[str, type[PreTrainedModel]] = {
    INTERNLM2_VE_ARCHITECTURE: InternLM2VEForCausalLM,
    QWEN3_VE_ARCHITECTURE: Qwen3VEForCausalLM,
}


@dataclass
class NaViLImageFeatures(ModelOutput):
    """Intermediates of the vision path for a batch of image-scales.

    Attributes:
        vision_last_hidden_state: ``(n, m, m, D)`` ViT output, merge blocks in window order.
        pixel_shuffled: ``(n, m²·D)`` the pixel-shuffled blocks (row-major flatten of each block).
        features: ``(n, H)`` ``mlp1`` output = the visual tokens placed into the ``<IMG_CONTEXT>`` slots.
        window_index: ``(n,)`` block permutation (window order → raster block index of the scales).
        vision_hidden_states / vision_attentions: as in :class:`~navil_utils.models.NaViLVisionOutput`, when
            requested (tokens in window order; one ``(heads, L, L)`` map per attention segment).
    """

    vision_last_hidden_state: torch.Tensor | None = None
    pixel_shuffled: torch.Tensor | None = None
    features: torch.Tensor | None = None
    window_index: torch.Tensor | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_attentions: tuple[list[torch.Tensor], ...] | None = None


class NaViLPreTrainedModel(PreTrainedModel):
    config: NaViLChatConfig
    config_class = NaViLChatConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NaViLVisionEncoderLayer", "InternLM2VEDecoderLayer", "Qwen3VEDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Connector: PyTorch-default linear init (as the reference, which never re-initialises ``mlp1``);
        special-token embedding: ``N(0, llm initializer_range)`` like the LLM's own table."""
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.llm_config.initializer_range)


class NaViLForConditionalGeneration(NaViLPreTrainedModel, GenerationMixin):
    """NaViL chat model (vision encoder + connector + modality-expert LLM) with generation.

    Construct from a config (random init, for training from scratch) or load with
    :func:`navil_utils.load_model` / ``from_pretrained`` (strict: every key must match).  The special-token
    ids (needed to assemble embeddings) come from ``special_token_ids`` of the loader, the checkpoint's
    tokenizer files, ``config.special_token_ids``, or :meth:`set_special_token_ids`.

    ``generate`` decodes with a preallocated KV cache and readies the language model's CPU linears for one-row
    products (float32: wide weights stored column-major in place; bfloat16: oneDNN-prepacked copies) and, for
    bf16/fp16 on CPU, computes the attention of one-token steps in float32 (see
    :mod:`navil_utils.models.fast_decode`); set ``cpu_decode_kernels = False`` on the model or class to keep
    PyTorch's default kernels and layouts.
    """

    #: ``generate`` readies the language model's CPU linears for decoding (see the class docstring).
    cpu_decode_kernels: bool = True

    def __init__(self, config: NaViLChatConfig) -> None:
        super().__init__(config)
        arch = config.llm_architecture
        hidden = config.llm_config.hidden_size
        vit_width = config.vision_config.hidden_size * config.merge_size ** 2
        self.vision_model = NaViLVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vit_width), nn.Linear(vit_width, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden))
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKEN_LIST), hidden)
        self.language_model = LLM_CLASSES[arch](config.llm_config)
        self.special_token_ids: dict[str, int] | None = None
        self.post_init()
        if config.special_token_ids:
            self.set_special_token_ids(config.special_token_ids)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: NaViLChatConfig | str | os.PathLike | None = None,
                        special_token_ids: dict[str, int] | None = None, **kwargs: Any):
        """Strict ``from_pretrained``: names, shapes and dtypes of every tensor are checked before loading,
        and the loaded floating weights must be finite (:class:`~navil_utils.errors.InvalidWeightsError`).

        Accepts a local checkpoint directory or a hub id (see :func:`navil_utils.models.loading.load_model`
        for the errors raised); ``special_token_ids`` as in ``load_model``.  Used by ``AutoModel`` too.
        """
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only")
                      if kwargs.get(k) is not None}
        directory, config = prepare_pretrained(pretrained_model_name_or_path, config, hub_kwargs, {}, cls)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(str(directory), *model_args, config=config,
                                              output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        unexpected = sorted(info.get("unexpected_keys") or [])
        mismatched = sorted(info.get("mismatched_keys") or [])
        if missing or unexpected or mismatched or info.get("error_msgs"):
            raise WeightsMismatchError(f"loading {directory} left missing {missing}, unexpected {unexpected}, "
                                       f"mismatched {mismatched}, errors {info.get('error_msgs')}",
                                       missing, unexpected, mismatched)
        check_finite_weights(model, directory)
        ids = special_token_ids or special_token_ids_from_tokenizer_files(directory) or config.special_token_ids
        if ids:
            model.set_special_token_ids(ids)
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ special tokens
    def set_special_token_ids(self, special_token_ids: dict[str, int]) -> None:
        """Register the id of each special token (``{"<IMG_CONTEXT>": 7, "<img>": 9, ...}``).

        ``<IMG_CONTEXT>`` and ``<img>`` are required; the other NaViL special tokens are optional (absent ones
        simply never get a ``special_token_embedding`` row).  Extra entries (e.g. ``<|im_end|>``) are kept in
        :attr:`special_token_ids` for chat helpers.  The map is also stored in ``config.special_token_ids``
        so that :meth:`save_pretrained` round-trips it.
        """
        ids = {str(k): int(v) for k, v in dict(special_token_ids).items()}
        missing = [t for t in (IMG_CONTEXT_TOKEN, IMG_START_TOKEN) if t not in ids]
        if missing:
            raise ConfigError(f"special_token_ids lacks {missing}; got keys {sorted(ids)}")
        vocab = self.config.llm_config.vocab_size
        bad = {k: v for k, v in ids.items() if not 0 <= v < vocab}
        if bad:
            raise ConfigError(f"special token ids outside the vocabulary [0, {vocab}): {bad}")
        self.special_token_ids = ids
        self.config.special_token_ids = dict(ids)
        self.img_context_token_id = ids[IMG_CONTEXT_TOKEN]
        self.img_start_token_id = ids[IMG_START_TOKEN]
        self.img_end_token_id = ids.get(IMG_END_TOKEN)
        self._special_rows = [ids.get(token, -1) for token in SPECIAL_TOKEN_LIST]

    def _require_special_ids(self) -> None:
        if self.special_token_ids is None:
            raise ConfigError("special-token ids are unknown: pass special_token_ids= to load_model, put tokenizer "
                              "files next to the checkpoint, or call model.set_special_token_ids({...})")

    # ------------------------------------------------------------------ vision path
    def get_vision_outputs(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                           output_hidden_states: bool = False, output_attentions: bool = False) -> NaViLImageFeatures:
        """Run ViT, pixel shuffle and ``mlp1``; return every intermediate (see :class:`NaViLImageFeatures`)."""
        vision = self.vision_model(pixel_values, image_grid_thw, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions)
        last = vision.last_hidden_state                                     # (n, m, m, D)
        shuffled = last.reshape(last.shape[0], -1)                          # (n, m²·D)
        return NaViLImageFeatures(vision_last_hidden_state=last, pixel_shuffled=shuffled,
                                  features=self.mlp1(shuffled), window_index=vision.window_index,
                                  vision_hidden_states=vision.hidden_states, vision_attentions=vision.attentions)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(n_visual_tokens, H)`` for ``pixel_values`` ``(N, 3, p, p)`` and grids ``(G, 3)``."""
        return self.get_vision_outputs(pixel_values, image_grid_thw).features

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Assemble the prompt embeddings ``(B, T, H)`` and the expert mask ``(B, T)`` (None if text-only).

        ``image_flags`` ``(n, 1)`` keeps only the visual tokens whose flag is 1 (reference ``forward``);
        ``visual_features`` ``(n, H)`` replaces the vision path when given.
        """
        self._require_special_ids()
        if input_ids.ndim != 2:
            raise ModelInputError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        embeds = self.get_input_embeddings()(input_ids)
        rows = torch.tensor(self._special_rows, dtype=input_ids.dtype, device=input_ids.device)
        matches = input_ids.unsqueeze(-1) == rows                           # (B, T, 12)
        is_special = matches.any(-1)
        if bool(is_special.any()):
            index = matches.to(torch.uint8).argmax(-1).to(self.special_token_embedding.weight.device)
            special = self.special_token_embedding(index).to(device=embeds.device, dtype=embeds.dtype)
            embeds = torch.where(is_special.unsqueeze(-1), special, embeds)

        context = input_ids == self.img_context_token_id
        if visual_features is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ModelInputError("pixel_values given without image_grid_thw")
            visual_features = self.get_image_features(pixel_values, image_grid_thw)
        if visual_features is None:
            if bool(context.any()):
                raise ModelInputError(f"input_ids hold {int(context.sum())} <IMG_CONTEXT> tokens but no "
                                      "pixel_values/visual_features were given")
            return embeds, None
        if image_flags is not None:
            visual_features = visual_features[image_flags.reshape(-1).to(visual_features.device) == 1]
        if int(context.sum()) != visual_features.shape[0]:
            raise ModelInputError(f"input_ids hold {int(context.sum())} <IMG_CONTEXT> tokens but the images give "
                                  f"{visual_features.shape[0]} visual tokens (check image_grid_thw / the prompt)")
        visual_features = visual_features.to(device=embeds.device, dtype=embeds.dtype)
        embeds = embeds.masked_scatter(context.unsqueeze(-1), visual_features)
        return embeds, context | (input_ids == self.img_start_token_id)

    def _step_inputs(self, input_ids: torch.LongTensor, past: int, prompt_inputs_embeds: torch.Tensor,
                     prompt_visual_token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings/mask of positions ``past … past+T-1`` during ``generate``: prompt positions reuse the
        assembled prompt, generated positions use the plain table and the text experts."""
        prompt_len = prompt_inputs_embeds.shape[1]
        length = input_ids.shape[1]
        n_prompt = max(0, min(prompt_len - past, length))
        parts, masks = [], []
        if n_prompt:
            parts.append(prompt_inputs_embeds[:, past:past + n_prompt])
            if prompt_visual_token_mask is not None:
                masks.append(prompt_visual_token_mask[:, past:past + n_prompt].bool())
        if n_prompt < length:
            generated = input_ids[:, n_prompt:]
            parts.append(self.get_input_embeddings()(generated))
            masks.append(torch.zeros_like(generated, dtype=torch.bool))
        embeds = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if prompt_visual_token_mask is None or not n_prompt:
            return embeds, None
        return embeds, torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_flags: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        visual_token_mask: torch.Tensor | None = None,
        prompt_inputs_embeds: torch.Tensor | None = None,
        prompt_visual_token_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
    ) -> NaViLCausalLMOutput | tuple:
        """Full forward pass.

        Args:
            input_ids: ``(B, T)``, one ``<IMG_CONTEXT>`` per visual token.
            pixel_values: ``(N, 3, p, p)`` patches of all images/scales; image_grid_thw: ``(G, 3)``.
            attention_mask: ``(B, past + T)`` 1 = token, 0 = padding (left padding supported).
            labels: ``(B, T)``; loss = mean CE of ``logits[:, :-1]`` vs ``labels[:, 1:]`` ignoring -100 and
                predictions made from ``<IMG_CONTEXT>`` positions (see :meth:`loss_from_logits`).
            inputs_embeds / visual_token_mask: bypass the embedding assembly (advanced).
            prompt_inputs_embeds / prompt_visual_token_mask: set by :meth:`generate` (internal).
            cache / past_key_values: KV cache; a non-empty cache makes this a decode step (plain
                embeddings, text experts — the reference's decoding behaviour).
        Returns:
            :class:`NaViLCausalLMOutput` with ``logits (B, T, V)``, ``loss``, ``cache``, ``hidden_states``
            (``L+1`` tensors, fixture convention) and ``attentions``.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = bool(use_cache) if use_cache is not None else False
        output_attentions = bool(output_attentions)
        output_hidden_states = bool(output_hidden_states)
        past = cache.get_seq_length() if cache is not None else 0

        if inputs_embeds is None:
            if input_ids is None:
                raise ModelInputError("pass input_ids (or inputs_embeds)")
            if prompt_inputs_embeds is not None:
                inputs_embeds, visual_token_mask = self._step_inputs(input_ids, past, prompt_inputs_embeds,
                                                                     prompt_visual_token_mask)
            elif past > 0:
                if pixel_values is not None or visual_features is not None:
                    raise ModelInputError("images can only be given with an empty cache (prefill)")
                inputs_embeds, visual_token_mask = self.get_input_embeddings()(input_ids), None
            else:
                inputs_embeds, visual_token_mask = self.embed_inputs(input_ids, pixel_values, image_grid_thw,
                                                                     image_flags, visual_features)
        length = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2 \
                and attention_mask.shape[1] == past + length:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -length:]

        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, visual_token_mask=visual_token_mask, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, logits_to_keep=logits_to_keep,
        )
        loss = None
        if labels is not None:
            loss = self.loss_from_logits(out.logits, labels, input_ids if prompt_inputs_embeds is None else None)
        result = NaViLCausalLMOutput(loss=loss, logits=out.logits, cache=out.cache,
                                     hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.LongTensor,
                         input_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (float32; float64 for a float64 model), reference convention.

        Position ``i`` (predicting ``labels[i+1]``) counts iff ``labels[i+1] != -100`` and — when ``input_ids``
        are known — the *input* token ``i`` is not ``<IMG_CONTEXT>`` (the reference also drops predictions
        made from visual-token positions).
        """
        shift_labels = labels[:, 1:].to(logits.device)
        if input_ids is not None and self.special_token_ids is not None:
            from_visual = input_ids[:, :-1].to(logits.device) == self.img_context_token_id
            shift_labels = shift_labels.masked_fill(from_visual, -100)
        shift_logits = logits[:, :-1].to(compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
        return nn.functional.cross_entropy(shift_logits, shift_labels.reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | ModelOutput:
        """Generate with transformers' ``GenerationMixin`` (greedy, sampling, beam search, ...).

        The prompt is embedded once (special tokens, images); generated tokens use the plain embedding table
        and the text experts (reference behaviour).  Batches with left padding need ``attention_mask``.

        Returns:
            ``(B, T + new)`` ids — the prompt **followed by** the new tokens (unlike the reference ``generate``,
            which returns only the new tokens); or a generate output object when
            ``return_dict_in_generate=True``.
        """
        if input_ids is None:
            raise ModelInputError("generate needs input_ids (the prompt with one <IMG_CONTEXT> per visual token)")
        embeds, visual_mask = self.embed_inputs(input_ids, pixel_values, image_grid_thw, image_flags,
                                                visual_features)
        if self.cpu_decode_kernels:
            prepare_cpu_decode(self.language_model)        # idempotent; a no-op for weights not on the CPU
        self.language_model.cpu_decode_attention = self.cpu_decode_kernels
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("use_cache", config.use_cache) is not False and kwargs.get("past_key_values") is None \
                and kwargs.get("cache") is None:
            kwargs["cache"] = self.language_model.new_cache()
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, prompt_inputs_embeds=embeds,
                                prompt_visual_token_mask=visual_mask, **kwargs)
