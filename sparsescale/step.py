"""The jitted init / train step / eval of a run: one pure step with explicit shardings and
donated state, optionally over K stacked variants (stacking.py).

The model is split once (`nnx.split`); the step takes and returns a plain pytree
`{params, masks, rest, opt, step}` of pure dicts, merges the model inside, and differentiates the
`nnx.Param` state only. Mask updates happen inside the step (a traced schedule, no recompiles).
`block_budgets` runs pruned layers block-sparse (block_phase.py); the state layout is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from sparsescale import data as data_lib
from sparsescale import masking, stacking
from sparsescale import model as model_lib
from sparsescale import pruner as pruner_lib
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp
from sparsescale.config import RunConfig
from sparsescale.layers import Mask, use_block_path
from sparsescale.optim import learning_rate, make_optimizer  # noqa: F401 (re-exported)


def as_state(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def apply_model(graphdef, templates: dict, params, masks, rest, tokens_BxL):
    """The model's (logits, aux) for `tokens_BxL`, merged from pure-dict state."""
    model = nnx.merge(
        graphdef,
        as_state(templates["params"], params),
        as_state(templates["masks"], masks),
        as_state(templates["rest"], rest),
    )
    return model(tokens_BxL)


def bound_pruner(pruner: pruner_lib.Pruner, variant: dict | None) -> pruner_lib.Pruner:
    """The pruner of one stacked variant (its traced targets and seed); `pruner` for one run."""
    if variant is None:
        return pruner
    final = {p: variant["final_sparsity"][sp.path_str(p)] for p in pruner.paths}
    return pruner.bind(final, variant["prune_seed"])


