"""Figures of image preprocessing: NaViL's multi-scale packing and NVLM-D's dynamic tiling (notebook 02).

Each function takes preprocessed inputs (:class:`~navil_utils.processing.multiscale.MultiScaleInputs`,
:class:`~navil_utils.processing.tiling.TiledInputs`) or token-budget tables and returns a figure.
"""
from __future__ import annotations

import numpy as np  # noqa: E402 - kept with the functions that need it

from navil_utils.plotting.style import DPI, PALETTE

#: Colours of the preprocessing figures.
PREPROCESSING_COLOURS = {
    "patch": "#ffffff",
    "merged": "#ffffff",
    "window": "#ff7f0e",
    "padding": "#7f7f7f",
    "image_tag": "#222222",
    "line_break": "#9ecae1",
    "frame_break": "#08306b",
}


#: Line styles of the grids drawn over each scale (and of their legend swatches).
GRID_STYLES = {
    "patch": {"color": PREPROCESSING_COLOURS["patch"], "lw": 0.3, "alpha": 0.45},
    "merged": {"color": PREPROCESSING_COLOURS["merged"], "lw": 0.8, "alpha": 0.8},
    "window": {"color": PREPROCESSING_COLOURS["window"], "lw": 1.6, "alpha": 1.0},
}
#: Style of the zero-padding rectangles (the hatch takes the edge colour; no outline).
PADDING_STYLE = {"facecolor": PREPROCESSING_COLOURS["padding"], "alpha": 0.6, "hatch": "///",
                 "edgecolor": "#303030", "linewidth": 0}
#: Background of the multi-scale legend: dark enough for the white grid lines to show.
LEGEND_FACE = "#5a5a5a"


def _collection_style(kind: str) -> dict:
    style = GRID_STYLES[kind]
    return {"colors": style["color"], "linewidths": style["lw"], "alpha": style["alpha"]}


def readable_log_ticks(axis, steps=(1, 2, 5), fine_steps=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
                       min_ticks: int = 4) -> list[float]:
    """Label a log axis at ``steps × 10^k`` inside its limits, as plain numbers (``500``, ``1,000``).

    matplotlib labels only whole decades, so an axis spanning about one decade shows one or two
    labels.  If ``steps`` give fewer than ``min_ticks`` labels, ``fine_steps`` are used instead.
    ``axis`` is ``ax.xaxis`` or ``ax.yaxis``; returns the tick values set.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    ticks = [s * 10.0 ** k for k in decades for s in steps if lo <= s * 10.0 ** k <= hi]
    if len(ticks) < min_ticks:
        ticks = [s * 10.0 ** k for k in decades for s in fine_steps if lo <= s * 10.0 ** k <= hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
    return ticks


def _scale_colours(num_scales: int) -> list:
    """One red shade per scale, light (smallest) → dark (largest)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("Reds")
    return [cmap(0.35 + 0.55 * k / max(num_scales - 1, 1)) for k in range(num_scales)]


def _grid_lines(x0: float, width: int, height: int, step: int) -> list:
    xs = [[(x0 + x, 0), (x0 + x, height)] for x in range(step, width, step)]
    ys = [[(x0, y), (x0 + width, y)] for y in range(step, height, step)]
    return xs + ys


def has_window_attention(vision_config) -> bool:
    """Whether a ViT config has window-attention layers.

    In NaViL's ViT (:mod:`navil_utils.models.vision`, as in the reference ``modeling_navil_vit_anyres.py``)
    layer ``l`` attends globally within each image scale if ``fullatt_block_indexes`` is ``None`` or
    contains ``l``; every other layer attends inside ``window_size``-patch windows.  So there are window
    layers only when ``fullatt_block_indexes`` is a list that misses at least one of the
    ``num_hidden_layers`` layers.  ``vision_config`` may be a config object or a dict.
    """
    def get(key, default=None):
        if isinstance(vision_config, dict):
            return vision_config.get(key, default)
        return getattr(vision_config, key, default)

    full = get("fullatt_block_indexes")
    if full is None:
        return False
    return any(layer not in full for layer in range(int(get("num_hidden_layers"))))


