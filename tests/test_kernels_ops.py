"""Kernels in interpret mode against the dense reference: forward, gradients, strict TPU
interpretation (shuffled parallel grid order, out-of-bounds detection), and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from sparsescale.kernels import (
    BlockPacked,
    BlockTiles,
    NMPacked,
    NMTiles,
    block_matmul,
    nm_matmul,
    pack_block,
    pack_nm,
    unpack_block,
    unpack_nm,
    xla_block_matmul,
)


def random_nm_mask(rng, k, n_cols, n, m):
    keep = np.argsort(rng.random((k // m, m, n_cols)), axis=1)[:, :n]
    mask = np.zeros((k // m, m, n_cols), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return mask.reshape(k, n_cols)


def random_block_mask(rng, k, n_cols, block, density):
    keep = rng.random((k // block[0], n_cols // block[1])) < density
    return np.kron(keep, np.ones(block, bool))


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def dense_loss_grads(x, w_dense, mask):
    """Independent reference: dense autodiff of sum(sin(x @ (w ⊙ mask))) in f32."""

    def loss(x, w):
        return jnp.sum(jnp.sin(x @ jnp.where(mask, w, 0)))

    y = x.astype(jnp.float32) @ jnp.where(mask, w_dense, 0).astype(jnp.float32)
    gx, gw = jax.grad(loss, (0, 1))(x.astype(jnp.float32), w_dense.astype(jnp.float32))
    return y, gx, gw


def assert_close(actual, expected, dtype):
    scale = float(jnp.max(jnp.abs(expected))) + 1e-6
    err = float(jnp.max(jnp.abs(jnp.asarray(actual, jnp.float32) - expected)))
    assert err <= TOL[dtype] * scale, f"max error {err} vs scale {scale}"


def run_op_and_grads(op, x, packed, rebuild):
    """y and grads of sum(sin(y)) w.r.t. x and packed.values through `op`, in one jit."""

    def loss(x, values):
        y = op(x, rebuild(values))
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), (gx, gv) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, packed.values)
    return y, gx, gv


# ------------------------------------------------------------------------------------ N:M


NM_CASES = [
    # (n, m, dtype, backend flavour, M, K, N, tiles) — grids > 1 on every axis in most cases.
    (2, 4, jnp.bfloat16, "tpu", 24, 64, 32, NMTiles(16, 16, 32)),
    (2, 4, jnp.bfloat16, "gpu", 24, 128, 32, NMTiles(16, 16, 64)),
    (1, 4, jnp.float32, "tpu", 16, 128, 16, NMTiles(16, 16, 64)),
    (2, 8, jnp.float32, "gpu", 20, 64, 32, NMTiles(16, 16, 32)),
]


@pytest.mark.parametrize("n,m,dtype,backend,rows,k,cols,tiles", NM_CASES)
def test_nm_matmul_matches_dense(n, m, dtype, backend, rows, k, cols, tiles):
    rng = np.random.default_rng(rows + k + n)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, cols)), dtype)
    mask = random_nm_mask(rng, k, cols, n, m)
    packed = pack_nm(w, mask, n, m)
    op = lambda x, p: nm_matmul(x, p, tiles=tiles, backend=backend)
    y, gx, gv = run_op_and_grads(op, x, packed, lambda v: NMPacked(v, packed.codes, n, m))
    y_ref, gx_ref, gw_ref = dense_loss_grads(x, w, mask)
    assert y.dtype == dtype and gv.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(gx, gx_ref, dtype)
    # dValues are the dense weight gradient read at the kept positions only.
    assert_close(unpack_nm(NMPacked(gv, packed.codes, n, m)), jnp.where(mask, gw_ref, 0), dtype)


def test_nm_matmul_check_grads_numerically():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    w = rng.normal(size=(32, 16)).astype(np.float32)
    packed = pack_nm(w, random_nm_mask(rng, 32, 16, 2, 4), 2, 4)
    f = jax.jit(
        lambda x, v: nm_matmul(x, NMPacked(v, packed.codes, 2, 4), tiles=NMTiles(16, 16, 16))
    )
    check_grads(f, (x, packed.values), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_layer_pattern_pack_inside_jit_grads_reach_dense_kernel():
    """SparseLinear keeps a dense kernel and a mask and packs per step: the gradient w.r.t. the
    dense kernel through pack + kernel equals the masked dense gradient (zero off the mask)."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(40, 128)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(128, 32)), jnp.float32)
    nm = random_nm_mask(rng, 128, 32, 2, 4)
    blk = random_block_mask(rng, 128, 32, (16, 16), 0.5)
    ops = {
        "nm": (nm, lambda x, w, m: nm_matmul(x, pack_nm(w, m, 2, 4), tiles=NMTiles(16, 16, 64))),
        "xla_block": (blk, lambda x, w, m: xla_block_matmul(x, pack_block(w, m, (16, 16), 8, 2))),
    }
    for name, (mask, op) in ops.items():
        loss = lambda x, w, m, op=op: jnp.sum(jnp.sin(op(x, w, m)))
        gx, gw = jax.jit(jax.grad(loss, (0, 1)))(x, w, mask)
        _, gx_ref, gw_ref = dense_loss_grads(x, w, mask)
        assert_close(gx, gx_ref, jnp.float32), name
        assert_close(gw, jnp.where(mask, gw_ref, 0), jnp.float32), name
        assert np.all(np.asarray(gw)[~mask] == 0), name


