"""Numbers published in the NaViL and NVLM papers, as typed pandas tables.

The CSV files under ``data/paper/`` are hand-checked transcriptions (``data/paper/README.md`` gives
every table's source and caveats).  This module loads them with a fixed schema and offers the few
reshapes notebooks need (fits live in :mod:`navil_utils.analysis.scaling`):

    >>> bench = load_paper_table("benchmarks")                     # tidy: one row per (model, benchmark)
    >>> benchmark_matrix(["NaViL-2B", "NaViL-9B"], ["MMMU", "OCRBench"], percent=True)

Empty CSV cells mean "not reported" and load as NaN / <NA>, never 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from navil_utils.errors import PaperDataError
from navil_utils.paths import data_dir

_TEXT = "text"
_FLOAT = "float64"
_INT = "Int64"  # nullable integer: empty cell -> <NA>
_BOOL = "bool"


def _schema(text: str = "", floats: str = "", ints: str = "", bools: str = "") -> dict[str, str]:
    """Column -> dtype, built from whitespace-separated column names (in file order is not required)."""
    columns: dict[str, str] = {}
    for kind, names in ((_TEXT, text), (_FLOAT, floats), (_INT, ints), (_BOOL, bools)):
        for name in names.split():
            columns[name] = kind
    return columns


#: name -> {column: dtype} of every table in ``data/paper/`` (column order = file order is checked separately).
PAPER_TABLE_SCHEMAS: dict[str, dict[str, str]] = {
    "benchmarks": _schema(
        text="model model_family benchmark unit source note", floats="active_params_b score"
    ),
    "architecture": _schema(
        text="model model_family vision_encoder vit_attention vit_position_encoding vit_training image_input "
        "connector llm source note",
        floats="vit_params_b pixel_shuffle_ratio llm_params_b total_params_b active_params_b training_tokens_b",
        ints="vit_depth vit_width vit_mlp_width vit_heads vit_head_dim patch_size_px tile_size_px max_tiles "
        "min_pixels max_pixels visual_token_stride_px llm_experts llm_depth llm_width llm_mlp_width llm_heads "
        "llm_kv_heads vocab_size",
    ),
    "training_curves": _schema(
        text="figure series metric source note", floats="samples_m value", bools="dashed_extension"
    ),
    "scaling_grid": _schema(
        text="training_samples_m source note", floats="llm_size_b visual_encoder_size_b", bools="optimal_encoder"
    ),
    "encoder_shapes": _schema(
        text="study name source note", floats="params_reported_b params_12dw2_b", ints="depth width mlp_width heads"
    ),
    "training_recipe": _schema(
        text="model stage trainable data lr_schedule source note",
        floats="samples_m steps_k peak_lr final_lr weight_decay adam_beta2",
        ints="global_batch warmup_steps max_image_patches max_tiles max_seq_len",
        bools="multiscale_packing",
    ),
    "nvlm_tile_tag_ablation": _schema(text="variant benchmark unit source note", floats="score"),
}

#: Allowed values of ``model_family`` in the benchmark table.
MODEL_FAMILIES = ("NaViL", "NVLM", "compositional", "native", "LLM")

#: Multiplier that puts a benchmark on a 0-100 scale (the papers' convention for their "Avg" columns):
#: MME is a sum of perception (max 2000) and cognition (max 800) scores; OCRBench has 1000 points.
PERCENT_SCALE: dict[str, float] = {"MME": 100.0 / 2800.0, "OCRBench": 0.1}

#: Metrics averaged by each "Avg" column of the NaViL paper (mean over the metrics a model reports,
#: each on a 0-100 scale).  Recomputing them reproduces the paper to +-0.05 (see tests/test_paper.py).
AVERAGE_METRICS: dict[str, tuple[str, ...]] = {
    "Avg (Table 1)": ("MMVet", "MMMU", "MMB", "MME", "MathVista", "OCRBench", "CCB"),
    "Avg (Table 2)": ("TextVQA", "SQA-I", "GQA", "DocVQA", "AI2D", "ChartQA", "InfoVQA"),
    "Avg (Table 4)": (
        "MMVet", "MMMU", "MMB", "MME", "MathVista", "OCRBench",
        "TextVQA", "DocVQA", "AI2D", "ChartQA", "InfoVQA",
    ),
}


def available_paper_tables() -> list[str]:
    """Names accepted by :func:`load_paper_table` (file stems in ``data/paper/``)."""
    return sorted(PAPER_TABLE_SCHEMAS)


def paper_data_dir() -> Path:
    """The folder holding the transcribed CSV files (``<repo>/data/paper``)."""
    return data_dir() / "paper"


def load_paper_table(name: str) -> pd.DataFrame:
    """Load ``data/paper/<name>.csv`` with its documented column dtypes.

    Numeric columns are ``float64`` (or nullable ``Int64`` for counts), flags are ``bool`` and text
    columns are strings with empty cells as ``""``; an empty numeric cell ("not reported") is NaN/<NA>.
    Raises :class:`~navil_utils.errors.PaperDataError` for an unknown name (listing the available
    tables), a missing file, or a file whose columns differ from the schema.
    """
    if name not in PAPER_TABLE_SCHEMAS:
        raise PaperDataError(
            f"unknown paper table {name!r}; available tables: {', '.join(available_paper_tables())}"
        )
    schema = PAPER_TABLE_SCHEMAS[name]
    path = paper_data_dir() / f"{name}.csv"
    if not path.is_file():
        raise PaperDataError(f"paper table {name!r} is registered but its file {path} does not exist")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in schema if c not in raw.columns]
    extra = [c for c in raw.columns if c not in schema]
    if missing or extra:
        raise PaperDataError(f"{path} does not match its schema: missing columns {missing}, unexpected columns {extra}")
    table = pd.DataFrame(index=raw.index)
    for column in raw.columns:
        kind, values = schema[column], raw[column].str.strip()
        try:
            if kind == _TEXT:
                table[column] = values
            elif kind == _BOOL:
                table[column] = _parse_bool(values)
            else:
                numbers = pd.to_numeric(values.replace("", np.nan), errors="raise")
                table[column] = numbers.astype(kind)
        except (ValueError, TypeError) as exc:
            raise PaperDataError(f"{path}: column {column!r} is not valid {kind}: {exc}") from exc
    return table


def _parse_bool(values: pd.Series) -> pd.Series:
    mapping = {"True": True, "False": False, "true": True, "false": False}
    bad = sorted(set(values) - set(mapping))
    if bad:
        raise ValueError(f"expected True/False, got {bad}")
    return values.map(mapping).astype(bool)


def percent_scores(scores: pd.Series, benchmarks: pd.Series | str) -> pd.Series:
    """Put scores on a 0-100 scale (MME / 28, OCRBench / 10, everything else unchanged).

    ``benchmarks`` is either one benchmark name or a Series aligned with ``scores``.
    """
    if isinstance(benchmarks, str):
        return scores * PERCENT_SCALE.get(benchmarks, 1.0)
    factors = benchmarks.map(lambda b: PERCENT_SCALE.get(b, 1.0)).astype(float)
    return scores * factors


def benchmark_matrix(
    models: Sequence[str] | None = None,
    benchmarks: Sequence[str] | None = None,
    *,
    percent: bool = False,
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Scores as a ``[model, benchmark]`` matrix (rows and columns in the requested order).

    ``None`` selects every model / benchmark (in file order).  With ``percent=True`` the scores are
    rescaled to 0-100 (:data:`PERCENT_SCALE`).  Unreported scores are NaN.  Raises
    :class:`~navil_utils.errors.PaperDataError` naming any model or benchmark not in the table.
    """
    tidy = load_paper_table("benchmarks") if table is None else table
    models = list(dict.fromkeys(tidy["model"])) if models is None else list(models)
    benchmarks = list(dict.fromkeys(tidy["benchmark"])) if benchmarks is None else list(benchmarks)
    _check_known("model", models, tidy["model"])
    _check_known("benchmark", benchmarks, tidy["benchmark"])
    scores = percent_scores(tidy["score"], tidy["benchmark"]) if percent else tidy["score"]
    matrix = tidy.assign(score=scores).pivot(index="model", columns="benchmark", values="score")
    matrix = matrix.reindex(index=models, columns=benchmarks)
    matrix.index.name, matrix.columns.name = "model", "benchmark"
    return matrix


