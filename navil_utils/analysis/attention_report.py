"""The aggregations behind chapter 04 (attention maps): one prompt recorded in full, the blocks of its token
sequence, and per-layer / per-group tables of the attention claims with bootstrap intervals.

Nothing here draws (the figures live in the plotting subpackage, module ``attention``).

    prompt = record_prompt(model, tokenizer, image, question)      # every LLM layer/head/row, every ViT layer
    layout_table(prompt.layout)                                    # token counts per block (text, scales, ...)
    prompt.matrix(layer)                                           # (T, T) head-mean attention of one layer
    prompt.maps(layer)                                             # the answer query's row, one ScaleMap per scale

    questions = collect_answer_attention(model, tokenizer, images, texts, boxes)
    answer_share_table(questions)                                  # visual share per layer vs uniform
    table = pointing_by_layer(questions)                           # pointing_table of every layer
    grouped_pointing_summary(pointing_by_group(questions, qtypes), "group")   # per question type
    sink_pointing_summary(questions, k=3)                          # pointing with and without sinks
    blanking_summary(result, groups=qtypes)                        # blanking accuracy per group

Long tables share one format: ``statistic, mean, low, high, n`` (percentile bootstrap over questions, see
:func:`~navil_utils.analysis.attention_claims.bootstrap_means`), plus the keys that identify a row (``layer``,
``scale``, ``group``, ``condition``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from navil_utils.analysis.attention import AttentionRecorder, TokenLayout
from navil_utils.analysis.attention_claims import (
    AttentionQuestion,
    BlankingResult,
    attention_share,
    bootstrap_means,
    pointing_summary,
    pointing_table,
)
from navil_utils.analysis.attention_maps import (
    Box,
    ScaleGeometry,
    ScaleMap,
    match_geometry,
    scale_geometries,
    scale_maps,
    vit_query_maps,
    vit_rollout,
)
from navil_utils.errors import ConfigError, ModelInputError

# ---------------------------------------------------------------------------------------------------
# blocks of a token sequence

#: Kinds that belong to one image-scale's block (its visual tokens, line breaks and closing frame break).
_SCALE_KINDS = ("visual", "line_break", "frame_break")
_BLOCK_LABELS = {"text": "text", "padding": "padding", "answer": "answer", "img_start": "<img>",
                 "img_end": "</img>"}


@dataclass(frozen=True)
class TokenBlock:
    """A run of consecutive LLM positions of one kind: ``[start, end)``.

    ``kind`` is ``"text"``, ``"padding"``, ``"answer"``, ``"img_start"``, ``"img_end"`` or ``"scale"`` (the
    visual tokens, line breaks and frame break of one image-scale); ``image``/``scale`` are ``-1`` where
    they do not apply; ``grid`` is a scale's ``(rows, cols)`` of merged tokens.
    """

    label: str
    kind: str
    start: int
    end: int
    image: int = -1
    scale: int = -1
    grid: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


def _block_key(layout: TokenLayout, position: int) -> tuple:
    kind = layout.kinds[position]
    if kind in _SCALE_KINDS:
        return ("scale", int(layout.image[position]), int(layout.scale[position]))
    if kind in ("img_start", "img_end"):
        return (kind, int(layout.image[position]), -1)
    return (kind, -1, -1)


def token_blocks(layout: TokenLayout) -> list[TokenBlock]:
    """The prompt as consecutive blocks: text, ``<img>``, one block per scale (smallest first), ``</img>``, …

    Scale blocks are labelled ``scale k`` (``image i · scale k`` when the prompt has several images).
    """
    if len(layout) == 0:
        return []
    images = {s.image for s in layout.scales}
    grids = {(s.image, s.scale): (s.rows, s.cols) for s in layout.scales}
    blocks: list[TokenBlock] = []
    start, key = 0, _block_key(layout, 0)
    for position in range(1, len(layout) + 1):
        next_key = _block_key(layout, position) if position < len(layout) else None
        if next_key == key:
            continue
        kind, image, scale = key
        if kind == "scale":
            label = f"scale {scale}" if len(images) < 2 else f"image {image} · scale {scale}"
            blocks.append(TokenBlock(label, kind, start, position, image, scale, grids[(image, scale)]))
        else:
            blocks.append(TokenBlock(_BLOCK_LABELS[kind], kind, start, position, image))
        start, key = position, next_key
    return blocks


def layout_table(layout: TokenLayout):
    """One row per :func:`token_blocks` block, plus a total (pandas DataFrame).

    Columns ``block, positions`` (``first–last``), ``tokens``, ``visual``, ``line_break``, ``frame_break`` and
    ``grid`` (``rows×cols`` merged tokens of a scale).
    """
    import pandas as pd

    records = []
    for block in token_blocks(layout):
        kinds = layout.kinds[block.start:block.end]
        records.append({"block": block.label, "positions": f"{block.start}–{block.end - 1}",
                        "tokens": block.length, "visual": kinds.count("visual"),
                        "line_break": kinds.count("line_break"), "frame_break": kinds.count("frame_break"),
                        "grid": f"{block.grid[0]}×{block.grid[1]}" if block.grid else ""})
    kinds = layout.kinds
    records.append({"block": "total", "positions": f"0–{len(layout) - 1}", "tokens": len(layout),
                    "visual": kinds.count("visual"), "line_break": kinds.count("line_break"),
                    "frame_break": kinds.count("frame_break"), "grid": ""})
    return pd.DataFrame(records)


def token_labels(layout: TokenLayout, tokens: Sequence[str]) -> list[str]:
    """A short human-readable label per LLM position (for menus): ``"87 text 'color'"``,
    ``"31 visual · scale 2 (1, 0)"``, ``"16 line_break · scale 0"``."""
    if len(tokens) != len(layout):
        raise ModelInputError(f"{len(tokens)} token strings for a layout of {len(layout)} positions")
    labels = []
    for position, (kind, text) in enumerate(zip(layout.kinds, tokens)):
        if kind == "visual":
            detail = f"scale {int(layout.scale[position])} ({int(layout.row[position])}, {int(layout.col[position])})"
        elif kind in ("line_break", "frame_break"):
            detail = f"scale {int(layout.scale[position])}"
        else:
            detail = repr(text)
        labels.append(f"{position} {kind} · {detail}" if kind != "text" else f"{position} text {detail}")
    return labels


# ---------------------------------------------------------------------------------------------------
# one prompt, recorded in full


@dataclass(frozen=True)
class PromptAttention:
    """Every LLM attention row of one prompt (all layers and heads) and its ViT recording.

    Attributes:
        layout, geometry: the prompt's :class:`~navil_utils.analysis.attention.TokenLayout` and its image's
            :class:`~navil_utils.analysis.attention_maps.ScaleGeometry` per scale.
        llm: ``(layers, heads, T, T)`` float32 causal attention probabilities (row = query, column = key).
        tokens: the decoded text of every position; input_ids: ``(T,)``.
        next_token: the token the last position predicts (the first token of the answer, greedy).
        recorder: the :class:`~navil_utils.analysis.attention.AttentionRecorder` (its ViT records, heads
            averaged, every row), for :meth:`vit_maps` and :meth:`rollout`; ``None`` without ViT recording.
    """

    layout: TokenLayout
    geometry: tuple[ScaleGeometry, ...]
    llm: torch.Tensor
    tokens: tuple[str, ...]
    input_ids: torch.Tensor
    next_token: str
    recorder: AttentionRecorder | None = None

    @property
    def num_layers(self) -> int:
        return int(self.llm.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.llm.shape[1])

    def _heads(self, layer: int, head: int | None) -> torch.Tensor:
        probs = self.llm[layer]
        return probs.mean(0) if head is None else probs[head]

    def matrix(self, layer: int, head: int | None = None) -> torch.Tensor:
        """``(T, T)`` attention of one layer: one head, or the mean over heads (``head=None``)."""
        return self._heads(layer, head)

    def row(self, layer: int, query: int = -1, head: int | None = None) -> torch.Tensor:
        """``(T,)`` attention row of one query position (default: the last one, which predicts the answer)."""
        return self._heads(layer, head)[query]

    def maps(self, layer: int, query: int = -1, head: int | None = None) -> list[ScaleMap]:
        """The query's attention on the image, one raster :class:`ScaleMap` per scale (smallest first)."""
        return scale_maps(self.row(layer, query, head), self.layout, geometry=self.geometry)

    def _vit_recorder(self) -> AttentionRecorder:
        if self.recorder is None or not self.recorder.vit_layers:
            raise ConfigError("this prompt was recorded without the ViT: record_prompt(..., vit=True)")
        return self.recorder

    @property
    def vit_layers(self) -> list[int]:
        return list(self._vit_recorder().vit_layers)

    def vit_maps(self, patch: tuple[int, int, int]) -> dict[int, ScaleMap]:
        """ViT layer → the attention of one query patch ``(scale, patch_row, patch_col)`` over its scale's patches
        (heads averaged)."""
        recorder = self._vit_recorder()
        return {layer: vit_query_maps(recorder, self.layout, layer, [patch], geometry=self.geometry)[0]
                for layer in recorder.vit_layers}

    def rollout(self, patches: Sequence[tuple[int, int, int]] | None = None, residual: float = 0.5) -> list[ScaleMap]:
        """Attention rollout over all ViT layers, one map per scale: the rollout row of that scale's patch in
        ``patches`` (``(scale, row, col)``, one per scale), or the mean row of every patch (``None``)."""
        rollouts = vit_rollout(self._vit_recorder(), self.layout, residual=residual, geometry=self.geometry)
        if patches is None:
            return [r.map() for r in rollouts]
        by_scale = {int(scale): (int(row), int(col)) for scale, row, col in patches}
        return [r.map([by_scale[r.scale]]) if r.scale in by_scale else r.map() for r in rollouts]


