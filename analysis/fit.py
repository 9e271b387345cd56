"""Scaling-law fits: Huber loss, L-BFGS-B from a grid of starts, bootstrap intervals.

Laws (N = non-zero non-embedding params, `load.N_FIT`; D = tokens; S = sparsity; E = experts):
  sparse      L = (a_S (1-S)^b_S + c_S) (1/N)^b_N + (a_D/D)^b_D + c    (Frantar et al. 2024)
  chinchilla  L = E + A/N^alpha + B/D^beta                            (Hoffmann et al. 2022)
  dense_n     L = E + A/N^alpha                                       (fixed D)
  moe         log L = a log N + b log E + c log N log E + d           (Clark et al. 2022; N =
                                                    active non-embedding params in `n_scale` units)
Internally N and D are divided by `FitConfig.n_scale` / `d_scale`, positive amplitudes are
optimised as logs and exponents directly (bounded to [0, 5]); `params` always reports the law in
the raw units above so that published coefficients can be compared directly.

Every fit is checked for identifiability (`identification_issues`: as many free parameters as
distinct cells, N and D collinear, one D only, too few sparsities) and for parameters on their
bounds; intervals come from a bootstrap over (size, seed) clusters, never over single runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.special

from analysis.load import ACTIVE, N_FIT

try:  # BLAS threads make each tiny L-BFGS-B step ~15x slower on a busy machine
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None

LAWS = ("sparse", "chinchilla", "dense_n", "moe")
_EXP_BOUNDS = (0.0, 5.0)
_LOG_BOUNDS = (-30.0, 30.0)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How a law is fitted.

    huber_delta / log_loss: Huber loss on log L (Chinchilla, T5) or on L (Frantar's ViT).
    n_scale / d_scale: units of N and D during optimisation (numerics only).
    init_grid: per internal parameter, the start values (see `internal_names`); None = default.
    n_boot: bootstrap resamples of (size, seed) clusters (0 = none; skipped for fits that are
    not identified); boot_starts: extra grid starts per resample.
    """

    huber_delta: float = 1e-3
    log_loss: bool = True
    n_scale: float = 1e6
    d_scale: float = 1e9
    init_grid: tuple[tuple[float, ...], ...] | None = None
    max_iter: int = 2000
    n_boot: int = 0
    boot_starts: int = 1
    ci_level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if not self.huber_delta > 0:
            raise ValueError(f"FitConfig.huber_delta={self.huber_delta}; expected > 0")
        if not (self.n_scale > 0 and self.d_scale > 0):
            raise ValueError(
                f"FitConfig n_scale/d_scale must be > 0, got {self.n_scale}, {self.d_scale}"
            )
        if self.n_boot < 0 or not 0 < self.ci_level < 1:
            raise ValueError(
                f"FitConfig n_boot={self.n_boot} (>= 0), ci_level={self.ci_level} "
                "(in (0, 1)) expected"
            )


# --- the laws in raw units (used for prediction, derived results and figures) --------------------


def sparse_law(params: dict, sparsity, n_nonzero, tokens):
    """Frantar et al.: (a_S (1-S)^b_S + c_S) (1/N)^b_N + (a_D/D)^b_D + c."""
    p = params
    s = np.asarray(sparsity, float)
    sparse_term = p["a_S"] * (1.0 - s) ** p["b_S"] + p["c_S"]
    return (
        sparse_term * np.asarray(n_nonzero, float) ** -p["b_N"]
        + (p["a_D"] / np.asarray(tokens, float)) ** p["b_D"]
        + p["c"]
    )


def chinchilla_law(params: dict, n_params, tokens):
    p = params
    n, d = np.asarray(n_params, float), np.asarray(tokens, float)
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def dense_n_law(params: dict, n_params):
    p = params
    return p["E"] + p["A"] * np.asarray(n_params, float) ** -p["alpha"]


def moe_law(params: dict, n_active, num_experts, n_scale: float = 1e6):
    p = params
    log_n = np.log(np.asarray(n_active, float) / n_scale)
    log_e = np.log(np.asarray(num_experts, float))
    return np.exp(p["a"] * log_n + p["b"] * log_e + p["c"] * log_n * log_e + p["d"])


