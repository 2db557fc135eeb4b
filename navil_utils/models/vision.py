"""NaViL's any-resolution ViT, pixel-shuffle connector input, and the window reordering of tokens.

Input: ``pixel_values`` ``(N, 3, p, p)`` (or ``(N, 3·p·p)``) — the patches of all images and scales,
concatenated — and ``grid_thw`` ``(G, 3)``, one ``(t, h, w)`` row (in patches) per image-scale.  Inside a
grid, patches come merge-block by merge-block in raster order, and the ``m × m`` patches of a block in
raster order (the Qwen2-VL processor layout).

Pipeline (as in the official NaViL ViT):

1. ``embeddings.patch_embedding``: ``Conv2d(3, D, p, p)`` on each patch → ``(N, D)``.
2. 2-D RoPE angles per patch: ``concat(row · inv_freq, col · inv_freq)``, ``inv_freq = 1/10000^(4i/hd)``,
   rows/columns restart at 0 for each grid.  Rotated "rotate-half" style in float32.
3. **Window reordering** (never undone, like the reference): merge blocks are permuted by
   :func:`window_layout`'s ``window_index`` — per grid, blocks are listed window by window (windows of
   ``window_size // m`` blocks per side in raster order, blocks inside a window in raster order).  The ViT
   output, and therefore the visual tokens given to the LLM, are in this *window order*, which differs from
   raster order as soon as a scale is more than ``window_size // m`` merged tokens wide or tall.
4. Encoder layers (pre-norm, layer scale): attention is block-diagonal — one segment per grid and frame
   (global layers) or one per window (window layers, all layers not in ``fullatt_block_indexes``).
   Segments are computed without dense ``S × S`` masks: equal-length segments are batched and sent through
   the attention function once per length (``ALL_ATTENTION_FUNCTIONS`` seam, ``module.is_causal = False``).
5. Output ``(N/m², m, m, D)``; pixel shuffle is the row-major flatten of each block → ``(N/m², m²·D)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from navil_utils.errors import ModelInputError
from navil_utils.models.common import (
    NaViLRMSNorm,
    compute_dtype,
    eager_attention_forward,
    resolve_attention_implementation,
    rotate_half,
)
from navil_utils.models.configuration_navil import NaViLVisionConfig

ROPE_THETA = 10000.0


def _grid_rows(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]


def check_grids(grid_thw: torch.Tensor, merge_size: int, num_patches: int | None = None) -> None:
    """Raise :class:`ModelInputError` unless ``grid_thw`` is ``(G, 3)`` with positive, ``m``-divisible h, w."""
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise ModelInputError(f"image_grid_thw must have shape (num_grids, 3), got {tuple(grid_thw.shape)}")
    total = 0
    for t, h, w in _grid_rows(grid_thw):
        if t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size:
            raise ModelInputError(f"grid (t={t}, h={h}, w={w}) must be positive with h and w divisible by the "
                                  f"merge size {merge_size}")
        total += t * h * w
    if num_patches is not None and total != num_patches:
        raise ModelInputError(f"image_grid_thw describes {total} patches but pixel_values holds {num_patches}")


@dataclass(frozen=True)
class WindowLayout:
    """Token order and attention segments of one ViT forward.

    Attributes:
        window_index: ``(N/m²,)`` merge-block permutation (window order → raster block index).
        cu_window_seqlens: window boundaries in patches, as the reference returns them (duplicates kept).
        cu_seqlens: grid/frame boundaries in patches (global attention segments).
    """

    window_index: torch.Tensor
    cu_window_seqlens: list[int]
    cu_seqlens: list[int]


def window_layout(grid_thw: torch.Tensor, merge_size: int, window_size: int) -> WindowLayout:
    """Qwen2.5-VL window partition of merged-token grids (reference ``get_window_index``).

    Per grid, the ``(h/m) × (w/m)`` block grid is tiled from the top-left by windows of
    ``window_size // m`` blocks per side; the last row/column of windows may be partial, and a padded-away
    window may even be empty (then it contributes a repeated boundary, exactly like the reference).
    """
    side = window_size // merge_size
    unit = merge_size * merge_size
    indices: list[torch.Tensor] = []
    cu_window = [0]
    cu = [0]
    offset = 0
    for t, h, w in _grid_rows(grid_thw):
        gh, gw = h // merge_size, w // merge_size
        grid = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = side - gh % side, side - gw % side
        nwh, nww = (gh + pad_h) // side, (gw + pad_w) // side
        padded = nn.functional.pad(grid, (0, pad_w, 0, pad_h), value=-100)
        padded = padded.reshape(t, nwh, side, nww, side).permute(0, 1, 3, 2, 4).reshape(t, nwh * nww, side, side)
        counts = (padded != -100).sum(dim=(2, 3)).reshape(-1)
        indices.append(padded[padded != -100] + offset)
        cu_window.extend((counts.cumsum(0) * unit + cu_window[-1]).tolist())
        cu.extend([cu[-1] + h * w * (i + 1) for i in range(t)])
        offset += t * gh * gw
    return WindowLayout(torch.cat(indices), cu_window, cu)


def rotary_angles(grid_thw: torch.Tensor, merge_size: int, head_dim: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D RoPE angles ``(N, head_dim/2)`` in raster (processor) patch order: ``[row·f, col·f]``.

    ``dtype`` is float32 (the reference's precision) or float64 for a float64 model.
    """
    dim = head_dim // 2
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))
    positions = []
    max_side = 1
    for t, h, w in _grid_rows(grid_thw):
        m = merge_size
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        # processor order: blocks in raster order, m×m patches inside a block in raster order
        rows = rows.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        cols = cols.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
        positions.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
        max_side = max(max_side, h, w)
    table = torch.outer(torch.arange(max_side, device=device, dtype=dtype), inv_freq)  # (max, hd/4)
    return table[torch.cat(positions)].flatten(1)


