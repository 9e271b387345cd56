"""Compressed weight formats for the sparse kernels, with exact round trips to `kernel ⊙ mask`.

Both formats describe a SparseLinear kernel of shape [K, N] (K = input/reduction axis), y = x @ W.

N:M (`NMPacked`): every column keeps n of each m consecutive rows ("group" g = rows g·m … g·m+m-1).
  G = K/m groups. Each kept weight gets a position in its group, idx ∈ [0, m), stored in `bits`
  bits (2 for m ≤ 4, 4 for m ≤ 16); P = 8/bits indices share one byte; H = P/n.
  - values [K·n/m, N], slot-major: values[j·G + g, c] = j-th kept weight (in increasing k) of group
    g of column c. Row r = j·G + g.
  - codes [K·n/(m·P), N] uint8: with S = G/H, codes[b, c] = Σ_s idx[s·S + b, c] << (bits·s), s < P.
    So byte b of a column holds the n slot indices of the H groups {h·S + b : h < H}: for 2:4 the
    two groups b and b + G/2. The layout is fixed by (K, n, m), never by a kernel's tile size.
  - The kernels view values as [P, S, N] (free reshape) and x as H·m planes [H·m, M, S] with
    plane h·m + i holding column (h·S + b)·m + i, so each tile decompresses with elementwise
    selects only (no gathers, no in-kernel reshapes).
  Bytes per weight element (dense bf16 = 2, f32 = 4):
    2:4 bf16 = 0.5·2 + 0.5·2/8 = 1.125 (f32 2.125); 1:4 bf16 = 0.5625; 2:8 bf16 (4-bit indices) = 0.625.

Block (`BlockPacked`, BCSR by block-column): the kernel is cut into (bh, bw) tiles, Kb = K/bh,
  Nb = N/bw. A tile is kept when the mask has any True in it (stored values are kernel ⊙ mask, so
  the round trip is exact for any mask). With a budget of B tiles per block-column:
  - values [Nb, B, bh, bw]: values[j, b] = b-th kept tile (increasing block-row) of block-column j.
  - rows [Nb, B] int32: its block-row; counts [Nb] int32: number of real entries. Padding entries
    (b ≥ counts[j]) repeat the last real row (so a pipelined kernel does not fetch a new x tile)
    and hold zero values.
  - rows_t / slots_t [Kb, Bt], counts_t [Kb]: the transpose (for dX = dY·Wᵀ): the block-columns
    of block-row kb and where their tiles sit in `values` (values[rows_t, slots_t]).
  Bytes per weight element: (B·Nb stored tiles · bh·bw · dtype bytes + 4 B per table entry) /
  (K·N); e.g. 75% sparse, bf16, 128×128 tiles, balanced columns: 0.5 + 0.0002.

Both are pytrees whose only differentiable leaf is `values`; index leaves are integers, so they
never reach an optimizer as parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def nm_index_bits(m: int) -> int:
    """Bits stored per kept-weight index for group size m."""
    if m <= 4:
        return 2
    if m <= 16:
        return 4
    raise ValueError(f"N:M group size m={m} is not supported (expected m ≤ 16)")


def nm_layout(n: int, m: int) -> tuple[int, int, int]:
    """(bits, P indices per byte, H groups per byte) of the N:M format; raises on unsupported n:m."""
    if not (1 <= n < m):
        raise ValueError(f"N:M sparsity needs 1 ≤ n < m, got {n}:{m}")
    bits = nm_index_bits(m)
    per_byte = 8 // bits
    if per_byte % n:
        raise ValueError(
            f"N:M {n}:{m} is not supported by the packed format: {8 // bits} indices of {bits} bits "
            f"share a byte, which must hold whole groups (n must divide {per_byte}); "
            "supported e.g. 1:4, 2:4, 1:8, 2:8"
        )
    return bits, per_byte, per_byte // n


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMPacked:
    """N:M compressed kernel (layout in the module docstring)."""

    values: jax.Array  # [K*n/m, N]
    codes: jax.Array  # [K*n/(m*P), N] uint8
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """Dense kernel shape (K, N)."""
        return self.values.shape[0] * self.m // self.n, self.values.shape[1]

    @property
    def bytes_per_element(self) -> float:
        k, n = self.shape
        nbytes = self.values.size * self.values.dtype.itemsize + self.codes.size
        return nbytes / (k * n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockPacked:
    """Block-sparse kernel, BCSR by block-column (layout in the module docstring)."""

    values: jax.Array  # [Nb, B, bh, bw]
    rows: jax.Array  # [Nb, B] int32
    counts: jax.Array  # [Nb] int32
    rows_t: jax.Array  # [Kb, Bt] int32 (block-column)
    slots_t: jax.Array  # [Kb, Bt] int32 (slot in values[block-column])
    counts_t: jax.Array  # [Kb] int32
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    block: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def bytes_per_element(self) -> float:
        k, n = self.shape
        idx = (self.rows, self.counts, self.rows_t, self.slots_t, self.counts_t)
        nbytes = self.values.size * self.values.dtype.itemsize + sum(a.size * 4 for a in idx)
        return nbytes / (k * n)


def _check_kernel_mask(kernel_KxN, mask_KxN, where: str) -> None:
    if kernel_KxN.ndim != 2 or mask_KxN.shape != kernel_KxN.shape:
        raise ValueError(
            f"{where}: expected a 2-D kernel [K, N] and a mask of the same shape, got kernel "
            f"{kernel_KxN.shape} and mask {mask_KxN.shape}"
        )


def pack_nm(kernel_KxN, mask_KxN, n: int, m: int) -> NMPacked:
    """Compress `kernel ⊙ mask` (mask: n kept of every m consecutive rows per column) to N:M.

    Jittable. With a concrete mask, a group that does not keep exactly n raises ValueError; with a
    traced mask a group keeping fewer than n packs exactly and one keeping more loses its extras.
    """
    _check_kernel_mask(kernel_KxN, mask_KxN, "pack_nm")
    bits, per_byte, groups_per_byte = nm_layout(n, m)
    k, cols = kernel_KxN.shape
    if k % (m * groups_per_byte):
        raise ValueError(
            f"pack_nm: K={k} must be a multiple of m·H = {m * groups_per_byte} for {n}:{m} "
            f"({groups_per_byte} groups share each index byte)"
        )
    groups = k // m
    mask_GxmxN = jnp.asarray(mask_KxN, bool).reshape(groups, m, cols)
    if _is_concrete(mask_KxN):
        kept = np.asarray(mask_KxN, bool).reshape(groups, m, cols).sum(axis=1)
        if (kept != n).any():
            g, c = np.argwhere(kept != n)[0]
            raise ValueError(
                f"pack_nm: mask is not {n}:{m} along K: group {g} (rows {g * m}..{g * m + m - 1}) "
                f"of column {c} keeps {kept[g, c]} weights, expected exactly {n}"
            )
    values, codes = _pack_nm_arrays(kernel_KxN, mask_GxmxN, n, m)
    return NMPacked(values=values, codes=codes, n=n, m=m)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack_nm_arrays(kernel_KxN, mask_GxmxN, n: int, m: int):
    bits, per_byte, _ = nm_layout(n, m)
    groups, _, cols = mask_GxmxN.shape
    # Positions of kept entries first, in increasing k (stable sort), then the first n of them.
    order_GxnxN = jnp.argsort(~mask_GxmxN, axis=1, stable=True)[:, :n].astype(jnp.int32)
    masked = jnp.where(mask_GxmxN, kernel_KxN.reshape(groups, m, cols), 0).astype(kernel_KxN.dtype)
    values = jnp.take_along_axis(masked, order_GxnxN, axis=1)
    values = values.transpose(1, 0, 2).reshape(n * groups, cols)
    idx_PxSxN = order_GxnxN.transpose(1, 0, 2).reshape(per_byte, -1, cols)
    shifts = (bits * jnp.arange(per_byte, dtype=jnp.int32))[:, None, None]
    codes = jnp.sum(idx_PxSxN << shifts, axis=0).astype(jnp.uint8)
    return values, codes


def nm_indices(packed: NMPacked) -> jax.Array:
    """Unpacked in-group positions [K*n/m, N] int32, aligned with `packed.values`."""
    bits, per_byte, _ = nm_layout(packed.n, packed.m)
    shifts = (bits * jnp.arange(per_byte, dtype=jnp.int32))[:, None, None]
    idx = (packed.codes.astype(jnp.int32)[None] >> shifts) & ((1 << bits) - 1)
    return idx.reshape(packed.values.shape)


@jax.jit
def unpack_nm(packed: NMPacked) -> jax.Array:
    """Dense [K, N] kernel ⊙ mask."""
    n, m = packed.n, packed.m
    k, cols = packed.shape
    idx_nxGxN = nm_indices(packed).reshape(n, k // m, cols)
    vals_nxGxN = packed.values.reshape(n, k // m, cols)
    onehot = idx_nxGxN[:, :, None, :] == jnp.arange(m)[None, None, :, None]  # [n, G, m, N]
    dense = jnp.sum(jnp.where(onehot, vals_nxGxN[:, :, None, :], 0), axis=0)
    return dense.astype(packed.values.dtype).reshape(k, cols)


@jax.jit
def nm_mask(packed: NMPacked) -> jax.Array:
    """Boolean [K, N] keep-mask encoded by the indices."""
    n, m = packed.n, packed.m
    k, cols = packed.shape
    idx_nxGxN = nm_indices(packed).reshape(n, k // m, cols)
    onehot = idx_nxGxN[:, :, None, :] == jnp.arange(m)[None, None, :, None]
    return onehot.any(axis=0).reshape(k, cols)


def block_keep(mask_KxN, block: tuple[int, int]) -> jax.Array:
    """[Kb, Nb] bool: tiles with any kept entry."""
    bh, bw = block
    k, n = mask_KxN.shape
    return jnp.asarray(mask_KxN, bool).reshape(k // bh, bh, n // bw, bw).any(axis=(1, 3))


def first_true(keep, budget: int, axis: int):
    """Indices of the first `budget` True entries along `axis` (increasing), padded by repeating
    the last True one (or 0), and a validity mask."""
    order = jnp.argsort(~keep, axis=axis, stable=True).astype(jnp.int32)
    order = order[:, :budget] if axis == 1 else order[:budget, :].T
    count = jnp.minimum(keep.sum(axis=axis), budget).astype(jnp.int32)
    valid = jnp.arange(budget)[None, :] < count[:, None]
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[:, None], axis=1)
    return jnp.where(valid, order, last), count, valid


def pack_block(
    kernel_KxN,
    mask_KxN,
    block: tuple[int, int] = (128, 128),
    max_blocks_per_col: int | None = None,
    max_blocks_per_row: int | None = None,
) -> BlockPacked:
    """Compress `kernel ⊙ mask` into (bh, bw) tiles (layout in the module docstring).

    Budgets (tiles per block-column / per block-row, which fix the array shapes) default to the
    mask's exact maxima (needs a concrete mask); under jit pass them, or they default to the worst
    case (all tiles). With a concrete mask a budget that is too small raises; with a traced mask
    the tiles past a column budget are dropped (and must not exceed the row budget).
    """
    _check_kernel_mask(kernel_KxN, mask_KxN, "pack_block")
    bh, bw = block
    k, n = kernel_KxN.shape
    if bh <= 0 or bw <= 0 or k % bh or n % bw:
        raise ValueError(
            f"pack_block: block {block} must divide the kernel shape {(k, n)} (K % bh == 0 and "
            "N % bw == 0)"
        )
    kb, nb = k // bh, n // bw
    for name, budget, limit in (("col", max_blocks_per_col, kb), ("row", max_blocks_per_row, nb)):
        if budget is not None and not 1 <= budget <= limit:
            raise ValueError(f"pack_block: max_blocks_per_{name}={budget} must be in [1, {limit}]")
    if _is_concrete(mask_KxN):
        keep = np.asarray(mask_KxN, bool).reshape(kb, bh, nb, bw).any(axis=(1, 3))
        col_max, row_max = int(keep.sum(0).max()), int(keep.sum(1).max())
        for name, axis, most, budget in (
            ("column", 0, col_max, max_blocks_per_col),
            ("row", 1, row_max, max_blocks_per_row),
        ):
            if budget is not None and most > budget:
                raise ValueError(
                    f"pack_block: block-{name} {int(np.argmax(keep.sum(axis)))} keeps {most} tiles"
                    f" of {block}, more than max_blocks_per_{'col' if axis == 0 else 'row'}={budget}"
                )
        max_blocks_per_col = max_blocks_per_col or max(col_max, 1)
        max_blocks_per_row = max_blocks_per_row or max(row_max, 1)
    return _pack_block_arrays(
        kernel_KxN, mask_KxN, (bh, bw), max_blocks_per_col or kb, max_blocks_per_row or nb
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _pack_block_arrays(kernel_KxN, mask_KxN, block, budget: int, budget_t: int) -> BlockPacked:
    bh, bw = block
    k, n = kernel_KxN.shape
    kb, nb = k // bh, n // bw
    keep_KbxNb = block_keep(mask_KxN, block)
    rows_NbxB, counts, valid = first_true(keep_KbxNb, budget, axis=0)
    # Tiles beyond the budget are dropped from the transpose as well.
    slot_KbxNb = jnp.cumsum(keep_KbxNb, axis=0, dtype=jnp.int32) - 1
    keep_KbxNb = keep_KbxNb & (slot_KbxNb < budget)
    rows_t, counts_t, _ = first_true(keep_KbxNb, budget_t, axis=1)
    slots_t = jnp.clip(jnp.take_along_axis(slot_KbxNb, rows_t, axis=1), 0, budget - 1)

    masked = jnp.where(mask_KxN, kernel_KxN, 0).astype(kernel_KxN.dtype)
    tiles = masked.reshape(kb, bh, nb, bw).transpose(2, 0, 1, 3)  # [Nb, Kb, bh, bw]
    values = jnp.take_along_axis(tiles, rows_NbxB[:, :, None, None], axis=1)
    values = jnp.where(valid[:, :, None, None], values, 0).astype(kernel_KxN.dtype)
    return BlockPacked(
        values=values,
        rows=rows_NbxB,
        counts=counts,
        rows_t=rows_t,
        slots_t=slots_t.astype(jnp.int32),
        counts_t=counts_t,
        shape=(k, n),
        block=(bh, bw),
    )


@jax.jit
def unpack_block(packed: BlockPacked) -> jax.Array:
    """Dense [K, N] kernel ⊙ mask."""
    bh, bw = packed.block
    k, n = packed.shape
    kb, nb = k // bh, n // bw
    budget = packed.rows.shape[1]
    valid = jnp.arange(budget)[None, :] < packed.counts[:, None]
    tiles = jnp.zeros((nb, kb, bh, bw), packed.values.dtype)
    vals = jnp.where(valid[:, :, None, None], packed.values, 0)
    rows = jnp.where(valid, packed.rows, kb)  # out of range → dropped
    tiles = tiles.at[jnp.arange(nb)[:, None], rows].add(vals, mode="drop")
    return tiles.transpose(1, 2, 0, 3).reshape(k, n)


def dense_bytes_per_element(dtype) -> float:
    return float(jnp.dtype(dtype).itemsize)


def nm_bytes_per_element(n: int, m: int, dtype) -> float:
    """Bytes per dense weight element of the N:M format (values + packed indices)."""
    bits, _, _ = nm_layout(n, m)
    return n / m * (jnp.dtype(dtype).itemsize + bits / 8)


__all__ = [
    "BlockPacked",
    "NMPacked",
    "block_keep",
    "dense_bytes_per_element",
    "nm_bytes_per_element",
    "nm_indices",
    "nm_layout",
    "nm_mask",
    "pack_block",
    "pack_nm",
    "unpack_block",
    "unpack_nm",
]
