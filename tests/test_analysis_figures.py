"""End to end: `python -m analysis` on a small synthetic sweep and the published data."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from analysis import __main__ as cli
from analysis import load, report
from analysis.fit import fit_law, moe_law, sparse_law

PUBLISHED = load.PUBLISHED_DIR
TRUE = dict(a_S=40.0, b_S=1.2, c_S=60.0, b_N=0.3, a_D=2e8, b_D=0.35, c=1.2)
FIGURES = (
    "loss_vs_params",
    "residuals",
    "optimal_sparsity",
    "loss_gap",
    "tolerance",
    "structure_penalty",
    "moe",
)


def _synthetic_sweep() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for n_total in (2e6, 4e6, 8e6, 32e6):
        for tokens in (1e9, 4e9):
            for seed in (0, 1):
                for s, structure, m in [
                    (0.0, "dense", None),
                    (0.5, "unstructured", None),
                    (0.75, "unstructured", None),
                    (0.5, "nm", 4),
                    (0.5, "nm", 8),
                    (0.75, "block", 16),
                ]:
                    loss = sparse_law(TRUE, s, n_total * (1 - s), tokens)
                    penalty = {"nm": 0.02 * 4 / m if m else 0, "block": 0.05}.get(structure, 0)
                    rows.append(
                        {
                            "run_id": f"r{len(rows)}",
                            "model": f"m{n_total:.0e}",
                            "n_params_total": n_total,
                            "n_params_nonzero": n_total * (1 - s),
                            "sparsity": s,
                            "structure": structure,
                            "tokens": tokens,
                            "seed": seed,
                            "nm_n": m * 0.5 if structure == "nm" else None,
                            "nm_m": m if structure == "nm" else None,
                            "block_size": m if structure == "block" else None,
                            "eval_loss": (loss + penalty) * np.exp(0.002 * rng.standard_normal()),
                            "status": "finished",
                        }
                    )
    for n_active in (2e6, 8e6):
        for experts in (1, 4, 16):
            loss = moe_law(dict(a=-0.08, b=-0.05, c=0.004, d=1.3), n_active, experts)
            rows.append(
                {
                    "run_id": f"moe{len(rows)}",
                    "n_params_total": n_active * experts,
                    "n_params_nonzero": n_active * experts,
                    "n_params_active": n_active,
                    "num_experts": experts,
                    "top_k": 1,
                    "sparsity": 0.0,
                    "structure": "moe",
                    "tokens": 1e9,
                    "eval_loss": float(loss),
                    "status": "finished",
                }
            )
    return pd.DataFrame(rows)


def _table_value(text: str, section: str, param: str) -> str:
    body = text.split(f"## {section}", 1)[1]
    match = re.search(rf"^\| {re.escape(param)} \| ([^ |]+) \|", body, re.MULTILINE)
    assert match, f"{param} not in section {section}"
    return match.group(1)


def test_cli_draws_every_figure_and_report_matches_fit(tmp_path):
    csv = tmp_path / "results.csv"
    _synthetic_sweep().to_csv(csv, index=False)
    out = tmp_path / "out"
    cli.main(["--results", str(csv), "--out", str(out), "--n-boot", "4", "--eps", "0.05"])
    for name in FIGURES:
        for suffix in (".png", ".pdf"):
            assert (out / "figures" / f"{name}{suffix}").stat().st_size > 1000, name
    text = (out / "report.md").read_text()
    assert "Not drawn" not in text
    for name in FIGURES:
        assert f"(figures/{name}.png)" in text

    df = load.load_results(csv)
    sparse_df = df[df["structure"].isin(["dense", "unstructured"])].reset_index(drop=True)
    fit = fit_law("sparse", sparse_df, report.DEFAULT_FIT_CONFIG)
    for name, value in fit.params.items():
        assert _table_value(text, "Sparse scaling law", name) == report.fmt(value)
    assert abs(fit.params["b_N"] - TRUE["b_N"]) < 0.05  # sanity: the sweep follows the law
    moe = fit_law(
        "moe", df[df["structure"] == "moe"].reset_index(drop=True), report.DEFAULT_FIT_CONFIG
    )
    assert _table_value(text, "MoE law", "c") == report.fmt(moe.params["c"])
    # The structure-penalty table shows the injected penalties (0.02 for 2:4, 0.05 for blocks).
    assert "| nm | 4 |" in text and "| block | 16 |" in text
    # report.json holds the same numbers as report.md.
    data = json.loads((out / "report.json").read_text())
    assert data["fits"]["sparse"]["params"] == pytest.approx(fit.params)
    assert data["fits"]["sparse"]["identified"] and "0.05 nats" in data["tolerances"]
    for row in data["gap_scaling"]:
        assert f"| {report.fmt(row['beta'])} | {report.fmt(row['lo'])} |" in text
    assert data["extrapolation"]["n_held_out"] == (sparse_df["n_params_total"] == 32e6).sum()


def test_unidentified_fits_print_no_coefficients(tmp_path):
    """A 'scaled' sweep (tokens ∝ N) cannot separate N and D: no coefficients, no derived tables."""
    sweep = _synthetic_sweep()
    sweep = sweep[sweep["structure"].isin(["dense", "unstructured"]) & (sweep["tokens"] == 1e9)]
    sweep["tokens"] = sweep["n_params_total"] * 20
    path = report.build_report(load.tidy(sweep), tmp_path, fit_config=report.DEFAULT_FIT_CONFIG)
    text = path.read_text()
    sparse = text.split("## Sparse scaling law", 1)[1].split("###", 1)[0]
    assert "**Not identified**" in sparse and "N and D collinear" in sparse
    assert "| a_S |" not in sparse
    assert "Effective parameter multiplier" not in text and "Compute-optimal" not in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["fits"]["sparse"]["identified"] is False
    for name, record in data["fits"].items():  # no parameter on a bound without saying so
        if record["identified"] and record["on_bound"]:
            assert "on bound" in text, name


def test_sweep_without_sparse_runs_says_what_it_skipped(tmp_path):
    sweep = _synthetic_sweep()
    sweep = sweep[sweep["structure"] == "dense"]
    path = report.build_report(load.tidy(sweep), tmp_path, fit_config=report.DEFAULT_FIT_CONFIG)
    text = path.read_text()
    assert "## Dense law (Chinchilla form)" in text
    assert "sparse-law fit and its figures: needs" in text
    assert "MoE figure: no rows" in text
    assert not (tmp_path / "figures" / "loss_vs_params.png").exists()


def test_published_vit_report(tmp_path):
    cli.main(["--published", "vit", "--out", str(tmp_path), "--n-boot", "0"])
    text = (tmp_path / "report.md").read_text()
    b_n = float(_table_value(text, "Sparse scaling law", "b_N"))
    assert b_n == pytest.approx(0.392, rel=0.01)  # the published ViT exponent
    assert (tmp_path / "figures" / "loss_vs_params.png").is_file()


def test_local_slope_figure_draws_each_level_with_its_seed_interval(tmp_path):
    from analysis import figures

    table = pd.DataFrame(
        {"sparsity": [0.5, 0.5, 0.9, 0.9], "size_from": [1e4, 1e5] * 2, "size_to": [1e5, 1e6] * 2,
         "beta": [-0.3, 0.2, -0.4, 0.1], "lo": [-0.5, 0.1, -0.6, -0.1], "hi": [-0.1, 0.3, -0.2, 0.3]}
    )  # fmt: skip
    fig = figures.plot_local_slopes(table, tmp_path / "slopes")
    ax = fig.axes[0]
    assert (tmp_path / "slopes.png").stat().st_size > 0
    lines = [container.lines[0] for container in ax.containers]  # the errorbars' data lines
    assert len(lines) == 2  # one line per level
    for line, betas in zip(lines, ([-0.3, 0.2], [-0.4, 0.1]), strict=True):
        np.testing.assert_allclose(line.get_ydata(), betas)
        x = np.asarray(line.get_xdata())
        assert np.allclose(x / np.array([np.sqrt(1e9), np.sqrt(1e11)]), x[0] / np.sqrt(1e9))


def _audit(fig) -> list[str]:
    """What a reader would trip on: a title or label outside the figure, a text reading 'nan',
    two series of one axes in the same colour."""
    import matplotlib.colors as mcolors
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    problems = []
    canvas = FigureCanvasAgg(fig)  # the figure may have been closed after saving
    canvas.draw()
    renderer, box = canvas.get_renderer(), fig.bbox
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_visible()]
    ticks = {id(t) for ax in fig.axes for t in [*ax.get_xticklabels(which="both"),
                                               *ax.get_yticklabels(which="both")]}  # fmt: skip
    for t in texts:
        text = t.get_text()
        if re.search(r"\bnan\b", text, re.IGNORECASE):
            problems.append(f"reads nan: {text!r}")
        if text.strip() and id(t) not in ticks:  # (tick labels outside the view are not drawn)
            extent = t.get_window_extent(renderer)
            if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1:
                problems.append(f"cut off at the figure's edge: {text!r}")
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        seen = {}
        for handle, label in zip(legend.legend_handles, legend.get_texts(), strict=False):
            colour = getattr(handle, "get_color", None) or getattr(handle, "get_facecolor", None)
            if colour is None:
                continue
            value = colour()
            value = value[0] if np.ndim(value) == 2 and len(value) else value
            key = mcolors.to_hex(value) if len(np.atleast_1d(value)) else None
            if key and key in seen and key not in ("#000000", "#808080"):
                problems.append(
                    f"{ax.get_title()!r}: {label.get_text()!r} and {seen[key]!r} share {key}"
                )
            seen.setdefault(key, label.get_text())
    return problems


def test_every_figure_says_what_it_shows(tmp_path, monkeypatch):
    """Every figure of a synthetic report (and the published ViT and T5 ones): no text reading
    'nan', no title or label cut off at the edge, each series of an axes in its own colour."""
    from analysis import figures

    drawn = {}
    save = figures.save

    def keep(fig, path):
        drawn[str(path)] = fig
        return save(fig, path)

    monkeypatch.setattr(figures, "save", keep)
    csv = tmp_path / "results.csv"
    _synthetic_sweep().to_csv(csv, index=False)
    cli.main(["--results", str(csv), "--out", str(tmp_path / "out"), "--n-boot", "4"])
    for name in ("vit", "t5"):
        cli.main(["--published", name, "--out", str(tmp_path / name), "--n-boot", "4"])
    assert len(drawn) >= len(FIGURES)
    problems = {path: p for path, fig in drawn.items() if (p := _audit(fig))}
    assert not problems, problems


def test_comparison_figure_puts_each_data_set_on_shared_axes(tmp_path):
    """Ours and theirs on the same two axes: every cell's value where it belongs, one line per
    (data set, sparsity) and metric, and nothing a reader would trip on."""
    from analysis import figures

    def cells(sizes, values, column):
        return pd.DataFrame({"n_nonembedding": sizes, "sparsity": 0.5, column: values,
                             "lo": np.array(values) * 0.9, "hi": np.array(values) * 1.1})  # fmt: skip

    ours = ("ours", cells([1e4, 1e5], [0.02, 0.03], "gap"), cells([1e4, 1e5], [0.9, 0.8], "ratio"))
    theirs = ("theirs", cells([1e6, 1e7], [0.05, 0.04], "gap"), cells([1e6], [0.7], "ratio"))
    fig = figures.plot_comparison([ours, theirs], tmp_path / "comparison")
    assert (tmp_path / "comparison.png").stat().st_size > 0
    left, right = fig.axes[:2]
    assert left.get_shared_x_axes().joined(left, right)
    for ax, expected in ((left, [[0.02, 0.03], [0.05, 0.04]]), (right, [[0.9, 0.8], [0.7]])):
        lines = [container.lines[0] for container in ax.containers]
        assert [list(line.get_ydata()) for line in lines] == expected
    assert [line.get_linestyle() for line in (c.lines[0] for c in left.containers)] == ["-", "--"]
    assert not _audit(fig)


def test_count_labels_keep_three_digits_in_the_right_unit():
    from analysis.figures import count_label

    assert [count_label(n) for n in (999, 6_200, 98_560, 331_776, 1_771_200, 2.5e9)] == [
        "999", "6.2K", "98.6K", "332K", "1.77M", "2.5B"
    ]  # fmt: skip
