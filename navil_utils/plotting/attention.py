"""Figures of attention (notebook 04): token × token matrices with the prompt's blocks, attention maps laid over
the image per layer and scale, ViT query-patch maps and rollout, and the measured claims with their intervals.

    fig = plot_token_attention([prompt.matrix(l) for l in range(4)], prompt.layout)
    fig = plot_answer_maps(image, {l: prompt.maps(l) for l in range(4)}, box=sample.evidence_box)
    fig = plot_pointing(by_layer, by_type, by_role)

The data come from :mod:`navil_utils.analysis.attention_report` / ``attention_claims``; nothing here computes a
statistic.  Scales and layers are numbered from 0 (smallest scale, first layer), as in
:class:`~navil_utils.analysis.attention.TokenLayout`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from navil_utils.analysis.attention_maps import ScaleMap, upsample_to_image
from navil_utils.analysis.attention_report import token_blocks, token_labels
from navil_utils.errors import ConfigError
from navil_utils.plotting.style import DPI, PALETTE, mark_zero_groups_and_chance

#: Colours of the attention figures.
ATTENTION_COLOURS = {
    "boundary": "#00bcd4",       # block boundaries in token x token matrices
    "box": "#00e5ff",            # the evidence box
    "query": "#ffffff",          # the query patch of ViT maps
    "attention": PALETTE["visual"],
    "uniform": "#555555",
    "area": "#9467bd",
    "shuffled": "#2ca02c",
    "text": "#7f7f7f",
    "markers": "#1f77b4",
    "intact": PALETTE["navil_2b"],
    "inside_blanked": "#d62728",
    "outside_blanked": "#ff7f0e",
}
MATRIX_CMAP = "magma"
MAP_CMAP = "YlOrRd"
BLOCK_BOUNDARY_GID = "block_boundary"

_STAT_LABELS = {"attention": "attention inside the box", "uniform": "uniform attention (baseline)",
                "area": "box area / image area", "shuffled": "another question's box (baseline)"}
_CONDITION_LABELS = {"intact": "intact image", "inside_blanked": "tokens inside the box zeroed",
                     "outside_blanked": "as many tokens outside zeroed"}


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


# Plotted values are rounded first: statistics and attention probabilities computed with other float kernels
# (another CPU) differ in their last bits, and unrounded they would change the PNG/PDF bytes of a figure.
_DIGITS = 4


def _rounded(summary):
    """A summary frame with its plotted statistics rounded to ``_DIGITS`` decimals."""
    columns = [c for c in ("mean", "low", "high", "accuracy") if c in summary]
    return summary.assign(**{c: summary[c].astype(float).round(_DIGITS) for c in columns})


def _log_rounded(values: np.ndarray, digits: int = 3) -> np.ndarray:
    """Positive values rounded to ``digits`` decimals of their base-10 logarithm (relative precision ~0.2 %)."""
    out = np.array(values, dtype=np.float64)
    positive = out > 0
    out[positive] = 10.0 ** np.round(np.log10(out[positive]), digits)
    return out


def _no_grid(ax) -> None:
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------
# token x token matrices


def block_boundaries(layout) -> list[int]:
    """Positions where a new :func:`~navil_utils.analysis.attention_report.token_blocks` block starts (the first
    block excluded): the lines of :func:`plot_token_attention` sit half a cell before them."""
    return [block.start for block in token_blocks(layout)[1:]]


def plot_token_attention(matrices: Sequence[Any], layout, *, labels: Sequence[str] | None = None,
                         title: str | None = None, vmin: float = 1e-4, panel_size: float = 3.4,
                         label_min_tokens: int = 3, ncols: int | None = None):
    """One causal token × token attention matrix per panel (rows = queries, columns = keys), log colour scale.

    Keys after the query (the causal mask) are left blank.  The prompt's blocks (text, ``<img>``, each scale's
    tokens with their line and frame breaks, ``</img>``, text) are delineated by thin lines, and labelled on the
    axes when at least ``label_min_tokens`` long.  Values below ``vmin`` get the lowest colour.

    Args:
        matrices: ``(T, T)`` tensors or arrays, e.g. ``prompt.matrix(layer)`` for every LLM layer.
        layout: the prompt's :class:`~navil_utils.analysis.attention.TokenLayout`.
        labels: one panel title per matrix (default ``layer k``).
        ncols: panels per row (default: all in one row), e.g. one row per model.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if not matrices:
        raise ConfigError("plot_token_attention needs at least one matrix")
    size = len(layout)
    arrays = [_log_rounded(_numpy(m)) for m in matrices]
    for array in arrays:
        if array.shape != (size, size):
            raise ConfigError(f"a matrix of shape {array.shape} does not fit a layout of {size} positions")
    labels = list(labels) if labels is not None else [f"layer {k}" for k in range(len(arrays))]
    blocks = token_blocks(layout)
    boundaries = block_boundaries(layout)
    ticks = [(b.start + b.end - 1) / 2 for b in blocks if b.length >= label_min_tokens]
    tick_labels = [b.label + (f" ({b.grid[0]}×{b.grid[1]})" if b.grid else "") for b in blocks
                   if b.length >= label_min_tokens]
    cmap = plt.get_cmap(MATRIX_CMAP).with_extremes(bad="white")
    norm = LogNorm(vmin=vmin, vmax=1.0)
    ncols = len(arrays) if ncols is None else max(1, min(int(ncols), len(arrays)))
    nrows = -(-len(arrays) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols + 0.9, (panel_size + 1.6) * nrows),
                             layout="constrained", squeeze=False)
    for ax in axes.ravel()[len(arrays):]:
        ax.set_visible(False)
    causal = np.triu(np.ones((size, size), dtype=bool), k=1)
    image = None
    for k, (ax, array, label) in enumerate(zip(axes.ravel(), arrays, labels)):
        first_column = k % ncols == 0
        shown = np.where(causal, np.nan, np.clip(array, vmin, None))
        image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
        for b in boundaries:  # only where the matrix has cells: below / left of the diagonal
            edge = b - 0.5
            ax.plot([edge, edge], [edge, size - 0.5], color=ATTENTION_COLOURS["boundary"], lw=0.6,
                    gid=BLOCK_BOUNDARY_GID)
            ax.plot([-0.5, edge], [edge, edge], color=ATTENTION_COLOURS["boundary"], lw=0.6, gid=BLOCK_BOUNDARY_GID)
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        ax.grid(False)
        ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=7.5)
        ax.set_yticks(ticks, tick_labels if first_column else [], fontsize=7.5)
        ax.set_title(label)
        ax.set_xlabel("key (attended position)")
        if first_column:
            ax.set_ylabel("query position")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85 / nrows ** 0.5,
                 label="attention probability (mean of heads, log)")
    fig.suptitle(title or f"Token × token attention, {size} positions (blank: after the query, causal mask)")
    return fig


