"""Block-sparse matmul in plain XLA: the fast block-sparse path on CPU (where Pallas only
interprets) and a portable fallback elsewhere. Does density × the dense FLOPs.

Layout (BCSR by block-column, see formats.py): values [Nb, B, bh, bw], rows [Nb, B], counts [Nb].
Legend: M rows of x (tokens), K = Kb·bh inputs, N = Nb·bw outputs, B tiles kept per block-column.

Forward, per block-column j: y_j [M, bw] = x[:, rows_j] [M, B·bh] @ values_j [B·bh, bw], one
batched matmul over j with the batch axis leading (XLA:CPU runs that as plain GEMMs).
Backward (custom_vjp):
  dvalues_j = x[:, rows_j]ᵀ dY_j (kept tiles only; padding slots get zero),
  dx = Σ_j scatter(dY_j values_jᵀ) into the block-rows `rows_j`: a one-hot contraction over the
  (j, b) slots, which costs Kb/bw of the dx matmul, or a segment sum when Kb ≥ bw.
By default all rows go through one batched matmul and the forward's gathered copy of x is kept
for the backward (no second gather). `chunk` instead processes rows `chunk` at a time (`lax.map` /
`lax.scan`, gathering again in the backward), which keeps the copy (Nb·B/Kb times x) cache-sized:
that wins for an isolated layer with small blocks, but inside whole train steps the loops cost
more than they save wherever the block path beats dense (one core, step vs dense, all rows /
chunks of 512, each pair in one process: 64×64 at 75% cpu_4.7m 1.26× / 1.01×; 40×40 at 90%
cpu_3.8m_d400 1.50× / 1.40×; 32×32 at 75% cpu_4.7m 0.86× / 0.85×; 16×16 at 75% cpu_100k 0.85× /
0.81×; only 20×20 at 75% cpu_3.8m_d400 prefers chunks, 0.47× / 0.67×, both slower than dense).

`strategy="scatter"` instead scatters the tiles into a dense kernel and runs one dense matmul (same
gradients: dvalues = the dense weight gradient read at the kept tiles); `strategy="auto"` picks by
`choose_strategy`, from the break-even densities benchmarks/block_sparse.py measured and stores in
the package's benchmarked machine data (`sparsescale.benchmarked`; CPU, one core, M = 4096, balanced tiles: 16² 0.10,
32² 0.19, 64² 0.34, 128² 0.52). Either way this is `SparseLinear(impl="block", lowering="xla")`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale import benchmarked
from sparsescale.kernels.formats import BlockPacked, first_true

DEFAULT_CHUNK = None  # all rows at once (see the module docstring)


def _valid(counts, budget):
    return jnp.arange(budget)[None, :] < counts[:, None]  # [Nb, B]


STRATEGIES = ("auto", "gather", "scatter")


def choose_strategy(packed: BlockPacked) -> str:
    """ "gather" or "scatter" for strategy="auto": gather when the tile budget per block-column is
    at most the measured break-even density of the block size (`break_even_density`)."""
    kb = packed.shape[0] // packed.block[0]
    budget = packed.values.shape[1]
    return "gather" if budget / kb <= break_even_density(packed.block) else "scatter"


def slot_map(rows, counts, kb: int):
    """[Nb, Kb] int32: which slot of block-column j holds block-row r (−1: none). Only this small
    table is scattered; tiles move by gathers."""
    nb, budget = rows.shape
    valid = _valid(counts, budget)
    cols = jnp.broadcast_to(jnp.arange(nb)[:, None], rows.shape)
    slots = jnp.where(valid, jnp.arange(budget)[None, :], -1)
    empty = jnp.full((nb, kb), -1, jnp.int32)
    return empty.at[cols, jnp.where(valid, rows, kb)].set(slots, mode="drop")


def _scatter_tiles(values, rows, counts, kb: int):
    """Tiles [Nb, Kb, bh, bw] with values at their block-rows and zeros elsewhere."""
    slots = slot_map(rows, counts, kb)
    tiles = jnp.take_along_axis(values, jnp.maximum(slots, 0)[:, :, None, None], axis=1)
    return jnp.where((slots >= 0)[:, :, None, None], tiles, 0)


def _densify(values, rows, counts, k: int):
    """Dense [K, N] kernel from the tiles."""
    nb, _, bh, bw = values.shape
    tiles = _scatter_tiles(values, rows, counts, k // bh)
    return tiles.transpose(1, 2, 0, 3).reshape(k, nb * bw)


@jax.custom_vjp
def take_tiles(tiles_NbxKbxbhxbw, rows, counts):
    """values [Nb, B, bh, bw] = the tiles at `rows` (zero in padding slots). Its gradient puts
    dvalues back by a gather through `slot_map` (autodiff of a gather would scatter-add)."""
    values = jnp.take_along_axis(tiles_NbxKbxbhxbw, rows[:, :, None, None], axis=1)
    return jnp.where(_valid(counts, rows.shape[1])[:, :, None, None], values, 0)


def _take_fwd(tiles, rows, counts):
    return take_tiles(tiles, rows, counts), (rows, counts, tiles.shape[1])


def _take_bwd(res, dvalues):
    rows, counts, kb = res
    zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return _scatter_tiles(dvalues, rows, counts, kb), zero_int(rows), zero_int(counts)


take_tiles.defvjp(_take_fwd, _take_bwd)


def pack_columns(kernel_KxN, mask_KxN, block: tuple[int, int], budget: int):
    """(values, rows, counts) of `kernel ⊙ mask` with `budget` tiles per block-column, jittable
    and differentiable w.r.t. the kernel (gradient zero off the kept tiles). Tiles past the budget
    are dropped: the caller guarantees no block-column keeps more (see `train` block phases)."""
    bh, bw = block
    k, n = kernel_KxN.shape
    kb, nb = k // bh, n // bw
    keep_KbxNb = jnp.asarray(mask_KxN, bool).reshape(kb, bh, nb, bw).any(axis=(1, 3))
    rows, counts, _ = first_true(keep_KbxNb, budget, axis=0)
    masked = jnp.where(mask_KxN, kernel_KxN, jnp.zeros_like(kernel_KxN))
    tiles = masked.reshape(kb, bh, nb, bw).transpose(2, 0, 1, 3)  # [Nb, Kb, bh, bw]
    return take_tiles(tiles, rows, counts), rows, counts


@jax.custom_vjp
def _xla_scatter(x_MxK, values, rows, counts):
    return _scatter_fwd(x_MxK, values, rows, counts)[0]


def _scatter_fwd(x_MxK, values, rows, counts):
    w = _densify(values.astype(x_MxK.dtype), rows, counts, x_MxK.shape[1])
    y = jnp.matmul(x_MxK, w, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    return y, (x_MxK, w, values, rows, counts)


def _scatter_bwd(res, dy_MxN):
    x_MxK, w, values, rows, counts = res
    nb, budget, bh, bw = values.shape
    dy = dy_MxN.astype(x_MxK.dtype)
    dx = jnp.matmul(dy, w.T, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
    dw = jnp.matmul(x_MxK.T, dy, preferred_element_type=jnp.float32)
    dw_tiles = dw.reshape(-1, bh, nb, bw).transpose(2, 0, 1, 3)  # [Nb, Kb, bh, bw]
    dvals = take_tiles(dw_tiles, rows, counts)
    zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx, dvals.astype(values.dtype), zero_int(rows), zero_int(counts)


_xla_scatter.defvjp(_scatter_fwd, _scatter_bwd)


def _gather_columns(x_MxK, rows_NbxB, bh: int):
    """x_NbxMxBbh: for each block-column, the x columns of its kept block-rows."""
    m, k = x_MxK.shape
    nb, budget = rows_NbxB.shape
    xg = x_MxK.reshape(m, k // bh, bh)[:, rows_NbxB]  # [M, Nb, B, bh]
    return xg.transpose(1, 0, 2, 3).reshape(nb, m, budget * bh)


def _fwd_gathered(xg_NbxMxBbh, vals, dtype):
    """y [M, N] from the gathered x of some rows (`_gather_columns`)."""
    nb, budget, bh, bw = vals.shape
    y_NbxMxbw = jnp.matmul(
        xg_NbxMxBbh, vals.reshape(nb, budget * bh, bw), preferred_element_type=jnp.float32
    )
    return y_NbxMxbw.transpose(1, 0, 2).reshape(-1, nb * bw).astype(dtype)


def _bwd_gathered(xg_NbxMxBbh, dy_MxN, vals, rows, k: int):
    """(dx [M, K], dvalues [Nb, B, bh, bw] f32) for some rows, from their gathered x."""
    m = dy_MxN.shape[0]
    nb, budget, bh, bw = vals.shape
    dy_NbxMxbw = dy_MxN.reshape(m, nb, bw).transpose(1, 0, 2)
    dvals = jnp.matmul(
        xg_NbxMxBbh.transpose(0, 2, 1), dy_NbxMxbw, preferred_element_type=jnp.float32
    )
    kb = k // bh
    if kb < bw:  # one-hot contraction over the (j, b) slots: Kb/bw of the dx matmul
        p_NbxMxBbh = jnp.matmul(
            dy_NbxMxbw,
            vals.reshape(nb, budget * bh, bw).transpose(0, 2, 1),
            preferred_element_type=jnp.float32,
        )
        onehot_NbxBxKb = jax.nn.one_hot(rows, kb, dtype=jnp.float32)
        dx = jnp.einsum(
            "jmbk,jbr->mrk",
            p_NbxMxBbh.reshape(nb, m, budget, bh),
            onehot_NbxBxKb,
            preferred_element_type=jnp.float32,
        )
    else:  # many block-rows: a segment sum over the slots is cheaper (measured)
        p_TxMxbh = jnp.einsum(
            "jmw,jbkw->jbmk", dy_NbxMxbw, vals, preferred_element_type=jnp.float32
        ).reshape(nb * budget, m, bh)
        dx = jax.ops.segment_sum(p_TxMxbh, rows.reshape(-1), kb).transpose(1, 0, 2)
    return dx.reshape(m, k).astype(dy_MxN.dtype), dvals.reshape(vals.shape)


def _row_chunks(a_MxC, chunk: int):
    """[M, C] → [M'/chunk, chunk, C] zero-padded to a multiple of `chunk` rows."""
    m = a_MxC.shape[0]
    pad = -m % chunk
    if pad:
        a_MxC = jnp.pad(a_MxC, ((0, pad), (0, 0)))
    return a_MxC.reshape(-1, chunk, a_MxC.shape[1])


def _unchunked(chunk: int | None, m: int) -> bool:
    return chunk is None or chunk >= m


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla_block(x_MxK, values, rows, counts, chunk, k):
    return _fwd(x_MxK, values, rows, counts, chunk, k)[0]


def _fwd(x_MxK, values, rows, counts, chunk, k):
    m = x_MxK.shape[0]
    vals = values.astype(x_MxK.dtype)
    bh = values.shape[2]
    if _unchunked(chunk, m):  # keep the gathered x for the backward
        xg_NbxMxBbh = _gather_columns(x_MxK, rows, bh)
        return _fwd_gathered(xg_NbxMxBbh, vals, x_MxK.dtype), (xg_NbxMxBbh, values, rows, counts)
    y = jax.lax.map(
        lambda xc: _fwd_gathered(_gather_columns(xc, rows, bh), vals, xc.dtype),
        _row_chunks(x_MxK, chunk),
    )
    return y.reshape(-1, y.shape[-1])[:m], (x_MxK, values, rows, counts)


def _bwd(chunk, k, res, dy_MxN):
    x_or_xg, values, rows, counts = res
    m = dy_MxN.shape[0]
    vals = values.astype(x_or_xg.dtype)
    dy_MxN = dy_MxN.astype(x_or_xg.dtype)
    if _unchunked(chunk, m):
        dx, dvals = _bwd_gathered(x_or_xg, dy_MxN, vals, rows, k)
    else:  # gather again, a chunk of rows at a time

        def body(dvals, xs):
            x_c, dy_c = xs
            dx, dv = _bwd_gathered(_gather_columns(x_c, rows, values.shape[2]), dy_c, vals, rows, k)
            return dvals + dv, dx

        dvals0 = jnp.zeros(values.shape, jnp.float32)
        chunks = (_row_chunks(x_or_xg, chunk), _row_chunks(dy_MxN, chunk))
        dvals, dx = jax.lax.scan(body, dvals0, chunks)
        dx = dx.reshape(-1, k)[:m]
    dvals = jnp.where(_valid(counts, rows.shape[1])[:, :, None, None], dvals, 0)
    zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
    return dx, dvals.astype(values.dtype), zero_int(rows), zero_int(counts)


_xla_block.defvjp(_fwd, _bwd)


def block_columns_matmul(
    x, values, rows, counts, *, chunk: int | None = DEFAULT_CHUNK
) -> jax.Array:
    """y [..., N] = x [..., K] @ the kernel held as (values, rows, counts) (see `pack_columns`),
    gathered path; all rows at once (None) or `chunk` rows at a time."""
    nb, _, bh, bw = values.shape
    lead, k = x.shape[:-1], x.shape[-1]
    chunk = None if chunk is None else int(chunk)
    y = _xla_block(x.reshape(-1, k), values, rows, counts, chunk, k)
    return y.reshape(*lead, nb * bw)


def xla_block_matmul(
    x_MxK: jax.Array,
    packed: BlockPacked,
    *,
    strategy: str = "auto",
    chunk: int | None = DEFAULT_CHUNK,
) -> jax.Array:
    """y [..., N] = x [..., K] @ unpack_block(packed) in plain XLA (no Pallas).

    strategy: "gather" (work ∝ kept tiles), "scatter" (tiles into a dense kernel, dense matmul)
    or "auto" (`choose_strategy`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"xla_block_matmul: strategy must be one of {STRATEGIES}, got {strategy!r}"
        )
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
    strategy = choose_strategy(packed) if strategy == "auto" else strategy
    if strategy == "gather":
        return block_columns_matmul(x_MxK, packed.values, packed.rows, packed.counts, chunk=chunk)
    lead = x_MxK.shape[:-1]
    y = _xla_scatter(x_MxK.reshape(-1, k), packed.values, packed.rows, packed.counts)
    return y.reshape(*lead, cols)


DEFAULT_BREAK_EVEN = benchmarked.DEFAULT_BREAK_EVEN


@functools.cache
def break_even_density(block: tuple[int, int], backend: str | None = None) -> float:
    """Density below which the block-sparse layer beats masked dense (forward + backward), as
    measured by benchmarks/block_sparse.py for this backend (`benchmarked.break_even_density`: nearest
    measured block area; DEFAULT_BREAK_EVEN when nothing was measured, which is logged; 0 when
    the block path never won)."""
    return benchmarked.break_even_density(tuple(block), backend or jax.default_backend())
