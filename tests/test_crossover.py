"""The crossover experiment's design (matched steps, ≈21 tokens per parameter, one shape rule, an
LR grid per size) and the learning-rate analysis on synthetic sweeps with a known optimum."""

import sys

import numpy as np
import pandas as pd
import pytest

from analysis import lr_tuning
from analysis.load import SIZE
from experiments import crossover
from sparsescale import accounting
from sparsescale import model as model_lib


def _non_embedding(size: str) -> int:
    return accounting.param_counts(model_lib.preset(size))["non_embedding"]


def test_every_size_follows_the_one_shape_rule():
    sizes = [_non_embedding(s) for s in crossover.SIZES]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] > 250
    assert 7e5 < _non_embedding("cpu_800k") < 9e5 and 1.5e6 < _non_embedding("cpu_1.8m") < 2.1e6
    for size in crossover.SIZES:
        cfg = model_lib.preset(size)
        rule = crossover.shape_rule(cfg.d_model)
        assert (cfg.d_ff, cfg.n_layers) == (rule["d_ff"], rule["n_layers"]), size


def test_lr_grid_is_step_matched_at_21_tokens_per_parameter():
    runs = crossover.get_sweep("lr")
    config = crossover.get_config("lr")
    assert {r["model.name"] for r in runs} == set(crossover.SIZES[:6])
    assert config.train.steps == crossover.STEPS  # one step count for every run
    for r in runs:
        tokens = crossover.STEPS * r["data.batch_size"] * config.data.seq_len
        per_param = tokens / _non_embedding(r["model.name"])
        # integer batches: 1 and 3 sequences give 17.5 (6K) and 23.4 (12K); 20.9–22.0 elsewhere
        assert 17 <= per_param <= 24 and (per_param <= 22 or r["model.name"] == "cpu_12k")
        assert r["sparsity.structure"] == "dense" and r["train.seed"] == r["data.seed"] == 0
        assert r["train.eval_batches"] * r["data.batch_size"] == pytest.approx(256, rel=0.2)
    for size, lrs in crossover.LR_GRID.items():
        ratios = np.diff(np.log2(sorted(lrs)))
        assert len(lrs) >= 5 and np.allclose(ratios, 1.0), size  # factor-2 steps
    # the measured optima before this sweep lie strictly inside each grid (14K: > 2.4e-2)
    assert min(crossover.LR_GRID["cpu_100k"]) < 1.2e-2 < max(crossover.LR_GRID["cpu_100k"])
    assert max(crossover.LR_GRID["cpu_12k"]) > 2 * 2.4e-2
    assert min(crossover.LR_GRID["cpu_330k"]) < 6e-3 and max(crossover.LR_GRID["cpu_330k"]) > 2.4e-2


