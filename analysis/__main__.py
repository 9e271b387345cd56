"""Command line: every figure and table the data supports, in report.md / report.json.

python -m analysis --results <table or sweep root> --out <dir>
python -m analysis --published t5|vit --out <dir>
python -m analysis published --out docs/figures/published   # both published tables
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from analysis import gap, load, report


def main(argv=None) -> list[Path]:
    argv = list(argv) if argv is not None else None
    import sys

    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["published"]:
        return published_reports(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description=__doc__.split("\n")[0],
        epilog="python -m analysis published --out DIR: both published tables (--help there).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="results table (.csv/.parquet) or sweep root")
    src.add_argument("--published", choices=["t5", "vit"], help="Frantar et al. published runs")
    parser.add_argument(
        "--published-dir", default=str(load.PUBLISHED_DIR), help="published data directory"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-boot", type=int, default=100, help="cluster-bootstrap resamples")
    parser.add_argument("--eps", type=float, default=None, help="extra tolerance on ΔL")
    parser.add_argument("--relative", action="store_true", help="--eps is a fraction of L_dense")
    args = parser.parse_args(args_in)
    tol = gap.Tolerance(args.eps, args.relative) if args.eps is not None else None
    if args.published:
        df = load.load_frantar(args.published_dir, args.published)
        cfg = report.PUBLISHED_FIT_CONFIGS[args.published]
        name = {"t5": "T5 on C4", "vit": "ViT on JFT-4B"}[args.published]
        title = f"Frantar et al. (2024), published {name} runs"
    else:
        df = load.load_results(args.results)
        cfg = report.DEFAULT_FIT_CONFIG
        title = f"Sweep {args.results}"
    cfg = dataclasses.replace(cfg, n_boot=args.n_boot)
    out = report.build_report(df, args.out, fit_config=cfg, tol=tol, title=title)
    print(f"wrote {out}")
    return [out]


def published_reports(argv) -> list[Path]:
    """Reports for Frantar et al.'s T5/C4 and ViT/JFT tables in <out>/t5 and <out>/vit."""
    parser = argparse.ArgumentParser(prog="python -m analysis published")
    parser.add_argument("--out", required=True)
    parser.add_argument("--published-dir", default=str(load.PUBLISHED_DIR))
    parser.add_argument("--n-boot", type=int, default=20)
    args = parser.parse_args(argv)
    paths = []
    for name in ("t5", "vit"):
        paths += main(
            [
                "--published",
                name,
                "--published-dir",
                args.published_dir,
                "--out",
                str(Path(args.out) / name),
                "--n-boot",
                str(args.n_boot),
            ]
        )
    return paths


if __name__ == "__main__":
    main()
