"""Dry-run cost table: FLOPs from `sparsescale.accounting.estimate_cost`, wall time from the
launcher's own plan of jobs and a calibration.

`calibrate` times each model's train step as the planned jobs run it (stacked, with the shared
prefix, `jobs` at once, `sparsescale.timing`) and stores it in `<root>/calibration.json`;
`dry_run_table` times every planned job from it and schedules the jobs as the local backend does.
Each entry names the host device it was measured on (`host_device`); on another device it is
not used (`usable_calibration`): times measured on a CPU say nothing about a GPU.
"""

from __future__ import annotations

import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from launch import state
from launch.backends.local import available_cpus, child_env, spawn, visible_gpus
from launch.sweep import Sweep, SweepError, _get
from sparsescale import run_files
from sparsescale.provenance import cpu_model

CALIBRATION_FILE = "calibration.json"


def estimate_cost(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The trainer's own estimate (`sparsescale.accounting.estimate_cost`): tokens, train_flops,
    n_params_total, n_params_nonzero."""
    from sparsescale.accounting import estimate_cost as trainer_estimate

    return trainer_estimate(config)


@functools.cache
def host_device() -> str:
    """What this host trains on, read without loading JAX: its GPUs' name and count (nvidia-smi)
    when the launcher hands out GPUs, else its CPU model."""
    gpus = visible_gpus()
    if gpus:
        name = "unknown GPU"
        if shutil.which("nvidia-smi"):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            name = next((ln.strip() for ln in out.stdout.splitlines() if ln.strip()), name)
        return f"GPU: {name} × {len(gpus)}"
    return f"CPU: {cpu_model()}"


def usable_calibration(calibration: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the entries measured on this host's device (or naming none: older files), {model: the
    device another entry was measured on})."""
    here = host_device()
    usable, elsewhere = {}, {}
    for model, entry in calibration.items():
        host = entry.get("host") if isinstance(entry, dict) else None
        if host is None or host == here:
            usable[model] = entry
        else:
            elsewhere[model] = host
    return usable, elsewhere


def _model(config: ml_collections.ConfigDict) -> str:
    return str(_get(config, "model.name", "?"))


def calibrate(
    sweep: Sweep, root: Path, threads: int, jobs: int = 1, max_stack: int | None = None
) -> dict[str, Any]:
    """Time each model's train step as the sweep's jobs run it (`sparsescale.timing`): stacked
    at the planned stack size and at its shared-prefix size, `jobs` copies at once on their own
    cores (so a co-running job's contention is in the number); merge into calibration.json."""
    from launch import planner

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / CALIBRATION_FILE
    calibration = run_files.read_json(path) or {}
    by_model: dict[str, tuple[Any, set[int]]] = {}
    for job in planner.plan(sweep, sweep.runs, None, jobs, max_stack):
        cfgs = [planner.resolved_config(sweep, r) for r in job]
        ks = {len(job), len(_shared(cfgs)[1]) or len(job)}
        by_model.setdefault(_model(_config(sweep, job[0])), (job[0], set()))[1].update(ks)
    cpus = available_cpus()
    for model, (run, ks) in by_model.items():
        ks = sorted(ks | {1})
        with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(planner.job_config(sweep, run)))
            command = [sys.executable, "-m", "sparsescale.timing", str(config), *map(str, ks)]
            procs = [
                spawn(command, cpus[i * threads : (i + 1) * threads], env=child_env(threads),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(max(1, min(jobs, len(cpus) // threads)))
            ]  # fmt: skip
            outs = [p.communicate() for p in procs]
        if any(p.returncode for p in procs):
            err = next(e for p, (_, e) in zip(procs, outs, strict=True) if p.returncode)
            raise SweepError(
                f"calibration of model {model!r} failed: {err.strip().splitlines()[-1:]}"
            )
        timed = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
        step_s = {str(k): statistics.mean(t["step_s"][str(k)] for t in timed) for k in ks}
        config = _config(sweep, run)
        tokens = _get(config, "data.batch_size") * _get(config, "data.seq_len")
        top = max(ks)
        tokens_per_s = top * tokens / step_s[str(top)]
        cost = estimate_cost(config)
        calibration[model] = {
            "step_s": step_s,
            "startup_s": statistics.mean(t["startup_s"] for t in timed),
            "save_s": statistics.mean(t["save_s"] for t in timed),
            "batch_size": _get(config, "data.batch_size"),
            "seq_len": _get(config, "data.seq_len"),
            "tokens_per_s": tokens_per_s,  # per variant, at the largest stack
            "flops_per_s": tokens_per_s * cost["dense_train_flops"] / cost["tokens"],
            "threads": threads,
            "jobs": len(procs),
            "device": timed[0].get("device"),  # as JAX saw it in the timed process
            "host": host_device(),
            "measured": state.now_iso(),
        }
    run_files.write_json_atomic(path, calibration)
    return calibration


def _config(sweep: Sweep, run) -> ml_collections.ConfigDict:
    return sweep.configs[sweep.runs.index(run)]


def _shared(cfgs: list) -> tuple[int, list[int]]:
    from sparsescale.stack_rules import shared_prefix

    prefix, reps, _ = shared_prefix(cfgs) if len(cfgs) > 1 else (0, [], [])
    return prefix, reps


def job_seconds(cfgs: list, measured: dict[str, Any], fork: bool = True) -> float:
    """Predicted wall seconds of one job (K stacked runs, or one): start-up and compiles, the
    shared prefix at its own stack size, the rest at K (step times linear in K, scaled by tokens
    per step from the calibrated batch), and each run's checkpoints."""
    step_s = {int(k): v for k, v in measured["step_s"].items()}
    ks = sorted(step_s)

    def at(k: int) -> float:  # linear in K between measured sizes, extrapolated beyond
        if k > ks[-1] and len(ks) > 1:
            slope = (step_s[ks[-1]] - step_s[ks[0]]) / (ks[-1] - ks[0])
            return step_s[ks[-1]] + slope * (k - ks[-1])
        return float(np.interp(k, ks, [step_s[x] for x in ks]))

    c = cfgs[0]
    scale = (c.data.batch_size * c.data.seq_len) / (measured["batch_size"] * measured["seq_len"])
    prefix, reps = _shared(cfgs) if fork else (0, [])
    steps = c.train.steps
    seconds = prefix * at(len(reps)) + (steps - prefix) * at(len(cfgs))
    saves = len(cfgs) * (steps // c.train.ckpt_every + (steps % c.train.ckpt_every > 0))
    return measured["startup_s"] + seconds * scale + saves * measured.get("save_s", 0.0)


def predict_wall(seconds: list[float], workers: int) -> float:
    """The local backend's schedule: jobs start in order on the first free worker."""
    free = [0.0] * max(1, workers)
    for t in seconds:
        i = free.index(min(free))
        free[i] += t
    return max(free)


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def dry_run_table(
    sweep: Sweep, root: Path, jobs: int = 1, threads: int = 1, max_stack: int | None = None
) -> str:
    """Table of runs (tokens, non-zero params, training FLOPs, share of its job's time) and the
    predicted wall time of the whole sweep from scratch: the launcher's plan of stacked jobs,
    each timed from calibration.json, scheduled on `jobs` workers as the local backend does."""
    from launch import planner

    calibration, elsewhere = usable_calibration(
        run_files.read_json(Path(root) / CALIBRATION_FILE) or {}
    )
    plan = planner.plan(sweep, sweep.runs, None, jobs, max_stack)
    share, job_s, missing, saved = {}, [], set(), 0.0
    for job in plan:
        cfgs = [planner.resolved_config(sweep, r) for r in job]
        measured = calibration.get(_model(_config(sweep, job[0])))
        if not measured or "step_s" not in measured:
            missing.add(_model(_config(sweep, job[0])))
            continue
        seconds = job_seconds(cfgs, measured)
        job_s.append(seconds)
        prefix, reps = _shared(cfgs)
        saved += job_seconds(cfgs, measured, fork=False) - seconds
        share.update({r.run_id: seconds / len(job) for r in job})
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
    rows, total_flops = [], 0.0
    for run, config in zip(sweep.runs, sweep.configs, strict=True):
        cost = estimate_cost(config)
        total_flops += cost["train_flops"]
        seconds = share.get(run.run_id)
        time_text = (
            "-"
            if seconds is None
            else f"{seconds:.0f}s"
            if seconds < 3600
            else f"{seconds / 3600:.1f}h"
        )
        rows.append((
            run.run_id, _model(config), str(_get(config, "sparsity.target", "")),
            str(_get(config, "sparsity.structure", "")), str(run.steps), _si(cost["tokens"]),
            _si(cost["n_params_nonzero"]), _si(cost["train_flops"]), time_text,
        ))  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.append(
        f"{len(rows)} runs in {len(plan)} jobs ({sum(len(j) > 1 for j in plan)} stacked), "
        f"{_si(total_flops)} training FLOPs"
    )
    if missing:
        other = {m: elsewhere[m] for m in sorted(missing) if m in elsewhere}
        lines.append(
            f"no calibration for {sorted(missing)} in {Path(root) / CALIBRATION_FILE}"
            + (f" on this host's {host_device()} (measured on: {other})" if other else "")
            + ": run `python -m launch calibrate <experiment> --root <root>` for time estimates"
        )
    else:
        lines.append(
            f"predicted wall time from scratch: {_duration(predict_wall(job_s, jobs))} on "
            f"{jobs} jobs × {threads} threads ({_duration(sum(job_s))} of job time"
            + (f"; training each shared prefix once saves {_duration(saved)}" if saved else "")
            + ")"
        )
    return "\n".join(lines)
