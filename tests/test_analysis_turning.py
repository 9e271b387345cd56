"""analysis/turning.py on synthetic paired sweeps with a known truth: a hump whose turn the
analysis must locate, a power law in which it must find none, a constant multiplier N_eff = k·N
(Frantar et al.'s law) and Jin et al.'s average-parameter rule."""

import numpy as np
import pandas as pd
import pytest

from analysis import gap, turning

SIZES = np.geomspace(6e3, 1.8e6, 8)  # 6K … 1.8M, the crossover's span
SEEDS = (0, 1, 2)


def _rows(gap_of, dense_of=lambda n: 3.0 - 0.1 * np.log(n), noise=0.02, levels=(0.875,)):
    """Dense and sparse rows per size × seed; the sparse loss is dense + gap_of(n, s) times a
    per-run log-normal factor of width `noise`."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in SEEDS:
        for n in SIZES:
            base = {"task": "t", "n_nonembedding": n, "n_params_total": n, "tokens": 21 * n,
                    "seed": seed, "prunable_fraction": 1.0}  # fmt: skip
            rows.append(base | {"structure": "dense", "sparsity": 0.0, "eval_loss": dense_of(n)})
            for s in levels:
                g = gap_of(n, s) * np.exp(noise * rng.standard_normal())
                rows.append(
                    base | {"structure": "unstructured", "sparsity": s,
                            "eval_loss": dense_of(n) + g}
                )  # fmt: skip
    return pd.DataFrame(rows)


def _hump(n, s):  # rises to 300K, then falls: log ΔL quadratic in log N
    return 0.2 * np.exp(-0.15 * (np.log(n) - np.log(3e5)) ** 2)


def test_a_hump_is_found_where_it_turns_with_a_seed_interval():
    pairs = gap.paired_gaps(_rows(_hump))
    shape = turning.curvature(pairs).iloc[0]
    assert shape["shape"] == "hump" and shape["hi"] < 0 and shape["n_seeds"] == 3
    assert shape["curvature"] == pytest.approx(-0.15, rel=0.2)
    local = gap.local_slopes(pairs)
    turn = turning.turning_sizes(pairs, local, n_boot=500).iloc[0]
    assert turn["status"] == "turns"
    assert turn["n_star"] == pytest.approx(3e5, rel=0.25)
    assert turn["lo"] < 3e5 < turn["hi"] and SIZES[0] < turn["lo"] and turn["hi"] < SIZES[-1]
    a, b = (float(x) for x in turn["bracket"].split("–"))
    assert a <= 3e5 <= b  # the measured sizes the local slopes change sign between
    verdict = turning.size_ranges(local).iloc[0]["verdict"]
    assert "less below" in verdict and "more above" in verdict


def test_a_power_law_has_no_turn():
    pairs = gap.paired_gaps(_rows(lambda n, s: 2.0 * n**-0.2))
    assert turning.curvature(pairs).iloc[0]["shape"] == "no curvature"
    turn = turning.turning_sizes(pairs, gap.local_slopes(pairs), n_boot=200).iloc[0]
    assert turn["status"] == "no curvature" and np.isnan(turn["n_star"]) and turn["bracket"] == ""
    ranges = turning.size_ranges(gap.local_slopes(pairs)).iloc[0]
    assert "less below" not in ranges["verdict"]


def test_a_constant_multiplier_is_constant_and_a_shrinking_one_falls():
    # dense L = 3 − 0.1·log N: a sparse run worth k·N dense parameters has gap −0.1·log k
    constant = gap.paired_gaps(_rows(lambda n, s: -0.1 * np.log(0.6), noise=0.005))
    row = turning.neff_trend(constant).iloc[0]
    assert row["trend"] == "constant" and row["lo"] < 0 < row["hi"]
    assert row["mean_ratio"] == pytest.approx(0.6, rel=0.03)
    falling = gap.paired_gaps(_rows(lambda n, s: -0.1 * np.log(0.9 * (n / 6e3) ** -0.1)))
    row = turning.neff_trend(falling).iloc[0]
    assert row["trend"] == "falling" and row["slope"] == pytest.approx(-0.1, abs=0.03)


def test_average_parameter_rule_against_its_prediction():
    """N_eff / N = 1 − 0.625·S·f exactly (f = 0.9 prunable): measured over predicted is 1; a
    run worth its final count only (1 − S·f) lies below the rule."""
    f, share = 0.9, 0.625
    # cubic from 25% to 75% of training: 0.25 at S, plus 0.5 × (1 − 1/4) on the way
    assert turning.schedule_mean_share(0.25, 0.75, 3.0) == share

    def worth(k):
        return lambda n, s: -0.1 * np.log(k(s))

    rule = _rows(worth(lambda s: 1 - share * s * f), noise=0.0, levels=(0.5, 0.875))
    rule["prunable_fraction"] = f
    table = turning.average_parameters(gap.paired_gaps(rule), rule, share)
    np.testing.assert_allclose(table["measured_over_predicted"], 1.0, rtol=1e-6)
    final = _rows(worth(lambda s: 1 - s * f), noise=0.0, levels=(0.875,))
    final["prunable_fraction"] = f
    below = turning.average_parameters(gap.paired_gaps(final), final, share)
    assert (below["measured_over_predicted"] < 0.7).all()
