"""Learning-rate tuning: per size, eval loss against the peak learning rate; each size's optimum
and the optimum's trend in N. JAX-free; reads a results table with `lr` and `batch_size`.

The optimum of a size is its best grid point; where that point is interior (a measured rate on
each side), a parabola in log2(lr) through it and its two neighbours gives the interpolated
optimum lr* (never outside the bracketing points). A best point at the edge of its grid is
reported as censored ("below" / "above"): the grid must be widened there, and it is left out of
the trend. The trend log lr* = a + b·log N is fitted over sizes with an interior optimum, with a
95% t-interval over sizes, beside the local slopes between adjacent sizes (a curved trend is not
one slope); a prediction beyond the fitted sizes is labelled an extrapolation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis import figures
from analysis import report as report_lib
from analysis.load import SIZE


def optima(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (size, seed): best grid lr, its loss, status (interior / below / above / single)
    and the parabola's lr* and loss where interior."""
    rows = []
    for (size, seed), group in results.groupby([SIZE, "seed"], sort=True):
        by_lr = group.groupby("lr")["eval_loss"].mean().sort_index()
        lrs, losses = by_lr.index.to_numpy(float), by_lr.to_numpy(float)
        best = int(np.argmin(losses))
        row = {
            SIZE: size,
            "model": group["model"].iloc[0],
            "seed": seed,
            "batch_size": group["batch_size"].iloc[0],
            "steps": group["steps"].iloc[0],
            "n_lrs": len(lrs),
            "best_lr": lrs[best],
            "best_loss": losses[best],
            "lr_star": np.nan,
            "loss_star": np.nan,
        }
        if len(lrs) < 2:
            row["status"] = "single"
        elif best == 0:
            row["status"] = "below"  # the optimum may lie below the grid
        elif best == len(lrs) - 1:
            row["status"] = "above"
        else:
            row["status"] = "interior"
            x = np.log2(lrs[best - 1 : best + 2])
            a, b, c = np.polyfit(x, losses[best - 1 : best + 2], 2)
            vertex = -b / (2 * a) if a > 0 else x[1]
            vertex = float(np.clip(vertex, x[0], x[2]))
            row["lr_star"] = 2.0**vertex
            row["loss_star"] = float(np.polyval([a, b, c], vertex))
        rows.append(row)
    return pd.DataFrame(rows)


def trend(table: pd.DataFrame) -> dict:
    """log lr* = a + b·log N over the sizes with an interior optimum (mean over seeds of log lr*),
    with a 95% t-interval of b over sizes, and the local slopes between adjacent sizes."""
    interior = table[table["status"] == "interior"]
    per_size = interior.groupby(SIZE)["lr_star"].apply(lambda v: float(np.mean(np.log(v))))
    out = {"n_sizes": len(per_size), "sizes": per_size.index.tolist(), "local_slopes": []}
    if len(per_size) < 3:
        out["identified"] = False
        out["issue"] = f"{len(per_size)} sizes with an interior optimum; a trend needs 3"
        return out
    log_n, log_lr = np.log(per_size.index.to_numpy(float)), per_size.to_numpy()
    fit = stats.linregress(log_n, log_lr)
    half = stats.t.ppf(0.975, len(log_n) - 2) * fit.stderr
    out.update(
        identified=True,
        slope=fit.slope,
        slope_lo=fit.slope - half,
        slope_hi=fit.slope + half,
        intercept=fit.intercept,
        rms_residual=float(np.sqrt(np.mean((log_lr - fit.intercept - fit.slope * log_n) ** 2))),
    )
    out["local_slopes"] = [
        {"size_from": int(a), "size_to": int(b), "slope": (y2 - y1) / (np.log(b) - np.log(a))}
        for (a, y1), (b, y2) in zip(per_size.items(), list(per_size.items())[1:], strict=False)
    ]
    return out


def predict(trend_fit: dict, size: float) -> dict:
    """lr* the trend predicts at `size`, labelled an extrapolation outside the fitted sizes."""
    if not trend_fit.get("identified"):
        raise ValueError(f"the learning-rate trend is not identified: {trend_fit.get('issue')}")
    lr = float(np.exp(trend_fit["intercept"] + trend_fit["slope"] * np.log(size)))
    sizes = trend_fit["sizes"]
    return {"size": size, "lr": lr, "extrapolated": not min(sizes) <= size <= max(sizes)}


def plot(results: pd.DataFrame, table: pd.DataFrame, path=None):
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    sizes = sorted(results[SIZE].unique())
    cmap = plt.get_cmap("viridis")
    for i, size in enumerate(sizes):
        color = cmap(i / max(len(sizes) - 1, 1) * 0.9)
        group = results[results[SIZE] == size].groupby("lr")["eval_loss"].mean().sort_index()
        ax.plot(group.index, group.to_numpy(), "o-", color=color, label=figures.count_label(size))
        best = table[table[SIZE] == size]
        star = best[best["status"] == "interior"]
        if len(star):
            ax.plot(star["lr_star"], star["loss_star"], "*", color=color, ms=12, mec="k", mew=0.5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(figures.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.set_xlabel("peak learning rate (AdamW, 5% warmup, cosine)")
    ax.set_ylabel("eval loss (nats/byte)")
    steps = ", ".join(str(int(s)) for s in sorted(results["steps"].unique()))
    ax.set_title(f"Dense loss vs peak learning rate ({steps} steps); ★ optimum", fontsize=10)
    ax.legend(
        title="non-embedding\nparameters", fontsize=8, loc="upper left", bbox_to_anchor=(1, 1)
    )
    fig.tight_layout()
    return figures.save(fig, path)


def write_report(results: pd.DataFrame, out_dir: Path, title: str) -> Path:
    """report.md, report.json and figures/lr.png under `out_dir`; returns report.md's path."""
    out_dir = Path(out_dir)
    dense = results[results["sparsity"] == 0]
    if dense["lr"].isna().any():
        raise ValueError("learning-rate report: some runs have no `lr` column (older summaries)")
    table = optima(dense)
    fit = trend(table)
    plot(dense, table, out_dir / "figures" / "lr")
    lines = [
        f"# {title}",
        "",
        f"{len(dense)} dense runs. N = non-embedding parameters. Each size's best grid point; "
        "lr* from a parabola in log2(lr) through the best point and its neighbours (interior "
        "optima only; 'below' / 'above': the best point is the grid's edge, so the optimum is "
        "censored and the grid must be widened).",
        "",
        report_lib.markdown_table(
            table[
                [SIZE, "model", "seed", "batch_size", "steps", "n_lrs", "best_lr", "best_loss"]
                + ["status", "lr_star", "loss_star"]
            ]
        ),
        "",
        "![loss vs learning rate](figures/lr.png)",
        "",
        "## Trend of the optimum in N",
        "",
    ]
    if fit.get("identified"):
        lines += [
            f"log lr* = {fit['intercept']:.4g} + b·log N over {fit['n_sizes']} sizes: b = "
            f"{fit['slope']:.3g} [{fit['slope_lo']:.3g}, {fit['slope_hi']:.3g}] (95% over sizes; "
            f"rms residual {fit['rms_residual']:.3g} in log lr). Local slopes between adjacent "
            "sizes:",
            "",
            report_lib.markdown_table(pd.DataFrame(fit["local_slopes"])),
        ]
    else:
        lines.append(f"Not fitted: {fit['issue']}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"title": title, "optima": report_lib.records(table), "trend": fit}
    (out_dir / "report.json").write_text(report_lib.to_json(data))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
