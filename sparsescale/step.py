"""The jitted init / train step / eval of a run: one pure step with explicit shardings and
donated state, optionally over K stacked variants (stacking.py).

The model is split once (`nnx.split`); the step takes and returns a plain pytree
`{params, masks, rest, opt, step}` of pure dicts, merges the model inside, and differentiates the
`nnx.Param` state only. Mask updates happen inside the step (a traced schedule, no recompiles).
`block_budgets` runs pruned layers block-sparse (block_phase.py); the state layout is the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from sparsescale import masking, stacking
from sparsescale import model as model_lib
from sparsescale import pruner as pruner_lib
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp
from sparsescale.config import RunConfig, TrainConfig
from sparsescale.layers import Mask, use_block_path


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio
    )


def make_optimizer(cfg: TrainConfig, sparsity: pruner_lib.SparsityConfig):
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


def as_state(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


@dataclasses.dataclass
class Trainer:
    """Holds the compiled functions and shardings for one run configuration."""

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    graphdef: object
    templates: dict
    pruner: pruner_lib.Pruner
    tx: optax.GradientTransformation
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    init_fn: Callable
    step_fn: Callable
    eval_fn: Callable
    num_variants: int | None = None  # None: one run; K: K stacked variants (leading axis)

    def variant_state(self, state: dict, k: int) -> dict:
        """Variant k's state in the one-run layout (what its checkpoint holds)."""
        if self.num_variants is None:
            return state
        return {
            **jax.tree.map(lambda x: x[k], {n: v for n, v in state.items() if n != "step"}),
            "step": state["step"],
        }

    def stack_states(self, states: list[dict]) -> dict:
        """The trainer's state from one-run states (one per variant)."""
        if self.num_variants is None:
            (state,) = states
            return state
        parts = [{n: v for n, v in s.items() if n != "step"} for s in states]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        return jax.device_put({**stacked, "step": states[0]["step"]}, self.state_shardings)

    def batch(self, local_batches: list[np.ndarray]) -> jax.Array:
        """The global batch from each variant's process-local batch."""
        return global_batch(
            self, local_batches[0] if self.num_variants is None else np.stack(local_batches)
        )

    def init(self, variants: dict | None = None) -> dict:
        return self.init_fn() if self.num_variants is None else self.init_fn(variants)

    def step(self, state: dict, batch: jax.Array, variants: dict | None = None):
        if self.num_variants is None:
            return self.step_fn(state, batch)
        return self.step_fn(state, batch, variants)

    def evaluate(self, state: dict, batches: list[list[np.ndarray]]) -> list[float]:
        """Each variant's mean eval loss in nats per token, over its own eval batches."""
        total, count = 0.0, 0
        for per_variant in zip(*batches, strict=True):
            loss_sum, n = self.eval_fn(state, self.batch(list(per_variant)))
            total = total + np.asarray(loss_sum, np.float64)
            count += int(np.ravel(n)[0])
        return [float(x) for x in np.atleast_1d(total / count)]


