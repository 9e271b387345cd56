"""report.md and report.json: every fit, table and figure the data supports; every number computed.

Convention: sizes are non-embedding parameters (N of a sparse model = its non-zero non-embedding
parameters), each size with its own prunable fraction; the loss gap is paired within a seed.

report.json keys (every number of report.md is in it; NaN is written as null):
  title, convention, n_runs, runs_per_structure, tolerances ([str]), ci_level
  regimes          {regime: {description, tokens_per_param [min, max], seeds_per_size {size: n}}}
  gaps             [{task, regime, n_nonembedding, n_params_total, tokens, sparsity, gap, lo, hi,
                     n_seeds, loss, dense_loss, gap_sd}]  paired ΔL per cell, t-interval over seeds
  gap_scaling      [{task, regime, sparsity, beta, lo, hi, log_g, n_sizes, n_nonpositive,
                     size_min, size_max, beta_seeds, lo_seeds, hi_seeds, n_seeds_beta,
                     verdict}]  log ΔL = log g − β log N per S and regime (over sizes; and
                     within seeds, interval over seeds)
  tolerance        [{task, regime, n_nonembedding, tokens, tolerance, limit, s_star, status, lo,
                     hi, s_min, s_max, n_seeds}]  status: bracketed | below | above (censored)
  fits             {name: {law, params, ci {p: [lo, hi]}, on_bound [p], identified, issues [str],
                     objective, rms_log_residual, n_points, n_boot}}
                   names: sparse, sparse_holdout (fit without the largest size), chinchilla,
                   dense_n
  extrapolation    {held_out_size, n_held_out, mean_abs_relative_error, coverage,
                    rows [{run_id, sparsity, tokens, eval_loss, predicted, predicted_lo,
                    predicted_hi, relative_error}]}
  fit_tolerance    [{size, tokens, tolerance, s_star, status, lo, hi, extrapolated}]
  effective_param_multiplier  [{sparsity, multiplier}]
  optimal_sparsity [{n_nonzero, compute, sparsity, tokens, loss}]
                   (the last three only for an identified sparse-law fit)
  structure_penalty [{structure, group_size, n_nonembedding, sparsity, loss, unstructured_loss,
                     penalty, relative_penalty, n_seeds}]  paired within seeds
  moe              {fit, ...}  (as in fits)
  skipped          [str]  what was not drawn or fitted, and why
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import derived, figures, gap
from analysis.fit import FitConfig, FitResult, extrapolation_error, fit_law
from analysis.load import N_FIT, PRUNABLE_FRACTION, SIZE

DEFAULT_FIT_CONFIG = FitConfig(huber_delta=1e-3, log_loss=True, n_scale=1e6, d_scale=1e9)
# The authors' objectives (SOURCES.md): T5 D = steps/1e5 = tokens/6.5536e9; ViT Huber on L.
PUBLISHED_FIT_CONFIGS = {
    "t5": FitConfig(huber_delta=1e-3, log_loss=True, n_scale=1e6, d_scale=6.5536e9),
    "vit": FitConfig(huber_delta=1e-2, log_loss=False, n_scale=1e6, d_scale=1e9),
}
SPARSITY_LEVELS = (0.5, 0.75, 0.875, 0.9375)
MAX_EXTRAPOLATION = 3.0  # fit-based tables stop at this multiple of the largest measured size
CONVENTION = (
    "N = non-embedding parameters (non-zero ones for sparse models; embeddings are never pruned); "
    "each size uses its own prunable fraction; ΔL = sparse − dense loss of the same model, tokens "
    "and seed (same init and data order), interval from the seeds."
)


def fmt(x) -> str:
    """The one number format used in the report (4 significant digits)."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, str):
        return x
    return f"{float(x):.4g}"


