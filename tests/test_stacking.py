"""Stacked training (K runs in one vmapped step) against the same runs trained one by one."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsescale import config as config_lib
from sparsescale import stack_rules, train
from sparsescale import step as step_lib

VARIANTS = (
    {"sparsity.target": 0.5},
    {"sparsity.target": 0.75, "train.seed": 1, "data.seed": 1, "sparsity.seed": 1},
    {"sparsity.structure": "dense", "sparsity.target": 0.0},
)


def _cfgs(smoke_config, **common):
    return [
        config_lib.run_config(smoke_config(**{**common, **v, "run_id": f"v{i}"}))
        for i, v in enumerate(VARIANTS)
    ]


def test_stack_groups_follow_the_rules(smoke_config):
    cfg = lambda **o: config_lib.run_config(smoke_config(**o))  # noqa: E731
    runs = [
        cfg(**{"sparsity.target": 0.5}),
        cfg(**{"sparsity.target": 0.9, "train.seed": 3, "data.seed": 2, "tag": "x"}),
        cfg(**{"sparsity.structure": "dense", "sparsity.target": 0.0}),  # joins as 0%
        cfg(**{"sparsity.target": 0.5, "train.lr": 1e-2}),  # another optimizer
        cfg(
            **{"sparsity.structure": "nm", "sparsity.n": 2, "sparsity.m": 4}
        ),  # n:m is the structure
        cfg(**{"sparsity.structure": "nm", "sparsity.n": 1, "sparsity.m": 4, "sparsity.target": 0}),
        cfg(**{"sparsity.structure": "nm", "sparsity.n": 2, "sparsity.m": 4, "train.seed": 1}),
        cfg(**{"sparsity.target": 0.5, "model.name": "cpu_50k"}),  # another model
    ]
    assert sorted(stack_rules.stack_groups(runs)) == [[0, 1, 2], [3], [4, 6], [5], [7]]
    assert (
        stack_rules.check_stackable([runs[2], runs[0]]) is runs[0]
    )  # built from the sparse recipe
    block = {"sparsity.structure": "block", "sparsity.block": (8, 8), "sparsity.impl": "block"}
    fast = [
        cfg(**block, **{"sparsity.target": 0.5}),
        cfg(**block, **{"sparsity.target": 0.75, "train.seed": 1}),
        cfg(**{"sparsity.structure": "dense", "sparsity.target": 0.0}),  # would keep it masked
        cfg(**{**block, "sparsity.impl": "masked", "sparsity.target": 0.5}),
    ]
    assert sorted(stack_rules.stack_groups(fast)) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot be stacked"):
        stack_rules.check_stackable([runs[0], runs[3]])


def test_stacked_run_equals_separate_runs(tmp_path, final_state, metric_lines, smoke_config):
    cfgs = _cfgs(smoke_config, **{"train.steps": 12, "train.log_every": 1, "train.ckpt_every": 12})
    stacked = train.run_stack(cfgs, [tmp_path / "stack" / c.run_id for c in cfgs])
    for cfg, summary in zip(cfgs, stacked, strict=True):
        alone = train.run(cfg, tmp_path / "alone" / cfg.run_id)
        got = metric_lines(tmp_path / "stack" / cfg.run_id)
        ref = metric_lines(tmp_path / "alone" / cfg.run_id)
        assert [sorted(g) for g in got] == [sorted(r) for r in ref]  # same metrics, same format
        for key in ("train/loss", "norms/grad", "sparsity/overall"):
            if key in ref[0]:
                np.testing.assert_allclose(
                    [g[key] for g in got], [r[key] for r in ref], rtol=2e-5, err_msg=key
                )
        assert sorted(summary) == sorted(alone)
        assert summary["eval_loss"] == pytest.approx(alone["eval_loss"], rel=2e-5)
        for key in ("n_params_nonzero", "sparsity", "structure", "seed", "run_id", "schedule"):
            assert summary[key] == alone[key], key
        (_, a), (_, b) = (final_state(tmp_path / d / cfg.run_id) for d in ("stack", "alone"))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # checkpoints too
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert stacked[2]["structure"] == "dense" and stacked[1]["sparsity"] == 0.75


def test_nan_in_one_variant_fails_only_that_variant(
    tmp_path, monkeypatch, metric_lines, smoke_config
):
    cfgs = _cfgs(smoke_config, **{"train.steps": 8, "train.log_every": 2, "train.ckpt_every": 4})
    clean = train.run_stack(cfgs, [tmp_path / "clean" / c.run_id for c in cfgs])

    build = step_lib.build

    def poisoned_build(*args, **kwargs):  # variant 1's weights turn NaN in step 6
        trainer = build(*args, **kwargs)
        step_fn = trainer.step_fn

        def step(state, batch, variants):
            if int(state["step"]) == 5:
                params = state["params"]
                state = {
                    **state,
                    "params": jax.tree.map(lambda x: x.at[1].set(np.nan), params),
                }
            return step_fn(state, batch, variants)

        trainer.step_fn = step
        return trainer

    monkeypatch.setattr(step_lib, "build", poisoned_build)
    got = train.run_stack(cfgs, [tmp_path / "nan" / c.run_id for c in cfgs])
    assert got[1] is None
    failed = json.loads((tmp_path / "nan" / "v1" / "failed.json").read_text())
    assert "non-finite" in failed["error"] and failed["step"] == 4
    assert not (tmp_path / "nan" / "v1" / "summary.json").exists()
    assert [m["step"] for m in metric_lines(tmp_path / "nan" / "v1")] == [2, 4]
    for k in (0, 2):  # the others are untouched by their neighbour's NaN
        assert got[k]["eval_loss"] == clean[k]["eval_loss"]
        assert (
            metric_lines(tmp_path / "nan" / f"v{k}")[-1]["train/loss"]
            == (metric_lines(tmp_path / "clean" / f"v{k}")[-1]["train/loss"])
        )


def _job(tmp_path: Path, name: str, steps: int) -> Path:
    from experiments import common
    from launch.sweep import apply_overrides

    runs = []
    for i, v in enumerate(VARIANTS):
        c = common.smoke(common.base_config())
        c.sparsity.structure = "unstructured"
        over = {"train.steps": steps, "train.ckpt_every": 4, "train.log_every": 1, **v}
        runs.append(
            {
                "workdir": str(tmp_path / name / f"v{i}"),
                "config": apply_overrides(c, {**over, "run_id": f"v{i}"}, "test").to_dict(),
            }
        )
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": runs}))
    return path


FORKED = (  # seed 0 shares one prefix three ways; seed 1 trains its own
    {"sparsity.target": 0.5},
    {"sparsity.target": 0.875},
    {"sparsity.structure": "dense", "sparsity.target": 0.0},
    {"sparsity.target": 0.75, "train.seed": 1, "data.seed": 1, "sparsity.seed": 1},
)


def test_shared_prefix_is_trained_once_and_forks_bit_identically(
    tmp_path, monkeypatch, final_state, metric_lines, smoke_config
):
    common = {"train.steps": 16, "train.log_every": 1, "train.ckpt_every": 2,
              "sparsity.schedule.start": 0.25, "sparsity.schedule.every": 2}  # fmt: skip
    cfgs = [
        config_lib.run_config(smoke_config(**{**common, **v, "run_id": f"v{i}"}))
        for i, v in enumerate(FORKED)
    ]
    cfgs = [dataclasses.replace(c, train=dataclasses.replace(c.train, keep_ckpts=10)) for c in cfgs]
    assert stack_rules.shared_prefix(cfgs) == (4, [0, 3], [0, 0, 0, 1])  # pruning starts at step 4
    with monkeypatch.context() as m:  # the reference: every variant trained from step 0
        m.setattr(stack_rules, "shared_prefix", lambda cfgs: (0, [], []))
        ref = train.run_stack(cfgs, [tmp_path / "ref" / c.run_id for c in cfgs])
    forked = train.run_stack(cfgs, [tmp_path / "fork" / c.run_id for c in cfgs])

    # Resume inside the prefix: the forked job's files as they stood at step 2.
    for c in cfgs:
        src, dst = tmp_path / "fork" / c.run_id, tmp_path / "resumed" / c.run_id
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("summary.json", ".lock"))
        for d in (dst / "checkpoints").iterdir():
            if d.name.isdigit() and int(d.name) > 2:
                shutil.rmtree(d)
    resumed = train.run_stack(cfgs, [tmp_path / "resumed" / c.run_id for c in cfgs])

    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    for k, c in enumerate(cfgs):
        want = strip(metric_lines(tmp_path / "ref" / c.run_id))
        assert [r["step"] for r in want] == list(range(1, 17))
        for run, summaries in (("fork", forked), ("resumed", resumed)):
            assert strip(metric_lines(tmp_path / run / c.run_id)) == want, (run, c.run_id)
            assert summaries[k]["eval_loss"] == ref[k]["eval_loss"]
            assert summaries[k]["train_loss"] == ref[k]["train_loss"]
            (_, a), (_, b) = (
                final_state(tmp_path / "ref" / c.run_id),
                final_state(tmp_path / run / c.run_id),
            )
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sparsities = [
        metric_lines(tmp_path / "fork" / f"v{i}")[-1].get("sparsity/overall") for i in (0, 1)
    ]
    assert sparsities[0] < sparsities[1]  # the variants did branch


@pytest.mark.slow
def test_killed_stacked_job_resumes_every_variant_exactly(
    tmp_path, same_training, metric_lines, run_env
):
    cmd = lambda job: [sys.executable, "-m", "sparsescale.stack", str(job)]  # noqa: E731
    subprocess.run(cmd(_job(tmp_path, "ref", 20)), env=run_env(), check=True, capture_output=True)

    job = _job(tmp_path, "killed", 20)  # dies after step 9 (the hook)
    last = tmp_path / "killed" / "v2"
    died = subprocess.run(
        cmd(job), env={**run_env(), train.EXIT_AFTER_STEP: "9"}, capture_output=True, text=True
    )
    assert died.returncode == 137, died.stderr[-2000:]
    assert len(metric_lines(last)) == 9
    assert not (last / "summary.json").exists()
    done = subprocess.run(cmd(job), env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from step" in done.stderr

    for i in range(len(VARIANTS)):
        same_training(tmp_path / "ref" / f"v{i}", tmp_path / "killed" / f"v{i}", 20)


def test_a_stack_of_one_is_the_single_run(tmp_path, metric_lines, smoke_config):
    """K = 1 runs the one-run step on the squeezed state: the same numbers, bit for bit."""
    cfg = config_lib.run_config(
        smoke_config(**{"train.steps": 12, "train.log_every": 1, "train.ckpt_every": 12})
    )
    alone = train.run(cfg, tmp_path / "alone")
    (stacked,) = train.run_stack([cfg], [tmp_path / "stack"])
    losses = [[r["train/loss"] for r in metric_lines(tmp_path / d)] for d in ("alone", "stack")]
    assert losses[0] == losses[1] and stacked["eval_loss"] == alone["eval_loss"]
