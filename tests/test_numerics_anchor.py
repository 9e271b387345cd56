"""Numerics anchor: a fixed smoke run and one stacked job (50%, 75% and dense, shared prefix)
give, within 1e-6, the losses the training path gave before the compile-plan redesign (code
b9a1c59, on the tests' 4 CPU devices). A change to the training path that moves them must say
why here; the committed sweep records were trained on that path."""

import numpy as np
import pytest

from sparsescale import config as config_lib
from sparsescale import train

VARIANTS = (
    {"sparsity.target": 0.5},
    {"sparsity.target": 0.75, "train.seed": 1, "data.seed": 1, "sparsity.seed": 1},
    {"sparsity.structure": "dense", "sparsity.target": 0.0},
)
COMMON = {"train.steps": 12, "train.log_every": 1, "train.ckpt_every": 12}
# train/loss at steps 1..12 and the final eval loss, measured at b9a1c59
SINGLE = {
    "train": [
        5.763638973236084,
        6.004438400268555,
        5.540422439575195,
        5.126462936401367,
        4.765478134155273,
        4.527299404144287,
        4.533972263336182,
        4.868398666381836,
        3.9442262649536133,
        4.533721446990967,
        4.476283073425293,
        4.328094482421875,
    ],
    "eval": 4.615948915481567,
}
STACK = [
    {
        "train": [
            5.763638973236084,
            6.004438400268555,
            5.540422439575195,
            5.126462936401367,
            4.765478134155273,
            4.527299404144287,
            4.533972263336182,
            4.868398666381836,
            3.9442262649536133,
            4.533721446990967,
            4.476283073425293,
            4.328094482421875,
        ],
        "eval": 4.615948915481567,
    },
    {
        "train": [
            6.02439022064209,
            5.867429733276367,
            5.458710193634033,
            5.09315824508667,
            5.1265082359313965,
            5.117434024810791,
            4.91635799407959,
            4.209905624389648,
            5.018381595611572,
            4.259050369262695,
            4.879757881164551,
            4.662775993347168,
        ],
        "eval": 4.71618127822876,
    },
    {
        "train": [
            5.763638973236084,
            6.004438400268555,
            5.540422439575195,
            5.126462936401367,
            4.702831268310547,
            4.441054821014404,
            4.471490383148193,
            4.792376518249512,
            3.880891799926758,
            4.453039646148682,
            4.398681640625,
            4.235261917114258,
        ],
        "eval": 4.514197826385498,
    },
]


def _losses(workdir, summary, metric_lines):
    return {"train": [r["train/loss"] for r in metric_lines(workdir)], "eval": summary["eval_loss"]}


def _check(got, expected):
    np.testing.assert_allclose(got["train"], expected["train"], rtol=0, atol=1e-6)
    assert got["eval"] == pytest.approx(expected["eval"], abs=1e-6)


def test_single_run_reproduces_its_losses(tmp_path, smoke_config, metric_lines):
    cfg = config_lib.run_config(smoke_config(**COMMON, run_id="single"))
    summary = train.run(cfg, tmp_path / "single")
    _check(_losses(tmp_path / "single", summary, metric_lines), SINGLE)


def test_stacked_job_reproduces_its_losses(tmp_path, smoke_config, metric_lines):
    cfgs = [
        config_lib.run_config(smoke_config(**{**COMMON, **v, "run_id": f"v{i}"}))
        for i, v in enumerate(VARIANTS)
    ]
    summaries = train.run_stack(cfgs, [tmp_path / c.run_id for c in cfgs])
    for cfg, summary, expected in zip(cfgs, summaries, STACK, strict=True):
        _check(_losses(tmp_path / cfg.run_id, summary, metric_lines), expected)
