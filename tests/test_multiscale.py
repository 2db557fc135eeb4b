"""NaViL multi-scale packing: golden exactness, agreement with the transformers-based reference
pipeline over random sizes, invariants, token accounting and window partitions."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import load_file

import navil_utils
from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    NAVIL_MAX_PIXELS,
    NAVIL_MIN_PIXELS,
)
from navil_utils.errors import ImageLoadError
from navil_utils.processing.multiscale import (
    merged_token_windows,
    navil_resize_size,
    navil_token_count,
    next_scale_budget,
    patchify,
    plan_multiscale,
    preprocess_multiscale,
    unpatchify,
    window_token_order,
)
from navil_utils.reference.fixtures import golden_dir
from navil_utils.reference.preprocessing import (
    reference_preprocess_multiscale,
    reference_scale_sizes,
)

GOLDEN_MIN, GOLDEN_MAX = 12 * 16 * 16, 48 * 16 * 16  # the fixture's budget: 3072 / 12288 px


@pytest.fixture(scope="module")
def golden():
    common = golden_dir("common")
    tensors = load_file(str(common / "pixel_inputs.safetensors"))
    meta = json.loads((common / "meta.json").read_text())
    return common / "image.png", tensors, meta


def _random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- golden


def test_golden_fixture_is_reproduced(golden):
    path, tensors, meta = golden
    out = preprocess_multiscale(path, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
    assert out.pixel_values.dtype == torch.float32 and out.image_grid_thw.dtype == torch.int64
    assert list(out.pixel_values.shape) == meta["pixel_values_shape"]
    assert out.image_grid_thw.tolist() == meta["image_grid_thw"] == tensors["image_grid_thw"].tolist()
    assert out.num_scales == meta["num_scales"] == tensors["num_scales"].tolist()
    np.testing.assert_allclose(out.pixel_values.numpy(), tensors["pixel_values"], rtol=0, atol=1e-6)
    assert np.array_equal(out.pixel_values.numpy(), tensors["pixel_values"])  # in fact bit-identical


def test_golden_scale_metadata(golden):
    path, _, meta = golden
    out = preprocess_multiscale(path, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
    assert [s.original_hw for s in out.scales] == [tuple(meta["image_hw"])] * 3
    # worked example (golden fixture image): resized 46×87, 63×120, 80×152 → padded 64×96, 64×128, 96×160
    assert [s.resized_hw for s in out.scales] == [(46, 87), (63, 120), (80, 152)]
    assert [s.padded_hw for s in out.scales] == [(64, 96), (64, 128), (96, 160)]
    assert out.visual_tokens_per_scale() == [6, 8, 15] and out.num_visual_tokens == 29
    # the budget after the smallest scale is 6144·0.7071² = 3071.94 (float32) < 3072 → the loop stops
    assert float(next_scale_budget(out.scales[0].padded_pixels)) == pytest.approx(3071.94, abs=1e-3)
    assert next_scale_budget(out.scales[0].padded_pixels) < np.float32(GOLDEN_MIN)


def test_golden_prompt_span_matches_fixture_prompt(golden):
    path, _, _ = golden
    out = preprocess_multiscale(path, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
    for variant in ("internlm2_ve", "qwen3_ve"):
        prompt = (golden_dir(variant) / "prompt.txt").read_text(encoding="utf-8")
        assert out.image_span_text() in prompt


def test_reference_oracle_reproduces_golden(golden):
    """The transformers-based oracle used below agrees with the fixture, so it is a valid oracle."""
    path, tensors, _ = golden
    pixel_values, grids, num_scales = reference_preprocess_multiscale(path, GOLDEN_MIN, GOLDEN_MAX)
    assert np.array_equal(pixel_values.numpy(), tensors["pixel_values"])
    assert grids.tolist() == tensors["image_grid_thw"].tolist() and num_scales == [3]


# --------------------------------------------------------------------------- agreement with the oracle

@st.composite
def sizes_and_budgets(draw, max_side: int = 420):
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(max(1, math.ceil(height / 200)), min(max_side, height * 200)))
    min_patches = draw(st.integers(1, 40))
    max_patches = draw(st.integers(min_patches, 160))
    return height, width, min_patches * 256, max_patches * 256


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sizes_and_budgets(), seed=st.integers(0, 2**16))
def test_pixels_and_grids_match_reference_pipeline(case, seed):
    height, width, min_pixels, max_pixels = case
    image = _random_image(height, width, seed)
    ours = preprocess_multiscale(image, min_pixels=min_pixels, max_pixels=max_pixels)
    pixel_values, grids, num_scales = reference_preprocess_multiscale(image, min_pixels, max_pixels)
    assert ours.image_grid_thw.tolist() == grids.tolist()
    assert ours.num_scales == num_scales
    assert ours.pixel_values.shape == pixel_values.shape
    assert torch.equal(ours.pixel_values, pixel_values)


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 30000),
    ratio=st.floats(1 / 200, 200),
    min_patches=st.integers(1, 2000),
    extra=st.integers(0, 30000),
    downsample=st.sampled_from([0.7071, 0.5, 0.8, 0.9]),
)
def test_scale_sizes_match_reference_loop(height, ratio, min_patches, extra, downsample):
    """Sizes only (no pixels), images up to 30000 px a side and budgets from tiny to NaViL's real one."""
    width = max(1, min(round(height * ratio), 200 * height))
    if max(height, width) / min(height, width) > 200:
        width = height
    min_pixels, max_pixels = min_patches * 256, (min_patches + extra) * 256
    plan = plan_multiscale(height, width, min_pixels, max_pixels, downsample)
    expected = reference_scale_sizes(height, width, min_pixels, max_pixels, downsample)
    assert [(s.resized_hw, s.grid_thw) for s in plan] == expected


