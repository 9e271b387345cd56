"""A whole train step of an accelerator-sized run, compiled ahead of time for a TPU v5e 2×2 slice
without the chips (libtpu's deviceless topology, the `aot` extra): the sharded program builds,
and fsdp really splits the state (each chip holds about half of it)."""

import jax
import numpy as np
import pytest
from jax.experimental import topologies

from experiments import common
from launch.sweep import apply_overrides
from sparsescale import checkpoint as ckpt
from sparsescale import config as config_lib
from sparsescale import step as step_lib
from sparsescale.kernels import aot

pytestmark = pytest.mark.slow


def test_acc_19m_train_step_compiles_for_a_tpu_slice_with_data_and_fsdp_axes():
    reason = aot.target_available("tpu_v5e")
    if reason:
        pytest.skip(reason + " (pip install -c constraints.txt -e '.[aot]')")
    devices = topologies.get_topology_desc(aot.TARGETS["tpu_v5e"][1], "tpu").devices
    assert len(devices) == 4
    overrides = {
        "model.name": "acc_19m", "model.max_len": 256, "data.seq_len": 256,
        "data.batch_size": 16, "sparsity.structure": "unstructured", "sparsity.target": 0.875,
        "mesh.data": 2, "mesh.fsdp": 2, "train.steps": 100,
    }  # fmt: skip
    cfg = config_lib.run_config(apply_overrides(common.base_config(), overrides, "aot"))
    trainer = step_lib.build(cfg, devices=devices)
    state = ckpt.abstract_with_shardings(jax.eval_shape(trainer.init_fn), trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((16, 257), np.int32, sharding=trainer.batch_sharding)
    compiled = trainer.step_fn.lower(state, batch).compile()
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_chip = compiled.memory_analysis().argument_size_in_bytes
    assert 0.4 * whole < per_chip < 0.65 * whole  # fsdp = 2: about half, embeddings replicated
