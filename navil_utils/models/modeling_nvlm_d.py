"""NVLM-D (arXiv 2409.11402, NVLM-D-72B model card) built from transformers' own classes.

Architecture (one image = ``T`` tiles of ``S × S`` pixels, thumbnail included):

    pixel_values [T, 3, S, S]
      → vision_model  = transformers InternVLVisionModel (InternViT-6B-448px-V1-5 at full size)
                        [T, 1 + (S/p)², D]; the class token is dropped → [T, (S/p)², D]
      → pixel_shuffle  2×2 neighbouring tokens concatenated → [T, (S/p)²/4, 4·D]   (1024 → 256, 3200 → 12800)
      → mlp1           LayerNorm(4D) → Linear(4D, F, no bias) → GELU → Linear(F, H, no bias)  [T, n, H]
      → written, in order, over the ``image_token_id`` (``<|vision_pad|>``) positions of the prompt, which the
        tiling code lays out as ``<Image><tile_1>`` + n pads + … + ``<tile_global_thumbnail>`` + n pads + ``</Image>``
      → language_model = transformers Qwen2ForCausalLM → logits [B, L, V]

State-dict names of :class:`NVLMDForConditionalGeneration` (the *native* layout) are the published
checkpoint's for ``mlp1.*`` (``mlp1.0`` LayerNorm, ``mlp1.1`` / ``mlp1.3`` Linear) and ``language_model.*``
(``language_model.model.layers.N…``, ``language_model.lm_head.weight``), but **not** for the ViT:
transformers names InternViT's tensors differently and splits its fused ``attn.qkv`` into q/k/v projections.
:data:`INTERNVIT_KEY_MAP` is the explicit renaming; :func:`to_published_state_dict` /
:func:`from_published_state_dict` convert whole state dicts (the qkv tensor is concatenated / chunked along
the output dim: rows ``[0, D)`` = q, ``[D, 2D)`` = k, ``[2D, 3D)`` = v).  :func:`load_nvlm_d` reads either
layout strictly; :func:`save_nvlm_d` writes either.

What transformers' InternVL vision classes express of InternViT-6B-448px-V1-5 (checked layer by layer):
patch conv 14/14 with bias, class token + 1025 learned absolute position embeddings (bicubic interpolation
only for other tile sizes — never used by NVLM-D), 45 pre-norm layers with RMSNorm (fp32 variance, weight
applied after the cast back, as InternRMSNorm), QK-norm as an RMSNorm over the *full* width before the head
split, no q/k/v bias, output projection with bias, layer scale (``ls1``/``ls2`` ↔ ``lambda_1``/``lambda_2``),
GELU MLP with biases, no final norm (``use_mean_pooling=True`` makes transformers' ``layernorm`` an identity).
Differences: (1) the fused ``qkv`` weight becomes three tensors (a lossless split, see above);
(2) transformers' q/k norms always use ε = 1e-6 instead of ``layer_norm_eps`` — equal for InternViT-6B
(ε = 1e-6), so no numerical difference; (3) position-embedding interpolation (not used at 448² tiles) runs
in the weight dtype instead of float32.  25 heads × 128 need no padding (the dummy heads of vLLM / Megatron
exist only for tensor parallelism).

No numerical reference for NVLM-D exists in this workbook (unlike NaViL, whose golden fixtures come from the
official code): no NVLM-D weights, logits or activations were available.  The tests therefore prove structure
and bookkeeping, not numerics of the released model: shapes and parameter counts from the config, the pixel
shuffle's index map on a constructed tensor (and agreement with transformers' InternVL pixel shuffle), that
visual tokens land exactly at the pad positions (count mismatch → :class:`~navil_utils.errors.ModelInputError`),
pad-token accounting against the tiling plan, strict safetensors round trips in both key layouts, and greedy
generation on a tiny random model.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, InternVLVisionModel, PreTrainedModel, Qwen2ForCausalLM
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from navil_utils.errors import (
    ConfigError,
    ModelInputError,
    WeightsMismatchError,
)
from navil_utils.models.checkpoint import (
    WEIGHTS_NAME,
    check_finite_weights,
    checkpoint_headers,
    compare_state_shapes,
    read_config_json,
    resolve_checkpoint,
    weight_files,
)
from navil_utils.models.configuration_nvlm_d import NVLM_D_MODEL_TYPE, NVLMDConfig

#: The image pad token of the released NVLM-D tokenizer (one per visual token).
NVLM_D_IMAGE_PAD_TOKEN = "<|vision_pad|>"


# ---------------------------------------------------------------------------------------------------
# pixel shuffle
def pixel_shuffle(features: torch.Tensor, merge_size: int = 2, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Merge each ``m × m`` block of ViT tokens into one token of ``m²`` times the width (InternVL "v2").

    Args:
        features: ``[N, h·w, C]`` tokens in row-major order (class token already removed).
        merge_size: ``m`` (2 for NVLM-D: 1024 → 256 tokens, 3200 → 12800 channels).
        grid: ``(h, w)``; default square ``h = w = √(h·w)``.
    Returns:
        ``[N, (h/m)·(w/m), m²·C]`` with
        ``out[n, i·(w/m) + j, (dy·m + dx)·C + c] = features[n, (m·i + dy)·w + (m·j + dx), c]``:
        output tokens row-major over blocks, channels ordered by the position inside the block
        (row offset ``dy`` major, column offset ``dx`` minor), then the original channel.
    """
    n, length, channels = features.shape
    if grid is None:
        side = round(length ** 0.5)
        grid = (side, side)
    h, w = grid
    if h * w != length:
        raise ModelInputError(f"pixel_shuffle: grid {h}x{w} does not hold {length} tokens")
    if h % merge_size or w % merge_size:
        raise ModelInputError(f"pixel_shuffle: grid {h}x{w} is not divisible by merge size {merge_size}")
    blocks = features.reshape(n, h // merge_size, merge_size, w // merge_size, merge_size, channels)
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)                  # [n, h/m, w/m, dy, dx, C]
    return blocks.reshape(n, (h // merge_size) * (w // merge_size), merge_size * merge_size * channels)


# ---------------------------------------------------------------------------------------------------
# key layouts: transformers' InternVL vision names ↔ the published InternViT names
#: Native (transformers InternVLVisionModel) name → published InternViT name, below ``vision_model.``;
#: ``{i}`` is the layer index.  The q/k/v projections are handled by :data:`QKV_NATIVE` / ``attn.qkv``.
INTERNVIT_KEY_MAP: dict[str, str] = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.position_embeddings": "embeddings.position_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "encoder.layer.{i}.lambda_1": "encoder.layers.{i}.ls1",
    "encoder.layer.{i}.lambda_2": "encoder.layers.{i}.ls2",
    "encoder.layer.{i}.attention.projection_layer.weight": "encoder.layers.{i}.attn.proj.weight",
    "encoder.layer.{i}.attention.projection_layer.bias": "encoder.layers.{i}.attn.proj.bias",
    "encoder.layer.{i}.attention.q_norm.weight": "encoder.layers.{i}.attn.q_norm.weight",
    "encoder.layer.{i}.attention.k_norm.weight": "encoder.layers.{i}.attn.k_norm.weight",
    "encoder.layer.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "encoder.layer.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "encoder.layer.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "encoder.layer.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "encoder.layer.{i}.layernorm_before.weight": "encoder.layers.{i}.norm1.weight",
    "encoder.layer.{i}.layernorm_before.bias": "encoder.layers.{i}.norm1.bias",   # layer_norm ViTs only
    "encoder.layer.{i}.layernorm_after.weight": "encoder.layers.{i}.norm2.weight",
    "encoder.layer.{i}.layernorm_after.bias": "encoder.layers.{i}.norm2.bias",
}
#: ``encoder.layer.{i}.attention.{q,k,v}_proj.{weight|bias}`` ↔ ``encoder.layers.{i}.attn.qkv.{weight|bias}``.
QKV_NATIVE = re.compile(r"^vision_model\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
QKV_PUBLISHED = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
VISION_PREFIX = "vision_model."


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(VISION_PREFIX + template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_PUBLISHED = [(_template_regex(native), VISION_PREFIX + published) for native, published in INTERNVIT_KEY_MAP.items()]
_TO_NATIVE = [(_template_regex(published), VISION_PREFIX + native) for native, published in INTERNVIT_KEY_MAP.items()]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return key


def published_key(native_key: str) -> str:
    """Published checkpoint name of a native (non-qkv) key; ``mlp1.*`` / ``language_model.*`` are unchanged."""
    return _rename(native_key, _TO_PUBLISHED)


def native_key(published: str) -> str:
    """Native name of a published (non-qkv) key; inverse of :func:`published_key`."""
    return _rename(published, _TO_NATIVE)


def to_published_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native state dict → published NVLM-D layout (InternViT names, fused ``attn.qkv`` = cat(q, k, v) on dim 0)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = QKV_NATIVE.match(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
        else:
            out[published_key(key)] = tensor
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsMismatchError(f"layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)}); cannot fuse qkv",
                                       missing=[f"vision_model.encoder.layer.{layer}.attention.{w}_proj.{kind}"
                                                for w in "qkv" if w not in parts])
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def from_published_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published NVLM-D state dict → native layout (``attn.qkv`` chunked into q/k/v along dim 0)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = QKV_PUBLISHED.match(key)
        if match:
            layer, kind = match.groups()
            if tensor.shape[0] % 3:
                raise WeightsMismatchError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3 (q, k, v)",
                                           mismatched=[(key, tuple(tensor.shape), ())])
            for which, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"vision_model.encoder.layer.{layer}.attention.{which}_proj.{kind}"] = part
        else:
            out[native_key(key)] = tensor
    return out


def checkpoint_layout(keys: set[str] | Mapping[str, Any]) -> str:
    """``"published"`` if the names are InternViT's (``vision_model.encoder.layers.N.attn…``), else ``"native"``."""
    published = any(k.startswith(("vision_model.encoder.layers.", "vision_model.embeddings.class_embedding"))
                    for k in keys)
    return "published" if published else "native"


# ---------------------------------------------------------------------------------------------------
# the model
class NVLMDPreTrainedModel(PreTrainedModel):
    config: NVLMDConfig
    config_class = NVLMDConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Connector only (the ViT and the LLM initialise themselves): Linear ``N(0, llm initializer_range)``,
        LayerNorm 1 / 0."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.llm_config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class NVLMDForConditionalGeneration(NVLMDPreTrainedModel, GenerationMixin):
    """NVLM-D: InternViT → pixel shuffle → ``mlp1`` → Qwen2, with ``generate`` from ``GenerationMixin``.

    Construct from an :class:`NVLMDConfig` (random init) or load with :func:`load_nvlm_d` /
    :meth:`from_pretrained` (strict in both key layouts).  Prompts carry one ``config.image_token_id`` per
    visual token (``num_image_token`` per tile, in tile order, thumbnail last).
    """

    def __init__(self, config: NVLMDConfig) -> None:
        super().__init__(config)
        width = config.connector_input_size
        self.vision_model = InternVLVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, config.connector_hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(config.connector_hidden_size, config.llm_config.hidden_size, bias=False),
        )
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.post_init()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        config: NVLMDConfig | None = None, **kwargs: Any):
        """Strict ``from_pretrained`` in either key layout (see :func:`load_nvlm_d`); ``None`` as path with
        ``state_dict=`` falls through to transformers."""
        if pretrained_model_name_or_path is None:
            return super().from_pretrained(None, *model_args, config=config, **kwargs)
        return load_nvlm_d(pretrained_model_name_or_path, config=config, model_class=cls, **kwargs)

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------ vision path
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT tokens of the selected layer without the class token: ``[T, 3, S, S]`` → ``[T, (S/p)², D]``."""
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, self.config.tile_size, self.config.tile_size):
            raise ModelInputError(f"pixel_values must be [tiles, 3, {self.config.tile_size}, {self.config.tile_size}], "
                                  f"got {list(pixel_values.shape)}")
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embeddings.projection.weight.dtype)
        if self.config.select_layer == -1:
            hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        else:
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.config.select_layer]
        return hidden[:, 1:, :]

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens for the LLM: ``[T, 3, S, S]`` → ``[T, num_image_token, H]`` (ViT → shuffle → ``mlp1``)."""
        shuffled = pixel_shuffle(self.vision_features(pixel_values), self.config.merge_size)
        return self.mlp1(shuffled)

    def image_token_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """``[B, L]`` bool: the positions that receive visual tokens (``config.image_token_id``)."""
        if self.config.image_token_id is None:
            raise ConfigError("config.image_token_id is not set: the id of the image pad token (<|vision_pad|>) "
                              "is needed to place visual tokens")
        return input_ids == self.config.image_token_id

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings ``[B, L, H]``: the token table, with the visual tokens written in order (all tiles of
        all images, row-major over the batch) over the image pad positions.

        ``image_features`` (``[T, n, H]`` or ``[T·n, H]``) replaces the vision path when given.  The number of pad
        tokens must equal ``T · n``; otherwise :class:`ModelInputError` says both numbers.
        """
        if input_ids.ndim != 2:
            raise ModelInputError(f"input_ids must be [batch, length], got {list(input_ids.shape)}")
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None and image_features is None:
            if self.config.image_token_id is not None and bool(self.image_token_mask(input_ids).any()):
                raise ModelInputError(f"input_ids hold {int(self.image_token_mask(input_ids).sum())} image pad tokens "
                                      "but no pixel_values/image_features were given")
            return embeds
        mask = self.image_token_mask(input_ids)
        if image_features is None:
            image_features = self.get_image_features(pixel_values)
        features = image_features.reshape(-1, embeds.shape[-1])
        slots = int(mask.sum())
        if slots != features.shape[0]:
            tiles = image_features.shape[0] if image_features.ndim == 3 else "?"
            raise ModelInputError(f"input_ids hold {slots} image pad tokens but the images give {features.shape[0]} "
                                  f"visual tokens ({tiles} tiles × {self.config.num_image_token}); lay the prompt out "
                                  "with the tiling plan of each image")
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(device=embeds.device, dtype=embeds.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Forward pass.

        Args:
            input_ids: ``[B, L]`` with ``num_image_token`` pad tokens per tile.
            pixel_values: ``[T, 3, S, S]`` tiles of all images in prompt order (each image: regular tiles
                row-major, thumbnail last).  Only read when the cache is empty (prefill).
            attention_mask: ``[B, past + L]`` 1 = token, 0 = padding (left padding supported: position ids
                are ``cumsum − 1`` of the mask).
            labels: ``[B, L]``; loss = mean next-token cross-entropy (transformers' shift), ignoring −100 and
                image pad targets.
            image_features: precomputed ``[T, n, H]`` visual tokens instead of ``pixel_values``.
            cache / past_key_values: KV cache (a ``DynamicCache`` during ``generate``).
        Returns:
            ``CausalLMOutputWithPast`` with ``logits [B, L, V]`` (or ``logits_to_keep`` positions), ``loss``,
            ``cache``; ``hidden_states`` / ``attentions`` of the LLM when requested.
        """
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is None:
            if input_ids is None:
                raise ModelInputError("pass input_ids (or inputs_embeds)")
            if past > 0 and pixel_values is None and image_features is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)    # decode step: generated tokens
            else:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        length = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2 \
                and attention_mask.shape[1] == past + length:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -length:]
        if labels is not None and input_ids is not None and self.config.image_token_id is not None:
            labels = labels.masked_fill(input_ids.to(labels.device) == self.config.image_token_id, -100)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                                   **kwargs)


