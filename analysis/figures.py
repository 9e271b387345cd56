"""One function per figure; each returns the Figure and, given `path`, saves `path`.png/.pdf.

    python -m analysis.figures --results <table or sweep root> --out <dir>
    python -m analysis.figures --published t5 --out <dir>

draws every figure the data supports and writes <dir>/report.md (see analysis.report).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import derived  # noqa: E402
from analysis.fit import FitResult, moe_law, sparse_law  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})


def save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    """Writes `path` with .png and .pdf suffixes (when a path is given)."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".pdf"):
            fig.savefig(path.with_suffix(suffix))  # layout is already tight
    return fig


def _readable_log_axes(ax) -> None:
    """Log axes over less than a decade: plain-number tick labels, no crowded minor labels."""
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))


def _sparsity_colors(levels) -> dict[float, tuple]:
    levels = sorted(set(levels))
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(len(levels) - 1, 1) * 0.9) for i, s in enumerate(levels)}


def _tokens_model(df: pd.DataFrame):
    """D as a function of N for drawing curves: log-linear fit of tokens on total params."""
    logn, logd = np.log(df["n_params_total"]), np.log(df["tokens"])
    if logn.nunique() < 2 or logd.nunique() < 2:
        d = float(np.exp(logd.mean()))
        return lambda n: np.full_like(np.asarray(n, float), d)
    slope, icept = np.polyfit(logn, logd, 1)
    return lambda n: np.exp(icept + slope * np.log(n))


def _token_panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, object]]:
    """Up to 3 panels, one per token budget; else one panel with D following N."""
    token_values = np.sort(df["tokens"].unique())
    if len(token_values) <= 3:
        return [
            (f"D = {d:.3g}", df[df["tokens"] == d], (lambda n, d=d: np.full_like(n, d)))
            for d in token_values
        ]
    return [("D varies with N (log-linear)", df, _tokens_model(df))]


def plot_loss_vs_params(df: pd.DataFrame, fit: FitResult | None = None, path=None) -> plt.Figure:
    """Final eval loss vs non-zero params, coloured by sparsity, with the fitted sparse law."""
    data = df[df["structure"].isin(["dense", "unstructured"])]
    panels = _token_panels(data)
    colors = _sparsity_colors(data["sparsity"])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, sharey=True
    )
    for ax, (title, sub, tokens_of) in zip(axes[0], panels, strict=True):
        for s, color in colors.items():
            pts = sub[sub["sparsity"] == s]
            if pts.empty:
                continue
            ax.scatter(
                pts["n_params_nonzero"],
                pts["eval_loss"],
                color=color,
                s=22,
                zorder=3,
                label=f"S={s:g}",
            )
            if fit is not None:
                n = np.geomspace(
                    pts["n_params_nonzero"].min() / 1.5, pts["n_params_nonzero"].max() * 1.5, 100
                )
                d = tokens_of(n / (1 - s))
                ax.plot(n, sparse_law(fit.params, s, n, d), color=color, lw=1.4)
        ax.set(xscale="log", yscale="log", xlabel="non-zero parameters N", title=title)
        _readable_log_axes(ax)
    axes[0, 0].set_ylabel("eval loss")
    axes[0, -1].legend(fontsize=8, title="sparsity" + (" (lines: fit)" if fit else ""))
    fig.tight_layout()
    return save(fig, path)


