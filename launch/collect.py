"""Gather finished runs' `summary.json` into `<root>/results.csv` and `<root>/results.parquet`."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from launch import state, status
from launch.sweep import read_sweep_json

COLUMNS = (
    "run_id", "experiment", "model", "n_params_total", "n_params_nonembedding",
    "n_params_prunable", "n_params_nonzero", "n_params_active", "sparsity", "structure", "nm_n",
    "nm_m", "block_size", "num_experts", "top_k", "schedule", "steps", "tokens", "flops_per_token",
    "train_flops", "eval_loss", "eval_bpb", "train_loss", "seed", "task", "config_hash",
    "wall_time_s", "status",
)  # fmt: skip


def results_frame(root: Path, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per finished run (summary.json as written, plus status); contract columns first.

    With `include_unfinished`, runs without a summary get a row holding run_id, experiment, status
    and error, so a table of the whole sweep can be made.
    """
    root = Path(root)
    record = read_sweep_json(root)
    rows = []
    for s in status.sweep_statuses(root, record):
        summary = state.read_json(root / s.run_id / state.SUMMARY_FILE)
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
