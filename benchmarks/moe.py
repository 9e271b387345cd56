"""MoE layer (E=8, k=2) vs dense MLPs: forward + backward step time on this machine, in one process.

Compared with the MoE layer (dropless with blocked or ragged_dot grouped matmuls, and capacity
dispatch at factor 1.25; expert width F):
  dense_active: a dense MLP with the same active parameters per token (width k * F),
  dense_total:  a dense MLP with the same total parameters (width E * F).
Each function is a jitted value-and-grad of a squared-error loss over the nnx.Param state.
Timings are interleaved over `--repeats` rounds and the median is reported.

  python benchmarks/moe.py [--tokens 2048 --d-model 256 --d-ff 512 --mlp gelu]
      [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from sparsescale.accounting import moe_layer_counts, moe_layer_flops_per_token
from sparsescale.moe import MoE, MoEConfig


class DenseMlp(nnx.Module):
    """The dense MLP the experts copy ("gelu" or "swiglu", no biases)."""

    def __init__(self, d_model: int, d_ff: int, mlp_kind: str, *, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.mlp_kind = mlp_kind
        self.w_in = linear(d_model, d_ff)
        self.w_gate = linear(d_model, d_ff) if mlp_kind == "swiglu" else None
        self.w_out = linear(d_ff, d_model)

    def __call__(self, x):
        if self.w_gate is not None:
            hidden = jax.nn.silu(self.w_gate(x)) * self.w_in(x)
        else:
            hidden = jax.nn.gelu(self.w_in(x))
        return self.w_out(hidden), {"aux_loss": jnp.zeros(())}


def make_step(module: nnx.Module):
    """Jitted (loss, grads) of the module's Param state; returns (step, params)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def step(params, x_BxLxD):
        def loss_fn(params):
            y, aux = nnx.merge(graphdef, params, rest)(x_BxLxD)
            return jnp.mean(jnp.square(y - x_BxLxD)) + aux["aux_loss"]

        return jax.value_and_grad(loss_fn)(params)

    return step, params


def time_steps(step, params, x, iters: int) -> float:
    """Seconds per step, blocking on the result."""
    jax.block_until_ready(step(params, x))
    start = time.perf_counter()
    for _ in range(iters):
        out = step(params, x)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def param_count(module: nnx.Module) -> int:
    return sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (B*L)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512, help="width of one expert")
    parser.add_argument("--mlp", choices=("gelu", "swiglu"), default="gelu")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/moe_<backend>.json"
    )
    args = parser.parse_args(argv)
    if args.tokens % args.seq_len:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")

    D, F, E, K = args.d_model, args.d_ff, args.experts, args.top_k
    x = jax.random.normal(jax.random.key(0), (args.tokens // args.seq_len, args.seq_len, D))
    rngs = nnx.Rngs(0)
    moe_variants = {
        "moe_dropless_blocked": dict(dispatch="dropless", grouped_matmul="blocked"),
        "moe_dropless_ragged_dot": dict(dispatch="dropless", grouped_matmul="ragged_dot"),
        "moe_capacity": dict(dispatch="capacity"),
    }
    modules = {
        name: MoE(MoEConfig(num_experts=E, top_k=K, **kw), D, F, args.mlp, rngs=rngs)
        for name, kw in moe_variants.items()
    }
    modules["dense_active"] = DenseMlp(D, K * F, args.mlp, rngs=rngs)
    modules["dense_total"] = DenseMlp(D, E * F, args.mlp, rngs=rngs)

    steps = {name: make_step(m) for name, m in modules.items()}
    compile_s = {}
    for name, (step, params) in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        compile_s[name] = time.perf_counter() - start
    samples = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, params) in steps.items():
            samples[name].append(time_steps(step, params, x, args.iters))

    cfg = MoEConfig(num_experts=E, top_k=K)
    counts = moe_layer_counts(cfg, D, F, args.mlp)
    results = {
        name: {
            "step_ms_median": 1e3 * statistics.median(samples[name]),
            "step_ms_samples": [1e3 * s for s in samples[name]],
            "first_call_s": compile_s[name],
            "params_total": param_count(modules[name]),
        }
        for name in steps
    }
    ratios = {
        f"{moe}_over_{dense}": results[moe]["step_ms_median"] / results[dense]["step_ms_median"]
        for moe in moe_variants
        for dense in ("dense_active", "dense_total")
    }
    report = {
        "benchmark": "moe_layer_fwd_bwd",
        "device": str(jax.devices()[0].device_kind),
        "cpu_count_visible": len(jax.devices()),
        "args": vars(args),
        "moe_config": dataclasses.asdict(cfg),
        "moe_params": counts,
        "moe_layer_flops_per_token": moe_layer_flops_per_token(cfg, D, F, args.mlp),
        "results": results,
        "ratios": ratios,
    }
    common.write("moe", report, args.out)
    print(json.dumps({"ratios": ratios, "params": counts}, indent=2))
    return report


if __name__ == "__main__":
    main()
