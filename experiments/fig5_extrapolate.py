"""Figure 5 — fit on the smaller sizes, predict the largest.

Command:  python -m experiments.reproduce fig5_extrapolate --preset quick
Runtime:  reuses figure 1's runs (trains them if missing, ≈ 40 min quick); the fit takes ~1 min.
Design:   the sparse scaling law L(S, N, D) of Frantar et al. (N = non-zero non-embedding params)
          fitted (Huber on log loss, bootstrap over (size, seed) clusters) to figure 1's runs
          without the largest model, then used to predict every run of the largest model (all
          sparsities, seeds and budgets); predictions with 95% bootstrap intervals vs
          measurements. Two fits: the scaled-budget runs only (N and D collinear: the fit is not
          identified and says so), and both budgets together.
Expected: the relative error of the extrapolation, whatever it is, reported per sparsity.
"""

import dataclasses

import numpy as np

from analysis import figures
from analysis import fit as fit_lib
from analysis import report as report_lib
from experiments import fig1_size

RESULTS_FROM = "fig1_size"
PRESETS = fig1_size.PRESETS


def extrapolate(results, n_boot: int = 100):
    """(fit on the smaller sizes, held-out runs of the largest) from `fit.extrapolation_error`."""
    cfg = dataclasses.replace(report_lib.DEFAULT_FIT_CONFIG, n_boot=n_boot)
    return fit_lib.extrapolation_error("sparse", results, cfg)


FIT_SETS = {
    "scaled": "scaled token budgets only (N and D grow together)",
    "both": "both budgets (scaled and fixed), so N and D vary independently",
}


def analyze(results, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    lines = ["# Figure 5: extrapolation to the largest size", ""]
    data = {}
    for name, what in FIT_SETS.items():
        runs = results[results["structure"].isin(["dense", "unstructured"])]
        if "tag" in results and name == "scaled":
            runs = runs[runs["tag"] == "scaled"]
        if name == "both" and ("tag" not in results or results["tag"].nunique() < 2):
            continue
        runs = runs.reset_index(drop=True)
        lines += [f"## Fit on {what}", ""]
        try:
            fit, held = extrapolate(runs)
        except (ValueError, RuntimeError) as e:  # too few sizes or runs for the law
            lines += [f"Not fitted: {e}", ""]
            continue
        error = float(np.abs(held["relative_error"]).mean())
        coverage = None  # share of held-out runs inside their 95% interval (with a bootstrap)
        if "predicted_lo" in held:
            inside = (held["predicted_lo"] <= held["eval_loss"]) & (
                held["eval_loss"] <= held["predicted_hi"]
            )
            coverage = float(inside.mean())
        data[name] = {
            "fit": report_lib.fit_record(fit),
            "mean_abs_relative_error": error,
            "coverage": coverage,
            "rows": held.to_dict("records"),
        }
        status = (
            "identified"
            if fit.identified
            else "**not identified** (" + "; ".join(fit.issues) + "), so its coefficients mean "
            "nothing and its bootstrap was skipped; the prediction error is still measured"
        )
        bound = f"; parameters on bounds: {', '.join(fit.on_bound)}" if fit.on_bound else ""
        title = f"{what}; held out: every run of {held['model'].iloc[0]}"
        figures.plot_extrapolation(held, out_dir / f"extrapolation_{name}", title=title)
        cols = ["model", "tag", "seed", "sparsity", "eval_loss", "predicted", "predicted_lo"]
        cols = [c for c in [*cols, "predicted_hi", "relative_error"] if c in held]
        table = held[cols].sort_values([c for c in ("tag", "sparsity", "seed") if c in held])
        covered = (
            ""
            if coverage is None
            else (f"; {report_lib.fmt(coverage)} of them lie inside the 95% intervals")
        )
        lines += [
            f"Fit on {fit.n_points} runs of the smaller sizes ({status}{bound}); held out: "
            f"{len(held)} runs of {held['model'].iloc[0]} (all sparsities, seeds and budgets). "
            f"Mean |relative error| = {report_lib.fmt(error)}{covered}.",
            "",
            report_lib.markdown_table(table),
            "",
            f"![extrapolation, {name}](extrapolation_{name}.png)",
            "",
        ]
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(report_lib.to_json(data))
    return {"extrapolation": path}
