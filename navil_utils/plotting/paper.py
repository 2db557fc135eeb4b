"""Figures of the published numbers (``data/paper/``): curves, grouped bars, radar, scaling rule.

Every function draws on a given matplotlib ``Axes`` and returns it; titles, figure size and saving
(:func:`navil_utils.save_figure`) stay in the notebook.  Colours follow
:data:`navil_utils.plotting.style.PALETTE`: NaViL blues, NVLM green, compositional greys, native oranges.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from navil_utils.analysis.scaling import PowerLaw
from navil_utils.plotting.style import PALETTE

#: Fixed colours of the three systems this workbook is about.
_MODEL_COLOURS = {"NaViL-2B": PALETTE["navil_2b"], "NaViL-9B": PALETTE["navil_9b"], "NVLM-D-72B": PALETTE["nvlm_d_72b"]}
#: Seaborn sequential palettes from which the other models of a family take successive shades.
_FAMILY_PALETTES = {
    "compositional": "Greys_r", "native": "Oranges_r", "NVLM": "Greens_r", "NaViL": "Blues_r", "LLM": "Purples_r",
}

#: Axis labels of the metrics in ``training_curves.csv``.
METRIC_LABELS = {
    "val_loss": "validation loss (cross-entropy per token)",
    "coco_cider": "COCO Caption CIDEr (zero-shot)",
}
#: Legend text of the (unreliable) per-LLM encoder sizes in :func:`plot_optimal_encoder`.
UNRELIABLE_GRID_LABEL = "encoder sizes trained (unreliable: from an\nAI-generated figure description)"
SAMPLES_LABEL = "training data size (million image-text samples, log scale)"
PERCENT_LABEL = "score (0-100; MME / 28, OCRBench / 10)"


_FINE_LOG_TICKS = (0.1, 0.2, 0.5, 1, 2, 3, 5, 7, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000)
_COARSE_LOG_TICKS = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000)


def _plain_log_xticks(ax: Axes, values: pd.Series | np.ndarray) -> None:
    """Log-scaled x axis labelled with plain numbers (2, 5, 10, …) instead of 2×10⁰."""
    lo, hi = float(np.min(values)) * 0.9, float(np.max(values)) * 1.1
    ticks = [t for t in _FINE_LOG_TICKS if lo <= t <= hi]
    if len(ticks) > 7:
        ticks = [t for t in _COARSE_LOG_TICKS if lo <= t <= hi]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def model_colours(models: Sequence[str], families: Mapping[str, str]) -> dict[str, str]:
    """One colour per model: fixed colours for NaViL-2B/9B and NVLM-D-72B, family shades for the rest.

    ``families`` maps each model to its ``model_family`` (NaViL, NVLM, compositional, native, LLM).
    """
    import seaborn as sns

    colours: dict[str, str] = {}
    by_family: dict[str, list[str]] = {}
    for model in models:
        if model in _MODEL_COLOURS:
            colours[model] = _MODEL_COLOURS[model]
        else:
            family = families.get(model)
            if family not in _FAMILY_PALETTES:
                raise ValueError(
                    f"model {model!r} has unknown family {family!r}; expected one of {sorted(_FAMILY_PALETTES)}"
                )
            by_family.setdefault(family, []).append(model)
    for family, members in by_family.items():
        # skip the darkest and lightest ends so every shade is visible on white and distinct from the fixed colours
        shades = sns.color_palette(_FAMILY_PALETTES[family], len(members) + 2).as_hex()[1:-1]
        colours.update(zip(members, shades))
    return colours


def plot_training_curves(
    curves: pd.DataFrame, figure: str, metric: str, ax: Axes, colours: Mapping[str, str] | None = None
) -> Axes:
    """Curves of one figure/metric from ``training_curves.csv`` against samples seen (log x).

    Points flagged ``dashed_extension`` are joined with a dashed segment, as in the paper.
    """
    selected = curves[(curves["figure"] == figure) & (curves["metric"] == metric)]
    if selected.empty:
        raise ValueError(f"no training curve for figure={figure!r}, metric={metric!r}")
    for i, (series, points) in enumerate(selected.groupby("series", sort=False)):
        points = points.sort_values("samples_m")
        colour = (colours or {}).get(series, f"C{i}")
        solid = points[~points["dashed_extension"]]
        ax.plot(solid["samples_m"], solid["value"], marker="o", ms=4, color=colour, label=series)
        if points["dashed_extension"].any():
            tail = pd.concat([solid.tail(1), points[points["dashed_extension"]]])
            ax.plot(tail["samples_m"], tail["value"], ls="--", marker="o", ms=4, color=colour, alpha=0.7)
    _plain_log_xticks(ax, selected["samples_m"])
    ax.set_xlabel(SAMPLES_LABEL)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend()
    return ax


def plot_grouped_bars(
    matrix: pd.DataFrame, ax: Axes, colours: Mapping[str, str] | None = None, ylabel: str = PERCENT_LABEL
) -> Axes:
    """Grouped bars: one group per column of ``matrix``, one bar per row (NaN = no bar, marked "n/r")."""
    n_rows, n_cols = matrix.shape
    width = 0.8 / n_rows
    x = np.arange(n_cols)
    for i, (name, row) in enumerate(matrix.iterrows()):
        offsets = x - 0.4 + width * (i + 0.5)
        values = row.to_numpy(dtype=float)
        colour = (colours or {}).get(name, f"C{i}")
        ax.bar(offsets, np.nan_to_num(values), width=width, color=colour, label=name)
        for offset in offsets[np.isnan(values)]:
            ax.text(offset, 1, "n/r", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
    ax.set_xticks(x, matrix.columns, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    return ax


def plot_radar(
    matrix: pd.DataFrame, ax: Axes, colours: Mapping[str, str] | None = None, rlim: tuple[float, float] = (0.0, 100.0)
) -> Axes:
    """Radar chart on a polar ``ax``: one closed polygon per row, one spoke per column.

    ``rlim`` is the radial range (centre, rim); a centre above 0 spreads close scores apart.
    """
    if ax.name != "polar":
        raise ValueError("plot_radar needs a polar Axes (subplot_kw={'projection': 'polar'})")
    if matrix.isna().any().any():
        flags = matrix.isna().stack()
        missing = [f"{row}/{column}" for row, column in flags[flags].index]
        raise ValueError(f"radar needs every score; missing: {missing}")
    angles = np.linspace(0, 2 * np.pi, matrix.shape[1], endpoint=False)
    closed = np.append(angles, angles[0])
    for i, (name, row) in enumerate(matrix.iterrows()):
        values = np.append(row.to_numpy(dtype=float), row.iloc[0])
        colour = (colours or {}).get(name, f"C{i}")
        ax.plot(closed, values, color=colour, lw=1.5, label=name)
        ax.fill(closed, values, color=colour, alpha=0.08)
    ax.set_xticks(angles, matrix.columns)
    ax.set_ylim(*rlim)
    ax.set_rlabel_position(90)
    return ax


def plot_optimal_encoder(grid: pd.DataFrame, fit: PowerLaw, ax: Axes) -> Axes:
    """Tested (LLM, encoder) sizes of the scaling study, the optimal encoder per LLM, and a power-law fit.

    ``grid`` is ``scaling_grid.csv``; both axes are in billions of parameters, log scale.
    """
    tested = grid[~grid["optimal_encoder"]]
    best = grid[grid["optimal_encoder"]]
    # the per-LLM encoder ranges come from an AI-generated figure description, not from the paper's text:
    # hollow, dashed markers and the legend say so
    ax.scatter(tested["llm_size_b"], tested["visual_encoder_size_b"], s=30, facecolors="none",
               edgecolors="0.45", linestyles="--", linewidths=1.0,
               label=UNRELIABLE_GRID_LABEL)
    ax.scatter(best["llm_size_b"], best["visual_encoder_size_b"], s=60, color=PALETTE["navil_2b"], zorder=3,
               label="optimal encoder (paper Fig. 7)")
    x = np.geomspace(grid["llm_size_b"].min() * 0.8, grid["llm_size_b"].max() * 1.25, 50)
    ax.plot(x, fit.predict(x), color=PALETTE["navil_9b"], ls="--",
            label=rf"fit: ${fit.coefficient:.2f}\,N_{{\mathrm{{LLM}}}}^{{{fit.exponent:.2f}}}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(set(grid["llm_size_b"]))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    enc_ticks = sorted(set(grid["visual_encoder_size_b"]))
    ax.set_yticks(enc_ticks, [f"{t:g}" for t in enc_ticks])
    ax.minorticks_off()
    ax.set_xlabel("LLM size (B params, log scale)")
    ax.set_ylabel("visual encoder size (B params, log scale)")
    ax.legend(loc="upper left", fontsize=8)
    return ax


#: Colour of each ``model_family`` in family-level plots.
FAMILY_COLOURS = {
    "NaViL": PALETTE["navil_2b"],
    "NVLM": PALETTE["nvlm_d_72b"],
    "compositional": PALETTE["compositional"],
    "native": PALETTE["native"],
    "LLM": PALETTE["text"],
}


def plot_params_vs_score(
    tidy: pd.DataFrame,
    benchmark: str,
    ax: Axes,
    label_models: Sequence[str] | Mapping[str, tuple[float, float]] = (),
    label_gap_pt: float = 11.0,
    log_x_per_pt: float = 0.006,
) -> Axes:
    """Scatter of activated parameters (log x) against one benchmark: one point per model, coloured by family.

    ``tidy`` is ``benchmarks.csv``; models without ``active_params_b`` are left out.  ``label_models``
    get a text label next to their point — a mapping gives each label's wanted offset in points (dx, dy;
    the sign of dx picks the side).  Labels on the same side of points with similar x are then pushed
    apart vertically to at least ``label_gap_pt`` (:func:`spread_positions`), and a label moved away
    from its point gets a thin leader line; ``log_x_per_pt`` converts dx to a factor on the log x axis.
    The legend lists the families.
    """
    rows = tidy[(tidy["benchmark"] == benchmark) & tidy["active_params_b"].notna()]
    if rows.empty:
        raise ValueError(f"no model reports both {benchmark!r} and activated parameters")
    for family, points in rows.groupby("model_family", sort=False):
        ax.scatter(points["active_params_b"], points["score"], s=45, color=FAMILY_COLOURS[family],
                   edgecolor="white", zorder=3, label=family)
    offsets = label_models if isinstance(label_models, Mapping) else {m: (5, 4) for m in label_models}
    labelled = rows[rows["model"].isin(list(offsets))]
    # labels on the same side of neighbouring points are pushed apart vertically (deterministic, no solver):
    # label height ≈ 11 pt, converted to data units with the axes' current y range and height
    ax.autoscale_view()
    y0, y1 = ax.get_ylim()
    height_pt = ax.get_window_extent().height * 72.0 / ax.figure.dpi
    gap = label_gap_pt * (y1 - y0) / max(height_pt, 1.0)
    targets: dict[str, float] = {}
    for side in (-1, 1):
        for cluster in _x_clusters(labelled[[np.sign(offsets[m][0]) == side for m in labelled["model"]]]):
            wanted = [row["score"] + offsets[row["model"]][1] * (y1 - y0) / max(height_pt, 1.0)
                      for _, row in cluster.iterrows()]
            targets.update(zip(cluster["model"], spread_positions(wanted, gap)))
    for _, row in labelled.iterrows():
        dx, _ = offsets[row["model"]]
        x, y = row["active_params_b"], row["score"]
        moved = abs(targets[row["model"]] - y) > 0.6 * gap
        ax.annotate(row["model"], (x, y), xytext=(x * np.exp(np.sign(dx) * abs(dx) * log_x_per_pt), targets[row["model"]]),
                    textcoords="data", ha="right" if dx < 0 else "left", va="center", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 1, "shrinkB": 3}
                    if moved else None)
    _plain_log_xticks(ax, rows["active_params_b"])
    ax.set_xlabel("activated parameters (B, log scale)")
    ax.set_ylabel(f"{benchmark} (0-100)")
    ax.legend(title="model family")
    return ax


def spread_positions(wanted: Sequence[float], min_gap: float) -> list[float]:
    """Positions as close as possible to ``wanted`` (same order) with neighbours at least ``min_gap`` apart.

    Deterministic: sort, then repeatedly merge overlapping groups and centre each group on the mean of
    its wanted positions (the classic "label de-overlap" pass; exact for one dimension).
    """
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i], i))
    groups: list[list[int]] = []  # each group: indices in sorted order, laid out min_gap apart
    for index in order:
        groups.append([index])
        while len(groups) > 1:
            low, high = groups[-2], groups[-1]
            low_top = _group_start(low, wanted, min_gap) + (len(low) - 1) * min_gap
            if _group_start(high, wanted, min_gap) - low_top >= min_gap - 1e-12:
                break
            groups[-2:] = [low + high]
    placed = [0.0] * len(wanted)
    for group in groups:
        start = _group_start(group, wanted, min_gap)
        for k, index in enumerate(group):
            placed[index] = start + k * min_gap
    return placed


def _group_start(group: list[int], wanted: Sequence[float], min_gap: float) -> float:
    """Bottom position of a group laid out ``min_gap`` apart and centred on its members' wanted mean."""
    return float(np.mean([wanted[i] - k * min_gap for k, i in enumerate(group)]))