def synthetic(lr_star_of, sizes, grid, curvature=0.05, seeds=(0,)):
    """Loss = base(N) + curvature·(log2 lr − log2 lr*(N))²: a known optimum per size."""
    rows = []
    for n in sizes:
        for seed in seeds:
            for lr in grid:
                loss = (
                    3.0
                    - 0.2 * np.log10(n)
                    + curvature * (np.log2(lr) - np.log2(lr_star_of(n))) ** 2
                )
                rows.append(
                    {SIZE: n, "model": f"m{n}", "seed": seed, "lr": lr, "eval_loss": loss,
                     "batch_size": 4, "steps": 850, "sparsity": 0.0}
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_optima_recover_a_known_parabola_and_flag_the_grid_edges():
    grid = [3e-3 * 2**i for i in range(6)]
    star = {1e4: 2.1e-2, 1e5: 1.3e-2, 1e6: 2.9e-3}  # the last lies below the grid
    table = lr_tuning.optima(synthetic(star.get, list(star), grid)).set_index(SIZE)
    for n in (1e4, 1e5):
        assert table.loc[n, "status"] == "interior"
        assert table.loc[n, "lr_star"] == pytest.approx(star[n], rel=1e-9)
    assert table.loc[1e6, "status"] == "below" and np.isnan(table.loc[1e6, "lr_star"])
    assert table.loc[1e6, "best_lr"] == grid[0]


def test_trend_recovers_a_power_law_and_labels_extrapolation():
    grid = [1e-3 * 2**i for i in range(9)]
    sizes = [6e3, 2.5e4, 1e5, 3.3e5]
    lr_star = lambda n: 0.5 * n**-0.35
    fit = lr_tuning.trend(lr_tuning.optima(synthetic(lr_star, sizes, grid)))
    assert fit["identified"] and fit["slope"] == pytest.approx(-0.35, abs=1e-6)
    assert fit["slope_lo"] - 1e-9 <= -0.35 <= fit["slope_hi"] + 1e-9  # exact data: a point
    assert all(s["slope"] == pytest.approx(-0.35, abs=1e-6) for s in fit["local_slopes"])
    inside, outside = lr_tuning.predict(fit, 5e4), lr_tuning.predict(fit, 1.8e6)
    assert inside["lr"] == pytest.approx(lr_star(5e4)) and not inside["extrapolated"]
    assert outside["lr"] == pytest.approx(lr_star(1.8e6)) and outside["extrapolated"]


def test_a_trend_from_two_sizes_is_refused(tmp_path):
    grid = [3e-3 * 2**i for i in range(5)]
    results = synthetic(lambda n: 1.2e-2, [1e4, 1e5], grid)
    fit = lr_tuning.trend(lr_tuning.optima(results))
    assert not fit["identified"] and "needs 3" in fit["issue"]
    with pytest.raises(ValueError, match="not identified"):
        lr_tuning.predict(fit, 1e6)
    report = lr_tuning.write_report(results, tmp_path, "t")
    assert "Not fitted" in report.read_text() and (tmp_path / "figures" / "lr.png").exists()


def test_main_sweep_is_step_matched_paired_and_evaluates_one_window_set():
    runs = crossover.get_sweep("main")
    config = crossover.get_config("main")
    assert config.train.steps == crossover.STEPS
    cells = {}
    for r in runs:
        cells.setdefault((r["model.name"], r["train.seed"]), []).append(r)
        assert r["train.lr"] == crossover.LR_TUNED[r["model.name"]]  # one LR per size
        assert r["data.eval_batch_size"] * r["train.eval_batches"] == 256  # same windows
        assert r["train.seed"] == r["data.seed"] == r["sparsity.seed"]
    for (size, _), variants in cells.items():
        levels = sorted(r["sparsity.target"] for r in variants)
        expected = crossover.ALL_LEVELS if _non_embedding(size) < 4e5 else crossover.LARGE_LEVELS
        assert levels == sorted(expected), size  # dense (target 0) and every level, per seed
        assert len({r["data.batch_size"] for r in variants}) == 1
    assert {seed for _, seed in cells} == {0, 1, 2} and len(runs) == 6 * 8 * 3 + 2 * 5 * 3
    # the arms hold exactly the runs of main (so their records are main's records)
    arms = [r for a in crossover.ARMS for r in crossover.get_sweep(a)]
    key = lambda r: sorted(r.items())  # noqa: E731
    assert sorted(map(key, arms)) == sorted(map(key, runs))
    assert crossover.get_config("main_800k") == config


def test_lr_sparse_brackets_the_tuned_lr_of_main():
    runs = crossover.get_sweep("lr_sparse")
    tuned = crossover.LR_TUNED["cpu_100k"]
    assert sorted(r["train.lr"] for r in runs) == pytest.approx([tuned / 2, tuned * 2])
    assert {(r["model.name"], r["sparsity.target"], r["train.seed"]) for r in runs} == {
        ("cpu_100k", 0.875, 0)
    }


def test_accelerator_arm_is_the_same_design_to_20m():
    """The `acc` preset: the matched design (850 steps, ≈21 tokens per parameter, the shape rule)
    from the largest CPU size to ≥ 20M, dense paired with 87.5% at every size, bf16 compute."""
    runs = crossover.get_sweep("acc")
    config = crossover.get_config("acc")
    assert config.model.dtype == "bfloat16" and config.train.steps == crossover.STEPS
    sizes = [_non_embedding(s) for s in crossover.ACC_SIZES]
    assert (
        sizes == sorted(sizes) and sizes[-1] >= 1.9e7 and crossover.ACC_SIZES[0] in crossover.SIZES
    )
    for size in crossover.ACC_SIZES:
        cfg = model_lib.preset(size)
        rule = crossover.shape_rule(cfg.d_model)
        assert (cfg.d_ff, cfg.n_layers) == (rule["d_ff"], rule["n_layers"]), size
        mine = [r for r in runs if r["model.name"] == size]
        assert sorted(r["sparsity.target"] for r in mine) == [0.0, 0.875]
        for r in mine:
            per_param = crossover.STEPS * r["data.batch_size"] * config.data.seq_len
            assert per_param / _non_embedding(size) == pytest.approx(21, rel=0.01)
            assert r["tag"] == "acc" and r["train.seed"] == 0
            assert r["train.lr"] == crossover.ACC_LR[size]
    assert crossover.ACC_LR["cpu_1.8m"] == crossover.LR_TUNED["cpu_1.8m"]


@pytest.mark.slow
def test_accelerator_script_trains_and_packs_records_naming_the_device(tmp_path):
    """benchmarks/crossover_acc.sh end to end at smoke scale on the CPU: every run trains, and
    the archive holds one record per run whose summary names the device and the code."""
    import json
    import os
    import subprocess
    import tarfile
    from pathlib import Path

    from sparsescale import provenance

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PRESET="acc_smoke", OUT=str(tmp_path / "out"), ROOT=str(tmp_path / "root"),
               PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # fmt: skip
    done = subprocess.run(["bash", str(repo / "benchmarks" / "crossover_acc.sh")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "crossover_acc_smoke_records.tar.gz") as tar:
        records = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.isfile()]
    assert len(records) == len(crossover.get_sweep("acc_smoke")) == 4
    for record in records:
        summary = record["summary"]
        assert summary["device"].startswith("cpu: ") and summary["tag"] == "acc"
        assert record["code_version"] == provenance.code_version()
