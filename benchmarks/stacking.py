"""Sweep throughput of stacked training (K runs per process, one vmapped step) vs one run per process.

For each CPU preset and K, starts `jobs` worker processes at once (one pinned core each, like the
local launcher) that each train K variants (sparsities 0…93.75%, gradual pruning with mask updates
every 5 steps, the real data pipeline) and report their start-up cost (imports, data, build,
compile) and steady step time. As in a sweep, workers share JAX's persistent compilation cache: one
worker runs first alone and compiles (`startup_cold_s`: the first job of a shape), the timed
workers then load its step from the cache (`startup_s`: every later job that differs only in seed
or target). Throughput is variant-steps per second over all workers; the sweep
figure adds the start-up cost to `--run-steps`-step runs. Writes the package's benchmarked machine data
`sparsescale/benchmarked/stacking.json` (with the machine it was measured on);
the launcher (`launch/planner.py`) stacks as many runs per process as was fastest for the nearest
measured size.

  python benchmarks/stacking.py [--presets cpu_6k,cpu_25k,...] [--stacks 1,2,4,8] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.backends import local
from sparsescale import benchmarked

SPARSITIES = (0.0, 0.5, 0.75, 0.875, 0.9375)


def worker(preset: str, stack: int, steps: int, batch_size: int) -> dict:
    t0 = time.perf_counter()
    import jax
    import numpy as np

    from experiments import common
    from launch.sweep import apply_overrides
    from sparsescale import config as config_lib
    from sparsescale import data as data_lib
    from sparsescale import stack_rules, stacking, train
    from sparsescale import step as step_lib

    train.use_compilation_cache()  # $JAX_COMPILATION_CACHE_DIR, set by `measure`
    cfgs = []
    for k in range(stack):
        sparsity = SPARSITIES[k % len(SPARSITIES)]
        c = common.base_config()
        over = {
            "model.name": preset,
            "data.batch_size": batch_size,
            "sparsity.structure": "unstructured" if sparsity else "dense",
            "sparsity.target": sparsity,
            "sparsity.schedule.every": 5,
            "train.steps": 10 * steps,
            "train.seed": k // len(SPARSITIES),
        }
        cfgs.append(config_lib.run_config(apply_overrides(c, over, "bench")))
    base = stack_rules.check_stackable(cfgs)
    trainer = step_lib.build(base, num_variants=stack if stack > 1 else None)
    data_lib.prepare(base.data)
    it = data_lib.train_iterator(base.data)
    if stack > 1:
        variants = stacking.variant_inputs(cfgs, trainer.pruner)
        state = trainer.init_fn(variants)
        step = lambda s: trainer.step_fn(  # noqa: E731
            s, step_lib.global_batch(trainer, np.stack([next(it)] * stack)), variants
        )
    else:
        state = trainer.init_fn()
        step = lambda s: trainer.step_fn(s, step_lib.global_batch(trainer, next(it)))  # noqa: E731
    state, metrics = step(state)  # compiles
    jax.block_until_ready(metrics)
    startup_s = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps
    return {"startup_s": startup_s, "step_s": step_s}


def measure(preset: str, stack: int, steps: int, batch_size: int, jobs: int) -> dict:
    cpus = local.available_cpus()
    with tempfile.TemporaryDirectory(prefix="stacking-cache-") as cache:
        env = local.child_env(1) | {"JAX_COMPILATION_CACHE_DIR": cache}

        def start(cpu: int, timed_steps: int) -> subprocess.Popen:
            cmd = [__file__, "--worker", preset, str(stack), str(timed_steps), str(batch_size)]
            return subprocess.Popen(
                [sys.executable, *cmd],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                preexec_fn=lambda: os.sched_setaffinity(0, [cpu]),
            )

        def result(proc: subprocess.Popen) -> dict:
            return json.loads(proc.communicate()[0].decode().strip().splitlines()[-1])

        cold = result(start(cpus[0], 1))  # fills the compilation cache
        outs = [result(p) for p in [start(cpus[j], steps) for j in range(jobs)]]
    return {
        "stack": stack,
        "startup_cold_s": cold["startup_s"],
        "startup_s": max(o["startup_s"] for o in outs),
        "step_s": sum(o["step_s"] for o in outs) / jobs,
        "variant_steps_per_s": sum(stack / o["step_s"] for o in outs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cpu_6k,cpu_25k,cpu_100k,cpu_330k,cpu_800k")
    parser.add_argument("--stacks", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per worker")
    parser.add_argument("--run-steps", type=int, default=300, help="run length for sweep figures")
    parser.add_argument("--batch-size", type=int, default=8, help="fig1 quick's batch")
    parser.add_argument("--out", type=Path, default=benchmarked.path("stacking"))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, stack, steps, batch = args.worker
        print(json.dumps(worker(preset, int(stack), int(steps), int(batch))))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sparsescale import accounting
    from sparsescale import model as model_lib

    jobs = len(local.available_cpus())
    rows, best = [], []
    for preset in args.presets.split(","):
        n_params = accounting.param_counts(model_lib.preset(preset))["non_embedding"]
        trials = [
            measure(preset, int(k), args.steps, args.batch_size, jobs)
            for k in args.stacks.split(",")
        ]
        single = next(t for t in trials if t["stack"] == 1)
        for t in trials:  # a sweep of jobs·K runs of run_steps steps: start-up + steps, per process
            sweep_s = t["startup_s"] + args.run_steps * t["step_s"]
            t["sweep_variant_steps_per_s"] = jobs * t["stack"] * args.run_steps / sweep_s
            t["speedup_steady"] = t["variant_steps_per_s"] / single["variant_steps_per_s"]
            t["speedup_sweep"] = (
                t["sweep_variant_steps_per_s"] / single["sweep_variant_steps_per_s"]
            )
            print(
                f"{preset:>9} ({n_params:>9,} params) K={t['stack']}: "
                f"{t['variant_steps_per_s']:7.1f} variant-steps/s steady "
                f"(×{t['speedup_steady']:.2f}), ×{t['speedup_sweep']:.2f} for "
                f"{args.run_steps}-step runs; start-up {t['startup_s']:.1f} s "
                f"({t['startup_cold_s']:.1f} s compiling)",
                flush=True,
            )
        top = max(trials, key=lambda t: t["sweep_variant_steps_per_s"])
        rows.append({"model": preset, "n_params": n_params, "trials": trials})
        best.append({"model": preset, "n_params": n_params, "stack": top["stack"]})
    benchmarked.write(
        "stacking",
        {
            "benchmark": "stacking",
            "cores": jobs,
            "jobs": jobs,
            "threads": 1,
            "timed_steps": args.steps,
            "run_steps": args.run_steps,
            "batch_size": args.batch_size,
            "load_average_1m": os.getloadavg()[0],
            "results": rows,
            "best": best,
        },
        args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
