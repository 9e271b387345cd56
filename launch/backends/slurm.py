"""Slurm backend through submitit: one job array per distinct resource request.

Each array task runs `SlurmJob`, which starts the trainer as a subprocess (so a crash or NaN exit is
recorded in `launch.json` before the Slurm job ends). Runs with `config.launch.tasks > 1` become
multi-task jobs: every task starts the trainer with `--multihost`, which calls
`jax.distributed.initialize()` and picks up the Slurm environment. submitit's own logs go to
`<root>/slurm/`; the trainer's to `<run>/stdout.log` (task 0) and `<run>/stdout.task<i>.log`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import submitit

from launch import CHECKOUT, signals, state, status
from launch.backends.local import _needs_work, child_env, open_logs
from launch.sweep import Resources, Run, Sweep, SweepError, save_sweep, trainer_command
from sparsescale import preemption, run_files

POLL_S = 1.0
STOP_GRACE_S = 80.0  # a trainer's time to checkpoint and exit (submitit signals 90 s early)
SUBMITIT_SIGNAL_DELAY_S = 90  # submitit's default `signal_delay_s`
SLURM_SIGNAL_SLACK_S = 60  # Slurm may send `--signal` up to 60 s before the time asked (its docs)
# submitit's default (3) would end a run at its 4th time limit; each requeue resumes a checkpoint
MAX_TIME_LIMIT_REQUEUES = 1000


# sbatch settings that come from each run's `config.launch` (Resources), not from `--slurm`.
FROM_CONFIG = {
    "time": "timeout_min",
    "mem": "mem_gb",
    "cpus_per_task": "cpus_per_task",
    "nodes": "nodes",
    "ntasks_per_node": "tasks",
    "gpus_per_node": "gpus_per_node",
}


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """`slurm`: more Slurm settings as (name, value), e.g. (("gres", "gpu:1"), ("qos", "high")):
    submitit's Slurm parameter names, and any other sbatch long option by its name."""

    max_retries: int = 2
    partition: str | None = None
    array_parallelism: int = 64
    wait: bool = True
    poll_s: float = 10.0
    slurm: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name, value in self.slurm:
            if name in FROM_CONFIG:
                raise SweepError(
                    f"--slurm {name}=…: set config.launch.{FROM_CONFIG[name]} per run instead"
                )
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise SweepError(f"--slurm {name!r}: not a Slurm option name")
            if name.replace("-", "_") == "signal_delay_s" and not value.isdigit():
                raise SweepError(f"--slurm signal_delay_s={value}: expected whole seconds")

    @property
    def signal_delay_s(self) -> int:
        """How long before its time limit a job is asked to checkpoint."""
        return int(self.submitit_parameters().get("slurm_signal_delay_s", SUBMITIT_SIGNAL_DELAY_S))

    def submitit_parameters(self) -> dict[str, Any]:
        """`slurm` as submitit parameters: its own names prefixed, the rest passed to sbatch."""
        known = submitit.SlurmExecutor._valid_parameters()
        params: dict[str, Any] = {}
        additional: dict[str, str] = {}
        for name, value in self.slurm:
            key = name.replace("-", "_")
            if key in known:
                params[f"slurm_{key}"] = int(value) if value.isdigit() else value
            else:
                additional[name] = value
        if self.partition:
            params["slurm_partition"] = self.partition
        if additional:
            params["slurm_additional_parameters"] = additional
        return params


