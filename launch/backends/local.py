"""Local backend: runs trainer subprocesses, `jobs` at a time, each pinned to `threads` cores.

jobs × threads comes from `--jobs/--threads`, else from the measurement stored by
`benchmarks/threads.py`, else one job per core. One launcher per sweep root (an flock on
`<root>/.launcher.lock`); relaunching skips done runs, resumes interrupted ones (the trainer restores
its checkpoint) and retries failed ones while they have failed at most `max_retries` times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from launch import checkout_pythonpath, planner, signals, state, status
from launch.sweep import Run, Sweep, SweepError, save_sweep, trainer_command
from sparsescale import benchmarked, run_files

GPU_MEM_FRACTION = "0.90"
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# After SIGTERM, trainers get this long to save a checkpoint at their next step and exit
# (preemption.py) before SIGKILL; a loaded machine needs tens of seconds for a large state.
STOP_GRACE_S = 60.0


@dataclasses.dataclass(frozen=True)
class LocalOptions:
    """`gpus`: the GPUs jobs may use (`visible_gpus()`); `gpus_per_job`: each job's own share of
    them (CUDA_VISIBLE_DEVICES), 0: jobs see no GPU (then with `gpus` empty, the environment is
    left as it is: a CPU machine)."""

    jobs: int
    threads: int
    max_retries: int = 2
    refresh_s: float = 2.0
    poll_s: float = 0.25
    max_stack: int | None = None  # runs per stacked process; None: measured; 1: no stacking
    gpus: tuple[str, ...] = ()
    gpus_per_job: int = 0

    def __post_init__(self):
        if self.gpus_per_job < 0 or self.jobs * self.gpus_per_job > len(self.gpus):
            raise SweepError(
                f"--jobs {self.jobs} × --gpus-per-job {self.gpus_per_job} must fit the "
                f"{len(self.gpus)} GPUs visible here ({list(self.gpus)})"
            )


@dataclasses.dataclass(frozen=True)
class Slot:
    """What one concurrent job owns: its cores and, on a GPU host, its GPUs (None: no GPU
    settings, a CPU machine)."""

    cpus: list[int]
    gpus: tuple[str, ...] | None = None


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this launcher may hand out: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi
    lists (without loading JAX, so a CPU launcher never initialises a GPU)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return tuple(g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip())
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


def make_slots(options: LocalOptions, cpus: list[int]) -> list[Slot]:
    """`options.jobs` slots of `threads` cores each and, on a GPU host, `gpus_per_job` GPUs."""
    t, g = options.threads, options.gpus_per_job
    return [
        Slot(
            cpus[i * t : (i + 1) * t],
            tuple(options.gpus[i * g : (i + 1) * g]) if options.gpus else None,
        )
        for i in range(options.jobs)
    ]


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def default_jobs_threads() -> tuple[int, int, str]:
    """(jobs, threads, where the choice came from) for this machine (`sparsescale.benchmarked`)."""
    return benchmarked.jobs_threads(len(available_cpus()))


def validate_jobs_threads(jobs: int, threads: int) -> None:
    cores = len(available_cpus())
    if jobs < 1 or threads < 1 or jobs * threads > cores:
        raise SweepError(
            f"--jobs {jobs} × --threads {threads} must be ≥ 1 each and fit the {cores} cores "
            f"this process may use ({available_cpus()})"
        )


def skip_cuda_check_without_gpus(env: dict[str, str]) -> None:
    """On a host with no NVIDIA GPU, an installed CUDA plugin (the `aot` extra) fails its CUDA
    version check with a traceback every time JAX starts; skip that check there, in `env` (JAX
    then picks the CPU or a TPU as before). A GPU host keeps the check."""
    if not visible_gpus():
        env.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def child_env(
    threads: int, base: dict[str, str] | None = None, gpus: tuple[str, ...] | None = None
) -> dict[str, str]:
    """Environment of one trainer process limited to `threads` compute threads and, unless
    `gpus` is None, to those GPUs (none: the CPU backend, so it takes no GPU memory), with the
    checkout on its PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if gpus:  # the job owns these GPUs: let it use most of their memory (JAX default 75%)
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = GPU_MEM_FRACTION
        else:
            env["JAX_PLATFORMS"] = "cpu"
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))
    ]
    if threads == 1:
        flags.append(SINGLE_THREAD_XLA_FLAGS)
    env["XLA_FLAGS"] = " ".join(flags)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = checkout_pythonpath(env.get("PYTHONPATH"))
    return env


def open_logs(workdir: Path, attempt: int, suffix: str = "") -> tuple[IO[str], IO[str]]:
    """Append-mode stdout/stderr logs with an attempt header (earlier attempts are kept)."""
    files = []
    for name in ("stdout", "stderr"):
        f = open(workdir / f"{name}{suffix}.log", "a")
        f.write(f"===== attempt {attempt} {state.now_iso()} =====\n")
        f.flush()
        files.append(f)
    return files[0], files[1]