@torch.inference_mode()
def record_prompt(model: Any, tokenizer: Any, image: Any, question: str, *, vit: bool = True) -> PromptAttention:
    """Run one prompt (the checkpoint's chat format, as :func:`navil_utils.chat` builds it) once and record every
    LLM layer, head and query row, and — with ``vit`` — every ViT layer (heads averaged, all rows).

    Recording does not change the model's outputs (see :class:`~navil_utils.analysis.attention.AttentionRecorder`).
    """
    from navil_utils.processing.processor import NaViLProcessor

    processor = NaViLProcessor.from_config(model, tokenizer)
    pre = processor.preprocess(image)
    if pre is None or pre.num_images != 1:
        raise ModelInputError("record_prompt needs exactly one image")
    inputs = processor([pre], [question])
    layout = TokenLayout.from_model(model, inputs.input_ids[0], inputs.image_grid_thw)
    geometry = tuple(match_geometry(layout, 0, scale_geometries(pre)))
    weight = model.get_input_embeddings().weight
    moved = inputs.to(weight.device, weight.dtype)
    moved.pixel_values = moved.pixel_values.to(next(model.vision_model.parameters()).device)
    with AttentionRecorder(model, llm_layers="all", vit_layers="all" if vit else None, heads="all",
                           vit_heads="mean", queries="all", dtype=torch.float32) as recorder:
        output = model(**moved.generate_kwargs(), logits_to_keep=1)
    llm = torch.stack([recorder.llm_map(layer) for layer in recorder.llm_layers])
    ids = inputs.input_ids[0]
    tokens = tuple(tokenizer.decode([int(i)]) for i in ids)
    next_token = tokenizer.decode([int(output.logits[0, -1].argmax())])
    return PromptAttention(layout, geometry, llm, tokens, ids, next_token, recorder if vit else None)