def _check_known(kind: str, requested: Iterable[str], known: pd.Series) -> None:
    unknown = [name for name in requested if name not in set(known)]
    if unknown:
        raise PaperDataError(f"unknown {kind}(s) {unknown}; known: {', '.join(dict.fromkeys(known))}")


def recompute_average(matrix: pd.DataFrame, average: str) -> pd.Series:
    """Recompute one of the NaViL paper's "Avg" columns from a raw (not percent) benchmark matrix.

    Mean over the metrics of :data:`AVERAGE_METRICS` ``[average]`` that each model reports, every
    metric rescaled to 0-100.  Returns one value per row of ``matrix`` (NaN if it reports none).
    """
    if average not in AVERAGE_METRICS:
        raise PaperDataError(f"unknown average {average!r}; known: {', '.join(AVERAGE_METRICS)}")
    metrics = list(AVERAGE_METRICS[average])
    _check_known("benchmark", metrics, pd.Series(matrix.columns))
    scaled = pd.DataFrame({m: percent_scores(matrix[m], m) for m in metrics})
    return scaled.mean(axis=1, skipna=True).rename(average)


#: Rows of :func:`architecture_summary`: (architecture.csv column, readable label).
ARCHITECTURE_FIELDS: tuple[tuple[str, str], ...] = (
    ("vision_encoder", "vision encoder"),
    ("vit_params_b", "ViT params (B)"),
    ("vit_depth", "ViT depth (layers)"),
    ("vit_width", "ViT width"),
    ("vit_mlp_width", "ViT MLP width"),
    ("vit_heads", "ViT attention heads"),
    ("patch_size_px", "patch size (px)"),
    ("vit_position_encoding", "ViT position encoding"),
    ("image_input", "image input"),
    ("visual_token_stride_px", "one visual token covers (px, square side)"),
    ("connector", "connector"),
    ("llm", "LLM"),
    ("llm_experts", "experts per layer (by modality)"),
    ("llm_params_b", "LLM activated params (B)"),
    ("llm_depth", "LLM depth (layers)"),
    ("llm_width", "LLM width"),
    ("llm_mlp_width", "LLM MLP width"),
    ("llm_heads", "LLM attention heads"),
    ("llm_kv_heads", "LLM KV heads"),
    ("total_params_b", "total params (B)"),
    ("active_params_b", "activated params (B)"),
    ("training_tokens_b", "training tokens (B)"),
)


