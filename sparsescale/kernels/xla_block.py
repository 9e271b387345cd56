"""Block-sparse matmul in plain XLA: gather the x tiles each kept weight tile needs, then one
batched contraction. Does density × the dense FLOPs, so it is the fast block-sparse path on CPU
(where Pallas only interprets), and a portable fallback elsewhere.

Forward: xg [M, Nb, B, bh] = x tiles at `rows`;  y[:, j] = Σ_b xg[:, j, b] @ values[j, b].
Backward (custom_vjp, saves x rather than the gathered copy): dx gathers dY tiles through the
transposed tables (rows_t, slots_t), so no scatter-add; dvalues = xgᵀ·dY for kept tiles only
(padding slots get zero).

The gathered copy of x costs M·K·density·Nb elements, so it pays only when the budget of tiles per
column is small relative to the tile width. `path="auto"` (default) gathers when
B/Kb ≤ min(0.25, bw/256) (measured crossover on CPU, benchmarks/kernels.py) and otherwise
scatters the tiles into a dense kernel and runs one dense matmul (same gradients: dvalues = the
dense weight gradient read at the kept tiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale.kernels.formats import BlockPacked


def _gather_x(x_MxK, rows_NbxB, bh: int):
    m, k = x_MxK.shape
    return x_MxK.reshape(m, k // bh, bh)[:, rows_NbxB]  # [M, Nb, B, bh]


def _valid(counts, budget):
    return jnp.arange(budget)[None, :] < counts[:, None]  # [Nb, B]


PATHS = ("auto", "gather", "dense")


def choose_path(packed: BlockPacked) -> str:
    """ "gather" or "dense" for path="auto" (rule in the module docstring)."""
    kb = packed.shape[0] // packed.block[0]
    budget = packed.values.shape[1]
    return "gather" if budget / kb <= min(0.25, packed.block[1] / 256) else "dense"


def _densify(values, rows, counts, k: int):
    """Dense [K, N] kernel from the tiles by a gather (scatter-adding K·N elements is slow on
    CPU; only the tiny [Kb, Nb] slot map is scattered)."""
    nb, budget, bh, bw = values.shape
    kb = k // bh
    valid = _valid(counts, budget)
    slot_NbxKb = jnp.full((nb, kb), -1, jnp.int32)
    cols = jnp.broadcast_to(jnp.arange(nb)[:, None], rows.shape)
    slots = jnp.where(valid, jnp.arange(budget)[None, :], -1)
    slot_NbxKb = slot_NbxKb.at[cols, jnp.where(valid, rows, kb)].set(slots, mode="drop")
    tiles = jnp.take_along_axis(values, jnp.maximum(slot_NbxKb, 0)[:, :, None, None], axis=1)
    tiles = jnp.where((slot_NbxKb >= 0)[:, :, None, None], tiles, 0)  # [Nb, Kb, bh, bw]
    return tiles.transpose(1, 2, 0, 3).reshape(k, nb * bw)


@jax.custom_vjp
def _xla_dense(x_MxK, values, rows, counts):
    return _dense_fwd(x_MxK, values, rows, counts)[0]


def _dense_fwd(x_MxK, values, rows, counts):
    w = _densify(values.astype(x_MxK.dtype), rows, counts, x_MxK.shape[1])
    y = jnp.matmul(x_MxK, w, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    return y, (x_MxK, w, values, rows, counts)


def _dense_bwd(res, dy_MxN):
    x_MxK, w, values, rows, counts = res
    nb, budget, bh, bw = values.shape
    dy = dy_MxN.astype(x_MxK.dtype)
    dx = jnp.matmul(dy, w.T, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    dw = jnp.matmul(x_MxK.T, dy, preferred_element_type=jnp.float32)
    dw_tiles = dw.reshape(-1, bh, nb, bw).transpose(2, 0, 1, 3)  # [Nb, Kb, bh, bw]
    dvals = jnp.take_along_axis(dw_tiles, rows[:, :, None, None], axis=1)
    dvals = jnp.where(_valid(counts, budget)[:, :, None, None], dvals, 0)
    zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx, dvals.astype(values.dtype), zero_int(rows), zero_int(counts)


_xla_dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def _xla_block(x_MxK, values, rows, counts, rows_t, slots_t, counts_t):
    return _fwd(x_MxK, values, rows, counts, rows_t, slots_t, counts_t)[0]


def _fwd(x_MxK, values, rows, counts, rows_t, slots_t, counts_t):
    bh = values.shape[2]
    xg = _gather_x(x_MxK, rows, bh)
    y = jnp.einsum(
        "mjbk,jbkw->mjw", xg, values.astype(x_MxK.dtype), preferred_element_type=jnp.float32
    )
    y = y.reshape(x_MxK.shape[0], -1).astype(x_MxK.dtype)
    return y, (x_MxK, values, rows, counts, rows_t, slots_t, counts_t)


def _bwd(res, dy_MxN):
    x_MxK, values, rows, counts, rows_t, slots_t, counts_t = res
    m, k = x_MxK.shape
    nb, budget, bh, bw = values.shape
    dy = dy_MxN.reshape(m, nb, bw).astype(x_MxK.dtype)
    # dx through the transposed tables: gathers only (a scatter-add is slow on CPU).
    dyg = dy[:, rows_t]  # [M, Kb, Bt, bw]
    valid_t = _valid(counts_t, rows_t.shape[1])[:, :, None, None]
    vals_t = jnp.where(valid_t, values[rows_t, slots_t], 0).astype(x_MxK.dtype)  # [Kb, Bt, bh, bw]
    dx = jnp.einsum("mrtw,rtkw->mrk", dyg, vals_t, preferred_element_type=jnp.float32)
    xg = _gather_x(x_MxK, rows, bh)
    dvals = jnp.einsum("mjbk,mjw->jbkw", xg, dy, preferred_element_type=jnp.float32)
    dvals = jnp.where(_valid(counts, budget)[:, :, None, None], dvals, 0)
    zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return (
        dx.reshape(m, k).astype(x_MxK.dtype),
        dvals.astype(values.dtype),
        *map(zero_int, (rows, counts, rows_t, slots_t, counts_t)),
    )


_xla_block.defvjp(_fwd, _bwd)


def xla_block_matmul(x_MxK: jax.Array, packed: BlockPacked, *, path: str = "auto") -> jax.Array:
    """y [..., N] = x [..., K] @ unpack_block(packed) in plain XLA (no Pallas).

    path: "gather" (work ∝ kept tiles), "dense" (scatter tiles, dense matmul) or "auto".
    """
    if path not in PATHS:
        raise ValueError(f"xla_block_matmul: path must be one of {PATHS}, got {path!r}")
    if not isinstance(packed, BlockPacked):
        raise ValueError(
            f"xla_block_matmul: packed must be a BlockPacked (see pack_block), got {type(packed)}"
        )
    k, cols = packed.shape
    if x_MxK.ndim < 1 or x_MxK.shape[-1] != k:
        raise ValueError(
            f"xla_block_matmul: x {x_MxK.shape} must end in the kernel's K={k} "
            f"(kernel [{k}, {cols}])"
        )
    lead = x_MxK.shape[:-1]
    path = choose_path(packed) if path == "auto" else path
    x2 = x_MxK.reshape(-1, k)
    if path == "gather":
        p = packed
        y = _xla_block(x2, p.values, p.rows, p.counts, p.rows_t, p.slots_t, p.counts_t)
    else:
        y = _xla_dense(x2, packed.values, packed.rows, packed.counts)
    return y.reshape(*lead, cols)