def interval_text(value: float, lo: float, hi: float, spec: str = ".3f") -> str:
    """ "value [lo, hi]", "value (one seed)" without an interval, "–" without a value."""
    if not np.isfinite(value):
        return "–"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{value:{spec}} (one seed)"
    return f"{value:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def by_size_table(frame: pd.DataFrame, index: list[str], value: str, size: str) -> pd.DataFrame:
    """One row per `index`, one column per size: "`value` [lo, hi]" (the frame's lo/hi), or
    "`value` (one seed)" where there is no interval."""
    cells = frame.assign(
        cell=[interval_text(v, lo, hi) for v, lo, hi in frame[[value, "lo", "hi"]].values]
    )
    wide = cells.pivot_table(index=index, columns=size, values="cell", aggfunc="first")
    wide.columns = [f"N = {gap.short_size(n)}" for n in wide.columns]
    return wide.reset_index()


def markdown_table(frame: pd.DataFrame) -> str:
    """A markdown table of `frame`, numbers in `fmt`."""
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def coefficient_table(fit: FitResult) -> str:
    """Coefficients with bootstrap intervals; parameters on a bound say so."""
    ci = fit.ci()
    level = f"{fit.config.ci_level:.0%} CI"
    rows = [
        (k, v, ci[k][0], ci[k][1], "on bound" if k in fit.on_bound else "")
        for k, v in fit.params.items()
    ]
    cols = ["param", "value", f"{level} low", f"{level} high", "note"]
    return markdown_table(pd.DataFrame(rows, columns=cols))


def fit_record(fit: FitResult) -> dict:
    """The JSON record of a fit (see the module docstring)."""
    return {
        "law": fit.law,
        "params": fit.params,
        "ci": {k: list(v) for k, v in fit.ci().items()},
        "on_bound": list(fit.on_bound),
        "identified": fit.identified,
        "issues": list(fit.issues),
        "objective": fit.objective,
        "rms_log_residual": fit.rms_log_residual,
        "n_points": fit.n_points,
        "n_boot": 0 if fit.bootstrap is None else len(fit.bootstrap),
    }


def records(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict("records")


@dataclasses.dataclass
class Report:
    """What the sections write: markdown lines, JSON data, figures and what was skipped."""

    out: Path
    fit_config: FitConfig
    tolerances: tuple[gap.Tolerance, ...]
    n_boot_runs: int
    title: str = ""  # printed under every figure: whose runs it shows
    lines: list[str] = dataclasses.field(default_factory=list)
    data: dict = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def add(self, *blocks: str) -> None:
        """Markdown blocks (paragraphs, tables, headings), each followed by a blank line."""
        for block in blocks:
            self.lines.extend([block, ""])

    def figure(self, name: str, caption: str, fn, *args, **kwargs) -> None:
        try:
            fig = fn(*args, path=None, **kwargs)
        except ValueError as e:
            self.skipped.append(f"{caption}: {e}")
            return
        if self.title:
            fig.text(0.005, 0.005, self.title, fontsize=7, color="0.35", ha="left", va="bottom")
        figures.save(fig, self.out / "figures" / name)
        plt.close(fig)
        self.add(f"![{caption}](figures/{name}.png)", f"*{caption}* ([pdf](figures/{name}.pdf))")

    def fit_section(self, heading: str, formula: str, fit: FitResult) -> bool:
        """Writes a fit; 'not identified' instead of coefficients when it is not. Returns
        whether derived tables may be built on it (identified fits only)."""
        c = fit.config
        self.add(f"## {heading}", formula)
        self.add(
            f"{fit.n_points} runs; objective (mean Huber, δ={c.huber_delta:g}, on "
            f"{'log L' if c.log_loss else 'L'}) = {fmt(fit.objective)}; RMS log-residual = "
            f"{fmt(fit.rms_log_residual)}; bootstrap over (size, seed) clusters: "
            f"{0 if fit.bootstrap is None else len(fit.bootstrap)} resamples."
        )
        if not fit.identified:
            self.add("**Not identified**: " + "; ".join(fit.issues) + ". No coefficients shown.")
            return False
        self.add(coefficient_table(fit))
        if fit.on_bound:
            self.add(
                f"**On a bound** (the data do not determine them; not estimates): "
                f"{', '.join(fit.on_bound)}. Tables derived from this fit carry that caveat."
            )
        return fit.identified


def build_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    fit_config: FitConfig = DEFAULT_FIT_CONFIG,
    tol: gap.Tolerance | None = None,
    tolerances: tuple[gap.Tolerance, ...] = gap.DEFAULT_TOLERANCES,
    title: str = "Sparsity scaling report",
    prunable_fraction: None = None,
    n_boot_runs: int = 200,
) -> Path:
    """Writes `out_dir`/report.md, report.json and figures/ for the runs in `df`.

    `tol` is added to `tolerances` (the thresholds S* is reported for). `prunable_fraction` is
    accepted for old callers and must be None: each size's own fraction is always used.
    """
    if prunable_fraction is not None:
        raise ValueError("prunable_fraction is taken per size from the runs; pass None")
    if tol is not None and tol not in tolerances:
        tolerances = (tol, *tolerances)
    rep = Report(Path(out_dir), fit_config, tuple(tolerances), n_boot_runs, title)
    (rep.out / "figures").mkdir(parents=True, exist_ok=True)
    for stale in [*(rep.out / "figures").glob("*.png"), *(rep.out / "figures").glob("*.pdf")]:
        stale.unlink()  # a figure the data no longer support must not survive a rerun
    header_section(rep, df, title)
    gap_sections(rep, df)
    budget_section(rep, df)
    sparse_law_section(rep, df)
    dense_law_sections(rep, df)
    structure_section(rep, df)
    moe_section(rep, df)
    if rep.skipped:
        rep.add("## Not drawn / not fitted", "\n".join(f"- {s}" for s in rep.skipped))
    rep.data["skipped"] = rep.skipped
    (rep.out / "report.json").write_text(to_json(rep.data))
    path = rep.out / "report.md"
    path.write_text("\n".join(rep.lines))
    return path