# ---------------------------------------------------------------------------------------------------
# maps on the image


def _image_array(image: Any) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array


def _map_values(item: ScaleMap) -> np.ndarray:
    """``(H, W)`` map on the original pixels (heads averaged, ``nearest``: every cell keeps its own value)."""
    values = item.values.float()
    if values.ndim > 2:
        values = values.reshape(-1, *values.shape[-2:]).mean(0)
    return np.round(_numpy(upsample_to_image(ScaleMap(item.image, item.scale, values, item.geometry, item.query),
                                             mode="nearest")), _DIGITS)


def _overlay(ax, pale: np.ndarray, values: np.ndarray, norm, cmap, alpha: float):
    """Draw the pale image and ``values`` over it, opacity growing with the value (low attention lets the image
    show through).  Returns a ScalarMappable for a colour bar."""
    from matplotlib import cm

    ax.imshow(pale, interpolation="nearest")
    scaled = np.clip(norm(np.ma.masked_invalid(values)).filled(np.nan), 0.0, 1.0)
    rgba = cmap(np.nan_to_num(scaled, nan=0.0))
    rgba[..., 3] = np.where(np.isfinite(scaled), 0.12 + (alpha - 0.12) * np.nan_to_num(scaled), 0.0)
    ax.imshow(rgba, interpolation="nearest")
    return cm.ScalarMappable(norm=norm, cmap=cmap)


def _panel_size(image_hw: tuple[int, int], longest: float) -> tuple[float, float]:
    height, width = image_hw
    if width >= height:
        return longest, max(longest * height / width, 0.45)
    return max(longest * width / height, 0.45), longest


