"""Results derived from fits and raw runs: loss gap, tolerance S*(N), effective parameters,
compute-optimal sparsity and the structure penalty.

"Same size" means the same total parameter count: a model of total size N at sparsity S has
N (1 - S f) non-zero parameters, where f is the prunable fraction of its parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import scipy.optimize

from analysis.fit import FitResult, sparse_law

_KEYS = ("task", "n_params_total", "tokens")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A sparse model is 'within tolerance' if L_sparse - L_dense <= eps (nats), or, with
    `relative`, <= eps * L_dense."""

    eps: float = 0.02
    relative: bool = False

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"Tolerance.eps={self.eps}; expected > 0")

    def threshold(self, dense_loss):
        return self.eps * np.asarray(dense_loss, float) if self.relative else self.eps

    def describe(self) -> str:
        return f"{self.eps:g} × dense loss" if self.relative else f"{self.eps:g} nats"


# --- from a fitted sparse law -------------------------------------------------------------------


def loss_gap(params: dict, sparsity, n_total, tokens, prunable_fraction: float = 1.0):
    """Fitted ΔL(S, N) = L(S, N(1 - S f), D) - L(0, N, D) at equal total size N."""
    s = np.asarray(sparsity, float)
    n = np.asarray(n_total, float)
    sparse = sparse_law(params, s, n * (1.0 - s * prunable_fraction), tokens)
    return sparse - sparse_law(params, 0.0, n, tokens)


def _s_star(params, n_total, tokens, tol, prunable_fraction, s_max, n_grid=400):
    dense = float(sparse_law(params, 0.0, n_total, tokens))
    limit = float(tol.threshold(dense))
    s_grid = np.linspace(0.0, s_max, n_grid)
    ok = loss_gap(params, s_grid, n_total, tokens, prunable_fraction) <= limit
    if ok.all():
        return s_max
    first_bad = int(np.argmax(~ok))
    if first_bad == 0:
        return 0.0
    f = lambda s: float(loss_gap(params, s, n_total, tokens, prunable_fraction)) - limit
    return float(scipy.optimize.brentq(f, s_grid[first_bad - 1], s_grid[first_bad], xtol=1e-10))


