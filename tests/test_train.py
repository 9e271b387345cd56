"""The loop (sparsescale/train.py): kill/resume is bit-identical, two processes equal one, and
injected faults lose or corrupt nothing and name their cause."""

import json
import math
import shutil
import socket
import subprocess

import numpy as np
import pytest

from sparsescale import config as config_lib
from sparsescale import train

# ------------------------------------------------------------------------------------------------
# Subprocess tests: resume after the trainer dies (at a fixed step), two processes.


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, same_training, main_cmd, metric_lines, run_env):
    args = ["--config.train.steps=24", "--config.train.ckpt_every=4", "--config.train.log_every=1"]
    ref = tmp_path / "ref"
    subprocess.run(main_cmd(ref, *args), env=run_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"  # dies after step 10 (the hook), its last checkpoint step 8
    env = {**run_env(), train.EXIT_AFTER_STEP: "10"}
    died = subprocess.run(main_cmd(killed, *args), env=env, capture_output=True, text=True)
    assert died.returncode == 137, died.stderr[-2000:]
    assert len(metric_lines(killed)) == 10
    assert sorted(int(p.parent.name) for p in killed.glob("checkpoints/*/commit_success.txt")) == [
        4,
        8,
    ]
    assert not (killed / "summary.json").exists()
    subprocess.run(main_cmd(killed, *args), env=run_env(), check=True, capture_output=True)

    same_training(ref, killed, 24)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, main_cmd, metric_lines, run_env):
    args = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.ckpt_every=6"]
    one = tmp_path / "one"
    subprocess.run(main_cmd(one, *args), env=run_env(devices=4), check=True, capture_output=True)

    port = _free_port()
    two = tmp_path / "two"
    procs = []
    for i in range(2):
        env = run_env(devices=2)
        multihost = [
            "--multihost",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                main_cmd(two, *multihost, *args),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    a, b = metric_lines(one), metric_lines(two)
    np.testing.assert_allclose(
        [d["train/loss"] for d in b], [d["train/loss"] for d in a], rtol=1e-5
    )
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["eval_loss"] == pytest.approx(sa["eval_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Faults: each injects one and checks that nothing written is lost and the message names the cause.


def _train(smoke_config, workdir, **overrides):
    base = {"train.steps": 8, "train.ckpt_every": 4, "train.log_every": 2}
    return train.run(config_lib.run_config(smoke_config(**{**base, **overrides})), workdir)


def test_bad_input_fails_before_writing_anything(tmp_path, smoke_config):
    cfg = config_lib.run_config(smoke_config(**{"data.batch_size": 6, "mesh.data": 4}))
    with pytest.raises(ValueError, match="batch shards"):
        train.run(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        train.run(config_lib.run_config(smoke_config()), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_rerunning_a_finished_run_leaves_it_untouched(tmp_path, smoke_config):
    first = _train(smoke_config, tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "summary.json", tmp_path / "metrics.jsonl")}
    assert _train(smoke_config, tmp_path) == first
    assert {p: p.read_bytes() for p in before} == before


def test_resume_at_final_step_rebuilds_the_same_summary(tmp_path, smoke_config):
    """Killed between the last checkpoint and summary.json: the re-run writes the same summary."""
    first = _train(smoke_config, tmp_path)
    (tmp_path / "summary.json").unlink()
    again = _train(smoke_config, tmp_path)
    assert again == first and math.isfinite(again["train_loss"])


@pytest.mark.parametrize("damage", ["truncate", "empty_json", "delete_state"])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, smoke_config, metric_lines, caplog, damage
):
    ref = _train(smoke_config, tmp_path / "ref")
    work = tmp_path / "work"
    _train(smoke_config, work, **{"train.steps": 8})
    (work / "summary.json").unlink()  # as if killed right after saving step 8
    step_dir = work / "checkpoints" / "8"
    if damage == "truncate":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 8:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty_json":
        for f in step_dir.rglob("*.json"):
            f.write_text("")
        for f in (step_dir / "meta").rglob("*"):
            if f.is_file():
                f.write_text("")
    else:
        shutil.rmtree(step_dir / "state")
    with caplog.at_level("WARNING", logger="sparsescale"):
        got = _train(smoke_config, work)
    assert "Skipped checkpoint step 8" in caplog.text
    assert got["eval_loss"] == ref["eval_loss"] and got["train_loss"] == ref["train_loss"]
    assert [r["train/loss"] for r in metric_lines(work)] == [
        r["train/loss"] for r in metric_lines(tmp_path / "ref")
    ]
    assert list((work / "checkpoints.corrupt").iterdir())  # kept aside, not deleted


def test_resume_with_a_changed_config_is_refused(tmp_path, smoke_config):
    _train(smoke_config, tmp_path, **{"train.steps": 8, "train.ckpt_every": 4})
    (tmp_path / "summary.json").unlink()
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(train.RunDirError, match=r"train\.lr: 0\.003 -> 0\.01"):
        _train(smoke_config, tmp_path, **{"train.lr": 0.01})
    with pytest.raises(train.RunDirError, match="sparsity.structure.sparsity"):
        _train(smoke_config, tmp_path, **{"sparsity.target": 0.75})
    assert (tmp_path / "config.json").read_text() == saved  # never rewritten before the check
    # Logging cadence does not change the result: allowed.
    _train(smoke_config, tmp_path, **{"train.log_every": 4})


def test_second_trainer_on_a_workdir_is_refused(tmp_path, smoke_config):
    from sparsescale import run_files

    tmp_path.mkdir(exist_ok=True)
    with run_files.file_lock(tmp_path / run_files.LOCK):
        with pytest.raises(train.RunDirError, match="in use by another trainer"):
            _train(smoke_config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_metrics_survive_deletion_and_a_torn_last_line(tmp_path, smoke_config, metric_lines):
    ref = tmp_path / "ref"
    _train(smoke_config, ref, **{"train.log_every": 1})
    work = tmp_path / "work"
    real_append = train.MetricsLog.append

    def delete_midway(self, row):
        if row["step"] == 3:
            self.path.unlink()  # a user deletes the file mid-run
        real_append(self, row)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.MetricsLog, "append", delete_midway)
        _train(smoke_config, work, **{"train.log_every": 1, "train.steps": 8})
    assert [r["step"] for r in metric_lines(work)] == list(range(1, 9))
    # A kill mid-write leaves a torn last line; the resume drops it and goes on.
    (work / "summary.json").unlink()
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')
    _train(smoke_config, work, **{"train.log_every": 1})
    assert [r["train/loss"] for r in metric_lines(work)] == [
        r["train/loss"] for r in metric_lines(ref)
    ]


def test_failed_json_says_when_there_is_no_checkpoint(tmp_path, smoke_config):
    with pytest.raises(train.NonFiniteLoss, match="no checkpoint was saved yet"):
        _train(smoke_config, tmp_path, **{"train.lr": 1e9, "train.ckpt_every": 100})


def test_the_eta_does_not_wrap_after_a_day():
    assert train.hours_minutes_seconds(59.6) == "0:01:00"
    assert train.hours_minutes_seconds(3 * 86400 + 3661) == "73:01:01"


@pytest.mark.slow
def test_signal_checkpoints_and_resume_is_bit_identical(tmp_path, same_training, main_cmd, run_env):
    """SIGUSR1 (what Slurm sends before a time limit) after step 10: the trainer saves a
    checkpoint at step 11, off its every-8 schedule, and exits PREEMPTED_EXIT; the resumed run
    equals an uninterrupted one bit for bit."""
    from sparsescale import preemption

    args = ["--config.train.steps=24", "--config.train.ckpt_every=8", "--config.train.log_every=1"]
    ref = tmp_path / "ref"
    subprocess.run(main_cmd(ref, *args), env=run_env(), check=True, capture_output=True)

    stopped = tmp_path / "stopped"
    env = {**run_env(), train.SIGNAL_AFTER_STEP: "10"}
    done = subprocess.run(main_cmd(stopped, *args), env=env, capture_output=True, text=True)
    assert done.returncode == preemption.PREEMPTED_EXIT, done.stderr[-2000:]
    assert "stopped by SIGUSR1 after step 11" in done.stderr
    saved = sorted(int(p.parent.name) for p in stopped.glob("checkpoints/*/commit_success.txt"))
    assert saved == [8, 11] and not (stopped / "summary.json").exists()
    subprocess.run(main_cmd(stopped, *args), env=run_env(), check=True, capture_output=True)
    same_training(ref, stopped, 24)