# --- internal parameterisations: (theta, X) -> prediction, Jacobian d pred / d theta ------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    internal_names: tuple[str, ...]
    param_names: tuple[str, ...]
    theta_params: tuple[str, ...]  # the raw parameter each internal one sets (bound reporting)
    columns: tuple[str, ...]
    model: Callable  # (theta, X, cfg) -> (f, J)
    to_params: Callable  # (theta, cfg) -> dict
    from_params: Callable  # (dict, cfg) -> theta
    bounds: tuple[tuple[float, float], ...]
    default_grid: Callable  # (y, cfg) -> tuple of tuples


def _sparse_model(theta, X, cfg):
    la, b, lc, d, le, f, lg = theta
    s, n, dd = X
    u = 1.0 - s
    a_u = np.exp(la) * u**b
    sp = a_u + np.exp(lc)
    t_n = n**-d
    t_d = np.exp(le) * dd**-f
    pred = sp * t_n + t_d + np.exp(lg)
    jac = np.stack(
        [
            a_u * t_n,
            a_u * np.log(u) * t_n,
            np.exp(lc) * t_n,
            -sp * t_n * np.log(n),
            t_d,
            -t_d * np.log(dd),
            np.full_like(pred, np.exp(lg)),
        ],
        axis=1,
    )
    return pred, jac


def _sparse_to_params(theta, cfg):
    la, b, lc, d, le, f, lg = theta
    k = cfg.n_scale**d
    return {
        "a_S": float(np.exp(la) * k),
        "b_S": float(b),
        "c_S": float(np.exp(lc) * k),
        "b_N": float(d),
        "a_D": _exp_or_inf(le / f) * cfg.d_scale if f > 0 else float("nan"),
        "b_D": float(f),
        "c": float(np.exp(lg)),
    }


def _exp_or_inf(x: float) -> float:
    """exp(x), inf past the float range (a_D when b_D sits near 0: the D-term is then flat)."""
    return float(np.exp(x)) if x < np.log(np.finfo(float).max) else float("inf")


def _sparse_from_params(p, cfg):
    k = cfg.n_scale ** p["b_N"]
    return np.array(
        [
            np.log(p["a_S"] / k),
            p["b_S"],
            np.log(p["c_S"] / k),
            p["b_N"],
            p["b_D"] * np.log(p["a_D"] / cfg.d_scale),
            p["b_D"],
            np.log(p["c"]),
        ]
    )


def _sparse_grid(y, cfg):
    lo = float(np.min(y))
    return (
        (0.0,),
        (0.5, 1.0),
        (0.0,),
        (0.2, 0.5),
        (np.log(0.5),),
        (0.2, 0.6),
        (np.log(0.3 * lo), np.log(0.8 * lo)),
    )


def _chin_model(theta, X, cfg):
    la, alpha, lb, beta, le = theta
    n, d = X
    t_n = np.exp(la) * n**-alpha
    t_d = np.exp(lb) * d**-beta
    pred = t_n + t_d + np.exp(le)
    jac = np.stack(
        [t_n, -t_n * np.log(n), t_d, -t_d * np.log(d), np.full_like(pred, np.exp(le))], axis=1
    )
    return pred, jac


def _chin_to_params(theta, cfg):
    la, alpha, lb, beta, le = theta
    return {
        "E": float(np.exp(le)),
        "A": float(np.exp(la) * cfg.n_scale**alpha),
        "alpha": float(alpha),
        "B": float(np.exp(lb) * cfg.d_scale**beta),
        "beta": float(beta),
    }


def _chin_from_params(p, cfg):
    return np.array(
        [
            np.log(p["A"] / cfg.n_scale ** p["alpha"]),
            p["alpha"],
            np.log(p["B"] / cfg.d_scale ** p["beta"]),
            p["beta"],
            np.log(p["E"]),
        ]
    )


def _chin_grid(y, cfg):
    lo = float(np.min(y))
    return (
        (0.0, np.log(10.0)),
        (0.2, 0.5),
        (0.0, np.log(10.0)),
        (0.2, 0.5),
        (np.log(0.3 * lo), np.log(0.8 * lo)),
    )


