"""Claims about where a NaViL model looks, measured: visual attention share per layer, energy-based pointing
at the evidence box (with baselines and bootstrap intervals), attention sinks, and a causal blanking check.

Everything returns pandas DataFrames or dataclasses; nothing here draws.

    questions = collect_answer_attention(model, tokenizer, images, texts, boxes)   # one forward per batch
    table = pointing_table(questions, layer=-1)          # one row per question and scale (+ "all")
    pointing_summary(table)                              # means, bootstrap CIs, paired differences
    attention_sinks(questions, k=5)                      # per layer: where the top-k visual tokens sit
    blanking_check(model, tokenizer, images, texts, answers, boxes).summary()

*Pointing statistic* (energy-based pointing game): of the answer query's attention on the image's visual
tokens, the share inside the evidence box, ``E = Σ_v a_v·o_v / Σ_v a_v`` — ``o_v`` is the fraction of the
token's pixel cell (:meth:`~navil_utils.analysis.attention_maps.ScaleGeometry.cell_box`, padding part
included) that lies in the box.  Baselines: ``area`` (box area / image area), ``uniform`` (``E`` of a
uniform map over the same visual tokens: the mean ``o_v``, which also accounts for padding cells) and
``shuffled`` (``E`` with the box of another question, moved to this image in relative coordinates).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from navil_utils.analysis.attention import AttentionRecorder, LayerSpec, TokenLayout
from navil_utils.analysis.attention_maps import Box, ScaleGeometry, match_geometry, scale_geometries
from navil_utils.errors import ConfigError, ModelInputError

#: Token kinds grouped for :func:`visual_attention_share`.
SHARE_GROUPS: dict[str, tuple[str, ...]] = {
    "visual": ("visual",),
    "text": ("text", "answer"),
    "markers": ("img_start", "line_break", "frame_break", "img_end"),
    "padding": ("padding",),
}


# ---------------------------------------------------------------------------------------------------
# visual attention share


def _group_masks(layout: TokenLayout, keys: int) -> dict[str, torch.Tensor]:
    if keys > len(layout):
        raise ModelInputError(f"attention rows have {keys} keys but the layout only {len(layout)} positions: build "
                              "the layout from the full sequence (prompt + generated ids, answer_start=prompt length)")
    kinds = layout.kinds[:keys]
    return {group: torch.tensor([k in members for k in kinds], dtype=torch.float32)
            for group, members in SHARE_GROUPS.items()}


def attention_share(probs: torch.Tensor, positions: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
    """Share of each attention row's mass per token group, and the visual share of a uniform row.

    Args:
        probs: ``(heads', R, K)`` attention rows (``K`` keys = positions ``0 … K-1`` of the layout).
        positions: ``(R,)`` the rows' query positions (for the causal uniform baseline).
    Returns:
        ``{group: (heads', R)}`` for the groups of :data:`SHARE_GROUPS` (they sum to one per row), plus
        ``"visual_uniform"`` ``(R,)``: the visual share a row spreading evenly over its non-padding keys
        ``≤ position`` would have.
    """
    probs = torch.as_tensor(probs).float()
    if probs.ndim != 3:
        raise ModelInputError(f"probs must be (heads, rows, keys), got shape {tuple(probs.shape)}")
    masks = _group_masks(layout, probs.shape[-1])
    out = {group: probs @ mask for group, mask in masks.items()}
    positions = torch.as_tensor(positions).long().reshape(-1)
    if positions.numel() != probs.shape[1]:
        raise ModelInputError(f"{positions.numel()} positions for {probs.shape[1]} rows")
    allowed = (torch.arange(probs.shape[-1])[None, :] <= positions[:, None]).float() * (1 - masks["padding"])
    out["visual_uniform"] = (allowed @ masks["visual"]) / allowed.sum(-1).clamp_min(1)
    return out


def visual_attention_share(recorder: AttentionRecorder, layout: TokenLayout, *, layers: LayerSpec = None,
                           batch: int = 0, call: int | None = None, positions: Sequence[int] | None = None,
                           per_head: bool = False):
    """Per recorded LLM layer: how the chosen query rows split their attention between visual tokens, text
    and the image-span markers (pandas DataFrame).

    Args:
        recorder: an :class:`~navil_utils.analysis.attention.AttentionRecorder` after the run.
        layout: the layout of prompt ``batch`` (for ``generate`` runs, of prompt + generated ids).
        layers: recorded layers to report (default: all recorded).
        call: one recorded call (0 = prefill); ``None`` stacks all calls (prefill rows, then decoding rows).
        positions: keep only rows at these query positions (default: every recorded row).
        per_head: one row per head instead of the mean over heads (a ``"mean"`` recording has one "head").
    Returns:
        Columns ``layer, head, rows`` (number of query rows), ``visual, text, markers, padding`` (mean share
        over rows; per head, then averaged over heads), ``visual_uniform`` (the uniform-attention visual
        share of the same rows) and ``visual_ratio = visual / visual_uniform``.
    """
    import pandas as pd

    llm = getattr(recorder, "_llm", None)
    count = llm.config.num_hidden_layers if llm is not None else 0
    chosen = recorder.llm_layers if layers is None else (
        [layers] if isinstance(layers, int) else list(layers))
    chosen = [int(layer) + count if int(layer) < 0 else int(layer) for layer in chosen]
    records = []
    for layer in chosen:
        if call is None:
            probs, rows = recorder.llm_rows(layer, batch)
        else:
            probs = recorder.llm_map(layer, call, batch)
            rows = recorder.llm[layer][call].query_positions
        if positions is not None:
            keep = torch.isin(rows, torch.as_tensor(list(positions), dtype=torch.long))
            if not bool(keep.any()):
                raise ConfigError(f"none of the positions {list(positions)} was recorded in layer {layer}")
            probs, rows = probs[:, keep], rows[keep]
        shares = attention_share(probs, rows, layout)
        uniform = float(shares["visual_uniform"].mean())
        heads = range(probs.shape[0]) if per_head else [None]
        for head in heads:
            entry = {"layer": layer, "head": "mean" if head is None else int(head), "rows": int(rows.numel())}
            for group in SHARE_GROUPS:
                values = shares[group]
                entry[group] = float(values.mean() if head is None else values[head].mean())
            entry["visual_uniform"] = uniform
            entry["visual_ratio"] = entry["visual"] / uniform if uniform > 0 else float("nan")
            records.append(entry)
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------------
# per-question attention of the answer query


@dataclass(frozen=True)
class AttentionQuestion:
    """One question's attention of the answer query, with what is needed to read it.

    Attributes:
        layout: the prompt's layout (left padding included as ``"padding"``).
        geometry: the image's token-level :class:`~navil_utils.analysis.attention_maps.ScaleGeometry` per scale.
        rows: LLM layer → ``(K,)`` float32 attention row (heads averaged) of the answer query: the last prompt
            position, whose output predicts the answer's first token.
        box: the evidence box ``(x0, y0, x1, y1)`` in original-image pixels (``None`` if unknown).
        image: the image of the prompt the box refers to.
        index: an identifier (e.g. the sample index).
    """

    layout: TokenLayout
    geometry: tuple[ScaleGeometry, ...]
    rows: dict[int, torch.Tensor]
    box: Box | None = None
    image: int = 0
    index: int | None = None

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.geometry[0].original_hw


def _devices(model: Any) -> tuple[torch.device, torch.dtype, torch.device]:
    """(device of the input embeddings, floating dtype, device of the ViT)."""
    weight = model.get_input_embeddings().weight
    vision = next(model.vision_model.parameters(), weight)
    return weight.device, weight.dtype, vision.device


def _prepare(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str]):
    """Preprocess one image per question, build the left-padded batch and its layouts/geometries."""
    pre = [processor.preprocess(image) for image in images]
    if any(p is None or p.num_images != 1 for p in pre):
        raise ModelInputError("each question needs exactly one image")
    inputs = processor(pre, list(questions))
    layouts = TokenLayout.build_batch(inputs.input_ids, inputs.image_grid_thw, attention_mask=inputs.attention_mask,
                                      **TokenLayout.model_settings(model))
    geometries = [tuple(match_geometry(layout, 0, scale_geometries(p))) for layout, p in zip(layouts, pre)]
    device, dtype, vision_device = _devices(model)
    moved = inputs.to(device, dtype)
    moved.pixel_values = moved.pixel_values.to(vision_device)
    return moved, layouts, geometries


def _check_lengths(**named: Sequence[Any] | None) -> int:
    lengths = {name: len(values) for name, values in named.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ModelInputError(f"inputs of different lengths: {lengths}")
    return next(iter(lengths.values()), 0)


@torch.inference_mode()
def collect_answer_attention(model: Any, tokenizer: Any, images: Sequence[Any], questions: Sequence[str],
                             boxes: Sequence[Box] | None = None, *, layers: LayerSpec = "all", batch_size: int = 8,
                             indices: Sequence[Any] | None = None) -> list[AttentionQuestion]:
    """Record the answer query's attention (last prompt position, heads averaged) for each question.

    One prefill forward per batch of ``batch_size`` questions (left-padded prompts from the checkpoint's
    :class:`~navil_utils.processing.processor.NaViLProcessor`), recorded with
    ``AttentionRecorder(queries="last", heads="mean")``; the model's outputs are unchanged.

    Args:
        images: one image per question (path, PIL image, array or ``MultiScaleInputs``).
        boxes: evidence boxes in original-image pixels (optional).
        layers: LLM layers to record.
    """
    from navil_utils.processing.processor import NaViLProcessor

    count = _check_lengths(images=images, questions=questions, boxes=boxes, indices=indices)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    processor = NaViLProcessor.from_config(model, tokenizer)
    out: list[AttentionQuestion] = []
    for begin in range(0, count, batch_size):
        chunk = range(begin, min(count, begin + batch_size))
        inputs, layouts, geometries = _prepare(model, processor, [images[i] for i in chunk],
                                               [questions[i] for i in chunk])
        with AttentionRecorder(model, llm_layers=layers, heads="mean", queries="last", record_decoding=False,
                               dtype=torch.float32) as recorder:
            model(**inputs.generate_kwargs(), logits_to_keep=1)
        for b, i in enumerate(chunk):
            rows = {layer: calls[0].probs[b, 0, 0].clone() for layer, calls in recorder.llm.items()}
            out.append(AttentionQuestion(layouts[b], geometries[b], rows, None if boxes is None else tuple(boxes[i]),
                                         0, i if indices is None else indices[i]))
    return out


# ---------------------------------------------------------------------------------------------------
# pointing


@dataclass(frozen=True)
class _Tokens:
    """Visual tokens of one image of one question: LLM positions and per-token geometry facts."""

    positions: torch.Tensor      # (n,) LLM positions
    scale: np.ndarray            # (n,) scale index (prompt order)
    row: np.ndarray
    col: np.ndarray
    image_fraction: np.ndarray   # (n,) share of the cell that is image
    border: np.ndarray           # (n,) bool: on the border of its scale grid
    first: np.ndarray            # (n,) bool: the image's first visual token (first <IMG_CONTEXT>)


def _tokens(question: AttentionQuestion) -> _Tokens:
    layout, image = question.layout, question.image
    geometry = match_geometry(layout, image, question.geometry)
    visual = layout.kind_mask("visual") & (layout.image == image) & (layout.frame == 0)
    positions = visual.nonzero().reshape(-1)
    scale = layout.scale[positions].numpy()
    row, col = layout.row[positions].numpy(), layout.col[positions].numpy()
    fraction = np.empty(positions.numel())
    border = np.empty(positions.numel(), dtype=bool)
    for geo in geometry:
        here = scale == geo.scale
        fraction[here] = geo.image_fraction()[row[here], col[here]]
        border[here] = (row[here] == 0) | (col[here] == 0) | (row[here] == geo.rows - 1) | (col[here] == geo.cols - 1)
    first = np.zeros(positions.numel(), dtype=bool)
    if positions.numel():
        first[int(np.argmin(layout.visual_index[positions].numpy()))] = True
    return _Tokens(positions, scale, row, col, fraction, border, first)


def _overlaps(question: AttentionQuestion, tokens: _Tokens, box: Box) -> np.ndarray:
    """``(n,)`` overlap fraction of every visual token's cell with ``box``."""
    out = np.empty(tokens.positions.numel())
    for geo in match_geometry(question.layout, question.image, question.geometry):
        here = tokens.scale == geo.scale
        out[here] = geo.overlap_fraction(box)[tokens.row[here], tokens.col[here]]
    return out


def _box_area_share(box: Box, image_hw: tuple[int, int]) -> float:
    height, width = image_hw
    x0, y0, x1, y1 = box
    w = max(0.0, min(x1, width) - max(x0, 0.0))
    h = max(0.0, min(y1, height) - max(y0, 0.0))
    return w * h / (width * height)


def _moved_box(box: Box, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> Box:
    """``box`` of a ``source_hw`` image in relative coordinates, placed on a ``target_hw`` image."""
    sy, sx = target_hw[0] / source_hw[0], target_hw[1] / source_hw[1]
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def _row(question: AttentionQuestion, layer: int) -> torch.Tensor:
    if layer not in question.rows:
        raise ConfigError(f"layer {layer} was not recorded for this question; recorded layers: {sorted(question.rows)}")
    return question.rows[layer]


def _resolve_layer(questions: Sequence[AttentionQuestion], layer: int) -> int:
    """A recorded layer index; negative indices count from the end when every layer ``0 … n-1`` was recorded."""
    layers = sorted(questions[0].rows)
    if layer in layers:
        return layer
    if layer < 0 and layers == list(range(len(layers))) and -len(layers) <= layer:
        return layers[layer]
    raise ConfigError(f"layer {layer} was not recorded; recorded layers: {layers}")


def _energy(weights: np.ndarray, overlaps: np.ndarray) -> float:
    total = weights.sum()
    return float((weights * overlaps).sum() / total) if total > 0 else float("nan")


def shuffled_partners(count: int, seed: int = 0) -> np.ndarray:
    """A random derangement of ``0 … count-1`` (question ``i`` borrows the box of question ``partner[i]``);
    ``-1`` everywhere for fewer than two questions."""
    if count < 2:
        return np.full(count, -1)
    order = np.random.default_rng(seed).permutation(count)
    partner = np.empty(count, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def pointing_table(questions: Sequence[AttentionQuestion], layer: int = -1, *, shuffle_seed: int = 0,
                   exclude: Sequence[Sequence[int] | torch.Tensor] | None = None):
    """Energy-based pointing of the answer query at the evidence box, per question and scale (DataFrame).

    One row per question for ``scale="all"`` (every visual token of the image) and one per scale (that scale's
    tokens only).  Columns:

    * ``attention`` — ``E = Σ a_v·o_v / Σ a_v`` over the row's tokens (see the module doc);
    * ``uniform`` — ``E`` of a uniform row (mean ``o_v``); ``area`` — box area / image area (same for all
      scales); ``shuffled`` — ``E`` with the box of another question (a seeded derangement), moved to this
      image in relative coordinates (NaN with a single question);
    * ``mass_share`` — the scale's share of the row's visual mass (1 for ``"all"``): small vs large scale;
    * ``question``, ``index``, ``layer``, ``scale``, ``grid``, ``tokens``.

    ``exclude[q]`` lists LLM positions of question ``q`` to leave out (e.g. attention sinks): they count
    neither in the attention nor in the uniform baseline.
    """
    import pandas as pd

    if not questions:
        raise ConfigError("no questions given")
    if exclude is not None and len(exclude) != len(questions):
        raise ModelInputError(f"exclude has {len(exclude)} entries for {len(questions)} questions")
    if any(q.box is None for q in questions):
        raise ModelInputError("every question needs an evidence box for the pointing statistic")
    layer = _resolve_layer(questions, layer)
    partners = shuffled_partners(len(questions), shuffle_seed)
    records = []
    for q_index, question in enumerate(questions):
        tokens = _tokens(question)
        row = _row(question, layer).float()
        if int(tokens.positions[-1]) >= row.shape[-1]:
            raise ModelInputError(f"question {q_index}: the attention row is shorter than the prompt's image span")
        weights = row[tokens.positions].double().numpy()
        keep = np.ones(weights.shape, dtype=bool)
        if exclude is not None:
            keep = ~np.isin(tokens.positions.numpy(), np.asarray(torch.as_tensor(exclude[q_index]).reshape(-1)))
        weights = np.where(keep, weights, 0.0)
        overlaps = _overlaps(question, tokens, question.box)
        partner = int(partners[q_index])
        shuffled = None
        if partner >= 0:
            other = questions[partner]
            shuffled = _overlaps(question, tokens, _moved_box(other.box, other.image_hw, question.image_hw))
        area = _box_area_share(question.box, question.image_hw)
        total = weights.sum()
        scales = ["all"] + [geo.scale for geo in question.geometry]
        for scale in scales:
            here = keep.copy() if scale == "all" else keep & (tokens.scale == scale)
            grid = None if scale == "all" else question.geometry[scale].grid
            records.append({
                "question": q_index, "index": question.index, "layer": layer, "scale": scale, "grid": grid,
                "tokens": int(here.sum()),
                "attention": _energy(weights[here], overlaps[here]),
                "uniform": float(overlaps[here].mean()) if here.any() else float("nan"),
                "area": area,
                "shuffled": _energy(weights[here], shuffled[here]) if shuffled is not None else float("nan"),
                "mass_share": float(weights[here].sum() / total) if total > 0 else float("nan"),
            })
    return pd.DataFrame(records)


def bootstrap_means(values: np.ndarray, *, n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap over rows (questions) of column means.

    ``values (n, k)`` (NaNs ignored in each mean) → ``(mean (k,), low (k,), high (k,))``; the same resampled rows
    serve every column, so differences of columns are paired.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if not 0 < confidence < 1 or n_boot < 1:
        raise ConfigError(f"need 0 < confidence < 1 and n_boot >= 1, got {confidence}, {n_boot}")
    n = values.shape[0]
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        mean = np.nanmean(values, axis=0) if n else np.full(values.shape[1], np.nan)
        if n == 0:
            return mean, mean.copy(), mean.copy()
        picks = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        boot = np.nanmean(values[picks], axis=1)                       # (n_boot, k)
        tail = (1 - confidence) / 2
        low, high = np.nanquantile(boot, [tail, 1 - tail], axis=0)
    return mean, low, high


class _quiet_nanmean:
    """Silence numpy's "mean of empty slice" warnings inside a block (all-NaN columns give NaN)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


POINTING_STATISTICS = ("attention", "uniform", "area", "shuffled", "mass_share")


def pointing_summary(table, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Means over questions with percentile-bootstrap intervals (questions resampled), per layer and scale.

    ``table`` is one :func:`pointing_table` (or several concatenated, with different ``layer`` values).
    Long format: ``layer, scale, statistic, mean, low, high, n`` for the statistics of the table and the
    paired differences ``attention - uniform``, ``attention - shuffled``, ``attention - area``.
    """
    import pandas as pd

    records = []
    for (layer, scale), group in table.groupby(["layer", table["scale"].astype(str)], sort=False):
        group = group.sort_values("question")
        columns = {name: group[name].to_numpy(dtype=float) for name in POINTING_STATISTICS}
        for base in ("uniform", "shuffled", "area"):
            columns[f"attention - {base}"] = columns["attention"] - columns[base]
        names = list(columns)
        mean, low, high = bootstrap_means(np.stack([columns[n] for n in names], axis=1), n_boot=n_boot,
                                          confidence=confidence, seed=seed)
        for k, name in enumerate(names):
            records.append({"layer": layer, "scale": scale, "statistic": name, "mean": mean[k], "low": low[k],
                            "high": high[k], "n": int(np.isfinite(columns[name]).sum())})
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------------
# attention sinks


def attention_sinks(questions: Sequence[AttentionQuestion], layers: Sequence[int] | None = None, k: int = 5, *,
                    sink_rows: Sequence[dict[int, torch.Tensor]] | None = None, shuffle_seed: int = 0):
    """Where each layer's top-``k`` attended visual tokens sit, and pointing without them (DataFrame).

    Per question and layer the *sinks* are the ``k`` visual tokens of the image with the most attention in the
    question's answer row (or in ``sink_rows[q][layer]``, e.g. the mean row of the question's text tokens,
    for sinks that do not depend on the answer query).  Columns, averaged over questions:

    * ``topk_mass`` — the sinks' share of the row's visual attention;
    * ``border`` / ``border_baseline`` — share of sinks on the border (first/last row or column) of their scale
      grid / share of all visual tokens that are;
    * ``first`` / ``first_baseline`` — share of questions whose sinks include the image's first visual token
      / ``k`` over the number of visual tokens (chance);
    * ``padding`` / ``padding_baseline`` — share of sinks / of all tokens whose cell is partly zero padding;
    * ``smallest_scale`` / ``largest_scale`` — share of sinks on the smallest / largest scale;
    * ``pointing``, ``pointing_without_sinks``, ``uniform``, ``uniform_without_sinks`` — the ``"all"``-scales
      :func:`pointing_table` statistics with and without the sinks (needs boxes; NaN otherwise).
    """
    import pandas as pd

    if not questions:
        raise ConfigError("no questions given")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if sink_rows is not None and len(sink_rows) != len(questions):
        raise ModelInputError(f"sink_rows has {len(sink_rows)} entries for {len(questions)} questions")
    chosen = sorted(questions[0].rows) if layers is None else [_resolve_layer(questions, layer) for layer in layers]
    token_info = [_tokens(q) for q in questions]
    have_boxes = all(q.box is not None for q in questions)
    records = []
    for layer in chosen:
        stats: dict[str, list[float]] = {name: [] for name in (
            "topk_mass", "border", "border_baseline", "first", "first_baseline", "padding", "padding_baseline",
            "smallest_scale", "largest_scale")}
        sinks: list[torch.Tensor] = []
        for q_index, (question, tokens) in enumerate(zip(questions, token_info)):
            source = _row(question, layer) if sink_rows is None else sink_rows[q_index][layer]
            weights = source.float()[tokens.positions].double().numpy()
            top = np.argsort(-weights, kind="stable")[:min(k, weights.size)]
            answer = _row(question, layer).float()[tokens.positions].double().numpy()
            stats["topk_mass"].append(float(answer[top].sum() / answer.sum()) if answer.sum() > 0 else float("nan"))
            stats["border"].append(float(tokens.border[top].mean()))
            stats["border_baseline"].append(float(tokens.border.mean()))
            stats["first"].append(float(tokens.first[top].any()))
            stats["first_baseline"].append(min(1.0, len(top) / weights.size))
            partial = tokens.image_fraction < 1.0
            stats["padding"].append(float(partial[top].mean()))
            stats["padding_baseline"].append(float(partial.mean()))
            stats["smallest_scale"].append(float((tokens.scale[top] == tokens.scale.min()).mean()))
            stats["largest_scale"].append(float((tokens.scale[top] == tokens.scale.max()).mean()))
            sinks.append(tokens.positions[torch.as_tensor(top, dtype=torch.long)])
        entry: dict[str, Any] = {"layer": layer, "k": k, "n": len(questions)}
        entry.update({name: float(np.mean(values)) for name, values in stats.items()})
        if have_boxes:
            with_sinks = pointing_table(questions, layer, shuffle_seed=shuffle_seed)
            without = pointing_table(questions, layer, shuffle_seed=shuffle_seed, exclude=sinks)
            with_all = with_sinks[with_sinks["scale"] == "all"]
            without_all = without[without["scale"] == "all"]
            entry.update(pointing=float(with_all["attention"].mean()),
                         pointing_without_sinks=float(without_all["attention"].mean()),
                         uniform=float(with_all["uniform"].mean()),
                         uniform_without_sinks=float(without_all["uniform"].mean()))
        else:
            entry.update(pointing=float("nan"), pointing_without_sinks=float("nan"), uniform=float("nan"),
                         uniform_without_sinks=float("nan"))
        records.append(entry)
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------------
# causal check: blank the visual tokens inside / outside the evidence box


@dataclass(frozen=True)
class BlankedTokens:
    """Visual tokens of one prompt chosen for blanking (LLM positions, ascending)."""

    inside: torch.Tensor
    outside: torch.Tensor

    @property
    def matched(self) -> bool:
        """Whether as many outside tokens as inside tokens could be found (per scale)."""
        return self.outside.numel() == self.inside.numel()


def blanking_positions(layout: TokenLayout, geometry: Sequence[ScaleGeometry], box: Box, *, image: int = 0,
                       threshold: float = 0.0, seed: int | np.random.Generator = 0) -> BlankedTokens:
    """The visual tokens *inside* ``box`` (cell overlap fraction ``> threshold``) and, per scale, as many tokens
    *outside* (no overlap with the box, cell not entirely padding) drawn at random (seeded).

    With too few outside candidates in a scale all of them are taken (:attr:`BlankedTokens.matched` is False).
    """
    geometry = match_geometry(layout, image, geometry)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    inside, outside = [], []
    visual = layout.kind_mask("visual") & (layout.image == image)
    for geo in geometry:
        positions = (visual & (layout.scale == geo.scale)).nonzero().reshape(-1)
        rows, cols = layout.row[positions].numpy(), layout.col[positions].numpy()
        overlap = geo.overlap_fraction(box)[rows, cols]
        real = geo.image_fraction()[rows, cols] > 0
        chosen = positions[torch.from_numpy(overlap > threshold)]
        candidates = positions[torch.from_numpy((overlap == 0) & real)]
        count = min(chosen.numel(), candidates.numel())
        picked = candidates[torch.from_numpy(np.sort(rng.choice(candidates.numel(), size=count, replace=False)))] \
            if count else candidates[:0]
        inside.append(chosen)
        outside.append(picked)
    return BlankedTokens(torch.cat(inside).sort().values, torch.cat(outside).sort().values)


@dataclass
class BlankingResult:
    """Per-question outcome of :func:`blanking_check`.

    ``records`` (DataFrame): ``question, index, answer``, per condition ``{condition}_prediction`` and
    ``{condition}_correct`` for ``CONDITIONS``, ``inside_tokens``, ``outside_tokens``, ``matched``.
    """

    records: Any
    conditions: tuple[str, ...] = field(default=("intact", "inside_blanked", "outside_blanked"))

    def accuracy(self) -> dict[str, float]:
        """Exact-match accuracy per condition."""
        return {c: float(self.records[f"{c}_correct"].mean()) for c in self.conditions}

    def summary(self, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0):
        """``condition, accuracy, low, high, n`` with a bootstrap interval over questions (paired resamples)."""
        import pandas as pd

        values = np.stack([self.records[f"{c}_correct"].to_numpy(dtype=float) for c in self.conditions], axis=1)
        mean, low, high = bootstrap_means(values, n_boot=n_boot, confidence=confidence, seed=seed)
        return pd.DataFrame({"condition": list(self.conditions), "accuracy": mean, "low": low, "high": high,
                             "n": len(self.records)})


def blank_features(features: torch.Tensor, layout: TokenLayout, positions: torch.Tensor,
                   offset: int = 0) -> torch.Tensor:
    """A copy of ``features (n, H)`` (the visual tokens of a batch, in ``<IMG_CONTEXT>`` order) with the rows of
    the LLM ``positions`` of one prompt zeroed; ``offset`` = visual tokens of the prompts before it."""
    out = features.clone()
    index = layout.visual_index[torch.as_tensor(positions, dtype=torch.long)]
    if bool((index < 0).any()):
        raise ModelInputError("only visual-token positions can be blanked")
    out[(index + offset).to(out.device)] = 0
    return out


def _decode(processor: Any, generated: torch.Tensor) -> list[str]:
    from navil_utils.processing.templates import clean_response

    eos = processor.eos_token_id
    answers = []
    for row in generated.tolist():
        if eos in row:
            row = row[:row.index(eos)]
        text = processor.tokenizer.decode(row, skip_special_tokens=True)
        answers.append(clean_response(text, processor.template.sep))
    return answers


@torch.inference_mode()
def blanking_check(model: Any, tokenizer: Any, images: Sequence[Any], questions: Sequence[str],
                   answers: Sequence[str], boxes: Sequence[Box], *, threshold: float = 0.0, batch_size: int = 8,
                   max_new_tokens: int = 8, seed: int = 0, indices: Sequence[Any] | None = None,
                   match: Callable[[str, str], bool] | None = None) -> BlankingResult:
    """Greedy answers with the image intact, with the visual tokens inside the evidence box zeroed, and with as
    many tokens outside it zeroed (:func:`blanking_positions`, per scale; same seed → same choice).

    The visual tokens are computed once per batch (``model.get_image_features``), the chosen rows set to zero
    and passed as ``visual_features`` to ``model.generate`` — the embedding assembly puts them in the
    ``<IMG_CONTEXT>`` slots as usual (positions, expert routing and the other tokens are untouched; no model
    code changes).  The intact run therefore equals a plain greedy run of the same batch.

    Args:
        images, questions, answers, boxes: one per question; boxes in original-image pixels.
        threshold: a token is inside when its cell's overlap fraction with the box exceeds this.
        batch_size, max_new_tokens: generation settings (greedy, left-padded batches).
        match: ``match(prediction, answer) -> bool`` (default: exact match after stripping whitespace and
            trailing ``.``/``!``, as in :func:`navil_utils.analysis.accuracy.normalise_answer`).
    """
    import pandas as pd

    from navil_utils.processing.processor import NaViLProcessor
    from navil_utils.analysis.accuracy import normalise_answer

    count = _check_lengths(images=images, questions=questions, answers=answers, boxes=boxes, indices=indices)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    match = match or (lambda prediction, answer: normalise_answer(prediction) == answer)
    processor = NaViLProcessor.from_config(model, tokenizer)
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=processor.eos_token_id,
                      pad_token_id=processor.pad_token_id)
    rng = np.random.default_rng(seed)
    records = []
    for begin in range(0, count, batch_size):
        chunk = list(range(begin, min(count, begin + batch_size)))
        inputs, layouts, geometries = _prepare(model, processor, [images[i] for i in chunk],
                                               [questions[i] for i in chunk])
        features = model.get_image_features(inputs.pixel_values, inputs.image_grid_thw)
        inside, outside = features.clone(), features.clone()
        chosen, offset = [], 0
        for b, i in enumerate(chunk):
            tokens = blanking_positions(layouts[b], geometries[b], boxes[i], threshold=threshold, seed=rng)
            inside = blank_features(inside, layouts[b], tokens.inside, offset)
            outside = blank_features(outside, layouts[b], tokens.outside, offset)
            offset += int((layouts[b].visual_index >= 0).sum())
            chosen.append(tokens)
        predictions = {}
        for condition, visual in (("intact", features), ("inside_blanked", inside), ("outside_blanked", outside)):
            sequences = model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                       visual_features=visual, **generation)
            predictions[condition] = _decode(processor, sequences[:, inputs.input_ids.shape[1]:].cpu())
        for b, i in enumerate(chunk):
            record = {"question": i, "index": i if indices is None else indices[i], "answer": answers[i]}
            for condition, texts in predictions.items():
                record[f"{condition}_prediction"] = texts[b]
                record[f"{condition}_correct"] = bool(match(texts[b], answers[i]))
            record.update(inside_tokens=int(chosen[b].inside.numel()), outside_tokens=int(chosen[b].outside.numel()),
                          matched=chosen[b].matched)
            records.append(record)
    return BlankingResult(pd.DataFrame(records))