@dataclasses.dataclass
class _Active:
    runs: list[Run]  # more than one: a stacked job (`python -m sparsescale.stack`)
    attempts: list[int]
    process: subprocess.Popen
    logs: list[IO[str]]
    started: float
    slot: int
    stderr: Path | None = None  # a stacked job's own stderr log

    @property
    def name(self) -> str:
        return self.runs[0].run_id if len(self.runs) == 1 else planner.stack_id(self.runs)


def _needs_work(s: state.RunStatus, max_retries: int) -> bool:
    if s.status == state.PENDING:
        return True
    return s.status == state.FAILED and s.failures <= max_retries


class _Printer:
    """Redraws the table in place on a TTY; prints events and periodic tables otherwise."""

    def __init__(self, out: IO[str], refresh_s: float, selected: set[str] | None = None):
        self.out, self.refresh_s, self.last = out, refresh_s, 0.0
        self.tty = out.isatty()
        self.selected = selected  # the runs this launcher trains (the ETA's), else all

    def event(self, text: str) -> None:
        if not self.tty:
            print(f"[{state.now_iso()}] {text}", file=self.out, flush=True)

    def table(self, root: Path, record: dict[str, Any], force: bool = False) -> None:
        period = self.refresh_s if self.tty else max(self.refresh_s, 30.0)
        if not force and time.monotonic() - self.last < period:
            return
        self.last = time.monotonic()
        # compact: fits the terminal (or, in a log, 120 columns and 30 lines every 30 s)
        size = shutil.get_terminal_size((120, 30))
        calibration = status.read_calibration(root)
        statuses = status.sweep_statuses(root, record)
        text = status.format_table(
            record, statuses, calibration, compact=True, width=size.columns, height=size.lines,
            selected=self.selected,
        )  # fmt: skip
        if self.tty:
            self.out.write("\x1b[H\x1b[J")
        print(text, file=self.out, flush=True)


def run_local(sweep: Sweep, root: Path, options: LocalOptions, out: IO[str] = sys.stdout) -> int:
    """Run every unfinished run of `sweep` under `root`; returns the number of failed runs."""
    validate_jobs_threads(options.jobs, options.threads)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    printer = _Printer(out, options.refresh_s, {r.run_id for r in sweep.runs})
    lock = run_files.file_lock(root / ".launcher.lock", blocking=False)
    with signals.interrupts(), lock as locked:
        if not locked:
            raise SweepError(
                f"{root}: another launcher is running this sweep (lock .launcher.lock)"
            )
        record = save_sweep(root, sweep)
        cpus = available_cpus()
        slots = make_slots(options, cpus)
        statuses = {s.run_id: s for s in status.sweep_statuses(root, record)}
        todo = [r for r in sweep.runs if _needs_work(statuses[r.run_id], options.max_retries)]
        for r in sweep.runs:
            s = statuses[r.run_id]
            if s.status in (state.RUNNING, state.QUEUED):
                printer.event(f"{r.run_id}: {s.status} elsewhere, not started here")
            elif s.status == state.FAILED and r not in todo:
                printer.event(f"{r.run_id}: failed {s.failures} times (max retries reached)")
        queue = planner.plan(sweep, todo, root, options.jobs, options.max_stack)
        stacked = sum(len(q) for q in queue if len(q) > 1)
        printer.event(
            f"{len(todo)} of {len(sweep.runs)} runs to do ({stacked} of them in "
            f"{sum(len(q) > 1 for q in queue)} stacked jobs); {options.jobs} jobs × "
            f"{options.threads} threads"
        )
        active: list[_Active] = []
        failures = {r.run_id: statuses[r.run_id].failures for r in sweep.runs}
        try:
            while queue or active:
                for job in [j for j in active if j.process.poll() is not None]:
                    with signals.deferred():
                        retry = _finish(job, root, failures, options, printer)
                        active.remove(job)
                    if retry:  # a subset of a stack is still a stack
                        queue.append(retry)
                free = sorted(set(range(options.jobs)) - {j.slot for j in active})
                while queue and free:
                    with signals.deferred():
                        active.append(_start(sweep, queue.pop(0), root, slots, free.pop(0)))
                    printer.event(f"{active[-1].name}: started")
                printer.table(root, record)
                time.sleep(options.poll_s)
        except BaseException as e:  # Ctrl-C, SIGTERM (signals.Interrupted), or a launcher error
            with signals.shielded():
                if isinstance(e, KeyboardInterrupt):
                    cause = getattr(e, "signame", "SIGINT")
                else:
                    cause = f"its own error ({type(e).__name__}: {e})"
                printer.event(
                    f"interrupted by {cause}: stopping {len(active)} jobs (each saves a "
                    f"checkpoint at its next step; killed after {STOP_GRACE_S:g} s)"
                )
                _stop(active, root, cause)
            raise
        printer.table(root, record, force=True)
    final = status.sweep_statuses(root, record)
    return sum(s.status == state.FAILED for s in final)