def parse_slurm_settings(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`--slurm NAME=VALUE` items as (name, value) pairs."""
    pairs = []
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SweepError(f"--slurm {item!r}: expected NAME=VALUE, e.g. --slurm gres=gpu:1")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


class SlurmJob:
    """Body of one Slurm job (every task runs it): train, record the outcome, raise on failure.

    Checkpointable in submitit's sense: on submitit's signal (SIGUSR2, `signal_delay_s` before
    the time limit; `scancel --signal=USR2` for a preemption) it calls `checkpoint` on task 0,
    which stops the trainer at its next step (the trainer saves a checkpoint and exits
    PREEMPTED_EXIT; Slurm signals it too), closes the attempt as preempted, opens the next one
    and requeues the same job, which resumes from that checkpoint. No try is spent.
    """

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._started = 0.0  # when __call__ started the trainer (time.time())

    def __getstate__(self) -> dict:  # the requeued job starts its own trainer
        return {}

    def __setstate__(self, _: dict) -> None:
        self.__init__()

    def __call__(self, root: str, run_id: str, attempt: int, command: list[str], threads: int):
        env = submitit.JobEnvironment()
        rank, workdir = env.global_rank, Path(root) / run_id
        if not state.attempt_open(workdir, attempt):
            # Slurm requeued this job by itself after the attempt was closed (PreemptMode=REQUEUE):
            # the launcher resubmits the run, so this copy must not train too.
            print(f"attempt {attempt} of {run_id} is closed; not training", file=sys.stderr)
            return None
        suffix = "" if rank == 0 else f".task{rank}"
        stdout, stderr = open_logs(workdir, attempt, suffix)
        self._started = time.time()
        with stdout, stderr:
            with preemption.signals_held():  # the trainer takes stop signals once it can save
                self._process = subprocess.Popen(
                    command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                    env=child_env(threads),
                )  # fmt: skip
            if rank == 0:
                state.mark_started(workdir, attempt, self._process.pid, slurm_job_id=env.job_id)
            # Polled, not wait(): submitit's signal handler runs `checkpoint` in this thread,
            # and a blocking wait() would hold the lock that its own wait needs.
            while (code := self._process.poll()) is None:
                time.sleep(POLL_S)
        if rank == 0:
            with preemption.signals_held():  # a late time-limit signal: `checkpoint` after this
                outcome = state.finish_attempt(workdir, attempt, code, self._started)
            if outcome["outcome"] not in (state.DONE, state.PREEMPTED):
                raise RuntimeError(f"run {run_id}: {outcome['error']}")
        elif code not in (0, preemption.PREEMPTED_EXIT):
            raise RuntimeError(f"run {run_id} task {rank}: trainer exited {code}")
        return code

    def checkpoint(self, root: str, run_id: str, attempt: int, command: list[str], threads: int):
        """Stop the trainer at a checkpoint; the DelayedSubmission that resumes it (the same
        attempt if no trainer started yet), or None (no requeue) if the trainer finished or did
        not stop within STOP_GRACE_S."""
        process, workdir = self._process, Path(root) / run_id
        if process is None:  # signalled before its trainer started: the same attempt, requeued
            return submitit.helpers.DelayedSubmission(self, root, run_id, attempt, command, threads)
        if process.poll() is None:
            process.send_signal(signal.SIGUSR1)  # Slurm signalled it too, unless `scancel --batch`
            deadline = time.monotonic() + STOP_GRACE_S
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
        if process.returncode is None:
            return None  # stuck: killed at the limit; the launcher reads the open attempt as failed
        if process.returncode != preemption.PREEMPTED_EXIT:
            # It finished (or failed) as the signal came. No requeue ends the job from this
            # handler, inside __call__: record the outcome here unless __call__ already did.
            if state.attempt_open(workdir, attempt):
                state.finish_attempt(workdir, attempt, process.returncode, self._started)
            return None
        reason = state.preempted_reason(workdir / "stderr.log")
        env = submitit.JobEnvironment()
        n = state.requeue_attempt(
            workdir, attempt, process.returncode, reason, slurm_job_id=env.job_id
        )
        return submitit.helpers.DelayedSubmission(self, root, run_id, n, command, threads)


def _executor(root: Path, resources: Resources, options: SlurmOptions, name: str):
    executor = submitit.AutoExecutor(
        folder=root / "slurm", cluster="slurm", slurm_max_num_timeout=MAX_TIME_LIMIT_REQUEUES
    )
    params: dict[str, Any] = dict(
        name=name,
        timeout_min=resources.timeout_min,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks // resources.nodes,
        slurm_array_parallelism=options.array_parallelism,
    )
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    # the job unpickles `SlurmJob` before it runs anything of ours: the checkout must be importable
    params["slurm_setup"] = [
        f"export PYTHONPATH={shlex.quote(str(CHECKOUT))}${{PYTHONPATH:+:$PYTHONPATH}}"
    ]
    params.update(options.submitit_parameters())
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
                with contextlib.redirect_stderr(io.StringIO()):  # sbatch's echo: in `e` below
                    jobs = executor.map_array(
                        SlurmJob(), [str(root)] * n, [r.run_id for r in group], attempts,
                        commands, [resources.cpus_per_task] * n,
                    )  # fmt: skip
            except Exception as e:
                for r, a in zip(group, attempts, strict=True):
                    state.drop_attempt(root / r.run_id, a)  # nothing ran: leave no record
                raise SweepError(f"Slurm submission of {n} runs failed: {_cause(e)}") from e
            for r, a, job in zip(group, attempts, jobs, strict=True):
                state.update_attempt(root / r.run_id, a, slurm_job_id=str(job.job_id))
                job_ids.append(str(job.job_id))
    return job_ids


def _cause(error: Exception) -> str:
    """The telling line of a submission error (sbatch's last `error:` line)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [type(error).__name__])[-1]


def check_time_limits(runs: tuple[Run, ...], options: SlurmOptions) -> None:
    """Refuse a time limit that Slurm's warning signal would reach as the job starts.

    Slurm signals `signal_delay_s` before the limit, but up to a minute earlier: a shorter job
    would be requeued at every start without training (or die before its handler is in place).
    """
    least_s = options.signal_delay_s + SLURM_SIGNAL_SLACK_S
    for run in runs:
        if run.resources.timeout_min * 60 <= least_s:
            raise SweepError(
                f"{run.run_id}: launch.timeout_min={run.resources.timeout_min} leaves no time to "
                f"train on Slurm: it is signalled to checkpoint signal_delay_s="
                f"{options.signal_delay_s} s before the limit, up to {SLURM_SIGNAL_SLACK_S} s "
                f"earlier; give it over {least_s} s or a smaller --slurm signal_delay_s"
            )


def run_slurm(sweep: Sweep, root: Path, options: SlurmOptions, out: IO[str] = sys.stdout) -> int:
    """Submit unfinished runs; with `wait`, resubmit failures until done. Returns failed runs."""
    check_time_limits(sweep.runs, options)
    if shutil.which("sbatch") is None:
        raise SweepError("--backend slurm: sbatch is not on PATH (no Slurm client on this host)")
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
