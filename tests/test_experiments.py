"""Every figure's smoke preset through the real launch → train → collect → analysis path."""

import json

import pandas as pd
import pytest

from experiments import reproduce

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments") / "runs"


def _run(figure, root):
    """Reproduces `figure`'s smoke preset with default outputs (under the sweep root, not docs/)."""
    assert reproduce.main([figure, "--preset", "smoke", "--root", str(root)]) == 0
    assert not (reproduce.DOCS / "figures" / figure / "smoke").exists()
    return root / getattr(
        __import__(f"experiments.{figure}", fromlist=["x"]), "RESULTS_FROM", figure
    ), root / figure / "smoke" / "analysis"


@pytest.mark.parametrize(
    "figure", ["fig1_size", "fig2_structure", "fig3_moe", "fig4_tasks", "crossover"]
)
def test_smoke_trains_and_reports(figure, dirs):
    from importlib import import_module

    module = import_module(f"experiments.{figure}")
    root, out = _run(figure, dirs)
    runs = module.get_sweep("smoke")
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(runs)
    assert (table["status"] == "done").all()
    for summary in (root / "smoke").glob("*/summary.json"):
        assert json.loads(summary.read_text())["experiment"] == figure
    assert list(out.rglob("report.md")), "no report written"
    # Relaunching skips finished runs: no run gets a second attempt.
    _run(figure, dirs)
    for launch in (root / "smoke").glob("*/launch.json"):
        assert len(json.loads(launch.read_text())["attempts"]) == 1


def test_fig5_reuses_fig1_runs_and_fig6_draws(dirs):
    root, _ = _run("fig1_size", dirs)
    before = sorted(p.stat().st_mtime for p in (root / "smoke").glob("*/summary.json"))
    _, out5 = _run("fig5_extrapolate", dirs)
    after = sorted(p.stat().st_mtime for p in (root / "smoke").glob("*/summary.json"))
    assert before == after  # nothing retrained
    assert (out5 / "report.md").exists()
    _, out6 = _run("fig6_costs", dirs)
    report6 = (out6 / "report.md").read_text()
    assert (out6 / "costs.png").exists() and "bytes/element" in report6
    from experiments import fig6_costs

    assert (out6 / "energy.png").exists() and "energy / dense" in report6
    for run in fig6_costs.get_sweep("smoke"):  # every run trained alone, with its own energy
        assert f"| {run['tag']} |" in report6
    for launch in (dirs / "fig6_costs" / "smoke").glob("*/launch.json"):
        assert json.loads(launch.read_text())["attempts"][0]["stacked"] == 1
