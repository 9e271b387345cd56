"""The variant axis: K compatible runs trained in one compiled step.

Runs stack when they share model, data (but its seed), optimizer (but its seed), mesh and pruning
recipe; they may differ in seeds and, for unstructured and block sparsity, in the target, and
dense runs ride along as 0%. Stacked state carries a leading variant axis on every leaf but the
shared step counter; `over_variants` runs a one-run step over it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp

VARIANT_FIELDS = ("run_id", "tag", "train.seed", "data.seed", "sparsity.seed")
STACK_AXES = {"params": 0, "masks": 0, "rest": 0, "opt": 0, "step": None}


def _stack_key(cfg) -> tuple[str, str | None]:
    """(everything but the per-variant fields, the pruning recipe less its target; None: dense)."""
    d = cfg.to_dict()
    for field in VARIANT_FIELDS:
        *parents, leaf = field.split(".")
        node = d
        for part in parents:
            node = node[part]
        node.pop(leaf)
    recipe = d.pop("sparsity")
    if cfg.sparsity.structure is None:
        return json.dumps(d, sort_keys=True), None
    if isinstance(cfg.sparsity.structure, sp.Unstructured | sp.Block):
        recipe["structure"].pop("sparsity")
    recipe["structure"]["kind"] = cfg.sparsity.structure.name
    return json.dumps(d, sort_keys=True), json.dumps(recipe, sort_keys=True)


def _joins_dense(cfg) -> bool:
    """Whether a dense run can ride in a stack of `cfg` as the same recipe at 0% sparsity (not
    with block-sparse execution: a dense member would keep the whole stack masked)."""
    return (
        isinstance(cfg.sparsity.structure, sp.Unstructured | sp.Block)
        and cfg.sparsity.method in ("magnitude", "random")
        and cfg.sparsity.impl == "masked"
    )


def stack_groups(cfgs: list) -> list[list[int]]:
    """Indices of `cfgs` (RunConfigs) grouped into stackable sets. Dense runs join a matching
    unstructured/block group."""
    groups: dict[tuple, list[int]] = {}
    dense: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        base, recipe = _stack_key(c)
        if recipe is None:
            dense.setdefault(base, []).append(i)
        else:
            groups.setdefault((base, recipe), []).append(i)
    for base, members in dense.items():
        host = next(
            (k for k, g in groups.items() if k[0] == base and _joins_dense(cfgs[g[0]])), None
        )
        groups.setdefault(host or (base, None), []).extend(members)
    return [sorted(g) for g in groups.values()]


def check_stackable(cfgs: list):
    """Raises ValueError unless `cfgs` can train as one stack; returns the config to build."""
    if len(stack_groups(cfgs)) != 1:
        keys = [_stack_key(c) for c in cfgs]
        raise ValueError(
            "these runs cannot be stacked: they must share model, data (but seed), optimizer (but "
            f"seed), mesh and pruning recipe; {len(set(keys))} different recipes given."
        )
    return next((c for c in cfgs if c.sparsity.structure is not None), cfgs[0])


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


def shared_prefix(cfgs: list) -> tuple[int, list[int], list[int]]:
    """(P, reps, slot): the first P steps of stacked runs `cfgs` are the same computation for
    every variant with the same seeds and data (gradual or one-shot magnitude pruning keeps every
    mask dense until the schedule starts; the target enters only then), so those steps need train
    only `reps`, one member index per distinct (seeds, data); member k's state is `reps`
    variant `slot[k]`. `(0, [], [])` when nothing is shared. Branching the variants from that
    prefix is bit-identical to training each from step 0."""
    starts = []
    for c in cfgs:
        s = c.sparsity
        if s.structure is None:
            continue
        gradual = s.schedule.kind in ("gradual", "one_shot") and s.method in ("magnitude", "random")
        starts.append(min(s.schedule.steps(c.train.steps)[0], c.train.steps - 1) if gradual else 0)
    prefix = min(starts, default=0)
    keys = [
        json.dumps([c.train.seed, c.sparsity.seed, dataclasses.asdict(c.data)], default=str)
        for c in cfgs
    ]
    distinct = list(dict.fromkeys(keys))
    if prefix <= 0 or len(distinct) == len(cfgs):
        return 0, [], []
    return prefix, [keys.index(k) for k in distinct], [distinct.index(k) for k in keys]


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
