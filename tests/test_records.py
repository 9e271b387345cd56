"""Committed run records (launch/records.py): round trip, and a sweep that skips recorded runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from launch import records, state, sweep
from sparsescale import config as config_lib
from sparsescale import provenance, run_files

SWEEP = [{"sparsity.target": 0.5}, {"sparsity.target": 0.75}, {"sparsity.target": 0.875}]


def _summary(run_id: str, config_hash: str) -> dict:
    row = dict.fromkeys(run_files.SUMMARY_COLUMNS)
    return {
        **row,
        "run_id": run_id,
        "config_hash": config_hash,
        "eval_loss": 2.5,
        "train_loss": 2.4,
    }


def _sweep(experiment_file, tmp_path) -> tuple[sweep.Sweep, str]:
    exp = experiment_file(tmp_path, SWEEP, steps=4, log_every=2, ckpt_every=4)
    return sweep.expand(f"{exp}:smoke"), str(exp)


def test_record_round_trip_thins_the_curve(tmp_path, experiment_file):
    root = tmp_path / "root"
    sweep.save_sweep(root, _sweep(experiment_file, tmp_path)[0])
    a = "target-0.5"
    workdir = root / a
    workdir.mkdir(parents=True)
    run_files.write_json_atomic(workdir / run_files.SUMMARY, _summary(a, "abc"))
    lines = [{"step": s, "train/loss": 5 - s / 1000} for s in range(10, 1010, 10)]  # 100 rows
    lines[-1]["eval/loss"] = 4.0
    (workdir / run_files.METRICS).write_text("".join(json.dumps(m) + "\n" for m in lines))

    (path,) = records.write_records(root, tmp_path / "records")  # the others have no summary
    record = run_files.load_json(path)
    assert path.name == f"{a}.json" and record["summary"] == _summary(a, "abc")
    assert record["config_hash"] == "abc"
    assert record["code_version"] == state.code_version() != "unknown"  # no launch record: ours

    # The version is the one that trained the run: the attempt that finished it names it.
    n = state.begin_attempt(workdir, "local", code_version="1234abc")
    state.finish_attempt(workdir, n, 0, since=0.0)
    (path,) = records.write_records(root, tmp_path / "records")
    assert run_files.load_json(path)["code_version"] == "1234abc"
    record = run_files.load_json(path)
    curve = record["curve"]
    assert len(curve) == records.CURVE_POINTS
    assert curve[0] == {"step": 10, "train_loss": 4.99, "eval_loss": None}
    assert curve[-1] == {"step": 1000, "train_loss": 4.0, "eval_loss": 4.0}
    assert len(path.read_bytes()) < 8000  # compact
    table = records.results_frame(tmp_path / "records")
    assert list(table["run_id"]) == [a] and list(table["status"]) == ["done"]
    assert state.code_version.__wrapped__(tmp_path) == "unknown"  # not a git repository


def test_code_version_outside_git_comes_from_the_environment(tmp_path, monkeypatch):
    # A copy of the tree without its history (a lent device machine) is told its version.
    monkeypatch.setenv(provenance.ENV, "copied-tree-v1")
    assert provenance.code_version.__wrapped__(tmp_path) == "copied-tree-v1"
    # Inside a checkout git decides, whatever the environment says.
    assert provenance.code_version.__wrapped__(provenance.REPO) == provenance.code_version()
    assert provenance.code_version() != "copied-tree-v1"


def test_sweep_trains_only_runs_without_a_matching_record(tmp_path, experiment_file):
    expanded, exp = _sweep(experiment_file, tmp_path)
    ids = [r.run_id for r in expanded.runs]
    hashes = [config_lib.run_config(c).hash() for c in expanded.configs]
    recs, root = tmp_path / "records", tmp_path / "root"
    recs.mkdir()
    matching = {"summary": _summary(ids[0], hashes[0]), "curve": [], "config_hash": hashes[0]}
    stale = {"summary": _summary(ids[1], "0" * 16), "curve": [], "config_hash": "0" * 16}
    run_files.write_json_atomic(recs / f"{ids[0]}.json", {**matching, "code_version": "v1"})
    run_files.write_json_atomic(recs / f"{ids[1]}.json", {**stale, "code_version": "v0"})

    warnings = io.StringIO()
    assert records.materialise(expanded, tmp_path / "probe", recs, warnings) == [ids[0]]
    assert f"{recs / ids[1]}.json is for config_hash {'0' * 16}" in warnings.getvalue()

    result = subprocess.run(
        [sys.executable, "-m", "launch", "run", f"{exp}:smoke", "--root", str(root)]
        + ["--records", str(recs), "--jobs", "1", "--stack", "2"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ignored, the run trains" in result.stderr
    assert f"{ids[0]}: done, from its record" in result.stdout
    assert run_files.load_json(root / ids[0] / run_files.SUMMARY) == matching["summary"]
    assert (root / ids[0] / run_files.FROM_RECORD).exists()
    assert not (root / ids[0] / run_files.LAUNCH).exists()  # never started
    for run_id in ids[1:]:  # the stale record's run and the unrecorded one trained
        assert run_files.load_json(root / run_id / run_files.SUMMARY)["eval_loss"] != 2.5
        assert (root / run_id / run_files.METRICS).exists()
