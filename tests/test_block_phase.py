"""Block-sparse execution (`sparsity.impl = "block"`): balanced block masks, the gathered XLA op
against a dense masked matmul, and whole training runs against the masked path."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsescale import block_phase, layers, train
from sparsescale import config as config_lib
from sparsescale import sparsity as sp
from sparsescale import step as step_lib
from sparsescale.kernels import xla_block


def test_balanced_block_mask_keeps_top_blocks_of_every_column():
    rng = np.random.default_rng(0)
    scores = rng.random((24, 12)).astype(np.float32)  # 6 x 3 blocks of 4x4
    structure = sp.Block(0.5, (4, 4), balanced=True)
    got = np.asarray(structure.mask(jnp.asarray(scores)))
    norms = np.sqrt((scores.reshape(6, 4, 3, 4) ** 2).sum(axis=(1, 3)))
    for j in range(3):  # reference: the 3 largest block norms of each block-column
        keep = np.zeros(6, bool)
        keep[np.argsort(-norms[:, j])[:3]] = True
        np.testing.assert_array_equal(got[::4, 4 * j], keep)
    assert (
        got.reshape(6, 4, 3, 4).all(axis=(1, 3)).sum()
        == got.reshape(6, 4, 3, 4).any(axis=(1, 3)).sum()
    )  # whole blocks
    # A traced schedule value: round(1/3 * 6) = 2 removed per column.
    traced = jax.jit(structure.mask)(jnp.asarray(scores), jnp.float32(1 / 3))
    np.testing.assert_array_equal(np.asarray(traced)[::4, ::4].sum(axis=0), [4, 4, 4])


def test_balanced_and_block_impl_reject_bad_input():
    with pytest.raises(ValueError, match="keeps no block"):
        sp.Block(0.9, (64, 64), balanced=True).validate((256, 256))
    with pytest.raises(ValueError, match="needs a block structure"):
        sp.SparsityConfig(structure=sp.Unstructured(0.5), impl="block")
    with pytest.raises(ValueError, match="per block-column"):
        sp.SparsityConfig(structure=sp.Block(0.5, balanced=True), allocation="global")
    with pytest.raises(ValueError, match="switch_density"):
        sp.SparsityConfig(structure=sp.Block(0.5), impl="block", switch_density=0.0)
    with pytest.raises(ValueError, match="block_budget"):
        layers.SparseLinear(
            32,
            16,
            impl="block",
            lowering="xla",
            structure=sp.Block(0.5, (8, 8)),
            block_budget=5,
            rngs=nnx.Rngs(0),
        )


@pytest.mark.parametrize(
    "m, chunk, balanced, dtype, block",
    [
        (40, 16, True, jnp.float32, (8, 16)),
        (64, 512, False, jnp.float32, (8, 16)),
        (48, 32, True, jnp.bfloat16, (8, 16)),
        (40, 16, True, jnp.float32, (4, 4)),  # Kb >= bw: dx by segment sum
        (40, None, False, jnp.float32, (8, 16)),  # default: all rows, gathered x kept
        (48, None, True, jnp.bfloat16, (4, 4)),
    ],
)
def test_block_columns_matmul_matches_dense(m, chunk, balanced, dtype, block):
    """Values, x and kernel gradients of the packed op equal those of x @ (w ⊙ mask), in row
    chunks (a `chunk` that does not divide the rows pads) or all at once (None); budget > a
    column's count leaves padding slots."""
    k, n = 64, 48
    kb, nb = k // block[0], n // block[1]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    mask = sp.Block(0.75, block, balanced=balanced).mask(jnp.asarray(rng.random((k, n))))
    tiles = np.asarray(mask).reshape(kb, block[0], nb, block[1]).any(axis=(1, 3))
    budget = min(int(tiles.sum(0).max()) + 1, kb)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)

    def block_op(x, w):
        values, rows, counts = xla_block.pack_columns(w, mask, block, budget)
        return xla_block.block_columns_matmul(x, values, rows, counts, chunk=chunk)

    def dense_op(x, w):
        return jnp.dot(x, jnp.where(mask, w, 0).astype(dtype), preferred_element_type=jnp.float32)

    y, vjp = jax.vjp(block_op, x, w)
    y_ref, vjp_ref = jax.vjp(dense_op, x, w)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref.astype(dtype)), rtol=tol, atol=tol)
    for got, ref in zip(vjp(dy), vjp_ref(dy.astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(np.float32(got), np.float32(ref), rtol=tol, atol=tol * 4)
    dw = np.asarray(vjp(dy)[1])
    assert not dw[~np.asarray(mask)].any()  # no gradient off the kept tiles


def test_block_phase_steps_hand_worked(smoke_config):
    """Gradual 0 → 75% over steps 25..75 of 100, updates every 10, switch at ≤ 50% density.
    Density after an update at u is 1 − 0.75·(1 − (1 − (u − 25)/50)³) ≤ 0.5 first at u = 45
    (u = 35 gives 0.57); masks from the update at u are in force from step u + 1; the final
    sparsity is reached by the update at 75."""
    cfg = config_lib.run_config(
        smoke_config(
            **{
                "sparsity.structure": "block",
                "sparsity.block": (8, 8),
                "sparsity.target": 0.75,
                "sparsity.impl": "block",
                "sparsity.switch_density": 0.5,
                "sparsity.schedule.start": 0.25,
                "sparsity.schedule.end": 0.75,
                "sparsity.schedule.every": 10,
                "train.steps": 100,
            }
        )
    )
    pruner = step_lib.build(cfg).pruner
    assert block_phase.block_phase_steps([cfg], pruner) == [46, 76]
    masked = config_lib.run_config(smoke_config(**{"sparsity.structure": "block"}))
    assert block_phase.block_phase_steps([masked], pruner) == []


BLOCK_RUN = {
    "sparsity.structure": "block",
    "sparsity.block": (8, 8),
    "sparsity.balanced": True,
    "sparsity.target": 0.75,
    "sparsity.switch_density": 0.6,
    "sparsity.schedule.start": 0.1,
    "sparsity.schedule.end": 0.5,
    "sparsity.schedule.every": 2,
    "train.steps": 24,
    "train.log_every": 1,
    "train.ckpt_every": 4,
}


def test_block_training_equals_masked_and_resumes(
    tmp_path, caplog, final_state, metric_lines, smoke_config
):
    """Gradual balanced block pruning: the block run switches twice, its losses and weights match
    the masked run, and a resume inside the block phase (rebuilding the block step from the
    restored masks) continues bit-identically."""
    masked = config_lib.run_config(smoke_config(**BLOCK_RUN))
    block = config_lib.run_config(smoke_config(**BLOCK_RUN, **{"sparsity.impl": "block"}))
    switches = block_phase.block_phase_steps([block], step_lib.build(block).pruner)
    assert len(switches) == 2 and switches[-1] < 20

    train.run(masked, tmp_path / "masked")
    with caplog.at_level(logging.INFO, logger="sparsescale"):
        summary = train.run(block, tmp_path / "block")
    assert sum("block-sparse layers" in r.message for r in caplog.records) == 2
    ref, got = metric_lines(tmp_path / "masked"), metric_lines(tmp_path / "block")
    for key in ("train/loss", "norms/grad", "sparsity/overall"):
        np.testing.assert_allclose(
            [g[key] for g in got], [r[key] for r in ref], rtol=2e-5, err_msg=key
        )
    assert got[-1]["sparsity/overall"] == pytest.approx(0.75)
    _, state_ref = final_state(tmp_path / "masked")
    _, state_got = final_state(tmp_path / "block")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        state_got["params"],
        state_ref["params"],
    )

    # Resume from step 20 (block phase): the restart rebuilds the block step from the masks.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "block", resumed)
    (resumed / "summary.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "24")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparsescale"):
        again = train.run(block, resumed)
    assert any("Step 20: block-sparse" in r.message for r in caplog.records)
    assert again["eval_loss"] == summary["eval_loss"]
    assert [r["train/loss"] for r in metric_lines(resumed)] == [r["train/loss"] for r in got]


@pytest.mark.parametrize("lowering", ["xla", "pallas"])
def test_sparse_linear_with_block_budget_matches_masked(lowering):
    """A SparseLinear on the block path with an exact tile budget gives the masked layer's output
    and kernel gradient (Pallas in interpret mode on CPU)."""
    structure = sp.Block(0.5, (8, 8), balanced=True)
    dense = layers.SparseLinear(32, 16, kernel_axes=None, rngs=nnx.Rngs(0))
    dense.mask[...] = structure.mask(jnp.abs(dense.kernel[...]))
    fast = layers.SparseLinear(32, 16, rngs=nnx.Rngs(0))
    fast.mask[...] = dense.mask[...]
    layers.use_block_path(fast, {}, structure)  # no layers named: nothing changes
    assert fast.impl == "masked"
    fast.set_impl("block", structure, block_budget=2, lowering=lowering)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))

    def loss(layer):
        return jnp.sum(jnp.sin(layer(x)))

    (l_ref, g_ref), (l_got, g_got) = (nnx.value_and_grad(loss)(m) for m in (dense, fast))
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
    np.testing.assert_allclose(g_got.kernel[...], g_ref.kernel[...], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_got.bias[...], g_ref.bias[...], rtol=1e-4, atol=1e-5)


def test_block_impl_on_moe_experts_fails_before_training(tmp_path, smoke_config):
    cfg = config_lib.run_config(
        smoke_config(
            **BLOCK_RUN,
            **{"sparsity.impl": "block", "model.moe.num_experts": 4, "model.moe.every": 1},
        )
    )
    with pytest.raises(ValueError, match="SparseLinear layers only"):
        train.run(cfg, tmp_path / "moe")
    assert not (tmp_path / "moe" / "checkpoints").exists()
