"""Figure 6 — what sparsity buys: memory per format, FLOPs per token, measured time vs the limit,
and the energy each run used against what its FLOPs promise.

Command:  python -m experiments.reproduce fig6_costs --preset quick
          (trains six runs at one size, then draws them with the JSON results of the library's
          format and FLOP tables, `python -m benchmarks.cost_tables` (committed), and the timings of
          `python benchmarks/kernels.py --quick`; it draws what is there and says what is missing.
          The analysis imports no JAX.)
Runtime:  smoke ≈ 1 min; quick 2 min 07 s measured on 2 CPU cores with warm data and
          compilation caches (3 min 01 s before them; 6 runs, one per core at a time: each run's
          energy is its own job's, so runs are never stacked; the crossover sweep beside it
          paused); the kernel benchmark: ≈ 5 min quick.
Design:   (a) bytes per weight element of each format (dense, masked dense, N:M compressed, block
          compressed) against the limit density × value bytes; (b) training FLOPs per token vs
          sparsity for every CPU preset; (c) measured fwd+bwd time of the block-sparse XLA path vs
          masked dense, per sparsity and block size, against the ideal 1/(1 − S); (d) energy per
          training token of dense, unstructured 50% / 87.5%, block 75% (masked and block-sparse
          execution) and an 8-expert top-2 MoE at matched active parameters, one seed, beside the
          share of the dense run's FLOPs each one needs; (e) eval loss against energy.
Expected: compressed N:M within 12.5% (2-bit indices) of its byte limit; masked dense pays for its
          mask and gives no speedup; block-sparse speedups below the ideal, growing with block size.
          Energy on a CPU host is an estimate from wall time (no counter). Measured (quick,
          cpu_100k at its tuned LR 0.0144, code cf99a04, estimated joules): masked sparsity costs
          what dense costs (1.01–1.05× at 50%, 87.5% and block 75%, against 0.34–0.62× of its
          FLOPs); the block-sparse path costs 1.51× (16×16 tiles at this size are slower than
          dense, and it recompiles twice; docs/BLOCK_SPARSE.md: it pays from ~4.7M parameters
          with 64×64 blocks); the MoE 1.45× for the lowest loss (1.789 against dense 1.828). At
          3e-3 (code f8eba29): 0.94–0.98×, 1.47×, 1.34×, and losses 1.945 / 1.976.
"""

from pathlib import Path

from analysis import costs
from experiments import common
from sparsescale import model as model_lib

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MAX_STACK = 1  # a stacked job's runs would each report the whole job's energy

PRESETS = {
    "smoke": dict(size="cpu_25k", block=(4, 4), steps=10, batch_size=8, seq_len=32),
    "quick": dict(size="cpu_100k", block=(16, 16), steps=400, batch_size=16, seq_len=128),
}


def get_config(arg: str = "quick"):
    c = common.experiment_config("fig6_costs", PRESETS, arg)
    c.model.name = PRESETS[arg]["size"]
    c.train.lr = common.lr_overrides(c.model.name)["train.lr"]
    return c


def get_sweep(arg: str = "quick"):
    """Six runs; each `tag` names what it is (the figure's labels)."""
    p = common.preset_of(PRESETS, arg, __name__)
    block = dict(block=p["block"], balanced=True)
    # the block path switches on at half density (below the break-even density at this size)
    block_exec = dict(block, impl="block", switch_density=0.5)
    experts, top_k = 8, 2
    return [
        {"tag": "dense", **common.sparsity_overrides("dense")},
        {"tag": "unstructured 50%", **common.sparsity_overrides("unstructured", 0.5)},
        {"tag": "unstructured 87.5%", **common.sparsity_overrides("unstructured", 0.875)},
        {"tag": "block 75%, masked", **common.sparsity_overrides("block", 0.75, **block)},
        {
            "tag": "block 75%, block-sparse execution",
            **common.sparsity_overrides("block", 0.75, **block_exec),
        },
        {
            "tag": f"MoE {experts} experts, top-{top_k}",
            "model.moe.num_experts": experts,
            "model.moe.top_k": top_k,
            "model.moe.every": 1,
            "model.d_ff": model_lib.PRESETS[p["size"]]["d_ff"] // top_k,
        },
    ]


def analyze(results, out_dir, benchmarks_dir: Path = BENCHMARKS):
    """The benchmark panels, and the energy panels from the runs in `results`."""
    return costs.draw_costs(out_dir, benchmarks_dir, results)
