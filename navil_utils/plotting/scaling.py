"""Figures of the workbook's own scaling sweeps (records of :mod:`navil_utils.tiny.sweep`).

    records = read_results("data/scaling/grid.jsonl")
    plot_loss_vs_encoder(records, ax)        # one line per LLM size (paper Fig. 6 in miniature)
    plot_loss_vs_data(records, ax)           # one line per run (paper Fig. 1 middle)
    plot_loss_vs_llm(records, ax)            # one line per encoder size (paper Fig. 5)
    plot_variants_vs_data({"experts": a, "dense": b}, ax)   # an ablation, seeds as bands (Figs. 2/3)

Sizes are parameter counts of the built models (encoder = ViT, LLM = active decoder parameters per token).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes


def _llm_colours(sizes: Sequence[float]) -> dict[float, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("Blues")
    ordered = sorted(set(sizes))
    return {s: cmap(0.45 + 0.5 * i / max(len(ordered) - 1, 1)) for i, s in enumerate(ordered)}


def _budget_loss(record: Mapping[str, Any], samples: int | None) -> float | None:
    budgets = {b["samples"]: b["val_loss"] for b in record["budgets"]}
    return budgets.get(samples if samples is not None else max(budgets))


def plot_loss_vs_encoder(records: Sequence[Mapping[str, Any]], ax: Axes, *, samples: int | None = None,
                         optima: Mapping[float, float | None] | None = None) -> Axes:
    """Held-out caption loss against encoder size, one line per LLM size (seeds averaged, min–max as bars).

    ``samples`` selects the data budget (default: each run's largest); ``optima`` (LLM size → optimal encoder,
    e.g. from :func:`~navil_utils.analysis.scaling.optimal_encoders`) are ringed.
    """
    cells: dict[tuple[float, float], list[float]] = {}
    for record in records:
        loss = _budget_loss(record, samples)
        if loss is not None:
            cells.setdefault((float(record["params_llm_active"]), float(record["params_encoder"])), []).append(loss)
    if not cells:
        raise ValueError("no run has the requested budget")
    colours = _llm_colours([llm for llm, _ in cells])
    for llm in sorted(colours):
        encoders = sorted(enc for l_, enc in cells if l_ == llm)
        values = [cells[(llm, enc)] for enc in encoders]
        means = np.array([np.mean(v) for v in values])
        spread = np.array([[m - min(v), max(v) - m] for m, v in zip(means, values)]).T
        ax.errorbar(encoders, means, yerr=spread, marker="o", color=colours[llm], capsize=3,
                    label=f"LLM {llm / 1e6:.2f}M active params")
        best = (optima or {}).get(llm)
        if best is not None:
            ax.plot([best], [means[encoders.index(best)]], marker="o", markersize=13, markerfacecolor="none",
                    markeredgecolor="black", linestyle="none")
    return _finish_size_axes(ax, sorted({enc for _, enc in cells}), "visual encoder size (parameters, log scale)",
                             f"Loss vs encoder size per LLM ({_budget_text(samples)})")


def _budget_text(samples: int | None) -> str:
    return f"{samples:,} samples" if samples is not None else "largest budget"


def _finish_size_axes(ax: Axes, sizes: Sequence[float], xlabel: str, title: str) -> Axes:
    """Log x axis ticked at the model sizes, the loss label, title and legend."""
    ax.set_xscale("log")
    ax.set_xticks(sizes, [_short(v) for v in sizes])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out caption loss (nats / token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def _short(count: float) -> str:
    """``49152 -> "49k"``, ``1.5e6 -> "1.5M"``."""
    return f"{count / 1e6:.3g}M" if count >= 1e6 else f"{count / 1e3:.3g}k"


#: Marker of a run's seed in :func:`plot_loss_vs_data` (seed 0: dot, 1: cross, …).
SEED_MARKERS = (".", "x", "^", "s")


def plot_loss_vs_data(records: Sequence[Mapping[str, Any]], ax: Axes) -> Axes:
    """Held-out caption loss against training samples seen, one line per run (colour: LLM size, line
    style: encoder size, marker: seed; runs of another study or seed say so in the legend)."""
    if not records:
        raise ValueError("no runs to plot")
    colours = _llm_colours([float(r["params_llm_active"]) for r in records])
    encoders = sorted({float(r["params_encoder"]) for r in records})
    styles = ["-", "--", ":", "-."]
    for record in sorted(records, key=lambda r: (r["params_llm_active"], r["params_encoder"], r.get("seed", 0))):
        samples = [b["samples"] for b in record["budgets"]]
        losses = [b["val_loss"] for b in record["budgets"]]
        extra = [] if record.get("study", "grid") == "grid" else [record["study"]]
        extra += [f"seed {record['seed']}"] if record.get("seed", 0) else []
        label = f"LLM {_short(record['params_llm_active'])}, ViT {_short(record['params_encoder'])}"
        ax.plot(samples, losses, marker=SEED_MARKERS[int(record.get("seed", 0)) % len(SEED_MARKERS)], markersize=4,
                color=colours[float(record["params_llm_active"])],
                linestyle=styles[encoders.index(float(record["params_encoder"])) % len(styles)],
                label=label + (f" ({', '.join(extra)})" if extra else ""))
    ax.set_xscale("log")
    ticks = sorted({b["samples"] for r in records for b in r["budgets"]})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training samples seen (log scale)")
    ax.set_ylabel("held-out caption loss (nats / token)")
    ax.set_title("Loss vs data, every run")
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_loss_vs_llm(records: Sequence[Mapping[str, Any]], ax: Axes, *, samples: int | None = None) -> Axes:
    """Held-out caption loss against LLM size, one line per encoder size (paper Fig. 5 in miniature;
    seeds averaged, min–max as bars)."""
    cells: dict[tuple[float, float], list[float]] = {}
    for record in records:
        loss = _budget_loss(record, samples)
        if loss is not None:
            cells.setdefault((float(record["params_encoder"]), float(record["params_llm_active"])), []).append(loss)
    if not cells:
        raise ValueError("no run has the requested budget")
    encoders = sorted({enc for enc, _ in cells})
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("Oranges")
    for i, enc in enumerate(encoders):
        llms = sorted(n for e, n in cells if e == enc)
        values = [cells[(enc, n)] for n in llms]
        means = np.array([np.mean(v) for v in values])
        spread = np.array([[m - min(v), max(v) - m] for m, v in zip(means, values)]).T
        ax.errorbar(llms, means, yerr=spread, marker="s", capsize=3, label=f"ViT {_short(enc)}",
                    color=cmap(0.4 + 0.55 * i / max(len(encoders) - 1, 1)))
    return _finish_size_axes(ax, sorted({n for _, n in cells}), "LLM size (active parameters, log scale)",
                             f"Loss vs LLM size per encoder ({_budget_text(samples)})")


def plot_variants_vs_data(groups: Mapping[str, Sequence[Mapping[str, Any]]], ax: Axes, *,
                          colours: Mapping[str, Any] | None = None) -> Axes:
    """Loss against training samples for variants of one configuration (an ablation): the mean over seeds
    as a line, the seeds' min–max as a band."""
    for i, (variant, records) in enumerate(groups.items()):
        per_budget: dict[int, list[float]] = {}
        for record in records:
            for budget in record["budgets"]:
                per_budget.setdefault(int(budget["samples"]), []).append(float(budget["val_loss"]))
        samples = sorted(per_budget)
        if not samples:
            continue
        colour = (colours or {}).get(variant, f"C{i}")
        values = [per_budget[s] for s in samples]
        seeds = max(len(v) for v in values)
        ax.plot(samples, [np.mean(v) for v in values], marker="o", ms=4, color=colour,
                label=f"{variant} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.fill_between(samples, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.18)
    ticks = sorted({b["samples"] for records in groups.values() for r in records for b in r["budgets"]})
    if not ticks:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.4")
        return ax
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training samples seen (log scale)")
    ax.set_ylabel("held-out caption loss (nats / token)")
    ax.legend(fontsize=8)
    return ax


def plot_optima_with_paper_rule(result: Any, ax: Axes, paper_fit: Any | None = None,
                                paper_points: Mapping[float, float] | None = None) -> Axes:
    """Our optimal encoder per LLM size next to the paper's rule, both in parameters on log-log axes.

    ``result`` is an :class:`~navil_utils.analysis.scaling.OptimalEncoderFit`: each encoder that the
    bootstrap over seeds found optimal is a dot sized by how often (the full-data optimum filled), and
    "not reached" is counted in the legend.  ``paper_fit`` (a :class:`PowerLaw` in billions, e.g. fitted to
    Fig. 7) is drawn over the whole range, extrapolated far below the paper's 0.5B–7B LLMs;
    ``paper_points`` ({LLM: encoder}, billions) are its measured optima.
    """
    llms = sorted(result.optima)
    total = max(result.resamples, 1)
    for llm in llms:
        counts = result.bootstrap_optima.get(llm, {})
        resamples = sum(counts.values()) or 1
        for encoder, count in counts.items():
            if encoder is not None:
                ax.scatter([llm], [encoder], s=30 + 270 * count / resamples, color="#1f77b4", alpha=0.35,
                           edgecolor="none")
        best = result.optima[llm]
        if best is not None:
            ax.scatter([llm], [best], s=40, color="#1f77b4", edgecolor="black", zorder=3)
    ax.scatter([], [], s=40, color="#1f77b4", edgecolor="black", label="ours: optimum (mean over seeds)")
    ax.scatter([], [], s=120, color="#1f77b4", alpha=0.35, label="ours: bootstrap over seeds (size = share)")
    if result.fit is not None:
        x = np.geomspace(min(llms) * 0.8, max(llms) * 1.25, 20)
        ax.plot(x, result.fit.predict(x), color="#1f77b4", ls=":", label=f"ours: fit, exponent {result.fit.exponent:.2f}")
    if paper_fit is not None:
        low = min(llms) * 0.5 if llms else 1e5
        high = max(max(paper_points or {1: 0}) * 1e9 * 1.5, max(llms) * 2 if llms else 1e10)
        x = np.geomspace(low, high, 50)
        ax.plot(x, paper_fit.predict(x / 1e9) * 1e9, color="#d62728", ls="--",
                label=f"paper's rule, exponent {paper_fit.exponent:.2f} (extrapolated)")
    if paper_points:
        ax.scatter([k * 1e9 for k in paper_points], [v * 1e9 for v in paper_points.values()], marker="D",
                   color="#d62728", s=40, zorder=3, label="paper: optimal encoders (Fig. 7)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LLM size (active parameters, log scale)")
    ax.set_ylabel("optimal visual encoder (parameters, log scale)")
    ax.set_title(f"Optimal encoder vs LLM size ({total} bootstrap resamples with a fit)")
    ax.legend(fontsize=7, loc="upper left")
    return ax