def box_centre_patches(geometry: Sequence[ScaleGeometry], box: Box, merge_size: int) -> list[tuple[int, int, int]]:
    """``(scale, patch_row, patch_col)`` of the ViT patch under the centre of ``box`` on every scale."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    out = []
    for geo in geometry:
        patches = geo.at_patches(merge_size)
        height, width = patches.cell_hw
        row = min(max(int(cy // height), 0), patches.rows - 1)
        col = min(max(int(cx // width), 0), patches.cols - 1)
        out.append((geo.scale, row, col))
    return out


# ---------------------------------------------------------------------------------------------------
# statistics over many questions


def _long(records: list[dict[str, Any]], names: Sequence[str], values: np.ndarray, *, n_boot: int,
          confidence: float, seed: int, **keys: Any) -> None:
    mean, low, high = bootstrap_means(values, n_boot=n_boot, confidence=confidence, seed=seed)
    for k, name in enumerate(names):
        records.append({**keys, "statistic": name, "mean": float(mean[k]), "low": float(low[k]),
                        "high": float(high[k]), "n": int(np.isfinite(values[:, k]).sum())})


SHARE_STATISTICS = ("visual", "text", "markers", "visual_uniform", "visual - uniform")


def answer_share_table(questions: Sequence[AttentionQuestion], layers: Sequence[int] | None = None, *,
                       n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Per layer: how the answer query splits its attention between visual tokens, text and the image-span markers,
    and the visual share of a uniform row over the same keys (pandas DataFrame, long format).

    ``statistic`` is one of :data:`SHARE_STATISTICS`; ``visual - uniform`` is paired per question.
    """
    import pandas as pd

    if not questions:
        raise ConfigError("no questions given")
    chosen = sorted(questions[0].rows) if layers is None else list(layers)
    records: list[dict[str, Any]] = []
    for layer in chosen:
        values = np.empty((len(questions), len(SHARE_STATISTICS)))
        for i, question in enumerate(questions):
            row = question.rows[layer].float()
            shares = attention_share(row[None, None, :], torch.tensor([row.shape[-1] - 1]), question.layout)
            visual, uniform = float(shares["visual"][0, 0]), float(shares["visual_uniform"][0])
            values[i] = (visual, float(shares["text"][0, 0]), float(shares["markers"][0, 0]), uniform,
                         visual - uniform)
        _long(records, SHARE_STATISTICS, values, n_boot=n_boot, confidence=confidence, seed=seed, layer=layer)
    return pd.DataFrame(records)