@pytest.mark.parametrize(
    "height, width",
    [(1, 1), (1, 200), (200, 1), (3, 5), (4000, 3000), (2160, 3840), (7, 1400), (256, 256), (4, 777)],
)
def test_default_settings_match_reference_loop(height, width):
    plan = plan_multiscale(height, width)  # NaViL's real budget: 65,536 … 6,291,456 px
    expected = reference_scale_sizes(height, width, NAVIL_MIN_PIXELS, NAVIL_MAX_PIXELS)
    assert [(s.resized_hw, s.grid_thw) for s in plan] == expected


def test_float32_budget_semantics():
    """Later scales compare and divide in float32, like the reference's 0-d float32 tensors."""
    budget = next_scale_budget(6144)
    assert budget.dtype == np.float32
    torch_budget = torch.tensor([1, 4, 6]).prod() * 256 * (0.7071**2)
    assert torch_budget.dtype == torch.float32 and float(torch_budget) == float(budget)
    # an image whose area equals the float32-rounded budget is not "too large" for it
    for height, width in [(61, 101), (997, 1009), (25, 5000), (4097, 4099)]:
        budget = np.float32(height * width - 0.5)
        got = navil_resize_size(height, width, 1, budget)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,
        )

        assert got == smart_resize(height, width, factor=1, min_pixels=1, max_pixels=torch.tensor(float(budget)))


def test_first_scale_uses_exact_integer_budget():
    # 3000×2097 = 6,291,000 ≤ 6,291,456 → kept at full size; one more row is over budget
    assert plan_multiscale(2097, 3000)[-1].resized_hw == (2097, 3000)
    assert plan_multiscale(2098, 3000)[-1].resized_hw != (2098, 3000)


# ------------------------------------------------------------------------------------------ invariants


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 12000), width=st.integers(1, 12000))
def test_scale_invariants(height, width):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ImageLoadError, match="aspect ratio"):
            plan_multiscale(height, width)
        return
    plan = plan_multiscale(height, width)
    assert [s.scale_index for s in plan] == list(range(len(plan)))
    patches = [s.num_patches for s in plan]
    assert patches == sorted(set(patches)), "scales must strictly grow smallest → largest"
    for small, large in zip(plan, plan[1:]):
        assert small.resized_hw[0] <= large.resized_hw[0] and small.resized_hw[1] <= large.resized_hw[1]
    for s in plan:
        (h, w), (hp, wp), (t, gh, gw) = s.resized_hw, s.padded_hw, s.grid_thw
        assert hp % 32 == 0 and wp % 32 == 0 and h <= hp < h + 32 and w <= wp < w + 32
        assert (t, gh * 16, gw * 16) == (1, hp, wp) and gh % 2 == 0 and gw % 2 == 0
        assert s.visual_tokens == gh * gw // 4 and s.tokens.rows == gh // 2 and s.tokens.cols == gw // 2
        assert 0.0 <= s.padding_fraction < 1.0
    largest = plan[-1]
    if height * width > NAVIL_MAX_PIXELS:
        assert largest.resized_hw[0] * largest.resized_hw[1] <= NAVIL_MAX_PIXELS
    elif height * width < NAVIL_MIN_PIXELS:
        assert largest.resized_hw[0] * largest.resized_hw[1] >= NAVIL_MIN_PIXELS
    else:
        assert largest.resized_hw == (height, width) and not largest.needs_resize
    # every smaller scale had a budget of about half the next scale's padded area, ≥ min_pixels
    for small, large in zip(plan, plan[1:]):
        assert small.max_pixels == pytest.approx(large.padded_pixels * 0.7071**2, rel=1e-6)
        assert small.max_pixels >= NAVIL_MIN_PIXELS


