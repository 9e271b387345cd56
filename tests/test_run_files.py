"""The run directory contract (sparsescale/run_files.py) and its readers agreeing on it."""

import json

import pytest

from sparsescale import run_files as rf


def test_atomic_json_and_damaged_files_name_the_file(tmp_path):
    rf.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert rf.load_json(tmp_path / "a.json") == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "b.json").write_text('{"x": ')
    with pytest.raises(rf.RunFileError, match=r"b\.json: not valid JSON"):
        rf.load_json(tmp_path / "b.json")
    assert rf.read_json(tmp_path / "b.json") is None
    assert rf.read_json(tmp_path / "missing.json") is None


def test_metrics_reader_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / rf.METRICS
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tr')
    assert rf.read_metrics(path) == rows
    rf.truncate_metrics(path, 2)
    assert rf.read_metrics(path) == rows[:2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(rf.RunFileError, match="line 2"):
        rf.read_metrics(path)
    assert rf.read_metrics(tmp_path / "none.jsonl") == []


def test_file_lock_is_exclusive(tmp_path):
    with rf.file_lock(tmp_path / rf.LOCK) as first:
        with rf.file_lock(tmp_path / rf.LOCK, blocking=False) as second:
            assert first and not second
    with rf.file_lock(tmp_path / rf.LOCK, blocking=False) as again:
        assert again


def test_summary_writer_enforces_the_columns(tmp_path):
    row = dict.fromkeys(rf.SUMMARY_COLUMNS, 0)
    row.update(eval_loss=1.5, train_loss=1.6)
    assert list(rf.write_summary(tmp_path, row)) == list(rf.SUMMARY_COLUMNS)
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        rf.write_summary(tmp_path, {**row, "extra": 1})
    with pytest.raises(ValueError, match="not finite"):
        rf.write_summary(tmp_path, {**row, "train_loss": float("nan")})


@pytest.mark.slow
def test_trained_summary_collect_and_analysis_agree_on_columns(tmp_path, smoke_config):
    """One contract: what the trainer writes is what `launch collect` and `analysis.load` read."""
    from analysis import load
    from launch import collect
    from sparsescale import config as config_lib
    from sparsescale import train

    root = tmp_path / "root"
    runs = []
    for i, target in enumerate((0.0, 0.5)):
        structure = "dense" if target == 0 else "unstructured"
        over = {"sparsity.structure": structure, "sparsity.target": target, "run_id": f"r{i}"}
        train.run(config_lib.run_config(smoke_config(**over)), root / f"r{i}")
        runs.append({"run_id": f"r{i}", "overrides": {}, "steps": 10, "tokens_per_step": 256})
    rf.write_json_atomic(root / "sweep.json", {"experiment": "train", "arg": "smoke", "runs": runs})
    summary = rf.load_json(root / "r1" / rf.SUMMARY)
    assert tuple(summary) == rf.SUMMARY_COLUMNS
    table = collect.collect(root)
    assert tuple(table.columns[: len(rf.SUMMARY_COLUMNS)]) == rf.SUMMARY_COLUMNS
    loaded = load.load_results(root / "results.csv")
    assert set(rf.SUMMARY_COLUMNS) <= set(loaded.columns)
    assert loaded.set_index("run_id").loc["r1", "eval_loss"] == pytest.approx(summary["eval_loss"])
