"""Results derived from a fitted sparse law (loss gap, tolerance S*(N), effective parameters,
compute-optimal sparsity) and the structure penalty of N:M / block runs.

Sizes are non-embedding parameters: a model of non-embedding size N at sparsity S keeps
N (1 − S f) non-zero non-embedding parameters, f = its own prunable fraction (`load.PRUNABLE_
FRACTION`, < 1: norms and biases are never pruned). Gaps and S* measured from runs: `analysis.gap`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.optimize

from analysis.fit import FitResult, sparse_law
from analysis.gap import Tolerance
from analysis.load import SIZE

_KEYS = ("task", "n_params_total", "tokens")


# --- from a fitted sparse law -------------------------------------------------------------------


def loss_gap(params: dict, sparsity, n_size, tokens, prunable_fraction=1.0):
    """Fitted ΔL(S, N) = L(S, N(1 − S f), D) − L(0, N, D) at equal non-embedding size N."""
    s = np.asarray(sparsity, float)
    n = np.asarray(n_size, float)
    sparse = sparse_law(params, s, n * (1.0 - s * np.asarray(prunable_fraction, float)), tokens)
    return sparse - sparse_law(params, 0.0, n, tokens)


def _s_star(params, n, d, tol, f, s_min, s_max):
    limit = float(tol.threshold(float(sparse_law(params, 0.0, n, d))))
    gap = lambda s: float(loss_gap(params, s, n, d, f)) - limit  # noqa: E731
    if gap(s_min) > 0:
        return s_min, "below"
    if gap(s_max) <= 0:
        return s_max, "above"
    return float(scipy.optimize.brentq(gap, s_min, s_max, xtol=1e-10)), "bracketed"


def tolerance_from_fit(
    fit: FitResult,
    n_size,
    tokens,
    tol: Tolerance | None = None,
    *,
    prunable_fraction=1.0,
    s_range: tuple[float, float] = (0.5, 0.9375),
) -> pd.DataFrame:
    """S*(N) from the fitted law: the largest S in `s_range` (the tested sparsities) whose ΔL is
    within `tol` of the dense model of equal non-embedding size, for each N (with its own
    prunable fraction); censored ("below" / "above") outside the range; bootstrap interval."""
    tol = tol or Tolerance()
    if fit.law != "sparse":
        raise ValueError(f"tolerance needs a 'sparse' law fit, got {fit.law!r}")
    n_size = np.atleast_1d(np.asarray(n_size, float))
    tokens = np.broadcast_to(np.asarray(tokens, float), n_size.shape)
    fracs = np.broadcast_to(np.asarray(prunable_fraction, float), n_size.shape)
    q = [(1 - fit.config.ci_level) / 2, (1 + fit.config.ci_level) / 2]
    rows = []
    for n, d, f in zip(n_size, tokens, fracs, strict=True):
        s, status = _s_star(fit.params, n, d, tol, f, *s_range)
        boot = [_s_star(p, n, d, tol, f, *s_range)[0] for p in fit.param_samples()]
        lo, hi = np.quantile(boot, q) if boot else (np.nan, np.nan)
        rows.append({"size": n, "tokens": d, "s_star": s, "status": status, "lo": lo, "hi": hi})
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


def structure_penalty(df: pd.DataFrame) -> pd.DataFrame:
    """Loss of N:M / block runs minus the unstructured run of the same model, tokens, sparsity
    and seed (paired), averaged over seeds; one row per (size, sparsity, structure, group).

    `group_size` is m for N:M (the "freedom": choose n of m) and the block size for blocks.
    """
    keys = [*_KEYS, SIZE, "sparsity"]
    cols = [*keys, "structure", "group_size", "loss", "unstructured_loss", "penalty"]
    base = df[df["structure"] == "unstructured"].groupby([*keys, "seed"])["eval_loss"].mean()
    structured = df[df["structure"].isin(["nm", "block"])].copy()
    if structured.empty:
        return pd.DataFrame(columns=[*cols, "relative_penalty", "n_seeds"])
    structured["group_size"] = np.where(
        structured["structure"] == "nm", structured["nm_m"], structured["block_size"]
    ).astype(float)
    pairs = structured.merge(
        base.rename("unstructured_loss").reset_index(), on=[*keys, "seed"], how="inner"
    ).rename(columns={"eval_loss": "loss"})
    pairs["penalty"] = pairs["loss"] - pairs["unstructured_loss"]
    out = (
        pairs.groupby([*keys, "structure", "group_size"])
        .agg(
            loss=("loss", "mean"),
            unstructured_loss=("unstructured_loss", "mean"),
            penalty=("penalty", "mean"),
            n_seeds=("seed", "nunique"),
        )
        .reset_index()
    )
    out["relative_penalty"] = out["penalty"] / out["unstructured_loss"]
    return out.sort_values(["structure", *keys, "group_size"]).reset_index(drop=True)
