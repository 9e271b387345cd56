"""report.md: every fit, table and figure the data supports; every number computed here."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import derived, figures
from analysis.fit import FitConfig, FitResult, extrapolation_error, fit_law

DEFAULT_FIT_CONFIG = FitConfig(huber_delta=1e-3, log_loss=True, n_scale=1e6, d_scale=1e9)
# The authors' objectives (SOURCES.md): T5 D = steps/1e5 = tokens/6.5536e9; ViT Huber on L.
PUBLISHED_FIT_CONFIGS = {
    "t5": FitConfig(huber_delta=1e-3, log_loss=True, n_scale=1e6, d_scale=6.5536e9),
    "vit": FitConfig(huber_delta=1e-2, log_loss=False, n_scale=1e6, d_scale=1e9),
}
SPARSITY_LEVELS = (0.5, 0.75, 0.875, 0.9375)


def fmt(x) -> str:
    """The one number format used in the report (4 significant digits)."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    return f"{float(x):.4g}"


def _table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([head, rule, *body])


def coefficient_table(fit: FitResult) -> str:
    ci = fit.ci()
    level = f"{fit.config.ci_level:.0%} CI"
    rows = [(k, v, ci[k][0], ci[k][1]) for k, v in fit.params.items()]
    return _table(pd.DataFrame(rows, columns=["param", "value", f"{level} low", f"{level} high"]))


def _fit_summary(fit: FitResult) -> str:
    c = fit.config
    return (
        f"{fit.n_points} runs; objective (mean Huber, δ={c.huber_delta:g}, on "
        f"{'log L' if c.log_loss else 'L'}) = {fmt(fit.objective)}; RMS log-residual = "
        f"{fmt(fit.rms_log_residual)}; bootstrap resamples = {c.n_boot}."
    )


def _supports_sparse(df):
    d = df[df["structure"].isin(["dense", "unstructured"])]
    ok = (
        d["sparsity"].nunique() >= 2
        and d["n_params_nonzero"].nunique() >= 2
        and d["tokens"].nunique() >= 2
        and len(d) >= 8
    )
    return (
        ok,
        d,
        ("needs ≥ 8 dense/unstructured runs with ≥ 2 sparsities, ≥ 2 sizes and ≥ 2 token counts"),
    )


