"""Slurm backend against a real single-node Slurm started by this module (see slurm_cluster.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from slurm_cluster import SlurmCluster, missing_reason

from sparsescale import run_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory, launcher_env):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    env = cluster.start()
    yield launcher_env() | env
    cluster.stop()


def test_slurm_array_and_two_task_jax_distributed_job(
    tmp_path, slurm_env, attempts, experiment_file
):
    sweep = [
        {"train.seed": 0},
        {"train.seed": 0, "launch.tasks": 2},  # 2 processes, jax.distributed over Slurm
        {"train.seed": 0, "train.lr": 1e9},  # NaN: fails, reported with the trainer's error
    ]
    exp, root = (
        experiment_file(tmp_path, sweep, steps=6, log_every=3, ckpt_every=3),
        tmp_path / "root",
    )
    args = ["run", f"{exp}:smoke", "--root", str(root), "--backend", "slurm", "--poll", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "launch", *args, "--max-retries", "0"],
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    single, multi, nan = "seed-0", "seed-0_tasks-2", "seed-0_lr-1e+09"

    for run_id in (single, multi):
        (attempt,) = attempts(root, run_id)
        assert attempt["backend"] == "slurm" and attempt["outcome"] == "done", attempt
        assert attempt["slurm_job_id"] and attempt["host"]
    assert [a["outcome"] for a in attempts(root, nan)] == ["failed"]
    assert "non-finite" in attempts(root, nan)[-1]["error"]

    # both tasks of the 2-task job trained (each logs), and as one data-parallel program they
    # reproduce the single-process run's losses
    for log in ("stderr.log", "stderr.task1.log"):
        assert "Connecting to JAX distributed service" in (root / multi / log).read_text()
    one = run_files.read_json(root / single / "summary.json")
    two = run_files.read_json(root / multi / "summary.json")
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert list((root / "slurm").glob("*_log.out"))  # submitit's per-job logs

    # relaunch: nothing left to submit (done runs skipped, the failure is out of retries)
    again = subprocess.run(
        [sys.executable, "-m", "launch", *args, "--max-retries", "0"],
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "submitted" not in again.stdout and len(attempts(root, nan)) == 1


def _launch(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "launch", *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_signalled_or_cancelled_slurm_job_resumes_and_matches_an_uninterrupted_run(
    tmp_path, slurm_env, attempts, experiment_file, wait_for
):
    """SIGUSR2 to a running job (what Slurm sends `signal_delay_s` before the time limit, and a
    preemption notice to submitit): the trainer checkpoints, the attempt closes as preempted, and
    the same Slurm job is requeued as the next attempt and resumes. `scancel` (SIGTERM, then
    SIGKILL after KillWait) with --no-wait, then the same command again: the trainer checkpoints
    on SIGTERM and the relaunch resumes. With --max-retries 0 neither spends a try, and both
    runs' losses equal an uninterrupted run's."""
    exp = experiment_file(tmp_path, [{"train.seed": 0}], steps=3000, log_every=50, ckpt_every=1000)
    run_id, finals, jobs = "seed-0", {}, {}

    def launch(root, *extra):
        args = ["run", f"{exp}:smoke", "--root", str(root), "--backend", "slurm", "--poll", "1"]
        return subprocess.Popen(
            [sys.executable, "-m", "launch", *args, "--max-retries", "0", *extra], env=slurm_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def job_at_step_100(root):
        metrics = root / run_id / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 300,
                 "the run to log step 100")  # fmt: skip
        return attempts(root, run_id)[-1]["slurm_job_id"]

    def requeued_job_started(root):
        tries = attempts(root, run_id)
        return len(tries) == 2 and tries[1]["started"] is not None

    for name in ("plain", "signalled", "cancelled"):
        root = tmp_path / name
        launcher = launch(root, *(["--no-wait"] if name == "cancelled" else []))
        try:
            if name == "signalled":
                jobs[name] = job_at_step_100(root)
                subprocess.run(["scancel", "--signal=USR2", jobs[name]], env=slurm_env, check=True)
                # Slurm starts it again once its old credential expires (cred_expire, 20 s here)
                wait_for(lambda r=root: requeued_job_started(r), 300, "the requeued job to start")
            if name == "cancelled":
                jobs[name] = job_at_step_100(root)
                subprocess.run(["scancel", jobs[name]], env=slurm_env, check=True)
                wait_for(lambda r=root: attempts(r, run_id)[-1]["ended"], 120, "the job to end")
                launcher.communicate(timeout=60)
                launcher = launch(root)  # the same command again
            out, _ = launcher.communicate(timeout=600)
        finally:
            if launcher.poll() is None:
                launcher.kill()
        assert launcher.returncode == 0, out
        finals[name] = run_files.read_json(root / run_id / "summary.json")

    signalled, cancelled = (attempts(tmp_path / n, run_id) for n in ("signalled", "cancelled"))
    assert [a["outcome"] for a in signalled] == ["preempted", "done"], signalled
    assert signalled[0]["slurm_job_id"] == signalled[1]["slurm_job_id"] == jobs["signalled"]
    # Slurm signals the trainer itself, and the job body forwards SIGUSR1: either comes first
    stopped = re.match(r"preempted: stopped by SIGUSR[12] after step (\d+);", signalled[0]["error"])
    assert stopped and 100 <= int(stopped[1]) < 3000, signalled[0]["error"]
    assert [a["outcome"] for a in cancelled] == ["preempted", "done"], cancelled
    assert "stopped by SIGTERM" in cancelled[0]["error"]
    assert cancelled[1]["slurm_job_id"] != jobs["cancelled"]  # a new job, submitted by the relaunch
    for name in ("signalled", "cancelled"):
        for key in ("train_loss", "eval_loss"):
            assert finals[name][key] == pytest.approx(finals["plain"][key], rel=1e-5), name


def test_a_job_at_its_time_limit_is_requeued_and_matches_an_uninterrupted_run(
    tmp_path, slurm_env, attempts, experiment_file
):
    """A literal time limit: a 2-minute job signalled 45 s before it (`--slurm signal_delay_s=45`,
    Slurm's own `--signal`, which may come up to 60 s early; no scancel) checkpoints, is requeued
    without spending a try, and ends with the losses of the same run under a 60-minute limit,
    trained beside it. 50000 steps take over 75 s here, so the first instance is signalled."""
    sweep = [{"train.seed": 0}, {"train.seed": 0, "launch.timeout_min": 2}]
    exp = experiment_file(tmp_path, sweep, steps=50000, log_every=500, ckpt_every=4000)
    root = tmp_path / "root"
    args = ["run", f"{exp}:smoke", "--root", str(root), "--backend", "slurm", "--poll", "1",
            "--max-retries", "0", "--slurm", "signal_delay_s=45"]  # fmt: skip
    done = _launch(args, slurm_env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    plain, limited = attempts(root, "seed-0"), attempts(root, "seed-0_timeout_min-2")
    assert [a["outcome"] for a in plain] == ["done"], plain
    outcomes = [a["outcome"] for a in limited]
    assert outcomes[-1] == "done" and set(outcomes[:-1]) == {"preempted"} and outcomes[:-1], limited
    assert all(a["slurm_job_id"] == limited[0]["slurm_job_id"] for a in limited)  # requeued
    assert re.match(r"preempted: stopped by SIGUSR[12] after step \d+;", limited[0]["error"])
    finals = [
        run_files.read_json(root / r / "summary.json") for r in ("seed-0", "seed-0_timeout_min-2")
    ]
    for key in ("train_loss", "eval_loss"):
        assert finals[1][key] == pytest.approx(finals[0][key], rel=1e-5), key


def test_bad_partition_is_one_line_and_records_nothing(tmp_path, slurm_env, experiment_file):
    exp = experiment_file(tmp_path, [{"train.seed": 0}])
    root = tmp_path / "root"
    args = ["run", f"{exp}:smoke", "--root", str(root), "--backend", "slurm"]
    done = _launch([*args, "--partition", "nosuch"], slurm_env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    # one error line and no traceback (jax plugins may print their own notes on import)
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in done.stderr
    assert line.startswith("error: Slurm submission of 1 runs failed") and "partition" in line
    assert not list(root.glob("*/launch.json"))
