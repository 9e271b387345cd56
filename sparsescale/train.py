"""The training loop: open the run directories, restore, step, log, checkpoint, finish.

`run(cfg, workdir)` trains one run; `run_stack(cfgs, workdirs)` trains K compatible runs in one
compiled step (stacking.py), each keeping its own workdir exactly as if trained alone. The compiled
step is step.py's, the run directory contract run_files.py's. Re-running resumes from the newest
checkpoint that restores; a finished run is left untouched; a resume whose config changes the
result is refused unless `allow_config_change`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sparsescale import (
    accounting,
    block_phase,
    energy,
    preemption,
    provenance,
    stack_rules,
    stacking,
)
from sparsescale import checkpoint as ckpt
from sparsescale import config as config_lib
from sparsescale import data as data_lib
from sparsescale import model as model_lib
from sparsescale import plan as plan_lib
from sparsescale import pruner as pruner_lib
from sparsescale import run_files as rf
from sparsescale import sparsity as sp
from sparsescale import step as step_lib
from sparsescale.config import RunConfig
from sparsescale.layers import use_block_path

log = logging.getLogger("sparsescale")


class NonFiniteLoss(RuntimeError):
    pass


class RunDirError(RuntimeError):
    """The workdir cannot be used as asked (in use, or its config differs); nothing was written."""


class MetricsLog:
    """metrics.jsonl of one run: appends one line per logged step, and rewrites every line it
    knows if the file vanished under it (so deleting it mid-run loses nothing)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rf.truncate_metrics(path, resume_step)  # lines a killed attempt logged after its checkpoint
        self.rows = rf.read_metrics(path)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if not self.path.exists():
            if len(self.rows) > 1:
                log.warning("%s vanished; rewriting its %d lines.", self.path, len(self.rows))
            rf.write_metrics(self.path, self.rows)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def last(self, key: str, step: int) -> float | None:
        """The value of `key` logged at `step`, if any."""
        return next(
            (r[key] for r in reversed(self.rows) if r.get("step") == step and key in r), None
        )


