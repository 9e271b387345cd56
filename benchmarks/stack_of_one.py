"""Is a single run as fast trained as a stack of one? The train step of `step.build(cfg)` (the
one-run layout) against `step.build(cfg, num_variants=1)` (a leading variant axis of 1, the
variant inputs traced), stepped in alternation in one process, for the masked sparse config the
sweeps run (75% unstructured, gradual, timed between mask updates).

    python -m benchmarks.stack_of_one [--presets cpu_25k,cpu_100k,cpu_600k] [--steps 30]

Writes benchmarks/results/stack_of_one_<backend>.json: per preset the median step times and
their ratio (stacked / single; the redesign keeps one layout only if it is within 1.02).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import make_config
from sparsescale import stacking
from sparsescale import step as step_lib

SPARSE = {"sparsity.structure": "unstructured", "sparsity.target": 0.75}


class Stepper:
    """One compiled trainer on a fixed random batch, at a step between mask updates."""

    def __init__(self, cfg, num_variants: int | None):
        self.trainer = step_lib.build(cfg, num_variants=num_variants)
        self.variants = (
            None if num_variants is None else stacking.variant_inputs([cfg], self.trainer.pruner)
        )
        self.state = self.trainer.init(self.variants)
        between_updates = int(0.5 * cfg.train.steps) + 3
        self.state["step"] = jax.device_put(
            np.int32(between_updates), self.trainer.state_shardings["step"]
        )
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
        self.batch = self.trainer.batch([batch] * (num_variants or 1))
        self.step()  # compile

    def step(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.trainer.step(self.state, self.batch, self.variants)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stack_of_one", description=__doc__)
    parser.add_argument("--presets", default="cpu_25k,cpu_100k,cpu_600k")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        cfg = make_config(preset, SPARSE)
        steppers = {"single": Stepper(cfg, None), "stack_of_one": Stepper(cfg, 1)}
        times = {name: [] for name in steppers}
        for _ in range(args.steps):
            for name, stepper in steppers.items():
                times[name].append(stepper.step())
        medians = {name: float(np.median(t)) for name, t in times.items()}
        rows.append(
            {
                "preset": preset,
                "single_s": medians["single"],
                "stack_of_one_s": medians["stack_of_one"],
                "ratio": medians["stack_of_one"] / medians["single"],
            }
        )
        print(rows[-1], flush=True)
    print(f"wrote {common.write('stack_of_one', {'steps': args.steps, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
