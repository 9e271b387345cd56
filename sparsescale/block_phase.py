"""When and how the block-sparse step replaces the masked one (`sparsity.impl = "block"`).

The loop rebuilds the step at most twice: once every pruned layer is at most `switch_density`
dense, and once at the final sparsity, each time with the tile budget read off the current masks
(block masks only lose tiles). The state and checkpoints keep one layout throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sparsescale import masking
from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp
from sparsescale import step as step_lib
from sparsescale.config import RunConfig


def block_phase_steps(cfgs: list[RunConfig], pruner: pruner_lib.Pruner) -> list[int]:
    """Steps at which the loop (re)builds the step with block-sparse layers (`impl="block"`): the
    first step whose masks are at most `switch_density` dense in every pruned layer of every run,
    and the first at the final sparsity. Empty: masked throughout."""
    base = cfgs[0].sparsity
    if base.impl != "block" or not pruner.paths:
        return []
    total = cfgs[0].train.steps
    switch = base.switch_density
    if switch is None:
        from sparsescale.kernels import xla_block

        switch = xla_block.break_even_density(base.structure.block)
    steps = np.arange(total)
    updates = np.asarray(pruner.is_update(jnp.asarray(steps)))
    fraction_at = np.asarray(pruner.sparsity_fraction(jnp.asarray(steps)), np.float64)
    # Masks in force during step t come from the last update before t (or from init).
    last = np.maximum.accumulate(np.where(updates, steps, -1))
    before = np.concatenate([[-1], last[:-1]])
    initial = 1.0 if base.schedule.kind in ("constant", "dynamic") else 0.0
    in_force = np.where(before >= 0, fraction_at[np.maximum(before, 0)], initial)
    least_sparse = min(
        min(pruner_lib.Pruner(c.sparsity, pruner.shapes, total).final_sparsity.values())
        if c.sparsity.structure is not None
        else 0.0
        for c in cfgs
    )
    density = 1.0 - in_force * least_sparse
    out = []
    for hit in (density <= switch + 1e-9, in_force >= 1.0):
        if hit.any() and density[np.argmax(hit)] <= switch + 1e-9:
            out.append(int(np.argmax(hit)))
    return sorted(set(out))


def block_budgets_of(trainer: step_lib.Trainer, state: dict) -> dict[str, int]:
    """{layer path: most tiles any block-column keeps} over the pruned layers' current masks (and
    all stacked variants): the tile budgets the block-sparse step needs from here on, since block
    masks only lose tiles as training goes on (pruned blocks stay zero, so never score back)."""
    bh, bw = trainer.cfg.sparsity.structure.block
    kernel_paths = masking.kernel_mask_paths(
        nnx.to_pure_dict(trainer.templates["params"]), nnx.to_pure_dict(trainer.templates["masks"])
    )

    def most_per_column(masks):
        flat = traverse_util.flatten_dict(masks)
        out = {}
        for p in trainer.pruner.paths:
            m = flat[kernel_paths[p]]
            *lead, k, n = m.shape
            keep = m.reshape(*lead, k // bh, bh, n // bw, bw).any(axis=(-3, -1))
            out[sp.path_str(p[:-1])] = jnp.max(jnp.sum(keep, axis=-2, dtype=jnp.int32))
        return out

    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    counts = jax.jit(most_per_column, out_shardings=replicated)(state["masks"])
    return {name: max(int(c), 1) for name, c in jax.device_get(counts).items()}
