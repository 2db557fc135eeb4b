"""The scaling analysis on constructed losses with known answers, and on the paper's own points."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from navil_utils.analysis.scaling import (
    bootstrap_optimal_encoder_fit,
    bootstrap_saturating_power_law,
    fit_power_law,
    fit_saturating_power_law,
    optimal_encoder,
    optimal_encoders,
)
from navil_utils.paper.tables import load_paper_table


def test_optimal_encoder_follows_the_papers_rule():
    # gaps 0.10, 0.05, 0.005, 0.001; λ·L(smallest) = 0.02 -> the 300M encoder
    losses = {75: 2.0, 150: 1.9, 300: 1.85, 600: 1.845, 1200: 1.844}
    assert optimal_encoder(losses) == 300
    assert optimal_encoder(losses, lam=0.04) == 150       # 0.05 < 0.08: one doubling earlier
    assert optimal_encoder(losses, lam=0.001) == 600      # 0.001 < 0.002 only at the last doubling
    assert optimal_encoder(losses, lam=0.0001) is None    # the grid never reaches the optimum


def test_reference_loss_of_the_rule_matters():
    # gap 300->600 = 0.03: below 1% of L(75)=4.0 (0.04) but above 1% of L(600)=1.0 (0.01)
    losses = {75: 4.0, 150: 2.0, 300: 1.03, 600: 1.0}
    assert optimal_encoder(losses, relative_to="smallest") == 300
    assert optimal_encoder(losses, relative_to="larger") is None
    with pytest.raises(ValueError):
        optimal_encoder(losses, relative_to="biggest")


def test_doubling_tolerates_inexact_parameter_counts():
    assert optimal_encoder({0.076: 2.0, 0.149: 1.99, 0.31: 1.98}) == 0.076
    assert optimal_encoder({1.0: 2.0, 3.0: 1.9}) is None  # 3x is not a doubling


def _constructed_runs(seeds: int = 3, noise: float = 0.0, rng_seed: int = 0) -> pd.DataFrame:
    """LLM k ∈ {0, 1, 2} (1M, 4M, 16M parameters), encoders 100k·2^j: doubling the encoder gains 0.1 up to
    j = k + 1 and 0.001 after, from L = 2.0 at the smallest encoder (λ·L = 0.02) -> optimum 100k·2^(k+1),
    i.e. the optimal encoder doubles when the LLM grows 4x: exponent exactly 0.5."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for k, n_llm in enumerate((1e6, 4e6, 1.6e7)):
        loss = 2.0
        for j in range(6):
            for seed in range(seeds):
                rows.append({"llm_params": n_llm, "encoder_params": 1e5 * 2**j, "seed": seed,
                             "val_loss": loss * (1 + noise * rng.standard_normal())})
            loss -= 0.1 if j < k + 1 else 0.001
    return pd.DataFrame(rows)


def test_optima_grow_with_the_llm_and_the_fit_finds_the_exponent():
    runs = _constructed_runs()
    optima = optimal_encoders(runs)
    assert optima == {1e6: 2e5, 4e6: 4e5, 1.6e7: 8e5}
    result = bootstrap_optimal_encoder_fit(runs, n_boot=50)
    assert result.fit is not None and result.fit.exponent == pytest.approx(0.5, abs=1e-9)  # doubles per 4x LLM
    low, high = result.exponent_interval
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)  # noise-free: every resample agrees


def test_bootstrap_interval_widens_with_seed_noise():
    noisy = bootstrap_optimal_encoder_fit(_constructed_runs(seeds=4, noise=0.01), n_boot=200, seed=1)
    low, high = noisy.exponent_interval
    assert low - 1e-9 <= 0.5 <= high + 1e-9 and high - low > 0  # the percentiles may round across 0.5
    assert all(sum(counts.values()) == 200 for counts in noisy.bootstrap_optima.values())


def test_the_papers_three_optima_lie_on_a_line_in_log_log():
    grid = load_paper_table("scaling_grid")
    best = grid[grid["optimal_encoder"]].drop_duplicates("llm_size_b").sort_values("llm_size_b")
    fit = fit_power_law(best["llm_size_b"], best["visual_encoder_size_b"])
    assert list(best["visual_encoder_size_b"]) == [0.3, 0.6, 1.2]
    assert fit.exponent == pytest.approx(0.525, abs=0.01)


