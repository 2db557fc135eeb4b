"""NVLM-D dynamic tiling: grid choice incl. exact ties (hand-computed), candidate order, tile pixels
against a direct PIL crop/resize + torchvision-style ToTensor/Normalize, prompt layout with tile tags."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from navil_utils.processing.image_io import make_test_pattern
from navil_utils.processing.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NVLM_IMAGE_CONTEXT_TOKEN,
    candidate_grids,
    choose_grid,
    nvlm_image_span_text,
    nvlm_tile_tags,
    nvlm_token_count,
    plan_tiles,
    preprocess_tiles,
)


def _card_style_choice(width: int, height: int, max_num: int, image_size: int = 448) -> tuple[int, int]:
    """Independent statement of the card's search: a set comprehension sorted by area, first best
    kept, equal differences replaced when the image area exceeds half the grid's pixel area."""
    grids = sorted({(c, r) for n in range(1, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if 1 <= c * r <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(width / height - c / r)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * image_size**2 * c * r):
            best, best_diff = (c, r), min(diff, best_diff)
    return best


@pytest.mark.parametrize(
    "width, height, max_num, grid, tiles",
    [
        (1344, 448, 6, (3, 1), 4),    # exact 3:1
        (512, 512, 6, (1, 1), 1),     # 1:1, no thumbnail for a single tile
        (800, 600, 6, (3, 2), 7),     # 4:3 → closest 3:2 (|1.333−1.5| < |1.333−1|)
        (1600, 800, 6, (2, 1), 3),    # 2:1 and a small image: (2,1) kept
        (1800, 900, 12, (4, 2), 9),   # 2:1 tie (2,1)/(4,2): 1.62 MP > 0.5·448²·8 = 0.80 MP → (4,2)
        (1000, 1000, 12, (3, 3), 10),  # 1:1 tie (1,1)/(2,2)/(3,3): 1 MP > 0.90 MP (3,3) threshold
        (120, 1100, 12, (1, 9), 10),  # tall strip
        (250, 100, 6, (2, 1), 3),     # 2.5 ties (2,1)/(3,1) at 0.5; 25,000 px ≤ 301,056 → keep (2,1)
        (1000, 400, 6, (3, 1), 4),    # same tie; 400,000 px > 301,056 → (3,1)
        (1500, 1000, 24, (3, 2), 7),  # 1.5 ties (3,2)/(6,4); 1.5 MP ≤ 0.5·448²·24 = 2.41 MP → (3,2)
        (3000, 2000, 24, (6, 4), 25),  # 6 MP > 2.41 MP → (6,4)
    ],
)
def test_hand_computed_grids(width, height, max_num, grid, tiles):
    plan = plan_tiles(height, width, max_num=max_num)
    assert plan.grid == grid and plan.num_tiles == tiles
    assert _card_style_choice(width, height, max_num) == grid


def test_candidate_order_is_the_cards():
    assert candidate_grids(1, 6) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5),
                                     (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)]
    for max_num in (1, 6, 12, 40):
        expected = sorted({(c, r) for n in range(1, max_num + 1) for c in range(1, n + 1)
                           for r in range(1, n + 1) if c * r <= max_num}, key=lambda g: g[0] * g[1])
        assert candidate_grids(1, max_num) == expected


def test_equal_area_tie_follows_candidate_order():
    # W/H = 1.25 is equidistant (0.75) from 2:1 and 1:2, but 1:1 (0.25) is closer; with only
    # two-tile grids allowed the first of (1,2)/(2,1) in candidate order wins unless the image is large
    assert choose_grid(125, 100, [(1, 2), (2, 1)]) == (1, 2)
    assert choose_grid(1250, 1000, [(1, 2), (2, 1)]) == (2, 1)  # 1.25 MP > 0.5·448²·2 → replaced


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), max_num=st.integers(1, 12))
def test_grid_choice_matches_independent_statement(width, height, max_num):
    plan = plan_tiles(height, width, max_num=max_num)
    assert plan.grid == _card_style_choice(width, height, max_num)
    assert plan.num_regular_tiles <= max_num
    assert plan.num_tiles == plan.num_regular_tiles + (plan.num_regular_tiles > 1)


