"""Inference helpers of notebook 03: chance levels, accuracy tables, the scale ablation plot, the
success/failure gallery and generation-speed measurement.

    rows = accuracy_frame({"all": result_all, "largest": result_largest})   # one row per (scales, qtype)
    chance = chance_levels(samples, data)                                   # {qtype: accuracy of a uniform guess}
    fig = plot_scale_ablation(rows, chance)
    fig = plot_qa_gallery([GalleryItem.from_sample(s, prediction) for s, prediction in pairs])
    speed = measure_generation_speed(model, tokenizer, image, "Describe it.", new_tokens=32, use_cache=False)

Everything here works on :class:`navil_utils.evaluate.EvalResult`-like objects (anything with a
``records`` list of ``{"index", "qtype", "correct", …}`` dicts) and on
:class:`navil_utils.synthetic.Sample`, so it is independent of which checkpoint produced the answers.
"""
from __future__ import annotations

import math
import statistics
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError
from .plotting import PALETTE

#: Bar colours of the three scale settings of the ablation.
SCALE_SETTING_COLOURS: dict[str, str] = {"all": PALETTE["navil_2b"], "largest": "#ff7f0e", "smallest": "#9467bd"}
#: Frame/text colours of correct and wrong answers in galleries.
OUTCOME_COLOURS: dict[bool, str] = {True: "#2ca02c", False: "#d62728"}
#: Label of the all-question row in :func:`accuracy_frame`.
OVERALL = "overall"


# ---------------------------------------------------------------------------------------------------
# Chance levels
# ---------------------------------------------------------------------------------------------------
def answer_space_size(data: Any, template: str) -> int:
    """Number of possible answers of a sub-type (``Sample.template``) of a ``SyntheticVQA`` task.

    Closed sub-types use ``data.answer_space(template)``; the open-ended ``"text"`` answer is any
    string of ``text_length_range`` characters from ``text_alphabet`` (Σ_L |alphabet|^L).  Captions
    have no countable answer space and raise :class:`~navil_utils.errors.ConfigError`.
    """
    space = data.answer_space(template)
    if space:
        return len(space)
    if template == "text":
        lo, hi = data.config.text_length_range
        return sum(len(data.config.text_alphabet) ** length for length in range(lo, hi + 1))
    raise ConfigError(f"sub-type {template!r} has no countable answer space (no chance level)")


def chance_levels(samples: Iterable[Any], data: Any) -> dict[str, float]:
    """Expected exact-match accuracy per question type of a guess drawn uniformly from the answer space.

    Averages ``1 / answer_space_size(template)`` over the given samples of each ``qtype``, so the mix
    of sub-types actually evaluated is respected (e.g. ``position`` mixes 5 shape kinds and 5 regions).
    The task draws every answer uniformly from its space, so this is also the accuracy of any
    constant answer for the closed types.  The ``"overall"`` entry averages over all samples.
    """
    inverse: dict[str, list[float]] = {}
    for sample in samples:
        inverse.setdefault(sample.qtype, []).append(1.0 / answer_space_size(data, sample.template))
    if not inverse:
        raise ConfigError("chance_levels needs at least one sample")
    levels = {qtype: float(np.mean(values)) for qtype, values in sorted(inverse.items())}
    levels[OVERALL] = float(np.mean([v for values in inverse.values() for v in values]))
    return levels


# ---------------------------------------------------------------------------------------------------
# Accuracy tables
# ---------------------------------------------------------------------------------------------------
def _records(result: Any) -> list[dict[str, Any]]:
    records = getattr(result, "records", result)
    if not isinstance(records, Sequence) or not all(isinstance(r, Mapping) for r in records):
        raise ConfigError(f"expected an EvalResult or a list of record dicts, got {type(result).__name__}")
    return list(records)


def accuracy_frame(results: Mapping[str, Any], *, keep: Iterable[int] | None = None,
                   qtypes: Sequence[str] | None = None):
    """Exact-match accuracy per setting and question type, with binomial standard errors.

    Args:
        results: ``{setting name: EvalResult or list of records}`` (records need ``qtype`` and
            ``correct``; ``index`` too when ``keep`` is given).
        keep: only count records whose ``index`` is in ``keep`` (e.g. multi-scale images only).
        qtypes: row order (default: sorted types found); an ``"overall"`` row is appended per setting.

    Returns:
        A long DataFrame with columns ``scales, qtype, n, correct, accuracy, stderr``
        (``stderr = sqrt(p (1 - p) / n)``; NaN accuracy where ``n == 0``).
    """
    import pandas as pd

    if not results:
        raise ConfigError("accuracy_frame needs at least one result")
    kept = None if keep is None else set(int(i) for i in keep)
    rows = []
    for setting, result in results.items():
        records = [r for r in _records(result) if kept is None or int(r["index"]) in kept]
        order = list(qtypes) if qtypes is not None else sorted({r["qtype"] for r in records})
        for qtype in [*order, OVERALL]:
            chosen = records if qtype == OVERALL else [r for r in records if r["qtype"] == qtype]
            n, hits = len(chosen), sum(bool(r["correct"]) for r in chosen)
            accuracy = hits / n if n else math.nan
            stderr = math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan
            rows.append({"scales": setting, "qtype": qtype, "n": n, "correct": hits, "accuracy": accuracy,
                         "stderr": stderr})
    return pd.DataFrame(rows)


