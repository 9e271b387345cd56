"""The post-training regime beside the during-training one: does the regime change the answer?

One-shot rows (`launch posttrain`'s table: each finished dense run pruned by magnitude / Wanda /
SparseGPT, `gap` = pruned minus that same dense model) become paired gaps in `gap.paired_gaps`'
format, one regime per method and structure ("one-shot sparsegpt", "one-shot sparsegpt 2:4"),
beside the sparse-training gaps of the same dense runs ("sparse training": gradual magnitude,
pruned while training, minus the dense run of the same seed). Every regime then gets the same
seed intervals (`gap.gap_cells`), β(S) (`gap.gap_scaling`) and local slopes (`gap.local_slopes`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import figures, gap
from analysis import report as report_lib
from analysis.load import SIZE

TRAINED = "sparse training"


def _label(method: str, structure: str) -> str:
    """'one-shot wanda' for unstructured targets, 'one-shot wanda 2:4' for N:M."""
    return f"one-shot {method}" + (
        "" if structure.startswith("unstructured") else f" {structure[3:]}"
    )


def oneshot_pairs(table: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """The one-shot rows of `table` (`launch posttrain`) whose dense run is in `results`, as
    paired gaps: the dense run's cell (task, size, tokens) and seed; regime = method + structure."""
    dense = results.drop_duplicates("run_id").set_index("run_id")
    rows = table[(table["method"] != "dense") & table["run_id"].isin(dense.index)]
    if rows.empty:
        return pd.DataFrame()
    cell = dense.loc[rows["run_id"], ["task", SIZE, "n_params_total", "tokens", "seed"]]
    out = pd.DataFrame(
        {
            **{c: cell[c].to_numpy() for c in cell.columns},
            "regime": [
                _label(m, s) for m, s in zip(rows["method"], rows["structure"], strict=True)
            ],
            "sparsity": rows["sparsity"].to_numpy(float),
            "loss": rows["eval_loss"].to_numpy(float),
            "dense_loss": rows["dense_eval_loss"].to_numpy(float),
        }
    )
    out["gap"] = out["loss"] - out["dense_loss"]
    return out


def regime_pairs(results: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Sparse-training and one-shot paired gaps, at the sizes where both regimes were measured."""
    trained = gap.paired_gaps(results).assign(regime=TRAINED)
    oneshot = oneshot_pairs(table, results)
    if oneshot.empty:
        raise ValueError("no one-shot row of the table prunes a dense run of these results")
    trained = trained[trained["sparsity"].isin(set(oneshot["sparsity"]))]
    both = set(trained[SIZE]) & set(oneshot[SIZE])
    pairs = pd.concat([trained, oneshot], ignore_index=True)
    return pairs[pairs[SIZE].isin(both)].reset_index(drop=True)


def write_report(results: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> Path:
    """`regimes.md` and figures/regimes.png: the gap against N in each regime, with intervals."""
    pairs = regime_pairs(results, table)
    cells = gap.gap_cells(pairs)
    scaling = gap.gap_scaling(cells, pairs=pairs)
    slopes = gap.local_slopes(pairs)
    out_dir = Path(out_dir)
    figures.plot_regimes(cells, out_dir / "figures" / "regimes")
    n_seeds = pairs.groupby([SIZE, "regime", "sparsity"])["seed"].nunique()
    calibration = table.loc[table["method"] != "dense", "calibration_tokens"].unique()
    betas = scaling[["regime", "sparsity", "n_sizes", "beta_seeds", "lo_seeds", "hi_seeds"]]
    last_pair = slopes[slopes["size_to"] == slopes["size_to"].max()]
    text = [
        "# Crossover: the cost of sparsity after training (one-shot) and during training",
        "",
        f"{pairs[SIZE].nunique()} sizes, {int(n_seeds.min())}–{int(n_seeds.max())} paired seeds "
        "per cell. N = non-embedding parameters. ΔL = L_pruned − L_dense of the same dense run "
        "(one-shot: that run pruned without retraining, calibrated on "
        f"{', '.join(map(str, calibration))} tokens of training windows it had not seen; sparse "
        "training: gradual magnitude pruning while training, minus the dense run of the same "
        "seed). Intervals: 95% t over seeds.",
        "",
        "![gap against size, by regime](figures/regimes.png)",
        "",
        "## ΔL per size: mean [95% interval over seeds], nats",
        "",
        report_lib.markdown_table(
            report_lib.by_size_table(cells, ["regime", "sparsity"], "gap", SIZE)
        ),
        "",
        "## β(S) over all sizes, within seeds (β > 0: the gap shrinks with size)",
        "",
        "One slope over sizes whose local slopes may change sign: read it with the next table.",
        "",
        report_lib.markdown_table(betas),
        "",
        "## Local β between the two largest sizes",
        "",
        report_lib.markdown_table(
            last_pair[
                ["regime", "sparsity", "size_from", "size_to", "beta", "lo", "hi", "gap_with_size"]
            ].reset_index(drop=True)
        ),
        "",
    ]
    path = out_dir / "regimes.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    return path