def _dense_n_model(theta, X, cfg):
    la, alpha, le = theta
    (n,) = X
    t_n = np.exp(la) * n**-alpha
    pred = t_n + np.exp(le)
    jac = np.stack([t_n, -t_n * np.log(n), np.full_like(pred, np.exp(le))], axis=1)
    return pred, jac


def _dense_n_to_params(theta, cfg):
    la, alpha, le = theta
    return {
        "E": float(np.exp(le)),
        "A": float(np.exp(la) * cfg.n_scale**alpha),
        "alpha": float(alpha),
    }


def _dense_n_from_params(p, cfg):
    return np.array([np.log(p["A"] / cfg.n_scale ** p["alpha"]), p["alpha"], np.log(p["E"])])


def _dense_n_grid(y, cfg):
    lo = float(np.min(y))
    return (
        (np.log(0.3), np.log(3.0), np.log(30.0)),
        (0.1, 0.3, 0.7),
        (np.log(0.5 * lo), np.log(0.9 * lo)),
    )


def _moe_model(theta, X, cfg):
    a, b, c, d = theta
    n, e = X
    ln, le = np.log(n), np.log(e)
    pred = np.exp(a * ln + b * le + c * ln * le + d)
    jac = pred[:, None] * np.stack([ln, le, ln * le, np.ones_like(ln)], axis=1)
    return pred, jac


def _moe_grid(y, cfg):
    m = float(np.log(np.mean(y)))
    return ((-0.1, 0.0), (-0.05, 0.0), (0.0,), (m,))


_SPECS = {
    "sparse": _Spec(
        ("log_a", "b_S", "log_c", "b_N", "log_e", "b_D", "log_c0"),
        ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c"),
        ("a_S", "b_S", "c_S", "b_N", "a_D", "b_D", "c"),
        ("sparsity", N_FIT, "tokens"),
        _sparse_model,
        _sparse_to_params,
        _sparse_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _sparse_grid,
    ),
    "chinchilla": _Spec(
        ("log_A", "alpha", "log_B", "beta", "log_E"),
        ("E", "A", "alpha", "B", "beta"),
        ("A", "alpha", "B", "beta", "E"),
        (N_FIT, "tokens"),
        _chin_model,
        _chin_to_params,
        _chin_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _chin_grid,
    ),
    "dense_n": _Spec(
        ("log_A", "alpha", "log_E"),
        ("E", "A", "alpha"),
        ("A", "alpha", "E"),
        (N_FIT,),
        _dense_n_model,
        _dense_n_to_params,
        _dense_n_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _dense_n_grid,
    ),
    "moe": _Spec(
        ("a", "b", "c", "d"),
        ("a", "b", "c", "d"),
        ("a", "b", "c", "d"),
        (ACTIVE, "num_experts"),
        _moe_model,
        lambda theta, cfg: dict(zip("abcd", map(float, theta), strict=True)),
        lambda p, cfg: np.array([p[k] for k in "abcd"]),
        ((None, None),) * 4,
        _moe_grid,
    ),
}


def _spec(law: str) -> _Spec:
    if law not in _SPECS:
        raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")
    return _SPECS[law]


def _features(law: str, df: pd.DataFrame, cfg: FitConfig) -> tuple[np.ndarray, ...]:
    spec = _spec(law)
    missing = [c for c in (*spec.columns, "eval_loss") if c not in df]
    if missing:
        raise ValueError(f"law {law!r} needs column(s) {missing}; table has {sorted(df.columns)}")
    cols = []
    for name in spec.columns:
        col = df[name].to_numpy(float)
        if name in (N_FIT, ACTIVE):
            col = col / cfg.n_scale
        elif name == "tokens":
            col = col / cfg.d_scale
        cols.append(col)
    return tuple(cols)


