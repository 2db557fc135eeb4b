"""One figure style for the whole workbook and :func:`save_figure`.

Figures are written as PNG and PDF under ``figures/`` (or ``$NAVIL_FIGURES_DIR``) with fixed dpi and without
timestamps in the file metadata, so regenerating an unchanged figure leaves ``git status`` clean.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

from navil_utils.paths import figures_dir

#: Default figure size (inches) and resolution of every workbook figure.
FIGSIZE = (7.0, 4.0)


DPI = 100


SAVE_DPI = 150


#: Colours used consistently across notebooks.
PALETTE = {
    "navil_2b": "#1f77b4",
    "navil_9b": "#0b3d91",
    "nvlm_d_72b": "#76b900",
    "compositional": "#9e9e9e",
    "native": "#ff7f0e",
    "text": "#bdbdbd",
    "visual": "#d62728",
}


def use_workbook_style() -> None:
    """Apply the workbook's matplotlib rcParams (deterministic fonts, sizes and hashing)."""
    matplotlib.rcParams.update(
        {
            "figure.figsize": FIGSIZE,
            "figure.dpi": DPI,
            "savefig.dpi": SAVE_DPI,
            "savefig.bbox": "tight",
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            "svg.hashsalt": "navil",
            "pdf.compression": 6,
        }
    )


def save_figure(fig, name: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``fig`` to ``figures/<name>.png`` and ``figures/<name>.pdf``; return both paths.

    ``name`` is a file stem such as ``"00_benchmarks"`` (no extension, no directories).
    Metadata that would change on every run (creation date, producer version) is stripped.
    """
    if not name or Path(name).name != name or Path(name).suffix in {".png", ".pdf"}:
        raise ValueError(f"save_figure expects a bare file stem like '02_scales', got {name!r}")
    out_dir = Path(directory) if directory is not None else figures_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, format="png", metadata={"Software": None})
    fig.savefig(pdf, format="pdf", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return png, pdf


def mark_zero_groups_and_chance(ax, frame, group_column: str, groups, chance=None, *, lw: float = 1.2):
    """On a grouped bar chart (group ``i`` at x = i): write "all 0" over groups whose ``accuracy`` bars are all
    zero, draw ``chance[group]`` as a dashed line across each group; return the legend's ``(handles, labels)``
    with a "chance" entry added when ``chance`` is given."""
    from matplotlib.lines import Line2D

    for i, group in enumerate(groups):
        if (frame.loc[frame[group_column] == group, "accuracy"].fillna(0) == 0).all():
            ax.text(i, 0.015, "all 0", ha="center", va="bottom", fontsize=8, color="0.3")
    handles, labels = ax.get_legend_handles_labels()
    if chance is not None:
        for i, group in enumerate(groups):
            if group in chance:
                ax.hlines(chance[group], i - 0.45, i + 0.45, colors="black", linestyles="--", lw=lw)
        handles.append(Line2D([], [], color="black", ls="--", lw=lw))
        labels.append("chance (uniform guess)")
    return handles, labels
