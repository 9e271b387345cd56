"""What sparsity buys (figure 6): bytes per weight of each format, training FLOPs per token, and
measured block-sparse time against the ideal 1/(1 − S), drawn from benchmark results."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis import figures  # noqa: E402
from sparsescale import accounting  # noqa: E402
from sparsescale import model as model_lib  # noqa: E402
from sparsescale.kernels import formats  # noqa: E402


def memory_table() -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        value_bytes = formats.dense_bytes_per_element(dtype)
        rows.append(dict(format="dense", dtype=dtype, density=1.0, bytes=value_bytes))
        rows.append(dict(format="masked dense", dtype=dtype, density=1.0, bytes=value_bytes + 1))
        for n, m in ((2, 4), (1, 4), (2, 8)):
            rows.append(
                dict(
                    format=f"N:M {n}:{m}",
                    dtype=dtype,
                    density=n / m,
                    bytes=formats.nm_bytes_per_element(n, m, dtype),
                )
            )
    return rows


def draw_costs(out_dir, benchmarks_dir) -> dict:
    """costs.png and report.md: memory per format, FLOPs per token vs sparsity, and measured
    block-sparse time vs the ideal, from `benchmarks/kernels.py` results in `benchmarks_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    lines = ["# Figure 6: what sparsity buys", ""]

    mem = memory_table()
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
    limit = [r["density"] * formats.dense_bytes_per_element(r["dtype"]) for r in mem]
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
    sparsities = np.array([0, 0.5, 0.75, 0.875, 0.9375])
    for name in ("cpu_25k", "cpu_100k", "cpu_600k", "cpu_4.7m"):
        cfg = model_lib.preset(name)
        fpt = [accounting.flops_per_token(cfg, 128, s) for s in sparsities]
        ax.plot(sparsities, np.array(fpt) / fpt[0], "o-", label=name)
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