def build(
    cfg: RunConfig,
    devices=None,
    num_variants: int | None = None,
    vmap_width: int | None = None,
    block_budgets: dict[str, int] | None = None,
) -> Trainer:
    """Compiled init/step/eval for `cfg`; with `num_variants=K`, for K stacked variants of it
    (a leading variant axis; init and step then take `stacking.variant_inputs(...)`).
    `block_budgets` ({layer path: tiles per block-column}) runs those layers block-sparse (see
    `block_phase.block_budgets_of`); the state layout does not change."""
    mesh = shard_lib.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    batch_axes = dict(rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if cfg.data.batch_size % shards:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the {shards} batch shards "
            f"of the mesh ({', '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)})."
        )

    def fresh_model(seed=cfg.train.seed):
        model = model_lib.Transformer(cfg.model, rngs=nnx.Rngs(seed))
        if block_budgets:
            use_block_path(model, block_budgets, cfg.sparsity.structure)
        return model

    abstract = nnx.eval_shape(fresh_model)
    graphdef, params_t, masks_t, rest_t = nnx.split(abstract, nnx.Param, Mask, ...)
    templates = {"params": params_t, "masks": masks_t, "rest": rest_t}

    params_pure, masks_pure = nnx.to_pure_dict(params_t), nnx.to_pure_dict(masks_t)
    pruner = masking.make_pruner(params_pure, masks_pure, cfg.sparsity, cfg.train.steps)
    tx = make_optimizer(cfg.train, cfg.sparsity)

    # Shardings from logical axis names.
    shardings = {k: shard_lib.state_shardings(t, mesh, rules) for k, t in templates.items()}
    for name in ("params", "masks"):
        flat_t = traverse_util.flatten_dict(nnx.to_pure_dict(templates[name]))
        flat_s = traverse_util.flatten_dict(shardings[name])
        shard_lib.check_divisible(
            {"/".join(map(str, p)): (flat_t[p].shape, flat_s[p].spec) for p in flat_t}, mesh
        )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, params_pure)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        shardings["params"],
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )
    state_shardings = {**shardings, "opt": opt_shardings, "step": replicated}
    batch_sharding = shard_lib.batch_sharding(mesh, rules)

    def bound_pruner(variant):
        if variant is None:
            return pruner
        final = {p: variant["final_sparsity"][sp.path_str(p)] for p in pruner.paths}
        return pruner.bind(final, variant["prune_seed"])

    def init(variant=None):
        seed = cfg.train.seed if variant is None else jax.random.key(variant["seed"])
        model = fresh_model(seed)
        _, params, masks, rest = nnx.split(model, nnx.Param, Mask, ...)
        params, masks = nnx.to_pure_dict(params), nnx.to_pure_dict(masks)
        params, masks = masking.apply_initial_masks(bound_pruner(variant), params, masks)
        return {
            "params": params,
            "masks": masks,
            "rest": nnx.to_pure_dict(rest),
            "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    def apply_model(params, masks, rest, tokens_BxL):
        model = nnx.merge(
            graphdef,
            as_state(params_t, params),
            as_state(masks_t, masks),
            as_state(rest_t, rest),
        )
        return model(tokens_BxL)

    def train_step(state, batch_BxL1, variant=None):
        inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        step = state["step"]

        def loss_fn(params):
            logits, aux = apply_model(params, state["masks"], state["rest"], inputs)
            loss = jnp.mean(cross_entropy(logits, targets))
            return loss + aux["aux_loss"], (loss, aux)

        (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        kernels, kernel_masks = masking.pruned_kernels(pruner, state["params"], state["masks"])
        flat_grads = traverse_util.flatten_dict(grads)
        new_masks = bound_pruner(variant).update(
            step, kernels, kernel_masks, {p: flat_grads[p] for p in pruner.paths}
        )
        masks = masking.replace_masks(state["masks"], new_masks)
        if cfg.sparsity.method == "srste":
            for p in pruner.paths:
                decay = sp.srste_decay(kernels[p], new_masks[p], cfg.sparsity.srste_decay)
                flat_grads[p] = flat_grads[p] + decay
            grads = traverse_util.unflatten_dict(flat_grads)
        extra = {}
        if cfg.sparsity.keeps_pruned_zero:
            extra = {"masks": masking.optimizer_masks(state["params"], masks)}
        updates, opt = tx.update(grads, state["opt"], state["params"], **extra)
        params = optax.apply_updates(state["params"], updates)

        metrics = {
            "train/loss": loss,
            "train/aux_loss": aux["aux_loss"],
            "train/lr": learning_rate(cfg.train)(step),
            "norms/grad": optax.tree.norm(grads),
            "norms/param": optax.tree.norm(params),
            "norms/update": optax.tree.norm(updates),
            **{k: v for k, v in aux.items() if k != "aux_loss" and jnp.ndim(v) == 0},
        }
        if pruner.paths:
            kept = {p: jnp.sum(new_masks[p], dtype=jnp.float32) for p in pruner.paths}
            total = sum(math.prod(pruner.shapes[p]) for p in pruner.paths)
            metrics["sparsity/overall"] = 1.0 - sum(kept.values()) / total
            for p in pruner.paths:
                metrics[f"sparsity/{sp.path_str(p[:-1])}"] = 1.0 - kept[p] / math.prod(
                    pruner.shapes[p]
                )
        new_state = {
            "params": params,
            "masks": masks,
            "rest": state["rest"],
            "opt": opt,
            "step": step + 1,
        }
        return new_state, metrics

    def eval_step(state, batch_BxL1):
        logits, _ = apply_model(state["params"], state["masks"], state["rest"], batch_BxL1[:, :-1])
        return jnp.sum(cross_entropy(logits, batch_BxL1[:, 1:])), batch_BxL1[:, 1:].size

    if num_variants is None:
        init_fn = jax.jit(init, out_shardings=state_shardings)
        step_fn = jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated
        )
    else:  # the step counter is shared, so mask-update conds stay conds over the variants
        is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)
        state_shardings = {
            k: v if k == "step" else jax.tree.map(stacking.stacked_sharding, v, is_leaf=is_sharding)
            for k, v in state_shardings.items()
        }
        batch_sharding = stacking.stacked_sharding(batch_sharding)
        init_fn = jax.jit(
            jax.vmap(init, out_axes=stacking.STACK_AXES), out_shardings=state_shardings
        )
        step_fn = jax.jit(
            stacking.over_variants(train_step, vmap_width),
            in_shardings=(state_shardings, batch_sharding, replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            stacking.over_variants(eval_step, vmap_width, has_variant=False),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=replicated,
        )
    return Trainer(
        cfg,
        mesh,
        graphdef,
        templates,
        pruner,
        tx,
        state_shardings,
        batch_sharding,
        init_fn,
        step_fn,
        eval_fn,
        num_variants,
    )


def global_batch(trainer: Trainer, local_batch: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(trainer.batch_sharding, local_batch)
