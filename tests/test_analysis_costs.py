"""analysis/ is JAX-free (it reads tables, never imports the model), and figure 6's cost tables
agree with the library they were computed from."""

import json
import subprocess
import sys

import pytest

from analysis import costs
from benchmarks import common, cost_tables
from sparsescale import accounting
from sparsescale import model as model_lib


def test_importing_the_analysis_imports_no_jax():
    modules = ["analysis." + m for m in ("load", "gap", "fit", "derived", "figures", "report")]
    modules += ["analysis.costs", "analysis.lr_tuning", "analysis.__main__"]
    code = f"import sys; {'; '.join(f'import {m}' for m in modules)}; print('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_committed_cost_tables_are_the_librarys(tmp_path):
    committed = json.loads((common.RESULTS / "cost_tables.json").read_text())
    fresh = cost_tables.tables()
    assert committed["memory"] == fresh["memory"]
    assert committed["flops_per_token"] == fresh["flops_per_token"]
    row = next(
        r for r in fresh["flops_per_token"] if r["model"] == "cpu_100k" and r["sparsity"] == 0.75
    )
    assert row["flops_per_token"] == accounting.flops_per_token(
        model_lib.preset("cpu_100k"), 128, 0.75
    )
    out = costs.draw_costs(tmp_path / "fig6", common.RESULTS)
    assert "N:M 2:4" in out["costs"].read_text()


def test_missing_cost_tables_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks.cost_tables"):
        costs.draw_costs(tmp_path / "out", tmp_path)


def test_energy_table_against_hand_worked_shares():
    """Dense 100 J over 1000 tokens; a sparse run of the same model and seed 30 J with 40% of
    the FLOPs; a run of another seed has no dense partner (NaN shares); failed runs drop out."""
    import math

    import pandas as pd

    base = dict(status="done", model="m", steps=10, tokens=1000, num_experts=0, energy_source="e")
    rows = [
        dict(base, seed=0, sparsity=0.0, energy_j=100.0, train_flops=10.0, tag="dense"),
        dict(base, seed=0, sparsity=0.5, energy_j=30.0, train_flops=4.0, tag="sparse"),
        dict(base, seed=1, sparsity=0.5, energy_j=20.0, train_flops=4.0, tag="alone"),
        dict(base, seed=0, sparsity=0.9, energy_j=1.0, train_flops=1.0, tag="x", status="failed"),
    ]
    table = costs.energy_table(pd.DataFrame(rows)).set_index("tag")
    assert list(table.index) == ["dense", "sparse", "alone"]
    assert table.loc["sparse", "j_per_token"] == pytest.approx(0.03)
    assert table.loc["sparse", "energy_vs_dense"] == pytest.approx(0.3)
    assert table.loc["sparse", "flops_vs_dense"] == pytest.approx(0.4)
    assert math.isnan(table.loc["alone", "energy_vs_dense"])
