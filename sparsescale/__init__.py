"""sparsescale: sparse Flax NNX layers and sparsity scaling experiments."""

import flax

# Variables carry logical axis names only; shardings are applied explicitly by jit in/out shardings
# (see sharding.py), so variables can be created outside a mesh context.
flax.config.update("flax_always_shard_variable", False)