def test_token_counts_match_image_span():
    image = _random_image(300, 700, seed=1)
    out = preprocess_multiscale(image, min_pixels=GOLDEN_MIN, max_pixels=200 * 256)
    span = out.image_span_text()
    n, m = out.pixel_values.shape[0], out.merge_size
    assert span.count(IMG_CONTEXT_TOKEN) == out.num_visual_tokens == n // m**2
    assert span.count(IMG_LINE_BREAK_TOKEN) == sum(s.tokens.rows for s in out.scales)
    assert span.count(IMG_FRAME_BREAK_TOKEN) == len(out.scales) == out.num_scales[0]
    # each row of the span has exactly `cols` context tokens, scale by scale
    rows = re.findall(f"((?:{re.escape(IMG_CONTEXT_TOKEN)})+){re.escape(IMG_LINE_BREAK_TOKEN)}", span)
    expected = [s.tokens.cols for s in out.scales for _ in range(s.tokens.rows)]
    assert [r.count(IMG_CONTEXT_TOKEN) for r in rows] == expected
    assert navil_token_count(300, 700, min_pixels=GOLDEN_MIN, max_pixels=200 * 256) == out.num_visual_tokens
    ids = out.image_span_ids({"<img>": 1, "</img>": 2, IMG_CONTEXT_TOKEN: 3, IMG_LINE_BREAK_TOKEN: 4,
                              IMG_FRAME_BREAK_TOKEN: 5})
    assert len(ids) == navil_token_count(300, 700, span=True, min_pixels=GOLDEN_MIN, max_pixels=200 * 256)


def test_padding_is_minus_one_and_unpatchify_round_trips():
    image = _random_image(70, 90, seed=2)
    out = preprocess_multiscale(image, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
    for scale, (start, stop), shown in zip(out.scales, out.patch_ranges(), out.scale_images()):
        chw = unpatchify(out.pixel_values[start:stop], scale.grid_thw)
        h, w = scale.resized_hw
        assert chw.shape == (3, *scale.padded_hw)
        assert np.all(chw[:, h:, :] == -1.0) and np.all(chw[:, :, w:] == -1.0)
        resized = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC)) if scale.needs_resize else np.asarray(image)
        assert np.array_equal(shown[:h, :w], resized)  # de-normalised scale == the PIL bicubic resize
        assert np.all(shown[h:] == 0) and np.all(shown[:, w:] == 0)
    block = np.arange(64 * 96 * 3, dtype=np.int64).reshape(64, 96, 3)
    assert np.array_equal(unpatchify(patchify(block), (1, 4, 6)), block.transpose(2, 0, 1))


