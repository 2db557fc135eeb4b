"""Tiles vs scales, measured: tables over the comparison runs of :mod:`navil_utils.tiny.compare`.

One JSON line per (architecture, seed) run holds accuracy per question type on the held-out questions and on
the stress subsets, visual tokens per image, parameters and times.  These helpers turn the lines into the
tables chapter 06 shows: accuracy per architecture × subset × question type with the spread over seeds,
the costs of each architecture, and the *blind* baseline — what a model that never looks at the image
reaches by giving the most frequent answer of each question template.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from navil_utils.errors import ConfigError

#: Display names of the compared architectures and of the evaluation sets.
ARCHITECTURE_NAMES = {"navil": "NaViL (multi-scale)", "nvlm_d": "NVLM-D (tiles + thumbnail)"}
SUBSET_NAMES = {"all": "held-out questions", "extreme_aspect": "extreme aspect ratios (≥ 2.5:1)",
                "small_objects": "small shapes (8–12 px)", "small_text": "small text (8–12 px)"}


def read_compare_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The run records of a comparison results file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no comparison results at {path}")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ConfigError(f"{path} holds no comparison runs")
    return records


def accuracy_long(records: Iterable[Mapping[str, Any]]):
    """One row per (architecture, seed, subset, qtype): ``accuracy`` (``qtype`` ``"overall"`` included).

    ``subset`` is ``"all"`` for the main held-out questions, else the stress subset's name.
    """
    rows = []
    for record in records:
        sets = {"all": record["accuracy"], **record.get("accuracy_subsets", {})}
        for subset, per_type in sets.items():
            for qtype, accuracy in per_type.items():
                rows.append({"architecture": record["architecture"], "seed": int(record["seed"]),
                             "subset": subset, "qtype": qtype, "accuracy": float(accuracy)})
    return pd.DataFrame(rows)


def accuracy_summary(records: Iterable[Mapping[str, Any]]):
    """Mean, min and max accuracy over seeds per (architecture, subset, qtype), with the seeds counted."""
    frame = accuracy_long(records)
    grouped = frame.groupby(["architecture", "subset", "qtype"], sort=False)["accuracy"]
    summary = grouped.agg(mean="mean", low="min", high="max", seeds="count").reset_index()
    return summary


def accuracy_table(records: Iterable[Mapping[str, Any]], subset: str = "all", digits: int = 3,
                   blind: Mapping[str, float] | None = None):
    """Question types × architectures for one evaluation set: ``mean (low–high)`` over seeds; with ``blind``
    (:func:`blind_baseline` of that set) an "image-blind baseline" column."""
    summary = accuracy_summary(records)
    part = summary[summary["subset"] == subset]
    if part.empty:
        raise ConfigError(f"no results for subset {subset!r}; known: {sorted(summary['subset'].unique())}")
    cell = part.apply(lambda r: f"{r['mean']:.{digits}f}" if r["low"] == r["high"] else
                      f"{r['mean']:.{digits}f} ({r['low']:.{digits}f}–{r['high']:.{digits}f})", axis=1)
    table = part.assign(value=cell).pivot(index="qtype", columns="architecture", values="value")
    table = table.rename(columns=ARCHITECTURE_NAMES)
    if blind is not None:
        table["image-blind baseline"] = [f"{blind[q]:.{digits}f}" if q in blind else "" for q in table.index]
    order = [q for q in table.index if q != "overall"] + ["overall"]
    return table.loc[order].rename_axis(index="question type", columns=None)


def cost_table(records: Sequence[Mapping[str, Any]], merge: int = 4):
    """Per architecture: parameters, visual tokens and ViT patches per image, training and inference time.

    Times are the mean over seeds with the range; ``merge`` is the number of ViT patches per visual token
    (2×2 in both tiny models: NaViL's merger and NVLM-D's pixel shuffle).
    """
    rows = []
    by_arch: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_arch.setdefault(record["architecture"], []).append(record)
    for architecture, runs in by_arch.items():
        first = runs[0]
        train = [r["train_seconds"] for r in runs]
        infer = [1000 * r["inference_seconds_per_sample"] for r in runs]
        rows.append({
            "architecture": ARCHITECTURE_NAMES.get(architecture, architecture),
            "parameters": first["params_total"], "active per token": first["params_active"],
            "vision encoder": first["params_encoder"],
            "visual tokens / image": first["visual_tokens_mean"], "max": first["visual_tokens_max"],
            "ViT patches / image": merge * first["visual_tokens_mean"],
            "seeds": len(runs),
            "training s (range)": f"{sum(train) / len(train):,.0f} ({min(train):,.0f}–{max(train):,.0f})",
            "inference ms / question (range)": f"{sum(infer) / len(infer):.1f} ({min(infer):.1f}–{max(infer):.1f})",
        })
    return pd.DataFrame(rows).set_index("architecture")


def blind_baseline(samples: Iterable[Any]) -> dict[str, float]:
    """Exact-match accuracy per question type of a model that ignores the image: for every question
    template it always gives that template's most frequent answer in ``samples`` (an upper bound for any
    image-blind constant-per-template policy on exactly these questions).  ``"overall"`` over all samples."""
    by_template: dict[tuple[str, str], Counter] = {}
    for sample in samples:
        by_template.setdefault((sample.qtype, sample.template), Counter())[sample.answer] += 1
    if not by_template:
        raise ConfigError("blind_baseline needs at least one sample")
    hits: Counter = Counter()
    totals: Counter = Counter()
    for (qtype, _), answers in by_template.items():
        hits[qtype] += max(answers.values())
        totals[qtype] += sum(answers.values())
    baseline = {qtype: hits[qtype] / totals[qtype] for qtype in sorted(totals)}
    baseline["overall"] = sum(hits.values()) / sum(totals.values())
    return baseline


def information_table(rows: Iterable[Mapping[str, Any]], digits: int = 3):
    """Question types × models: nats of information about the answer taken from the image (image-blind
    optimal loss − the model's loss), ``mean ± standard error`` over questions; negative = worse than blind."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ConfigError("no answer-information rows")
    frame["value"] = [f"{m:+.{digits}f} ± {s:.{digits}f}" for m, s in zip(frame["information_nats"], frame["stderr"])]
    table = frame.pivot(index="qtype", columns="model", values="value")
    return table[list(dict.fromkeys(frame["model"]))].rename_axis(index="question type", columns=None)