def _x_clusters(rows: pd.DataFrame, ratio: float = 1.25) -> list[pd.DataFrame]:
    """Split rows into groups of points whose activated parameters lie within ``ratio`` of each other."""
    rows = rows.sort_values(["active_params_b", "model"])
    clusters: list[pd.DataFrame] = []
    start = 0
    values = rows["active_params_b"].to_numpy(dtype=float)
    for i in range(1, len(rows) + 1):
        if i == len(rows) or values[i] > values[start] * ratio:
            if i > start:
                clusters.append(rows.iloc[start:i])
            start = i
    return clusters


def plot_benchmark_dots(
    matrix: pd.DataFrame,
    ax: Axes,
    colours: Mapping[str, str] | None = None,
    markers: Sequence[str] = ("o", "s", "D", "^", "v", "P", "X"),
    xlabel: str = PERCENT_LABEL,
) -> Axes:
    """Dot plot: one row per benchmark (column of ``matrix``), one marker per model (row), score on x.

    Markers of one benchmark are dodged vertically (fixed order = row order of ``matrix``) so that close
    scores stay visible; a thin line spans each benchmark's min-max.  Unreported scores are left out.
    """
    n_models, n_bench = matrix.shape
    y = np.arange(n_bench)[::-1].astype(float)
    dodge = np.linspace(0.28, -0.28, n_models) if n_models > 1 else np.zeros(1)  # first model on top
    for j, benchmark in enumerate(matrix.columns):
        values = matrix[benchmark].dropna()
        if len(values) > 1:
            ax.plot([values.min(), values.max()], [y[j], y[j]], color="0.8", lw=3, zorder=1, solid_capstyle="round")
    for i, (name, row) in enumerate(matrix.iterrows()):
        colour = (colours or {}).get(name, f"C{i}")
        values = row.to_numpy(dtype=float)
        keep = ~np.isnan(values)
        ax.scatter(values[keep], y[keep] + dodge[i], s=42, marker=markers[i % len(markers)], color=colour,
                   edgecolor="black", linewidths=0.5, zorder=3, label=name)
    ax.set_yticks(y, matrix.columns)
    ax.set_ylim(-0.6, n_bench - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("benchmark")
    ax.grid(axis="y", visible=False)
    return ax
