"""Which runs train together as one stack, and what of their training they share. JAX-free (the
launcher plans jobs with it); the variant axis itself is `stacking.py`'s.

Runs stack when they share model, data (but its seed), optimizer (but its seed), mesh and pruning
recipe; they may differ in seeds and, for unstructured and block sparsity, in the target, and
dense runs ride along as 0%.
"""

from __future__ import annotations

import dataclasses
import json

VARIANT_FIELDS = ("run_id", "tag", "train.seed", "data.seed", "sparsity.seed")


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
    if cfg.sparsity.structure.name in ("unstructured", "block"):  # the target may differ
        recipe["structure"].pop("sparsity")
    recipe["structure"]["kind"] = cfg.sparsity.structure.name
    return json.dumps(d, sort_keys=True), json.dumps(recipe, sort_keys=True)


def _joins_dense(cfg) -> bool:
    """Whether a dense run can ride in a stack of `cfg` as the same recipe at 0% sparsity (not
    with block-sparse execution: a dense member would keep the whole stack masked)."""
    return (
        cfg.sparsity.structure is not None
        and cfg.sparsity.structure.name in ("unstructured", "block")
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
