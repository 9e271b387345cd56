"""Block-sparse training speed (issue 8): the block-sparse layer and whole train steps vs dense.

    python benchmarks/block_sparse.py [--quick] [--cores 1] [--out PATH]

1. Layers: forward+backward of x [M, K] @ kernel [K, N] (M = 4096 tokens, the CPU presets'
   batch), masked dense (`x @ (w ⊙ mask)`, what every mask-based library runs) vs the block path
   (`pack_columns` + `block_columns_matmul`, balanced blocks, exact tile budget), over block size
   and sparsity; the break-even density per block size (geometric mean over shapes, interpolated)
   that `sparsity.impl = "block"` switches at.
2. Train steps of CPU presets at 75% and 87.5% balanced block sparsity (constant schedule):
   masked vs block path vs dense, stepped in alternation; plus the share of the step the pruned
   layers take (their masked fwd+bwd timed alone), which bounds the whole-step gain (Amdahl).

Writes the package's benchmarked machine data `sparsescale/benchmarked/block_sparse_<backend>.json` (with the machine
it was measured on; the trainer reads the break-even densities from it through `sparsescale.benchmarked`)
and the figure `benchmarks/results/block_sparse_<backend>.png`; `--out PATH` writes the record to
PATH and the figure beside it instead (another machine's measurement, leaving the trainer's data as
it is). Ratios are measured within one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import numpy as np


def _pin(cores: int | None) -> None:
    if cores:  # before jax starts its thread pools
        os.sched_setaffinity(0, set(range(cores)))


def _fwd_bwd(f):
    """jit of (x, w, dy, *rest) ↦ (y, dx, dw) of y = f(x, w, *rest): one forward and one backward
    (y is returned so the forward is not dead code; the mask is an argument, as in training, so
    nothing is constant-folded)."""
    import jax

    def run(x, w, dy, *rest):
        y, pullback = jax.vjp(lambda x, w: f(x, w, *rest), x, w)
        return y, *pullback(dy)

    return jax.jit(run)


def _attention_fwd_bwd(q):
    """Causal self-attention forward + backward with q = k = v (the model's attention op)."""
    import jax

    from sparsescale import model

    out, pullback = jax.vjp(lambda q: model.causal_attention(q, q, q), q)
    return out, pullback(q)


def where_time_goes(profile: dict, density: float) -> dict:
    """Matmul share of the masked step (profiled), the step speedup if every matmul shrank to
    `density` of its time (an upper bound: attention's matmuls do not shrink), and the time the
    block step's matmuls and other ops take relative to the masked step's."""
    masked, block = profile["masked"], profile["block"]
    total = masked["matmul_s"] + masked["other_s"]
    share = masked["matmul_s"] / total
    return dict(
        matmul_share_of_masked_step=share,
        bound_matmuls_at_density=1 / ((1 - share) + share * density),
        matmul_time_block_over_masked=block["matmul_s"] / masked["matmul_s"],
        other_time_block_over_masked=block["other_s"] / masked["other_s"],
    )


class _Runner:
    """Steps one trainer on a fixed batch, threading its (donated) state."""

    def __init__(self, trainer, state, batch):
        self.trainer, self.state, self.batch = trainer, state, batch

    def hlo(self) -> str:
        return self.trainer.step_fn.lower(self.state, self.batch).compile().as_text()

    def step(self):
        self.state, metrics = self.trainer.step_fn(self.state, self.batch)
        return metrics


def op_breakdown(hlo: str, run, calls: int = 2) -> dict:
    """Seconds per call of `run()` in matmuls (dots, and fusions around a dot) vs everything else,
    from a profiler trace; `hlo` is the compiled program's text (names the ops)."""
    import glob
    import gzip
    import re
    import tempfile

    import jax

    calls_of = dict(re.findall(r"%(\S+) = .*?calls=%(\S+?)[,\s]", hlo))
    bodies = dict(re.findall(r"\n%(\S+) \(.*?\{\n(.*?)\n\}", hlo, re.S))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(calls):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    out = {"matmul_s": 0.0, "other_s": 0.0}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "Py")) or "Thunk" in name:
            continue
        if name.startswith(("while", "call", "Pjit")) or "Execute" in name:
            continue  # containers: their ops are listed on their own
        is_dot = name.startswith("dot") or " dot(" in bodies.get(calls_of.get(name, ""), "")
        out["matmul_s" if is_dot else "other_s"] += e.get("dur", 0) / 1e6 / calls
    return out