def architecture_summary(models: Sequence[str] | None = None) -> pd.DataFrame:
    """The architecture table transposed for reading: one row per field, one column per model.

    Unreported values show as ``"–"``; integers print without decimals.
    """
    arch = load_paper_table("architecture").set_index("model")
    models = list(arch.index) if models is None else list(models)
    _check_known("model", models, pd.Series(arch.index))
    columns = [column for column, _ in ARCHITECTURE_FIELDS]
    shown = arch.loc[models, columns].astype(object).where(arch.loc[models, columns].notna(), "–")
    shown = shown.map(lambda v: "–" if v == "" else (f"{v:g}" if isinstance(v, float) else str(v)))
    summary = shown.T
    summary.index = [label for _, label in ARCHITECTURE_FIELDS]
    summary.index.name, summary.columns.name = "field", "model"
    return summary


def benchmarks_ahead(
    model: str,
    reference: str,
    benchmarks: Sequence[str] | None = None,
    *,
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Benchmarks on which ``model`` scores strictly higher than ``reference``.

    Only benchmarks both models report are compared (``None`` = every benchmark, in file order).
    Returns one row per benchmark won, in the requested order, with the two raw scores and the
    ``margin`` (model − reference, in the benchmark's own unit).
    """
    matrix = benchmark_matrix([model, reference], benchmarks, table=table)
    both = matrix.T.dropna()
    ahead = both[both[model] > both[reference]]
    return ahead.assign(margin=(ahead[model] - ahead[reference]).round(2))


def leads_table(
    reference: str,
    models: Sequence[str],
    benchmarks: Sequence[str],
    *,
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """For each of ``models``: on which of ``benchmarks`` it beats ``reference`` (strictly), and how often.

    Columns: ``compared`` (benchmarks both report), ``ahead`` (count), ``ahead on`` (comma-separated,
    in the order of ``benchmarks``).
    """
    rows = []
    for model in models:
        matrix = benchmark_matrix([model, reference], benchmarks, table=table)
        won = benchmarks_ahead(model, reference, benchmarks, table=table)
        rows.append({"model": model, "compared": int(matrix.notna().all().sum()), "ahead": len(won),
                     "ahead on": ", ".join(won.index)})
    return pd.DataFrame(rows).set_index("model")


def samples_to_reach(samples: Sequence[float], values: Sequence[float], target: float) -> float:
    """Samples at which a decreasing loss curve first reaches ``target`` (NaN if it never does).

    Interpolates linearly in log(samples) between the two points that bracket ``target`` (the paper's
    x axes are logarithmic).  Points must be sorted by ``samples``.
    """
    x = np.log(np.asarray(samples, dtype=float))
    y = np.asarray(values, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("samples and values must be non-empty and of equal length")
    if np.any(np.diff(x) <= 0):
        raise ValueError("samples must be strictly increasing")
    if y[0] <= target:
        return float(np.exp(x[0]))
    below = np.nonzero(y <= target)[0]
    if below.size == 0:
        return float("nan")
    i = int(below[0])
    fraction = (y[i - 1] - target) / (y[i - 1] - y[i])
    return float(np.exp(x[i - 1] + fraction * (x[i] - x[i - 1])))


def data_efficiency(
    curves: pd.DataFrame,
    figure: str,
    faster: str,
    slower: str,
    targets: Sequence[float],
    metric: str = "val_loss",
) -> pd.DataFrame:
    """How many times more samples ``slower`` needs than ``faster`` to reach each target loss.

    ``curves`` is ``training_curves.csv``.  Returns one row per target: the samples (M) each series
    needs (log-linear interpolation, :func:`samples_to_reach`), their ``ratio`` and
    ``uses_dashed_extension`` — True when a bracketing point is the paper's dashed ~1B-sample
    extension, where interpolation across a 10× gap is only a rough estimate.
    """
    selected = curves[(curves["figure"] == figure) & (curves["metric"] == metric)]
    points = {}
    for series in (faster, slower):
        rows = selected[selected["series"] == series].sort_values("samples_m")
        if rows.empty:
            raise PaperDataError(f"no {metric} curve {series!r} in {figure!r}")
        points[series] = rows
    out = []
    for target in targets:
        row: dict[str, float | bool] = {"target loss": float(target)}
        dashed = False
        for series in (faster, slower):
            rows = points[series]
            reached = samples_to_reach(rows["samples_m"], rows["value"], target)
            row[f"{series} (M samples)"] = round(reached, 1)
            solid_max = rows.loc[~rows["dashed_extension"], "samples_m"].max()
            dashed = dashed or bool(reached > solid_max * (1 + 1e-9))
        row["ratio"] = round(row[f"{slower} (M samples)"] / row[f"{faster} (M samples)"], 1)
        row["uses_dashed_extension"] = dashed
        out.append(row)
    return pd.DataFrame(out).set_index("target loss")