def plot_multiscale_scales(inputs, image_index: int = 0, *, fig=None, vision_config=None,
                           show_windows: bool | None = None, window_size: int | None = None,
                           max_patch_lines: int = 96, title: str | None = None):
    """Draw every scale of one image side by side at true relative size (pixel units).

    Each scale is the image the ViT sees (rebuilt from ``inputs.pixel_values``), with the ``p``-px
    patch grid (thin; omitted for scales with more than ``max_patch_lines`` patches per side), the
    ``p·m``-px merged-token grid and the zero padding shaded.  The window partition of the
    window-attention layers (``window_size`` patches per side, orange) is drawn only if the ViT has
    such layers: ``show_windows`` decides explicitly; if it is ``None`` the decision is
    :func:`has_window_attention` of ``vision_config`` (no config → no windows, as in every shipped
    config, where ``fullatt_block_indexes`` is ``None`` and all layers are global).  ``window_size``
    defaults to the config's (else 8, the reference default).  Below: a legend and one line per scale
    (resized → padded size, patch grid, visual tokens, padding share).
    ``inputs`` is a :class:`navil_utils.processing.multiscale.MultiScaleInputs`.  Returns the figure.
    """
    if show_windows is None:
        show_windows = vision_config is not None and has_window_attention(vision_config)
    if window_size is None:
        configured = None
        if vision_config is not None:
            configured = (vision_config.get("window_size") if isinstance(vision_config, dict)
                          else getattr(vision_config, "window_size", None))
        window_size = int(configured or 8)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from navil_utils.processing.multiscale import merged_token_windows

    scales = inputs.scales_of(image_index)
    first = inputs.scales.index(scales[0])
    images = inputs.scale_images()[first:first + len(scales)]
    p, m = inputs.patch_size, inputs.merge_size
    gap = max(8, int(0.05 * max(s.padded_hw[1] for s in scales)))
    if fig is None:
        fig = plt.figure(figsize=(10, 4.0))
    ax = fig.subplots()
    x0 = 0
    tallest = max(s.padded_hw[0] for s in scales)
    lines = []
    for scale, picture in zip(scales, images):
        (h, w), (hp, wp) = scale.resized_hw, scale.padded_hw
        ax.imshow(picture, extent=(x0, x0 + wp, hp, 0), interpolation="nearest")
        if max(scale.grid_thw[1:]) <= max_patch_lines:
            ax.add_collection(LineCollection(_grid_lines(x0, wp, hp, p), **_collection_style("patch")))
        ax.add_collection(LineCollection(_grid_lines(x0, wp, hp, p * m), **_collection_style("merged")))
        if show_windows:
            windows = merged_token_windows(scale.grid_thw[1], scale.grid_thw[2], window_size, m)
            edges = []
            unit = p * m
            rows, cols = windows.shape
            for r in range(rows):  # boundaries between merged tokens of different windows
                for c in range(cols):
                    if c + 1 < cols and windows[r, c] != windows[r, c + 1]:
                        edges.append([(x0 + (c + 1) * unit, r * unit), (x0 + (c + 1) * unit, (r + 1) * unit)])
                    if r + 1 < rows and windows[r, c] != windows[r + 1, c]:
                        edges.append([(x0 + c * unit, (r + 1) * unit), (x0 + (c + 1) * unit, (r + 1) * unit)])
            ax.add_collection(LineCollection(edges, **_collection_style("window")))
        for rect in ((x0 + w, 0, wp - w, hp), (x0, h, w, hp - h)):
            if rect[2] > 0 and rect[3] > 0:
                ax.add_patch(Rectangle(rect[:2], rect[2], rect[3], **PADDING_STYLE))
        ax.add_patch(Rectangle((x0, 0), wp, hp, fill=False, edgecolor="black", linewidth=0.8))
        ax.text(x0 + wp / 2, -0.02 * tallest, str(scale.scale_index + 1), ha="center", va="bottom", fontsize=9,
                fontweight="bold")
        lines.append(f"{scale.scale_index + 1}: {h}×{w} px → padded {hp}×{wp} = {scale.grid_thw[1]}×"
                     f"{scale.grid_thw[2]} patches → {scale.visual_tokens} visual tokens "
                     f"({100 * scale.padding_fraction:.0f}% padding)")
        x0 += wp + gap
    ax.set_xlim(-gap / 2, x0 - gap / 2)
    ax.set_ylim(tallest * 1.01, -0.09 * tallest)
    ax.set_aspect("equal")
    ax.grid(False)
    ax.set_xlabel("x (pixels; scales placed side by side, smallest first)")
    ax.set_ylabel("y (pixels)")
    total = sum(s.visual_tokens for s in scales)
    noun = "scale" if len(scales) == 1 else "scales"
    ax.set_title(title or f"NaViL multi-scale packing: {len(scales)} {noun}, {total} visual tokens")
    # The legend swatches use exactly the styles drawn above (white grid lines, hatched grey padding);
    # its frame is mid-grey so that the white lines show, as they do on the image.
    handles = [Line2D([], [], **GRID_STYLES["patch"], label=f"patch ({p} px)"),
               Line2D([], [], **GRID_STYLES["merged"], label=f"merged token ({p * m} px)"),
               Patch(**PADDING_STYLE, label="zero padding")]
    if show_windows:
        handles.insert(2, Line2D([], [], **GRID_STYLES["window"], label=f"attention window ({window_size * p} px)"))
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=True,
                       facecolor=LEGEND_FACE, edgecolor="none", framealpha=1.0, handlelength=2.5)
    for text in legend.get_texts():
        text.set_color("white")
    ax.annotate("\n".join(lines), xy=(0, 0), xycoords="axes fraction", xytext=(0, -36), textcoords="offset points",
                va="top", ha="left", fontsize=7.5, family="monospace")
    return fig


