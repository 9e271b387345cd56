"""The job planner: groups a sweep's runs into stacked jobs (one process trains K compatible
runs in one compiled step, `sparsescale.stack`). Which runs are compatible is the trainer's rule
(`sparsescale.stack_rules.stack_groups`); how many to stack comes from `benchmarks/stacking.py`'s
measurement (package data read by `sparsescale.benchmarked.max_stack`), else `DEFAULT_MAX_STACK`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

from launch.sweep import Run, Sweep, apply_overrides
from sparsescale import benchmarked, run_files

DEFAULT_MAX_STACK = benchmarked.DEFAULT_MAX_STACK


def resolved_config(sweep: Sweep, run: Run):
    """The trainer's RunConfig of `run`, as `python -m sparsescale.main` would build it."""
    from sparsescale.config import run_config as to_run_config

    return to_run_config(job_config(sweep, run))


def job_config(sweep: Sweep, run: Run) -> dict:
    i = sweep.runs.index(run)
    ids = {"run_id": run.run_id, "experiment": sweep.experiment}
    return apply_overrides(sweep.configs[i], ids, run.run_id).to_dict()


def measured_max_stack(n_params: int) -> tuple[int, str]:
    """(best runs per process, where it came from) for a model of `n_params` non-embedding
    parameters: the measurement of the nearest measured size on this many cores."""
    return benchmarked.max_stack(n_params, len(os.sched_getaffinity(0)))


def has_checkpoint(workdir: Path) -> bool:
    """Whether the run has a finalized checkpoint to resume from. Orbax writes a step into
    `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once complete; a killed writer
    leaves the temporary directory behind, which is not a checkpoint."""
    ckpts = Path(workdir) / run_files.CHECKPOINTS
    return ckpts.is_dir() and any(p.name.isdigit() and p.is_dir() for p in ckpts.iterdir())


def _split(group: list[Run], parts: int) -> list[list[Run]]:
    size = math.ceil(len(group) / parts)
    return [group[i : i + size] for i in range(0, len(group), size)]


def plan(
    sweep: Sweep, runs: Sequence[Run], root: Path | None, jobs: int, max_stack: int | None = None
) -> list[list[Run]]:
    """The jobs to start for `runs`: stacks of compatible fresh runs, each at most the measured
    (or given) size, split further while there are fewer jobs than `jobs` slots, longest first
    (dense training FLOPs). Runs that have checkpoints resume alone, so no finished work is
    redone; an interrupted stacked job resumes as the same stack. `root=None`: plan every run
    as fresh."""
    from sparsescale.accounting import flops_per_token, param_counts
    from sparsescale.stack_rules import stack_groups

    fresh = [r for r in runs if root is None or not has_checkpoint(root / r.run_id)]
    planned = resumed_stacks([r for r in runs if r not in fresh], root)
    if max_stack == 1 or len(fresh) < 2:
        return planned + [[r] for r in fresh]
    cfgs = [resolved_config(sweep, r) for r in fresh]
    chunks = []
    for group in stack_groups(cfgs):
        members = [fresh[i] for i in group]
        cap = (
            max_stack or measured_max_stack(param_counts(cfgs[group[0]].model)["non_embedding"])[0]
        )
        chunks += _split(members, math.ceil(len(members) / max(cap, 1)))
    while len(chunks) + len(planned) < jobs and max(map(len, chunks)) > 1:
        largest = max(chunks, key=len)
        chunks.remove(largest)
        chunks += _split(largest, 2)
    index = {r.run_id: i for i, r in enumerate(fresh)}

    def dense_flops(job):  # what a masked job computes, whatever its sparsity
        cs = [cfgs[index[r.run_id]] for r in job]
        return sum(
            flops_per_token(c.model, c.data.seq_len, 0.0)
            * c.train.steps
            * c.data.batch_size
            * c.data.seq_len
            for c in cs
        )

    # Longest first, so the last job to start is a short one.
    return planned + sorted(chunks, key=lambda job: (-dense_flops(job), -len(job)))


def resumed_stacks(runs: Sequence[Run], root: Path) -> list[list[Run]]:
    """Runs with checkpoints, as the jobs that resume them: a stacked job's runs together again
    (the same compiled step, so the same numbers as if never interrupted) when every one of them
    is to resume, else each alone."""
    from launch import state

    stacks: dict[str, list[Run]] = {}
    for r in runs:
        attempts = state.read_launch_state(root / r.run_id)[0]["attempts"]
        last = attempts[-1] if attempts else {}
        key = f"{last.get('stack')}/{last.get('stacked')}" if last.get("stack") else r.run_id
        stacks.setdefault(key, []).append(r)
    jobs = []
    for key, members in stacks.items():
        whole = "/" in key and len(members) == int(key.rsplit("/", 1)[1])
        jobs += [members] if whole else [[r] for r in members]
    return jobs


def stack_id(runs: Sequence[Run]) -> str:
    digest = hashlib.sha256(" ".join(r.run_id for r in runs).encode()).hexdigest()[:10]
    return f"stack{len(runs)}_{digest}"
