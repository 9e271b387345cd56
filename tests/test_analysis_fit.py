"""Scaling-law fits against published results and synthetic data with known coefficients."""

import numpy as np
import pandas as pd
import pytest

from analysis import fit, load
from analysis.report import PUBLISHED_FIT_CONFIGS

PUBLISHED = load.PUBLISHED_DIR  # in-repo package data: these tests never skip

VIT_PUBLISHED = dict(a_S=2.94e2, b_S=0.821, c_S=4.68e2, b_N=0.392, a_D=2.37e8, b_D=0.890, c=4.517)
T5_PUBLISHED = dict(a_S=16.8, b_S=0.722, c_S=45.0, b_N=0.245, a_D=6.90e8, b_D=0.203, c=0.651)


def test_vit_reproduces_published_coefficients():
    vit = load.load_frantar(PUBLISHED, "vit")
    result = fit.fit_law("sparse", vit, PUBLISHED_FIT_CONFIGS["vit"])
    for name, value in VIT_PUBLISHED.items():
        assert result.params[name] == pytest.approx(value, rel=0.01), name


def test_t5_fit_quality_and_heldout_prediction():
    t5 = load.load_frantar(PUBLISHED, "t5")
    assert len(t5) == 48
    cfg = PUBLISHED_FIT_CONFIGS["t5"]
    result = fit.fit_law("sparse", t5, cfg)
    assert result.objective <= fit.objective_of("sparse", T5_PUBLISHED, t5, cfg)
    assert result.rms_log_residual <= 0.011
    assert abs(result.params["b_N"] - 0.245) <= 0.02
    heldout = load.load_frantar(PUBLISHED, "t5", split="heldout")
    assert heldout["n_params_nonzero"].item() == 603_979_776
    (pred,) = result.predict(heldout)
    assert pred == pytest.approx(1.4827780204906797, rel=0.03)


def test_chinchilla_matches_besiroglu_refit():
    data = load.load_chinchilla(PUBLISHED, drop_highest=5)
    result = fit.fit_law("chinchilla", data, fit.FitConfig(huber_delta=1e-3))
    p = result.params
    assert abs(p["E"] - 1.8172) <= 0.01
    assert abs(p["alpha"] - 0.3473) <= 0.005
    assert abs(p["beta"] - 0.3672) <= 0.005
    assert p["A"] == pytest.approx(477.8, rel=0.15)
    assert p["B"] == pytest.approx(2143, rel=0.15)


def _sparse_table(params, noise, seed, sizes=(1e6, 4e6, 16e6, 64e6), tokens=(1e9, 4e9, 16e9)):
    rng = np.random.default_rng(seed)
    rows = [(s, n * (1 - s), d) for s in (0.0, 0.5, 0.75, 0.875) for n in sizes for d in tokens]
    df = pd.DataFrame(rows, columns=["sparsity", "n_params_nonzero", "tokens"])
    clean = fit.sparse_law(params, df["sparsity"], df["n_params_nonzero"], df["tokens"])
    df["eval_loss"] = clean * np.exp(noise * rng.standard_normal(len(df)))
    return load.tidy(df)


TRUE_SPARSE = dict(a_S=40.0, b_S=1.2, c_S=60.0, b_N=0.3, a_D=2e8, b_D=0.35, c=1.2)


def test_sparse_law_recovers_known_coefficients():
    df = _sparse_table(TRUE_SPARSE, noise=1e-3, seed=0)
    result = fit.fit_law("sparse", df, fit.FitConfig())
    p = result.params
    for name in ("b_S", "b_N", "b_D"):
        assert abs(p[name] - TRUE_SPARSE[name]) < 0.05 * TRUE_SPARSE[name], name
    assert p["c"] == pytest.approx(TRUE_SPARSE["c"], rel=0.05)
    assert result.rms_log_residual < 2e-3  # ~ the injected noise
    # Noise-free data: the fit is exact.
    exact = fit.fit_law("sparse", _sparse_table(TRUE_SPARSE, 0.0, 0), fit.FitConfig())
    for name, value in TRUE_SPARSE.items():
        assert exact.params[name] == pytest.approx(value, rel=1e-3), name


