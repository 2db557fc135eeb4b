"""Figures of evaluation results: question-answer galleries, answers next to an image, the scale ablation.

    fig = plot_qa_gallery([GalleryItem.from_sample(s, prediction) for s, prediction in pairs])
    fig = plot_scale_ablation(accuracy_frame(results), chance)
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from navil_utils.errors import ConfigError
from navil_utils.plotting.style import PALETTE, mark_zero_groups_and_chance

#: Bar colours of the three scale settings of the ablation.
SCALE_SETTING_COLOURS: dict[str, str] = {"all": PALETTE["navil_2b"], "largest": "#ff7f0e", "smallest": "#9467bd"}


#: Frame/text colours of correct and wrong answers in galleries.
OUTCOME_COLOURS: dict[bool, str] = {True: "#2ca02c", False: "#d62728"}


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
    ax.grid(axis="x", visible=False)
    handles, labels = mark_zero_groups_and_chance(ax, frame, "qtype", qtypes, chance, lw=1.2)
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
        """A panel for a synthetic :class:`~navil_utils.tiny.synthetic.Sample`; ``correct`` defaults to
        exact match of the normalised prediction (:func:`navil_utils.analysis.accuracy.normalise_answer`)."""
        from navil_utils.analysis.accuracy import normalise_answer

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
                          qtypes: Sequence[str], *, exclude: Iterable[int] = ()) -> list[GalleryItem | str]:
    """The first correct and the first wrong record of every question type, as gallery items.

    Returns ``len(qtypes)`` successes followed by ``len(qtypes)`` failures (a short note where a type
    has none), i.e. two rows of :func:`plot_qa_gallery` with ``ncols=len(qtypes)``.  ``samples`` maps
    a record's ``index`` to its :class:`~navil_utils.tiny.synthetic.Sample` (a list indexed by ``index`` works).
    Records whose ``index`` is in ``exclude`` are skipped (e.g. questions already shown elsewhere).
    """
    skipped = {int(i) for i in exclude}
    rows: list[GalleryItem | str] = []
    for wanted in (True, False):
        for qtype in qtypes:
            record = next((r for r in records if r["qtype"] == qtype and bool(r["correct"]) is wanted
                           and int(r["index"]) not in skipped), None)
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

    from navil_utils.analysis.accuracy import normalise_answer

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
