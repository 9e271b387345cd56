"""The single-run config (one run, no sweep) on the offline default corpus (Python stdlib
source, byte-level).

Command:  python -m sparsescale.main --config experiments/single_run.py:quick --workdir runs/quick
Runtime:  quick ≈ 1.5 min on 2 CPU cores (84 s measured); smoke ≈ 30 s.
Expected: eval loss ≈ 2.2 nats/byte for the 25K-parameter model at 75% gradual magnitude sparsity
          after 600 steps (measured 2.197 here; the pilot's linen harness on a 4 MB corpus: 2.36).
"""

from experiments import common


def get_config(arg: str = "quick"):
    c = common.base_config()
    c.experiment = "single_run"
    c.sparsity.structure = "unstructured"
    c.sparsity.target = 0.75
    if arg == "smoke":
        return common.smoke(c)
    if arg != "quick":
        raise ValueError(
            f"experiments/single_run.py: unknown preset {arg!r}; use 'quick' or 'smoke'."
        )
    return c


def get_sweep(arg: str = "quick"):
    del arg
    return [{}]
