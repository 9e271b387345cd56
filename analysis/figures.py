"""One function per figure; each returns the Figure and, given `path`, saves `path`.png/.pdf.

Size axes are non-embedding parameters (non-zero ones for sparse runs); titles or subtitles say
the training regime. The command line lives in `python -m analysis` (analysis/__main__.py).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import derived, gap  # noqa: E402
from analysis.fit import FitResult, moe_law, sparse_law  # noqa: E402
from analysis.load import ACTIVE, N_FIT, SIZE  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})


def save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    """Writes `path` with .png and .pdf suffixes (when a path is given)."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".pdf"):
            fig.savefig(path.with_suffix(suffix))  # layout is already tight
    return fig


def count_label(v: float, spec: str = ".3g") -> str:
    """A count with its unit, in format `spec`: 98.6K, 1.77M (3 significant digits by
    default; "g" keeps up to 6, as the size axes' ticks and legends do)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= div:
            return f"{v / div:{spec}}{unit}"
    return f"{v:{spec}}"


def size_axis(ax, axis: str = "x") -> None:
    """Log size axis labelled 10K, 20K, ...: ticks at 1, 2, 5 × 10^k over up to ~2 decades,
    at 10^k beyond. Call after plotting (it reads the axis range)."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if np.log10(hi / lo) <= 2.2 else (1.0,)  # ≤ ~8 labels either way
    target.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: count_label(v, "g")))
    target.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _sparsity_colors(levels) -> dict[float, tuple]:
    levels = sorted(set(levels))
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(len(levels) - 1, 1) * 0.9) for i, s in enumerate(levels)}


def _tokens_model(df: pd.DataFrame):
    """D as a function of non-embedding size N for drawing curves: log-linear fit."""
    logn, logd = np.log(df[SIZE]), np.log(df["tokens"])
    if logn.nunique() < 2 or logd.nunique() < 2:
        d = float(np.exp(logd.mean()))
        return lambda n: np.full_like(np.asarray(n, float), d)
    slope, icept = np.polyfit(logn, logd, 1)
    return lambda n: np.exp(icept + slope * np.log(n))


def _regime_panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, object]]:
    """One panel per training-budget regime (`gap.regimes`), each with its N→D relation."""
    titles = {k: v["title"] for k, v in gap.describe_regimes(df).items()}
    df = df.assign(regime=gap.regimes(df))
    return [(titles[str(r)], sub, _tokens_model(sub)) for r, sub in df.groupby("regime")]


def plot_loss_vs_params(df: pd.DataFrame, fit: FitResult | None = None, path=None) -> plt.Figure:
    """Final eval loss vs non-zero non-embedding params, coloured by sparsity, one panel per
    regime, with the fitted sparse law."""
    data = df[df["structure"].isin(["dense", "unstructured"])]
    panels = _regime_panels(data)
    colors = _sparsity_colors(data["sparsity"])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False, sharey=True
    )
    for ax, (title, sub, tokens_of) in zip(axes[0], panels, strict=True):
        for s, color in colors.items():
            pts = sub[sub["sparsity"] == s]
            if pts.empty:
                continue
            ax.scatter(pts[N_FIT], pts["eval_loss"], color=color, s=22, zorder=3, label=f"S={s:g}")
            if fit is not None:
                f = float(pts["prunable_fraction"].median())
                n = np.geomspace(pts[N_FIT].min() / 1.3, pts[N_FIT].max() * 1.3, 100)
                d = tokens_of(n / (1 - s * f))
                ax.plot(n, sparse_law(fit.params, s, n, d), color=color, lw=1.4)
        ax.set(xscale="log", xlabel="non-zero non-embedding parameters N", title=title)
        ax.title.set_fontsize(9)
        size_axis(ax)
        _value_axis(ax)
    axes[0, 0].set_ylabel("eval loss")
    axes[0, -1].legend(fontsize=8, title="sparsity" + (" (lines: fit)" if fit else ""))
    fig.tight_layout()
    return save(fig, path)


def _panel_keys(frame: pd.DataFrame) -> list[tuple]:
    keys = {(t, r) for t, r in zip(frame["task"], frame["regime"], strict=True)}
    return sorted(keys, key=lambda k: (k[0], gap.regime_key(k[1])))