def pointing_by_layer(questions: Sequence[AttentionQuestion], layers: Sequence[int] | None = None, *,
                      shuffle_seed: int = 0):
    """:func:`~navil_utils.analysis.attention_claims.pointing_table` of every (chosen) layer, concatenated."""
    import pandas as pd

    chosen = sorted(questions[0].rows) if layers is None else list(layers)
    return pd.concat([pointing_table(questions, layer, shuffle_seed=shuffle_seed) for layer in chosen],
                     ignore_index=True)


def pointing_by_group(questions: Sequence[AttentionQuestion], groups: Sequence[str],
                      layers: Sequence[int] | None = None, *, shuffle_seed: int = 0):
    """Pointing tables of each group of questions (``groups[q]`` = the label of question ``q``) computed *within* the
    group, so that the ``shuffled`` baseline borrows the box of another question of the same group (a colour
    question gets another colour question's box, not a count question's much larger one).  Concatenated, with a
    ``group`` column; ``question`` still indexes ``questions``."""
    import pandas as pd

    if len(groups) != len(questions):
        raise ModelInputError(f"{len(groups)} group labels for {len(questions)} questions")
    parts = []
    for label in dict.fromkeys(groups):
        members = [q for q, g in enumerate(groups) if g == label]
        table = pointing_by_layer([questions[q] for q in members], layers, shuffle_seed=shuffle_seed)
        table["question"] = [members[q] for q in table["question"]]
        table.insert(0, "group", label)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def scale_roles(table) -> list[str]:
    """Per row of a pointing table: ``"all"``, ``"smallest"``, ``"largest"``, ``"middle"`` (a scale between them)
    or ``"only"`` (the single scale of a one-scale image)."""
    per_question = {}
    for question, scale in zip(table["question"], table["scale"]):
        if scale != "all":
            per_question[question] = max(per_question.get(question, 0), int(scale))
    roles = []
    for question, scale in zip(table["question"], table["scale"]):
        if scale == "all":
            roles.append("all")
        elif per_question[question] == 0:
            roles.append("only")
        elif int(scale) == 0:
            roles.append("smallest")
        elif int(scale) == per_question[question]:
            roles.append("largest")
        else:
            roles.append("middle")
    return roles


