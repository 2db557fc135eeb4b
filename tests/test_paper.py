"""Tests of the transcribed paper tables (data/paper/*.csv) and their helpers (navil_utils.paper*).

Spot values are the numbers printed in the NaViL / NVLM papers (as collected in the project's paper
notes); the "Avg" re-computation checks the whole benchmark transcription against the papers' own
averages.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import navil_utils  # noqa: E402
from navil_utils.analysis.scaling import fit_power_law  # noqa: E402
from navil_utils.errors import NaViLError, PaperDataError  # noqa: E402
from navil_utils.paper.tables import (
    AVERAGE_METRICS,
    MODEL_FAMILIES,
    PAPER_TABLE_SCHEMAS,
    architecture_summary,
    available_paper_tables,
    benchmark_matrix,
    load_paper_table,
    paper_data_dir,
    recompute_average,
)
from navil_utils.plotting.paper import (
    model_colours,
    plot_grouped_bars,
    plot_optimal_encoder,
    plot_params_vs_score,
    plot_radar,
    plot_training_curves,
)

TABLES = available_paper_tables()
#: natural key of each table: no two rows may share it
KEYS = {
    "benchmarks": ["model", "benchmark"],
    "architecture": ["model"],
    "training_curves": ["figure", "series", "metric", "samples_m"],
    "scaling_grid": ["llm_size_b", "visual_encoder_size_b"],
    "encoder_shapes": ["study", "name"],
    "training_recipe": ["model", "stage"],
    "nvlm_tile_tag_ablation": ["variant", "benchmark"],
}


@pytest.fixture(scope="module")
def bench() -> pd.DataFrame:
    return load_paper_table("benchmarks")


@pytest.fixture(scope="module")
def arch() -> pd.DataFrame:
    return load_paper_table("architecture").set_index("model")


def score(bench: pd.DataFrame, model: str, benchmark: str) -> float:
    rows = bench[(bench["model"] == model) & (bench["benchmark"] == benchmark)]
    assert len(rows) == 1, (model, benchmark, len(rows))
    return float(rows["score"].iloc[0])


# ------------------------------------------------------------------------------------------ files + schema
def test_every_csv_has_a_schema_and_every_schema_a_csv():
    on_disk = sorted(p.stem for p in paper_data_dir().glob("*.csv"))
    assert on_disk == TABLES
    assert set(KEYS) == set(TABLES)
    assert (paper_data_dir() / "README.md").is_file()


@pytest.mark.parametrize("name", TABLES)
def test_table_columns_and_dtypes(name):
    table = load_paper_table(name)
    schema = PAPER_TABLE_SCHEMAS[name]
    assert list(table.columns) == list(pd.read_csv(paper_data_dir() / f"{name}.csv", nrows=0).columns)
    assert set(table.columns) == set(schema)
    assert len(table) > 0
    for column, kind in schema.items():
        dtype = table[column].dtype
        if kind == "text":
            assert pd.api.types.is_string_dtype(dtype), (column, dtype)
            assert not table[column].isna().any(), column  # empty text -> ""
        elif kind == "bool":
            assert pd.api.types.is_bool_dtype(dtype), (column, dtype)
        else:
            assert str(dtype) == kind, (column, dtype)


@pytest.mark.parametrize("name", TABLES)
def test_rows_are_unique_and_sourced(name):
    table = load_paper_table(name)
    assert not table.duplicated(KEYS[name]).any(), table[table.duplicated(KEYS[name], keep=False)]
    assert (table["source"].str.len() > 0).all()


def test_unknown_table_error_lists_available_tables():
    with pytest.raises(PaperDataError) as info:
        load_paper_table("benchmark")
    assert isinstance(info.value, NaViLError)
    for name in TABLES:
        assert name in str(info.value)


def test_navil_utils_reexports_loader():
    assert navil_utils.load_paper_table is load_paper_table
    assert navil_utils.benchmark_matrix is benchmark_matrix


# ------------------------------------------------------------------------------------------ benchmarks
def test_benchmarks_families_and_no_placeholder_scores(bench):
    assert set(bench["model_family"]) <= set(MODEL_FAMILIES)
    assert set(bench.loc[bench["model"].str.startswith("NaViL"), "model_family"]) == {"NaViL"}
    assert bench.loc[bench["model"].str.startswith("NVLM"), "model_family"].eq("NVLM").all()
    # only reported numbers are stored: no NaN and no 0 standing in for "not reported"
    assert bench["score"].notna().all()
    assert (bench["score"] != 0).all()
    # Emu3 reports no MME and MobileVLM-V2-1.7B only MMBench in Table 1
    assert bench[(bench["model"] == "Emu3") & (bench["benchmark"] == "MME")].empty
    assert list(bench.loc[bench["model"] == "MobileVLM-V2-1.7B", "benchmark"]) == ["MMB"]


@pytest.mark.parametrize(
    ("model", "benchmark", "expected"),
    [
        ("NaViL-2B", "MMVet", 78.3),
        ("NaViL-2B", "MME", 1822),
        ("NaViL-2B", "OCRBench", 796),
        ("NaViL-2B", "InfoVQA", 56.0),
        ("NaViL-2B", "Avg (Table 1)", 67.1),
        ("NaViL-9B", "MMMU", 54.7),
        ("NaViL-9B", "DocVQA", 90.6),
        ("NaViL-9B", "Avg (Table 4)", 77.0),
        ("NaViL-9B", "MMLU (text-only, NaViL Table 5)", 74.9),
        ("InternVL-2.5-8B", "Avg (Table 4)", 77.3),
        ("Mono-InternVL", "CCB", 66.3),
        ("SAIL", "MMMU", 38.6),
        ("NVLM-D-72B", "OCRBench", 853),
        ("NVLM-D-72B", "MMMU", 59.7),
        ("NVLM-D-72B", "MMMU (test)", 54.6),
        ("NVLM-D-72B", "AI2D", 85.2),
        ("NVLM-D-72B", "AI2D (no_mask)", 94.2),
        ("NVLM-D-72B", "MATH (text-only, NVLM Table 8)", 73.1),
        ("NVLM-D-72B (HF codebase)", "OCRBench", 852),
        ("Qwen2-72B-Instruct", "Avg (text-only, NVLM Table 8)", 79.8),
    ],
)
def test_benchmark_spot_values(bench, model, benchmark, expected):
    assert score(bench, model, benchmark) == pytest.approx(expected)


def test_reproduced_results_are_flagged(bench):
    row = bench[(bench["model"] == "SAIL") & (bench["benchmark"] == "MMMU")]
    assert "reproduced" in row["note"].iloc[0]
    row = bench[(bench["model"] == "NaViL-2B") & (bench["benchmark"] == "MMMU")]
    assert row["note"].iloc[0] == ""
    assert "Table 4" in row["source"].iloc[0] and "Table 1" in row["source"].iloc[0]


#: The one "Avg" that the transcribed row does not reproduce (documented in the CSV note and README).
#: Elsewhere the tolerance is 0.06, not 0.05: InternVL-2.5-8B's Table 4 average recomputes to 77.247 (paper: 77.3).
KNOWN_AVG_MISMATCH = {("Qwen2VL-2B", "Avg (Table 2)")}


@pytest.mark.parametrize("average", sorted(AVERAGE_METRICS))
def test_recomputed_averages_match_the_paper(bench, average):
    published = bench[bench["benchmark"] == average].set_index("model")["score"]
    assert len(published) >= 10
    matrix = benchmark_matrix(list(published.index), list(AVERAGE_METRICS[average]), table=bench)
    recomputed = recompute_average(matrix, average)
    for model, value in published.items():
        if (model, average) in KNOWN_AVG_MISMATCH:
            assert abs(recomputed[model] - value) > 1.0
            assert "74.57" in bench.loc[(bench["model"] == model) & (bench["benchmark"] == average), "note"].iloc[0]
            assert recomputed[model] == pytest.approx(74.57, abs=0.005)
        else:
            assert recomputed[model] == pytest.approx(value, abs=0.06), model


def test_nvlm_text_only_average_and_delta(bench):
    parts = ["MMLU", "GSM8K", "MATH", "HumanEval"]
    backbone = score(bench, "Qwen2-72B-Instruct", "Avg (text-only, NVLM Table 8)")
    for model in ["Qwen2-72B-Instruct", "NVLM-D-72B", "NVLM-X-72B", "NVLM-H-72B"]:
        mean = np.mean([score(bench, model, f"{p} (text-only, NVLM Table 8)") for p in parts])
        avg = score(bench, model, "Avg (text-only, NVLM Table 8)")
        assert mean == pytest.approx(avg, abs=0.051)
        if model != "Qwen2-72B-Instruct":
            delta = score(bench, model, "Text-only Avg Δ vs LLM backbone (NVLM Table 8)")
            assert avg - backbone == pytest.approx(delta, abs=0.051)


def test_benchmark_matrix_order_percent_and_errors(bench):
    matrix = benchmark_matrix(["NaViL-9B", "NaViL-2B", "NVLM-D-72B"], ["OCRBench", "MME", "MMMU"], percent=True)
    assert list(matrix.index) == ["NaViL-9B", "NaViL-2B", "NVLM-D-72B"]
    assert list(matrix.columns) == ["OCRBench", "MME", "MMMU"]
    assert matrix.loc["NaViL-2B", "OCRBench"] == pytest.approx(79.6)
    assert matrix.loc["NaViL-2B", "MME"] == pytest.approx(1822 / 28)
    assert matrix.loc["NaViL-9B", "MMMU"] == pytest.approx(54.7)
    assert math.isnan(matrix.loc["NVLM-D-72B", "MME"])  # not reported -> NaN
    with pytest.raises(PaperDataError, match="NaViL-3B"):
        benchmark_matrix(["NaViL-3B"], ["MMMU"])
    with pytest.raises(PaperDataError, match="MMMMU"):
        benchmark_matrix(["NaViL-2B"], ["MMMMU"])


# ------------------------------------------------------------------------------------------ architecture
def test_architecture_table6_and_nvlm_values(arch):
    two, nine, nvlm = arch.loc["NaViL-2B"], arch.loc["NaViL-9B"], arch.loc["NVLM-D-72B"]
    vit = ["vit_params_b", "vit_depth", "vit_width", "vit_mlp_width", "vit_heads"]
    llm = ["llm_params_b", "llm_depth", "llm_width", "llm_mlp_width", "llm_heads", "llm_kv_heads"]
    assert list(two[vit]) == [0.6, 24, 1472, 5888, 23]
    assert list(nine[vit]) == [1.2, 32, 1792, 7168, 28]
    assert list(nvlm[vit[1:]]) == [45, 3200, 12800, 25]
    assert list(two[llm]) == [1.8, 24, 2048, 8192, 16, 8]
    assert list(nine[llm]) == [8.0, 36, 4096, 12288, 32, 8]
    assert list(nvlm[llm[1:]]) == [80, 8192, 29568, 64, 8]
    assert (two.total_params_b, two.active_params_b, nine.active_params_b) == (4.2, 2.4, 9.2)
    assert pd.isna(nine.total_params_b) and pd.isna(nvlm.llm_params_b)  # not reported
    assert two.patch_size_px == nine.patch_size_px == 16 and nvlm.patch_size_px == 14
    assert nvlm.tile_size_px == 448 and nvlm.max_tiles == 6
    assert (two.training_tokens_b, nine.training_tokens_b) == (800, 450)


def test_architecture_derived_columns_are_consistent(arch):
    assert (arch["vit_head_dim"] * arch["vit_heads"] == arch["vit_width"]).all()
    assert (arch["vit_mlp_width"] == 4 * arch["vit_width"]).all()
    merge = (1 / arch["pixel_shuffle_ratio"]).astype(int)
    assert (arch["visual_token_stride_px"] == arch["patch_size_px"] * merge).all()
    for model, row in arch.iterrows():  # connector input = 4 merged ViT features, output = LLM width
        assert f"MLP {4 * row.vit_width} -> " in row.connector and row.connector.split("->")[-1].strip().startswith(
            str(row.llm_width)
        ), model
    navil = arch.loc[["NaViL-2B", "NaViL-9B"]]
    # activated = encoder + activated LLM (+ connector/embeddings, < 0.1B rounding)
    assert np.allclose(navil["vit_params_b"] + navil["llm_params_b"], navil["active_params_b"], atol=0.11)


def test_encoder_shapes_parameter_estimate():
    shapes = load_paper_table("encoder_shapes")
    estimate = 12 * shapes["depth"].astype(float) * shapes["width"].astype(float) ** 2 / 1e9
    assert np.allclose(shapes["params_12dw2_b"], estimate.round(3))
    # every Fig. 4 configuration is a ~600M encoder, within 5%
    fig4 = shapes[shapes["study"] == "depth vs width at fixed 600M"]
    assert list(fig4["depth"]) == [3, 6, 12, 24, 48]
    assert np.allclose(fig4["params_12dw2_b"], 0.6, rtol=0.05)


def test_architecture_summary_shows_every_model_and_gaps():
    summary = architecture_summary()
    assert list(summary.columns) == ["NaViL-2B", "NaViL-9B", "NVLM-D-72B"]
    assert summary.loc["total params (B)", "NaViL-9B"] == "–"
    assert summary.loc["ViT width", "NaViL-2B"] == "1472"
    assert summary.loc["activated params (B)", "NaViL-2B"] == "2.4"
    with pytest.raises(PaperDataError):
        architecture_summary(["NaViL-3B"])


# ------------------------------------------------------------------------------------------ scaling + recipe
def test_optimal_encoder_rule_is_log_linear():
    grid = load_paper_table("scaling_grid")
    assert sorted(set(grid["llm_size_b"])) == [0.5, 1.8, 7.0]
    assert sorted(set(grid["visual_encoder_size_b"])) == [0.075, 0.15, 0.3, 0.6, 1.2, 2.4]
    best = grid[grid["optimal_encoder"]].sort_values("llm_size_b")
    assert list(best["visual_encoder_size_b"]) == [0.3, 0.6, 1.2]
    assert grid.groupby("llm_size_b")["optimal_encoder"].sum().eq(1).all()
    fit = fit_power_law(best["llm_size_b"], best["visual_encoder_size_b"])
    assert fit.exponent == pytest.approx(0.525, abs=0.005)
    assert np.allclose(fit.predict(best["llm_size_b"]), best["visual_encoder_size_b"], rtol=0.03)


def test_fit_power_law_recovers_exact_law_and_rejects_bad_input():
    x = np.array([0.1, 1.0, 10.0, 100.0])
    fit = fit_power_law(x, 3.0 * x**0.7)
    assert fit.exponent == pytest.approx(0.7) and fit.coefficient == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([1.0, 1.0], [1.0, 2.0])


def test_training_curves_match_paper_claims():
    curves = load_paper_table("training_curves")
    loss = curves[curves["metric"] == "val_loss"]
    # every validation-loss curve decreases with more data
    for (figure, series), points in loss.groupby(["figure", "series"]):
        values = points.sort_values("samples_m")["value"].to_numpy()
        assert (np.diff(values) < 0).all(), (figure, series)
    moe = loss[loss["figure"] == "Fig. 3"].pivot(index="samples_m", columns="series", values="value")
    assert (moe["w/ MoE"] < moe["w/o MoE"]).all()
    # "same loss with 1/10 of the data": w/ MoE at 14.8M beats w/o MoE at 115M
    assert moe.loc[14.8, "w/ MoE"] < moe.loc[115, "w/o MoE"]
    teaser = loss[(loss["figure"] == "Fig. 1 (middle)") & (loss["samples_m"] == 120)].set_index("series")["value"]
    assert list(teaser[["LLM 0.5B", "LLM 1.8B", "LLM 7B"]]) == [1.06, 0.80, 0.67]


def test_navil_2b_recipe_steps_times_batch_match_stage_data():
    recipe = load_paper_table("training_recipe").set_index(["model", "stage"])
    two = recipe.loc["NaViL-2B"]
    seen_m = two["steps_k"] * 1e3 * two["global_batch"].astype(float) / 1e6
    assert np.allclose(seen_m, two["samples_m"], rtol=0.03)
    assert list(two["max_image_patches"]) == [4096, 12188, 24576]
    assert not recipe.loc[("NaViL-9B", "S1.1"), "multiscale_packing"]
    assert pd.isna(recipe.loc[("NaViL-9B", "S2"), "global_batch"])  # garbled in the OCR -> left empty


def test_nvlm_tile_tag_ablation_prefers_1d_tags():
    ablation = load_paper_table("nvlm_tile_tag_ablation").pivot(index="variant", columns="benchmark", values="score")
    assert ablation.shape == (5, 7)
    assert ablation.loc["DHR + 1-D tag", "OCRBench"] == 806
    assert ablation["OCRBench"].idxmax() == "DHR + 1-D tag"


# ------------------------------------------------------------------------------------------ plots
def test_plot_helpers_draw_expected_artists(bench):
    families = dict(zip(bench["model"], bench["model_family"]))
    models = ["NaViL-2B", "InternVL-2.5-2B", "Qwen2VL-2B", "EVEv2", "SAIL"]
    colours = model_colours(models, families)
    assert colours["NaViL-2B"] == "#1f77b4" and len(set(colours.values())) == len(models)

    matrix = benchmark_matrix(models, ["MMMU", "OCRBench", "CCB"], percent=True, table=bench)
    fig, ax = plt.subplots()
    plot_grouped_bars(matrix, ax, colours)
    assert len(ax.patches) == matrix.size
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights[-1] == pytest.approx(83.9)  # NaViL-2B CCB
    plt.close(fig)

    fig, ax = plt.subplots(subplot_kw={"projection": "polar"})
    plot_radar(matrix, ax, colours)
    assert len(ax.lines) == len(models)
    with pytest.raises(ValueError, match="Fuyu"):
        plot_radar(benchmark_matrix(["Fuyu-8B (HD)"], ["MMMU", "MMVet"], table=bench), ax)
    plt.close(fig)

    curves = load_paper_table("training_curves")
    fig, ax = plt.subplots()
    plot_training_curves(curves, "Fig. 2", "val_loss", ax)
    assert len(ax.lines) == 4  # two series, each solid + dashed extension
    assert ax.get_xscale() == "log"
    plt.close(fig)

    grid = load_paper_table("scaling_grid")
    best = grid[grid["optimal_encoder"]]
    fig, ax = plt.subplots()
    plot_optimal_encoder(grid, fit_power_law(best["llm_size_b"], best["visual_encoder_size_b"]), ax)
    assert ax.get_yscale() == "log" and "0.53" in ax.get_legend().get_texts()[-1].get_text()
    plt.close(fig)

    fig, ax = plt.subplots()
    plot_params_vs_score(bench, "Avg (Table 4)", ax, label_models=["NaViL-9B"])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["compositional", "native", "NaViL"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 14  # models with a Table 4 average
    assert [t.get_text() for t in ax.texts] == ["NaViL-9B"]
    plt.close(fig)


# ------------------------------------------------------------------------------------------ issue 16 helpers
def test_benchmarks_ahead_of_navil_2b_at_2b_scale(bench):
    from navil_utils.paper.tables import benchmarks_ahead, leads_table

    all_14 = list(AVERAGE_METRICS["Avg (Table 1)"]) + list(AVERAGE_METRICS["Avg (Table 2)"])
    qwen = benchmarks_ahead("Qwen2VL-2B", "NaViL-2B", all_14, table=bench)
    assert list(qwen.index) == ["MMB", "MME", "OCRBench", "TextVQA", "GQA", "DocVQA", "AI2D", "InfoVQA"]
    assert qwen.loc["DocVQA", "margin"] == pytest.approx(4.7)
    assert qwen.loc["InfoVQA", "margin"] == pytest.approx(9.5)
    assert qwen.loc["AI2D", "margin"] == pytest.approx(0.1)
    internvl = benchmarks_ahead("InternVL-2.5-2B", "NaViL-2B", all_14, table=bench)
    assert list(internvl.index) == ["MMMU", "MMB", "MME", "MathVista", "OCRBench", "SQA-I", "GQA", "DocVQA", "AI2D",
                                    "ChartQA", "InfoVQA"]
    # the reverse direction: NaViL-2B leads its compositional twin on the remaining three
    assert list(benchmarks_ahead("NaViL-2B", "InternVL-2.5-2B", all_14, table=bench).index) == ["MMVet", "CCB",
                                                                                                "TextVQA"]
    table = leads_table("NaViL-2B", ["InternVL-2.5-2B", "Qwen2VL-2B", "Mono-InternVL", "EVEv2", "SAIL"], all_14,
                        table=bench)
    assert table["ahead"].to_dict() == {"InternVL-2.5-2B": 11, "Qwen2VL-2B": 8, "Mono-InternVL": 1, "EVEv2": 4,
                                        "SAIL": 3}
    assert (table["compared"] == 14).all()
    assert table.loc["SAIL", "ahead on"] == "MathVista, TextVQA, AI2D"
    # models missing a benchmark are compared only where both report
    nine = leads_table("NaViL-9B", ["NVLM-D-72B", "Qwen2.5-VL-7B"], ["MMMU", "MathVista", "MMVet"], table=bench)
    assert nine.loc["NVLM-D-72B", "compared"] == 2 and nine.loc["NVLM-D-72B", "ahead on"] == "MMMU"
    assert nine.loc["Qwen2.5-VL-7B", "ahead"] == 2


def test_samples_to_reach_interpolates_in_log_samples():
    from navil_utils.paper.tables import samples_to_reach

    assert samples_to_reach([10, 100], [2.0, 1.0], 1.5) == pytest.approx(math.sqrt(10 * 100))
    assert samples_to_reach([10, 100], [2.0, 1.0], 1.0) == pytest.approx(100)
    assert samples_to_reach([10, 100], [2.0, 1.0], 2.5) == pytest.approx(10)  # already below at the first point
    assert math.isnan(samples_to_reach([10, 100], [2.0, 1.0], 0.5))
    with pytest.raises(ValueError, match="increasing"):
        samples_to_reach([100, 10], [2.0, 1.0], 1.5)


def test_data_efficiency_of_llm_init_and_moe():
    from navil_utils.paper.tables import data_efficiency

    curves = load_paper_table("training_curves")
    init = data_efficiency(curves, "Fig. 2", "w/ LLM init", "w/o LLM init", [1.79, 1.25, 1.0, 0.88, 0.76, 0.74])
    assert init.loc[1.0, "w/ LLM init (M samples)"] == pytest.approx(29.0)
    assert init.loc[1.0, "w/o LLM init (M samples)"] == pytest.approx(84.0)
    # ~3x in mid-training, more at both ends, ~9x late on the dashed extension (the paper: > 10x)
    assert list(init["ratio"]) == [7.6, 3.6, 2.9, 2.4, 8.5, 8.8]
    assert list(init["uses_dashed_extension"]) == [False, False, False, False, True, True]
    moe = data_efficiency(curves, "Fig. 3", "w/ MoE", "w/o MoE", [2.0, 1.9, 1.77])
    assert list(moe["ratio"]) == [6.6, 11.1, 16.2]
    assert not moe["uses_dashed_extension"].any()
    with pytest.raises(PaperDataError, match="no val_loss curve"):
        data_efficiency(curves, "Fig. 2", "w/ LLM init", "w/ MoE", [1.0])


def test_spread_positions_keeps_order_gap_and_untouched_labels():
    from navil_utils.plotting.paper import spread_positions

    assert spread_positions([0.0, 10.0], 1.0) == [0.0, 10.0]  # far apart: unchanged
    placed = spread_positions([5.0, 5.2, 5.1, 20.0], 1.0)
    assert placed[3] == 20.0
    ordered = sorted(placed[:3])
    assert np.allclose(np.diff(ordered), 1.0) and np.mean(placed[:3]) == pytest.approx(5.1)
    assert placed[0] < placed[2] < placed[1]  # keeps the wanted order
    assert spread_positions([3.0, 3.0], 2.0) == [2.0, 4.0]  # ties: input order


def test_issue16_plots_dots_unreliable_grid_and_label_spacing(bench):
    from navil_utils.plotting.paper import UNRELIABLE_GRID_LABEL, plot_benchmark_dots

    families = dict(zip(bench["model"], bench["model_family"]))
    models = ["NaViL-9B", "InternVL-2.5-8B", "NVLM-D-72B"]
    matrix = benchmark_matrix(models, ["MMMU", "OCRBench", "MMVet"], percent=True, table=bench)
    fig, ax = plt.subplots()
    plot_benchmark_dots(matrix, ax, model_colours(models, families))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["MMMU", "OCRBench", "MMVet"]
    # NVLM-D-72B reports no MMVet: 8 dots, not 9; OCRBench on the 0-100 scale
    assert sum(len(c.get_offsets()) for c in ax.collections) == 8
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    assert xs.max() == pytest.approx(85.3) and xs.min() == pytest.approx(54.7)
    plt.close(fig)

    grid = load_paper_table("scaling_grid")
    best = grid[grid["optimal_encoder"]]
    fig, ax = plt.subplots()
    plot_optimal_encoder(grid, fit_power_law(best["llm_size_b"], best["visual_encoder_size_b"]), ax)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == UNRELIABLE_GRID_LABEL and "unreliable" in texts[0]
    assert ax.collections[0].get_facecolors().size == 0  # hollow markers
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_xlim(1.5, 12)
    plot_params_vs_score(bench, "Avg (Table 4)", ax,
                         label_models={"InternVL-2.5-8B": (-6, 0), "Qwen2VL-7B": (-6, 0), "NaViL-9B": (6, 0)})
    fig.canvas.draw()
    boxes = {t.get_text(): t.get_window_extent() for t in ax.texts}
    assert not boxes["InternVL-2.5-8B"].overlaps(boxes["Qwen2VL-7B"])  # 77.3 vs 77.1: pushed apart
    assert boxes["NaViL-9B"].x0 > boxes["InternVL-2.5-8B"].x1  # other side: untouched
    plt.close(fig)
