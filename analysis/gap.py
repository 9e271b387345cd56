"""Paired loss gaps, how they scale with size, and the tolerated sparsity S*, from runs alone.

A sparse run's gap is its loss minus that of the dense run with the same seed (same init and data
order), model, tokens and task, so ΔL is measured within a seed and its interval comes from the
seeds (paired t-interval; none with one seed). Sizes are non-embedding parameters (`load.SIZE`).

A *regime* is a matched training budget: a run's `tag` when the sweep sets one (figure 1:
"scaled" = fixed tokens per parameter, "fixed" = one step count), else one token count per
regime when sizes share several, else the whole table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pandas as pd
import scipy.stats

from analysis.load import SIZE

CELL = ("task", "regime", SIZE, "n_params_total", "tokens")
VERDICTS = ("yes", "no", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Within tolerance: L_sparse − L_dense ≤ eps (nats), or with `relative` ≤ eps · L_dense."""

    eps: float = 0.02
    relative: bool = False

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"Tolerance.eps={self.eps}; expected > 0")

    def threshold(self, dense_loss):
        return self.eps * np.asarray(dense_loss, float) if self.relative else self.eps

    def describe(self) -> str:
        return f"{self.eps:g} × L_dense" if self.relative else f"{self.eps:g} nats"


DEFAULT_TOLERANCES = (
    Tolerance(0.02),
    Tolerance(0.05),
    Tolerance(0.1),
    Tolerance(0.01, relative=True),
    Tolerance(0.02, relative=True),
)


def regimes(df: pd.DataFrame) -> pd.Series:
    """The training-budget regime of each run (see the module docstring)."""
    if "tag" in df and df["tag"].fillna("").astype(str).str.len().gt(0).all():
        return df["tag"].astype(str)
    one_budget = df.groupby(["task", "n_params_total"])["tokens"].transform("nunique").eq(1).all()
    if one_budget:
        return pd.Series("one budget per size", index=df.index)
    return df["tokens"].map(lambda d: f"D = {d:.3g}")


def regime_key(label: str) -> tuple:
    """Sort key for regime labels: 'D = 2.25e+08' before 'D = 1.8e+09' (numeric), else by name."""
    if label.startswith("D = "):
        return (0, float(label[4:]), "")
    return (1, 0.0, label)


