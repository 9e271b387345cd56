"""`block_matmul`: y = x @ (block-packed kernel) through the Pallas kernels, differentiable.

Gradients flow to x and to `packed.values` of kept tiles only (padding slots get zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale.kernels.block_matmul import kernel
from sparsescale.kernels.formats import BlockPacked
from sparsescale.kernels.tiles import (
    BlockTiles,
    pick_block_tiles,
    resolve_backend,
    resolve_interpret,
)


def _float0(a):
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _block_matmul(x, values, rows, counts, rows_t, slots_t, counts_t, spec, interpret):
    return kernel.block_fwd(x, values.astype(x.dtype), rows, counts, spec, interpret)


def _fwd(x, values, rows, counts, rows_t, slots_t, counts_t, spec, interpret):
    vals = values.astype(x.dtype)
    y = kernel.block_fwd(x, vals, rows, counts, spec, interpret)
    # A zero-size array carries the values' dtype (residuals must be arrays).
    carrier = jnp.zeros((0,), values.dtype)
    return y, (x, vals, rows, counts, rows_t, slots_t, counts_t, carrier)


def _bwd(spec, interpret, res, dy):
    x, vals, rows, counts, rows_t, slots_t, counts_t, carrier = res
    dy = dy.astype(x.dtype)
    dx = kernel.block_dx(dy, vals, rows_t, slots_t, counts_t, spec, interpret)
    budget = vals.shape[1]
    dvals = kernel.block_dw(x, dy, rows, counts, spec, carrier.dtype, budget, interpret)
    ints = (rows, counts, rows_t, slots_t, counts_t)
    return (dx, dvals, *map(_float0, ints))


_block_matmul.defvjp(_fwd, _bwd)


def block_matmul(
    x_MxK: jax.Array,
    packed: BlockPacked,
    *,
    tiles: BlockTiles | None = None,
    interpret=None,
    backend: str | None = None,
) -> jax.Array:
    """y [..., N] = x [..., K] @ unpack_block(packed), skipping absent (bh, bw) tiles.

    interpret: None → interpret on CPU, compiled elsewhere; True / `pltpu.InterpretParams()` force
    an interpreter. backend: "tpu" | "gpu" kernel flavour (None → default backend). Leading dims of
    x are flattened into M, which is zero-padded to a multiple of tiles.tm.
    """
    if not isinstance(packed, BlockPacked):
        raise ValueError(
            f"block_matmul: packed must be a BlockPacked (see pack_block), got {type(packed)}"
        )
    k, cols = packed.shape
    if x_MxK.ndim < 1 or x_MxK.shape[-1] != k:
        raise ValueError(
            f"block_matmul: x {x_MxK.shape} must end in the kernel's K={k} (kernel [{k}, {cols}])"
        )
    lead = x_MxK.shape[:-1]
    x2 = x_MxK.reshape(-1, k)
    rows = x2.shape[0]
    bh, bw = packed.block
    backend, interpret = resolve_backend(backend), resolve_interpret(interpret)
    if tiles is None:
        tiles = pick_block_tiles((k, cols), rows, x2.dtype, backend, bool(interpret), (bh, bw))
    spec = kernel.BlockKernelSpec(tm=tiles.tm, bh=bh, bw=bw, backend=backend)
    x2 = jnp.pad(x2, ((0, -rows % tiles.tm), (0, 0)))
    y = _block_matmul(
        x2,
        packed.values,
        packed.rows,
        packed.counts,
        packed.rows_t,
        packed.slots_t,
        packed.counts_t,
        spec,
        interpret,
    )
    return y[:rows].reshape(*lead, cols)
