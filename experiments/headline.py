"""The headline experiment — do larger models tolerate more sparsity, near compute-optimal budgets?

Command:  python -m experiments.reproduce headline --preset cpu
Runtime:  smoke ≈ 1 min. cpu: the committed records (docs/records/headline/cpu/) hold all 240
          runs, so the command reuses them and redraws in ≈ 35 s (measured). From scratch:
          240 runs in 30 stacked jobs of 8 on 2 jobs × 1 thread. The dry
          run (`python -m launch calibrate experiments/headline.py:cpu --root R --jobs 2
          --threads 1`, then `python -m launch run … --root R --dry-run --jobs 2 --threads 1`)
          predicts 2.36 h of wall time from scratch (4.71 h of job time; training each shared
          prefix once saves 1.15 h), calibrated with the code of the committed records (c421830).
          Measured: the sweep ran over three sessions beside other work, so no clean end-to-end
          time exists. Per job, the 27 jobs up to 100K took 0.91× their prediction in aggregate
          (0.6–1.17× each); a 332K step took 6.3–7.2 s against 6.04 s calibrated. Replaying the
          launcher's schedule with the measured jobs (≈ 73 min per 332K job) gives 2.47 h.
Design:   6 sizes, 6.2K–332K non-embedding parameters (53×), each trained on 21 tokens per
          non-embedding parameter (near compute-optimal) in ≥ 500 optimizer steps: the batch grows
          with size (2 … 64 sequences of 128 bytes). Dense and 7 unstructured sparsities
          (25, 37.5, 50, 62.5, 75, 87.5, 93.75%: the low ones bracket small tolerances), gradual
          magnitude pruning under one matched schedule (cubic, 25% → 75% of training, 16 mask
          updates at every size). 3 seeds, paired: dense and sparse runs of a seed share the
          initialisation and the data order, and the 8 variants of a seed are one stacked job that
          trains the shared dense prefix (the first 25%) once and forks. Budget arm (tag "arm"):
          the two sizes 14K and 25K also at 5 and 80 tokens per parameter, with the same batch
          (so D changes through the number of steps only: 5 tok/param trains 120–140 steps).
          Eval on the same 256 validation windows (32K bytes) for every run. One peak LR, 3e-3,
          at every size: this first sweep predates the LR tuning and is kept as committed;
          experiments/crossover.py is its step-matched successor at tuned LRs.
Expected: β(S) of log ΔL = log g(S) − β(S)·log N with intervals over sizes and over seeds, S*(N)
          and γ of ΔL ∝ D^−γ at fixed N. Measured (docs/figures/headline/cpu/): β < 0 at 87.5%
          (−0.15) and 93.75% (−0.20), both intervals below 0; inconclusive at 25–75%; S* at 0.05
          nats 0.54–0.68 with no trend; at 14K the gap grows with D (γ −0.20 … −0.12 at 25–87.5%).
"""

import statistics

from analysis import load
from experiments import common

PRESETS = {
    "smoke": dict(
        sizes={"cpu_6k": 2, "cpu_12k": 2},  # model: batch size
        sparsities=(0.0, 0.5, 0.875),
        seeds=(0, 1),
        tokens_per_param=0.25,
        arm_sizes=("cpu_6k",),
        arm_tokens_per_param=(0.5,),
        seq_len=32,
        eval_sequences=8,
    ),
    "cpu": dict(
        sizes={
            "cpu_6k": 2,
            "cpu_12k": 4,
            "cpu_25k": 8,
            "cpu_50k": 16,
            "cpu_100k": 32,
            "cpu_330k": 64,
        },
        sparsities=(0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.9375),
        seeds=(0, 1, 2),
        tokens_per_param=21,
        arm_sizes=("cpu_12k", "cpu_25k"),
        arm_tokens_per_param=(5, 80),
        seq_len=128,
        eval_sequences=256,
    ),
}


def get_config(arg: str = "cpu"):
    p = common.preset_of(PRESETS, arg, "headline")
    c = common.base_config()
    c.experiment = "headline"
    if arg == "smoke":
        c = common.smoke(c)
    c.data.seq_len = c.model.max_len = p["seq_len"]
    c.sparsity.structure = "unstructured"
    c.sparsity.schedule.updates = 16 if arg != "smoke" else 2
    c.train.lr = 3e-3  # one LR at every size (see Design)
    c.train.log_every = 10 if arg != "smoke" else 2
    c.train.ckpt_every = 100 if arg != "smoke" else 4
    return c


def steps_for(size: str, tokens_per_param: float, batch_size: int, seq_len: int) -> int:
    params = common.non_embedding_params(size)
    return max(1, round(tokens_per_param * params / (batch_size * seq_len)))


def get_sweep(arg: str = "cpu"):
    """Seed-major within each (size, budget), so that one stacked job holds one seed's variants
    and trains their shared prefix once."""
    p = common.preset_of(PRESETS, arg, "headline")
    cells = [("main", size, p["tokens_per_param"]) for size in p["sizes"]]
    cells += [("arm", s, d) for s in p["arm_sizes"] for d in p["arm_tokens_per_param"]]
    runs = []
    for tag, size, tokens_per_param in cells:
        batch = p["sizes"][size]
        for seed in p["seeds"]:
            for target in p["sparsities"]:
                runs.append(
                    {
                        "tag": tag,
                        "model.name": size,
                        "data.batch_size": batch,
                        "train.steps": steps_for(size, tokens_per_param, batch, p["seq_len"]),
                        "train.eval_batches": max(1, p["eval_sequences"] // batch),
                        **common.sparsity_overrides("unstructured", target),
                        **common.seed_overrides(seed),
                    }
                )
    return runs


def analyze(results, out_dir):
    """The main-budget report (β(S), S*(N)) and the report with the budget arm: one regime per
    budget, and how ΔL changes with D at fixed N."""
    reports = {}
    if not len(results):
        return reports
    main = by_budget(results[results["tag"] == "main"])
    if len(main):
        reports["main"] = common.report(main, out_dir / "main", "Headline: the main budget")
    if (results["tag"] == "arm").any():
        reports["both"] = common.report(
            by_budget(results), out_dir / "both", "Headline with the budget arm"
        )
    return reports


def by_budget(results):
    """Regime label = tokens per non-embedding parameter ("arm" holds two budgets); values within
    25% of each other (step counts are rounded per size) are one budget."""
    per_param = results["tokens"] / results[load.SIZE]
    groups = []
    for x in sorted(set(per_param)):
        if groups and x <= 1.25 * groups[-1][0]:
            groups[-1].append(x)
        else:
            groups.append([x])
    label = {x: f"{statistics.median(g):.2g} tokens per parameter" for g in groups for x in g}
    return results.assign(tag=per_param.map(label))
