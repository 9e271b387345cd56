"""Derived results on hand-worked examples."""

import numpy as np
import pandas as pd
import pytest

from analysis import derived, load
from analysis.fit import FitConfig, FitResult, sparse_law


def _fit_with(params, boot=None):
    return FitResult(
        "sparse",
        params,
        0.0,
        np.zeros(1),
        1,
        FitConfig(),
        np.zeros(7),
        None if boot is None else pd.DataFrame(boot),
    )


def test_effective_multiplier_and_dense_equivalent_by_hand():
    p = dict(a_S=1.0, b_S=1.0, c_S=1.0, b_N=0.5, a_D=1e9, b_D=0.3, c=1.0)
    # ((a_S + c_S) / (a_S * 0.5 + c_S))^(1/b_N) = (2 / 1.5)^2 = 16/9.
    assert derived.effective_param_multiplier(p, 0.5) == pytest.approx(16 / 9)
    assert derived.effective_param_multiplier(p, 0.0) == pytest.approx(1.0)
    n_eq = derived.dense_equivalent_size(p, 0.5, 9e6)
    assert n_eq == pytest.approx(16e6)
    # The dense model of that size reaches the same loss as the sparse one.
    assert sparse_law(p, 0.0, n_eq, 1e10) == pytest.approx(sparse_law(p, 0.5, 9e6, 1e10))


def test_tolerance_from_fit_by_hand():
    # a_S = 0, c_S = 1, b_N = 1: ΔL(S, N) = (1/(N(1-S)) - 1/N) = S / ((1-S) N), so the largest S
    # with ΔL <= eps is S* = eps N / (1 + eps N).
    p = dict(a_S=0.0, b_S=1.0, c_S=1.0, b_N=1.0, a_D=1e9, b_D=0.5, c=2.0)
    wide = (0.1, 0.99)
    out = derived.tolerance_from_fit(
        _fit_with(p), [100.0, 300.0], 1e9, derived.Tolerance(0.01), s_range=wide
    )
    np.testing.assert_allclose(out["s_star"], [0.5, 0.75], atol=1e-8)
    assert list(out["status"]) == ["bracketed", "bracketed"]
    # Relative: eps * L_dense with L_dense = 1/N + (a_D/D)^b_D + c = 0.01 + 1 + 2 at N=100.
    rel = derived.Tolerance(0.01 / 3.01, relative=True)
    out = derived.tolerance_from_fit(_fit_with(p), 100.0, 1e9, rel, s_range=wide)
    assert out["s_star"].item() == pytest.approx(0.5, abs=1e-8)
    # Each size's own prunable fraction: with f = 0.5, S f / (1 − S f) = 1 at S = 1: censored.
    out = derived.tolerance_from_fit(
        _fit_with(p), 100.0, 1e9, derived.Tolerance(0.01), prunable_fraction=0.5, s_range=wide
    )
    assert out["status"].item() == "above" and out["s_star"].item() == 0.99
    # Outside the tested range the result is censored, never extrapolated to S = 0.
    out = derived.tolerance_from_fit(_fit_with(p), 100.0, 1e9, derived.Tolerance(0.01))
    assert out["status"].item() == "below" and out["s_star"].item() == 0.5
    # Bootstrap interval: the percentiles of S* over parameter samples.
    boot = [dict(p, c_S=c) for c in (0.5, 1.0, 2.0)]  # S* = eps N / (c_S + eps N)
    out = derived.tolerance_from_fit(
        _fit_with(p, boot), 100.0, 1e9, derived.Tolerance(0.01), s_range=wide
    )
    lo, hi = out["lo"].item(), out["hi"].item()
    assert 1 / 3 <= lo < 0.5 < hi <= 2 / 3


def test_optimal_sparsity_by_hand():
    # b_S = b_D = 1: L(u = 1-S) = (a_S u + c_S) N^-b_N + a_D / D + c with D = C u / (6 N);
    # dL/du = 0 at u^2 = a_D N^b_N / (a_S C / (6 N)). N = 1e6, b_N = 0.5, a_S = 1e3, a_D = 1e9,
    # C = 2.4e16: u^2 = 1e9 * 1e3 / (1e3 * 4e9) = 0.25 -> S = 0.5.
    p = dict(a_S=1e3, b_S=1.0, c_S=1.0, b_N=0.5, a_D=1e9, b_D=1.0, c=1.0)
    out = derived.optimal_sparsity(p, 1e6, [2.4e16, 2.4e16 * 4, 1e14])
    assert out["sparsity"][0] == pytest.approx(0.5, abs=1e-6)
    assert out["sparsity"][1] == pytest.approx(0.75, abs=1e-6)  # u^2 = 1/16
    assert out["sparsity"][2] == 0.0  # u^2 > 1: the dense model is optimal
    assert out["tokens"][0] == pytest.approx(2.4e16 * 0.5 / 6e6)


def _runs(rows):
    df = pd.DataFrame(
        rows,
        columns=[
            "n_params_total",
            "sparsity",
            "structure",
            "eval_loss",
            "nm_m",
            "block_size",
            "seed",
        ],
    )
    df["n_params_nonzero"] = df["n_params_total"] * (1 - df["sparsity"])
    df["tokens"] = 1e9
    return load.tidy(df)


def test_structure_penalty_by_hand():
    nan = float("nan")
    df = _runs(
        [
            (1e6, 0.5, "unstructured", 3.0, nan, nan, 0),
            (1e6, 0.5, "unstructured", 3.2, nan, nan, 1),
            (1e6, 0.5, "nm", 3.3, 4, nan, 0),
            (1e6, 0.5, "nm", 3.15, 8, nan, 0),
            (1e6, 0.5, "block", 3.5, nan, 16, 0),
            (1e6, 0.75, "nm", 3.9, 4, nan, 0),  # no partner
        ]
    )
    pen = derived.structure_penalty(df)
    assert list(zip(pen["structure"], pen["group_size"], strict=True)) == [
        ("block", 16.0),
        ("nm", 4.0),
        ("nm", 8.0),
    ]
    # Paired within seeds: the structured runs are seed 0, so they are compared with the seed-0
    # unstructured run (3.0), not with the mean over seeds (3.1).
    np.testing.assert_allclose(pen["penalty"], [0.5, 0.3, 0.15], atol=1e-12)
    np.testing.assert_allclose(pen["relative_penalty"], np.array([0.5, 0.3, 0.15]) / 3.0)
    assert (pen["n_seeds"] == 1).all()
