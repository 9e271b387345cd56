"""Gradual pruning in your own training loop: the glue between an nnx model whose layers are
`SparseLinear` (`layers.sparsify`, or a model built from them), a `pruner.Pruner`, and the
`pruner.keep_pruned_zero` optimizer wrapper. The trainer (`sparsescale.step`) uses the same
functions.

Everything works on the model's state as pure dicts (`nnx.to_pure_dict`), so it runs inside a
plain `jax.jit` step; paths are tuples of keys, a kernel at `(..., "kernel")` has its mask at
`(..., "mask")`:

    graphdef, params, masks, rest = masking.split(model)
    prune = masking.make_pruner(params, masks, cfg, total_steps)   # cfg: sparsity.SparsityConfig
    params, masks = masking.apply_initial_masks(prune, params, masks)  # no-op for gradual schedules
    tx = pruner.keep_pruned_zero(optax.adamw(...))
    # in the jitted step, after the gradients:
    masks = masking.update_masks(prune, step, params, masks, grads)
    updates, opt = tx.update(grads, opt, params, masks=masking.optimizer_masks(params, masks))
    # the model for a forward pass: nnx.merge(graphdef, params, masks, rest)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp
from sparsescale.layers import Mask

Path = tuple


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict, dict]:
    """(graphdef, params, masks, rest) of `model` as pure dicts; `nnx.merge(graphdef, params,
    masks, rest)` rebuilds the model (also inside jit)."""
    graphdef, params, masks, rest = nnx.split(model, nnx.Param, Mask, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(masks), nnx.to_pure_dict(rest)


def kernel_mask_paths(params: Mapping, masks: Mapping) -> dict[Path, Path]:
    """{kernel path: mask path} for every kernel that has a mask."""
    mask_paths = set(traverse_util.flatten_dict(masks))
    out = {}
    for path in traverse_util.flatten_dict(params):
        mask_path = pruner_lib.kernel_to_mask_path(path)
        if path[-1] == "kernel" and mask_path in mask_paths:
            out[path] = mask_path
    return out


def make_pruner(
    params: Mapping, masks: Mapping, cfg: sp.SparsityConfig, total_steps: int
) -> pruner_lib.Pruner:
    """The `Pruner` of every masked kernel matched by `cfg.include` / `cfg.exclude` (a model
    `layers.sparsify` converted: `include=(".*",), exclude=()` prunes every converted layer),
    pruning to `cfg.structure` on `cfg.schedule` over `total_steps` steps."""
    flat = traverse_util.flatten_dict(params)
    shapes = {p: tuple(flat[p].shape) for p in kernel_mask_paths(params, masks)}
    return pruner_lib.Pruner(cfg, shapes, total_steps)


def pruned_kernels(
    pruner: pruner_lib.Pruner, params: Mapping, masks: Mapping
) -> tuple[dict[Path, jax.Array], dict[Path, jax.Array]]:
    """({kernel path: kernel}, {kernel path: its mask}) of the kernels `pruner` prunes."""
    fp, fm = traverse_util.flatten_dict(params), traverse_util.flatten_dict(masks)
    kernels = {p: fp[p] for p in pruner.paths}
    return kernels, {p: fm[pruner_lib.kernel_to_mask_path(p)] for p in pruner.paths}


def replace_masks(masks: Mapping, new_kernel_masks: Mapping[Path, jax.Array]) -> dict:
    """The mask tree with the masks of the given kernels ({kernel path: mask}) replaced."""
    fm = traverse_util.flatten_dict(masks)
    for p, m in new_kernel_masks.items():
        fm[pruner_lib.kernel_to_mask_path(p)] = m
    return traverse_util.unflatten_dict(fm)


def apply_initial_masks(
    pruner: pruner_lib.Pruner, params: Mapping, masks: Mapping
) -> tuple[dict, dict]:
    """(params, masks) at step 0: the schedule's initial masks (dense for gradual / one-shot,
    final sparsity for constant / dynamic), pruned weights zeroed (unless the method trains
    dense weights, SR-STE)."""
    kernels, _ = pruned_kernels(pruner, params, masks)
    initial = pruner.initial_masks(kernels)
    masks = replace_masks(masks, initial)
    if not pruner.cfg.keeps_pruned_zero:
        return dict(params), masks
    fp = traverse_util.flatten_dict(params)
    for p, m in initial.items():
        fp[p] = jnp.where(m, fp[p], 0)
    return traverse_util.unflatten_dict(fp), masks


def update_masks(
    pruner: pruner_lib.Pruner,
    step: jax.Array,
    params: Mapping,
    masks: Mapping,
    grads: Mapping | None = None,
) -> dict:
    """The mask tree after `step` (jittable; unchanged except on the schedule's update steps).
    `grads` (a tree like params) is needed by RigL only."""
    kernels, kernel_masks = pruned_kernels(pruner, params, masks)
    kernel_grads = None
    if grads is not None:
        fg = traverse_util.flatten_dict(grads)
        kernel_grads = {p: fg[p] for p in pruner.paths}
    return replace_masks(masks, pruner.update(step, kernels, kernel_masks, kernel_grads))


def optimizer_masks(params: Mapping, masks: Mapping) -> dict:
    """What `keep_pruned_zero(tx).update(..., masks=)` takes: a tree like `params` holding each
    masked kernel's mask and a scalar True elsewhere."""
    flat_masks = traverse_util.flatten_dict(masks)
    flat = {
        path: flat_masks.get(pruner_lib.kernel_to_mask_path(path), jnp.ones((), jnp.bool_))
        if path[-1] == "kernel"
        else jnp.ones((), jnp.bool_)
        for path in traverse_util.flatten_dict(params)
    }
    return traverse_util.unflatten_dict(flat)


def srste_gradients(
    pruner: pruner_lib.Pruner, params: Mapping, masks: Mapping, grads: Mapping, strength: float
) -> dict:
    """`grads` with SR-STE's sparse-refined term λ·(1 − mask)⊙w added to every pruned kernel's
    gradient (`sparsity.srste_decay`), for the masks in force after this step's update."""
    kernels, kernel_masks = pruned_kernels(pruner, params, masks)
    flat = traverse_util.flatten_dict(grads)
    for p in pruner.paths:
        flat[p] = flat[p] + sp.srste_decay(kernels[p], kernel_masks[p], strength)
    return traverse_util.unflatten_dict(flat)


def layer_sparsity(pruner: pruner_lib.Pruner, masks: Mapping) -> dict[Path, jax.Array]:
    """{kernel path: fraction of its weights masked out} for every pruned kernel."""
    fm = traverse_util.flatten_dict(masks)
    return {
        p: 1.0
        - jnp.sum(fm[pruner_lib.kernel_to_mask_path(p)], dtype=jnp.float32)
        / math.prod(pruner.shapes[p])
        for p in pruner.paths
    }


def sparsity(pruner: pruner_lib.Pruner, masks: Mapping) -> jax.Array:
    """Fraction of the pruned kernels' weights that are masked out (0 with nothing to prune)."""
    fm = traverse_util.flatten_dict(masks)
    total = sum(math.prod(pruner.shapes[p]) for p in pruner.paths)
    if not total:
        return jnp.zeros((), jnp.float32)
    kept = sum(
        jnp.sum(fm[pruner_lib.kernel_to_mask_path(p)], dtype=jnp.float32) for p in pruner.paths
    )
    return 1.0 - kept / total