def _validate(law: str, df: pd.DataFrame, cfg: FitConfig) -> None:
    spec = _spec(law)
    n_params = len(spec.param_names)
    if len(df) < n_params:
        raise ValueError(f"law {law!r} has {n_params} parameters but only {len(df)} runs to fit")
    for name in (*spec.columns, "eval_loss"):
        col = df[name].to_numpy(float)
        if name == "sparsity":
            ok = (col >= 0) & (col < 1)
        else:
            ok = np.isfinite(col) & (col > 0)
        if not ok.all():
            rows = list(df.index[~ok][:5])
            raise ValueError(
                f"law {law!r}: column {name!r} must be "
                f"{'in [0, 1)' if name == 'sparsity' else 'finite and > 0'}; rows {rows} are not"
            )
    if law == "moe" and df["num_experts"].nunique() < 2:
        raise ValueError("law 'moe' needs runs with at least 2 different num_experts")


# --- the objective and optimiser ---------------------------------------------------------------


def huber_objective(pred: np.ndarray, y: np.ndarray, delta: float, log_loss: bool) -> float:
    """Mean Huber loss of log(pred) - log(y) (or pred - y), as in Hoffmann / Frantar et al."""
    r = np.log(pred) - np.log(y) if log_loss else pred - y
    return float(np.mean(scipy.special.huber(delta, r)))


def _objective(spec, X, y, cfg):
    log_y = np.log(y)

    def fun(theta):
        pred, jac = spec.model(theta, X, cfg)
        if cfg.log_loss:
            if not np.all(pred > 0):
                return np.inf, np.zeros_like(theta)
            r = np.log(pred) - log_y
            dr = jac / pred[:, None]
        else:
            r, dr = pred - y, jac
        if not np.all(np.isfinite(r)):
            return np.inf, np.zeros_like(theta)
        value = np.mean(scipy.special.huber(cfg.huber_delta, r))
        grad = np.clip(r, -cfg.huber_delta, cfg.huber_delta) @ dr / len(y)
        return value, grad

    return fun


def _single_threaded_blas():
    if _threadpool_limits is None:
        return contextlib.nullcontext()
    return _threadpool_limits(limits=1, user_api="blas")


