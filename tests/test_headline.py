"""The headline experiment's design meets its specification (issue: sizes, budget, steps, seeds,
levels, budget arm, matched schedule), and its analysis splits the arm into one regime per budget."""

import collections

import pandas as pd

from analysis import load
from experiments import headline
from sparsescale import accounting
from sparsescale import model as model_lib


def _non_embedding(size: str) -> int:
    return accounting.param_counts(model_lib.preset(size))["non_embedding"]


def test_cpu_sweep_meets_the_design():
    runs = headline.get_sweep("cpu")
    config = headline.get_config("cpu")
    main = [r for r in runs if r["tag"] == "main"]
    sizes = {r["model.name"]: _non_embedding(r["model.name"]) for r in main}
    assert len(sizes) >= 5 and max(sizes.values()) / min(sizes.values()) >= 30
    for r in main:
        tokens = r["train.steps"] * r["data.batch_size"] * config.data.seq_len
        assert abs(tokens / sizes[r["model.name"]] - 21) < 0.5  # one budget per parameter
        assert r["train.steps"] >= 500
    levels = {r["sparsity.target"] for r in main}
    assert {0.0, 0.25, 0.375, 0.875, 0.9375} <= levels
    # paired: every (size, seed) has every level, and one seed drives init, data and masks
    cells = collections.Counter((r["model.name"], r["train.seed"]) for r in main)
    assert set(cells.values()) == {len(levels)}
    assert len({r["train.seed"] for r in main}) >= 3
    assert all(r["train.seed"] == r["data.seed"] == r["sparsity.seed"] for r in runs)
    # the budget arm: two of the smaller sizes at two other budgets
    arm = {(r["model.name"], r["train.steps"]) for r in runs if r["tag"] == "arm"}
    assert len({s for s, _ in arm}) == 2 and len(arm) == 4
    assert {s for s, _ in arm} <= set(sorted(sizes, key=sizes.get)[:3])
    # matched schedule: a fixed number of mask updates, not an interval in steps
    assert config.sparsity.schedule.updates == 16


def test_analysis_labels_one_regime_per_budget():
    n = 1000.0
    frame = pd.DataFrame({load.SIZE: n, "tokens": [21.0e3, 20.9e3, 5.0e3, 5.1e3, 80.2e3, 79.6e3]})
    labels = headline.by_budget(frame)["tag"].tolist()
    assert labels == [
        "21 tokens per parameter",
        "21 tokens per parameter",
        "5 tokens per parameter",
        "5 tokens per parameter",
        "80 tokens per parameter",
        "80 tokens per parameter",
    ]
