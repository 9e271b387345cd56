"""Per-run launch state (`<root>/<run_id>/launch.json`) and the status derived from the workdir.

A run's status is read from files only, so `status` works from any process at any time:
`done` (summary.json exists), `running`/`queued` (an open attempt whose process or Slurm job is
alive), `failed` (the last attempt ended badly), otherwise `pending` (maybe with a checkpoint to
resume from). Attempts cut short by a killed launcher count as interrupted, not as failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparsescale import preemption, run_files
from sparsescale.provenance import code_version

LAUNCH_FILE = run_files.LAUNCH

DONE, RUNNING, QUEUED, FAILED, PENDING = "done", "running", "queued", "failed", "pending"
INTERRUPTED = "interrupted"
PREEMPTED = "preempted"  # stopped by a signal after a checkpoint: resumes, not a failed try
BAD_INPUT_EXIT = 2  # sparsescale.main: a bad config or run directory; retrying cannot help


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (guards against pid reuse), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_launch_state(workdir: Path) -> tuple[dict[str, Any], str | None]:
    """(launch.json's record, None), or (an empty record, what is wrong) if it is damaged."""
    workdir = Path(workdir)
    path = workdir / LAUNCH_FILE
    empty = {"run_id": workdir.name, "attempts": []}
    try:
        state = run_files.load_json(path)
    except FileNotFoundError:
        return empty, None
    except run_files.RunFileError as e:
        return empty, str(e)
    attempts = state.get("attempts") if isinstance(state, dict) else None
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        return empty, f"{path}: not a launch record (no list of attempts); the file is damaged"
    return state, None


@contextlib.contextmanager
def edit_launch_state(workdir: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write `launch.json` under a lock; the yielded dict is written back atomically.
    A damaged launch.json is kept as `launch.json.damaged-<time>` and a new record started."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with run_files.file_lock(workdir / f".{LAUNCH_FILE}.lock"):
        state, damaged = read_launch_state(workdir)
        if damaged:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
            os.replace(workdir / LAUNCH_FILE, workdir / f"{LAUNCH_FILE}.damaged-{stamp}")
        yield state
        run_files.write_json_atomic(workdir / LAUNCH_FILE, state)


def begin_attempt(workdir: Path, backend: str, **fields: Any) -> int:
    """Append an open attempt (closing dead open ones as interrupted), naming the code version
    that runs it; returns its 1-based number."""
    with edit_launch_state(workdir) as state:
        for attempt in state["attempts"]:
            if attempt.get("ended") is None:  # its process is gone (checked by the caller)
                attempt.update(ended=now_iso(), outcome=INTERRUPTED)
        n = len(state["attempts"]) + 1
        state["attempts"].append(
            {"n": n, "backend": backend, "submitted": now_iso(), "started": None, "ended": None}
            | {"code_version": code_version()}
            | fields
        )
    return n


def mark_started(workdir: Path, n: int, pid: int, **fields: Any) -> None:
    with edit_launch_state(workdir) as state:
        state["attempts"][n - 1].update(
            started=now_iso(),
            host=socket.gethostname(),
            pid=pid,
            pid_start=process_start_time(pid),
            **fields,
        )


def update_attempt(workdir: Path, n: int, **fields: Any) -> None:
    with edit_launch_state(workdir) as state:
        state["attempts"][n - 1].update(fields)


def finish_attempt(
    workdir: Path, n: int, exit_code: int, since: float, stderr: Path | None = None
) -> dict[str, Any]:
    """Close attempt `n` from the trainer's exit code and files; returns the closed attempt.
    `stderr`: a stacked job's log (its exit code is 1 if any of its runs failed, so a run with
    a fresh summary.json counts as done)."""
    workdir = Path(workdir)
    outcome, error = DONE, None
    summary = workdir / run_files.SUMMARY
    if stderr is not None and summary.exists() and summary.stat().st_mtime >= since:
        exit_code = 0
    if exit_code == preemption.PREEMPTED_EXIT and not finished_since(workdir, since):
        outcome, error = PREEMPTED, preempted_reason(stderr or workdir / "stderr.log")
    elif exit_code != 0 or not summary.exists():
        outcome = FAILED
        failed = run_files.read_json(workdir / run_files.FAILED)
        fresh = (workdir / run_files.FAILED).exists() and (
            workdir / run_files.FAILED
        ).stat().st_mtime >= since
        if failed and fresh:
            error = str(failed.get("error"))
        elif exit_code == 0:
            error = "trainer exited 0 without writing summary.json"
        else:
            error = f"exit code {exit_code}: {error_line(stderr or workdir / 'stderr.log')}"
    with edit_launch_state(workdir) as state:
        attempt = state["attempts"][n - 1]
        attempt.update(ended=now_iso(), exit_code=exit_code, outcome=outcome, error=error)
    return attempt


def requeue_attempt(workdir: Path, n: int, exit_code: int, reason: str, **fields: Any) -> int:
    """Close attempt `n` as preempted and open the next one in one edit (so no reader sees the
    run without an attempt in between); returns the new attempt's number."""
    with edit_launch_state(workdir) as state:
        attempts = state["attempts"]
        old = attempts[n - 1]
        old.update(ended=now_iso(), exit_code=exit_code, outcome=PREEMPTED, error=reason)
        attempts.append(
            {"n": len(attempts) + 1, "backend": old["backend"], "submitted": now_iso()}
            | {"started": None, "ended": None, "code_version": code_version()}
            | fields
        )
        return len(attempts)


def drop_attempt(workdir: Path, n: int) -> None:
    """Remove attempt `n` (its submission failed, nothing ran); a run left with no attempts
    keeps no launch record at all."""
    workdir = Path(workdir)
    with edit_launch_state(workdir) as state:
        state["attempts"] = [a for a in state["attempts"] if a.get("n") != n]
        empty = not state["attempts"]
    if empty:
        for name in (LAUNCH_FILE, f".{LAUNCH_FILE}.lock"):
            (workdir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if nothing else is in it


def attempt_open(workdir: Path, n: int) -> bool:
    """Whether attempt `n` exists and has not ended."""
    attempts = read_launch_state(workdir)[0]["attempts"]
    return len(attempts) >= n and attempts[n - 1].get("ended") is None


def finished_since(workdir: Path, since: float) -> bool:
    """Whether the run wrote summary.json at or after `since` (time.time())."""
    summary = Path(workdir) / run_files.SUMMARY
    try:
        return summary.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def close_interrupted(workdir: Path, n: int, exit_code: int | None, reason: str) -> None:
    """Close attempt `n` as interrupted (stopped from outside; not counted as a failure)."""
    with edit_launch_state(workdir) as state:
        state["attempts"][n - 1].update(
            ended=now_iso(), exit_code=exit_code, outcome=INTERRUPTED, error=reason
        )


def preempted_reason(stderr: Path) -> str:
    """'preempted: stopped by SIGUSR2 after step N; checkpoint saved', from the trainer's log."""
    return "preempted: " + error_line(stderr).split("Preempted: ", 1)[-1]


def error_line(path: Path) -> str:
    """The most telling line of a stderr tail: the last exception/error line, else the last line."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("=====")]
    for line in reversed(lines):
        if re.match(r"^([A-Za-z_.]*(Error|Exception)\b|FATAL|Traceback)", line):
            return line
    return lines[-1] if lines else ""


def last_metrics(workdir: Path) -> dict[str, Any]:
    """Every record of metrics.jsonl merged in order: the last step and train loss, and the
    last eval loss. A torn last line is skipped; a damaged line raises run_files.RunFileError."""
    out: dict[str, Any] = {}
    for record in run_files.read_metrics(Path(workdir) / run_files.METRICS):
        if isinstance(record, dict):
            out.update(record)
    return out


def squeue_alive(job_ids: Iterable[str]) -> set[str] | None:
    """Slurm job ids (as given) still queued or running; None if squeue is unavailable."""
    job_ids = sorted({j for j in job_ids if j})
    if not job_ids or shutil.which("squeue") is None:
        return None if job_ids else set()
    try:
        # -r: one line per array task, so pending tasks read `123_4` rather than `123_[4-9]`.
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    listed = set(out.stdout.split())
    return {j for j in job_ids if j in listed}


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What the files say about one run."""

    run_id: str
    status: str
    attempts: int
    failures: int
    step: int | None
    loss: float | None  # the last train loss (the final one once done)
    tokens_per_s: float | None
    error: str | None
    open_attempt: dict[str, Any] | None
    active: bool  # a live process or Slurm job still holds the run (maybe finishing up after done)
    eval_loss: float | None = None  # the last eval loss (the final one once done)
    tokens: int | None = None  # once done: tokens trained and wall time (summary.json)
    wall_time_s: float | None = None
    stacked: int = 1  # runs in the last attempt's job


def _attempt_alive(attempt: dict[str, Any], slurm_alive: set[str] | None) -> bool:
    if attempt.get("backend") == "slurm":
        job = attempt.get("slurm_job_id")
        if job is None:
            return False
        return True if slurm_alive is None else str(job) in slurm_alive
    pid = attempt.get("pid")
    if pid is None or attempt.get("host") != socket.gethostname():
        return attempt.get("host") not in (None, socket.gethostname())  # another host: trust it
    return process_start_time(pid) == attempt.get("pid_start")


def run_status(workdir: Path, slurm_alive: set[str] | None = None) -> RunStatus:
    """Status of the run in `workdir`; `slurm_alive` is the set from `squeue_alive` (None: unknown)."""
    workdir = Path(workdir)
    state, damaged = read_launch_state(workdir)
    attempts = state["attempts"]
    failures = sum(a.get("outcome") == FAILED for a in attempts)
    try:
        metrics = last_metrics(workdir)
    except run_files.RunFileError as e:
        metrics, damaged = {}, damaged or str(e)
    if damaged:  # the table names the file within the run
        damaged = damaged.replace(f"{workdir}/", "")
    last = attempts[-1] if attempts else None
    open_attempt = last if last is not None and last.get("ended") is None else None
    error = None
    active = open_attempt is not None and _attempt_alive(open_attempt, slurm_alive)
    if (workdir / run_files.SUMMARY).exists():
        status = DONE
    elif active:
        status = RUNNING if open_attempt.get("started") else QUEUED
    elif last is not None and last.get("outcome") == FAILED:
        status, error = FAILED, last.get("error")
    elif open_attempt is not None and open_attempt.get("backend") == "slurm":
        # A Slurm job that vanished without closing its attempt was killed (timeout, memory, node).
        status = FAILED
        error = f"Slurm job {open_attempt.get('slurm_job_id')} ended without reporting; see its log"
    else:
        status = PENDING
        open_attempt = None
    if status == FAILED and last.get("outcome") != FAILED:
        failures += 1
    loss, eval_loss = metrics.get("train/loss"), metrics.get("eval/loss")
    summary = run_files.read_json(workdir / run_files.SUMMARY) if status == DONE else None
    summary = summary if isinstance(summary, dict) else {}
    loss = summary.get("train_loss", loss)  # the final losses, as the run reported them
    eval_loss = summary.get("eval_loss", eval_loss)
    return RunStatus(
        run_id=workdir.name,
        status=status,
        attempts=len(attempts),
        failures=failures,
        step=metrics.get("step"),
        loss=_float(loss),
        tokens_per_s=metrics.get("perf/tokens_per_s"),
        error=error or damaged,
        open_attempt=open_attempt,
        active=active,
        eval_loss=_float(eval_loss),
        tokens=_float(summary.get("tokens")),
        wall_time_s=_float(summary.get("wall_time_s")),
        stacked=int(last.get("stacked") or 1) if last else 1,
    )


def _float(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def slurm_job_ids(workdirs: Iterable[Path]) -> list[str]:
    """Slurm job ids of open attempts in these workdirs (for one batched squeue call)."""
    ids = []
    for workdir in workdirs:
        state, _ = read_launch_state(workdir)
        if state["attempts"] and state["attempts"][-1].get("ended") is None:
            job = state["attempts"][-1].get("slurm_job_id")
            if job is not None:
                ids.append(str(job))
    return ids
