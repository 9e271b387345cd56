"""Compressed formats: hand-worked layouts, exact round trips, errors, jit packing, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsescale.kernels import formats as F


def random_nm_mask(rng, k, n_cols, n, m):
    scores = rng.random((k // m, m, n_cols))
    keep = np.argsort(scores, axis=1)[:, :n]
    mask = np.zeros((k // m, m, n_cols), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return mask.reshape(k, n_cols)


def random_block_mask(rng, k, n_cols, block, density):
    bh, bw = block
    keep = rng.random((k // bh, n_cols // bw)) < density
    return np.kron(keep, np.ones(block, bool))


def test_nm_layout_hand_worked_2_4():
    # Column [1..8]; group 0 keeps rows 1, 3; group 1 keeps rows 4, 6 (positions 0, 2).
    kernel = np.arange(1, 9, dtype=np.float32)[:, None]
    mask = np.zeros((8, 1), bool)
    mask[[1, 3, 4, 6]] = True
    packed = F.pack_nm(kernel, mask, 2, 4)
    # Slot-major values: slot 0 of groups 0, 1 then slot 1 of groups 0, 1.
    np.testing.assert_array_equal(packed.values[:, 0], [2, 5, 4, 7])
    # In-group positions [1, 0, 3, 2] at 2 bits each, low bits first: 1 + 0·4 + 3·16 + 2·64.
    np.testing.assert_array_equal(packed.codes, [[1 + 3 * 16 + 2 * 64]])
    assert packed.codes.dtype == jnp.uint8
    assert packed.shape == (8, 1)


@pytest.mark.parametrize(
    "n,m,dtype",
    [
        (2, 4, jnp.float32),
        (2, 4, jnp.bfloat16),
        (1, 4, jnp.float32),
        (2, 8, jnp.bfloat16),
        (1, 8, jnp.float32),
    ],
)
def test_nm_round_trip_exact(n, m, dtype):
    rng = np.random.default_rng(n * 10 + m)
    k, cols = 64, 24
    kernel = jnp.asarray(rng.normal(size=(k, cols)), dtype)
    mask = random_nm_mask(rng, k, cols, n, m)
    packed = F.pack_nm(kernel, mask, n, m)
    assert packed.values.shape == (k * n // m, cols) and packed.values.dtype == dtype
    np.testing.assert_array_equal(F.unpack_nm(packed), jnp.where(mask, kernel, 0))
    np.testing.assert_array_equal(F.nm_mask(packed), mask)


def test_nm_pack_under_jit_matches_eager():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(32, 8)).astype(np.float32)
    mask = random_nm_mask(rng, 32, 8, 2, 4)
    eager = F.pack_nm(kernel, mask, 2, 4)
    traced = jax.jit(lambda w, msk: F.pack_nm(w, msk, 2, 4))(kernel, mask)
    np.testing.assert_array_equal(traced.values, eager.values)
    np.testing.assert_array_equal(traced.codes, eager.codes)


def test_nm_bad_inputs_raise():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(16, 4)).astype(np.float32)
    mask = random_nm_mask(rng, 16, 4, 2, 4)
    mask[5, 3] = ~mask[5, 3]
    with pytest.raises(ValueError, match=r"group 1 \(rows 4..7\) of column 3 keeps"):
        F.pack_nm(kernel, mask, 2, 4)
    with pytest.raises(ValueError, match="n must divide"):
        F.pack_nm(kernel, mask, 3, 4)
    with pytest.raises(ValueError, match="multiple of m·H = 8"):
        F.pack_nm(kernel[:12], mask[:12], 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        F.pack_nm(kernel, mask[:8], 2, 4)


def test_nm_bytes_per_element():
    # 2:4 bf16: half the values at 2 B plus half the indices at 2 bits = 1.125 B (dense: 2 B).
    assert F.nm_bytes_per_element(2, 4, jnp.bfloat16) == 1.125
    assert F.nm_bytes_per_element(1, 4, jnp.bfloat16) == 0.5625
    assert F.nm_bytes_per_element(2, 8, jnp.bfloat16) == 0.625
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(64, 16)), jnp.bfloat16)
    packed = F.pack_nm(kernel, random_nm_mask(rng, 64, 16, 2, 4), 2, 4)
    assert packed.bytes_per_element == 1.125


def test_block_layout_hand_worked():
    # 3×2 grid of 2×2 tiles; column 0 keeps block-rows 0, 2; column 1 keeps block-row 2 only.
    kernel = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
    keep = np.array([[1, 0], [0, 0], [1, 1]], bool)
    mask = np.kron(keep, np.ones((2, 2), bool))
    p = F.pack_block(kernel, mask, (2, 2))
    np.testing.assert_array_equal(p.rows, [[0, 2], [2, 2]])  # padding repeats the last row
    np.testing.assert_array_equal(p.counts, [2, 1])
    np.testing.assert_array_equal(p.values[0, 1], kernel[4:6, 0:2])
    np.testing.assert_array_equal(p.values[1, 1], 0)  # padding slot
    np.testing.assert_array_equal(p.counts_t, [1, 0, 2])
    np.testing.assert_array_equal(p.rows_t[2], [0, 1])  # block-row 2 feeds columns 0 and 1
    np.testing.assert_array_equal(p.slots_t[2], [1, 0])  # at slot 1 of col 0, slot 0 of col 1
    np.testing.assert_array_equal(F.unpack_block(p), kernel * mask)


@pytest.mark.parametrize(
    "block,density", [((8, 8), 0.0), ((16, 8), 0.3), ((8, 32), 1.0), ((8, 8), 0.6)]
)
def test_block_round_trip_exact(block, density):
    rng = np.random.default_rng(int(density * 10) + block[0])
    k, cols = 64, 64
    kernel = rng.normal(size=(k, cols)).astype(np.float32)
    mask = random_block_mask(rng, k, cols, block, density)
    mask &= rng.random(mask.shape) < 0.9  # not block-aligned inside tiles: still exact
    p = F.pack_block(kernel, mask, block)
    np.testing.assert_array_equal(F.unpack_block(p), kernel * mask)
    kept = F.block_keep(mask, block)
    np.testing.assert_array_equal(p.counts, np.asarray(kept).sum(0))
    np.testing.assert_array_equal(p.counts_t, np.asarray(kept).sum(1))


def test_block_pack_under_jit_with_budget():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(32, 32)).astype(np.float32)
    mask = random_block_mask(rng, 32, 32, (8, 8), 0.5)
    traced = jax.jit(lambda w, msk: F.pack_block(w, msk, (8, 8), 4, 4))(kernel, mask)
    np.testing.assert_array_equal(F.unpack_block(traced), kernel * mask)


def test_block_bad_inputs_raise():
    kernel = np.ones((32, 32), np.float32)
    with pytest.raises(ValueError, match="must divide the kernel shape"):
        F.pack_block(kernel, kernel > 0, (5, 8))
    with pytest.raises(ValueError, match="keeps 4 tiles .* more than max_blocks_per_col=2"):
        F.pack_block(kernel, kernel > 0, (8, 8), max_blocks_per_col=2)
    with pytest.raises(ValueError, match="block-row 0 keeps 4 tiles .* max_blocks_per_row=3"):
        F.pack_block(kernel, kernel > 0, (8, 8), max_blocks_per_row=3)
    with pytest.raises(ValueError, match=r"max_blocks_per_col=5 must be in \[1, 4\]"):
        F.pack_block(kernel, kernel > 0, (8, 8), max_blocks_per_col=5)


def test_block_bytes_per_element():
    rng = np.random.default_rng(5)
    kernel = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16)
    keep = np.zeros((2, 2), bool)
    keep[0, 0] = True  # 75% sparse, one tile per non-empty column
    p = F.pack_block(kernel, np.kron(keep, np.ones((128, 128), bool)), (128, 128))
    # Values: budget 1 × 2 columns of 128² bf16 over 256² elements; tables: 2+2+2+2+2 int32.
    expected = (2 * 128 * 128 * 2 + 10 * 4) / 256**2
    assert p.bytes_per_element == pytest.approx(expected)
