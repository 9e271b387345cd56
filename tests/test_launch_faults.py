"""Issue 19, launcher faults: each test injects one and checks no result is lost or corrupted and
that the message names the cause. SIGTERM to the launcher, leftover orbax temporary checkpoint
directories, forking a JAX-threaded launcher, crafted or damaged `sweep.json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from launch import planner, state, status, sweep
from launch.backends import local
from launch.sweep import SweepError
from sparsescale import run_files


def _alive(attempt: dict) -> bool:
    pid = attempt.get("pid")
    return pid is not None and state.process_start_time(pid) == attempt.get("pid_start")


@pytest.mark.slow
def test_sigterm_stops_trainers_and_closes_attempts(tmp_path, experiment_file, wait_for):
    """SIGTERM to the launcher alone (as Slurm sends it) while a stacked job and a single run
    train: no trainer survives, every attempt is closed as interrupted naming SIGTERM, the lock
    is released, runs read as pending (resumable, not failed), and no fork warning is printed."""
    runs = [{"sparsity.target": t} for t in (0.5, 0.75, 0.875)]
    spec, root = (
        f"{experiment_file(tmp_path, runs, steps=2000, log_every=5, ckpt_every=50)}:smoke",
        tmp_path / "root",
    )
    args = ["run", spec, "--root", str(root), "--jobs", "2", "--threads", "1", "--stack", "2"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch", *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ids = [sweep.make_run_id(r) for r in runs]

    def attempts(run_id):
        launch = run_files.read_json(root / run_id / run_files.LAUNCH)
        return launch["attempts"] if launch else []

    try:
        wait_for(lambda: all(attempts(r) and attempts(r)[-1].get("pid") for r in ids), 120,
                  "all trainers started")  # fmt: skip
        started = {r: attempts(r)[-1] for r in ids}
        assert len({a["pid"] for a in started.values()}) == 2  # a stacked job and a single run
        assert all(_alive(a) for a in started.values())
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "run the same command again" in err
    assert "os.fork()" not in err, err  # children are not started by forking this JAX process
    for run_id, before in started.items():
        assert not _alive(before), f"trainer of {run_id} survived the launcher"
        last = attempts(run_id)[-1]
        assert last["ended"] is not None and last["outcome"] == state.INTERRUPTED
        assert "SIGTERM" in last["error"]
    with run_files.file_lock(root / ".launcher.lock", blocking=False) as locked:
        assert locked  # released
    statuses = status.sweep_statuses(root)
    assert [s.status for s in statuses] == [state.PENDING] * 3
    assert all(s.failures == 0 for s in statuses)


def test_spawn_does_not_fork_a_jax_threaded_process_and_pins_cores():
    import jax.numpy as jnp

    (jnp.ones(8) * 2).block_until_ready()  # JAX is imported and its threads run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the old way (preexec_fn) runs os.fork's hooks, where JAX warns: the check can see it
        subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=lambda: None).wait()
    assert any("os.fork()" in str(w.message) for w in caught)

    own = os.sched_getaffinity(0)
    cpu = max(own)
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        child = local.spawn([sys.executable, "-c", probe], [cpu], stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=30)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], caught
    assert json.loads(out) == [cpu]  # pinned
    assert os.sched_getaffinity(0) == own  # the launcher's own cores are given back


def test_temporary_checkpoint_dirs_are_not_checkpoints(tmp_path, experiment_file):
    """A writer killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`: that run has nothing to
    resume from, so it still stacks with its fresh neighbours instead of restarting alone."""
    spec = f"{experiment_file(tmp_path, [{'sparsity.target': t} for t in (0.5, 0.75)], 20, 5, 50)}:smoke"
    expanded = sweep.expand(spec)
    root = tmp_path / "root"
    first = root / expanded.runs[0].run_id / run_files.CHECKPOINTS
    (first / "10.orbax-checkpoint-tmp-1733000000123456").mkdir(parents=True)
    assert not planner.has_checkpoint(first.parent)
    assert planner.plan(expanded, list(expanded.runs), root, jobs=1, max_stack=4) == [
        list(expanded.runs)
    ]
    (first / "10").mkdir()  # a finalized step: resume it alone
    assert planner.has_checkpoint(first.parent)
    planned = planner.plan(expanded, list(expanded.runs), root, jobs=1, max_stack=4)
    assert planned == [[expanded.runs[0]], [expanded.runs[1]]]

    # Both were one stacked job, and both resume: the same stack again (the same numbers).
    job = planner.stack_id(expanded.runs)
    for r in expanded.runs:
        (root / r.run_id / run_files.CHECKPOINTS / "10").mkdir(parents=True, exist_ok=True)
        state.begin_attempt(root / r.run_id, "local", stacked=2, stack=job)
    planned = planner.plan(expanded, list(expanded.runs), root, jobs=2, max_stack=4)
    assert planned == [list(expanded.runs)]
    planned = planner.plan(expanded, [expanded.runs[1]], root, jobs=2, max_stack=4)
    assert planned == [[expanded.runs[1]]]  # its stack-mate is done or elsewhere: alone


def _crafted_root(tmp_path: Path, runs) -> Path:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    run_files.write_json_atomic(root / "sweep.json", {"experiment": "e", "arg": None, "runs": runs})
    return root


def _status_cli(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", "status", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def _run(run_id, **fields):
    return {"run_id": run_id, "overrides": {}, "steps": 10, "tokens_per_step": 4} | fields


@pytest.mark.parametrize(
    ("runs", "cause"),
    [
        ([_run("../x")], "'../x' is not a plain directory name"),
        ([_run("/etc")], "'/etc' is not a plain directory name"),
        ([_run("ok/../../x")], "must not point outside the sweep root"),
        ([_run(".stacks")], "'.stacks' is not a plain directory name"),
        ([_run("a"), _run("a")], "'a' appears twice"),
        ([{"run_id": "a", "overrides": {}}], "run 'a': 'steps' must be an integer ≥ 1, got None"),
        ([_run("a", tokens_per_step="4")], "'tokens_per_step' must be an integer"),
        ({"r": 1}, "'runs' must be a list"),
        (["a"], "runs[0] must be an object"),
    ],
)
def test_crafted_sweep_json_is_refused_with_its_cause(tmp_path, runs, cause):
    root = _crafted_root(tmp_path, runs)
    outside = [p for p in tmp_path.rglob("*") if p != root and root not in p.parents]
    with pytest.raises(SweepError, match="sweep.json: ") as e:
        status.status_text(root)
    assert cause in str(e.value)
    result = _status_cli(root)  # the command line: a message naming the cause, no traceback
    assert result.returncode == 2 and cause in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert [p for p in tmp_path.rglob("*") if p != root and root not in p.parents] == outside


def test_damaged_sweep_json_is_refused_and_never_overwritten(tmp_path, experiment_file):
    spec = f"{experiment_file(tmp_path, [{'sparsity.target': 0.5}], 20, 5, 50)}:smoke"
    expanded = sweep.expand(spec)
    root = tmp_path / "root"
    record = sweep.save_sweep(root, expanded)
    assert sweep.read_sweep_json(root)["runs"] == record["runs"]
    torn = (root / "sweep.json").read_bytes()[:-40]  # a crafted or half-copied file
    (root / "sweep.json").write_bytes(torn)
    for call in (lambda: sweep.read_sweep_json(root), lambda: sweep.save_sweep(root, expanded)):
        with pytest.raises(SweepError, match=r"sweep.json: not valid JSON .* damaged"):
            call()
    assert (root / "sweep.json").read_bytes() == torn  # relaunching did not replace the record
    result = _status_cli(root)
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_damaged_run_files_show_in_status_and_are_kept(tmp_path):
    root = _crafted_root(tmp_path, [_run("a"), _run("b")])
    (root / "a").mkdir()
    (root / "a" / "launch.json").write_text('{"attempts": [{"n": 1')  # torn
    (root / "b").mkdir()
    (root / "b" / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    by_id = {s.run_id: s for s in status.sweep_statuses(root)}
    assert "launch.json: not valid JSON" in by_id["a"].error
    assert "metrics.jsonl: line 2 is not valid JSON" in by_id["b"].error
    text = status.status_text(root)
    assert "launch.json: not valid" in text and "line 2" in text
    # the launcher starts a new record and keeps the damaged one beside it
    state.begin_attempt(root / "a", "local")
    assert [a["n"] for a in state.read_launch_state(root / "a")[0]["attempts"]] == [1]
    kept = list((root / "a").glob("launch.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"attempts": [{"n": 1'


def test_stop_kills_stubborn_trainers_and_keeps_finished_results(tmp_path, monkeypatch):
    """The launcher's stop path: a trainer ignoring SIGTERM is killed after the grace period; a
    run whose summary.json appeared meanwhile is closed as done, the other as interrupted."""
    monkeypatch.setattr(local, "STOP_GRACE_S", 0.5)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', "
    stubborn += "flush=True); time.sleep(60)"
    runs = [sweep.Run(r, {}, 10, 4, sweep.Resources()) for r in ("a", "b")]
    attempts = [state.begin_attempt(tmp_path / r.run_id, "local") for r in runs]
    started = time.time()
    child = local.spawn([sys.executable, "-c", stubborn], sorted(os.sched_getaffinity(0)),
                        stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    for r, n in zip(runs, attempts, strict=True):
        state.mark_started(tmp_path / r.run_id, n, child.pid)
    run_files.write_json_atomic(tmp_path / "b" / "summary.json", {"eval_loss": 1.0})
    job = local._Active(runs, attempts, child, [], started, 0, stderr=tmp_path / "stack.log")
    local._stop([job], tmp_path, "SIGTERM")
    assert child.returncode == -signal.SIGKILL
    a, b = (state.read_launch_state(tmp_path / r)[0]["attempts"][-1] for r in ("a", "b"))
    assert (a["outcome"], a["error"]) == (state.INTERRUPTED, "launcher stopped by SIGTERM")
    assert b["outcome"] == state.DONE and b["error"] is None
    assert state.run_status(tmp_path / "a").status == state.PENDING  # resumable, not failed
    assert state.run_status(tmp_path / "a").failures == 0


def test_collect_refuses_a_damaged_summary_instead_of_dropping_the_run(tmp_path):
    from launch import collect

    root = _crafted_root(tmp_path, [_run("a"), _run("b")])
    for run_id in ("a", "b"):
        (root / run_id).mkdir()
        run_files.write_json_atomic(root / run_id / "summary.json", {"eval_loss": 1.0})
    assert collect.collect(root)["run_id"].tolist() == ["a", "b"]
    before = (root / "results.csv").read_bytes()
    (root / "b" / "summary.json").write_text('{"eval_loss": 1.')  # torn
    with pytest.raises(SweepError, match=r"b/summary.json: not valid JSON .* damaged"):
        collect.collect(root)
    assert (root / "results.csv").read_bytes() == before  # the last good table is kept


@pytest.mark.slow
def test_preempted_trainer_resumes_without_spending_a_try(
    tmp_path, experiment_file, launcher_env, attempts
):
    """A trainer stopped by a signal (checkpoint saved, PREEMPTED_EXIT) is resumed by the local
    launcher at once, with --max-retries 0: preemption is not a failure. The resumed run's
    losses equal an uninterrupted run's."""
    from sparsescale import train

    runs = [{"train.seed": 0}]
    exp = experiment_file(tmp_path, runs, steps=12, log_every=1, ckpt_every=6)
    run_id = sweep.make_run_id(runs[0])
    finals = {}
    for name, env in (("plain", {}), ("signalled", {train.SIGNAL_AFTER_STEP: "3"})):
        root = tmp_path / name
        args = ["run", f"{exp}:smoke", "--root", str(root), "--jobs", "1", "--threads", "1"]
        done = subprocess.run(
            [sys.executable, "-m", "launch", *args, "--max-retries", "0"],
            env=launcher_env() | env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        finals[name] = run_files.read_json(root / run_id / run_files.SUMMARY)
        outcomes = [a["outcome"] for a in attempts(root, run_id)]
        assert outcomes == (["done"] if name == "plain" else [state.PREEMPTED, "done"])
    assert "stopped by SIGUSR1 after step 4" in attempts(root, run_id)[0]["error"]
    assert "will resume" in done.stdout
    for key in ("train_loss", "eval_loss"):
        assert finals["signalled"][key] == finals["plain"][key]
