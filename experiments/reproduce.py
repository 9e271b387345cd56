"""Reproduce a figure end to end: train the missing runs, collect, fit, draw.

    python -m experiments.reproduce fig1_size [--preset quick] [--root runs] [--publish | --out DIR]

Each experiment has presets of its own and a default (`--help` lists them); an unknown preset is a
one-line error (exit 2), and an analysis that finds no finished run exits 1.

It runs from the checkout (it is not installed), and `runs/` and `docs/` are the checkout's.
Runs are trained by the local launcher under the sweep root `<root>/<figure>/<preset>/` (finished
runs are reused, interrupted ones resume). The results table, reports and figures go to
`<root>/<figure>/<preset>/analysis/` by default, so a reproduction never touches the committed
results; `--publish` writes them to `docs/figures/<figure>/<preset>/` instead and refreshes
`docs/RESULTS.md`; `--out DIR` writes them to `DIR/<figure>/<preset>/`.
`--config.KEY=VALUE` (the launcher's and trainer's flag, repeatable) changes a field of every
run, e.g. `--config.data.name=synthetic`: such a reproduction has a sweep root of its own,
`<root>/<figure>/<preset>+<KEY>=<VALUE>/`, and neither publishes nor redraws committed runs.
`--analyze-only` redraws without training, to the same places, from the committed run records
(`docs/records/<figure>/<preset>/`), or where there are none from the committed results table
(`docs/figures/<figure>/<preset>/results.csv`). A preset that is an arm of another (the
experiment's `RECORDS_OF`) shares that preset's records directory.

Committed run records (`launch/records.py`, `docs/records/<figure>/<preset>/<run_id>.json`): a
run whose record matches its config is not trained again (its summary comes from the record), and
`--publish` writes a record for every run it trained.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import shutil
import sys
from pathlib import Path

from launch.__main__ import CONFIG_FLAGS
from launch.sweep import SweepError, parse_config_flags

REPO = Path(__file__).resolve().parents[1]  # the checkout
DOCS = REPO / "docs"  # committed results: figures/<figure>/<preset>/, records/, RESULTS.md
FIGURES = (
    "headline",
    "crossover",
    "fig1_size",
    "fig2_structure",
    "fig3_moe",
    "fig4_tasks",
    "fig5_extrapolate",
    "fig6_costs",
)


def presets_of(module) -> list[str]:
    """The experiment's presets (any name for one without PRESETS)."""
    return sorted(getattr(module, "PRESETS", {}))


def default_preset(module) -> str:
    """The experiment's own default: the default argument of its `get_config`, else "quick"."""
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        return "quick"
    return inspect.signature(get_config).parameters["arg"].default