def test_fit_does_not_depend_on_row_order():
    df = _sparse_table(TRUE_SPARSE, noise=1e-2, seed=3)
    cfg = fit.FitConfig(n_boot=5, boot_starts=1)
    a = fit.fit_law("sparse", df, cfg)
    shuffled = df.sample(frac=1.0, random_state=7)
    b = fit.fit_law("sparse", shuffled, cfg)
    assert a.params == b.params and a.objective == b.objective
    pd.testing.assert_frame_equal(a.bootstrap, b.bootstrap)
    # residuals stay aligned with the caller's rows
    np.testing.assert_allclose(b.residuals, pd.Series(a.residuals, df.index)[shuffled.index])


def test_dense_and_moe_laws_recover_known_coefficients():
    n = np.geomspace(1e6, 1e9, 8)
    d = np.array([1e9, 1e10, 1e11])
    nn, dd = (a.ravel() for a in np.meshgrid(n, d))
    true = dict(E=1.7, A=400.0, alpha=0.34, B=1000.0, beta=0.28)
    df = load.tidy(
        pd.DataFrame(
            {"n_params_nonzero": nn, "tokens": dd, "eval_loss": fit.chinchilla_law(true, nn, dd)}
        )
    )
    chin = fit.fit_law("chinchilla", df)
    for name, value in true.items():
        assert chin.params[name] == pytest.approx(value, rel=1e-3), name

    true_n = dict(E=2.0, A=50.0, alpha=0.25)
    df_n = load.tidy(
        pd.DataFrame(
            {"n_params_nonzero": n, "tokens": 1e9, "eval_loss": fit.dense_n_law(true_n, n)}
        )
    )
    dense_n = fit.fit_law("dense_n", df_n)
    for name, value in true_n.items():
        assert dense_n.params[name] == pytest.approx(value, rel=1e-3), name

    experts = np.array([1, 4, 16, 64])
    na, ee = (a.ravel() for a in np.meshgrid(n[:4], experts))
    true_moe = dict(a=-0.08, b=-0.05, c=0.004, d=1.3)
    df_moe = load.tidy(
        pd.DataFrame(
            {
                "n_params_nonzero": na,
                "n_params_active": na,
                "num_experts": ee,
                "tokens": 1e9,
                "structure": "moe",
                "eval_loss": fit.moe_law(true_moe, na, ee, 1e6),
            }
        )
    )
    moe = fit.fit_law("moe", df_moe)
    for name, value in true_moe.items():
        assert moe.params[name] == pytest.approx(value, abs=1e-5), name


def test_bootstrap_interval_covers_truth():
    """95% percentile intervals of alpha contain the true value in most synthetic datasets."""
    true = dict(E=2.0, A=50.0, alpha=0.3)
    n = np.geomspace(1e6, 1e9, 12)
    cfg = fit.FitConfig(n_boot=30, boot_starts=0, seed=1)
    covered, widths = [], []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        loss = fit.dense_n_law(true, n) * np.exp(0.01 * rng.standard_normal(len(n)))
        df = load.tidy(pd.DataFrame({"n_params_nonzero": n, "tokens": 1e9, "eval_loss": loss}))
        lo, hi = fit.fit_law("dense_n", df, cfg).ci()["alpha"]
        covered.append(lo <= true["alpha"] <= hi)
        widths.append(hi - lo)
    assert np.mean(covered) >= 0.75
    assert 0 < np.median(widths) < 0.5  # informative, not degenerate


def test_huber_objective_matches_hand_computation():
    pred, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.1, 2.9])
    # |r| = 0, 0.1, 0.1 with delta 0.05 -> 0, 0.05*(0.1-0.025) twice.
    expect = (0 + 2 * 0.05 * (0.1 - 0.025)) / 3
    assert fit.huber_objective(pred, y, 0.05, log_loss=False) == pytest.approx(expect)
    r = np.log(pred) - np.log(y)
    expect_log = np.mean(np.where(np.abs(r) <= 1.0, 0.5 * r**2, np.abs(r) - 0.5))
    assert fit.huber_objective(pred, y, 1.0, log_loss=True) == pytest.approx(expect_log)


