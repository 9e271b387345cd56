"""Where the loss cost of sparsity turns with size, from paired gaps (`gap.paired_gaps`).

- `curvature`: a quadratic in log N fitted to log ΔL within each seed; the mean curvature over
  seeds with its t-interval. A hump (c < 0) or a valley (c > 0) only where it excludes 0.
- `turning_sizes`: where a curved cell turns, the vertex N* of the quadratic fitted to the
  seed-mean gaps, with a bootstrap interval over seeds, and the pair of measured sizes the local
  slopes bracket it with; reported only inside the measured sizes (never extrapolated).
- `size_ranges`: the local slopes (`gap.local_slopes`) merged into ranges of one verdict
  ("grows" / "shrinks" / "inconclusive"), and the sentence they support.
- `neff_trend`: the slope of log(N_eff / N) against log N within seeds (Frantar et al.'s law:
  a constant multiplier, slope 0) and the mean ratio.
- `average_parameters`: Jin et al. (ICLR 2025): a gradually pruned model's loss follows its
  parameter count averaged over training; N_eff / N against that prediction, 1 − a·S·f (a: the
  schedule's mean share of the final sparsity, f: the prunable share of N).
No JAX here. Sizes are non-embedding parameters (`load.SIZE`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.gap import _mean_interval, effective_ratios
from analysis.load import PRUNABLE_FRACTION, SIZE

CELL_KEYS = ["task", "regime", "sparsity"]


def _quadratic(log_n: np.ndarray, log_gap: np.ndarray) -> np.ndarray:
    """(c, b, a) of log ΔL = a + b·x + c·x² with x = log N."""
    return np.polyfit(log_n, log_gap, 2)


def curvature(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Per (task, regime, S): the curvature c of log ΔL = a + b·log N + c·(log N)² fitted within
    each seed with a positive gap at ≥ 3 sizes, mean and t-interval over those seeds. `shape`:
    'hump' (the gap rises, then falls: c < 0), 'valley' (c > 0), or 'no curvature' (the interval
    contains 0, or fewer than 2 seeds)."""
    rows = []
    for (task, regime, s), sub in pairs.groupby(CELL_KEYS):
        cs = []
        for _, seed in sub.groupby("seed"):
            seed = seed[seed["gap"] > 0]
            if seed[SIZE].nunique() >= 3:
                cs.append(_quadratic(np.log(seed[SIZE]), np.log(seed["gap"]))[0])
        mean, lo, hi = _mean_interval(cs, ci_level)
        shape = "no curvature"
        if len(cs) >= 2 and hi < 0:
            shape = "hump"
        elif len(cs) >= 2 and lo > 0:
            shape = "valley"
        rows.append(
            {"task": task, "regime": regime, "sparsity": s, "curvature": mean, "lo": lo,
             "hi": hi, "n_seeds": len(cs), "n_sizes": sub[SIZE].nunique(), "shape": shape}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _vertex(mean_gap: pd.Series) -> float:
    """N* of the quadratic through the seed-mean log gaps (indexed by size); NaN if not curved
    or not positive."""
    if (mean_gap <= 0).any() or len(mean_gap) < 3:
        return np.nan
    c, b, _ = _quadratic(np.log(mean_gap.index.to_numpy(float)), np.log(mean_gap.to_numpy()))
    return float(np.exp(-b / (2 * c))) if c != 0 else np.nan


def turning_sizes(
    pairs: pd.DataFrame,
    local: pd.DataFrame,
    n_boot: int = 2000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> pd.DataFrame:
    """Per curved (task, regime, S) cell (`curvature` excludes 0): the turning size N* (vertex of
    the quadratic in log N through the seed-mean gaps) with a bootstrap interval over seeds
    (seeds resampled with replacement, the quadratic refitted), and `bracket`: the adjacent
    measured sizes between which the local slopes (`local`, from `gap.local_slopes`) change from
    one verdict to the opposite one. `status`: 'turns' (N* inside the measured sizes),
    'outside' (the vertex lies beyond them: not reported), or the cell's `shape` when it is not
    curved. Only the sizes every seed has are used (`n_sizes`). With few seeds the bootstrap has
    few distinct resamples; `n_seeds` says how many."""
    rng = np.random.default_rng(seed)
    shapes = curvature(pairs, ci_level).set_index(CELL_KEYS)
    rows = []
    for key, sub in pairs[pairs["gap"] > 0].groupby(CELL_KEYS):
        shape = shapes.loc[key, "shape"]
        wide = sub.pivot_table(index="seed", columns=SIZE, values="gap")
        wide = wide.loc[:, wide.notna().sum() == len(wide)]  # the sizes every seed has
        lo_n, hi_n = float(wide.columns.min()), float(wide.columns.max())
        row = dict(zip(CELL_KEYS, key, strict=True)) | {"shape": shape, "n_seeds": len(wide)}
        row |= {"n_star": np.nan, "lo": np.nan, "hi": np.nan, "bracket": _bracket(local, key),
                "n_sizes": wide.shape[1]}  # fmt: skip
        if shape == "no curvature":
            rows.append(row | {"status": shape})
            continue
        if len(wide) < 2 or wide.shape[1] < 3:
            rows.append(row | {"status": "too few seeds or sizes"})
            continue
        n_star = _vertex(wide.mean())
        boots = [_vertex(wide.iloc[rng.integers(0, len(wide), len(wide))].mean())
                 for _ in range(n_boot)]  # fmt: skip
        boots = np.array([b for b in boots if np.isfinite(b)])
        q = (1 - ci_level) / 2
        inside = np.isfinite(n_star) and lo_n <= n_star <= hi_n
        row |= {
            "n_star": n_star if inside else np.nan,
            "lo": float(np.quantile(boots, q)) if inside and len(boots) else np.nan,
            "hi": float(np.quantile(boots, 1 - q)) if inside and len(boots) else np.nan,
            "status": "turns" if inside else "outside",
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _bracket(local: pd.DataFrame, key) -> str:
    """'A–D': the sizes around the first change of the local verdict to its opposite (the pair
    A–B grows, a later pair C–D shrinks, or the reverse, with only inconclusive pairs between):
    the gap's extreme lies strictly between A and D. '' if the verdict never changes sign."""
    task, regime, s = key
    sub = local[(local["task"] == task) & (local["regime"] == regime) & (local["sparsity"] == s)]
    last = None
    for r in sub.sort_values("size_from").itertuples():
        if r.gap_with_size == "inconclusive":
            continue
        if last is not None and r.gap_with_size != last.gap_with_size:
            return f"{last.size_from:.3g}–{r.size_to:.3g}"
        last = r
    return ""


def size_ranges(local: pd.DataFrame) -> pd.DataFrame:
    """Per (task, regime, S): the adjacent-size verdicts of `gap.local_slopes` merged into ranges
    (`ranges`: "6.2K–14K grows; 14K–99K inconclusive; …") and the sentence they support:
    'larger models tolerate more above X' (the verdict from X to the largest size is 'shrinks'),
    'less below Y' (from the smallest size to Y it is 'grows'), both, or 'inconclusive'."""
    from analysis.gap import short_size

    rows = []
    for (task, regime, s), sub in local.groupby(CELL_KEYS):
        sub = sub.sort_values("size_from")
        runs: list[list] = []
        for r in sub.itertuples():
            if runs and runs[-1][2] == r.gap_with_size:
                runs[-1][1] = r.size_to
            else:
                runs.append([r.size_from, r.size_to, r.gap_with_size])
        text = "; ".join(f"{short_size(a)}–{short_size(b)} {v}" for a, b, v in runs)
        claims = []
        if runs[0][2] == "grows":
            claims.append(f"larger models tolerate less below {short_size(runs[0][1])}")
        if runs[-1][2] == "shrinks":
            claims.append(f"larger models tolerate more above {short_size(runs[-1][0])}")
        rows.append(
            {"task": task, "regime": regime, "sparsity": s, "ranges": text,
             "verdict": "; ".join(claims) or "inconclusive"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def neff_trend(pairs: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Per (task, regime, S): the slope of log(N_eff / N) against log N fitted within each seed
    with N_eff at ≥ 2 sizes (mean and t-interval over seeds), and the mean ratio. Frantar et
    al.'s law has N_eff = k(S)·N: slope 0 ('constant'); 'falling' / 'rising' only where the
    interval excludes 0."""
    ratios = effective_ratios(pairs)
    ratios = ratios[~ratios["below"]]
    rows = []
    for (task, regime, s), sub in ratios.groupby(CELL_KEYS):
        slopes = [
            float(np.polyfit(np.log(seed[SIZE]), np.log(seed["ratio"]), 1)[0])
            for _, seed in sub.groupby("seed")
            if seed[SIZE].nunique() >= 2
        ]
        mean, lo, hi = _mean_interval(slopes, ci_level)
        trend = "constant" if len(slopes) >= 2 else "inconclusive"
        if len(slopes) >= 2 and hi < 0:
            trend = "falling"
        elif len(slopes) >= 2 and lo > 0:
            trend = "rising"
        rows.append(
            {"task": task, "regime": regime, "sparsity": s, "slope": mean, "lo": lo, "hi": hi,
             "mean_ratio": float(sub["ratio"].mean()), "n_seeds": len(slopes),
             "n_sizes": sub[SIZE].nunique(), "trend": trend}
        )  # fmt: skip
    columns = [*CELL_KEYS, "slope", "lo", "hi", "mean_ratio", "n_seeds", "n_sizes", "trend"]
    return pd.DataFrame(rows, columns=columns)


def schedule_mean_share(start: float, end: float, power: float) -> float:
    """Mean over training of S(t) / S for gradual pruning S(t) = S·(1 − (1 − u)^power), u the
    fraction of [start, end] elapsed (dense before `start`, S after `end`)."""
    return (1 - end) + (end - start) * (1 - 1 / (power + 1))


def average_parameters(
    pairs: pd.DataFrame, results: pd.DataFrame, mean_share: float, ci_level: float = 0.95
) -> pd.DataFrame:
    """Per (task, regime, size, S): the measured N_eff / N (mean and interval over seeds) beside
    Jin et al.'s prediction 1 − mean_share·S·f, where `mean_share` is the schedule's mean share
    of the final sparsity over training (0.625 for cubic pruning from 25% to 75% of training)
    and f the prunable share of the size (from `results`). `measured_over_predicted` > 1: the
    sparse run is worth more than its average parameter count."""
    share = results.groupby(SIZE)[PRUNABLE_FRACTION].first()
    ratios = effective_ratios(pairs)
    ratios = ratios[~ratios["below"]]
    rows = []
    for (task, regime, size, s), sub in ratios.groupby(["task", "regime", SIZE, "sparsity"]):
        mean, lo, hi = _mean_interval(list(sub["ratio"]), ci_level)
        predicted = 1 - mean_share * s * float(share.get(size, 1.0))
        rows.append(
            {"task": task, "regime": regime, SIZE: size, "sparsity": s, "ratio": mean, "lo": lo,
             "hi": hi, "predicted": predicted, "measured_over_predicted": mean / predicted,
             "n_seeds": len(sub)}
        )  # fmt: skip
    columns = ["task", "regime", SIZE, "sparsity", "ratio", "lo", "hi", "predicted",
               "measured_over_predicted", "n_seeds"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