def _panel_title(task: str, regime: str, subtitles: dict | None, n_tasks: int) -> str:
    text = (subtitles or {}).get(regime, regime)
    return f"{task} — {text}" if n_tasks > 1 else text


def _value_axis(ax) -> None:
    """Log value axis with plain labels at 1, 2, 5 × 10^k."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    subs = np.arange(1.0, 10.0) if hi / lo < 8 else (1.0, 2.0, 5.0)  # short ranges: 1..9 × 10^k
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _slope_text(name: str, value: float, lo: float, hi: float) -> str:
    """ "γ=0.12 [0.05, 0.2]"; "(one seed)" without an interval; "not fitted" without a value."""
    if not np.isfinite(value):
        return f"{name} not fitted"
    interval = f"[{lo:.2g}, {hi:.2g}]" if np.isfinite(lo) and np.isfinite(hi) else "(one seed)"
    return f"{name}={value:.2g} {interval}"


def plot_gap_vs_budget(
    cells: pd.DataFrame, budget: pd.DataFrame, path=None, subtitles=None
) -> plt.Figure:
    """Paired ΔL vs tokens per non-embedding parameter at fixed size, one panel per size trained
    at several budgets (`gap.gap_cells`, `gap.budget_scaling`), with each cell's seed interval."""
    if budget.empty:
        raise ValueError("no size was trained at two or more token budgets")
    sizes = sorted(budget[SIZE].unique())
    colors = _sparsity_colors(cells["sparsity"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.0 * len(sizes), 5.4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sub = cells[cells[SIZE] == size]
        for s, color in colors.items():
            pts = sub[sub["sparsity"] == s].sort_values("tokens")
            row = budget[(budget[SIZE] == size) & (budget["sparsity"] == s)]
            if pts.empty or row.empty:
                continue
            r = row.iloc[0]
            err = np.stack([pts["gap"] - pts["lo"], pts["hi"] - pts["gap"]])
            err = np.where(np.isfinite(err), err, 0).clip(0)
            label = f"S={s:g}, " + _slope_text("γ", r["gamma"], r["lo"], r["hi"])
            ax.errorbar(pts["tokens"] / size, pts["gap"], yerr=err, fmt="o-", ms=4, lw=1,
                        color=color, label=label, zorder=3)  # fmt: skip
        ax.set(xscale="log", xlabel="tokens per non-embedding parameter D/N",
               title=f"N = {count_label(size)} non-embedding parameters")  # fmt: skip
        budgets = sorted((sub["tokens"] / size).unique())
        ax.set_xticks(budgets, [f"{b:.3g}" for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if (sub["gap"] > 0).all():
            _value_axis(ax)
        else:
            ax.axhline(0, color="k", lw=0.8)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, title="bars: 95% seed interval; γ: ΔL ∝ D^−γ within seeds",
                  title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # fmt: skip
    axes[0, 0].set_ylabel("ΔL = L_sparse − L_dense, same seed (nats)")
    fig.tight_layout()
    return save(fig, path)


def plot_loss_gap(
    cells: pd.DataFrame, scaling: pd.DataFrame | None = None, path=None, subtitles=None
) -> plt.Figure:
    """Paired ΔL vs non-embedding size per sparsity (`gap.gap_cells`), with each cell's
    seed interval, and the fitted g(S)·N^−β (`gap.gap_scaling`); one panel per regime."""
    if cells.empty:
        raise ValueError("no paired gaps to draw")
    keys = _panel_keys(cells)
    colors = _sparsity_colors(cells["sparsity"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 5.4), squeeze=False)
    positive = (cells["gap"] > 0).all()
    for ax, (task, regime) in zip(axes[0], keys, strict=True):
        sub = cells[(cells["task"] == task) & (cells["regime"] == regime)]
        fitted = False
        for s, color in colors.items():
            pts = sub[sub["sparsity"] == s].sort_values(SIZE)
            if pts.empty:
                continue
            err = np.stack([pts["gap"] - pts["lo"], pts["hi"] - pts["gap"]])
            err = np.where(np.isfinite(err), err, 0).clip(0)
            label = f"S={s:g}"
            if scaling is not None:
                row = scaling[
                    (scaling["task"] == task)
                    & (scaling["regime"] == regime)
                    & (scaling["sparsity"] == s)
                ]
                if len(row) and np.isfinite(row["beta"].iloc[0]):
                    r = row.iloc[0]
                    n = np.geomspace(pts[SIZE].min(), pts[SIZE].max(), 50)
                    ax.plot(n, np.exp(r["log_g"]) * n ** -r["beta"], color=color, lw=1.2)
                    fitted = True
                    label += ", " + _slope_text("β", r["beta"], r["lo"], r["hi"])
            ax.errorbar(
                pts[SIZE], pts["gap"], yerr=err, fmt="o", ms=4, color=color, label=label, zorder=3
            )
        if not positive:
            ax.axhline(0, color="k", lw=0.8)
        ax.set(
            xlabel="non-embedding parameters N",
            title=_panel_title(task, regime, subtitles, cells["task"].nunique()),
        )
        size_axis(ax)
        if positive:
            _value_axis(ax)
        ax.title.set_fontsize(9)
        ax.legend(
            fontsize=7,
            title="bars: 95% seed interval; lines: g(S)·N^−β, β [95% interval]"
            if fitted
            else "bars: 95% seed interval (no β: needs ≥ 3 sizes)",
            title_fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=2,
        )
    axes[0, 0].set_ylabel("ΔL = L_sparse − L_dense, same seed (nats)")
    fig.tight_layout()
    return save(fig, path)


def plot_task_gaps(df: pd.DataFrame, path=None) -> plt.Figure:
    """Paired ΔL vs non-embedding size per sparsity, one panel per task (and regime)."""
    pairs = gap.paired_gaps(df)
    if pairs.empty:
        raise ValueError("no sparse run has a dense partner of the same seed")
    cells = gap.gap_cells(pairs)
    titles = {k: v["title"] for k, v in gap.describe_regimes(df).items()}
    return plot_loss_gap(cells, gap.gap_scaling(cells), path, subtitles=titles)


_TOL_MARKERS = ("o", "s", "D", "P", "X", "*")


def plot_tolerance(table: pd.DataFrame, path=None, subtitles=None) -> plt.Figure:
    """S*(N) per tolerance (`gap.tolerance_table`), one panel per regime. Bracketed values with
    their seed interval; censored ones as ▼ at s_min (S* below it) or ▲ at s_max (above)."""
    if table.empty:
        raise ValueError("no tolerance table to draw")
    if not (table["status"] == "bracketed").any():
        raise ValueError(
            "no S* lies between two tested sparsities (every one is censored; the table gives "
            "the bounds), so a figure would show only the bounds"
        )
    keys = _panel_keys(table)
    tols = list(dict.fromkeys(table["tolerance"]))
    fig, axes = plt.subplots(
        1, len(keys), figsize=(5.0 * len(keys), 5.4), squeeze=False, sharey=True
    )
    spread = np.linspace(-0.06, 0.06, len(tols))  # small x offsets (in log10) so markers stay apart
    for ax, (task, regime) in zip(axes[0], keys, strict=True):
        sub = table[(table["task"] == task) & (table["regime"] == regime)]
        for k, tol in enumerate(tols):
            pts = sub[sub["tolerance"] == tol].sort_values(SIZE)
            x = pts[SIZE].to_numpy() * 10 ** spread[k]
            color = f"C{k}"
            br = (pts["status"] == "bracketed").to_numpy()
            lo = np.nan_to_num(pts["s_star"] - pts["lo"]).clip(0)
            hi = np.nan_to_num(pts["hi"] - pts["s_star"]).clip(0)
            ax.errorbar(
                x[br],
                pts["s_star"][br],
                yerr=np.stack([lo[br], hi[br]]),
                fmt=_TOL_MARKERS[k % 6],
                ms=5,
                color=color,
                label=f"ΔL ≤ {tol}",
            )
            for status, marker in (("below", "v"), ("above", "^")):
                sel = (pts["status"] == status).to_numpy()
                ax.scatter(x[sel], pts["s_star"][sel], marker=marker, s=40, color=color)
        for bound in ("s_min", "s_max"):
            ax.axhline(float(sub[bound].iloc[0]), color="gray", lw=0.7, ls=":")
        ax.set(
            xlabel="non-embedding parameters N",
            ylim=(min(0.4, float(table["s_min"].min()) - 0.05), 1.0),  # every tested level
            title=_panel_title(task, regime, subtitles, table["task"].nunique()),
        )
        size_axis(ax)
        ax.title.set_fontsize(9)
    axes[0, 0].set_ylabel("tolerated sparsity S*")
    for ax in axes[0]:
        ax.legend(
            fontsize=7,
            title="▼: S* below the lowest tested S, ▲: above the highest; bars: seed bootstrap",
            title_fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=2,
        )
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
    sizes = sorted(pen[SIZE].unique())
    cmap = plt.get_cmap("plasma")
    for ax, structure in zip(axes[0], structures, strict=True):
        sub = pen[pen["structure"] == structure]
        for i, n in enumerate(sizes):
            at_n = sub[sub[SIZE] == n]
            # Mean over token budgets: one line per (size, sparsity).
            for s, pts in at_n.groupby("sparsity"):
                pts = pts.groupby("group_size", as_index=False)["penalty"].mean()
                ax.plot(
                    pts["group_size"],
                    pts["penalty"],
                    "o-",
                    color=cmap(i / max(len(sizes), 1) * 0.85),
                    label=f"N={count_label(n, 'g')}, S={s:g}",
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set(
            xscale="log",
            xlabel="m (N:M)" if structure == "nm" else "block size",
            ylabel="L − L_unstructured (nats)",
            title=f"{structure} penalty, paired within seeds\n"
            f"D = {_tokens_text(df)} tokens, {df['seed'].nunique()} seed(s)",
        )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7, title="mean over D" if sub["tokens"].nunique() > 1 else None)
    fig.tight_layout()
    return save(fig, path)


def plot_moe(df: pd.DataFrame, fit: FitResult | None = None, path=None) -> plt.Figure:
    """MoE loss vs active and vs total non-embedding params, per expert count (filled: top-2 or
    more, open: top-1), dense runs (black squares) for reference, with the Clark et al. fit."""
    moe = df[df["structure"] == "moe"]
    if moe.empty:
        raise ValueError("no rows with structure == 'moe'")
    dense = df[df["structure"] == "dense"]
    experts = sorted(moe["num_experts"].unique())
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9), sharey=True)
    if len(dense):
        for ax, col in zip(axes, (ACTIVE, SIZE), strict=True):
            ax.scatter(
                dense[col],
                dense["eval_loss"],
                color="k",
                marker="s",
                s=26,
                zorder=4,
                label="dense" if col == ACTIVE else None,
            )
    for i, e in enumerate(experts):
        pts = moe[moe["num_experts"] == e].sort_values(ACTIVE)
        color = cmap(i / max(len(experts) - 1, 1) * 0.9)
        for k in sorted(pts["top_k"].unique()):
            sub = pts[pts["top_k"] == k]
            face = color if k > 1 else "none"
            for ax, col in zip(axes, (ACTIVE, SIZE), strict=True):
                ax.scatter(
                    sub[col],
                    sub["eval_loss"],
                    facecolors=face,
                    edgecolors=color,
                    s=26,
                    label=f"E={e}, k={k}" if col == ACTIVE else None,
                    zorder=3,
                )
        if fit is not None:
            n = np.geomspace(pts[ACTIVE].min() / 1.5, pts[ACTIVE].max() * 1.5)
            axes[0].plot(n, moe_law(fit.params, n, e, fit.config.n_scale), color=color)
    seeds = df["seed"].nunique()
    axes[0].set(
        xlabel="active non-embedding parameters per token",
        ylabel="eval loss",
        title=f"D = {_tokens_text(df)} tokens, {seeds} seed{'s' if seeds > 1 else ''}",
    )
    axes[1].set(xlabel="total non-embedding parameters")
    for ax in axes:
        size_axis(ax)
        _value_axis(ax)
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7, title="experts" + (" (lines: Clark fit)" if fit else ""))
    fig.tight_layout()
    return save(fig, path)


def _tokens_text(df: pd.DataFrame) -> str:
    d = df["tokens"]
    return f"{d.min():.3g}" + (f"–{d.max():.3g}" if d.nunique() > 1 else "")


def plot_residuals(df: pd.DataFrame, fit: FitResult, path=None) -> plt.Figure:
    """log(predicted) − log(observed) of a fit vs non-zero params, coloured by sparsity."""
    if len(df) != fit.n_points:
        raise ValueError(f"fit has {fit.n_points} points but the table has {len(df)} rows")
    colors = _sparsity_colors(df["sparsity"])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for s, color in colors.items():
        sel = (df["sparsity"] == s).to_numpy()
        ax.scatter(df.loc[sel, N_FIT], fit.residuals[sel], color=color, s=22, label=f"S={s:g}")
    ax.axhline(0, color="k", lw=0.8)
    size_axis(ax)
    ax.set(
        xlabel="non-zero non-embedding parameters N",
        ylabel="log L_fit − log L",
        title=f"{fit.law} fit residuals (RMS {fit.rms_log_residual:.2g})",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_optimal_sparsity(
    fit: FitResult, n_nonzero, compute, path=None, s_max: float = 0.999, title: str = ""
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
        yscale="log",
        xlabel="non-zero non-embedding parameters N",
        ylabel="training compute C = 6ND/(1−S)",
        title="Compute-optimal sparsity (fit)" + (f"\n{title}" if title else ""),
    )
    ax.title.set_fontsize(9)
    size_axis(ax)
    fig.tight_layout()
    return save(fig, path)


def plot_extrapolation(held: pd.DataFrame, path=None, title: str = "") -> plt.Figure:
    """Predicted vs measured loss of held-out runs (`fit.extrapolation_error`: eval_loss,
    predicted, sparsity and, with a bootstrap, predicted_lo / predicted_hi)."""
    held = held.copy()
    if "predicted_lo" not in held:
        held["predicted_lo"] = held["predicted_hi"] = held["predicted"]
    levels = sorted(set(held["sparsity"]))
    colors = _sparsity_colors(levels)
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for s in levels:
        pts = held[held["sparsity"] == s]
        yerr = np.vstack(
            [pts["predicted"] - pts["predicted_lo"], pts["predicted_hi"] - pts["predicted"]]
        ).clip(0)
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
        title="\n".join(["Extrapolation to the largest size", *textwrap.wrap(title, 60)]),
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def plot_local_slopes(table: pd.DataFrame, path=None) -> plt.Figure:
    """β between adjacent sizes (`gap.local_slopes`) at the pair's geometric-mean size, one line
    per sparsity, with the seed intervals: where the gap's trend in N changes sign."""
    colors = _sparsity_colors(table["sparsity"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    levels = sorted(table["sparsity"].unique())
    offsets = np.linspace(-0.04, 0.04, len(levels))  # in log10 N, so the bars do not overlap
    for s, dx in zip(levels, offsets, strict=True):
        sub = table[table["sparsity"] == s]
        x = np.sqrt(sub["size_from"] * sub["size_to"]).to_numpy() * 10**dx
        y = sub["beta"].to_numpy()
        yerr = np.abs(np.vstack([y - sub["lo"].to_numpy(), sub["hi"].to_numpy() - y]))
        ax.errorbar(x, y, yerr=yerr, marker="o", ms=4, capsize=2, color=colors[s], label=f"{s:g}")
    ax.axhline(0.0, color="k", lw=0.8)
    size_axis(ax)
    ax.set_xlabel("non-embedding parameters N (geometric mean of the size pair)")
    ax.set_ylabel("local β = −Δlog ΔL / Δlog N\n(> 0: gap shrinks with size)")
    ax.set_title("Local slope of the paired gap between adjacent sizes\nbars: 95% over seeds")
    ax.legend(title="sparsity", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return save(fig, path)


def plot_regimes(cells: pd.DataFrame, path=None) -> plt.Figure:
    """Paired ΔL against N by regime (`regimes.regime_pairs` → `gap.gap_cells`): one panel per
    unstructured sparsity that the one-shot methods reached, sparse training beside each method,
    and one panel of N:M one-shot pruning against sparse training at the same sparsity."""
    oneshot = cells[cells["regime"] != "sparse training"]
    structured = oneshot["regime"].str.contains(":")
    levels = sorted(oneshot.loc[~structured, "sparsity"].unique())
    nm_levels = sorted(oneshot.loc[structured, "sparsity"].unique())
    panels = [(f"S = {s:g}, unstructured", s, False) for s in levels]
    panels += [(f"S = {s:g}, N:M one-shot", s, True) for s in nm_levels]  # beside unstructured
    if not panels:
        raise ValueError("no one-shot cells to draw")
    names = sorted(cells["regime"].unique())
    colors = {r: plt.get_cmap("tab10")(i) for i, r in enumerate(names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8), squeeze=False)
    for ax, (title, s, nm) in zip(axes[0], panels, strict=True):
        sub = cells[np.isclose(cells["sparsity"], s)]
        keep = (sub["regime"] == "sparse training") | (sub["regime"].str.contains(":") == nm)
        for regime, pts in sub[keep].groupby("regime"):
            pts = pts.sort_values(SIZE)
            err = np.stack([pts["gap"] - pts["lo"], pts["hi"] - pts["gap"]])
            err = np.where(np.isfinite(err), err, 0).clip(0)
            style = dict(lw=2.2, ls="-") if regime == "sparse training" else dict(lw=1.2, ls="--")
            ax.errorbar(pts[SIZE], pts["gap"], yerr=err, marker="o", ms=4, capsize=2,
                        color=colors[regime], label=regime + (" (unstructured)" if nm and
                        regime == "sparse training" else ""), **style)  # fmt: skip
        size_axis(ax)
        if (sub.loc[keep, "gap"] > 0).all():
            _value_axis(ax)
        ax.set(xlabel="non-embedding parameters N", title=title)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("ΔL = L_pruned − L_dense, same dense run / seed (nats)")
    fig.suptitle("Cost of sparsity by regime: one-shot after training vs during training "
                 "(bars: 95% over seeds)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return save(fig, path)


def plot_comparison(series: list[tuple[str, pd.DataFrame, pd.DataFrame]], path=None, title=""):
    """Data sets on shared axes against N: the relative paired gap ΔL / L_dense (left,
    `gap.gap_cells` of gaps divided by their dense loss) and N_eff / N (right,
    `gap.effective_sizes`), one colour per sparsity, one marker and line style per data set.
    `series`: (label, relative-gap cells, N_eff cells) per data set; both metrics are unitless,
    so different tasks share the axes (the loss scales differ)."""
    from matplotlib.lines import Line2D

    levels = sorted(set().union(*(set(cells["sparsity"]) for _, cells, _ in series)))
    colors = _sparsity_colors(levels)
    styles = [dict(marker="o", ls="-", mfc=None), dict(marker="s", ls="--", mfc="white")]
    if not 1 <= len(series) <= len(styles):
        raise ValueError(f"{len(series)} data sets; the comparison draws 1 or 2")
    styles = styles[: len(series)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.8), sharex=True)
    for (_, cells, sizes), style in zip(series, styles, strict=True):
        for s in levels:
            for ax, frame, value in ((left, cells, "gap"), (right, sizes, "ratio")):
                if frame.empty:
                    continue
                pts = frame[np.isclose(frame["sparsity"], s)].sort_values(SIZE)
                pts = pts[np.isfinite(pts[value])]
                if pts.empty:
                    continue
                err = np.stack([pts[value] - pts["lo"], pts["hi"] - pts[value]])
                err = np.where(np.isfinite(err), err, 0).clip(0)
                ax.errorbar(pts[SIZE], pts[value], yerr=err, color=colors[s], ms=4, capsize=2,
                            lw=1.2, marker=style["marker"], ls=style["ls"],
                            mfc=style["mfc"] or colors[s])  # fmt: skip
    for ax in (left, right):
        size_axis(ax)
        ax.set_xlabel("non-embedding parameters N")
    left.set_yscale("log")
    left.set_ylabel("ΔL / L_dense, same seed")
    left.set_title("Relative loss cost of sparsity", fontsize=9)
    right.set_ylabel("N_eff / N (dense size the sparse model is worth)")
    right.set_title("Effective-parameter fraction (constant in N under Frantar et al.'s law)",
                    fontsize=9)  # fmt: skip
    handles = [
        Line2D([], [], color=colors[s], marker="o", ls="-", label=f"S={s:g}") for s in levels
    ]
    handles += [
        Line2D(
            [],
            [],
            color="0.3",
            marker=st["marker"],
            ls=st["ls"],
            mfc=st["mfc"] or "0.3",
            label=label,
        )  # fmt: skip
        for (label, _, _), st in zip(series, styles, strict=True)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               title="bars: 95% interval over seeds (none with one seed)", title_fontsize=8)  # fmt: skip
    fig.suptitle(title or "Cost of sparsity against size, data sets on shared axes", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return save(fig, path)
