"""Config validation (sparsescale/config.py): bad input fails before anything compiles."""

import hashlib
import json

import jax
import pytest

from sparsescale import config as config_lib
from sparsescale import step as step_lib


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "cpu_huge"}, "Unknown model preset"),
        ({"sparsity.structure": "nm", "sparsity.n": 50, "sparsity.m": 100}, "divisible by m=100"),
        ({"sparsity.structure": "nm", "sparsity.n": 4, "sparsity.m": 4}, "0 < n < m"),
        ({"sparsity.target": 1.5}, r"\[0, 1\)"),
        ({"data.name": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
        ({"data.seq_len": 64}, "exceeds model.max_len"),
        ({"train.steps": 0}, "train.steps"),
        ({"mesh.data": 3}, "needs 3 devices"),
        ({"sparsity.structure": "block", "sparsity.block": (5, 5)}, "does not divide"),
        ({"sparsity.structure": "dense", "sparsity.target": 0.75}, "structure 'dense' with target"),
        ({"sparsity.structure": "nm", "sparsity.target": 0.9}, "but target is 0.9"),
        ({"train.eval_every": -1}, "eval_every must be >= 0"),
        ({"data.batch_size": 6, "mesh.data": 4}, "not divisible by the 4 batch shards"),
    ],
)
def test_invalid_configs_fail_before_compile(overrides, message, smoke_config):
    c = smoke_config(**overrides)
    with pytest.raises(ValueError, match=message):
        cfg = config_lib.run_config(c)
        step_lib.build(cfg, jax.devices())  # shape checks need the model's shapes (no compile)


def test_schedule_updates_key_and_hash(smoke_config):
    """`sparsity.schedule.updates` unset leaves the config hash as it was before the key existed."""
    unset = config_lib.run_config(smoke_config())
    assert unset.sparsity.schedule.updates is None
    d = unset.to_dict()
    d["sparsity"]["schedule"].pop("updates")
    d["data"].pop("eval_batch_size")  # also later than the hash: unset, it is left out too
    for k in ("run_id", "experiment", "tag"):
        d.pop(k)
    assert unset.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    fixed = config_lib.run_config(smoke_config(**{"sparsity.schedule.updates": 4}))
    assert fixed.sparsity.schedule.updates == 4 and fixed.hash() != unset.hash()


def test_records_written_before_eval_batch_size_existed_still_match_their_configs():
    """The lr_800k records (code 5646c47) predate data.eval_batch_size: their config hashes must
    equal those of the same runs expanded now, so the launcher still reuses them."""
    import pathlib

    from launch import sweep

    repo = pathlib.Path(__file__).resolve().parents[1]
    expanded = sweep.expand(str(repo / "experiments" / "crossover.py") + ":lr_800k")
    records = {
        r["summary"]["run_id"]: r
        for r in map(json.loads, map(pathlib.Path.read_text,
                                     (repo / "docs/records/crossover/lr_800k").glob("*.json")))
    }  # fmt: skip
    assert len(records) == len(expanded.runs) == 3
    for run, config in zip(expanded.runs, expanded.configs, strict=True):
        assert records[run.run_id]["config_hash"] == config_lib.run_config(config).hash()