def _minimize(spec, X, y, cfg, starts):
    fun = _objective(spec, X, y, cfg)
    best = None
    for theta0 in starts:
        with np.errstate(all="ignore"):
            res = scipy.optimize.minimize(
                fun,
                np.asarray(theta0, float),
                jac=True,
                method="L-BFGS-B",
                bounds=spec.bounds,
                options={"maxiter": cfg.max_iter, "ftol": 1e-15, "gtol": 1e-12},
            )
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise RuntimeError("every start of the fit failed (non-finite objective)")
    return best


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """A fitted law. `params` in raw units; `residuals` are log(pred) - log(observed).

    `issues`: why the data cannot identify the law's parameters (empty: identified);
    `on_bound`: parameters that ended on an optimisation bound (their value is not an estimate).
    """

    law: str
    params: dict[str, float]
    objective: float
    residuals: np.ndarray
    n_points: int
    config: FitConfig
    theta: np.ndarray
    bootstrap: pd.DataFrame | None = None  # one row of raw params per resample
    issues: tuple[str, ...] = ()
    on_bound: tuple[str, ...] = ()

    @property
    def identified(self) -> bool:
        return not self.issues

    @property
    def rms_log_residual(self) -> float:
        return float(np.sqrt(np.mean(self.residuals**2)))

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        return predict(self.law, self.params, df, self.config)

    def ci(self, level: float | None = None) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap interval per parameter (NaN without bootstrap)."""
        level = self.config.ci_level if level is None else level
        if self.bootstrap is None or not len(self.bootstrap):
            return {k: (float("nan"), float("nan")) for k in self.params}
        q = [(1 - level) / 2, (1 + level) / 2]
        return {k: tuple(map(float, np.quantile(self.bootstrap[k], q))) for k in self.params}

    def param_samples(self) -> list[dict[str, float]]:
        """Bootstrap parameter sets (for intervals of derived quantities)."""
        if self.bootstrap is None:
            return []
        return self.bootstrap.to_dict("records")


def predict(law: str, params: dict, df: pd.DataFrame, config: FitConfig = FitConfig()):
    """Law prediction for each row of `df` from raw-unit `params`."""
    if law == "sparse":
        return sparse_law(params, df["sparsity"], df[N_FIT], df["tokens"])
    if law == "chinchilla":
        return chinchilla_law(params, df[N_FIT], df["tokens"])
    if law == "dense_n":
        return dense_n_law(params, df[N_FIT])
    if law == "moe":
        return moe_law(params, df[ACTIVE], df["num_experts"], config.n_scale)
    raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")


def objective_of(law: str, params: dict, df: pd.DataFrame, config: FitConfig) -> float:
    """The fitting objective evaluated at given raw-unit `params` (e.g. published ones)."""
    pred = np.asarray(predict(law, params, df, config), float)
    return huber_objective(
        pred, df["eval_loss"].to_numpy(float), config.huber_delta, config.log_loss
    )


def identification_issues(law: str, df: pd.DataFrame) -> tuple[str, ...]:
    """Why `df` cannot identify `law`'s parameters (empty when it can).

    Flags at least as many free parameters as distinct cells of the law's inputs, and for laws
    with an N and a D term a single D, log N and log D collinear (|r| > 0.95) over the cells, or
    (sparse law) no more distinct (model size, D) budgets than its 5 N- and D-term parameters.
    """
    spec = _spec(law)
    issues = []
    cells = df[list(spec.columns)].astype(float).round(9).drop_duplicates()
    k = len(spec.param_names)
    if len(cells) <= k:
        issues.append(
            f"{k} free parameters for {len(cells)} distinct ({', '.join(spec.columns)}) cells"
        )
    if law == "sparse" and df["sparsity"].nunique() < 3:
        issues.append(f"{df['sparsity'].nunique()} sparsity level(s); the S-term needs ≥ 3")
    if law in ("sparse", "chinchilla"):
        size = "n_nonembedding" if "n_nonembedding" in df else N_FIT
        pairs = np.log(df[[size, "tokens"]].astype(float).drop_duplicates().to_numpy())
        if law == "sparse" and len(pairs) <= 5:  # c_S, b_N, a_D, b_D, c: set by (N, D) alone
            issues.append(
                f"{len(pairs)} distinct (model size, D) budgets for the 5 parameters of the N- "
                "and D-terms"
            )
        if len(np.unique(pairs[:, 1])) < 2:
            issues.append("one token count D: the D-term is not identified")
        elif len(np.unique(pairs[:, 0])) >= 2:
            r = float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])
            if abs(r) > 0.95:
                issues.append(f"N and D collinear over the runs (corr of logs = {r:.3f})")
    return tuple(issues)


_NEGLIGIBLE_LOG = -15.0  # a log-amplitude this low is a term driven to 0: its lower bound


def _on_bound(spec: _Spec, theta: np.ndarray) -> tuple[str, ...]:
    """Raw parameters whose internal value sits on an optimisation bound: an exponent at 0 or
    5, or an amplitude driven to ~0 (log below -15 in fit units), i.e. the term dropped out."""
    names = []
    for name, value, (lo, hi) in zip(spec.theta_params, theta, spec.bounds, strict=True):
        if lo is None:
            continue
        if (lo, hi) == _LOG_BOUNDS:
            hit = value <= _NEGLIGIBLE_LOG or value >= hi - 1e-6
        else:
            hit = min(value - lo, hi - value) <= 1e-4 * (hi - lo)
        if hit:
            names.append(name)
    return tuple(names)


def _clusters(df: pd.DataFrame) -> list[list[np.ndarray]]:
    """Row indices grouped by model size, then by seed within the size."""
    sizes = df["n_params_total"].to_numpy(float)
    seeds = df["seed"].to_numpy() if "seed" in df else np.zeros(len(df), int)
    out = []
    for size in np.unique(sizes):
        at = np.nonzero(sizes == size)[0]
        out.append([at[seeds[at] == s] for s in np.unique(seeds[at])])
    return out


def cluster_resample(clusters: list[list[np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """Row indices of one two-level bootstrap draw: sizes with replacement, then seeds within
    each drawn size (a seed keeps all its runs: dense and sparse stay paired). At least
    min(3, #sizes) distinct sizes are kept so that the resample can still be fitted."""
    need = min(3, len(clusters))
    for _ in range(100):
        picked = rng.integers(0, len(clusters), len(clusters))
        if len(set(picked.tolist())) >= need:
            break
    rows = []
    for i in picked:
        seeds = clusters[i]
        rows += [seeds[j] for j in rng.integers(0, len(seeds), len(seeds))]
    return np.concatenate(rows)


def fit_law(law: str, df: pd.DataFrame, config: FitConfig = FitConfig()) -> FitResult:
    """Fits `law` to the runs in `df` (tidy schema), with optional cluster bootstrap; checks
    identifiability (no bootstrap for a fit that is not identified)."""
    spec = _spec(law)
    _validate(law, df, config)
    # The same runs in any row order give the same fit (starts, bootstrap draws).
    keys = [c for c in ("run_id", "n_params_total", "tokens", "sparsity", "seed", "eval_loss")
            if c in df]  # fmt: skip
    order = np.lexsort([df[c].astype(str if c == "run_id" else float) for c in reversed(keys)])
    df = df.iloc[order].reset_index(drop=True)
    X = _features(law, df, config)
    y = df["eval_loss"].to_numpy(float)
    grid = config.init_grid or spec.default_grid(y, config)
    if len(grid) != len(spec.internal_names):
        raise ValueError(
            f"FitConfig.init_grid has {len(grid)} axes; law {law!r} needs "
            f"{len(spec.internal_names)} ({', '.join(spec.internal_names)})"
        )
    starts = [np.array(s) for s in itertools.product(*grid)]
    issues = identification_issues(law, df)
    clusters = _clusters(df) if config.n_boot and not issues else None
    with _single_threaded_blas():
        result = _fit(law, spec, X, y, config, starts, clusters)
    residuals = np.empty_like(result.residuals)
    residuals[order] = result.residuals  # back in the caller's row order
    return dataclasses.replace(
        result, residuals=residuals, issues=issues, on_bound=_on_bound(spec, result.theta)
    )


def _fit(law, spec, X, y, config, starts, clusters):
    best = _minimize(spec, X, y, config, starts)
    params = spec.to_params(best.x, config)
    pred, _ = spec.model(best.x, X, config)
    boot = None
    if clusters is not None:
        rng = np.random.default_rng(config.seed)
        pick = rng.permutation(len(starts))[: config.boot_starts]
        boot_starts = [best.x] + [starts[i] for i in pick]
        rows = []
        for _ in range(config.n_boot):
            idx = cluster_resample(clusters, rng)
            Xb = tuple(x[idx] for x in X)
            try:
                res = _minimize(spec, Xb, y[idx], config, boot_starts)
            except RuntimeError:  # every start non-finite on this resample: leave it out
                continue
            rows.append(spec.to_params(res.x, config))
        boot = pd.DataFrame(rows, columns=list(spec.param_names))
    return FitResult(
        law=law,
        params=params,
        objective=float(best.fun),
        residuals=np.log(pred) - np.log(y),
        n_points=len(y),
        config=config,
        theta=best.x,
        bootstrap=boot,
    )


def extrapolation_error(
    law: str, df: pd.DataFrame, config: FitConfig = FitConfig()
) -> tuple[FitResult, pd.DataFrame]:
    """Leave-largest-size-out: fits on every run below the largest total size (`n_params_total`:
    all its sparsities and seeds are held out), predicts those runs.

    Returns the fit and one row per held-out run with observed, predicted, relative error and,
    with `config.n_boot`, the cluster-bootstrap 95% interval of each prediction.
    """
    sizes = df["n_params_total"].to_numpy(float)
    largest = np.isclose(sizes, np.nanmax(sizes), rtol=1e-9)
    if largest.all():
        raise ValueError("n_params_total: all runs have the same size; nothing to extrapolate to")
    fit = fit_law(law, df[~largest], config)
    held = df[largest].copy()
    held["predicted"] = fit.predict(held)
    held["relative_error"] = held["predicted"] / held["eval_loss"] - 1.0
    samples = fit.param_samples()
    if samples:
        preds = np.array([predict(law, p, held, config) for p in samples])
        q = [(1 - config.ci_level) / 2, (1 + config.ci_level) / 2]
        held["predicted_lo"], held["predicted_hi"] = np.quantile(preds, q, axis=0)
    return fit, held.reset_index(drop=True)
