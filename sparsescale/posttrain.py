"""The post-training regime: a finished dense run pruned one-shot (`oneshot.prune`) and evaluated.

`evaluate(cfg, workdir)` restores the run's final checkpoint, prunes a copy of the model with each
method and structure of a `PostTrainConfig`, calibrated on training windows the run never read
(the next positions of its own shuffled order, when it used less than one epoch), and evaluates
every pruned model on the run's own validation windows (the sweep's eval set). The dense model is
evaluated the same way, and must reproduce the run's summary: the gaps are paired (pruned minus its
own dense model, same windows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsescale import checkpoint as ckpt
from sparsescale import data as data_lib
from sparsescale import oneshot
from sparsescale import run_files as rf
from sparsescale import sparsity as sp
from sparsescale import step as step_lib
from sparsescale.config import RunConfig

STRUCTURES = {
    "unstructured_0.5": sp.Unstructured(0.5),
    "unstructured_0.75": sp.Unstructured(0.75),
    "unstructured_0.875": sp.Unstructured(0.875),
    "nm_2:4": sp.NM(2, 4),
    "nm_4:8": sp.NM(4, 8),
}


@dataclasses.dataclass(frozen=True)
class PostTrainConfig:
    """methods: `oneshot.METHODS`; structures: names of `STRUCTURES`; calibration_sequences:
    training windows (of the run's seq_len) the grams are taken over, in batches of the run's."""

    methods: tuple[str, ...] = oneshot.METHODS
    structures: tuple[str, ...] = tuple(STRUCTURES)
    calibration_sequences: int = 128

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in oneshot.METHODS]
        if unknown:
            raise ValueError(f"posttrain: unknown methods {unknown}; known: {oneshot.METHODS}.")
        unknown = [s for s in self.structures if s not in STRUCTURES]
        if unknown:
            raise ValueError(f"posttrain: unknown structures {unknown}; known: {list(STRUCTURES)}.")
        if not (isinstance(self.calibration_sequences, int) and self.calibration_sequences >= 1):
            raise ValueError(
                f"posttrain: calibration_sequences must be an int >= 1, got "
                f"{self.calibration_sequences!r}."
            )


def calibration_windows(cfg: RunConfig, sequences: int) -> tuple[list[np.ndarray], bool]:
    """(batches of training windows, whether the run never read them): the `sequences` windows
    that follow, in the run's own shuffled order, the ones its steps consumed."""
    prepared = data_lib.prepare(cfg.data)
    windows = data_lib._Windows(prepared.stream_path(data_lib.TRAIN), cfg.data.seq_len)
    order = grain.MapDataset.range(len(windows)).shuffle(seed=cfg.data.seed)
    consumed = cfg.train.steps * cfg.data.batch_size
    unseen = consumed + sequences <= len(windows)
    positions = (consumed + np.arange(sequences)) % len(windows)
    index = np.array([order[int(p)] for p in positions], np.int64)
    batch = cfg.data.batch_size
    return [windows.gather(index[i : i + batch]) for i in range(0, sequences, batch)], unseen


def _restore_model(cfg: RunConfig, workdir: Path) -> tuple[nnx.Module, int]:
    trainer = step_lib.build(cfg)
    abstract = ckpt.abstract_with_shardings(
        jax.eval_shape(trainer.init_fn), trainer.state_shardings
    )
    checkpointer = ckpt.Checkpointer(workdir / rf.CHECKPOINTS, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step != cfg.train.steps:
            raise ValueError(
                f"{workdir}: its newest checkpoint is step {step}, not the final step "
                f"{cfg.train.steps}; post-training evaluation needs the finished dense model."
            )
        state, _ = checkpointer.restore(step, abstract, None)
    finally:
        checkpointer.close()
    t = trainer.templates
    model = nnx.merge(
        trainer.graphdef,
        step_lib.as_state(t["params"], state["params"]),
        step_lib.as_state(t["masks"], state["masks"]),
        step_lib.as_state(t["rest"], state["rest"]),
    )
    return model, step


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef, state, batch_BxL1):
    logits, _ = nnx.merge(graphdef, state)(batch_BxL1[:, :-1])
    return jnp.sum(step_lib.cross_entropy(logits, batch_BxL1[:, 1:]))


def eval_loss(model: nnx.Module, batches: list[np.ndarray]) -> float:
    """Mean next-token loss (nats) over `batches`."""
    graphdef, state = nnx.split(model)
    total = sum(float(_eval_sums(graphdef, state, jnp.asarray(b))) for b in batches)
    return total / sum(b[:, 1:].size for b in batches)


def evaluate(
    cfg: RunConfig, workdir: str | Path, post: PostTrainConfig = PostTrainConfig()
) -> list[dict]:
    """One row per (method, structure), and one for the dense model: eval loss on the run's
    validation windows, its gap to the dense model and the pruning's calibration facts."""
    workdir = Path(workdir)
    if cfg.sparsity.structure is not None:
        raise ValueError(f"{workdir}: post-training pruning starts from a dense run.")
    summary = rf.load_json(workdir / rf.SUMMARY)  # raises, naming the file, if it is missing
    dense, step = _restore_model(cfg, workdir)
    evals = data_lib.eval_batches(cfg.data, cfg.train.eval_batches)
    calibration, unseen = calibration_windows(cfg, post.calibration_sequences)
    dense_loss = eval_loss(dense, evals)
    if not math.isclose(dense_loss, summary["eval_loss"], rel_tol=1e-5):
        raise ValueError(
            f"{workdir}: the restored dense model evaluates to {dense_loss:.6f}, but its summary "
            f"says {summary['eval_loss']:.6f}; the checkpoint is not the run's final model."
        )
    common = {
        "run_id": cfg.run_id,
        "model": cfg.model_name,
        "seed": cfg.train.seed,
        "n_params_nonembedding": summary["n_params_nonembedding"],
        "tokens": summary["tokens"],
        "step": step,
        "calibration_tokens": post.calibration_sequences * cfg.data.seq_len,
        "calibration_unseen": unseen,
        "dense_eval_loss": dense_loss,
    }
    rows = [{**common, "method": "dense", "structure": "dense", "sparsity": 0.0}]
    rows[0].update(eval_loss=dense_loss, gap=0.0, mean_relative_error=None)
    for structure in post.structures:
        for method in post.methods:
            model = nnx.clone(dense)
            recipe = oneshot.OneShotConfig(method=method, structure=STRUCTURES[structure])
            report = oneshot.prune(model, calibration, recipe)
            loss = eval_loss(model, evals)
            errors = [
                r["relative_error"] for r in report.values() if r["relative_error"] is not None
            ]
            rows.append(
                {
                    **common,
                    "method": method,
                    "structure": structure,
                    "sparsity": float(np.mean([r["sparsity"] for r in report.values()])),
                    "eval_loss": loss,
                    "gap": loss - dense_loss,
                    "mean_relative_error": float(np.mean(errors)) if errors else None,
                }
            )
    return rows


def evaluate_runs(runs, root: str | Path, post: PostTrainConfig = PostTrainConfig()):
    """`evaluate` for each finished dense run of `runs` ((run_id, RunConfig) pairs, each in
    `root / run_id`); sparse and unfinished runs are skipped. Yields one run's rows at a time,
    so a caller can write them as they come."""
    for run_id, cfg in runs:
        workdir = Path(root) / run_id
        if cfg.sparsity.structure is None and (workdir / rf.SUMMARY).exists():
            yield evaluate(cfg, workdir, post)
