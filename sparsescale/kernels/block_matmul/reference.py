"""Plain-jnp reference of the block-sparse product: decompress, then a dense matmul."""

import jax
import jax.numpy as jnp

from sparsescale.kernels.formats import BlockPacked, unpack_block


def block_matmul_reference(x_MxK: jax.Array, packed: BlockPacked) -> jax.Array:
    """y = x @ unpack_block(packed), accumulated in f32, returned in x's dtype."""
    w_KxN = unpack_block(packed).astype(x_MxK.dtype)
    return jnp.matmul(x_MxK, w_KxN, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
