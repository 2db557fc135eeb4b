"""Scaling analysis: the paper's optimal-encoder rule, log-log fits, saturating power laws, bootstrap intervals.

NaViL (§3.3) trains a grid of LLM sizes × visual-encoder sizes × data budgets and reads two things off it:

* with the LLM fixed, the validation loss falls as the encoder grows until the gain from doubling the
  encoder is negligible — the **optimal encoder** of that LLM is the smallest encoder ``V`` whose loss
  differs from that of the encoder ``2V`` by less than ``λ`` (1 %) of a reference loss, the loss with the
  smallest encoder tested (:func:`optimal_encoder`);
* the optimal encoder grows with the LLM as a power law (a straight line in log-log:
  0.5B → 0.3B, 1.8B → 0.6B, 7B → 1.2B; :func:`fit_power_law`, :func:`bootstrap_optimal_encoder_fit`).

Loss curves themselves are fitted with a saturating power law ``L = E + A·N^-α`` (optionally ``+ B·D^-β``
for the data term), by minimising a Huber loss on log residuals with multi-start L-BFGS, as is usual for
scaling-law fits (:func:`fit_saturating_power_law`, :func:`bootstrap_saturating_power_law`).

Nothing here draws; figures of these results belong to the plotting package.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

#: The paper's tolerance of the optimal-encoder rule (1 %).
PAPER_LAMBDA = 0.01


# ---------------------------------------------------------------------------------------------------
# straight lines in log-log
class PowerLaw(NamedTuple):
    """``y = coefficient · x ** exponent`` (a straight line in log-log axes)."""

    coefficient: float
    exponent: float

    def predict(self, x: Any) -> np.ndarray:
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least-squares fit of ``log y = log c + k log x`` (both in any consistent unit).

    Needs at least two distinct, strictly positive ``x`` values and positive ``y``.
    """
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.shape != y_arr.shape or x_arr.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length, got shapes {x_arr.shape} and {y_arr.shape}")
    if np.any(x_arr <= 0) or np.any(y_arr <= 0):
        raise ValueError("a power-law fit needs strictly positive x and y")
    if np.unique(x_arr).size < 2:
        raise ValueError("a power-law fit needs at least two distinct x values")
    if np.unique(y_arr).size == 1:      # a flat line: exactly exponent 0 (a solver's ±1e-17 would print "-0.00")
        return PowerLaw(coefficient=float(y_arr[0]), exponent=0.0)
    exponent, log_c = np.polyfit(np.log(x_arr), np.log(y_arr), deg=1)
    return PowerLaw(coefficient=float(np.exp(log_c)), exponent=float(exponent))


# ---------------------------------------------------------------------------------------------------
# the optimal-encoder rule
def nominal_encoder_size(width: int, layers: int) -> int:
    """``12 · layers · width²``: the transformer parameters of a ViT, the paper's size convention (its
    600M encoders are 12·d·w² for d3-w4096 … d48-w1024).  Unlike the exact count it leaves out the patch
    embedding, which is a large fixed share of a miniature ViT, so doubling the depth doubles this size."""
    return 12 * int(layers) * int(width) ** 2


