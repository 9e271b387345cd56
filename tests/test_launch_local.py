"""Local backend end to end with the real trainer (`sparsescale.main`, smoke preset, a few steps)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from launch.backends import local
from launch.sweep import SweepError
from sparsescale import run_files

pytestmark = pytest.mark.slow


def launch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),  # one CPU device per run
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_survives_kill_reports_failure_and_collects(
    tmp_path, experiment_file, wait_for, attempts
):
    """4 runs, 2 at a time: two short ones, one diverging (NaN), one long one that is killed."""
    sweep = [
        {"sparsity.target": 0.5},
        {"sparsity.target": 0.75},
        {"sparsity.target": 0.5, "train.lr": 1e9},  # diverges: NaN loss
        {"sparsity.target": 0.5, "train.steps": 1200},  # longest: starts first, outlasts the rest
    ]
    exp, root = (
        experiment_file(tmp_path, sweep, steps=10, log_every=10, ckpt_every=10),
        tmp_path / "root",
    )
    ok, nan, long = (
        ["target-0.5", "target-0.75"],
        "target-0.5_lr-1e+09",
        "target-0.5_steps-1200",
    )
    args = ["run", f"{exp}:smoke", "--root", str(root), "--jobs", "2", "--max-retries", "1"]
    args += ["--stack", "4"]  # the two short runs differ only in sparsity: one stacked job

    # 1. launch in its own process group; pause the long run's trainer (SIGSTOP) once it has two
    #    committed checkpoints, so that it cannot finish first on a fast machine; SIGKILL launcher
    #    and trainers once the launcher has recorded the short runs as done
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),  # one CPU device per run
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = root / long / "checkpoints"

    def long_paused() -> bool:
        if len([p for p in ckpts.glob("*") if (p / "commit_success.txt").exists()]) < 2:
            return False
        os.kill(attempts(root, long)[-1]["pid"], signal.SIGSTOP)
        return True

    try:
        wait_for(long_paused, 400, "two checkpoints of the long run")
        wait_for(
            lambda: (
                all((root / r / "launch.json").exists() for r in ok)
                and all(attempts(root, r)[-1].get("outcome") == "done" for r in ok)
            ),
            400,
            "the short runs",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (root / long / "summary.json").exists()
    assert attempts(root, long)[-1]["ended"] is None  # killed: nobody closed the attempt
    assert "pending" in launch("status", str(root)).stdout  # the dead attempt reads as pending
    finished = {r: (root / r / "summary.json").read_bytes() for r in ok}
    mtimes = {r: (root / r / "summary.json").stat().st_mtime_ns for r in ok}
    before = metric_lines(root / long / "metrics.jsonl")

    # 2. relaunch: completes; the diverging run fails twice (1 retry) with the trainer's error
    done = launch(*args)
    assert done.returncode == 1, done.stderr  # one run failed
    runs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(runs) == sorted([*ok, nan, long])
    for run_id, sparsity in zip(ok, (0.5, 0.75), strict=True):  # not re-run, files untouched
        assert (root / run_id / "summary.json").read_bytes() == finished[run_id]
        assert (root / run_id / "summary.json").stat().st_mtime_ns == mtimes[run_id]
        assert [a["outcome"] for a in attempts(root, run_id)] == ["done"]
        assert attempts(root, run_id)[0]["stacked"] == 2
        summary = run_files.read_json(root / run_id / "summary.json")
        assert summary["run_id"] == run_id and summary["experiment"] == "launchtest"
        assert summary["sparsity"] == sparsity and summary["steps"] == 10
    failed = [a for a in attempts(root, nan) if a["outcome"] != "interrupted"]
    assert [a["outcome"] for a in failed] == ["failed", "failed"]
    assert "non-finite" in failed[-1]["error"] and failed[-1]["exit_code"] == 1
    assert not (root / nan / "summary.json").exists()

    # the killed run resumed from its checkpoint: metrics up to the restored step kept byte for
    # byte, no step logged twice, both attempts' logs kept
    assert [a["outcome"] for a in attempts(root, long)] == ["interrupted", "done"]
    resumed = re.search(r"Resumed from step (\d+)", (root / long / "stderr.log").read_text())
    assert resumed and int(resumed[1]) >= 20
    after = metric_lines(root / long / "metrics.jsonl")
    steps = [m["step"] for m in after]
    assert steps == sorted(set(steps)) and steps[-1] == 1200
    kept = [m for m in before if m["step"] <= int(resumed[1])]
    assert len(kept) >= 2 and after[: len(kept)] == kept
    assert (root / long / "stdout.log").read_text().count("===== attempt") == 2

    table = launch("status", str(root)).stdout
    assert "done 3" in table and "failed 1" in table and "non-finite" in table

    # 3. collect: one row per finished run holding what the run wrote
    assert launch("collect", str(root)).returncode == 0
    csv = pd.read_csv(root / "results.csv")
    parquet = pd.read_parquet(root / "results.parquet")
    assert sorted(csv["run_id"]) == sorted([*ok, long]) == sorted(parquet["run_id"])
    assert list(csv.columns[:4]) == list(run_files.SUMMARY_COLUMNS[:4])  # the contract order
    by_id = csv.set_index("run_id")
    for run_id in [*ok, long]:
        summary = run_files.read_json(root / run_id / "summary.json")
        assert by_id.loc[run_id, "eval_loss"] == pytest.approx(summary["eval_loss"])
        assert by_id.loc[run_id, "n_params_nonzero"] == summary["n_params_nonzero"]
    assert (csv["status"] == "done").all()
    pd.testing.assert_frame_equal(
        csv[["run_id", "sparsity", "eval_loss"]], parquet[["run_id", "sparsity", "eval_loss"]]
    )

    # 4. relaunching a settled sweep changes nothing
    assert launch(*args).returncode == 1
    assert len(attempts(root, ok[0])) == 1 and len(failed) == 2
    assert len([a for a in attempts(root, nan) if a["outcome"] != "interrupted"]) == 2


def test_bad_input_fails_once_and_a_relaunch_tries_again(tmp_path, experiment_file, attempts):
    """A run the trainer refuses (exit 2: balanced 16×16 blocks at 87.5% keep no block of a
    32-row kernel) is not retried by the same launcher, whatever --max-retries says; a
    relaunch (the user may have fixed the cause) tries once more."""
    bad = {"sparsity.structure": "block", "sparsity.block": (16, 16), "sparsity.balanced": True}
    exp = experiment_file(tmp_path, [{**bad, "sparsity.target": 0.875}])
    root = tmp_path / "root"
    args = ["run", f"{exp}:smoke", "--root", str(root), "--jobs", "1", "--max-retries", "2"]
    first = launch(*args)
    assert first.returncode == 1
    assert "bad input: not retried" in first.stdout + first.stderr
    (run_id,) = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    (attempt,) = attempts(root, run_id)
    assert attempt["exit_code"] == 2 and "keeps no block" in attempt["error"]
    assert launch(*args).returncode == 1
    assert [a["exit_code"] for a in attempts(root, run_id)] == [2, 2]


def test_sweep_runs_block_sparse_path_stacked(tmp_path, experiment_file, attempts):
    """A launched sweep with `sparsity.impl = "block"`: two targets train as one stacked job that
    switches to block-sparse layers, with the same eval loss as the masked path trained here."""
    from launch.sweep import apply_overrides, load_experiment
    from sparsescale import config as config_lib
    from sparsescale import train

    block = {
        "sparsity.structure": "block",
        "sparsity.block": (8, 8),
        "sparsity.balanced": True,
        "sparsity.impl": "block",
        "sparsity.switch_density": 0.6,
    }
    sweep = [{**block, "sparsity.target": s} for s in (0.5, 0.75)]
    exp, root = (
        experiment_file(tmp_path, sweep, steps=8, log_every=4, ckpt_every=4),
        tmp_path / "root",
    )
    result = launch("run", f"{exp}:smoke", "--root", str(root), "--jobs", "1", "--stack", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    logs = "".join(p.read_text() for p in (root / ".stacks").glob("*.log"))
    assert "block-sparse layers from here" in logs
    runs = sorted(p.parent for p in root.glob("*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        assert attempts(root, run.name)[0]["stacked"] == 2
        summary = run_files.read_json(run / "summary.json")
        masked = {**block, "sparsity.impl": "masked", "sparsity.target": summary["sparsity"]}
        cfg = apply_overrides(load_experiment(exp).get_config("smoke"), masked, "masked")
        ref = train.run(config_lib.run_config(cfg), tmp_path / f"masked-{summary['sparsity']}")
        assert summary["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_a_job_started_outside_the_checkout_imports_its_experiments(tmp_path):
    """Only `sparsescale` is installed: a plain interpreter elsewhere cannot import `launch`,
    and a job with the launcher's environment imports this checkout's packages from any
    directory, keeping the PYTHONPATH it was given."""
    import launch

    code = "import experiments.common, launch; print(launch.CHECKOUT)"
    bare = {"PATH": os.environ["PATH"], "PYTHONPATH": ""}
    alone = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=bare,
                           capture_output=True, text=True)  # fmt: skip
    assert alone.returncode == 1 and "No module named" in alone.stderr, alone.stderr
    env = local.child_env(1, base={**bare, "PYTHONPATH": str(tmp_path / "mine")})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(launch.CHECKOUT), str(tmp_path / "mine")]
    job = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert job.stdout.strip() == str(Path(local.__file__).resolve().parents[2])


def test_without_a_gpu_the_launcher_and_its_jobs_start_jax_without_the_cuda_plugin_traceback(
    tmp_path, experiment_file
):
    """With the CUDA plugin installed (the `aot` extra) and no GPU, a bare JAX start logs a
    plugin traceback; the launcher's own start (a dry run builds every run's model) and the
    environment it hands a job do not."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}  # fmt: skip
    if local.visible_gpus():
        pytest.skip("this host has a GPU")
    start = [sys.executable, "-c", "import jax; jax.devices()"]
    bare = subprocess.run(start, env=env, capture_output=True, text=True)
    assert "Jax plugin configuration error" in bare.stderr  # the noise this removes
    spec = f"{experiment_file(tmp_path, [{}])}:smoke"
    dry = subprocess.run([sys.executable, "-m", "launch", "run", spec, "--root", str(tmp_path / "r"),
                          "--dry-run"], env=env, capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0 and "1 runs" in dry.stdout, dry.stderr
    assert "Jax plugin configuration error" not in dry.stderr
    job_env = dict(env)
    local.skip_cuda_check_without_gpus(job_env)
    job = subprocess.run(
        start, env=local.child_env(1, base=job_env), capture_output=True, text=True
    )
    assert job.returncode == 0 and "Jax plugin configuration error" not in job.stderr


def test_the_launcher_takes_no_accelerator_from_its_jobs(tmp_path, experiment_file):
    """The launcher checks configs with JAX (process counts), but a TPU's chips are one
    process's and a GPU's memory is preallocated: with the accelerator plugins installed (the
    `aot` extra), a bare JAX start tries them; the launcher's own start tries only the CPU."""
    probe = (
        "from jax._src import xla_bridge as xb; print(sorted({*xb._backends, *xb._backend_errors}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    bare = subprocess.run([sys.executable, "-c", f"import jax; jax.process_count(); {probe}"],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    if bare.stdout.split("\n")[-2] == "['cpu']":
        pytest.skip("no accelerator plugin installed")
    spec, root = f"{experiment_file(tmp_path, [{}])}:smoke", str(tmp_path / "r")
    code = (f"from launch.__main__ import main; "
            f"assert main(['run', {spec!r}, '--root', {root!r}, '--dry-run']) == 0; {probe}")  # fmt: skip
    launcher = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True)  # fmt: skip
    assert launcher.returncode == 0, launcher.stderr
    assert launcher.stdout.split("\n")[-2] == "['cpu']", (bare.stdout, launcher.stdout)


def test_gpu_host_gives_each_job_its_own_gpus_and_a_cpu_host_is_left_alone(monkeypatch):
    """Device assignment without a GPU: 4 visible GPUs (CUDA_VISIBLE_DEVICES), 2 per job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    gpus = local.visible_gpus()
    assert gpus == ("3", "5", "6", "7")
    options = local.LocalOptions(jobs=2, threads=1, gpus=gpus, gpus_per_job=2)
    slots = local.make_slots(options, [0, 1])
    assert [(s.cpus, s.gpus) for s in slots] == [([0], ("3", "5")), ([1], ("6", "7"))]
    env = local.child_env(1, base={"PATH": "/bin"}, gpus=slots[1].gpus)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == local.GPU_MEM_FRACTION
    cpu_only = local.child_env(1, base={"PATH": "/bin"}, gpus=())  # --gpus-per-job 0
    assert cpu_only["CUDA_VISIBLE_DEVICES"] == "" and cpu_only["JAX_PLATFORMS"] == "cpu"
    plain = local.child_env(1, base={"PATH": "/bin"})  # a CPU machine: no GPU settings at all
    assert "CUDA_VISIBLE_DEVICES" not in plain and "JAX_PLATFORMS" not in plain
    assert local.make_slots(local.LocalOptions(jobs=2, threads=1), [0, 1])[0].gpus is None
    with pytest.raises(SweepError, match="must fit the 4 GPUs"):
        local.LocalOptions(jobs=3, threads=1, gpus=gpus, gpus_per_job=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local.visible_gpus() == ()