# ---------------------------------------------------------------------------------------------------
# strict safetensors I/O in both layouts
def expected_state_shapes(config: NVLMDConfig, layout: str = "native",
                          model_class: type[NVLMDForConditionalGeneration] | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the model built from ``config`` (meta device), in ``"native"`` or ``"published"`` names."""
    if layout not in ("native", "published"):
        raise ValueError(f"layout must be 'native' or 'published', got {layout!r}")
    with torch.device("meta"):
        model = (model_class or NVLMDForConditionalGeneration)(config)
    state = model.state_dict()
    if layout == "published":
        state = to_published_state_dict(state)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_state_shapes(config: NVLMDConfig, found: Mapping[str, tuple[int, ...]], layout: str, where: str,
                       model_class: type[NVLMDForConditionalGeneration] | None = None) -> None:
    """Raise :class:`WeightsMismatchError` unless ``found`` (name → shape) matches the model exactly."""
    compare_state_shapes(expected_state_shapes(config, layout, model_class), found,
                         f"{where} ({layout} NVLM-D layout) does not match the model built from its config")


def read_nvlm_d_config(directory: str | os.PathLike) -> NVLMDConfig:
    """Read ``config.json`` of an NVLM-D checkpoint (``model_type`` must be ``NVLM_D``)."""
    file, data = read_config_json(directory)
    if data.get("model_type") != NVLM_D_MODEL_TYPE:
        raise ConfigError(f"{file} has model_type {data.get('model_type')!r}; expected {NVLM_D_MODEL_TYPE!r}")
    data.pop("model_type")
    data.pop("transformers_version", None)
    return NVLMDConfig(**data)


def save_nvlm_d(model: NVLMDForConditionalGeneration, directory: str | os.PathLike, layout: str = "native") -> Path:
    """Write ``config.json`` + ``model.safetensors`` (one file) in the ``"native"`` or ``"published"`` key layout."""
    from safetensors.torch import save_file

    if layout not in ("native", "published"):
        raise ValueError(f"layout must be 'native' or 'published', got {layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "published":
        state = to_published_state_dict(state)
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "layout": layout})
    model.config.save_pretrained(str(directory))
    return directory


def load_nvlm_d(path: str | os.PathLike, *, config: NVLMDConfig | None = None,
                model_class: type[NVLMDForConditionalGeneration] | None = None, **kwargs: Any):
    """Load an NVLM-D checkpoint strictly, in the native or the published key layout (detected from the names).

    Every tensor name and shape is checked against the model built from the config before any data is read
    (:class:`WeightsMismatchError` lists missing / unexpected / wrongly shaped keys in the file's own naming).
    A native-layout checkpoint is then loaded by transformers' ``from_pretrained`` from the files (``dtype=``,
    ``device_map=``, ``attn_implementation=`` … pass through ``kwargs``); a published-layout one is read into
    CPU memory, converted with :func:`from_published_state_dict` and handed over as a state dict (for the 72B
    checkpoint: convert once with :func:`save_nvlm_d` … ``layout="native"`` on a machine with the RAM).  The
    loaded floating weights must be finite.  Other errors: :class:`CheckpointNotFoundError`,
    :class:`CorruptCheckpointError`, :class:`ConfigError`.
    """
    from safetensors import safe_open

    cls = model_class or NVLMDForConditionalGeneration
    hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    want_info = kwargs.pop("output_loading_info", False)
    directory = resolve_checkpoint(path, **{k: v for k, v in hub_kwargs.items() if v is not None})
    config = config if config is not None else read_nvlm_d_config(directory)
    files = weight_files(directory)
    headers = checkpoint_headers(files)
    layout = checkpoint_layout(headers)
    check_state_shapes(config, {k: shape for k, (shape, _, _) in headers.items()}, layout, str(directory), cls)
    if layout == "native":      # transformers reads the files itself (lazily; device_map / dtype work as usual)
        transformers_from_pretrained = PreTrainedModel.__dict__["from_pretrained"].__func__
        model, info = transformers_from_pretrained(cls, str(directory), config=config, output_loading_info=True,
                                                   **kwargs)
    else:                       # published names: read, rename / split qkv in CPU memory, hand over the state dict
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        model, info = cls.from_pretrained(None, config=config, state_dict=from_published_state_dict(state),
                                          output_loading_info=True, **kwargs)
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise WeightsMismatchError(f"loading {directory} left missing {missing}, unexpected {unexpected}, "
                                   f"mismatched {mismatched}, errors {info.get('error_msgs')}",
                                   missing, unexpected, mismatched)
    check_finite_weights(model, directory)
    model.config._name_or_path = str(directory)
    model.eval()
    return (model, info) if want_info else model


def build_empty_nvlm_d(config: NVLMDConfig, dtype: torch.dtype | None = None) -> NVLMDForConditionalGeneration:
    """NVLM-D on the ``meta`` device (no memory; ~0.3 s for 79B parameters); ``dtype`` sets the parameters' dtype."""
    from navil_utils.models.common import build_on_meta

    return build_on_meta(NVLMDForConditionalGeneration, config, dtype)
