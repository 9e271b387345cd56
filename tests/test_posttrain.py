"""The post-training regime (sparsescale/posttrain.py) on a finished dense smoke run: the restored
dense model reproduces the run's eval loss, every pruned model is as sparse as asked and is
evaluated on the same windows, and calibration uses windows the run never read."""

import numpy as np
import pytest

from sparsescale import config as config_lib
from sparsescale import data as data_lib
from sparsescale import posttrain, train


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    from conftest import make_smoke_config

    overrides = {"sparsity.structure": "dense", "sparsity.target": 0.0, "run_id": "dense"}
    cfg = config_lib.run_config(make_smoke_config(**overrides))
    workdir = tmp_path_factory.mktemp("posttrain") / "dense"
    return cfg, workdir, train.run(cfg, workdir)


def test_pruned_models_are_evaluated_against_their_own_dense_model(dense_run):
    cfg, workdir, summary = dense_run
    post = posttrain.PostTrainConfig(
        methods=("magnitude", "sparsegpt"), structures=("unstructured_0.75", "nm_2:4"),
        calibration_sequences=64,
    )  # fmt: skip
    rows = posttrain.evaluate(cfg, workdir, post)
    assert [(r["method"], r["structure"]) for r in rows] == [
        ("dense", "dense"),
        ("magnitude", "unstructured_0.75"),
        ("sparsegpt", "unstructured_0.75"),
        ("magnitude", "nm_2:4"),
        ("sparsegpt", "nm_2:4"),
    ]
    dense = rows[0]
    assert dense["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    for r in rows[1:]:
        assert r["sparsity"] == pytest.approx(0.75 if "0.75" in r["structure"] else 0.5)
        assert r["gap"] == pytest.approx(r["eval_loss"] - dense["eval_loss"])
        assert np.isfinite(r["eval_loss"]) and r["calibration_tokens"] == 64 * cfg.data.seq_len
    assert rows[0]["calibration_unseen"]


def test_calibration_windows_follow_the_runs_own_order(dense_run):
    cfg, _, _ = dense_run
    batches, unseen = posttrain.calibration_windows(cfg, 2 * cfg.data.batch_size)
    stream = data_lib.train_iterator(cfg.data)
    read = np.concatenate([next(stream) for _ in range(cfg.train.steps)])
    following = np.concatenate([next(stream) for _ in range(2)])  # the next batches of epoch 0
    assert unseen
    np.testing.assert_array_equal(np.concatenate(batches), following)
    assert not {w.tobytes() for w in np.concatenate(batches)} & {w.tobytes() for w in read}


def test_bad_inputs_are_named(dense_run, tmp_path):
    cfg, workdir, _ = dense_run
    with pytest.raises(ValueError, match="unknown structures"):
        posttrain.PostTrainConfig(structures=("nm_1:3",))
    sparse = config_lib.run_config(__import__("conftest").make_smoke_config())
    with pytest.raises(ValueError, match="starts from a dense run"):
        posttrain.evaluate(sparse, workdir)


def test_launch_posttrain_prunes_each_finished_dense_run_once(tmp_path):
    import json

    import pandas as pd

    from launch import __main__ as launch_cli

    spec = "experiments/crossover.py:main_smoke"
    assert launch_cli.main(["run", spec, "--root", str(tmp_path), "--jobs", "1"]) == 0
    post = ["--methods", "magnitude", "wanda", "--structures", "nm_2:4"]
    assert launch_cli.main(["posttrain", spec, "--root", str(tmp_path), *post]) == 0
    table = pd.read_csv(tmp_path / "posttrain.csv")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    dense = {k: v for k, v in summaries.items() if v["structure"] == "dense"}
    assert set(table["run_id"]) == set(dense) and len(dense) == 4  # sparse runs are skipped
    for run_id, rows in table.groupby("run_id"):
        assert list(rows["method"]) == ["dense", "magnitude", "wanda"]
        assert rows["code_version"].nunique() == 1 and rows["code_version"].iloc[0]
        base = rows[rows["method"] == "dense"]["eval_loss"].item()
        assert base == pytest.approx(dense[run_id]["eval_loss"], rel=1e-5)
    # a second pass finds every dense run done and leaves the table as it was
    before = (tmp_path / "posttrain.csv").read_bytes()
    assert launch_cli.main(["posttrain", spec, "--root", str(tmp_path), *post]) == 0
    assert (tmp_path / "posttrain.csv").read_bytes() == before
    bad = ["posttrain", spec, "--root", str(tmp_path), "--structures", "nm_1:3"]
    assert launch_cli.main(bad) == 2  # a one-line error naming the structure
