"""Slurm backend against a real single-node Slurm started by this module (see slurm_cluster.py)."""

from __future__ import annotations

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
