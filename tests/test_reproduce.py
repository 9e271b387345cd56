"""experiments/reproduce.py: where a reproduction writes, and that docs/ changes only on --publish."""

import shutil
from pathlib import Path

import pytest

from experiments import reproduce


def _snapshot(directory: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def test_outputs_go_under_the_sweep_root_unless_published(tmp_path):
    root = tmp_path / "runs"
    assert reproduce.output_dir("fig2_structure", "quick", root, None, False) == (
        root / "fig2_structure" / "quick" / "analysis"
    )
    assert reproduce.output_dir("fig2_structure", "quick", root, tmp_path / "o", False) == (
        tmp_path / "o" / "fig2_structure" / "quick"
    )
    assert reproduce.output_dir("fig2_structure", "quick", root, None, True) == (
        reproduce.DOCS / "figures" / "fig2_structure" / "quick"
    )


def test_analyze_only_leaves_docs_alone_and_publish_refreshes_them(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    committed = docs / "figures" / "fig3_moe" / "quick"
    committed.mkdir(parents=True)
    shutil.copyfile(
        reproduce.REPO / "docs/figures/fig3_moe/quick/results.csv", committed / "results.csv"
    )
    monkeypatch.setattr(reproduce, "DOCS", docs)
    real = reproduce.REPO / "docs" / "figures" / "fig3_moe"
    real_docs = _snapshot(real)
    before = _snapshot(docs)
    root = tmp_path / "runs"

    args = ["fig3_moe", "--preset", "quick", "--analyze-only", "--root", str(root)]
    assert reproduce.main(args) == 0
    analysis = root / "fig3_moe" / "quick" / "analysis"
    assert (analysis / "report.md").exists() and (analysis / "results.csv").exists()
    assert _snapshot(docs) == before  # nothing under docs/ written or touched

    assert reproduce.main([*args, "--publish"]) == 0
    assert (committed / "report.md").exists() and (docs / "RESULTS.md").exists()
    assert (committed / "report.md").read_text() == (analysis / "report.md").read_text()
    assert "fig3_moe" in (docs / "RESULTS.md").read_text()
    assert _snapshot(real) == real_docs


def test_analyze_only_rebuilds_the_table_from_the_records(tmp_path, monkeypatch):
    import pandas as pd

    from sparsescale import run_files

    table = pd.read_csv(reproduce.REPO / "docs/figures/fig3_moe/quick/results.csv")
    recs = tmp_path / "docs" / "records" / "fig3_moe" / "quick"
    recs.mkdir(parents=True)
    for row in table.astype(object).where(table.notna(), None).to_dict("records"):
        record = {"summary": row, "curve": [], "config_hash": row["config_hash"]}
        run_files.write_json_atomic(recs / f"{row['run_id']}.json", record)
    stale = tmp_path / "docs" / "figures" / "fig3_moe" / "quick" / "results.csv"
    stale.parent.mkdir(parents=True)
    table.iloc[:-1].to_csv(stale, index=False)  # a table from before the last record
    monkeypatch.setattr(reproduce, "DOCS", tmp_path / "docs")
    root = tmp_path / "runs"
    assert (
        reproduce.main(["fig3_moe", "--preset", "quick", "--analyze-only", "--root", str(root)])
        == 0
    )
    analysis = root / "fig3_moe" / "quick" / "analysis"
    assert (analysis / "report.md").exists()
    rebuilt = pd.read_csv(analysis / "results.csv")[list(table.columns)]
    rebuilt = rebuilt.sort_values("run_id", ignore_index=True)
    pd.testing.assert_frame_equal(rebuilt, table.sort_values("run_id", ignore_index=True))


def test_each_experiment_has_its_own_default_preset_and_names_the_known_ones(capsys, tmp_path):
    import importlib

    headline = importlib.import_module("experiments.headline")
    assert reproduce.default_preset(headline) == "cpu"
    for figure in reproduce.FIGURES:  # every default is one of the experiment's presets
        module = importlib.import_module(f"experiments.{figure}")
        known = reproduce.presets_of(module)
        assert not known or reproduce.default_preset(module) in known, figure
    assert reproduce.main(["headline", "--preset", "quick", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: headline has no preset 'quick'; its presets: cpu, smoke"
    assert not (tmp_path / "headline").exists()  # nothing written


def test_an_analysis_with_no_finished_runs_exits_nonzero(capsys, tmp_path):
    args = ["crossover", "--preset", "smoke", "--analyze-only", "--root", str(tmp_path)]
    assert reproduce.main(args) == 1
    assert "no finished runs of crossover:smoke" in capsys.readouterr().err


def test_config_flags_train_in_a_root_of_their_own_and_bad_ones_stop_before_training(
    tmp_path, monkeypatch, capsys
):
    """`--config.KEY=VALUE` reaches the launcher, keeps its runs apart from the declared sweep's,
    and is refused with --publish / --analyze-only; a key the config lacks is refused by the
    launcher before anything trains (exit 2, no sweep root)."""
    from launch import __main__ as launch_cli

    root = tmp_path / "runs"
    flag = "--config.data.name=synthetic"
    seen = []
    monkeypatch.setattr(launch_cli, "main", lambda argv: seen.append(argv) or 0)
    assert reproduce.main(["crossover", "--preset", "smoke", "--root", str(root), flag]) == 1
    (argv,) = seen
    own_root = root / "crossover" / "smoke+data.name=synthetic"
    assert argv[argv.index("--root") + 1] == str(own_root) and argv[-1] == flag
    assert f"no finished runs of crossover:smoke in {own_root}" in capsys.readouterr().err
    for refused in ("--publish", "--analyze-only"):
        with pytest.raises(SystemExit) as exit_:
            reproduce.main(["crossover", "--preset", "smoke", "--root", str(root), flag, refused])
        assert (
            exit_.value.code == 2
            and "--config.* changes what is trained" in capsys.readouterr().err
        )
    with pytest.raises(SystemExit):
        reproduce.main(["crossover", "--preset", "smoke", "--root", str(root), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err

    monkeypatch.undo()
    bad = ["crossover", "--preset", "smoke", "--root", str(root), "--config.train.no_such_field=1"]
    assert reproduce.main(bad) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert not list(root.rglob("summary.json"))


def test_an_interrupted_or_failed_launch_publishes_nothing(tmp_path, monkeypatch, capsys):
    """A sweep stopped midway (or with failed runs) leaves docs/ as committed: only a complete
    sweep is published."""
    from launch import __main__ as launch_cli

    docs = tmp_path / "docs"
    committed = docs / "figures" / "fig3_moe" / "quick"
    committed.mkdir(parents=True)
    (committed / "results.csv").write_text("the committed table\n")
    monkeypatch.setattr(reproduce, "DOCS", docs)
    root = tmp_path / "runs"
    (root / "fig3_moe" / "quick").mkdir(parents=True)  # a partial sweep's root
    before = _snapshot(docs)
    for code, expected in ((143, 143), (1, 1)):  # SIGTERM, failed runs
        monkeypatch.setattr(launch_cli, "main", lambda argv, code=code: code)
        args = ["fig3_moe", "--preset", "quick", "--root", str(root), "--publish"]
        assert reproduce.main(args) == expected
        assert _snapshot(docs) == before
    assert "not publishing: some runs failed" in capsys.readouterr().err