def image_span_categories(grids, merge_size: int = 2) -> tuple[list[str], list[int]]:
    """Split one image's span (:func:`navil_utils.processing.image_tokens.image_span_text`) into tokens and give
    each a category: ``"<img>"``, ``"</img>"``, ``"line"``, ``"frame"`` or the 0-based scale index."""
    import re

    from navil_utils.constants import (
        IMG_CONTEXT_TOKEN,
        IMG_END_TOKEN,
        IMG_FRAME_BREAK_TOKEN,
        IMG_LINE_BREAK_TOKEN,
        IMG_START_TOKEN,
    )
    from navil_utils.processing.image_tokens import image_span_text

    tokens = re.findall(r"<[^<>]+>", image_span_text(grids, merge_size))
    categories: list = []
    scale = 0
    for token in tokens:
        if token == IMG_CONTEXT_TOKEN:
            categories.append(scale)
        elif token == IMG_LINE_BREAK_TOKEN:
            categories.append("line")
        elif token == IMG_FRAME_BREAK_TOKEN:
            categories.append("frame")
            scale += 1
        elif token in (IMG_START_TOKEN, IMG_END_TOKEN):
            categories.append(token)
        else:  # pragma: no cover - the span only holds the five image tokens
            raise ValueError(f"unexpected token {token!r} in an image span")
    return tokens, categories


