"""Figure of the tiles-vs-scales comparison (chapter 06): accuracy per question type and evaluation set.

    fig = plot_tiles_vs_scales(accuracy_summary(records), blind)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from navil_utils.analysis.tiles_vs_scales import ARCHITECTURE_NAMES, SUBSET_NAMES
from navil_utils.errors import ConfigError
from navil_utils.plotting.style import PALETTE

#: Bar colours: NaViL in the workbook's NaViL blue, NVLM-D in its NVLM-D green.
ARCHITECTURE_COLOURS = {"navil": PALETTE["navil_2b"], "nvlm_d": PALETTE["nvlm_d_72b"]}


def plot_tiles_vs_scales(summary, blind: Mapping[str, Mapping[str, float]] | None = None, *,
                         subsets: Sequence[str] = ("all", "extreme_aspect", "small_objects", "small_text"),
                         title: str | None = None):
    """One panel per evaluation set: bars = mean exact match over seeds per question type and architecture,
    a line from the lowest to the highest seed with a dot per seed value (min and max), and per type the
    image-blind baseline (``blind[subset][qtype]``) as a dashed segment.

    ``summary`` is :func:`~navil_utils.analysis.tiles_vs_scales.accuracy_summary` output.  Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    subsets = [s for s in subsets if (summary["subset"] == s).any()]
    if not subsets:
        raise ConfigError("the summary has none of the requested evaluation sets")
    architectures = list(dict.fromkeys(summary["architecture"]))
    widths = [max(2, summary[(summary["subset"] == s) & (summary["qtype"] != "overall")]["qtype"].nunique()) + 1
              for s in subsets]
    fig, axes = plt.subplots(1, len(subsets), figsize=(3.0 * len(subsets) + 1.5, 4.2), sharey=True,
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    bar = 0.8 / len(architectures)
    for ax, subset in zip(axes[0], subsets):
        part = summary[summary["subset"] == subset]
        qtypes = [q for q in dict.fromkeys(part["qtype"]) if q != "overall"] + ["overall"]
        x = np.arange(len(qtypes))
        for k, architecture in enumerate(architectures):
            rows = part[part["architecture"] == architecture].set_index("qtype").reindex(qtypes)
            offset = (k - (len(architectures) - 1) / 2) * bar
            ax.bar(x + offset, rows["mean"], bar * 0.92, color=ARCHITECTURE_COLOURS.get(architecture, f"C{k}"))
            spread = rows["high"] > rows["low"]
            ax.vlines((x + offset)[spread], rows["low"][spread], rows["high"][spread], color="black", lw=1.1)
            ax.plot(np.r_[x + offset, x + offset], np.r_[rows["low"], rows["high"]], "o", ms=2.5, color="black")
        for i, qtype in enumerate(qtypes):
            value = (blind or {}).get(subset, {}).get(qtype)
            if value is not None:
                ax.hlines(value, i - 0.45, i + 0.45, colors="0.2", linestyles="--", lw=1.1)
            if (part.loc[part["qtype"] == qtype, "high"].fillna(0) == 0).all():
                ax.text(i, 0.015, "all 0", ha="center", va="bottom", fontsize=7, color="0.3")
        ax.axvline(len(qtypes) - 1.5, color="0.8", lw=0.8)
        ax.set_xticks(x, qtypes, rotation=35, ha="right")
        ax.set_xlim(-0.6, len(qtypes) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_title(SUBSET_NAMES.get(subset, subset), fontsize=9)
    axes[0][0].set_ylabel("exact-match accuracy")
    axes[0][0].set_ylim(0, 1.0)
    fewest, most = int(summary["seeds"].min()), int(summary["seeds"].max())
    seeds = str(most) if fewest == most else f"{fewest}–{most}"
    handles = [Patch(color=ARCHITECTURE_COLOURS.get(a, f"C{k}"), label=ARCHITECTURE_NAMES.get(a, a))
               for k, a in enumerate(architectures)]
    handles.append(Line2D([], [], color="black", marker="o", ms=2.5, lw=1.1,
                          label=f"seed range (dots: lowest and highest of {seeds} seeds)"))
    if blind:
        handles.append(Line2D([], [], color="0.2", ls="--", lw=1.1,
                              label="image-blind baseline (most frequent answer per question template)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Tiles vs scales on the synthetic task: exact match per question type (bars: mean over "
                 "seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def plot_two_views(image, scales, tiles, *, title: str | None = None):
    """How the two tiny models see one image: the image, NaViL's scales (each at its resized size, padding
    grey) and NVLM-D's tiles plus thumbnail (each resized to the tile size), all drawn at one pixel scale, with
    the visual tokens each piece costs.  ``scales`` is :class:`~navil_utils.processing.multiscale.MultiScaleInputs`
    of the image, ``tiles`` its :class:`~navil_utils.processing.tiling.TiledInputs`.  Returns the figure."""
    import matplotlib.pyplot as plt

    image = np.asarray(image.convert("RGB"))
    scale_pictures = scales.scale_images()
    tile_pictures = tiles.tile_images()
    merge = scales.merge_size
    scale_tokens = [int(np.prod(s.grid_thw)) // merge**2 for s in scales.scales]
    tile_tokens = int(tiles.pixel_values.shape[-1] // scales.patch_size // merge) ** 2
    rows = [("original image", [(image, f"{image.shape[1]}×{image.shape[0]} px")]),
            (f"NaViL: {len(scale_pictures)} scales, {sum(scale_tokens)} visual tokens",
             [(p, f"scale {k + 1}: {s.resized_hw[1]}×{s.resized_hw[0]} px → {n} tokens")
              for k, (p, s, n) in enumerate(zip(scale_pictures, scales.scales, scale_tokens))]),
            (f"NVLM-D: {len(tile_pictures)} tiles ({tiles.grid[0]}×{tiles.grid[1]} + thumbnail), "
             f"{len(tile_pictures) * tile_tokens} visual tokens",
             [(p, (f"<tile_{k + 1}>" if k < len(tile_pictures) - 1 or not tiles.plan.thumbnail else "thumbnail")
               + f" → {tile_tokens}") for k, p in enumerate(tile_pictures)])]
    gap = 12
    widths = [sum(p.shape[1] for p, _ in pieces) + gap * (len(pieces) - 1) for _, pieces in rows]
    heights = [max(p.shape[0] for p, _ in pieces) for _, pieces in rows]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 5.2), gridspec_kw={"height_ratios": heights})
    for ax, (label, pieces), height in zip(axes, rows, heights):
        x = 0
        for picture, caption in pieces:
            h, w = picture.shape[:2]
            ax.imshow(picture, extent=(x, x + w, h, 0), interpolation="nearest")
            ax.add_patch(plt.Rectangle((x, 0), w, h, fill=False, lw=0.8, ec="0.3"))
            ax.text(x + w / 2, h + 3, caption, ha="center", va="top", fontsize=7)
            x += w + gap
        ax.set_xlim(-2, max(widths) + 2)
        ax.set_ylim(height + 22, -2)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle(title or "The same image through both tiny models (one pixel scale; black = zero padding)",
                 fontsize=10)
    fig.tight_layout()
    return fig