def accuracy_table(frame, chance: Mapping[str, float] | None = None, digits: int = 3):
    """Wide view of :func:`accuracy_frame`: one row per question type, one accuracy column per setting,
    plus ``n`` (questions per type, of the first setting) and ``chance`` if given."""
    settings = list(dict.fromkeys(frame["scales"]))
    wide = frame.pivot(index="qtype", columns="scales", values="accuracy")[settings]
    order = list(dict.fromkeys(frame["qtype"]))
    wide = wide.loc[order].round(digits)
    wide.columns = [f"accuracy ({s})" if len(settings) > 1 else "accuracy" for s in settings]
    counts = frame[frame["scales"] == settings[0]].set_index("qtype")["n"]
    wide.insert(0, "n", counts.loc[order].astype(int))
    if chance is not None:
        wide["chance"] = [round(chance[q], digits) if q in chance else math.nan for q in order]
    wide.index.name = "question type"
    return wide


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------
def plot_scale_ablation(frame, chance: Mapping[str, float] | None = None, *, ax=None,
                        title: str = "Multi-scale ablation: same weights, different scales at inference"):
    """Grouped bars of accuracy per question type (groups) and scale setting (bars), ±1 standard error,
    with each type's chance level as a dashed segment across its group.

    ``frame`` is :func:`accuracy_frame` output.  Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = list(dict.fromkeys(frame["scales"]))
    qtypes = list(dict.fromkeys(frame["qtype"]))
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 4.2))
    else:
        fig = ax.figure
    width = 0.8 / len(settings)
    x = np.arange(len(qtypes))
    for k, setting in enumerate(settings):
        rows = frame[frame["scales"] == setting].set_index("qtype").loc[qtypes]
        offset = (k - (len(settings) - 1) / 2) * width
        ax.bar(x + offset, rows["accuracy"], width * 0.95, yerr=rows["stderr"], capsize=2,
               color=SCALE_SETTING_COLOURS.get(setting, f"C{k}"), error_kw={"lw": 0.8, "ecolor": "0.25"},
               label=f"{setting} scale{'s' if setting == 'all' else ''}")
    for i, qtype in enumerate(qtypes):  # mark groups whose bars are all at zero
        if (frame.loc[frame["qtype"] == qtype, "accuracy"].fillna(0) == 0).all():
            ax.text(i, 0.015, "all 0", ha="center", va="bottom", fontsize=8, color="0.3")
    ax.grid(axis="x", visible=False)
    handles, labels = ax.get_legend_handles_labels()
    if chance is not None:
        for i, qtype in enumerate(qtypes):
            if qtype in chance:
                ax.hlines(chance[qtype], i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1.2)
        handles.append(Line2D([], [], color="black", ls="--", lw=1.2))
        labels.append("chance (uniform guess)")
    n_per_type = frame[frame["scales"] == settings[0]].set_index("qtype")["n"]
    ax.set_xticks(x, [f"{q}\n(n={int(n_per_type[q])})" for q in qtypes])
    ax.set_xlabel("question type")
    ax.set_ylabel("exact-match accuracy (±1 s.e.)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class GalleryItem:
    """One panel of a QA gallery: an image, the question and the model's answer.

    ``truth``/``correct`` are ``None`` when there is no ground truth (e.g. a real photo);
    ``evidence_box`` ``(x0, y0, x1, y1)`` px, drawn dashed if given; ``label`` is a small caption
    (e.g. the question type).
    """

    image: Any
    question: str
    prediction: str
    truth: str | None = None
    correct: bool | None = None
    evidence_box: tuple[int, int, int, int] | None = None
    label: str | None = None

    @classmethod
    def from_sample(cls, sample: Any, prediction: str, correct: bool | None = None) -> GalleryItem:
        """A panel for a synthetic :class:`~navil_utils.synthetic.Sample`; ``correct`` defaults to
        exact match of the normalised prediction (:func:`navil_utils.evaluate.normalise_answer`)."""
        from .evaluate import normalise_answer

        if correct is None:
            correct = normalise_answer(prediction) == sample.answer
        return cls(sample.image, sample.question, prediction, sample.answer, bool(correct), sample.evidence_box,
                   sample.qtype)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or "''"


def plot_qa_gallery(items: Sequence[GalleryItem | str | None], *, ncols: int = 5, title: str | None = None,
                    wrap: int = 28, panel_size: tuple[float, float] = (2.4, 2.0), text_height: float = 1.0,
                    fig=None):
    """A grid of images, each under its question, answer and truth; frames green (correct), red (wrong)
    or grey (no ground truth).

    A ``str`` (or ``None``) entry leaves an empty panel showing that text, so rows keep their meaning
    (e.g. one success and one failure per question type).  Each image is drawn at its own aspect
    ratio (``panel_size`` = the image slot in inches, ``text_height`` the text slot above it) with the
    answer's evidence box dashed.  Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not items:
        raise ConfigError("plot_qa_gallery needs at least one item")
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    if fig is None:
        fig = plt.figure(figsize=(panel_size[0] * ncols, (panel_size[1] + text_height) * nrows + (0.4 if title else 0)))
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[text_height, panel_size[1]] * nrows,
                            hspace=0.08, wspace=0.12)
    for k, item in enumerate(items):
        row, col = divmod(k, ncols)
        text_ax, image_ax = fig.add_subplot(grid[2 * row, col]), fig.add_subplot(grid[2 * row + 1, col])
        text_ax.axis("off")
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        image_ax.grid(False)
        if not isinstance(item, GalleryItem):
            image_ax.axis("off")
            image_ax.text(0.5, 0.6, item or "", ha="center", va="center", color="0.45", fontsize=8.5,
                          transform=image_ax.transAxes)
            continue
        array = np.asarray(item.image.convert("RGB") if hasattr(item.image, "convert") else item.image)
        image_ax.imshow(array, interpolation="nearest")
        image_ax.set_anchor("N")
        if item.evidence_box is not None:
            x0, y0, x1, y1 = item.evidence_box
            image_ax.add_patch(Rectangle((x0 - 1.5, y0 - 1.5), x1 - x0 + 2, y1 - y0 + 2, fill=False,
                                         edgecolor="black", linestyle="--", linewidth=1.0))
        colour = "0.45" if item.correct is None else OUTCOME_COLOURS[item.correct]
        for spine in image_ax.spines.values():
            spine.set_visible(True)
            spine.set_color(colour)
            spine.set_linewidth(2.5)
        header = f"{item.label} · " if item.label else ""
        lines = [_wrap(f"Q: {item.question}", wrap), f"A: {item.prediction!r}"]
        if item.truth is not None:
            lines.append(f"truth: {item.truth!r}")
        text_ax.text(0.0, 0.02, "\n".join(lines), ha="left", va="bottom", fontsize=8, transform=text_ax.transAxes)
        text_ax.text(0.0, 1.0, f"{header}{array.shape[1]}×{array.shape[0]} px", ha="left", va="top",
                     fontsize=7.5, color=colour, fontweight="bold", transform=text_ax.transAxes)
    if title:
        fig.suptitle(title)
    return fig


