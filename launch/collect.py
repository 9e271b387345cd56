"""Gather finished runs' `summary.json` into `<root>/results.csv` and `<root>/results.parquet`."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from launch import status
from launch.sweep import SweepError, read_sweep_json
from sparsescale import run_files

# summary.json's columns (run_files.SUMMARY_COLUMNS), with `status` the launcher's view of the run
COLUMNS = tuple(run_files.SUMMARY_COLUMNS) + (
    () if "status" in run_files.SUMMARY_COLUMNS else ("status",)
)


def results_frame(root: Path, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per finished run (summary.json as written, plus status); contract columns first.

    With `include_unfinished`, runs without a summary get a row holding run_id, experiment, status
    and error, so a table of the whole sweep can be made.
    """
    root = Path(root)
    record = read_sweep_json(root)
    rows = []
    for s in status.sweep_statuses(root, record):
        path = root / s.run_id / run_files.SUMMARY
        try:
            summary = run_files.load_json(path)
        except FileNotFoundError:
            summary = None
        except run_files.RunFileError as e:  # a finished run must not drop out of the results
            raise SweepError(f"{e} Restore it or move it away, then collect again.") from e
        if summary is not None and not isinstance(summary, dict):
            raise SweepError(f"{path}: not a JSON object; the file is damaged.")
        if summary is None and not include_unfinished:
            continue
        row = dict(summary or {"error": s.error})
        row.setdefault("run_id", s.run_id)
        row.setdefault("experiment", record["experiment"])
        row["status"] = s.status
        rows.append(row)
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in COLUMNS)
    return frame.reindex(columns=[*COLUMNS, *extra])


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def collect(root: Path, include_unfinished: bool = False) -> pd.DataFrame:
    """Write `results.csv` and `results.parquet` at the sweep root (atomically); returns the table."""
    root = Path(root)
    frame = results_frame(root, include_unfinished)
    _replace_atomically(root / "results.csv", lambda p: frame.to_csv(p, index=False))
    _replace_atomically(root / "results.parquet", lambda p: frame.to_parquet(p, index=False))
    return frame
