"""Train-step speed of the CPU presets: dense vs masked sparse (unstructured 75%, 2:4), model
FLOP/s utilisation, and the cost of mask-update steps.

    python benchmarks/train_step.py [--quick] [--presets cpu_25k,cpu_600k]

Writes benchmarks/results/train_step_<backend>.json. Every ratio is measured in one process.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import common
from experiments import common as exp_common
from launch.sweep import apply_overrides
from sparsescale import accounting
from sparsescale import config as config_lib
from sparsescale import model as model_lib
from sparsescale import step as step_lib

VARIANTS = {
    "dense": {"sparsity.structure": "dense"},
    "unstructured75": {
        "sparsity.structure": "unstructured",
        "sparsity.target": 0.75,
        "sparsity.schedule.kind": "constant",
    },
    "nm2:4": {"sparsity.structure": "nm", "sparsity.schedule.kind": "constant"},
}


def make_config(preset: str, overrides: dict, steps: int = 1000):
    c = exp_common.base_config()
    c.model.name = preset
    c.train.steps = steps
    return config_lib.run_config(apply_overrides(c, overrides, "benchmark"))


class Stepper:
    """One compiled trainer on a fixed random batch; `step()` runs and times one train step."""

    def __init__(self, cfg, start_step: int = 0):
        self.trainer = step_lib.build(cfg)
        self.state = self.trainer.init_fn()
        self.state["step"] = jax.device_put(
            np.int32(start_step), self.trainer.state_shardings["step"]
        )
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
        self.batch = step_lib.global_batch(self.trainer, batch)
        self.step()  # compile

    def step(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.trainer.step_fn(self.state, self.batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t


def interleaved_medians(cfgs: dict, num_steps: int) -> dict[str, float]:
    """Median step time per config, stepping the configs in alternation (fair under load)."""
    steppers = {name: Stepper(cfg) for name, cfg in cfgs.items()}
    times = {name: [] for name in cfgs}
    for _ in range(num_steps):
        for name, stepper in steppers.items():
            times[name].append(stepper.step())
    return {name: float(np.median(t)) for name, t in times.items()}


def step_times(cfg, num_steps: int, start_step: int = 0) -> np.ndarray:
    stepper = Stepper(cfg, start_step)
    return np.array([stepper.step() for _ in range(num_steps)])


def moe_rows(preset: str, num_steps: int) -> dict:
    """Whole-model step time: MoE (E=8, k=2 in every layer, expert width d_ff/2) vs the dense model
    with the same active parameters (d_ff) and with the same total parameters (4·d_ff)."""
    d_ff = model_lib.PRESETS[preset]["d_ff"]
    moe = {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.every": 1}
    variants = {
        "dense_same_active": {},
        "moe_e8_k2": {**moe, "model.d_ff": d_ff // 2},
        "dense_same_total": {"model.d_ff": 4 * d_ff},
    }
    cfgs = {name: make_config(preset, overrides) for name, overrides in variants.items()}
    medians = interleaved_medians(cfgs, num_steps)
    out = {"preset": preset}
    for name, cfg in cfgs.items():
        out[name] = {"step_s": medians[name], "params": accounting.param_counts(cfg.model)}
    out["moe_over_dense_active"] = out["moe_e8_k2"]["step_s"] / out["dense_same_active"]["step_s"]
    out["moe_over_dense_total"] = out["moe_e8_k2"]["step_s"] / out["dense_same_total"]["step_s"]
    print(
        f"MoE {preset}: {out['moe_over_dense_active']:.2f}x the dense-active step, "
        f"{out['moe_over_dense_total']:.2f}x the dense-total step, with "
        f"{out['moe_e8_k2']['params']['total'] / out['dense_same_active']['params']['total']:.2f}x "
        "the parameters"
    )
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--presets", default="cpu_25k,cpu_100k,cpu_600k,cpu_1.8m,cpu_4.7m")
    parser.add_argument(
        "--moe-preset", default="cpu_600k", help="whole-model MoE (E=8, k=2) comparison; '' skips"
    )
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 10 quick, 30)")
    args = parser.parse_args()
    num_steps = args.steps or (10 if args.quick else 30)
    peak = common.matmul_flops_per_s()
    print(f"dense f32 matmul: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for preset in args.presets.split(","):
        row = {"preset": preset}
        cfgs = {name: make_config(preset, overrides) for name, overrides in VARIANTS.items()}
        medians = interleaved_medians(cfgs, num_steps)
        dense_flops = accounting.run_accounting(cfgs["dense"])["flops_per_token"]
        for name, cfg in cfgs.items():
            t = medians[name]
            tokens = cfg.data.batch_size * cfg.data.seq_len
            flops = accounting.run_accounting(cfg)["flops_per_token"]
            row[name] = {
                "step_s": t,
                "tokens_per_s": tokens / t,
                # Masked layers still do dense work: utilisation counts the dense FLOPs done.
                "utilisation": dense_flops * tokens / t / peak,
                "nonzero_flops_per_token": flops,
            }
        for name in VARIANTS:
            row[name]["over_dense"] = row[name]["step_s"] / row["dense"]["step_s"]
        # Mask updates: gradual schedule over the whole run, updated every 10 steps.
        every = 10
        gradual = make_config(
            preset,
            {
                "sparsity.structure": "unstructured",
                "sparsity.target": 0.75,
                "sparsity.schedule.start": 0.0,
                "sparsity.schedule.end": 1.0,
                "sparsity.schedule.every": every,
            },
        )
        times = step_times(gradual, 3 * every, start_step=1)  # steps 2..31: updates at 10, 20, 30
        is_update = np.array([(s % every) == 0 for s in range(2, 2 + len(times))])
        t_update, t_plain = np.median(times[is_update]), np.median(times[~is_update])
        row["mask_update"] = {
            "update_step_s": float(t_update),
            "plain_step_s": float(t_plain),
            "update_over_plain": float(t_update / t_plain),
            "amortised_overhead": float((t_update - t_plain) / every / t_plain),
        }
        rows.append(row)
        print(
            f"{preset}: dense {row['dense']['step_s'] * 1e3:.1f} ms "
            f"({row['dense']['tokens_per_s']:.0f} tok/s, util {row['dense']['utilisation']:.2f}); "
            f"unstructured75 {row['unstructured75']['over_dense']:.3f}x, "
            f"2:4 {row['nm2:4']['over_dense']:.3f}x; mask update "
            f"{row['mask_update']['update_over_plain']:.2f}x a step, amortised "
            f"{100 * row['mask_update']['amortised_overhead']:.1f}%"
        )
    moe = moe_rows(args.moe_preset, num_steps) if args.moe_preset else None
    path = common.write("train_step", {"matmul_flops_per_s": peak, "presets": rows, "moe": moe})
    print("wrote", path)


if __name__ == "__main__":
    main()