def test_saturating_power_law_recovers_a_known_law():
    n = np.geomspace(1e5, 1e9, 9)
    law = fit_saturating_power_law(n, 0.5 + 30.0 * n**-0.35)
    assert law.E == pytest.approx(0.5, rel=1e-3)
    assert law.A == pytest.approx(30.0, rel=1e-2)
    assert law.alpha == pytest.approx(0.35, rel=1e-3)


def test_saturating_power_law_with_a_data_term():
    n, d = np.meshgrid(np.geomspace(1e5, 1e8, 5), np.geomspace(1e6, 1e9, 5))
    n, d = n.ravel(), d.ravel()
    law = fit_saturating_power_law(n, d=d, loss=0.3 + 20.0 * n**-0.3 + 50.0 * d**-0.25)
    assert (law.E, law.alpha, law.beta) == pytest.approx((0.3, 0.3, 0.25), rel=1e-2)
    assert law.predict(1e6, 1e7) == pytest.approx(0.3 + 20.0 * 1e6**-0.3 + 50.0 * 1e7**-0.25, rel=1e-4)


def test_huber_loss_resists_one_outlying_run():
    n = np.geomspace(1e5, 1e9, 12)
    loss = 0.5 + 30.0 * n**-0.35
    loss[5] *= 1.5  # one diverged run
    robust = fit_saturating_power_law(n, loss)
    least_squares = fit_saturating_power_law(n, loss, huber_delta=10.0)
    assert abs(robust.alpha - 0.35) < 0.02
    assert abs(robust.alpha - 0.35) < abs(least_squares.alpha - 0.35)


def test_bootstrap_intervals_cover_the_truth():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e9, 10)
    loss = (0.5 + 30.0 * n**-0.35) * (1 + 0.005 * rng.standard_normal(n.size))
    intervals = bootstrap_saturating_power_law(n, loss, n_boot=40, seed=0)
    low, high = intervals["alpha"]
    assert low < 0.35 < high and high - low < 0.2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="too few points"):
        fit_saturating_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        fit_saturating_power_law([1, 2, 3], [1, -2, 3])
    with pytest.raises(ValueError, match="lacks column"):
        optimal_encoders(pd.DataFrame({"llm_params": [1]}))


def _record(llm, enc, seed, losses, samples=(1024, 2048)):
    return {"params_llm_active": llm, "params_encoder": enc, "seed": seed,
            "budgets": [{"samples": s, "val_loss": v} for s, v in zip(samples, losses)]}


def test_scaling_figures_draw_one_line_per_llm_and_per_run():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from navil_utils.plotting.scaling import plot_loss_vs_data, plot_loss_vs_encoder

    records = [_record(1e6, 1e5, 0, (2.0, 1.5)), _record(1e6, 1e5, 1, (2.2, 1.7)), _record(1e6, 2e5, 0, (1.9, 1.4)),
               _record(4e6, 1e5, 0, (1.8, 1.3)), _record(4e6, 2e5, 0, (1.7, 1.2))]
    fig, (left, right) = plt.subplots(1, 2)
    plot_loss_vs_encoder(records, left, optima={1e6: 2e5})
    lines = [line for line in left.get_lines() if line.get_linestyle() != "None" and len(line.get_xdata()) > 1]
    assert len(lines) == 2  # one per LLM size
    assert list(lines[0].get_ydata()) == [1.6, 1.4]  # seeds averaged at the largest budget
    assert left.get_xscale() == "log" and "caption loss" in left.get_ylabel()
    ringed = [line for line in left.get_lines() if line.get_markerfacecolor() == "none"]
    assert len(ringed) == 1 and list(ringed[0].get_xdata()) == [2e5]
    plot_loss_vs_encoder(records, left, samples=1024)
    with pytest.raises(ValueError, match="budget"):
        plot_loss_vs_encoder(records, left, samples=99)
    plot_loss_vs_data(records, right)
    assert len(right.get_lines()) == len(records)
    plt.close(fig)


def test_nominal_encoder_size_is_the_papers_convention():
    from navil_utils.analysis.scaling import nominal_encoder_size

    # the paper's depth/width pairs at "600M": 12·d·w² = 604M, 597M, 604M, 624M, 604M
    sizes = [nominal_encoder_size(w, d) for d, w in ((3, 4096), (6, 2880), (12, 2048), (24, 1472), (48, 1024))]
    assert [round(s / 1e6) for s in sizes] == [604, 597, 604, 624, 604]
    assert nominal_encoder_size(64, 8) == 2 * nominal_encoder_size(64, 4)


