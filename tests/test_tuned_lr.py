"""The tuned learning rate every experiment preset trains at (experiments/common.tuned_lr)."""

import math

import numpy as np
import pytest

from experiments import common
from launch import sweep as sweep_lib
from sparsescale import accounting
from sparsescale import model as model_lib

EXPERIMENTS = ("fig1_size", "fig2_structure", "fig3_moe", "fig4_tasks", "fig6_costs", "single_run")


def _n(name):
    return accounting.param_counts(model_lib.preset(name))["non_embedding"]


def test_measured_sizes_are_their_grid_optimum():
    for name, lr in common.LR_MEASURED.items():
        assert common.tuned_lr(name) == (lr, "tuned")


def test_between_sizes_is_read_off_the_log_log_line():
    names = sorted(common.LR_MEASURED, key=_n)
    log_n = np.log([_n(s) for s in names])
    log_lr = np.log([common.LR_MEASURED[s] for s in names])
    lr, how = common.tuned_lr("cpu_480k_d200")  # 481K: between 332K and 788K
    assert how == "interpolated"
    assert lr == pytest.approx(math.exp(np.interp(math.log(_n("cpu_480k_d200")), log_n, log_lr)))
    assert common.LR_MEASURED["cpu_800k"] < lr < common.LR_MEASURED["cpu_330k"]


def test_beyond_the_largest_size_continues_the_last_segment():
    n0, n1 = _n("cpu_330k"), _n("cpu_800k")
    slope = math.log(0.0113 / 0.0117) / math.log(n1 / n0)  # hand: the 332K → 788K segment
    lr, how = common.tuned_lr("cpu_3.8m_d400")
    assert how == "extrapolated"
    assert lr == pytest.approx(0.0113 * (_n("cpu_3.8m_d400") / n1) ** slope)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_quick_run_trains_at_its_size_tuned_lr(experiment):
    sweep = sweep_lib.expand(f"experiments/{experiment}.py:quick")
    assert sweep.configs
    for config in sweep.configs:
        expected = round(common.tuned_lr(config.model.name)[0], 5)
        assert config.train.lr == pytest.approx(expected, abs=0)


def test_the_first_headline_sweep_keeps_its_one_lr():
    sweep = sweep_lib.expand("experiments/headline.py:cpu")
    assert {config.train.lr for config in sweep.configs} == {3e-3}
