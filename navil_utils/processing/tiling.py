"""NVLM-D dynamic tiling (the comparison system): image → ``[T, 3, 448, 448]`` tiles + 1-D tile tags.

Behaviour of the NVLM-D-72B model card's ``load_image`` = ``dynamic_preprocess`` + ``build_transform``
(the InternVL-1.5 family algorithm), re-implemented with PIL + numpy:

1. candidate grids ``(cols, rows)`` with ``min_num ≤ cols·rows ≤ max_num``, gathered in a Python
   ``set`` and stably sorted by ``cols·rows`` (among equal areas the set's iteration order decides,
   which matters only for exact ties — :func:`candidate_grids` builds the set in the same order);
2. pick the grid whose ``cols/rows`` is closest to ``W/H``; on an exact tie a later candidate wins iff
   ``W·H > 0.5 · image_size² · cols · rows`` (big images prefer more tiles);
3. resize the whole image to ``(cols·S, rows·S)`` with PIL's default filter (bicubic for RGB) and cut
   ``cols·rows`` tiles of ``S×S`` row-major; if ``use_thumbnail`` and more than one tile, append the
   whole image resized to ``S×S`` (bicubic) as the last tile;
4. per tile torchvision ``Resize((S, S), BICUBIC)`` — on a PIL image of that size this is PIL's
   same-size resize, i.e. a copy (torchvision's ``antialias`` flag only concerns tensor inputs; PIL
   always filters with antialiasing when it shrinks, which here happens in step 3) — then
   ``ToTensor`` (``float32(u) / 255``) and ``Normalize`` with the ImageNet mean/std in float32.

In the LLM prompt (card's ``chat``) an image of ``T`` tiles becomes
``<Image>`` + ``<tile_1>`` + 256 × ``<|vision_pad|>`` + … + ``<tile_{T-1}>`` + 256 × … +
``<tile_global_thumbnail>`` + 256 × … + ``</Image>``: the last tile is always tagged as the global
thumbnail (so a single-tile image carries only ``<tile_global_thumbnail>``).  256 tokens per tile =
InternViT's 32×32 patches of 14 px after 2×2 pixel shuffle.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from navil_utils.processing.image_io import ImageSource, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: NVLM-D-72B settings: 448² tiles, at most 6 tiles (+ thumbnail), 256 LLM tokens per tile.
NVLM_IMAGE_SIZE = 448
NVLM_MAX_TILES = 6
NVLM_TOKENS_PER_TILE = 256
NVLM_IMAGE_START_TOKEN = "<Image>"
NVLM_IMAGE_END_TOKEN = "</Image>"
NVLM_IMAGE_CONTEXT_TOKEN = "<|vision_pad|>"
NVLM_THUMBNAIL_TAG = "<tile_global_thumbnail>"


def _tile_luts(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[3, 256]`` float32: ``(float32(u) / 255 − mean_c) / std_c`` evaluated in float32 like
    torchvision's ``ToTensor`` + ``Normalize``."""
    scaled = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return ((scaled[None, :] - mean32) / std32).astype(np.float32)


_IMAGENET_LUTS = _tile_luts(IMAGENET_MEAN, IMAGENET_STD)
_IMAGENET_LUTS.setflags(write=False)


def candidate_grids(min_num: int = 1, max_num: int = NVLM_MAX_TILES) -> list[tuple[int, int]]:
    """Candidate ``(cols, rows)`` grids in the order the card scans them (area ascending)."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids: set[tuple[int, int]] = set()
    for n in range(min_num, max_num + 1):  # same insertion order as the card → same set order
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def choose_grid(width: int, height: int, grids: Sequence[tuple[int, int]], image_size: int = NVLM_IMAGE_SIZE) -> tuple[int, int]:
    """The card's closest-aspect-ratio choice with its area tie-break → ``(cols, rows)``."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def nvlm_tile_tags(num_tiles: int) -> list[str]:
    """Tags of ``num_tiles`` tiles (thumbnail included): ``<tile_1>``…``<tile_{T-1}>``, then
    ``<tile_global_thumbnail>`` for the last one (the card's ``chat``)."""
    if num_tiles < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + [NVLM_THUMBNAIL_TAG]


def nvlm_image_span_text(num_tiles: int, tokens_per_tile: int = NVLM_TOKENS_PER_TILE,
                         context_token: str = NVLM_IMAGE_CONTEXT_TOKEN) -> str:
    """The prompt text that replaces one ``<image>`` for an image of ``num_tiles`` tiles."""
    body = "".join(tag + context_token * tokens_per_tile for tag in nvlm_tile_tags(num_tiles))
    return NVLM_IMAGE_START_TOKEN + body + NVLM_IMAGE_END_TOKEN


def nvlm_special_tokens(max_tiles: int = NVLM_MAX_TILES) -> list[str]:
    """Every tag/pad string an NVLM-D image span can use with up to ``max_tiles`` regular tiles:
    ``<Image>``, ``</Image>``, ``<tile_1>``…``<tile_{max_tiles}>``, ``<tile_global_thumbnail>``, ``<|vision_pad|>``."""
    return ([NVLM_IMAGE_START_TOKEN, NVLM_IMAGE_END_TOKEN] + [f"<tile_{k}>" for k in range(1, max_tiles + 1)]
            + [NVLM_THUMBNAIL_TAG, NVLM_IMAGE_CONTEXT_TOKEN])