class AttentionSegments:
    """Block-diagonal attention over contiguous token segments, without an ``S × S`` mask.

    Segments of equal length are gathered into one batch ``(n, H, L, hd)`` and sent through the attention
    function in a single call, so the cost is one call per distinct length (a few per layer type).
    """

    def __init__(self, boundaries: list[int], device: torch.device) -> None:
        bounds = [boundaries[0]] + [b for a, b in zip(boundaries, boundaries[1:]) if b != a]
        self.total = bounds[-1]
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        by_length: dict[int, list[int]] = {}
        for start, end in self.segments:
            by_length.setdefault(end - start, []).append(start)
        self.groups: list[tuple[list[int], torch.Tensor | None]] = []
        for length, starts in by_length.items():
            if len(starts) == 1 and length == self.total:
                self.groups.append((starts, None))  # one segment spanning everything: no gather
            else:
                index = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)[None]
                self.groups.append((starts, index))

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_name: str, output_attentions: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``q, k, v (N, H, hd)`` → ``(N, H, hd)`` and, if asked, one ``(H, L, L)`` map per segment.

        The attention function is called once per distinct segment length with ``(n, H, L, hd)`` inputs
        and these keywords (for recorders): ``segment_starts`` — the token offset of each of the ``n``
        segments, ``segment_length`` — ``L``, ``segment_bounds`` — every ``(start, end)`` of the layer;
        ``module.layer_idx`` names the ViT layer.  Offsets are in the encoder's (window-permuted) order.
        """
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention_name, eager_attention_forward)
        out = query.new_empty(query.shape)
        maps: dict[int, torch.Tensor] = {}
        for starts, index in self.groups:
            if index is None:
                q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # (1, H, N, hd)
            else:
                q, k, v = (x[index].transpose(1, 2) for x in (query, key, value))  # (n, H, L, hd)
            attn, probs = attention_interface(module, q, k, v, None, scaling=module.scaling, dropout=0.0,
                                              is_causal=False, segment_starts=starts,
                                              segment_length=q.shape[2], segment_bounds=self.segments)
            if index is None:
                out = attn[0]
            else:
                out = out.index_put((index.reshape(-1),), attn.reshape(-1, *attn.shape[2:]))
            if output_attentions and probs is not None:
                maps.update({start: p for start, p in zip(starts, probs)})
        attentions = [maps[start] for start, _ in self.segments] if output_attentions and maps else None
        return out, attentions


class NaViLVisionEmbeddings(nn.Module):
    """Patch embedding: ``Conv2d(3, D, kernel=p, stride=p)`` applied to each ``p × p`` patch.

    With ``config.stem_channels = [c1, …, ck]`` (a workbook extension, not in the reference) each patch first
    goes through ``k`` convolutions ``3 × 3``, stride 2, padding 1, each followed by GELU (``stem.0``, ``stem.2``,
    …), and the patch convolution then maps the ``p/2^k``-pixel result to ``D``: a small CNN per patch, which
    gives a from-scratch encoder the locality a single linear projection of the patch lacks. Patches stay
    independent, so everything downstream (token order, RoPE, merging) is unchanged.
    """

    def __init__(self, config: NaViLVisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        stem = list(getattr(config, "stem_channels", None) or [])
        channels, layers = 3, []
        for width in stem:
            layers += [nn.Conv2d(channels, int(width), kernel_size=3, stride=2, padding=1), nn.GELU()]
            channels = int(width)
        self.stem = nn.Sequential(*layers) if layers else None
        kernel = config.patch_size // 2 ** len(stem)
        self.patch_embedding = nn.Conv2d(channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, p, p)`` or ``(N, 3·p·p)`` → ``(N, D)`` (pixel values are cast to the weight dtype)."""
        conv = self.patch_embedding
        patches = pixel_values.reshape(-1, 3, self.patch_size, self.patch_size).to(conv.weight.dtype)
        if self.stem is not None:
            patches = self.stem(patches)
        return conv(patches).flatten(1)


