"""Train-step speed of the CPU presets: dense vs masked sparse (unstructured 75%, 2:4) vs a plain
flax.nnx + optax step of the same model (the reference), model FLOP/s utilisation, and the cost of
mask-update steps.

    python benchmarks/train_step.py [--quick] [--presets cpu_25k,cpu_600k]

Writes benchmarks/results/train_step_<backend>.json. Every ratio is measured in one process.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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


class RefModel(nnx.Module):
    """The same transformer written plainly with flax.nnx (no sparsity code): pre-RMSNorm blocks,
    RoPE or learned positions, GELU/SwiGLU MLP, untied head, no biases."""

    def __init__(self, m, *, rngs: nnx.Rngs):
        d, f = m.d_model, m.d_ff
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.m = m
        self.embed = nnx.Embed(m.vocab_size, d, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((m.max_len, d))) if m.pos == "learned" else None
        self.blocks = nnx.List(
            [
                nnx.Dict(
                    n1=nnx.RMSNorm(d, rngs=rngs),
                    qkv=lin(d, 3 * d),
                    o=lin(d, d),
                    n2=nnx.RMSNorm(d, rngs=rngs),
                    up=lin(d, (2 if m.mlp == "swiglu" else 1) * f),
                    down=lin(f, d),
                )
                for _ in range(m.n_layers)
            ]
        )
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.head = lin(d, m.vocab_size)

    def __call__(self, tokens_BxL):
        m = self.m
        b, l = tokens_BxL.shape
        x = self.embed(tokens_BxL)
        if self.pos is not None:
            x = x + self.pos[:l]
        for blk in self.blocks:
            q, k, v = jnp.split(blk.qkv(blk.n1(x)).reshape(b, l, 3 * m.n_heads, -1), 3, axis=2)
            if m.pos == "rope":
                q, k = model_lib.rope(q, jnp.arange(l)), model_lib.rope(k, jnp.arange(l))
            att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            x = x + blk.o(att.reshape(b, l, -1))
            h = blk.up(blk.n2(x))
            if m.mlp == "swiglu":
                g, h = jnp.split(h, 2, axis=-1)
                h = jax.nn.silu(g) * h
            x = x + blk.down(jax.nn.gelu(h) if m.mlp == "gelu" else h)
        return self.head(self.norm(x))


class RefStepper:
    """A minimal flax.nnx + optax train step (AdamW with our schedule, clip and decay mask) for
    `cfg`'s model shapes, jitted with donated state: the reference our dense step must beat."""

    def __init__(self, cfg):
        model = RefModel(cfg.model, rngs=nnx.Rngs(0))
        self.graphdef, params = nnx.split(model)
        t = cfg.train
        tx = optax.chain(
            optax.clip_by_global_norm(t.clip),
            optax.adamw(
                step_lib.learning_rate(t),
                t.b1,
                t.b2,
                weight_decay=t.weight_decay,
                mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
            ),
        )

        def train_step(state, batch_BxL1):
            def loss_fn(params):
                logits = nnx.merge(self.graphdef, params)(batch_BxL1[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, batch_BxL1[:, 1:]
                ).mean()

            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

        self.step_fn = jax.jit(train_step, donate_argnums=0)
        self.state = {"params": params, "opt": tx.init(params)}
        rng = np.random.default_rng(0)
        self.batch = jnp.asarray(
            rng.integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
        )
        self.step()  # compile

    def step(self) -> float:
        t = time.perf_counter()
        self.state, loss = self.step_fn(self.state, self.batch)
        jax.block_until_ready(loss)
        return time.perf_counter() - t


def interleaved_medians(cfgs: dict, num_steps: int, reference=None) -> dict[str, float]:
    """Median step time per config, stepping the configs in alternation (fair under load);
    `reference` (a config) adds the plain flax.nnx + optax step as "reference"."""
    steppers = {name: Stepper(cfg) for name, cfg in cfgs.items()}
    if reference is not None:
        steppers["reference"] = RefStepper(reference)
    times = {name: [] for name in steppers}
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
    parser.add_argument(
        "--mask-every", type=int, default=10, help="mask-update interval (3 intervals are timed)"
    )
    args = parser.parse_args()
    num_steps = args.steps or (10 if args.quick else 30)
    peak = common.matmul_flops_per_s()
    print(f"dense f32 matmul: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for preset in args.presets.split(","):
        row = {"preset": preset}
        cfgs = {name: make_config(preset, overrides) for name, overrides in VARIANTS.items()}
        medians = interleaved_medians(cfgs, num_steps, reference=cfgs["dense"])
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
        tokens = cfgs["dense"].data.batch_size * cfgs["dense"].data.seq_len
        row["reference"] = {
            "step_s": medians["reference"],
            "utilisation": dense_flops * tokens / medians["reference"] / peak,
        }
        row["dense_over_reference"] = row["dense"]["step_s"] / medians["reference"]
        # Mask updates: gradual schedule over the whole run, updated every `every` steps.
        every = args.mask_every
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
        times = step_times(gradual, 3 * every, start_step=1)  # steps 2..: 3 updates
        is_update = np.array([(s % every) == 0 for s in range(2, 2 + len(times))])
        t_update, t_plain = np.median(times[is_update]), np.median(times[~is_update])
        row["mask_update"] = {
            "every": every,
            "update_step_s": float(t_update),
            "plain_step_s": float(t_plain),
            "update_over_plain": float(t_update / t_plain),
            "amortised_overhead": float((t_update - t_plain) / every / t_plain),
        }
        rows.append(row)  # written after every preset: a run cut short keeps what it measured
        path = common.write(
            "train_step", {"matmul_flops_per_s": peak, "presets": rows, "moe": None}
        )
        print(
            f"{preset}: dense {row['dense']['step_s'] * 1e3:.1f} ms "
            f"({row['dense']['tokens_per_s']:.0f} tok/s, util {row['dense']['utilisation']:.2f}), "
            f"reference {row['reference']['step_s'] * 1e3:.1f} ms "
            f"(dense/reference {row['dense_over_reference']:.3f}); "
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
