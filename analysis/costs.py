"""What sparsity buys (figure 6): bytes per weight of each format, training FLOPs per token, and
measured block-sparse time against the ideal 1/(1 − S), drawn from benchmark results: the
library's cost tables (`benchmarks/cost_tables.py`) and the kernel timings
(`benchmarks/kernels.py`), read from a directory the caller names; and the energy of trained
runs (their summaries' `energy_j`, labelled by `energy_source`) against their FLOPs. No JAX here."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import figures  # noqa: E402


def draw_costs(out_dir, benchmarks_dir, results: pd.DataFrame | None = None) -> dict:
    """costs.png and report.md: memory per format, FLOPs per token vs sparsity, and measured
    block-sparse time vs the ideal, from `benchmarks/kernels.py` results in `benchmarks_dir`;
    with finished runs in `results`, also energy.png and the report's energy section."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    lines = ["# Figure 6: what sparsity buys", ""]

    benchmarks_dir = Path(benchmarks_dir)
    tables_json = benchmarks_dir / "cost_tables.json"
    if not tables_json.exists():
        raise FileNotFoundError(
            f"{tables_json} is missing: run `python -m benchmarks.cost_tables` (seconds) first."
        )
    tables = json.loads(tables_json.read_text())
    value_bytes = tables["value_bytes"]
    mem = list(tables["memory"])
    kernels_json = benchmarks_dir / "kernels_cpu.json"
    blocks = json.loads(kernels_json.read_text())["xla_block"] if kernels_json.exists() else []
    for r in blocks:
        if r["dtype"] == "float32" and tuple(r["block"]) == (16, 16) and r["sparsity"] > 0:
            mem.append(
                dict(
                    format=f"block 16×16 @{r['sparsity']:g}",
                    dtype="float32",
                    density=1 - r["sparsity"],
                    bytes=r["block_bytes_per_element"],
                )
            )
    ax = axes[0]
    short = {"float32": "f32", "bfloat16": "bf16"}
    names = [f"{r['format']} ({short[r['dtype']]})" for r in mem]
    limit = [r["density"] * value_bytes[r["dtype"]] for r in mem]
    y = np.arange(len(mem))
    ax.barh(y, [r["bytes"] for r in mem], color="tab:blue", label="measured format")
    ax.scatter(limit, y, color="k", marker="|", s=200, label="limit: density × value bytes")
    ax.set(yticks=y, yticklabels=names, xlabel="bytes per weight element", title="Memory")
    ax.legend(fontsize=7)
    lines += [
        "## Memory per format",
        "",
        "| format | dtype | bytes/element | limit |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['format']} | {r['dtype']} | {r['bytes']:.4g} | {lim:.4g} |"
        for r, lim in zip(mem, limit, strict=True)
    ]

    ax = axes[1]
    flops = tables["flops_per_token"]
    for name in dict.fromkeys(r["model"] for r in flops):
        rows = sorted((r["sparsity"], r["flops_per_token"]) for r in flops if r["model"] == name)
        s, fpt = (np.array(v) for v in zip(*rows, strict=True))
        ax.plot(s, fpt / fpt[s == 0][0], "o-", label=name)
    sparsities = np.array(sorted({r["sparsity"] for r in flops}))
    ax.plot(sparsities, 1 - sparsities, "k--", label="1 − S (all weights prunable)")
    ax.set(xlabel="sparsity S", ylabel="FLOPs per token / dense", title="Training FLOPs per token")
    ax.legend(fontsize=7)

    ax = axes[2]
    if blocks:
        for bs in sorted({tuple(r["block"]) for r in blocks}):
            pts = sorted(
                (r["sparsity"], r["speedup_auto"])
                for r in blocks
                if tuple(r["block"]) == bs and r["dtype"] == "float32"
            )
            if pts:
                s, sp = zip(*pts, strict=True)
                ax.plot(s, sp, "o-", label=f"XLA block {bs[0]}×{bs[1]}")
        s = np.linspace(0, 0.94, 50)
        ax.plot(s, 1 / (1 - s), "k--", label="ideal 1/(1 − S)")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(
            yscale="log",
            xlabel="block sparsity S",
            ylabel="speedup over masked dense (fwd+bwd)",
            title=f"Measured on {json.loads(kernels_json.read_text())['device']}",
        )
        ax.legend(fontsize=7)
        lines += ["", "## Block-sparse XLA path vs masked dense (fwd+bwd)", ""]
        lines += ["| shape | block | sparsity | speedup | ideal |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['shape']} | {r['block']} | {r['sparsity']:g} | {r['speedup_auto']:.3g} | "
            f"{1 / (1 - r['sparsity']):.3g} |"
            for r in blocks
            if r["dtype"] == "float32"
        ]
    else:
        ax.text(0.5, 0.5, "no kernels benchmark results", ha="center", transform=ax.transAxes)
        lines += [
            "",
            f"No measured times: run `python benchmarks/kernels.py --quick` ({kernels_json}).",
        ]
    fig.tight_layout()
    figures.save(fig, out_dir / "costs")
    lines += ["", "![costs](costs.png)"]
    if results is not None and len(results):
        lines += ["", *draw_energy(results, out_dir / "energy")]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return {"costs": path}