@dataclasses.dataclass
class _Member:
    """One run's files and bookkeeping inside the loop."""

    cfg: RunConfig
    workdir: Path
    checkpointer: ckpt.Checkpointer
    accounting: dict
    fingerprint: str
    metrics: MetricsLog | None = None
    writer: object = None
    last_good: int | None = None
    eval_loss: float = float("nan")
    train_loss: float = float("nan")
    failed: bool = False
    closed: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    def open_logs(self, start: int, is_main: bool) -> None:
        self.last_good = start if start else None
        if is_main:
            from tensorboardX import SummaryWriter

            self.metrics = MetricsLog(self.workdir / rf.METRICS, start)
            self.writer = SummaryWriter(str(self.workdir / rf.TENSORBOARD))

    def log(self, done: int, values: dict, step_time: float, eval_loss, is_main: bool) -> None:
        """This run's metrics row of step `done` (to metrics.jsonl and TensorBoard)."""
        sparse = self.cfg.sparsity.structure is not None
        row = {n: v for n, v in values.items() if sparse or not n.startswith("sparsity/")}
        self.train_loss = row["train/loss"]
        row.update(
            {
                "step": done,
                "perf/step_time_s": step_time,
                "perf/tokens_per_s": self.tokens_per_step / step_time if step_time else 0.0,
            }
        )
        if eval_loss is not None:
            self.eval_loss = eval_loss
            row["eval/loss"] = eval_loss
            row["eval/bpb"] = eval_loss / math.log(2)
        if is_main:
            self.metrics.append(row)
            for n, v in row.items():
                if n != "step":
                    self.writer.add_scalar(n, v, done)

    def save(self, done: int, state: dict, stream, costs: dict) -> None:
        """`costs`: wall_time_s, energy_j, energy_source and device of the job up to this step."""
        if done not in self.checkpointer.manager.all_steps():  # else: saved before a kill
            meta = {**costs, "fingerprint": self.fingerprint}
            self.checkpointer.save(done, state, stream, meta)
        self.last_good = done

    def close(self) -> None:
        if not self.closed:
            self.checkpointer.close()
            self.closed = True
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def use_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Keep compiled steps on disk (JAX's persistent compilation cache), so runs that differ only
    in seed or target, and every resume, skip the compile. `path`, else $JAX_COMPILATION_CACHE_DIR,
    else ~/.cache/sparsescale/jax; an empty $SPARSESCALE_COMPILATION_CACHE turns it off."""
    if os.environ.get("SPARSESCALE_COMPILATION_CACHE", "1") == "":
        return None
    path = Path(
        path
        or jax.config.jax_compilation_cache_dir
        or Path.home() / ".cache" / "sparsescale" / "jax"
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _data_key(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg.data), sort_keys=True, default=str)


def run(cfg: RunConfig, workdir: str | Path, allow_config_change: bool = False) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the summary written to summary.json."""
    (summary,) = run_stack([cfg], [workdir], stacked=False, allow_config_change=allow_config_change)
    if summary is None:
        raise NonFiniteLoss(rf.load_json(Path(workdir) / rf.FAILED)["error"])
    return summary


def _finished(cfg: RunConfig, workdir: Path) -> dict | None:
    """The run's summary if it already finished with this config (so there is nothing to do)."""
    summary = rf.read_json(workdir / rf.SUMMARY)
    if summary is None:
        return None
    saved = rf.read_json(workdir / rf.CONFIG)
    if saved is not None:
        changes = config_lib.config_changes(saved, cfg)
    else:
        changes = [] if summary.get("config_hash") == cfg.hash() else ["config_hash"]
    if changes:
        raise RunDirError(
            f"{workdir} holds a run that finished with another config (changed: "
            f"{'; '.join(changes)}); use a new workdir."
        )
    return summary


def _check_config(cfg: RunConfig, workdir: Path, allow_change: bool) -> None:
    """Refuses a resume whose config changes the result; then (only then) writes config.json."""
    path = workdir / rf.CONFIG
    if path.exists():
        try:
            changes = config_lib.config_changes(rf.load_json(path), cfg)
        except rf.RunFileError as e:
            changes = [f"unreadable saved config ({e})"]
        if changes and not allow_change:
            raise RunDirError(
                f"{workdir} was started with another config; resuming would mix two configs in one "
                f"run. Changed: {'; '.join(changes)}. Use a new workdir, or pass "
                "--allow_config_change to resume anyway."
            )
        if changes:
            log.warning("%s: resuming with a changed config: %s", workdir, "; ".join(changes))
    rf.write_json_atomic(path, cfg.to_dict())


def _restore(trainer, base, members, stacked, iterators: list):
    """(state, start step, wall time so far, an energy meter that continues the restored joules,
    the device of the steps so far) from the newest checkpoint step every member has and
    restores; unrestorable ones are moved to run_files.CORRUPT_CHECKPOINTS with a warning."""
    one = step_lib.build(base) if stacked else trainer
    abstract = ckpt.abstract_with_shardings(jax.eval_shape(one.init_fn), one.state_shardings)
    common = set.intersection(*(set(m.checkpointer.manager.all_steps()) for m in members))
    for step in sorted(common, reverse=True):
        try:
            restored = [
                m.checkpointer.restore(step, abstract, it)
                for m, it in zip(members, iterators, strict=True)
            ]
        except Exception as e:  # noqa: BLE001 (any damage: truncated, missing or empty files)
            cause = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            for m in members:
                if jax.process_index() == 0 and step in m.checkpointer.manager.all_steps():
                    aside = m.workdir / rf.CORRUPT_CHECKPOINTS / f"{step}.{time.time_ns()}"
                    aside.parent.mkdir(exist_ok=True)
                    shutil.move(m.checkpointer.manager.directory / str(step), aside)
                m.checkpointer.manager.reload()
            log.warning(
                "Skipped checkpoint step %d of %s (it does not restore: %s); moved it aside to "
                "checkpoints.corrupt/ and trying the previous one.",
                step,
                ", ".join(str(m.workdir) for m in members),
                cause,
            )
            continue
        states = [s for s, _ in restored]
        wall = max(float(meta.get("wall_time_s", 0.0)) for _, meta in restored)
        joules = max(float(meta.get("energy_j", 0.0)) for _, meta in restored)
        source = restored[0][1].get("energy_source")
        if step and any("energy_j" not in meta for _, meta in restored):
            source = f"unmetered before step {step} (a checkpoint older than energy accounting)"
        log.info("Resumed from step %d in %s", step, ", ".join(str(m.workdir) for m in members))
        meter, device = energy.meter(joules, source), restored[0][1].get("device")
        return trainer.stack_states(states), step, wall, meter, device
    return None, 0, 0.0, energy.meter(), None


def run_stack(
    cfgs: list[RunConfig],
    workdirs: list[str | Path],
    stacked: bool = True,
    allow_config_change: bool = False,
) -> list[dict | None]:
    """Trains (or resumes) several runs in one stacked step (see `stack_rules.stack_groups`); each
    keeps its own workdir, metrics, checkpoints and summary.json, exactly as if run alone. A
    non-finite loss fails that run only (failed.json, entry None). Returns the summaries."""
    workdirs = [Path(w) for w in workdirs]
    if len(cfgs) != len(workdirs) or not cfgs:
        raise ValueError("run_stack: need one workdir per config (and at least one).")
    if not stacked and len(cfgs) != 1:
        raise ValueError("run_stack: stacked=False trains exactly one run.")
    for w in workdirs:
        if w.exists() and not w.is_dir():
            raise ValueError(f"workdir {w} exists and is not a directory.")
    base = stack_rules.check_stackable(cfgs) if stacked else cfgs[0]
    for c in cfgs:
        data_lib.validate(c.data)
    num_variants = len(cfgs) if stacked else None
    trainer = step_lib.build(base, num_variants=num_variants)  # checks shapes against the mesh
    block_steps = block_phase.block_phase_steps(cfgs, trainer.pruner)
    if block_steps:  # fail now, not at the switch, if a layer cannot run block-sparse
        model = nnx.eval_shape(lambda: model_lib.Transformer(base.model, rngs=nnx.Rngs(0)))
        names = [sp.path_str(p[:-1]) for p in trainer.pruner.paths]
        use_block_path(model, dict.fromkeys(names, 1), base.sparsity.structure)

    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as locks:
        for w in workdirs:
            w.mkdir(parents=True, exist_ok=True)
            if is_main and not locks.enter_context(rf.file_lock(w / rf.LOCK, blocking=False)):
                raise RunDirError(
                    f"{w} is in use by another trainer (it holds {w / rf.LOCK}); wait for it to "
                    "finish or stop it first."
                )
        done = [_finished(c, w) for c, w in zip(cfgs, workdirs, strict=True)]
        if all(s is not None for s in done):
            log.info(
                "Already finished: %s (summary.json left as is).", ", ".join(map(str, workdirs))
            )
            return done
        if any(s is not None for s in done):
            raise RunDirError(
                "some of these stacked runs already finished: "
                f"{[str(w) for w, s in zip(workdirs, done, strict=True) if s is not None]}."
            )
        if is_main:
            for c, w in zip(cfgs, workdirs, strict=True):
                _check_config(c, w, allow_config_change)
        return _train(cfgs, workdirs, trainer, base, stacked, block_steps, is_main)


def _train(cfgs, workdirs, trainer, base, stacked, block_steps, is_main) -> list[dict | None]:
    """Runs the job's compile plan: one compiled step per segment, members log and save."""
    members, streams, evals = _open_members(cfgs, workdirs, trainer, stacked)
    keys = [_data_key(c) for c in cfgs]
    state, start, wall_before, meter, device_before = _restore(
        trainer, base, members, stacked, [streams[k] for k in keys]
    )
    prefix = stack_rules.shared_prefix(cfgs) if stacked else (0, [], [])
    segments = plan_lib.compile_plan(start, base.train.steps, len(cfgs), prefix, block_steps)
    if state is None:
        if any(m.checkpointer.manager.all_steps() for m in members):
            log.warning("No checkpoint restores for every run; starting from step 0.")
        streams = {k: data_lib.train_iterator(cfgs[keys.index(k)].data) for k in streams}
    for m in members:
        m.open_logs(start, is_main)

    optim = base.train
    clock = _Clock(start, wall_before)
    device = provenance.device_name(device_before)
    costs = {"wall_time_s": wall_before, "energy_j": meter.before, "energy_source": meter.source,
             "device": device}  # fmt: skip
    exit_after = int(os.environ.get(EXIT_AFTER_STEP, "0") or 0)
    signal_after = int(os.environ.get(SIGNAL_AFTER_STEP, "0") or 0)
    with preemption.StopRequests() as stop, _closing(members):
        previous = None
        for seg in segments:
            trainer, variants, state = _enter(seg, previous, trainer, state, cfgs, base, stacked)
            previous = seg
            for step in range(seg.start, seg.stop):
                fresh = {k: next(it) for k, it in streams.items()}  # one draw per data stream
                batch = trainer.batch([fresh[keys[k]] for k in seg.trained])
                state, metrics = trainer.step(state, batch, variants)
                done = step + 1
                if step == seg.start:  # keep compilation out of the throughput numbers
                    jax.block_until_ready(metrics)
                    clock.restart(done)
                stop_by = stop.requested()
                if done == signal_after:
                    os.kill(os.getpid(), signal.SIGUSR1)  # noted now, acted on next step
                log_now = done % optim.log_every == 0 or done == optim.steps
                ckpt_now = done % optim.ckpt_every == 0 or done == optim.steps or bool(stop_by)
                eval_now = optim.eval_every > 0 and done % optim.eval_every == 0
                if not (log_now or ckpt_now or eval_now):
                    continue
                values = {
                    k: np.atleast_1d(np.asarray(v, np.float64))
                    for k, v in jax.device_get(metrics).items()
                }
                step_time = clock.lap(done)
                for k, m in enumerate(members):
                    loss = float(values["train/loss"][seg.slots[k]])
                    if not m.failed and not math.isfinite(loss):
                        _fail(m, f"non-finite training loss {loss} at step {done}", is_main)
                live = [k for k, m in enumerate(members) if not m.failed]
                if not live:
                    break
                eval_losses = None
                if eval_now or done == optim.steps:
                    per_variant = trainer.evaluate(state, [evals[keys[k]] for k in seg.trained])
                    eval_losses = [per_variant[i] for i in seg.slots]
                for k in live:
                    own = {n: float(v[seg.slots[k]]) for n, v in values.items()}
                    eval_k = None if eval_losses is None else eval_losses[k]
                    members[k].log(done, own, step_time, eval_k, is_main)
                if is_main:
                    _log_progress(
                        done, optim.steps, members, live, eval_losses, step_time,
                        members[0].tokens_per_step * len({seg.slots[k] for k in live}),
                    )  # fmt: skip
                if ckpt_now:
                    # the summary's wall time and energy: at the last checkpoint
                    costs = {"wall_time_s": clock.wall(), "energy_j": meter.joules(),
                             "energy_source": meter.source, "device": device}  # fmt: skip
                    for k in live:
                        state_k = trainer.variant_state(state, seg.slots[k])
                        members[k].save(done, state_k, streams[keys[k]], costs)
                if done == exit_after:
                    _exit_for_test(members, done)
                if stop_by and done < optim.steps:
                    for m in members:
                        m.checkpointer.manager.wait_until_finished()
                    log.warning("%s: checkpoint saved at step %d; stopping.", stop_by, done)
                    raise preemption.Preempted(stop_by, done)
            if not any(not m.failed for m in members):
                break
    return _finish(members, trainer, state, [evals[k] for k in keys], start, costs, is_main)


@contextlib.contextmanager
def _closing(members):
    """Close every member's checkpointer and writers on the way out, however the loop ends."""
    try:
        yield
    finally:
        for m in members:
            m.close()


def _open_members(cfgs, workdirs, trainer, stacked):
    """(members, train iterators, eval batches): one data stream per distinct data config,
    shared by the runs that have it."""
    members, streams, evals = [], {}, {}
    for c, w in zip(cfgs, workdirs, strict=True):
        key = _data_key(c)
        if key not in streams:
            data_lib.prepare(c.data)
            streams[key] = data_lib.train_iterator(c.data)
            evals[key] = data_lib.eval_batches(c.data, c.train.eval_batches)
        own_pruner = trainer.pruner
        if stacked:
            own_pruner = (
                pruner_lib.Pruner(c.sparsity, trainer.pruner.shapes, c.train.steps)
                if c.sparsity.structure
                else None
            )
        checkpointer = ckpt.Checkpointer(w / rf.CHECKPOINTS, keep=c.train.keep_ckpts)
        accounts = accounting.run_accounting(c, own_pruner)
        members.append(_Member(c, w, checkpointer, accounts, data_lib.fingerprint(c.data)))
    return members, streams, evals


def _enter(seg, previous, trainer, state, cfgs, base, stacked):
    """(trainer, variant inputs, state) for segment `seg`: the step built for its variants and
    block phase, and the state carried over (or initialised) in that layout."""
    num_variants = len(seg.trained) if stacked else None
    if num_variants != trainer.num_variants:
        trainer = step_lib.build(base, num_variants=num_variants)
    variants = (
        stacking.variant_inputs([cfgs[k] for k in seg.trained], trainer.pruner) if stacked else None
    )
    if state is None:
        state = trainer.init(variants)
    elif previous is None and seg.shared:  # restored in the full layout
        state = jax.device_put(stacking.take_variants(state, seg.trained), trainer.state_shardings)
    elif previous is not None and previous.shared and not seg.shared:
        state = jax.device_put(
            stacking.take_variants(state, previous.slots), trainer.state_shardings
        )
        log.info("Step %d: forked %d runs from the shared prefix.", seg.start, len(cfgs))
    if seg.shared:
        log.info(
            "Training the shared prefix (steps %d-%d) once for %d of %d stacked runs.",
            seg.start, seg.stop, len(seg.trained), len(cfgs),
        )  # fmt: skip
    if seg.block_phase and (previous is None or seg.block_phase != previous.block_phase):
        budgets = block_phase.block_budgets_of(trainer, state)
        per_budget = collections.Counter(budgets.values())
        log.info(
            "Step %d: block-sparse layers from here, tiles kept per block-column: %s",
            seg.start,
            ", ".join(f"{b} ({n} layers)" for b, n in sorted(per_budget.items())),
        )
        trainer = step_lib.build(base, num_variants=num_variants, block_budgets=budgets)
    return trainer, variants, state


# Test hook: the trainer process dies (exit status 137, as under SIGKILL) right after step N,
# once that step's checkpoint saves have finished, so resume tests need no timing windows.
EXIT_AFTER_STEP = "SPARSESCALE_EXIT_AFTER_STEP"
# Test hook: the trainer sends itself SIGUSR1 (as Slurm would) right after step N, so it stops
# at step N + 1 (preemption.py) without timing windows.
SIGNAL_AFTER_STEP = "SPARSESCALE_SIGNAL_AFTER_STEP"


def _exit_for_test(members, done: int) -> None:
    for m in members:
        m.checkpointer.manager.wait_until_finished()
    log.warning("%s=%d: exiting without cleanup after step %d.", EXIT_AFTER_STEP, done, done)
    logging.shutdown()
    os._exit(137)


class _Clock:
    """Step times (compiles excluded: `restart` after a segment's first step) and wall time."""

    def __init__(self, start: int, wall_before: float):
        self.t_start = self.t_last = time.perf_counter()
        self.step_last, self.wall_before = start, wall_before

    def restart(self, done: int) -> None:
        self.t_last, self.step_last = time.perf_counter(), done

    def lap(self, done: int) -> float:
        """Seconds per step since the last lap (0 when no step ran since)."""
        now = time.perf_counter()
        step_time = (
            (now - self.t_last) / max(done - self.step_last, 1) if done > self.step_last else 0.0
        )
        self.t_last, self.step_last = now, done
        return step_time

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start


def _log_progress(done, total, members, live, eval_losses, step_time, step_tokens) -> None:
    """One progress line; `step_tokens`: tokens the step computed (a shared prefix counts once)."""
    eta = (total - done) * step_time
    log.info(
        "step %d/%d loss %s%s | %.0f tok/s | ETA %s",
        done,
        total,
        " ".join(f"{members[k].train_loss:.4f}" for k in live),
        "" if eval_losses is None else " eval " + " ".join(f"{eval_losses[k]:.4f}" for k in live),
        step_tokens / step_time if step_time else 0.0,
        hours_minutes_seconds(eta),
    )


def hours_minutes_seconds(seconds: float) -> str:
    """H:MM:SS with as many hours as it takes (no wrap after a day)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _finish(members, trainer, state, evals, start, costs, is_main) -> list[dict | None]:
    """Writes each live run's summary.json. A run resumed at its final step (killed between the
    last checkpoint and its summary) takes its losses from the metrics it logged then. `costs`:
    the job's wall time (at its last checkpoint) and energy; a stacked job's runs each report
    the whole job's."""
    live = [k for k, m in enumerate(members) if not m.failed]
    final = members[0].cfg.train.steps
    for k in live:
        m = members[k]
        if start == final and m.metrics is not None:
            m.train_loss = m.metrics.last("train/loss", final) or m.train_loss
            m.eval_loss = m.metrics.last("eval/loss", final) or m.eval_loss
    if any(math.isnan(members[k].eval_loss) for k in live):
        losses = trainer.evaluate(state, evals)  # evaluate the restored state
        for k in live:
            members[k].eval_loss = losses[k]
    summaries: list[dict | None] = [None] * len(members)
    for k in live:
        m = members[k]
        if math.isnan(m.train_loss):
            raise RunDirError(
                f"{m.workdir}: resumed at its final step, but {rf.METRICS} has no train loss for "
                f"step {final}; the summary cannot be rebuilt (delete the final checkpoint to "
                "retrain the last steps)."
            )
        row = {
            **config_lib.summary_fields(m.cfg, m.accounting),
            "eval_loss": m.eval_loss,
            "eval_bpb": m.eval_loss / math.log(2),
            "train_loss": m.train_loss,
            **costs,
            "data_fingerprint": m.fingerprint,
            "status": "done",
        }
        summaries[k] = rf.write_summary(m.workdir, row) if is_main else row
    return summaries


def _fail(member: _Member, cause: str, is_main: bool) -> None:
    member.failed = True
    member.close()
    where = (
        "no checkpoint was saved yet"
        if member.last_good is None
        else f"the last good checkpoint is step {member.last_good}"
    )
    error = f"{cause}; {where}."
    log.error("%s: %s", member.workdir, error)
    if is_main:
        rf.write_json_atomic(member.workdir / rf.FAILED, {"error": error, "step": member.last_good})
