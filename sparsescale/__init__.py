"""sparsescale: sparse Flax NNX layers and sparsity scaling experiments.

Importing it changes no global state. Variables carry logical axis names only (`out_sharding=`
metadata); shardings are applied explicitly by jit in/out shardings (see sharding.py), so the
modules here create their variables under `nnx.use_eager_sharding(False)` (`layers.lazy_sharding`)
and can be built outside a mesh context whatever `flax_always_shard_variable` is set to.
"""
