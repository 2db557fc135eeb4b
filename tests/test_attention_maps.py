"""From tokens back to pixels (navil_utils.analysis.attention_maps): scale geometry against the preprocessing,
one-hot attention rows landing on the right cell and pixel box, upsampling, ViT query maps and attention
rollout against the ViT's own eager attentions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from navil_utils.analysis.attention import AttentionRecorder, TokenLayout
from navil_utils.analysis.attention_maps import (
    ScaleGeometry,
    ScaleMap,
    attention_rollout,
    geometry_frame,
    plan_geometries,
    scale_geometries,
    scale_maps,
    upsample_to_image,
    vit_position,
    vit_query_maps,
    vit_rollout,
)
from navil_utils.errors import ConfigError, ModelInputError
from navil_utils.models.checkpoint import load_config
from navil_utils.models.vision import window_layout
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.processing.processor import pixel_budget
from navil_utils.reference.golden import load_golden_case

IDS = {"<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<IMG_LINE_BREAK>": 4, "<IMG_FRAME_BREAK>": 5}
TEXT = [10, 11, 12]
BUDGET = dict(min_pixels=2048, max_pixels=8192)   # 131 x 77 is shrunk, and gets 3 scales


def _noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(height, width, 3), dtype=np.uint8)


def _prompt(inputs, window_size: int = 4) -> TokenLayout:
    ids = TEXT + image_span_ids(inputs.grids_of(0), IDS, inputs.merge_size) + TEXT
    return TokenLayout.build(ids, inputs.image_grid_thw, IDS, merge_size=inputs.merge_size, window_size=window_size)


def _expected_pixels(start: float, stop: float, size: int) -> np.ndarray:
    """Pixels whose centre lies in ``[start, stop)``."""
    centres = np.arange(size) + 0.5
    return (centres >= start) & (centres < stop)


# ---------------------------------------------------------------------------------------------------
# geometry


def test_geometry_of_a_resized_padded_scale_by_hand():
    """100 x 60 image resized to 50 x 30 and padded to 64 x 32: two 32-px cells, each 64 original px wide;
    the second reaches past the image (x 64…128, image ends at 100), the bottom 4 rows are padding."""
    geo = ScaleGeometry(0, 0, rows=1, cols=2, cell_px=32, original_hw=(60, 100), resized_hw=(30, 50),
                        padded_hw=(32, 64))
    assert geo.factors == (2.0, 2.0) and geo.cell_hw == (64.0, 64.0)
    assert geo.grid_box == (0.0, 0.0, 128.0, 64.0) and geo.image_box == (0.0, 0.0, 100.0, 60.0)
    assert geo.cell_box(0, 1) == (64.0, 0.0, 128.0, 64.0)
    np.testing.assert_allclose(geo.cell_boxes()[0, 1], [64, 0, 128, 64])
    np.testing.assert_allclose(geo.image_fraction(), [[60 / 64, (36 / 64) * (60 / 64)]])
    np.testing.assert_allclose(geo.overlap_fraction((10, 10, 74, 42)), [[(54 / 64) * (32 / 64), (10 / 64) * (32 / 64)]])
    np.testing.assert_allclose(geo.overlap_fraction((200, 0, 300, 10)), [[0.0, 0.0]])
    patches = geo.at_patches(2)
    assert (patches.rows, patches.cols, patches.cell_px, patches.cell_hw) == (2, 4, 16, (32.0, 32.0))

    heat = upsample_to_image(torch.tensor([[0.0, 1.0]]), geometry=geo)
    assert heat.shape == (60, 100)
    assert torch.equal(heat.nonzero()[:, 1].unique(), torch.arange(64, 100))   # x in [64, 100), every row
    assert int(heat.sum()) == 60 * 36
    smooth = upsample_to_image(torch.tensor([[0.0, 1.0]]), geometry=geo, mode="bilinear")
    # cell centres at x = 32 and 96: clamped before / after, linear in between (pixel x centre = x + 0.5)
    assert float(smooth[0, 31]) == 0.0 and float(smooth[0, 99]) == 1.0
    assert abs(float(smooth[5, 63]) - (63.5 - 32) / 64) < 1e-12
    with pytest.raises(ConfigError, match="does not cover the padded size"):
        ScaleGeometry(0, 0, 1, 3, 32, (60, 100), (30, 50), (32, 64))


def test_geometries_follow_the_preprocessing_and_the_checkpoint_budget():
    inputs = preprocess_multiscale(_noise(77, 131), **BUDGET)
    geometry = scale_geometries(inputs)
    assert len(geometry) == len(inputs.scales) >= 3
    assert any(g.resized_hw != g.original_hw for g in geometry)
    assert any(g.padded_hw != g.resized_hw for g in geometry)
    for geo, info in zip(geometry, inputs.scales):
        assert (geo.rows, geo.cols) == (info.grid_thw[1] // 2, info.grid_thw[2] // 2)
        assert geo.cell_px == 32 and geo.padded_hw == info.padded_hw and geo.resized_hw == info.resized_hw
        h, w = info.resized_hw
        assert geo.grid_box == pytest.approx((0, 0, info.padded_hw[1] * 131 / w, info.padded_hw[0] * 77 / h))
    frame = geometry_frame(geometry)
    assert list(frame["scale"]) == list(range(len(geometry))) and (frame["padding_share"] >= 0).all()

    config = load_config("data/models/navil-tiny")
    for height, width in [(64, 224), (128, 96), (77, 131), (300, 41)]:
        image = Image.fromarray(_noise(height, width))
        reference = scale_geometries(preprocess_multiscale(image, **pixel_budget(config)))
        assert plan_geometries(config, (height, width)) == reference


def test_cells_cover_the_pixels_the_model_sees():
    """A black square on white, through resize and padding: a cell well away from the square's box is white in
    the scale image the ViT sees, a cell wholly inside the box is black."""
    height, width, box = 150, 250, (60, 40, 200, 120)
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 0
    inputs = preprocess_multiscale(pixels, min_pixels=2048, max_pixels=32768)   # all scales resized
    geometry = scale_geometries(inputs)
    assert len(geometry) >= 3 and all(g.resized_hw != g.original_hw for g in geometry)
    checked_inside = checked_outside = 0
    for geo, scale_image in zip(geometry, inputs.scale_images()):
        h, w = geo.resized_hw
        dark = scale_image[..., 0] < 128
        valid = np.zeros(dark.shape, dtype=bool)
        valid[:h, :w] = True                                      # padding is black too: leave it out
        margin = 3 * max(geo.factors) + 1                          # bicubic reaches ~2 resized px
        near = geo.overlap_fraction((box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin))
        inside = geo.overlap_fraction(box)
        u = geo.cell_px
        for r in range(geo.rows):
            for c in range(geo.cols):
                block, real = dark[r * u:(r + 1) * u, c * u:(c + 1) * u], valid[r * u:(r + 1) * u, c * u:(c + 1) * u]
                if not real.any():
                    continue
                share = block[real].mean()
                if near[r, c] == 0:
                    assert share == 0, (geo.scale, r, c)
                    checked_outside += 1
                if inside[r, c] == 1:
                    assert share > 0.9, (geo.scale, r, c)
                    checked_inside += 1
    assert checked_inside >= 2 and checked_outside >= 2, (checked_inside, checked_outside)


# ---------------------------------------------------------------------------------------------------
# LLM rows -> scale maps -> pixels


def test_one_hot_row_gives_one_cell_and_its_pixel_box():
    """All mass on one visual token: exactly one non-zero cell, at the token's raster cell (window order
    undone), and after nearest upsampling exactly the original pixels whose centres lie in the cell box
    computed by hand from the scale's resize and padding."""
    height, width = 77, 131
    inputs = preprocess_multiscale(_noise(height, width), **BUDGET)
    layout = _prompt(inputs)
    geometry = scale_geometries(inputs)
    visual = layout.kind_mask("visual")
    assert bool(((layout.row != layout.slot_row) | (layout.col != layout.slot_col))[visual].any())  # window order
    tried = 0
    for info, geo in zip(inputs.scales, geometry):
        rows, cols = info.grid_thw[1] // 2, info.grid_thw[2] // 2
        for r, c in {(0, 0), (rows - 1, cols - 1), (rows // 2, cols - 1), (rows - 1, 0)}:
            position = int((visual & (layout.scale == geo.scale) & (layout.row == r) & (layout.col == c)).nonzero())
            attention = torch.zeros(len(layout))
            attention[position] = 1.0
            maps = scale_maps(attention, layout, geometry=geometry)
            assert [m.scale for m in maps] == list(range(len(geometry)))
            for m in maps:
                expected = torch.zeros(m.grid)
                if m.scale == geo.scale:
                    expected[r, c] = 1.0
                assert torch.equal(m.values, expected)
            # the cell box by hand: u = 32 resized px per token, resized -> original by H/h, W/w
            h, w = info.resized_hw
            x0, x1 = c * 32 * width / w, (c + 1) * 32 * width / w
            y0, y1 = r * 32 * height / h, (r + 1) * 32 * height / h
            assert geo.cell_box(r, c) == pytest.approx((x0, y0, x1, y1))
            heat = upsample_to_image(maps[geo.scale]).numpy()
            assert heat.shape == (height, width)
            expected_pixels = _expected_pixels(y0, y1, height)[:, None] & _expected_pixels(x0, x1, width)[None, :]
            assert np.array_equal(heat != 0, expected_pixels)
            tried += 1
    assert tried >= 10


def test_nearest_upsampling_partitions_the_image_among_the_cells():
    inputs = preprocess_multiscale(_noise(77, 131), **BUDGET)
    for geo in scale_geometries(inputs):
        ids = torch.arange(geo.rows * geo.cols, dtype=torch.float64).reshape(geo.rows, geo.cols)
        labels = upsample_to_image(ids, geometry=geo).long()
        fraction = geo.image_fraction()
        counts = torch.bincount(labels.reshape(-1), minlength=geo.rows * geo.cols).reshape(geo.rows, geo.cols)
        ch, cw = geo.cell_hw
        # every cell's pixel count is its in-image area up to one pixel row/column per side
        area = torch.tensor(fraction * ch * cw)
        assert ((counts.double() - area).abs() <= ch + cw + 1).all()
        assert int(counts.sum()) == 77 * 131
        smooth = upsample_to_image(torch.ones(2, geo.rows, geo.cols), geometry=geo, mode="bilinear")
        assert smooth.shape == (2, 77, 131) and torch.allclose(smooth, torch.ones_like(smooth))


def test_scale_maps_of_a_recorded_row_keep_its_visual_mass(case):
    model, px = case.model, case.pixel_inputs
    with torch.inference_mode(), AttentionRecorder(model, llm_layers=[-1], queries="last", heads="all",
                                                   dtype=torch.float32) as rec:
        model(**case.image_inputs)
    layout = TokenLayout.from_model(model, case.inputs["input_ids"], px["image_grid_thw"])
    row = rec.llm_map(-1)[:, 0]                                   # (heads, K)
    maps = scale_maps(row, layout)
    assert [m.grid for m in maps] == [(2, 3), (2, 4), (3, 5)] and all(m.geometry is None for m in maps)
    visual_mass = row[:, layout.kind_mask("visual")].sum(-1)
    torch.testing.assert_close(sum(m.mass for m in maps), visual_mass)
    for m in maps:
        assert torch.equal(m.values, layout.arrange(row, m.image, m.scale))


def test_map_errors_name_the_problem():
    inputs = preprocess_multiscale(_noise(77, 131), **BUDGET)
    layout = _prompt(inputs)
    geometry = scale_geometries(inputs)
    with pytest.raises(ModelInputError, match="do not match"):
        scale_maps(torch.zeros(len(layout)), layout, geometry=geometry[1:])
    with pytest.raises(ModelInputError, match="keys but image 0 scale"):
        scale_maps(torch.zeros(5), layout)
    with pytest.raises(ModelInputError, match="no image 1"):
        scale_maps(torch.zeros(len(layout)), layout, image=1)
    with pytest.raises(ConfigError, match="mode must be"):
        upsample_to_image(torch.zeros(2, 2), (4, 4), mode="cubic")
    with pytest.raises(ModelInputError, match="not the geometry's"):
        upsample_to_image(torch.zeros(3, 3), geometry=geometry[0])
    with pytest.raises(ConfigError, match="needs image_size"):
        upsample_to_image(torch.zeros(2, 2))
    with pytest.raises(ModelInputError, match="outside the"):
        geometry[0].cell_box(99, 0)


# ---------------------------------------------------------------------------------------------------
# rollout


def _row_stochastic(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(-1)


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(6)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(attention_rollout([eye.expand(3, 6, 6)]), torch.eye(6, dtype=torch.float64))


def test_rollout_equals_the_direct_matrix_product():
    maps = [_row_stochastic(2, 5, 5, seed=s) for s in range(3)]     # (heads, L, L) per layer
    steps = [0.5 * m.mean(0) + 0.5 * torch.eye(5, dtype=torch.float64) for m in maps]
    expected = steps[2] @ steps[1] @ steps[0]
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(5, dtype=torch.float64))
    plain = attention_rollout([m.mean(0) for m in maps], residual=0.0)
    torch.testing.assert_close(plain, maps[2].mean(0) @ maps[1].mean(0) @ maps[0].mean(0))
    with pytest.raises(ConfigError, match="at least one"):
        attention_rollout([])
    with pytest.raises(ModelInputError, match="must be"):
        attention_rollout([torch.ones(2, 3)])


def _eager_vit(model, px):
    """Per layer: the full (N, N) block-diagonal map (encoder order, heads averaged) from eager attentions."""
    config = model.config.vision_config
    layout = window_layout(px["image_grid_thw"], config.merge_size, config.window_size)
    with torch.inference_mode():
        eager = model.vision_model(px["pixel_values"], px["image_grid_thw"], output_attentions=True).attentions
    full = config.fullatt_block_indexes
    n = px["pixel_values"].shape[0]
    out = []
    for layer, maps in enumerate(eager):
        bounds = layout.cu_seqlens if full is None or layer in full else layout.cu_window_seqlens
        segments = sorted(set(zip(bounds[:-1], bounds[1:])) - {(b, b) for b in bounds})
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for (start, end), probs in zip(segments, maps):
            matrix[start:end, start:end] = probs.double().mean(0)
        out.append(matrix)
    return out


def test_vit_rollout_and_query_maps_agree_with_eager_attentions():
    case = load_golden_case("qwen3_ve")
    model, px = case.model, case.pixel_inputs
    layout = TokenLayout.from_model(model, case.inputs["input_ids"], px["image_grid_thw"])
    with torch.inference_mode(), AttentionRecorder(model, llm_layers=None, vit_layers="all", heads="all",
                                                   dtype=torch.float32) as rec:
        model(**case.image_inputs)
    eager = _eager_vit(model, px)
    whole = attention_rollout(eager)                                 # (N, N): block-diagonal per scale
    rollouts = vit_rollout(rec, layout)
    assert [r.grid for r in rollouts] == [(4, 6), (4, 8), (6, 10)]
    for rollout, info in zip(rollouts, layout.scales):
        block = whole[info.vit_start:info.vit_end, info.vit_start:info.vit_end]
        torch.testing.assert_close(block.sum(-1), torch.ones(block.shape[0], dtype=torch.float64))
        h, w = rollout.grid
        for r, c in [(0, 0), (h - 1, w - 1), (1, w - 2)]:
            position = vit_position(layout, 0, info.scale, r, c)
            expected = torch.full((h, w), float("nan"), dtype=torch.float64)
            for k in range(info.vit_start, info.vit_end):                # keys to raster, by hand
                expected[layout.vit_row[k], layout.vit_col[k]] = whole[position, k]
            torch.testing.assert_close(rollout.map([(r, c)]).values, expected, atol=2e-6, rtol=0)
        assert rollout.map().values.shape == (h, w)
    # one query patch of the widest scale, last column: a partial window in the window layer (0)
    scale = layout.scales[2]
    query = (1, 9)
    position = vit_position(layout, 0, 2, *query)
    for layer in (0, 1):
        (m,) = vit_query_maps(rec, layout, layer, [(2, *query)])
        assert isinstance(m, ScaleMap) and m.values.shape == (4, 6, 10) and m.query == query
        finite = torch.isfinite(m.values[0])
        if layer == 0:
            assert finite[:, 8:].all() and not finite[:, :8].any()   # window of 8 patches: columns 8-9 only
        else:
            assert finite.all()
        torch.testing.assert_close(torch.nan_to_num(m.values).sum((-2, -1)), torch.ones(4))
        head_mean = torch.nan_to_num(m.values).mean(0).double()
        for k in range(scale.vit_start, scale.vit_end):
            assert abs(float(head_mean[layout.vit_row[k], layout.vit_col[k]]) - float(eager[layer][position, k])) < 2e-6
    with torch.inference_mode(), AttentionRecorder(model, llm_layers=None, vit_layers="all",
                                                   vit_queries=[0, 1]) as partial:
        model(**case.image_inputs)
    with pytest.raises(ConfigError, match="unrecorded rows"):
        vit_rollout(partial, layout)
    with pytest.raises(ConfigError, match="in vit_queries"):
        vit_query_maps(partial, layout, 1, [(2, *query)])