def success_failure_items(records: Sequence[Mapping[str, Any]], samples: Mapping[int, Any] | Sequence[Any],
                          qtypes: Sequence[str]) -> list[GalleryItem | str]:
    """The first correct and the first wrong record of every question type, as gallery items.

    Returns ``len(qtypes)`` successes followed by ``len(qtypes)`` failures (a short note where a type
    has none), i.e. two rows of :func:`plot_qa_gallery` with ``ncols=len(qtypes)``.  ``samples`` maps
    a record's ``index`` to its :class:`~navil_utils.synthetic.Sample` (a list indexed by ``index`` works).
    """
    rows: list[GalleryItem | str] = []
    for wanted in (True, False):
        for qtype in qtypes:
            record = next((r for r in records if r["qtype"] == qtype and bool(r["correct"]) is wanted), None)
            if record is None:
                rows.append(f"no {'correct' if wanted else 'wrong'} {qtype}\nanswer among the\nevaluated questions")
                continue
            sample = samples[int(record["index"])]
            rows.append(GalleryItem.from_sample(sample, record["prediction"], correct=bool(record["correct"])))
    return rows


def plot_image_answers(image: Any, answers: Sequence[tuple[str, ...]], *, title: str | None = None,
                       figsize: tuple[float, float] = (8.0, 3.4)):
    """An image (left) next to its questions and answers (right).  Returns the figure.

    ``answers`` holds ``(question, answer)`` or ``(question, answer, truth)`` tuples; with a truth the
    answer is marked ``(match)`` or ``(wrong)`` by exact match.
    """
    import matplotlib.pyplot as plt

    from .evaluate import normalise_answer

    fig, (image_ax, text_ax) = plt.subplots(1, 2, figsize=figsize, gridspec_kw={"width_ratios": [1, 1]})
    array = np.asarray(image)
    image_ax.imshow(array)
    image_ax.set_anchor("E")  # next to the text, whatever the aspect ratio
    image_ax.set_xlabel(f"{array.shape[1]}×{array.shape[0]} px (as given to chat)")
    image_ax.set_xticks([])
    image_ax.set_yticks([])
    image_ax.grid(False)
    text_ax.axis("off")
    lines = []
    for entry in answers:
        if len(entry) not in (2, 3):
            raise ConfigError(f"expected (question, answer[, truth]) tuples, got {entry!r}")
        question, answer = entry[0], entry[1]
        lines += [_wrap(f"Q: {question}", 44), f"A: {answer!r}"]
        if len(entry) == 3:
            verdict = "match" if normalise_answer(answer) == entry[2] else "wrong"
            lines[-1] += f"   truth: {entry[2]!r} ({verdict})"
        lines.append("")
    text_ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace",
                 transform=text_ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# Generation speed
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSpeed:
    """Timing of one chat turn that generates exactly ``new_tokens`` tokens greedily.

    ``seconds`` is the median over the timed repeats (prompt pass, ViT and decoding included);
    ``generated_ids`` ``[1, new_tokens]`` are the tokens of the last run.
    """

    use_cache: bool
    new_tokens: int
    prompt_tokens: int
    seconds: float
    repeats: int
    generated_ids: Any

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"KV cache": self.use_cache, "prompt tokens": self.prompt_tokens, "new tokens": self.new_tokens,
                "seconds (median)": self.seconds, "tokens/s": self.tokens_per_second, "repeats": self.repeats}


