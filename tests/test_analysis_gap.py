"""Paired gaps, gap scaling β(S) and censored S*, on synthetic sweeps with a known gap law.

Each sweep has embeddings that are never pruned, a gap ΔL = g(S)·N^−β (N = non-embedding
parameters) and paired seed noise: a component shared by the dense and sparse runs of a seed
(same init and data order) plus an independent part per run.
"""

import numpy as np
import pandas as pd
import pytest

from analysis import gap, load

SIZES = np.geomspace(5e3, 4e5, 5)
LEVELS = (0.5, 0.75, 0.875, 0.9375)


def g_true(s):
    """g(S) = 0.4·(1−S)^−1: log ΔL is linear in log(1/(1−S)), as the S* model assumes."""
    return 0.4 / (1.0 - np.asarray(s, float))


def _sweep(rng, beta, *, seeds=2, shared=0.1, noise=0.003, sizes=SIZES, tag="scaled"):
    rows = []
    for n in sizes:
        embed = 4 * n**0.8  # never pruned
        prunable = 0.99 * n
        dense_loss = 2.0 + 30 * n**-0.3
        for seed in range(seeds):
            common = shared * rng.standard_normal()  # same init and data order
            for s in (0.0, *LEVELS):
                b = beta[seed] if np.ndim(beta) else beta  # a per-seed β, if given
                gap_ = g_true(s) * n**-b if s else 0.0
                rows.append(
                    {
                        "n_params_total": n + embed,
                        "n_params_nonembedding": n,
                        "n_params_prunable": prunable,
                        "n_params_nonzero": n + embed - s * prunable,
                        "sparsity": s,
                        "seed": seed,
                        "tokens": 4 * n,
                        "tag": tag,
                        "eval_loss": dense_loss + gap_ + common + noise * rng.standard_normal(),
                    }
                )
    return load.tidy(pd.DataFrame(rows))


def test_paired_gaps_cancel_the_shared_seed_component():
    df = _sweep(np.random.default_rng(0), beta=0.3, shared=0.5, noise=0.0)
    cells = gap.gap_cells(gap.paired_gaps(df))
    truth = g_true(cells["sparsity"]) * cells[load.SIZE] ** -0.3
    np.testing.assert_allclose(cells["gap"], truth, rtol=1e-9)  # shared noise 0.5 cancels
    assert (cells["hi"] - cells["lo"]).max() < 1e-9
    one = gap.gap_cells(gap.paired_gaps(_sweep(np.random.default_rng(0), 0.3, seeds=1)))
    assert one["lo"].isna().all() and one["hi"].isna().all()  # one seed: no interval


def test_gap_interval_coverage_is_near_nominal():
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(30):
        cells = gap.gap_cells(gap.paired_gaps(_sweep(rng, beta=0.3, seeds=4, noise=0.02)))
        truth = g_true(cells["sparsity"]) * cells[load.SIZE] ** -0.3
        hits.append(((cells["lo"] <= truth) & (truth <= cells["hi"])).to_numpy())
    coverage = np.concatenate(hits).mean()  # 600 intervals
    assert 0.90 <= coverage <= 0.99


def test_beta_is_recovered_within_its_interval_at_near_nominal_coverage():
    rng = np.random.default_rng(2)
    covered, verdicts = [], []
    for _ in range(40):
        scaling = gap.gap_scaling(gap.gap_cells(gap.paired_gaps(_sweep(rng, beta=0.3))))
        covered += list((scaling["lo"] <= 0.3) & (0.3 <= scaling["hi"]))
        verdicts += list(scaling["verdict"])
    assert 0.85 <= np.mean(covered) <= 1.0  # 160 intervals, nominal 0.95
    assert np.mean(np.array(verdicts) == "yes") >= 0.9  # β = 0.3 is clearly > 0