def optimal_encoder(losses: Mapping[float, float], lam: float = PAPER_LAMBDA,
                    relative_to: str = "smallest") -> float | None:
    """The smallest encoder size ``V`` with ``L(V) − L(2V) < λ · L_ref``; None if no size qualifies.

    Args:
        losses: ``{encoder size: validation loss}`` for one LLM (and one data budget).  Sizes count as
            doubling when their ratio is within 5 % of 2 (parameter counts of real models are not exact).
        lam: the tolerance λ (the paper: 1 %).
        relative_to: ``"smallest"`` — ``L_ref`` is the loss of the smallest encoder in ``losses`` (the
            paper's definition: "λ of the loss obtained with the smallest encoder"); ``"larger"`` —
            ``L_ref = L(2V)`` (a relative-gain reading of the rule).
    Returns:
        The optimal size, or None when even the largest doubling still gains at least λ (the grid does not
        reach the optimum: report it as such, not as the largest size).
    """
    if relative_to not in ("smallest", "larger"):
        raise ValueError(f"relative_to must be 'smallest' or 'larger', got {relative_to!r}")
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    sizes = sorted(losses)
    if not sizes:
        raise ValueError("no encoder sizes given")
    reference = float(losses[sizes[0]])
    for size in sizes:
        doubled = next((s for s in sizes if abs(s / size - 2.0) <= 0.1), None)
        if doubled is None:
            continue
        gap = float(losses[size]) - float(losses[doubled])
        threshold = lam * (reference if relative_to == "smallest" else float(losses[doubled]))
        if gap < threshold:
            return size
    return None


def sweep_frame(records: Sequence[Mapping[str, Any]], samples: int | None = None):
    """Sweep records (:mod:`navil_utils.tiny.sweep`) as a runs table for the functions below.

    One row per run and budget (or only ``samples``): ``run_id, seed, lr, samples, val_loss``,
    ``llm_params`` (active decoder parameters per token), ``encoder_params`` (nominal 12·d·w², see
    :func:`nominal_encoder_size`), ``encoder_params_exact`` and ``params_total``.
    """
    import pandas as pd

    rows = []
    for record in records:
        for budget in record["budgets"]:
            if samples is not None and budget["samples"] != samples:
                continue
            rows.append({"run_id": record["run_id"], "seed": record["seed"], "lr": record["lr"],
                         "samples": budget["samples"], "val_loss": budget["val_loss"],
                         "llm_params": record["params_llm_active"],
                         "encoder_params": nominal_encoder_size(record["vit_width"], record["vit_layers"]),
                         "encoder_params_exact": record["params_encoder"], "params_total": record["params_total"]})
    return pd.DataFrame(rows)


def mean_losses(runs: Any, *, llm: str = "llm_params", encoder: str = "encoder_params",
                loss: str = "val_loss") -> dict[float, dict[float, float]]:
    """``{llm size: {encoder size: mean loss over seeds}}`` from a runs table (pandas DataFrame or records)."""
    import pandas as pd

    frame = pd.DataFrame(runs)
    missing = [c for c in (llm, encoder, loss) if c not in frame.columns]
    if missing:
        raise ValueError(f"the runs table lacks column(s) {missing}")
    table: dict[float, dict[float, float]] = {}
    for (n_llm, n_enc), group in frame.groupby([llm, encoder]):
        table.setdefault(float(n_llm), {})[float(n_enc)] = float(group[loss].mean())
    return table


def optimal_encoders(runs: Any, lam: float = PAPER_LAMBDA, relative_to: str = "smallest",
                     **columns: str) -> dict[float, float | None]:
    """The optimal encoder of every LLM size in a runs table (seeds averaged first)."""
    return {n_llm: optimal_encoder(per_encoder, lam, relative_to)
            for n_llm, per_encoder in sorted(mean_losses(runs, **columns).items())}


@dataclass(frozen=True)
class OptimalEncoderFit:
    """Log-log fit of the optimal encoder size against the LLM size, with a bootstrap interval."""

    optima: dict[float, float | None]       # LLM size -> optimal encoder (mean losses)
    fit: PowerLaw | None                     # on the sizes whose optimum was reached (≥ 2 needed)
    exponent_interval: tuple[float, float] | None  # bootstrap percentile interval of the exponent
    bootstrap_optima: dict[float, dict[float | None, int]]  # LLM size -> {optimum: how often}
    resamples: int                           # bootstrap resamples that gave a fit
    confidence: float