def to_json(data: dict) -> str:
    """`data` as JSON text: numpy scalars as numbers, NaN and inf as null."""
    return json.dumps(_jsonable(data), indent=1) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --- sections -------------------------------------------------------------------------------------


def header_section(rep: Report, df: pd.DataFrame, title: str) -> None:
    counts = df.groupby("structure").size()
    regimes = gap.describe_regimes(df)
    rep.data |= {
        "title": title,
        "convention": CONVENTION,
        "n_runs": len(df),
        "runs_per_structure": counts.to_dict(),
        "tolerances": [t.describe() for t in rep.tolerances],
        "ci_level": rep.fit_config.ci_level,
        "regimes": regimes,
    }
    rep.add(f"# {title}")
    rep.add(
        f"{len(df)} runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ". " + CONVENTION
    )
    if regimes:
        rep.add(
            "Training-budget regimes:\n"
            + "\n".join(f"- {r['description']}" for r in regimes.values())
        )


def budget_section(rep: Report, df: pd.DataFrame) -> None:
    """How the paired gap changes with the token budget at fixed size (sizes trained at ≥ 2)."""
    pairs = gap.paired_gaps(df)
    level = rep.fit_config.ci_level
    budget = gap.budget_scaling(pairs, level) if len(pairs) else pd.DataFrame()
    if budget.empty:
        return
    rep.data["budget_scaling"] = records(budget)
    rep.add(
        "## How the gap changes with the token budget at fixed size",
        f"Per size trained at several budgets D and per sparsity: log ΔL = c − γ·log D fitted "
        f"within each seed, then the mean γ over seeds with its {level:.0%} t-interval. γ > 0: "
        "more tokens shrink the gap. Verdict: shrinks / grows (interval excludes 0) or "
        "inconclusive.",
    )
    cols = [SIZE, "sparsity", "tokens_min", "tokens_max", "n_budgets", "gamma", "lo", "hi",
            "verdict", "n_seeds", "n_nonpositive"]  # fmt: skip
    rep.add(markdown_table(budget[cols]))
    cells = gap.gap_cells(pairs.assign(regime=""), level)
    rep.figure(
        "gap_vs_budget",
        "Paired loss gap vs tokens per parameter at fixed size",
        figures.plot_gap_vs_budget,
        cells[cells[SIZE].isin(budget[SIZE])],
        budget,
    )


