"""Accuracy of a model on question-answer records: chance levels, per-type accuracy with standard errors.

    chance = chance_levels(samples, data)                                   # {qtype: accuracy of a uniform guess}
    rows = accuracy_frame({"all": result_all, "largest": result_largest})   # one row per (scales, qtype)
    accuracy_table(rows, chance)

Works on anything with a ``records`` list of ``{"index", "qtype", "correct", …}`` dicts (e.g.
:class:`navil_utils.tiny.evaluate.EvalResult`), so it is independent of which checkpoint answered.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from navil_utils.errors import ConfigError


def normalise_answer(text: str) -> str:
    """Exact match is on the stripped answer with trailing punctuation removed (case kept)."""
    return text.strip().rstrip(".!").strip()


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
# Paired comparisons (the same questions answered under two settings)
# ---------------------------------------------------------------------------------------------------
def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test of two paired binary outcomes.

    ``only_first`` (b) = pairs where only the first setting is correct, ``only_second`` (c) = pairs
    where only the second is.  Under the null hypothesis (equal accuracy) each of the ``n = b + c``
    discordant pairs falls on either side with probability ½, so b ~ Binomial(n, ½) and
    ``p = min(1, 2 · P(X ≤ min(b, c)))``, computed exactly with :func:`math.comb`.  ``p = 1`` if ``n = 0``.
    """
    b, c = int(only_first), int(only_second)
    if b < 0 or c < 0:
        raise ConfigError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(results: Mapping[str, Any], baseline: str, *, keep: Iterable[int] | None = None,
                      qtypes: Sequence[str] | None = None):
    """Every setting against ``baseline`` on the *same* questions, per question type.

    Records are paired by ``index`` (both settings must hold the same indices).  For each other
    setting and question type: ``n`` pairs, both accuracies, their difference (other − baseline),
    the discordant counts ``only_baseline`` / ``only_other`` and the exact McNemar p-value
    (:func:`mcnemar_exact`).  An ``"overall"`` row per setting uses all pairs.
    """
    import pandas as pd

    if baseline not in results:
        raise ConfigError(f"baseline {baseline!r} is not one of the settings {list(results)}")
    kept = None if keep is None else {int(i) for i in keep}

    def by_index(result):
        return {int(r["index"]): r for r in _records(result) if kept is None or int(r["index"]) in kept}

    base = by_index(results[baseline])
    rows = []
    for setting, result in results.items():
        if setting == baseline:
            continue
        other = by_index(result)
        if set(other) != set(base):
            raise ConfigError(f"settings {baseline!r} and {setting!r} answered different questions")
        order = list(qtypes) if qtypes is not None else sorted({r["qtype"] for r in base.values()})
        for qtype in [*order, OVERALL]:
            indices = [i for i, r in base.items() if qtype == OVERALL or r["qtype"] == qtype]
            first = [bool(base[i]["correct"]) for i in indices]
            second = [bool(other[i]["correct"]) for i in indices]
            n = len(indices)
            b = sum(f and not s for f, s in zip(first, second))
            c = sum(s and not f for f, s in zip(first, second))
            acc_base = sum(first) / n if n else math.nan
            acc_other = sum(second) / n if n else math.nan
            rows.append({"setting": setting, "qtype": qtype, "n": n, f"accuracy ({baseline})": acc_base,
                         "accuracy": acc_other, "difference": acc_other - acc_base,
                         f"only {baseline} correct": b, "only this correct": c, "McNemar p": mcnemar_exact(b, c)})
    return pd.DataFrame(rows)
