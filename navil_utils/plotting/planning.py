"""Figures of NVLM-D-72B planning: weights per GPU under the card's ``split_model`` vs accelerate (and NaViL),
and the memory one request needs (data: :mod:`navil_utils.analysis.nvlm_planning`)."""
from __future__ import annotations

from collections.abc import Sequence

from navil_utils.plotting.style import PALETTE

_SERIES_COLOURS = {
    ("NVLM-D-72B", "card split_model"): PALETTE["nvlm_d_72b"],
    ("NVLM-D-72B", "accelerate balanced"): "#3d6b00",
    ("NaViL-2B", "accelerate balanced"): PALETTE["navil_2b"],
    ("NaViL-9B", "accelerate balanced"): PALETTE["navil_9b"],
}


def plot_placements(table, gpu_memory_gib: float = 80.0, gpu_counts: Sequence[int] | None = None, axes=None):
    """One panel per GPU count: weights (GiB) per device for each (model, method) of ``table``
    (:func:`~navil_utils.analysis.nvlm_planning.placement_table`), the per-GPU memory as a dashed line,
    decoder layers printed on the bars and ``*`` on the device that holds the ViT."""
    import matplotlib.pyplot as plt

    counts = list(gpu_counts or sorted(table["num_gpus"].unique()))
    if axes is None:
        _, axes = plt.subplots(1, len(counts), figsize=(3.6 * len(counts), 3.8), squeeze=False)
        axes = axes[0]
    series = list(dict.fromkeys(zip(table["model"], table["method"])))
    width = 0.8 / max(len(series), 1)
    for ax, n in zip(axes, counts):
        part = table[table["num_gpus"] == n]
        devices = list(dict.fromkeys(part["device"]))
        for k, (model, method) in enumerate(series):
            rows = part[(part["model"] == model) & (part["method"] == method)].set_index("device")
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(devices))]
            heights = [float(rows["weights (GiB)"].get(d, 0.0)) for d in devices]
            colour = _SERIES_COLOURS.get((model, method), "#7f7f7f")
            ax.bar(xs, heights, width=width, color=colour, label=f"{model} ({method})")
            for x, d, h in zip(xs, devices, heights):
                if d in rows.index and h > 0:
                    layers = int(rows.loc[d, "decoder layers"])
                    star = "*" if bool(rows.loc[d, "holds ViT"]) else ""
                    ax.text(x, h, f"{layers}{star}", ha="center", va="bottom", fontsize=6)
        ax.axhline(gpu_memory_gib, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(devices)), devices)
        ax.set_title(f"{n} GPU{'s' if n > 1 else ''}")
        ax.set_xlabel("device")
    axes[0].set_ylabel("bf16 weights (GiB)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes


def plot_request_memory(frame, ax=None):
    """Bars per model of :func:`~navil_utils.analysis.nvlm_planning.request_memory_table`: KV cache after the
    prefill, at the end of generation, and the rough prefill activation peak (GiB)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    columns = ["KV after prefill (GiB)", "KV at end (GiB)", "prefill activation peak (GiB)"]
    colours = ["#9ecae1", "#3182bd", "#fd8d3c"]
    width = 0.8 / len(columns)
    for k, (column, colour) in enumerate(zip(columns, colours)):
        xs = [i + (k - 1) * width for i in range(len(frame))]
        ax.bar(xs, frame[column], width=width, color=colour, label=column.replace(" (GiB)", ""))
    labels = [f"{m}\n{p:,} prompt tokens" for m, p in zip(frame["model"], frame["prompt tokens"])]
    ax.set_xticks(range(len(frame)), labels, fontsize=8)
    ax.set_ylabel("GiB (bf16)")
    ax.legend(fontsize=8)
    return ax


def plot_decode_roofline(table, ax=None, *, gpu_memory_gib: float | None = None, title: str | None = None):
    """Decode tokens/s bounds of one sequence (:func:`~navil_utils.analysis.roofline.decode_roofline_table`) against
    the GPU count: one colour per model, solid = tensor parallel, dashed = whole layers per GPU (they take turns).
    With ``gpu_memory_gib``, plans whose evenly split weights exceed a GPU are left out."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.2))
    shown = table if gpu_memory_gib is None else table[table["all weights per GPU GiB (even split)"] <= gpu_memory_gib]
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for k, model in enumerate(dict.fromkeys(table["model"])):
        for parallelism, style in (("tensor", "-"), ("layers", "--")):
            rows = shown[(shown["model"] == model) & (shown["parallelism"] == parallelism)].sort_values("GPUs")
            if len(rows):
                ax.plot(rows["GPUs"], rows["tokens/s (bound)"], style, marker="o", ms=4, color=colours[k % 5],
                        label=f"{model}, {'tensor parallel' if parallelism == 'tensor' else 'layers per GPU'}")
    gpus = sorted(set(table["GPUs"]))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("decode tokens/s, batch 1 (upper bound)")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Decode roofline: bytes per step / HBM bandwidth")
    return ax