def plot_loss_gap(
    df: pd.DataFrame, fit: FitResult | None = None, path=None, prunable_fraction: float = 1.0
) -> plt.Figure:
    """ΔL = L(sparse) − L(dense) at equal total size vs total size, per sparsity."""
    gaps = derived.raw_loss_gap(df)
    levels = sorted(set(gaps["sparsity"]) | set(df.loc[df["sparsity"] > 0, "sparsity"]))
    colors = _sparsity_colors(levels)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for s in levels:
        pts = gaps[gaps["sparsity"] == s]
        if len(pts):
            err = pts["loss_std"].fillna(0).to_numpy()
            ax.errorbar(
                pts["n_params_total"],
                pts["gap"],
                yerr=err,
                fmt="o",
                ms=4,
                color=colors[s],
                label=f"S={s:g}",
                zorder=3,
            )
        if fit is not None:
            n = np.geomspace(df["n_params_total"].min() / 1.5, df["n_params_total"].max() * 3, 80)
            d = _tokens_model(df)(n)
            ax.plot(
                n,
                derived.loss_gap(fit.params, s, n, d, prunable_fraction),
                color=colors[s],
                lw=1.4,
                label=None if len(pts) else f"S={s:g} (fit)",
            )
            samples = fit.param_samples()
            if samples:
                curves = np.array(
                    [derived.loss_gap(p, s, n, d, prunable_fraction) for p in samples]
                )
                q = [(1 - fit.config.ci_level) / 2, (1 + fit.config.ci_level) / 2]
                lo, hi = np.quantile(curves, q, axis=0)
                ax.fill_between(n, lo, hi, color=colors[s], alpha=0.2, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="total parameters (same for sparse and dense)",
        ylabel="ΔL = L_sparse − L_dense (nats)",
        title="Loss cost of sparsity vs size",
    )
    _readable_log_axes(ax)
    if len(gaps):  # keep the measured points in view when fitted bands are wide
        spread = gaps["gap"] + gaps["loss_std"].fillna(0)
        low = min(0.0, float((gaps["gap"] - gaps["loss_std"].fillna(0)).min()))
        ax.set_ylim(low - 0.05 * float(spread.max()), 1.3 * float(spread.max()))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_task_gaps(df: pd.DataFrame, path=None) -> plt.Figure:
    """Measured ΔL vs total size per sparsity, one panel per task (column `task`)."""
    tasks = sorted(set(df["task"]))
    levels = sorted(set(df.loc[df["sparsity"] > 0, "sparsity"]))
    colors = _sparsity_colors(levels)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        gaps = derived.raw_loss_gap(df[df["task"] == task])
        for s in levels:
            pts = gaps[gaps["sparsity"] == s].sort_values("n_params_total")
            ax.errorbar(
                pts["n_params_total"],
                pts["gap"],
                yerr=pts["loss_std"].fillna(0).to_numpy(),
                fmt="o-",
                ms=4,
                color=colors[s],
                label=f"S={s:g}",
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        _readable_log_axes(ax)
        ax.set_title(task)
        ax.set_xlabel("total parameters")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ΔL = L(sparse) − L(dense)  [nats/byte]")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_tolerance(
    df: pd.DataFrame,
    fit: FitResult | None = None,
    tol: derived.Tolerance | None = None,
    path=None,
    prunable_fraction: float = 1.0,
    n_boot_runs: int = 200,
) -> plt.Figure:
    """S*(N): largest sparsity within `tol` of the dense model of equal total size."""
    tol = tol or derived.Tolerance()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    if fit is not None:
        n = np.geomspace(df["n_params_total"].min() / 1.5, df["n_params_total"].max() * 10, 25)
        curve = derived.tolerance_from_fit(
            fit, n, _tokens_model(df)(n), tol, prunable_fraction=prunable_fraction
        )
        ax.plot(curve["n_params_total"], curve["s_star"], color="C0", label="from fit")
        if curve["lo"].notna().all():
            ax.fill_between(
                curve["n_params_total"],
                curve["lo"],
                curve["hi"],
                color="C0",
                alpha=0.2,
                lw=0,
                label=f"{fit.config.ci_level:.0%} bootstrap",
            )
    raw = derived.tolerance_from_runs(df, tol, n_boot=n_boot_runs)
    if len(raw):
        yerr = np.stack([raw["s_star"] - raw["lo"], raw["hi"] - raw["s_star"]]).clip(0)
        ax.errorbar(
            raw["n_params_total"],
            raw["s_star"],
            yerr=yerr,
            fmt="o",
            color="C3",
            label="from runs (interpolated)",
        )
        cens = raw[raw["censored"].astype(bool)]
        if len(cens):
            ax.scatter(
                cens["n_params_total"],
                cens["s_star"],
                marker="^",
                s=60,
                color="C3",
                label="≥ (highest tested S)",
            )
    ax.set(
        xscale="log",
        ylim=(0, 1),
        xlabel="total parameters N",
        ylabel="S*(N)",
        title=f"Tolerated sparsity (ΔL ≤ {tol.describe()})",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_structure_penalty(df: pd.DataFrame, path=None) -> plt.Figure:
    """Penalty of N:M / block vs unstructured at equal sparsity, vs group size m."""
    pen = derived.structure_penalty(df)
    structures = [s for s in ("nm", "block") if s in set(pen["structure"])]
    if not structures:
        raise ValueError(
            "no N:M or block runs with an unstructured partner of equal size, tokens and sparsity"
        )
    fig, axes = plt.subplots(1, len(structures), figsize=(5 * len(structures), 3.8), squeeze=False)
    sizes = sorted(pen["n_params_total"].unique())
    cmap = plt.get_cmap("plasma")
    for ax, structure in zip(axes[0], structures, strict=True):
        sub = pen[pen["structure"] == structure]
        for i, n in enumerate(sizes):
            at_n = sub[sub["n_params_total"] == n]
            # Mean over token budgets: one line per (size, sparsity).
            for s, pts in at_n.groupby("sparsity"):
                pts = pts.groupby("group_size", as_index=False)["penalty"].mean()
                ax.plot(
                    pts["group_size"],
                    pts["penalty"],
                    "o-",
                    color=cmap(i / max(len(sizes), 1) * 0.85),
                    label=f"N={n:.3g}, S={s:g}",
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set(
            xscale="log",
            xlabel="m (N:M)" if structure == "nm" else "block size",
            ylabel="L − L_unstructured (nats)",
            title=f"{structure} penalty",
        )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7, title="mean over D" if sub["tokens"].nunique() > 1 else None)
    fig.tight_layout()
    return save(fig, path)


def plot_moe(df: pd.DataFrame, fit: FitResult | None = None, path=None) -> plt.Figure:
    """MoE loss vs active and vs total params, per expert count (filled: top-2 or more, open:
    top-1), dense runs (black squares) for reference, with the Clark et al. fit."""
    moe = df[df["structure"] == "moe"]
    if moe.empty:
        raise ValueError("no rows with structure == 'moe'")
    dense = df[df["structure"] == "dense"]
    experts = sorted(moe["num_experts"].unique())
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    if len(dense):
        for ax, col in zip(axes, ("n_params_active", "n_params_total"), strict=True):
            ax.scatter(
                dense[col],
                dense["eval_loss"],
                color="k",
                marker="s",
                s=26,
                zorder=4,
                label="dense" if col == "n_params_active" else None,
            )
    for i, e in enumerate(experts):
        pts = moe[moe["num_experts"] == e].sort_values("n_params_active")
        color = cmap(i / max(len(experts) - 1, 1) * 0.9)
        for k in sorted(pts["top_k"].unique()):
            sub = pts[pts["top_k"] == k]
            face = color if k > 1 else "none"
            axes[0].scatter(
                sub["n_params_active"],
                sub["eval_loss"],
                facecolors=face,
                edgecolors=color,
                s=26,
                label=f"E={e}, k={k}",
                zorder=3,
            )
            axes[1].scatter(
                sub["n_params_total"],
                sub["eval_loss"],
                facecolors=face,
                edgecolors=color,
                s=26,
                zorder=3,
            )
        if fit is not None:
            n = np.geomspace(pts["n_params_active"].min() / 1.5, pts["n_params_active"].max() * 1.5)
            axes[0].plot(n, moe_law(fit.params, n, e, fit.config.n_scale), color=color)
    axes[0].set(
        xscale="log", yscale="log", xlabel="active parameters per token", ylabel="eval loss"
    )
    axes[1].set(xscale="log", yscale="log", xlabel="total parameters")
    for ax in axes:
        _readable_log_axes(ax)
    axes[0].legend(fontsize=8, title="experts" + (" (lines: Clark fit)" if fit else ""))
    fig.tight_layout()
    return save(fig, path)


def plot_residuals(df: pd.DataFrame, fit: FitResult, path=None) -> plt.Figure:
    """log(predicted) − log(observed) of a fit vs non-zero params, coloured by sparsity."""
    if len(df) != fit.n_points:
        raise ValueError(f"fit has {fit.n_points} points but the table has {len(df)} rows")
    colors = _sparsity_colors(df["sparsity"])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for s, color in colors.items():
        sel = (df["sparsity"] == s).to_numpy()
        ax.scatter(
            df.loc[sel, "n_params_nonzero"], fit.residuals[sel], color=color, s=22, label=f"S={s:g}"
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="non-zero parameters N",
        ylabel="log L_fit − log L",
        title=f"{fit.law} fit residuals (RMS {fit.rms_log_residual:.2g})",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_optimal_sparsity(
    fit: FitResult, n_nonzero, compute, path=None, s_max: float = 0.999
) -> plt.Figure:
    """Frantar's contour: optimal sparsity for non-zero size N and compute C = 6ND/(1−S)."""
    n_grid, c_grid = np.meshgrid(np.asarray(n_nonzero, float), np.asarray(compute, float))
    opt = derived.optimal_sparsity(fit.params, n_grid, c_grid, s_max=s_max)
    s_opt = opt["sparsity"].to_numpy().reshape(n_grid.shape)
    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    filled = ax.contourf(n_grid, c_grid, s_opt, levels=np.linspace(0, 1, 11), cmap="viridis")
    ax.contour(n_grid, c_grid, s_opt, levels=[0.5, 0.75, 0.875], colors="w", linewidths=0.8)
    fig.colorbar(filled, ax=ax, label="optimal sparsity")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="non-zero parameters N",
        ylabel="training compute C = 6ND/(1−S)",
        title="Compute-optimal sparsity (fit)",
    )
    fig.tight_layout()
    return save(fig, path)


def plot_extrapolation(held: pd.DataFrame, path=None) -> plt.Figure:
    """Predicted vs measured loss of held-out runs (columns eval_loss, predicted, predicted_lo,
    predicted_hi, sparsity), with the bootstrap interval of each prediction."""
    levels = sorted(set(held["sparsity"]))
    colors = _sparsity_colors(levels)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for s in levels:
        pts = held[held["sparsity"] == s]
        yerr = np.vstack(
            [pts["predicted"] - pts["predicted_lo"], pts["predicted_hi"] - pts["predicted"]]
        )
        ax.errorbar(
            pts["eval_loss"],
            pts["predicted"],
            yerr=yerr,
            fmt="o",
            color=colors[s],
            label=f"S={s:g}",
        )
    lims = [
        min(held["eval_loss"].min(), held["predicted_lo"].min()) * 0.98,
        max(held["eval_loss"].max(), held["predicted_hi"].max()) * 1.02,
    ]
    ax.plot(lims, lims, "k--", lw=0.8, label="y = x")
    ax.set(
        xlim=lims,
        ylim=lims,
        xlabel="measured eval loss (nats/byte)",
        ylabel="predicted by the fit on smaller sizes",
        title="Extrapolation to the largest size",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def main(argv=None) -> Path:
    from analysis import load, report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="results table (.csv/.parquet) or sweep root")
    src.add_argument("--published", choices=["t5", "vit"], help="Frantar et al. published runs")
    parser.add_argument(
        "--published-dir",
        default=None,
        help="published data dir (default: <repo>/../shared/data/published)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples of runs")
    parser.add_argument("--eps", type=float, default=0.02, help="tolerance on ΔL")
    parser.add_argument("--relative", action="store_true", help="eps is a fraction of L_dense")
    parser.add_argument(
        "--prunable-fraction",
        type=float,
        default=1.0,
        help="fraction of params pruned at sparsity S (for fit-based S*)",
    )
    args = parser.parse_args(argv)
    tol = derived.Tolerance(args.eps, args.relative)
    if args.published:
        pub = Path(
            args.published_dir or Path(__file__).resolve().parents[2] / "shared/data/published"
        )
        df = load.load_frantar(pub, args.published)
        cfg = report.PUBLISHED_FIT_CONFIGS[args.published]
        title = f"Frantar et al. (2024) published {args.published.upper()} runs"
    else:
        df = load.load_results(args.results)
        cfg = report.DEFAULT_FIT_CONFIG
        title = f"Sweep {args.results}"
    import dataclasses

    cfg = dataclasses.replace(cfg, n_boot=args.n_boot)
    out = report.build_report(
        df, args.out, fit_config=cfg, tol=tol, title=title, prunable_fraction=args.prunable_fraction
    )
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