def _finish(
    job: _Active, root: Path, failures: dict[str, int], options: LocalOptions, printer: _Printer
) -> list[Run]:
    """Close the attempts of a job whose process exited; returns its runs to retry."""
    for f in job.logs:
        f.close()
    retry = []
    for run, n in zip(job.runs, job.attempts, strict=True):
        attempt = state.finish_attempt(
            root / run.run_id, n, job.process.returncode, job.started, job.stderr
        )
        if attempt["outcome"] == state.DONE:
            printer.event(f"{run.run_id}: done")
            continue
        if attempt["outcome"] == state.PREEMPTED:  # resumes from its checkpoint, no try spent
            printer.event(f"{run.run_id}: {attempt['error']}, will resume")
            retry.append(run)
            continue
        failures[run.run_id] += 1
        bad_input = attempt["exit_code"] == state.BAD_INPUT_EXIT
        again = failures[run.run_id] <= options.max_retries and not bad_input
        printer.event(
            f"{run.run_id}: failed ({attempt['error']})"
            + (", will retry" if again else "")
            + (", bad input: not retried (fix it and relaunch)" if bad_input else "")
            + (", no retries left" if not again and not bad_input else "")
        )
        if again:
            retry.append(run)
    return retry


def _stop(active: list[_Active], root: Path, cause: str) -> None:
    """Stop every trainer (SIGTERM, then SIGKILL after STOP_GRACE_S) and close its attempts: done
    if the run finished meanwhile, else interrupted (not a failure: the next launch resumes it)."""
    for job in active:
        if job.process.poll() is None:
            job.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for job in active:
        try:
            job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
    for job in active:
        for f in job.logs:
            f.close()
        for run, n in zip(job.runs, job.attempts, strict=True):
            workdir = root / run.run_id
            if state.finished_since(workdir, job.started):
                state.finish_attempt(workdir, n, 0, job.started)
            else:
                state.close_interrupted(
                    workdir, n, job.process.returncode, f"launcher stopped by {cause}"
                )


def _start(sweep: Sweep, runs: list[Run], root: Path, slots: list[Slot], slot: int) -> _Active:
    cpus, gpus = slots[slot].cpus, slots[slot].gpus
    workdirs = [root / r.run_id for r in runs]
    attempts = []
    stack = planner.stack_id(runs) if len(runs) > 1 else None
    for workdir in workdirs:
        workdir.mkdir(parents=True, exist_ok=True)
        attempts.append(
            state.begin_attempt(
                workdir, "local", cpus=cpus, gpus=gpus, stacked=len(runs), stack=stack
            )
        )
    logs = [f for w, n in zip(workdirs, attempts, strict=True) for f in open_logs(w, n)]
    stderr = None
    if len(runs) == 1:
        command = trainer_command(sweep, runs[0], workdirs[0], sys.executable)
        out, err = logs
    else:
        jobdir = root / ".stacks"
        jobdir.mkdir(exist_ok=True)
        name = planner.stack_id(runs)
        job = {
            "runs": [
                {"workdir": str(w), "config": planner.job_config(sweep, r)}
                for r, w in zip(runs, workdirs, strict=True)
            ]
        }
        run_files.write_json_atomic(jobdir / f"{name}.json", job)
        command = [sys.executable, "-m", "sparsescale.stack", str(jobdir / f"{name}.json")]
        stderr = jobdir / f"{name}.stderr.log"
        for f in logs:
            f.write(f"stacked job of {len(runs)} runs; its output: {jobdir / name}.std*.log\n")
            f.flush()
        out, err = open(jobdir / f"{name}.stdout.log", "a"), open(stderr, "a")
        logs += [out, err]
    out.write(json.dumps(command) + "\n")
    out.flush()
    started = time.time()
    try:
        process = spawn(command, cpus, stdout=out, stderr=err, env=child_env(len(cpus), gpus=gpus))
    except OSError as e:
        for f in logs:
            f.close()
        for workdir, n in zip(workdirs, attempts, strict=True):
            state.close_interrupted(workdir, n, None, f"could not start {command[:3]}: {e}")
        raise SweepError(f"could not start the trainer {command[:3]}: {e}") from e
    for workdir, n in zip(workdirs, attempts, strict=True):
        state.mark_started(workdir, n, process.pid)
    return _Active(runs, attempts, process, logs, started, slot, stderr)


def spawn(command: list[str], cpus: list[int], **kwargs: Any) -> subprocess.Popen:
    """Start `command` pinned to `cpus` without running Python's fork handlers in this process,
    which has imported JAX (config validation) and is multithreaded: no `preexec_fn` (that path
    calls os.fork's at-fork hooks, where JAX warns of deadlocks), so subprocess uses vfork/exec.
    The child inherits the CPU affinity of the thread that starts it, so this thread takes the
    child's cores for the call and gets its own back after."""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True, **kwargs)
    finally:
        os.sched_setaffinity(0, own)