def bootstrap_optimal_encoder_fit(runs: Any, lam: float = PAPER_LAMBDA, relative_to: str = "smallest", *,
                                  n_boot: int = 1000, confidence: float = 0.9, seed: int = 0,
                                  llm: str = "llm_params", encoder: str = "encoder_params",
                                  loss: str = "val_loss", seed_column: str = "seed") -> OptimalEncoderFit:
    """Optimal encoders, their log-log fit, and a bootstrap over seeds.

    Each resample draws, for every ``(LLM, encoder)`` cell, its seeds with replacement, averages them,
    re-applies the λ-rule and refits; the exponent's percentile interval and how often each encoder is
    optimal quantify how much the conclusion depends on seed noise.  Cells with a single seed do not vary.
    """
    import pandas as pd

    frame = pd.DataFrame(runs)
    columns = dict(llm=llm, encoder=encoder, loss=loss)
    optima = optimal_encoders(frame, lam, relative_to, **columns)
    fit = _fit_optima(optima)
    rng = np.random.default_rng(seed)
    cells = {key: group[loss].to_numpy(dtype=float) for key, group in frame.groupby([llm, encoder])}
    exponents: list[float] = []
    counts: dict[float, dict[float | None, int]] = {float(n): {} for n in optima}
    for _ in range(n_boot):
        table: dict[float, dict[float, float]] = {}
        for (n_llm, n_enc), values in cells.items():
            table.setdefault(float(n_llm), {})[float(n_enc)] = float(rng.choice(values, size=values.size).mean())
        sample = {n: optimal_encoder(per, lam, relative_to) for n, per in table.items()}
        for n, opt in sample.items():
            counts[n][opt] = counts[n].get(opt, 0) + 1
        resampled = _fit_optima(sample)
        if resampled is not None:
            exponents.append(resampled.exponent)
    interval = None
    if exponents:
        tail = 100 * (1 - confidence) / 2
        interval = (float(np.percentile(exponents, tail)), float(np.percentile(exponents, 100 - tail)))
    return OptimalEncoderFit(optima, fit, interval, counts, len(exponents), confidence)


def _fit_optima(optima: Mapping[float, float | None]) -> PowerLaw | None:
    reached = {n: v for n, v in optima.items() if v is not None}
    if len(set(reached)) < 2:
        return None
    return fit_power_law(list(reached), list(reached.values()))


# ---------------------------------------------------------------------------------------------------
# saturating power laws
@dataclass(frozen=True)
class SaturatingPowerLaw:
    """``L = E + A·N^-α`` (``+ B·D^-β`` when fitted with a data term)."""

    E: float
    A: float
    alpha: float
    B: float | None = None
    beta: float | None = None

    def predict(self, n: Any, d: Any = None) -> np.ndarray:
        loss = self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha
        if self.B is not None:
            if d is None:
                raise ValueError("this law has a data term: pass d")
            loss = loss + self.B * np.asarray(d, dtype=float) ** -self.beta
        return loss


def _huber(residual, delta: float):
    import torch

    absolute = residual.abs()
    return torch.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))


def _check_points(n, loss, d):
    n_arr, l_arr = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    d_arr = None if d is None else np.asarray(d, dtype=float)
    if n_arr.shape != l_arr.shape or n_arr.ndim != 1 or (d_arr is not None and d_arr.shape != n_arr.shape):
        raise ValueError("n, loss (and d) must be 1-D and of equal length")
    if np.any(n_arr <= 0) or np.any(l_arr <= 0) or (d_arr is not None and np.any(d_arr <= 0)):
        raise ValueError("sizes and losses must be strictly positive")
    if n_arr.size < (5 if d_arr is not None else 3):
        raise ValueError(f"too few points ({n_arr.size}) for {'5' if d_arr is not None else '3'} parameters")
    return n_arr, l_arr, d_arr