def plot_token_sequence(inputs, image_index: int = 0, *, text_before: int = 12, text_after: int = 16,
                        zoom: int = 160, fig=None):
    """The LLM token sequence of a one-image prompt as a coloured strip, with counts.

    Top: the whole sequence (``text_before`` text tokens, ``<img>``, each scale's rows of visual
    tokens with a line break per row and a frame break per scale, ``</img>``, ``text_after`` text
    tokens).  Bottom: the first ``zoom`` tokens enlarged, so single line breaks are visible.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    scales = inputs.scales_of(image_index)
    _, categories = image_span_categories([s.grid_thw for s in scales], inputs.merge_size)
    categories = ["text"] * text_before + categories + ["text"] * text_after
    scale_colours = _scale_colours(len(scales))
    keys = ["text", "<img>", "</img>", "line", "frame"] + list(range(len(scales)))
    colours = [PALETTE["text"], PREPROCESSING_COLOURS["image_tag"], PREPROCESSING_COLOURS["image_tag"],
               PREPROCESSING_COLOURS["line_break"], PREPROCESSING_COLOURS["frame_break"]] + scale_colours
    index = {key: i for i, key in enumerate(keys)}
    codes = np.array([index[c] for c in categories])[None, :]
    cmap = ListedColormap(colours)
    if fig is None:
        fig = plt.figure(figsize=(10, 3.2))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1], "hspace": 0.9})
    for ax, shown, label in ((top, codes, "all"), (bottom, codes[:, :zoom], f"first {min(zoom, codes.shape[1])}")):
        ax.imshow(shown, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(keys) - 0.5, interpolation="nearest",
                  extent=(-0.5, shown.shape[1] - 0.5, 0, 1))
        ax.set_yticks([])
        ax.grid(False)
        ax.set_xlabel(f"token position ({label} {codes.shape[1] if label == 'all' else ''} tokens)".replace("  ", " "))
    bottom.set_xticks(np.arange(0, min(zoom, codes.shape[1]), 10))
    counts = {key: int(np.sum(codes == index[key])) for key in keys}
    handles = [Patch(color=colours[index["text"]], label=f"text ({counts['text']})"),
               Patch(color=colours[index["<img>"]], label=f"<img>, </img> ({counts['<img>'] + counts['</img>']})")]
    for k, scale in enumerate(scales):
        handles.append(Patch(color=scale_colours[k], label=f"scale {k + 1}: {scale.tokens.rows} rows × "
                                                          f"{scale.tokens.cols} ({counts[k]})"))
    handles += [Patch(color=colours[index["line"]], label=f"<IMG_LINE_BREAK> ({counts['line']})"),
                Patch(color=colours[index["frame"]], label=f"<IMG_FRAME_BREAK> ({counts['frame']})")]
    top.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.05), ncol=min(len(handles), 4),
               fontsize=7.5)
    top.set_title(f"LLM input sequence: {codes.shape[1]} tokens, of which "
                  f"{sum(counts[k] for k in range(len(scales)))} visual", pad=48)
    return fig


def plot_nvlm_tiles(tiles, *, fig=None, gap: int = 24):
    """NVLM-D's tiles of one image: the regular tiles in their grid position with their 1-D tags, and
    the global thumbnail.  ``tiles`` is a :class:`navil_utils.processing.tiling.TiledInputs`."""
    import matplotlib.pyplot as plt

    pictures = tiles.tile_images()
    cols, rows = tiles.grid
    size = pictures[0].shape[0]
    mosaic = np.full((rows * size + (rows - 1) * gap, cols * size + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        mosaic[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = pictures[k]
    if fig is None:
        fig = plt.figure(figsize=(10, 4.2))
    has_thumb = tiles.plan.thumbnail
    grid_ax, thumb_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [mosaic.shape[1], size * 1.15]})
    grid_ax.imshow(mosaic)
    tags = tiles.tags
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        tag = tags[k]
        grid_ax.text(c * (size + gap) + 10, r * (size + gap) + 10, tag, va="top", ha="left", fontsize=8,
                     bbox={"facecolor": "white", "alpha": 0.85, "pad": 1.5, "linewidth": 0})
    grid_ax.set_title(f"{cols}×{rows} tiles of {size}² px (row-major)")
    if has_thumb:
        thumb_ax.imshow(pictures[-1])
        thumb_ax.text(10, 10, tags[-1], va="top", ha="left", fontsize=8,
                      bbox={"facecolor": "white", "alpha": 0.85, "pad": 1.5, "linewidth": 0})
        thumb_ax.set_title("global thumbnail (last)")
    for ax in (grid_ax, thumb_ax):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    if not has_thumb:
        thumb_ax.axis("off")
        thumb_ax.text(0.5, 0.5, "no thumbnail:\na single tile is\nits own global view", ha="center", va="center",
                      transform=thumb_ax.transAxes)
    noun = "tile" if tiles.num_tiles == 1 else "tiles"
    fig.suptitle(f"NVLM-D dynamic tiling: {tiles.num_tiles} {noun} × 256 = {256 * tiles.num_tiles} visual tokens")
    return fig


def plot_token_budgets(size_table, aspect_table, *, navil_budget: tuple[int, int] | None = (65536, 6291456),
                       fig=None):
    """Visual tokens vs image size and vs aspect ratio, NaViL multi-scale vs NVLM-D tiling.

    ``size_table`` and ``aspect_table`` are :func:`navil_utils.processing.multiscale.token_budget_table`
    outputs (one sweeping size at fixed aspect ratio, one sweeping aspect ratio at fixed area);
    ``navil_budget`` (min, max pixels) is marked on the size axis.
    """
    import matplotlib.pyplot as plt

    if fig is None:
        fig = plt.figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    navil, nvlm = PALETTE["navil_2b"], PALETTE["nvlm_d_72b"]
    for ax, table, x, xlabel in ((left, size_table, "megapixels", "image size (megapixels)"),
                                 (right, aspect_table, "aspect", "aspect ratio W/H")):
        ax.plot(table[x], table["navil_visual_tokens"], color=navil, lw=2, label="NaViL, all scales")
        ax.plot(table[x], table["navil_largest_tokens"], color=navil, lw=1.2, ls="--", label="NaViL, largest scale")
        ax.plot(table[x], table["nvlm_visual_tokens"], color=nvlm, lw=2, drawstyle="steps-mid",
                label="NVLM-D, ≤6 tiles + thumbnail")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("visual tokens in the LLM")
    if navil_budget is not None:
        for pixels, text, height in zip(navil_budget, ("NaViL min_pixels", "NaViL max_pixels"), (0.22, 0.03)):
            left.axvline(pixels / 1e6, color="0.5", ls=":", lw=1)
            left.text(pixels / 1e6, height, f"{text} ", rotation=90, va="bottom", ha="right", fontsize=7,
                      color="0.35", transform=left.get_xaxis_transform())
    for ax in (left, right):  # a decade or less on the y axis: label 1-2-5 steps, not only the decades
        readable_log_ticks(ax.yaxis)
    left.set_title(f"vs size (aspect W/H = {size_table['aspect'].iloc[0]:.2f})")
    right.set_title(f"vs aspect ratio ({aspect_table['megapixels'].median():.2f} MP)")
    fig.suptitle("Visual-token spend with the papers' settings")
    fig.tight_layout()
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8.5)
    return fig


def budget_explorer(image, budgets_patches=(64, 256, 1024, 4096, 24576), *, initial: int | None = None,
                    min_pixels: int = 256 * 16 * 16, patch_size: int = 16):
    """An ipywidgets slider over the pixel budget (``max_dynamic_patch`` values) that redraws the
    scales of ``image`` with :func:`plot_multiscale_scales`.  Returns the widget (display it).

    The figure is shown as an ``ipywidgets.Image`` (PNG bytes), not through an ``Output`` widget, so
    headless runs (nbclient without widget state) do not capture anything.
    """
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from navil_utils.processing.multiscale import preprocess_multiscale

    labels = {n: f"{n} patches = {n * patch_size**2:,} px" for n in budgets_patches}
    options = [(label, n) for n, label in labels.items()]
    # The slider's own read-out has a fixed width that cuts "1024 patches = 262,144 px" short: show the
    # value in a label of its own instead.
    slider = widgets.SelectionSlider(options=options, value=initial or budgets_patches[len(budgets_patches) // 2],
                                     description="max budget", readout=False, layout=widgets.Layout(width="360px"),
                                     style={"description_width": "initial"})
    readout = widgets.Label(layout=widgets.Layout(width="240px"))
    picture = widgets.Image(format="png")

    def redraw(change=None) -> None:
        readout.value = labels[slider.value]
        budget = slider.value * patch_size**2
        inputs = preprocess_multiscale(image, min_pixels=min(min_pixels, budget), max_pixels=budget)
        fig = plot_multiscale_scales(inputs)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        plt.close(fig)
        picture.value = buffer.getvalue()

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([slider, readout]), picture])