def test_nm_matmul_batched_input_and_shuffled_grid():
    """Leading dims flatten into M; strict TPU interpretation with a shuffled parallel grid."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 12, 64)), jnp.float32)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    mask = random_nm_mask(rng, 64, 32, 2, 4)
    packed = pack_nm(w, mask, 2, 4)
    params = pltpu.InterpretParams(random_seed=3)
    y = nm_matmul(x, packed, tiles=NMTiles(16, 16, 32), interpret=params, backend="tpu")
    assert y.shape == (2, 12, 32)
    assert_close(y, x @ np.where(mask, w, 0), jnp.float32)


# ------------------------------------------------------------------------------------ block


BLOCK_CASES = [
    # (dtype, backend flavour, M, K, N, block, density)
    (jnp.float32, "tpu", 40, 64, 48, (16, 16), 0.5),
    (jnp.float32, "tpu", 16, 64, 64, (16, 32), 1.0),
    (jnp.bfloat16, "tpu", 24, 64, 64, (16, 16), 0.25),
    (jnp.bfloat16, "gpu", 24, 64, 64, (16, 16), 0.5),
    (jnp.float32, "gpu", 16, 64, 32, (32, 16), 0.0),
]


def block_problem(dtype, rows, k, cols, block, density, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, cols)), dtype)
    mask = random_block_mask(rng, k, cols, block, density)
    if 0 < density < 1:  # an empty block-row and block-column exercise count = 0
        mask[: block[0]] = False
        mask[:, -block[1] :] = False
    return x, w, mask, pack_block(w, mask, block)


def rebuild_block(packed):
    p = packed
    return lambda v: BlockPacked(
        v, p.rows, p.counts, p.rows_t, p.slots_t, p.counts_t, p.shape, p.block
    )


@pytest.mark.parametrize("dtype,backend,rows,k,cols,block,density", BLOCK_CASES)
def test_block_matmul_matches_dense(dtype, backend, rows, k, cols, block, density):
    x, w, mask, packed = block_problem(dtype, rows, k, cols, block, density, seed=rows + k)
    op = lambda x, p: block_matmul(x, p, tiles=BlockTiles(16), backend=backend)
    y, gx, gv = run_op_and_grads(op, x, packed, rebuild_block(packed))
    y_ref, gx_ref, gw_ref = dense_loss_grads(x, w, mask)
    assert_close(y, y_ref, dtype)
    assert_close(gx, gx_ref, dtype)
    assert_close(unpack_block(rebuild_block(packed)(gv)), jnp.where(mask, gw_ref, 0), dtype)


@pytest.mark.parametrize(
    "dtype,density,strategy",
    [(jnp.float32, 0.5, "gather"), (jnp.bfloat16, 0.25, "gather"), (jnp.float32, 0.5, "scatter")],
)
def test_xla_block_matmul_matches_dense(dtype, density, strategy):
    x, w, mask, packed = block_problem(dtype, 24, 64, 64, (16, 16), density, seed=11)
    op = lambda x, p: xla_block_matmul(x, p, strategy=strategy)
    y, gx, gv = run_op_and_grads(op, x, packed, rebuild_block(packed))
    y_ref, gx_ref, gw_ref = dense_loss_grads(x, w, mask)
    assert_close(y, y_ref, dtype)
    assert_close(gx, gx_ref, dtype)
    assert_close(unpack_block(rebuild_block(packed)(gv)), jnp.where(mask, gw_ref, 0), dtype)
    # Padding slots (b ≥ count) get exactly zero gradient.
    pad = np.arange(packed.rows.shape[1])[None, :] >= np.asarray(packed.counts)[:, None]
    assert np.all(np.asarray(gv, np.float32)[pad] == 0)


def test_block_matmul_strict_interpret_shuffled_grid():
    x, w, mask, packed = block_problem(jnp.float32, 32, 64, 64, (16, 16), 0.5, seed=12)
    params = pltpu.InterpretParams(random_seed=5)
    op = lambda x, p: block_matmul(x, p, tiles=BlockTiles(16), interpret=params, backend="tpu")
    y, gx, gv = run_op_and_grads(op, x, packed, rebuild_block(packed))
    y_ref, gx_ref, gw_ref = dense_loss_grads(x, w, mask)
    assert_close(y, y_ref, jnp.float32)
    assert_close(gx, gx_ref, jnp.float32)
    assert_close(unpack_block(rebuild_block(packed)(gv)), jnp.where(mask, gw_ref, 0), jnp.float32)


def test_block_matmul_out_of_bounds_block_index_raises():
    """A corrupted block table (row past K) is caught by the strict TPU interpreter."""
    x, _, _, packed = block_problem(jnp.float32, 16, 64, 64, (16, 16), 1.0, seed=13)
    bad = BlockPacked(
        packed.values,
        packed.rows.at[0, 0].set(64 // 16),  # one past the last block-row
        packed.counts,
        packed.rows_t,
        packed.slots_t,
        packed.counts_t,
        packed.shape,
        packed.block,
    )
    params = pltpu.InterpretParams(out_of_bounds_reads="raise")
    try:
        with pytest.raises(Exception, match="(?i)out.of.bounds"):
            jax.block_until_ready(
                block_matmul(x, bad, tiles=BlockTiles(16), interpret=params, backend="tpu")
            )
    finally:
        pltpu.reset_tpu_interpret_mode_state()


# ------------------------------------------------------------------------------------ errors


def test_ops_reject_mismatched_inputs():
    rng = np.random.default_rng(14)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    nm = pack_nm(w, random_nm_mask(rng, 64, 32, 2, 4), 2, 4)
    blk = pack_block(w, np.ones_like(w, bool), (16, 16))
    x = jnp.ones((4, 48), jnp.float32)
    with pytest.raises(ValueError, match="must end in the kernel's K=64"):
        nm_matmul(x, nm)
    with pytest.raises(ValueError, match="must end in the kernel's K=64"):
        block_matmul(x, blk)
    with pytest.raises(ValueError, match="must end in the kernel's K=64"):
        xla_block_matmul(x, blk)
    with pytest.raises(ValueError, match="must be an NMPacked"):
        nm_matmul(jnp.ones((4, 64)), blk)
    with pytest.raises(ValueError, match="tiles .* must divide"):
        nm_matmul(jnp.ones((4, 64)), nm, tiles=NMTiles(16, 16, 48))