def _fit_batch(log_n, log_l, log_d, starts, huber_delta: float, max_iter: int):
    """L-BFGS on R independent problems at once (rows of ``log_n``/``log_l``/``log_d`` ``(R, P)``, ``starts``
    ``(R, 3|5)``); returns the parameters and each row's objective.

    Parameters per row: ``u, a, α (, b, β)`` with ``E = min(L)·sigmoid(u)`` — the floor lies below every
    observed loss of its row, and a vanishing floor (a curve that shows no saturation) ends on a flat
    gradient instead of sending ``log E`` to −∞.  The rows share nothing but the optimiser's step: the sum
    of independent objectives has a block-separable gradient.
    """
    import torch

    log_floor = log_l.min(dim=1, keepdim=True).values

    def objectives(params):
        terms = [(log_floor + torch.nn.functional.logsigmoid(params[:, :1])).expand_as(log_n),
                 params[:, 1:2] - params[:, 2:3] * log_n]
        if log_d is not None:
            terms.append(params[:, 3:4] - params[:, 4:5] * log_d)
        return _huber(torch.logsumexp(torch.stack(terms), dim=0) - log_l, huber_delta).sum(dim=1)

    params = starts.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objectives(params).sum()
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        return params.detach(), objectives(params)


def _u_of(log_e: float, log_floor: float) -> float:
    """The ``u`` of ``E = exp(log_floor)·sigmoid(u)`` (clipped inside the open interval)."""
    share = min(max(math.exp(log_e - log_floor), 1e-9), 1 - 1e-9)
    return math.log(share / (1 - share))


def _law_from(row, log_floor: float, n_scale: float, d_scale: float, with_data: bool) -> SaturatingPowerLaw:
    u, a, alpha = (float(v) for v in row[:3])
    log_e = log_floor + math.log(1 / (1 + math.exp(-u))) if u > -700 else -math.inf
    law = SaturatingPowerLaw(E=math.exp(log_e), A=math.exp(a) * n_scale**alpha, alpha=alpha)
    if with_data:
        b, beta = float(row[3]), float(row[4])
        law = SaturatingPowerLaw(law.E, law.A, law.alpha, B=math.exp(b) * d_scale**beta, beta=beta)
    return law


def _start_of(law: SaturatingPowerLaw, log_floor: float, n_scale: float, d_scale: float) -> list[float]:
    start = [_u_of(math.log(max(law.E, 1e-300)), log_floor), math.log(law.A / n_scale**law.alpha), law.alpha]
    if law.B is not None:
        start += [math.log(law.B / d_scale**law.beta), law.beta]
    return start


