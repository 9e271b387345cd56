"""Compact records of finished runs, committed so a sweep survives the machine it ran on.

    <records>/<run_id>.json   (docs/records/<figure>/<preset>/ for the experiments)
      summary        the run's summary.json (run_files.SUMMARY_COLUMNS)
      curve          the learning curve thinned to <= CURVE_POINTS rows {step, train_loss, eval_loss}
      config_hash    RunConfig.hash() of the run that produced it
      code_version   `git describe --always --dirty` of the code that trained it (from the
                     attempt in launch.json that finished it; else of the code writing the record)

`write_records` (`launch collect --records`) writes one per finished run. `materialise`
(`launch run --records`) marks a run done, without training, when its record's config_hash is the
run's: it writes the record's summary.json into the workdir, with the record beside it as
`from_record.json` (where the summary came from). A record whose hash differs is ignored with a
warning. `results_frame` rebuilds a results table from records alone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import pandas as pd

from launch import state
from launch.sweep import Sweep, read_sweep_json
from sparsescale import run_files

CURVE_POINTS = 50


def thin_curve(metrics: list[dict], points: int = CURVE_POINTS) -> list[dict]:
    """At most `points` evenly spaced logged rows (always the last) as {step, train_loss,
    eval_loss}; a loss the row did not log is None."""
    rows = [m for m in metrics if "train/loss" in m or "eval/loss" in m]
    if len(rows) > points:
        last = len(rows) - 1
        rows = [rows[round(i * last / (points - 1))] for i in range(points)]
    return [
        {"step": m["step"], "train_loss": m.get("train/loss"), "eval_loss": m.get("eval/loss")}
        for m in rows
    ]


def trained_by(workdir: Path) -> str | None:
    """The code version of the launch attempt that finished the run in `workdir`, if known."""
    attempts = state.read_launch_state(Path(workdir))[0]["attempts"]
    done = [a for a in attempts if a.get("outcome") == state.DONE and a.get("code_version")]
    return done[-1]["code_version"] if done else None


def make_record(workdir: Path, version: str) -> dict[str, Any]:
    """The record of the finished run in `workdir` (its summary.json must exist); `version` names
    the code when its launch record does not."""
    version = trained_by(workdir) or version
    summary = run_files.load_json(Path(workdir) / run_files.SUMMARY)
    metrics = run_files.read_metrics(Path(workdir) / run_files.METRICS)
    return {
        "summary": summary,
        "curve": thin_curve(metrics),
        "config_hash": summary["config_hash"],
        "code_version": version,
    }


def write_records(root: Path, records: Path) -> list[Path]:
    """One record per finished run of the sweep at `root` (runs that came from a record keep it)."""
    root, records = Path(root), Path(records)
    version = state.code_version()
    written = []
    for entry in read_sweep_json(root)["runs"]:
        workdir = root / entry["run_id"]
        if not (workdir / run_files.SUMMARY).exists() or (workdir / run_files.FROM_RECORD).exists():
            continue
        records.mkdir(parents=True, exist_ok=True)
        path = records / f"{entry['run_id']}.json"
        run_files.write_json_atomic(path, make_record(workdir, version))
        written.append(path)
    return written


def materialise(sweep: Sweep, root: Path, records: Path, out: IO[str] = sys.stderr) -> list[str]:
    """Marks done every unfinished run of `sweep` whose record in `records` has its config hash;
    returns their run ids. Records with another hash are ignored with a warning."""
    from sparsescale import config as config_lib

    done = []
    for run, config in zip(sweep.runs, sweep.configs, strict=True):
        workdir = Path(root) / run.run_id
        path = Path(records) / f"{run.run_id}.json"
        if (workdir / run_files.SUMMARY).exists() or not path.exists():
            continue
        record = run_files.load_json(path)
        expected = config_lib.run_config(config).hash()
        if record.get("config_hash") != expected:
            print(
                f"warning: {path} is for config_hash {record.get('config_hash')}, but run "
                f"{run.run_id} has {expected}; ignored, the run trains",
                file=out,
            )
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        run_files.write_json_atomic(workdir / run_files.FROM_RECORD, record)
        run_files.write_json_atomic(workdir / run_files.SUMMARY, record["summary"])
        done.append(run.run_id)
    return done


def results_frame(records: Path) -> pd.DataFrame:
    """A results table (launch.collect's columns) from the records in `records` alone."""
    from launch import collect

    rows = [
        {**run_files.load_json(p)["summary"], "status": "done"}
        for p in sorted(Path(records).glob("*.json"))
    ]
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in collect.COLUMNS)
    return frame.reindex(columns=[*collect.COLUMNS, *extra])
