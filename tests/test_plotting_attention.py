"""The attention figures (navil_utils.plotting.attention) draw what the data say: one panel per layer / scale, block
boundaries at the layout's positions, the evidence box and the query patch where they are, labelled axes, one bar
or error bar per statistic — on constructed layouts and attention rows (no model)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from navil_utils.analysis.attention import TokenLayout  # noqa: E402
from navil_utils.analysis.attention_maps import ScaleMap, scale_geometries, scale_maps  # noqa: E402
from navil_utils.analysis.attention_report import PromptAttention  # noqa: E402
from navil_utils.errors import ConfigError  # noqa: E402
from navil_utils.plotting.attention import (  # noqa: E402
    BLOCK_BOUNDARY_GID,
    attention_explorer,
    block_boundaries,
    plot_answer_maps,
    plot_blanking,
    plot_image_maps,
    plot_pointing,
    plot_query_attention,
    plot_sinks,
    plot_token_attention,
    plot_visual_share,
    plot_vit_maps,
)
from navil_utils.processing.image_tokens import image_span_ids  # noqa: E402
from navil_utils.processing.multiscale import preprocess_multiscale  # noqa: E402

IDS = {"<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<IMG_LINE_BREAK>": 4, "<IMG_FRAME_BREAK>": 5}
BUDGET = dict(min_pixels=2048, max_pixels=16384)   # 131 x 77: 4 scales
HEIGHT, WIDTH = 77, 131
BOX = (40, 20, 80, 50)


@pytest.fixture(scope="module")
def prompt():
    """A constructed prompt: text, a 4-scale image span, text; random causal attention in 3 layers x 2 heads."""
    inputs = preprocess_multiscale(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8), **BUDGET)
    ids = [10] * 5 + image_span_ids(inputs.grids_of(0), IDS, 2) + [11] * 6
    layout = TokenLayout.build(ids, inputs.image_grid_thw, IDS, merge_size=2, window_size=4)
    size = len(layout)
    scores = torch.randn(3, 2, size, size, generator=torch.Generator().manual_seed(0))
    scores = scores.masked_fill(torch.triu(torch.ones(size, size, dtype=torch.bool), 1), float("-inf"))
    llm = scores.softmax(-1)
    tokens = tuple(f"t{p}" for p in range(size))
    return PromptAttention(layout, tuple(scale_geometries(inputs)), llm, tokens, torch.tensor(ids), "x")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def _boundary_lines(ax):
    """(x of vertical, y of horizontal) boundary lines of a matrix panel."""
    xs, ys = set(), set()
    for line in ax.get_lines():
        if line.get_gid() != BLOCK_BOUNDARY_GID:
            continue
        x, y = line.get_xdata(), line.get_ydata()
        if x[0] == x[1]:
            xs.add(float(x[0]))
        else:
            ys.add(float(y[0]))
    return xs, ys


def test_token_matrices_one_panel_per_layer_with_block_lines_at_the_layouts_positions(prompt):
    layout = prompt.layout
    kinds = layout.kinds
    img_start, img_end = kinds.index("img_start"), kinds.index("img_end")
    first_of_scale = [int(((layout.scale == s.scale) & layout.kind_mask("visual")).nonzero()[0]) for s in layout.scales]
    expected = [img_start] + first_of_scale + [img_end, img_end + 1]
    assert block_boundaries(layout) == expected

    matrices = [prompt.matrix(layer) for layer in range(prompt.num_layers)]
    fig = plot_token_attention(matrices, layout, labels=["L0", "L1", "L2"])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and len(fig.axes) == 4                     # + one shared colour bar
    for ax, label in zip(panels, ["L0", "L1", "L2"]):
        assert ax.get_title() == label
        assert ax.get_xlabel() == "key (attended position)"
        xs, ys = _boundary_lines(ax)
        assert xs == ys == {b - 0.5 for b in expected}
        shown = ax.images[0].get_array()
        assert shown.shape == (len(layout), len(layout))
        assert np.ma.getmaskarray(shown)[0, 1] or np.isnan(shown[0, 1])  # causal: the key after the query is blank
        assert ax.images[0].norm.__class__.__name__ == "LogNorm"
    assert panels[0].get_ylabel() == "query position"
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    first = layout.scales[0]
    assert f"scale 0 ({first.rows}×{first.cols})" in labels and "text" in labels
    assert "<img>" not in labels                                        # 1-token blocks stay unlabelled
    colourbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert "log" in colourbar.get_ylabel()
    plt.close(fig)
    with pytest.raises(ConfigError, match="does not fit"):
        plot_token_attention([torch.zeros(3, 3)], layout)


def test_answer_maps_grid_layers_by_scales_with_box_and_row_colour_bars(prompt, image):
    maps = {layer: prompt.maps(layer) for layer in range(prompt.num_layers)}
    fig = plot_answer_maps(image, maps, box=BOX)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    scales = len(prompt.geometry)
    assert len(panels) == prompt.num_layers * scales and len(bars) == prompt.num_layers
    for k, ax in enumerate(panels):
        assert len(ax.images) == 2                                       # the image + the map
        assert ax.images[1].get_array().shape[:2] == (HEIGHT, WIDTH)     # on the original pixels
        boxes = [p for p in ax.patches if p.get_gid() == "evidence_box"]
        assert len(boxes) == 1 and boxes[0].get_xy() == (BOX[0] - 0.5, BOX[1] - 0.5)
        assert boxes[0].get_width() == BOX[2] - BOX[0]
        assert "% of this layer's visual attention" in ax.get_xlabel()
    assert [panels[k * scales].get_ylabel() for k in range(prompt.num_layers)] == [
        f"LLM layer {k}" for k in range(prompt.num_layers)]
    assert panels[0].get_title().startswith("scale 0: ") and panels[scales].get_title() == ""
    assert bars[0].get_ylabel() == "attention per visual token"
    plt.close(fig)


def test_map_values_follow_the_cells(prompt, image):
    """A one-hot row lands on its token's cell: the coloured pixels of the overlay are that cell's pixels."""
    layout = prompt.layout
    position = int(((layout.scale == 3) & layout.kind_mask("visual")).nonzero()[5])
    row = torch.zeros(len(layout))
    row[position] = 1.0
    maps = scale_maps(row, layout, geometry=prompt.geometry)
    fig = plot_image_maps(image, [maps], norm="row")
    overlay = fig.axes[3].images[1].get_array()                        # scale 3, RGBA with opacity ~ value
    geo = prompt.geometry[3]
    x0, y0, x1, y1 = geo.cell_box(int(layout.row[position]), int(layout.col[position]))
    ys, xs = np.nonzero(overlay[..., 3] > 0.5)
    assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1) and ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
    plt.close(fig)
    with pytest.raises(ConfigError, match="norm"):
        plot_image_maps(image, [maps], norm="rows")


def test_vit_maps_two_rows_with_the_query_patch(prompt, image):
    geo = prompt.geometry[-1].at_patches(2)
    values = torch.rand(1, geo.rows, geo.cols, generator=torch.Generator().manual_seed(1))
    query = {layer: ScaleMap(0, 3, values, geo, query=(1, 2)) for layer in range(4)}
    rollout = [ScaleMap(0, g.scale, torch.rand(g.rows * 2, g.cols * 2, generator=torch.Generator().manual_seed(2)),
                        g.at_patches(2), query=(0, 1)) for g in prompt.geometry]
    fig = plot_vit_maps(image, query, rollout, box=BOX)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]
    assert len(panels) == 4 + len(rollout)
    assert [ax.get_title() for ax in panels[:4]] == [f"ViT layer {k}" for k in range(4)]
    assert panels[4].get_title() == "rollout · scale 0"
    marked = [p for p in panels[0].patches if p.get_gid() == "query_patch"]
    x0, y0, _, _ = geo.cell_box(1, 2)
    assert len(marked) == 1 and marked[0].get_xy() == pytest.approx((x0 - 0.5, y0 - 0.5))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 + len(rollout)                                # one for the top row, one per rollout panel
    plt.close(fig)


def _long(keys: dict, statistics, value=0.3):
    rows = []
    for k, statistic in enumerate(statistics):
        rows.append({**keys, "statistic": statistic, "mean": value + 0.01 * k, "low": value - 0.05 + 0.01 * k,
                     "high": value + 0.05 + 0.01 * k, "n": 50})
    return rows


def test_visual_share_one_errorbar_line_per_statistic():
    frame = pd.DataFrame([r for layer in range(4) for r in _long(
        {"layer": layer}, ["visual", "text", "markers", "visual_uniform", "visual - uniform"])])
    fig = plot_visual_share(frame)
    ax = fig.axes[0]
    assert len(ax.containers) == 4                                      # visual, uniform, text, markers
    assert ax.get_xlabel() == "LLM layer" and "50 questions" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["visual tokens",
                                                                        "visual tokens, uniform attention"]
    plt.close(fig)


def test_pointing_three_panels():
    statistics = ["attention", "uniform", "area", "shuffled", "mass_share", "attention - uniform"]
    by_layer = pd.DataFrame([r for layer in range(4) for r in _long({"layer": layer, "scale": "all"}, statistics)])
    by_group = pd.DataFrame([r for g in ["color", "count", "text"] for r in _long(
        {"group": g, "layer": 3, "scale": "all"}, statistics)])
    by_role = pd.DataFrame([r for layer in range(4) for role in ("smallest", "largest") for r in _long(
        {"layer": layer, "scale": role}, statistics)])
    fig = plot_pointing(by_layer, by_group, by_role, group_layer=3)
    left, middle, right = fig.axes
    assert len(left.containers) == 4 and len(right.containers) == 4
    bars = [c for c in middle.containers if c.__class__.__name__ == "BarContainer"]
    assert len(bars) == 4 and all(len(c) == 3 for c in bars)           # 4 statistics x 3 groups
    assert [t.get_text() for t in middle.get_xticklabels()] == ["color\n(n=50)", "count\n(n=50)", "text\n(n=50)"]
    assert left.get_ylim()[1] < 0.6                                     # mass_share (1.0) does not set the scale
    for ax in fig.axes:
        assert ax.get_ylabel()
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {
        "attention inside the box", "uniform attention (baseline)", "box area / image area",
        "another question's box (baseline)"}
    plt.close(fig)


def test_sinks_and_blanking_figures():
    statistics = ["attention", "attention without sinks", "uniform", "uniform without sinks",
                  "attention - uniform (without sinks)", "sink mass"]
    sinks = pd.DataFrame([r for layer in range(4) for r in _long({"layer": layer, "k": 3}, statistics)])
    fig = plot_sinks(sinks)
    left, right = fig.axes
    assert len(left.containers) == 4 and len(right.patches) == 4
    assert "top 3 tokens" in right.get_ylabel()
    plt.close(fig)

    rows = []
    for group, accuracy in (("overall", 0.5), ("color", 0.7), ("text", 0.0)):
        for condition in ("intact", "inside_blanked", "outside_blanked"):
            value = accuracy if condition != "inside_blanked" else accuracy / 3
            rows.append({"group": group, "condition": condition, "accuracy": value, "low": value * 0.8,
                         "high": min(1.0, value * 1.2), "n": 10})
    fig = plot_blanking(pd.DataFrame(rows), chance={"overall": 0.2, "color": 1 / 6})
    ax = fig.axes[0]
    assert len(ax.patches) == 9                                         # 3 groups x 3 conditions
    assert "all 0" in [t.get_text() for t in ax.texts]                  # the text group is all zero
    assert ax.get_ylabel() == "exact-match accuracy (95% CI)"
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "chance (uniform guess)"
    plt.close(fig)


def test_query_attention_and_its_explorer(prompt, image):
    fig = plot_query_attention(prompt, layer=2, query=-1, image=image, box=BOX)
    bar_ax = fig.axes[0]
    assert len(bar_ax.containers[0]) == len(prompt.layout)              # one bar per key up to the query
    assert bar_ax.get_yscale() == "log" and bar_ax.get_ylabel() == "attention (log)"
    assert "LLM layer 2, mean of heads" in fig._suptitle.get_text()
    plt.close(fig)
    early = plot_query_attention(prompt, layer=0, query=2, head=1, image=image)
    assert any("precedes the image" in ax.get_xlabel() for ax in early.axes)
    plt.close(early)

    widget = attention_explorer(prompt, image, box=BOX)
    menus, picture = widget.children
    layer_menu, head_menu, query_menu = menus.children
    first = bytes(picture.value)
    assert first.startswith(b"\x89PNG") and layer_menu.value == prompt.num_layers - 1
    assert query_menu.value == len(prompt.layout) - 1 and head_menu.value == -1
    head_menu.value = 0
    assert bytes(picture.value) != first
