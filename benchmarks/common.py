"""Shared helpers for benchmark scripts: timing and JSON output."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from sparsescale import benchmarked

RESULTS = Path(__file__).resolve().parent / "results"


def time_fn(fn, *args, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall seconds of `fn(*args)` (blocked until ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_interleaved(fns: dict, repeats: int = 20, warmup: int = 2) -> dict[str, float]:
    """Median wall seconds of each zero-argument fn, timed in alternation so load drift on a
    shared machine hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t)) for name, t in times.items()}


def matmul_flops_per_s(n: int = 1024, repeats: int = 10) -> float:
    """The machine's dense float32 matmul throughput, measured now."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / time_fn(f, a, repeats=repeats)


def write(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Writes `payload` to `out` (default benchmarks/results/<name>_<backend>.json) atomically,
    with the time, the machine and the code version that measured it (`benchmarked.write`)."""
    out = Path(out) if out else RESULTS / f"{name}_{jax.default_backend()}.json"
    return benchmarked.write(name, payload, out)