def tolerance_from_fit(
    fit: FitResult,
    n_total,
    tokens,
    tol: Tolerance | None = None,
    *,
    prunable_fraction: float = 1.0,
    s_max: float = 0.999,
) -> pd.DataFrame:
    """S*(N): the largest sparsity (≤ s_max) whose fitted loss is within `tol` of the dense
    model of the same total size, for each N; interval from the fit's bootstrap samples."""
    tol = tol or Tolerance()
    if fit.law != "sparse":
        raise ValueError(f"tolerance needs a 'sparse' law fit, got {fit.law!r}")
    n_total = np.atleast_1d(np.asarray(n_total, float))
    tokens = np.broadcast_to(np.asarray(tokens, float), n_total.shape)
    q = [(1 - fit.config.ci_level) / 2, (1 + fit.config.ci_level) / 2]
    rows = []
    for n, d in zip(n_total, tokens, strict=True):
        s = _s_star(fit.params, n, d, tol, prunable_fraction, s_max)
        boot = [_s_star(p, n, d, tol, prunable_fraction, s_max) for p in fit.param_samples()]
        lo, hi = np.quantile(boot, q) if boot else (np.nan, np.nan)
        rows.append({"n_params_total": n, "tokens": d, "s_star": s, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def effective_param_multiplier(params: dict, sparsity):
    """How many dense parameters one non-zero parameter at sparsity S is worth (the N-term of
    the sparse law; independent of N and D): ((a_S + c_S) / (a_S (1-S)^b_S + c_S))^(1/b_N)."""
    p = params
    s = np.asarray(sparsity, float)
    return ((p["a_S"] + p["c_S"]) / (p["a_S"] * (1 - s) ** p["b_S"] + p["c_S"])) ** (1 / p["b_N"])


def dense_equivalent_size(params: dict, sparsity, n_nonzero):
    """Dense parameter count reaching the same loss as `n_nonzero` params at `sparsity`."""
    return effective_param_multiplier(params, sparsity) * np.asarray(n_nonzero, float)


def optimal_sparsity(params: dict, n_nonzero, compute, *, s_max: float = 0.999) -> pd.DataFrame:
    """Frantar's optimal-sparsity contour: for a model with `n_nonzero` non-zero params and
    training compute C = 6 N D / (1 - S) (the dense FLOPs of the total model, so D = C (1-S) /
    (6 N)), the sparsity in [0, s_max] minimising the fitted loss. One row per (N, C) pair."""
    n_nonzero, compute = np.broadcast_arrays(
        np.asarray(n_nonzero, float), np.asarray(compute, float)
    )
    s_grid = np.linspace(0.0, s_max, 200)
    # Coarse grid for all (N, C) at once, then a bounded 1-D refinement around each minimum.
    tokens = compute.ravel()[:, None] * (1 - s_grid) / (6 * n_nonzero.ravel()[:, None])
    coarse = sparse_law(params, s_grid, n_nonzero.ravel()[:, None], tokens)
    rows = []
    for n, c, i in zip(n_nonzero.ravel(), compute.ravel(), np.argmin(coarse, 1), strict=True):
        loss = lambda s, n=n, c=c: sparse_law(params, s, n, c * (1 - s) / (6 * n))
        lo, hi = s_grid[max(i - 1, 0)], s_grid[min(i + 1, len(s_grid) - 1)]
        res = scipy.optimize.minimize_scalar(
            loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
        )
        s = float(res.x) if res.fun <= loss(s_grid[i]) else float(s_grid[i])
        rows.append(
            {
                "n_nonzero": n,
                "compute": c,
                "sparsity": s,
                "tokens": c * (1 - s) / (6 * n),
                "loss": float(loss(s)),
            }
        )
    return pd.DataFrame(rows)


# --- from raw runs ------------------------------------------------------------------------------


def raw_loss_gap(df: pd.DataFrame, structure: str = "unstructured") -> pd.DataFrame:
    """Measured ΔL per (task, total size, tokens, sparsity): mean loss over seeds minus the mean
    dense loss of the same total size and tokens. Rows without a dense partner are dropped."""
    dense = df[df["structure"] == "dense"].groupby(list(_KEYS))["eval_loss"].mean()
    dense = dense.rename("dense_loss").reset_index()
    sparse = df[(df["structure"] == structure) & (df["sparsity"] > 0)]
    cells = (
        sparse.groupby([*_KEYS, "sparsity"])["eval_loss"]
        .agg(loss="mean", loss_std="std", n_seeds="count")
        .reset_index()
    )
    out = cells.merge(dense, on=list(_KEYS), how="inner")
    out["gap"] = out["loss"] - out["dense_loss"]
    return out.sort_values([*_KEYS, "sparsity"]).reset_index(drop=True)


def _raw_s_star(sparsities, gaps, limit):
    """Largest sparsity within `limit`, interpolating the gap linearly between tested levels
    (starting from gap 0 at S=0). Returns (S*, censored) where censored = never exceeded."""
    s = np.concatenate([[0.0], sparsities])
    g = np.concatenate([[0.0], gaps])
    bad = np.nonzero(g > limit)[0]
    if not len(bad):
        return float(s[-1]), True
    j = int(bad[0])
    frac = (limit - g[j - 1]) / (g[j] - g[j - 1])
    return float(s[j - 1] + frac * (s[j] - s[j - 1])), False


def tolerance_from_runs(
    df: pd.DataFrame,
    tol: Tolerance | None = None,
    *,
    n_boot: int = 200,
    ci_level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """S*(N) from measured losses; interval by resampling seeds within each (size, S) cell.

    `censored` marks sizes where even the highest tested sparsity stays within tolerance.
    """
    tol = tol or Tolerance()
    rng = np.random.default_rng(seed)
    q = [(1 - ci_level) / 2, (1 + ci_level) / 2]
    dense_all = df[df["structure"] == "dense"]
    sparse_all = df[(df["structure"] == "unstructured") & (df["sparsity"] > 0)]
    rows = []
    for key, dense in dense_all.groupby(list(_KEYS)):
        sel = np.ones(len(sparse_all), bool)
        for col, value in zip(_KEYS, key, strict=True):
            sel &= (sparse_all[col] == value).to_numpy()
        sparse = sparse_all[sel]
        if sparse.empty:
            continue
        levels = np.sort(sparse["sparsity"].unique())
        groups = [sparse.loc[sparse["sparsity"] == s, "eval_loss"].to_numpy() for s in levels]
        d_loss = dense["eval_loss"].to_numpy()

        def s_star(d, gs, levels=levels):
            gaps = np.array([g.mean() for g in gs]) - d.mean()
            return _raw_s_star(levels, gaps, float(tol.threshold(d.mean())))

        point, censored = s_star(d_loss, groups)
        boot = [
            s_star(rng.choice(d_loss, len(d_loss)), [rng.choice(g, len(g)) for g in groups])[0]
            for _ in range(n_boot)
        ]
        lo, hi = np.quantile(boot, q) if boot else (point, point)
        rows.append(
            dict(zip(_KEYS, key, strict=True))
            | {
                "s_star": point,
                "lo": lo,
                "hi": hi,
                "censored": censored,
                "dense_loss": d_loss.mean(),
                "n_seeds": len(d_loss),
            }
        )
    cols = [*_KEYS, "s_star", "lo", "hi", "censored", "dense_loss", "n_seeds"]
    return pd.DataFrame(rows, columns=cols)


def structure_penalty(df: pd.DataFrame) -> pd.DataFrame:
    """Loss of N:M / block runs minus unstructured runs of the same size, tokens and sparsity.

    `group_size` is m for N:M (the "freedom": choose n of m) and the block size for blocks.
    """
    keys = [*_KEYS, "sparsity"]
    base = (
        df[df["structure"] == "unstructured"]
        .groupby(keys)["eval_loss"]
        .mean()
        .rename("unstructured_loss")
        .reset_index()
    )
    structured = df[df["structure"].isin(["nm", "block"])].copy()
    if structured.empty:
        return pd.DataFrame(
            columns=[
                *keys,
                "structure",
                "group_size",
                "loss",
                "unstructured_loss",
                "penalty",
                "relative_penalty",
            ]
        )
    structured["group_size"] = np.where(
        structured["structure"] == "nm", structured["nm_m"], structured["block_size"]
    ).astype(float)
    cells = (
        structured.groupby([*keys, "structure", "group_size"])["eval_loss"]
        .mean()
        .rename("loss")
        .reset_index()
    )
    out = cells.merge(base, on=keys, how="inner")
    out["penalty"] = out["loss"] - out["unstructured_loss"]
    out["relative_penalty"] = out["penalty"] / out["unstructured_loss"]
    return out.sort_values(["structure", *keys, "group_size"]).reset_index(drop=True)