def grouped_pointing_summary(table, column: str, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
    """:func:`~navil_utils.analysis.attention_claims.pointing_summary` of each group of ``table[column]``, with a
    ``group`` column first (groups in order of appearance)."""
    import pandas as pd

    if column not in table:
        raise ConfigError(f"the table has no column {column!r}")
    parts = []
    for label in dict.fromkeys(table[column]):
        summary = pointing_summary(table[table[column] == label], n_boot=n_boot, confidence=confidence, seed=seed)
        summary.insert(0, "group", label)
        parts.append(summary)
    return pd.concat(parts, ignore_index=True)


def top_visual_tokens(question: AttentionQuestion, layer: int, k: int) -> torch.Tensor:
    """The ``k`` visual tokens of the question's image with the most answer-query attention (LLM positions) — the
    sinks of :func:`~navil_utils.analysis.attention_claims.attention_sinks` (same order, same ties)."""
    layout = question.layout
    positions = (layout.kind_mask("visual") & (layout.image == question.image) & (layout.frame == 0)).nonzero()
    positions = positions.reshape(-1)
    weights = question.rows[layer].float()[positions].double().numpy()
    top = np.argsort(-weights, kind="stable")[:min(k, weights.size)]
    return positions[torch.as_tensor(top, dtype=torch.long)]


SINK_STATISTICS = ("attention", "attention without sinks", "uniform", "uniform without sinks",
                   "attention - uniform (without sinks)", "sink mass")


def sink_pointing_summary(questions: Sequence[AttentionQuestion], layers: Sequence[int] | None = None, k: int = 3, *,
                          n_boot: int = 2000, confidence: float = 0.95, seed: int = 0, shuffle_seed: int = 0):
    """Pointing (all scales) with and without each question's ``k`` most attended visual tokens, per layer, with
    bootstrap intervals (long format; ``sink mass`` = the sinks' share of the visual attention)."""
    import pandas as pd

    if not questions:
        raise ConfigError("no questions given")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    chosen = sorted(questions[0].rows) if layers is None else list(layers)
    records: list[dict[str, Any]] = []
    for layer in chosen:
        sinks = [top_visual_tokens(q, layer, k) for q in questions]
        full = pointing_table(questions, layer, shuffle_seed=shuffle_seed)
        without = pointing_table(questions, layer, shuffle_seed=shuffle_seed, exclude=sinks)
        full = full[full["scale"] == "all"].sort_values("question")
        without = without[without["scale"] == "all"].sort_values("question")
        mass = []
        for question, sink in zip(questions, sinks):
            layout = question.layout
            visual = layout.kind_mask("visual") & (layout.image == question.image) & (layout.frame == 0)
            row = question.rows[layer].double()
            total = float(row[visual].sum())
            mass.append(float(row[sink].sum()) / total if total > 0 else float("nan"))
        values = np.stack([full["attention"].to_numpy(float), without["attention"].to_numpy(float),
                           full["uniform"].to_numpy(float), without["uniform"].to_numpy(float),
                           without["attention"].to_numpy(float) - without["uniform"].to_numpy(float),
                           np.asarray(mass)], axis=1)
        _long(records, SINK_STATISTICS, values, n_boot=n_boot, confidence=confidence, seed=seed, layer=layer, k=k)
    return pd.DataFrame(records)


def blanking_summary(result: BlankingResult, groups: Sequence[str] | Mapping[int, str] | None = None, *,
                     n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Exact-match accuracy per blanking condition with bootstrap intervals, for all questions (group
    ``"overall"``) and per group (``groups[q]`` = the label of question ``q``, e.g. its type).  Columns
    ``group, condition, accuracy, low, high, n``; the conditions of one group are resampled together (paired)."""
    import pandas as pd

    records = result.records
    labels = None
    if groups is not None:
        labels = [groups[int(q)] for q in records["question"]]
    parts = [("overall", np.ones(len(records), dtype=bool))]
    if labels is not None:
        parts += [(label, np.asarray([x == label for x in labels])) for label in dict.fromkeys(labels)]
    rows = []
    for label, keep in parts:
        values = np.stack([records[f"{c}_correct"].to_numpy(dtype=float)[keep] for c in result.conditions], axis=1)
        mean, low, high = bootstrap_means(values, n_boot=n_boot, confidence=confidence, seed=seed)
        for k, condition in enumerate(result.conditions):
            rows.append({"group": label, "condition": condition, "accuracy": float(mean[k]), "low": float(low[k]),
                         "high": float(high[k]), "n": int(keep.sum())})
    return pd.DataFrame(rows)


def wide(summary, index: str | Sequence[str], *, digits: int = 3, columns: str = "statistic"):
    """A long summary as a readable table: one row per ``index``, one ``mean [low, high]`` cell per statistic
    (values rounded to ``digits``)."""
    value = "accuracy" if "accuracy" in summary and "mean" not in summary else "mean"
    cells = summary.assign(cell=[f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                                 for m, lo, hi in zip(summary[value], summary["low"], summary["high"])])
    index = [index] if isinstance(index, str) else list(index)
    out = cells.pivot(index=index, columns=columns, values="cell")
    order = list(dict.fromkeys(summary[columns]))
    rows = list(dict.fromkeys(map(tuple, summary[index].to_numpy().tolist())))
    out = out[order]
    out = out.loc[[r[0] for r in rows]] if len(index) == 1 else out.loc[rows]
    out.columns.name = None
    return out
