"""Dry-run cost table: FLOPs from `sparsescale.accounting.estimate_cost`, time from a calibration.

`calibrate` trains each model of the sweep for a few steps (in a temp dir, with the local backend's
threads per job) and stores the measured tokens/s and FLOP/s in `<root>/calibration.json`.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

from launch import state
from launch.backends.local import child_env
from launch.sweep import Sweep, SweepError, _get, trainer_command
from sparsescale import run_files

CALIBRATION_FILE = "calibration.json"


def estimate_cost(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The trainer's own estimate (`sparsescale.accounting.estimate_cost`): tokens, train_flops,
    n_params_total, n_params_nonzero."""
    from sparsescale.accounting import estimate_cost as trainer_estimate

    return trainer_estimate(config)


def _model(config: ml_collections.ConfigDict) -> str:
    return str(_get(config, "model.name", "?"))


def calibrate(sweep: Sweep, root: Path, threads: int, steps: int = 8) -> dict[str, Any]:
    """Measure tokens/s and FLOP/s of each model in the sweep; merge into calibration.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / CALIBRATION_FILE
    calibration = run_files.read_json(path) or {}
    first_of_model = {}
    for run, config in zip(sweep.runs, sweep.configs, strict=True):
        first_of_model.setdefault(_model(config), (run, config))
    for model, (run, config) in first_of_model.items():
        cost = estimate_cost(config)
        flops_per_token = cost["train_flops"] / cost["tokens"]
        # several timed log lines after the first (which includes compilation); no checkpoints
        short = {"train.steps": steps, "train.log_every": max(1, steps // 4)}
        short |= {"train.ckpt_every": steps, "train.eval_every": 0}
        short = {k: v for k, v in short.items() if _get(config, k) is not None}
        run = dataclasses.replace(run, overrides={**run.overrides, **short}, steps=steps)
        with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
            command = trainer_command(sweep, run, Path(tmp) / run.run_id, sys.executable)
            done = subprocess.run(command, env=child_env(threads), capture_output=True, text=True)
            if done.returncode != 0:
                raise SweepError(
                    f"calibration run of model {model!r} failed ({done.returncode}): "
                    f"{done.stderr.strip().splitlines()[-1:]}"
                )
            lines = [
                m["perf/tokens_per_s"]
                for m in run_files.read_metrics(Path(tmp) / run.run_id / run_files.METRICS)
                if "perf/tokens_per_s" in m
            ]
        if not lines:
            raise SweepError(f"calibration run of model {model!r} logged no perf/tokens_per_s")
        tokens_per_s = statistics.median(lines[1:] or lines)  # the first includes compilation
        calibration[model] = {
            "tokens_per_s": tokens_per_s,
            "flops_per_s": tokens_per_s * flops_per_token,
            "threads": threads,
            "steps": steps,
            "measured": state.now_iso(),
        }
    run_files.write_json_atomic(path, calibration)
    return calibration


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def dry_run_table(sweep: Sweep, root: Path) -> str:
    """Table of runs with tokens, non-zero params, training FLOPs and estimated time."""
    calibration = run_files.read_json(Path(root) / CALIBRATION_FILE) or {}
    header = (
        "run",
        "model",
        "sparsity",
        "structure",
        "steps",
        "tokens",
        "nonzero",
        "flops",
        "time",
    )
    rows, total_flops, total_s, missing = [], 0.0, 0.0, set()
    for run, config in zip(sweep.runs, sweep.configs, strict=True):
        cost = estimate_cost(config)
        model = _model(config)
        total_flops += cost["train_flops"]
        measured = calibration.get(model)
        if measured:
            seconds = cost["train_flops"] / measured["flops_per_s"]
            total_s += seconds
            time_text = f"{seconds:.0f}s" if seconds < 3600 else f"{seconds / 3600:.1f}h"
        else:
            missing.add(model)
            time_text = "-"
        rows.append((
            run.run_id, model, str(_get(config, "sparsity.target", "")),
            str(_get(config, "sparsity.structure", "")), str(run.steps), _si(cost["tokens"]),
            _si(cost["n_params_nonzero"]), _si(cost["train_flops"]), time_text,
        ))  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    hours = (
        ""
        if len(missing) == len({_model(c) for c in sweep.configs})
        else (f", {total_s / 3600:.2f} h on one worker (calibrated models only)")
    )
    lines.append(f"{len(rows)} runs, {_si(total_flops)} training FLOPs{hours}")
    if missing:
        lines.append(
            f"no calibration for {sorted(missing)} in {Path(root) / CALIBRATION_FILE}: "
            "run `python -m launch calibrate <experiment> --root <root>` for time estimates"
        )
    return "\n".join(lines)
