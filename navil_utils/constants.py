"""NaViL's fixed numbers and token strings — each defined here once.

Numbers are the official code's defaults (NaViL-2B/9B configs, its demo and processor); the token
strings are those of the released tokenizers.  Everything else (configs, preprocessing, prompts,
the tiny model) refers to these names.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------------
# image geometry and pixel budgets
#: ViT patch size (pixels per side).
NAVIL_PATCH_SIZE = 16
#: Pixel-shuffle merge size: one LLM token per ``m × m`` patches (``downsample_ratio = 1 / m``).
NAVIL_MERGE_SIZE = 2
#: Config defaults ``min_dynamic_patch`` / ``max_dynamic_patch`` (in units of ``p²`` pixels).
NAVIL_MIN_DYNAMIC_PATCH = 256
NAVIL_MAX_DYNAMIC_PATCH = 24576
NAVIL_MIN_PIXELS = NAVIL_MIN_DYNAMIC_PATCH * NAVIL_PATCH_SIZE**2  # 65,536
NAVIL_MAX_PIXELS = NAVIL_MAX_DYNAMIC_PATCH * NAVIL_PATCH_SIZE**2  # 6,291,456
#: Side ratio between consecutive scales (≈ √2/2, i.e. about half the area).
NAVIL_SCALE_DOWNSAMPLE_RATIO = 0.7071
#: ViT window size (patches per side) of window-attention layers; ``// m`` merged tokens.
NAVIL_WINDOW_SIZE = 8
#: Pixel budget of the embedded tiny model (its synthetic images are at most 128² px).
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 128 * 128


def merge_size_from_ratio(downsample_ratio: float) -> int:
    """``downsample_ratio`` (0.5) of a NaViL config → merge size m (2); the ratio must be ``1/m``."""
    ratio = float(downsample_ratio)
    if ratio <= 0 or abs(1.0 / ratio - round(1.0 / ratio)) > 1e-6:
        raise ValueError(f"downsample_ratio must be 1/m for an integer m, got {downsample_ratio}")
    return int(round(1.0 / ratio))


# ---------------------------------------------------------------------------------------------------
# token strings
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_LINE_BREAK_TOKEN = "<IMG_LINE_BREAK>"
IMG_FRAME_BREAK_TOKEN = "<IMG_FRAME_BREAK>"
IMG_UNCOND_TOKEN = "<img_uncond>"
#: Placeholder of one image in a user message, replaced by the image's multi-scale span.
IMAGE_PLACEHOLDER = "<image>"

#: NaViL's special tokens; index k selects row k of ``special_token_embedding``.
SPECIAL_TOKEN_LIST: tuple[str, ...] = (
    "</box>", "<box>", IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, "</quad>", "<quad>",
    "</ref>", "<ref>", IMG_UNCOND_TOKEN, IMG_LINE_BREAK_TOKEN, IMG_FRAME_BREAK_TOKEN,
)

#: Turn delimiters of the chat format (``<|im_end|>`` is also the end-of-answer token).
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
CHAT_TOKENS: tuple[str, ...] = (IM_START_TOKEN, IM_END_TOKEN)