def measure_generation_speed(model: Any, tokenizer: Any, image: Any, question: str, *, new_tokens: int = 32,
                             use_cache: bool = True, repeats: int = 3, warmup: bool = True) -> GenerationSpeed:
    """Time :func:`navil_utils.chat_turn` forced to emit exactly ``new_tokens`` tokens (greedy,
    ``min_new_tokens = max_new_tokens``) with the KV cache on or off.

    The image is preprocessed once before timing; tokenising the prompt is inside the timed call
    (negligible).  Without the cache every step re-runs the decoder over the whole sequence; the ViT
    runs once either way (the prompt is embedded once by ``generate``).
    """
    from .chatting import chat_turn, pixel_budget
    from .preprocessing import MultiScaleInputs, preprocess_multiscale

    if new_tokens < 1 or repeats < 1:
        raise ConfigError(f"need new_tokens >= 1 and repeats >= 1, got {new_tokens}, {repeats}")
    inputs = image
    if image is not None and not isinstance(image, MultiScaleInputs):
        inputs = preprocess_multiscale(image, **pixel_budget(model.config))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": use_cache}
    if warmup:
        chat_turn(model, tokenizer, inputs, question, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    times, turn = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        turn = chat_turn(model, tokenizer, inputs, question, **kwargs)
        times.append(time.perf_counter() - start)
    generated = turn.generated_ids
    if generated.shape[1] != new_tokens:  # pragma: no cover - min_new_tokens guarantees it
        raise ConfigError(f"generate returned {generated.shape[1]} tokens instead of {new_tokens}")
    return GenerationSpeed(use_cache, new_tokens, int(turn.input_ids.shape[1]), statistics.median(times), repeats,
                           generated)


def compare_kv_cache(model: Any, tokenizer: Any, image: Any, question: str, *, new_tokens: Sequence[int] = (8, 32),
                     repeats: int = 3) -> list[GenerationSpeed]:
    """:func:`measure_generation_speed` with the cache on and off for every length in ``new_tokens``
    (order: for each length, cache on then off)."""
    return [measure_generation_speed(model, tokenizer, image, question, new_tokens=n, use_cache=cache,
                                     repeats=repeats)
            for n in new_tokens for cache in (True, False)]


def speed_frame(speeds: Sequence[GenerationSpeed]):
    """A DataFrame of :class:`GenerationSpeed` results plus the cached/uncached speed-up per length."""
    import pandas as pd

    frame = pd.DataFrame([s.as_dict() for s in speeds])
    uncached = frame[~frame["KV cache"]].set_index("new tokens")["tokens/s"]
    frame["speed-up vs no cache"] = [rate / uncached.get(n, math.nan) if cache else math.nan
                                     for n, rate, cache in zip(frame["new tokens"], frame["tokens/s"], frame["KV cache"])]
    return frame
