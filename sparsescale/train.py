"""Training: init, a pure jitted train step with explicit shardings and donated state, eval, loop.

The model is split once (`nnx.split`); the step takes and returns a plain pytree
`{params, masks, rest, opt, step}` of pure dicts, merges the model inside, and differentiates the
`nnx.Param` state only. Mask updates happen inside the step (a traced schedule, no recompiles).
With `sparsity.impl = "block"` the loop rebuilds the step at most twice (`block_phase_steps`) to
run pruned layers block-sparse; the state and checkpoints keep one layout throughout.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from sparsescale import checkpoint as ckpt
from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import pruner as pruner_lib
from sparsescale import sharding as shard_lib
from sparsescale import sparsity as sp
from sparsescale.layers import Mask, use_block_path

log = logging.getLogger("sparsescale")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    steps: int = 1000
    lr: float = 3e-3
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_ckpts: int = 2

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}.")
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(
                f"train: need lr > 0, warmup_frac in [0, 1), min_lr_ratio in [0, 1]; got "
                f"lr={self.lr}, warmup_frac={self.warmup_frac}, min_lr_ratio={self.min_lr_ratio}."
            )
        if min(self.log_every, self.eval_batches, self.ckpt_every, self.keep_ckpts) < 1:
            raise ValueError("train: log_every, eval_batches, ckpt_every, keep_ckpts must be >= 1.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: model_lib.ModelConfig
    data: data_lib.DataConfig
    pruning: pruner_lib.PruningConfig
    optim: OptimConfig
    mesh: shard_lib.MeshConfig = shard_lib.MeshConfig()
    run_id: str = ""
    experiment: str = ""
    model_name: str = ""
    tag: str = ""

    def __post_init__(self):
        if self.data.seq_len > self.model.max_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}."
            )

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def hash(self) -> str:
        d = self.to_dict()
        for k in ("run_id", "experiment", "tag"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Pieces.


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio
    )


def make_optimizer(cfg: OptimConfig, pruning: pruner_lib.PruningConfig):
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
    return pruner_lib.keep_pruned_zero(tx) if pruning.keeps_pruned_zero else tx


def as_state(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _kernel_paths(params: dict, masks: dict) -> dict:
    """{kernel path: mask path} for every masked kernel."""
    mask_paths = set(traverse_util.flatten_dict(masks))
    out = {}
    for path in traverse_util.flatten_dict(params):
        mask_path = pruner_lib.kernel_to_mask_path(path)
        if path[-1] == "kernel" and mask_path in mask_paths:
            out[path] = mask_path
    return out


def aligned_masks(params: dict, masks: dict) -> dict:
    """A tree like `params`: each masked kernel's mask, a scalar True elsewhere."""
    flat_masks = traverse_util.flatten_dict(masks)
    flat = {
        path: flat_masks.get(pruner_lib.kernel_to_mask_path(path), jnp.ones((), jnp.bool_))
        if path[-1] == "kernel"
        else jnp.ones((), jnp.bool_)
        for path in traverse_util.flatten_dict(params)
    }
    return traverse_util.unflatten_dict(flat)


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
        if self.num_variants is None:
            (state,) = states
            return state
        parts = [{n: v for n, v in s.items() if n != "step"} for s in states]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        return jax.device_put({**stacked, "step": states[0]["step"]}, self.state_shardings)


STACK_AXES = {"params": 0, "masks": 0, "rest": 0, "opt": 0, "step": None}


def _stacked_sharding(s: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))