def _presets_epilog() -> str:
    lines = ["presets (default first):"]
    for figure in FIGURES:
        module = importlib.import_module(f"experiments.{figure}")
        default = default_preset(module)
        others = [p for p in presets_of(module) if p != default]
        lines.append(f"  {figure:<18} {', '.join([default, *others])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description=__doc__.splitlines()[0],
        epilog=f"{_presets_epilog()}\n\n{CONFIG_FLAGS}" if {"-h", "--help"} & set(argv) else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("figure", choices=FIGURES)
    parser.add_argument("--preset", help="the experiment's preset (default: its own; see --help)")
    parser.add_argument("--root", type=Path, default=REPO / "runs", help="sweep roots (runs/)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--publish", action="store_true", help="write to docs/figures and refresh docs/RESULTS.md"
    )
    where.add_argument("--out", type=Path, help="write to OUT/<figure>/<preset>/")
    parser.add_argument("--jobs", type=int, help="concurrent runs (default: measured)")
    parser.add_argument(
        "--stack", type=int, help="runs trained together per process (default: measured; 1: off)"
    )
    parser.add_argument("--analyze-only", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if not all(flag.startswith("--config.") for flag in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        config_overrides = parse_config_flags(rest)
    except SweepError as e:
        parser.error(str(e))
    if config_overrides and (args.publish or args.analyze_only):
        parser.error(
            "--config.* changes what is trained: --publish (docs/ holds the experiment as "
            "declared) and --analyze-only (it trains nothing) do not take it"
        )

    module = importlib.import_module(f"experiments.{args.figure}")
    known = presets_of(module)
    args.preset = args.preset or default_preset(module)
    if known and args.preset not in known:
        print(
            f"error: {args.figure} has no preset {args.preset!r}; its presets: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    source = getattr(module, "RESULTS_FROM", args.figure)  # figures that reuse another's runs
    # a reproduction with --config.* overrides keeps its runs apart from the declared ones
    name = args.preset
    if config_overrides:
        text = "_".join(f"{key}={value}" for key, value in config_overrides.items())
        name += "+" + re.sub(r"[^A-Za-z0-9._+=-]+", "-", text)
    root = args.root / source / name
    out = output_dir(args.figure, name, args.root, args.out, args.publish)
    committed = DOCS / "figures" / args.figure / args.preset / "results.csv"
    # presets that are arms of another share its records (experiment's RECORDS_OF: arm -> preset)
    records_preset = getattr(module, "RECORDS_OF", {}).get(args.preset, args.preset)
    run_records = DOCS / "records" / source / records_preset
    table = out / "results.csv"

    from launch import __main__ as launch_cli
    from launch import collect, records

    if not args.analyze_only:
        if hasattr(module, "get_sweep"):
            spec = f"{REPO / 'experiments' / source}.py:{args.preset}"
            launch_args = ["run", spec, "--root", str(root), "--records", str(run_records), *rest]
            if args.jobs:
                launch_args += ["--jobs", str(args.jobs)]
            stack = args.stack or getattr(module, "MAX_STACK", None)  # the experiment's own cap
            if stack:
                launch_args += ["--stack", str(stack)]
            code = launch_cli.main(launch_args)
            if code == 2 or code >= 128:  # bad input (nothing ran) or interrupted: it said why
                return code
            if code and args.publish:  # docs/ shows complete sweeps only
                print(
                    f"error: not publishing: some runs failed; see `python -m launch status "
                    f"{root}`, then run the same command again",
                    file=sys.stderr,
                )
                return 1
            if code:
                print(f"some runs failed; see `python -m launch status {root}`", file=sys.stderr)
        if root.exists():
            collect.collect(root)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "results.csv", table)
            if args.publish and (root / "sweep.json").exists():
                records.write_records(root, run_records)
    elif list(run_records.glob("*.json")):
        out.mkdir(parents=True, exist_ok=True)
        records.results_frame(run_records).to_csv(table, index=False)
    elif committed.exists() and committed.resolve() != table.resolve():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(committed, table)

    import pandas as pd

    from analysis import load

    results = load.load_results(table) if table.exists() else pd.DataFrame()
    if hasattr(module, "get_sweep") and not len(results):
        where = run_records if args.analyze_only else root
        print(f"error: no finished runs of {args.figure}:{args.preset} in {where}", file=sys.stderr)
        return 1
    reports = module.analyze(results, out)
    for name, path in (reports or {}).items():
        print(f"{args.figure} [{name}]: {path}")
    for png in sorted(out.rglob("*.png")):
        print(f"  figure: {png}")
    if args.publish:
        print(f"updated {write_results_md(DOCS / 'figures', DOCS / 'RESULTS.md')}")
    return 0


def output_dir(figure: str, preset: str, root: Path, out: Path | None, publish: bool) -> Path:
    """Where a reproduction writes its table, reports and figures (see the module docstring)."""
    if publish:
        return DOCS / "figures" / figure / preset
    if out is not None:
        return out / figure / preset
    return root / figure / preset / "analysis"


def write_results_md(figures_dir: Path, path: Path) -> Path:
    """docs/RESULTS.md: every generated report under `figures_dir`, figure by figure (each report's
    own figure links made relative to docs/)."""
    lines = [
        "# Results",
        "",
        "Generated by `python -m experiments.reproduce <figure> --preset <preset> --publish` from",
        "the results tables next to each report; every number below was computed by `analysis/`,",
        "none typed.",
        "",
    ]
    reports = [
        r
        for r in sorted(figures_dir.glob("*/*/**/report.md"))
        if r.relative_to(figures_dir).parts[0] in FIGURES
    ]
    done = sorted({r.relative_to(figures_dir).parts[:2] for r in reports})
    lines.append("Reports here: " + ", ".join(f"`{f}` ({p})" for f, p in done) + ".")
    missing = [f for f in FIGURES if f not in {f for f, _ in done}]
    if missing:
        lines.append("Not yet run: " + ", ".join(f"`{f}`" for f in missing) + ".")
    lines.append("")
    lines += _tolerance_summary(figures_dir)
    for report in reports:
        rel = report.parent.relative_to(path.parent)
        body = re.sub(r"\]\((?!https?:|#)([^)]+)\)", rf"]({rel}/\1)", report.read_text())
        body = re.sub(r"^#", "##", body, flags=re.MULTILINE)
        lines += [body, ""]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def _tolerance_summary(figures_dir: Path) -> list[str]:
    """The answer, read from the reports' report.json: β(S) per regime (log ΔL = log g(S) − β log
    N; β > 0 = larger models tolerate more sparsity) with its 95% intervals (over sizes, and over
    seeds where the report has them) and verdict; the headline experiment first, then figure 1."""
    import pandas as pd

    from analysis import report as report_lib

    lines = []
    sources = [("headline", "headline/*/main"), ("figure 1", "fig1_size/*/both")]
    for name, pattern in sources:
        for path in sorted(figures_dir.glob(f"{pattern}/report.json")):
            data = json.loads(path.read_text())
            bounds = ["beta", "lo", "hi", "beta_seeds", "lo_seeds", "hi_seeds"]  # null → NaN
            keys = ["regime", "sparsity", *bounds, "verdict", "n_sizes"]
            rows = [{k: r[k] for k in keys if k in r} for r in data.get("gap_scaling", [])]
            if not rows:
                continue
            table = pd.DataFrame(rows)
            numeric = [c for c in bounds if c in table]
            table[numeric] = table[numeric].astype(float)
            lines += [
                f"## Does the sparsity penalty shrink with size? ({name}, {path.parts[-3]})",
                "",
                data["convention"],
                "",
                "β(S) from log ΔL = log g(S) − β(S)·log N over the sizes of each regime; β > 0 "
                "means larger models tolerate more sparsity (95% t-intervals: lo/hi over sizes, "
                "lo_seeds/hi_seeds over seeds of the within-seed slopes where reported; verdict "
                "yes / no / inconclusive). Regimes: "
                + "; ".join(r["description"] for r in data["regimes"].values())
                + ".",
                "",
                report_lib.markdown_table(table),
                "",
            ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