def fit_saturating_power_law(n: Sequence[float], loss: Sequence[float], d: Sequence[float] | None = None, *,
                             huber_delta: float = 1e-3, max_iter: int = 500,
                             initial: SaturatingPowerLaw | None = None) -> SaturatingPowerLaw:
    """Fit ``L = E + A·N^-α (+ B·D^-β)`` to losses by multi-start L-BFGS on a Huber loss of log residuals.

    Parameterised as ``L = E + exp(a − α log N) (+ exp(b − β log D))`` with ``E = min(L)·sigmoid(u)``
    (positive terms, a floor below every observed loss, one log-sum-exp), the Huber loss (``huber_delta``
    in log units) keeps single outlying runs from dominating, and a grid of starting points (α, β ∈ {0.1,
    0.5, 1.5}; E and A around the range of the data), screened together as one batch before the best is
    refined alone, guards against local minima (``initial``: start from that law only).  Sizes are scaled by their geometric mean
    internally, so ``A``/``B`` come back in the units of ``n``/``d``.  Needs at least 3 (5 with a data term)
    points.  When the data show no floor, ``E`` ends near 0 and the other parameters trade off along a flat
    valley: read the bootstrap intervals.
    """
    import torch

    n_arr, l_arr, d_arr = _check_points(n, loss, d)
    with_data = d_arr is not None
    n_scale = float(np.exp(np.log(n_arr).mean()))
    d_scale = float(np.exp(np.log(d_arr).mean())) if with_data else 1.0
    log_floor = float(np.log(l_arr.min()))
    low, high = log_floor, float(np.log(l_arr.max()))
    if initial is not None:
        starts = [_start_of(initial, log_floor, n_scale, d_scale)]
    else:
        e_starts = (_u_of(low - 2.0, log_floor), _u_of(low - 0.2, log_floor))
        a_starts, exponents = (high - 1.0, high), (0.1, 0.5, 1.5)
        starts = [list(s) for s in itertools.product(e_starts, a_starts, exponents,
                                                      *((a_starts, exponents) if with_data else ()))]
    rows = len(starts)

    def tile(values):
        return torch.tensor(np.log(values), dtype=torch.float64).expand(rows, -1)

    data = (tile(n_arr / n_scale), tile(l_arr), tile(d_arr / d_scale) if with_data else None)
    params = torch.tensor(starts, dtype=torch.float64)
    if rows > 1:  # screen every start together, then refine the best one alone
        params, values = _fit_batch(*data, params, huber_delta, max(20, max_iter // 5))
        finite = torch.isfinite(values)
        if not bool(finite.any()):
            raise RuntimeError("the power-law fit did not converge from any starting point")
        params = params[int(torch.where(finite, values, torch.full_like(values, math.inf)).argmin())][None]
    params, values = _fit_batch(*(x[:1] if x is not None else None for x in data), params, huber_delta, max_iter)
    if not bool(torch.isfinite(values).all()):
        raise RuntimeError("the power-law fit did not converge")
    return _law_from(params[0], log_floor, n_scale, d_scale, with_data)


def bootstrap_saturating_power_law(n: Sequence[float], loss: Sequence[float], d: Sequence[float] | None = None, *,
                                   n_boot: int = 200, confidence: float = 0.9, seed: int = 0,
                                   huber_delta: float = 1e-3, max_iter: int = 500,
                                   resample_iter: int = 100) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every parameter of :func:`fit_saturating_power_law` over resampled points.

    Every resample (points drawn with replacement; resamples with too few distinct sizes are dropped)
    starts from the full-data fit (``max_iter`` L-BFGS iterations); all resamples are optimised together
    as one batch for ``resample_iter`` iterations.
    """
    import torch

    n_arr, l_arr, d_arr = _check_points(n, loss, d)
    with_data = d_arr is not None
    full = fit_saturating_power_law(n_arr, l_arr, d_arr, huber_delta=huber_delta, max_iter=max_iter)
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, n_arr.size, n_arr.size) for _ in range(n_boot)]
    picks = [p for p in picks if np.unique(n_arr[p]).size >= 3]  # a resample needs three distinct sizes
    if not picks:
        return {}
    index = np.stack(picks)
    n_scale = float(np.exp(np.log(n_arr).mean()))
    d_scale = float(np.exp(np.log(d_arr).mean())) if with_data else 1.0
    log_l = torch.tensor(np.log(l_arr[index]), dtype=torch.float64)
    log_floors = log_l.min(dim=1).values
    starts = torch.tensor([_start_of(full, float(f), n_scale, d_scale) for f in log_floors], dtype=torch.float64)
    params, values = _fit_batch(torch.tensor(np.log(n_arr[index] / n_scale), dtype=torch.float64), log_l,
                                torch.tensor(np.log(d_arr[index] / d_scale), dtype=torch.float64) if with_data else None,
                                starts, huber_delta, resample_iter)
    samples: dict[str, list[float]] = {}
    for row, value, floor in zip(params, values, log_floors):
        if not bool(torch.isfinite(value)):
            continue
        law = _law_from(row, float(floor), n_scale, d_scale, with_data)
        for key, parameter in vars(law).items():
            if parameter is not None:
                samples.setdefault(key, []).append(parameter)
    tail = 100 * (1 - confidence) / 2
    return {key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for key, v in samples.items()}


# ---------------------------------------------------------------------------------------------------
# ablations: variants of one configuration, compared budget by budget
def variant_table(groups: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str | None = None):
    """Loss per variant and budget over seeds: ``variant, samples, seeds, mean, min, max`` (+ ``vs baseline``).

    ``groups`` maps a variant name to its sweep records (one per seed).  With ``baseline`` (a key of
    ``groups``), ``vs baseline`` is the variant's mean minus the baseline's at the same budget and
    ``seed spread`` the larger of the two variants' max − min: a difference smaller than it is not resolved.
    """
    import pandas as pd

    rows = []
    for variant, records in groups.items():
        per_budget: dict[int, list[float]] = {}
        for record in records:
            for budget in record["budgets"]:
                per_budget.setdefault(int(budget["samples"]), []).append(float(budget["val_loss"]))
        for samples, losses in sorted(per_budget.items()):
            rows.append({"variant": variant, "samples": samples, "seeds": len(losses), "mean": float(np.mean(losses)),
                         "min": min(losses), "max": max(losses)})
    table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError("no records in any variant")
    if baseline is not None:
        if baseline not in groups:
            raise ValueError(f"baseline {baseline!r} is not one of the variants {sorted(groups)}")
        reference = table[table["variant"] == baseline].set_index("samples")
        table["vs baseline"] = [row["mean"] - reference.loc[row["samples"], "mean"]
                                if row["samples"] in reference.index else np.nan for _, row in table.iterrows()]
        table["seed spread"] = [max(row["max"] - row["min"], reference.loc[row["samples"], "max"]
                                    - reference.loc[row["samples"], "min"])
                                if row["samples"] in reference.index else np.nan for _, row in table.iterrows()]
    return table


def select_runs(records: Sequence[Mapping[str, Any]], **fields: Any) -> list[Mapping[str, Any]]:
    """The sweep records whose fields equal ``fields`` (a record without a field takes the
    :class:`~navil_utils.tiny.sweep.ScalingRun` default: experts on, no text pretraining), e.g.
    ``select_runs(records, llm_width=64, vit_layers=2, visual_experts=False)``."""
    defaults = {"visual_experts": True, "text_pretrain_samples": 0}
    return [r for r in records if all(r.get(k, defaults.get(k)) == v for k, v in fields.items())]


def fit_data_laws(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, n_boot: int = 200,
                  confidence: float = 0.9, seed: int = 0):
    """``L(D) = E + B·D^-β`` fitted to each named loss-vs-data curve ``{name: (samples, losses)}``.

    One row per curve: ``E, B, beta`` with bootstrap percentile intervals (``E low`` … ``beta high``),
    ``points`` and ``max |residual|`` (how far the fitted law is from the worst point: a law that does
    not describe the curve says so here).  Repeated samples (several seeds or encoders) are fine; a curve
    with fewer than three distinct budgets gets a row of NaN.
    """
    import pandas as pd

    rows = []
    for name, (samples, losses) in curves.items():
        samples, losses = np.asarray(samples, dtype=float), np.asarray(losses, dtype=float)
        if np.unique(samples).size < 3:  # three parameters need three distinct budgets
            rows.append({"curve": name, "points": int(samples.size)})
            continue
        law = fit_saturating_power_law(samples, losses)
        intervals = bootstrap_saturating_power_law(samples, losses, n_boot=n_boot, confidence=confidence, seed=seed)
        row = {"curve": name, "points": int(samples.size), "E": law.E, "B": law.A, "beta": law.alpha,
               "max |residual|": float(np.abs(law.predict(samples) - losses).max())}
        for ours, theirs in (("E", "E"), ("B", "A"), ("beta", "alpha")):
            low, high = intervals.get(theirs, (np.nan, np.nan))
            row[f"{ours} low"], row[f"{ours} high"] = low, high
        rows.append(row)
    return pd.DataFrame(rows).set_index("curve")