def nvlm_image_span_ids(num_tiles: int, token_ids: dict[str, int],
                        tokens_per_tile: int = NVLM_TOKENS_PER_TILE) -> list[int]:
    """Token ids of :func:`nvlm_image_span_text` for a vocabulary where every tag is one token
    (``token_ids`` maps the strings of :func:`nvlm_special_tokens` to ids; e.g. a tiny test vocabulary —
    the released tokenizer splits the tags into several text tokens)."""
    missing = [t for t in (NVLM_IMAGE_START_TOKEN, NVLM_IMAGE_END_TOKEN, NVLM_IMAGE_CONTEXT_TOKEN,
                           *nvlm_tile_tags(num_tiles)) if t not in token_ids]
    if missing:
        raise KeyError(f"token_ids lacks {missing}")
    ids = [token_ids[NVLM_IMAGE_START_TOKEN]]
    for tag in nvlm_tile_tags(num_tiles):
        ids += [token_ids[tag]] + [token_ids[NVLM_IMAGE_CONTEXT_TOKEN]] * tokens_per_tile
    return ids + [token_ids[NVLM_IMAGE_END_TOKEN]]


@dataclass(frozen=True)
class TilePlan:
    """Where NVLM-D's tiles of one image come from (sizes in pixels)."""

    original_hw: tuple[int, int]
    grid: tuple[int, int]  # (cols, rows)
    image_size: int
    thumbnail: bool  # a global thumbnail tile is appended

    @property
    def resized_wh(self) -> tuple[int, int]:
        return self.grid[0] * self.image_size, self.grid[1] * self.image_size

    @property
    def num_regular_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tiles(self) -> int:
        return self.num_regular_tiles + int(self.thumbnail)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """``(left, top, right, bottom)`` crop box of every regular tile in the resized image, row-major."""
        size, cols = self.image_size, self.grid[0]
        return [((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size)
                for i in range(self.num_regular_tiles)]

    @property
    def tags(self) -> list[str]:
        return nvlm_tile_tags(self.num_tiles)


def plan_tiles(height: int, width: int, max_num: int = NVLM_MAX_TILES, image_size: int = NVLM_IMAGE_SIZE,
               use_thumbnail: bool = True, min_num: int = 1) -> TilePlan:
    """NVLM-D's tiling of an ``height × width`` image, without touching pixels."""
    if height < 1 or width < 1:
        raise ValueError(f"empty image ({height}x{width})")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    grid = choose_grid(width, height, candidate_grids(min_num, max_num), image_size)
    return TilePlan((height, width), grid, image_size, use_thumbnail and grid[0] * grid[1] != 1)


def nvlm_token_count(height: int, width: int, *, tokens_per_tile: int = NVLM_TOKENS_PER_TILE, **settings) -> int:
    """Visual (image-pad) tokens NVLM-D spends on an image: ``256 × tiles`` (thumbnail included)."""
    return plan_tiles(height, width, **settings).num_tiles * tokens_per_tile


@dataclass
class TiledInputs:
    """Output of :func:`preprocess_tiles`: ``pixel_values [T, 3, S, S]`` float32 (ImageNet-normalised,
    regular tiles row-major, thumbnail last) and the :class:`TilePlan`."""

    pixel_values: torch.Tensor
    plan: TilePlan

    @property
    def grid(self) -> tuple[int, int]:
        return self.plan.grid

    @property
    def num_tiles(self) -> int:
        return self.plan.num_tiles

    @property
    def tags(self) -> list[str]:
        return self.plan.tags

    def image_span_text(self, tokens_per_tile: int = NVLM_TOKENS_PER_TILE) -> str:
        return nvlm_image_span_text(self.num_tiles, tokens_per_tile)

    def tile_images(self) -> list[np.ndarray]:
        """The tiles as uint8 ``(S, S, 3)`` images (normalisation undone), for display."""
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
        tiles = self.pixel_values.numpy() * std + mean
        return [np.clip(np.rint(t * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0) for t in tiles]


def _normalise_tiles(tiles_u8: np.ndarray) -> np.ndarray:
    """``(T, 3, S, S)`` uint8 → float32 with the per-channel ImageNet lookup tables."""
    out = np.empty(tiles_u8.shape, dtype=np.float32)
    for channel in range(3):
        np.take(_IMAGENET_LUTS[channel], tiles_u8[:, channel], out=out[:, channel], mode="clip")
    return out


def preprocess_tiles(image: ImageSource, max_num: int = NVLM_MAX_TILES, image_size: int = NVLM_IMAGE_SIZE,
                     use_thumbnail: bool = True, min_num: int = 1) -> TiledInputs:
    """NVLM-D dynamic tiling of one image → :class:`TiledInputs` (``pixel_values [T, 3, S, S]``).

    ``image`` is anything :func:`navil_utils.load_image` accepts.  Defaults are the NVLM-D-72B card's
    example settings (``max_num=6``, 448-px tiles, thumbnail on).
    """
    rgb = load_image(image)
    plan = plan_tiles(rgb.height, rgb.width, max_num, image_size, use_thumbnail, min_num)
    cols, rows = plan.grid
    resized = np.asarray(rgb.resize(plan.resized_wh, Image.Resampling.BICUBIC))
    # (rows·S, cols·S, 3) → (rows, cols, 3, S, S): row-major tiles, channel-first
    tiles = resized.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 4, 1, 3)
    tiles = tiles.reshape(rows * cols, 3, image_size, image_size)
    if plan.thumbnail:
        thumb = np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return TiledInputs(torch.from_numpy(_normalise_tiles(np.ascontiguousarray(tiles))), plan)