def test_beta_within_seeds_is_the_mean_of_per_seed_slopes_with_a_t_interval():
    per_seed = (0.9, 0.6, -0.3)  # exact power laws per seed (no noise): slopes are exact
    pairs = gap.paired_gaps(_sweep(np.random.default_rng(5), per_seed, seeds=3, noise=0.0))
    scaling = gap.gap_scaling(gap.gap_cells(pairs), 0.95, pairs)
    half = 4.302653 * np.std(per_seed, ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
    np.testing.assert_allclose(scaling["beta_seeds"], np.mean(per_seed), atol=1e-9)
    np.testing.assert_allclose(scaling["lo_seeds"], np.mean(per_seed) - half, rtol=1e-5)
    np.testing.assert_allclose(scaling["hi_seeds"], np.mean(per_seed) + half, rtol=1e-5)
    assert (scaling["n_seeds_beta"] == 3).all()
    assert (scaling["verdict"] == "inconclusive").all()  # the seeds disagree: interval holds 0
    # a seed missing a size does not enter the within-seed fit
    partial = pairs[~((pairs["seed"] == 2) & (pairs[load.SIZE] == pairs[load.SIZE].max()))]
    scaling = gap.gap_scaling(gap.gap_cells(partial), 0.95, partial)
    np.testing.assert_allclose(scaling["beta_seeds"], 0.75, atol=1e-9)
    assert (scaling["n_seeds_beta"] == 2).all()
    # two sizes: no fit over sizes (lack of fit untestable), the seed interval alone decides
    agree = (0.25, 0.3, 0.35)  # mean 0.3, t-interval 0.3 ± 0.124: above 0
    two = gap.paired_gaps(
        _sweep(np.random.default_rng(7), agree, seeds=3, noise=0.0, sizes=SIZES[[0, 4]])
    )
    scaling = gap.gap_scaling(gap.gap_cells(two), 0.95, two)
    assert scaling["beta"].isna().all() and (scaling["n_seeds_beta"] == 3).all()
    np.testing.assert_allclose(scaling["beta_seeds"], 0.3, atol=1e-9)
    np.testing.assert_allclose(scaling["lo_seeds"], 0.3 - 4.302653 * 0.05 / np.sqrt(3), rtol=1e-5)
    assert (scaling["verdict"] == "yes").all()


def test_beta_within_seeds_covers_the_truth_at_near_nominal_rate():
    rng = np.random.default_rng(6)
    covered, verdicts = [], []
    for _ in range(40):
        pairs = gap.paired_gaps(_sweep(rng, beta=0.3, seeds=4, noise=0.01))
        scaling = gap.gap_scaling(gap.gap_cells(pairs), 0.95, pairs)
        covered += list((scaling["lo_seeds"] <= 0.3) & (0.3 <= scaling["hi_seeds"]))
        verdicts += list(scaling["verdict"])
    assert 0.88 <= np.mean(covered) <= 1.0  # 160 intervals, nominal 0.95
    assert np.mean(np.array(verdicts) == "yes") >= 0.8


def test_beta_zero_is_not_called_a_trend():
    rng = np.random.default_rng(3)
    verdicts = []
    for _ in range(25):
        scaling = gap.gap_scaling(gap.gap_cells(gap.paired_gaps(_sweep(rng, beta=0.0))))
        verdicts += list(scaling["verdict"])
    assert np.mean(np.array(verdicts) == "inconclusive") >= 0.85
    two_sizes = _sweep(rng, beta=0.3, sizes=SIZES[:2])
    scaling = gap.gap_scaling(gap.gap_cells(gap.paired_gaps(two_sizes)))
    assert scaling["beta"].isna().all() and (scaling["verdict"] == "inconclusive").all()


def test_s_star_is_bracketed_or_censored_correctly():
    df = _sweep(np.random.default_rng(4), beta=0.3, noise=0.0, shared=0.2)
    n = SIZES[2]
    gaps_at_n = g_true(np.array(LEVELS)) * n**-0.3
    tols = (
        gap.Tolerance(0.5 * gaps_at_n[0]),  # below the smallest measured gap
        gap.Tolerance(2.0 * gaps_at_n[-1]),  # above the largest
        gap.Tolerance(float(g_true(0.8) * n**-0.3)),  # bracketed: the truth is S* = 0.8
    )
    table = gap.tolerance_table(gap.paired_gaps(df), tols, n_boot=20)
    at_n = table[np.isclose(table[load.SIZE], n)].set_index("tolerance")
    below, above, inside = (at_n.loc[t.describe()] for t in tols)
    assert below["status"] == "below" and gap.describe_s_star(below) == "< 0.5"
    assert above["status"] == "above" and gap.describe_s_star(above) == "> 0.9375"
    assert inside["status"] == "bracketed" and inside["s_star"] == pytest.approx(0.8, abs=1e-6)
    # S* never comes from interpolating towards (0, 0): the censored value is the bound.
    assert below["s_star"] == 0.5


def test_s_star_relative_tolerance_and_one_seed():
    df = _sweep(np.random.default_rng(5), beta=0.3, seeds=1, noise=0.0, shared=0.0)
    table = gap.tolerance_table(gap.paired_gaps(df), (gap.Tolerance(0.05, relative=True),))
    row = table.iloc[0]
    dense = 2.0 + 30 * SIZES[0] ** -0.3
    assert row["limit"] == pytest.approx(0.05 * dense)
    assert np.isnan(row["lo"]) and row["n_seeds"] == 1


def test_regimes_follow_tags_else_token_budgets():
    rng = np.random.default_rng(6)
    both = pd.concat([_sweep(rng, 0.3, tag="scaled"), _sweep(rng, 0.3, tag="fixed")])
    assert set(gap.regimes(both)) == {"scaled", "fixed"}
    untagged = both.drop(columns=["tag"])
    untagged["tokens"] = np.where(both["tag"] == "fixed", 1e6, both["tokens"])
    assert gap.regimes(untagged).str.startswith("D = ").all()
    info = gap.describe_regimes(both)
    assert info["scaled"]["tokens_per_param"] == [4.0, 4.0]


def _budget_sweep(rng, gamma, *, seeds=3, noise=0.003, budgets=(5, 21, 80)):
    """Two sizes at three budgets: ΔL = g(S)·N^−0.2·(D/N)^−γ, with paired seed noise."""
    frames = []
    for d in budgets:
        df = _sweep(rng, beta=0.2, seeds=seeds, noise=0.0, sizes=SIZES[:2], tag="t")
        gap_ = df["eval_loss"] - df.groupby([load.SIZE, "seed"])["eval_loss"].transform("min")
        df["tokens"] = d * df[load.SIZE]
        df["eval_loss"] += gap_ * ((d / 4.0) ** -gamma - 1) + noise * rng.standard_normal(len(df))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_budget_gamma_is_recovered_per_size_within_seeds():
    exact = gap.budget_scaling(
        gap.paired_gaps(_budget_sweep(np.random.default_rng(0), 0.4, noise=0))
    )
    assert len(exact) == 2 * len(LEVELS) and (exact["n_budgets"] == 3).all()
    np.testing.assert_allclose(exact["gamma"], 0.4, atol=1e-9)  # the synthetic truth
    assert (exact["verdict"] == "shrinks").all() and (exact["n_seeds"] == 3).all()

    rng = np.random.default_rng(1)
    called = [gap.budget_scaling(gap.paired_gaps(_budget_sweep(rng, 0.0, noise=0.002)))
              for _ in range(20)]  # fmt: skip
    false_trend = np.mean([(b["verdict"] != "inconclusive").mean() for b in called])
    assert false_trend < 0.15  # γ = 0 is rarely called a trend at the 95% level
    grows = gap.budget_scaling(gap.paired_gaps(_budget_sweep(rng, -0.3, noise=0.001)))
    assert (grows["verdict"] == "grows").mean() > 0.8


def test_tolerance_figure_shows_every_tested_level():
    """S* at low tested levels (25%) and their censored markers stay inside the drawn axes."""
    from analysis import figures

    df = _sweep(np.random.default_rng(8), beta=0.3, noise=0.0, shared=0.0)
    df = df[df["sparsity"] != LEVELS[0]]  # levels 0.75 … 0.9375
    low = _sweep(np.random.default_rng(8), beta=0.3, noise=0.0, shared=0.0)
    low = low[low["sparsity"] == LEVELS[0]].assign(sparsity=0.25)  # a low tested level
    table = gap.tolerance_table(gap.paired_gaps(pd.concat([df, low])), (gap.Tolerance(1e-4),))
    assert (table["status"] == "below").all() and table["s_star"].min() == 0.25
    with pytest.raises(ValueError, match="censored"):  # only bounds: not drawn
        figures.plot_tolerance(table)
    table.loc[table.index[-1], ["status", "s_star", "lo", "hi"]] = ["bracketed", 0.8, 0.78, 0.82]
    fig = figures.plot_tolerance(table)
    bottom, top = fig.axes[0].get_ylim()
    assert bottom < 0.25 < top


def test_local_slopes_recover_a_known_turn_and_its_seed_interval():
    # ΔL = g · N^-β(N) with β = -0.3 below 1e5 and +0.2 above: the gap grows, then shrinks
    sizes = [1e4, 3e4, 1e5, 3e5, 1e6]
    log_gap = {1e4: 0.0}
    for a, b in zip(sizes, sizes[1:], strict=False):
        beta = -0.3 if b <= 1e5 else 0.2
        log_gap[b] = log_gap[a] - beta * np.log(b / a)
    rows = []
    for seed, noise in enumerate((0.98, 1.0, 1.02)):  # a seed-level factor: cancels in β
        for n in sizes:
            for kind, loss in (
                ("dense", 2.0),
                ("unstructured", 2.0 + 0.1 * np.exp(log_gap[n]) * noise),
            ):
                rows.append(
                    {"task": "t", "n_nonembedding": n, "n_params_total": n, "tokens": 20 * n,
                     "seed": seed, "structure": kind, "sparsity": 0.0 if kind == "dense" else 0.5,
                     "eval_loss": loss}
                )  # fmt: skip
    pairs = gap.paired_gaps(pd.DataFrame(rows))
    table = gap.local_slopes(pairs)
    assert list(table["size_from"]) == sizes[:-1]
    np.testing.assert_allclose(table["beta"], [-0.3, -0.3, 0.2, 0.2], atol=1e-9)
    assert list(table["gap_with_size"]) == ["grows", "grows", "shrinks", "shrinks"]
    assert (table["n_seeds"] == 3).all()


def test_effective_sizes_recover_a_known_ratio_and_never_extrapolate():
    # dense L = 3 − 0.2·log N (+ a seed offset): a sparse run at N with loss L_dense(r·N) has
    # N_eff / N = r exactly (log N is linear in L between measured sizes)
    sizes, ratio = [1e4, 3e4, 1e5, 3e5], {1e4: 0.5, 3e4: 0.6, 1e5: 0.5, 3e5: 0.4}
    rows = []
    for seed in (0, 1, 2):
        dense = lambda n, seed=seed: 3 - 0.2 * np.log(n) + 0.01 * seed  # noqa: E731
        for n in sizes:
            base = {"task": "t", "n_nonembedding": n, "n_params_total": n, "tokens": 20 * n,
                    "seed": seed}  # fmt: skip
            rows.append(base | {"structure": "dense", "sparsity": 0.0, "eval_loss": dense(n)})
            rows.append(base | {"structure": "unstructured", "sparsity": 0.5,
                                "eval_loss": dense(ratio[n] * n)})  # fmt: skip
    table = gap.effective_sizes(gap.paired_gaps(pd.DataFrame(rows))).set_index("n_nonembedding")
    # at 1e4, r·N lies below the smallest dense size: not extrapolated, counted
    assert table.loc[1e4, "n_below"] == 3 and table.loc[1e4, "n_seeds"] == 0
    for n in sizes[1:]:
        assert table.loc[n, "ratio"] == pytest.approx(ratio[n])
        assert table.loc[n, "n_seeds"] == 3 and table.loc[n, "n_below"] == 0