def _sort(frame: pd.DataFrame, *cols: str) -> pd.DataFrame:
    order = frame["regime"].map(regime_key)
    return (
        frame.assign(_order=order)
        .sort_values(["task", "_order", *cols])
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def paired_gaps(df: pd.DataFrame, structure: str = "unstructured") -> pd.DataFrame:
    """One row per sparse run with a dense partner of the same seed: loss, dense_loss, gap."""
    df = df.assign(regime=regimes(df))
    keys = [*CELL, "seed"]
    dense = df[df["structure"] == "dense"].groupby(keys)["eval_loss"].mean().rename("dense_loss")
    sparse = df[(df["structure"] == structure) & (df["sparsity"] > 0)]
    sparse = sparse.groupby([*keys, "sparsity"])["eval_loss"].mean().rename("loss").reset_index()
    out = sparse.merge(dense.reset_index(), on=keys, how="inner")
    out["gap"] = out["loss"] - out["dense_loss"]
    return _sort(out, SIZE, "tokens", "sparsity", "seed")


def gap_cells(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Mean paired gap per (cell, sparsity) over seeds, with its paired t-interval."""
    cells = (
        pairs.groupby([*CELL, "sparsity"])
        .agg(
            gap=("gap", "mean"),
            gap_sd=("gap", "std"),
            n_seeds=("gap", "count"),
            loss=("loss", "mean"),
            dense_loss=("dense_loss", "mean"),
        )
        .reset_index()
    )
    n = cells["n_seeds"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        t = scipy.stats.t.ppf((1 + ci_level) / 2, np.maximum(n - 1, 1))
        half = np.where(n >= 2, t * cells["gap_sd"] / np.sqrt(n), np.nan)
    cells["lo"], cells["hi"] = cells["gap"] - half, cells["gap"] + half
    return _sort(cells, SIZE, "tokens", "sparsity")


def gap_scaling(
    cells: pd.DataFrame, ci_level: float = 0.95, pairs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per (task, regime, S): least squares of log ΔL = log g(S) − β(S) log N over the sizes.

    β > 0 means the gap shrinks with size ("larger models tolerate more sparsity"). The
    interval (`lo`, `hi`) is the t-interval of the slope (n_sizes − 2 degrees of freedom), so it
    contains seed noise and any lack of fit across sizes (≥ 3 sizes). With the paired gaps
    (`pairs`), β is also fitted within each seed that has a positive gap at every size of the
    cell (≥ 2 sizes), and `beta_seeds` is their mean with its t-interval over seeds (`lo_seeds`,
    `hi_seeds`; n_seeds_beta − 1 degrees of freedom; none with < 2 such seeds). `verdict`: yes
    (every available interval > 0), no (every one < 0), else inconclusive; with 2 sizes only the
    seed interval exists (lack of fit is not testable). Sizes whose mean gap is ≤ 0 cannot enter
    the log and are counted in `n_nonpositive`.
    """
    keys = ["task", "regime", "sparsity"]
    pairs_of = dict(list(pairs.groupby(keys))) if pairs is not None else {}
    rows = []
    for (task, regime, s), sub in cells.groupby(keys):
        pos = sub[sub["gap"] > 0]
        row = {
            "task": task,
            "regime": regime,
            "sparsity": s,
            "n_sizes": len(pos),
            "n_nonpositive": len(sub) - len(pos),
            "size_min": float(sub[SIZE].min()),
            "size_max": float(sub[SIZE].max()),
            "beta": np.nan,
            "lo": np.nan,
            "hi": np.nan,
            "log_g": np.nan,
            "beta_seeds": np.nan,
            "lo_seeds": np.nan,
            "hi_seeds": np.nan,
            "n_seeds_beta": 0,
            "verdict": "inconclusive",
        }
        intervals = []
        if len(pos) >= 3 and pos[SIZE].nunique() >= 3:
            beta, log_g, se = _slope(np.log(pos[SIZE].to_numpy()), np.log(pos["gap"].to_numpy()))
            half = scipy.stats.t.ppf((1 + ci_level) / 2, len(pos) - 2) * se
            row.update(beta=beta, lo=beta - half, hi=beta + half, log_g=log_g)
            intervals.append((beta - half, beta + half))
        if (task, regime, s) in pairs_of and sub[SIZE].nunique() >= 2:
            per_seed = (seed for _, seed in pairs_of[task, regime, s].groupby("seed"))
            betas = _within_seed_slopes(per_seed, SIZE, set(sub[SIZE]))
            mean, lo, hi = _mean_interval(betas, ci_level)
            row.update(beta_seeds=mean, lo_seeds=lo, hi_seeds=hi, n_seeds_beta=len(betas))
            if len(betas) >= 2:
                intervals.append((lo, hi))
        if intervals and all(lo > 0 for lo, _ in intervals):
            row["verdict"] = "yes"
        elif intervals and all(hi < 0 for _, hi in intervals):
            row["verdict"] = "no"
        rows.append(row)
    return _sort(pd.DataFrame(rows), "sparsity") if rows else pd.DataFrame(rows)


def local_slopes(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """β between each pair of adjacent sizes, per (task, regime, S): −Δlog ΔL / Δlog N within each
    seed (β > 0: the gap shrinks with size, the sign convention of `gap_scaling`), with its mean
    and t-interval over the seeds that have a positive gap at both sizes. Where a curved relation
    has one global β, these say where it turns: a sign change with both intervals excluding 0."""
    rows = []
    for (task, regime, s), sub in pairs.groupby(["task", "regime", "sparsity"]):
        sizes = sorted(sub[SIZE].unique())
        for a, b in zip(sizes, sizes[1:], strict=False):
            wide = sub[sub[SIZE].isin((a, b))].pivot_table(index="seed", columns=SIZE, values="gap")
            wide = wide.dropna()
            wide = wide[(wide > 0).all(axis=1)]
            betas = list(-(np.log(wide[b]) - np.log(wide[a])) / (np.log(b) - np.log(a)))
            mean, lo, hi = _mean_interval(betas, ci_level)
            sign = "inconclusive"
            if len(betas) >= 2 and lo > 0:
                sign = "shrinks"
            elif len(betas) >= 2 and hi < 0:
                sign = "grows"
            rows.append(
                {"task": task, "regime": regime, "sparsity": s, "size_from": a, "size_to": b,
                 "beta": mean, "lo": lo, "hi": hi, "n_seeds": len(betas), "gap_with_size": sign}
            )  # fmt: skip
    return pd.DataFrame(rows)


def effective_ratios(pairs: pd.DataFrame) -> pd.DataFrame:
    """N_eff / N per sparse run (task, regime, size, S, seed): N_eff is the dense size whose loss
    equals the sparse run's, read off the same seed's dense curve (log N linear in the loss
    between adjacent measured sizes; the dense losses must fall with N). A sparse loss above the
    smallest size's dense loss has no N_eff inside the measured range: `below` is True and the
    ratio NaN (never extrapolated). Seeds without a falling dense curve are left out."""
    rows = []
    for (task, regime), cell in pairs.groupby(["task", "regime"]):
        curves = {
            seed: sub.drop_duplicates(SIZE).sort_values(SIZE) for seed, sub in cell.groupby("seed")
        }
        for row in cell.itertuples():
            curve = curves[row.seed]
            dense = curve["dense_loss"].to_numpy(float)
            log_n = np.log(curve[SIZE].to_numpy(float))
            if len(dense) < 2 or (np.diff(dense) >= 0).any():
                continue  # no falling dense curve for this seed
            size = getattr(row, SIZE)
            below = bool(row.loss > dense[0])
            log_eff = np.nan if below else np.interp(-row.loss, -dense, log_n)  # rising x
            rows.append(
                {"task": task, "regime": regime, SIZE: size, "sparsity": row.sparsity,
                 "seed": row.seed, "ratio": float(np.exp(log_eff) / size), "below": below}
            )  # fmt: skip
    columns = ["task", "regime", SIZE, "sparsity", "seed", "ratio", "below"]
    return pd.DataFrame(rows, columns=columns)


def effective_sizes(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """N_eff / N per (task, regime, size, S) (`effective_ratios`): mean and t-interval over
    seeds; seeds whose N_eff would lie below the smallest size are counted in `n_below` and left
    out. A ratio < 1: sparsity cost that many dense parameters; flat in N: sparsity costs a fixed
    fraction of size."""
    rows = []
    ratios = effective_ratios(pairs)
    for (task, regime, size, s), sub in ratios.groupby(["task", "regime", SIZE, "sparsity"]):
        inside = sub[~sub["below"]]
        mean, lo, hi = _mean_interval(list(inside["ratio"]), ci_level)
        rows.append(
            {"task": task, "regime": regime, SIZE: size, "sparsity": s, "ratio": mean,
             "lo": lo, "hi": hi, "n_seeds": len(inside), "n_below": int(sub["below"].sum())}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _within_seed_slopes(
    per_seed: Iterable[pd.DataFrame], x: str, required: set | None = None
) -> list[float]:
    """β of log ΔL = c − β·log x fitted within each seed's rows (one frame per seed) of one
    cell, for the seeds with a positive gap at every value of x in `required` (all of the seed's,
    if None)."""
    slopes = []
    for seed in per_seed:
        if required is not None and not required <= set(seed[x]):
            continue
        if (seed["gap"] <= 0).any() or seed[x].nunique() < 2:
            continue
        slopes.append(_slope(np.log(seed[x].to_numpy(float)), np.log(seed["gap"].to_numpy()))[0])
    return slopes


def _mean_interval(values: list[float], ci_level: float) -> tuple[float, float, float]:
    """Mean with its t-interval (n − 1 degrees of freedom); NaN bounds with < 2 values."""
    n = len(values)
    mean = float(np.mean(values)) if n else np.nan
    if n < 2:
        return mean, np.nan, np.nan
    half = scipy.stats.t.ppf((1 + ci_level) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


def budget_scaling(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Per (task, size, S) trained at ≥ 2 token budgets D: γ of log ΔL = c − γ·log D, fitted
    within each seed (paired gaps), then the mean over seeds with its t-interval (n_seeds − 1
    degrees of freedom). γ > 0: the gap shrinks with more tokens at fixed N. Verdict: shrinks
    (interval above 0), grows (below 0), inconclusive (contains 0, or < 2 seeds). Seeds with a
    gap ≤ 0 at some budget cannot enter the log and are counted in `n_nonpositive`."""
    rows = []
    for (task, size, s), sub in pairs.groupby(["task", SIZE, "sparsity"]):
        if sub["tokens"].nunique() < 2:
            continue
        per_seed = [seed for _, seed in sub.groupby("seed") if seed["tokens"].nunique() >= 2]
        nonpositive = sum(bool((seed["gap"] <= 0).any()) for seed in per_seed)
        gammas = _within_seed_slopes(per_seed, "tokens")
        n = len(gammas)
        gamma, lo, hi = _mean_interval(gammas, ci_level)
        verdict = "inconclusive"
        if n >= 2 and lo > 0:
            verdict = "shrinks"
        elif n >= 2 and hi < 0:
            verdict = "grows"
        rows.append({
            "task": task, SIZE: size, "sparsity": s,
            "tokens_min": float(sub["tokens"].min()), "tokens_max": float(sub["tokens"].max()),
            "n_budgets": int(sub["tokens"].nunique()), "gamma": gamma, "lo": lo,
            "hi": hi, "verdict": verdict, "n_seeds": n, "n_nonpositive": nonpositive,
        })  # fmt: skip
    out = pd.DataFrame(rows)
    return out.sort_values(["task", SIZE, "sparsity"]).reset_index(drop=True) if rows else out


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(β, intercept, standard error of β) of y = intercept − β x by least squares."""
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    icept = float(y.mean() - slope * x.mean())
    resid = y - icept - slope * x
    dof = len(x) - 2
    se = float(np.sqrt(resid @ resid / dof / (xc @ xc))) if dof > 0 else np.nan
    return -slope, icept, se


# --- tolerated sparsity ---------------------------------------------------------------------------


def s_star(levels: np.ndarray, gaps: np.ndarray, limit: float) -> tuple[float, str]:
    """Largest S with ΔL(S) ≤ limit from the mean gaps at the tested `levels` (ascending).

    Returns (S*, status). Status "below" (S* < levels[0]: even the smallest tested sparsity
    exceeds the limit) and "above" (S* > levels[-1]) are censored: the value is that bound.
    Otherwise ("bracketed") S* comes from log ΔL = a + k·log(1/(1−S)) fitted to the positive
    gaps (monotone when k > 0), kept between the two tested levels that bracket the limit; without
    such a fit, by linear interpolation between those two levels.
    """
    if gaps[0] > limit:
        return float(levels[0]), "below"
    if gaps[-1] <= limit:
        return float(levels[-1]), "above"
    j = int(np.argmax(gaps > limit))  # levels[j-1] within the limit, levels[j] beyond it
    x = -np.log1p(-levels)
    pos = gaps > 0
    if pos.sum() >= 2:
        k, a = np.polyfit(x[pos], np.log(gaps[pos]), 1)
        if k > 0:
            value = 1.0 - np.exp(-(np.log(limit) - a) / k)
            return float(np.clip(value, levels[j - 1], levels[j])), "bracketed"
    frac = (limit - gaps[j - 1]) / (gaps[j] - gaps[j - 1])
    return float(levels[j - 1] + frac * (levels[j] - levels[j - 1])), "bracketed"


def tolerance_table(
    pairs: pd.DataFrame,
    tolerances=DEFAULT_TOLERANCES,
    *,
    n_boot: int = 200,
    ci_level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """S* per (cell, tolerance) with a bootstrap-over-seeds interval (none with one seed).

    A seed keeps all of its paired gaps; a resample whose S* is censored contributes the bound.
    """
    rng = np.random.default_rng(seed)
    q = [(1 - ci_level) / 2, (1 + ci_level) / 2]
    rows = []
    for key, sub in pairs.groupby(list(CELL)):
        by_seed = sub.pivot_table(index="seed", columns="sparsity", values="gap")
        levels = by_seed.columns.to_numpy(float)
        matrix = by_seed.to_numpy(float)
        dense = float(sub.groupby("seed")["dense_loss"].mean().mean())
        n_seeds = len(matrix)
        draws = [rng.integers(0, n_seeds, n_seeds) for _ in range(n_boot if n_seeds > 1 else 0)]
        for tol in tolerances:
            limit = float(tol.threshold(dense))
            value, status = s_star(levels, np.nanmean(matrix, 0), limit)
            boot = [s_star(levels, np.nanmean(matrix[d], 0), limit)[0] for d in draws]
            lo, hi = np.quantile(boot, q) if boot else (np.nan, np.nan)
            rows.append(
                dict(zip(CELL, key, strict=True))
                | {
                    "tolerance": tol.describe(),
                    "limit": limit,
                    "s_star": value,
                    "status": status,
                    "lo": float(lo),
                    "hi": float(hi),
                    "s_min": float(levels[0]),
                    "s_max": float(levels[-1]),
                    "n_seeds": n_seeds,
                }
            )
    return _sort(pd.DataFrame(rows), SIZE, "tokens") if rows else pd.DataFrame(rows)


def describe_s_star(row) -> str:
    """'< 0.5', '> 0.9375' for censored results, the value otherwise."""
    if row["status"] == "below":
        return f"< {row['s_min']:g}"
    if row["status"] == "above":
        return f"> {row['s_max']:g}"
    return f"{row['s_star']:.3g}"


def describe_regimes(df: pd.DataFrame) -> dict[str, dict]:
    """Per regime: tokens, tokens per non-embedding parameter and seeds per size, in words."""
    df = df.assign(regime=regimes(df))
    out = {}
    for regime in sorted(set(df["regime"]), key=regime_key):
        sub = df[df["regime"] == regime]
        tpp = sub["tokens"] / sub[SIZE]
        seeds = sub.groupby(SIZE)["seed"].nunique()
        counts = seeds.value_counts()
        common = int(counts.index[0])
        others = [f"{n} at N = {size:.3g}" for size, n in seeds.items() if n != common]
        seed_text = f"{common} seed{'s' if common > 1 else ''} per size"
        seed_text += f" ({', '.join(others)})" if others else ""
        d = sub["tokens"]
        d_text = f"D = {d.min():.3g}" + (f"–{d.max():.3g}" if d.nunique() > 1 else "")
        unit = str(sub["data_unit"].iloc[0]) if "data_unit" in sub else "tokens"  # ViT: images
        short_seeds = f"seeds: {common}" + (
            f" ({', '.join(f'{n} at {short_size(size)}' for size, n in seeds.items() if n != common)})"
            if others
            else ""
        )
        out[str(regime)] = {
            "title": ("" if str(regime).startswith("D = ") else f"{regime}: ")
            + f"{d_text} {unit}\n{_span(tpp, '.2g')} {unit}/param, {short_seeds}",
            "description": f"{regime}: {d_text} {unit}, {_span(tpp, '.3g')} {unit} per "
            f"non-embedding parameter, {seed_text}",
            "tokens_per_param": [float(tpp.min()), float(tpp.max())],
            "seeds_per_size": {float(k): int(v) for k, v in seeds.items()},
        }
    return out


def _span(values: pd.Series, fmt: str) -> str:
    lo, hi = format(values.min(), fmt), format(values.max(), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def short_size(v: float) -> str:
    """A size as 13.9K / 1.8M (3 significant digits)."""
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"
