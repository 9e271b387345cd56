"""Figure 5 — fit on the smaller sizes, predict the largest.

Command:  python -m experiments.reproduce fig5_extrapolate --preset quick
Runtime:  reuses figure 1's runs (trains them if missing, ≈ 40 min quick); the fit takes ~1 min.
Design:   the sparse scaling law L(S, N, D) of Frantar et al. fitted (Huber on log loss, bootstrap
          over runs) to figure 1's runs without the largest size, then used to predict every run of
          the largest size; predictions with 95% bootstrap intervals vs measurements. Two fits: the
          scaled-budget runs only (N and D collinear), and both budgets together.
Expected: the relative error of the extrapolation, whatever it is, reported per sparsity.
"""

import dataclasses

import numpy as np
import pandas as pd

from analysis import figures
from analysis import fit as fit_lib
from analysis import report as report_lib
from experiments import fig1_size

RESULTS_FROM = "fig1_size"
PRESETS = fig1_size.PRESETS


def extrapolate(results: pd.DataFrame, n_boot: int = 100) -> pd.DataFrame:
    sizes = results["n_params_total"].to_numpy(float)
    largest = np.isclose(sizes, sizes.max())
    cfg = dataclasses.replace(report_lib.DEFAULT_FIT_CONFIG, n_boot=n_boot)
    fit = fit_lib.fit_law("sparse", results[~largest], cfg)
    held = results[largest].copy()
    held["predicted"] = fit.predict(held)
    samples = np.array([fit_lib.predict("sparse", p, held, cfg) for p in fit.param_samples()])
    held["predicted_lo"], held["predicted_hi"] = np.quantile(samples, [0.025, 0.975], axis=0)
    held["relative_error"] = held["predicted"] / held["eval_loss"] - 1
    return held


FIT_SETS = {
    "scaled": "scaled token budgets only (N and D grow together)",
    "both": "both budgets (scaled and fixed), so N and D vary independently",
}


def analyze(results, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    lines = ["# Figure 5: extrapolation to the largest size", ""]
    for name, what in FIT_SETS.items():
        runs = results
        if "tag" in results and name == "scaled":
            runs = results[results["tag"] == "scaled"]
        if name == "both" and ("tag" not in results or results["tag"].nunique() < 2):
            continue
        lines += [f"## Fit on {what}", ""]
        try:
            held = extrapolate(runs)
        except (ValueError, RuntimeError) as e:  # too few sizes or runs for the law
            lines += [f"Not fitted: {e}", ""]
            continue
        figures.plot_extrapolation(held, out_dir / f"extrapolation_{name}")
        cols = ["model", "tag", "sparsity", "eval_loss", "predicted", "predicted_lo"]
        cols = [c for c in [*cols, "predicted_hi", "relative_error"] if c in held]
        table = held[cols].sort_values([c for c in ("tag", "sparsity") if c in held])
        lines += [
            f"Fit on {len(runs) - len(held)} runs of the smaller sizes; held out: {len(held)} "
            f"runs of {held['model'].iloc[0]}. Mean |relative error| = "
            f"{report_lib.fmt(float(np.abs(held['relative_error']).mean()))}.",
            "",
            report_lib._table(table),
            "",
            f"![extrapolation, {name}](extrapolation_{name}.png)",
            "",
        ]
    path.write_text("\n".join(lines) + "\n")
    return {"extrapolation": path}
