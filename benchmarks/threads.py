"""Which split of this machine's cores runs a sweep fastest: many single-thread jobs or fewer wide ones?

Runs the same small sweep (`--runs` seeds of experiments/single_run.py:<preset> for `--steps` steps, whole
runs including compilation, as a sweep would) through the local backend for every jobs × threads
split, `--repeats` times interleaved, and writes the best wall time per split and the fastest split
to JSON; `python -m launch run` reads it.

  python benchmarks/threads.py [--preset smoke --steps 40 --runs 2] [--out sparsescale/benchmarked/threads.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from launch.backends import local
from launch.sweep import expand
from sparsescale import benchmarked, run_files

EXPERIMENT = """
from experiments import single_run as train

def get_config(arg):
    c = train.get_config("{preset}")
    c.train.steps = {steps}
    c.train.ckpt_every = {steps}
    return c

def get_sweep(arg):
    return [{{"train.seed": s}} for s in range({runs})]
"""


def splits(cores: int) -> list[tuple[int, int]]:
    """Every jobs × threads with jobs * threads == cores."""
    return [(j, cores // j) for j in range(1, cores + 1) if cores % j == 0]


def measure(jobs: int, threads: int, preset: str, steps: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
        exp = Path(tmp) / "bench_threads.py"
        exp.write_text(EXPERIMENT.format(preset=preset, steps=steps, runs=runs))
        sweep = expand(f"{exp}:x")
        root = Path(tmp) / "root"
        start = time.perf_counter()
        failed = local.run_local(sweep, root, local.LocalOptions(jobs, threads), out=io.StringIO())
        wall_s = time.perf_counter() - start
        if failed:
            raise RuntimeError(f"{failed} benchmark runs failed; see {root} (kept: rerun to debug)")
        tokens = sum(
            run_files.read_json(root / r.run_id / "summary.json")["tokens"] for r in sweep.runs
        )
    return {
        "jobs": jobs,
        "threads": threads,
        "wall_s": wall_s,
        "runs_per_hour": runs / wall_s * 3600,
        "tokens_per_s": tokens / wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2, help="runs per split (a multiple of cores)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; min is kept")
    parser.add_argument("--out", type=Path, default=benchmarked.path("threads"))
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cores = len(local.available_cpus())
    trials = []
    for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every split
        for jobs, threads in splits(cores):
            trials.append(measure(jobs, threads, args.preset, args.steps, args.runs))
            print(json.dumps(trials[-1]), flush=True)
    results = [
        min((t for t in trials if (t["jobs"], t["threads"]) == split), key=lambda t: t["wall_s"])
        | {"wall_s_all": [t["wall_s"] for t in trials if (t["jobs"], t["threads"]) == split]}
        for split in splits(cores)
    ]
    best = min(results, key=lambda r: r["wall_s"])
    slowest = max(results, key=lambda r: r["wall_s"])
    record = {
        "benchmark": "threads",
        "cores": cores,
        "workload": {"preset": args.preset, "steps": args.steps, "runs": args.runs},
        "repeats": args.repeats,
        "load_average_1m": os.getloadavg()[0],
        "results": results,
        "best": {"jobs": best["jobs"], "threads": best["threads"]},
        "speedup_best_vs_slowest": slowest["wall_s"] / best["wall_s"],
        "note": "whole runs incl. compilation; best of the repeats per split",
    }
    benchmarked.write("threads", record, args.out)
    print(f"best: {best['jobs']} jobs x {best['threads']} threads -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
