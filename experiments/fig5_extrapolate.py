"""Figure 5 — fit on the smaller sizes, predict the largest.

Command:  python -m experiments.reproduce fig5_extrapolate --preset quick
Runtime:  reuses figure 1's runs (trains them if missing, ≈ 40 min quick); the fit takes ~1 min.
Design:   the sparse scaling law L(S, N, D) of Frantar et al. fitted (Huber on log loss, bootstrap
          over runs) to figure 1's scaled-budget runs without the largest size, then used to predict
          every run of the largest size; predictions with 95% bootstrap intervals vs measurements.
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


def analyze(results, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    scaled = results[results["tag"] == "scaled"] if "tag" in results else results
    path = out_dir / "report.md"
    try:
        held = extrapolate(scaled)
    except (ValueError, RuntimeError) as e:  # too few sizes or runs for the law
        path.write_text(f"# Figure 5: extrapolation\n\nNot fitted: {e}\n")
        return {"extrapolation": path}
    figures.plot_extrapolation(held, out_dir / "extrapolation")
    cols = ["model", "sparsity", "eval_loss", "predicted", "predicted_lo", "predicted_hi"]
    table = held[cols + ["relative_error"]].sort_values("sparsity")
    lines = [
        "# Figure 5: extrapolation to the largest size",
        "",
        f"Fit on {len(scaled) - len(held)} runs of the smaller sizes (scaled token budgets); "
        f"held out: {len(held)} runs of {held['model'].iloc[0]}. Mean |relative error| = "
        f"{report_lib.fmt(float(np.abs(held['relative_error']).mean()))}.",
        "",
        report_lib._table(table),
        "",
        "![extrapolation](extrapolation.png)",
    ]
    path.write_text("\n".join(lines) + "\n")
    return {"extrapolation": path}