def plot_image_maps(image: Any, grid: Sequence[Sequence[ScaleMap | None]], *, titles=None,
                    row_labels: Sequence[str] | None = None, notes=None, box=None, norm: str | Sequence[str] = "row",
                    cbar_label: str = "attention", title: str | None = None, panel_size: float = 2.4,
                    alpha: float = 0.85):
    """A grid of maps laid over the image (pale) on its original pixels, with the evidence box dashed.  The map's
    opacity grows with its value, up to ``alpha``, so the image shows through where attention is low.

    Args:
        grid: rows of :class:`~navil_utils.analysis.attention_maps.ScaleMap` (with geometry) or ``None`` (empty
            panel).  Maps with a ``query`` patch get it outlined.
        titles, notes: per-panel titles / small captions under the panel (same shape as ``grid``, ``None`` = none).
        row_labels: one per row (left axis label).
        norm: ``"row"`` (one colour scale per row, with its colour bar), ``"panel"`` (each panel its own) or
            ``"shared"``; or one of these per row.
    Returns the figure; its colour bars carry ``cbar_label``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    rows = [list(r) for r in grid]
    if not rows or not any(rows):
        raise ConfigError("plot_image_maps needs at least one map")
    ncols = max(len(r) for r in rows)
    norms = [norm] * len(rows) if isinstance(norm, str) else list(norm)
    if len(norms) != len(rows) or any(n not in ("row", "panel", "shared") for n in norms):
        raise ConfigError(f"norm must be 'row', 'panel' or 'shared' (or one per row), got {norm!r}")
    array = _image_array(image)
    pale = (0.45 * array + 0.55 * 255).astype(np.uint8)
    height, width = array.shape[:2]
    pw, ph = _panel_size((height, width), panel_size)
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False, layout="constrained",
                             figsize=(pw * ncols + 1.6, (ph + 0.75) * len(rows) + (0.5 if title else 0.1)))
    cmap = plt.get_cmap(MAP_CMAP)
    values = [[None if m is None else _map_values(m) for m in r] for r in rows]
    everything = [v for r in values for v in r if v is not None]
    shared_max = max(float(np.nanmax(v)) for v in everything) if everything else 1.0
    for r, (row, row_values) in enumerate(zip(rows, values)):
        present = [v for v in row_values if v is not None]
        row_max = max((float(np.nanmax(v)) for v in present), default=1.0)
        mappable = None
        for c in range(ncols):
            ax = axes[r, c]
            _no_grid(ax)
            item = row[c] if c < len(row) else None
            if item is None:
                ax.axis("off")
                continue
            top = {"row": row_max, "shared": shared_max}.get(norms[r], float(np.nanmax(row_values[c])))
            panel_norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
            mappable = _overlay(ax, pale, row_values[c], panel_norm, cmap, alpha)
            if box is not None:
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linestyle="--",
                                       linewidth=1.4, edgecolor=ATTENTION_COLOURS["box"], gid="evidence_box"))
            if item.query is not None and item.geometry is not None:
                qx0, qy0, qx1, qy1 = item.geometry.cell_box(*item.query)
                ax.add_patch(Rectangle((qx0 - 0.5, qy0 - 0.5), qx1 - qx0, qy1 - qy0, fill=False, linewidth=1.4,
                                       edgecolor=ATTENTION_COLOURS["query"], gid="query_patch"))
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            if titles is not None and c < len(titles[r]) and titles[r][c]:
                ax.set_title(titles[r][c], fontsize=8.5)
            if notes is not None and c < len(notes[r]) and notes[r][c]:
                ax.set_xlabel(notes[r][c], fontsize=7.5)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=9)
            if norms[r] == "panel":
                fig.colorbar(mappable, ax=ax, shrink=0.9, pad=0.01).ax.tick_params(labelsize=6.5)
        if mappable is not None and norms[r] == "row":
            bar = fig.colorbar(mappable, ax=axes[r, :].tolist(), shrink=0.95, pad=0.01)
            bar.set_label(cbar_label, fontsize=7.5)
            bar.ax.tick_params(labelsize=7)
    if all(n == "shared" for n in norms) and everything:
        bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
        bar.set_label(cbar_label, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _grid_text(geometry) -> str:
    if geometry is None:
        return ""
    return f"{geometry.rows}×{geometry.cols} tokens, {geometry.resized_hw[1]}×{geometry.resized_hw[0]} px"


def plot_answer_maps(image: Any, maps_by_layer: Mapping[int, Sequence[ScaleMap]], *, box=None,
                     title: str | None = None, panel_size: float = 2.4):
    """The answer query's attention on the image: rows = LLM layers, columns = scales (smallest first).

    Each row has its own colour scale (attention probability per visual token); under each panel, the scale's share
    of the row's visual attention.
    """
    layers = list(maps_by_layer)
    if not layers:
        raise ConfigError("plot_answer_maps needs the maps of at least one layer")
    grid, titles, notes = [], [], []
    for layer in layers:
        maps = list(maps_by_layer[layer])
        total = sum(float(m.mass.sum()) for m in maps)
        grid.append(maps)
        titles.append([f"scale {m.scale}: {_grid_text(m.geometry)}" if layer == layers[0] else None for m in maps])
        notes.append([f"{float(m.mass.sum()) / total:.0%} of this layer's visual attention" if total > 0 else ""
                      for m in maps])
    return plot_image_maps(image, grid, titles=titles, notes=notes, row_labels=[f"LLM layer {k}" for k in layers],
                           box=box, norm="row", cbar_label="attention per visual token",
                           title=title or "Where the answer query looks: LLM layer × scale (dashed: evidence box)",
                           panel_size=panel_size)


def plot_vit_maps(image: Any, query_maps: Mapping[int, ScaleMap], rollout: Sequence[ScaleMap], *, box=None,
                  title: str | None = None, panel_size: float = 2.4):
    """Top row: one query patch's attention in every ViT layer (white square: the query); bottom row: the attention
    rollout over all ViT layers on every scale (of the query's patch there, or the mean over patches)."""
    layers = list(query_maps)
    if not layers or not rollout:
        raise ConfigError("plot_vit_maps needs query maps and rollout maps")
    first = [query_maps[layer] for layer in layers]
    query = first[0].query
    top_titles = [f"ViT layer {layer}" for layer in layers]
    bottom_titles = [f"rollout · scale {m.scale}" for m in rollout]
    top_notes = [f"query patch {query} on scale {first[0].scale}" if k == 0 else "" for k in range(len(first))]
    bottom_notes = [f"{m.grid[0]}×{m.grid[1]} patches" + (f", query {m.query}" if m.query else ", mean of patches")
                    for m in rollout]
    return plot_image_maps(image, [first, list(rollout)], titles=[top_titles, bottom_titles],
                           notes=[top_notes, bottom_notes],
                           row_labels=["one query patch", "rollout (all layers)"], box=box, norm=["row", "panel"],
                           cbar_label="attention per patch", panel_size=panel_size,
                           title=title or "ViT: a query patch's attention per layer, and the attention rollout "
                                          "per scale")


# ---------------------------------------------------------------------------------------------------
# one query, explorable


def plot_query_attention(prompt: Any, layer: int, query: int = -1, head: int | None = None, *, image: Any,
                         box=None, title: str | None = None):
    """One query's attention row: over all prompt positions (top, log scale, blocks shaded) and on the image per
    scale (bottom).  ``prompt`` is a :class:`~navil_utils.analysis.attention_report.PromptAttention`."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    layout = prompt.layout
    size = len(layout)
    position = query % size
    row = _log_rounded(_numpy(prompt.row(layer, position, head)))
    maps = prompt.maps(layer, position, head)
    array = _image_array(image)
    pale = (0.45 * array + 0.55 * 255).astype(np.uint8)
    height, width = array.shape[:2]
    pw, ph = _panel_size((height, width), 2.3)
    n = len(maps)
    fig = plt.figure(figsize=(max(10.0, pw * n + 1.5), 3.2 + ph + 0.9), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[3.0, ph + 0.6])
    bar_ax = fig.add_subplot(outer[0])
    bottom = outer[1].subgridspec(1, n)
    shades = ["#f2f2f2", "#ffffff"]
    for k, block in enumerate(token_blocks(layout)):
        colour = "#fde0dd" if block.kind == "scale" else shades[k % 2]
        bar_ax.axvspan(block.start - 0.5, block.end - 0.5, color=colour, lw=0, zorder=0)
        if block.length >= 3:
            bar_ax.text((block.start + block.end - 1) / 2, 1.02, block.label, transform=bar_ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=7.5)
    kinds = np.asarray(layout.kinds)
    colours = np.where(kinds == "visual", ATTENTION_COLOURS["attention"], ATTENTION_COLOURS["text"])
    colours = np.where(np.isin(kinds, ["img_start", "line_break", "frame_break", "img_end"]),
                       ATTENTION_COLOURS["markers"], colours)
    shown = np.clip(row[:position + 1], 1e-5, None)
    bar_ax.bar(np.arange(position + 1), shown, width=0.9, color=colours[:position + 1], zorder=2)
    bar_ax.axvline(position, color="black", lw=1.0, ls=":", zorder=3)
    bar_ax.set_yscale("log")
    bar_ax.set_ylim(1e-5, 1.5)
    bar_ax.set_xlim(-0.5, size - 0.5)
    bar_ax.set_xlabel("key position (red: visual tokens, blue: image markers, grey: text; dotted: the query)")
    bar_ax.set_ylabel("attention (log)")
    bar_ax.grid(axis="x", visible=False)
    top = max((float(np.nanmax(_map_values(m))) for m in maps), default=0.0)
    cmap = plt.get_cmap(MAP_CMAP)
    mappable = None
    axes = []
    for k, item in enumerate(maps):
        ax = fig.add_subplot(bottom[k])
        axes.append(ax)
        _no_grid(ax)
        mappable = _overlay(ax, pale, _map_values(item), Normalize(0.0, top if top > 0 else 1.0), cmap, 0.85)
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linestyle="--",
                                   linewidth=1.4, edgecolor=ATTENTION_COLOURS["box"]))
        ax.set_title(f"scale {item.scale}", fontsize=8.5)
    if position < min(b.start for b in token_blocks(layout) if b.kind == "scale"):
        axes[0].set_xlabel("the query precedes the image: no attention to it", fontsize=7.5)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.9, pad=0.01).set_label("attention per token", fontsize=7.5)
    label = token_labels(layout, prompt.tokens)[position]
    fig.suptitle(title or f"LLM layer {layer}, {'mean of heads' if head is None else f'head {head}'}, "
                          f"query {label}", fontsize=10)
    return fig


def attention_explorer(prompt: Any, image: Any, *, box=None, layer: int | None = None, head: int | None = None,
                       query: int = -1):
    """ipywidgets menus over LLM layer, head (or their mean) and query token that redraw
    :func:`plot_query_attention`.  Returns the widget (display it).

    The figure is shown as an ``ipywidgets.Image`` (PNG bytes), so headless runs capture nothing volatile.
    """
    import io

    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    labels = token_labels(prompt.layout, prompt.tokens)
    size = len(labels)
    layer_menu = widgets.Dropdown(options=[(f"layer {k}", k) for k in range(prompt.num_layers)],
                                  value=prompt.num_layers - 1 if layer is None else layer, description="LLM layer")
    head_menu = widgets.Dropdown(options=[("mean of heads", -1)] + [(f"head {h}", h) for h in range(prompt.num_heads)],
                                 value=-1 if head is None else head, description="head")
    query_menu = widgets.Dropdown(options=[(label, p) for p, label in enumerate(labels)], value=query % size,
                                  description="query", layout=widgets.Layout(width="420px"))
    picture = widgets.Image(format="png")

    def redraw(change=None) -> None:
        chosen = None if head_menu.value < 0 else head_menu.value
        fig = plot_query_attention(prompt, layer_menu.value, query_menu.value, chosen, image=image, box=box)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        plt.close(fig)
        picture.value = buffer.getvalue()

    for menu in (layer_menu, head_menu, query_menu):
        menu.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([layer_menu, head_menu, query_menu]), picture])


# ---------------------------------------------------------------------------------------------------
# measured claims


def _pick(summary, **where) -> Any:
    rows = summary
    for column, value in where.items():
        rows = rows[rows[column].astype(str) == str(value)]
    return rows


def _errorbar(ax, x, rows, colour, label, *, marker="o", ls="-", value="mean") -> None:
    mean = rows[value].to_numpy(float)
    low, high = rows["low"].to_numpy(float), rows["high"].to_numpy(float)
    ax.errorbar(x, mean, yerr=[mean - low, high - mean], color=colour, marker=marker, ls=ls, capsize=3, lw=1.4,
                ms=4.5, label=label)


def plot_visual_share(summary, *, title: str | None = None):
    """Per LLM layer: the answer query's share of attention on visual tokens, text and markers, and the visual share
    of uniform attention, with their intervals.  ``summary`` is
    :func:`~navil_utils.analysis.attention_report.answer_share_table` output."""
    import matplotlib.pyplot as plt

    summary = _rounded(summary)
    layers = sorted(set(summary["layer"]))
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    styles = [("visual", ATTENTION_COLOURS["attention"], "visual tokens", "-", "o"),
              ("visual_uniform", ATTENTION_COLOURS["uniform"], "visual tokens, uniform attention", "--", "s"),
              ("text", ATTENTION_COLOURS["text"], "text tokens", "-", "^"),
              ("markers", ATTENTION_COLOURS["markers"], "<img>, line/frame breaks, </img>", "-", "v")]
    for statistic, colour, label, ls, marker in styles:
        rows = _pick(summary, statistic=statistic).set_index("layer").loc[layers].reset_index()
        _errorbar(ax, layers, rows, colour, label, ls=ls, marker=marker)
    n = int(summary["n"].max())
    ax.set_xticks(layers, [str(layer) for layer in layers])
    ax.set_xlabel("LLM layer")
    ax.set_ylabel(f"share of the answer query's attention\n(mean over {n} questions, 95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title or "How much the answer query attends to the image, per layer")
    fig.tight_layout()
    return fig


_POINTING = ("attention", "uniform", "area", "shuffled")


def plot_pointing(by_layer, by_group, by_role, *, group_layer: int, title: str | None = None):
    """Energy-based pointing at the evidence box with 95% intervals, in three panels:

    * ``by_layer`` (:func:`~navil_utils.analysis.attention_claims.pointing_summary` of a per-layer table): the
      share of the answer query's visual attention inside the box per layer, vs the uniform, area and
      shuffled-box baselines (all scales together);
    * ``by_group`` (:func:`~navil_utils.analysis.attention_report.grouped_pointing_summary` of
      :func:`~navil_utils.analysis.attention_report.pointing_by_group`, scale ``"all"``): the same at
      ``group_layer`` per group (question type; shuffled boxes from the same group);
    * ``by_role`` (summary with ``scale`` = ``"smallest"`` / ``"largest"``): pointing and the uniform baseline
      on the smallest and on the largest scale, per layer.
    """
    import matplotlib.pyplot as plt

    by_layer, by_group, by_role = _rounded(by_layer), _rounded(by_group), _rounded(by_role)
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.4), gridspec_kw={"width_ratios": [1.0, 1.5, 1.0]})
    ax = axes[0]
    layers = sorted(set(by_layer["layer"]))
    for k, statistic in enumerate(_POINTING):
        rows = _pick(by_layer, statistic=statistic, scale="all").set_index("layer").loc[layers].reset_index()
        _errorbar(ax, np.asarray(layers) + (k - 1.5) * 0.06, rows, ATTENTION_COLOURS[statistic],
                  _STAT_LABELS[statistic], ls="-" if statistic == "attention" else "--")
    ax.set_xticks(layers, [str(layer) for layer in layers])
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("share of visual attention in the box (95% CI)")
    ax.set_title("all questions, all scales", fontsize=10)

    ax = axes[1]
    chosen = _pick(by_group, layer=group_layer, scale="all")
    groups = list(dict.fromkeys(chosen["group"]))
    width = 0.8 / len(_POINTING)
    x = np.arange(len(groups))
    for k, statistic in enumerate(_POINTING):
        rows = _pick(chosen, statistic=statistic).set_index("group").loc[groups]
        mean = rows["mean"].to_numpy(float)
        ax.bar(x + (k - 1.5) * width, mean, width * 0.95, color=ATTENTION_COLOURS[statistic],
               yerr=[mean - rows["low"].to_numpy(float), rows["high"].to_numpy(float) - mean], capsize=2,
               error_kw={"lw": 0.8, "ecolor": "0.2"}, label=_STAT_LABELS[statistic])
    counts = chosen.drop_duplicates("group").set_index("group")["n"]
    ax.set_xticks(x, [f"{g}\n(n={int(counts[g])})" for g in groups])
    ax.set_xlabel("question type")
    ax.set_ylabel("share of visual attention in the box (95% CI)")
    ax.grid(axis="x", visible=False)
    ax.set_title(f"per question type, LLM layer {group_layer}", fontsize=10)

    ax = axes[2]
    roles = [("smallest", "#9467bd"), ("largest", "#8c564b")]
    layers_role = sorted(set(by_role["layer"]))
    for k, (role, colour) in enumerate(roles):
        for statistic, ls, marker in (("attention", "-", "o"), ("uniform", "--", "s")):
            rows = _pick(by_role, statistic=statistic, scale=role)
            if rows.empty:
                continue
            rows = rows.set_index("layer").loc[layers_role].reset_index()
            offset = (k - 0.5) * 0.12 + (0.03 if statistic == "uniform" else 0.0)
            _errorbar(ax, np.asarray(layers_role) + offset, rows, colour,
                      f"{role} scale: {'attention' if statistic == 'attention' else 'uniform baseline'}", ls=ls,
                      marker=marker)
    n_role = int(_pick(by_role, statistic="attention")["n"].max()) if not by_role.empty else 0
    ax.set_xticks(layers_role, [str(layer) for layer in layers_role])
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("share of the scale's attention in the box")
    ax.set_title(f"smallest vs largest scale ({n_role} multi-scale images)", fontsize=10)

    shown = [_pick(by_layer, scale="all"), chosen, by_role]
    top = max(float(frame[frame["statistic"].isin(_POINTING)]["high"].max()) for frame in shown if not frame.empty)
    for ax in axes:
        ax.set_ylim(0, min(1.0, top * 1.12 + 0.02))
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, bbox_to_anchor=(0.5, -0.01))
    axes[2].legend(fontsize=7.5, loc="upper right")
    fig.suptitle(title or "Energy-based pointing: the answer query's visual attention inside the evidence box")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_sinks(summary, *, title: str | None = None):
    """Pointing with and without each question's top-``k`` visual tokens ("sinks"), and the sinks' share of the
    visual attention, per layer (:func:`~navil_utils.analysis.attention_report.sink_pointing_summary`)."""
    import matplotlib.pyplot as plt

    summary = _rounded(summary)
    layers = sorted(set(summary["layer"]))
    k = int(summary["k"].iloc[0]) if "k" in summary else None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0), gridspec_kw={"width_ratios": [1.5, 1.0]})
    styles = [("attention", ATTENTION_COLOURS["attention"], "-", "o", "attention, all tokens"),
              ("attention without sinks", ATTENTION_COLOURS["attention"], ":", "D", "attention, sinks removed"),
              ("uniform", ATTENTION_COLOURS["uniform"], "--", "s", "uniform, all tokens"),
              ("uniform without sinks", ATTENTION_COLOURS["uniform"], ":", "x", "uniform, sinks removed")]
    for j, (statistic, colour, ls, marker, label) in enumerate(styles):
        rows = _pick(summary, statistic=statistic).set_index("layer").loc[layers].reset_index()
        _errorbar(left, np.asarray(layers) + (j - 1.5) * 0.05, rows, colour, label, ls=ls, marker=marker)
    left.set_xticks(layers, [str(layer) for layer in layers])
    left.set_xlabel("LLM layer")
    left.set_ylabel("share of visual attention in the box (95% CI)")
    left.set_ylim(0, None)
    left.legend(fontsize=8, loc="lower left")
    left.set_title("pointing with and without the sinks", fontsize=10)
    rows = _pick(summary, statistic="sink mass").set_index("layer").loc[layers].reset_index()
    mean = rows["mean"].to_numpy(float)
    right.bar(layers, mean, 0.6, color=ATTENTION_COLOURS["markers"],
              yerr=[mean - rows["low"].to_numpy(float), rows["high"].to_numpy(float) - mean], capsize=3)
    right.set_xticks(layers, [str(layer) for layer in layers])
    right.set_xlabel("LLM layer")
    right.set_ylabel(f"share of visual attention on the top {k} tokens")
    right.set_ylim(0, 1)
    right.grid(axis="x", visible=False)
    right.set_title(f"how concentrated: the top-{k} visual tokens", fontsize=10)
    fig.suptitle(title or f"Attention sinks: the {k} most attended visual tokens per question and layer")
    fig.tight_layout()
    return fig


def plot_blanking(summary, *, chance: Mapping[str, float] | None = None, title: str | None = None):
    """Exact-match accuracy with the image intact, with the visual tokens inside the evidence box zeroed and with as
    many outside zeroed, overall and per group, with 95% intervals
    (:func:`~navil_utils.analysis.attention_report.blanking_summary`); ``chance`` per group as dashes."""
    import matplotlib.pyplot as plt

    summary = _rounded(summary)
    groups = list(dict.fromkeys(summary["group"]))
    conditions = list(dict.fromkeys(summary["condition"]))
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    width = 0.8 / len(conditions)
    x = np.arange(len(groups))
    for k, condition in enumerate(conditions):
        rows = _pick(summary, condition=condition).set_index("group").loc[groups]
        mean = rows["accuracy"].to_numpy(float)
        ax.bar(x + (k - (len(conditions) - 1) / 2) * width, mean, width * 0.95,
               color=ATTENTION_COLOURS.get(condition, f"C{k}"),
               yerr=[mean - rows["low"].to_numpy(float), rows["high"].to_numpy(float) - mean], capsize=2,
               error_kw={"lw": 0.8, "ecolor": "0.2"}, label=_CONDITION_LABELS.get(condition, condition))
    handles, labels = mark_zero_groups_and_chance(ax, summary, "group", groups, chance, lw=1.1)
    counts = summary.drop_duplicates("group").set_index("group")["n"]
    ax.set_xticks(x, [f"{g}\n(n={int(counts[g])})" for g in groups])
    ax.set_xlabel("question type")
    ax.set_ylabel("exact-match accuracy (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="x", visible=False)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title or "Causal check: zero the visual tokens inside vs outside the evidence box")
    fig.tight_layout()
    return fig


_SHORT_CONDITIONS = {"intact": "intact", "inside_blanked": "inside the box\nzeroed",
                     "outside_blanked": "as many outside\nzeroed"}

#: Line colours of the models in :func:`plot_attention_comparison` (in the order given).
COMPARISON_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def plot_attention_comparison(statistics: Sequence[Any], *, title: str | None = None):
    """The measured attention statistics of several models side by side, per LLM layer, with 95% intervals:
    the answer query's visual share (dashed: uniform attention), its pointing into the evidence box
    (attention − uniform), the distance ratio of image tokens' attention within their scale (1 = as spread as
    uniform attention), and the blanking check (all questions).

    ``statistics``: :class:`~navil_utils.analysis.attention_comparison.AttentionStatistics`, one per model.
    """
    import matplotlib.pyplot as plt

    if not statistics:
        raise ConfigError("plot_attention_comparison needs at least one model's statistics")
    fig, axes = plt.subplots(1, 4, figsize=(17.0, 4.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.25]})
    share_ax, point_ax, local_ax, blank_ax = axes
    offsets = (np.arange(len(statistics)) - (len(statistics) - 1) / 2) * 0.08
    for k, stats in enumerate(statistics):
        colour = COMPARISON_COLOURS[k % len(COMPARISON_COLOURS)]
        share = _rounded(stats.visual_share)
        layers = np.asarray(sorted(set(share["layer"])), dtype=float)
        _errorbar(share_ax, layers + offsets[k], _pick(share, statistic="visual").sort_values("layer"), colour,
                  stats.label)
        share_ax.plot(layers, _pick(share, statistic="visual_uniform").sort_values("layer")["mean"],
                      color=ATTENTION_COLOURS["uniform"], ls="--", lw=1.0,
                      label="uniform attention" if k == 0 else None)
        pointing = _rounded(stats.pointing)
        _errorbar(point_ax, layers + offsets[k], _pick(pointing, statistic="attention - uniform").sort_values("layer"),
                  colour, stats.label)
        locality = _rounded(stats.locality)
        _errorbar(local_ax, layers + offsets[k], _pick(locality, statistic="distance_ratio").sort_values("layer"),
                  colour, stats.label)
    for ax in (point_ax, local_ax):
        ax.axhline(0.0 if ax is point_ax else 1.0, color=ATTENTION_COLOURS["uniform"], lw=0.9, ls=":")
    for ax in (share_ax, point_ax, local_ax):
        ax.set_xticks(layers, [str(int(layer)) for layer in layers])
        ax.set_xlabel("LLM layer")
    share_ax.set_ylabel("answer query's attention on visual tokens\n(share, 95% CI)")
    share_ax.set_title("Visual share (dashed: uniform)", fontsize=10)
    share_ax.legend(fontsize=7.5, loc="best")
    point_ax.set_ylabel("visual attention in the evidence box\nminus uniform (share, 95% CI)")
    point_ax.set_title("Pointing at the evidence", fontsize=10)
    local_ax.set_ylabel("attention-weighted / uniform mean distance\n(image tokens, own scale; 95% CI)")
    local_ax.set_title("Locality (1 = as global as uniform)", fontsize=10)
    conditions = list(dict.fromkeys(statistics[0].blanking["condition"]))
    width = 0.8 / len(statistics)
    x = np.arange(len(conditions))
    for k, stats in enumerate(statistics):
        rows = _pick(_rounded(stats.blanking), group="overall").set_index("condition").loc[conditions]
        mean = rows["accuracy"].to_numpy(float)
        blank_ax.bar(x + (k - (len(statistics) - 1) / 2) * width, mean, width * 0.95,
                     color=COMPARISON_COLOURS[k % len(COMPARISON_COLOURS)],
                     yerr=[mean - rows["low"].to_numpy(float), rows["high"].to_numpy(float) - mean], capsize=2,
                     error_kw={"lw": 0.8, "ecolor": "0.2"}, label=f"{stats.label} (n={int(rows['n'].iloc[0])})")
    blank_ax.set_xticks(x, [_SHORT_CONDITIONS.get(c, c) for c in conditions], fontsize=8.5)
    blank_ax.set_ylabel("exact-match accuracy (95% CI)")
    blank_ax.set_ylim(0, 1)
    blank_ax.grid(axis="x", visible=False)
    blank_ax.set_title("Causal check (all question types)", fontsize=10)
    blank_ax.legend(fontsize=7.5, loc="upper right")
    fig.suptitle(title or "The same attention statistics for " + " vs ".join(s.label for s in statistics))
    fig.tight_layout()
    return fig
