"""The jitted step (sparsescale/step.py): sharded equals single device, restores across meshes, pruning invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsescale import config as config_lib
from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import step as step_lib


def _losses(cfg, devices, steps):
    trainer = step_lib.build(cfg, devices)
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step_fn(state, step_lib.global_batch(trainer, next(it)))
        losses.append(float(metrics["train/loss"]))
    return np.array(losses), float(metrics["sparsity/overall"])


def test_sharded_equals_single_device(smoke_config):
    base = smoke_config(**{"train.steps": 10})
    ref, ref_sparsity = _losses(config_lib.run_config(base), jax.devices()[:1], 10)
    assert ref_sparsity == pytest.approx(0.5)
    for mesh in (dict(data=4), dict(data=2, tensor=2), dict(data=1, tensor=4), dict(fsdp=4)):
        mesh_overrides = {f"mesh.{k}": mesh.get(k, 1) for k in ("data", "fsdp", "tensor")}
        c = smoke_config(**{"train.steps": 10, **mesh_overrides})
        got, sparsity = _losses(config_lib.run_config(c), jax.devices()[:4], 10)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=str(mesh))
        assert sparsity == ref_sparsity


def test_zero_output_layer_gives_ln_256():
    cfg = model_lib.preset("cpu_25k", max_len=16)
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
    model.unembed.kernel[...] = jnp.zeros_like(model.unembed.kernel[...])
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
    logits, _ = model(tokens[:, :-1])
    loss = jnp.mean(step_lib.cross_entropy(logits, tokens[:, 1:]))
    assert float(loss) == pytest.approx(math.log(256), rel=1e-6)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path, smoke_config):
    from sparsescale import checkpoint as ckpt

    saved = step_lib.build(
        config_lib.run_config(smoke_config(**{"mesh.data": 4})), jax.devices()[:4]
    )
    state = saved.init_fn()
    it = data_lib.train_iterator(saved.cfg.data)
    for _ in range(3):
        state, _ = saved.step_fn(state, step_lib.global_batch(saved, next(it)))
    checkpointer = ckpt.Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, state, it, {"wall_time_s": 0.0})
    expected = next(it)

    other_cfg = smoke_config(**{"mesh.data": 1, "mesh.tensor": 2, "mesh.fsdp": 2})
    other = step_lib.build(config_lib.run_config(other_cfg), jax.devices()[:4])
    abstract = ckpt.abstract_with_shardings(jax.eval_shape(other.init_fn), other.state_shardings)
    it2 = data_lib.train_iterator(other.cfg.data)
    restored, meta = checkpointer.restore(3, abstract, it2)
    checkpointer.close()
    assert meta["wall_time_s"] == 0.0
    np.testing.assert_array_equal(next(it2), expected)  # data iterator resumed exactly
    kernel = restored["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "overrides",
    [
        {"sparsity.method": "rigl", "sparsity.schedule.kind": "dynamic"},
        {"sparsity.method": "set", "sparsity.schedule.kind": "dynamic"},
        {"sparsity.method": "srste", "sparsity.structure": "nm", "sparsity.schedule.every": 1},
    ],
)
def test_dynamic_and_srste_training_keep_their_invariants(overrides, smoke_config):
    c = smoke_config(**{"train.steps": 8, "sparsity.schedule.start": 0.0, **overrides})
    cfg = config_lib.run_config(c)
    trainer = step_lib.build(cfg, jax.devices()[:1])
    state = trainer.init_fn()
    it = data_lib.train_iterator(cfg.data)
    first_masks = jax.tree.map(np.asarray, state["masks"])
    for _ in range(6):
        state, metrics = trainer.step_fn(state, step_lib.global_batch(trainer, next(it)))
        assert np.isfinite(float(metrics["train/loss"]))
    up = state["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    mask = np.asarray(state["masks"]["blocks"][0]["mlp"]["up"]["mask"])
    if cfg.sparsity.method == "srste":  # exact 2:4 masks; pruned weights keep training (dense)
        assert (mask.reshape(-1, 4, mask.shape[-1]).sum(1) == 2).all()
        assert (np.asarray(up)[~mask] != 0).any()
    else:  # exact count kept, pruned weights exactly zero, and the masks moved
        assert float(metrics["sparsity/overall"]) == pytest.approx(0.5, abs=1e-3)
        assert (np.asarray(up)[~mask] == 0).all()
        changed = jax.tree.map(lambda a, b: (a != np.asarray(b)).any(), first_masks, state["masks"])
        assert any(jax.tree.leaves(changed))


GPU_HOST_CHECK = """
import json, math
import jax
from experiments import single_run
from sparsescale import config as config_lib, step as step_lib

cfg = config_lib.run_config(single_run.get_config("gpu_host"))
trainer = step_lib.build(cfg, jax.devices())
shapes = jax.tree.leaves(jax.eval_shape(trainer.init_fn))
shardings = jax.tree.leaves(trainer.state_shardings)
whole = sum(x.size * x.dtype.itemsize for x in shapes)
per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in zip(shapes, shardings, strict=True))
print(json.dumps(dict(mesh=dict(trainer.mesh.shape), whole=whole, per_device=per_device)))
"""


def test_gpu_host_preset_splits_the_state_four_ways(run_env):
    """experiments/single_run.py:gpu_host on 8 (fake) devices: the mesh is data × fsdp × tensor
    = 2 × 2 × 2 and each device holds about a quarter of acc_1b's state (from shapes and
    shardings; nothing runs). test_sharded_equals_single_device runs these axes in pairs (a
    mesh of all three needs 8 devices, whose CPU collectives can time out on a loaded 2-core
    machine)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", GPU_HOST_CHECK], env=run_env(8), timeout=600,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert r["whole"] > 12e9  # 1B parameters: float32 values, masks and two AdamW moments
    assert 0.24 * r["whole"] < r["per_device"] < 0.3 * r["whole"]