def test_sweep_frame_uses_nominal_encoder_sizes_and_selects_a_budget():
    from navil_utils.analysis.scaling import sweep_frame

    record = {"run_id": "r", "seed": 0, "lr": 1e-3, "params_llm_active": 1000, "params_encoder": 60000,
              "params_total": 99999, "vit_width": 64, "vit_layers": 2,
              "budgets": [{"samples": 64, "val_loss": 2.0}, {"samples": 128, "val_loss": 1.5}]}
    frame = sweep_frame([record])
    assert list(frame["samples"]) == [64, 128] and set(frame["encoder_params"]) == {12 * 2 * 64**2}
    assert list(sweep_frame([record], samples=128)["val_loss"]) == [1.5]


def test_variant_table_compares_with_the_baseline_budget_by_budget():
    from navil_utils.analysis.scaling import variant_table

    groups = {"experts": [_record(1e6, 1e5, 0, (2.0, 1.5)), _record(1e6, 1e5, 1, (2.2, 1.7))],
              "dense": [_record(1e6, 1e5, 0, (2.1, 1.9))]}
    table = variant_table(groups, baseline="experts").set_index(["variant", "samples"])
    assert table.loc[("experts", 2048), "mean"] == pytest.approx(1.6)
    assert table.loc[("dense", 2048), "vs baseline"] == pytest.approx(0.3)
    assert table.loc[("dense", 2048), "seed spread"] == pytest.approx(0.2)  # the baseline's two seeds
    assert table.loc[("dense", 1024), "seeds"] == 1 and table.loc[("experts", 1024), "seeds"] == 2
    with pytest.raises(ValueError, match="baseline"):
        variant_table(groups, baseline="moe")


def test_loss_vs_llm_and_variant_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from navil_utils.plotting.scaling import plot_loss_vs_llm, plot_variants_vs_data

    records = [_record(1e6, 1e5, 0, (2.0, 1.5)), _record(1e6, 1e5, 1, (2.2, 1.7)), _record(4e6, 1e5, 0, (1.8, 1.3)),
               _record(4e6, 2e5, 0, (1.7, 1.2))]
    fig, (left, right) = plt.subplots(1, 2)
    plot_loss_vs_llm(records, left)
    lines = [line for line in left.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() != "None"]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == [1.6, 1.3]  # the 1e5 encoder at two LLM sizes
    assert "LLM size" in left.get_xlabel()
    plot_variants_vs_data({"a": records[:2], "b": records[2:3]}, right)
    assert [line.get_label() for line in right.get_lines()] == ["a (2 seeds)", "b (1 seed)"]
    assert list(right.get_lines()[0].get_ydata()) == [2.1, 1.6]
    plt.close(fig)


def test_select_runs_matches_fields_with_the_sweep_defaults():
    from navil_utils.analysis.scaling import select_runs

    records = [{"llm_width": 64, "vit_layers": 2}, {"llm_width": 64, "vit_layers": 2, "visual_experts": False},
               {"llm_width": 128, "vit_layers": 2, "text_pretrain_samples": 4096}]
    assert select_runs(records, llm_width=64, visual_experts=True) == records[:1]
    assert select_runs(records, visual_experts=False) == records[1:2]
    assert select_runs(records, text_pretrain_samples=0, vit_layers=2) == records[:2]


def test_fit_data_laws_recovers_a_known_curve_and_reports_misfit():
    from navil_utils.analysis.scaling import fit_data_laws

    d = np.repeat([1e3, 2e3, 4e3, 8e3, 16e3], 2)
    exact = 0.5 + 30.0 * d**-0.6
    table = fit_data_laws({"law": (d, exact), "step": (d, np.where(d < 8e3, 1.0, 0.5))}, n_boot=12)
    row = table.loc["law"]
    assert row["beta"] == pytest.approx(0.6, rel=1e-3) and row["E"] == pytest.approx(0.5, rel=1e-3)
    assert row["beta low"] <= 0.6 + 1e-6 and row["beta high"] >= 0.6 - 1e-6 and row["points"] == 10
    assert row["max |residual|"] < 1e-5
    assert table.loc["step", "max |residual|"] > 0.05  # a step is no power law: the misfit shows


def test_a_flat_power_law_has_exactly_exponent_zero():
    """Equal y at every x: exponent 0.0 exactly (not a solver's ±1e-17, which prints as "-0.00" on some CPUs)."""
    fit = fit_power_law([1e8, 4e8, 1.6e9], [3e7, 3e7, 3e7])
    assert fit.exponent == 0.0 and f"{fit.exponent:.2f}" == "0.00" and fit.coefficient == 3e7