def _to_tensor_normalize(tile: Image.Image) -> torch.Tensor:
    """torchvision's ``Resize((448,448), BICUBIC)`` on PIL + ``ToTensor`` + ``Normalize``, written out."""
    tile = tile.resize((448, 448), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(tile)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


@pytest.mark.parametrize("size", [(600, 800), (448, 448), (300, 1000), (1100, 120)])
def test_tile_pixels_match_direct_pil_crops(size):
    height, width = size
    image = make_test_pattern(height, width, seed=3)
    out = preprocess_tiles(image)
    cols, rows = out.grid
    resized = image.resize((448 * cols, 448 * rows))  # PIL's default filter, as in the card
    crops = [resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448)) for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        crops.append(image.resize((448, 448)))
    expected = torch.stack([_to_tensor_normalize(c) for c in crops])
    assert out.pixel_values.shape == expected.shape and out.pixel_values.dtype == torch.float32
    assert torch.equal(out.pixel_values, expected)
    for shown, crop in zip(out.tile_images(), crops):
        assert np.abs(shown.astype(int) - np.asarray(crop).astype(int)).max() <= 1


def test_thumbnail_is_last_and_optional():
    image = make_test_pattern(600, 800)
    with_thumb = preprocess_tiles(image, max_num=6)
    without = preprocess_tiles(image, max_num=6, use_thumbnail=False)
    assert with_thumb.num_tiles == 7 and without.num_tiles == 6
    assert torch.equal(with_thumb.pixel_values[:6], without.pixel_values)
    assert torch.equal(with_thumb.pixel_values[6], _to_tensor_normalize(image.resize((448, 448))))


def test_tile_tags_and_prompt_layout():
    assert nvlm_tile_tags(7) == [f"<tile_{k}>" for k in range(1, 7)] + ["<tile_global_thumbnail>"]
    assert nvlm_tile_tags(1) == ["<tile_global_thumbnail>"]
    span = nvlm_image_span_text(3)
    expected = ("<Image><tile_1>" + NVLM_IMAGE_CONTEXT_TOKEN * 256 + "<tile_2>" + NVLM_IMAGE_CONTEXT_TOKEN * 256
                + "<tile_global_thumbnail>" + NVLM_IMAGE_CONTEXT_TOKEN * 256 + "</Image>")
    assert span == expected
    out = preprocess_tiles(make_test_pattern(600, 800))
    text = out.image_span_text()
    assert text.count(NVLM_IMAGE_CONTEXT_TOKEN) == 256 * out.num_tiles == nvlm_token_count(600, 800) == 1792
    assert [text.index(tag) for tag in out.tags] == sorted(text.index(tag) for tag in out.tags)
    with pytest.raises(ValueError, match="num_tiles"):
        nvlm_tile_tags(0)


def test_token_count_is_capped_by_max_tiles():
    # (h, w): 1 tile; 2:1 → 2 + thumbnail; 3:4 → (2,3) + thumbnail; huge square → (2,2) + thumbnail
    counts = [nvlm_token_count(h, w) for h, w in [(100, 100), (448, 896), (4000, 3000), (20000, 20000)]]
    assert counts == [256, 3 * 256, 7 * 256, 5 * 256]
    assert max(nvlm_token_count(h, w) for h in (1, 50, 500, 5000) for w in (1, 50, 500, 5000)) <= 7 * 256


def test_plan_boxes_cover_resized_image():
    plan = plan_tiles(600, 800)
    boxes = plan.boxes()
    assert plan.resized_wh == (1344, 896) and len(boxes) == 6
    assert boxes[0] == (0, 0, 448, 448) and boxes[2] == (896, 0, 1344, 448) and boxes[3] == (0, 448, 448, 896)
    area = sum((r - l) * (b - t) for l, t, r, b in boxes)
    assert area == 1344 * 896
