"""Figure 6 — what sparsity buys: memory per format, FLOPs per token, measured time vs the limit
(trains nothing: no get_config or sweep; any --preset draws the same benchmark results).

Command:  python -m experiments.reproduce fig6_costs --preset quick
          (it reads JSON results: the library's format and FLOP tables from
          `python -m benchmarks.cost_tables` (committed), and the timings of
          `python benchmarks/kernels.py --quick` and `python benchmarks/train_step.py --quick`;
          it draws what is there and says what is missing. The analysis imports no JAX.)
Runtime:  drawing: seconds; the two benchmarks: ≈ 5 min quick on 2 CPU cores.
Design:   (a) bytes per weight element of each format (dense, masked dense, N:M compressed, block
          compressed) against the limit density × value bytes; (b) training FLOPs per token vs
          sparsity for every CPU preset; (c) measured fwd+bwd time of the block-sparse XLA path vs
          masked dense, per sparsity and block size, against the ideal 1/(1 − S).
Expected: compressed N:M within 12.5% (2-bit indices) of its byte limit; masked dense pays for its
          mask and gives no speedup; block-sparse speedups below the ideal, growing with block size.
"""

from pathlib import Path

from analysis import costs

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def analyze(results, out_dir, benchmarks_dir: Path = BENCHMARKS):
    """Trains nothing: draws the benchmark measurements (the results table is unused)."""
    del results
    return costs.draw_costs(out_dir, benchmarks_dir)
