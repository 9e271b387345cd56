"""The public glue for pruning in one's own loop (`sparsescale.masking`), on the trainer's model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from sparsescale import masking, pruner
from sparsescale import model as model_lib
from sparsescale import sparsity as sp


def test_masking_on_the_transformer_constant_schedule():
    model = model_lib.Transformer(model_lib.preset("cpu_6k"), rngs=nnx.Rngs(0))
    graphdef, params, masks, rest = masking.split(model)
    paths = masking.kernel_mask_paths(params, masks)
    assert paths and all(k[-1] == "kernel" and m[-1] == "mask" for k, m in paths.items())
    cfg = sp.SparsityConfig(
        structure=sp.Unstructured(0.75), schedule=sp.Schedule("constant")
    )  # default include/exclude: attention and MLP kernels
    prune = masking.make_pruner(params, masks, cfg, total_steps=10)
    assert set(prune.paths) == set(paths)
    params, masks = masking.apply_initial_masks(prune, params, masks)
    assert float(masking.sparsity(prune, masks)) == 0.75
    kernels, kernel_masks = masking.pruned_kernels(prune, params, masks)
    for p in prune.paths:  # pruned weights zeroed at step 0
        assert not np.any(np.asarray(kernels[p])[~np.asarray(kernel_masks[p])])
    keep = masking.optimizer_masks(params, masks)
    assert jax.tree.structure(keep) == jax.tree.structure(params)
    flat_keep = traverse_util.flatten_dict(keep)
    assert flat_keep[("embed", "embedding")].shape == ()

    tx = pruner.keep_pruned_zero(optax.adamw(1e-2))
    opt = tx.init(params)
    tokens = jnp.zeros((2, 16), jnp.int32)

    @jax.jit
    def step(params, masks, opt, i):
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, masks, rest)(tokens)[0])
        grads = jax.grad(loss)(params)
        masks = masking.update_masks(prune, i, params, masks, grads)
        upd, opt = tx.update(grads, opt, params, masks=masking.optimizer_masks(params, masks))
        return optax.apply_updates(params, upd), masks, opt

    params, masks, opt = step(params, masks, opt, 0)
    assert float(masking.sparsity(prune, masks)) == 0.75  # constant: masks fixed
    kernels, kernel_masks = masking.pruned_kernels(prune, params, masks)
    for p in prune.paths:
        assert not np.any(np.asarray(kernels[p])[~np.asarray(kernel_masks[p])])