def variant_inputs(cfgs: list[RunConfig], pruner: pruner_lib.Pruner) -> dict:
    """What differs between stacked variants, as arrays with a leading variant axis: the init
    seed, the pruning seed and each pruned layer's final sparsity (0 for a dense variant)."""
    final = {sp.path_str(p): [] for p in pruner.paths}
    for c in cfgs:
        own = (
            pruner_lib.Pruner(c.pruning, pruner.shapes, c.optim.steps)
            if c.pruning.structure
            else None
        )
        for p in pruner.paths:
            final[sp.path_str(p)].append(own.final_sparsity[p] if own else 0.0)
    return {
        "seed": np.array([c.optim.seed for c in cfgs], np.int32),
        "prune_seed": np.array([c.pruning.seed for c in cfgs], np.int32),
        "final_sparsity": {k: np.array(v, np.float32) for k, v in final.items()},
    }


def _over_variants(fn: Callable, vmap_width: int | None, has_variant: bool = True) -> Callable:
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
        out = jax.lax.map(one, (per_variant, batch, variants), batch_size=vmap_width)
        if not has_variant:
            return out
        new, metrics = out
        return {**new, "step": step + 1}, metrics

    return stacked


def build(
    cfg: RunConfig,
    devices=None,
    num_variants: int | None = None,
    vmap_width: int | None = None,
    block_budgets: dict[str, int] | None = None,
) -> Trainer:
    """Compiled init/step/eval for `cfg`; with `num_variants=K`, for K stacked variants of it
    (a leading variant axis; init and step then take `variant_inputs(...)`, see `_over_variants`).
    `block_budgets` ({layer path: tiles per block-column}) runs those layers block-sparse (see
    `block_budgets_of`); the state layout does not change."""
    mesh = shard_lib.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules

    def fresh_model(seed=cfg.optim.seed):
        model = model_lib.Transformer(cfg.model, rngs=nnx.Rngs(seed))
        if block_budgets:
            use_block_path(model, block_budgets, cfg.pruning.structure)
        return model

    abstract = nnx.eval_shape(fresh_model)
    graphdef, params_t, masks_t, rest_t = nnx.split(abstract, nnx.Param, Mask, ...)
    templates = {"params": params_t, "masks": masks_t, "rest": rest_t}

    params_pure, masks_pure = nnx.to_pure_dict(params_t), nnx.to_pure_dict(masks_t)
    kernel_paths = _kernel_paths(params_pure, masks_pure)
    flat_params = traverse_util.flatten_dict(params_pure)
    kernel_shapes = {p: tuple(flat_params[p].shape) for p in kernel_paths}
    pruner = pruner_lib.Pruner(cfg.pruning, kernel_shapes, cfg.optim.steps)
    tx = make_optimizer(cfg.optim, cfg.pruning)

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

    def split_kernels(params, masks):
        fp, fm = traverse_util.flatten_dict(params), traverse_util.flatten_dict(masks)
        return {p: fp[p] for p in pruner.paths}, {p: fm[m] for p, m in kernel_paths.items()}

    def with_masks(masks, new_kernel_masks):
        """The mask tree with the pruned kernels' masks replaced."""
        fm = traverse_util.flatten_dict(masks)
        for p, m in new_kernel_masks.items():
            fm[kernel_paths[p]] = m
        return traverse_util.unflatten_dict(fm)

    def bound_pruner(variant):
        if variant is None:
            return pruner
        final = {p: variant["final_sparsity"][sp.path_str(p)] for p in pruner.paths}
        return pruner.bind(final, variant["prune_seed"])

    def init(variant=None):
        seed = cfg.optim.seed if variant is None else jax.random.key(variant["seed"])
        model = fresh_model(seed)
        _, params, masks, rest = nnx.split(model, nnx.Param, Mask, ...)
        params, masks = nnx.to_pure_dict(params), nnx.to_pure_dict(masks)
        kernels, _ = split_kernels(params, masks)
        masks = with_masks(masks, bound_pruner(variant).initial_masks(kernels))
        fp = traverse_util.flatten_dict(params)
        fm = traverse_util.flatten_dict(masks)
        if cfg.pruning.keeps_pruned_zero:
            for p, m in kernel_paths.items():
                fp[p] = jnp.where(fm[m], fp[p], 0)
        params = traverse_util.unflatten_dict(fp)
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
        kernels, kernel_masks = split_kernels(state["params"], state["masks"])
        flat_grads = traverse_util.flatten_dict(grads)
        new_masks = bound_pruner(variant).update(
            step, kernels, kernel_masks, {p: flat_grads[p] for p in pruner.paths}
        )
        masks = with_masks(state["masks"], new_masks)
        if cfg.pruning.method == "srste":
            for p in pruner.paths:
                decay = sp.srste_decay(kernels[p], new_masks[p], cfg.pruning.srste_decay)
                flat_grads[p] = flat_grads[p] + decay
            grads = traverse_util.unflatten_dict(flat_grads)
        extra = {}
        if cfg.pruning.keeps_pruned_zero:
            extra = {"masks": aligned_masks(state["params"], masks)}
        updates, opt = tx.update(grads, state["opt"], state["params"], **extra)
        params = optax.apply_updates(state["params"], updates)

        metrics = {
            "train/loss": loss,
            "train/aux_loss": aux["aux_loss"],
            "train/lr": learning_rate(cfg.optim)(step),
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
            k: v if k == "step" else jax.tree.map(_stacked_sharding, v, is_leaf=is_sharding)
            for k, v in state_shardings.items()
        }
        batch_sharding = _stacked_sharding(batch_sharding)
        init_fn = jax.jit(jax.vmap(init, out_axes=STACK_AXES), out_shardings=state_shardings)
        step_fn = jax.jit(
            _over_variants(train_step, vmap_width),
            in_shardings=(state_shardings, batch_sharding, replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            _over_variants(eval_step, vmap_width, has_variant=False),
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


def evaluate(trainer: Trainer, state, batches):
    """Mean eval loss in nats per token (an array over variants for a stacked trainer)."""
    total, count = 0.0, 0
    for b in batches:
        loss_sum, n = trainer.eval_fn(state, global_batch(trainer, b))
        total = total + np.asarray(loss_sum, np.float64)
        count += int(np.ravel(n)[0])
    return total / count if trainer.num_variants else float(total / count)


def model_accounting(cfg: RunConfig, pruner: pruner_lib.Pruner | None = None) -> dict:
    """Parameter counts and FLOPs of the run at its final sparsity."""
    counts = model_lib.param_counts(cfg.model)
    if pruner is not None and pruner.paths:
        removed = sum(
            int(round(pruner.final_sparsity[p] * math.prod(s))) for p, s in pruner.shapes.items()
        )
        prunable_sparsity = removed / counts["prunable"]
    else:
        prunable_sparsity = sp.target_sparsity(cfg.pruning.structure)
    counts = model_lib.param_counts(cfg.model, prunable_sparsity)
    fpt = model_lib.flops_per_token(cfg.model, cfg.data.seq_len, prunable_sparsity)
    tokens = cfg.optim.steps * cfg.data.batch_size * cfg.data.seq_len
    return {
        "n_params_total": counts["total"],
        "n_params_nonembedding": counts["non_embedding"],
        "n_params_prunable": counts["prunable"],
        "n_params_nonzero": counts["nonzero"],
        "n_params_active": counts["active_nonzero"],
        "flops_per_token": fpt,
        "tokens": tokens,
        "train_flops": fpt * tokens,
    }


# ------------------------------------------------------------------------------------------------
# The loop.


class NonFiniteLoss(RuntimeError):
    pass


def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _summary_row(cfg: RunConfig, accounting: dict, final: dict) -> dict:
    structure = cfg.pruning.structure
    moe = cfg.model.moe
    return {
        "run_id": cfg.run_id,
        "experiment": cfg.experiment,
        "tag": cfg.tag,
        "model": cfg.model_name,
        **accounting,
        "sparsity": sp.target_sparsity(structure),
        "structure": "moe"
        if moe is not None and moe.num_experts > 0 and structure is None
        else ("dense" if structure is None else structure.name),
        "nm_n": structure.n if isinstance(structure, sp.NM) else None,
        "nm_m": structure.m if isinstance(structure, sp.NM) else None,
        "block_size": structure.block[0] if isinstance(structure, sp.Block) else None,
        "num_experts": moe.num_experts if moe is not None else 0,
        "top_k": moe.top_k if moe is not None else 0,
        "method": cfg.pruning.method,
        "allocation": cfg.pruning.allocation,
        "schedule": json.dumps(dataclasses.asdict(cfg.pruning.schedule), sort_keys=True),
        "steps": cfg.optim.steps,
        "seed": cfg.optim.seed,
        "task": cfg.data.name,
        "config_hash": cfg.hash(),
        **final,
    }


# ------------------------------------------------------------------------------------------------
# Stacking: which runs can share one vmapped step.

VARIANT_FIELDS = ("run_id", "tag", "optim.seed", "data.seed", "pruning.seed")


def _stack_key(cfg: RunConfig) -> tuple[str, str | None]:
    """(everything but the per-variant fields, the pruning recipe less its target; None: dense)."""
    d = cfg.to_dict()
    for field in VARIANT_FIELDS:
        *parents, leaf = field.split(".")
        node = d
        for part in parents:
            node = node[part]
        node.pop(leaf)
    pruning = d.pop("pruning")
    if cfg.pruning.structure is None:
        return json.dumps(d, sort_keys=True), None
    if isinstance(cfg.pruning.structure, sp.Unstructured | sp.Block):
        pruning["structure"].pop("sparsity")
    pruning["structure"]["kind"] = cfg.pruning.structure.name
    return json.dumps(d, sort_keys=True), json.dumps(pruning, sort_keys=True)


def _joins_dense(cfg: RunConfig) -> bool:
    """Whether a dense run can ride in a stack of `cfg` as the same recipe at 0% sparsity (not
    with block-sparse execution: a dense member would keep the whole stack masked)."""
    return (
        isinstance(cfg.pruning.structure, sp.Unstructured | sp.Block)
        and cfg.pruning.method in ("magnitude", "random")
        and cfg.pruning.impl == "masked"
    )


def stack_groups(cfgs: list[RunConfig]) -> list[list[int]]:
    """Indices of `cfgs` grouped into stackable sets: same model, data (but seed), optimizer (but
    seed), mesh and pruning recipe; they may differ in seeds and, for unstructured and block
    sparsity, in the target. Dense runs join a matching unstructured/block group."""
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


def check_stackable(cfgs: list[RunConfig]) -> RunConfig:
    """Raises ValueError unless `cfgs` can train as one stack; returns the config to build."""
    if len(stack_groups(cfgs)) != 1:
        keys = [_stack_key(c) for c in cfgs]
        raise ValueError(
            "these runs cannot be stacked: they must share model, data (but seed), optimizer (but "
            f"seed), mesh and pruning recipe; {len(set(keys))} different recipes given."
        )
    return next((c for c in cfgs if c.pruning.structure is not None), cfgs[0])


# ------------------------------------------------------------------------------------------------
# The loop: one run, or K stacked variants that each keep their own workdir.


@dataclasses.dataclass
class _Member:
    """One run's files and bookkeeping inside the loop."""

    cfg: RunConfig
    workdir: Path
    checkpointer: ckpt.Checkpointer
    train_iter: object
    accounting: dict
    fingerprint: str
    metrics_file: object = None
    writer: object = None
    last_good: int = 0
    eval_loss: float = float("nan")
    train_loss: float = float("nan")
    failed: bool = False
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.checkpointer.close()
            self.closed = True
        for f in (self.metrics_file, self.writer):
            if f is not None:
                f.close()
        self.metrics_file = self.writer = None


def _data_key(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)


def block_phase_steps(cfgs: list[RunConfig], pruner: pruner_lib.Pruner) -> list[int]:
    """Steps at which the loop (re)builds the step with block-sparse layers (`impl="block"`): the
    first step whose masks are at most `switch_density` dense in every pruned layer of every run,
    and the first at the final sparsity. Empty: masked throughout."""
    base = cfgs[0].pruning
    if base.impl != "block" or not pruner.paths:
        return []
    total = cfgs[0].optim.steps
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
        min(pruner_lib.Pruner(c.pruning, pruner.shapes, total).final_sparsity.values())
        if c.pruning.structure is not None
        else 0.0
        for c in cfgs
    )
    density = 1.0 - in_force * least_sparse
    out = []
    for hit in (density <= switch + 1e-9, in_force >= 1.0):
        if hit.any() and density[np.argmax(hit)] <= switch + 1e-9:
            out.append(int(np.argmax(hit)))
    return sorted(set(out))


def block_budgets_of(trainer: Trainer, state: dict) -> dict[str, int]:
    """{layer path: most tiles any block-column keeps} over the pruned layers' current masks (and
    all stacked variants): the tile budgets the block-sparse step needs from here on, since block
    masks only lose tiles as training goes on (pruned blocks stay zero, so never score back)."""
    bh, bw = trainer.cfg.pruning.structure.block
    kernel_paths = _kernel_paths(
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


def run(cfg: RunConfig, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the summary written to summary.json."""
    (summary,) = run_stack([cfg], [workdir], stacked=False)
    if summary is None:
        raise NonFiniteLoss(json.loads((Path(workdir) / "failed.json").read_text())["error"])
    return summary


def run_stack(
    cfgs: list[RunConfig], workdirs: list[str | Path], stacked: bool = True
) -> list[dict | None]:
    """Trains (or resumes) several runs in one vmapped step (see `stack_groups`); each keeps its
    own workdir, metrics, checkpoints and summary.json, exactly as if run alone. A non-finite loss
    fails that run only (failed.json, entry None). Returns the summaries."""
    workdirs = [Path(w) for w in workdirs]
    if len(cfgs) != len(workdirs) or not cfgs:
        raise ValueError("run_stack: need one workdir per config (and at least one).")
    if not stacked and len(cfgs) != 1:
        raise ValueError("run_stack: stacked=False trains exactly one run.")
    base = check_stackable(cfgs) if stacked else cfgs[0]
    is_main = jax.process_index() == 0
    for c in cfgs:
        data_lib.validate(c.data)
    num_variants = len(cfgs) if stacked else None
    trainer = build(base, num_variants=num_variants)
    variants = variant_inputs(cfgs, trainer.pruner) if stacked else None
    block_steps = block_phase_steps(cfgs, trainer.pruner)
    if block_steps:  # fail now, not at the switch, if a layer cannot run block-sparse
        model = nnx.eval_shape(lambda: model_lib.Transformer(base.model, rngs=nnx.Rngs(0)))
        names = [sp.path_str(p[:-1]) for p in trainer.pruner.paths]
        use_block_path(model, dict.fromkeys(names, 1), base.pruning.structure)

    iterators, evals = {}, {}  # one data stream per distinct data config, shared by its runs
    members = []
    for c, w in zip(cfgs, workdirs, strict=True):
        w.mkdir(parents=True, exist_ok=True)
        if _data_key(c) not in iterators:
            data_lib.prepare(c.data)
            iterators[_data_key(c)] = data_lib.train_iterator(c.data)
            evals[_data_key(c)] = data_lib.eval_batches(c.data, c.optim.eval_batches)
        own_pruner = (
            trainer.pruner
            if not stacked
            else (
                pruner_lib.Pruner(c.pruning, trainer.pruner.shapes, c.optim.steps)
                if c.pruning.structure
                else None
            )
        )
        members.append(
            _Member(
                c,
                w,
                ckpt.Checkpointer(w / "checkpoints", keep=c.optim.keep_ckpts),
                iterators[_data_key(c)],
                model_accounting(c, own_pruner),
                data_lib.fingerprint(c.data),
            )
        )
        if is_main:
            ckpt.write_json_atomic(w / "config.json", c.to_dict())
    optim = base.optim

    def next_batch():
        fresh = {d: next(it) for d, it in iterators.items()}
        if not stacked:
            return global_batch(trainer, fresh[_data_key(cfgs[0])])
        return global_batch(trainer, np.stack([fresh[_data_key(c)] for c in cfgs]))

    def eval_all(state):
        if not stacked:
            return [evaluate(trainer, state, evals[_data_key(cfgs[0])])]
        stacked_batches = [
            np.stack(b) for b in zip(*(evals[_data_key(c)] for c in cfgs), strict=True)
        ]
        return list(evaluate(trainer, state, stacked_batches))

    # Resume every member from the newest step all of them have (they checkpoint together).
    common = set.intersection(*(set(m.checkpointer.manager.all_steps()) for m in members))
    start = max(common) if common else None
    if start is None:
        state = trainer.init_fn() if not stacked else trainer.init_fn(variants)
        start, wall_before = 0, 0.0
    else:
        one = build(base) if stacked else trainer
        abstract = ckpt.abstract_with_shardings(jax.eval_shape(one.init_fn), one.state_shardings)
        states, walls = [], []
        for m in members:
            restored, meta = m.checkpointer.restore(start, abstract, m.train_iter)
            states.append(restored)
            walls.append(float(meta.get("wall_time_s", 0.0)))
        state, wall_before = trainer.stack_states(states), max(walls)
        where = ", ".join(str(w) for w in workdirs)
        log.info("Resumed from step %d in %s", start, where)
    for m in members:
        m.last_good = start
        if is_main:  # drop lines a killed attempt logged after its last checkpoint
            _truncate_metrics(m.workdir / "metrics.jsonl", start)
            from tensorboardX import SummaryWriter

            m.metrics_file = open(m.workdir / "metrics.jsonl", "a")
            m.writer = SummaryWriter(str(m.workdir / "tb"))

    def to_block_path(step):
        budgets = block_budgets_of(trainer, state)
        per_budget = collections.Counter(budgets.values())
        log.info(
            "Step %d: block-sparse layers from here, tiles kept per block-column: %s",
            step,
            ", ".join(f"{b} ({n} layers)" for b, n in sorted(per_budget.items())),
        )
        return build(base, num_variants=num_variants, block_budgets=budgets)

    tokens_per_step = base.data.batch_size * base.data.seq_len
    t_start = time.perf_counter()
    t_last, step_last = t_start, start
    compiled_at = start
    if any(t <= start for t in block_steps):
        trainer = to_block_path(start)
    try:
        for step in range(start, optim.steps):
            if step in block_steps and step != start:
                trainer, compiled_at = to_block_path(step), step
            if stacked:
                state, metrics = trainer.step_fn(state, next_batch(), variants)
            else:
                state, metrics = trainer.step_fn(state, next_batch())
            done = step + 1
            if step == compiled_at:  # keep compilation out of the throughput numbers
                jax.block_until_ready(metrics)
                t_last, step_last = time.perf_counter(), done
            log_now = done % optim.log_every == 0 or done == optim.steps
            ckpt_now = done % optim.ckpt_every == 0 or done == optim.steps
            eval_now = optim.eval_every and done % optim.eval_every == 0
            if not (log_now or ckpt_now or eval_now):
                continue
            values = {
                k: np.atleast_1d(np.asarray(v, np.float64))
                for k, v in jax.device_get(metrics).items()
            }
            now = time.perf_counter()
            step_time = (now - t_last) / max(done - step_last, 1) if done > step_last else 0.0
            t_last, step_last = now, done
            live = [k for k, m in enumerate(members) if not m.failed]
            for k in live:
                loss = float(values["train/loss"][k])
                if not math.isfinite(loss):
                    _fail(
                        members[k],
                        f"non-finite training loss {loss} at step {done}; the last "
                        f"good checkpoint is step {members[k].last_good}.",
                        is_main,
                    )
            live = [k for k in live if not members[k].failed]
            if not live:
                break
            eval_losses = eval_all(state) if (eval_now or done == optim.steps) else None
            for k in live:
                m = members[k]
                row = {
                    n: float(v[k])
                    for n, v in values.items()
                    if m.cfg.pruning.structure is not None or not n.startswith("sparsity/")
                }
                m.train_loss = row["train/loss"]
                row.update(
                    {
                        "step": done,
                        "perf/step_time_s": step_time,
                        "perf/tokens_per_s": tokens_per_step / step_time if step_time else 0.0,
                    }
                )
                if eval_losses is not None:
                    m.eval_loss = float(eval_losses[k])
                    row["eval/loss"] = m.eval_loss
                    row["eval/bpb"] = m.eval_loss / math.log(2)
                if is_main:
                    m.metrics_file.write(json.dumps(row) + "\n")
                    m.metrics_file.flush()
                    for n, v in row.items():
                        if n != "step":
                            m.writer.add_scalar(n, v, done)
            if is_main:
                eta = (optim.steps - done) * step_time
                losses = " ".join(f"{members[k].train_loss:.4f}" for k in live)
                log.info(
                    "step %d/%d loss %s%s | %.0f tok/s | ETA %s",
                    done,
                    optim.steps,
                    losses,
                    ""
                    if eval_losses is None
                    else " eval " + " ".join(f"{eval_losses[k]:.4f}" for k in live),
                    len(live) * tokens_per_step / step_time if step_time else 0.0,
                    time.strftime("%H:%M:%S", time.gmtime(eta)),
                )
            if ckpt_now:
                wall = wall_before + time.perf_counter() - t_start
                for k in live:
                    m = members[k]
                    if done not in m.checkpointer.manager.all_steps():  # else: saved before a kill
                        m.checkpointer.save(
                            done,
                            trainer.variant_state(state, k),
                            m.train_iter,
                            {"wall_time_s": wall, "fingerprint": m.fingerprint},
                        )
                    m.last_good = done
    finally:
        for m in members:
            m.close()

    live = [k for k, m in enumerate(members) if not m.failed]
    if live and any(math.isnan(members[k].eval_loss) for k in live):
        losses = eval_all(state)  # resumed after the final step: evaluate the restored state
        for k in live:
            members[k].eval_loss = float(losses[k])
    summaries: list[dict | None] = [None] * len(members)
    for k in live:
        m = members[k]
        summaries[k] = _summary_row(
            m.cfg,
            m.accounting,
            {
                "eval_loss": m.eval_loss,
                "eval_bpb": m.eval_loss / math.log(2),
                "train_loss": m.train_loss,
                "wall_time_s": wall_before + time.perf_counter() - t_start,
                "data_fingerprint": m.fingerprint,
                "status": "done",
            },
        )
        if is_main:
            ckpt.write_json_atomic(m.workdir / "summary.json", summaries[k])
    return summaries


def _fail(member: _Member, error: str, is_main: bool) -> None:
    member.failed = True
    member.close()
    log.error("%s: %s", member.workdir, error)
    if is_main:
        ckpt.write_json_atomic(
            member.workdir / "failed.json", {"error": error, "step": member.last_good}
        )


def estimate_cost(config) -> dict:
    """Tokens, training FLOPs and parameter counts of a run from its ml_collections config."""
    from sparsescale.config import run_config

    cfg = run_config(config)
    acc = model_accounting(cfg)
    return {
        "tokens": acc["tokens"],
        "train_flops": acc["train_flops"],
        "n_params_total": acc["n_params_total"],
        "n_params_nonzero": acc["n_params_nonzero"],
    }
