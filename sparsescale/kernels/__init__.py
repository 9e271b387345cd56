"""Sparse matmul kernels (Pallas N:M and block-sparse, XLA block-sparse) and compressed formats.

Public API: formats (`pack_nm`, `unpack_nm`, `pack_block`, `unpack_block`), ops (`nm_matmul`,
`block_matmul`, `xla_block_matmul`), `check_config` and `auto_impl`.

Use from a layer holding a dense kernel [K, N] and a boolean mask (packing is jittable and
differentiable, so gradients reach the dense kernel, zero off the mask):
    y = nm_matmul(x, pack_nm(kernel, mask, n, m))                # impl="nm"
    y = block_matmul(x, pack_block(kernel, mask, block, b_col, b_row))      # impl="block", Pallas
    y = xla_block_matmul(x, pack_block(kernel, mask, block, b_col, b_row))  # impl="block", XLA
Under jit, pack_block needs static budgets (b_col tiles per block-column, b_row per block-row):
take them from the concrete mask at construction (or Kb / Nb for a mask that may change). At
construction call `check_config(kind, (K, N), dtype, tiles, backend, ...)` with the tiles the op
will use (`tiles.pick_nm_tiles` / `tiles.pick_block_tiles`, which the ops use when tiles=None).
"""

from sparsescale.kernels.block_matmul.ops import block_matmul
from sparsescale.kernels.formats import (
    BlockPacked,
    NMPacked,
    pack_block,
    pack_nm,
    unpack_block,
    unpack_nm,
)
from sparsescale.kernels.nm_matmul.ops import nm_matmul
from sparsescale.kernels.tiles import BlockTiles, NMTiles, auto_impl, check_config
from sparsescale.kernels.xla_block import xla_block_matmul

__all__ = [
    "BlockPacked",
    "BlockTiles",
    "NMPacked",
    "NMTiles",
    "auto_impl",
    "block_matmul",
    "check_config",
    "nm_matmul",
    "pack_block",
    "pack_nm",
    "unpack_block",
    "unpack_nm",
    "xla_block_matmul",
]
