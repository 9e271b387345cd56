"""analysis/regimes.py: one-shot gaps in paired form beside sparse-training gaps, against
synthetic truth (known gaps per regime, seed and size)."""

import numpy as np
import pandas as pd
import pytest

from analysis import figures, gap, regimes

SIZES = (1e4, 1e5, 1e6)
SEEDS = (0, 1, 2)


def _results_and_table():
    """Dense loss 3 − 0.1·log10 N + seed offset. Sparse training at 50%: ΔL = 0.02·(N/1e4)^+0.1
    (grows). One-shot: ΔL = 0.3·(N/1e4)^−0.2 unstructured 50%, twice that at 2:4 (shrinks);
    a dense run at 1e6 has no one-shot rows, one at 1e3 no sparse partner."""
    results, table = [], []
    for seed in SEEDS:
        for n in (*SIZES, 1e3):
            dense = 3 - 0.1 * np.log10(n) + 0.01 * seed
            run_id = f"dense_{n:g}_{seed}"
            base = {"task": "t", "n_nonembedding": n, "n_params_total": n, "tokens": 20 * n}
            results.append(base | {"run_id": run_id, "seed": seed, "structure": "dense",
                                   "sparsity": 0.0, "eval_loss": dense, "tag": "main"})  # fmt: skip
            if n in SIZES:
                results.append(base | {"run_id": f"s_{n:g}_{seed}", "seed": seed, "tag": "main",
                                       "structure": "unstructured", "sparsity": 0.5,
                                       "eval_loss": dense + 0.02 * (n / 1e4) ** 0.1})  # fmt: skip
            if n == 1e6:
                continue
            for method, structure, scale in (("sparsegpt", "unstructured_0.5", 1.0),
                                             ("sparsegpt", "nm_2:4", 2.0)):  # fmt: skip
                table.append({"run_id": run_id, "method": method, "structure": structure,
                              "sparsity": 0.5, "dense_eval_loss": dense,
                              "eval_loss": dense + 0.3 * scale * (n / 1e4) ** -0.2,
                              "calibration_tokens": 4096})  # fmt: skip
            table.append({"run_id": run_id, "method": "dense", "structure": "dense",
                          "sparsity": 0.0, "dense_eval_loss": dense, "eval_loss": dense,
                          "calibration_tokens": 4096})  # fmt: skip
    return pd.DataFrame(results), pd.DataFrame(table)


def test_regime_pairs_recover_each_regimes_gap_and_slope():
    results, table = _results_and_table()
    pairs = regimes.regime_pairs(results, table)
    assert sorted(pairs["regime"].unique()) == [
        "one-shot sparsegpt", "one-shot sparsegpt 2:4", "sparse training"
    ]  # fmt: skip
    assert sorted(pairs["n_nonembedding"].unique()) == [1e4, 1e5]  # both regimes measured there
    assert len(pairs) == 3 * 2 * 3  # regimes × sizes × seeds, paired within the dense run
    truth = {
        "sparse training": lambda n: 0.02 * (n / 1e4) ** 0.1,
        "one-shot sparsegpt": lambda n: 0.3 * (n / 1e4) ** -0.2,
        "one-shot sparsegpt 2:4": lambda n: 0.6 * (n / 1e4) ** -0.2,
    }
    for row in pairs.itertuples():
        assert row.gap == pytest.approx(truth[row.regime](row.n_nonembedding))
    slopes = gap.local_slopes(pairs).set_index("regime")
    assert slopes.loc["sparse training", "beta"] == pytest.approx(-0.1)
    assert slopes.loc["one-shot sparsegpt", "beta"] == pytest.approx(0.2)
    assert slopes.loc["one-shot sparsegpt 2:4", "beta"] == pytest.approx(0.2)


def test_report_and_figure(tmp_path):
    results, table = _results_and_table()
    path = regimes.write_report(results, table, tmp_path)
    text = path.read_text()
    assert "4096 tokens" in text and "N = 10K" in text and "N = 1M" not in text
    assert "0.300 [0.300, 0.300]" in text  # one-shot 50% at 1e4, identical over seeds
    fig = figures.plot_regimes(gap.gap_cells(regimes.regime_pairs(results, table)))
    assert [ax.get_title() for ax in fig.axes] == [
        "S = 0.5, unstructured", "S = 0.5, N:M one-shot"
    ]  # fmt: skip
    assert (tmp_path / "figures" / "regimes.png").exists()


def test_a_table_of_other_runs_is_refused():
    results, table = _results_and_table()
    with pytest.raises(ValueError, match="no one-shot row"):
        regimes.regime_pairs(results, table.assign(run_id="elsewhere"))


def test_by_size_table_says_one_seed_instead_of_nan():
    from analysis import report

    frame = pd.DataFrame(
        {"s": [0.5, 0.5, 0.9], "n": [1e4, 1e6, 1e4], "v": [0.1, 0.2, np.nan],
         "lo": [0.05, np.nan, np.nan], "hi": [0.15, np.nan, np.nan]}
    )  # fmt: skip
    table = report.by_size_table(frame, ["s"], "v", "n").set_index("s")
    assert list(table.columns) == ["N = 10K", "N = 1M"]
    assert table.loc[0.5].tolist() == ["0.100 [0.050, 0.150]", "0.200 (one seed)"]
    assert table.loc[0.9, "N = 10K"] == "–"
