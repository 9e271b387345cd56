"""Reproduce a figure end to end: train the missing runs, collect, fit, draw.

    python -m experiments.reproduce fig1_size --preset quick [--root runs] [--out docs/figures]

Runs are trained by the local launcher under `<root>/<figure>/<preset>/` (finished runs are reused,
interrupted ones resume); the figures and `report.md` go to `<out>/<figure>/<preset>/`.
`--analyze-only` redraws from the committed results table without training.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = (
    "fig1_size",
    "fig2_structure",
    "fig3_moe",
    "fig4_tasks",
    "fig5_extrapolate",
    "fig6_costs",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=FIGURES)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--root", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--jobs", type=int, help="concurrent runs (default: measured)")
    parser.add_argument("--analyze-only", action="store_true")
    args = parser.parse_args(argv)

    module = importlib.import_module(f"experiments.{args.figure}")
    source = getattr(module, "RESULTS_FROM", args.figure)  # figures that reuse another's runs
    root = args.root / source / args.preset
    out = args.out / args.figure / args.preset
    table = out / "results.csv"

    from launch import __main__ as launch_cli
    from launch import collect

    if not args.analyze_only:
        if hasattr(module, "get_sweep"):
            spec = f"{REPO / 'experiments' / source}.py:{args.preset}"
            launch_args = ["run", spec, "--root", str(root)]
            if args.jobs:
                launch_args += ["--jobs", str(args.jobs)]
            code = launch_cli.main(launch_args)
            if code:
                print(f"some runs failed; see `python -m launch status {root}`", file=sys.stderr)
        if root.exists():
            collect.collect(root)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "results.csv", table)

    import pandas as pd

    from analysis import load

    results = load.load_results(table) if table.exists() else pd.DataFrame()
    reports = module.analyze(results, out)
    for name, path in (reports or {}).items():
        print(f"{args.figure} [{name}]: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