def energy_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run with a whole-run energy: joules per training token, and energy and
    train FLOPs as shares of the dense run of the same model, seed and steps (NaN without one).
    Runs whose energy does not cover every step (`energy_source` says "unmetered") are left out."""
    done = results[(results["status"] == "done") & np.isfinite(results["energy_j"])]
    done = done[~done["energy_source"].fillna("").str.contains("unmetered")].copy()
    done["j_per_token"] = done["energy_j"] / done["tokens"]
    dense = done[(done["sparsity"] == 0) & (done["num_experts"].fillna(0) == 0)]
    keys = ["model", "seed", "steps"]
    ref = dense.groupby(keys)[["j_per_token", "train_flops"]].first()
    ref.columns = ["dense_j_per_token", "dense_train_flops"]
    done = done.join(ref, on=keys)
    done["energy_vs_dense"] = done["j_per_token"] / done["dense_j_per_token"]
    done["flops_vs_dense"] = done["train_flops"] / done["dense_train_flops"]
    return done.reset_index(drop=True)


def draw_energy(results: pd.DataFrame, path) -> list[str]:
    """`path`.png (energy per token of each run beside what its FLOPs share of the dense run's
    promises; eval loss against energy) and the markdown lines describing it."""
    table = energy_table(results)
    if table.empty:
        return ["## Energy", "", "No finished run has a whole-run energy (`energy_j`)."]
    label = table["tag"].where(table["tag"].fillna("") != "", table["run_id"])
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(12, 4.2))
    y = np.arange(len(table))
    ax_e.barh(y, table["j_per_token"] * 1e3, color="tab:orange", label="energy used")
    ax_e.scatter(
        table["dense_j_per_token"] * table["flops_vs_dense"] * 1e3,
        y,
        color="k",
        marker="|",
        s=250,
        label="dense energy × FLOPs share (if energy followed FLOPs)",
    )
    ax_e.set(yticks=y, yticklabels=label, xlabel="mJ per training token", title="Energy per token")
    ax_e.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for k, row in table.iterrows():
        ax_l.scatter(row["energy_j"] / 1e3, row["eval_loss"], s=40, label=label[k])
    ax_l.set(xlabel="energy of the whole run (kJ)", ylabel="eval loss", title="Loss vs energy")
    ax_l.legend(fontsize=7)
    sources = sorted(set(table["energy_source"]))
    fig.suptitle("Energy source: " + "; ".join(sources), fontsize=8)
    fig.tight_layout()
    figures.save(fig, path)
    lines = [
        "## Energy per run",
        "",
        "Energy of each whole training run (its summary's `energy_j`) per training token, against",
        "the share of the dense run's FLOPs it needs (same model, seed and steps). How each was",
        "obtained: " + "; ".join(f"`{s}`" for s in sources) + ".",
        "",
        "| run | model | eval loss | kJ | mJ/token | energy / dense | FLOPs / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {label[k]} | {r['model']} | {r['eval_loss']:.4f} | {r['energy_j'] / 1e3:.3g} | "
        f"{r['j_per_token'] * 1e3:.3g} | {r['energy_vs_dense']:.2f} | {r['flops_vs_dense']:.2f} |"
        for k, r in table.iterrows()
    ]
    return [*lines, "", f"![energy]({Path(path).name}.png)"]
