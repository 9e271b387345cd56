"""Scaling-law fits: Huber loss, L-BFGS-B from a grid of starts, bootstrap intervals.

Laws (N = non-zero params, D = tokens, S = sparsity, E = experts):
  sparse      L = (a_S (1-S)^b_S + c_S) (1/N)^b_N + (a_D/D)^b_D + c    (Frantar et al. 2024)
  chinchilla  L = E + A/N^alpha + B/D^beta                            (Hoffmann et al. 2022)
  dense_n     L = E + A/N^alpha                                       (fixed D)
  moe         log L = a log N + b log E + c log N log E + d           (Clark et al. 2022; N in
                                                                       units of `n_scale`)
Internally N and D are divided by `FitConfig.n_scale` / `d_scale`, positive amplitudes are
optimised as logs and exponents directly (bounded to [0, 5]); `params` always reports the law in
the raw units above so that published coefficients can be compared directly.
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
    n_boot: bootstrap resamples of runs (0 = none); boot_starts: extra grid starts per resample.
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
        "a_D": float(np.exp(le / f) * cfg.d_scale) if f > 0 else float("nan"),
        "b_D": float(f),
        "c": float(np.exp(lg)),
    }


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
        ("sparsity", "n_params_nonzero", "tokens"),
        _sparse_model,
        _sparse_to_params,
        _sparse_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _sparse_grid,
    ),
    "chinchilla": _Spec(
        ("log_A", "alpha", "log_B", "beta", "log_E"),
        ("E", "A", "alpha", "B", "beta"),
        ("n_params_nonzero", "tokens"),
        _chin_model,
        _chin_to_params,
        _chin_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _chin_grid,
    ),
    "dense_n": _Spec(
        ("log_A", "alpha", "log_E"),
        ("E", "A", "alpha"),
        ("n_params_nonzero",),
        _dense_n_model,
        _dense_n_to_params,
        _dense_n_from_params,
        (_LOG_BOUNDS, _EXP_BOUNDS, _LOG_BOUNDS),
        _dense_n_grid,
    ),
    "moe": _Spec(
        ("a", "b", "c", "d"),
        ("a", "b", "c", "d"),
        ("n_params_active", "num_experts"),
        _moe_model,
        lambda theta, cfg: dict(zip("abcd", map(float, theta), strict=True)),
        lambda p, cfg: np.array([p[k] for k in "abcd"]),
        ((None, None),) * 4,
        _moe_grid,
    ),
}


def param_names(law: str) -> tuple[str, ...]:
    return _spec(law).param_names


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
        if name in ("n_params_nonzero", "n_params_active"):
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
    """A fitted law. `params` in raw units; `residuals` are log(pred) - log(observed)."""

    law: str
    params: dict[str, float]
    objective: float
    residuals: np.ndarray
    n_points: int
    config: FitConfig
    theta: np.ndarray
    bootstrap: pd.DataFrame | None = None  # one row of raw params per resample

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
        return sparse_law(params, df["sparsity"], df["n_params_nonzero"], df["tokens"])
    if law == "chinchilla":
        return chinchilla_law(params, df["n_params_nonzero"], df["tokens"])
    if law == "dense_n":
        return dense_n_law(params, df["n_params_nonzero"])
    if law == "moe":
        return moe_law(params, df["n_params_active"], df["num_experts"], config.n_scale)
    raise ValueError(f"unknown law {law!r}; expected one of {LAWS}")


def objective_of(law: str, params: dict, df: pd.DataFrame, config: FitConfig) -> float:
    """The fitting objective evaluated at given raw-unit `params` (e.g. published ones)."""
    pred = np.asarray(predict(law, params, df, config), float)
    return huber_objective(
        pred, df["eval_loss"].to_numpy(float), config.huber_delta, config.log_loss
    )


def fit_law(law: str, df: pd.DataFrame, config: FitConfig = FitConfig()) -> FitResult:
    """Fits `law` to the runs in `df` (tidy schema), with optional bootstrap over runs."""
    spec = _spec(law)
    _validate(law, df, config)
    X = _features(law, df, config)
    y = df["eval_loss"].to_numpy(float)
    grid = config.init_grid or spec.default_grid(y, config)
    if len(grid) != len(spec.internal_names):
        raise ValueError(
            f"FitConfig.init_grid has {len(grid)} axes; law {law!r} needs "
            f"{len(spec.internal_names)} ({', '.join(spec.internal_names)})"
        )
    starts = [np.array(s) for s in itertools.product(*grid)]
    with _single_threaded_blas():
        return _fit(law, spec, X, y, config, starts)


def _fit(law, spec, X, y, config, starts):
    best = _minimize(spec, X, y, config, starts)
    params = spec.to_params(best.x, config)
    pred, _ = spec.model(best.x, X, config)
    boot = None
    if config.n_boot:
        rng = np.random.default_rng(config.seed)
        pick = rng.permutation(len(starts))[: config.boot_starts]
        boot_starts = [best.x] + [starts[i] for i in pick]
        rows = []
        for _ in range(config.n_boot):
            idx = rng.integers(0, len(y), len(y))
            Xb = tuple(x[idx] for x in X)
            res = _minimize(spec, Xb, y[idx], config, boot_starts)
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
    law: str,
    df: pd.DataFrame,
    config: FitConfig = FitConfig(),
    size_column: str = "n_params_total",
) -> pd.DataFrame:
    """Leave-largest-size-out: fits on all but the largest `size_column` value, predicts it.

    Returns one row per held-out run with observed, predicted and relative error.
    """
    sizes = df[size_column].to_numpy(float)
    largest = np.isclose(sizes, np.nanmax(sizes), rtol=1e-9)
    if largest.all():
        raise ValueError(f"{size_column}: all runs have the same size; nothing to extrapolate to")
    fit = fit_law(law, df[~largest], dataclasses.replace(config, n_boot=0))
    held = df[largest].copy()
    held["predicted"] = fit.predict(held)
    held["relative_error"] = held["predicted"] / held["eval_loss"] - 1.0
    cols = ["run_id", size_column, "sparsity", "tokens", "eval_loss", "predicted", "relative_error"]
    return held[list(dict.fromkeys(cols))].reset_index(drop=True)
