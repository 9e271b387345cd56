"""Figure 1 — do larger models tolerate higher sparsity, and in which training regime?

Command:  python -m experiments.reproduce fig1_size --preset quick
Runtime:  smoke ≈ 2 min; quick ≈ 10 min on 2 CPU cores (90 runs, stacked; 10 min 05 s measured
          from empty data and compilation caches, code cf99a04); full: accelerators. The CPU experiment near
          compute-optimal budgets (≥ 20 tokens per parameter, 3 paired seeds) is
          experiments/headline.py; it replaced the old `medium`
          preset, whose two smallest "scaled" sizes duplicated their "fixed" runs.
Design:   5 sizes spanning ≥ 30× in non-embedding parameters (quick: 6K–330K, 54×) × sparsity
          {0, 50, 75, 87.5, 93.75}% unstructured, gradual magnitude pruning under one matched
          schedule (cubic, 25%→75% of training), two seeds for the sizes ≤ 150K (quick), in two
          token-budget regimes tagged in the results:
          "scaled" (a fixed number of tokens per non-embedding parameter, so every size sees the
          same training budget relative to its size) and "fixed" (the same short step count for
          every size, as in docs/PILOT.md). Each size at its tuned peak LR (`common.tuned_lr`:
          the crossover's measured dense optima, 0.0150 at 6.2K … 0.0117 at 332K) in both
          regimes.
Expected: whatever the data show, stated with its regime. The pilot found the penalty ΔL(S) growing
          with size at a fixed short budget; the scaled regime tests whether that was under-training.
          Measured (quick, tuned LRs, docs/figures/fig1_size/quick/): β inconclusive at every level
          in both regimes (fixed: +0.007 … +0.047; scaled: +0.10 … +0.67); at 3e-3 the fixed
          budget had β < 0 at 50 / 87.5 / 93.75%, so that trend was a learning-rate effect.
"""

from experiments import common

PRESETS = {
    "smoke": dict(
        sizes=("cpu_25k", "cpu_50k"),
        sparsities=(0.0, 0.75),
        seeds=(0,),
        tokens_per_param=0.05,
        min_steps=8,
        fixed_steps=8,
        batch_size=8,
        seq_len=32,
    ),
    "quick": dict(
        sizes=("cpu_6k", "cpu_12k", "cpu_25k", "cpu_100k", "cpu_330k"),
        sparsities=(0.0, 0.5, 0.75, 0.875, 0.9375),
        seeds=(0, 1),
        max_params_multi_seed=150_000,  # second seed only where it is cheap
        tokens_per_param=4,
        min_steps=50,
        fixed_steps=300,
        batch_size=8,
        seq_len=128,
        every=5,
    ),
    "full": dict(
        sizes=("acc_19m", "acc_85m", "acc_300m", "acc_1b"),
        sparsities=(0.0, 0.5, 0.75, 0.875, 0.9375),
        seeds=(0, 1),
        tokens_per_param=20,
        min_steps=2000,
        fixed_steps=5000,
        batch_size=256,
        seq_len=512,
    ),
}


def get_config(arg: str = "quick"):
    c = common.experiment_config("fig1_size", PRESETS, arg)
    c.sparsity.structure = "unstructured"
    return c


def get_sweep(arg: str = "quick"):
    p = common.preset_of(PRESETS, arg, __name__)
    runs = []
    for regime in ("scaled", "fixed"):
        for size in p["sizes"]:
            steps = (
                common.steps_for_budget(
                    size, p["tokens_per_param"], p["batch_size"], p["seq_len"], p["min_steps"]
                )
                if regime == "scaled"
                else p["fixed_steps"]
            )
            params = common.non_embedding_params(size)
            seeds = p["seeds"] if params <= p.get("max_params_multi_seed", float("inf")) else (0,)
            for sparsity in p["sparsities"]:
                for seed in seeds:
                    runs.append(
                        {
                            "tag": regime,
                            "model.name": size,
                            **common.lr_overrides(size),
                            "train.steps": steps,
                            **common.sparsity_overrides("unstructured", sparsity),
                            **common.seed_overrides(seed),
                        }
                    )
    return runs


def analyze(results, out_dir):
    """One report per regime (fits, ΔL(S) vs size, S*(N) with intervals), and one over both
    regimes together, where D varies independently of N so the full L(S, N, D) law is identified."""
    reports = {
        regime: common.report(
            results[results["tag"] == regime],
            out_dir / regime,
            f"Figure 1, {regime} token budget",
        )
        for regime in ("scaled", "fixed")
        if (results["tag"] == regime).any()
    }
    if results["tag"].nunique() > 1:
        reports["both"] = common.report(results, out_dir / "both", "Figure 1, both budgets")
    return reports