def gap_sections(rep: Report, df: pd.DataFrame) -> None:
    """Paired gaps, their scaling with size (β(S)) and S* from runs, with figures."""
    pairs = gap.paired_gaps(df)
    if pairs.empty:
        rep.skipped.append(
            "loss gap / tolerance from runs: no sparse run has a dense run of the same model, "
            "tokens and seed"
        )
        return
    level = rep.fit_config.ci_level
    cells = gap.gap_cells(pairs, level)
    scaling = gap.gap_scaling(cells, level, pairs)
    table = gap.tolerance_table(pairs, rep.tolerances, n_boot=rep.n_boot_runs, ci_level=level)
    rep.data |= {
        "gaps": records(cells),
        "gap_scaling": records(scaling),
        "tolerance": records(table),
    }
    subtitles = {k: v["title"] for k, v in gap.describe_regimes(df).items()}
    one_seed = cells["n_seeds"].eq(1).all()
    rep.add(
        "## Measured loss gap (paired within seeds)",
        f"ΔL = mean over seeds of (sparse − dense loss of the same seed), {level:.0%} paired "
        "t-interval over seeds"
        + (
            "; every cell has one seed, so no interval is given."
            if one_seed
            else "; cells with one seed have none."
        ),
    )
    cols = [
        "task",
        "regime",
        SIZE,
        "tokens",
        "sparsity",
        "gap",
        "lo",
        "hi",
        "n_seeds",
        "dense_loss",
    ]
    rep.add(markdown_table(_drop_constant(cells[cols], ("task", "regime"))))
    rep.add(
        "## How the gap scales with size",
        f"Per sparsity and regime: log ΔL = log g(S) − β(S)·log N over the sizes (mean paired "
        f"gaps), {level:.0%} t-interval of β (n_sizes − 2 degrees of freedom: seed noise and lack "
        "of fit; ≥ 3 sizes). β_seeds: the same slope fitted within each seed that has every size, "
        f"mean over those seeds with its {level:.0%} t-interval (n_seeds_beta − 1 degrees of "
        "freedom; ≥ 2 sizes). β > 0: the gap shrinks with size, i.e. larger models tolerate more "
        "sparsity. Verdict: yes (every interval above 0), no (every one below 0), inconclusive "
        "(one contains 0, or no interval).",
    )
    cols = ["task", "regime", "sparsity", "beta", "lo", "hi", "beta_seeds", "lo_seeds",
            "hi_seeds", "n_seeds_beta", "verdict", "n_sizes", "n_nonpositive"]  # fmt: skip
    rep.add(markdown_table(_drop_constant(scaling[cols], ("task",))))
    rep.figure(
        "loss_gap",
        "Paired loss gap vs non-embedding size, with the fitted g(S)·N^−β",
        figures.plot_loss_gap,
        cells,
        scaling,
        subtitles=subtitles,
    )
    rep.add(
        "## Tolerated sparsity S* from runs",
        "Largest S with ΔL ≤ threshold, from a monotone model log ΔL = a + k·log(1/(1−S)) per size "
        "fitted to all tested sparsities, only where the tested levels bracket the threshold. "
        "'< s_min': even the smallest tested sparsity exceeds it; '> s_max': even the largest "
        f"stays within it (censored, not interpolated). {level:.0%} interval: bootstrap over seeds "
        "(none with one seed; with two seeds it spans the two single-seed estimates).",
    )
    rep.add(markdown_table(_drop_constant(_s_star_wide(table), ("task", "regime"))))
    rep.figure(
        "tolerance",
        "Tolerated sparsity S*(N) from runs, censored where not bracketed",
        figures.plot_tolerance,
        table,
        subtitles=subtitles,
    )


def _drop_constant(frame: pd.DataFrame, cols) -> pd.DataFrame:
    drop = [c for c in cols if c in frame and frame[c].nunique() <= 1]
    return frame.drop(columns=drop)


def _s_star_text(row) -> str:
    """'S* [lo, hi]' (interval when there is one) or the censoring bound."""
    text = gap.describe_s_star(row)
    if row["status"] == "bracketed" and np.isfinite(row["lo"]):
        text += f" [{row['lo']:.3g}, {row['hi']:.3g}]"
    return text


