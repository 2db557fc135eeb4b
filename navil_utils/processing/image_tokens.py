"""Token accounting for NaViL's image span — the one implementation shared by preprocessing,
prompt building, ``chat`` and training.

An image fed at S scales becomes, in the LLM prompt::

    <img>
      scale 1 (smallest):  ( <IMG_CONTEXT> × (w/m)  <IMG_LINE_BREAK> ) × (h/m)   <IMG_FRAME_BREAK>
      ...
      scale S (largest):   ( <IMG_CONTEXT> × (w/m)  <IMG_LINE_BREAK> ) × (h/m)   <IMG_FRAME_BREAK>
    </img>

where ``(t, h, w)`` is the scale's patch grid (``image_grid_thw`` row, in patches) and ``m`` the
merge size (2: one visual token per 2×2 patches).  Every frame (``t``) of a scale repeats the rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
)


def _grid_rows(image_grid_thw) -> list[tuple[int, int, int]]:
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else list(image_grid_thw)
    out = []
    for row in rows:
        t, h, w = (int(v) for v in row)
        out.append((t, h, w))
    return out


@dataclass(frozen=True)
class ScaleTokens:
    """Token budget of one scale of one image."""

    t: int
    h_patches: int
    w_patches: int
    rows: int          # merged-token rows per frame (h / m)
    cols: int          # merged tokens per row (w / m)
    visual_tokens: int  # <IMG_CONTEXT> tokens (t · rows · cols)
    span_tokens: int    # visual tokens + line breaks + frame breaks of this scale


def scale_token_counts(image_grid_thw, merge_size: int = 2) -> list[ScaleTokens]:
    """Per-scale token accounting for grids ``[S, 3]`` (``(t, h, w)`` in patches)."""
    out = []
    for t, h, w in _grid_rows(image_grid_thw):
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid ({t}, {h}, {w}) is not divisible by merge_size={merge_size}")
        rows, cols = h // merge_size, w // merge_size
        visual = t * rows * cols
        out.append(ScaleTokens(t, h, w, rows, cols, visual, visual + t * rows + t))
    return out


def visual_tokens_per_scale(image_grid_thw, merge_size: int = 2) -> list[int]:
    """Number of ``<IMG_CONTEXT>`` tokens of each scale."""
    return [s.visual_tokens for s in scale_token_counts(image_grid_thw, merge_size)]


def image_span_text(image_grid_thw, merge_size: int = 2) -> str:
    """The prompt text that replaces one ``<image>`` placeholder (all scales of ONE image)."""
    parts = [IMG_START_TOKEN]
    for s in scale_token_counts(image_grid_thw, merge_size):
        row = IMG_CONTEXT_TOKEN * s.cols + IMG_LINE_BREAK_TOKEN
        parts.append((row * s.rows + IMG_FRAME_BREAK_TOKEN) * s.t)
    parts.append(IMG_END_TOKEN)
    return "".join(parts)


def image_span_ids(image_grid_thw, token_ids: dict[str, int], merge_size: int = 2) -> list[int]:
    """Token ids of :func:`image_span_text`, built directly (no tokenizer call).

    ``token_ids`` maps the five image tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``,
    ``<IMG_LINE_BREAK>``, ``<IMG_FRAME_BREAK>``) to ids.
    """
    missing = [k for k in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, IMG_LINE_BREAK_TOKEN,
                           IMG_FRAME_BREAK_TOKEN) if k not in token_ids]
    if missing:
        raise KeyError(f"token_ids lacks ids for {missing}")
    ctx, lb, fb = token_ids[IMG_CONTEXT_TOKEN], token_ids[IMG_LINE_BREAK_TOKEN], token_ids[IMG_FRAME_BREAK_TOKEN]
    ids = [token_ids[IMG_START_TOKEN]]
    for s in scale_token_counts(image_grid_thw, merge_size):
        row = [ctx] * s.cols + [lb]
        ids.extend((row * s.rows + [fb]) * s.t)
    ids.append(token_ids[IMG_END_TOKEN])
    return ids


def split_grids_per_image(image_grid_thw, num_scales: Sequence[int]) -> list[list[tuple[int, int, int]]]:
    """Group the grid rows of several images (``num_scales[i]`` consecutive rows each)."""
    rows = _grid_rows(image_grid_thw)
    if sum(int(n) for n in num_scales) != len(rows):
        raise ValueError(f"num_scales {list(num_scales)} does not add up to {len(rows)} grid rows")
    out, start = [], 0
    for n in num_scales:
        out.append(rows[start:start + int(n)])
        start += int(n)
    return out
