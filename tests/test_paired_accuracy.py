"""Paired statistics of the scale ablation: exact McNemar test and per-type paired comparison."""
from __future__ import annotations

import math

import pytest

from navil_utils.analysis.accuracy import mcnemar_exact, paired_comparison
from navil_utils.errors import ConfigError


def test_mcnemar_exact_known_values():
    # b=1, c=9: P(X<=1 | n=10) = (1 + 10) / 1024, two-sided 22/1024
    assert mcnemar_exact(1, 9) == 22 / 1024 == 0.021484375
    assert mcnemar_exact(9, 1) == 22 / 1024  # symmetric
    assert mcnemar_exact(0, 5) == 2 / 32  # the smallest p-value 5 discordant pairs can give
    assert mcnemar_exact(4, 4) == 1.0  # capped at 1
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence
    # b=10, c=30: exact tail sum by hand vs the formula
    assert mcnemar_exact(10, 30) == pytest.approx(2 * sum(math.comb(40, k) for k in range(11)) / 2**40)
    assert mcnemar_exact(10, 30) == pytest.approx(0.002221, abs=1e-6)
    with pytest.raises(ConfigError):
        mcnemar_exact(-1, 2)


def _records(correct, qtypes):
    return [{"index": i, "qtype": q, "correct": c} for i, (c, q) in enumerate(zip(correct, qtypes))]


def test_paired_comparison_constructed_case():
    # 12 questions: type a (8), type b (4).  Baseline right on 0-5 (a) and 8-9 (b); other right on 2-7 (a), 8-11 (b).
    qtypes = ["a"] * 8 + ["b"] * 4
    base = [True] * 6 + [False] * 2 + [True, True, False, False]
    other = [False, False] + [True] * 6 + [True] * 4
    frame = paired_comparison({"all": _records(base, qtypes), "x": _records(other, qtypes)}, "all")
    rows = frame.set_index("qtype")
    assert list(rows.index) == ["a", "b", "overall"]
    assert rows.loc["a", "n"] == 8 and rows.loc["a", "difference"] == 0.0
    assert rows.loc["a", "only all correct"] == 2 and rows.loc["a", "only this correct"] == 2
    assert rows.loc["a", "McNemar p"] == 1.0
    assert rows.loc["b", "accuracy (all)"] == 0.5 and rows.loc["b", "accuracy"] == 1.0
    assert rows.loc["b", "McNemar p"] == 0.5  # b=0, c=2: 2 * 1/4
    assert rows.loc["overall", "only all correct"] == 2 and rows.loc["overall", "only this correct"] == 4
    assert rows.loc["overall", "McNemar p"] == pytest.approx(2 * (1 + 6 + 15) / 64)  # b=2, c=4, n=6
    assert rows.loc["overall", "difference"] == pytest.approx(10 / 12 - 8 / 12)
    # keep= restricts the pairs; mismatched questions are an error
    kept = paired_comparison({"all": _records(base, qtypes), "x": _records(other, qtypes)}, "all", keep=[10, 11])
    assert kept.set_index("qtype").loc["overall", "n"] == 2
    with pytest.raises(ConfigError):
        paired_comparison({"all": _records(base, qtypes), "x": _records(other[:-1], qtypes)}, "all")