def _s_star_wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, one column per tolerance: 'S* [lo, hi]' or the censoring bound."""
    t = table.copy()
    t["S*"] = t.apply(_s_star_text, axis=1)
    keys = ["task", "regime", SIZE, "tokens", "n_seeds"]
    wide = t.pivot_table(index=keys, columns="tolerance", values="S*", aggfunc="first", sort=False)
    return wide[list(dict.fromkeys(t["tolerance"]))].reset_index()


def _sparse_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["structure"].isin(["dense", "unstructured"])].reset_index(drop=True)


def sparse_law_section(rep: Report, df: pd.DataFrame) -> None:
    runs = _sparse_runs(df)
    if runs["sparsity"].nunique() < 2 or runs[SIZE].nunique() < 2 or len(runs) < 8:
        rep.skipped.append(
            "sparse-law fit and its figures: needs ≥ 8 dense/unstructured runs with ≥ 2 "
            "sparsities and ≥ 2 sizes"
        )
        return
    fit = fit_law("sparse", runs, rep.fit_config)
    rep.data.setdefault("fits", {})["sparse"] = fit_record(fit)
    usable = rep.fit_section(
        "Sparse scaling law (Frantar et al. 2024)",
        "L(S,N,D) = (a_S (1−S)^b_S + c_S)·(1/N)^b_N + (a_D/D)^b_D + c",
        fit,
    )
    error = extrapolation_section(rep, runs)
    if fit.identified:
        rep.figure(
            "loss_vs_params",
            "Loss vs non-zero non-embedding parameters with the fitted law",
            figures.plot_loss_vs_params,
            runs,
            fit,
        )
        rep.figure(
            "residuals", "Residuals of the sparse-law fit", figures.plot_residuals, runs, fit
        )
    else:
        rep.figure(
            "loss_vs_params",
            "Loss vs non-zero non-embedding parameters (no fitted law: not identified)",
            figures.plot_loss_vs_params,
            runs,
        )
    if not usable:
        rep.skipped.append(
            "effective-parameter multiplier, S* from the fit and compute-optimal sparsity: the "
            "sparse-law fit is not identified"
        )
        return
    fit_derived_sections(rep, runs, fit, error)


def extrapolation_section(rep: Report, runs: pd.DataFrame) -> float:
    """Leave-largest-total-size-out check; returns the mean |relative error| (NaN if none)."""
    if runs["n_params_total"].nunique() < 4:
        rep.skipped.append("leave-largest-size-out extrapolation: needs ≥ 4 sizes")
        return float("nan")
    try:
        fit, held = extrapolation_error("sparse", runs, rep.fit_config)
    except (ValueError, RuntimeError) as e:
        rep.skipped.append(f"leave-largest-size-out extrapolation: {e}")
        return float("nan")
    error = float(held["relative_error"].abs().mean())
    coverage = float("nan")
    if "predicted_lo" in held:
        inside = (held["eval_loss"] >= held["predicted_lo"]) & (
            held["eval_loss"] <= held["predicted_hi"]
        )
        coverage = float(inside.mean())
    cols = ["run_id", "sparsity", "tokens", "eval_loss", "predicted", "predicted_lo"]
    cols = [c for c in [*cols, "predicted_hi", "relative_error"] if c in held]
    rep.data.setdefault("fits", {})["sparse_holdout"] = fit_record(fit)
    rep.data["extrapolation"] = {
        "held_out_size": float(held[SIZE].iloc[0]),
        "n_held_out": len(held),
        "mean_abs_relative_error": error,
        "coverage": coverage,
        "rows": records(held[cols]),
    }
    note = ""
    if not fit.identified:
        note = " (the fit on the smaller sizes is not identified: " + "; ".join(fit.issues) + ")"
    elif fit.on_bound:
        note = f" (the fit on the smaller sizes has {', '.join(fit.on_bound)} on a bound)"
    rep.add(
        "### Leave-largest-size-out extrapolation",
        f"Fit without every run of the largest model (N = {fmt(held[SIZE].iloc[0])}), predicting "
        f"its {len(held)} runs: mean |relative error| = {fmt(error)}"
        + (
            f"; {rep.fit_config.ci_level:.0%} cluster-bootstrap intervals cover {fmt(coverage)} "
            "of them"
            if np.isfinite(coverage)
            else "; no interval (no bootstrap)"
        )
        + f"{note}.",
    )
    rep.add(markdown_table(held[cols[1:]].sort_values(["tokens", "sparsity"])))
    return error


def fit_derived_sections(rep: Report, runs: pd.DataFrame, fit: FitResult, error: float) -> None:
    """Multiplier, S* from the fit (measured sizes, then up to MAX_EXTRAPOLATION× the largest,
    marked) and compute-optimal sparsity; only for identified fits."""
    if fit.on_bound:
        rep.add(
            f"Caveat for the tables below: {', '.join(fit.on_bound)} of the fit sit on a bound."
        )
    mult = pd.DataFrame({"sparsity": SPARSITY_LEVELS})
    mult["multiplier"] = derived.effective_param_multiplier(fit.params, mult["sparsity"])
    rep.data["effective_param_multiplier"] = records(mult)
    rep.add(
        "### Effective parameter multiplier",
        "Dense non-embedding parameters one non-zero parameter is worth at sparsity S.",
    )
    rep.add(markdown_table(mult))

    dense = runs.assign(regime=gap.regimes(runs))
    dense = dense[dense["sparsity"] == 0].drop_duplicates([SIZE, "tokens"])
    largest = dense[SIZE].max()
    extra = dense[dense[SIZE] == largest].assign(**{SIZE: largest * MAX_EXTRAPOLATION})
    # D of the extrapolated size: unchanged where a regime trains every size on one D, else
    # scaled with N (tokens per parameter kept).
    one_d = dense.groupby("regime")["tokens"].nunique().eq(1)
    extra.loc[~extra["regime"].map(one_d).to_numpy(bool), "tokens"] *= MAX_EXTRAPOLATION
    cells = pd.concat([dense, extra], ignore_index=True)
    levels = np.sort(runs.loc[runs["sparsity"] > 0, "sparsity"].unique())
    rows = []
    for tol in rep.tolerances:
        t = derived.tolerance_from_fit(
            fit,
            cells[SIZE],
            cells["tokens"],
            tol,
            prunable_fraction=cells[PRUNABLE_FRACTION],
            s_range=(levels[0], levels[-1]),
        )
        rows.append(
            t.assign(tolerance=tol.describe(), extrapolated=cells[SIZE].to_numpy() > largest)
        )
    table = pd.concat(rows, ignore_index=True)
    rep.data["fit_tolerance"] = records(table)
    table["s_min"], table["s_max"] = levels[0], levels[-1]
    table["S*"] = table.apply(_s_star_text, axis=1)
    table["size"] = [
        f"{fmt(n)} (extrapolated; held-out error {fmt(error)})" if x else fmt(n)
        for n, x in zip(table["size"], table["extrapolated"], strict=True)
    ]
    wide = table.pivot_table(
        index=["size", "tokens"], columns="tolerance", values="S*", aggfunc="first", sort=False
    )
    rep.add(
        "### Tolerated sparsity S*(N) from the fit",
        f"Within the tested sparsities ({levels[0]:g}–{levels[-1]:g}; censored outside), each size "
        f"with its own prunable fraction; {rep.fit_config.ci_level:.0%} cluster-bootstrap "
        f"interval; sizes beyond the largest measured one only up to {MAX_EXTRAPOLATION:g}×, marked. The law makes ΔL almost independent of D and uses one "
        "g(S) for every size; where the measured gaps depend on D or size (tables above), "
        "the S* from runs is the one the data support.",
    )
    rep.add(markdown_table(wide[list(dict.fromkeys(table["tolerance"]))].reset_index()))

    n_opt = np.unique(dense[N_FIT])
    compute = 6 * dense[N_FIT].to_numpy() * dense["tokens"].to_numpy()
    opt = derived.optimal_sparsity(
        fit.params, np.repeat(n_opt, len(compute)), np.tile(compute, len(n_opt))
    )
    rep.data["optimal_sparsity"] = records(opt)
    rep.add(
        "### Compute-optimal sparsity",
        "Sparsity minimising the fitted loss for N non-zero parameters at the measured dense "
        "training budgets C = 6·N·D/(1−S).",
    )
    rep.add(markdown_table(opt))
    rep.figure(
        "optimal_sparsity",
        "Compute-optimal sparsity (within 3× the measured sizes and budgets)",
        figures.plot_optimal_sparsity,
        fit,
        np.geomspace(n_opt.min() / 2, n_opt.max() * MAX_EXTRAPOLATION, 20),
        np.geomspace(compute.min() / 2, compute.max() * MAX_EXTRAPOLATION, 20),
        title=f"fit on {', '.join(sorted(set(gap.regimes(runs))))}"
        + (f"; on bound: {', '.join(fit.on_bound)}" if fit.on_bound else ""),
    )


def dense_law_sections(rep: Report, df: pd.DataFrame) -> None:
    dense = df[df["structure"] == "dense"].reset_index(drop=True)
    if dense[SIZE].nunique() >= 2 and dense["tokens"].nunique() >= 2 and len(dense) >= 6:
        chin = fit_law("chinchilla", dense, rep.fit_config)
        rep.data.setdefault("fits", {})["chinchilla"] = fit_record(chin)
        rep.fit_section("Dense law (Chinchilla form)", "L(N,D) = E + A/N^α + B/D^β", chin)
    else:
        rep.skipped.append(
            "Chinchilla dense fit: needs ≥ 6 dense runs with ≥ 2 sizes and ≥ 2 token counts"
        )
    if not len(dense):
        return
    d_mode = dense["tokens"].mode().iloc[0]
    fixed = dense[dense["tokens"] == d_mode].reset_index(drop=True)
    if fixed[SIZE].nunique() >= 3:
        dn = fit_law("dense_n", fixed, rep.fit_config)
        rep.data.setdefault("fits", {})["dense_n"] = fit_record(dn)
        rep.fit_section(f"Dense law at fixed D = {fmt(d_mode)}", "L(N) = E + A/N^α", dn)
    else:
        rep.skipped.append("fixed-D dense fit: needs ≥ 3 dense sizes at one token count")


def structure_section(rep: Report, df: pd.DataFrame) -> None:
    pen = derived.structure_penalty(df)
    if not len(pen):
        rep.skipped.append("structure penalty: no N:M / block runs with unstructured partners")
        return
    cols = ["structure", "group_size", SIZE, "sparsity", "loss", "unstructured_loss"]
    cols += ["penalty", "relative_penalty", "n_seeds"]
    rep.data["structure_penalty"] = records(pen[cols])
    rep.add(
        "## Structure penalty (vs unstructured at equal sparsity)",
        "Loss minus the unstructured run of the same model, tokens, sparsity and seed; mean over "
        "seeds.",
    )
    rep.add(markdown_table(pen[cols]))
    rep.figure(
        "structure_penalty", "Structure penalty vs group size", figures.plot_structure_penalty, df
    )


def moe_section(rep: Report, df: pd.DataFrame) -> None:
    moe = df[df["structure"] == "moe"].reset_index(drop=True)
    if not len(moe):
        rep.skipped.append("MoE figure: no rows with structure == 'moe'")
        return
    moe_fit = None
    if (
        moe["num_experts"].nunique() >= 2
        and moe["n_params_active"].nunique() >= 2
        and len(moe) >= 4
    ):
        moe_fit = fit_law("moe", moe, rep.fit_config)
        rep.data["moe"] = fit_record(moe_fit)
        scale = fmt(rep.fit_config.n_scale)
        ok = rep.fit_section(
            "MoE law (Clark et al. 2022)",
            f"log L = a log(N/{scale}) + b log E + c log(N/{scale}) log E + d, N = active non-embedding params",
            moe_fit,
        )
        moe_fit = moe_fit if ok else None
    else:
        rep.skipped.append("MoE fit: needs ≥ 2 expert counts and ≥ 2 sizes")
    rep.figure("moe", "MoE loss vs active and total parameters", figures.plot_moe, df, moe_fit)
