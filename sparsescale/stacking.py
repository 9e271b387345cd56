"""The variant axis: K compatible runs (`stack_rules.stack_groups`) trained in one compiled step.

Stacked state carries a leading variant axis on every leaf but the shared step counter;
`over_variants` runs a one-run step over it, `variant_inputs` holds what differs per variant.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp

STACK_AXES = {"params": 0, "masks": 0, "rest": 0, "opt": 0, "step": None}


def variant_inputs(cfgs: list, pruner: pruner_lib.Pruner) -> dict:
    """What differs between stacked variants, as arrays with a leading variant axis: the init
    seed, the pruning seed and each pruned layer's final sparsity (0 for a dense variant)."""
    final = {sp.path_str(p): [] for p in pruner.paths}
    for c in cfgs:
        own = (
            pruner_lib.Pruner(c.sparsity, pruner.shapes, c.train.steps)
            if c.sparsity.structure
            else None
        )
        for p in pruner.paths:
            final[sp.path_str(p)].append(own.final_sparsity[p] if own else 0.0)
    return {
        "seed": np.array([c.train.seed for c in cfgs], np.int32),
        "prune_seed": np.array([c.sparsity.seed for c in cfgs], np.int32),
        "final_sparsity": {k: np.array(v, np.float32) for k, v in final.items()},
    }


def take_variants(state: dict, index: list[int]) -> dict:
    """The stacked `state` with variants `index` (in that order) along its leading axis."""
    idx = np.asarray(index)
    return {
        **jax.tree.map(lambda x: x[idx], {k: v for k, v in state.items() if k != "step"}),
        "step": state["step"],
    }


def stacked_sharding(s: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    """`s` with an unsharded leading variant axis."""
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))


def stacked_shardings(shardings: dict) -> dict:
    """State shardings {params, masks, rest, opt, step} with the variant axis (step: shared)."""
    is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)
    return {
        k: v if k == "step" else jax.tree.map(stacked_sharding, v, is_leaf=is_sharding)
        for k, v in shardings.items()
    }


def over_variants(fn: Callable, vmap_width: int | None, has_variant: bool = True) -> Callable:
    """`fn(state, batch[, variant])` over the leading variant axis of a stacked state, sharing the
    step counter. The variants run `vmap_width` at a time (`lax.map`): on CPU one at a time is the
    fastest (a vmapped step's working set outgrows the caches), wider suits accelerators."""

    def stacked(state, batch, variants=None):
        step = state["step"]

        def one(xs):
            per, b, v = xs
            out = fn({**per, "step": step}, b, v) if has_variant else fn({**per, "step": step}, b)
            if not has_variant:
                return out
            new, metrics = out
            return {k: x for k, x in new.items() if k != "step"}, metrics

        per_variant = {k: x for k, x in state.items() if k != "step"}
        if batch.shape[0] == 1:  # a stack of one: the one-run step on the squeezed state
            squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
            out = jax.tree.map(
                lambda x: jnp.asarray(x)[None], one(squeeze((per_variant, batch, variants)))
            )
        else:
            out = jax.lax.map(one, (per_variant, batch, variants), batch_size=vmap_width)
        if not has_variant:
            return out
        new, metrics = out
        return {**new, "step": step + 1}, metrics

    return stacked