def test_leave_largest_out_holds_out_every_run_of_the_largest_total_size():
    df = _sparse_table(TRUE_SPARSE, 0.0, 0)
    df["n_params_total"] = df["n_params_nonzero"] / (1 - df["sparsity"])
    fit_small, held = fit.extrapolation_error("sparse", df)
    # Every sparsity and budget of the 64M model is held out, not only the dense runs.
    assert len(held) == 12 and np.allclose(held["n_params_total"], 64e6)
    assert set(held["sparsity"]) == {0.0, 0.5, 0.75, 0.875}
    assert fit_small.n_points == len(df) - 12
    assert np.abs(held["relative_error"]).max() < 1e-3


def test_identifiability_guard_flags_collinear_and_too_small_designs():
    n = np.geomspace(1e6, 1e8, 5)
    true = dict(E=1.7, A=400.0, alpha=0.34, B=1000.0, beta=0.28)
    d = 20 * n  # tokens ∝ N: N and D collinear (a "scaled" regime)
    df = load.tidy(
        pd.DataFrame(
            {"n_params_nonzero": n, "tokens": d, "eval_loss": fit.chinchilla_law(true, n, d)}
        )
    )
    result = fit.fit_law("chinchilla", df, fit.FitConfig(n_boot=5))
    assert not result.identified and result.bootstrap is None
    assert any("collinear" in i for i in result.issues)
    assert any("5 free parameters for 5" in i for i in result.issues)
    # One token count: the sparse law's D-term cannot be identified.
    one_d = _sparse_table(TRUE_SPARSE, 0.0, 0, tokens=(1e9,))
    assert any("one token count" in i for i in fit.identification_issues("sparse", one_d))
    # 2 sizes × 2 budgets: the 5 parameters of the N- and D-terms rest on 4 (N, D) budgets.
    small = _sparse_table(TRUE_SPARSE, 0.0, 0, sizes=(1e6, 4e6), tokens=(1e9, 4e9))
    assert any(
        "4 distinct (model size, D)" in i for i in fit.identification_issues("sparse", small)
    )
    # A full grid is identified; a parameter driven onto its bound is reported.
    assert fit.identification_issues("sparse", _sparse_table(TRUE_SPARSE, 0.0, 0)) == ()
    flat = load.tidy(pd.DataFrame({"n_params_nonzero": n, "tokens": 1e9, "eval_loss": 3.0}))
    flat_fit = fit.fit_law("dense_n", flat)
    assert flat_fit.identified and "E" not in flat_fit.on_bound and flat_fit.on_bound


def test_cluster_bootstrap_resamples_whole_seeds_within_sizes():
    df = pd.DataFrame(
        {
            "n_params_total": np.repeat([1e6, 2e6, 4e6, 8e6], 6),
            "seed": np.tile([0, 0, 0, 1, 1, 1], 4),
        }
    )
    clusters = fit._clusters(df)
    assert len(clusters) == 4 and all(len(c) == 2 for c in clusters)
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = fit.cluster_resample(clusters, rng)
        picked = df.iloc[rows]
        assert picked["n_params_total"].nunique() >= 3
        # A (size, seed) cluster is drawn whole: its 3 runs come together.
        assert (picked.groupby(["n_params_total", "seed"]).size() % 3 == 0).all()


def test_bad_inputs_raise_clear_errors():
    df = _sparse_table(TRUE_SPARSE, 0.0, 0)
    with pytest.raises(ValueError, match="unknown law"):
        fit.fit_law("kaplan", df)
    with pytest.raises(ValueError, match="only 3 runs"):
        fit.fit_law("sparse", df.head(3))
    bad = df.copy()
    bad.loc[2, "eval_loss"] = np.nan
    with pytest.raises(ValueError, match="eval_loss.*rows \\[2\\]"):
        fit.fit_law("sparse", bad)
    with pytest.raises(ValueError, match="init_grid has 2 axes"):
        fit.fit_law("sparse", df, fit.FitConfig(init_grid=((0.0,), (1.0,))))
    with pytest.raises(ValueError, match="huber_delta"):
        fit.FitConfig(huber_delta=0)
