"""What sparsity buys (figure 6): bytes per weight of each format, training FLOPs per token, and
measured block-sparse time against the ideal 1/(1 − S), drawn from benchmark results: the
library's cost tables (`benchmarks/cost_tables.py`) and the kernel timings
(`benchmarks/kernels.py`), read from a directory the caller names. No JAX here."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis import figures  # noqa: E402


def draw_costs(out_dir, benchmarks_dir) -> dict:
    """costs.png and report.md: memory per format, FLOPs per token vs sparsity, and measured
    block-sparse time vs the ideal, from `benchmarks/kernels.py` results in `benchmarks_dir`."""
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
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return {"costs": path}
