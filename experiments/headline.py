"""The headline experiment — do larger models tolerate more sparsity, near compute-optimal budgets?

Command:  python -m experiments.reproduce headline --preset cpu
Runtime:  smoke ≈ 1 min. cpu: 240 runs in 24 stacked jobs (2 jobs × 1 thread); the dry run
          (`python -m launch run experiments/headline.py:cpu --dry-run`, after `launch calibrate`)
          predicts the wall time; measured numbers are in docs/RESULTS.md.
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
          Eval on the same 256 validation windows (32K bytes) for every run.
Expected: β(S) of log ΔL = log g(S) − β(S)·log N with seed-level intervals, S*(N) bracketed at
          every size, and how ΔL changes with D at fixed N; whatever the data say, with intervals.
"""

from experiments import common
from sparsescale import accounting
from sparsescale import model as model_lib

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
    c.train.log_every = 10 if arg != "smoke" else 2
    c.train.ckpt_every = 100 if arg != "smoke" else 4
    return c


def steps_for(size: str, tokens_per_param: float, batch_size: int, seq_len: int) -> int:
    params = accounting.param_counts(model_lib.preset(size))["non_embedding"]
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
    """The main-budget report (β(S), S*(N)) and the budget arm (ΔL against D at fixed N)."""
    reports = {}
    main = results[results["tag"] == "main"] if len(results) else results
    if len(main):
        reports["main"] = common.report(main, out_dir / "main", "Headline: 21 tokens per parameter")
    if len(results) and (results["tag"] == "arm").any():
        reports["both"] = common.report(results, out_dir / "both", "Headline with the budget arm")
    return reports