def layer_rows(shapes, blocks, sparsities, repeats: int) -> list[dict]:
    import jax.numpy as jnp

    from benchmarks import common
    from sparsescale import sparsity as sp
    from sparsescale.kernels import xla_block

    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        for block in blocks:
            kb = k // block[0]
            if k % block[0] or n % block[1]:
                continue
            for s in sparsities:
                keep = kb - int(math.floor(s * kb + 0.5))
                if keep < 1:
                    continue
                mask = sp.Block(s, block, balanced=True).mask(jnp.asarray(rng.random((k, n))))

                def masked(x, w, mask):
                    return x @ jnp.where(mask, w, 0)

                def blocked(x, w, mask, block=block, keep=keep):
                    values, rws, counts = xla_block.pack_columns(w, mask, block, keep)
                    return xla_block.block_columns_matmul(x, values, rws, counts)

                fns = {"masked": _fwd_bwd(masked), "block": _fwd_bwd(blocked)}
                t = common.time_interleaved(
                    {name: functools.partial(f, x, w, dy, mask) for name, f in fns.items()}, repeats
                )
                row = dict(
                    shape=[m, k, n],
                    block=list(block),
                    sparsity=1 - keep / kb,
                    density=keep / kb,
                    masked_fwd_bwd_s=t["masked"],
                    block_fwd_bwd_s=t["block"],
                    speedup=t["masked"] / t["block"],
                )
                rows.append(row)
                print(
                    f"M{m} K{k} N{n} block {block[0]}x{block[1]} sparsity {row['sparsity']:.4f}: "
                    f"masked {t['masked'] * 1e3:.1f} ms, block {t['block'] * 1e3:.1f} ms "
                    f"→ {row['speedup']:.2f}x",
                    flush=True,
                )
    return rows


def break_even(rows: list[dict]) -> dict[str, float | None]:
    """Per block size: the density where the geometric-mean speedup over shapes crosses 1
    (linear interpolation between measured densities); None if the block path never wins."""
    out = {}
    for block in sorted({tuple(r["block"]) for r in rows}):
        by_density: dict[float, list[float]] = {}
        for r in rows:
            if tuple(r["block"]) == block:
                by_density.setdefault(r["density"], []).append(math.log(r["speedup"]))
        pts = sorted((d, float(np.mean(v))) for d, v in by_density.items())  # (density, log sp)
        best = None
        for (d0, l0), (d1, l1) in zip(pts, pts[1:], strict=False):
            if l0 >= 0 > l1:
                best = d0 + (d1 - d0) * l0 / (l0 - l1)
        if best is None and pts and all(lv >= 0 for _, lv in pts):
            best = pts[-1][0]
        out[f"{block[0]}x{block[1]}"] = best
    return out


