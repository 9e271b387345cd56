"""SparseLinear (masked) vs nnx.Linear forward+backward, and the cost of a full mask update.

    python benchmarks/sparse_layers.py [--quick]

Writes benchmarks/results/sparse_layers_<backend>.json. Ratios are measured in one process.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from sparsescale import layers
from sparsescale import sparsity as sp


def layer_ratio(batch: int, d_in: int, d_out: int, repeats: int) -> dict:
    dense = nnx.Linear(d_in, d_out, use_bias=False, rngs=nnx.Rngs(0))
    sparse = layers.SparseLinear(d_in, d_out, use_bias=False, rngs=nnx.Rngs(0))
    sparse.mask[...] = sp.Unstructured(0.75).mask(jnp.abs(sparse.kernel[...]))
    x = jax.random.normal(jax.random.key(1), (batch, d_in))

    def fwd_bwd(module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        @jax.jit
        def f(params, x):
            def loss(p):
                return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)

            return jax.grad(loss)(params)

        return lambda: f(params, x)

    times = common.time_interleaved(
        {"dense": fwd_bwd(dense), "masked": fwd_bwd(sparse)}, repeats=repeats
    )
    t_dense, t_sparse = times["dense"], times["masked"]
    return {
        "shape": [batch, d_in, d_out],
        "dense_s": t_dense,
        "masked_s": t_sparse,
        "masked_over_dense": t_sparse / t_dense,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 10 if args.quick else 30
    shapes = [(4096, 128, 512), (4096, 256, 1024), (4096, 512, 2048)]
    if not args.quick:
        shapes.append((8192, 1024, 4096))
    results = [layer_ratio(*s, repeats=repeats) for s in shapes]
    for r in results:
        print(f"{r['shape']}: masked/dense fwd+bwd = {r['masked_over_dense']:.3f}")
    path = common.write("sparse_layers", {"layers": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
