"""The preprocessing figures draw what the data says (counts in titles/legends, one image per scale)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from navil_utils.analysis.token_budgets import token_budget_table  # noqa: E402
from navil_utils.plotting.preprocessing import (  # noqa: E402
    PREPROCESSING_COLOURS,
    budget_explorer,
    has_window_attention,
    image_span_categories,
    plot_multiscale_scales,
    plot_nvlm_tiles,
    plot_token_budgets,
    plot_token_sequence,
)
from navil_utils.processing.image_io import make_test_pattern  # noqa: E402
from navil_utils.processing.multiscale import preprocess_multiscale  # noqa: E402
from navil_utils.processing.tiling import preprocess_tiles  # noqa: E402

SMALL = dict(min_pixels=12 * 256, max_pixels=120 * 256)


@pytest.fixture(scope="module")
def inputs():
    return preprocess_multiscale(make_test_pattern(150, 260), **SMALL)


def test_scales_figure_has_one_image_per_scale(inputs):
    fig = plot_multiscale_scales(inputs)
    ax = fig.axes[0]
    assert len(ax.images) == len(inputs.scales) >= 2
    for image, scale in zip(ax.images, inputs.scales):
        assert image.get_array().shape[:2] == scale.padded_hw  # true size, padding included
    assert f"{inputs.num_visual_tokens} visual tokens" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["patch (16 px)", "merged token (32 px)", "zero padding"]  # no config: no windows
    plt.close(fig)


def _window_collections(ax):
    window = matplotlib.colors.to_rgba(PREPROCESSING_COLOURS["window"])
    return [c for c in ax.collections if tuple(c.get_colors()[0]) == window]


def test_windows_follow_the_config(inputs):
    shipped = {"fullatt_block_indexes": None, "num_hidden_layers": 4, "window_size": 8}
    windowed = {"fullatt_block_indexes": [3], "num_hidden_layers": 4, "window_size": 4}
    all_listed = {"fullatt_block_indexes": [0, 1, 2, 3], "num_hidden_layers": 4, "window_size": 8}
    assert not has_window_attention(shipped)
    assert not has_window_attention(all_listed)  # every layer global
    assert has_window_attention(windowed)
    from navil_utils.models.checkpoint import load_config
    from navil_utils.models.presets import navil_2b_config, navil_9b_config

    for config in (navil_2b_config(), navil_9b_config(), load_config(Path(__file__).resolve().parents[1] / "data" / "models" / "navil-tiny")):
        assert config.vision_config.fullatt_block_indexes is None
        assert not has_window_attention(config.vision_config)
    fig = plot_multiscale_scales(inputs, vision_config=shipped)
    assert not _window_collections(fig.axes[0])
    plt.close(fig)
    fig = plot_multiscale_scales(inputs, vision_config=windowed)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[2] == "attention window (64 px)"  # window_size 4 patches of 16 px, from the config
    assert len(_window_collections(fig.axes[0])) == len(inputs.scales)
    plt.close(fig)
    fig = plot_multiscale_scales(inputs, vision_config=windowed, show_windows=False)  # explicit wins
    assert not _window_collections(fig.axes[0])
    plt.close(fig)


def test_token_strip_counts_match_span(inputs):
    tokens, categories = image_span_categories([s.grid_thw for s in inputs.scales])
    assert len(tokens) == len(inputs.image_span_text().replace("><", ">\n<").split("\n"))
    for k, scale in enumerate(inputs.scales):
        assert categories.count(k) == scale.visual_tokens
    assert categories.count("line") == sum(s.tokens.rows for s in inputs.scales)
    assert categories.count("frame") == len(inputs.scales)
    fig = plot_token_sequence(inputs, text_before=5, text_after=7)
    top = fig.axes[0]
    assert top.images[0].get_array().shape == (1, len(tokens) + 12)
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels[0] == "text (12)" and labels[1] == "<img>, </img> (2)"
    assert f"({inputs.scales[-1].visual_tokens})" in labels[1 + len(inputs.scales)]
    plt.close(fig)


def test_tiles_figure_and_budget_figure():
    tiles = preprocess_tiles(make_test_pattern(120, 300), max_num=4)
    fig = plot_nvlm_tiles(tiles)
    assert f"{tiles.num_tiles} tiles × 256 = {256 * tiles.num_tiles}" in fig.get_suptitle()
    plt.close(fig)
    sizes = token_budget_table([(30, 40), (300, 400), (3000, 4000)])
    aspects = token_budget_table([(1000, 250), (500, 500), (250, 1000)])
    fig = plot_token_budgets(sizes, aspects)
    left = fig.axes[0]
    assert np.array_equal(left.lines[0].get_ydata(), sizes["navil_visual_tokens"].to_numpy())
    assert np.array_equal(left.lines[2].get_ydata(), sizes["nvlm_visual_tokens"].to_numpy())
    plt.close(fig)


def test_budget_slider_redraws():
    widget = budget_explorer(make_test_pattern(100, 200), (16, 64), initial=16, min_pixels=12 * 256)
    (slider, readout), picture = widget.children[0].children, widget.children[1]
    first = bytes(picture.value)
    assert first.startswith(b"\x89PNG")
    assert readout.value == "16 patches = 4,096 px" and not slider.readout  # value shown in full, not cut off
    slider.value = 64
    assert bytes(picture.value) != first
    assert readout.value == "64 patches = 16,384 px"


def test_scales_legend_swatches_match_the_drawn_grid_and_padding(inputs):
    """Each legend swatch has the colour, width and alpha of what it names on the image."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    fig = plot_multiscale_scales(inputs, show_windows=True)
    ax = fig.axes[0]
    legend = ax.get_legend()
    swatches = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    drawn = {}
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            key = (tuple(np.round(coll.get_colors()[0], 4)), float(coll.get_linewidths()[0]))
            drawn.setdefault(key, coll)
    for label in ("patch (16 px)", "merged token (32 px)", "attention window (128 px)"):
        line = swatches[label]
        rgba = tuple(np.round(matplotlib.colors.to_rgba(line.get_color(), line.get_alpha()), 4))
        assert (rgba, float(line.get_linewidth())) in drawn, label
    assert tuple(np.round(matplotlib.colors.to_rgba("white", 0.45), 4)) == (1.0, 1.0, 1.0, 0.45)
    padding = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == "///"]
    assert padding
    swatch = swatches["zero padding"]
    assert swatch.get_hatch() == "///"
    assert np.allclose(swatch.get_facecolor(), padding[0].get_facecolor())
    assert np.allclose(swatch.get_edgecolor(), padding[0].get_edgecolor())  # the hatch colour
    # white lines on a legend background dark enough to show them
    assert sum(matplotlib.colors.to_rgb(legend.get_frame().get_facecolor())) < 1.5
    plt.close(fig)


def test_token_budget_log_axes_get_more_than_two_labels():
    from navil_utils.plotting.preprocessing import readable_log_ticks

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.set_ylim(700, 2600)
    assert readable_log_ticks(ax.yaxis) == [800, 1000, 1500, 2000, 2500]  # one decade: finer steps
    ax.set_ylim(60, 20000)
    ticks = readable_log_ticks(ax.yaxis)
    assert ticks == [100, 200, 500, 1000, 2000, 5000, 10000, 20000]
    assert ax.yaxis.get_major_formatter()(5000, 0) == "5,000"
    plt.close(fig)