def step_rows(cases, num_steps: int) -> list[dict]:
    import jax

    from benchmarks import common
    from benchmarks.train_step import make_config
    from sparsescale import block_phase
    from sparsescale import step as step_lib

    out = []
    for preset, block, sparsity in cases:
        over = {
            "sparsity.structure": "block",
            "sparsity.block": block,
            "sparsity.balanced": True,
            "sparsity.target": sparsity,
            "sparsity.schedule.kind": "constant",
        }
        sparse_cfg = make_config(preset, over)
        dense_cfg = make_config(preset, {})
        masked = step_lib.build(sparse_cfg)
        states = {"masked": masked.init_fn(), "dense": None, "block": None}
        budgets = block_phase.block_budgets_of(masked, states["masked"])
        trainers = {
            "masked": masked,
            "block": step_lib.build(sparse_cfg, block_budgets=budgets),
            "dense": step_lib.build(dense_cfg),
        }
        states["block"] = trainers["block"].init_fn()
        states["dense"] = trainers["dense"].init_fn()
        rng = np.random.default_rng(0)
        tokens = rng.integers(
            0, 256, (sparse_cfg.data.batch_size, sparse_cfg.data.seq_len + 1), dtype=np.int32
        )
        batch = step_lib.global_batch(masked, tokens)
        times = {name: [] for name in trainers}
        for i in range(num_steps + 2):
            for name, tr in trainers.items():
                t = time.perf_counter()
                states[name], metrics = tr.step_fn(states[name], batch)
                jax.block_until_ready(metrics)
                if i >= 2:  # compile + warm-up
                    times[name].append(time.perf_counter() - t)
        med = {name: float(np.median(v)) for name, v in times.items()}

        profile = {}
        for name in ("masked", "block"):
            runner = _Runner(trainers[name], states[name], batch)
            profile[name] = op_breakdown(runner.hlo(), runner.step)
            states[name] = runner.state

        cfg_m = sparse_cfg.model
        q = jax.random.normal(
            jax.random.key(0),
            (sparse_cfg.data.batch_size, sparse_cfg.data.seq_len, cfg_m.n_heads, cfg_m.head_dim),
        )
        attention_s = cfg_m.n_layers * common.time_fn(jax.jit(_attention_fwd_bwd), q, repeats=5)
        row = dict(
            preset=preset,
            block=list(block),
            sparsity=sparsity,
            budgets=budgets,
            masked_step_s=med["masked"],
            block_step_s=med["block"],
            dense_step_s=med["dense"],
            speedup_over_masked=med["masked"] / med["block"],
            speedup_over_dense=med["dense"] / med["block"],
            attention_share_of_masked_step=attention_s / med["masked"],
            profile=profile,
            **where_time_goes(profile, 1 - sparsity),
        )
        out.append(row)
        print(
            f"{preset} block {block[0]}x{block[1]} @ {sparsity:.4f}: masked "
            f"{med['masked'] * 1e3:.0f} ms, block {med['block'] * 1e3:.0f} ms, dense "
            f"{med['dense'] * 1e3:.0f} ms → {row['speedup_over_masked']:.2f}x over masked, "
            f"{row['speedup_over_dense']:.2f}x over dense; matmuls are "
            f"{100 * row['matmul_share_of_masked_step']:.0f}% of the masked step (bound "
            f"{row['bound_matmuls_at_density']:.2f}x), "
            f"attention {100 * row['attention_share_of_masked_step']:.0f}%; profiled matmul/other "
            f"masked {profile['masked']['matmul_s']:.2f}/{profile['masked']['other_s']:.2f} s, "
            f"block {profile['block']['matmul_s']:.2f}/{profile['block']['other_s']:.2f} s",
            flush=True,
        )
    return out