def test_patch_order_is_merge_block_raster():
    """Patch index ((bh·(w/m) + bw)·m + mh)·m + mw holds pixel rows (bh·m+mh)·p…."""
    hp, wp, p, m = 64, 96, 16, 2
    tag = np.zeros((hp, wp, 3), dtype=np.int64)
    tag[..., 0] = np.arange(hp)[:, None] // p  # patch row
    tag[..., 1] = np.arange(wp)[None, :] // p  # patch column
    patches = patchify(tag, p, m)
    for bh in range(hp // (p * m)):
        for bw in range(wp // (p * m)):
            for mh in range(m):
                for mw in range(m):
                    index = ((bh * (wp // (p * m)) + bw) * m + mh) * m + mw
                    assert np.all(patches[index, 0] == bh * m + mh) and np.all(patches[index, 1] == bw * m + mw)


def test_list_of_images_concatenates_in_order():
    first, second = _random_image(50, 120, 3), _random_image(200, 60, 4)
    both = preprocess_multiscale([first, second], min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
    one, two = (preprocess_multiscale(x, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX) for x in (first, second))
    assert both.num_scales == one.num_scales + two.num_scales
    assert torch.equal(both.pixel_values, torch.cat([one.pixel_values, two.pixel_values]))
    assert torch.equal(both.image_grid_thw, torch.cat([one.image_grid_thw, two.image_grid_thw]))
    assert [s.image_index for s in both.scales] == [0] * one.num_scales[0] + [1] * two.num_scales[0]
    assert both.image_span_text(1) == two.image_span_text(0)
    pixel_values, grids, num_scales = reference_preprocess_multiscale([first, second], GOLDEN_MIN, GOLDEN_MAX)
    assert torch.equal(both.pixel_values, pixel_values) and both.num_scales == num_scales


def test_path_pil_and_array_inputs_agree(tmp_path):
    image = _random_image(40, 75, 5)
    path = tmp_path / "img.png"
    image.save(path)
    results = [preprocess_multiscale(x, min_pixels=GOLDEN_MIN, max_pixels=GOLDEN_MAX)
               for x in (image, str(path), path, np.asarray(image), path.read_bytes())]
    for other in results[1:]:
        assert torch.equal(results[0].pixel_values, other.pixel_values)
    assert results[1].sources == [str(path)]


def test_defaults_are_navil_settings():
    assert (NAVIL_MIN_PIXELS, NAVIL_MAX_PIXELS) == (256 * 16 * 16, 24576 * 16 * 16) == (65536, 6291456)
    out = preprocess_multiscale(_random_image(300, 400, 6))  # 120,000 px: inside the budget
    # hand-computed: largest kept at 300×400 → padded 320×416 → grid 20×26 (520 patches);
    # next budget 520·256·0.7071² = 66,559 px → β = √(120000/66559) → 223×297 → padded 224×320 → 14×20;
    # next budget 280·256·0.7071² = 35,839 < 65,536 → stop
    assert [s.resized_hw for s in out.scales] == [(223, 297), (300, 400)]
    assert out.image_grid_thw.tolist() == [[1, 14, 20], [1, 20, 26]]


@pytest.mark.parametrize("height, width", [(1, 201), (201, 1), (2, 500)])
def test_aspect_ratio_beyond_limit_is_a_typed_error(height, width, tmp_path):
    path = tmp_path / f"strip_{height}x{width}.png"
    Image.new("RGB", (width, height), (10, 20, 30)).save(path)
    with pytest.raises(ImageLoadError, match=r"aspect ratio .* exceeds NaViL's limit of 200") as info:
        preprocess_multiscale(path)
    assert str(path) in str(info.value)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(height, width, factor=1)


def test_bad_settings_are_rejected():
    image = _random_image(10, 10, 7)
    with pytest.raises(ValueError, match="min_pixels"):
        preprocess_multiscale(image, min_pixels=1000, max_pixels=10)
    with pytest.raises(ValueError, match="scale_downsample_ratio"):
        preprocess_multiscale(image, scale_downsample_ratio=1.5)
    with pytest.raises(ImageLoadError, match="empty list"):
        preprocess_multiscale([])


# ------------------------------------------------------------------------------- window partitions


def test_window_order_matches_golden_example():
    # merged grid 3×5 (patch grid 6×10) with window_size 8 → 4 merged tokens per side
    assert window_token_order(6, 10).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 4, 9, 14]
    windows = merged_token_windows(6, 10)
    assert windows.shape == (3, 5) and windows.tolist() == [[0, 0, 0, 0, 1]] * 3


def test_window_partition_counts():
    windows = merged_token_windows(36, 20)  # 18×10 merged tokens → 5×3 windows, last ones partial
    assert windows.max() + 1 == 15
    sizes = np.bincount(windows.ravel())
    assert sizes.sum() == 180 and sizes[0] == 16 and sizes[-1] == 2 * 2
    order = window_token_order(36, 20)
    assert sorted(order.tolist()) == list(range(180))
    assert np.all(np.diff(windows.ravel()[order]) >= 0)  # window by window
    assert window_token_order(8, 8).tolist() == list(range(16))  # one window: raster order kept


def test_public_names_are_exported():
    for name in ("load_image", "preprocess_multiscale", "preprocess_tiles", "plan_multiscale", "MultiScaleInputs"):
        assert callable(getattr(navil_utils, name)) or isinstance(getattr(navil_utils, name), type)
