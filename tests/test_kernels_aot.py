"""Deviceless AOT compilation of the kernels for TPU v5e / v6e (libtpu) and H100 (CUDA plugin),
forward and backward, with the tiles the ops pick automatically; and `check_config` against the
real compilers: configurations it accepts compile, configurations it rejects fail to compile.
Last, a whole sharded train step of an accelerator-sized run for a TPU slice.

CI installs: pip install "jax[tpu]==0.10.2" jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

from experiments import common
from launch.sweep import apply_overrides
from sparsescale import checkpoint as ckpt
from sparsescale import config as config_lib
from sparsescale import step as step_lib
from sparsescale.kernels import (
    BlockPacked,
    BlockTiles,
    NMPacked,
    NMTiles,
    aot,
    block_matmul,
    check_config,
    nm_matmul,
)
from sparsescale.kernels.formats import nm_layout
from sparsescale.kernels.tiles import pick_block_tiles, pick_nm_tiles

S = jax.ShapeDtypeStruct


def test_h100_target_config_ships_with_the_package():
    path = aot.h100_target_config_path()
    assert path.name == "h100_target_config.txtpb" and path.parent.name == "kernels", path
    assert path.read_text().strip()


def require(target):
    reason = aot.target_available(target)
    if reason:
        pytest.skip(reason + " (install jax[tpu] / jax-cuda12-plugin, see module docstring)")


def compile_program(target, program):
    fn, avals = program
    return aot.compile_for(target, fn, *avals)


def nm_program(target, n, m, k, cols, rows, dtype, tiles, grads):
    backend = aot.TARGETS[target][2]
    _, per_byte, _ = nm_layout(n, m)

    def f(x, values, codes):
        op = lambda x, v: nm_matmul(
            x, NMPacked(v, codes, n, m), tiles=tiles, interpret=False, backend=backend
        )
        if not grads:
            return op(x, values)
        y, vjp = jax.vjp(op, x, values)
        return y, vjp(y)

    avals = [
        S((rows, k), dtype),
        S((k * n // m, cols), dtype),
        S((k * n // m // per_byte, cols), jnp.uint8),
    ]
    return f, avals


def block_program(target, k, cols, rows, dtype, block, tiles, grads, density=0.25):
    backend = aot.TARGETS[target][2]
    bh, bw = block
    kb, nb = k // bh, cols // bw
    budget, budget_t = max(1, int(kb * density)), max(1, int(nb * density))

    def f(x, values, rows_, counts, rows_t, slots_t, counts_t):
        def op(x, v):
            packed = BlockPacked(v, rows_, counts, rows_t, slots_t, counts_t, (k, cols), block)
            return block_matmul(x, packed, tiles=tiles, interpret=False, backend=backend)

        if not grads:
            return op(x, values)
        y, vjp = jax.vjp(op, x, values)
        return y, vjp(y)

    i32 = jnp.int32
    avals = [
        S((rows, k), dtype),
        S((nb, budget, bh, bw), dtype),
        S((nb, budget), i32),
        S((nb,), i32),
        S((kb, budget_t), i32),
        S((kb, budget_t), i32),
        S((kb,), i32),
    ]
    return f, avals


# (target, n, m, K, N, M, dtype, grads): training (M=256, fwd+bwd) and decode (M=16, fwd).
NM_AOT = [
    ("tpu_v5e", 2, 4, 2048, 512, 256, jnp.bfloat16, True),
    ("tpu_v5e", 2, 4, 2048, 512, 16, jnp.bfloat16, False),
    ("tpu_v5e", 1, 4, 2048, 256, 256, jnp.float32, True),
    ("tpu_v5e", 2, 8, 2048, 256, 16, jnp.bfloat16, False),
    ("tpu_v6e", 2, 4, 2048, 512, 256, jnp.bfloat16, True),
    ("h100", 2, 4, 2048, 512, 256, jnp.bfloat16, True),
    ("h100", 2, 8, 1024, 256, 16, jnp.float32, False),
]


@pytest.mark.parametrize("target,n,m,k,cols,rows,dtype,grads", NM_AOT)
def test_nm_kernels_compile(target, n, m, k, cols, rows, dtype, grads):
    require(target)
    backend = aot.TARGETS[target][2]
    tiles = pick_nm_tiles((k, cols), rows, dtype, backend, False, n, m)
    check_config("nm", (k, cols), dtype, tiles, backend, n=n, m=m)
    compile_program(target, nm_program(target, n, m, k, cols, rows, dtype, tiles, grads))


# (target, K, N, M, dtype, block, grads)
BLOCK_AOT = [
    ("tpu_v5e", 1024, 1024, 256, jnp.bfloat16, (128, 128), True),
    ("tpu_v5e", 1024, 512, 16, jnp.float32, (256, 128), False),
    ("tpu_v6e", 1024, 1024, 256, jnp.bfloat16, (128, 256), True),
    ("h100", 1024, 1024, 256, jnp.bfloat16, (64, 64), True),
    ("h100", 1024, 512, 16, jnp.float32, (32, 32), False),
]


@pytest.mark.parametrize("target,k,cols,rows,dtype,block,grads", BLOCK_AOT)
def test_block_kernels_compile(target, k, cols, rows, dtype, block, grads):
    require(target)
    backend = aot.TARGETS[target][2]
    tiles = pick_block_tiles((k, cols), rows, dtype, backend, False, block)
    check_config("block", (k, cols), dtype, tiles, backend, block=block)
    compile_program(target, block_program(target, k, cols, rows, dtype, block, tiles, grads))


def test_rejected_tpu_configs_really_fail_to_compile():
    """The lane rule check_config enforces is the compiler's: tn=64 and 64-wide blocks fail."""
    require("tpu_v5e")
    nm_tiles = NMTiles(tm=128, tn=64, tk=1024)
    with pytest.raises(ValueError, match="tn=64 must be a multiple of 128"):
        check_config("nm", (1024, 512), jnp.bfloat16, nm_tiles, "tpu", n=2, m=4)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        compile_program(
            "tpu_v5e",
            nm_program("tpu_v5e", 2, 4, 1024, 512, 128, jnp.bfloat16, nm_tiles, False),
        )
    with pytest.raises(ValueError, match="multiples of 128 on TPU"):
        check_config("block", (512, 512), jnp.bfloat16, BlockTiles(128), "tpu", block=(64, 64))
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        compile_program(
            "tpu_v5e",
            block_program("tpu_v5e", 512, 512, 128, jnp.bfloat16, (64, 64), BlockTiles(128), False),
        )


def test_rejected_h100_config_really_fails_to_compile():
    """Shared-memory overflow: check_config rejects what Triton would refuse to compile."""
    require("h100")
    tiles = NMTiles(tm=128, tn=128, tk=512)
    with pytest.raises(ValueError, match="shared memory"):
        check_config("nm", (1024, 1024), jnp.bfloat16, tiles, "gpu", n=2, m=4)
    with pytest.raises(Exception, match="(?i)shared memory"):
        compile_program(
            "h100", nm_program("h100", 2, 4, 1024, 1024, 256, jnp.bfloat16, tiles, False)
        )


# A whole train step of an accelerator-sized run, compiled for a TPU v5e 2×2 slice without the
# chips: the sharded program builds, and fsdp really splits the state (each chip holds about
# half). Here, not in a file of its own: libtpu holds a per-process lock file, so every deviceless
# TPU compile of the suite must run in one test worker (pytest-xdist --dist loadfile).
@pytest.mark.slow
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
