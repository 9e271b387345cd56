"""Plain-jnp reference of the N:M product: decompress, then a dense matmul."""

import jax
import jax.numpy as jnp

from sparsescale.kernels.formats import NMPacked, unpack_nm


def nm_matmul_reference(x_MxK: jax.Array, packed: NMPacked) -> jax.Array:
    """y = x @ unpack_nm(packed), accumulated in f32, returned in x's dtype."""
    w_KxN = unpack_nm(packed).astype(x_MxK.dtype)
    return jnp.matmul(x_MxK, w_KxN, preferred_element_type=jnp.float32).astype(x_MxK.dtype)