def train_step(state, batch_BxL1, variant=None, *, model, pruner, tx, cfg: RunConfig):
    """One optimizer step: loss and gradients over `nnx.Param` only, the masks' update (on the
    schedule's steps), SR-STE's gradient term, the masked optimizer update; (new state, metrics).
    `model(params, masks, rest, tokens)` is the bound `apply_model`."""
    inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
    step = state["step"]

    def loss_fn(params):
        logits, aux = model(params, state["masks"], state["rest"], inputs)
        loss = jnp.mean(cross_entropy(logits, targets))
        return loss + aux["aux_loss"], (loss, aux)

    (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    prune = bound_pruner(pruner, variant)
    masks = masking.update_masks(prune, step, state["params"], state["masks"], grads)
    if cfg.sparsity.method == "srste":
        strength = cfg.sparsity.srste_decay
        grads = masking.srste_gradients(prune, state["params"], masks, grads, strength)
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
        metrics["sparsity/overall"] = masking.sparsity(prune, masks)
        for p, s in masking.layer_sparsity(prune, masks).items():
            metrics[f"sparsity/{sp.path_str(p[:-1])}"] = s
    new_state = {"params": params, "masks": masks, "rest": state["rest"], "opt": opt}
    return {**new_state, "step": step + 1}, metrics


def eval_step(state, batch_BxL1, *, model):
    """(summed next-token loss, token count) of one eval batch."""
    logits, _ = model(state["params"], state["masks"], state["rest"], batch_BxL1[:, :-1])
    return jnp.sum(cross_entropy(logits, batch_BxL1[:, 1:])), batch_BxL1[:, 1:].size


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
    check_batch(cfg, mesh)
    fresh_model = functools.partial(_fresh_model, cfg, block_budgets)
    graphdef, params_t, masks_t, rest_t = nnx.split(
        nnx.eval_shape(fresh_model), nnx.Param, Mask, ...
    )
    templates = {"params": params_t, "masks": masks_t, "rest": rest_t}
    params_pure, masks_pure = nnx.to_pure_dict(params_t), nnx.to_pure_dict(masks_t)
    pruner = masking.make_pruner(params_pure, masks_pure, cfg.sparsity, cfg.train.steps)
    tx = make_optimizer(cfg.train, cfg.sparsity)
    state_sh = state_shardings(cfg, mesh, templates, tx)
    batch_sh = shard_lib.batch_sharding(mesh, cfg.mesh.rules)
    replicated = state_sh["step"]

    init = functools.partial(
        init_state, fresh_model=fresh_model, pruner=pruner, tx=tx, seed=cfg.train.seed
    )
    model = functools.partial(apply_model, graphdef, templates)
    train = functools.partial(train_step, model=model, pruner=pruner, tx=tx, cfg=cfg)
    evaluate = functools.partial(eval_step, model=model)
    if num_variants is not None:  # the step counter is shared: mask-update conds stay conds
        state_sh = stacking.stacked_shardings(state_sh)
        batch_sh = stacking.stacked_sharding(batch_sh)
        init = jax.vmap(init, out_axes=stacking.STACK_AXES)
        train = stacking.over_variants(train, vmap_width)
        evaluate = stacking.over_variants(evaluate, vmap_width, has_variant=False)
    step_in = (state_sh, batch_sh) if num_variants is None else (state_sh, batch_sh, replicated)
    return Trainer(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        templates=templates,
        pruner=pruner,
        tx=tx,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init_fn=jax.jit(init, out_shardings=state_sh),
        step_fn=jax.jit(
            train, in_shardings=step_in, out_shardings=(state_sh, replicated), donate_argnums=0
        ),
        eval_fn=jax.jit(evaluate, in_shardings=(state_sh, batch_sh), out_shardings=replicated),
        num_variants=num_variants,
    )


def check_batch(cfg: RunConfig, mesh) -> None:
    """The global train and eval batches must split evenly over the mesh's batch axes."""
    batch_axes = dict(cfg.mesh.rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    for name, batch in (
        ("batch_size", cfg.data.batch_size),
        ("eval_batch_size", data_lib.eval_batch_size(cfg.data)),
    ):
        if batch % shards:
            raise ValueError(
                f"data.{name}={batch} is not divisible by the {shards} batch shards of the "
                f"mesh ({', '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)})."
            )


def _fresh_model(cfg: RunConfig, block_budgets, seed=None):
    model = model_lib.Transformer(
        cfg.model, rngs=nnx.Rngs(cfg.train.seed if seed is None else seed)
    )
    if block_budgets:
        use_block_path(model, block_budgets, cfg.sparsity.structure)
    return model


def state_shardings(cfg: RunConfig, mesh, templates: dict, tx) -> dict:
    """NamedShardings of the state {params, masks, rest, opt, step} from the logical axis names
    (optimizer moments like their parameters), after checking every dimension divides."""
    rules = cfg.mesh.rules
    shardings = {k: shard_lib.state_shardings(t, mesh, rules) for k, t in templates.items()}
    for name in ("params", "masks"):
        flat_t = traverse_util.flatten_dict(nnx.to_pure_dict(templates[name]))
        flat_s = traverse_util.flatten_dict(shardings[name])
        shard_lib.check_divisible(
            {"/".join(map(str, p)): (flat_t[p].shape, flat_s[p].spec) for p in flat_t}, mesh
        )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(templates["params"]))
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        shardings["params"],
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )
    return {**shardings, "opt": opt_shardings, "step": replicated}


def init_state(variant=None, *, fresh_model, pruner, tx, seed: int) -> dict:
    """A fresh state: the model initialised from `seed` (a stacked variant's own seed), the
    schedule's initial masks, optimizer state and step 0."""
    model = fresh_model(seed if variant is None else jax.random.key(variant["seed"]))
    _, params, masks, rest = nnx.split(model, nnx.Param, Mask, ...)
    params, masks = nnx.to_pure_dict(params), nnx.to_pure_dict(masks)
    params, masks = masking.apply_initial_masks(bound_pruner(pruner, variant), params, masks)
    return {
        "params": params,
        "masks": masks,
        "rest": nnx.to_pure_dict(rest),
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }


def global_batch(trainer: Trainer, local_batch: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(trainer.batch_sharding, local_batch)