def plot(payload: dict, path) -> None:
    """Layer speedup vs density per block size, and whole-step speedups with their Amdahl bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = payload["layers"]
    for block in sorted({tuple(r["block"]) for r in rows}):
        mine = [r for r in rows if tuple(r["block"]) == block]
        dens = sorted({r["density"] for r in mine})
        geo = [
            np.exp(np.mean([np.log(r["speedup"]) for r in mine if r["density"] == d])) for d in dens
        ]
        (line,) = ax1.plot(dens, geo, "o-", label=f"{block[0]}×{block[1]}")
        ax1.scatter(
            [r["density"] for r in mine], [r["speedup"] for r in mine], s=8, color=line.get_color()
        )
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set(
        xlabel="density (kept fraction of blocks)",
        ylabel="masked dense time / block time",
        yscale="log",
        title="Layer fwd+bwd, M=4096 (line: geo-mean over shapes)",
    )
    ax1.legend(title="block")
    steps = payload["train_steps"]
    labels = [
        f"{r['preset'].removeprefix('cpu_')}\n{r['block'][0]}² {r['sparsity']:.3g}" for r in steps
    ]
    x = np.arange(len(steps))
    ax2.bar(x - 0.2, [r["speedup_over_masked"] for r in steps], 0.4, label="over masked")
    ax2.bar(x + 0.2, [r["speedup_over_dense"] for r in steps], 0.4, label="over dense")
    ax2.scatter(
        x,
        [r["bound_matmuls_at_density"] for r in steps],
        marker="_",
        s=300,
        color="k",
        label="bound: all matmuls at density × time",
    )
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(x, labels, fontsize=7, rotation=30)
    ax2.set(ylabel="train-step speedup", title="Whole train step (1 core, 32×128 tokens)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cores", type=int, default=1, help="pin to this many cores (0: all)")
    parser.add_argument("--skip-layers", action="store_true", help="reuse the saved layer rows")
    parser.add_argument(
        "--presets", help="time only these presets' train steps (comma-separated); the saved "
        "rows of the other cases are kept"
    )  # fmt: skip
    parser.add_argument("--out", help="write the record here (and the figure beside it as .png)")
    args = parser.parse_args()
    _pin(args.cores)
    import jax

    from benchmarks import common
    from sparsescale import benchmarked

    start = time.time()
    m = 4096
    shapes = [(m, 256, 1024), (m, 1024, 256), (m, 256, 256), (m, 128, 512)]
    blocks = [(16, 16), (32, 32), (64, 64), (128, 128)]
    sparsities = [0.0, 0.5, 0.75, 0.875, 0.9375]
    if args.quick:
        shapes, blocks, sparsities = shapes[:2], blocks[1:3], [0.0, 0.5, 0.75]
    repeats = 3 if args.quick else 5
    name = f"block_sparse_{jax.default_backend()}"
    saved = benchmarked.load(name) if args.skip_layers or args.presets else None
    if args.skip_layers:  # keep the layer rows of the last full run
        layers_out = saved["layers"]
    else:
        layers_out = layer_rows(shapes, blocks, sparsities, repeats)
    cases = [
        ("cpu_100k", (16, 16), 0.75),
        ("cpu_800k", (32, 32), 0.75),
        ("cpu_800k", (16, 16), 0.875),
        ("cpu_4.7m", (64, 64), 0.75),
        ("cpu_4.7m", (32, 32), 0.75),
        ("cpu_4.7m", (32, 32), 0.875),
        ("cpu_3.8m_d400", (20, 20), 0.75),
        ("cpu_3.8m_d400", (20, 20), 0.9),
        ("cpu_3.8m_d400", (40, 40), 0.9),
    ]
    if args.quick:
        cases = cases[1:2]
    kept = []
    if args.presets:
        chosen = set(args.presets.split(","))
        cases = [c for c in cases if c[0] in chosen]
        kept = [r for r in saved["train_steps"] if r["preset"] not in chosen]
    steps = kept + step_rows(cases, 3 if args.quick else 6)
    path = benchmarked.write(
        name,
        {
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "cores": args.cores or os.cpu_count(),
            "quick": args.quick,
            "layers": layers_out,
            "break_even_density": break_even(layers_out) if layers_out else {},
            "train_steps": steps,
            "wall_s": time.time() - start,
        },
        args.out,
    )
    figure = path.with_suffix(".png") if args.out else common.RESULTS / f"{name}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(json.loads(path.read_text()), figure)
    print("wrote", path, "and", figure)


if __name__ == "__main__":
    main()
