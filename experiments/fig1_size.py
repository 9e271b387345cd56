"""Figure 1 — do larger models tolerate higher sparsity, and in which training regime?

Command:  python -m experiments.reproduce fig1_size --preset quick
Runtime:  smoke ≈ 2 min; quick ≈ 35–45 min on 2 CPU cores (50 runs); medium ≈ 10 h (background);
          full: accelerators.
Design:   5 sizes spanning 32× in non-embedding parameters × sparsity {0, 50, 75, 87.5, 93.75}%
          unstructured, gradual magnitude pruning under one matched schedule (cubic, 25%→75% of
          training, every 10 steps), in two token-budget regimes tagged in the results:
          "scaled" (a fixed number of tokens per non-embedding parameter, so every size sees the
          same training budget relative to its size) and "fixed" (the same short step count for
          every size, as in ../shared/PILOT.md).
Expected: whatever the data show, stated with its regime. The pilot found the penalty ΔL(S) growing
          with size at a fixed short budget; the scaled regime tests whether that was under-training.
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
        sizes=("cpu_25k", "cpu_50k", "cpu_100k", "cpu_330k", "cpu_800k"),
        sparsities=(0.0, 0.5, 0.75, 0.875, 0.9375),
        seeds=(0,),
        tokens_per_param=4,
        min_steps=200,
        fixed_steps=200,
        batch_size=16,
        seq_len=128,
    ),
    "medium": dict(
        sizes=("cpu_25k", "cpu_100k", "cpu_330k", "cpu_800k", "cpu_1.8m"),
        sparsities=(0.0, 0.5, 0.75, 0.875, 0.9375),
        seeds=(0, 1, 2),
        tokens_per_param=20,
        min_steps=600,
        fixed_steps=600,
        batch_size=32,
        seq_len=128,
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
    p = common.preset_of(PRESETS, arg, __name__)
    c = common.base_config()
    c.experiment = "fig1_size"
    c.data.batch_size = p["batch_size"]
    c.data.seq_len = c.model.max_len = p["seq_len"]
    c.sparsity.structure = "unstructured"
    if arg == "smoke":
        c = common.smoke(c)
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
            for sparsity in p["sparsities"]:
                for seed in p["seeds"]:
                    runs.append(
                        {
                            "tag": regime,
                            "model.name": size,
                            "train.steps": steps,
                            **common.sparsity_overrides("unstructured", sparsity),
                            **common.seed_overrides(seed),
                        }
                    )
    return runs


def analyze(results, out_dir):
    """One report per regime: fits, ΔL(S) vs size, S*(N) with intervals."""
    return {
        regime: common.report(
            results[results["tag"] == regime],
            out_dir / regime,
            f"Figure 1, {regime} token budget",
        )
        for regime in ("scaled", "fixed")
        if (results["tag"] == regime).any()
    }
