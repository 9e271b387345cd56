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