class NaViLVisionAttention(nn.Module):
    """Fused-qkv multi-head attention with 2-D RoPE over block-diagonal segments."""

    is_causal = False
    num_key_value_groups = 1

    def __init__(self, config: NaViLVisionConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        if config.qk_normalization:
            self.q_norm = _vision_norm(config)
            self.k_norm = _vision_norm(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: AttentionSegments, attention_name: str,
                output_attentions: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        n, dim = hidden_states.shape
        query, key, value = self.qkv(hidden_states).view(n, 3, dim).unbind(1)
        if self.config.qk_normalization:  # intended InternViT semantics: norm over the full width
            query, key = self.q_norm(query), self.k_norm(key)
        shape = (n, self.num_heads, self.head_dim)
        query, key, value = query.reshape(shape), key.reshape(shape), value.reshape(shape)
        dtype, upcast = query.dtype, cos.dtype  # rotate in float32 (float64 for a float64 model)
        query = (query.to(upcast) * cos + rotate_half(query.to(upcast)) * sin).to(dtype)
        key = (key.to(upcast) * cos + rotate_half(key.to(upcast)) * sin).to(dtype)
        attn, maps = segments.attend(self, query, key, value, attention_name, output_attentions)
        return self.proj_drop(self.proj(attn.reshape(n, dim))), maps


class NaViLVisionMLP(nn.Module):
    def __init__(self, config: NaViLVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _vision_norm(config: NaViLVisionConfig) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return NaViLRMSNorm(config.hidden_size, config.layer_norm_eps)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p`` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class NaViLVisionEncoderLayer(GradientCheckpointingLayer):
    """``x += ls1·attn(norm1(x)); x += ls2·mlp(norm2(x))`` (pre-norm, layer scale, optional drop path)."""

    def __init__(self, config: NaViLVisionConfig, layer_idx: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _vision_norm(config)
        self.norm2 = _vision_norm(config)
        self.attn = NaViLVisionAttention(config, layer_idx)
        self.mlp = NaViLVisionMLP(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                segments: AttentionSegments | None = None, attention_name: str = "sdpa",
                output_attentions: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        attn, maps = self.attn(self.norm1(hidden_states), cos, sin, segments, attention_name, output_attentions)
        hidden_states = hidden_states + self.drop_path(attn * self.ls1)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)) * self.ls2)
        return hidden_states, maps


class NaViLVisionEncoder(nn.Module):
    def __init__(self, config: NaViLVisionConfig) -> None:
        super().__init__()
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.layers = nn.ModuleList([NaViLVisionEncoderLayer(config, i, rates[i])
                                     for i in range(config.num_hidden_layers)])


@dataclass
class NaViLVisionOutput(ModelOutput):
    """Output of :class:`NaViLVisionModel`.

    Attributes:
        last_hidden_state: ``(N/m², m, m, D)`` — merge blocks in window order (fixture convention).
        hidden_states: ``(N, D)`` tokens in window order: the patch embeddings, then every layer's output.
        attentions: per layer, one ``(heads, L, L)`` probability map per attention segment (segments in
            token order: per grid/frame for global layers, per window for window layers).
        window_index: ``(N/m²,)`` the block permutation applied (window order → raster block index).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[list[torch.Tensor], ...] | None = None
    window_index: torch.Tensor | None = None


class NaViLVisionModel(PreTrainedModel):
    """The any-resolution ViT (``vision_model`` in the checkpoint). No position table, no final norm."""

    config: NaViLVisionConfig
    config_class = NaViLVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NaViLVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: NaViLVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = NaViLVisionEmbeddings(config)
        self.encoder = NaViLVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch-default init for linear/conv layers (the reference never re-initialises its ViT),
        ones for norms, ``initializer_factor`` for the layer-scale vectors."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (NaViLRMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NaViLVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> NaViLVisionOutput:
        """Encode all patches.

        Args:
            pixel_values: ``(N, 3, p, p)`` or ``(N, 3·p·p)``.
            grid_thw: ``(G, 3)`` int, one ``(t, h, w)`` per image-scale (patch units).
        """
        config = self.config
        m = config.merge_size
        if pixel_values.ndim not in (2, 4) or pixel_values[0].numel() != 3 * config.patch_size ** 2:
            raise ModelInputError(f"pixel_values must be (N, 3, {config.patch_size}, {config.patch_size}) or "
                                  f"(N, {3 * config.patch_size ** 2}), got {tuple(pixel_values.shape)}")
        check_grids(grid_thw, m, pixel_values.shape[0])
        device = pixel_values.device
        layout = window_layout(grid_thw, m, config.window_size)
        window_index = layout.window_index.to(device)

        hidden = self.embeddings(pixel_values)                                     # (N, D) raster order
        n, dim = hidden.shape
        hidden = hidden.view(n // (m * m), m * m, dim)[window_index].reshape(n, dim)
        angles = rotary_angles(grid_thw, m, config.head_dim, device, compute_dtype(hidden.dtype))
        angles = angles.view(n // (m * m), m * m, -1)[window_index].reshape(n, -1)
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]                    # (N, 1, hd)
        cos, sin = emb.cos(), emb.sin()

        global_segments = AttentionSegments(layout.cu_seqlens, device)
        window_segments = AttentionSegments(layout.cu_window_seqlens, device)
        full_layers = config.fullatt_block_indexes
        attention_name = resolve_attention_implementation(config, output_attentions)

        all_hidden = [hidden] if output_hidden_states else []
        all_maps = []
        for index, layer in enumerate(self.encoder.layers):
            segments = global_segments if full_layers is None or index in full_layers else window_segments
            hidden, maps = layer(hidden, cos=cos, sin=sin, segments=segments, attention_name=attention_name,
                                 output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_maps.append(maps)
        return NaViLVisionOutput(
            last_hidden_state=hidden.view(n // (m * m), m, m, dim),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_maps) if output_attentions else None,
            window_index=window_index,
        )
