"""Mask updates over training and the optimizer wrapper that keeps pruned weights at zero.

Everything here is a pure function of flat dicts `{path tuple: array}` so it runs inside the jitted
train step: the schedule is evaluated from the traced step, so mask updates never recompile.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from sparsescale import sparsity as sp

Path = tuple


def kernel_to_mask_path(path: Path) -> Path:
    return (*path[:-1], "mask")


class Pruner:
    """Computes the masks of the pruned kernels from a traced step.

    `kernel_shapes` maps the path of every SparseLinear kernel (…, "kernel") to its shape; only the
    paths matched by include/exclude are pruned, the others keep all-ones masks.
    """

    def __init__(
        self,
        cfg: sp.SparsityConfig,
        kernel_shapes: Mapping[Path, tuple[int, ...]],
        total_steps: int,
    ):
        self.cfg, self.total_steps = cfg, int(total_steps)
        self.seed = cfg.seed
        names = {sp.path_str(p): p for p in kernel_shapes}
        if cfg.structure is None:
            self.paths: list[Path] = []
        else:
            selected = sp.select_paths(list(names), cfg.include, cfg.exclude)
            self.paths = [names[n] for n in selected]
            for p in self.paths:
                cfg.structure.validate(kernel_shapes[p], where=sp.path_str(p))
        self.shapes = {p: tuple(kernel_shapes[p]) for p in self.paths}
        target = sp.target_sparsity(cfg.structure)
        if isinstance(cfg.structure, sp.NM):
            self.final_sparsity = {p: target for p in self.paths}
        else:
            by_name = sp.layer_sparsities(
                {sp.path_str(p): s for p, s in self.shapes.items()}, target, cfg.allocation
            )
            self.final_sparsity = {p: by_name[sp.path_str(p)] for p in self.paths}

    def bind(self, final_sparsity: Mapping[Path, jax.Array], seed: jax.Array) -> Pruner:
        """A copy pruning to (traced) per-layer `final_sparsity` with a (traced) `seed`: one
        variant of a stacked run (`train.build(..., num_variants=K)` vmaps over these)."""
        bound = copy.copy(self)
        bound.final_sparsity, bound.seed = dict(final_sparsity), seed
        return bound

    # -- scores ------------------------------------------------------------------------------------
    def _layer_key(self, index: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), index)

    def _scores(self, kernels: Mapping[Path, jax.Array]) -> dict[Path, jax.Array]:
        if self.cfg.method == "random":
            return {
                p: sp.random_scores(self._layer_key(i), self.shapes[p])
                for i, p in enumerate(self.paths)
            }
        return {p: jnp.abs(kernels[p]).astype(jnp.float32) for p in self.paths}

    def _structured_masks(self, scores, fraction) -> dict[Path, jax.Array]:
        structure = self.cfg.structure
        if self.cfg.allocation == "global" and not isinstance(structure, sp.NM):
            if isinstance(structure, sp.Block):
                blocks = {p: structure.block_scores(s) for p, s in scores.items()}
                kept = sp.global_masks(blocks, fraction * self.final_sparsity[self.paths[0]])
                return {p: structure.expand(k) for p, k in kept.items()}
            return sp.global_masks(scores, fraction * self.final_sparsity[self.paths[0]])
        return {p: structure.mask(scores[p], fraction * self.final_sparsity[p]) for p in self.paths}

    # -- public ------------------------------------------------------------------------------------
    def initial_masks(self, kernels: Mapping[Path, jax.Array]) -> dict[Path, jax.Array]:
        """Masks at step 0: dense for gradual/one-shot, final-sparsity for constant/dynamic."""
        if not self.paths:
            return {}
        if self.cfg.schedule.kind in ("gradual", "one_shot"):
            return {p: jnp.ones(self.shapes[p], jnp.bool_) for p in self.paths}
        if self.cfg.method in ("set", "rigl"):
            return self._structured_masks(
                {
                    p: sp.random_scores(self._layer_key(i), self.shapes[p])
                    for i, p in enumerate(self.paths)
                },
                1.0,
            )
        return self._structured_masks(self._scores(kernels), 1.0)

    def is_update(self, step: jax.Array) -> jax.Array:
        if self.cfg.method == "srste":
            return (step % self.cfg.schedule.interval(self.total_steps)) == 0
        return self.cfg.schedule.is_update(step, self.total_steps)

    def sparsity_fraction(self, step: jax.Array) -> jax.Array:
        """g(t): the fraction of each layer's final sparsity in force at `step`."""
        return self.cfg.schedule.progress(step, self.total_steps)

    def update(
        self,
        step: jax.Array,
        kernels: Mapping[Path, jax.Array],
        masks: Mapping[Path, jax.Array],
        grads: Mapping[Path, jax.Array] | None = None,
    ) -> dict[Path, jax.Array]:
        """New masks for the pruned kernels (unchanged unless `step` is an update step)."""
        if not self.paths:
            return {}
        masks = {p: masks[p] for p in self.paths}

        def recompute(_):
            if self.cfg.method in ("set", "rigl"):
                fraction = self.cfg.schedule.drop_fraction_at(step, self.total_steps)
                key = jax.random.fold_in(jax.random.key(self.seed + 1), step)
                out = {}
                for i, p in enumerate(self.paths):
                    if self.cfg.method == "rigl":
                        grow = jnp.abs(grads[p])
                    else:
                        grow = jax.random.uniform(jax.random.fold_in(key, i), self.shapes[p])
                    out[p] = sp.drop_and_grow(masks[p], kernels[p], grow, fraction)
                return out
            return self._structured_masks(self._scores(kernels), self.sparsity_fraction(step))

        return jax.lax.cond(self.is_update(step), recompute, lambda _: dict(masks), None)


# ------------------------------------------------------------------------------------------------
# Optimizer: masked updates.


def keep_pruned_zero(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps an optax optimizer so that, given `masks` (a tree like params: bool arrays, or a scalar
    True for unmasked leaves), pruned weights become and stay exactly zero whatever the inner
    optimizer does (AdamW weight decay, momentum), and optimizer moments of pruned weights are reset
    to zero, so a regrown weight starts fresh.
    """

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None, *, masks=None, **extra):
        if masks is None:
            raise ValueError("keep_pruned_zero needs masks=… in update().")
        keep = lambda x, m: jnp.where(m, x, jnp.zeros_like(x))
        updates = jax.tree.map(keep, updates, masks)
        state = optax.tree_utils.tree_map_params(
            inner, keep, state, masks, transform_non_params=lambda x, *_: x
        )
        updates, state = inner.update(updates, state, params)
        # p + (−p) == 0 exactly, so newly pruned weights land on zero in the same step.
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)
