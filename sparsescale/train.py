"""Training: init, a pure jitted train step with explicit shardings and donated state, eval, loop.

The model is split once (`nnx.split`); the step takes and returns a plain pytree
`{params, masks, rest, opt, step}` of pure dicts, merges the model inside, and differentiates the
`nnx.Param` state only. Mask updates happen inside the step (a traced schedule, no recompiles).
"""

from __future__ import annotations

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
from sparsescale.layers import Mask

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


def build(cfg: RunConfig, devices=None) -> Trainer:
    mesh = shard_lib.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules

    def fresh_model():
        return model_lib.Transformer(cfg.model, rngs=nnx.Rngs(cfg.optim.seed))

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

    def init():
        model = fresh_model()
        _, params, masks, rest = nnx.split(model, nnx.Param, Mask, ...)
        params, masks = nnx.to_pure_dict(params), nnx.to_pure_dict(masks)
        kernels, _ = split_kernels(params, masks)
        masks = with_masks(masks, pruner.initial_masks(kernels))
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

    def train_step(state, batch_BxL1):
        inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        step = state["step"]

        def loss_fn(params):
            logits, aux = apply_model(params, state["masks"], state["rest"], inputs)
            loss = jnp.mean(cross_entropy(logits, targets))
            return loss + aux["aux_loss"], (loss, aux)

        (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        kernels, kernel_masks = split_kernels(state["params"], state["masks"])
        flat_grads = traverse_util.flatten_dict(grads)
        new_masks = pruner.update(
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
    )


def global_batch(trainer: Trainer, local_batch: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(trainer.batch_sharding, local_batch)


def evaluate(trainer: Trainer, state, batches) -> float:
    total, count = 0.0, 0
    for b in batches:
        loss_sum, n = trainer.eval_fn(state, global_batch(trainer, b))
        total += float(loss_sum)
        count += int(n)
    return total / count


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


def run(cfg: RunConfig, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the summary written to summary.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    data_lib.validate(cfg.data)
    trainer = build(cfg)
    data_lib.prepare(cfg.data)
    fingerprint = data_lib.fingerprint(cfg.data)
    accounting = model_accounting(cfg, trainer.pruner)
    if is_main:
        ckpt.write_json_atomic(workdir / "config.json", cfg.to_dict())

    train_iter = data_lib.train_iterator(cfg.data)
    eval_batches = data_lib.eval_batches(cfg.data, cfg.optim.eval_batches)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", keep=cfg.optim.keep_ckpts)
    metrics_path = workdir / "metrics.jsonl"

    start = checkpointer.latest_step()
    if start is None:
        state = trainer.init_fn()
        start, wall_before = 0, 0.0
        if is_main:  # lines from a killed attempt that never reached a checkpoint
            _truncate_metrics(metrics_path, 0)
    else:
        abstract = ckpt.abstract_with_shardings(
            jax.eval_shape(trainer.init_fn), trainer.state_shardings
        )
        state, meta = checkpointer.restore(start, abstract, train_iter)
        wall_before = float(meta.get("wall_time_s", 0.0))
        if is_main:
            _truncate_metrics(metrics_path, start)
        log.info("Resumed from step %d in %s", start, workdir)

    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    t_start = time.perf_counter()
    t_last, step_last = t_start, start
    last_good = start
    eval_loss = float("nan")
    train_loss = float("nan")
    metrics_file = open(metrics_path, "a") if is_main else None
    try:
        for step in range(start, cfg.optim.steps):
            state, metrics = trainer.step_fn(state, global_batch(trainer, next(train_iter)))
            done = step + 1
            if step == start:  # keep compilation out of the throughput numbers
                jax.block_until_ready(metrics)
                t_last, step_last = time.perf_counter(), done
            log_now = done % cfg.optim.log_every == 0 or done == cfg.optim.steps
            ckpt_now = done % cfg.optim.ckpt_every == 0 or done == cfg.optim.steps
            eval_now = cfg.optim.eval_every and done % cfg.optim.eval_every == 0
            if not (log_now or ckpt_now or eval_now):
                continue
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["train/loss"]):
                raise NonFiniteLoss(
                    f"non-finite training loss {metrics['train/loss']} at step {done}; "
                    f"the last good checkpoint is step {last_good}."
                )
            train_loss = metrics["train/loss"]
            now = time.perf_counter()
            step_time = (now - t_last) / max(done - step_last, 1) if done > step_last else 0.0
            metrics.update(
                {
                    "step": done,
                    "perf/step_time_s": step_time,
                    "perf/tokens_per_s": tokens_per_step / step_time if step_time else 0.0,
                }
            )
            t_last, step_last = now, done
            if eval_now or done == cfg.optim.steps:
                eval_loss = evaluate(trainer, state, eval_batches)
                metrics["eval/loss"] = eval_loss
                metrics["eval/bpb"] = eval_loss / math.log(2)
            if is_main:
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(k, v, done)
                eta = (cfg.optim.steps - done) * step_time
                log.info(
                    "step %d/%d loss %.4f%s | %.0f tok/s | ETA %s",
                    done,
                    cfg.optim.steps,
                    train_loss,
                    f" eval {eval_loss:.4f}" if "eval/loss" in metrics else "",
                    metrics["perf/tokens_per_s"],
                    time.strftime("%H:%M:%S", time.gmtime(eta)),
                )
            if ckpt_now:
                wall = wall_before + time.perf_counter() - t_start
                checkpointer.save(
                    done, state, train_iter, {"wall_time_s": wall, "fingerprint": fingerprint}
                )
                last_good = done
    except NonFiniteLoss as e:
        checkpointer.close()
        if is_main:
            ckpt.write_json_atomic(workdir / "failed.json", {"error": str(e), "step": last_good})
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    checkpointer.close()

    if math.isnan(eval_loss):  # resumed after the final step: evaluate the restored state
        eval_loss = evaluate(trainer, state, eval_batches)
    summary = _summary_row(
        cfg,
        accounting,
        {
            "eval_loss": eval_loss,
            "eval_bpb": eval_loss / math.log(2),
            "train_loss": train_loss,
            "wall_time_s": wall_before + time.perf_counter() - t_start,
            "data_fingerprint": fingerprint,
            "status": "done",
        },
    )
    if is_main:
        ckpt.write_json_atomic(workdir / "summary.json", summary)
    return summary


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
