"""Figures about models: parameters per component, weights per device, parity with the reference code.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from navil_utils.analysis.device_maps import (
    DevicePlan,
    GiB,
    device_component,
    device_of_parameter,
)
from navil_utils.analysis.parameters import PAPER_PARAMETERS, ParameterCounts


def plot_device_plans(plans: Sequence[DevicePlan], model, ax=None, title: str | None = None):
    """Stacked bars: weight GiB per device and component for several plans (e.g. 1/2/4/8 GPUs).

    Bytes are attributed per parameter (``numel × bytes per element`` of the plan's dtype).
    """
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms
    import torch

    groups = ["vision encoder", "connector + special embeddings", "token embeddings",
              "LLM layers (both experts)", "LM head", "norms / rotary"]
    colours = dict(zip(groups, ["#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#7f7f7f"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    params = [(name, p.numel()) for name, p in model.named_parameters()]
    labelled: set[str] = set()
    ticks: list[tuple[float, str]] = []
    tallest = 0.0
    below = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    x = 0.0
    for plan in plans:
        itemsize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
        gib: dict[tuple[int | str, str], float] = {}
        for name, numel in params:
            key = (device_of_parameter(name, plan.device_map), device_component(name))
            gib[key] = gib.get(key, 0.0) + numel * itemsize / GiB
        devices = sorted({dev for dev, _ in gib}, key=lambda d: (isinstance(d, str), str(d)))
        start = x
        for device in devices:
            bottom = 0.0
            for group in groups:
                value = gib.get((device, group), 0.0)
                if value:
                    visible = value >= 0.005  # a final norm alone (kB) would only clutter the legend
                    ax.bar(x, value, bottom=bottom, color=colours[group], width=0.8,
                           label=group if visible and group not in labelled else None)
                    if visible:
                        labelled.add(group)
                    bottom += value
            tallest = max(tallest, bottom)
            ticks.append((x, str(device)))
            x += 1
        ax.text((start + x - 1) / 2, -0.085, f"{plan.num_gpus} GPU{'s' if plan.num_gpus > 1 else ''}",
                transform=below, ha="center", va="top", fontsize=9)
        x += 0.8
    ax.set_xticks([t for t, _ in ticks], [lbl for _, lbl in ticks], fontsize=8)
    ax.set_ylim(0, 1.08 * tallest)
    ax.set_ylabel("weights per device (GiB)")
    ax.set_xlabel("device index (top), number of GPUs of the plan (bottom)", labelpad=22)
    ax.set_title(title or "Device-map plans")
    ax.legend(fontsize=8, loc="upper right")
    return ax


def plot_parameter_breakdown(counts: Mapping[str, ParameterCounts], ax=None):
    """Horizontal stacked bars (billions) per model: components of the total; markers above each bar
    show the paper's total / active counts next to our active count."""
    import matplotlib.pyplot as plt

    order = ["vision_encoder", "connector", "token_embeddings", "lm_head", "text_experts", "visual_experts",
             "special_token_embedding", "shared_norms"]
    colours = {"vision_encoder": "#d62728", "connector": "#ff7f0e", "token_embeddings": "#9467bd",
               "lm_head": "#2ca02c", "text_experts": "#1f77b4", "visual_experts": "#aec7e8",
               "special_token_embedding": "#8c564b", "shared_norms": "#7f7f7f"}
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.4))
    names = list(counts)
    for row, name in enumerate(names):
        left = 0.0
        for part in order:
            value = counts[name].components.get(part, 0) / 1e9
            if value < 1e-3:   # special embeddings / norms are invisible at this scale
                continue
            ax.barh(row, value, left=left, color=colours[part], height=0.5, label=part.replace("_", " "))
            left += value
        marker_row = row - 0.4
        ax.plot(counts[name].active / 1e9, marker_row, marker="o", color="black", markerfacecolor="white",
                markersize=7, linestyle="none", label="ours: active")
        paper = PAPER_PARAMETERS.get(name, {})
        for quantity, marker in (("total", "v"), ("active", "o")):
            if paper.get(quantity):
                ax.plot(paper[quantity] / 1e9, marker_row, marker=marker, color="black", markersize=5,
                        linestyle="none", label=f"paper: {quantity}")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.6, -0.8)
    ax.set_xlabel("parameters (billions)")
    ax.set_title("Parameters per component (bars) vs the paper's counts (markers)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per label
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
def plot_parity(reports: dict[str, Any], ax=None, title: str | None = None):
    """Max abs error per float tensor (log scale) for each fixture variant, with the tolerance.

    Exact agreement (error 0) has no bar on a log axis; it is written as "0" instead.  Plot the reports
    of a float64 run for a figure that is the same on every machine (see :func:`parity_verdicts`).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.8))
    floor = 1e-9
    names: list[str] = []
    width = 0.8 / max(len(reports), 1)
    for k, (variant, report) in enumerate(reports.items()):
        floats = report[report["tolerance"] > 0]
        names = list(floats["tensor"])
        errors = floats["max_abs_error"].to_numpy(dtype=float)
        x = np.arange(len(names)) + (k - (len(reports) - 1) / 2) * width
        bars = ax.bar(x, np.where(errors > 0, errors, np.nan), width=width, label=variant, bottom=floor)
        for xi, err in zip(x, errors):
            if err == 0:
                ax.text(xi, floor * 2, "0", ha="center", va="bottom", fontsize=8, color=bars.patches[0].get_facecolor())
    if not reports:
        raise ValueError("plot_parity needs at least one report")
    tolerance = float(next(iter(reports.values()))["tolerance"].max())
    ax.axhline(tolerance, color="black", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log")
    ax.set_ylim(floor, tolerance * 10)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("max |ours − reference|")
    ax.set_title(title or "Native implementation vs reference code (golden fixtures)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
