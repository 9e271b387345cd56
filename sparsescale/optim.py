"""The optimizer of every run: AdamW with warmup + cosine, global-norm clipping, no weight decay
on norms and biases, and (for pruning methods that keep pruned weights at zero) the masked
update of `pruner.keep_pruned_zero`."""

from __future__ import annotations

import optax
from flax import traverse_util

from sparsescale import pruner as pruner_lib
from sparsescale import sparsity as sp
from sparsescale.config import TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio
    )


def make_optimizer(cfg: TrainConfig, sparsity: sp.SparsityConfig):
    def decay_mask(params):  # no weight decay on norms and biases
        flat = traverse_util.flatten_dict(params)
        keep = {k: v.ndim >= 2 for k, v in flat.items()}
        return traverse_util.unflatten_dict(keep)

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(
            learning_rate(cfg), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        ),
    )
    return pruner_lib.keep_pruned_zero(tx) if sparsity.keeps_pruned_zero else tx
