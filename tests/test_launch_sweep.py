"""Sweep expansion, run ids, matched schedules, run state, status table, collect, dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from launch import collect, cost, state, status, sweep
from launch.sweep import SweepError
from sparsescale import run_files

EXPERIMENT = """
import ml_collections
from experiments import common
from launch.sweep import product

SCHEDULE_AXES = {axes!r}

def get_config(arg):
    c = common.smoke(common.base_config())
    c.experiment = "unit"
    c.sparsity.structure = "unstructured"
    return c

def get_sweep(arg):
    return {sweep}
"""


def write_experiment(tmp_path, sweep_expr: str, axes: tuple = ()) -> str:
    path = tmp_path / "unit_exp.py"
    path.write_text(EXPERIMENT.format(sweep=sweep_expr, axes=axes))
    return f"{path}:smoke"


def test_product_order_and_count():
    runs = sweep.product({"model.name": ["s", "m"], "sparsity.target": [0.0, 0.5, 0.75]})
    assert len(runs) == 6
    assert runs[0] == {"model.name": "s", "sparsity.target": 0.0}
    assert runs[2] == {"model.name": "s", "sparsity.target": 0.75}
    assert runs[3] == {"model.name": "m", "sparsity.target": 0.0}
    with pytest.raises(SweepError, match="sparsity.target"):
        sweep.product({"sparsity.target": 0.5})
    both = sweep.chain(runs[:1], [{"sparsity.target": 0.9}], train__seed=3)
    assert both == [
        {"model.name": "s", "sparsity.target": 0.0, "train.seed": 3},
        {"sparsity.target": 0.9, "train.seed": 3},
    ]


def test_run_ids_are_readable_and_stable():
    overrides = {"model.name": "s", "sparsity.target": 0.5, "sparsity.structure": "nm"}
    assert sweep.make_run_id(overrides) == "name-s_target-0.5_structure-nm"
    assert sweep.make_run_id({"train.lr": 1e9, "train.seed": 0}) == "lr-1e+09_seed-0"
    assert sweep.make_run_id({"train.lr": 3e-3}) == "lr-0.003"
    # keys sharing a last component keep enough of their path to be told apart
    two_starts = {"sparsity.schedule.start": 0.1, "data.start": 2}
    assert sweep.make_run_id(two_starts) == "schedule.start-0.1_data.start-2"
    assert sweep.make_run_id({"sparsity.block": (16, 16)}) == "block-16x16"
    assert sweep.make_run_id({}) == "base"
    assert sweep.make_run_id({"data.name": "a b/c"}) == "name-a-b-c"
    long = {f"k{i}": "v" * 20 for i in range(8)}
    assert len(sweep.make_run_id(long)) == sweep.MAX_RUN_ID_LEN
    assert sweep.make_run_id(long).endswith(sweep.overrides_hash(long))


def test_expand_applies_overrides_and_validates(tmp_path):
    spec = write_experiment(
        tmp_path,
        'product({"model.d_model": [16, 32], "sparsity.target": [0.5, 0.75]}) '
        '+ [{"sparsity.target": 0.0, "sparsity.structure": "dense"}]',
    )
    expanded = sweep.expand(spec)
    assert expanded.experiment == "unit" and expanded.arg == "smoke"
    ids = [r.run_id for r in expanded.runs]
    assert ids[:2] == ["d_model-16_target-0.5", "d_model-16_target-0.75"]
    assert len(set(ids)) == 5
    config = expanded.configs[1]
    assert config.model.d_model == 16 and config.sparsity.target == 0.75
    assert expanded.runs[1].steps == 10 and expanded.runs[1].tokens_per_step == 8 * 32
    assert expanded.runs[0].resources == sweep.Resources()  # no config.launch: defaults

    with pytest.raises(SweepError, match=r"unknown field 'sparsty'"):
        sweep.expand(write_experiment(tmp_path, '[{"sparsity.sparsty": 0.5}]'))
    with pytest.raises(SweepError, match=r"no section 'modle'"):
        sweep.expand(write_experiment(tmp_path, '[{"modle.name": "x"}]'))
    with pytest.raises(SweepError, match="identical overrides"):
        sweep.expand(write_experiment(tmp_path, '[{"train.seed": 1}, {"train.seed": 1}]'))
    with pytest.raises(SweepError, match=r"run #0 .*diagonal"):  # the trainer's own validation
        sweep.expand(write_experiment(tmp_path, '[{"sparsity.structure": "diagonal"}]'))
    with pytest.raises(SweepError, match=r"run #0 .*train.steps must be"):
        sweep.expand(write_experiment(tmp_path, '[{"train.steps": 0}]'))
    with pytest.raises(SweepError, match="expected an existing"):
        sweep.expand(str(tmp_path / "missing.py:smoke"))


def test_unmatched_schedules_refused_unless_declared(tmp_path):
    varying = '[{"sparsity.target": 0.5}, {"sparsity.target": 0.5, "sparsity.schedule.end": 0.5}]'
    with pytest.raises(SweepError, match=r"sparsity.schedule.end is 0.75 .* but 0.5") as e:
        sweep.expand(write_experiment(tmp_path, varying))
    assert "SCHEDULE_AXES" in str(e.value)
    declared = sweep.expand(write_experiment(tmp_path, varying, axes=("sparsity.schedule.end",)))
    assert [c.sparsity.schedule.end for c in declared.configs] == [0.75, 0.5]
    # a declared axis does not excuse another one
    other = varying.replace("schedule.end", "schedule.every")
    with pytest.raises(SweepError, match="schedule.every"):
        sweep.expand(write_experiment(tmp_path, other, axes=("sparsity.schedule.end",)))
    updates = varying.replace('"sparsity.schedule.end": 0.5', '"sparsity.schedule.updates": 10')
    with pytest.raises(SweepError, match=r"schedule.updates is None .* but 10"):
        sweep.expand(write_experiment(tmp_path, updates))
    # dense runs have no schedule to match; token budgets (steps) may differ freely
    dense = (
        '[{"sparsity.target": 0.5, "train.steps": 20},'
        ' {"sparsity.target": 0.0, "sparsity.schedule.kind": "constant"}]'
    )
    assert len(sweep.expand(write_experiment(tmp_path, dense)).runs) == 2


def test_sweep_json_keeps_earlier_runs_and_refuses_changed_overrides(tmp_path):
    root = tmp_path / "root"
    first = sweep.expand(write_experiment(tmp_path, '[{"train.seed": 0}, {"train.seed": 1}]'))
    sweep.save_sweep(root, first)
    grown = sweep.expand(write_experiment(tmp_path, '[{"train.seed": 2}]'))
    record = sweep.save_sweep(root, grown)
    assert [r["run_id"] for r in record["runs"]] == ["seed-2", "seed-0", "seed-1"]
    assert json.loads((root / "sweep.json").read_text())["runs"] == record["runs"]
    other_path = tmp_path / "other"
    other_path.mkdir()
    other = sweep.expand(write_experiment(other_path, '[{"train.seed": 0}]'))
    other = sweep.Sweep("another", other.experiment_file, "smoke", (), other.runs, other.configs)
    with pytest.raises(SweepError, match="holds sweep unit:smoke"):
        sweep.save_sweep(root, other)


def test_slurm_refuses_a_time_limit_its_warning_signal_would_reach_at_start(tmp_path):
    """Slurm signals `signal_delay_s` before the limit but up to 60 s earlier: a job no longer
    than both would be signalled to checkpoint as it starts. Refused before anything is written."""
    from launch.backends import slurm

    expanded = sweep.expand(
        write_experiment(tmp_path, '[{"launch.timeout_min": 2}, {"launch.timeout_min": 1}]')
    )
    root, delay_30 = tmp_path / "root", slurm.SlurmOptions(slurm=(("signal_delay_s", "30"),))
    with pytest.raises(SweepError, match=r"timeout_min-1: launch.timeout_min=1 .* over 90 s"):
        slurm.run_slurm(expanded, root, delay_30)
    assert not root.exists()
    slurm.check_time_limits(expanded.runs[:1], delay_30)  # 120 s > 30 s + 60 s
    with pytest.raises(SweepError, match=r"timeout_min=2 .*signal_delay_s=90 s .* over 150 s"):
        slurm.check_time_limits(expanded.runs[:1], slurm.SlurmOptions())  # submitit's 90 s
    with pytest.raises(SweepError, match="signal_delay_s=1m: expected whole seconds"):
        slurm.SlurmOptions(slurm=(("signal-delay-s", "1m"),))


def test_trainer_command_round_trips_through_config_flags(tmp_path):
    """The command's flags, parsed by ml_collections like the trainer does, give the run's config."""
    spec = write_experiment(
        tmp_path,
        '[{"sparsity.target": 0.75, "sparsity.block": (8, 8), "model.tie_embeddings": True,'
        ' "sparsity.structure": "block", "train.lr": 1e-4}]',
    )
    expanded = sweep.expand(spec)
    run = expanded.runs[0]
    command = sweep.trainer_command(expanded, run, tmp_path / run.run_id, sys.executable)
    probe = textwrap.dedent(
        """
        import json, sys
        from absl import flags
        from ml_collections import config_flags
        cfg = config_flags.DEFINE_config_file("config")
        flags.DEFINE_string("workdir", None, "")
        flags.FLAGS(sys.argv)
        print(json.dumps(cfg.value.to_dict()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *command[3:]],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    parsed = json.loads(out.stdout)
    expected = json.loads(json.dumps(expanded.configs[0].to_dict()))  # tuples -> lists
    expected.update(run_id=run.run_id, experiment="unit")
    assert parsed == expected


def _attempt(**fields):
    return {"n": 1, "backend": "local", "submitted": "t", "started": "t", "ended": None} | fields


def test_run_status_from_files(tmp_path):
    def status_of(attempts, files=(), slurm_alive=frozenset()):
        workdir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        workdir.mkdir()
        run_files.write_json_atomic(workdir / "launch.json", {"attempts": attempts})
        for name, content in files:
            (workdir / name).write_text(content)
        return state.run_status(workdir, slurm_alive=set(slurm_alive))

    host = os.uname().nodename
    me = _attempt(host=host, pid=os.getpid(), pid_start=state.process_start_time(os.getpid()))
    assert status_of([me]).status == state.RUNNING
    # a recycled pid (different start time) or a dead one is not our trainer: interrupted -> pending
    assert status_of([me | {"pid_start": -1}]).status == state.PENDING
    dead = _attempt(host=host, pid=2**22 + 7, pid_start=1)
    assert status_of([dead]).status == state.PENDING
    failed = _attempt(ended="t", outcome="failed", error="boom")
    s = status_of([failed, failed | {"n": 2}])
    assert (s.status, s.failures, s.attempts, s.error) == (state.FAILED, 2, 2, "boom")
    metrics = (
        '{"step": 5, "train/loss": 3.5}\n{"step": 10, "train/loss": 2.5, "eval/loss": 2.6}\n{"st'
    )
    s = status_of([failed], files=[("summary.json", "{}"), ("metrics.jsonl", metrics)])
    assert (s.status, s.step, s.loss) == (state.DONE, 10, 2.5)
    # a Slurm job gone from the queue without closing its attempt was killed: a failure
    gone = _attempt(backend="slurm", slurm_job_id="12_3")
    s = status_of([gone])
    assert (s.status, s.failures) == (state.FAILED, 1) and "12_3" in s.error
    assert status_of([gone], slurm_alive={"12_3"}).status == state.RUNNING
    assert status_of([gone | {"started": None}], slurm_alive={"12_3"}).status == state.QUEUED


def test_select_runs_part_of_a_sweep_and_the_root_keeps_the_rest(tmp_path):
    full = sweep.expand(
        write_experiment(
            tmp_path, 'product({"train.seed": [0, 1, 2], "sparsity.target": [0.5, 0.875]})'
        )
    )
    part = sweep.select(full, ["train.seed=0,2", "sparsity.target=0.875"])
    assert [r.overrides for r in part.runs] == [
        {"train.seed": 0, "sparsity.target": 0.875},
        {"train.seed": 2, "sparsity.target": 0.875},
    ]
    assert [c.train.seed for c in part.configs] == [0, 2]  # configs follow their runs
    root = tmp_path / "root"
    sweep.save_sweep(root, full)
    record = sweep.save_sweep(root, part)  # a partial launch keeps the sweep's other runs
    assert sorted(r["run_id"] for r in record["runs"]) == sorted(r.run_id for r in full.runs)
    for bad, cause in (
        (["seed=0"], "no run overrides seed; the sweep varies"),
        (["train.seed"], "expected KEY=V1"),
        (["train.seed=7"], "no run of the sweep matches"),
    ):
        with pytest.raises(SweepError, match=cause):
            sweep.select(full, bad)


def test_config_flags_set_every_run_and_refuse_what_the_sweep_varies(tmp_path, capsys):
    from launch import __main__ as cli

    spec = write_experiment(tmp_path, 'product({"sparsity.target": [0.5, 0.875]})')
    flags = [
        "--config.data.seq_len=16",
        "--config.data.name=synthetic",
        "--config.model.mlp=swiglu",
    ]
    assert sweep.parse_config_flags(flags) == {
        "data.seq_len": 16,  # a literal where it parses as one
        "data.name": "synthetic",
        "model.mlp": "swiglu",
    }
    plain = sweep.expand(spec)
    flagged = sweep.expand(spec, sweep.parse_config_flags(flags))
    for run, config, base in zip(flagged.runs, flagged.configs, plain.configs, strict=True):
        assert config.data.seq_len == 16 and config.data.name == "synthetic"
        assert config.sparsity.target == base.sparsity.target
        assert run.overrides["data.seq_len"] == 16  # the trainer gets them as its own flags
        assert run.tokens_per_step == 8 * 16
    assert not {r.run_id for r in flagged.runs} & {r.run_id for r in plain.runs}

    root = tmp_path / "root"
    for argv, cause in (
        (["--config.sparsity.target=0.9"], "sets it per run; select runs with --only"),
        (["--config.data.seq_len=sixteen"], "data.seq_len"),  # the field's type
        (["--config.data.nmae=x"], "unknown field 'nmae'"),
    ):
        assert cli.main(["run", spec, "--root", str(root), "--dry-run", *argv]) == 2
        err = capsys.readouterr().err
        assert cause in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:  # not a config flag: argparse's one line
        cli.main(["status", str(root), "--config.data.seq_len=16"])
    assert exit_info.value.code == 2
    assert not root.exists()  # nothing written before the inputs were checked
    assert cli.main(["run", spec, "--root", str(root), "--dry-run", *flags]) == 0
    assert "seq_len-16" in capsys.readouterr().out


def test_preempted_attempt_is_resumed_not_failed_and_requeue_is_one_edit(tmp_path):
    from sparsescale import preemption

    n = state.begin_attempt(tmp_path, "slurm", slurm_job_id="7")
    (tmp_path / "stderr.log").write_text(
        "W1203 main.py:92] Preempted: stopped by SIGUSR2 after step 40; checkpoint saved.\n"
    )
    closed = state.finish_attempt(tmp_path, n, preemption.PREEMPTED_EXIT, since=0.0)
    assert closed["outcome"] == "preempted"
    assert closed["error"] == "preempted: stopped by SIGUSR2 after step 40; checkpoint saved."
    s = state.run_status(tmp_path)
    assert (s.status, s.failures) == ("pending", 0)  # resumable, no try spent
    n = state.begin_attempt(tmp_path, "slurm", slurm_job_id="8")
    m = state.requeue_attempt(tmp_path, n, 75, "preempted: x", slurm_job_id="8")
    tries = state.read_launch_state(tmp_path)[0]["attempts"]
    assert m == 3 and [a.get("outcome") for a in tries] == ["preempted", "preempted", None]
    assert tries[2]["slurm_job_id"] == "8" and state.attempt_open(tmp_path, m)
    state.drop_attempt(tmp_path, m)
    assert len(state.read_launch_state(tmp_path)[0]["attempts"]) == 2
    fresh = tmp_path / "fresh"
    state.drop_attempt(fresh, state.begin_attempt(fresh, "slurm"))
    assert not fresh.exists()  # a run whose only submission failed keeps no record


@pytest.mark.parametrize(("exit_code", "outcome"), [(0, state.DONE), (3, state.FAILED)])
def test_a_slurm_signal_after_the_trainer_exited_still_closes_its_attempt(
    tmp_path, exit_code, outcome
):
    """The time-limit signal lands after the trainer exited but before the job recorded it:
    submitit ends the job from `checkpoint` (no requeue), so `checkpoint` closes the attempt;
    called again (the signal after `__call__` recorded it), it changes nothing."""
    from launch.backends import slurm

    workdir = tmp_path / "run"
    n = state.begin_attempt(workdir, "slurm", slurm_job_id="9")
    if exit_code == 0:
        run_files.write_json_atomic(workdir / run_files.SUMMARY, {"eval_loss": 1.0})
    job = slurm.SlurmJob()
    job._process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({exit_code})"])
    job._process.wait()
    for _ in range(2):
        assert job.checkpoint(str(tmp_path), "run", n, [], 1) is None  # not requeued
        (attempt,) = run_files.read_json(workdir / "launch.json")["attempts"]
        assert (attempt["outcome"], attempt["exit_code"]) == (outcome, exit_code)
        ended = attempt["ended"]
    assert ended is not None


def test_finish_attempt_reads_trainer_failure(tmp_path):
    n = state.begin_attempt(tmp_path, "local")
    (tmp_path / "failed.json").write_text('{"error": "non-finite loss nan at step 3", "step": 0}')
    closed = state.finish_attempt(tmp_path, n, 1, since=0.0)
    assert closed["outcome"] == "failed" and closed["error"] == "non-finite loss nan at step 3"
    (tmp_path / "stderr.log").write_text(
        "noise\nTraceback (most recent call last):\nValueError: bad\n"
    )
    n = state.begin_attempt(tmp_path, "local")
    closed = state.finish_attempt(tmp_path, n, 3, since=1e12)  # failed.json is older: not this one
    assert closed["error"] == "exit code 3: ValueError: bad"
    n = state.begin_attempt(tmp_path, "local")
    assert state.finish_attempt(tmp_path, n, 0, since=1e12)["error"].startswith("trainer exited 0")


def _fake_sweep_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    runs = [
        {"run_id": f"r{i}", "overrides": {}, "steps": 100, "tokens_per_step": 50} for i in range(3)
    ]
    run_files.write_json_atomic(root / "sweep.json", {"experiment": "e", "arg": "a", "runs": runs})
    for i, loss in enumerate([2.0, 3.0]):
        (root / f"r{i}").mkdir(parents=True, exist_ok=True)
        summary = {"run_id": f"r{i}", "experiment": "e", "eval_loss": loss, "sparsity": 0.5 * i}
        summary["my_extra"] = i
        run_files.write_json_atomic(root / f"r{i}" / "summary.json", summary)
    (root / "r2").mkdir()
    me = _attempt(host=os.uname().nodename, pid=os.getpid())
    me["pid_start"] = state.process_start_time(os.getpid())
    run_files.write_json_atomic(root / "r2" / "launch.json", {"attempts": [me]})
    line = {"step": 40, "train/loss": 4.25, "perf/tokens_per_s": 100.0}
    (root / "r2" / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return root


def test_status_table_and_eta(tmp_path):
    root = _fake_sweep_root(tmp_path)
    text = status.status_text(root)
    lines = text.splitlines()
    assert lines[0].split() == ["run", "status", "step", "loss", "try", "eta", "error"]
    assert lines[1].split()[:4] == ["r0", "done", "-", "eval"]  # a done run shows its eval loss
    # r2: 60 steps left × 50 tokens / 100 tokens/s = 30 s; no eval yet: the train loss, labelled
    assert lines[3].split() == ["r2", "running", "40/100", "train", "4.25", "1", "0m30s"]
    assert lines[-2] == "e:a  done 2  running 1  queued 0  failed 0  pending 0  (of 3)"
    assert lines[-1].startswith("sweep eta 0m30s (1 runs at a time")


def _live_attempt():
    me = _attempt(host=os.uname().nodename, pid=os.getpid())
    return me | {"pid_start": state.process_start_time(os.getpid())}


def test_sweep_eta_and_compact_view(tmp_path):
    """Five runs of two models: the whole sweep's ETA from measured rates (running runs' tokens/s,
    a finished run's tokens over wall time) and, for the model nobody measured yet, its
    calibrated rate scaled by how the measured model compares with its own calibration."""
    root = tmp_path / "root"
    models = ["m1", "m1", "m1", "m1", "m2"]
    runs = [
        {"run_id": f"name-{m}_target-0.{i}", "model": m, "steps": 100, "tokens_per_step": 50,
         "overrides": {"model.name": m, "sparsity.target": float(f"0.{i}")}}
        for i, m in enumerate(models)
    ]  # fmt: skip
    root.mkdir()
    run_files.write_json_atomic(root / "sweep.json", {"experiment": "e", "arg": None, "runs": runs})
    ids = [r["run_id"] for r in runs]
    for run_id in ids:
        (root / run_id).mkdir()
    summary = {"train_loss": 2.5, "eval_loss": 2.625, "tokens": 5000, "wall_time_s": 100.0}
    run_files.write_json_atomic(root / ids[0] / "summary.json", summary)  # 50 tokens/s
    for run_id, line in [
        (ids[1], {"step": 40, "train/loss": 3.5, "eval/loss": 3.125, "perf/tokens_per_s": 100.0}),
        (ids[2], {"step": 80, "train/loss": 3.25, "perf/tokens_per_s": 100.0}),
    ]:
        run_files.write_json_atomic(root / run_id / "launch.json", {"attempts": [_live_attempt()]})
        (root / run_id / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    calibration = {"m1": {"tokens_per_s": 200.0}, "m2": {"tokens_per_s": 20.0}}
    run_files.write_json_atomic(root / "calibration.json", calibration)
    assert status.CALIBRATION_FILE == cost.CALIBRATION_FILE

    eta = status.sweep_eta(run_files.read_json(root / "sweep.json"), status.sweep_statuses(root),
                           calibration)  # fmt: skip
    # running: 30 s + 10 s; pending m1 at the measured median 100 tokens/s: 50 s; pending m2 at
    # its calibration × (100 / 200): 10 tokens/s: 500 s; shared by the 2 runs training now
    assert eta.lanes == 2 and eta.unknown == 0
    assert eta.seconds == pytest.approx((30 + 10 + 50 + 500) / 2)
    assert eta.text() == "sweep eta 4m55s (2 runs at a time; measured rates and calibration × 0.5)"

    full = status.status_text(root).splitlines()
    assert len(full) == 1 + 5 + 2 and full[-1] == eta.text()
    assert full[2].split()[3:5] == ["eval", "3.125"] and full[3].split()[3:5] == ["train", "3.25"]

    compact = status.status_text(root, compact=True, width=60, height=7).splitlines()
    assert compact[0].split()[:3] == ["name", "target", "status"]  # what the labels hold
    assert [ln.split()[:3] for ln in compact[1:3]] == [["m1", "0.1", "running"],
                                                       ["m1", "0.2", "running"]]  # fmt: skip
    assert compact[3] == "… not shown: 1 done, 2 pending"
    assert compact[4].startswith("e  done 1  running 2") and compact[5] == eta.text()
    assert all(len(ln) <= 60 for ln in compact[:4])

    # nothing running (launcher stopped): the work left, one run at a time; a model without any
    # rate is named as not counted
    for run_id in ids[1:3]:
        (root / run_id / "launch.json").unlink()
    no_cal = status.sweep_eta(run_files.read_json(root / "sweep.json"), status.sweep_statuses(root))
    assert no_cal.lanes is None and no_cal.unknown == 1
    assert no_cal.text().startswith("sweep eta ") and "not running" in no_cal.text()
    assert "1 runs without a rate not counted" in no_cal.text()
    # no rate for any run yet (a fresh sweep): unknown, not "0m00s"
    fresh = status.SweepEta(seconds=0.0, lanes=2, unknown=90, source="measured rates")
    assert fresh.text().startswith("sweep eta unknown until a run reports its speed")


def test_eta_counts_a_stacked_jobs_lane_and_only_the_selected_runs():
    """A run that finished in a stack of 4 reports the job's wall time: its lane moved 4 runs'
    tokens (5000 × 4 / 100 s = 200 tokens/s), so a pending run of 5000 tokens takes 25 s. A
    launcher training part of the sweep (--only) counts only its own runs."""

    def run_status(run_id, status, **kw):
        fields = dict(attempts=1, failures=0, step=None, loss=None, tokens_per_s=None, error=None,
                      open_attempt=None, active=False)  # fmt: skip
        return state.RunStatus(run_id=run_id, status=status, **{**fields, **kw})

    record = {"experiment": "e", "arg": None, "runs": [
        {"run_id": r, "model": "m", "steps": 100, "tokens_per_step": 50} for r in "abc"
    ]}  # fmt: skip
    statuses = [
        run_status("a", state.DONE, tokens=5000, wall_time_s=100.0, stacked=4),
        run_status("b", state.PENDING),
        run_status("c", state.PENDING),
    ]
    assert status.sweep_eta(record, statuses).seconds == pytest.approx(50.0)
    assert status.sweep_eta(record, statuses[:2]).seconds == pytest.approx(25.0)
    text = status.format_table(record, statuses, selected={"a", "b"})
    assert text.splitlines()[-1].startswith("eta of this launch 0m25s")
    assert status.format_table(record, statuses).splitlines()[-1].startswith("sweep eta 0m50s")
    # a model nobody measured or calibrated: its steps' FLOPs at the measured FLOP rate (m: 200
    # tokens/s = 4 steps/s of 1000 FLOPs; big: 100 steps of 2000 FLOPs at 4000 FLOP/s = 50 s)
    for run in record["runs"]:
        run["step_flops"] = 1000.0
    record["runs"].append({"run_id": "d", "model": "big", "steps": 100, "tokens_per_step": 50,
                           "step_flops": 2000.0})  # fmt: skip
    eta = status.sweep_eta(record, [*statuses, run_status("d", state.PENDING)])
    assert eta.seconds == pytest.approx(100.0) and eta.unknown == 0
    assert eta.source == "measured rates and FLOPs at the measured FLOP rate"


def test_collect_writes_finished_runs(tmp_path):
    root = _fake_sweep_root(tmp_path)
    frame = collect.collect(root)
    csv = pd.read_csv(root / "results.csv")
    parquet = pd.read_parquet(root / "results.parquet")
    assert list(csv.columns) == [*collect.COLUMNS, "my_extra"]
    assert csv["run_id"].tolist() == ["r0", "r1"] == parquet["run_id"].tolist()
    assert csv["eval_loss"].tolist() == [2.0, 3.0] and csv["sparsity"].tolist() == [0.0, 0.5]
    assert (csv["status"] == "done").all() and len(frame) == 2
    everything = collect.collect(root, include_unfinished=True)
    assert everything["status"].tolist() == ["done", "done", "running"]
    assert not list(root.glob(".*.tmp"))


def test_dry_run_times_the_planned_jobs_from_the_calibration(tmp_path):
    spec = write_experiment(
        tmp_path, 'product({"sparsity.target": [0.5, 0.75], "train.seed": [0, 1]})'
    )
    expanded = sweep.expand(spec)
    root = tmp_path / "root"
    root.mkdir()
    costs = {c.sparsity.target: cost.estimate_cost(c) for c in expanded.configs}
    assert costs[0.75]["n_params_nonzero"] < costs[0.5]["n_params_nonzero"]
    assert costs[0.75]["dense_train_flops"] == costs[0.5]["dense_train_flops"]
    assert costs[0.5]["dense_train_flops"] > costs[0.5]["train_flops"]
    text = cost.dry_run_table(expanded, root, jobs=1, max_stack=4)
    assert "no calibration for ['cpu_25k']" in text and not (root / "sweep.json").exists()

    # One job of 4 stacked runs (2 seeds): 10 steps, pruning from step 2, a checkpoint every 5.
    # Hand-worked: 10 s start-up + 2 prefix steps at K=2 (2 s) + 8 steps at K=4 (4 s) + 4 runs ×
    # 2 checkpoints × 0.5 s = 50 s; without the shared prefix, 10 + 10 × 4 + 4 = 54 s.
    measured = {"step_s": {"1": 1.0, "4": 4.0}, "startup_s": 10.0, "save_s": 0.5,
                "batch_size": 8, "seq_len": 32}  # fmt: skip
    run_files.write_json_atomic(root / "calibration.json", {"cpu_25k": measured})
    lines = cost.dry_run_table(expanded, root, jobs=1, max_stack=4).splitlines()
    assert lines[1].split()[-1] == "12s"  # each run's share of its job: 50 / 4
    assert lines[-2].startswith("4 runs in 1 jobs (1 stacked)")
    assert lines[-1] == (
        "predicted wall time from scratch: 50s on 1 jobs × 1 threads (50s of job time; training "
        "each shared prefix once saves 4s)"
    )
    assert cost.predict_wall([5.0, 3.0, 3.0, 1.0], workers=2) == 6.0  # jobs start in order

    # measured on another device: not used, and the table says where it was measured
    assert cost.host_device().startswith(("CPU: ", "GPU: "))
    here = {"cpu_25k": {**measured, "host": cost.host_device()}}
    run_files.write_json_atomic(root / "calibration.json", here)
    assert cost.dry_run_table(expanded, root, jobs=1, max_stack=4).splitlines()[-1] == lines[-1]
    assert status.read_calibration(root) == here
    elsewhere = {"cpu_25k": {**measured, "host": "GPU: NVIDIA H200 × 8"}}
    run_files.write_json_atomic(root / "calibration.json", elsewhere)
    last = cost.dry_run_table(expanded, root, jobs=1, max_stack=4).splitlines()[-1]
    assert last.startswith("no calibration for ['cpu_25k']")
    assert "(measured on: {'cpu_25k': 'GPU: NVIDIA H200 × 8'})" in last
    assert status.read_calibration(root) == {}


def test_calibrate_times_the_planned_stack_and_its_prefix(tmp_path):
    spec = write_experiment(tmp_path, 'product({"sparsity.target": [0.0, 0.5, 0.75]})')
    expanded = sweep.expand(spec)
    root = tmp_path / "root"
    calibration = cost.calibrate(expanded, root, threads=1, jobs=1, max_stack=3)
    measured = calibration["cpu_25k"]
    assert sorted(measured["step_s"], key=int) == ["1", "3"]  # one seed: a prefix of 1, then 3
    assert 0 < measured["step_s"]["1"] < measured["step_s"]["3"]
    assert measured["startup_s"] > 0 and measured["save_s"] > 0
    assert run_files.load_json(root / "calibration.json") == calibration
    assert measured["host"] == cost.host_device() and measured["device"].startswith("cpu: ")
    last = cost.dry_run_table(expanded, root, jobs=1, max_stack=3).splitlines()[-1]
    assert last.startswith("predicted wall time from scratch:")