def build_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    fit_config: FitConfig = DEFAULT_FIT_CONFIG,
    tol: derived.Tolerance | None = None,
    title: str = "Sparsity scaling report",
    prunable_fraction: float | None = 1.0,
    n_boot_runs: int = 200,
) -> Path:
    """Fits, derived tables and figures for `df`; writes `out_dir`/report.md and figures.

    `prunable_fraction` (the share of parameters that sparsity S removes from, for fit-based ΔL and
    S*): None takes the median of n_params_prunable / n_params_total over the runs."""
    tol = tol or derived.Tolerance()
    if prunable_fraction is None:
        ratio = df["n_params_prunable"] / df["n_params_total"]
        prunable_fraction = float(ratio.median()) if ratio.notna().any() else 1.0
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    skipped: list[str] = []
    counts = df.groupby("structure").size()
    lines += [
        f"{len(df)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ". "
        f"Tolerance: ΔL ≤ {tol.describe()}. N = non-zero parameters, D = tokens. Fit-based ΔL "
        f"and S* prune a fraction {fmt(prunable_fraction)} of the parameters.",
        "",
    ]

    def figure(name, caption, fn, *args, **kwargs):
        try:
            fig = fn(*args, path=fig_dir / name, **kwargs)
        except ValueError as e:
            skipped.append(f"{caption}: {e}")
            return
        plt.close(fig)
        lines.extend(
            [f"![{caption}](figures/{name}.png)", f"*{caption}* ([pdf](figures/{name}.pdf))", ""]
        )

    # --- sparse law --------------------------------------------------------------------------
    ok, sparse_df, need = _supports_sparse(df)
    sparse_fit = None
    if ok:
        sparse_df = sparse_df.reset_index(drop=True)
        sparse_fit = fit_law("sparse", sparse_df, fit_config)
        lines += [
            "## Sparse scaling law (Frantar et al. 2024)",
            "",
            "L(S,N,D) = (a_S (1−S)^b_S + c_S)·(1/N)^b_N + (a_D/D)^b_D + c",
            "",
            _fit_summary(sparse_fit),
            "",
            coefficient_table(sparse_fit),
            "",
        ]
        ext = None
        if sparse_df["n_params_nonzero"].nunique() >= 3:
            try:
                ext = extrapolation_error("sparse", sparse_df, fit_config, "n_params_nonzero")
            except ValueError as e:  # too few runs below the largest size
                skipped.append(f"leave-largest-size-out extrapolation: {e}")
        if ext is not None:
            lines += [
                "### Leave-largest-size-out extrapolation",
                "",
                f"Fit without the largest N, predicting its {len(ext)} runs: mean |relative "
                f"error| = {fmt(ext['relative_error'].abs().mean())}.",
                "",
                _table(ext.drop(columns=["run_id"])),
                "",
            ]
        mult = pd.DataFrame({"sparsity": SPARSITY_LEVELS})
        mult["effective param multiplier"] = derived.effective_param_multiplier(
            sparse_fit.params, mult["sparsity"]
        )
        lines += [
            "### Effective parameter multiplier",
            "",
            "Dense parameters one non-zero parameter is worth at sparsity S (from the fit).",
            "",
            _table(mult),
            "",
        ]
        sizes = np.sort(df["n_params_total"].unique())
        n_eval = np.unique(np.concatenate([sizes, sizes.max() * np.array([10.0, 100.0])]))
        tol_fit = derived.tolerance_from_fit(
            sparse_fit,
            n_eval,
            figures._tokens_model(sparse_df)(n_eval),
            tol,
            prunable_fraction=prunable_fraction,
        )
        lines += [
            "### Tolerated sparsity S*(N) from the fit",
            "",
            f"Largest S with ΔL ≤ {tol.describe()} against the dense model of equal total "
            "size (D from the sweep's N→D relation; beyond the largest size: extrapolated).",
            "",
            _table(tol_fit),
            "",
        ]
        n_opt = np.unique(sparse_df.loc[sparse_df["sparsity"] == 0, "n_params_nonzero"])
        n_opt = n_opt if len(n_opt) else np.unique(sparse_df["n_params_nonzero"])
        budget = 6 * n_opt * 20 * n_opt  # ~Chinchilla-optimal dense budget for N params
        factors = np.array([1.0, 10.0, 100.0, 1000.0])
        opt = derived.optimal_sparsity(
            sparse_fit.params, np.repeat(n_opt, len(factors)), np.outer(budget, factors).ravel()
        )
        lines += [
            "### Compute-optimal sparsity",
            "",
            "Sparsity minimising the fitted loss for a model with N non-zero params "
            "trained with compute C = 6·N·D/(1−S) (C in multiples of 6·N·20N).",
            "",
            _table(opt),
            "",
        ]
        figure(
            "loss_vs_params",
            "Loss vs non-zero parameters with the fitted law",
            figures.plot_loss_vs_params,
            sparse_df,
            sparse_fit,
        )
        figure(
            "residuals",
            "Residuals of the sparse-law fit",
            figures.plot_residuals,
            sparse_df,
            sparse_fit,
        )
        figure(
            "optimal_sparsity",
            "Compute-optimal sparsity",
            figures.plot_optimal_sparsity,
            sparse_fit,
            np.geomspace(n_opt.min() / 10, n_opt.max() * 100, 20),
            np.geomspace(budget.min() / 10, budget.max() * 1e4, 20),
        )
    else:
        skipped.append(f"sparse-law fit and its figures: {need}")

    # --- dense laws ----------------------------------------------------------------------------
    dense = df[df["structure"] == "dense"].reset_index(drop=True)
    if (
        dense["n_params_nonzero"].nunique() >= 2
        and dense["tokens"].nunique() >= 2
        and len(dense) >= 6
    ):
        chin = fit_law("chinchilla", dense, fit_config)
        lines += [
            "## Dense law (Chinchilla form)",
            "",
            "L(N,D) = E + A/N^α + B/D^β",
            "",
            _fit_summary(chin),
            "",
            coefficient_table(chin),
            "",
        ]
    else:
        skipped.append(
            "Chinchilla dense fit: needs ≥ 6 dense runs with ≥ 2 sizes and ≥ 2 token counts"
        )
    if len(dense):
        d_mode = dense["tokens"].mode().iloc[0]
        fixed = dense[dense["tokens"] == d_mode].reset_index(drop=True)
        if fixed["n_params_nonzero"].nunique() >= 3:
            dn = fit_law("dense_n", fixed, fit_config)
            lines += [
                f"## Dense law at fixed D = {fmt(d_mode)}",
                "",
                "L(N) = E + A/N^α",
                "",
                _fit_summary(dn),
                "",
                coefficient_table(dn),
                "",
            ]
        else:
            skipped.append("fixed-D dense fit: needs ≥ 3 dense sizes at one token count")

    # --- raw-run tables and figures -------------------------------------------------------------
    gaps = derived.raw_loss_gap(df)
    if len(gaps):
        lines += [
            "## Measured loss gap and tolerance",
            "",
            "ΔL = mean sparse loss − mean dense "
            "loss at equal total size and tokens (std over seeds).",
            "",
            _table(
                gaps[
                    [
                        "n_params_total",
                        "tokens",
                        "sparsity",
                        "loss",
                        "dense_loss",
                        "gap",
                        "loss_std",
                        "n_seeds",
                    ]
                ]
            ),
            "",
        ]
        raw_tol = derived.tolerance_from_runs(
            df, tol, n_boot=n_boot_runs, ci_level=fit_config.ci_level
        )
        lines += [
            f"S*(N) from runs (gap interpolated between tested sparsities; interval from "
            f"resampling seeds; censored = even the highest tested S is within "
            f"{tol.describe()}).",
            "",
            _table(
                raw_tol[["n_params_total", "tokens", "s_star", "lo", "hi", "censored", "n_seeds"]]
            ),
            "",
        ]
        figure(
            "loss_gap",
            "Loss gap vs size",
            figures.plot_loss_gap,
            df,
            sparse_fit,
            prunable_fraction=prunable_fraction,
        )
        figure(
            "tolerance",
            "Tolerated sparsity S*(N)",
            figures.plot_tolerance,
            df,
            sparse_fit,
            tol,
            prunable_fraction=prunable_fraction,
            n_boot_runs=n_boot_runs,
        )
    else:
        skipped.append(
            "loss gap / tolerance from runs: no sparse run has a dense run of the same "
            "total size and tokens"
        )

    pen = derived.structure_penalty(df)
    if len(pen):
        lines += [
            "## Structure penalty (vs unstructured at equal sparsity)",
            "",
            _table(
                pen[
                    [
                        "structure",
                        "group_size",
                        "n_params_total",
                        "sparsity",
                        "loss",
                        "unstructured_loss",
                        "penalty",
                        "relative_penalty",
                    ]
                ]
            ),
            "",
        ]
        figure(
            "structure_penalty",
            "Structure penalty vs group size",
            figures.plot_structure_penalty,
            df,
        )
    else:
        skipped.append("structure penalty: no N:M / block runs with unstructured partners")

    moe = df[df["structure"] == "moe"].reset_index(drop=True)
    if len(moe):
        moe_fit = None
        if (
            moe["num_experts"].nunique() >= 2
            and moe["n_params_active"].nunique() >= 2
            and len(moe) >= 4
        ):
            moe_fit = fit_law("moe", moe, fit_config)
            lines += [
                "## MoE law (Clark et al. 2022)",
                "",
                f"log L = a log(N/{fmt(fit_config.n_scale)}) + b log E + c log(N/"
                f"{fmt(fit_config.n_scale)}) log E + d, N = active params",
                "",
                _fit_summary(moe_fit),
                "",
                coefficient_table(moe_fit),
                "",
            ]
        else:
            skipped.append("MoE fit: needs ≥ 2 expert counts and ≥ 2 sizes")
        figure("moe", "MoE loss vs active and total parameters", figures.plot_moe, df, moe_fit)
    else:
        skipped.append("MoE figure: no rows with structure == 'moe'")

    if skipped:
        lines += ["## Not drawn / not fitted", ""] + [f"- {s}" for s in skipped] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
