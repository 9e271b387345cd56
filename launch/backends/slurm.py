"""Slurm backend through submitit: one job array per distinct resource request.

Each array task runs `run_job`, which starts the trainer as a subprocess (so a crash or NaN exit is
recorded in `launch.json` before the Slurm job ends). Runs with `config.launch.tasks > 1` become
multi-task jobs: every task starts the trainer with `--multihost`, which calls
`jax.distributed.initialize()` and picks up the Slurm environment. submitit's own logs go to
`<root>/slurm/`; the trainer's to `<run>/stdout.log` (task 0) and `<run>/stdout.task<i>.log`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import submitit

from launch import signals, state, status
from launch.backends.local import _needs_work, child_env, open_logs
from launch.sweep import Resources, Run, Sweep, SweepError, save_sweep, trainer_command
from sparsescale import run_files


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    max_retries: int = 2
    partition: str | None = None
    array_parallelism: int = 64
    wait: bool = True
    poll_s: float = 10.0
    extra: tuple[tuple[str, Any], ...] = ()  # more submitit parameters, e.g. (("slurm_qos", "x"),)


def run_job(root: str, run_id: str, attempt: int, command: list[str], threads: int) -> int:
    """Body of one Slurm job (every task runs it): train, record the outcome, raise on failure."""
    env = submitit.JobEnvironment()
    rank, workdir = env.global_rank, Path(root) / run_id
    suffix = "" if rank == 0 else f".task{rank}"
    stdout, stderr = open_logs(workdir, attempt, suffix)
    started = time.time()
    with stdout, stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=child_env(threads)
        )
        if rank == 0:
            state.mark_started(workdir, attempt, process.pid, slurm_job_id=env.job_id)
        code = process.wait()
    if rank == 0:
        outcome = state.finish_attempt(workdir, attempt, code, started)
        if outcome["outcome"] != state.DONE:
            raise RuntimeError(f"run {run_id}: {outcome['error']}")
    elif code != 0:
        raise RuntimeError(f"run {run_id} task {rank}: trainer exited {code}")
    return code


def _executor(root: Path, resources: Resources, options: SlurmOptions, name: str):
    executor = submitit.AutoExecutor(folder=root / "slurm", cluster="slurm")
    params: dict[str, Any] = dict(
        name=name,
        timeout_min=resources.timeout_min,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks // resources.nodes,
        slurm_array_parallelism=options.array_parallelism,
    )
    if options.partition:
        params["slurm_partition"] = options.partition
    params.update(dict(options.extra))
    executor.update_parameters(**params)
    return executor


def submit(sweep: Sweep, root: Path, runs: list[Run], options: SlurmOptions) -> list[str]:
    """Submit `runs` as job arrays grouped by resources; returns the Slurm job ids."""
    groups: dict[Resources, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.resources].append(run)
    job_ids = []
    with signals.deferred():  # a signal mid-submission is raised once job ids are recorded
        for resources, group in groups.items():
            attempts = [state.begin_attempt(root / r.run_id, "slurm") for r in group]
            multihost = resources.tasks > 1
            commands = [
                trainer_command(sweep, r, root / r.run_id, sys.executable, multihost) for r in group
            ]
            executor = _executor(root, resources, options, f"{sweep.experiment}")
            n = len(group)
            try:
                jobs = executor.map_array(
                    run_job, [str(root)] * n, [r.run_id for r in group], attempts, commands,
                    [resources.cpus_per_task] * n,
                )  # fmt: skip
            except Exception as e:
                for r, a in zip(group, attempts, strict=True):
                    state.update_attempt(root / r.run_id, a, ended=state.now_iso(),
                                         outcome=state.INTERRUPTED, error=f"submission failed: {e}")  # fmt: skip
                raise SweepError(f"Slurm submission of {n} runs failed: {e}") from e
            for r, a, job in zip(group, attempts, jobs, strict=True):
                state.update_attempt(root / r.run_id, a, slurm_job_id=str(job.job_id))
                job_ids.append(str(job.job_id))
    return job_ids


def run_slurm(sweep: Sweep, root: Path, options: SlurmOptions, out: IO[str] = sys.stdout) -> int:
    """Submit unfinished runs; with `wait`, resubmit failures until done. Returns failed runs."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with run_files.file_lock(root / ".launcher.lock", blocking=False) as locked:
        if not locked:
            raise SweepError(
                f"{root}: another launcher is running this sweep (lock .launcher.lock)"
            )
        record = save_sweep(root, sweep)
        shown = ""
        while True:
            statuses = status.sweep_statuses(root, record)
            todo = [
                sweep.run(s.run_id)
                for s in statuses
                if s.run_id in {r.run_id for r in sweep.runs}
                and _needs_work(s, options.max_retries)
            ]
            if todo:
                ids = submit(sweep, root, todo, options)
                print(f"[{state.now_iso()}] submitted {len(todo)} runs: {json.dumps(ids)}",
                      file=out, flush=True)  # fmt: skip
                continue
            busy = any(s.active for s in statuses)
            table = status.format_table(record, statuses, status.read_calibration(root))
            changed = "\n".join(ln for ln in table.splitlines() if not ln.startswith("sweep eta"))
            if changed != shown:  # print on change only (not on the ETA alone)
                print(table, file=out, flush=True)
                shown = changed
            if not options.wait or not busy:
                return sum(s.status == state.FAILED for s in statuses)
            time.sleep(options.poll_s)
