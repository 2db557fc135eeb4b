"""The same attention statistics for several models — the NaViL paper's Fig. 9 comparison (two encoder sizes)
in miniature.

One :class:`AttentionStatistics` per model holds, on the same held-out questions:

* ``visual_share`` — the answer query's attention on visual tokens / text / markers per LLM layer
  (:func:`~navil_utils.analysis.attention_report.answer_share_table`);
* ``pointing`` — its visual attention inside the evidence box against the baselines, all scales together
  (:func:`~navil_utils.analysis.attention_claims.pointing_summary`);
* ``locality`` — how far image tokens look within their own scale (:func:`visual_locality`): the paper's
  "global vs local" reading of the image blocks of Fig. 9 as a number;
* ``blanking`` — accuracy with the evidence box's visual tokens zeroed vs as many outside
  (:func:`~navil_utils.analysis.attention_report.blanking_summary`);
* ``example`` — the full head-mean token × token matrices of one prompt, every layer (the Fig. 9 panels).

``python -m navil_utils.tiny.attention_statistics --model DIR --out DIR`` computes them for a checkpoint and
writes them (``statistics.csv``, ``example_attention.safetensors``, ``meta.json``) so that a notebook can show a
model it cannot ship; :meth:`AttentionStatistics.load` reads them back.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from navil_utils.analysis.attention import TokenLayout
from navil_utils.analysis.attention_claims import (
    AttentionQuestion,
    BlankingResult,
    blanking_check,
    bootstrap_means,
    collect_answer_attention,
    pointing_summary,
)
from navil_utils.analysis.attention_report import (
    PromptAttention,
    answer_share_table,
    blanking_summary,
    pointing_by_layer,
    record_prompt,
)
from navil_utils.errors import CheckpointError, ConfigError

#: Columns of :func:`locality_table`'s ``statistic``: attention-weighted and uniform mean distance (in merged
#: tokens of the query's scale) and their ratio (1 = as spread as uniform attention, < 1 = local).
LOCALITY_STATISTICS = ("distance", "distance_uniform", "distance_ratio")

_TABLES = ("visual_share", "pointing", "locality", "blanking")


# ---------------------------------------------------------------------------------------------------
# locality of image-token attention


def visual_locality(matrix: torch.Tensor, layout: TokenLayout, *, image: int = 0, min_keys: int = 4) -> np.ndarray:
    """How far the visual tokens of each scale attend within that scale.

    For every visual query with at least ``min_keys`` visual keys of its own scale at or before it (the causal
    mask), the attention-weighted mean Euclidean distance to those keys in the scale's merged-token grid, and
    the mean distance of a uniform row over the same keys.

    Args:
        matrix: ``(T, T)`` attention of one layer (rows = queries), e.g. ``prompt.matrix(layer)``.
        layout: the prompt's :class:`~navil_utils.analysis.attention.TokenLayout`.
    Returns:
        ``(Q, 2)`` float64: ``(attention distance, uniform distance)`` per query (queries without attention on
        their scale's keys are left out).
    """
    if matrix.shape != (len(layout), len(layout)):
        raise ConfigError(f"a matrix of shape {tuple(matrix.shape)} does not fit a layout of {len(layout)} positions")
    visual = layout.kind_mask("visual") & (layout.image == image)
    values = []
    for scale in sorted({int(s) for s in layout.scale[visual].tolist()}):
        positions = torch.nonzero(visual & (layout.scale == scale)).flatten()      # ascending = causal order
        coords = torch.stack([layout.row[positions], layout.col[positions]], dim=1).double()
        distance = torch.cdist(coords, coords)                                      # (n, n)
        weights = matrix[positions][:, positions].double().tril()                   # keys at or before the query
        allowed = torch.ones_like(weights).tril()
        keep = (allowed.sum(1) >= min_keys) & (weights.sum(1) > 0)
        attended = (weights * distance).sum(1) / weights.sum(1).clamp_min(1e-300)
        uniform = (allowed * distance).sum(1) / allowed.sum(1)
        values.append(torch.stack([attended[keep], uniform[keep]], dim=1))
    return torch.cat(values).numpy() if values else np.empty((0, 2))


def locality_table(prompts: Sequence[PromptAttention], *, n_boot: int = 2000, confidence: float = 0.95,
                   seed: int = 0):
    """Per LLM layer: :func:`visual_locality` averaged within each prompt, then over prompts with a bootstrap
    interval (long format ``layer, statistic, mean, low, high, n``; ``distance_ratio`` is the per-prompt ratio of
    the two means)."""
    import pandas as pd

    if not prompts:
        raise ConfigError("no prompts given")
    records = []
    for layer in range(prompts[0].num_layers):
        values = np.full((len(prompts), len(LOCALITY_STATISTICS)), np.nan)
        for i, prompt in enumerate(prompts):
            pairs = visual_locality(prompt.matrix(layer), prompt.layout)
            if len(pairs):
                attended, uniform = pairs.mean(0)
                values[i] = (attended, uniform, attended / uniform)
        mean, low, high = bootstrap_means(values, n_boot=n_boot, confidence=confidence, seed=seed)
        for k, name in enumerate(LOCALITY_STATISTICS):
            records.append({"layer": layer, "statistic": name, "mean": float(mean[k]), "low": float(low[k]),
                            "high": float(high[k]), "n": int(np.isfinite(values[:, k]).sum())})
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------------
# one model's statistics


@dataclass
class AttentionStatistics:
    """Chapter 04's measured statistics of one model on one set of held-out questions.

    ``visual_share``, ``pointing``, ``locality``, ``blanking``: long DataFrames (see the module docstring);
    ``example``: ``(layers, T, T)`` float32 head-mean attention of the example prompt; ``example_kinds``: that
    prompt's token kinds (to check that another model saw the same prompt layout); ``meta``: what produced them.
    """

    label: str
    visual_share: Any
    pointing: Any
    locality: Any
    blanking: Any
    example: torch.Tensor
    example_kinds: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _TABLES}

    def save(self, directory: str | Path) -> Path:
        """Write ``statistics.csv`` (all tables, a ``table`` column naming each), ``example_attention.safetensors``
        and ``meta.json`` into ``directory``."""
        import pandas as pd
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        frames = [table.assign(table=name) for name, table in self.tables().items()]
        pd.concat(frames, ignore_index=True).to_csv(out / "statistics.csv", index=False, float_format="%.6g")
        save_file({"llm": self.example.float().contiguous()}, str(out / "example_attention.safetensors"),
                  metadata={"kinds": json.dumps(list(self.example_kinds))})
        meta = {"label": self.label, **self.meta,
                "columns": {name: list(table.columns) for name, table in self.tables().items()}}
        (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> AttentionStatistics:
        """Read what :meth:`save` wrote (safetensors only, no pickle)."""
        import pandas as pd
        from safetensors import safe_open

        path = Path(directory)
        missing = [n for n in ("statistics.csv", "example_attention.safetensors", "meta.json") if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing attention statistics file(s) {missing}")
        meta = json.loads((path / "meta.json").read_text())
        table = pd.read_csv(path / "statistics.csv", keep_default_na=False, na_values=[""])
        columns = meta.pop("columns", {})
        parts = {}
        for name in _TABLES:
            if name not in columns:
                raise CheckpointError(f"{path / 'meta.json'}: no column list for table {name!r}")
            part = table.loc[table["table"] == name, columns[name]].reset_index(drop=True)
            for column in ("layer", "n"):
                if column in part:
                    part[column] = part[column].astype(int)
            parts[name] = part
        with safe_open(str(path / "example_attention.safetensors"), "pt") as handle:
            example = handle.get_tensor("llm")
            kinds = tuple(json.loads(handle.metadata()["kinds"]))
        label = meta.pop("label", path.name)
        return cls(label, example=example, example_kinds=kinds, meta=meta, **parts)

    def require(self, **expected: Any) -> None:
        """Raise :class:`~navil_utils.errors.ConfigError` naming every ``meta`` entry that differs from ``expected``
        (e.g. the questions' seed and count: statistics of different questions must not be compared)."""
        wrong = {key: (self.meta.get(key), value) for key, value in expected.items() if self.meta.get(key) != value}
        if wrong:
            details = ", ".join(f"{key}={have!r} (wanted {want!r})" for key, (have, want) in wrong.items())
            raise ConfigError(f"statistics of {self.label!r} were computed with {details}: recompute them for these "
                              "settings (python -m navil_utils.tiny.attention_statistics)")

    def summary(self):
        """One row per LLM layer: the headline numbers (means) of every table, blanking in the last columns."""
        import pandas as pd

        def pick(table, statistic, **where):
            rows = table[table["statistic"] == statistic]
            for column, value in where.items():
                rows = rows[rows[column].astype(str) == str(value)]
            return rows.set_index("layer")["mean"]

        out = pd.DataFrame({
            "visual share": pick(self.visual_share, "visual"),
            "uniform share": pick(self.visual_share, "visual_uniform"),
            "in box - uniform": pick(self.pointing, "attention - uniform", scale="all"),
            "distance ratio": pick(self.locality, "distance_ratio"),
        })
        out.index.name = "layer"
        return out


def model_meta(model: Any) -> dict[str, int]:
    """The encoder's shape and the parameter counts of a NaViL model (for :attr:`AttentionStatistics.meta`)."""
    from navil_utils.analysis.parameters import count_parameters

    vision, counts = model.config.vision_config, count_parameters(model)
    return {"vit_layers": vision.num_hidden_layers, "vit_width": vision.hidden_size,
            "vit_heads": vision.num_attention_heads, "encoder_parameters": counts.vision_encoder,
            "total_parameters": counts.total}


def models_overview(statistics: Sequence[AttentionStatistics]):
    """One row per model: its encoder (from ``meta``, see :func:`model_meta`) and its blanking accuracies."""
    import pandas as pd

    rows = {}
    for stats in statistics:
        overall = stats.blanking[stats.blanking["group"] == "overall"].set_index("condition")["accuracy"]
        rows[stats.label] = {"ViT layers x width": f"{stats.meta['vit_layers']} x {stats.meta['vit_width']}",
                             "encoder parameters": f"{stats.meta['encoder_parameters']:,}",
                             "all parameters": f"{stats.meta['total_parameters']:,}",
                             **{f"exact match, {c.replace('_', ' ')}": round(float(v), 3) for c, v in overall.items()}}
    return pd.DataFrame(rows).T


def comparison_table(statistics: Sequence[AttentionStatistics]):
    """:meth:`AttentionStatistics.summary` of several models side by side (columns: model, statistic)."""
    import pandas as pd

    if not statistics:
        raise ConfigError("no statistics given")
    return pd.concat([s.summary() for s in statistics], axis=1, keys=[s.label for s in statistics])


def summarise_attention(label: str, questions: Sequence[AttentionQuestion], blanking: BlankingResult,
                        locality_prompts: Sequence[PromptAttention], example: PromptAttention, *,
                        groups: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0,
                        meta: dict[str, Any] | None = None) -> AttentionStatistics:
    """Assemble :class:`AttentionStatistics` from already collected pieces (what chapter 04's section 5 computes)."""
    pointing = pointing_summary(pointing_by_layer(questions), n_boot=n_boot, seed=seed)
    return AttentionStatistics(
        label,
        visual_share=answer_share_table(questions, n_boot=n_boot, seed=seed),
        pointing=pointing[pointing["scale"] == "all"].reset_index(drop=True),
        locality=locality_table(locality_prompts, n_boot=n_boot, seed=seed),
        blanking=blanking_summary(blanking, groups=groups, n_boot=n_boot, seed=seed),
        example=torch.stack([example.matrix(layer) for layer in range(example.num_layers)]).float(),
        example_kinds=tuple(example.layout.kinds),
        meta=dict(meta or {}))


def record_prompts(model: Any, tokenizer: Any, samples: Sequence[Any]) -> list[PromptAttention]:
    """:func:`~navil_utils.analysis.attention_report.record_prompt` (LLM only) of each sample (``.image``,
    ``.question``)."""
    return [record_prompt(model, tokenizer, s.image, s.question, vit=False) for s in samples]


def attention_statistics(model: Any, tokenizer: Any, samples: Sequence[Any], example: Any, *, label: str,
                         batch_size: int = 32, locality_questions: int = 100, n_boot: int = 2000, seed: int = 0,
                         max_new_tokens: int = 8, meta: dict[str, Any] | None = None) -> AttentionStatistics:
    """Everything :class:`AttentionStatistics` holds, for one model on ``samples`` (SyntheticVQA samples: ``image``,
    ``question``, ``answer``, ``evidence_box``, ``qtype``, ``index``) and one ``example`` sample."""
    images, texts = [s.image for s in samples], [s.question for s in samples]
    indices = [s.index for s in samples]
    questions = collect_answer_attention(model, tokenizer, images, texts, [s.evidence_box for s in samples],
                                         batch_size=batch_size, indices=indices)
    blanking = blanking_check(model, tokenizer, images, texts, [s.answer for s in samples],
                              [s.evidence_box for s in samples], batch_size=batch_size,
                              max_new_tokens=max_new_tokens, seed=seed, indices=indices)
    prompts = record_prompts(model, tokenizer, samples[:locality_questions])
    example_prompt = record_prompt(model, tokenizer, example.image, example.question, vit=False)
    return summarise_attention(label, questions, blanking, prompts, example_prompt, groups=[s.qtype for s in samples],
                               n_boot=n_boot, seed=seed, meta={**model_meta(model), **(meta or {})})


def max_difference(a: AttentionStatistics, b: AttentionStatistics) -> float:
    """Largest absolute difference between two statistics' numbers (tables and example matrices); ``inf`` when their
    shapes or keys differ."""
    if a.example.shape != b.example.shape or a.example_kinds != b.example_kinds:
        return float("inf")
    worst = float((a.example - b.example).abs().max())
    for name in _TABLES:
        x, y = a.tables()[name], b.tables()[name]
        keys = [c for c in x.columns if c not in ("mean", "low", "high", "accuracy")]
        if len(x) != len(y) or list(x.columns) != list(y.columns) \
                or not (x[keys].astype(str).to_numpy() == y[keys].astype(str).to_numpy()).all():
            return float("inf")
        values = [c for c in ("mean", "low", "high", "accuracy") if c in x.columns]
        diff = np.abs(x[values].to_numpy(float) - y[values].to_numpy(float))
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
    return worst


# ---------------------------------------------------------------------------------------------------
# command line
